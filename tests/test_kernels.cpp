// The library's own CUDA kernels (include/styleinject/cuda/). On every CUDA
// build of LibTorch, NVRTC compiles each kernel for every architecture it
// knows, no device needed ([nvrtc]), so that CI catches a broken kernel; on
// a device ([cuda]), each kernel against a float64 reference, and the layer
// under CudaKernels (output and gradients) against the layer without.

#include "support.h"

#include <styleinject/cuda/kernels.h>

#include <tuple>

namespace {

namespace D = styleinject::cuda::detail;
namespace SF = styleinject::functional;
using Catch::Matchers::Contains;
using styleinject_test::error_of;

} // namespace

TEST_CASE("CudaKernels leaves layers on the CPU as they are", "[kernels]") {
  torch::manual_seed(30);
  styleinject::StyleInjectLinear layer(
      torch::nn::LinearOptions(16, 12),
      styleinject::StyleInjectOptions(2).branches(3));
  styleinject_test::randomize_adapter(*layer);
  const auto x = torch::randn({2, 7, 16}, torch::requires_grad());
  const auto gradients = [&](bool kernels) {
    std::unique_ptr<styleinject::CudaKernels> guard;
    if (kernels) {
      guard = std::make_unique<styleinject::CudaKernels>();
    }
    const auto h = layer(x);
    guard.reset();
    auto inputs = layer->adapter_parameters();
    inputs.push_back(x);
    return torch::autograd::grad({h.pow(2).sum()}, inputs);
  };
  const auto launches = D::kernel_launches().load();
  const auto without = gradients(false);
  const auto with = gradients(true);
  CHECK(D::kernel_launches().load() == launches);
  REQUIRE(with.size() == without.size());
  for (size_t i = 0; i < with.size(); ++i) {
    CHECK(torch::equal(with[i], without[i]));
  }
  // The guard gives the flag back its value when it goes.
  CHECK_FALSE(D::kernels_on());
  {
    const styleinject::CudaKernels outer;
    { const styleinject::CudaKernels inner; }
    CHECK(D::kernels_on());
  }
  CHECK_FALSE(D::kernels_on());
}

#ifdef STYLEINJECT_CUDA_KERNELS

TEST_CASE(
    "NVRTC compiles every kernel for every architecture it knows",
    "[nvrtc]") {
  const auto archs = D::supported_archs();
  REQUIRE_FALSE(archs.empty());
  for (const auto& kernel : D::every_kernel_source()) {
    for (const int arch : archs) {
      CAPTURE(kernel.source, arch);
      const auto code = D::compile(kernel.source, kernel.name, arch);
      CHECK_FALSE(code.ptx);
      CHECK(
          code.image.rfind(
              "\x7f"
              "ELF",
              0) == 0);
      CHECK(code.image.find(kernel.name) != std::string::npos);
    }
    // A device newer than NVRTC gets PTX for the newest architecture NVRTC
    // knows, which the driver compiles.
    const auto code = D::compile(kernel.source, kernel.name, archs.back() + 1);
    CHECK(code.ptx);
    CHECK_THAT(code.image, Contains(".entry " + kernel.name));
    CHECK_THAT(
        code.image, Contains(".target sm_" + std::to_string(archs.back())));
  }
}

TEST_CASE(
    "a kernel NVRTC cannot compile is an error with NVRTC's log",
    "[nvrtc]") {
  const auto message = error_of([] {
    D::compile(
        "extern \"C\" __global__ void k() { not_declared(); }",
        "broken.cu",
        90);
  });
  CHECK_THAT(
      message,
      Contains(
          "NVRTC failed to compile broken.cu for --gpu-architecture=sm_90"));
  CHECK_THAT(message, Contains("not_declared"));
  const int oldest = D::supported_archs().front();
  CHECK_THAT(
      error_of([&] { D::compile("", "empty.cu", oldest - 1); }),
      Contains(
          "NVRTC compiles for sm_" + std::to_string(oldest) +
          " or newer, but the device is sm_" + std::to_string(oldest - 1)));
}

#endif // STYLEINJECT_CUDA_KERNELS

TEST_CASE("token_sums on CUDA against float64", "[.cuda]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(31);
  const auto u_dtype = GENERATE(torch::kFloat, torch::kBFloat16, torch::kHalf);
  const auto sizes = GENERATE(
      std::vector<int64_t>{2, 4096, 320},
      std::vector<int64_t>{3, 1, 45},
      std::vector<int64_t>{1, 1000, 33},
      std::vector<int64_t>{5, 77, 768});
  CAPTURE(u_dtype, sizes);
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  const auto t = torch::randn(sizes, cuda);
  // u as the backward keeps it: rounded to its dtype, read as it is.
  const auto u = torch::randn(sizes, cuda).to(u_dtype);
  const auto launches = D::kernel_launches().load();
  torch::Tensor sum, dot;
  std::tie(sum, dot) = D::token_sums(t, u);
  CHECK(D::kernel_launches().load() == launches + 1);
  const auto t64 = t.cpu().to(torch::kDouble);
  const auto u64 = u.cpu().to(torch::kDouble);
  // float32 sums: within a few units of float32's precision of the sum of
  // the terms' magnitudes.
  const auto close = [](const torch::Tensor& got,
                        const torch::Tensor& expected,
                        const torch::Tensor& magnitude) {
    return (got.cpu().to(torch::kDouble) - expected)
        .abs()
        .le(1e-6 * magnitude + 1e-12)
        .all()
        .item<bool>();
  };
  CHECK(sum.scalar_type() == torch::kFloat);
  CHECK(close(sum, t64.sum(1), t64.abs().sum(1)));
  CHECK(close(dot, (t64 * u64).sum(1), (t64 * u64).abs().sum(1)));
  // A view that is not contiguous is read as its values.
  const auto t_view = t.transpose(0, 1).contiguous().transpose(0, 1);
  const auto by_view = D::token_sums(t_view, u);
  CHECK(torch::equal(by_view.first, sum));
  CHECK(torch::equal(by_view.second, dot));
}

TEST_CASE("route_and_mix on CUDA against float64", "[.cuda]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(33);
  const int64_t branches = GENERATE(1, 3, 4, 64);
  const bool gated = GENERATE(true, false);
  const int64_t instances = 5, d_in = 77, rank = 3, d_out = 45;
  const double temperature = 0.7, scale = 0.8;
  CAPTURE(branches, gated);
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  const auto pooled = torch::randn({instances, d_in}, cuda);
  const auto router_weight = torch::randn({branches, d_in}, cuda) / 4;
  const auto router_bias = torch::randn({branches}, cuda);
  const auto lora_A = torch::randn({branches, rank, d_in}, cuda);
  const auto gate =
      gated ? torch::randn({branches, d_out}, cuda) : torch::Tensor();
  const auto launches = D::kernel_launches().load();
  const auto mixed = D::route_and_mix(
      pooled, router_weight, router_bias, lora_A, gate, temperature, scale);
  CHECK(D::kernel_launches().load() == launches + 1);
  // SPEC §1-3 in float64, written out.
  const auto f64 = [](const torch::Tensor& t) {
    return t.cpu().to(torch::kDouble);
  };
  const auto s = torch::softmax(
      (f64(pooled).mm(f64(router_weight).t()) + f64(router_bias)) / temperature,
      1);
  const auto a = s.mm(f64(lora_A).flatten(1)).view({instances, rank, d_in});
  const auto near = [](const torch::Tensor& got,
                       const torch::Tensor& expected) {
    return torch::allclose(got.cpu().to(torch::kDouble), expected, 1e-5, 1e-5);
  };
  CHECK(near(mixed.s, s));
  CHECK(near(mixed.a, a));
  CHECK(mixed.g.defined() == gated);
  if (gated) {
    CHECK(near(mixed.g, torch::tanh(scale * s.mm(f64(gate)))));
  }
}

TEST_CASE(
    "route_and_mix_backward on CUDA against float64 autograd",
    "[.cuda]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(34);
  const int64_t branches = GENERATE(1, 4, 64);
  const bool gated = GENERATE(true, false);
  const bool pooled_wanted = GENERATE(true, false);
  const int64_t instances = 5, d_in = 77, rank = 3, d_out = 45;
  const double temperature = 0.7, scale = 0.8;
  CAPTURE(branches, gated, pooled_wanted);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const auto leaf = [&](std::vector<int64_t> sizes) {
    return torch::randn(sizes, f64).requires_grad_();
  };
  const auto pooled = leaf({instances, d_in});
  const auto router_weight =
      (torch::randn({branches, d_in}, f64) / 4).requires_grad_();
  const auto router_bias = leaf({branches});
  const auto lora_A = leaf({branches, rank, d_in});
  const auto gate = leaf({branches, d_out});
  // SPEC §1-3 in float64, differentiated by autograd.
  const auto s = torch::softmax(
      (pooled.mm(router_weight.t()) + router_bias) / temperature, 1);
  const auto a = s.mm(lora_A.flatten(1)).view({instances, rank, d_in});
  const auto g = torch::tanh(scale * s.mm(gate));
  const auto grad_a = torch::randn_like(a), grad_g = torch::randn_like(g);
  auto objective = (a * grad_a).sum();
  if (gated) {
    objective = objective + (g * grad_g).sum();
  }
  const auto expected = torch::autograd::grad(
      {objective},
      {lora_A, gate, router_weight, router_bias, pooled},
      {},
      /*retain_graph=*/false,
      /*create_graph=*/false,
      /*allow_unused=*/true);
  const auto cuda = [](const torch::Tensor& t) {
    return t.defined() ? t.detach().to(torch::kCUDA, torch::kFloat) : t;
  };
  const auto launches = D::kernel_launches().load();
  const auto got = D::route_and_mix_backward(
      cuda(grad_a),
      gated ? cuda(grad_g) : torch::Tensor(),
      cuda(s),
      cuda(g),
      cuda(pooled),
      cuda(lora_A),
      cuda(gate),
      cuda(router_weight),
      temperature,
      scale,
      {true, true, true, true, pooled_wanted});
  CHECK(D::kernel_launches().load() == launches + 2);
  const auto near = [](const torch::Tensor& result,
                       const torch::Tensor& reference) {
    return torch::allclose(
        result.cpu().to(torch::kDouble), reference, 1e-4, 1e-5);
  };
  CHECK(near(got.lora_A, expected[0]));
  CHECK(got.gate.defined() == gated);
  if (gated) {
    CHECK(near(got.gate, expected[1]));
  }
  CHECK(near(got.router_weight, expected[2]));
  CHECK(near(got.router_bias, expected[3]));
  CHECK(got.pooled.defined() == pooled_wanted);
  if (pooled_wanted) {
    CHECK(near(got.pooled, expected[4]));
  }
}

TEST_CASE(
    "on CUDA, a gated Linear layer's output and gradients under CudaKernels "
    "equal those without",
    "[.cuda]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(32);
  const auto base_dtype = GENERATE(torch::kFloat, torch::kBFloat16);
  CAPTURE(base_dtype);
  const int64_t n = 4, r = 4, d_in = 320, d_out = 320;
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  const auto parameter = [&](std::vector<int64_t> sizes) {
    return (torch::randn(sizes, cuda) * 0.5).requires_grad_();
  };
  const SF::AdapterTensors adapter{
      parameter({n, r, d_in}),
      parameter({d_out, r}),
      parameter({n, d_in}),
      parameter({n}),
      parameter({n, d_out})};
  const auto weight = torch::randn({d_out, d_in}, cuda).div(20).to(base_dtype);
  const auto bias = torch::randn({d_out}, cuda).to(base_dtype);
  const auto x =
      torch::randn({2, 1024, d_in}, cuda).to(base_dtype).requires_grad_();
  const auto probe = torch::randn({2, 1024, d_out}, cuda).to(base_dtype);
  const std::vector<torch::Tensor> inputs = {
      x,
      adapter.lora_A,
      adapter.lora_B,
      adapter.router_weight,
      adapter.router_bias,
      adapter.gate};
  // The output, then the gradient of each input.
  const auto results = [&](bool kernels) {
    torch::Tensor h;
    {
      std::unique_ptr<styleinject::CudaKernels> guard;
      if (kernels) {
        guard = std::make_unique<styleinject::CudaKernels>();
      }
      h = SF::style_inject_linear(
          x,
          weight,
          bias,
          adapter,
          SF::StyleInjectFuncOptions().training(true));
    }
    auto all = torch::autograd::grad({(h * probe).sum()}, inputs);
    all.insert(all.begin(), h.detach());
    return all;
  };
  const auto composed = results(false);
  const auto launches = D::kernel_launches().load();
  const auto with_kernels = results(true);
  // The router and mixing in forward; in backward, the gate's token
  // statistics and the mixing's two.
  CHECK(D::kernel_launches().load() == launches + 4);
  for (size_t i = 0; i < composed.size(); ++i) {
    CAPTURE(i);
    const auto expected = composed[i].to(torch::kFloat);
    const auto got = with_kernels[i].to(torch::kFloat);
    // Only the order of float32 sums differs: within a part in 10^4 of the
    // largest entry, or in 10^2 where the result is rounded to bfloat16
    // (the output and x's gradient: a rounding may flip by one unit).
    const bool rounded = base_dtype == torch::kBFloat16 && i <= 1;
    const double scale = expected.abs().max().item<double>();
    const double tolerance = (rounded ? 1e-2 : 1e-4) * scale;
    CHECK((got - expected).abs().max().item<double>() <= tolerance);
  }
}
