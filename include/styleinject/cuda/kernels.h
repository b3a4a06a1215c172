#pragma once

/// The library's own CUDA kernels: loaded per device at their first use
/// (compiled by NVRTC, nvrtc.h; sources in sources.h) and launched on the
/// current stream through the CUDA driver, which is opened with dlopen.
/// A LibTorch without CUDA (STYLEINJECT_CUDA_KERNELS undefined) builds the
/// same code paths, which then never use a kernel.

#include <styleinject/cuda/nvrtc.h>
#include <styleinject/cuda/sources.h>

#include <torch/torch.h>

#ifdef STYLEINJECT_CUDA_KERNELS
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

namespace styleinject {
namespace cuda {
namespace detail {

/// Whether StyleInject layers on this thread use the library's kernels
/// (see styleinject::CudaKernels in functional.h).
inline bool& kernels_on() {
  static thread_local bool on = false;
  return on;
}

/// How many times the library's kernels were launched in this process:
/// ATen's profiler sees none of them, so the bench adds these to its count.
inline std::atomic<int64_t>& kernel_launches() {
  static std::atomic<int64_t> launches{0};
  return launches;
}

#ifdef STYLEINJECT_CUDA_KERNELS

/// The CUDA driver's entry points that loading and launching a kernel
/// need, with its handles opaque (no cuda.h); a result is 0 for success.
struct Driver {
  int (*device_get)(int*, int);
  int (*device_attribute)(int*, int, int);
  int (*load_module)(void**, const void*);
  int (*module_function)(void**, void*, const char*);
  int (*launch)(
      void*,
      unsigned,
      unsigned,
      unsigned,
      unsigned,
      unsigned,
      unsigned,
      unsigned,
      void*,
      void**,
      void**);
  int (*error_string)(int, const char**);

  static const Driver& get() {
    static const Driver driver = open();
    return driver;
  }

  /// Checks a driver call's result; `what` names the call in an error.
  void check(int result, const char* what) const {
    if (result == 0) {
      return;
    }
    const char* text = "unknown error";
    error_string(result, &text);
    TORCH_CHECK(
        false, "styleinject: the CUDA driver failed to ", what, ": ", text);
  }

  /// A device attribute (CUdevice_attribute's value) of device `index`.
  int attribute(int index, int which) const {
    int device = 0, value = 0;
    check(device_get(&device, index), "find a device");
    check(device_attribute(&value, which, device), "read a device attribute");
    return value;
  }

 private:
  static Driver open() {
    void* handle = open_first({"libcuda.so.1", "libcuda.so"});
    TORCH_CHECK(
        handle != nullptr,
        "styleinject: expected the CUDA driver (libcuda.so.1), but dlopen found none");
    Driver d{};
    load_function(handle, "cuDeviceGet", d.device_get, "the CUDA driver");
    load_function(
        handle, "cuDeviceGetAttribute", d.device_attribute, "the CUDA driver");
    load_function(handle, "cuModuleLoadData", d.load_module, "the CUDA driver");
    load_function(
        handle, "cuModuleGetFunction", d.module_function, "the CUDA driver");
    load_function(handle, "cuLaunchKernel", d.launch, "the CUDA driver");
    load_function(
        handle, "cuGetErrorString", d.error_string, "the CUDA driver");
    return d;
  }
};

// CUdevice_attribute values.
inline constexpr int kMultiprocessors = 16;
inline constexpr int kMajor = 75;
inline constexpr int kMinor = 76;

/// One kernel, compiled and loaded once per device, at its first launch
/// there. Modules stay loaded for the process's life, as ATen's own.
class Kernel {
 public:
  explicit Kernel(KernelSource source) : source_(std::move(source)) {}

  /// Launches on `device`'s current stream: grid and block as (x, y, z),
  /// `args` by value, each exactly of the kernel's parameter type.
  template <typename... Args>
  void launch(
      const torch::Device& device,
      std::array<unsigned, 3> grid,
      std::array<unsigned, 3> block,
      Args... args) const {
    const c10::cuda::CUDAGuard guard(device);
    void* values[] = {static_cast<void*>(&args)...};
    const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
    Driver::get().check(
        Driver::get().launch(
            function(device.index()),
            grid[0],
            grid[1],
            grid[2],
            block[0],
            block[1],
            block[2],
            0,
            stream.stream(),
            values,
            nullptr),
        "launch a kernel");
    ++kernel_launches();
  }

 private:
  /// The kernel on device `index` (current): loaded at its first use.
  void* function(int index) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    auto& function = functions_[index];
    if (function == nullptr) {
      const auto& driver = Driver::get();
      const int arch = 10 * driver.attribute(index, kMajor) +
          driver.attribute(index, kMinor);
      const auto code = compile(source_.source, source_.name, arch);
      void* module = nullptr;
      driver.check(
          driver.load_module(&module, code.image.c_str()), "load a module");
      driver.check(
          driver.module_function(&function, module, source_.name.c_str()),
          "find a kernel in its module");
    }
    return function;
  }

  KernelSource source_;
  mutable std::mutex mutex_;
  mutable std::map<int, void*> functions_;
};

/// The preamble's name of a kernel input's dtype.
inline std::string element_type(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat:
      return "float";
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kHalf:
      return "float16";
    default:
      TORCH_CHECK(
          false,
          "styleinject: expected a float32, bfloat16 or float16 tensor for the CUDA kernels, but got ",
          t.scalar_type());
  }
}

/// The kernel for `source`, one per distinct source in the process.
inline const Kernel& kernel(const KernelSource& source) {
  static std::mutex mutex;
  static std::map<std::string, std::unique_ptr<Kernel>> kernels;
  const std::lock_guard<std::mutex> lock(mutex);
  auto& kernel = kernels[source.source];
  if (kernel == nullptr) {
    kernel = std::make_unique<Kernel>(source);
  }
  return *kernel;
}

/// The sums over the tokens of t and of t ⊙ u in float32, (N, C) each, in
/// one pass over t and u and no product written out: FusedLinear's
/// token_sums on CUDA. t, u: (N, L, C) on one device.
inline std::pair<torch::Tensor, torch::Tensor> token_sums(
    const torch::Tensor& t,
    const torch::Tensor& u) {
  TORCH_CHECK(
      t.dim() == 3 && t.sizes() == u.sizes() && t.is_cuda() &&
          t.device() == u.device(),
      "styleinject::cuda::token_sums: expected t and u of one shape (N, L, C) "
      "on one CUDA device, but got ",
      t.sizes(),
      " on ",
      t.device(),
      " and ",
      u.sizes(),
      " on ",
      u.device());
  const int64_t instances = t.size(0), tokens = t.size(1), channels = t.size(2);
  TORCH_CHECK(
      instances <= 65535,
      "styleinject::cuda::token_sums: expected at most 65535 instances, but got ",
      instances);
  if (t.numel() == 0) {
    const auto zeros = t.new_zeros({instances, channels}, torch::kFloat);
    return {zeros, zeros.clone()};
  }
  const auto t_in = t.contiguous(), u_in = u.contiguous();
  const int64_t tiles = (channels + 31) / 32;
  // Enough blocks to fill the device a few times over, each with at least
  // 32 token rows (4 per thread row) to sum.
  const int64_t wanted =
      4 * Driver::get().attribute(t.get_device(), kMultiprocessors);
  int64_t slice_tokens =
      std::max<int64_t>(32, (tokens * tiles * instances + wanted - 1) / wanted);
  const int64_t slices = (tokens + slice_tokens - 1) / slice_tokens;
  auto partial = torch::empty(
      {slices, 2, instances, channels}, t.options().dtype(torch::kFloat));
  kernel(token_sums_source(element_type(t), element_type(u)))
      .launch(
          t.device(),
          {static_cast<unsigned>(tiles),
           static_cast<unsigned>(instances),
           static_cast<unsigned>(slices)},
          {32, 8, 1},
          t_in.data_ptr(),
          u_in.data_ptr(),
          partial.data_ptr(),
          static_cast<long long>(instances),
          static_cast<long long>(tokens),
          static_cast<long long>(channels),
          static_cast<long long>(slice_tokens));
  const auto sums = partial.sum(0);
  return {sums[0], sums[1]};
}

#else

inline std::pair<torch::Tensor, torch::Tensor> token_sums(
    const torch::Tensor&,
    const torch::Tensor&) {
  TORCH_CHECK(
      false,
      "styleinject: the library's CUDA kernels need a LibTorch with CUDA, "
      "but this one has none");
}

#endif // STYLEINJECT_CUDA_KERNELS

/// Whether a layer whose input is `x` uses the library's kernels: a CUDA
/// build, a CUDA input of a dtype they read (whose adapter then works in
/// float32), and the thread's CudaKernels guard on.
inline bool kernels_serve(const torch::Tensor& x) {
#ifdef STYLEINJECT_CUDA_KERNELS
  const auto dtype = x.scalar_type();
  return kernels_on() && x.is_cuda() &&
      (dtype == torch::kFloat || dtype == torch::kBFloat16 ||
       dtype == torch::kHalf);
#else
  (void)x;
  return false;
#endif
}

} // namespace detail
} // namespace cuda

} // namespace styleinject
