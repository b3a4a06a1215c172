#pragma once
// DDPM training (Ho et al. 2020) with v-prediction (Salimans & Ho 2022, as
// Stable Diffusion 2 does) and DDIM sampling (Song et al. 2021, eta = 0)
// with classifier-free guidance (Ho & Salimans 2022).
//
// Why v and not the noise: at high noise the noise target says almost
// nothing about the image (x_t is almost all noise), so a model trained on
// it learns the caption-to-glyph mapping slowly; v = sqrt(a) eps -
// sqrt(1 - a) x0 asks for the image there.

#include "model.h"
#include "progress.h"

#include <torch/torch.h>

#include <vector>

namespace typeface {

/// The forward process: a linear beta schedule over `steps` timesteps, kept
/// on the device that trains, so that a step draws its timesteps there.
struct NoiseSchedule {
  explicit NoiseSchedule(
      int64_t steps = 1000,
      torch::Device device = torch::kCPU)
      : steps(steps) {
    const auto betas =
        torch::linspace(1e-4, 0.02, steps, torch::dtype(torch::kDouble));
    alpha_bar = torch::cumprod(1 - betas, 0).to(device, torch::kFloat);
  }
  int64_t steps;
  torch::Tensor alpha_bar; // (steps,) float32
};

/// The DDPM loss: MSE between the true and the predicted v at random
/// timesteps, over rows [begin, end) of the batch (all by default). The
/// timesteps and noise are drawn for every row, so that a process training
/// on some rows draws what one process training on all would.
/// With a `teacher`, the distillation loss: the teacher's prediction at
/// the same input is the target instead of the true v.
/// images: (N, 1, S, S) in [-1, 1], ids: (N, L).
inline torch::Tensor diffusion_loss(
    TextToImage& model,
    const NoiseSchedule& schedule,
    const torch::Tensor& images,
    const torch::Tensor& ids,
    int64_t begin = 0,
    int64_t end = -1,
    TextToImage* teacher = nullptr) {
  const auto n = images.size(0);
  end = end < 0 ? n : end;
  // Drawn where the images are: no copy, and no wait, between host and
  // device.
  const auto t =
      torch::randint(schedule.steps, {n}, images.options().dtype(torch::kLong))
          .slice(0, begin, end);
  const auto noise = torch::randn_like(images).slice(0, begin, end);
  const auto x0 = images.slice(0, begin, end);
  const auto a = schedule.alpha_bar.to(images.device())
                     .index_select(0, t)
                     .view({end - begin, 1, 1, 1});
  const auto noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise;
  const auto captions = ids.slice(0, begin, end);
  torch::Tensor target = a.sqrt() * noise - (1 - a).sqrt() * x0; // v
  if (teacher != nullptr) {
    torch::NoGradGuard no_grad;
    target = (*teacher)(noisy, t, captions).to(torch::kFloat);
  }
  return torch::mse_loss(model(noisy, t, captions).to(torch::kFloat), target);
}

/// Options of the sampler.
struct SamplerOptions {
  int64_t steps = 20; // DDIM steps
  // Classifier-free guidance: 2 keeps the base fonts' glyphs best (own-font
  // alignment 0.905 against 0.881 at 3, README.md).
  double guidance = 2.0;
  uint64_t seed = 0; // of the initial noise
};

/// Generates one image per caption by DDIM with classifier-free guidance.
/// The initial noise comes from a CPU generator seeded with `options.seed`,
/// so a seed gives the same images on every device. `progress`, if given,
/// advances once per step.
/// ids: (N, L) -> images (N, 1, S, S) in [0, 1], on ids' device.
inline torch::Tensor sample(
    TextToImage& model,
    const NoiseSchedule& schedule,
    const torch::Tensor& ids,
    const SamplerOptions& options,
    Progress* progress = nullptr) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const auto n = ids.size(0), size = model->config.image_size;
  const auto device = ids.device();
  auto generator = at::detail::createCPUGenerator(options.seed);
  auto x = torch::randn({n, 1, size, size}, generator).to(device);
  // One text encoding for the captions and one for the empty prompt,
  // batched so that each step is one UNet call.
  const auto context = model->text(torch::cat({ids, torch::zeros_like(ids)}));
  std::vector<int64_t> times;
  for (int64_t i = 0; i < options.steps; ++i) {
    times.push_back(
        (schedule.steps - 1) - i * (schedule.steps - 1) / options.steps);
  }
  const auto alpha_bar = schedule.alpha_bar.cpu();
  for (size_t i = 0; i < times.size(); ++i) {
    const auto t = times[i];
    const double a = alpha_bar[t].item<double>();
    const double a_next =
        i + 1 < times.size() ? alpha_bar[times[i + 1]].item<double>() : 1.0;
    const auto tt =
        torch::full({2 * n}, t, torch::dtype(torch::kLong).device(device));
    const auto v_both =
        model->denoise(torch::cat({x, x}), tt, context).to(torch::kFloat);
    const auto v_text = v_both.slice(0, 0, n);
    const auto v_empty = v_both.slice(0, n);
    const auto v = v_empty + options.guidance * (v_text - v_empty);
    const auto x0 = (std::sqrt(a) * x - std::sqrt(1 - a) * v).clamp(-1, 1);
    // The noise that the (clamped) x0 implies, so that the step stays on
    // the deterministic DDIM path.
    const auto eps = (x - std::sqrt(a) * x0) / std::sqrt(1 - a);
    x = std::sqrt(a_next) * x0 + std::sqrt(1 - a_next) * eps;
    if (progress != nullptr) {
      progress->step();
    }
  }
  model->train(was_training);
  return (x.clamp(-1, 1) + 1) / 2;
}

} // namespace typeface
