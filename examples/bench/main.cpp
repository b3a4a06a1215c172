// styleinject_bench: what StyleInject costs, measured side by side with the
// base layer alone, LoRA written by hand (of equal parameters and of rank
// n·r), the library's LoRA preset, and StyleInject written naively as a loop
// over its branches (as mixture-of-LoRA code does): per layer at the shapes
// of Stable Diffusion 1.5's UNet and of DiT-XL/2, and per whole fine-tune
// step of the typeface example's model and of a stack of SD-1.5 blocks.
//
//   styleinject_bench [--quick] [--json PATH] [--rounds N]
//                     [--device cpu|cuda] [--dtype float32|bfloat16|float16]
//                     [--adapter-dtype same|float32]
//                     [--path auto|merged|stacked|merged_weight]
//                     [--no-layers] [--no-models]
//
// Methods run interleaved, one step each per round, so that a slow moment
// of the machine hits them all; the first round is a warm-up. Times are
// medians over rounds, and every ratio is the median of the per-round
// ratios with its interquartile range. Per layer: forward (no autograd);
// forward + backward (base frozen, adapter trainable, input requiring grad
// as inside a network); and for StyleInject, inference with a fixed style,
// as it is and merged into the base weight, and with a LoRA of rank r
// beside the adapter ("two adapters", summed).
// On CUDA, StyleInject also runs under CudaKernels (`styleinject_kernels`:
// the library's own kernels, compiled by NVRTC).
// ATen ops per train step, counted once per method ("ops"): those below
// which no other such op runs, less views, allocations and metadata, plus
// the library's own kernels' launches. Each
// runs a kernel on the device it runs on, so on a GPU the count is a floor
// under a trace's kernel count; the CPU's count also holds ops that only
// its own kernels call (addmm's bias copy, a reduction's fill).
// Memory, probed once per method with a counting allocator (CPU; CUDA's
// caching allocator on CUDA) that is off while timing: what the forward
// leaves allocated for backward besides its output ("kept MB", for a
// consumer that keeps the output, as the next layer does); the same when
// the consumer keeps nothing ("kept+res": the output goes into a residual
// add); and the peak during the forward.
//
// The CPU figures mean something only on an optimised BLAS: the bench names
// the BLAS it runs on and warns on the reference one.

#include "../lora_parameters.h"
#include "../typeface/model.h"

#include <styleinject/styleinject.h>

#include <ATen/record_function.h>
#include <c10/core/CPUAllocator.h>
#include <dlfcn.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#ifdef STYLEINJECT_BENCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace {

namespace F = torch::nn::functional;
using styleinject::StyleInjectOptions;

// The adapter under test: SPEC's defaults, n = 4 branches of rank 4.
constexpr int64_t kBranches = 4, kRank = 4;

/// One layer shape. Linear: x is (batch, tokens, in). Conv2d: x is
/// (batch, in, size, size) and the kernel 3×3 with padding 1.
struct Shape {
  std::string name;
  bool conv;
  int64_t batch, tokens, in, out;

  std::string describe() const {
    return conv
        ? fmt::format(
              "{}x{}x{}x{} conv3x3 -> {}", batch, in, tokens, tokens, out)
        : fmt::format("{}x{}x{} -> {}", batch, tokens, in, out);
  }

  /// The fields a peer (peft_peer.py) builds the same layer from.
  nlohmann::ordered_json fields() const {
    const auto input = conv ? std::vector<int64_t>{batch, in, tokens, tokens}
                            : std::vector<int64_t>{batch, tokens, in};
    return {
        {"conv", conv},
        {"input", input},
        {"in", in},
        {"out", out},
        {"kernel", conv ? 3 : 1}};
  }
};

std::vector<Shape> shapes(bool quick) {
  std::vector<Shape> result;
  for (const int64_t batch : {int64_t{2}, int64_t{8}}) {
    if (quick && batch != 2) {
      continue;
    }
    const auto add = [&](const char* name,
                         bool conv,
                         int64_t tokens,
                         int64_t in,
                         int64_t out,
                         bool in_quick) {
      if (!quick || in_quick) {
        result.push_back({name, conv, batch, tokens, in, out});
      }
    };
    // SD 1.5: self-attention projections per UNet level, and the
    // cross-attention K/V on 77 text tokens of width 768.
    add("sd15.attn.64x64", false, 4096, 320, 320, true);
    add("sd15.attn.32x32", false, 1024, 640, 640, true);
    add("sd15.attn.16x16", false, 256, 1280, 1280, false);
    add("sd15.attn.8x8", false, 64, 1280, 1280, false);
    add("sd15.cross_kv.320", false, 77, 768, 320, true);
    add("sd15.cross_kv.640", false, 77, 768, 640, false);
    add("sd15.cross_kv.1280", false, 77, 768, 1280, false);
    // DiT-XL/2 at 256 px: 256 tokens of width 1152, attention and MLP.
    add("dit_xl2.attn", false, 256, 1152, 1152, true);
    add("dit_xl2.mlp_in", false, 256, 1152, 4608, false);
    add("dit_xl2.mlp_out", false, 256, 4608, 1152, false);
    // SD 1.5's first ResBlock convolution.
    add("sd15.resblock.conv", true, 64, 320, 320, true);
  }
  return result;
}

enum class Method {
  kBase,
  kLora,
  kLoraNr,
  kLoraPreset,
  kNaive,
  kStyleInject,
  kRecompute, // StyleInject under RecomputeGate: u made again in backward
  kKernels, // StyleInject under CudaKernels: the library's kernels (CUDA)
};
constexpr std::array<Method, 8> kMethods{
    Method::kBase,
    Method::kLora,
    Method::kLoraNr,
    Method::kLoraPreset,
    Method::kNaive,
    Method::kStyleInject,
    Method::kRecompute,
    Method::kKernels};

const char* name_of(Method m) {
  switch (m) {
    case Method::kBase:
      return "base";
    case Method::kLora:
      return "lora";
    case Method::kLoraNr:
      return "lora_rank_nr";
    case Method::kLoraPreset:
      return "lora_preset";
    case Method::kNaive:
      return "styleinject_naive";
    case Method::kStyleInject:
      return "styleinject";
    case Method::kRecompute:
      return "styleinject_recompute";
    case Method::kKernels:
      return "styleinject_kernels";
  }
  return "";
}

// ---------------------------------------------------------------------------
// StyleInject written naively: one down- and up-projection per branch, as a
// mixture of LoRAs is usually written, then the gate; the same math as
// SPEC §1–3 and the same parameters as the shipped layer.

template <typename Layer, typename Project>
torch::Tensor naive_forward(
    Layer& layer,
    const torch::Tensor& x,
    std::vector<int64_t> token_dims,
    Project project) {
  const int64_t n = layer.adapter_options->branches();
  // The adapter's math in its own dtype (float32 beside a bfloat16 base).
  const auto xa = x.to(layer.lora_B.scalar_type());
  const auto s = torch::softmax(
      layer.router->forward(xa.mean(token_dims)), /*dim=*/-1); // (N, n)
  std::vector<int64_t> per_instance(x.dim(), 1);
  per_instance[0] = x.size(0);
  auto h = project(x, layer.weight, layer.bias).to(xa.scalar_type());
  for (int64_t i = 0; i < n; ++i) {
    const auto branch =
        project(project(xa, layer.lora_A[i], {}), layer.lora_B, {});
    h = h +
        s.select(1, i).view(per_instance) * branch *
            layer.adapter_options->scaling();
  }
  auto g_shape = per_instance;
  g_shape[layer.weight.dim() == 2 ? 2 : 1] = -1; // over channels
  const auto g = torch::tanh(torch::matmul(s, layer.gate)).view(g_shape);
  return (h + g * (h - h.mean(token_dims, /*keepdim=*/true)))
      .to(x.scalar_type());
}

// ---------------------------------------------------------------------------
// A CPU allocator that counts live bytes and their peak, to see what autograd
// keeps. It is installed only around the memory probe, never while timing.

std::atomic<int64_t> g_live_bytes{0};
std::atomic<int64_t> g_peak_bytes{0};

/// Wraps LibTorch's CPU allocator and counts the bytes it has live. Keeps
/// the raw interface (context == data), which oneDNN's kernels use.
struct CountingAllocator final : c10::Allocator {
  explicit CountingAllocator(c10::Allocator* inner) : inner(inner) {
    instance = this;
  }

  static void release(void* data) {
    size_t bytes = 0;
    {
      // oneDNN frees some buffers that it allocated before us through the
      // current allocator: those were never counted.
      std::lock_guard<std::mutex> lock(instance->mutex);
      const auto found = instance->sizes.find(data);
      if (found != instance->sizes.end()) {
        bytes = found->second;
        instance->sizes.erase(found);
      }
    }
    g_live_bytes -= static_cast<int64_t>(bytes);
    instance->inner->raw_deallocate(data);
  }

#if TORCH_VERSION_MAJOR >= 2
  c10::DataPtr allocate(size_t n) override {
#else
  c10::DataPtr allocate(size_t n) const override {
#endif
    void* data = inner->raw_allocate(n);
    {
      std::lock_guard<std::mutex> lock(mutex);
      sizes[data] = n;
    }
    const int64_t live = g_live_bytes += static_cast<int64_t>(n);
    int64_t peak = g_peak_bytes.load();
    while (live > peak && !g_peak_bytes.compare_exchange_weak(peak, live)) {
    }
    return {data, data, &release, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override {
    return &release;
  }
#if TORCH_VERSION_MAJOR >= 2
  void copy_data(void* dest, const void* src, std::size_t count)
      const override {
    default_copy_data(dest, src, count);
  }
#endif

  c10::Allocator* inner;
  mutable std::mutex mutex;
  mutable std::unordered_map<void*, size_t> sizes;
  static CountingAllocator* instance;
};
CountingAllocator* CountingAllocator::instance = nullptr;

/// Counts the CPU allocations made while alive; on CUDA, resets the caching
/// allocator's peak instead.
struct MemoryProbe {
  explicit MemoryProbe(const torch::Device& device) : device(device) {
    if (!device.is_cuda()) {
      static CountingAllocator counting(c10::GetCPUAllocator());
      previous = c10::GetCPUAllocator();
      c10::SetCPUAllocator(&counting, /*priority=*/255);
    }
    reset_peak();
  }
  ~MemoryProbe() {
    if (previous) {
      c10::SetCPUAllocator(previous, /*priority=*/255);
    }
  }
#ifdef STYLEINJECT_BENCH_CUDA
  /// The caching allocator's count of this device's allocated bytes.
  auto cuda_allocated() const {
    return c10::cuda::CUDACachingAllocator::getDeviceStats(device.index())
        .allocated_bytes[0];
  }
#endif
  /// Bytes live now, and at most since the probe began or the last reset.
  int64_t live() const {
#ifdef STYLEINJECT_BENCH_CUDA
    if (device.is_cuda()) {
      return cuda_allocated().current;
    }
#endif
    return g_live_bytes.load();
  }
  int64_t peak() const {
#ifdef STYLEINJECT_BENCH_CUDA
    if (device.is_cuda()) {
      return cuda_allocated().peak;
    }
#endif
    return g_peak_bytes.load();
  }
  void reset_peak() {
#ifdef STYLEINJECT_BENCH_CUDA
    if (device.is_cuda()) {
      c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
      return;
    }
#endif
    g_peak_bytes = g_live_bytes.load();
  }

  torch::Device device;
  c10::Allocator* previous = nullptr;
};

void synchronize(const torch::Device& device) {
  if (device.is_cuda()) {
    torch::cuda::synchronize();
  }
}

/// Milliseconds that one call of `step` takes.
double time_ms(const std::function<void()>& step, const torch::Device& device) {
  synchronize(device);
  const auto start = std::chrono::steady_clock::now();
  step();
  synchronize(device);
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now() - start)
      .count();
}

/// The q-quantile of `values` (0.5: the median), by linear interpolation.
double quantile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  const double at = q * static_cast<double>(values.size() - 1);
  const auto low = static_cast<size_t>(at);
  const auto high = std::min(low + 1, values.size() - 1);
  return values[low] +
      (at - static_cast<double>(low)) * (values[high] - values[low]);
}

/// The median of the per-round ratios a[i] / b[i], and their quartiles.
struct Ratio {
  double median, low, high;
  std::string text() const {
    return fmt::format("{:.3f} ({:.2f}-{:.2f})", median, low, high);
  }
};
Ratio ratio(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> r;
  for (size_t i = 0; i < a.size(); ++i) {
    r.push_back(a[i] / b[i]);
  }
  return {quantile(r, 0.5), quantile(r, 0.25), quantile(r, 0.75)};
}

nlohmann::ordered_json to_json(const Ratio& r) {
  return {{"median", r.median}, {"q1", r.low}, {"q3", r.high}};
}

// ---------------------------------------------------------------------------
// One method on one layer shape: what to run, and what it trains.

using Forward = std::function<torch::Tensor(const torch::Tensor&)>;

struct Runner {
  Forward forward;
  /// StyleInject's inference with a fixed style: as it is ("fixed style"),
  /// and folded into the base weight ("merged"); and with a LoRA beside it
  /// ("two adapters"). Empty for the others.
  std::vector<std::pair<std::string, Forward>> inference;
  std::vector<torch::Tensor> trainable;
  int64_t parameters = 0;
};

int64_t count(const std::vector<torch::Tensor>& tensors) {
  int64_t total = 0;
  for (const auto& t : tensors) {
    total += t.numel();
  }
  return total;
}

/// The base layer's map for a shape: F::linear, or F::conv2d with padding
/// for a 3×3 kernel.
torch::Tensor project(
    const torch::Tensor& x,
    const torch::Tensor& w,
    const torch::Tensor& b) {
  if (w.dim() == 2) {
    return F::linear(x, w, b);
  }
  return F::conv2d(
      x, w, F::Conv2dFuncOptions().bias(b).padding(w.size(-1) == 3 ? 1 : 0));
}

/// A trainable tensor of small random values.
torch::Tensor trainable(
    torch::IntArrayRef sizes,
    const torch::TensorOptions& options) {
  return (torch::randn(sizes, options) * 0.02).requires_grad_();
}

/// LoRA as one writes it by hand: base(x) + B(A(x)), A and B trainable.
Runner hand_written_lora(
    const Shape& shape,
    int64_t rank,
    const torch::Tensor& weight,
    const torch::Tensor& bias,
    torch::ScalarType adapter_dtype) {
  const auto options = weight.options().dtype(adapter_dtype);
  const auto a = shape.conv ? trainable({rank, shape.in, 3, 3}, options)
                            : trainable({rank, shape.in}, options);
  const auto b = shape.conv ? trainable({shape.out, rank, 1, 1}, options)
                            : trainable({shape.out, rank}, options);
  Runner runner;
  runner.forward = [=](const torch::Tensor& x) {
    // As PEFT does with a float32 adapter on a bfloat16 base: cast in, out.
    const auto update = project(project(x.to(a.scalar_type()), a, {}), b, {});
    return project(x, weight, bias) + update.to(x.scalar_type());
  };
  runner.trainable = {a, b};
  runner.parameters = a.numel() + b.numel();
  return runner;
}

/// A library layer with an adapter of `options` (none for the base).
template <typename Layer>
Runner library_layer(
    Layer layer,
    const c10::optional<StyleInjectOptions>& options,
    bool naive,
    const torch::Device& device,
    torch::ScalarType dtype) {
  layer->weight.set_requires_grad(false);
  layer->bias.set_requires_grad(false);
  Runner runner;
  if (options) {
    layer->add_adapter(*options);
  }
  layer->to(device, dtype);
  // Non-zero adapters, so that no branch of the math is trivially zero.
  for (auto& p : layer->adapter_parameters()) {
    torch::NoGradGuard no_grad;
    p.normal_(0.0, 0.02);
  }
  runner.trainable = layer->adapter_parameters();
  runner.parameters = count(runner.trainable);
  const std::vector<int64_t> token_dims = layer->weight.dim() == 2
      ? std::vector<int64_t>{1}
      : std::vector<int64_t>{2, 3};
  if (naive) {
    runner.forward = [=](const torch::Tensor& x) mutable {
      return naive_forward(*layer, x, token_dims, project);
    };
    return runner;
  }
  runner.forward = [=](const torch::Tensor& x) mutable { return layer(x); };
  if (options && options->branches() > 1) {
    for (const bool merge : {false, true}) {
      Layer fixed(std::dynamic_pointer_cast<typename Layer::ContainedType>(
          layer->clone()));
      fixed->set_style(
          torch::tensor({0.1, 0.2, 0.3, 0.4}, torch::kDouble).to(device));
      if (merge) {
        fixed->merge();
      }
      runner.inference.emplace_back(
          merge ? "merged" : "fixed style",
          [=](const torch::Tensor& x) mutable { return fixed(x); });
    }
    // The adapter as trained (router on) with a LoRA of rank r beside it,
    // summed: a trained style and a community LoRA at once.
    Layer two(std::dynamic_pointer_cast<typename Layer::ContainedType>(
        layer->clone()));
    two->add_adapter(
        StyleInjectOptions::lora(kRank).dtype(options->dtype()), "lora");
    for (auto& p : two->adapter_parameters("lora")) {
      torch::NoGradGuard no_grad;
      p.normal_(0.0, 0.02);
    }
    runner.inference.emplace_back(
        "two adapters", [=](const torch::Tensor& x) mutable { return two(x); });
  }
  return runner;
}

/// The parameters of a StyleInject adapter of kBranches × kRank on a shape.
int64_t styleinject_parameters(const Shape& shape) {
  const int64_t in = shape.conv ? shape.in * 9 : shape.in;
  return kBranches * kRank * in + kRank * shape.out +
      kBranches * (shape.in + 1 + shape.out);
}

/// LoRA's rank with about as many parameters as StyleInject on this shape.
int64_t equal_params_rank(const Shape& shape) {
  const int64_t per_rank = (shape.conv ? shape.in * 9 : shape.in) + shape.out;
  return std::max<int64_t>(
      1,
      std::llround(double(styleinject_parameters(shape)) / double(per_rank)));
}

Runner make(
    Method method,
    const Shape& shape,
    const torch::Tensor& weight,
    const torch::Tensor& bias,
    const torch::Device& device,
    torch::ScalarType dtype,
    torch::ScalarType adapter_dtype,
    styleinject::ComputePath path) {
  if (method == Method::kLora || method == Method::kLoraNr) {
    return hand_written_lora(
        shape,
        method == Method::kLora ? equal_params_rank(shape) : kBranches * kRank,
        weight,
        bias,
        adapter_dtype);
  }
  c10::optional<StyleInjectOptions> options;
  if (method == Method::kLoraPreset) {
    options = StyleInjectOptions::lora(equal_params_rank(shape));
  } else if (method == Method::kRecompute || method == Method::kKernels) {
    auto runner = make(
        Method::kStyleInject,
        shape,
        weight,
        bias,
        device,
        dtype,
        adapter_dtype,
        path);
    runner.forward = [forward = runner.forward,
                      method](const torch::Tensor& x) {
      if (method == Method::kKernels) {
        styleinject::CudaKernels kernels;
        return forward(x);
      }
      styleinject::RecomputeGate recompute;
      return forward(x);
    };
    runner.inference.clear(); // the same as StyleInject's
    return runner;
  } else if (method == Method::kNaive || method == Method::kStyleInject) {
    options = StyleInjectOptions(kRank).branches(kBranches).path(path);
  }
  if (options) {
    options->dtype(adapter_dtype);
  }
  const bool naive = method == Method::kNaive;
  if (shape.conv) {
    return library_layer(
        styleinject::StyleInjectConv2d(
            torch::nn::Conv2dOptions(shape.in, shape.out, 3).padding(1)),
        options,
        naive,
        device,
        dtype);
  }
  return library_layer(
      styleinject::StyleInjectLinear(shape.in, shape.out),
      options,
      naive,
      device,
      dtype);
}

// ---------------------------------------------------------------------------
// Measuring one layer shape.

/// What one method gave on one shape: per-round times, and memory.
struct LayerResult {
  Method method;
  int64_t parameters = 0;
  std::vector<double> forward_ms, train_ms;
  /// Runner::inference's times, by its names.
  std::map<std::string, std::vector<double>> inference_ms;
  /// What the forward leaves allocated for backward: besides its output
  /// (which a consumer such as the next layer keeps anyway), and when the
  /// consumer keeps nothing (a residual add); and the peak during the
  /// forward, above what was allocated before it.
  int64_t kept_bytes = 0, kept_bytes_residual = 0, peak_bytes = 0;
  /// ATen ops that run a kernel in one train step (OpCounter).
  int64_t ops = 0;
};

/// Counts, while one lives, the ATen ops on any thread that run a kernel:
/// those below which no such op runs (the leaves of the dispatch tree, as a
/// GEMM calls BLAS directly), less those that only make views, allocate or
/// read metadata.
class OpCounter {
 public:
  OpCounter()
      : handle_(at::addGlobalCallback(
            at::RecordFunctionCallback(&OpCounter::enter, &OpCounter::leave)
                .scopes({at::RecordScope::FUNCTION}))) {
    counted() = 0;
  }
  ~OpCounter() {
    at::removeCallback(handle_);
  }
  OpCounter(const OpCounter&) = delete;
  OpCounter& operator=(const OpCounter&) = delete;
  int64_t count() const {
    return counted().load();
  }

 private:
  static std::atomic<int64_t>& counted() {
    static std::atomic<int64_t> ops{0};
    return ops;
  }
  /// Per thread, for each op entered and not yet left: whether an op that
  /// runs a kernel has run below it.
  static std::vector<bool>& open() {
    static thread_local std::vector<bool> kernel_below;
    return kernel_below;
  }
  static bool runs_no_kernel(const std::string& name) {
    static const std::unordered_set<std::string> names{
        "aten::view",
        "aten::_unsafe_view",
        "aten::reshape",
        "aten::_reshape_alias",
        "aten::view_as",
        "aten::as_strided",
        "aten::as_strided_",
        "aten::transpose",
        "aten::t",
        "aten::permute",
        "aten::expand",
        "aten::expand_as",
        "aten::unsqueeze",
        "aten::squeeze",
        "aten::select",
        "aten::slice",
        "aten::narrow",
        "aten::alias",
        "aten::detach",
        "aten::detach_",
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::resize_",
        "aten::flatten",
        "aten::unflatten",
        "aten::lift_fresh",
        "aten::contiguous",
        "aten::to",
        "aten::_to_copy",
        "aten::resolve_conj",
        "aten::resolve_neg",
        "aten::result_type",
        "aten::size",
        "aten::stride",
        "aten::is_same_size",
        "aten::promote_types",
        "aten::squeeze_",
        "aten::unsqueeze_",
        "aten::sum_to_size"};
    return name.rfind("aten::", 0) != 0 || names.count(name) > 0;
  }
  static std::unique_ptr<at::ObserverContext> enter(const at::RecordFunction&) {
    open().push_back(false);
    return nullptr;
  }
  static void leave(const at::RecordFunction& fn, at::ObserverContext*) {
    if (open().empty()) { // entered before the counter began
      return;
    }
    const bool kernel_below = open().back();
    open().pop_back();
    const bool kernel = !kernel_below && !runs_no_kernel(fn.name());
    if (kernel) {
      ++counted();
    }
    if ((kernel || kernel_below) && !open().empty()) {
      open().back() = true;
    }
  }
  at::CallbackHandle handle_;
};

/// The memory figures of LayerResult for one forward of `forward` on x.
void probe_memory(
    const Forward& forward,
    const torch::Tensor& x,
    const torch::Device& device,
    LayerResult& result) {
  MemoryProbe probe(device);
  synchronize(device);
  {
    const auto before = probe.live();
    probe.reset_peak();
    const auto out = forward(x);
    synchronize(device);
    result.kept_bytes = probe.live() - before -
        static_cast<int64_t>(out.numel() * out.element_size());
    result.peak_bytes = probe.peak() - before;
  }
  {
    const auto before = probe.live();
    // Adding a residual keeps nothing for backward; a constant stands in
    // for it, whatever the shapes.
    const auto y = forward(x).add(1.0);
    synchronize(device);
    result.kept_bytes_residual = probe.live() - before -
        static_cast<int64_t>(y.numel() * y.element_size());
  }
}

std::vector<LayerResult> measure_layer(
    const Shape& shape,
    const torch::Device& device,
    torch::ScalarType dtype,
    torch::ScalarType adapter_dtype,
    styleinject::ComputePath path,
    int rounds) {
  torch::manual_seed(0);
  const auto options = torch::TensorOptions().device(device).dtype(dtype);
  const auto weight = shape.conv
      ? torch::randn({shape.out, shape.in, 3, 3}, options) / 40
      : torch::randn({shape.out, shape.in}, options) / 20;
  const auto bias = torch::randn({shape.out}, options);
  std::vector<Runner> runners;
  std::vector<LayerResult> results;
  for (const auto method : kMethods) {
    if (method == Method::kKernels && !device.is_cuda()) {
      continue; // the same as StyleInject's elsewhere
    }
    runners.push_back(
        make(method, shape, weight, bias, device, dtype, adapter_dtype, path));
    results.push_back({method, runners.back().parameters});
  }
  const auto x = shape.conv
      ? torch::randn(
            {shape.batch, shape.in, shape.tokens, shape.tokens}, options)
      : torch::randn({shape.batch, shape.tokens, shape.in}, options);
  const auto x_train = x.clone().requires_grad_(true);
  torch::Tensor grad_out;
  const auto train_step = [&](Runner& runner) {
    const auto out = runner.forward(x_train);
    if (!grad_out.defined()) {
      grad_out = torch::randn_like(out);
    }
    out.backward(grad_out);
    x_train.mutable_grad().reset();
    for (auto& t : runner.trainable) {
      t.mutable_grad().reset();
    }
  };
  // Round 0 warms up: allocator caches, kernel selection.
  for (int round = 0; round <= rounds; ++round) {
    for (size_t m = 0; m < runners.size(); ++m) {
      auto& runner = runners[m];
      const auto forward = time_ms(
          [&] {
            torch::NoGradGuard no_grad;
            runner.forward(x);
          },
          device);
      const auto train = time_ms([&] { train_step(runner); }, device);
      std::vector<double> inference;
      for (const auto& variant : runner.inference) {
        inference.push_back(time_ms(
            [&] {
              torch::NoGradGuard no_grad;
              variant.second(x);
            },
            device));
      }
      if (round > 0) {
        results[m].forward_ms.push_back(forward);
        results[m].train_ms.push_back(train);
        for (size_t i = 0; i < inference.size(); ++i) {
          results[m].inference_ms[runner.inference[i].first].push_back(
              inference[i]);
        }
      }
    }
  }
  for (size_t m = 0; m < runners.size(); ++m) {
    probe_memory(runners[m].forward, x_train, device, results[m]);
    const OpCounter counter;
    const auto launches = styleinject::cuda::detail::kernel_launches().load();
    train_step(runners[m]);
    synchronize(device);
    results[m].ops = counter.count() +
        styleinject::cuda::detail::kernel_launches().load() - launches;
  }
  return results;
}

// ---------------------------------------------------------------------------
// Whole fine-tune steps: the typeface example's model, and a stack of
// SD-1.5-shaped blocks built from the example's ResBlock and spatial
// transformer.

/// SD 1.5's down path in two levels: ResBlock + spatial transformer at
/// 64×64×320, a strided convolution, the same at 32×32×640; text context of
/// 77 tokens of width 768, timestep embedding of width 1280.
struct SdStackImpl : torch::nn::Module {
  SdStackImpl()
      : res0(register_module("res0", typeface::ResBlock(320, 320, 1280))),
        attn0(register_module(
            "attn0",
            typeface::SpatialTransformer(320, 768, 8))),
        down(register_module("down", typeface::conv3x3(320, 640, 2))),
        res1(register_module("res1", typeface::ResBlock(640, 640, 1280))),
        attn1(register_module(
            "attn1",
            typeface::SpatialTransformer(640, 768, 8))) {}
  torch::Tensor forward(
      const torch::Tensor& x,
      const torch::Tensor& time,
      const torch::Tensor& context) {
    auto h = attn0(res0(x, time), context);
    h = down(h);
    return attn1(res1(h, time), context);
  }
  typeface::ResBlock res0;
  typeface::SpatialTransformer attn0;
  styleinject::StyleInjectConv2d down;
  typeface::ResBlock res1;
  typeface::SpatialTransformer attn1;
};
TORCH_MODULE(SdStack);

/// One model and the inputs of its training step.
struct ModelCase {
  std::string name, describe;
  std::function<std::shared_ptr<torch::nn::Module>()> build;
  /// The loss of one step on fixed inputs, given the model.
  std::function<torch::Tensor(torch::nn::Module&, bool input_grad)> loss;
};

std::vector<ModelCase> model_cases(bool quick, const torch::Device& device) {
  std::vector<ModelCase> cases;
  const auto on = torch::TensorOptions().device(device);
  {
    auto config = typeface::ModelConfig::small();
    config.vocabulary = 64;
    const int64_t batch = 16;
    torch::manual_seed(1);
    const auto x =
        torch::randn({batch, 1, config.image_size, config.image_size}, on);
    const auto t = torch::randint(1000, {batch}, on.dtype(torch::kLong));
    const auto ids = torch::randint(
        config.vocabulary, {batch, config.context}, on.dtype(torch::kLong));
    const auto target = torch::randn_like(x);
    cases.push_back(
        {"typeface.small",
         fmt::format("typeface example model, batch {}", batch),
         [config] {
           return std::make_shared<typeface::TextToImageImpl>(config);
         },
         [=](torch::nn::Module& model, bool input_grad) {
           const auto in = input_grad ? x.clone().requires_grad_() : x;
           return F::mse_loss(
               dynamic_cast<typeface::TextToImageImpl&>(model).forward(
                   in, t, ids),
               target);
         }});
  }
  if (!quick) {
    torch::manual_seed(2);
    const auto x = torch::randn({1, 320, 64, 64}, on);
    const auto time = torch::randn({1, 1280}, on);
    const auto context = torch::randn({1, 77, 768}, on);
    const auto target = torch::randn({1, 640, 32, 32}, on);
    cases.push_back(
        {"sd15.blocks",
         "SD-1.5 blocks at 64x64x320 and 32x32x640, batch 1",
         [] { return std::make_shared<SdStackImpl>(); },
         [=](torch::nn::Module& model, bool input_grad) {
           const auto in = input_grad ? x.clone().requires_grad_() : x;
           return F::mse_loss(
               dynamic_cast<SdStackImpl&>(model).forward(in, time, context),
               target);
         }});
  }
  return cases;
}

enum class Regime { kFrozen, kFull, kLora, kStyleInject };
constexpr std::array<Regime, 4> kRegimes{
    Regime::kFrozen,
    Regime::kFull,
    Regime::kLora,
    Regime::kStyleInject};
const char* name_of(Regime r) {
  switch (r) {
    case Regime::kFrozen:
      return "frozen_base";
    case Regime::kFull:
      return "full_finetune";
    case Regime::kLora:
      return "lora";
    case Regime::kStyleInject:
      return "styleinject";
  }
  return "";
}

struct ModelResult {
  Regime regime;
  int64_t trainable = 0;
  std::string adapter;
  std::vector<double> step_ms;
};

std::vector<ModelResult> measure_model(
    const ModelCase& model_case,
    const torch::Device& device,
    int rounds) {
  const auto styleinject = StyleInjectOptions(kRank).branches(kBranches);
  std::vector<std::shared_ptr<torch::nn::Module>> models;
  std::vector<ModelResult> results;
  int64_t styleinject_trainable = 0;
  for (const auto regime :
       {Regime::kStyleInject, Regime::kFrozen, Regime::kFull, Regime::kLora}) {
    torch::manual_seed(3);
    auto model = model_case.build();
    model->to(device);
    ModelResult result{regime};
    if (regime == Regime::kFrozen) {
      for (auto& p : model->parameters()) {
        p.set_requires_grad(false);
      }
    } else if (regime == Regime::kStyleInject || regime == Regime::kLora) {
      // LoRA of about StyleInject's parameters: its rank from the adapted
      // layers' sizes.
      StyleInjectOptions options = styleinject;
      if (regime == Regime::kLora) {
        auto probe = model_case.build();
        styleinject::inject(
            *probe, styleinject::Targets::all(), StyleInjectOptions::lora(1));
        options = StyleInjectOptions::lora(std::max<int64_t>(
            1,
            std::llround(
                double(styleinject_trainable) /
                double(examples::lora_parameters_per_rank(*probe)))));
      }
      const auto report =
          styleinject::inject(*model, styleinject::Targets::all(), options);
      model->to(device);
      for (auto& p : styleinject::adapter_parameters(*model)) {
        torch::NoGradGuard no_grad;
        p.normal_(0.0, 0.02);
      }
      result.adapter = options.branches() == 1
          ? fmt::format("LoRA r={}", options.rank())
          : fmt::format("n={} r={}", options.branches(), options.rank());
      if (regime == Regime::kStyleInject) {
        styleinject_trainable = report.trainable_parameters;
      }
    }
    for (const auto& p : model->parameters()) {
      if (p.requires_grad()) {
        result.trainable += p.numel();
      }
    }
    model->train();
    models.push_back(model);
    results.push_back(result);
  }
  for (int round = 0; round <= rounds; ++round) {
    for (size_t m = 0; m < models.size(); ++m) {
      auto& model = *models[m];
      const bool frozen = results[m].regime == Regime::kFrozen;
      const auto ms = time_ms(
          [&] {
            model_case.loss(model, frozen).backward();
            for (auto& p : model.parameters()) {
              p.mutable_grad().reset();
            }
          },
          device);
      if (round > 0) {
        results[m].step_ms.push_back(ms);
      }
    }
  }
  // In the order of kRegimes.
  std::vector<ModelResult> ordered;
  for (const auto regime : kRegimes) {
    for (const auto& r : results) {
      if (r.regime == regime) {
        ordered.push_back(r);
      }
    }
  }
  return ordered;
}

// ---------------------------------------------------------------------------
// The machine.

std::string machine() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      return line.substr(line.find(':') + 2);
    }
  }
  return "unknown CPU";
}

/// The compiler flags of this build (from CMake), printed with every run.
constexpr const char* kCompileFlags = STYLEINJECT_BENCH_FLAGS;

/// Whether the build asked for -O2 or -O3, as a user's release build does.
bool optimised_build() {
  const std::string flags = kCompileFlags;
  return flags.find("-O2") != std::string::npos ||
      flags.find("-O3") != std::string::npos;
}

/// The BLAS this process runs its GEMMs on: the file whose sgemm_ the
/// dynamic linker resolved (Debian's LibTorch takes whichever libblas.so.3
/// is installed), else the one LibTorch was built with (PyPI's wheels link
/// MKL in).
std::string blas_in_use() {
  Dl_info info{};
  const auto* sgemm = dlsym(RTLD_DEFAULT, "sgemm_");
  if (sgemm != nullptr && dladdr(sgemm, &info) != 0 &&
      info.dli_fname != nullptr &&
      std::string(info.dli_fname).find("libtorch") == std::string::npos) {
    char* resolved = realpath(info.dli_fname, nullptr);
    const std::string path = resolved ? resolved : info.dli_fname;
    std::free(resolved);
    return path;
  }
  const auto config = at::show_config();
  const auto at = config.find("BLAS_INFO=");
  return at == std::string::npos ? "unknown"
                                 : "built in: " +
          config.substr(at + 10, config.find_first_of(", \n", at) - at - 10);
}

/// How many threads `blas` runs its GEMMs on, where it says: OpenBLAS keeps
/// its own pool, beside LibTorch's threads. 0 if unknown (or another BLAS:
/// Debian's LAPACK can load OpenBLAS beside the reference BLAS).
int blas_threads(const std::string& blas) {
  using Query = int (*)();
  const auto query =
      reinterpret_cast<Query>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  return query && blas.find("openblas") != std::string::npos ? query() : 0;
}

/// Debian's reference (netlib) BLAS, a GEMM some 40 times slower than
/// OpenBLAS: timings on it say nothing about a real machine.
bool is_reference_blas(const std::string& blas) {
  return blas.find("/blas/libblas.so") != std::string::npos;
}

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "styleinject_bench: " << problem << "\n"
            << "usage: styleinject_bench [--quick] [--json PATH] "
               "[--rounds N] [--device cpu|cuda] "
               "[--dtype float32|bfloat16|float16] "
               "[--adapter-dtype same|float32] "
               "[--path auto|merged|stacked|merged_weight] "
               "[--no-layers] [--no-models]\n";
  std::exit(2);
}

} // namespace

int main(int argc, char** argv) {
  bool quick = false, layers = true, models = true;
  std::string json_path, device_name = "cpu", dtype_name = "float32";
  std::string adapter_dtype_name = "same";
  std::string path_name = "auto";
  int rounds = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        usage("expected a value after " + arg);
      }
      return argv[++i];
    };
    if (arg == "--quick") {
      quick = true;
    } else if (arg == "--json") {
      json_path = value();
    } else if (arg == "--rounds") {
      const auto text = value();
      rounds = std::atoi(text.c_str());
      if (rounds < 1) {
        usage("expected --rounds of at least 1, but got '" + text + "'");
      }
    } else if (arg == "--device") {
      device_name = value();
    } else if (arg == "--dtype") {
      dtype_name = value();
    } else if (arg == "--adapter-dtype") {
      adapter_dtype_name = value();
    } else if (arg == "--path") {
      path_name = value();
    } else if (arg == "--no-layers") {
      layers = false;
    } else if (arg == "--no-models") {
      models = false;
    } else {
      usage("unknown argument '" + arg + "'");
    }
  }
  if (device_name != "cpu" && device_name != "cuda") {
    usage("expected --device cpu or cuda, but got '" + device_name + "'");
  }
  if (device_name == "cuda" && !torch::cuda::is_available()) {
    usage("--device cuda, but this machine has no CUDA device");
  }
  const std::vector<std::pair<std::string, torch::ScalarType>> dtypes{
      {"float32", torch::kFloat},
      {"bfloat16", torch::kBFloat16},
      {"float16", torch::kHalf}};
  const auto dtype =
      std::find_if(dtypes.begin(), dtypes.end(), [&](const auto& d) {
        return d.first == dtype_name;
      });
  if (dtype == dtypes.end()) {
    usage(
        "expected --dtype float32, bfloat16 or float16, but got '" +
        dtype_name + "'");
  }
  if (adapter_dtype_name != "same" && adapter_dtype_name != "float32") {
    usage(
        "expected --adapter-dtype same or float32, but got '" +
        adapter_dtype_name + "'");
  }
  const auto adapter_dtype =
      adapter_dtype_name == "same" ? dtype->second : torch::kFloat;
  const std::vector<std::pair<std::string, styleinject::ComputePath>> paths{
      {"auto", styleinject::ComputePath::kAuto},
      {"merged", styleinject::ComputePath::kMerged},
      {"stacked", styleinject::ComputePath::kStacked},
      {"merged_weight", styleinject::ComputePath::kMergedWeight}};
  const auto path =
      std::find_if(paths.begin(), paths.end(), [&](const auto& p) {
        return p.first == path_name;
      });
  if (path == paths.end()) {
    usage(
        "expected --path auto, merged, stacked or merged_weight, but got '" +
        path_name + "'");
  }
  if (rounds == 0) {
    rounds = quick ? 7 : 15;
  }
  // With its index: the CUDA allocator's statistics are per device.
  const torch::Device device(device_name == "cuda" ? "cuda:0" : "cpu");
  const auto blas = blas_in_use();

  const auto title = fmt::format(
      "StyleInject n={} r={} path {}; {}{} on {} ({} cores, {} threads), "
      "LibTorch {}.{}, {}, BLAS {}{}; {} rounds, methods interleaved",
      kBranches,
      kRank,
      path_name,
      dtype_name,
      adapter_dtype_name == "same" ? "" : " (adapters float32)",
      device.is_cuda() ? "CUDA" : machine(),
      std::thread::hardware_concurrency(),
      at::get_num_threads(),
      TORCH_VERSION_MAJOR,
      TORCH_VERSION_MINOR,
      device_name,
      blas,
      blas_threads(blas) > 0 ? fmt::format(" ({} threads)", blas_threads(blas))
                             : "",
      rounds);
  std::cout << title << "\nbuilt with: " << kCompileFlags << "\n";
  if (!optimised_build()) {
    std::cout << "\n*** WARNING: built without -O2 or -O3 (.ci builds at -O1, "
                 "to compile fast): the library's host code runs slower than "
                 "in a user's release build. For timings, configure a build "
                 "folder of your own with -DCMAKE_BUILD_TYPE=Release\n";
  }
  if (!device.is_cuda() && is_reference_blas(blas)) {
    std::cout << "\n*** WARNING: LibTorch runs on the reference BLAS (" << blas
              << "), whose GEMMs are some 40x slower than an optimised one:\n"
                 "*** these figures say nothing about a real machine. On "
                 "Debian: apt-get install libopenblas0-pthread\n";
  }
  std::cout << "ratios: median of per-round ratios (interquartile range); "
               "lora = hand-written LoRA of about StyleInject's parameters\n";

  nlohmann::ordered_json cases = nlohmann::ordered_json::array();
  if (layers) {
    fmt::print(
        "\n{:<18} {:<26} {:<17} {:>8} {:>8} {:>9} {:>18} {:>18} {:>18} "
        "{:>8} {:>8} {:>8} {:>5}\n",
        "case",
        "shape",
        "method",
        "params",
        "fwd ms",
        "train ms",
        "fwd / base",
        "train / base",
        "train / lora",
        "kept MB",
        "kept+res",
        "peak MB",
        "ops");
  }
  for (const auto& shape : layers ? shapes(quick) : std::vector<Shape>{}) {
    const auto results = measure_layer(
        shape, device, dtype->second, adapter_dtype, path->second, rounds);
    const auto& base = results[0];
    const auto& lora = results[1];
    for (const auto& r : results) {
      const auto forward = ratio(r.forward_ms, base.forward_ms);
      const auto train = ratio(r.train_ms, base.train_ms);
      const auto train_lora = ratio(r.train_ms, lora.train_ms);
      fmt::print(
          "{:<18} {:<26} {:<17} {:>8} {:>8.2f} {:>9.2f} {:>18} {:>18} {:>18} "
          "{:>8.2f} {:>8.2f} {:>8.2f} {:>5}\n",
          shape.name,
          shape.describe(),
          name_of(r.method),
          r.parameters,
          quantile(r.forward_ms, 0.5),
          quantile(r.train_ms, 0.5),
          forward.text(),
          train.text(),
          train_lora.text(),
          r.kept_bytes / 1e6,
          r.kept_bytes_residual / 1e6,
          r.peak_bytes / 1e6,
          r.ops);
      nlohmann::ordered_json entry{
          {"name",
           shape.name + "/b" + std::to_string(shape.batch) + "/" +
               name_of(r.method)},
          {"shape", shape.describe()},
          {"layer", shape.fields()},
          {"method", name_of(r.method)},
          {"lora_rank", equal_params_rank(shape)},
          {"trainable_parameters", r.parameters},
          {"forward_ms", quantile(r.forward_ms, 0.5)},
          {"train_ms", quantile(r.train_ms, 0.5)},
          {"forward_vs_base", to_json(forward)},
          {"train_vs_base", to_json(train)},
          {"train_vs_lora", to_json(train_lora)},
          {"kept_bytes", r.kept_bytes},
          {"kept_bytes_residual", r.kept_bytes_residual},
          {"peak_forward_bytes", r.peak_bytes},
          {"ops_per_train_step", r.ops}};
      for (const auto& variant : r.inference_ms) {
        const auto versus_base = ratio(variant.second, base.forward_ms);
        fmt::print(
            "{:<18} {:<26} {:<17} {:>8} {:>8.2f} {:>9} {:>18}\n",
            "",
            "",
            "  " + variant.first,
            "",
            quantile(variant.second, 0.5),
            "-",
            versus_base.text());
        auto key = variant.first;
        std::replace(key.begin(), key.end(), ' ', '_');
        entry[key + "_forward_ms"] = quantile(variant.second, 0.5);
        entry[key + "_forward_vs_base"] = to_json(versus_base);
      }
      cases.push_back(entry);
    }
    std::cout << std::flush;
  }

  nlohmann::ordered_json model_json = nlohmann::ordered_json::array();
  if (models) {
    fmt::print(
        "\n{:<16} {:<14} {:>11} {:>10} {:>18} {:>18}\n",
        "model step",
        "method",
        "trainable",
        "step ms",
        "vs frozen base",
        "vs lora");
  }
  for (const auto& model_case :
       models ? model_cases(quick, device) : std::vector<ModelCase>{}) {
    const auto results =
        measure_model(model_case, device, std::max(3, rounds / 2));
    const auto& frozen = results[0];
    const auto& lora = results[2];
    for (const auto& r : results) {
      const auto vs_frozen = ratio(r.step_ms, frozen.step_ms);
      const auto vs_lora = ratio(r.step_ms, lora.step_ms);
      fmt::print(
          "{:<16} {:<14} {:>11} {:>10.1f} {:>18} {:>18}  {}\n",
          model_case.name,
          name_of(r.regime),
          r.trainable,
          quantile(r.step_ms, 0.5),
          vs_frozen.text(),
          vs_lora.text(),
          r.adapter);
      model_json.push_back(
          {{"name", model_case.name + "/" + name_of(r.regime)},
           {"model", model_case.describe},
           {"method", name_of(r.regime)},
           {"adapter", r.adapter},
           {"trainable_parameters", r.trainable},
           {"step_ms", quantile(r.step_ms, 0.5)},
           {"vs_frozen_base", to_json(vs_frozen)},
           {"vs_lora", to_json(vs_lora)}});
    }
    std::cout << std::flush;
  }
  if (!json_path.empty()) {
    nlohmann::ordered_json document{
        {"title", title},
        {"machine", device.is_cuda() ? "CUDA" : machine()},
        {"cores", std::thread::hardware_concurrency()},
        {"threads", at::get_num_threads()},
        {"blas", blas},
        {"blas_threads", blas_threads(blas)},
        {"compile_flags", kCompileFlags},
        {"libtorch",
         std::to_string(TORCH_VERSION_MAJOR) + "." +
             std::to_string(TORCH_VERSION_MINOR)},
        {"device", device_name},
        {"dtype", dtype_name},
        {"adapter_dtype", adapter_dtype_name},
        {"path", path_name},
        {"rounds", rounds},
        {"branches", kBranches},
        {"rank", kRank},
        {"layers", cases},
        {"models", model_json}};
    std::ofstream(json_path) << document.dump(2) << "\n";
    std::cout << "\nwrote " << json_path << "\n";
  }
  return 0;
}
