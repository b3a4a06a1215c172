// Several named adapters per layer: the sum against the naive float64
// reference, the controls by name, the parameter names, checkpoints, adapter
// files, LoRA files and merge by name, and the refusals.

#include "support.h"

#include <catch2/catch.hpp>

#ifdef STYLEINJECT_TEST_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using styleinject::GateMode;
using styleinject::StyleInjectConv2d;
using styleinject::StyleInjectLinear;
using styleinject::StyleInjectOptions;
using styleinject::Targets;
using styleinject_test::error_of;
using styleinject_test::randomize_adapter;
using styleinject_test::reference_forward;
using styleinject_test::reference_of;
using styleinject_test::reference_sum_forward;
using styleinject_test::TempDir;

namespace {

/// A Linear and a Conv2d layer, as a model.
struct Net : torch::nn::Module {
  Net()
      : proj(register_module("proj", StyleInjectLinear(6, 5))),
        conv(register_module(
            "conv",
            StyleInjectConv2d(torch::nn::Conv2dOptions(3, 4, 3).padding(1)))) {}
  /// Both layers' outputs, flattened into one tensor.
  torch::Tensor forward(
      const torch::Tensor& tokens,
      const torch::Tensor& image) {
    return torch::cat({proj(tokens).flatten(), conv(image).flatten()});
  }
  StyleInjectLinear proj;
  StyleInjectConv2d conv;
};

/// A Net, seeded, with a "default" StyleInject adapter and an "ink" LoRA,
/// every adapter tensor random.
std::shared_ptr<Net> two_adapter_net(uint64_t seed) {
  torch::manual_seed(seed);
  auto net = std::make_shared<Net>();
  styleinject::inject(*net, Targets::all(), StyleInjectOptions(2).branches(3));
  styleinject::inject(
      *net, Targets::all().adapter("ink"), StyleInjectOptions::lora(3));
  randomize_adapter(*net->proj);
  randomize_adapter(*net->conv);
  return net;
}

std::vector<std::string> keys(const torch::nn::Module& module) {
  std::vector<std::string> names;
  for (const auto& parameter : module.named_parameters()) {
    names.push_back(parameter.key());
  }
  return names;
}

} // namespace

TEST_CASE(
    "two adapters sum as the naive reference, the gates applied in turn",
    "[adapters]") {
  torch::manual_seed(0);
  StyleInjectLinear layer(
      torch::nn::LinearOptions(6, 5), StyleInjectOptions(2).branches(3));
  layer->to(torch::kDouble);
  layer->add_adapter(StyleInjectOptions(3).branches(2).alpha(5.0), "ink");
  randomize_adapter(*layer);
  layer->set_scale(0.7);
  layer->set_scale(-0.4, "ink");
  const auto x = torch::randn({3, 4, 6}, torch::kDouble);

  const auto expected = reference_sum_forward(
      {reference_of(*layer, 0.7), reference_of(*layer, -0.4, "ink")}, x, true);
  CHECK(torch::allclose(layer(x), expected, 1e-10, 1e-12));

  // A fixed style on one, and an input without tokens (no gate).
  layer->set_style(torch::tensor({0.2, 0.8}, torch::kDouble), "ink");
  const auto both = std::vector<styleinject_test::ReferenceLinear>{
      reference_of(*layer, 0.7), reference_of(*layer, -0.4, "ink")};
  CHECK(torch::allclose(
      layer(x), reference_sum_forward(both, x, true), 1e-10, 1e-12));
  const auto rows = torch::randn({3, 6}, torch::kDouble);
  CHECK(torch::allclose(
      layer(rows),
      reference_sum_forward(both, rows.unsqueeze(1), false).squeeze(1),
      1e-10,
      1e-12));

  // One enabled: exactly that adapter's own forward.
  layer->set_enabled(false, "ink");
  CHECK(torch::allclose(
      layer(x),
      reference_forward(reference_of(*layer, 0.7), x, true),
      1e-10,
      1e-12));
  layer->set_enabled(false);
  layer->set_enabled(true, "ink");
  CHECK(torch::allclose(
      layer(x),
      reference_forward(reference_of(*layer, -0.4, "ink"), x, true),
      1e-10,
      1e-12));
  // None enabled: the base layer, bit for bit.
  layer->set_enabled(false, "ink");
  CHECK(torch::equal(
      layer(x), torch::nn::functional::linear(x, layer->weight, layer->bias)));
}

TEST_CASE(
    "two adapters on a Conv2d sum their updates and multiply their gates",
    "[adapters]") {
  torch::manual_seed(1);
  StyleInjectConv2d layer(
      torch::nn::Conv2dOptions(3, 4, 3).padding(1).stride(2),
      StyleInjectOptions(2).branches(3));
  layer->to(torch::kDouble);
  layer->add_adapter(StyleInjectOptions(2).branches(2), "ink");
  randomize_adapter(*layer);
  layer->set_scale(0.5, "ink");
  const auto x = torch::randn({2, 3, 7, 7}, torch::kDouble);
  const auto conv = torch::nn::functional::Conv2dFuncOptions()
                        .bias(layer->bias)
                        .padding(1)
                        .stride(2);
  const auto base = torch::nn::functional::conv2d(x, layer->weight, conv);

  // Each adapter alone, the other disabled.
  const auto alone = [&](const std::string& name) {
    for (const auto& other : layer->adapter_names()) {
      layer->set_enabled(other == name, other);
    }
    auto out = layer(x);
    for (const auto& other : layer->adapter_names()) {
      layer->set_enabled(true, other);
    }
    return out;
  };
  // u = base + dh_default + dh_ink; h = m + (1+g1)(1+g2)(u - m), with each
  // dh_k and g_k read off the adapter alone: h_k = m_k + (1+g_k)(u_k - m_k)
  // where u_k = base + dh_k and m_k its H×W mean. g_k per instance and
  // channel from the gate tensor and the router's style weights.
  std::vector<torch::Tensor> gains, updates;
  for (const auto& name : layer->adapter_names()) {
    const auto s = layer->style_weights(x, name); // (N, n)
    const auto tensors = layer->adapter_tensors(name);
    gains.push_back(
        torch::tanh(torch::matmul(s, tensors.gate) * layer->scale(name)));
    const auto h = alone(name);
    const auto g = gains.back().view({2, 4, 1, 1});
    // Undo the gate: u_k - m_k = (h_k - m_k) / (1 + g_k), m_k = mean(h_k).
    const auto m = h.mean({2, 3}, true);
    updates.push_back(m + (h - m) / (1 + g) - base);
  }
  const auto u = base + updates[0] + updates[1];
  const auto m = u.mean({2, 3}, true);
  const auto expected = m +
      (1 + gains[0].view({2, 4, 1, 1})) * (1 + gains[1].view({2, 4, 1, 1})) *
          (u - m);
  CHECK(torch::allclose(layer(x), expected, 1e-10, 1e-12));
}

TEST_CASE(
    "named adapters have their own parameters, controls and errors",
    "[adapters]") {
  torch::manual_seed(2);
  StyleInjectLinear layer(6, 5);
  layer->add_adapter(StyleInjectOptions(2));
  layer->add_adapter(StyleInjectOptions::lora(4), "ink");
  // The first keeps SPEC §5's names; the others are children.
  CHECK(
      keys(*layer) ==
      std::vector<std::string>{
          "weight",
          "bias",
          "lora_A",
          "lora_B",
          "gate",
          "router.weight",
          "router.bias",
          "ink.lora_A",
          "ink.lora_B"});
  CHECK(layer->adapter_names() == std::vector<std::string>{"default", "ink"});
  CHECK(layer->adapter_parameters("ink").size() == 2);
  CHECK(layer->adapter_parameters().size() == 7);
  CHECK(layer->named_adapter_parameters("ink")[0].first == "lora_A");
  std::ostringstream printed;
  printed << *layer;
  CHECK(
      printed.str() ==
      "styleinject::StyleInjectLinear(in_features=6, out_features=5, "
      "bias=true, rank=2, branches=4, alpha=2, router=true, gate=scale)(\n"
      "  (router): torch::nn::Linear(in_features=6, out_features=4, "
      "bias=true)\n"
      "  (ink): styleinject::Adapter(rank=4, branches=1, alpha=4, "
      "router=false, gate=off)\n"
      ")");

  // Controls by name leave the other adapter as it was.
  layer->set_scale(0.5, "ink");
  layer->set_style(torch::tensor({1.f}), "ink");
  CHECK(layer->scale() == 1.0);
  CHECK(!layer->style().defined());
  CHECK(layer->scale("ink") == 0.5);

  CHECK(
      error_of([&] { layer->set_scale(2.0, "inc"); }) ==
      "styleinject::StyleInjectLinear: set_scale() needs the adapter 'inc', "
      "but the layer has only ['default', 'ink']; add one with add_adapter() "
      "or styleinject::inject()");
  CHECK(
      error_of([&] { layer->add_adapter(StyleInjectOptions(2), "ink"); }) ==
      "styleinject::StyleInjectLinear: add_adapter(\"ink\"): the layer has an "
      "adapter already under the name 'ink'; remove_adapter(\"ink\") takes it "
      "off");
  CHECK(
      error_of([&] { layer->add_adapter(StyleInjectOptions(2), "router"); }) ==
      "styleinject::StyleInjectLinear: add_adapter(\"router\"): the adapter "
      "name 'router' is taken by the layer's own parameters; choose another");
  CHECK(
      error_of([&] { layer->add_adapter(StyleInjectOptions(2), "a.b"); }) ==
      "styleinject::StyleInjectLinear: add_adapter(\"a.b\"): expected an "
      "adapter name of letters, digits, '_' and '-', but got 'a.b'");
  CHECK(
      error_of([&] {
        layer->add_adapter(StyleInjectOptions(2).gate(GateMode::kAdain), "x");
      }) ==
      "styleinject::StyleInjectLinear: add_adapter(\"x\"): the layer would "
      "have adapters ['default', 'ink', 'x'], but 'x' has gate=adain, which "
      "takes an adapter alone; several adapters need gate=scale or gate=off "
      "on each");
  CHECK(layer->adapter_names().size() == 2);

  // Removing one leaves the other, and its forward.
  randomize_adapter(*layer);
  const auto x = torch::randn({2, 3, 6});
  layer->set_enabled(false, "ink");
  const auto first = layer(x);
  layer->remove_adapter("ink");
  CHECK(keys(*layer).size() == 7);
  CHECK(torch::equal(layer(x), first));
}

TEST_CASE("the model-wide functions act on adapters by name", "[adapters]") {
  auto net = two_adapter_net(3);
  // inject froze the first adapter when it attached the second.
  for (const auto& p : styleinject::adapter_parameters(*net, "default")) {
    CHECK(!p.requires_grad());
  }
  for (const auto& p :
       styleinject::adapter_parameters(*net, std::string("ink"))) {
    CHECK(p.requires_grad());
  }
  CHECK(
      styleinject::adapter_names(*net) ==
      std::vector<std::string>{"default", "ink"});
  const auto report = styleinject::report(*net);
  REQUIRE(report.layers.size() == 4);
  CHECK(report.layers[1].adapter == "ink");
  std::ostringstream table;
  table << report;
  CHECK(table.str().find("proj [ink]") != std::string::npos);
  CHECK(table.str().find("2 adapted layers") != std::string::npos);

  const auto tokens = torch::randn({2, 3, 6});
  const auto image = torch::randn({2, 3, 5, 5});
  // set_adapters as diffusers: the named ones with their scales, the rest
  // off.
  styleinject::set_adapters(*net, {{"ink", 0.25}});
  CHECK(!net->proj->is_enabled());
  CHECK(net->conv->is_enabled("ink"));
  CHECK(net->conv->scale("ink") == 0.25);
  const auto ink_only = net->forward(tokens, image);
  styleinject::set_adapters(*net, {{"default", 1.0}, {"ink", 0.25}});
  styleinject::set_enabled(*net, false, Targets::all().adapter("default"));
  CHECK(torch::equal(net->forward(tokens, image), ink_only));
  CHECK(
      error_of([&] {
        styleinject::set_adapters(*net, {{"inc", 1.0}});
      }) ==
      "styleinject::set_adapters: the model has no adapter 'inc'; it has "
      "['default', 'ink']");
  CHECK(
      error_of([&] {
        styleinject::set_scale(*net, 1.0, Targets::all().adapter("inc"));
      }) ==
      "styleinject::set_scale: the model has no adapters named 'inc'; it has "
      "['default', 'ink']");

  styleinject::delete_adapter(*net, "ink");
  CHECK(
      styleinject::adapter_names(*net) == std::vector<std::string>{"default"});
  CHECK(!net->conv->has_adapter("ink"));
}

TEST_CASE("checkpoints and clones carry every named adapter", "[adapters]") {
  auto net = two_adapter_net(4);
  net->proj->set_scale(0.5, "ink");
  const auto tokens = torch::randn({2, 3, 6});
  const auto image = torch::randn({2, 3, 5, 5});
  const auto expected = net->forward(tokens, image);

  // torch::save / torch::load into a model without adapters attaches both.
  std::stringstream stream;
  torch::save(net, stream);
  auto fresh = std::make_shared<Net>();
  torch::load(fresh, stream);
  CHECK(
      fresh->proj->adapter_names() ==
      std::vector<std::string>{"default", "ink"});
  fresh->proj->set_scale(0.5, "ink"); // controls are not in checkpoints
  CHECK(torch::equal(fresh->forward(tokens, image), expected));

  // clone: equal outputs, its own storage, the controls along.
  auto copy = std::dynamic_pointer_cast<styleinject::StyleInjectLinearImpl>(
      net->proj->clone());
  REQUIRE(copy);
  CHECK(torch::equal(copy->forward(tokens), net->proj(tokens)));
  CHECK(
      copy->adapter_tensors("ink").lora_A.data_ptr() !=
      net->proj->adapter_tensors("ink").lora_A.data_ptr());
  CHECK(copy->scale("ink") == 0.5);
  CHECK(keys(*copy) == keys(*net->proj));

  // A named adapter with a router of its own: cloned, saved and loaded.
  StyleInjectLinear routed(6, 5);
  routed->add_adapter(StyleInjectOptions(2).branches(2), "mix");
  randomize_adapter(*routed);
  auto routed_copy =
      std::dynamic_pointer_cast<styleinject::StyleInjectLinearImpl>(
          routed->clone());
  CHECK(torch::equal(routed_copy->forward(tokens), routed(tokens)));
  CHECK(
      routed_copy->adapter_tensors("mix").router_weight.data_ptr() !=
      routed->adapter_tensors("mix").router_weight.data_ptr());
  std::stringstream routed_stream;
  torch::save(routed, routed_stream);
  StyleInjectLinear routed_fresh(6, 5);
  torch::load(routed_fresh, routed_stream);
  CHECK(
      keys(*routed_fresh) ==
      std::vector<std::string>{
          "weight",
          "bias",
          "mix.lora_A",
          "mix.lora_B",
          "mix.gate",
          "mix.router.weight",
          "mix.router.bias"});
  CHECK(torch::equal(routed_fresh(tokens), routed(tokens)));

  // A checkpoint whose named adapter has other options is refused whole.
  auto other = std::make_shared<Net>();
  styleinject::inject(
      *other, Targets::all().adapter("ink"), StyleInjectOptions::lora(2));
  stream.seekg(0);
  CHECK(
      error_of([&] { torch::load(other, stream); })
          .find("adapter 'ink': the layer's adapter has other options than the "
                "checkpoint's") != std::string::npos);
  CHECK(other->proj->adapter_names() == std::vector<std::string>{"ink"});
}

TEST_CASE(
    "a checkpoint whose adapters cannot sit together changes nothing",
    "[adapters]") {
  // Made by hand (the library never writes one): a first adapter with
  // gate=adain and a named one beside it, for a layer that has neither.
  StyleInjectLinear adain(
      torch::nn::LinearOptions(6, 5),
      StyleInjectOptions(2).gate(GateMode::kAdain));
  StyleInjectLinear named(6, 5);
  named->add_adapter(StyleInjectOptions::lora(2), "ink");
  torch::serialize::OutputArchive archive, ink;
  adain->save(archive);
  named->named_children()["ink"]->save(ink);
  archive.write("ink", ink);
  std::stringstream stream;
  archive.save_to(stream);
  torch::serialize::InputArchive checkpoint;
  checkpoint.load_from(stream);

  StyleInjectLinear fresh(6, 5);
  CHECK(
      error_of([&] { fresh->load(checkpoint); }) ==
      "styleinject::StyleInjectLinear: with the checkpoint, the layer would "
      "have adapters ['default', 'ink'], but 'default' has gate=adain, "
      "which takes an adapter alone; several adapters need gate=scale or "
      "gate=off on each");
  CHECK(fresh->adapter_names().empty());
  CHECK(keys(*fresh) == std::vector<std::string>{"weight", "bias"});
}

TEST_CASE("adapter files save and load by name, in place", "[adapters]") {
  TempDir dir;
  auto net = two_adapter_net(5);
  const auto path = dir.path + "/ink.safetensors";
  styleinject::save_adapters(*net, path, "ink");
  std::vector<std::string> names;
  for (const auto& tensor : styleinject::load_safetensors(path).tensors) {
    names.push_back(tensor.first);
  }
  // SPEC §5's names whatever the adapter's name: the file loads anywhere.
  std::sort(names.begin(), names.end());
  CHECK(
      names ==
      std::vector<std::string>{
          "conv.lora_A", "conv.lora_B", "proj.lora_A", "proj.lora_B"});

  // Into a fresh model under another name, beside nothing.
  auto fresh = std::make_shared<Net>();
  styleinject::load_adapters(*fresh, path, "community");
  CHECK(torch::equal(
      fresh->proj->adapter_tensors("community").lora_A,
      net->proj->adapter_tensors("ink").lora_A));

  // Hot swap into the attached "ink": the same storage, the file's values.
  auto target = two_adapter_net(6);
  const auto before = target->proj->adapter_tensors("ink").lora_A;
  const void* storage = before.data_ptr();
  const auto other_path = dir.path + "/ink7.safetensors";
  styleinject::save_adapters(*two_adapter_net(7), other_path, "ink");
  styleinject::load_adapters(*target, other_path, "ink");
  CHECK(target->proj->adapter_tensors("ink").lora_A.data_ptr() == storage);
  CHECK(torch::equal(
      target->proj->adapter_tensors("ink").lora_A,
      two_adapter_net(7)->proj->adapter_tensors("ink").lora_A));
  // The default adapter was left alone.
  CHECK(torch::equal(target->proj->lora_A, two_adapter_net(6)->proj->lora_A));

  CHECK(
      error_of([&] { styleinject::save_adapters(*net, path, "inc"); })
          .find("nothing to save: the model has no adapters named 'inc'; it "
                "has ['default', 'ink']") != std::string::npos);
}

TEST_CASE(
    "LoRA files export and import by name, and merge folds every enabled "
    "adapter",
    "[adapters]") {
  TempDir dir;
  auto net = two_adapter_net(8);
  net->proj->set_scale(0.3, "ink");
  const auto tokens = torch::randn({2, 3, 6});
  const auto image = torch::randn({2, 3, 5, 5});

  // "ink" out as a PEFT LoRA, in again as "community" beside "default".
  styleinject::export_lora(
      *net,
      dir.path + "/ink",
      styleinject::LoraFormat::kPeft,
      styleinject::ExportLoraOptions().adapter("ink"));
  auto copy = two_adapter_net(8);
  copy->proj->remove_adapter("ink");
  copy->conv->remove_adapter("ink");
  styleinject::import_lora(
      *copy,
      dir.path + "/ink",
      styleinject::ImportLoraOptions().adapter("community"));
  net->proj->set_enabled(false);
  net->conv->set_enabled(false);
  copy->proj->set_enabled(false);
  copy->conv->set_enabled(false);
  // The export folded the scale 0.3 into alpha.
  CHECK(torch::allclose(
      copy->forward(tokens, image), net->forward(tokens, image), 1e-5, 1e-6));
  CHECK(error_of([&] {
          styleinject::import_lora(
              *copy,
              dir.path + "/ink",
              styleinject::ImportLoraOptions().adapter("community"));
        }).find("has an adapter 'community' already") != std::string::npos);

  // Merge folds both adapters of the layer; the default's router reads the
  // input, so it gets a fixed style first.
  net->proj->set_enabled(true);
  net->proj->set_style(torch::tensor({0.5f, 0.25f, 0.25f}));
  const auto unmerged = net->proj(tokens);
  const auto weight = net->proj->weight.clone();
  net->proj->merge();
  CHECK(torch::allclose(net->proj(tokens), unmerged, 1e-5, 1e-6));
  CHECK(
      error_of([&] { net->proj->remove_adapter("ink"); }) ==
      "styleinject::StyleInjectLinear: remove_adapter(\"ink\") while several "
      "adapters are merged into the weight would leave its update there; "
      "unmerge() first");
  net->proj->unmerge();
  CHECK(torch::equal(net->proj->weight, weight));
}

TEST_CASE(
    "on CUDA: two adapters in a captured CUDA graph, hot-swapped in place",
    "[.cuda]") {
  // main() reports this case as skipped without a CUDA device.
  REQUIRE(torch::cuda::is_available());
#ifdef STYLEINJECT_TEST_CUDA_GRAPHS
  TempDir dir;
  const auto swapped = dir.path + "/ink.safetensors";
  styleinject::save_adapters(*two_adapter_net(10), swapped, "ink");
  auto net = two_adapter_net(9);
  net->to(torch::kCUDA);
  net->proj->set_scale(0.6, "ink");
  net->conv->set_style(torch::tensor({0.2f, 0.3f, 0.5f}));
  torch::NoGradGuard no_grad;
  const auto tokens = torch::randn({4, 16, 6}, torch::kCUDA);
  const auto image = torch::randn({4, 3, 12, 12}, torch::kCUDA);

  auto stream = c10::cuda::getStreamFromPool();
  at::cuda::CUDAGraph graph;
  torch::Tensor captured;
  {
    c10::cuda::CUDAStreamGuard on_stream(stream);
    net->forward(tokens, image); // warm-up, outside the capture
    // Any host synchronisation inside forward now throws.
    c10::cuda::warning_state().set_sync_debug_mode(
        c10::cuda::SyncDebugMode::L_ERROR);
    graph.capture_begin();
    captured = net->forward(tokens, image);
    graph.capture_end();
    c10::cuda::warning_state().set_sync_debug_mode(
        c10::cuda::SyncDebugMode::L_DISABLED);
  }
  graph.replay();
  torch::cuda::synchronize();
  const auto before = captured.clone();
  CHECK(torch::allclose(before, net->forward(tokens, image), 1e-5, 1e-6));

  // load_adapters copies into the tensors the graph reads: a replay gives
  // the new adapter's output without capturing again.
  styleinject::load_adapters(*net, swapped, "ink");
  graph.replay();
  torch::cuda::synchronize();
  CHECK(torch::allclose(captured, net->forward(tokens, image), 1e-5, 1e-6));
  CHECK_FALSE(torch::allclose(captured, before, 1e-3, 1e-3));
  // And the summed adapters on CUDA agree with the CPU.
  const auto on_cuda = captured.cpu();
  net->to(torch::kCPU);
  CHECK(torch::allclose(
      net->forward(tokens.cpu(), image.cpu()), on_cuda, 1e-4, 1e-5));
#else
  FAIL("a CUDA device, but a LibTorch build without CUDA graphs");
#endif
}
