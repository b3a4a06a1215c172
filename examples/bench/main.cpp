// styleinject_bench: what StyleInject costs per training step, measured side
// by side with the base layer alone, LoRA of equal parameters, LoRA of rank
// n·r, and StyleInject written naively as a loop over its branches (as
// mixture-of-LoRA code does), at the layer shapes of Stable Diffusion 1.5's
// UNet and of a DiT.
//
//   styleinject_bench [--quick] [--json PATH] [--repeats N]
//                     [--device cpu|cuda] [--dtype float32|bfloat16|float16]
//                     [--path auto|merged|stacked]
//
// Every method runs forward (no autograd) and forward+backward (base frozen,
// adapter trainable, input requiring grad as inside a network). Times are
// medians over repetitions. Memory, probed once per method with a counting
// allocator (CPU; CUDA's caching allocator on CUDA) that is off while
// timing: what the forward leaves allocated for backward besides its output
// ("kept MB", for a consumer that keeps the output, as the next adapted
// layer does); the same when the consumer keeps nothing ("kept+res": the
// output goes into a residual add and is dropped); and the peak during the
// forward.

#include <styleinject/styleinject.h>

#include <c10/core/CPUAllocator.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
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
    // DiT-XL/2 at 256 px: 256 tokens of width 1152.
    add("dit_xl2.attn", false, 256, 1152, 1152, false);
    // SD 1.5's first ResBlock convolution.
    add("sd15.resblock.conv", true, 64, 320, 320, true);
  }
  return result;
}

enum class Method { kBase, kLoraEqual, kLoraNr, kNaive, kStyleInject };
const char* name_of(Method m) {
  switch (m) {
    case Method::kBase:
      return "base";
    case Method::kLoraEqual:
      return "lora_equal_params";
    case Method::kLoraNr:
      return "lora_rank_nr";
    case Method::kNaive:
      return "styleinject_naive";
    case Method::kStyleInject:
      return "styleinject";
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
  const auto s = torch::softmax(
      layer.router->forward(x.mean(token_dims)), /*dim=*/-1); // (N, n)
  std::vector<int64_t> per_instance(x.dim(), 1);
  per_instance[0] = x.size(0);
  auto h = project(x, layer.weight, layer.bias);
  for (int64_t i = 0; i < n; ++i) {
    const auto branch =
        project(project(x, layer.lora_A[i], {}), layer.lora_B, {});
    h = h +
        s.select(1, i).view(per_instance) * branch *
            layer.adapter_options->scaling();
  }
  auto g_shape = per_instance;
  g_shape[layer.weight.dim() == 2 ? 2 : 1] = -1; // over channels
  const auto g = torch::tanh(torch::matmul(s, layer.gate)).view(g_shape);
  return h + g * (h - h.mean(token_dims, /*keepdim=*/true));
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

// ---------------------------------------------------------------------------
// One method on one shape: what to run, and what it trains.

struct Runner {
  std::function<torch::Tensor(const torch::Tensor&)> forward;
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

/// LoRA's rank with about as many parameters as StyleInject on this shape.
int64_t equal_params_rank(const Shape& shape, int64_t styleinject_params) {
  const int64_t per_rank = (shape.conv ? shape.in * 9 : shape.in) + shape.out;
  return std::max<int64_t>(
      1, std::llround(double(styleinject_params) / double(per_rank)));
}

template <typename Layer, typename Project>
Runner make_runner(
    Method method,
    Layer layer,
    std::vector<int64_t> token_dims,
    Project project) {
  Runner runner;
  runner.trainable = layer->adapter_parameters();
  runner.parameters = count(runner.trainable);
  if (method == Method::kNaive) {
    runner.forward = [=](const torch::Tensor& x) mutable {
      return naive_forward(*layer, x, token_dims, project);
    };
  } else {
    runner.forward = [=](const torch::Tensor& x) mutable { return layer(x); };
  }
  return runner;
}

Runner make(
    Method method,
    const Shape& shape,
    const torch::Device& device,
    torch::ScalarType dtype,
    styleinject::ComputePath path) {
  const auto options = [&]() -> c10::optional<StyleInjectOptions> {
    const auto styleinject =
        StyleInjectOptions(kRank).branches(kBranches).path(path);
    switch (method) {
      case Method::kBase:
        return c10::nullopt;
      case Method::kLoraEqual: {
        const int64_t params = shape.conv ? kBranches * kRank * shape.in * 9 +
                kRank * shape.out + kBranches * (shape.in + 1 + shape.out)
                                          : kBranches * kRank * shape.in +
                kRank * shape.out + kBranches * (shape.in + 1 + shape.out);
        return StyleInjectOptions::lora(equal_params_rank(shape, params));
      }
      case Method::kLoraNr:
        return StyleInjectOptions::lora(kBranches * kRank);
      case Method::kNaive:
      case Method::kStyleInject:
        return styleinject;
    }
    return c10::nullopt;
  }();
  if (shape.conv) {
    styleinject::StyleInjectConv2d layer(
        torch::nn::Conv2dOptions(shape.in, shape.out, 3).padding(1));
    layer->weight.set_requires_grad(false);
    layer->bias.set_requires_grad(false);
    if (options) {
      layer->add_adapter(*options);
    }
    layer->to(device, dtype);
    // Non-zero adapters, so that no branch of the math is trivially zero.
    for (auto& p : layer->adapter_parameters()) {
      torch::NoGradGuard no_grad;
      p.normal_(0.0, 0.02);
    }
    return make_runner(
        method,
        layer,
        {2, 3},
        [](const torch::Tensor& x,
           const torch::Tensor& w,
           const torch::Tensor& b) {
          return F::conv2d(
              x,
              w,
              F::Conv2dFuncOptions().bias(b).padding(w.size(-1) == 3 ? 1 : 0));
        });
  }
  styleinject::StyleInjectLinear layer(shape.in, shape.out);
  layer->weight.set_requires_grad(false);
  layer->bias.set_requires_grad(false);
  if (options) {
    layer->add_adapter(*options);
  }
  layer->to(device, dtype);
  for (auto& p : layer->adapter_parameters()) {
    torch::NoGradGuard no_grad;
    p.normal_(0.0, 0.02);
  }
  return make_runner(
      method,
      layer,
      {1},
      [](const torch::Tensor& x,
         const torch::Tensor& w,
         const torch::Tensor& b) { return F::linear(x, w, b); });
}

// ---------------------------------------------------------------------------
// Measuring.

double median_ms(
    const std::function<void()>& step,
    int repeats,
    const torch::Device& device) {
  step(); // warm-up: allocator caches, kernel selection
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    synchronize(device);
    const auto start = std::chrono::steady_clock::now();
    step();
    synchronize(device);
    times.push_back(std::chrono::duration<double, std::milli>(
                        std::chrono::steady_clock::now() - start)
                        .count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

struct Result {
  Method method;
  int64_t parameters;
  double forward_ms, train_ms;
  /// What the forward leaves allocated for backward: besides its output
  /// (which a consumer such as the next layer keeps anyway), and when the
  /// consumer keeps nothing (a residual add), where everything that keeps
  /// the output alive is the layer's; and the peak during the forward, both
  /// above what was allocated before it.
  int64_t kept_bytes, kept_bytes_residual, peak_bytes;
};

/// The memory figures of Result for one forward of `forward` on x.
void probe_memory(
    const std::function<torch::Tensor(const torch::Tensor&)>& forward,
    const torch::Tensor& x,
    const torch::Device& device,
    Result& result) {
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

Result measure(
    Method method,
    const Shape& shape,
    const torch::Device& device,
    torch::ScalarType dtype,
    styleinject::ComputePath path,
    int repeats) {
  torch::manual_seed(0);
  auto runner = make(method, shape, device, dtype, path);
  const auto tensor_options =
      torch::TensorOptions().device(device).dtype(dtype);
  const auto x = shape.conv
      ? torch::randn(
            {shape.batch, shape.in, shape.tokens, shape.tokens}, tensor_options)
      : torch::randn({shape.batch, shape.tokens, shape.in}, tensor_options);
  const auto x_train = x.clone().requires_grad_(true);
  Result result{method, runner.parameters, 0.0, 0.0, 0, 0, 0};
  result.forward_ms = median_ms(
      [&] {
        torch::NoGradGuard no_grad;
        runner.forward(x);
      },
      repeats,
      device);
  torch::Tensor grad_out;
  result.train_ms = median_ms(
      [&] {
        const auto out = runner.forward(x_train);
        if (!grad_out.defined()) {
          grad_out = torch::randn_like(out);
        }
        out.backward(grad_out);
        x_train.mutable_grad().reset();
        for (auto& t : runner.trainable) {
          t.mutable_grad().reset();
        }
      },
      repeats,
      device);
  probe_memory(runner.forward, x_train, device, result);
  return result;
}

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

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "styleinject_bench: " << problem << "\n"
            << "usage: styleinject_bench [--quick] [--json PATH] "
               "[--repeats N] [--device cpu|cuda] "
               "[--dtype float32|bfloat16|float16] "
               "[--path auto|merged|stacked]\n";
  std::exit(2);
}

} // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::string json_path, device_name = "cpu", dtype_name = "float32";
  std::string path_name = "auto";
  int repeats = 0;
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
    } else if (arg == "--repeats") {
      const auto text = value();
      repeats = std::atoi(text.c_str());
      if (repeats < 1) {
        usage("expected --repeats of at least 1, but got '" + text + "'");
      }
    } else if (arg == "--device") {
      device_name = value();
    } else if (arg == "--dtype") {
      dtype_name = value();
    } else if (arg == "--path") {
      path_name = value();
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
  const std::vector<std::pair<std::string, styleinject::ComputePath>> paths{
      {"auto", styleinject::ComputePath::kAuto},
      {"merged", styleinject::ComputePath::kMerged},
      {"stacked", styleinject::ComputePath::kStacked}};
  const auto path =
      std::find_if(paths.begin(), paths.end(), [&](const auto& p) {
        return p.first == path_name;
      });
  if (path == paths.end()) {
    usage(
        "expected --path auto, merged or stacked, but got '" + path_name + "'");
  }
  if (repeats == 0) {
    repeats = quick ? 5 : 9;
  }
  const torch::Device device(device_name);

  const auto title = fmt::format(
      "StyleInject n={} r={} path {}; {} on {} ({} cores, {} threads), "
      "LibTorch {}.{}, {}, median of {}",
      kBranches,
      kRank,
      path_name,
      dtype_name,
      device.is_cuda() ? "CUDA" : machine(),
      std::thread::hardware_concurrency(),
      at::get_num_threads(),
      TORCH_VERSION_MAJOR,
      TORCH_VERSION_MINOR,
      device_name,
      repeats);
  std::cout << title << "\n\n";
  fmt::print(
      "{:<20} {:<28} {:<18} {:>9} {:>9} {:>9} {:>7} {:>7} {:>8} {:>8} "
      "{:>8} {:>8}\n",
      "case",
      "shape",
      "method",
      "params",
      "fwd ms",
      "train ms",
      "vs base",
      "vs LoRA",
      "vs naive",
      "kept MB",
      "kept+res",
      "peak MB");

  nlohmann::ordered_json cases = nlohmann::ordered_json::array();
  for (const auto& shape : shapes(quick)) {
    std::vector<Result> results;
    for (const auto method :
         {Method::kBase,
          Method::kLoraEqual,
          Method::kLoraNr,
          Method::kNaive,
          Method::kStyleInject}) {
      results.push_back(
          measure(method, shape, device, dtype->second, path->second, repeats));
    }
    const auto& base = results[0];
    const auto& lora = results[1];
    const auto& naive = results[3];
    for (const auto& r : results) {
      // Ratios of the forward+backward step; the JSON has both passes.
      const auto ratios = [&](double Result::*ms) {
        return std::array<double, 3>{
            r.*ms / base.*ms,
            r.*ms / lora.*ms,
            (r.*ms - base.*ms) / (naive.*ms - base.*ms)};
      };
      const auto train = ratios(&Result::train_ms);
      fmt::print(
          "{:<20} {:<28} {:<18} {:>9} {:>9.2f} {:>9.2f} {:>7.3f} {:>7.3f} "
          "{:>8.3f} {:>8.2f} {:>8.2f} {:>8.2f}\n",
          shape.name,
          shape.describe(),
          name_of(r.method),
          r.parameters,
          r.forward_ms,
          r.train_ms,
          train[0],
          train[1],
          train[2],
          r.kept_bytes / 1e6,
          r.kept_bytes_residual / 1e6,
          r.peak_bytes / 1e6);
      for (const auto& pass :
           {std::make_pair("forward", &Result::forward_ms),
            std::make_pair("forward_backward", &Result::train_ms)}) {
        const auto ratio = ratios(pass.second);
        cases.push_back(
            {{"name",
              shape.name + "/b" + std::to_string(shape.batch) + "/" +
                  name_of(r.method) + "/" + pass.first},
             {"shape", shape.describe()},
             {"method", name_of(r.method)},
             {"pass", pass.first},
             {"trainable_parameters", r.parameters},
             {"median_ms", r.*pass.second},
             {"vs_base", ratio[0]},
             {"vs_lora_equal_params", ratio[1]},
             {"overhead_vs_naive", ratio[2]},
             {"kept_bytes", r.kept_bytes},
             {"kept_bytes_residual", r.kept_bytes_residual},
             {"peak_forward_bytes", r.peak_bytes}});
      }
    }
    std::cout << std::flush;
  }
  if (!json_path.empty()) {
    nlohmann::ordered_json document{
        {"title", title},
        {"machine", device.is_cuda() ? "CUDA" : machine()},
        {"cores", std::thread::hardware_concurrency()},
        {"threads", at::get_num_threads()},
        {"libtorch",
         std::to_string(TORCH_VERSION_MAJOR) + "." +
             std::to_string(TORCH_VERSION_MINOR)},
        {"device", device_name},
        {"dtype", dtype_name},
        {"path", path_name},
        {"repeats", repeats},
        {"branches", kBranches},
        {"rank", kRank},
        {"cases", cases}};
    std::ofstream(json_path) << document.dump(2) << "\n";
    std::cout << "\nwrote " << json_path << "\n";
  }
  return 0;
}
