// styleinject_diffusers: diffusers' UNet2DConditionModel and
// PixArtTransformer2DModel in LibTorch, loaded from diffusers' directories.
//
//   styleinject_diffusers forward --model DIR --inputs IN.safetensors \
//       --out OUT.safetensors [--lora PATH [--lora-alpha A]] \
//       [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--repeat N]
//   styleinject_diffusers finetune --model DIR --data DATA.safetensors \
//       --out ADAPTERS.safetensors [--method styleinject|lora] [--steps 100] \
//       [--lr 1e-4] [--batch 4] [--rank 4] [--branches 4] [--targets ...]
//   styleinject_diffusers bench --config sd15|sd21|sdxl|pixart-alpha|FILE \
//       [--batch 4] [--size 64] [--tokens 77] [--rounds 5] [--device ...] \
//       [--dtype ...] [--adapter-dtype same|float32]
//
// forward reads `sample`, `timestep` and `encoder_hidden_states` (and, where
// the config asks, `text_embeds` and `time_ids`, `resolution` and
// `aspect_ratio`, or an `encoder_attention_mask`) and writes `sample`;
// `--adapters` loads what finetune saved. finetune trains adapters on the
// denoising loss of clean latents (DATA's `sample`, with their
// conditioning under the same names).
// bench times whole training steps on random weights: frozen base, full
// fine-tune, LoRA of StyleInject's parameters and StyleInject.

#include "model.h"

#include "../keep_freed_memory.h"
#include "../lora_parameters.h"

#include <CLI/CLI.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>

namespace {

using namespace diffusers;

/// "a, b, c".
std::string joined(const std::vector<std::string>& names) {
  std::string text;
  for (const auto& name : names) {
    text += (text.empty() ? "" : ", ") + name;
  }
  return text;
}

/// The configs of the models people fine-tune, as their config.json files
/// say (configs/): their names.
std::vector<std::string> presets() {
  std::vector<std::string> names;
  for (const auto& entry :
       std::filesystem::directory_iterator(DIFFUSERS_CONFIGS)) {
    names.push_back(entry.path().stem().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

/// `--config`: a config.json, or a preset's name.
Config bench_config(const std::string& name) {
  if (is_file(name)) {
    return Config::read(name);
  }
  const auto preset = std::string(DIFFUSERS_CONFIGS) + "/" + name + ".json";
  if (is_file(preset)) {
    return Config::read(preset);
  }
  throw std::runtime_error(fmt::format(
      "--config {}: neither a config.json nor a preset ({})",
      name,
      joined(presets())));
}

torch::Dtype dtype_of(const std::string& name) {
  static const std::map<std::string, torch::Dtype> dtypes{
      {"float32", torch::kFloat},
      {"bfloat16", torch::kBFloat16},
      {"float16", torch::kHalf}};
  return dtypes.at(name);
}

/// The dtype of `--dtype`, refused where this LibTorch cannot run it.
torch::Dtype dtype_on(const std::string& name, const torch::Device& device) {
#if TORCH_VERSION_MAJOR < 2
  if (name == "float16" && device.is_cpu()) {
    throw std::runtime_error(
        "--dtype float16 on the CPU needs LibTorch 2.x: 1.13 has no float16 "
        "CPU kernels for matmul and convolution; use --dtype bfloat16, or "
        "--device cuda");
  }
#endif
  return dtype_of(name);
}

torch::Device device_of(const std::string& name) {
  if (name == "cuda" && !torch::cuda::is_available()) {
    throw std::runtime_error(
        "--device cuda: this LibTorch sees no CUDA device (a CPU build, or no "
        "GPU); use --device cpu");
  }
  return name == "cuda" ? torch::Device(torch::kCUDA)
                        : torch::Device(torch::kCPU);
}

/// The file's tensors as a model's Inputs, on `device`, floats in `dtype`;
/// the `required` ones must be there.
Inputs read_inputs(
    const std::string& path,
    torch::Dtype dtype,
    const torch::Device& device,
    const std::vector<std::string>& required) {
  const auto file = styleinject::load_safetensors(path);
  Inputs in;
  const std::map<std::string, torch::Tensor*> slots{
      {"sample", &in.sample},
      {"timestep", &in.timestep},
      {"encoder_hidden_states", &in.encoder_hidden_states},
      {"text_embeds", &in.text_embeds},
      {"time_ids", &in.time_ids},
      {"resolution", &in.resolution},
      {"aspect_ratio", &in.aspect_ratio},
      {"encoder_attention_mask", &in.encoder_attention_mask}};
  for (const auto& [name, tensor] : file.tensors) {
    const auto slot = slots.find(name);
    if (slot == slots.end()) {
      std::vector<std::string> known;
      for (const auto& s : slots) {
        known.push_back(s.first);
      }
      throw std::runtime_error(fmt::format(
          "{}: unknown input '{}' (expected some of: {})",
          path,
          name,
          joined(known)));
    }
    *slot->second =
        name == "timestep" ? tensor.to(device) : tensor.to(device, dtype);
  }
  for (const auto& name : required) {
    if (!slots.at(name)->defined()) {
      throw std::runtime_error(fmt::format(
          "{}: expected a tensor '{}', but the file has none", path, name));
    }
  }
  return in;
}

struct ForwardArgs {
  std::string model, inputs, out, lora, adapters, device = "cpu",
                                                  dtype = "float32";
  double lora_alpha = 0;
  int64_t repeat = 1;
};

/// Seconds since `start`, the device's queue drained.
double seconds_since(
    std::chrono::steady_clock::time_point start,
    const torch::Device& device) {
  if (device.is_cuda()) {
    torch::cuda::synchronize();
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

int run_forward(const ForwardArgs& args) {
  const auto device = device_of(args.device);
  const auto dtype = dtype_on(args.dtype, device);
  const auto start = std::chrono::steady_clock::now();
  auto model = load_model(args.model, dtype, device);
  std::cout << fmt::format(
      "loaded in {:.2f} s\n", seconds_since(start, device));
  if (!args.lora.empty()) {
    auto options = styleinject::ImportLoraOptions();
    if (args.lora_alpha > 0) {
      options.alpha(args.lora_alpha);
    }
    const auto report = styleinject::import_lora(*model, args.lora, options);
    std::cout << fmt::format(
        "LoRA ({}) on {} layers\n",
        styleinject::lora_format_name(report.format),
        report.layers.size());
  }
  if (!args.adapters.empty()) {
    styleinject::load_adapters(*model, args.adapters);
  }
  const auto inputs = read_inputs(
      args.inputs,
      dtype,
      device,
      {"sample", "timestep", "encoder_hidden_states"});
  model->eval();
  torch::NoGradGuard no_grad;
  torch::Tensor sample;
  for (int64_t i = 0; i < args.repeat; ++i) { // the same forward, timed
    const auto begin = std::chrono::steady_clock::now();
    sample = model->forward(inputs);
    std::cout << fmt::format(
        "forward in {:.3f} s\n", seconds_since(begin, device));
  }
  styleinject::save_safetensors(args.out, {{"sample", sample}});
  std::cout << "sample " << sample.sizes() << " -> " << args.out << "\n";
  return 0;
}

// ---------------------------------------------------------------------------
// finetune

struct FinetuneArgs {
  std::string model, data, out, method = "styleinject", device = "cpu",
                                dtype = "float32";
  std::vector<std::string> targets{"to_q", "to_k", "to_v", "to_out.0"};
  int64_t rank = 4, branches = 4, steps = 100, batch = 4, seed = 0;
  double lr = 1e-4;
};

/// DDPM's ᾱ_t, t = 0..999, of the schedule the model was trained with:
/// Stable Diffusion's "scaled_linear" (0.00085 to 0.012) for the UNet,
/// PixArt's "linear" (0.0001 to 0.02).
torch::Tensor alphas_cumprod(bool unet, const torch::Device& device) {
  const auto betas = unet
      ? torch::linspace(
            std::sqrt(0.00085), std::sqrt(0.012), 1000, torch::kDouble)
            .square()
      : torch::linspace(1e-4, 0.02, 1000, torch::kDouble);
  return (1 - betas).cumprod(0).to(device, torch::kFloat);
}

/// The rows `index` of every per-sample tensor of `in`.
Inputs rows(const Inputs& in, const torch::Tensor& index) {
  Inputs out = in;
  for (auto* t :
       {&out.sample,
        &out.encoder_hidden_states,
        &out.text_embeds,
        &out.time_ids,
        &out.resolution,
        &out.aspect_ratio,
        &out.encoder_attention_mask}) {
    if (t->defined()) {
      *t = t->index_select(0, index);
    }
  }
  return out;
}

/// The denoising loss on clean latents `batch.sample`: noised to timesteps
/// `t`, the model predicts the noise (in its first channels: PixArt also
/// predicts a variance in the rest).
torch::Tensor denoising_loss(
    DenoiserImpl& model,
    Inputs batch,
    const torch::Tensor& alphas,
    const torch::Tensor& t,
    const torch::Tensor& noise) {
  const auto a = alphas.index_select(0, t).view({-1, 1, 1, 1});
  const auto clean = batch.sample;
  batch.sample = (a.sqrt() * clean.to(torch::kFloat) + (1 - a).sqrt() * noise)
                     .to(clean.scalar_type());
  batch.timestep = t;
  const auto predicted = model.forward(batch).narrow(1, 0, noise.size(1));
  return torch::mse_loss(predicted.to(torch::kFloat), noise);
}

int run_finetune(const FinetuneArgs& args) {
  const auto device = device_of(args.device);
  const auto dtype = dtype_on(args.dtype, device);
  auto model = load_model(args.model, dtype, device);
  const bool unet =
      std::dynamic_pointer_cast<UNet2DConditionModelImpl>(model) != nullptr;
  auto options = args.method == "lora"
      ? styleinject::StyleInjectOptions::lora(args.rank)
      : styleinject::StyleInjectOptions(args.rank).branches(args.branches);
  options.dtype(torch::kFloat); // float32 adapters, on any base
  std::cout << styleinject::inject(
      *model, styleinject::Targets::suffixes(args.targets), options);
  model->to(device);
  const auto data = read_inputs(
      args.data, dtype, device, {"sample", "encoder_hidden_states"});
  const auto count = data.sample.size(0);
  const auto alphas = alphas_cumprod(unet, device);
  torch::optim::AdamW adam(
      styleinject::adapter_parameters(*model),
      torch::optim::AdamWOptions(args.lr));
  torch::manual_seed(args.seed);
  const auto on = torch::TensorOptions().device(device);
  // A fixed batch, timesteps and noise, to see what training did.
  const auto eval_rows =
      torch::arange(std::min(args.batch, count), on.dtype(torch::kLong));
  const auto eval_batch = rows(data, eval_rows);
  const auto eval_t =
      torch::randint(1000, {eval_rows.size(0)}, on.dtype(torch::kLong));
  const auto eval_noise =
      torch::randn(eval_batch.sample.sizes(), on.dtype(torch::kFloat));
  const auto eval_loss = [&] {
    torch::NoGradGuard no_grad;
    return denoising_loss(*model, eval_batch, alphas, eval_t, eval_noise)
        .item<double>();
  };
  const double before = eval_loss();
  for (int64_t step = 1; step <= args.steps; ++step) {
    const auto index =
        torch::randint(count, {args.batch}, on.dtype(torch::kLong));
    const auto batch = rows(data, index);
    const auto t = torch::randint(1000, {args.batch}, on.dtype(torch::kLong));
    const auto noise =
        torch::randn(batch.sample.sizes(), on.dtype(torch::kFloat));
    const auto loss = denoising_loss(*model, batch, alphas, t, noise);
    adam.zero_grad();
    loss.backward();
    adam.step();
    if (step % std::max<int64_t>(1, args.steps / 10) == 0) {
      std::cout << fmt::format(
          "step {} loss {:.4f}\n", step, loss.item<double>());
    }
  }
  std::cout << fmt::format(
      "eval loss: {:.4f} -> {:.4f}\n", before, eval_loss());
  styleinject::save_adapters(*model, args.out);
  std::cout << "adapters -> " << args.out << "\n";
  return 0;
}

// ---------------------------------------------------------------------------
// bench

struct BenchArgs {
  std::string config = "sd15", device = "cpu", dtype = "float32",
              adapter_dtype = "float32";
  int64_t batch = 4, size = 64, tokens = 77, rounds = 5, rank = 4, branches = 4;
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const auto n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

/// One regime of the bench: what it trains, its model, its step times.
struct Arm {
  std::string label;
  std::shared_ptr<DenoiserImpl> model;
  std::vector<double> ms;
  int64_t trainable = 0;
};

/// The config's model on the random base that every arm shares (seed 0),
/// in `dtype` on `device`: frozen, trained whole, or with `adapter` on the
/// attention's projections (its weights random, as if trained).
Arm make_arm(
    const std::string& label,
    Config config,
    const torch::Device& device,
    torch::Dtype dtype,
    bool train_base,
    const c10::optional<styleinject::StyleInjectOptions>& adapter = {}) {
  torch::manual_seed(0);
  Arm arm{label, build_model(config)};
  arm.model->to(device, dtype);
  for (auto& p : arm.model->parameters()) {
    p.set_requires_grad(train_base);
  }
  if (adapter) {
    styleinject::inject(
        *arm.model,
        styleinject::Targets::suffixes({"to_q", "to_k", "to_v", "to_out.0"}),
        *adapter);
    arm.model->to(device);
    torch::NoGradGuard no_grad;
    for (auto& p : styleinject::adapter_parameters(*arm.model)) {
      p.normal_(0.0, 0.02); // B starts at zero
    }
  }
  for (const auto& p : arm.model->parameters()) {
    arm.trainable += p.requires_grad() ? p.numel() : 0;
  }
  arm.label += fmt::format(", {} trainable", arm.trainable);
  return arm;
}

/// Each arm's training step (forward, loss, backward; a frozen arm's
/// gradient goes to the input), one per arm per round, interleaved; the
/// first round is a warm-up.
void time_steps(
    std::vector<Arm>& arms,
    const Inputs& inputs,
    int64_t rounds,
    const torch::Device& device) {
  for (int64_t round = 0; round <= rounds; ++round) {
    for (auto& arm : arms) {
      auto in = inputs;
      in.sample = in.sample.clone().requires_grad_(arm.trainable == 0);
      if (device.is_cuda()) {
        torch::cuda::synchronize();
      }
      const auto start = std::chrono::steady_clock::now();
      arm.model->forward(in).to(torch::kFloat).square().mean().backward();
      const double ms = 1000 * seconds_since(start, device);
      for (auto& p : arm.model->parameters()) {
        p.mutable_grad().reset();
      }
      if (round > 0) {
        arm.ms.push_back(ms);
      }
    }
  }
}

/// The median of the per-round ratios a / b, with their range.
std::string ratio(const Arm& a, const Arm& b) {
  std::vector<double> r;
  for (size_t i = 0; i < a.ms.size(); ++i) {
    r.push_back(a.ms[i] / b.ms[i]);
  }
  return fmt::format(
      "{:.2f} ({:.2f}-{:.2f})",
      median(r),
      *std::min_element(r.begin(), r.end()),
      *std::max_element(r.begin(), r.end()));
}

int run_bench(const BenchArgs& args) {
  const auto device = device_of(args.device);
  const auto dtype = dtype_on(args.dtype, device);
  const auto config = bench_config(args.config);
  auto adapter =
      styleinject::StyleInjectOptions(args.rank).branches(args.branches);
  if (args.adapter_dtype != "same") {
    adapter.dtype(dtype_of(args.adapter_dtype));
  }
  auto styleinject = make_arm(
      fmt::format("StyleInject n={} r={}", args.branches, args.rank),
      config,
      device,
      dtype,
      false,
      adapter);
  // LoRA of StyleInject's parameter count.
  const auto rank = std::max<int64_t>(
      1,
      std::llround(
          double(styleinject.trainable) /
          double(examples::lora_parameters_per_rank(*styleinject.model))));
  std::vector<Arm> arms;
  arms.push_back(make_arm("frozen base", config, device, dtype, false));
  arms.push_back(make_arm("full fine-tune", config, device, dtype, true));
  arms.push_back(make_arm(
      fmt::format("LoRA r={}", rank),
      config,
      device,
      dtype,
      false,
      styleinject::StyleInjectOptions::lora(rank).dtype(adapter.dtype())));
  arms.push_back(std::move(styleinject));

  torch::manual_seed(1);
  const auto inputs = arms[0].model->example_inputs(
      args.batch,
      args.size,
      args.tokens,
      torch::TensorOptions().device(device).dtype(dtype));
  std::cout << fmt::format(
      "{}: batch {}, {}x{} latents, {} tokens, {} on {}, adapters on "
      "to_q/to_k/to_v/to_out.0 in {}\n",
      args.config,
      args.batch,
      args.size,
      args.size,
      args.tokens,
      args.dtype,
      args.device,
      args.adapter_dtype);
  time_steps(arms, inputs, args.rounds, device);
  for (const auto& arm : arms) {
    std::cout << fmt::format(
        "  {:<46} {:>9.1f} ms  {} x frozen\n",
        arm.label,
        median(arm.ms),
        ratio(arm, arms[0]));
  }
  std::cout << fmt::format(
      "  StyleInject / LoRA: {} over {} interleaved rounds\n",
      ratio(arms[3], arms[2]),
      args.rounds);
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  examples::keep_freed_memory();
  CLI::App app{"diffusers' UNet and PixArt in LibTorch, with StyleInject"};
  app.require_subcommand(1);
  const std::vector<std::string> devices{"cpu", "cuda"};
  const std::vector<std::string> dtypes{"float32", "bfloat16", "float16"};

  ForwardArgs fwd;
  auto* forward = app.add_subcommand("forward", "one forward pass of a model");
  forward->add_option("--model", fwd.model, "diffusers' model directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  forward->add_option("--inputs", fwd.inputs, "safetensors file of inputs")
      ->required()
      ->check(CLI::ExistingFile);
  forward->add_option("--out", fwd.out, "safetensors file for `sample`")
      ->required();
  forward->add_option(
      "--lora", fwd.lora, "a LoRA (PEFT directory, diffusers or kohya file)");
  forward
      ->add_option(
          "--lora-alpha", fwd.lora_alpha, "alpha where the LoRA file has none")
      ->check(CLI::PositiveNumber);
  forward->add_option("--repeat", fwd.repeat, "forward passes, each timed")
      ->check(CLI::PositiveNumber);
  forward->add_option("--device", fwd.device)->check(CLI::IsMember(devices));
  forward->add_option("--dtype", fwd.dtype)->check(CLI::IsMember(dtypes));

  forward->add_option("--adapters", fwd.adapters, "adapters saved by finetune")
      ->check(CLI::ExistingFile);

  FinetuneArgs tune;
  auto* finetune = app.add_subcommand(
      "finetune", "train adapters on clean latents and their conditioning");
  finetune->add_option("--model", tune.model, "diffusers' model directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  finetune
      ->add_option(
          "--data",
          tune.data,
          "safetensors: `sample` (clean latents), `encoder_hidden_states`, ...")
      ->required()
      ->check(CLI::ExistingFile);
  finetune->add_option("--out", tune.out, "the adapters' file")->required();
  finetune->add_option("--method", tune.method)
      ->check(CLI::IsMember({"styleinject", "lora"}));
  finetune->add_option("--targets", tune.targets, "layer name suffixes")
      ->delimiter(',');
  finetune->add_option("--rank", tune.rank)->check(CLI::PositiveNumber);
  finetune->add_option("--branches", tune.branches)->check(CLI::PositiveNumber);
  finetune->add_option("--steps", tune.steps)->check(CLI::PositiveNumber);
  finetune->add_option("--batch", tune.batch)->check(CLI::PositiveNumber);
  finetune->add_option("--lr", tune.lr)->check(CLI::PositiveNumber);
  finetune->add_option("--seed", tune.seed);
  finetune->add_option("--device", tune.device)->check(CLI::IsMember(devices));
  finetune->add_option("--dtype", tune.dtype)->check(CLI::IsMember(dtypes));

  BenchArgs bench_args;
  auto* bench =
      app.add_subcommand("bench", "time training steps on random weights");
  bench->add_option(
      "--config",
      bench_args.config,
      "a config.json, or a preset: " + joined(presets()));
  bench->add_option("--batch", bench_args.batch)->check(CLI::PositiveNumber);
  bench->add_option("--size", bench_args.size, "latent side")
      ->check(CLI::PositiveNumber);
  bench->add_option("--tokens", bench_args.tokens, "caption tokens")
      ->check(CLI::PositiveNumber);
  bench->add_option("--rounds", bench_args.rounds)->check(CLI::PositiveNumber);
  bench->add_option("--rank", bench_args.rank)->check(CLI::PositiveNumber);
  bench->add_option("--branches", bench_args.branches)
      ->check(CLI::PositiveNumber);
  bench->add_option("--device", bench_args.device)
      ->check(CLI::IsMember(devices));
  bench->add_option("--dtype", bench_args.dtype)->check(CLI::IsMember(dtypes));
  bench->add_option("--adapter-dtype", bench_args.adapter_dtype)
      ->check(CLI::IsMember({"same", "float32", "bfloat16", "float16"}));

  CLI11_PARSE(app, argc, argv);
  try {
    if (forward->parsed()) {
      return run_forward(fwd);
    }
    return finetune->parsed() ? run_finetune(tune) : run_bench(bench_args);
  } catch (const std::exception& e) {
    // c10::Error's what() carries a C++ stack trace; the message is enough.
    const auto* error = dynamic_cast<const c10::Error*>(&e);
    std::cerr << "error: "
              << (error ? error->what_without_backtrace() : e.what()) << "\n";
    return 1;
  }
}
