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
#include <tuple>
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

TinyNet plain_net() {
  torch::manual_seed(81);
  return TinyNet();
}

/// plain_net() with adapters on the attention's q and v (rank 2) and the
/// ResBlocks' first convolutions (rank 3), random values in them.
TinyNet exportable_net(const StyleInjectOptions& options) {
  auto model = plain_net();
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
  auto trained = exportable_net(StyleInjectOptions::lora(2).alpha(6));
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

    auto fresh = plain_net();
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

    auto fresh = plain_net();
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
  auto trained = exportable_net(StyleInjectOptions(2).branches(3).alpha(3));
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
  auto fresh = plain_net();
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
      exportable_net(StyleInjectOptions(2).branches(3).alpha(3).gate(false));
  styleinject::set_style(*trained, torch::tensor({0.f, 0.25f, 0.75f}));
  // One layer's strength differs: its alpha goes into alpha_pattern, under
  // a key that names it alone.
  styleinject::set_scale(*trained, 0.5, Targets::suffixes({"to_q"}));
  export_lora(*trained, path, LoraFormat::kPeft);
  CHECK(
      read_json(path + "/adapter_config.json")["alpha_pattern"] ==
      nlohmann::json{{"^attn\\.to_q", 1.5}});
  auto fresh = plain_net();
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
    "import_lora: the alphas of a diffusers file's lora_adapter_metadata",
    "[lora-files]") {
  TempDir dir;
  const auto path = dir.path + "/lora.safetensors";
  const auto write = [&](const std::string& config) {
    std::vector<std::pair<std::string, torch::Tensor>> tensors{
        {"unet.attn.to_q.lora_A.weight", torch::rand({4, 4})},
        {"unet.attn.to_q.lora_B.weight", torch::rand({4, 4})},
        {"unet.blocks.1.body.3.lora_A.weight", torch::rand({1, 4, 3, 3})},
        {"unet.blocks.1.body.3.lora_B.weight", torch::rand({4, 1, 1, 1})}};
    styleinject::save_safetensors(
        path, tensors, {{"lora_adapter_metadata", config}, {"format", "pt"}});
  };
  // A pipeline's save_lora_weights: the config under the "unet." prefix.
  write(
      R"({"unet.lora_alpha": 6, "unet.r": 4, "unet.alpha_pattern": {"to_q": 3},
            "unet.use_rslora": false})");
  auto model = plain_net();
  const auto report = import_lora(*model, path);
  REQUIRE(report.layers.size() == 2);
  CHECK(report.layers[0].name == "blocks.1.body.3");
  CHECK(report.layers[0].alpha == 6.0);
  CHECK(report.layers[1].name == "attn.to_q");
  CHECK(report.layers[1].alpha == 3.0);

  // Two components whose alphas differ cannot share one config.
  write(R"({"unet.lora_alpha": 6, "text_encoder.lora_alpha": 8})");
  auto other = plain_net();
  CHECK(
      error_of([&] { import_lora(*other, path); }) ==
      "styleinject::import_lora: '" + path +
          "': the metadata's lora_adapter_metadata gives components "
          "'text_encoder' and 'unet' different lora_alpha (8 and 6); import "
          "a file of one component");
  CHECK(styleinject::report(*other).layers.empty());
}

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
  auto model = plain_net();
  const auto before = snapshot(*model);
  CHECK(
      error_of([&] { import_lora(*model, path); }) ==
      "styleinject::import_lora: '" + path +
          "': expected an alpha for module 'unet.blocks.1.body.3' (a "
          "'unet.blocks.1.body.3.alpha' tensor, lora_alpha in a PEFT "
          "adapter directory's adapter_config.json or in a diffusers file's "
          "lora_adapter_metadata), but the file has none; pass it with "
          "ImportLoraOptions().alpha()");
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
  auto model = plain_net();
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
      import_lora(*plain_net(), path, ImportLoraOptions().strict(false));
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

namespace {

/// A PEFT directory at `path` with the LoRA of attn.to_q (rank 2) and
/// `config` as its adapter_config.json.
void write_peft(const std::string& path, const std::string& config) {
  ::mkdir(path.c_str(), 0777);
  write_lora(
      path + "/adapter_model.safetensors",
      {{"base_model.model.attn.to_q.lora_A.weight", {2, 4}},
       {"base_model.model.attn.to_q.lora_B.weight", {4, 2}}});
  std::ofstream(path + "/adapter_config.json") << config;
}

/// What import_lora says of the PEFT directory with `config`, and that it
/// left the model without an adapter.
std::string import_error(const std::string& config) {
  TempDir dir;
  write_peft(dir.path + "/peft", config);
  auto model = plain_net();
  const auto error = error_of([&] { import_lora(*model, dir.path + "/peft"); });
  CHECK(styleinject::report(*model).layers.empty());
  const auto prefix = "styleinject::import_lora: '" + dir.path + "/peft': ";
  return error.compare(0, prefix.size(), prefix) == 0
      ? error.substr(prefix.size())
      : error;
}

/// A model of one Linear layer named by 20,000 a's.
std::shared_ptr<torch::nn::Module> long_named_model() {
  auto model = std::make_shared<torch::nn::Module>();
  model->register_module(
      std::string(20000, 'a'), styleinject::StyleInjectLinear(4, 3));
  return model;
}

/// A PEFT directory with the LoRA of long_named_model()'s layer.
void write_long_named(const std::string& path, const std::string& config) {
  const auto module = "base_model.model." + std::string(20000, 'a');
  ::mkdir(path.c_str(), 0777);
  write_lora(
      path + "/adapter_model.safetensors",
      {{module + ".lora_A.weight", {2, 4}},
       {module + ".lora_B.weight", {3, 2}}});
  std::ofstream(path + "/adapter_config.json") << config;
}

/// PEFT's match of a pattern key, re.match(r"(.*\.)?(key)$", name), by
/// the automaton and, for plain names, directly: the two must agree.
bool peft_matches(const std::string& key, const std::string& name) {
  const bool matched = styleinject::detail::PeftPattern(key).matches(name);
  CHECK(
      styleinject::detail::Regex("(.*\\.)?(" + key + ")$").match_prefix(name) ==
      matched);
  return matched;
}

} // namespace

TEST_CASE("Regex: Python's meaning, in time linear in the name", "[regex]") {
  using styleinject::detail::Regex;
  SECTION("PEFT's keys, as Python's re.match reads them") {
    // The expected values are what Python 3.11 prints for
    // bool(re.match(rf"(.*\.)?({key})$", name)).
    const std::vector<std::tuple<std::string, std::string, bool>> cases{
        {"to_q", "attn1.to_q", true},
        {"to_q", "to_q", true},
        {"to_q", "attn1.xto_q", false}, // only after a '.'
        {"to_q", "attn1.to_q.lora", false},
        {"^to_q", "attn1.to_q", false},
        {"^attn1\\.to_q", "attn1.to_q", true},
        {"attn1.to_q", "attn1_to_q", true}, // '.' is any character
        {"attn1\\.to_q", "attn1_to_q", false},
        {"to_(q|k)", "a.to_k", true},
        {"to_[qkv]", "a.to_v", true},
        {"to_[^qkv]", "a.to_v", false},
        {"blocks\\.\\d+\\.attn", "down.blocks.12.attn", true},
        {"blocks\\.\\d{2}\\.attn", "down.blocks.2.attn", false},
        {"blocks\\.\\d{,2}\\.attn", "down.blocks..attn", true},
        {"x{2,3}", "xxxx", false},
        {"x{2,}", "xxxx", true},
        {"a{x}", "a{x}", true}, // not a repeat: a literal '{'
        {"a{}", "a{}", true},
        {".*\\.to_out\\.0", "mid.attn.to_out.0", true},
        {"(?:a|b)*c", "ababc", true},
        {"a*?b", "aab", true},
        {"\\w+_q", "x.to_q", true},
        {"\\W", "x.-", true},
        {"\\s", "a. ", true},
        {"$", "a.", true}, // "a." then the empty key
        {"to_q", "attn1.to_q\n", true}, // Python's $: before a last '\n'
        {".", "a.\n", false}, // '.' is no newline
        {"[^a]", "a.\n", true}, // a negated class is
        {"\\w", "a.\xc3\xa9", true}, // a non-ASCII letter is one symbol
        {".", "a.\xc3\xa9", true},
        {"..", "a.\xc3\xa9", false},
    };
    for (const auto& [key, name, expected] : cases) {
      INFO(key << " against " << name);
      CHECK(peft_matches(key, name) == expected);
    }
  }
  SECTION("(a|aa)+b against 10,000 a's: steps linear in the name") {
    // A backtracking engine tries every split of the a's into a and aa:
    // 1.6x more time per character (std::regex: 0.3 s at 32, 1.9 s at 36).
    const Regex regex("(.*\\.)?((a|aa)+b)$");
    for (const size_t n : {36, 1000, 10000}) {
      size_t steps = 0;
      CHECK(!regex.match_prefix(std::string(n, 'a'), &steps));
      CHECK(steps <= regex.size() * (n + 1));
      CHECK(regex.match_prefix(std::string(n, 'a') + "b"));
    }
  }
  SECTION("what it refuses, and why") {
    const auto refusal = [](const std::string& pattern) {
      try {
        Regex{pattern};
      } catch (const std::invalid_argument& error) {
        return std::string(error.what());
      }
      return std::string("no error");
    };
    CHECK(
        refusal("a(?=b)") ==
        "cannot use '(?' other than '(?:' (lookarounds, names, flags) "
        "(character 2 of 'a(?=b)')");
    CHECK(
        refusal("(a)\\1") ==
        "cannot use the escape '\\1' (character 4 of '(a)\\1')");
    CHECK(
        refusal("\\bto") ==
        "cannot use the escape '\\b' (character 1 of '\\bto')");
    CHECK(
        refusal("a**") ==
        "cannot use a repeat of a repeat (character 3 of 'a**')");
    CHECK(
        refusal("a*+") ==
        "cannot use a repeat of a repeat (character 3 of 'a*+')");
    CHECK(
        refusal("*a") ==
        "cannot use a repeat of nothing (character 1 of '*a')");
    CHECK(
        refusal("^*") ==
        "cannot use a repeat of an anchor (character 2 of '^*')");
    CHECK(
        refusal("to_(q") ==
        "cannot use a '(' without its ')' (character 4 of 'to_(q')");
    CHECK(
        refusal("q)") ==
        "cannot use a ')' without its '(' (character 2 of 'q)')");
    CHECK(
        refusal("[ab") ==
        "cannot use a '[' without its ']' (character 1 of '[ab')");
    CHECK(
        refusal("[z-a]") ==
        "cannot use a bad character range (character 2 of '[z-a]')");
    CHECK(
        refusal("[\\d-z]") ==
        "cannot use a bad character range (character 2 of '[\\d-z]')");
    CHECK(
        refusal("x{3,2}") ==
        "cannot use a repeat whose minimum exceeds its maximum (character 2 of 'x{3,2}')");
    CHECK(
        refusal("x{1001}") ==
        "cannot use a repeat count over 1000 (character 2 of 'x{1001}')");
    CHECK(
        refusal("\xc3\xa9") ==
        "cannot use a non-ASCII character (character 1 of '\xc3\xa9')");
    CHECK(
        refusal(std::string(1001, 'a')) ==
        "expected a pattern of at most 1000 characters, but got 1001");
    CHECK(
        refusal(std::string(101, '(') + std::string(101, ')')) ==
        "cannot use more than 100 nested groups (character 101 of '" +
            std::string(101, '(') + std::string(101, ')') + "')");
    CHECK(
        refusal("(a{1000}){11}") ==
        "expected a pattern of at most 10000 automaton instructions, but "
        "'(a{1000}){11}' needs more (its repeat counts multiply it)");
    CHECK(refusal("(a{1000}){9}") == "no error");
    CHECK(refusal(std::string(100, '(') + std::string(100, ')')) == "no error");
  }
}

TEST_CASE(
    "import_lora: alpha_pattern keys, matched as PEFT does, and bounded",
    "[lora-files][regex]") {
  TempDir dir;
  SECTION("the first key that matches gives the alpha") {
    write_peft(
        dir.path + "/peft",
        R"({"lora_alpha": 2, "alpha_pattern": {"to_k": 5, "at+n\\.to_[q-v]": 3, "to_q": 4}})");
    auto model = plain_net();
    const auto report = import_lora(*model, dir.path + "/peft");
    REQUIRE(report.layers.size() == 1);
    CHECK(report.layers[0].alpha == 3);
  }
  SECTION("(a|aa)+b against a module named by 20,000 a's") {
    // With std::regex this took about two days at 60 a's.
    auto model = long_named_model();
    write_long_named(
        dir.path + "/long",
        R"({"lora_alpha": 2, "alpha_pattern": {"(a|aa)+b": 3, "(a|aa)+": 7}})");
    const auto report = import_lora(*model, dir.path + "/long");
    REQUIRE(report.layers.size() == 1);
    CHECK(report.layers[0].alpha == 7);
  }
  SECTION("many keys: cheap each, too long together") {
    nlohmann::json patterns;
    for (int i = 0; i < 1000; ++i) {
      patterns["(a|.)*" + std::to_string(i)] = 1;
    }
    write_long_named(
        dir.path + "/many", nlohmann::json{{"alpha_pattern", patterns}}.dump());
    auto model = long_named_model();
    CHECK(
        error_of([&] { import_lora(*model, dir.path + "/many"); })
            .find("matching the 1000 alpha_pattern keys of "
                  "adapter_config.json against the module names took more "
                  "than 100000000 automaton steps; expected keys of PEFT's "
                  "kind (module names)") != std::string::npos);
    CHECK(styleinject::report(*model).layers.empty());
  }
  SECTION("refused, the model as it was") {
    CHECK(
        import_error(R"({"lora_alpha": 2, "alpha_pattern": {"to_(q": 3}})") ==
        "expected the alpha_pattern key 'to_(q' of adapter_config.json to be "
        "a regular expression of the kind this library matches: cannot use "
        "a '(' without its ')' (character 8 of '(.*\\.)?(to_(q)$')");
    CHECK(
        import_error(R"({"alpha_pattern": {"(?!x)to_q": 3}})") ==
        "expected the alpha_pattern key '(?!x)to_q' of adapter_config.json "
        "to be a regular expression of the kind this library matches: cannot "
        "use '(?' other than '(?:' (lookarounds, names, flags) (character 9 "
        "of '(.*\\.)?((?!x)to_q)$')");
    CHECK(
        import_error(R"({"use_dora": "yes"})") ==
        "expected use_dora in adapter_config.json to be true or false, but "
        "got \"yes\"");
    CHECK(
        import_error(R"({"use_rslora": 1})") ==
        "expected use_rslora in adapter_config.json to be true or false, but "
        "got 1");
    CHECK(
        import_error(std::string(65, '[') + std::string(65, ']')) ==
        "adapter_config.json nests deeper than 64 levels");
    CHECK(
        import_error(std::string(64, '[') + std::string(64, ']')) ==
        "expected adapter_config.json to hold a JSON object");
  }
}

TEST_CASE("export_lora refuses what it cannot write", "[lora-files]") {
  TempDir dir;
  auto model = plain_net();
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

// The C++ half of peft_interop.py's pattern check: Python's re.match on
// PEFT's form of random keys against random names, in patterns.json; every
// key Python refuses is refused here too, and every one taken here matches
// where Python's does.
TEST_CASE(
    "alpha_pattern keys against Python's re (peer)",
    "[.interop][interop-patterns]") {
  const char* folder = std::getenv("STYLEINJECT_INTEROP_DIR");
  REQUIRE(folder != nullptr);
  const auto cases = read_json(std::string(folder) + "/patterns.json");
  size_t taken = 0, matched = 0;
  for (const auto& item : cases) {
    const auto key = item[0].get<std::string>();
    const auto name = item[1].get<std::string>();
    const auto python = item[2].get<std::string>();
    std::string ours;
    try {
      ours =
          styleinject::detail::PeftPattern(key).matches(name) ? "match" : "no";
    } catch (const std::invalid_argument&) {
      ours = "error";
    }
    INFO("key " << key << " against '" << name << "'");
    if (python == "error") {
      CHECK(ours == "error"); // what Python refuses is refused here
    }
    if (ours != "error") { // what is taken here matches as in Python
      CHECK(ours == python);
      ++taken;
      matched += ours == "match";
    }
  }
  // Most are taken, and both outcomes are common: a test of something.
  std::cout << cases.size() << " patterns: " << taken << " taken here, "
            << matched << " of them matching\n";
  CHECK(taken > cases.size() / 2);
  CHECK(matched > 1000);
  CHECK(taken - matched > 1000);
}
