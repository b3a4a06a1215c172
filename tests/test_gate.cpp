// SPEC §3b's gate variants (StyleInjectOptions::gate): parity with the naive
// float64 reference for Linear and Conv2d, gradients against finite
// differences of that reference, identity at initialisation, and how a
// variant shows in parameters, printing and adapter files.

#include "support.h"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <sstream>

namespace SF = styleinject::functional;
using styleinject::GateMode;
using styleinject_test::adapter_of;
using styleinject_test::close64;
using styleinject_test::ConvGeometry;
using styleinject_test::error_of;
using styleinject_test::options_of;
using styleinject_test::reference_conv2d_forward;
using styleinject_test::reference_forward;
using styleinject_test::ReferenceLinear;

namespace {

using styleinject_test::kBranches;
using styleinject_test::kIn;
using styleinject_test::kOut;
using styleinject_test::kRank;

/// Random float64 tensors of one adapter in the Linear layout (Conv2d's
/// when `kernel` > 0), with the gate tensor only for kScale.
ReferenceLinear random_adapter(GateMode mode, bool router, int64_t kernel = 0) {
  const auto f64 = torch::kDouble;
  ReferenceLinear p;
  if (kernel > 0) {
    p.weight = torch::randn({kOut, kIn, kernel, kernel}, f64);
    p.lora_A = torch::randn({kBranches, kRank, kIn, kernel, kernel}, f64);
    p.lora_B = torch::randn({kOut, kRank, 1, 1}, f64);
  } else {
    p.weight = torch::randn({kOut, kIn}, f64);
    p.lora_A = torch::randn({kBranches, kRank, kIn}, f64);
    p.lora_B = torch::randn({kOut, kRank}, f64);
  }
  p.bias = torch::randn({kOut}, f64);
  if (router) {
    p.router_weight = torch::randn({kBranches, kIn}, f64);
    p.router_bias = torch::randn({kBranches}, f64);
  }
  if (mode == GateMode::kScale) {
    p.gate = torch::randn({kBranches, kOut}, f64);
  }
  p.gate_mode = mode;
  p.scaling = 1.5;
  p.scale = 0.7;
  return p;
}

const auto kModes = {
    GateMode::kOff,
    GateMode::kScale,
    GateMode::kAdain,
    GateMode::kResidual};

} // namespace

TEST_CASE("every gate variant matches the float64 reference", "[gate]") {
  torch::manual_seed(11);
  const auto mode = GENERATE(values(kModes));
  const bool router = GENERATE(true, false);
  CAPTURE(styleinject::gate_mode_name(mode), router);
  const auto p = random_adapter(mode, router);

  SECTION("Linear, every compute path, with and without a token axis") {
    const auto path = GENERATE(
        styleinject::ComputePath::kAuto,
        styleinject::ComputePath::kMerged,
        styleinject::ComputePath::kStacked,
        styleinject::ComputePath::kMergedWeight);
    CAPTURE(static_cast<int>(path));
    const auto x = torch::randn({3, 6, kIn}, torch::kDouble) + 0.5;
    const auto out = SF::style_inject_linear(
        x, p.weight, p.bias, adapter_of(p), options_of(p).path(path));
    CHECK(close64(out, reference_forward(p, x, /*has_tokens=*/true)));
    // No token axis: no statistic to take, every gate is off.
    const auto rows = x.select(1, 0);
    const auto flat = SF::style_inject_linear(
        rows, p.weight, p.bias, adapter_of(p), options_of(p).path(path));
    CHECK(close64(
        flat,
        reference_forward(p, rows.unsqueeze(1), /*has_tokens=*/false)
            .squeeze(1)));
  }
  SECTION("Conv2d, strided and padded") {
    auto conv = random_adapter(mode, router, /*kernel=*/3);
    const auto x = torch::randn({2, kIn, 7, 6}, torch::kDouble);
    const auto out = SF::style_inject_conv2d(
        x,
        conv.weight,
        adapter_of(conv),
        torch::nn::functional::Conv2dFuncOptions()
            .bias(conv.bias)
            .stride(2)
            .padding(1),
        options_of(conv));
    CHECK(close64(out, reference_conv2d_forward(conv, ConvGeometry{2, 1}, x)));
  }
}

TEST_CASE(
    "every gate variant's gradients match finite differences of the "
    "reference",
    "[gate]") {
  torch::manual_seed(12);
  const auto mode = GENERATE(values(kModes));
  CAPTURE(styleinject::gate_mode_name(mode));
  auto p = random_adapter(mode, /*router=*/true);
  const auto x = torch::randn({2, 5, kIn}, torch::kDouble);
  const auto weights = torch::randn({2, 5, kOut}, torch::kDouble);
  const auto loss = [&](const ReferenceLinear& q) {
    return (reference_forward(q, x, true) * weights).sum().item<double>();
  };
  auto trained = p;
  trained.lora_A = p.lora_A.clone().requires_grad_();
  trained.lora_B = p.lora_B.clone().requires_grad_();
  trained.router_weight = p.router_weight.clone().requires_grad_();
  (SF::style_inject_linear(
       x, p.weight, p.bias, adapter_of(trained), options_of(p)) *
   weights)
      .sum()
      .backward();
  for (auto* tensor :
       {&trained.lora_A, &trained.lora_B, &trained.router_weight}) {
    const auto grad = tensor->grad().flatten();
    for (int64_t k = 0; k < grad.numel(); k += 3) {
      auto plus = p, minus = p;
      for (auto* q : {&plus, &minus}) {
        q->lora_A = trained.lora_A.detach().clone();
        q->lora_B = trained.lora_B.detach().clone();
        q->router_weight = trained.router_weight.detach().clone();
      }
      const auto member = [&](ReferenceLinear& q) -> torch::Tensor& {
        return tensor == &trained.lora_A ? q.lora_A
            : tensor == &trained.lora_B  ? q.lora_B
                                         : q.router_weight;
      };
      const double h = 1e-6;
      member(plus).view(-1)[k] += h;
      member(minus).view(-1)[k] -= h;
      const double numeric = (loss(plus) - loss(minus)) / (2 * h);
      CHECK(
          grad[k].item<double>() == Approx(numeric).epsilon(1e-5).margin(1e-7));
    }
  }
}

TEST_CASE(
    "a parameter-free gate has finite gradients on constant channels",
    "[gate]") {
  const auto mode = GENERATE(GateMode::kAdain, GateMode::kResidual);
  CAPTURE(styleinject::gate_mode_name(mode));
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    styleinject::StyleInjectLinear layer(
        torch::nn::Linear(kIn, kOut),
        styleinject::StyleInjectOptions(kRank).gate(mode));
    layer->to(dtype);
    styleinject_test::randomize_adapter(*layer);
    // One token: every channel is constant over the tokens.
    const auto x = torch::randn({3, 1, kIn}, dtype);
    layer(x).pow(2).sum().backward();
    for (const auto& parameter : layer->adapter_parameters()) {
      CHECK(torch::isfinite(parameter.grad()).all().item<bool>());
    }
  }
}

TEST_CASE(
    "gate=adain keeps float32's precision on channels of a large mean",
    "[gate]") {
  // Channels of mean 1e4 and spread about 10: the variance as E[h²] −
  // E[h]² would lose about 3 of float32's 7 digits; centred first it keeps
  // them.
  torch::manual_seed(14);
  auto p = random_adapter(GateMode::kAdain, /*router=*/true);
  p.bias = torch::full({kOut}, 1e4, torch::kDouble);
  for (auto* t :
       {&p.weight,
        &p.bias,
        &p.lora_A,
        &p.lora_B,
        &p.router_weight,
        &p.router_bias}) {
    *t = t->to(torch::kFloat).to(torch::kDouble); // what float32 holds
  }
  const auto x = torch::randn({3, 64, kIn}).to(torch::kDouble);
  const auto out = SF::style_inject_linear(
      x.to(torch::kFloat),
      p.weight.to(torch::kFloat),
      p.bias.to(torch::kFloat),
      adapter_of(p, torch::kFloat),
      options_of(p));
  const auto reference = reference_forward(p, x, /*has_tokens=*/true);
  // float32's spacing near 1e4 is about 1e-3: within 20 of it.
  CHECK((out.to(torch::kDouble) - reference).abs().max().item<double>() < 2e-2);
}

TEST_CASE("every gate variant starts as the identity", "[gate]") {
  torch::manual_seed(13);
  const auto mode = GENERATE(values(kModes));
  CAPTURE(styleinject::gate_mode_name(mode));
  const auto options = styleinject::StyleInjectOptions(kRank).gate(mode);
  torch::nn::Linear base_linear(kIn, kOut);
  styleinject::StyleInjectLinear linear(base_linear, options);
  const auto x = torch::randn({2, 6, kIn});
  CHECK(torch::allclose(linear(x), base_linear(x), 1e-6, 1e-6));
  torch::nn::Conv2d base_conv(
      torch::nn::Conv2dOptions(kIn, kOut, 3).padding(1));
  styleinject::StyleInjectConv2d conv(base_conv, options);
  const auto image = torch::randn({2, kIn, 5, 5});
  CHECK(torch::allclose(conv(image), base_conv(image), 1e-6, 1e-6));
}

TEST_CASE("a gate variant's parameters, printing and files", "[gate]") {
  const auto options =
      styleinject::StyleInjectOptions(kRank).branches(kBranches).gate(
          GateMode::kAdain);
  styleinject::StyleInjectLinear layer(torch::nn::Linear(kIn, kOut), options);

  // No gate tensor: only kScale has parameters.
  CHECK_FALSE(layer->named_parameters().contains("gate"));
  int64_t count = 0;
  for (const auto& parameter : layer->adapter_parameters()) {
    count += parameter.numel();
  }
  CHECK(
      count ==
      kBranches * kRank * kIn + kRank * kOut + kBranches * kIn + kBranches);
  std::ostringstream printed;
  layer->pretty_print(printed);
  CHECK_THAT(printed.str(), Catch::Contains("gate=adain"));
  CHECK(
      styleinject::StyleInjectOptions(1).gate(true).gate() == GateMode::kScale);
  CHECK(
      styleinject::StyleInjectOptions(1).gate(false).gate() == GateMode::kOff);

  // The functional refuses a gate tensor that the mode does not use.
  torch::nn::Linear base(kIn, kOut);
  const auto x = torch::randn({2, 3, kIn});
  const SF::AdapterTensors with_gate{
      torch::randn({kBranches, kRank, kIn}),
      torch::randn({kOut, kRank}),
      {},
      {},
      torch::randn({kBranches, kOut})};
  CHECK_THAT(
      error_of([&] {
        SF::style_inject_linear(
            x,
            base->weight,
            base->bias,
            with_gate,
            SF::StyleInjectFuncOptions().gate(GateMode::kResidual));
      }),
      Catch::Contains("only GateMode::kScale uses") &&
          Catch::Contains("residual"));

  // A file records the variant; it loads into a fresh layer with it, and a
  // layer with another gate refuses the file, unchanged.
  styleinject_test::randomize_adapter(*layer);
  torch::nn::Sequential trained(layer);
  const auto path =
      (std::filesystem::temp_directory_path() /
       ("gate_variant_" + std::to_string(::getpid()) + ".safetensors"))
          .string();
  styleinject::save_adapters(*trained, path);
  styleinject::StyleInjectLinear fresh(kIn, kOut);
  fresh->weight.data().copy_(layer->weight);
  fresh->bias.data().copy_(layer->bias);
  torch::nn::Sequential loaded(fresh);
  styleinject::load_adapters(*loaded, path);
  REQUIRE(fresh->adapter_options.has_value());
  CHECK(fresh->adapter_options->gate() == GateMode::kAdain);
  CHECK(torch::equal(fresh(x), layer(x)));
  styleinject::StyleInjectLinear scale_gate(
      torch::nn::Linear(kIn, kOut),
      styleinject::StyleInjectOptions(kRank).branches(kBranches));
  torch::nn::Sequential other(scale_gate);
  const auto before = scale_gate->lora_A.clone();
  CHECK_THAT(
      error_of([&] { styleinject::load_adapters(*other, path); }),
      Catch::Contains("other options than the file's") &&
          Catch::Contains("\"gate\":\"adain\""));
  CHECK(torch::equal(scale_gate->lora_A, before));
  std::filesystem::remove(path);
}
