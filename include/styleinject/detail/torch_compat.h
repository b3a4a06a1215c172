#pragma once

// Shims over the LibTorch API differences between 1.13 (Debian) and 2.x.

#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/nn/options/conv.h>
#include <torch/version.h>

#include <variant>

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

/// Turns autocast off while alive, on every device: the router, the gate
/// and their statistics are small and must stay in float32 (SPEC), where
/// autocast would run their matmuls in half precision. This is the guard
/// that autocast's own kernels use.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

/// Whether a variant of LibTorch's options holds a `T`: c10::variant in
/// 1.13, std::variant since c10's own was retired.
template <typename T, typename Variant>
bool holds(const Variant& variant) {
#ifdef C10_UTIL_VARIANT_H_
  return c10::get_if<T>(&variant) != nullptr;
#else
  return std::get_if<T>(&variant) != nullptr;
#endif
}

} // namespace detail
} // namespace styleinject
