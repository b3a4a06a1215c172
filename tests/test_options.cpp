// styleinject::StyleInjectOptions: defaults, scaling, the LoRA preset, and
// the errors for options that cannot describe an adapter.

#include "support.h"

#include <catch2/catch.hpp>

using styleinject::StyleInjectLinear;
using styleinject::StyleInjectOptions;
using styleinject_test::error_of;

TEST_CASE("StyleInjectOptions defaults", "[options]") {
  const StyleInjectOptions options(8);
  CHECK(options.rank() == 8);
  CHECK(options.branches() == 4);
  CHECK_FALSE(options.alpha().has_value());
  CHECK(options.dropout() == 0.0);
  CHECK_FALSE(options.rslora());
  CHECK(options.temperature() == 1.0);
  CHECK(options.router());
  CHECK(options.gate() == styleinject::GateMode::kScale);
  CHECK(options.path() == styleinject::ComputePath::kAuto);
  CHECK_FALSE(options.dtype().has_value());
}

TEST_CASE("scaling is alpha / r, or alpha / sqrt(r) with rslora", "[options]") {
  CHECK(StyleInjectOptions(8).scaling() == 1.0); // alpha defaults to r
  CHECK(StyleInjectOptions(8).alpha(16).scaling() == 2.0);
  CHECK(StyleInjectOptions(16).alpha(8).rslora(true).scaling() == 2.0);
  CHECK(StyleInjectOptions(4).rslora(true).scaling() == 2.0);
}

TEST_CASE("the LoRA preset is one branch, no router, no gate", "[options]") {
  const auto lora = StyleInjectOptions::lora(16).alpha(32);
  CHECK(lora.rank() == 16);
  CHECK(lora.branches() == 1);
  CHECK_FALSE(lora.router());
  CHECK(lora.gate() == styleinject::GateMode::kOff);
  CHECK(lora.scaling() == 2.0);
}

TEST_CASE("options that cannot describe an adapter are refused", "[options]") {
  const auto build = [](const StyleInjectOptions& options) {
    return error_of(
        [&] { StyleInjectLinear(torch::nn::LinearOptions(4, 4), options); });
  };
  CHECK(
      build(StyleInjectOptions(0)) ==
      "styleinject::StyleInjectLinear: expected rank >= 1, but got rank=0");
  CHECK(
      build(StyleInjectOptions(2).branches(0)) ==
      "styleinject::StyleInjectLinear: expected branches >= 1, but got branches=0");
  CHECK(
      build(StyleInjectOptions(2).dropout(-0.1)) ==
      "styleinject::StyleInjectLinear: expected dropout in [0, 1), but got dropout=-0.1");
  CHECK(
      build(StyleInjectOptions(2).dropout(1.0)) ==
      "styleinject::StyleInjectLinear: expected dropout in [0, 1), but got dropout=1");
  CHECK(
      build(StyleInjectOptions(2).temperature(0.0)) ==
      "styleinject::StyleInjectLinear: expected a finite temperature > 0, but got temperature=0");
  CHECK(
      build(StyleInjectOptions(2).alpha(-1.0)) ==
      "styleinject::StyleInjectLinear: expected a finite alpha > 0, but got "
      "alpha=-1; use set_scale() to weaken or switch off the update");
  CHECK(
      build(StyleInjectOptions(2).dtype(torch::kInt)) ==
      "styleinject::StyleInjectLinear: expected dtype float32, float64, "
      "bfloat16 or float16, but got dtype=Int");
  CHECK(build(StyleInjectOptions(2).branches(3).alpha(2)) == "no error");

  SECTION(
      "the error is a ValueError, so callers can tell it from a shape error") {
    CHECK_THROWS_AS(
        StyleInjectLinear(
            torch::nn::LinearOptions(4, 4), StyleInjectOptions(0)),
        c10::ValueError);
  }
}

TEST_CASE(
    "same_computation: what a saved adapter must agree on to load",
    "[options]") {
  using styleinject::detail::same_computation;
  const auto base = StyleInjectOptions(4).branches(3).temperature(0.5);
  CHECK(same_computation(base, base));
  // Training settings, the path, the dtype and the spelling of the scale
  // do not count.
  CHECK(same_computation(base, StyleInjectOptions(base).dropout(0.1)));
  CHECK(same_computation(
      base, StyleInjectOptions(base).path(styleinject::ComputePath::kStacked)));
  CHECK(same_computation(base, StyleInjectOptions(base).dtype(torch::kFloat)));
  CHECK(same_computation(base, StyleInjectOptions(base).alpha(4)));
  CHECK(same_computation(
      StyleInjectOptions(4).alpha(8),
      StyleInjectOptions(4).alpha(4).rslora(true)));
  CHECK(same_computation(
      StyleInjectOptions(2).router(false).temperature(0.3),
      StyleInjectOptions(2).router(false)));
  // Everything that changes the shapes or the function does.
  CHECK_FALSE(same_computation(base, StyleInjectOptions(base).rank(2)));
  CHECK_FALSE(same_computation(base, StyleInjectOptions(base).branches(2)));
  CHECK_FALSE(same_computation(base, StyleInjectOptions(base).alpha(3)));
  CHECK_FALSE(same_computation(base, StyleInjectOptions(base).rslora(true)));
  CHECK_FALSE(
      same_computation(base, StyleInjectOptions(base).temperature(1.0)));
  CHECK_FALSE(same_computation(base, StyleInjectOptions(base).router(false)));
  CHECK_FALSE(same_computation(base, StyleInjectOptions(base).gate(false)));
}
