#pragma once
// A diffusers model directory, as `save_pretrained` writes it: config.json
// (whose "_class_name" says the architecture) and the weights, one
// diffusion_pytorch_model.safetensors or shards with their index.

#include "pixart.h"
#include "unet.h"

#include <sys/stat.h>

#include <memory>
#include <string>

namespace diffusers {

/// The architectures this port builds, by diffusers' class name.
inline std::shared_ptr<DenoiserImpl> build_model(Config& config) {
  const auto name = config.get<std::string>("_class_name", "");
  if (name == "UNet2DConditionModel") {
    return std::make_shared<UNet2DConditionModelImpl>(UNetConfig::from(config));
  }
  if (name == "PixArtTransformer2DModel") {
    return std::make_shared<PixArtTransformer2DModelImpl>(
        PixArtConfig::from(config));
  }
  TORCH_CHECK(
      false,
      config.context(),
      ": \"_class_name\": expected \"UNet2DConditionModel\" or "
      "\"PixArtTransformer2DModel\", but got \"",
      name,
      "\"");
}

inline bool is_file(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

/// The weights of the model in `dir`: the one file, or the shards' index.
inline std::string weights_path(const std::string& dir) {
  const auto single = dir + "/diffusion_pytorch_model.safetensors";
  const auto index = single + ".index.json";
  TORCH_CHECK(
      is_file(single) || is_file(index),
      dir,
      ": expected diffusers' weights, diffusion_pytorch_model.safetensors or "
      "its shards' diffusion_pytorch_model.safetensors.index.json, but found "
      "neither (a checkpoint saved with safe_serialization=False, as .bin, "
      "is not read)");
  return is_file(single) ? single : index;
}

/// The model of diffusers' directory `dir`, its weights loaded by their
/// keys (every one present, none unexpected, each of its shape), in
/// `dtype` on `device`.
inline std::shared_ptr<DenoiserImpl> load_model(
    const std::string& dir,
    torch::Dtype dtype = torch::kFloat,
    torch::Device device = torch::kCPU) {
  auto config = Config::read(dir + "/config.json");
  std::shared_ptr<DenoiserImpl> model;
  {
    styleinject::SkipInit skip; // every weight is loaded next
    model = build_model(config);
  }
  model->to(device, dtype);
  // On the CPU in the file's dtype, the weights stay in the mapped file.
  styleinject::load_weights(
      *model,
      weights_path(dir),
      styleinject::LoadWeightsOptions().assign(true));
  return model;
}

} // namespace diffusers
