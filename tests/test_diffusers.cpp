// The diffusers example's models (examples/diffusers): configs they refuse,
// and a short StyleInject fine-tune through `inject` on tiny configs. Their
// outputs against diffusers' own are tests/diffusers/peer.py's.

#include "support.h"

#include <diffusers/model.h>

namespace {

using styleinject_test::error_of;

diffusers::Config config_of(const std::string& text) {
  return diffusers::Config(nlohmann::json::parse(text), "config.json");
}

const char* kTinyUNet = R"({"_class_name": "UNet2DConditionModel",
    "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 6, "attention_head_dim": 2})";

const char* kTinyPixArt = R"({"_class_name": "PixArtTransformer2DModel",
    "num_attention_heads": 2, "attention_head_dim": 4, "in_channels": 4,
    "out_channels": 4, "num_layers": 1, "cross_attention_dim": 8,
    "caption_channels": 6, "sample_size": 8, "patch_size": 2})";

std::string refusal(const std::string& text) {
  return error_of([&] {
    auto config = config_of(text);
    diffusers::build_model(config);
  });
}

} // namespace

TEST_CASE("diffusers models: configs this port does not build", "[diffusers]") {
  CHECK(
      refusal(
          R"({"_class_name": "UNet2DConditionModel", "num_attention_heads": 8})") ==
      "config.json: \"num_attention_heads\": 8 is not supported by this port "
      "(supported: [null])");
  CHECK(
      refusal(R"({"_class_name": "UNet2DConditionModel", "flash": true})") ==
      "config.json: unknown key \"flash\": true (a newer diffusers' feature "
      "this port does not build)");
  CHECK(
      refusal(
          R"({"_class_name": "UNet2DConditionModel", "layers_per_block": 1.5})") ==
      "config.json: \"layers_per_block\" must be an int, but got 1.5");
  CHECK(
      refusal(
          R"({"_class_name": "UNet2DConditionModel", "attention_head_dim": [8, 8]})") ==
      "config.json: expected \"attention_head_dim\" to be an int or a list of "
      "4 ints (one per block), but got [8,8]");
  CHECK(
      refusal(
          R"({"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64]})") ==
      "config.json: expected as many \"down_block_types\" and "
      "\"up_block_types\" as \"block_out_channels\" (2), but got 4 and 4");
  CHECK(
      refusal(
          R"({"_class_name": "PixArtTransformer2DModel", "norm_type": "ada_norm_zero"})") ==
      "config.json: \"norm_type\": \"ada_norm_zero\" is not supported by this "
      "port (supported: [\"ada_norm_single\"])");
  CHECK(
      refusal(R"({"_class_name": "PixArtTransformer2DModel"})") ==
      "config.json: \"caption_channels\": null (no caption projection) is not "
      "supported by this port");
  CHECK(
      refusal(
          R"({"_class_name": "PixArtTransformer2DModel", "num_attention_heads": 2,
          "attention_head_dim": 5, "caption_channels": 8, "cross_attention_dim": 10,
          "sample_size": 8})") ==
      "config.json: num_attention_heads * attention_head_dim = 10 must be a "
      "multiple of 4 (the 2-D sin-cos positions)");
  CHECK(
      refusal(R"({"_class_name": "SD3Transformer2DModel"})") ==
      "config.json: \"_class_name\": expected \"UNet2DConditionModel\" or "
      "\"PixArtTransformer2DModel\", but got \"SD3Transformer2DModel\"");
}

TEST_CASE(
    "diffusers models: StyleInject fine-tunes the attention through inject",
    "[diffusers]") {
  styleinject_test::TempDir dir;
  for (const char* text : {kTinyUNet, kTinyPixArt}) {
    auto config = config_of(text);
    torch::manual_seed(1);
    auto model = diffusers::build_model(config);
    const auto name = config.get<std::string>("_class_name");
    CAPTURE(name);
    torch::manual_seed(0);
    const auto inputs = model->example_inputs(2, 8, 5, torch::kFloat);
    const auto target = torch::randn_like(model->forward(inputs));
    const auto base = styleinject_test::snapshot(*model);

    const auto report = styleinject::inject(
        *model,
        styleinject::Targets::suffixes({"to_q", "to_k", "to_v", "to_out.0"}),
        styleinject::StyleInjectOptions(2).branches(2));
    // Two attentions of four projections in each transformer block: the
    // UNet's down, mid and two up blocks', PixArt's one.
    CHECK(
        report.layers.size() == (name == "PixArtTransformer2DModel" ? 8 : 32));
    torch::optim::Adam adam(styleinject::adapter_parameters(*model), 1e-2);
    const auto loss = [&] {
      return torch::mse_loss(model->forward(inputs), target);
    };
    const double first = loss().item<double>();
    for (int step = 0; step < 30; ++step) {
      adam.zero_grad();
      loss().backward();
      adam.step();
    }
    CHECK(loss().item<double>() < 0.9 * first);
    for (const auto& p : model->named_parameters()) { // the base stayed
      if (base.count(p.key()) > 0) {
        CHECK(torch::equal(p.value(), base.at(p.key())));
      }
    }
    // The adapters, saved and loaded into the same base, give the output.
    const auto path = dir.path + "/adapters.safetensors";
    styleinject::save_adapters(*model, path);
    torch::manual_seed(1);
    auto again = diffusers::build_model(config);
    styleinject::load_adapters(*again, path);
    torch::NoGradGuard no_grad;
    CHECK(torch::allclose(again->forward(inputs), model->forward(inputs)));
    // A fixed style merges into the base weights and back.
    styleinject::set_style(*model, torch::tensor({0.25f, 0.75f}));
    const auto styled = model->forward(inputs);
    styleinject::merge_adapters(*model);
    CHECK(torch::allclose(model->forward(inputs), styled, 1e-4, 1e-5));
    styleinject::unmerge_adapters(*model);
    CHECK(torch::allclose(model->forward(inputs), styled, 1e-5, 1e-6));
  }
}

TEST_CASE(
    "diffusers models: the real models' configs build diffusers' tensors",
    "[diffusers]") {
  // diffusers 0.42's counts for these configs (state_dict() of the model
  // built on the meta device): tensors and their elements.
  const std::vector<std::tuple<std::string, size_t, int64_t>> models{
      {"sd15", 686, 859520964},
      {"sd21", 686, 865910724},
      {"sdxl", 1680, 2567463684},
      {"pixart-alpha", 611, 611349152}};
  for (const auto& [name, tensors, elements] : models) {
    CAPTURE(name);
    auto config = diffusers::Config::read(
        std::string(DIFFUSERS_CONFIGS) + "/" + name + ".json");
    styleinject::SkipInit skip; // no random numbers; untouched memory
    const auto model = diffusers::build_model(config);
    const auto weights = styleinject::detail::named_weights(*model);
    int64_t count = 0;
    for (const auto& weight : weights) {
      count += weight.value().numel();
    }
    CHECK(weights.size() == tensors);
    CHECK(count == elements);
  }
}
