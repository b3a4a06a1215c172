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
#include <c10/cuda/CUDAException.h>
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

/// The most branches that route_and_mix takes (its shared memory).
inline constexpr int64_t kMaxBranches = 64;

/// How many times the library's kernels were launched in this process:
/// ATen's profiler sees none of them, so the bench adds these to its count.
inline std::atomic<int64_t>& kernel_launches() {
  static std::atomic<int64_t> launches{0};
  return launches;
}

/// route_and_mix's results: the style weights s (N, n), a = s · A
/// (N, r, d_in) and the gate factor g (N, d_out), undefined without a gate.
struct RoutedMixing {
  torch::Tensor s, a, g;
};

/// route_and_mix_backward's results, each undefined where not wanted.
struct MixingGradients {
  struct Wanted {
    bool lora_A, gate, router_weight, router_bias, pooled;
  };
  torch::Tensor lora_A, gate, router_weight, router_bias, pooled;
};

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
    void* values[] = {static_cast<void*>(&args)...};
    launch_with(device, grid, block, values);
    ++kernel_launches();
  }

 private:
  void launch_with(
      const torch::Device& device,
      std::array<unsigned, 3> grid,
      std::array<unsigned, 3> block,
      void** values) const;
  void* function(int index) const;

  KernelSource source_;
  mutable std::mutex mutex_;
  mutable std::map<int, void*> functions_;
};

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
  int (*current_context)(void**);

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
    load_function(
        handle, "cuCtxGetCurrent", d.current_context, "the CUDA driver");
    return d;
  }
};

// CUdevice_attribute values.
inline constexpr int kMultiprocessors = 16;
inline constexpr int kMajor = 75;
inline constexpr int kMinor = 76;

inline void Kernel::launch_with(
    const torch::Device& device,
    std::array<unsigned, 3> grid,
    std::array<unsigned, 3> block,
    void** values) const {
  const c10::cuda::CUDAGuard guard(device);
  // The driver launches in the thread's current context: where the runtime
  // has not yet made the device's primary context current on this thread,
  // its no-op free does (as ATen's own compiled kernels do).
  void* context = nullptr;
  Driver::get().check(
      Driver::get().current_context(&context), "read the current context");
  if (context == nullptr) {
    C10_CUDA_CHECK(cudaFree(nullptr));
  }
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
}

/// The kernel on device `index` (current): loaded at its first use.
inline void* Kernel::function(int index) const {
  const std::lock_guard<std::mutex> lock(mutex_);
  auto& function = functions_[index];
  if (function == nullptr) {
    const auto& driver = Driver::get();
    const int arch =
        10 * driver.attribute(index, kMajor) + driver.attribute(index, kMinor);
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

/// The number of multiprocessors of CUDA device `index`, asked of the
/// driver once per device.
inline int multiprocessors(int index) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = counts.find(index);
  if (found == counts.end()) {
    const int count = Driver::get().attribute(index, kMultiprocessors);
    found = counts.emplace(index, count).first;
  }
  return found->second;
}

#else

[[noreturn]] inline void refuse_without_cuda() {
  TORCH_CHECK(
      false,
      "styleinject: the library's CUDA kernels need a LibTorch with CUDA, "
      "but this one has none");
}

inline void Kernel::launch_with(
    const torch::Device&,
    std::array<unsigned, 3>,
    std::array<unsigned, 3>,
    void**) const {
  refuse_without_cuda();
}

inline int multiprocessors(int) {
  refuse_without_cuda();
}

#endif // STYLEINJECT_CUDA_KERNELS

/// The preamble's name of a kernel input's dtype.
inline std::string element_type(const torch::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(
      dtype == torch::kFloat || dtype == torch::kBFloat16 ||
          dtype == torch::kHalf,
      "styleinject: expected a float32, bfloat16 or float16 tensor for the "
      "CUDA kernels, but got ",
      dtype);
  return dtype == torch::kFloat   ? "float"
      : dtype == torch::kBFloat16 ? "bfloat16"
                                  : "float16";
}

/// A kernel's view of an optional input: contiguous, or undefined.
inline torch::Tensor in(const torch::Tensor& t) {
  return t.defined() ? t.contiguous() : t;
}

/// A kernel's pointer to an optional tensor: its data, or null.
inline void* pointer(const torch::Tensor& t) {
  return t.defined() ? t.data_ptr() : nullptr;
}

/// The kernel called `key`, one per key in the process: `make_source`
/// gives its source at the key's first use only.
template <typename MakeSource>
inline const Kernel& kernel(const std::string& key, MakeSource make_source) {
  static std::mutex mutex;
  static std::map<std::string, std::unique_ptr<Kernel>> kernels;
  const std::lock_guard<std::mutex> lock(mutex);
  auto& kernel = kernels[key];
  if (kernel == nullptr) {
    kernel = std::make_unique<Kernel>(make_source());
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
  if (t.numel() == 0) {
    const auto zeros = t.new_zeros({instances, channels}, torch::kFloat);
    return {zeros, zeros.clone()};
  }
  const auto t_in = t.contiguous(), u_in = u.contiguous();
  const int64_t tiles = (channels + 31) / 32;
  // Enough blocks to fill the device a few times over, each with at least
  // 32 token rows (4 per thread row) to sum.
  const int64_t wanted = 4 * multiprocessors(t.get_device());
  int64_t slice_tokens =
      std::max<int64_t>(32, (tokens * tiles * instances + wanted - 1) / wanted);
  const int64_t slices = (tokens + slice_tokens - 1) / slice_tokens;
  auto partial = torch::empty(
      {slices, 2, instances, channels}, t.options().dtype(torch::kFloat));
  const auto t_type = element_type(t), u_type = element_type(u);
  kernel(
      "token_sums<" + t_type + ", " + u_type + ">",
      [&] { return token_sums_source(t_type, u_type); })
      .launch(
          t.device(),
          {static_cast<unsigned>(tiles * instances),
           static_cast<unsigned>(slices),
           1},
          {32, 8, 1},
          pointer(t_in),
          pointer(u_in),
          pointer(partial),
          static_cast<long long>(instances),
          static_cast<long long>(tokens),
          static_cast<long long>(channels),
          static_cast<long long>(slice_tokens));
  const auto sums = partial.sum(0);
  return {sums[0], sums[1]};
}

/// The router's style weights (the softmax of its logits on `pooled` at
/// `temperature`), the mixed down-projection and the gate factor at
/// strength `scale`, for every instance in one launch: FusedLinear's
/// mixing where the router reads the input. float32 tensors on one CUDA
/// device, at most kMaxBranches branches; `gate` may be undefined.
/// pooled: (N, d_in), router_weight: (n, d_in), router_bias: (n),
/// lora_A: (n, r, d_in), gate: (n, d_out)
inline RoutedMixing route_and_mix(
    const torch::Tensor& pooled,
    const torch::Tensor& router_weight,
    const torch::Tensor& router_bias,
    const torch::Tensor& lora_A,
    const torch::Tensor& gate,
    double temperature,
    double scale) {
  const int64_t instances = pooled.size(0), branches = lora_A.size(0);
  // float32 on CUDA; the bias and the gate may be undefined.
  const auto fits = [](const torch::Tensor& t, bool optional) {
    return t.defined() ? t.scalar_type() == torch::kFloat && t.is_cuda()
                       : optional;
  };
  TORCH_CHECK(
      fits(pooled, false) && fits(router_weight, false) &&
          fits(lora_A, false) && fits(router_bias, true) && fits(gate, true) &&
          branches <= kMaxBranches && pooled.dim() == 2 && lora_A.dim() == 3 &&
          pooled.size(1) == lora_A.size(2),
      "styleinject::cuda::route_and_mix: expected float32 CUDA tensors, "
      "pooled (N, d_in) and lora_A (n, r, d_in) with n <= ",
      kMaxBranches,
      ", but got pooled ",
      pooled.sizes(),
      " ",
      pooled.scalar_type(),
      " and lora_A ",
      lora_A.sizes(),
      " ",
      lora_A.scalar_type());
  const auto options = pooled.options();
  RoutedMixing mixed{
      torch::empty({instances, branches}, options),
      torch::empty({instances, lora_A.size(1), lora_A.size(2)}, options),
      gate.defined() ? torch::empty({instances, gate.size(1)}, options)
                     : torch::Tensor()};
  if (instances == 0) {
    return mixed;
  }
  const auto pooled_in = in(pooled), weight_in = in(router_weight),
             bias_in = in(router_bias), a_in = in(lora_A), gate_in = in(gate);
  const Kernel& compiled = kernel("route_and_mix", route_and_mix_source);
  compiled.launch(
      pooled.device(),
      {static_cast<unsigned>(instances), 1, 1},
      {256, 1, 1},
      pointer(pooled_in),
      pointer(weight_in),
      pointer(bias_in),
      pointer(a_in),
      pointer(gate_in),
      pointer(mixed.s),
      pointer(mixed.a),
      pointer(mixed.g),
      static_cast<long long>(branches),
      static_cast<long long>(lora_A.size(2)),
      static_cast<long long>(lora_A.size(1) * lora_A.size(2)),
      static_cast<long long>(gate.defined() ? gate.size(1) : 0),
      static_cast<float>(temperature),
      static_cast<float>(scale));
  return mixed;
}

/// route_and_mix's backward, from the gradients at a (N, r, d_in) and at g
/// (N, d_out; undefined without a gate) and the forward's s, g and pooled
/// input: the gradients of lora_A, the gate and the router, and at the
/// pooled input, each only where `wanted` asks, in two launches. float32
/// CUDA tensors, as route_and_mix takes.
inline MixingGradients route_and_mix_backward(
    const torch::Tensor& grad_a,
    const torch::Tensor& grad_g,
    const torch::Tensor& s,
    const torch::Tensor& g,
    const torch::Tensor& pooled,
    const torch::Tensor& lora_A,
    const torch::Tensor& gate,
    const torch::Tensor& router_weight,
    double temperature,
    double scale,
    const MixingGradients::Wanted& wanted) {
  const int64_t instances = s.size(0), branches = s.size(1);
  const int64_t a_size = lora_A.numel() / branches, d_in = pooled.size(1);
  const int64_t d_out = grad_g.defined() ? grad_g.size(1) : 0;
  TORCH_CHECK(
      branches <= kMaxBranches && grad_a.numel() == instances * a_size &&
          s.scalar_type() == torch::kFloat &&
          grad_a.scalar_type() == torch::kFloat,
      "styleinject::cuda::route_and_mix_backward: expected float32 s (N, n) "
      "with n <= ",
      kMaxBranches,
      " and grad_a of N * r * d_in elements, but got s ",
      s.sizes(),
      " ",
      s.scalar_type(),
      " and grad_a ",
      grad_a.sizes(),
      " ",
      grad_a.scalar_type());
  const auto options = s.options();
  const auto made = [&](bool want, torch::IntArrayRef sizes) {
    return want ? torch::empty(sizes, options) : torch::Tensor();
  };
  MixingGradients grads{
      made(wanted.lora_A, lora_A.sizes()),
      made(wanted.gate && grad_g.defined(), gate.sizes()),
      made(wanted.router_weight, router_weight.sizes()),
      made(wanted.router_bias, {branches}),
      made(wanted.pooled, pooled.sizes())};
  if (instances == 0) {
    for (auto* t :
         {&grads.lora_A,
          &grads.gate,
          &grads.router_weight,
          &grads.router_bias}) {
      if (t->defined()) {
        t->zero_();
      }
    }
    return grads;
  }
  const auto grad_a_in = in(grad_a), grad_g_in = in(grad_g), s_in = in(s),
             g_in = in(g), pooled_in = in(pooled), a_in = in(lora_A),
             gate_in = in(gate), router_in = in(router_weight);
  auto grad_logits = torch::empty({instances, branches}, options);
  const Kernel& route_backward =
      kernel("route_backward", route_backward_source);
  route_backward.launch(
      s.device(),
      {static_cast<unsigned>(instances), 1, 1},
      {256, 1, 1},
      pointer(grad_a_in),
      pointer(a_in),
      pointer(grad_g_in),
      pointer(g_in),
      pointer(gate_in),
      pointer(s_in),
      pointer(router_in),
      pointer(grad_logits),
      pointer(grads.pooled),
      static_cast<long long>(branches),
      static_cast<long long>(a_size),
      static_cast<long long>(d_out),
      static_cast<long long>(d_in),
      static_cast<float>(scale),
      static_cast<float>(temperature));
  const int64_t elements = branches * (a_size + d_out + d_in + 1);
  const Kernel& branch_gradients =
      kernel("branch_gradients", branch_gradients_source);
  branch_gradients.launch(
      s.device(),
      {static_cast<unsigned>((elements + 255) / 256), 1, 1},
      {256, 1, 1},
      pointer(s_in),
      pointer(grad_a_in),
      pointer(grad_g_in),
      pointer(g_in),
      pointer(grad_logits),
      pointer(pooled_in),
      pointer(grads.lora_A),
      pointer(grads.gate),
      pointer(grads.router_weight),
      pointer(grads.router_bias),
      static_cast<long long>(instances),
      static_cast<long long>(branches),
      static_cast<long long>(a_size),
      static_cast<long long>(d_out),
      static_cast<long long>(d_in),
      static_cast<float>(scale));
  return grads;
}

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
