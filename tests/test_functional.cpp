// styleinject::functional: parity with the naive float64 reference of SPEC,
// every compute path's values and gradients, dtypes, autocast, the meta
// device.

#include "support.h"

#include <catch2/catch.hpp>

namespace SF = styleinject::functional;
using styleinject::ComputePath;
using styleinject_test::adapter_of;
using styleinject_test::close64;
using styleinject_test::CpuAutocast;
using styleinject_test::error_of;
using styleinject_test::near_reference;
using styleinject_test::options_of;
using styleinject_test::reference_forward;
using styleinject_test::ReferenceLinear;

namespace {

using styleinject_test::kBranches;
using styleinject_test::kIn;
using styleinject_test::kOut;
using styleinject_test::kRank;

/// Random float64 tensors for one layer; router and gate as asked.
ReferenceLinear random_layer(bool router, bool gate) {
  const auto f64 = torch::kDouble;
  ReferenceLinear p;
  p.weight = torch::randn({kOut, kIn}, f64);
  p.bias = torch::randn({kOut}, f64);
  p.lora_A = torch::randn({kBranches, kRank, kIn}, f64);
  p.lora_B = torch::randn({kOut, kRank}, f64);
  if (router) {
    p.router_weight = torch::randn({kBranches, kIn}, f64);
    p.router_bias = torch::randn({kBranches}, f64);
  }
  if (gate) {
    p.gate = torch::randn({kBranches, kOut}, f64);
  }
  return p;
}

/// The reference on an input of any supported rank, shaped like the output.
torch::Tensor reference_any_rank(
    const ReferenceLinear& p,
    const torch::Tensor& input) {
  const bool has_tokens = input.dim() >= 3;
  const auto x = has_tokens ? input.reshape({-1, input.size(-2), kIn})
                            : input.reshape({-1, 1, kIn});
  auto sizes = input.sizes().vec();
  sizes.back() = kOut;
  return reference_forward(p, x, has_tokens).reshape(sizes);
}

} // namespace

TEST_CASE("style_inject_linear matches the naive reference", "[functional]") {
  torch::manual_seed(1);
  const bool router = GENERATE(true, false);
  const bool gate = GENERATE(true, false);
  const double temperature = GENERATE(1.0, 0.3);
  const bool rslora = GENERATE(false, true);
  const int style_kind = GENERATE(0, 1, 2); // none, shared (n), per (N, n)
  const auto path = GENERATE(
      ComputePath::kAuto,
      ComputePath::kMerged,
      ComputePath::kStacked,
      ComputePath::kMergedWeight);
  const auto input_sizes = GENERATE(
      std::vector<int64_t>{6, kIn},
      std::vector<int64_t>{3, 7, kIn},
      std::vector<int64_t>{2, 3, 4, kIn});
  CAPTURE(router, gate, temperature, rslora, style_kind, input_sizes);
  CAPTURE(static_cast<int>(path));

  auto p = random_layer(router, gate);
  p.temperature = temperature;
  p.scaling = styleinject::StyleInjectOptions(kRank)
                  .alpha(3.0)
                  .rslora(rslora)
                  .scaling();
  p.scale = 0.7;
  const auto input = torch::randn(input_sizes, torch::kDouble) + 0.5;
  const int64_t instances = input.dim() == 2
      ? input.size(0)
      : input.numel() / input.size(-1) / input.size(-2);
  if (style_kind == 1) {
    p.style = torch::rand({kBranches}, torch::kDouble);
  } else if (style_kind == 2) {
    p.style = torch::rand({instances, kBranches}, torch::kDouble);
  }

  const auto out = SF::style_inject_linear(
      input, p.weight, p.bias, adapter_of(p), options_of(p).path(path));
  CHECK(out.scalar_type() == torch::kDouble);
  CHECK(close64(out, reference_any_rank(p, input)));
}

TEST_CASE("the compute paths give the same numbers", "[functional]") {
  torch::manual_seed(2);
  const int64_t in = 64, out = 48, branches = 4, rank = 8;
  const auto tokens = GENERATE(int64_t{1}, int64_t{2}, int64_t{33});
  const bool shared_style = GENERATE(false, true);
  // Each against the stacked path, which autograd composes.
  const auto path = GENERATE(ComputePath::kMerged, ComputePath::kMergedWeight);
  CAPTURE(tokens, shared_style, static_cast<int>(path));
  // float64: the paths' math is compared, not float32's rounding.
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const auto weight = torch::randn({out, in}, f64) / 8;
  const auto bias = torch::randn({out}, f64);
  SF::AdapterTensors adapter{
      torch::randn({branches, rank, in}, f64) / 8,
      torch::randn({out, rank}, f64),
      torch::randn({branches, in}, f64),
      torch::randn({branches}, f64),
      torch::randn({branches, out}, f64)};
  auto options = SF::StyleInjectFuncOptions().scaling(0.5);
  if (shared_style) {
    options.style(torch::softmax(torch::randn({branches}, f64), 0));
  }
  const auto x = torch::randn({5, tokens, in}, f64);
  const auto merged = SF::style_inject_linear(
      x, weight, bias, adapter, SF::StyleInjectFuncOptions(options).path(path));
  const auto stacked = SF::style_inject_linear(
      x,
      weight,
      bias,
      adapter,
      SF::StyleInjectFuncOptions(options).path(ComputePath::kStacked));
  CHECK(close64(merged, stacked));

  // And the gradients of every adapter tensor agree too.
  std::vector<torch::Tensor> grads[2];
  for (int i = 0; i < 2; ++i) {
    SF::AdapterTensors leaves{
        adapter.lora_A.clone().requires_grad_(),
        adapter.lora_B.clone().requires_grad_(),
        adapter.router_weight.clone().requires_grad_(),
        adapter.router_bias.clone().requires_grad_(),
        adapter.gate.clone().requires_grad_()};
    SF::style_inject_linear(
        x,
        weight,
        bias,
        leaves,
        SF::StyleInjectFuncOptions(options).path(
            i == 0 ? path : ComputePath::kStacked))
        .pow(2)
        .sum()
        .backward();
    for (const auto& t :
         {leaves.lora_A,
          leaves.lora_B,
          leaves.router_weight,
          leaves.router_bias,
          leaves.gate}) {
      grads[i].push_back(t.grad());
    }
  }
  for (size_t k = 0; k < grads[0].size(); ++k) {
    CAPTURE(k);
    // With a fixed style the router is unused and gets no gradient.
    REQUIRE(grads[0][k].defined() == (k < 2 || k == 4 || !shared_style));
    REQUIRE(grads[1][k].defined() == grads[0][k].defined());
    if (grads[0][k].defined()) {
      CHECK(close64(grads[0][k], grads[1][k]));
    }
  }
}

TEST_CASE(
    "every compute path's gradients equal autograd through SPEC's formula",
    "[functional]") {
  // The fused paths write their backward out by hand (one autograd node);
  // the reference is plain autograd on SPEC's formula, in float64.
  torch::manual_seed(4);
  const auto path = GENERATE(
      ComputePath::kAuto,
      ComputePath::kMerged,
      ComputePath::kStacked,
      ComputePath::kMergedWeight);
  const int routing = GENERATE(0, 1, 2); // router, fixed (n) style, off
  const bool gate = GENERATE(true, false);
  const bool bias = GENERATE(true, false);
  CAPTURE(static_cast<int>(path), routing, gate, bias);
  auto p = random_layer(/*router=*/routing == 0, gate);
  if (!bias) {
    p.bias = torch::Tensor();
  }
  if (routing == 1) {
    p.style = torch::softmax(torch::randn({kBranches}, torch::kDouble), 0);
  }
  p.scaling = 0.5;
  p.scale = 0.8;
  p.temperature = 0.7;
  const auto x = torch::randn({3, 6, kIn}, torch::kDouble) + 0.5;
  const auto weights = torch::randn({3, 6, kOut}, torch::kDouble);
  // Leaves of the same values for each side, and their gradients.
  const auto gradients = [&](bool reference) {
    auto q = p;
    std::vector<torch::Tensor> leaves;
    for (auto* t :
         {&q.lora_A, &q.lora_B, &q.router_weight, &q.router_bias, &q.gate}) {
      if (t->defined()) {
        *t = t->clone().requires_grad_();
        leaves.push_back(*t);
      }
    }
    const auto input = x.clone().requires_grad_();
    leaves.push_back(input);
    const auto out = reference
        ? styleinject_test::plain_linear(q, input)
        : SF::style_inject_linear(
              input, q.weight, q.bias, adapter_of(q), options_of(q).path(path));
    return torch::autograd::grad({(out * weights).sum()}, leaves);
  };
  const auto got = gradients(false);
  const auto expected = gradients(true);
  REQUIRE(got.size() == expected.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(torch::allclose(got[i], expected[i], 1e-10, 1e-10));
  }
}

TEST_CASE("a frozen float layer runs as one autograd node", "[functional]") {
  // The fast path must not fall back silently: with a frozen base, one
  // dtype and no dropout, the layer is one node; elsewhere it composes.
  torch::manual_seed(5);
  auto p = random_layer(/*router=*/true, /*gate=*/true);
  auto adapter = adapter_of(p, torch::kFloat);
  for (auto* t : {&adapter.lora_A, &adapter.lora_B, &adapter.gate}) {
    t->requires_grad_();
  }
  const auto x = torch::randn({2, 6, kIn});
  const auto weight = p.weight.to(torch::kFloat);
  const auto bias = p.bias.to(torch::kFloat);
  const auto node = [&](const SF::StyleInjectFuncOptions& options,
                        const torch::Tensor& w) {
    return SF::style_inject_linear(x, w, bias, adapter, options)
        .grad_fn()
        ->name();
  };
  CHECK_THAT(node({}, weight), Catch::Matchers::Contains("FusedLinear"));
  CHECK_THAT(
      node(
          SF::StyleInjectFuncOptions().path(ComputePath::kMergedWeight),
          weight),
      Catch::Matchers::Contains("FusedLinear"));
  // A base that trains, dropout in training, the stacked path: composed.
  CHECK_THAT(
      node({}, weight.clone().requires_grad_()),
      !Catch::Matchers::Contains("FusedLinear"));
  CHECK_THAT(
      node(SF::StyleInjectFuncOptions().dropout(0.1).training(true), weight),
      !Catch::Matchers::Contains("FusedLinear"));
  CHECK_THAT(
      node(SF::StyleInjectFuncOptions().path(ComputePath::kStacked), weight),
      !Catch::Matchers::Contains("FusedLinear"));
}

TEST_CASE(
    "RecomputeGate: the same gradients, nothing of the output's size kept",
    "[functional]") {
  const bool router = GENERATE(false, true);
  const auto path = GENERATE(ComputePath::kAuto, ComputePath::kMergedWeight);
  CAPTURE(router, path);
  torch::manual_seed(7);
  auto p = random_layer(router, /*gate=*/true);
  const auto x0 = torch::randn({2, 6, kIn}, torch::kDouble);
  const auto options = SF::StyleInjectFuncOptions().path(path);
  // One forward and backward: the gradients, and the sizes of what the
  // fused node kept for backward.
  const auto run = [&](bool recompute) {
    auto adapter = adapter_of(p);
    for (auto* t :
         {&adapter.lora_A,
          &adapter.lora_B,
          &adapter.router_weight,
          &adapter.gate}) {
      if (t->defined()) {
        t->requires_grad_();
      }
    }
    const auto x = x0.clone().requires_grad_();
    torch::Tensor out;
    {
      c10::optional<styleinject::RecomputeGate> guard;
      if (recompute) {
        guard.emplace();
      }
      out = SF::style_inject_linear(x, p.weight, p.bias, adapter, options);
    }
    auto* node = dynamic_cast<
        torch::autograd::CppNode<styleinject::detail::FusedLinear>*>(
        out.grad_fn().get());
    REQUIRE(node != nullptr);
    int64_t output_sized = 0;
    for (const auto& t : node->ctx_.get_saved_variables()) {
      output_sized += t.defined() && t.sizes() == out.sizes() ? 1 : 0;
    }
    out.backward(torch::cos(out.detach() * 3)); // a gradient of no symmetry
    std::vector<torch::Tensor> grads{x.grad()};
    for (const auto& t :
         {adapter.lora_A,
          adapter.lora_B,
          adapter.router_weight,
          adapter.gate}) {
      if (t.defined()) {
        grads.push_back(t.grad());
      }
    }
    return std::make_pair(grads, output_sized);
  };
  const auto [kept, kept_count] = run(false);
  const auto [recomputed, recomputed_count] = run(true);
  CHECK(kept_count == 1); // u, for the gate's gradient
  CHECK(recomputed_count == 0);
  REQUIRE(kept.size() == recomputed.size());
  for (size_t i = 0; i < kept.size(); ++i) {
    CAPTURE(i);
    REQUIRE(recomputed[i].defined());
    CHECK(torch::allclose(recomputed[i], kept[i], 1e-12, 1e-12));
  }
  CHECK_FALSE(styleinject::detail::recompute_gate()); // ended with its scope
}

TEST_CASE(
    "a float32 adapter on a half-precision base: one node, no further from "
    "float64 than the composed path",
    "[functional][dtype]") {
  // The usual recipe (SPEC §7): the base in bfloat16 or float16, the
  // adapter in float32. The node adds the update in float32 and rounds
  // once; the reference is float64 on the same rounded values.
  // LibTorch 1.13 has no float16 matmul on the CPU.
#if TORCH_VERSION_MAJOR >= 2
  const auto half = GENERATE(torch::kBFloat16, torch::kHalf);
#else
  const auto half = GENERATE(torch::kBFloat16);
#endif
  const int routing = GENERATE(0, 1, 2); // router, fixed (N, n) style, off
  const bool gate = GENERATE(true, false);
  const bool recompute = GENERATE(false, true);
  CAPTURE(half, routing, gate, recompute);
  torch::manual_seed(12);
  auto p = random_layer(/*router=*/routing == 0, gate);
  if (routing == 1) {
    p.style = torch::softmax(torch::randn({3, kBranches}, torch::kDouble), 1);
  }
  p.scaling = 0.5;
  p.scale = 0.8;
  const auto rounded = [&](const torch::Tensor& t) {
    return t.to(half).to(torch::kDouble);
  };
  // The half-precision values, the float32 ones, and an upstream gradient
  // that the output's dtype holds exactly.
  p.weight = rounded(p.weight);
  p.bias = rounded(p.bias);
  for (auto* t :
       {&p.lora_A, &p.lora_B, &p.router_weight, &p.router_bias, &p.gate}) {
    *t = t->defined() ? t->to(torch::kFloat).to(torch::kDouble) : *t;
  }
  const auto x = rounded(torch::randn({3, 6, kIn}, torch::kDouble) + 0.5);
  const auto upstream = rounded(torch::randn({3, 6, kOut}, torch::kDouble));
  // One forward and backward of the layer in (half, float32), or of the
  // reference.
  struct Pass {
    std::vector<torch::Tensor> results; // output, x's and the adapter's grads
    std::string node; // the output's grad_fn
    std::vector<torch::ScalarType> kept; // FusedLinear's output-sized saves
  };
  const auto run = [&](bool reference, ComputePath path) {
    const auto dtype = reference ? torch::kDouble : half;
    const auto input = x.to(dtype).requires_grad_();
    auto adapter = adapter_of(p, reference ? torch::kDouble : torch::kFloat);
    std::vector<torch::Tensor> leaves{input};
    for (auto* t :
         {&adapter.lora_A,
          &adapter.lora_B,
          &adapter.router_weight,
          &adapter.router_bias,
          &adapter.gate}) {
      if (t->defined()) {
        leaves.push_back(t->requires_grad_());
      }
    }
    torch::Tensor out;
    {
      c10::optional<styleinject::RecomputeGate> guard;
      if (recompute) {
        guard.emplace();
      }
      out = reference ? styleinject_test::plain_linear(p, input)
                      : SF::style_inject_linear(
                            input,
                            p.weight.to(dtype),
                            p.bias.to(dtype),
                            adapter,
                            options_of(p).path(path));
    }
    CHECK(out.scalar_type() == dtype);
    Pass pass{{out.detach()}, out.grad_fn()->name(), {}};
    using Node = torch::autograd::CppNode<styleinject::detail::FusedLinear>;
    if (const auto* node = dynamic_cast<Node*>(out.grad_fn().get())) {
      for (const auto& t : node->ctx_.get_saved_variables()) {
        if (t.defined() && t.sizes() == out.sizes()) {
          pass.kept.push_back(t.scalar_type());
        }
      }
    }
    for (const auto& grad :
         torch::autograd::grad({out}, leaves, {upstream.to(dtype)})) {
      pass.results.push_back(grad);
    }
    return pass;
  };
  const auto expected = run(true, ComputePath::kAuto).results;
  const auto fused_pass = run(false, ComputePath::kAuto);
  const auto composed_pass = run(false, ComputePath::kStacked);
  const auto &fused = fused_pass.results, &composed = composed_pass.results;
  CHECK_THAT(fused_pass.node, Catch::Matchers::Contains("FusedLinear"));
  CHECK_THAT(composed_pass.node, !Catch::Matchers::Contains("FusedLinear"));
  // What backward keeps of the output's size: u − mean_tok(u) in the
  // base's dtype for a gate that trains, nothing under RecomputeGate.
  CHECK(
      fused_pass.kept ==
      (gate && !recompute ? std::vector<torch::ScalarType>{half}
                          : std::vector<torch::ScalarType>{}));
  // Each result's largest error, as a fraction of its largest magnitude.
  const auto error = [&](const torch::Tensor& got, size_t i) {
    return (got.to(torch::kDouble) - expected[i]).abs().max().item<double>() /
        expected[i].abs().max().item<double>();
  };
  const double unit = half == torch::kHalf ? 1.0 / 2048 : 1.0 / 256;
  REQUIRE(fused.size() == expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    CAPTURE(i, error(fused[i], i), error(composed[i], i));
    // Both paths round W0 x + b0 to the base's dtype, which the gate
    // carries on (times 1 + g, and through the token mean), and round the
    // output and x's gradient once more; the adapter's gradients, in
    // float32, carry the first rounding only.
    CHECK(error(fused[i], i) < 4 * unit);
    CHECK(error(fused[i], i) <= 1.5 * error(composed[i], i) + 1e-5);
  }
}

TEST_CASE("linear_style_weights", "[functional]") {
  torch::manual_seed(3);
  const auto p = random_layer(/*router=*/true, /*gate=*/true);
  const auto x = torch::randn({2, 3, 6, kIn}, torch::kDouble);
  const auto s = SF::linear_style_weights(x, adapter_of(p));
  REQUIRE(s.sizes() == torch::IntArrayRef{2, 3, kBranches});
  // softmax(R mean_tok(x) + c), written directly.
  const auto expected = torch::softmax(
      torch::matmul(x.mean(2), p.router_weight.t()) + p.router_bias, -1);
  CHECK(close64(s, expected));
  CHECK(close64(s.sum(-1), torch::ones({2, 3}, torch::kDouble)));

  SECTION("router off: 1/n for every instance") {
    const auto off = random_layer(/*router=*/false, /*gate=*/true);
    const auto uniform = SF::linear_style_weights(x, adapter_of(off));
    CHECK(close64(
        uniform,
        torch::full({2, 3, kBranches}, 1.0 / kBranches, torch::kDouble)));
  }
  SECTION("a fixed style replaces the router") {
    const auto style = torch::tensor({0.0, 1.0, 0.0}, torch::kDouble);
    const auto fixed = SF::linear_style_weights(
        x, adapter_of(p), SF::StyleInjectFuncOptions().style(style));
    CHECK(close64(fixed, style.expand({2, 3, kBranches})));
  }
  SECTION("an input without token axis is its own pooled vector") {
    const auto x2 = torch::randn({4, kIn}, torch::kDouble);
    const auto s2 = SF::linear_style_weights(x2, adapter_of(p));
    CHECK(close64(
        s2,
        torch::softmax(
            torch::matmul(x2, p.router_weight.t()) + p.router_bias, -1)));
  }
}

TEST_CASE(
    "dtypes: float64 and bfloat16 are kept, mismatches refused",
    "[functional]") {
  torch::manual_seed(4);
  const auto p = random_layer(/*router=*/true, /*gate=*/true);
  const auto x = torch::randn({3, 8, kIn}, torch::kDouble);
  const auto reference = reference_any_rank(p, x);

  SECTION("bfloat16 in, bfloat16 out, close to the float64 reference") {
    const auto bf = [](const torch::Tensor& t) {
      return t.to(torch::kBFloat16);
    };
    const auto out = SF::style_inject_linear(
        bf(x), bf(p.weight), bf(p.bias), adapter_of(p, torch::kBFloat16));
    CHECK(out.scalar_type() == torch::kBFloat16);
    // bfloat16 keeps 8 bits of mantissa: a few percent of the output's scale.
    CHECK(near_reference(out, reference, 0.05));
  }
  SECTION("an input whose dtype differs from the layer's is refused") {
    const auto message = error_of([&] {
      SF::style_inject_linear(
          x.to(torch::kFloat), p.weight, p.bias, adapter_of(p));
    });
    CHECK(
        message ==
        "styleinject::StyleInjectLinear: expected input of dtype Double (the "
        "layer's dtype), but got Float; convert the input with .to(), or the "
        "layer with ->to()");
    CHECK_THROWS_AS(
        SF::style_inject_linear(
            x.to(torch::kFloat), p.weight, p.bias, adapter_of(p)),
        c10::TypeError);
  }
}

TEST_CASE(
    "the functional runs on the meta device, forward and backward",
    "[functional][meta]") {
  // Meta tensors have no data: anything that reads values or makes a tensor
  // on another device fails here, which proves that the forward never copies
  // to the host.
  const bool router = GENERATE(true, false);
  const bool gate = GENERATE(true, false);
  const auto path = GENERATE(ComputePath::kMerged, ComputePath::kStacked);
  const auto input_sizes = GENERATE(
      std::vector<int64_t>{6, kIn}, std::vector<int64_t>{2, 3, 7, kIn});
  CAPTURE(router, gate, static_cast<int>(path), input_sizes);
  const auto meta = [](std::vector<int64_t> sizes) {
    return torch::empty(sizes, torch::TensorOptions().device(torch::kMeta))
        .requires_grad_();
  };
  SF::AdapterTensors adapter{
      meta({kBranches, kRank, kIn}), meta({kOut, kRank})};
  if (router) {
    adapter.router_weight = meta({kBranches, kIn});
    adapter.router_bias = meta({kBranches});
  }
  if (gate) {
    adapter.gate = meta({kBranches, kOut});
  }
  const auto weight = meta({kOut, kIn}).requires_grad_(false);
  const auto bias = meta({kOut}).requires_grad_(false);
  const auto x = meta(input_sizes).requires_grad_(false);
  const auto out = SF::style_inject_linear(
      x,
      weight,
      bias,
      adapter,
      SF::StyleInjectFuncOptions().path(path).dropout(0.1).training(true));
  CHECK(out.is_meta());
  auto expected_sizes = input_sizes;
  expected_sizes.back() = kOut;
  CHECK(out.sizes() == torch::IntArrayRef(expected_sizes));
  out.sum().backward();
  for (const auto& t :
       {adapter.lora_A,
        adapter.lora_B,
        adapter.router_weight,
        adapter.router_bias,
        adapter.gate}) {
    // Without a token axis the gate is a no-op, and gets no gradient.
    const bool used =
        t.defined() && !(t.is_same(adapter.gate) && input_sizes.size() == 2);
    if (used) {
      REQUIRE(t.grad().defined());
      CHECK(t.grad().is_meta());
      CHECK(t.grad().sizes() == t.sizes());
    }
  }
  CHECK(SF::linear_style_weights(x, adapter).is_meta());
}

TEST_CASE(
    "functional errors name what was expected and what arrived",
    "[functional]") {
  torch::manual_seed(5);
  const auto p = random_layer(/*router=*/true, /*gate=*/true);
  const auto call = [&](const torch::Tensor& x,
                        const SF::StyleInjectFuncOptions& options = {}) {
    return error_of([&] {
      SF::style_inject_linear(x, p.weight, p.bias, adapter_of(p), options);
    });
  };
  CHECK(
      call(torch::randn({2, 3, 7}, torch::kDouble)) ==
      "styleinject::StyleInjectLinear: expected input of shape (in_features), "
      "(N, in_features) or (..., L, in_features) with in_features=5, but got "
      "input of shape [2, 3, 7]");
  CHECK(
      call(torch::randn({}, torch::kDouble)) ==
      "styleinject::StyleInjectLinear: expected input of shape (in_features), "
      "(N, in_features) or (..., L, in_features) with in_features=5, but got "
      "input of shape []");
  const auto x = torch::randn({2, 3, kIn}, torch::kDouble);
  CHECK(
      call(
          x,
          SF::StyleInjectFuncOptions().style(
              torch::ones({4}, torch::kDouble))) ==
      "styleinject::StyleInjectLinear: expected a style of shape [3] or [2, 3] "
      "(instances, branches), but got [4]");
  CHECK(
      call(
          x,
          SF::StyleInjectFuncOptions().style(
              torch::ones({3, 3}, torch::kDouble))) ==
      "styleinject::StyleInjectLinear: expected a style of shape [3] or [2, 3] "
      "(instances, branches), but got [3, 3]");
  CHECK(
      call(x.to(torch::kMeta)) ==
      "styleinject::StyleInjectLinear: expected input on device cpu (the "
      "layer's device), but got input on meta");
  const auto bad_gate = error_of([&] {
    auto adapter = adapter_of(p);
    adapter.gate = torch::zeros({kBranches, kOut + 1}, torch::kDouble);
    SF::style_inject_linear(x, p.weight, p.bias, adapter);
  });
  CHECK(
      bad_gate ==
      "styleinject::StyleInjectLinear: expected gate (n, d_out) = [3, 4], but got [3, 5]");
}

TEST_CASE(
    "under autocast a bfloat16 input runs through a float32 layer",
    "[functional]") {
  torch::manual_seed(6);
  const auto p = random_layer(/*router=*/true, /*gate=*/true);
  const auto x = torch::randn({3, 8, kIn}, torch::kDouble);
  const auto reference = reference_any_rank(p, x);
  torch::Tensor out;
  {
    CpuAutocast autocast;
    out = SF::style_inject_linear(
        x.to(torch::kBFloat16),
        p.weight.to(torch::kFloat),
        p.bias.to(torch::kFloat),
        adapter_of(p, torch::kFloat));
  }
  // Autocast ran the matmuls in bfloat16, the statistics in float32.
  CHECK(out.scalar_type() == torch::kBFloat16);
  // bfloat16 keeps 8 bits of mantissa: a few percent of the output's scale.
  CHECK(near_reference(out, reference, 0.05));
}

TEST_CASE(
    "the gate's backward: exact against autograd, also where 1 + g is 0",
    "[functional]") {
  // VarianceGate keeps u and g for backward; compare with autograd through
  // the plain formula, in float64, up to a gate that removes a channel's
  // spread entirely (g = -1), where the output holds nothing of u's spread.
  torch::manual_seed(7);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const auto u = torch::randn({3, 5, 4}, f64).requires_grad_();
  const auto weights = torch::randn({3, 5, 4}, f64);
  for (const auto& g_values :
       {torch::rand({3, 1, 4}, f64) * 1.8 - 0.9,
        torch::full({3, 1, 4}, -1.0, f64)}) {
    const auto g = g_values.clone().requires_grad_();
    const auto plain = u + g * (u - u.mean({1}, /*keepdim=*/true));
    const auto plain_grads =
        torch::autograd::grad({(plain * weights).sum()}, {u, g});
    const auto gated = styleinject::detail::variance_gate(u, g, {1});
    CHECK(close64(gated, plain));
    const auto grads = torch::autograd::grad({(gated * weights).sum()}, {u, g});
    CHECK(close64(grads[0], plain_grads[0]));
    CHECK(close64(grads[1], plain_grads[1]));
  }
}

TEST_CASE(
    "under autocast the router and the gate run in float32",
    "[functional]") {
  // SPEC: statistics in at least float32. Router logits 100.3 and 100.0
  // are 100.5 and 100.0 in bfloat16, which moves the softmax by 7%.
  torch::manual_seed(8);
  auto p = random_layer(/*router=*/true, /*gate=*/true);
  p.router_weight.fill_(0.0);
  p.router_weight.select(1, 0).copy_(
      torch::tensor({100.3, 100.0, 50.1}, torch::kDouble));
  p.router_bias.fill_(0.0);
  const auto x = torch::zeros({2, 4, kIn}, torch::kDouble);
  x.select(2, 0).fill_(1.0);
  const auto expected = torch::softmax(
      torch::matmul(x.mean(1), p.router_weight.t()) + p.router_bias, -1);
  torch::Tensor s, g;
  {
    CpuAutocast autocast;
    s = SF::linear_style_weights(
        x.to(torch::kBFloat16), adapter_of(p, torch::kFloat));
    g = styleinject::detail::gate_factor(
        s, p.gate.to(torch::kFloat), /*scale=*/1.0);
  }
  CHECK(s.scalar_type() == torch::kFloat);
  CHECK(torch::allclose(s.to(torch::kDouble), expected, 1e-6, 1e-6));
  CHECK(g.scalar_type() == torch::kFloat);
  CHECK(torch::allclose(
      g.to(torch::kDouble),
      torch::tanh(torch::matmul(expected, p.gate)),
      1e-6,
      1e-6));
}

TEST_CASE(
    "in bfloat16 both paths mix the branches in float32",
    "[functional]") {
  // Two branches that nearly cancel: 0.51 A x - 0.49 A x. Rounding the
  // style weights to bfloat16 (0.5117, 0.4902) makes the mix 7% too large.
  torch::manual_seed(9);
  auto p = random_layer(/*router=*/false, /*gate=*/false);
  p.weight.zero_();
  p.bias.zero_();
  p.lora_A = torch::randn({2, kRank, kIn}, torch::kDouble);
  p.lora_A[1] = -p.lora_A[0];
  p.style = torch::tensor({0.51, 0.49}, torch::kDouble);
  const auto x = torch::randn({3, 8, kIn}, torch::kDouble);
  const auto reference = reference_any_rank(p, x);
  const auto bf = [](const torch::Tensor& t) { return t.to(torch::kBFloat16); };
  for (const auto path : {ComputePath::kMerged, ComputePath::kStacked}) {
    CAPTURE(static_cast<int>(path));
    const auto out = SF::style_inject_linear(
        bf(x),
        bf(p.weight),
        bf(p.bias),
        adapter_of(p, torch::kBFloat16),
        SF::StyleInjectFuncOptions()
            .style(p.style.to(torch::kFloat))
            .path(path));
    CHECK(near_reference(out, reference, 0.02));
  }
}
