// styleinject::StyleInjectLinear: layout, identity, LoRA parity, gradients,
// controls, clone, printing, checkpoints, learning, CUDA.

#include "support.h"

#include <catch2/catch.hpp>

#include <cstdio>
#include <map>
#include <string>

#ifdef STYLEINJECT_TEST_CUDA_SYNC_DEBUG
#include <c10/cuda/CUDAFunctions.h>
#endif

using styleinject::StyleInjectLinear;
using styleinject::StyleInjectOptions;
using styleinject_test::close64;
using styleinject_test::error_of;
using styleinject_test::randomize_adapter;
using styleinject_test::reference_forward;
using styleinject_test::reference_of;

namespace {

int64_t count(const std::vector<torch::Tensor>& tensors) {
  int64_t total = 0;
  for (const auto& t : tensors) {
    total += t.numel();
  }
  return total;
}

/// A file name in the temporary folder, removed when the guard goes.
struct TempFile {
  explicit TempFile(const std::string& name)
      : path(std::string(P_tmpdir) + "/styleinject_test_" + name) {}
  ~TempFile() {
    std::remove(path.c_str());
  }
  std::string path;
};

} // namespace

TEST_CASE(
    "parameters: SPEC §5 names, shapes, device, dtype, count",
    "[linear]") {
  torch::manual_seed(10);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(6, 5), StyleInjectOptions(2).branches(3));
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& p : layer->named_parameters()) {
    shapes[p.key()] = p.value().sizes().vec();
    CHECK(
        p.value().requires_grad() ==
        (p.key() != "weight" && p.key() != "bias"));
  }
  const std::map<std::string, std::vector<int64_t>> expected{
      {"weight", {5, 6}},
      {"bias", {5}},
      {"lora_A", {3, 2, 6}},
      {"lora_B", {5, 2}},
      {"router.weight", {3, 6}},
      {"router.bias", {3}},
      {"gate", {3, 5}}};
  CHECK(shapes == expected);

  SECTION(
      "SPEC §5's count: 8,964 at d = 320, n = 4, r = 4; LoRA rank 16: 10,240") {
    StyleInjectLinear spec(
        torch::nn::LinearOptions(320, 320), StyleInjectOptions(4));
    CHECK(count(spec->adapter_parameters()) == 8964);
    StyleInjectLinear lora(
        torch::nn::LinearOptions(320, 320), StyleInjectOptions::lora(16));
    CHECK(count(lora->adapter_parameters()) == 10240);
    std::vector<std::string> names;
    for (const auto& p : lora->named_parameters()) {
      names.push_back(p.key());
    }
    CHECK(
        names ==
        std::vector<std::string>{"weight", "bias", "lora_A", "lora_B"});
  }
  SECTION("the adapter is created on the base weight's dtype") {
    torch::nn::Linear base(6, 5);
    base->to(torch::kDouble);
    StyleInjectLinear wrapped(base, StyleInjectOptions(2));
    for (const auto& p : wrapped->parameters()) {
      CHECK(p.scalar_type() == torch::kDouble);
    }
  }
  SECTION("no bias: like torch::nn::Linear, no 'bias' parameter") {
    StyleInjectLinear plain(
        torch::nn::LinearOptions(6, 5).bias(false), StyleInjectOptions(2));
    CHECK_FALSE(plain->bias.defined());
    CHECK(plain->named_parameters().find("bias") == nullptr);
    CHECK(
        plain(torch::randn({2, 3, 6})).sizes() == torch::IntArrayRef{2, 3, 5});
  }
}

TEST_CASE(
    "wrapping shares and freezes the base layer's weight and bias",
    "[linear]") {
  torch::manual_seed(11);
  torch::nn::Linear base(8, 4);
  StyleInjectLinear layer(base, StyleInjectOptions(2));
  CHECK(layer->weight.is_same(base->weight));
  CHECK(layer->bias.is_same(base->bias));
  CHECK_FALSE(base->weight.requires_grad());
  CHECK_FALSE(base->bias.requires_grad());
  CHECK(
      error_of([] {
        StyleInjectLinear(torch::nn::Linear(nullptr), StyleInjectOptions(2));
      }) ==
      "styleinject::StyleInjectLinear: expected a base layer to wrap, but got an empty holder (nullptr)");
}

TEST_CASE(
    "without an adapter the layer is torch::nn::Linear: values, training, "
    "checkpoints",
    "[linear]") {
  torch::manual_seed(14);
  torch::manual_seed(3);
  torch::nn::Linear plain(8, 4);
  torch::manual_seed(3);
  StyleInjectLinear declared(8, 4); // initialised as torch::nn::Linear is
  CHECK(torch::equal(declared->weight, plain->weight));
  CHECK(torch::equal(declared->bias, plain->bias));
  CHECK_FALSE(declared->has_adapter());
  CHECK(declared->adapter_parameters().empty());
  CHECK(declared->weight.requires_grad()); // trains, e.g. in pretraining
  CHECK(declared->bias.requires_grad());
  CHECK(
      declared->named_parameters().keys() == plain->named_parameters().keys());
  const auto x = torch::randn({2, 5, 8});
  CHECK(torch::equal(declared(x), plain(x)));

  SECTION("checkpoints interchange with torch::nn::Linear's") {
    TempFile file("declared.pt");
    torch::save(plain, file.path);
    StyleInjectLinear other(8, 4);
    torch::load(other, file.path);
    CHECK(torch::equal(other(x), plain(x)));
    torch::save(other, file.path);
    torch::nn::Linear back(8, 4);
    torch::load(back, file.path);
    CHECK(torch::equal(back->weight, plain->weight));
  }
  SECTION("add_adapter freezes the base; remove_adapter gives it back") {
    declared->add_adapter(StyleInjectOptions(2).branches(3));
    CHECK(declared->has_adapter());
    CHECK_FALSE(declared->weight.requires_grad());
    CHECK(declared->named_parameters().size() == 7);
    CHECK(torch::equal(declared(x), plain(x)));
    randomize_adapter(*declared);
    CHECK_FALSE(torch::allclose(declared(x), plain(x)));
    CHECK(
        error_of([&] { declared->add_adapter(StyleInjectOptions(2)); }) ==
        "styleinject::StyleInjectLinear: the layer has an adapter already; "
        "call remove_adapter() first");
    declared->remove_adapter();
    CHECK_FALSE(declared->has_adapter());
    CHECK(
        declared->named_parameters().keys() ==
        plain->named_parameters().keys());
    CHECK(declared->children().empty());
    CHECK(torch::equal(declared(x), plain(x)));
    declared->add_adapter(StyleInjectOptions::lora(4)); // a different one
    CHECK(declared->lora_A.sizes() == torch::IntArrayRef({1, 4, 8}));
  }
  SECTION("adapter-only methods say that there is none") {
    CHECK(
        error_of([&] { declared->set_style(torch::ones({4})); }) ==
        "styleinject::StyleInjectLinear: set_style() needs an adapter, but the "
        "layer has none; add one with add_adapter() or styleinject::inject()");
  }
}

TEST_CASE("identity at initialisation and when disabled", "[linear]") {
  torch::manual_seed(12);
  torch::nn::Linear base(8, 4);
  StyleInjectLinear layer(base, StyleInjectOptions(2));
  const auto input_sizes = GENERATE(
      std::vector<int64_t>{5, 8},
      std::vector<int64_t>{2, 7, 8},
      std::vector<int64_t>{2, 3, 7, 8});
  CAPTURE(input_sizes);
  const auto x = torch::randn(input_sizes);
  // B = 0, router 0, gate 0: the update and the gate are exact zeros.
  CHECK(torch::equal(layer(x), base(x)));

  randomize_adapter(*layer);
  CHECK_FALSE(torch::allclose(layer(x), base(x)));
  layer->set_enabled(false);
  CHECK_FALSE(layer->is_enabled());
  CHECK(torch::equal(layer(x), base(x)));
  layer->set_enabled(true);
  CHECK_FALSE(torch::allclose(layer(x), base(x)));

  SECTION("reset_parameters() makes the layer equal to its base again") {
    layer->reset_parameters();
    CHECK(torch::equal(layer(x), base(x)));
  }
}

TEST_CASE("the LoRA preset is base(x) + (alpha / r) B A x", "[linear]") {
  torch::manual_seed(13);
  torch::nn::Linear base(8, 6);
  base->to(torch::kDouble);
  StyleInjectLinear lora(base, StyleInjectOptions::lora(3).alpha(6));
  randomize_adapter(*lora);
  const auto x = torch::randn({4, 5, 8}, torch::kDouble);
  const auto A = lora->lora_A[0]; // (r, d_in)
  const auto B = lora->lora_B; // (d_out, r)
  const auto expected =
      base(x) + 2.0 * torch::matmul(torch::matmul(x, A.t()), B.t());
  CHECK(close64(lora(x), expected));
}

TEST_CASE(
    "module forward matches the naive reference, with its controls",
    "[linear]") {
  torch::manual_seed(14);
  const bool rslora = GENERATE(false, true);
  const double scale = GENERATE(1.0, 0.5);
  CAPTURE(rslora, scale);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(6, 5),
      StyleInjectOptions(2).branches(3).alpha(4).rslora(rslora).temperature(
          0.5));
  layer->to(torch::kDouble);
  randomize_adapter(*layer);
  layer->set_scale(scale);
  const auto x = torch::randn({3, 7, 6}, torch::kDouble);
  CHECK(close64(
      layer(x), reference_forward(reference_of(*layer, scale), x, true)));

  SECTION("a fixed style replaces the router") {
    layer->set_style(torch::tensor({0.0, 1.0, 0.0}, torch::kDouble));
    CHECK(close64(
        layer(x), reference_forward(reference_of(*layer, scale), x, true)));
    layer->set_style(torch::rand({3, 3}, torch::kDouble));
    CHECK(close64(
        layer(x), reference_forward(reference_of(*layer, scale), x, true)));
    layer->clear_style();
    CHECK_FALSE(layer->style().defined());
  }
  SECTION("scale 0 gives the base layer") {
    layer->set_scale(0.0);
    CHECK(close64(
        layer(x),
        torch::nn::functional::linear(x, layer->weight, layer->bias)));
  }
}

TEST_CASE("style_weights reads the router", "[linear]") {
  torch::manual_seed(15);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(6, 5), StyleInjectOptions(2).branches(4));
  const auto x = torch::randn({3, 7, 6});
  // Zero-initialised router: every branch weighs 1/n.
  CHECK(torch::allclose(layer->style_weights(x), torch::full({3, 4}, 0.25)));
  {
    torch::NoGradGuard no_grad;
    layer->router->bias[2] = 10.0;
  }
  const auto s = layer->style_weights(x);
  CHECK(s.sizes() == torch::IntArrayRef{3, 4});
  CHECK(torch::equal(s.argmax(-1), torch::full({3}, 2, torch::kLong)));
  layer->set_style(torch::tensor({1.0, 0.0, 0.0, 0.0}));
  CHECK(torch::equal(
      layer->style_weights(x),
      torch::tensor({1.0f, 0.0f, 0.0f, 0.0f}).expand({3, 4})));
}

TEST_CASE("set_style and set_scale refuse bad values", "[linear]") {
  StyleInjectLinear layer(
      torch::nn::LinearOptions(6, 5), StyleInjectOptions(2).branches(3));
  CHECK(
      error_of([&] { layer->set_style(torch::ones({4})); }) ==
      "styleinject::StyleInjectLinear: expected a floating-point style of shape [3] "
      "or [N, 3] (one weight per branch), but got CPUFloatType of shape [4]");
  CHECK(
      error_of([&] { layer->set_style(torch::ones({3}, torch::kLong)); }) ==
      "styleinject::StyleInjectLinear: expected a floating-point style of shape [3] "
      "or [N, 3] (one weight per branch), but got CPULongType of shape [3]");
  CHECK(
      error_of([&] {
        layer->set_style(torch::tensor({0.5, -0.25, 0.75}));
      }) ==
      "styleinject::StyleInjectLinear: expected finite, non-negative style "
      "weights, but got values from -0.25 to 0.75");
  CHECK(
      error_of([&] {
        layer->set_style(torch::tensor({0.5f, INFINITY, 0.5f}));
      }) ==
      "styleinject::StyleInjectLinear: expected finite, non-negative style "
      "weights, but got values from 0.5 to inf");
  CHECK_FALSE(
      layer->style().defined()); // a refused style leaves the layer as it was
  CHECK(
      error_of([&] { layer->set_scale(std::nan("")); }) ==
      "styleinject::StyleInjectLinear: expected a finite scale, but got nan");
  CHECK(
      error_of([&] {
        layer(torch::randn({2, 3, 6}, torch::kDouble));
      }) ==
      "styleinject::StyleInjectLinear: expected input of dtype Float (the layer's "
      "dtype), but got Double; convert the input with .to(), or the layer with ->to()");
}

TEST_CASE("gradients reach the adapter only", "[linear]") {
  torch::manual_seed(16);
  torch::nn::Linear base(8, 4);
  StyleInjectLinear layer(base, StyleInjectOptions(2).branches(3));
  layer(torch::randn({2, 5, 8})).pow(2).sum().backward();
  CHECK_FALSE(layer->weight.grad().defined());
  CHECK_FALSE(layer->bias.grad().defined());
  for (const auto& p : layer->named_parameters()) {
    if (p.key() != "weight" && p.key() != "bias") {
      CAPTURE(p.key());
      REQUIRE(p.value().grad().defined());
      CHECK(p.value().grad().sizes() == p.value().sizes());
    }
  }
}

TEST_CASE("adapter gradients match finite differences in float64", "[linear]") {
  torch::manual_seed(17);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(3, 2),
      StyleInjectOptions(2).branches(2).temperature(0.7));
  layer->to(torch::kDouble);
  randomize_adapter(*layer);
  const auto x = torch::randn({2, 4, 3}, torch::kDouble);
  const auto weights = torch::randn({2, 4, 2}, torch::kDouble);
  const auto loss = [&] { return (layer(x) * weights).sum(); };
  loss().backward();
  const double h = 1e-6;
  for (const auto& p : layer->named_parameters()) {
    if (!p.value().requires_grad()) {
      continue;
    }
    auto flat = p.value().detach().view({-1});
    const auto grad = p.value().grad().view({-1});
    for (int64_t e = 0; e < flat.numel(); ++e) {
      torch::NoGradGuard no_grad;
      const double original = flat[e].item<double>();
      flat[e] = original + h;
      const double up = loss().item<double>();
      flat[e] = original - h;
      const double down = loss().item<double>();
      flat[e] = original;
      const double numeric = (up - down) / (2 * h);
      const double analytic = grad[e].item<double>();
      CAPTURE(p.key(), e, numeric, analytic);
      CHECK(
          std::abs(numeric - analytic) <=
          1e-6 * std::max(1.0, std::abs(analytic)));
    }
  }
}

TEST_CASE("dropout acts on the branches' input, in training only", "[linear]") {
  torch::manual_seed(18);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(8, 4), StyleInjectOptions(2).dropout(0.5));
  randomize_adapter(*layer);
  const auto x = torch::randn({2, 5, 8});
  layer->train();
  CHECK_FALSE(torch::equal(layer(x), layer(x)));
  layer->eval();
  const auto evaluated = layer(x);
  CHECK(torch::equal(evaluated, layer(x)));
  StyleInjectLinear no_dropout(
      torch::nn::LinearOptions(8, 4), StyleInjectOptions(2));
  {
    torch::NoGradGuard no_grad;
    for (const auto& p : layer->named_parameters()) {
      no_dropout->named_parameters()[p.key()].copy_(p.value());
    }
  }
  CHECK(torch::allclose(evaluated, no_dropout(x)));
}

TEST_CASE("float64 and bfloat16 modules keep their dtype", "[linear]") {
  torch::manual_seed(19);
  const auto dtype = GENERATE(torch::kDouble, torch::kBFloat16);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(8, 4), StyleInjectOptions(2));
  layer->to(dtype);
  randomize_adapter(*layer);
  const auto out = layer(torch::randn({2, 5, 8}).to(dtype));
  CHECK(out.scalar_type() == dtype);
  CHECK(
      layer->style_weights(torch::randn({2, 5, 8}).to(dtype)).scalar_type() ==
      (dtype == torch::kDouble ? torch::kDouble : torch::kFloat));
}

TEST_CASE("clone() gives an independent copy", "[linear]") {
  torch::manual_seed(20);
  torch::nn::Linear base(8, 4);
  StyleInjectLinear layer(base, StyleInjectOptions(2).branches(3));
  randomize_adapter(*layer);
  layer->set_scale(0.5);
  auto copy = std::dynamic_pointer_cast<styleinject::StyleInjectLinearImpl>(
      layer->clone());
  REQUIRE(copy);
  const auto x = torch::randn({2, 5, 8});
  CHECK(torch::equal(copy->forward(x), layer(x)));
  CHECK(copy->scale() == 0.5);
  for (const auto& p : copy->named_parameters()) {
    CAPTURE(p.key());
    CHECK_FALSE(p.value().is_same(layer->named_parameters()[p.key()]));
    CHECK(
        p.value().data_ptr() != layer->named_parameters()[p.key()].data_ptr());
  }
  {
    torch::NoGradGuard no_grad;
    for (auto& p : copy->parameters()) {
      p.add_(1.0);
    }
  }
  CHECK_FALSE(torch::allclose(copy->forward(x), layer(x)));
  CHECK(torch::equal(
      base->weight, layer->weight)); // the original still shares with base
}

TEST_CASE("pretty_print is LibTorch's one line", "[linear]") {
  const auto print = [](const StyleInjectLinear& layer) {
    std::ostringstream stream;
    layer->pretty_print(stream);
    return stream.str();
  };
  CHECK(
      print(StyleInjectLinear(
          torch::nn::LinearOptions(320, 640), StyleInjectOptions(4))) ==
      "styleinject::StyleInjectLinear(in_features=320, out_features=640, bias=true, "
      "rank=4, branches=4, alpha=4, router=true, gate=true)");
  CHECK(
      print(StyleInjectLinear(
          torch::nn::LinearOptions(8, 4).bias(false),
          StyleInjectOptions::lora(16).alpha(32))) ==
      "styleinject::StyleInjectLinear(in_features=8, out_features=4, bias=false, "
      "rank=16, branches=1, alpha=32, router=false, gate=false)");
  CHECK(
      print(StyleInjectLinear(
          torch::nn::LinearOptions(8, 4),
          StyleInjectOptions(2)
              .branches(3)
              .dropout(0.1)
              .rslora(true)
              .temperature(0.5))) ==
      "styleinject::StyleInjectLinear(in_features=8, out_features=4, bias=true, "
      "rank=2, branches=3, alpha=2, dropout=0.1, rslora=true, temperature=0.5, "
      "router=true, gate=true)");
}

namespace {

// The same model twice: once with a plain torch::nn::Linear, once with the
// library's layer in its place, as a user changes their model.
struct PlainNetImpl : torch::nn::Module {
  PlainNetImpl() {
    embed = register_module("embed", torch::nn::Linear(6, 8));
    proj = register_module("proj", torch::nn::Linear(8, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return proj(torch::relu(embed(x)));
  }
  torch::nn::Linear embed{nullptr}, proj{nullptr};
};
TORCH_MODULE(PlainNet);

struct AdaptedNetImpl : torch::nn::Module {
  AdaptedNetImpl() {
    embed = register_module("embed", torch::nn::Linear(6, 8));
    proj = register_module(
        "proj",
        StyleInjectLinear(
            torch::nn::LinearOptions(8, 4), StyleInjectOptions(2)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return proj(torch::relu(embed(x)));
  }
  torch::nn::Linear embed{nullptr};
  StyleInjectLinear proj{nullptr};
};
TORCH_MODULE(AdaptedNet);

} // namespace

TEST_CASE(
    "checkpoints: base checkpoints load unchanged, adapters round-trip",
    "[linear][serialize]") {
  torch::manual_seed(21);
  const auto x = torch::randn({2, 5, 6});

  SECTION("a checkpoint of the plain model loads into the adapted model") {
    TempFile file("plain.pt");
    PlainNet plain;
    torch::save(plain, file.path);
    AdaptedNet adapted;
    torch::load(adapted, file.path);
    CHECK(torch::equal(adapted->proj->weight, plain->proj->weight));
    CHECK(torch::equal(adapted->embed->weight, plain->embed->weight));
    CHECK(torch::equal(adapted(x), plain(x))); // fresh adapter: identity
  }
  SECTION("a checkpoint of the adapted model loads into the plain model") {
    TempFile file("adapted.pt");
    AdaptedNet adapted;
    torch::save(adapted, file.path);
    PlainNet plain;
    torch::load(plain, file.path);
    CHECK(torch::equal(plain->proj->weight, adapted->proj->weight));
  }
  SECTION("save -> load into a fresh model gives identical outputs") {
    TempFile file("roundtrip.pt");
    AdaptedNet trained;
    randomize_adapter(*trained->proj);
    torch::save(trained, file.path);
    AdaptedNet fresh;
    CHECK_FALSE(torch::equal(fresh(x), trained(x)));
    torch::load(fresh, file.path);
    CHECK(torch::equal(fresh(x), trained(x)));
    for (const auto& p : trained->named_parameters()) {
      CHECK(torch::equal(fresh->named_parameters()[p.key()], p.value()));
    }
  }
  SECTION("a layer without bias round-trips") {
    TempFile file("no_bias.pt");
    StyleInjectLinear saved(
        torch::nn::LinearOptions(8, 4).bias(false), StyleInjectOptions(2));
    randomize_adapter(*saved);
    torch::save(saved, file.path);
    StyleInjectLinear loaded(
        torch::nn::LinearOptions(8, 4).bias(false), StyleInjectOptions(2));
    torch::load(loaded, file.path);
    const auto x = torch::randn({2, 5, 8});
    CHECK(torch::equal(loaded(x), saved(x)));
  }
  SECTION("a checkpoint without the base weight is refused") {
    TempFile file("no_weight.pt");
    StyleInjectLinear layer(
        torch::nn::LinearOptions(8, 4), StyleInjectOptions(2));
    torch::serialize::OutputArchive empty;
    empty.save_to(file.path);
    CHECK(
        error_of([&] { torch::load(layer, file.path); }) ==
        "styleinject::StyleInjectLinear: the checkpoint has no 'weight'");
  }
  SECTION("the adapter tensors alone round-trip through torch::save") {
    TempFile file("adapter.pt");
    StyleInjectLinear layer(
        torch::nn::LinearOptions(8, 4), StyleInjectOptions(2));
    randomize_adapter(*layer);
    torch::save(layer->adapter_parameters(), file.path);
    std::vector<torch::Tensor> loaded;
    torch::load(loaded, file.path);
    const auto saved = layer->adapter_parameters();
    REQUIRE(loaded.size() == saved.size());
    for (size_t i = 0; i < saved.size(); ++i) {
      CHECK(torch::equal(loaded[i], saved[i]));
    }
  }
  SECTION("a checkpoint that does not fit is refused and changes nothing") {
    TempFile file("other_rank.pt");
    StyleInjectLinear rank4(
        torch::nn::LinearOptions(8, 4), StyleInjectOptions(4));
    torch::save(rank4, file.path);
    StyleInjectLinear rank2(
        torch::nn::LinearOptions(8, 4), StyleInjectOptions(2));
    randomize_adapter(*rank2);
    std::vector<torch::Tensor> before;
    for (const auto& p : rank2->parameters()) {
      before.push_back(p.clone());
    }
    CHECK(
        error_of([&] { torch::load(rank2, file.path); }) ==
        "styleinject::StyleInjectLinear: expected 'lora_A' of shape [4, 2, 8] in the "
        "checkpoint, but got [4, 4, 8]");
    const auto after = rank2->parameters();
    for (size_t i = 0; i < before.size(); ++i) {
      CHECK(torch::equal(after[i], before[i]));
    }
  }
  SECTION("a checkpoint with part of an adapter is refused") {
    TempFile file("partial.pt");
    StyleInjectLinear with_gate(
        torch::nn::LinearOptions(8, 4), StyleInjectOptions(2).router(false));
    torch::save(with_gate, file.path);
    StyleInjectLinear with_router(
        torch::nn::LinearOptions(8, 4), StyleInjectOptions(2));
    CHECK(
        error_of([&] { torch::load(with_router, file.path); }) ==
        "styleinject::StyleInjectLinear: the checkpoint has 3 of the adapter's 5 "
        "tensors; expected all of them, or none for a base-layer checkpoint");
  }
}

namespace {

/// Mean squared error of `model` against the teacher on a batch.
double mse(
    StyleInjectLinear& model,
    const torch::Tensor& x,
    const torch::Tensor& y) {
  torch::NoGradGuard no_grad;
  return torch::mse_loss(model(x), y).item<double>();
}

} // namespace

TEST_CASE(
    "learning: StyleInject fits a style-dependent target that LoRA cannot",
    "[learning]") {
  // Each instance is a sequence of tokens in one of four styles, visible in
  // the sequence mean. The target is a teacher StyleInject layer whose
  // router separates the styles: per style, a different low-rank update and
  // a different per-channel change of variance. A zero-initialised student
  // of the same form can reach it; LoRA, the same update for every input,
  // cannot, even with more parameters.
  torch::manual_seed(22);
  const int64_t d = 16, tokens = 16, styles = 4, batch = 64, steps = 400;
  torch::nn::Linear base(d, d);
  const auto centres = torch::randn({styles, d}) * 1.5;
  StyleInjectLinear teacher(base, StyleInjectOptions(2).branches(styles));
  {
    torch::NoGradGuard no_grad;
    teacher->lora_B.normal_(0.0, 0.5);
    teacher->router->weight.copy_(centres * 2.0);
    teacher->gate.normal_(0.0, 1.0);
  }
  const auto sample = [&](int64_t n) {
    const auto style = torch::randint(styles, {n});
    return centres.index_select(0, style).unsqueeze(1) +
        torch::randn({n, tokens, d});
  };
  const auto x_eval = sample(512);
  torch::Tensor y_eval;
  {
    torch::NoGradGuard no_grad;
    y_eval = teacher(x_eval);
  }

  const auto train = [&](StyleInjectLinear student) {
    torch::optim::Adam optimizer(
        student->adapter_parameters(), torch::optim::AdamOptions(1e-2));
    for (int64_t step = 0; step < steps; ++step) {
      const auto x = sample(batch);
      torch::Tensor y;
      {
        torch::NoGradGuard no_grad;
        y = teacher(x);
      }
      optimizer.zero_grad();
      torch::mse_loss(student(x), y).backward();
      optimizer.step();
    }
    return mse(student, x_eval, y_eval);
  };

  StyleInjectLinear student(base, StyleInjectOptions(2).branches(styles));
  const double initial = mse(student, x_eval, y_eval);
  const int64_t budget = count(student->adapter_parameters());
  // LoRA gets at least the same budget: the smallest rank that reaches it.
  const int64_t lora_rank = (budget + 2 * d - 1) / (2 * d);
  StyleInjectLinear lora(base, StyleInjectOptions::lora(lora_rank));
  REQUIRE(count(lora->adapter_parameters()) >= budget);

  const double styleinject_final = train(student);
  const double lora_final = train(lora);
  CAPTURE(initial, styleinject_final, lora_final, budget, lora_rank);
  WARN(
      "initial " << initial << ", StyleInject " << styleinject_final << " ("
                 << budget << " parameters), LoRA rank " << lora_rank << " "
                 << lora_final);
  CHECK(styleinject_final < initial / 10);
  CHECK(styleinject_final < lora_final);
}

TEST_CASE(
    "on CUDA: same numbers as on the CPU, no host synchronisation",
    "[.cuda]") {
  // main() reports this case as skipped (CTest's SKIP_RETURN_CODE) when there
  // is no CUDA device; run explicitly without one, it fails here.
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(23);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(64, 48), StyleInjectOptions(4).branches(4));
  randomize_adapter(*layer);
  const auto x = torch::randn({4, 33, 64});
  const auto on_cpu = layer(x);
  auto on_gpu = std::dynamic_pointer_cast<styleinject::StyleInjectLinearImpl>(
      layer->clone(torch::kCUDA));
  REQUIRE(on_gpu->lora_A.is_cuda());
  const auto x_gpu = x.to(torch::kCUDA);
  CHECK(torch::allclose(on_gpu->forward(x_gpu).cpu(), on_cpu, 1e-4, 1e-4));
  on_gpu->set_style(torch::tensor({0.1f, 0.2f, 0.3f, 0.4f}).to(torch::kCUDA));
  on_gpu->forward(
      x_gpu); // the first forward after set_style settles its device
  on_gpu->clear_style();
#ifdef STYLEINJECT_TEST_CUDA_SYNC_DEBUG
  // Any host synchronisation inside forward or backward now throws.
  c10::cuda::warning_state().set_sync_debug_mode(
      c10::cuda::SyncDebugMode::L_ERROR);
#endif
  for (const auto path :
       {styleinject::ComputePath::kMerged,
        styleinject::ComputePath::kStacked}) {
    on_gpu->options->path(path);
    on_gpu->forward(x_gpu).pow(2).sum().backward();
    on_gpu->forward(x_gpu.select(1, 0)).sum().backward(); // no token axis
  }
#ifdef STYLEINJECT_TEST_CUDA_SYNC_DEBUG
  c10::cuda::warning_state().set_sync_debug_mode(
      c10::cuda::SyncDebugMode::L_DISABLED);
#endif
  for (const auto& p : on_gpu->adapter_parameters()) {
    REQUIRE(p.grad().defined());
    CHECK(p.grad().is_cuda());
  }
  SECTION("bfloat16 on CUDA keeps its dtype") {
    on_gpu->to(torch::kBFloat16);
    CHECK(
        on_gpu->forward(x_gpu.to(torch::kBFloat16)).scalar_type() ==
        torch::kBFloat16);
  }
}
