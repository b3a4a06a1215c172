// LoRA files of the Python tools: export_lora (PEFT directories, kohya
// files) and import_lora (PEFT, kohya, diffusers), round trips, the plain
// LoRA a StyleInject adapter becomes, and what each refuses. The peer half,
// against PEFT and diffusers themselves, is tests/interop/peft_interop.py
// with the hidden case [interop-peft] at the end.

#include "support.h"

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

using styleinject::export_lora;
using styleinject::ExportLoraOptions;
using styleinject::GateMode;
using styleinject::import_lora;
using styleinject::ImportLoraOptions;
using styleinject::inject;
using styleinject::LoraFormat;
using styleinject::Override;
using styleinject::StyleInjectOptions;
using styleinject::Targets;
using styleinject_test::error_of;
using styleinject_test::near_reference;
using styleinject_test::reference_forward;
using styleinject_test::reference_of;
using styleinject_test::snapshot;
using styleinject_test::TempDir;
using styleinject_test::TinyNet;

namespace {

/// Seeded random values in every adapter of `model`.
void randomize_adapters(torch::nn::Module& model, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (auto& p : styleinject::adapter_parameters(model)) {
    p.copy_(torch::randn_like(p) * 0.5);
  }
}

TinyNet base_net() {
  torch::manual_seed(81);
  return TinyNet();
}

/// base_net() with adapters on the attention's q and v (rank 2) and the
/// ResBlocks' first convolutions (rank 3), random values in them.
TinyNet adapted_net(const StyleInjectOptions& options) {
  auto model = base_net();
  inject(
      *model,
      Targets::suffixes({"to_q", "to_v", "body.0"})
          .with(".*body\\.0", Override().rank(3)),
      options);
  randomize_adapters(*model, 82);
  return model;
}

struct Inputs {
  torch::Tensor x = torch::randn({2, 4, 5, 5});
  torch::Tensor context = torch::randn({2, 3, 6});
};

nlohmann::json read_json(const std::string& path) {
  std::ifstream file(path);
  return nlohmann::json::parse(
      std::string(std::istreambuf_iterator<char>(file), {}));
}

std::map<std::string, torch::Tensor> tensors_of(const std::string& path) {
  std::map<std::string, torch::Tensor> tensors;
  for (auto& item : styleinject::load_safetensors(path).tensors) {
    tensors[item.first] = item.second;
  }
  return tensors;
}

} // namespace

TEST_CASE(
    "export_lora -> import_lora: LoRA adapters, the same outputs",
    "[lora-files]") {
  TempDir dir;
  const Inputs in;
  auto trained = adapted_net(StyleInjectOptions::lora(2).alpha(6));
  const auto expected = trained(in.x, in.context);

  SECTION("a PEFT directory") {
    const auto path = dir.path + "/peft";
    export_lora(*trained, path, LoraFormat::kPeft);
    // PEFT's config: the common rank and alpha, the others by pattern.
    const auto config = read_json(path + "/adapter_config.json");
    CHECK(config["peft_type"] == "LORA");
    CHECK(config["r"] == 2);
    CHECK(config["lora_alpha"] == 6.0);
    CHECK(
        config["target_modules"] ==
        nlohmann::json{
            "blocks.0.body.0", "blocks.1.body.0", "attn.to_q", "attn.to_v"});
    CHECK(
        config["rank_pattern"] ==
        nlohmann::json{
            {"^blocks\\.0\\.body\\.0", 3}, {"^blocks\\.1\\.body\\.0", 3}});
    CHECK(config["alpha_pattern"] == nlohmann::json::object());
    const auto tensors = tensors_of(path + "/adapter_model.safetensors");
    CHECK(tensors.size() == 8);
    CHECK(
        tensors.at("base_model.model.attn.to_q.lora_A.weight").sizes() ==
        std::vector<int64_t>{2, 4});
    CHECK(
        tensors.at("base_model.model.blocks.0.body.0.lora_B.weight").sizes() ==
        std::vector<int64_t>{4, 3, 1, 1});

    auto fresh = base_net();
    const auto report = import_lora(*fresh, path);
    CHECK(report.format == LoraFormat::kPeft);
    REQUIRE(report.layers.size() == 4);
    CHECK(report.layers[0].name == "blocks.0.body.0");
    CHECK(report.layers[0].module == "base_model.model.blocks.0.body.0");
    CHECK(report.layers[0].rank == 3);
    CHECK(report.layers[0].alpha == 6.0);
    CHECK(torch::allclose(fresh(in.x, in.context), expected, 1e-6, 1e-6));
  }
  SECTION("a kohya file") {
    const auto path = dir.path + "/kohya.safetensors";
    export_lora(*trained, path, LoraFormat::kKohya);
    const auto tensors = tensors_of(path);
    CHECK(tensors.size() == 12);
    CHECK(
        tensors.at("lora_unet_attn_to_q.lora_down.weight").sizes() ==
        std::vector<int64_t>{2, 4});
    CHECK(
        tensors.at("lora_unet_blocks_1_body_0.lora_up.weight").sizes() ==
        std::vector<int64_t>{4, 3, 1, 1});
    CHECK(tensors.at("lora_unet_attn_to_v.alpha").item<double>() == 6.0);

    auto fresh = base_net();
    const auto report = import_lora(*fresh, path);
    CHECK(report.format == LoraFormat::kKohya);
    CHECK(report.layers.size() == 4);
    CHECK(torch::allclose(fresh(in.x, in.context), expected, 1e-6, 1e-6));
  }
}

TEST_CASE(
    "export_lora: a StyleInject adapter as the plain LoRA of its style",
    "[lora-files]") {
  TempDir dir;
  const auto path = dir.path + "/kohya.safetensors";
  const Inputs in;
  auto trained = adapted_net(StyleInjectOptions(2).branches(3).alpha(3));
  const auto style = torch::tensor({0.2f, 0.5f, 0.3f});

  CHECK(
      error_of([&] { export_lora(*trained, path, LoraFormat::kKohya); }) ==
      "styleinject::export_lora: '" + path +
          "': cannot export layer 'blocks.0.body.0' as a LoRA: its router "
          "picks a style per input, so no one weight serves every input; fix "
          "one style of shape [3] with set_style()");
  styleinject::set_style(*trained, style);
  CHECK(
      error_of([&] { export_lora(*trained, path, LoraFormat::kKohya); }) ==
      "styleinject::export_lora: '" + path +
          "': layer 'blocks.0.body.0' has gate=scale, which a LoRA file "
          "cannot hold; ExportLoraOptions().drop_gate(true) exports its "
          "low-rank update alone, without the variance gate");
  CHECK(TempDir::names_in(dir.path).empty());

  styleinject::set_scale(*trained, 0.8);
  export_lora(
      *trained, path, LoraFormat::kKohya, ExportLoraOptions().drop_gate(true));
  // alpha / r = scaling · scale: 3/2 · 0.8 for rank 2, 3/3 · 0.8 for rank 3.
  const auto tensors = tensors_of(path);
  CHECK(
      tensors.at("lora_unet_attn_to_q.alpha").item<double>() ==
      Approx(2 * 1.5 * 0.8));
  CHECK(
      tensors.at("lora_unet_blocks_0_body_0.alpha").item<double>() ==
      Approx(3 * 1.0 * 0.8));
  auto fresh = base_net();
  import_lora(*fresh, path);
  // The imported LoRA is the naive reference without the gate.
  const auto x = torch::randn({2, 5, 4});
  auto p = reference_of(*trained->attn->to_q, 0.8);
  p.gate = torch::Tensor();
  CHECK(near_reference(
      fresh->attn->to_q(x),
      reference_forward(p, x, /*has_tokens=*/true),
      1e-6));
}

TEST_CASE(
    "export_lora: gate off and a fixed style export exactly",
    "[lora-files]") {
  TempDir dir;
  const auto path = dir.path + "/peft";
  const Inputs in;
  auto trained =
      adapted_net(StyleInjectOptions(2).branches(3).alpha(3).gate(false));
  styleinject::set_style(*trained, torch::tensor({0.f, 0.25f, 0.75f}));
  // One layer's strength differs: its alpha goes into alpha_pattern, under
  // a key that names it alone.
  styleinject::set_scale(*trained, 0.5, Targets::suffixes({"to_q"}));
  export_lora(*trained, path, LoraFormat::kPeft);
  CHECK(
      read_json(path + "/adapter_config.json")["alpha_pattern"] ==
      nlohmann::json{{"^attn\\.to_q", 1.5}});
  auto fresh = base_net();
  import_lora(*fresh, path);
  CHECK(torch::allclose(
      fresh(in.x, in.context), trained(in.x, in.context), 1e-5, 1e-6));
}

namespace {

/// Writes these tensors as a LoRA file at `path`, with random values in
/// [0.5, 1.5) (an alpha must be positive).
void write_lora(
    const std::string& path,
    const std::vector<std::pair<std::string, std::vector<int64_t>>>& shapes) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& item : shapes) {
    tensors.emplace_back(item.first, torch::rand(item.second) + 0.5);
  }
  styleinject::save_safetensors(path, tensors);
}

} // namespace

TEST_CASE(
    "import_lora: diffusers keys, ranks per layer, alpha given",
    "[lora-files]") {
  TempDir dir;
  const auto path = dir.path + "/lora.safetensors";
  write_lora(
      path,
      {{"unet.attn.to_q.lora_A.weight", {4, 4}},
       {"unet.attn.to_q.lora_B.weight", {4, 4}},
       {"unet.attn.to_q.alpha", {}},
       {"unet.blocks.1.body.3.lora_A.weight", {1, 4, 3, 3}},
       {"unet.blocks.1.body.3.lora_B.weight", {4, 1, 1, 1}}});
  auto model = base_net();
  const auto before = snapshot(*model);
  CHECK(
      error_of([&] { import_lora(*model, path); }) ==
      "styleinject::import_lora: '" + path +
          "': expected an alpha for module 'unet.blocks.1.body.3' (a "
          "'unet.blocks.1.body.3.alpha' tensor, or lora_alpha in a PEFT "
          "adapter directory's adapter_config.json), but the file has none; "
          "pass it with ImportLoraOptions().alpha()");
  CHECK(styleinject::report(*model).layers.empty());

  const auto report = import_lora(
      *model, path, ImportLoraOptions().alpha(2).dtype(torch::kDouble));
  CHECK(report.format == LoraFormat::kDiffusers);
  REQUIRE(report.layers.size() == 2);
  CHECK(report.layers[0].name == "blocks.1.body.3");
  CHECK(report.layers[0].rank == 1);
  CHECK(report.layers[0].alpha == 2.0);
  CHECK(report.layers[1].name == "attn.to_q");
  CHECK(report.layers[1].rank == 4);
  const auto file = tensors_of(path);
  CHECK(
      report.layers[1].alpha == file.at("unet.attn.to_q.alpha").item<double>());
  // The values went in as the file has them, in the dtype asked for.
  auto to_q = model->attn->to_q;
  CHECK(to_q->lora_A.scalar_type() == torch::kDouble);
  CHECK(torch::equal(
      to_q->lora_A[0],
      file.at("unet.attn.to_q.lora_A.weight").to(torch::kDouble)));
  CHECK(to_q->adapter_options->branches() == 1);
  CHECK_FALSE(to_q->adapter_options->router());
  CHECK(to_q->adapter_options->gate() == GateMode::kOff);
  CHECK(torch::equal(model->attn->to_q->weight, before.at("attn.to_q.weight")));
}

TEST_CASE(
    "import_lora refuses what does not fit, and changes nothing",
    "[lora-files]") {
  TempDir dir;
  const auto path = dir.path + "/lora.safetensors";
  auto model = base_net();
  const auto refused =
      [&](const std::vector<std::pair<std::string, std::vector<int64_t>>>&
              shapes) {
        write_lora(path, shapes);
        const auto message = error_of([&] { import_lora(*model, path); });
        CHECK(styleinject::report(*model).layers.empty());
        return message.substr(message.find("': ") + 3);
      };
  CHECK(
      refused(
          {{"lora_unet_attn_to_q.lora_down.weight", {2, 4}},
           {"lora_unet_attn_to_q.lora_up.weight", {4, 2}},
           {"lora_unet_attn_to_q.alpha", {}},
           {"lora_unet_attn_to_z.lora_down.weight", {2, 4}},
           {"lora_unet_attn_to_z.lora_up.weight", {4, 2}},
           {"lora_unet_attn_to_z.alpha", {}}}) ==
      "module 'lora_unet_attn_to_z' (key "
      "'lora_unet_attn_to_z.lora_down.weight') fits no Linear or Conv2d "
      "layer of the model; map it with ImportLoraOptions().rename(), or skip "
      "such modules with strict(false)");
  // Non-strict, the unknown module is skipped and reported.
  const auto lenient =
      import_lora(*base_net(), path, ImportLoraOptions().strict(false));
  CHECK(lenient.layers.size() == 1);
  CHECK(lenient.skipped == std::vector<std::string>{"lora_unet_attn_to_z"});
  CHECK(
      refused(
          {{"lora_unet_attn_to_k.lora_down.weight", {2, 4}},
           {"lora_unet_attn_to_k.lora_up.weight", {4, 2}},
           {"lora_unet_attn_to_k.alpha", {}}}) ==
      "module 'lora_unet_attn_to_k' does not fit layer 'attn.to_k' (Linear 6 "
      "-> 4): expected floating-point 'lora_unet_attn_to_k.lora_down.weight' "
      "[2, 6] and 'lora_unet_attn_to_k.lora_up.weight' [4, 2], but got [2, 4] "
      "and [4, 2]");
  CHECK(
      refused({{"lora_unet_attn_to_k.lora_down.weight", {2, 6}}}) ==
      "expected both the down (A) and the up (B) tensor of module "
      "'lora_unet_attn_to_k', but the file has only "
      "'lora_unet_attn_to_k.lora_down.weight'");
  CHECK(
      refused({{"attn.to_k.weight", {4, 6}}}) ==
      "expected LoRA tensors (keys ending in .lora_A.weight, .lora_B.weight, "
      ".lora_down.weight, .lora_up.weight or .alpha), but got "
      "'attn.to_k.weight'");
  CHECK(
      refused({{"lora_unet_head.lora_down.weight", {2, 4}},
               {"lora_unet_head.lora_up.weight", {3, 2}},
               {"lora_unet_head.alpha", {}}})
          .find("module 'lora_unet_head' names layer 'head', which cannot "
                "carry an adapter: it is a plain torch::nn::Linear outside") ==
      0);

  // A layer with an adapter already.
  inject(*model, Targets::suffixes({"to_k"}), StyleInjectOptions(2));
  write_lora(
      path,
      {{"lora_unet_attn_to_k.lora_down.weight", {2, 6}},
       {"lora_unet_attn_to_k.lora_up.weight", {4, 2}},
       {"lora_unet_attn_to_k.alpha", {}}});
  const auto adapted = snapshot(*model);
  CHECK(
      error_of([&] { import_lora(*model, path); }) ==
      "styleinject::import_lora: '" + path +
          "': layer 'attn.to_k' has an adapter 'default' already; import "
          "under another name (ImportLoraOptions().adapter()) or "
          "remove_adapter() first");
  for (const auto& p : snapshot(*model)) {
    CHECK(torch::equal(p.second, adapted.at(p.first)));
  }
}

TEST_CASE(
    "import_lora: a PEFT config's pattern that is no regex",
    "[lora-files]") {
  TempDir dir;
  const auto path = dir.path + "/peft";
  REQUIRE(::mkdir(path.c_str(), 0777) == 0);
  write_lora(
      path + "/adapter_model.safetensors",
      {{"base_model.model.attn.to_q.lora_A.weight", {2, 4}},
       {"base_model.model.attn.to_q.lora_B.weight", {4, 2}}});
  std::ofstream(path + "/adapter_config.json")
      << R"({"lora_alpha": 2, "alpha_pattern": {"to_(q": 3}})";
  auto model = base_net();
  CHECK(
      error_of([&] { import_lora(*model, path); }) ==
      "styleinject::import_lora: '" + path +
          "': expected the alpha_pattern key 'to_(q' of adapter_config.json "
          "to be a regular expression");
  CHECK(styleinject::report(*model).layers.empty());
}

TEST_CASE("export_lora refuses what it cannot write", "[lora-files]") {
  TempDir dir;
  auto model = base_net();
  CHECK(
      error_of(
          [&] { export_lora(*model, dir.path + "/x", LoraFormat::kKohya); }) ==
      "styleinject::export_lora: '" + dir.path +
          "/x': nothing to export: the model has no adapters; attach them "
          "with styleinject::inject() or styleinject::load_adapters()");
  CHECK(
      error_of([&] {
        export_lora(*model, dir.path + "/x", LoraFormat::kDiffusers);
      }) ==
      "styleinject::export_lora: '" + dir.path +
          "/x': expected LoraFormat::kPeft or kKohya (diffusers loads both), "
          "but got kDiffusers");
  CHECK(TempDir::names_in(dir.path).empty());
}

// The C++ half of tests/interop/peft_interop.py, run with
// STYLEINJECT_INTEROP_DIR set: a model whose layers have the names of SD's
// UNet, so that diffusers' kohya conversion applies to them.
namespace {

const std::vector<std::string> kPeerLayers{
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "mid_block.attentions.0.proj_out"};

/// The peer model: the three layers of kPeerLayers under plain modules,
/// with the base weights that Python wrote.
std::shared_ptr<torch::nn::Module> peer_model(const std::string& folder) {
  auto root = std::make_shared<torch::nn::Module>();
  const auto add = [&](const std::string& path,
                       std::shared_ptr<torch::nn::Module> layer) {
    auto node = root;
    std::string rest = path;
    for (auto dot = rest.find('.'); dot != std::string::npos;
         dot = rest.find('.')) {
      const auto key = rest.substr(0, dot);
      rest = rest.substr(dot + 1);
      auto children = node->named_children();
      node = children.contains(key)
          ? children[key]
          : node->register_module(key, std::make_shared<torch::nn::Module>());
    }
    node->register_module(rest, std::move(layer));
  };
  add(kPeerLayers[0], styleinject::StyleInjectLinear(6, 4).ptr());
  add(kPeerLayers[1],
      styleinject::StyleInjectConv2d(
          torch::nn::Conv2dOptions(4, 4, 3).padding(1))
          .ptr());
  add(kPeerLayers[2], styleinject::StyleInjectLinear(4, 5).ptr());
  styleinject::load_weights(*root, folder + "/base.safetensors");
  return root;
}

/// Each layer's output on Python's input for it, by layer name.
std::vector<std::pair<std::string, torch::Tensor>> peer_outputs(
    torch::nn::Module& model,
    const std::map<std::string, torch::Tensor>& inputs) {
  std::vector<std::pair<std::string, torch::Tensor>> outputs;
  auto modules = model.named_modules();
  torch::NoGradGuard no_grad;
  for (const auto& name : kPeerLayers) {
    const auto& module = modules[name];
    const auto& x = inputs.at(name);
    outputs.emplace_back(
        name,
        module->as<styleinject::StyleInjectLinearImpl>()
            ? module->as<styleinject::StyleInjectLinearImpl>()->forward(x)
            : module->as<styleinject::StyleInjectConv2dImpl>()->forward(x));
  }
  return outputs;
}

} // namespace

TEST_CASE(
    "interop: PEFT's adapter in, PEFT and kohya files out",
    "[.interop][interop-peft]") {
  const char* folder_env = std::getenv("STYLEINJECT_INTEROP_DIR");
  REQUIRE(folder_env != nullptr);
  const std::string folder = folder_env;
  const auto inputs = tensors_of(folder + "/inputs.safetensors");

  // PEFT's adapter, imported: the outputs PEFT computed.
  auto imported = peer_model(folder);
  const auto report = import_lora(*imported, folder + "/peft_from_python");
  CHECK(report.layers.size() == 3);
  const auto peft_outputs = tensors_of(folder + "/peft_outputs.safetensors");
  for (const auto& output : peer_outputs(*imported, inputs)) {
    CAPTURE(output.first);
    CHECK(torch::allclose(
        output.second, peft_outputs.at(output.first), 1e-5, 1e-6));
  }

  // PEFT's second adapter beside the first, both weighted as PEFT has them.
  import_lora(
      *imported,
      folder + "/peft_from_python/second",
      ImportLoraOptions().adapter("second"));
  styleinject::set_adapters(*imported, {{"default", 0.7}, {"second", -0.5}});
  const auto two_outputs = tensors_of(folder + "/peft_two_outputs.safetensors");
  for (const auto& output : peer_outputs(*imported, inputs)) {
    CAPTURE(output.first);
    CHECK(torch::allclose(
        output.second, two_outputs.at(output.first), 1e-5, 1e-6));
  }

  // StyleInject adapters with one fixed style and the gate off, exported.
  auto trained = peer_model(folder);
  inject(
      *trained,
      Targets::all().with(".*conv1", Override().rank(3)),
      StyleInjectOptions(2).branches(3).alpha(3).gate(false));
  randomize_adapters(*trained, 83);
  styleinject::set_style(*trained, torch::tensor({0.2f, 0.5f, 0.3f}));
  styleinject::set_scale(*trained, 0.8);
  export_lora(*trained, folder + "/peft_from_cpp", LoraFormat::kPeft);
  export_lora(
      *trained, folder + "/kohya_from_cpp.safetensors", LoraFormat::kKohya);
  styleinject::save_safetensors(
      folder + "/cpp_outputs.safetensors", peer_outputs(*trained, inputs));
}
