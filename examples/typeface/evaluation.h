#pragma once
// What every evaluation shares: the fine-tune's characters and the held-out
// ones, the base-font prompts, the validation loss of the learning-rate
// search, and adapter parameter counts.

#include "training.h"

#include <styleinject/styleinject.h>

#include <numeric>

namespace typeface {

inline std::vector<int64_t> all_fonts() {
  std::vector<int64_t> fonts(catalogue().size());
  std::iota(fonts.begin(), fonts.end(), 0);
  return fonts;
}

/// Where the held-out characters go: the first `validation` of them choose
/// the learning rate, the rest are the test prompts, or `test` of them
/// spread evenly over the rest (0: all).
struct Split {
  std::string shots, validation, test;
};

inline Split split_characters(
    int64_t shots,
    int64_t validation = 8,
    int64_t test = 0) {
  Split split;
  split.shots = shot_characters(shots);
  const auto rest = held_out_characters(split.shots);
  const auto left = static_cast<int64_t>(rest.size()) - validation;
  if (left < 1) {
    throw std::invalid_argument(
        "--shots " + std::to_string(shots) +
        " leaves too few characters to "
        "hold out");
  }
  split.validation = rest.substr(0, validation);
  const auto count = test > 0 ? std::min(test, left) : left;
  for (int64_t i = 0; i < count; ++i) {
    split.test += rest[validation + i * left / count];
  }
  return split;
}

/// The base-font prompts of the retention measure: fixed pairs.
inline Prompts base_font_prompts(int64_t count) {
  std::mt19937_64 rng(5);
  const auto fonts = base_fonts();
  Prompts prompts;
  for (int64_t i = 0; i < count; ++i) {
    prompts.emplace_back(
        fonts[rng() % fonts.size()], characters()[rng() % characters().size()]);
  }
  return prompts;
}

/// The denoising loss on renders of the validation characters of `styles`
/// at fixed noise and timesteps: what the learning-rate search minimises.
inline double validation_loss(
    TextToImage& model,
    GlyphRenderer& renderer,
    const std::vector<int64_t>& styles,
    const std::string& validation,
    const Runtime& runtime) {
  torch::NoGradGuard no_grad;
  model->eval();
  const Tokenizer tokenizer;
  std::mt19937_64 rng(31);
  torch::manual_seed(31);
  double total = 0;
  for (int round = 0; round < 4; ++round) {
    const auto batch =
        draw_batch(renderer, tokenizer, styles, validation, 64, rng);
    AutocastGuard autocast(runtime);
    total += diffusion_loss(
                 model,
                 NoiseSchedule(),
                 batch.images.to(runtime.device) * 2 - 1,
                 batch.ids.to(runtime.device))
                 .item<double>();
  }
  model->train();
  return total / 4;
}

/// The number of adapter parameters that `options` puts on the model's
/// `targets` (a layer-name pattern; empty: every layer).
inline int64_t adapter_parameter_count(
    const ModelConfig& config,
    const styleinject::StyleInjectOptions& options,
    const std::string& targets = "") {
  TextToImage model(config);
  styleinject::inject(*model, layer_targets(targets), options);
  int64_t count = 0;
  for (const auto& p : styleinject::adapter_parameters(*model)) {
    count += p.numel();
  }
  return count;
}

} // namespace typeface
