// Merging adapters into their base weights: the merged weight against a
// naive float64 fold, the merged forward against the naive reference,
// unmerge (exact and by subtraction), bfloat16 bases, and the refusals.

#include "support.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <memory>
#include <sstream>
#include <string>

using styleinject::GateMode;
using styleinject::MergeOptions;
using styleinject::StyleInjectConv2d;
using styleinject::StyleInjectLinear;
using styleinject::StyleInjectOptions;
using styleinject_test::close64;
using styleinject_test::ConvGeometry;
using styleinject_test::error_of;
using styleinject_test::near_reference;
using styleinject_test::randomize_adapter;
using styleinject_test::reference_conv2d_forward;
using styleinject_test::reference_forward;
using styleinject_test::reference_of;

namespace {

/// `factor·B·(s·A)` with explicit loops in float64, in the base weight's
/// shape: (d_out, d_in) for Linear, (C_out, C_in, kH, kW) for Conv2d.
template <typename Layer>
torch::Tensor naive_update(const Layer& layer, const torch::Tensor& style) {
  const auto A = layer.lora_A.to(torch::kDouble).flatten(2); // (n, r, K)
  const auto B = layer.lora_B.to(torch::kDouble).flatten(1); // (d_out, r)
  const auto s = style.to(torch::kDouble);
  const double factor = layer.adapter_options->scaling() * layer.scale();
  auto update = torch::zeros({B.size(0), A.size(2)}, torch::kDouble);
  auto out = update.template accessor<double, 2>();
  const auto a = A.template accessor<double, 3>();
  const auto b = B.template accessor<double, 2>();
  for (int64_t o = 0; o < B.size(0); ++o) {
    for (int64_t k = 0; k < A.size(2); ++k) {
      for (int64_t q = 0; q < A.size(1); ++q) {
        for (int64_t j = 0; j < A.size(0); ++j) {
          out[o][k] += factor * b[o][q] * s[j].item<double>() * a[j][q][k];
        }
      }
    }
  }
  return update.view(layer.weight.sizes());
}

/// Two adapted Linear layers, `a` and `b`, for the model-wide functions.
struct TwoLayers : torch::nn::Module {
  TwoLayers(StyleInjectOptions for_a, StyleInjectOptions for_b)
      : a(register_module("a", StyleInjectLinear(6, 6))),
        b(register_module("b", StyleInjectLinear(6, 4))) {
    a->add_adapter(for_a);
    b->add_adapter(for_b);
    randomize_adapter(*a);
    randomize_adapter(*b);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return b(a(x));
  }
  StyleInjectLinear a, b;
};

} // namespace

TEST_CASE("merge: Linear, a fixed style, float64 reference", "[merge]") {
  torch::manual_seed(60);
  const auto gate = GENERATE(GateMode::kScale, GateMode::kOff);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(6, 5),
      StyleInjectOptions(2).branches(3).alpha(3).gate(gate));
  layer->to(torch::kDouble);
  randomize_adapter(*layer);
  layer->set_scale(0.7);
  const auto style = torch::tensor({0.2, 0.5, 0.3}, torch::kDouble);
  layer->set_style(style);
  const auto x = torch::randn({2, 4, 6}, torch::kDouble);
  const auto rows = torch::randn({3, 6}, torch::kDouble);
  // Fewer token rows than input features: the gate runs as its own pass,
  // not folded into the GEMM.
  const auto few = torch::randn({1, 2, 6}, torch::kDouble);
  const auto p = reference_of(*layer, 0.7);
  const auto expected = reference_forward(p, x, /*has_tokens=*/true);
  const auto expected_few = reference_forward(p, few, /*has_tokens=*/true);
  const auto expected_rows =
      reference_forward(p, rows.unsqueeze(1), /*has_tokens=*/false).squeeze(1);
  const auto base = layer->weight.clone();

  layer->merge();
  CHECK(layer->is_merged());
  CHECK(close64(layer->weight, base + naive_update(*layer, style)));
  CHECK(close64(layer(x), expected));
  CHECK(close64(layer(few), expected_few));
  // No token axis: the gate has no statistic, merged or not.
  CHECK(close64(layer(rows), expected_rows));

  layer->unmerge();
  CHECK_FALSE(layer->is_merged());
  CHECK(torch::equal(layer->weight, base));
  CHECK(close64(layer(x), expected));
}

TEST_CASE("merge: the router off needs no style", "[merge]") {
  torch::manual_seed(61);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(5, 7),
      StyleInjectOptions(3).branches(2).router(false));
  layer->to(torch::kDouble);
  randomize_adapter(*layer);
  const auto x = torch::randn({3, 5, 5}, torch::kDouble);
  const auto expected = reference_forward(reference_of(*layer), x, true);
  const auto base = layer->weight.clone();
  layer->merge();
  const auto uniform = torch::full({2}, 0.5, torch::kDouble);
  CHECK(close64(layer->weight, base + naive_update(*layer, uniform)));
  CHECK(close64(layer(x), expected));
}

TEST_CASE("merge: Conv2d folds the composed k×k kernel", "[merge]") {
  torch::manual_seed(62);
  const auto geometry = GENERATE(ConvGeometry{1, 1, 1}, ConvGeometry{2, 1, 2});
  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(3, 4, 3)
          .stride(geometry.stride)
          .padding(geometry.padding)
          .dilation(geometry.dilation),
      StyleInjectOptions(2).branches(2).alpha(4));
  layer->to(torch::kDouble);
  randomize_adapter(*layer);
  const auto style = torch::tensor({0.9, 0.1}, torch::kDouble);
  layer->set_style(style);
  const auto x = torch::randn({2, 3, 7, 6}, torch::kDouble);
  const auto expected =
      reference_conv2d_forward(reference_of(*layer), geometry, x);
  const auto base = layer->weight.clone();
  layer->merge();
  CHECK(close64(layer->weight, base + naive_update(*layer, style)));
  CHECK(close64(layer(x), expected));
  layer->unmerge();
  CHECK(torch::equal(layer->weight, base));
}

TEST_CASE(
    "merge: float32 and bfloat16 bases, unmerge exact or within rounding",
    "[merge]") {
  torch::manual_seed(63);
  const auto dtype = GENERATE(torch::kFloat, torch::kBFloat16);
  // Unit roundoff of the base's dtype.
  const double epsilon =
      dtype == torch::kFloat ? std::ldexp(1.0, -24) : std::ldexp(1.0, -8);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(32, 24),
      StyleInjectOptions(4).branches(4).dtype(torch::kFloat));
  layer->to(dtype);
  randomize_adapter(*layer);
  const auto style = torch::tensor({0.f, 1.f, 0.f, 0.f});
  layer->set_style(style);
  const auto x = torch::randn({2, 10, 32}).to(dtype);
  const auto reference = reference_forward(reference_of(*layer), x, true);
  const auto unmerged = layer(x);
  const auto base = layer->weight.clone();
  const auto update = naive_update(*layer, style);
  const bool keep_base = GENERATE(true, false);

  layer->merge(MergeOptions().keep_base(keep_base));
  CHECK(layer->weight.scalar_type() == dtype);
  // The merged weight is W0 + update rounded once to the base's dtype.
  const auto folded = base.to(torch::kDouble) + update;
  // (The float32 update itself is off the float64 one by far less than
  // 1e-6 of its largest entry.)
  const double slack = 1e-6 * update.abs().max().item<double>();
  CHECK(((layer->weight.to(torch::kDouble) - folded).abs() <=
         epsilon * folded.abs() + slack)
            .all()
            .item<bool>());
  // Merged and unmerged both round the same math to the base's dtype, in
  // different places: each is within the dtype's reach of the reference.
  const double reach = dtype == torch::kFloat ? 1e-5 : 3e-2;
  CHECK(near_reference(layer(x), reference, reach));
  CHECK(near_reference(unmerged, reference, reach));

  layer->unmerge();
  if (keep_base) {
    CHECK(torch::equal(layer->weight, base));
  } else {
    // Two roundings: of W0 + update, then of the difference.
    const auto bound =
        epsilon * (2 * base.to(torch::kDouble).abs() + update.abs()) + slack;
    CHECK(((layer->weight.to(torch::kDouble) - base.to(torch::kDouble)).abs() <=
           bound)
              .all()
              .item<bool>());
  }
}

TEST_CASE(
    "merge_adapters: every target checked first, named in the error",
    "[merge]") {
  torch::manual_seed(64);
  const auto owner = std::make_shared<TwoLayers>(
      StyleInjectOptions(2).branches(2).router(false),
      StyleInjectOptions(2).branches(2));
  auto& model = *owner;
  const auto a_weight = model.a->weight.clone();
  const auto b_weight = model.b->weight.clone();
  CHECK(
      error_of([&] { styleinject::merge_adapters(model); }) ==
      "styleinject::merge_adapters: cannot merge layer 'b': its router picks "
      "a style per input, so no one weight serves every input; fix one style "
      "of shape [2] with set_style(); nothing was merged");
  CHECK_FALSE(model.a->is_merged());
  CHECK(torch::equal(model.a->weight, a_weight));

  // The targets pick what merges; b keeps its router.
  const auto x = torch::randn({2, 3, 6});
  const auto before = model.forward(x);
  styleinject::merge_adapters(model, styleinject::Targets::suffixes({"a"}));
  CHECK(model.a->is_merged());
  CHECK_FALSE(model.b->is_merged());
  CHECK(torch::allclose(model.forward(x), before, 1e-5, 1e-5));

  // A fixed style lets b merge too; merging a again changes nothing.
  model.b->set_style(torch::tensor({0.25f, 0.75f}));
  const auto styled = model.forward(x);
  const auto a_merged = model.a->weight.clone();
  styleinject::merge_adapters(model);
  CHECK(torch::equal(model.a->weight, a_merged));
  CHECK(torch::allclose(model.forward(x), styled, 1e-5, 1e-5));
  styleinject::unmerge_adapters(model);
  CHECK(torch::equal(model.a->weight, a_weight));
  CHECK(torch::equal(model.b->weight, b_weight));
}

TEST_CASE(
    "merge: what cannot merge, and what a merged layer refuses",
    "[merge]") {
  torch::manual_seed(65);
  StyleInjectLinear layer(6, 4);
  CHECK(
      error_of([&] { layer->merge(); }) ==
      "styleinject::StyleInjectLinear: cannot merge: the layer has no adapter");
  layer->add_adapter(StyleInjectOptions(2).branches(2).gate(GateMode::kAdain));
  layer->set_style(torch::tensor({{1.f, 0.f}, {0.f, 1.f}}));
  CHECK(
      layer->merge_obstacle() ==
      "its fixed style is per instance, so no one weight serves every input; "
      "fix one style of shape [2] with set_style()");
  layer->set_style(torch::tensor({1.f, 0.f}));
  CHECK(
      layer->merge_obstacle() ==
      "gate=adain reads the frozen and the adapted output apart; only "
      "gate=off and gate=scale merge");
  layer->remove_adapter();
  layer->add_adapter(StyleInjectOptions(2).branches(2));
  layer->set_style(torch::tensor({1.f, 0.f}));
  layer->set_enabled(false);
  CHECK(
      layer->merge_obstacle() == "no adapter is enabled (set_enabled(false))");
  layer->set_enabled(true);

  layer->merge();
  for (const auto& refused :
       {std::make_pair("set_scale", error_of([&] { layer->set_scale(2); })),
        std::make_pair("clear_style", error_of([&] { layer->clear_style(); })),
        std::make_pair(
            "set_enabled", error_of([&] { layer->set_enabled(false); }))}) {
    CHECK(
        refused.second ==
        std::string("styleinject::StyleInjectLinear: ") + refused.first +
            "() while the adapters are merged into the weight; unmerge() "
            "first");
  }
  std::stringstream stream;
  CHECK(
      error_of([&] { torch::save(layer, stream); }) ==
      "styleinject::StyleInjectLinear: save() while the adapters are merged "
      "into the weight; unmerge() first");
  CHECK(
      error_of([&] { layer->remove_adapter(); }) ==
      "styleinject::StyleInjectLinear: remove_adapter() would drop the merged "
      "adapter's gate, which is not in the weight; unmerge() first");
  CHECK(layer->has_adapter());
}

TEST_CASE(
    "merge, then remove_adapter: a plain layer with the merged weight",
    "[merge]") {
  torch::manual_seed(66);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(6, 4), StyleInjectOptions::lora(3));
  randomize_adapter(*layer);
  const auto x = torch::randn({5, 6});
  const auto adapted = layer(x);
  layer->merge();
  layer->remove_adapter();
  CHECK_FALSE(layer->has_adapter());
  CHECK_FALSE(layer->is_merged());
  CHECK(torch::allclose(layer(x), adapted, 1e-5, 1e-5));
}
