#pragma once

// Shims over the LibTorch API differences between 1.13 (Debian) and 2.x.

#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>
#include <torch/version.h>

namespace styleinject {
namespace detail {

/// Whether autocast is on for tensors of this device type.
inline bool autocast_enabled(c10::DeviceType device) {
  if (device != c10::kCPU && device != c10::kCUDA) {
    return false;
  }
#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  return at::autocast::is_autocast_enabled(device);
#else
  return device == c10::kCUDA ? at::autocast::is_enabled()
                              : at::autocast::is_cpu_enabled();
#endif
}

} // namespace detail
} // namespace styleinject
