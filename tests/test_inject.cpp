// styleinject::inject and the model-wide controls, on a small nested model.

#include "support.h"

#include <catch2/catch.hpp>

#include <iomanip>
#include <map>
#include <sstream>
#include <string>
#include <vector>

using styleinject::inject;
using styleinject::Override;
using styleinject::StyleInjectOptions;
using styleinject::Targets;
using styleinject_test::error_of;
using styleinject_test::f64;
using styleinject_test::randomize_adapter;
using styleinject_test::reference_of;
using styleinject_test::reference_style;
using styleinject_test::ReferenceLinear;
using styleinject_test::snapshot;
using styleinject_test::TinyNet;

namespace {

/// SPEC §5's count for a Linear (k = 1) or a k×k Conv2d.
int64_t spec_count(int64_t n, int64_t r, int64_t in, int64_t out, int64_t k) {
  return n * r * in * k * k + r * out + n * in + n + n * out;
}

bool is_adapter_name(const std::string& name) {
  for (const char* key : {"lora_A", "lora_B", "router.", "gate"}) {
    if (name.find(key) != std::string::npos) {
      return true;
    }
  }
  return false;
}

void randomize_all(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& p : styleinject::adapter_parameters(model)) {
    p.copy_(torch::randn_like(p) * 0.5);
  }
}

const std::string kAllNames =
    "['blocks.0.body.0', 'blocks.0.body.3', 'blocks.1.body.0', "
    "'blocks.1.body.3', 'mix', 'attn.to_q', 'attn.to_k', 'attn.to_v', "
    "'attn.to_out', 'head']";

} // namespace

TEST_CASE("inject adapts the layers of a nested model", "[inject]") {
  torch::manual_seed(41);
  TinyNet model;
  const auto x = torch::randn({2, 4, 5, 5});
  const auto context = torch::randn({2, 7, 6});
  // Bit-for-bit comparisons need the same autograd state on both sides:
  // LibTorch 2.x's linear takes another kernel, with other rounding, when
  // its weight requires grad. So the base runs frozen, as inject leaves it,
  // and every comparison runs without autograd.
  const auto run = [&] {
    torch::NoGradGuard no_grad;
    return model(x, context);
  };
  for (auto& p : model->parameters()) {
    p.set_requires_grad(false);
  }
  const auto base_out = run();
  int64_t base_total = 0;
  for (const auto& p : model->parameters()) {
    base_total += p.numel();
  }
  const auto before = snapshot(*model);

  const auto report =
      inject(*model, Targets::all(), StyleInjectOptions(2).branches(3));

  // Every adaptable layer, in model order; the plain typed `head` is not.
  const std::vector<std::pair<std::string, int64_t>> expected{
      {"blocks.0.body.0", spec_count(3, 2, 4, 4, 3)},
      {"blocks.0.body.3", spec_count(3, 2, 4, 4, 3)},
      {"blocks.1.body.0", spec_count(3, 2, 4, 4, 3)},
      {"blocks.1.body.3", spec_count(3, 2, 4, 4, 3)},
      {"mix", spec_count(3, 2, 4, 4, 1)},
      {"attn.to_q", spec_count(3, 2, 4, 4, 1)},
      {"attn.to_k", spec_count(3, 2, 6, 4, 1)},
      {"attn.to_v", spec_count(3, 2, 6, 4, 1)},
      {"attn.to_out", spec_count(3, 2, 4, 4, 1)}};
  REQUIRE(report.layers.size() == expected.size());
  int64_t adapter_total = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    CHECK(report.layers[i].name == expected[i].first);
    CHECK(report.layers[i].parameters == expected[i].second);
    adapter_total += expected[i].second;
  }
  CHECK(report.layers[0].type == "Conv2d");
  CHECK(report.layers[0].shape == "4 -> 4, 3x3");
  CHECK(report.layers[6].shape == "6 -> 4");
  CHECK(report.trainable_parameters == adapter_total);
  CHECK(report.total_parameters == base_total + adapter_total);

  // Only adapter parameters train; base values are untouched.
  for (const auto& p : model->named_parameters()) {
    CHECK(p.value().requires_grad() == is_adapter_name(p.key()));
    if (before.count(p.key())) {
      CHECK(torch::equal(p.value(), before.at(p.key())));
    }
  }
  // Inside the Sequential the plain Conv2d was swapped for real.
  auto block = model->blocks->ptr<styleinject_test::ResBlockImpl>(0);
  CHECK(block->body->ptr(0)->as<styleinject::StyleInjectConv2dImpl>());
  CHECK(block->body[0]->as<styleinject::StyleInjectConv2dImpl>());
  // Fresh adapters are the identity, exactly.
  CHECK(torch::equal(run(), base_out));

  SECTION("one optimizer step changes adapter parameters only") {
    randomize_all(*model);
    const auto start = snapshot(*model);
    torch::optim::Adam adam(styleinject::adapter_parameters(*model), 1e-2);
    model(x, context).pow(2).mean().backward();
    adam.step();
    for (const auto& p : model->named_parameters()) {
      CAPTURE(p.key());
      CHECK(
          torch::equal(p.value(), start.at(p.key())) !=
          is_adapter_name(p.key()));
    }
  }
  SECTION("disabled or at scale 0, the model is the base model, bit for bit") {
    randomize_all(*model);
    // The swapped Sequential layers take part: a change there shows.
    model->attn->to_q->set_enabled(false);
    CHECK_FALSE(torch::allclose(run(), base_out));
    styleinject::set_enabled(*model, false);
    CHECK(torch::equal(run(), base_out));
    styleinject::set_enabled(*model, true);
    styleinject::set_scale(*model, 0.0);
    CHECK(torch::equal(run(), base_out));
  }
  SECTION("controls act on the layers a pattern names") {
    styleinject::set_enabled(*model, false, Targets::regex("blocks\\..*"));
    styleinject::set_style(
        *model,
        torch::tensor({1.0f, 0.0f, 0.0f}),
        Targets::suffixes({"to_k", "to_v"}));
    styleinject::detail::for_each_adapted(
        *model, [](const std::string& name, auto& layer) {
          CAPTURE(name);
          CHECK(layer.is_enabled() == (name.rfind("blocks.", 0) != 0));
          CHECK(
              layer.style().defined() ==
              (name == "attn.to_k" || name == "attn.to_v"));
        });
    styleinject::clear_style(*model);
    CHECK_FALSE(model->attn->to_k->style().defined());
  }
}

TEST_CASE("inject: per-pattern overrides, in order", "[inject]") {
  TinyNet model;
  inject(
      *model,
      Targets::all()
          .with(".*body.*", Override().rank(1).branches(2))
          .with(".*body\\.3", Override().alpha(5.0)),
      StyleInjectOptions(2).branches(3));
  const auto& first = *model->blocks->ptr<styleinject_test::ResBlockImpl>(0)
                           ->body->ptr<styleinject::StyleInjectConv2dImpl>(0)
                           ->adapter_options;
  const auto& last = *model->blocks->ptr<styleinject_test::ResBlockImpl>(1)
                          ->body->ptr<styleinject::StyleInjectConv2dImpl>(3)
                          ->adapter_options;
  CHECK(first.rank() == 1);
  CHECK(first.branches() == 2);
  CHECK_FALSE(first.alpha().has_value());
  CHECK(last.rank() == 1);
  CHECK(last.alpha() == 5.0);
  CHECK(model->attn->to_q->adapter_options->rank() == 2);
  CHECK(model->attn->to_q->adapter_options->branches() == 3);
}

TEST_CASE("inject's report prints as a table", "[inject]") {
  styleinject_test::Attention attention(4, 6);
  std::ostringstream text;
  text << inject(
      *attention,
      Targets::suffixes({"to_q", "to_v"}),
      StyleInjectOptions(2).branches(3));
  // to_q: 3·2·4 + 2·4 + 3·4 + 3 + 3·4 = 59; to_v: 3·2·6 + 8 + 18 + 3 + 12
  // = 77; the base has 4·4+4 + 2·(6·4+4) + 4·4+4 = 96 parameters.
  CHECK(
      text.str() ==
      "layer  type    shape   rank  branches  alpha  parameters\n"
      "to_q   Linear  4 -> 4     2         3      2          59\n"
      "to_v   Linear  6 -> 4     2         3      2          77\n"
      "2 adapted layers, 136 adapter parameters; trainable 136 of 232 "
      "parameters (58.62%)\n");
}

TEST_CASE("inject refuses what it cannot do, and changes nothing", "[inject]") {
  torch::manual_seed(42);
  TinyNet model;
  const auto before = snapshot(*model);
  const auto unchanged = [&] {
    CHECK(styleinject::report(*model).layers.empty());
    for (const auto& p : model->named_parameters()) {
      CHECK(p.value().requires_grad());
      CHECK(torch::equal(p.value(), before.at(p.key())));
    }
  };
  const auto options = StyleInjectOptions(2);

  CHECK(
      error_of([&] {
        inject(*model, Targets::suffixes({"to_q", "to_z"}), options);
      }) ==
      "styleinject::inject: the target suffix 'to_z' matches none of " +
          kAllNames);
  CHECK(
      error_of([&] { inject(*model, Targets::regex("down\\..*"), options); }) ==
      "styleinject::inject: the target regex 'down\\..*' matches none of " +
          kAllNames);
  CHECK(
      error_of([&] { inject(*model, Targets::suffixes({"head"}), options); }) ==
      "styleinject::inject: layer 'head' cannot carry an adapter: it is a "
      "plain torch::nn::Linear outside a torch::nn::Sequential, whose forward "
      "LibTorch cannot redirect; declare it as styleinject::StyleInjectLinear "
      "in the model");
  CHECK(
      error_of([&] {
        inject(
            *model, Targets::all().with(".*to_q", Override().rank(0)), options);
      }) ==
      "styleinject::inject: layer 'attn.to_q': expected rank >= 1, but got "
      "rank=0");
  CHECK(
      error_of([&] {
        inject(
            *model,
            Targets::suffixes({"to_q"}).with(".*conv.*", Override().rank(4)),
            options);
      }) ==
      "styleinject::inject: the override pattern '.*conv.*' matches none of "
      "the targeted layers");
  CHECK_THAT(
      error_of([] { Targets::regex("("); }),
      Catch::StartsWith(
          "styleinject::Targets: expected an ECMAScript regular expression, "
          "but '(' is not one ("));
  CHECK(
      error_of([&] { styleinject::set_enabled(*model, false); }) ==
      "styleinject::set_enabled: the model has no adapters; attach them with "
      "styleinject::inject() or styleinject::load_adapters()");
  unchanged();

  SECTION("injecting a layer twice") {
    inject(*model, Targets::suffixes({"to_q", "to_k"}), options);
    const auto adapted = snapshot(*model);
    CHECK(
        error_of([&] {
          inject(*model, Targets::suffixes({"to_v", "attn.to_q"}), options);
        }) ==
        "styleinject::inject: layer 'attn.to_q' has an adapter already under "
        "the name 'default'; inject each layer once per name "
        "(remove_adapter() takes one off)");
    CHECK_FALSE(model->attn->to_v->has_adapter());
    CHECK(snapshot(*model).size() == adapted.size());
  }
  SECTION("a rank larger than both dimensions is legal, with a warning") {
    styleinject_test::WarningCapture warnings;
    inject(*model, Targets::suffixes({"to_q"}), StyleInjectOptions(8));
    CHECK(model->attn->to_q->has_adapter());
    REQUIRE(warnings.messages.size() == 1);
    CHECK(
        warnings.messages[0] ==
        "styleinject::inject: layer 'attn.to_q': rank 8 is larger than both "
        "of its dimensions (4 -> 4); the adapter can do no more than a "
        "full-rank update");
  }
}

TEST_CASE(
    "ModuleList and ModuleDict keep their plain layers: callers cast them",
    "[inject]") {
  // Code that runs a ModuleList or ModuleDict casts each entry to its
  // declared type (as<torch::nn::Linear>()), so a swapped entry would break
  // it: inject refuses them, and Targets::all() skips them.
  torch::nn::ModuleList list(torch::nn::Linear(3, 3));
  torch::nn::ModuleDict dict(
      torch::OrderedDict<std::string, std::shared_ptr<torch::nn::Module>>{
          {"proj", torch::nn::Linear(3, 3).ptr()}});
  CHECK(
      error_of([&] { inject(*list, Targets::all(), StyleInjectOptions(2)); }) ==
      "styleinject::inject: the model has no Linear or Conv2d layer that can "
      "carry an adapter");
  CHECK(
      error_of([&] {
        inject(*dict, Targets::suffixes({"proj"}), StyleInjectOptions(2));
      }) ==
      "styleinject::inject: layer 'proj' cannot carry an adapter: it is a "
      "plain torch::nn::Linear outside a torch::nn::Sequential, whose forward "
      "LibTorch cannot redirect; declare it as styleinject::StyleInjectLinear "
      "in the model");
  CHECK(list[0]->as<torch::nn::Linear>());
}

TEST_CASE(
    "inject into a Sequential with an in-place ReLU: backward works",
    "[inject]") {
  // An in-place activation after an adapted layer, a case inject advertises:
  // the layer's backward must not need its output.
  torch::manual_seed(47);
  torch::nn::Sequential net(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 3, 3).padding(1)),
      torch::nn::ReLU(torch::nn::ReLUOptions().inplace(true)),
      torch::nn::Conv2d(3, 2, 1));
  inject(*net, Targets::all(), StyleInjectOptions(2));
  randomize_all(*net);
  const auto x = torch::randn({2, 3, 5, 5});
  const auto parameters = styleinject::adapter_parameters(*net);
  const auto got =
      torch::autograd::grad({net->forward(x).pow(2).sum()}, parameters);
  // The same layers with an out-of-place ReLU.
  auto first = net->ptr<styleinject::StyleInjectConv2dImpl>(0);
  auto last = net->ptr<styleinject::StyleInjectConv2dImpl>(2);
  const auto expected = torch::autograd::grad(
      {last->forward(torch::relu(first->forward(x))).pow(2).sum()}, parameters);
  REQUIRE(got.size() == expected.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CHECK(torch::allclose(got[i], expected[i]));
  }
}

TEST_CASE(
    "printing a report leaves the stream's format as it was",
    "[inject]") {
  styleinject_test::Attention attention(4, 6);
  const auto report =
      inject(*attention, Targets::suffixes({"to_q"}), StyleInjectOptions(2));
  std::ostringstream text;
  text << std::setprecision(4) << report;
  text << 3.14159265 << "|" << std::setw(5) << "ab";
  const std::string out = text.str();
  CHECK(out.substr(out.size() - 11) == "3.142|   ab");
}

TEST_CASE(
    "RoutingRecord records each layer's style weights per sample",
    "[inject]") {
  torch::manual_seed(43);
  TinyNet model;
  inject(*model, Targets::all(), StyleInjectOptions(2).branches(3));
  inject(
      *model,
      Targets::suffixes({"to_k"}).adapter("second"),
      StyleInjectOptions(1).branches(2));
  const auto modules = model->named_modules();
  auto& conv =
      *modules["blocks.0.body.0"]->as<styleinject::StyleInjectConv2dImpl>();
  auto& to_k = *modules["attn.to_k"]->as<styleinject::StyleInjectLinearImpl>();
  randomize_adapter(conv);
  randomize_adapter(to_k);
  {
    torch::NoGradGuard no_grad; // a router of its own that is not uniform
    for (auto& p : to_k.adapter_parameters("second")) {
      p.copy_(torch::randn_like(p));
    }
  }
  const auto x = torch::randn({2, 4, 5, 5}), y = torch::randn({3, 4, 5, 5});
  const auto context = torch::randn({2, 7, 6});
  const auto context_y = torch::randn({3, 7, 6});
  // The naive SPEC §1 weights of sample i: the router of its input pooled
  // over H×W (Conv2d) or the tokens (Linear).
  const auto expected = [](const ReferenceLinear& p,
                           const torch::Tensor& input,
                           int64_t i) {
    const auto mean = input.dim() == 4 ? f64(input[i]).flatten(1).mean(1)
                                       : f64(input[i]).mean(0);
    return reference_style(
        p,
        std::vector<double>(
            mean.data_ptr<double>(), mean.data_ptr<double>() + mean.numel()),
        i);
  };
  const auto rows_match = [&](const torch::Tensor& recorded,
                              const ReferenceLinear& p,
                              const torch::Tensor& input,
                              int64_t offset) {
    bool all = true;
    for (int64_t i = 0; i < input.size(0); ++i) {
      const auto s = expected(p, input, i);
      for (size_t j = 0; j < s.size(); ++j) {
        all = all &&
            std::abs(recorded[offset + i][j].item<double>() - s[j]) < 1e-5;
      }
    }
    return all;
  };

  SECTION("every adapted layer, in model order, a row per sample") {
    styleinject::RoutingRecord record(*model);
    model(x, context);
    model(y, context_y);
    const auto weights = record.weights();
    REQUIRE(weights.size() == 9);
    CHECK(weights[0].first == "blocks.0.body.0");
    CHECK(weights[6].first == "attn.to_k");
    for (const auto& [name, s] : weights) {
      INFO(name);
      REQUIRE(s.sizes() == torch::IntArrayRef({5, 3}));
      CHECK(torch::allclose(s.sum(1), torch::ones({5})));
    }
    CHECK(rows_match(weights[0].second, reference_of(conv), x, 0));
    CHECK(rows_match(weights[0].second, reference_of(conv), y, 2));
    CHECK(rows_match(weights[6].second, reference_of(to_k), context, 0));
    CHECK(rows_match(weights[6].second, reference_of(to_k), context_y, 2));
  }
  SECTION("only while it lives, only enabled adapters, the one named") {
    model(x, context); // before: not recorded
    styleinject::RoutingRecord second(*model, "second");
    {
      styleinject::RoutingRecord inner(*model);
      to_k.set_enabled(false);
      model(x, context);
      const auto weights = inner.weights();
      CHECK(!weights[6].second.defined());
      CHECK(weights[7].second.size(0) == 2);
      to_k.set_enabled(true);
    }
    model(y, context_y); // the inner record is gone: `second` records
    const auto weights = second.weights();
    REQUIRE(weights.size() == 1);
    CHECK(weights[0].first == "attn.to_k");
    REQUIRE(weights[0].second.sizes() == torch::IntArrayRef({3, 2}));
    CHECK(rows_match(
        weights[0].second, reference_of(to_k, 1.0, "second"), context_y, 0));
  }
}
