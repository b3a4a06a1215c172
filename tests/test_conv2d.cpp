// styleinject::StyleInjectConv2d: layout, parity with the naive reference,
// the base layer without an adapter, refusals, meta device, CUDA.

#include "support.h"

#include <catch2/catch.hpp>

#include <map>
#include <sstream>
#include <string>
#include <vector>

#ifdef STYLEINJECT_TEST_CUDA_SYNC_DEBUG
#include <c10/cuda/CUDAFunctions.h>
#endif

using styleinject::ComputePath;
using styleinject::StyleInjectConv2d;
using styleinject::StyleInjectOptions;
using styleinject_test::close64;
using styleinject_test::ConvGeometry;
using styleinject_test::error_of;
using styleinject_test::randomize_adapter;
using styleinject_test::reference_conv2d_forward;
using styleinject_test::reference_of;
namespace F = torch::nn::functional;
namespace SF = styleinject::functional;

TEST_CASE("Conv2d parameters: SPEC §5 names, shapes and count", "[conv2d]") {
  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(6, 5, 3), StyleInjectOptions(2).branches(3));
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& p : layer->named_parameters()) {
    shapes[p.key()] = p.value().sizes().vec();
    CHECK(
        p.value().requires_grad() ==
        (p.key() != "weight" && p.key() != "bias"));
  }
  const std::map<std::string, std::vector<int64_t>> expected{
      {"weight", {5, 6, 3, 3}},
      {"bias", {5}},
      {"lora_A", {3, 2, 6, 3, 3}},
      {"lora_B", {5, 2, 1, 1}},
      {"router.weight", {3, 6}},
      {"router.bias", {3}},
      {"gate", {3, 5}}};
  CHECK(shapes == expected);
  // SPEC §5's count, n·r·C_in·k·k + r·C_out + n·C_in + n + n·C_out.
  int64_t adapter = 0;
  for (const auto& t : layer->adapter_parameters()) {
    adapter += t.numel();
  }
  CHECK(adapter == 3 * 2 * 6 * 9 + 2 * 5 + 3 * 6 + 3 + 3 * 5);
}

TEST_CASE("StyleInjectConv2d matches the naive float64 reference", "[conv2d]") {
  torch::manual_seed(31);
  const int64_t kernel = GENERATE(1, 3);
  const int64_t stride = GENERATE(1, 2);
  const int64_t padding = GENERATE(0, 1);
  const int64_t dilation = GENERATE(1, 2);
  const bool router = GENERATE(true, false);
  const bool gate = GENERATE(true, false);
  const auto path = GENERATE(ComputePath::kMerged, ComputePath::kStacked);
  const int style_kind = GENERATE(0, 1, 2); // router, shared (n), (N, n)
  CAPTURE(kernel, stride, padding, dilation, router, gate, style_kind);
  CAPTURE(static_cast<int>(path));

  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(3, 4, kernel)
          .stride(stride)
          .padding(padding)
          .dilation(dilation),
      StyleInjectOptions(2)
          .branches(3)
          .alpha(3.0)
          .temperature(0.7)
          .router(router)
          .gate(gate)
          .path(path));
  layer->to(torch::kDouble);
  randomize_adapter(*layer);
  layer->set_scale(0.8);
  const auto x = torch::randn({2, 3, 7, 6}, torch::kDouble) + 0.5;
  if (style_kind == 1) {
    layer->set_style(torch::rand({3}, torch::kDouble));
  } else if (style_kind == 2) {
    layer->set_style(torch::rand({2, 3}, torch::kDouble));
  }
  const auto out = layer(x);
  CHECK(out.scalar_type() == torch::kDouble);
  CHECK(close64(
      out,
      reference_conv2d_forward(
          reference_of(*layer, 0.8), {stride, padding, dilation}, x)));
}

TEST_CASE(
    "Conv2d: kAuto and kSame padding agree with the explicit forms",
    "[conv2d]") {
  torch::manual_seed(32);
  StyleInjectConv2d same(
      torch::nn::Conv2dOptions(3, 4, 3).padding(torch::kSame),
      StyleInjectOptions(2).branches(3));
  same->to(torch::kDouble);
  randomize_adapter(*same);
  const auto x = torch::randn({2, 3, 5, 5}, torch::kDouble);
  const auto reference =
      reference_conv2d_forward(reference_of(*same), ConvGeometry{1, 1, 1}, x);
  CHECK(close64(same(x), reference));
  CHECK(close64(same(x.narrow(0, 0, 1)), reference.narrow(0, 0, 1)));
}

TEST_CASE(
    "Conv2d without an adapter is torch::nn::Conv2d, bit for bit",
    "[conv2d]") {
  torch::manual_seed(33);
  auto options = torch::nn::Conv2dOptions(3, 4, 3).stride(2).padding(1);
  torch::nn::Conv2d plain(options);
  StyleInjectConv2d declared(plain);
  const auto x = torch::randn({2, 3, 9, 9});
  CHECK(torch::equal(declared(x), plain(x)));
  CHECK_FALSE(declared->has_adapter());
  CHECK(declared->weight.requires_grad());
  CHECK(
      declared->named_parameters().keys() == plain->named_parameters().keys());

  SECTION("adding an adapter changes nothing until it trains") {
    declared->add_adapter(StyleInjectOptions(2));
    CHECK(torch::equal(declared(x), plain(x)));
    CHECK_FALSE(declared->weight.requires_grad());
    randomize_adapter(*declared);
    CHECK_FALSE(torch::allclose(declared(x), plain(x)));
    declared->set_enabled(false);
    CHECK(torch::equal(declared(x), plain(x)));
  }
  SECTION("a new layer initialises as torch::nn::Conv2d does") {
    torch::manual_seed(5);
    torch::nn::Conv2d expected(options);
    torch::manual_seed(5);
    StyleInjectConv2d fresh(options);
    CHECK(torch::equal(fresh->weight, expected->weight));
    CHECK(torch::equal(fresh->bias, expected->bias));
    torch::manual_seed(5);
    StyleInjectConv2d fresh_short(3, 4, 3);
    torch::manual_seed(5);
    torch::nn::Conv2d expected_short(3, 4, 3);
    CHECK(torch::equal(fresh_short->weight, expected_short->weight));
  }
}

TEST_CASE("Conv2d gradients reach the adapter only", "[conv2d]") {
  torch::manual_seed(34);
  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(3, 4, 3).padding(1), StyleInjectOptions(2));
  randomize_adapter(*layer);
  layer(torch::randn({2, 3, 6, 6})).pow(2).sum().backward();
  CHECK_FALSE(layer->weight.grad().defined());
  CHECK_FALSE(layer->bias.grad().defined());
  for (const auto& p : layer->adapter_parameters()) {
    REQUIRE(p.grad().defined());
    CHECK(p.grad().sizes() == p.sizes());
    CHECK(p.grad().abs().sum().item<double>() > 0.0);
  }
}

TEST_CASE(
    "Conv2d: the two compute paths agree in values and gradients",
    "[conv2d]") {
  torch::manual_seed(37);
  const bool fixed_style = GENERATE(false, true);
  CAPTURE(fixed_style);
  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(3, 4, 3).stride(2).padding(1),
      StyleInjectOptions(2).branches(3));
  layer->to(torch::kDouble);
  randomize_adapter(*layer);
  if (fixed_style) {
    layer->set_style(torch::rand({3}, torch::kDouble));
  }
  const auto x = torch::randn({3, 3, 8, 7}, torch::kDouble);
  std::vector<std::vector<torch::Tensor>> grads;
  std::vector<torch::Tensor> outputs;
  for (const auto path : {ComputePath::kMerged, ComputePath::kStacked}) {
    layer->adapter_options->path(path);
    layer->zero_grad();
    const auto out = layer(x);
    out.pow(2).sum().backward();
    outputs.push_back(out.detach());
    grads.emplace_back();
    for (const auto& p : layer->adapter_parameters()) {
      // With a fixed style the router is unused and gets no gradient.
      grads.back().push_back(
          p.grad().defined() ? p.grad().clone() : torch::Tensor());
    }
  }
  CHECK(close64(outputs[0], outputs[1]));
  for (size_t i = 0; i < grads[0].size(); ++i) {
    REQUIRE(grads[0][i].defined() == grads[1][i].defined());
    if (grads[0][i].defined()) {
      CHECK(close64(grads[0][i], grads[1][i]));
    }
  }
}

TEST_CASE("Conv2d refuses what it does not support", "[conv2d]") {
  CHECK(
      error_of([] {
        StyleInjectConv2d(torch::nn::Conv2dOptions(4, 4, 3).groups(2));
      }) ==
      "styleinject::StyleInjectConv2d: expected groups=1 (an adapter on a "
      "grouped convolution is not supported; keep torch::nn::Conv2d there), "
      "but got groups=2");
  CHECK(
      error_of([] {
        StyleInjectConv2d(
            torch::nn::Conv2d(
                torch::nn::Conv2dOptions(4, 4, 3).padding(1).padding_mode(
                    torch::kReflect)),
            StyleInjectOptions(2));
      }) ==
      "styleinject::StyleInjectConv2d: expected padding_mode kZeros (other "
      "padding modes are not supported; keep torch::nn::Conv2d there), but "
      "got kReflect");
  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(4, 4, 3), StyleInjectOptions(2));
  CHECK(
      error_of([&] {
        layer(torch::randn({2, 3, 8, 8}));
      }) ==
      "styleinject::StyleInjectConv2d: expected input of shape (N, "
      "in_channels, H, W) with in_channels=4, but got input of shape [2, 3, "
      "8, 8]");
  CHECK(
      error_of([&] {
        layer(torch::randn({4, 8, 8}));
      }) ==
      "styleinject::StyleInjectConv2d: expected input of shape (N, "
      "in_channels, H, W) with in_channels=4, but got input of shape [4, 8, "
      "8]");
  CHECK(
      error_of([&] {
        SF::style_inject_conv2d(
            torch::randn({1, 4, 8, 8}),
            layer->weight,
            {layer->lora_A, layer->lora_B.flatten(1), {}, {}, {}});
      }) ==
      "styleinject::StyleInjectConv2d: expected weight (C_out, C_in, kH, kW), "
      "lora_A (n, r, C_in, kH, kW) and lora_B (C_out, r, 1, 1), but got "
      "weight [4, 4, 3, 3], lora_A [4, 2, 4, 3, 3], lora_B [4, 2]");
}

TEST_CASE("Conv2d pretty_print is one line", "[conv2d]") {
  std::ostringstream with, without;
  StyleInjectConv2d(
      torch::nn::Conv2dOptions(320, 640, 3).stride(2), StyleInjectOptions(4))
      ->pretty_print(with);
  StyleInjectConv2d(3, 8, 1)->pretty_print(without);
  CHECK(
      with.str() ==
      "styleinject::StyleInjectConv2d(in_channels=320, out_channels=640, "
      "kernel_size=[3, 3], stride=[2, 2], rank=4, branches=4, alpha=4, "
      "router=true, gate=scale)");
  CHECK(
      without.str() ==
      "styleinject::StyleInjectConv2d(in_channels=3, out_channels=8, "
      "kernel_size=[1, 1], stride=[1, 1])");
}

TEST_CASE("Conv2d clone() gives an independent copy", "[conv2d]") {
  torch::manual_seed(35);
  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(3, 4, 3), StyleInjectOptions(2));
  randomize_adapter(*layer);
  auto copy = std::dynamic_pointer_cast<styleinject::StyleInjectConv2dImpl>(
      layer->clone());
  REQUIRE(copy);
  const auto x = torch::randn({2, 3, 6, 6});
  CHECK(torch::equal(copy->forward(x), layer(x)));
  {
    torch::NoGradGuard no_grad;
    copy->lora_B.add_(1.0);
  }
  CHECK_FALSE(torch::equal(copy->forward(x), layer(x)));
}

TEST_CASE(
    "Conv2d's router, statistics, mixing and gate run on the meta device",
    "[conv2d][meta]") {
  // LibTorch 1.13 has no meta kernel for convolution, so the convolutions
  // are proven on the CPU (parity above) and on CUDA (the [cuda] test);
  // everything around them runs here, where a host read would fail.
  const auto meta = [](std::vector<int64_t> sizes) {
    return torch::empty(sizes, torch::TensorOptions().device(torch::kMeta))
        .requires_grad_();
  };
  const int64_t n = 3, r = 2, c_in = 4, c_out = 5;
  SF::AdapterTensors adapter{
      meta({n, r, c_in, 3, 3}),
      meta({c_out, r, 1, 1}),
      meta({n, c_in}),
      meta({n}),
      meta({n, c_out})};
  const auto x = meta({2, c_in, 8, 8}).requires_grad_(false);
  const auto s = SF::conv2d_style_weights(x, adapter);
  CHECK(s.is_meta());
  CHECK(s.sizes() == torch::IntArrayRef({2, n}));
  const auto mixed = styleinject::detail::mix_branches(s, adapter.lora_A);
  CHECK(mixed.sizes() == torch::IntArrayRef({2, r, c_in, 3, 3}));
  const auto g = styleinject::detail::gate_factor(s, adapter.gate, 0.5);
  const auto u = meta({2, c_out, 6, 6});
  const auto h =
      styleinject::detail::variance_gate(u, g.view({2, -1, 1, 1}), {2, 3});
  CHECK(h.is_meta());
  CHECK(h.sizes() == u.sizes());
  (h.sum() + mixed.sum()).backward();
  for (const auto& t :
       {adapter.lora_A,
        adapter.router_weight,
        adapter.router_bias,
        adapter.gate}) {
    REQUIRE(t.grad().defined());
    CHECK(t.grad().is_meta());
  }
}

TEST_CASE(
    "Conv2d takes an empty batch, as torch::nn::Conv2d does",
    "[conv2d]") {
  torch::manual_seed(38);
  const auto path =
      GENERATE(ComputePath::kAuto, ComputePath::kMerged, ComputePath::kStacked);
  CAPTURE(static_cast<int>(path));
  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(3, 4, 3).padding(1),
      StyleInjectOptions(2).branches(3).path(path));
  randomize_adapter(*layer);
  const auto x = torch::randn({0, 3, 5, 5}).requires_grad_();
  const auto y = layer(x);
  CHECK(y.sizes() == torch::IntArrayRef({0, 4, 5, 5}));
  y.sum().backward();
  for (const auto& p : layer->adapter_parameters()) {
    if (p.grad().defined()) {
      CHECK(torch::isfinite(p.grad()).all().item<bool>());
    }
  }
}

TEST_CASE("Conv2d: remove_adapter removes a LoRA adapter whole", "[conv2d]") {
  StyleInjectConv2d layer(3, 4, 3);
  layer->add_adapter(StyleInjectOptions::lora(2));
  layer->remove_adapter();
  CHECK_FALSE(layer->has_adapter());
  CHECK(
      layer->named_parameters().keys() ==
      std::vector<std::string>{"weight", "bias"});
}

TEST_CASE(
    "Conv2d: second derivatives equal autograd through SPEC's formula",
    "[conv2d]") {
  torch::manual_seed(39);
  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(3, 4, 3).stride(2).padding(1),
      StyleInjectOptions(2).branches(3));
  layer->to(torch::kDouble);
  randomize_adapter(*layer);
  const auto x = torch::randn({2, 3, 6, 5}, torch::kDouble).requires_grad_();
  const auto weights = torch::randn({2, 4, 3, 3}, torch::kDouble);
  auto inputs = layer->adapter_parameters();
  inputs.push_back(x);
  const auto second = [&](const torch::Tensor& out) {
    return styleinject_test::penalty_gradients(out, x, weights, inputs);
  };
  const auto got = second(layer(x));
  const auto expected = second(styleinject_test::plain_conv2d(
      reference_of(*layer), ConvGeometry{2, 1, 1}, x));
  for (size_t i = 0; i < inputs.size(); ++i) {
    CAPTURE(i);
    REQUIRE(got[i].defined());
    CHECK(torch::allclose(got[i], expected[i], 1e-9, 1e-9));
  }
}

TEST_CASE(
    "Conv2d: an adapter in float32 on a bfloat16 base",
    "[conv2d][dtype]") {
  torch::manual_seed(40);
  const bool autocast = GENERATE(false, true);
  CAPTURE(autocast);
  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(3, 4, 3).padding(1),
      StyleInjectOptions(2).branches(3).dtype(torch::kFloat));
  layer->to(torch::kBFloat16);
  randomize_adapter(*layer);
  const auto x = torch::randn({2, 3, 6, 6}).to(torch::kBFloat16);
  const auto out =
      styleinject_test::with_cpu_autocast(autocast, [&] { return layer(x); });
  CHECK(out.scalar_type() == torch::kBFloat16);
  const auto reference =
      reference_conv2d_forward(reference_of(*layer), ConvGeometry{1, 1, 1}, x);
  CHECK(styleinject_test::near_reference(out, reference, 0.02));
  // The gradients against autograd through SPEC's formula in float64, on
  // the same (bfloat16 and float32) values.
  const auto weights = torch::randn(out.sizes(), torch::kDouble);
  (out.to(torch::kDouble) * weights).sum().backward();
  auto p64 = reference_of(*layer);
  std::vector<torch::Tensor> leaves;
  for (auto* t :
       {&p64.lora_A,
        &p64.lora_B,
        &p64.gate,
        &p64.router_weight,
        &p64.router_bias}) {
    *t = t->detach().to(torch::kDouble).requires_grad_();
    leaves.push_back(*t);
  }
  p64.weight = p64.weight.detach().to(torch::kDouble);
  p64.bias = p64.bias.detach().to(torch::kDouble);
  const auto expected = torch::autograd::grad(
      {(styleinject_test::plain_conv2d(
            p64, ConvGeometry{1, 1, 1}, x.to(torch::kDouble)) *
        weights)
           .sum()},
      leaves);
  const auto parameters = layer->adapter_parameters();
  REQUIRE(parameters.size() == expected.size());
  for (size_t i = 0; i < parameters.size(); ++i) {
    CAPTURE(i);
    REQUIRE(parameters[i].grad().defined());
    CHECK(parameters[i].grad().scalar_type() == torch::kFloat);
    CHECK(styleinject_test::near_reference(
        parameters[i].grad(), expected[i], 0.05));
  }
}

TEST_CASE(
    "WidenedConv2d keeps the narrow input and differentiates as the "
    "convolution of its wider copy does, twice",
    "[conv2d][dtype]") {
  // A float32 kernel on a bfloat16 input: the low-rank convolutions of a
  // float32 adapter on a bfloat16 base. Reference: plain autograd through
  // F::conv2d(x.to(float32), kernel), which keeps the float32 copy.
  namespace F = torch::nn::functional;
  torch::manual_seed(41);
  const int geometry = GENERATE(0, 1, 2); // strided, same padding, grouped
  const bool input_grad = GENERATE(true, false);
  CAPTURE(geometry, input_grad);
  auto conv = F::Conv2dFuncOptions().stride(2).padding(1).dilation(1);
  int64_t groups = 1;
  if (geometry == 1) {
    conv = F::Conv2dFuncOptions().padding(torch::kSame).dilation(2);
  } else if (geometry == 2) {
    groups = 2;
    conv = F::Conv2dFuncOptions().padding(1).groups(groups);
  }
  const auto x0 = torch::randn({2, 4, 7, 6}).to(torch::kBFloat16);
  const auto kernel0 = torch::randn({6, 4 / groups, 3, 3});
  const auto weights =
      torch::randn_like(F::conv2d(x0.to(torch::kFloat), kernel0, conv));
  const auto run = [&](bool widened) {
    const auto x = x0.clone().requires_grad_(input_grad);
    const auto kernel = kernel0.clone().requires_grad_();
    const auto z = widened
        ? styleinject::detail::widened_conv2d(x, kernel, conv)
        : F::conv2d(x.to(torch::kFloat), kernel, conv);
    // What WidenedConv2d keeps: the input in its own dtype, and the kernel.
    using Node = torch::autograd::CppNode<styleinject::detail::WidenedConv2d>;
    if (const auto* node = dynamic_cast<Node*>(z.grad_fn().get())) {
      const auto saved = node->ctx_.get_saved_variables();
      CHECK(saved[0].scalar_type() == torch::kBFloat16);
      CHECK(saved[1].scalar_type() == torch::kFloat);
    } else {
      CHECK_FALSE(widened);
    }
    std::vector<torch::Tensor> inputs{kernel};
    if (input_grad) {
      inputs.push_back(x);
    }
    // The first derivatives, then those of a penalty on them.
    auto grads = torch::autograd::grad(
        {(z * weights).sum()},
        inputs,
        {},
        /*retain_graph=*/true,
        /*create_graph=*/true);
    auto penalty = z.pow(2).sum();
    for (const auto& g : grads) {
      penalty = penalty + g.to(torch::kFloat).pow(2).sum();
    }
    for (const auto& g : torch::autograd::grad({penalty}, inputs)) {
      grads.push_back(g);
    }
    grads.insert(grads.begin(), z.detach());
    return grads;
  };
  const auto got = run(true);
  const auto expected = run(false);
  REQUIRE(got.size() == expected.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i].scalar_type() == expected[i].scalar_type());
    // x's second derivative is bfloat16, where the two round in another
    // order: within one bfloat16 step of its largest magnitude.
    const double tolerance =
        got[i].scalar_type() == torch::kBFloat16 ? 1.0 / 128 : 1e-5;
    const auto a = got[i].to(torch::kDouble),
               b = expected[i].to(torch::kDouble);
    CHECK(
        (a - b).abs().max().item<double>() <=
        tolerance * b.abs().max().item<double>());
  }
}

TEST_CASE(
    "Conv2d on CUDA: same numbers as on the CPU, no host synchronisation",
    "[.cuda]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(36);
  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(8, 16, 3).padding(1), StyleInjectOptions(4));
  randomize_adapter(*layer);
  const auto x = torch::randn({4, 8, 16, 16});
  const auto on_cpu = layer(x);
  auto on_gpu = std::dynamic_pointer_cast<styleinject::StyleInjectConv2dImpl>(
      layer->clone(torch::kCUDA));
  const auto x_gpu = x.to(torch::kCUDA);
  CHECK(torch::allclose(on_gpu->forward(x_gpu).cpu(), on_cpu, 1e-3, 1e-3));
#ifdef STYLEINJECT_TEST_CUDA_SYNC_DEBUG
  c10::cuda::warning_state().set_sync_debug_mode(
      c10::cuda::SyncDebugMode::L_ERROR);
#endif
  for (const auto path : {ComputePath::kMerged, ComputePath::kStacked}) {
    on_gpu->adapter_options->path(path);
    on_gpu->forward(x_gpu).pow(2).sum().backward();
  }
#ifdef STYLEINJECT_TEST_CUDA_SYNC_DEBUG
  c10::cuda::warning_state().set_sync_debug_mode(
      c10::cuda::SyncDebugMode::L_DISABLED);
#endif
  for (const auto& p : on_gpu->adapter_parameters()) {
    REQUIRE(p.grad().defined());
    CHECK(p.grad().is_cuda());
  }
}

TEST_CASE(
    "adapter_shapes names the parameters an adapter registers",
    "[conv2d][linear]") {
  // load_adapters validates files against adapter_shapes before anything is
  // attached, so it must agree with what add_adapter registers.
  const bool router = GENERATE(true, false);
  const bool gate = GENERATE(true, false);
  const auto options =
      StyleInjectOptions(3).branches(2).router(router).gate(gate);
  const auto check = [&](const auto& layer, const auto& base_options) {
    using Layer = std::decay_t<decltype(*layer)>;
    std::map<std::string, std::vector<int64_t>> registered, predicted;
    for (const auto& p : layer->named_parameters()) {
      if (p.key() != "weight" && p.key() != "bias") {
        registered[p.key()] = p.value().sizes().vec();
      }
    }
    for (const auto& shape : Layer::adapter_shapes(base_options, options)) {
      predicted[shape.first] = shape.second;
    }
    CHECK(registered == predicted);
  };
  const auto conv = torch::nn::Conv2dOptions(4, 5, 3);
  check(StyleInjectConv2d(conv, options), conv);
  const auto linear = torch::nn::LinearOptions(4, 5);
  check(styleinject::StyleInjectLinear(linear, options), linear);
}
