#pragma once
// The typeface example's phases: pretraining the base model, fine-tuning an
// adapter, training the evaluation's glyph classifier and evaluating, with
// the progress bar, checkpoints and PNG output they share.

#include "diffusion.h"
#include "glyphs.h"
#include "model.h"
#include "progress.h"

#include <styleinject/captured_step.h>
#include <styleinject/distributed.h>
#include <styleinject/styleinject.h>

#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <png.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace typeface {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

// ---------------------------------------------------------------- runtime

/// Where and in which precision the model runs: float32, or bfloat16
/// through autocast (the weights stay float32); and with which other
/// processes it trains (one alone unless torchrun started several).
struct Runtime {
  torch::Device device = torch::kCPU;
  bool bfloat16 = false;
  std::shared_ptr<styleinject::distributed::ProcessGroup> group =
      std::make_shared<styleinject::distributed::ProcessGroup>();

  /// Rank 0: the process that writes files and prints progress.
  bool is_main() const {
    return group->is_main();
  }
};

/// Rank 0's `value` on every rank: what rank 0 decides (a file it found, a
/// time it measured), every rank follows, so that all run the same steps.
inline double from_main(const Runtime& runtime, double value) {
  auto t = torch::tensor({value}, torch::kDouble).to(runtime.group->device());
  runtime.group->broadcast(t, "a decision of rank 0", 0);
  return t.item<double>();
}

/// Whether rank 0 sees `path`, on every rank.
inline bool exists_on_main(const Runtime& runtime, const fs::path& path) {
  return from_main(runtime, fs::exists(path) ? 1 : 0) != 0;
}

/// The rows [begin, end) of a batch of `n` that this process trains on:
/// its share of the batch, in rank order.
struct Rows {
  int64_t begin, end;
};
inline Rows rows_of(const Runtime& runtime, int64_t n) {
  const auto ranks = runtime.group->size(), rank = runtime.group->rank();
  if (n < ranks) {
    throw std::invalid_argument(
        "--batch " + std::to_string(n) + " cannot be split across " +
        std::to_string(ranks) + " processes; use at least one row each");
  }
  return {n * rank / ranks, n * (rank + 1) / ranks};
}

/// Turns autocast to bfloat16 on for the runtime's device while it lives
/// (the call differs between LibTorch 1.13 and 2.x).
class AutocastGuard {
 public:
  explicit AutocastGuard(const Runtime& runtime)
      : on_(runtime.bfloat16), type_(runtime.device.type()) {
    set(on_);
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;
  ~AutocastGuard() {
    if (on_) {
      set(false);
      at::autocast::clear_cache();
    }
  }

 private:
  void set(bool enabled) const {
    if (!on_) {
      return;
    }
#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    at::autocast::set_autocast_dtype(type_, torch::kBFloat16);
    at::autocast::set_autocast_enabled(type_, enabled);
#else
    if (type_ == torch::kCUDA) {
      at::autocast::set_autocast_gpu_dtype(torch::kBFloat16);
      at::autocast::set_enabled(enabled);
    } else {
      at::autocast::set_autocast_cpu_dtype(torch::kBFloat16);
      at::autocast::set_cpu_enabled(enabled);
    }
#endif
  }
  bool on_;
  torch::DeviceType type_;
};

// ------------------------------------------------------------------ files

/// Writes text to a file atomically (temporary file, then rename).
inline void write_text(const fs::path& path, const std::string& text) {
  if (!path.parent_path().empty()) {
    fs::create_directories(path.parent_path());
  }
  styleinject::detail::safetensors::write_file_atomically(
      path.string(), text, "typeface");
}

inline ordered_json read_json(const fs::path& path) {
  std::ifstream stream(path);
  if (!stream) {
    throw std::runtime_error("cannot read " + path.string());
  }
  return ordered_json::parse(stream);
}

/// Named tensors, in a fixed order.
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

/// A module's named parameters, each name after `prefix`.
inline NamedTensors prefixed(
    const std::string& prefix,
    const torch::OrderedDict<std::string, torch::Tensor>& parameters) {
  NamedTensors tensors;
  for (const auto& item : parameters) {
    tensors.emplace_back(prefix + item.key(), item.value());
  }
  return tensors;
}

/// The trainable parameters of `module`, by name (a fine-tune's adapters).
inline NamedTensors trainable(const torch::nn::Module& module) {
  NamedTensors tensors;
  for (const auto& item : module.named_parameters()) {
    if (item.value().requires_grad()) {
      tensors.emplace_back(item.key(), item.value());
    }
  }
  return tensors;
}

/// Saves what a resume needs, `tensors`, the optimizer's state and the
/// step, into one file, atomically: a run stopped while it saves leaves
/// the last checkpoint whole, never a mix of two steps. (The files written
/// beside it, weights and JSON records, are for reading, not resuming.)
inline void save_checkpoint(
    const fs::path& path,
    const NamedTensors& tensors,
    const torch::optim::Optimizer& optimizer,
    int64_t step) {
  torch::serialize::OutputArchive archive, values, state;
  std::vector<std::string> names;
  for (size_t i = 0; i < tensors.size(); ++i) {
    values.write(std::to_string(i), tensors[i].second);
    names.push_back(tensors[i].first);
  }
  optimizer.save(state);
  archive.write("names", c10::IValue(c10::List<std::string>(names)));
  archive.write("tensors", values);
  archive.write("optimizer", state);
  archive.write("step", c10::IValue(step));
  std::ostringstream stream;
  archive.save_to(stream);
  write_text(path, stream.str());
}

/// Reads a checkpoint of save_checkpoint into `tensors` (in place) and the
/// optimizer; returns its step. A checkpoint of other tensors is an error.
inline int64_t load_checkpoint(
    const fs::path& path,
    const NamedTensors& tensors,
    torch::optim::Optimizer& optimizer,
    torch::Device device) {
  torch::serialize::InputArchive archive, values, state;
  archive.load_from(path.string(), device);
  c10::IValue names, step;
  archive.read("names", names);
  std::vector<std::string> expected;
  for (const auto& item : tensors) {
    expected.push_back(item.first);
  }
  if (names.toListRef().size() != expected.size() ||
      !std::equal(
          expected.begin(),
          expected.end(),
          names.toListRef().begin(),
          [](const std::string& a, const c10::IValue& b) {
            return a == b.toStringRef();
          })) {
    throw std::runtime_error(
        "--resume: " + path.string() + " holds the tensors of another model");
  }
  archive.read("tensors", values);
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < tensors.size(); ++i) {
    auto tensor = tensors[i].second;
    values.read(std::to_string(i), tensor);
  }
  archive.read("optimizer", state);
  optimizer.load(state);
  archive.read("step", step);
  return step.toInt();
}

/// Writes a (H, W) image with values in [0, 1] as an 8-bit grayscale PNG.
inline void write_png(const fs::path& path, const torch::Tensor& image) {
  TORCH_CHECK(
      image.dim() == 2, "write_png: expected (H, W), got ", image.sizes());
  const auto bytes =
      (image.detach().to(torch::kCPU, torch::kFloat).clamp(0, 1) * 255)
          .round()
          .to(torch::kUInt8)
          .contiguous();
  png_image png{};
  png.version = PNG_IMAGE_VERSION;
  png.width = static_cast<png_uint_32>(bytes.size(1));
  png.height = static_cast<png_uint_32>(bytes.size(0));
  png.format = PNG_FORMAT_GRAY;
  png_alloc_size_t size = 0;
  TORCH_CHECK(
      png_image_write_get_memory_size(
          png, size, 0, bytes.data_ptr(), 0, nullptr),
      "libpng: ",
      png.message);
  std::string buffer(size, '\0');
  TORCH_CHECK(
      png_image_write_to_memory(
          &png, buffer.data(), &size, 0, bytes.data_ptr(), 0, nullptr),
      "libpng: ",
      png.message);
  buffer.resize(size);
  write_text(path, buffer);
}

/// Tiles rows of images (each (N, 1, S, S) in [0, 1], rows may differ in
/// N) into one (H, W) picture with a gray gap, enlarged `zoom` times.
inline torch::Tensor grid(
    const std::vector<torch::Tensor>& rows,
    int64_t zoom = 2) {
  TORCH_CHECK(!rows.empty(), "grid: no rows");
  const auto size = rows[0].size(-1);
  int64_t columns = 0;
  for (const auto& row : rows) {
    columns = std::max(columns, row.size(0));
  }
  const int64_t gap = 2, cell = size + gap;
  auto canvas = torch::full(
      {gap + cell * static_cast<int64_t>(rows.size()), gap + cell * columns},
      0.35);
  for (size_t r = 0; r < rows.size(); ++r) {
    const auto row = rows[r].detach().to(torch::kCPU, torch::kFloat);
    for (int64_t c = 0; c < row.size(0); ++c) {
      canvas.slice(0, gap + cell * r, gap + cell * r + size)
          .slice(1, gap + cell * c, gap + cell * c + size)
          .copy_(row[c][0]);
    }
  }
  return canvas.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1);
}

// ------------------------------------------------------------------- data

/// A batch of renders with their labels and captions.
struct Batch {
  torch::Tensor images; // (N, 1, S, S) in [0, 1]
  torch::Tensor ids; // (N, L) caption token ids
  torch::Tensor characters; // (N,) index into characters()
  torch::Tensor fonts; // (N,) index into catalogue()
};

/// Draws `n` renders of random (font, character) pairs from the given
/// sets; a caption is left empty with probability `drop_caption` (for
/// classifier-free guidance).
inline Batch draw_batch(
    GlyphRenderer& renderer,
    const Tokenizer& tokenizer,
    const std::vector<int64_t>& fonts,
    const std::string& chars,
    int64_t n,
    std::mt19937_64& rng,
    double drop_caption = 0) {
  std::uniform_int_distribution<size_t> pick_font(0, fonts.size() - 1);
  std::uniform_int_distribution<size_t> pick_char(0, chars.size() - 1);
  std::uniform_real_distribution<double> coin(0, 1);
  std::vector<torch::Tensor> images, ids;
  std::vector<int64_t> char_labels, font_labels;
  for (int64_t i = 0; i < n; ++i) {
    const auto font = fonts[pick_font(rng)];
    const char c = chars[pick_char(rng)];
    images.push_back(renderer.render(font, c, &rng));
    ids.push_back(tokenizer.encode(
        coin(rng) < drop_caption ? "" : caption(c, catalogue()[font].name)));
    char_labels.push_back(static_cast<int64_t>(characters().find(c)));
    font_labels.push_back(font);
  }
  return {
      torch::stack(images).unsqueeze(1),
      torch::stack(ids),
      torch::tensor(char_labels, torch::kLong),
      torch::tensor(font_labels, torch::kLong)};
}

/// Sets the learning rate of every parameter group of an AdamW optimizer.
inline void set_learning_rate(torch::optim::AdamW& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) {
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
  }
}

/// Cosine decay from `lr` to `lr / 10` after a short linear warm-up.
inline double scheduled_learning_rate(double lr, int64_t step, int64_t steps) {
  const int64_t warmup = std::min<int64_t>(100, steps / 10);
  if (step < warmup) {
    return lr * (step + 1) / warmup;
  }
  const double progress =
      static_cast<double>(step - warmup) / std::max<int64_t>(1, steps - warmup);
  return lr * (0.1 + 0.45 * (1 + std::cos(M_PI * progress)));
}

// ------------------------------------------------------------ pretraining

/// Decay of the pretraining's moving average of the weights.
inline constexpr double kAverageDecay = 0.998;

/// A batch's tensor on the runtime's device: on CUDA through pinned memory
/// and an asynchronous copy, so that the host draws the next batch while the
/// device still trains on this one.
inline torch::Tensor on_device(const torch::Tensor& t, const Runtime& runtime) {
  if (!runtime.device.is_cuda() || t.device() == runtime.device) {
    return t.to(runtime.device);
  }
  return t.pin_memory().to(runtime.device, /*non_blocking=*/true);
}

/// One optimizer step on the diffusion loss of a batch (or, with a teacher,
/// the distillation loss), of which this process trains on its rows
/// (rows_of); the gradients are then averaged across the processes.
/// Returns this process's share of the batch's loss, still on the device:
/// their mean over the processes is the batch's loss.
inline torch::Tensor diffusion_step(
    TextToImage& model,
    const NoiseSchedule& schedule,
    const Batch& batch,
    torch::optim::Optimizer& optimizer,
    const Runtime& runtime,
    TextToImage* teacher = nullptr) {
  const auto n = batch.images.size(0);
  const auto rows = rows_of(runtime, n);
  optimizer.zero_grad();
  torch::Tensor loss;
  {
    AutocastGuard autocast(runtime);
    loss = diffusion_loss(
        model,
        schedule,
        on_device(batch.images, runtime) * 2 - 1,
        on_device(batch.ids, runtime),
        rows.begin,
        rows.end,
        teacher);
  }
  if (rows.end - rows.begin != n) {
    // Weighted by the rows' share, so that the mean over the processes of
    // these losses (and of their gradients) is the whole batch's, also
    // where the processes hold unequal numbers of rows.
    loss = loss *
        (static_cast<double>((rows.end - rows.begin) * runtime.group->size()) /
         n);
  }
  loss.backward();
  for (const auto& group : optimizer.param_groups()) {
    styleinject::distributed::average_gradients(*runtime.group, group.params());
  }
  optimizer.step();
  return loss.detach();
}

/// The loss for the progress bar, read back every tenth step and at the
/// last only: each read makes the host wait for the device (and, with
/// several processes, is one small all-reduce). -1: not read.
inline double shown_loss(
    const Runtime& runtime,
    const torch::Tensor& loss,
    int64_t step,
    int64_t steps) {
  if (step % 10 != 0 && step != steps) {
    return -1.0;
  }
  return styleinject::distributed::average(*runtime.group, loss).item<double>();
}

struct PretrainOptions {
  ModelConfig config = ModelConfig::small(); // unless it starts from `init`
  fs::path init; // a base model to go on from (full fine-tuning); empty: none
  std::vector<int64_t> fonts = base_fonts(); // what it learns
  std::string chars = characters();
  int64_t steps = 8000;
  int64_t batch = 32;
  double lr = 1e-3;
  int64_t checkpoint_every = 500;
  uint64_t seed = 0;
  bool resume = false;
};

/// The files of a base model: its (averaged) weights as safetensors, and
/// what they were trained with.
inline fs::path model_file(const fs::path& dir) {
  return dir / "model.safetensors";
}

/// Where versions before 0.5 kept the weights (torch::save).
inline fs::path legacy_model_file(const fs::path& dir) {
  return dir / "model.pt";
}

/// Loads a base model's weights from `dir` into `model`.
inline void load_model_weights(TextToImage& model, const fs::path& dir) {
  if (!fs::exists(model_file(dir)) && fs::exists(legacy_model_file(dir))) {
    torch::load(model, legacy_model_file(dir).string());
    return;
  }
  styleinject::load_weights(*model, model_file(dir).string());
}
inline fs::path config_file(const fs::path& dir) {
  return dir / "config.json";
}

/// Whether `dir` holds a base model whose pretraining finished.
inline bool base_complete(const fs::path& dir) {
  if (!fs::exists(config_file(dir)) ||
      !(fs::exists(model_file(dir)) || fs::exists(legacy_model_file(dir)))) {
    return false;
  }
  const auto json = read_json(config_file(dir));
  return json.value("step", int64_t{-1}) == json.value("steps", int64_t{0});
}

/// Loads a base model saved by `pretrain` into a new model on `device`.
inline TextToImage load_base(const fs::path& dir, torch::Device device) {
  if (!fs::exists(config_file(dir))) {
    throw std::runtime_error(
        "no base model in " + dir.string() +
        " (expected config.json and model.safetensors); run `typeface "
        "pretrain --out " +
        dir.string() + "` first");
  }
  const auto json = read_json(config_file(dir));
  TextToImage model(ModelConfig::from_json(json.at("model")));
  load_model_weights(model, dir);
  model->to(device);
  return model;
}

/// Pretrains the base model on the base fonts (DDPM, AdamW, cosine decay),
/// or with `init`, fine-tunes all of a base model's weights on `fonts`;
/// saves a checkpoint into `dir` every `checkpoint_every` steps and at the
/// end; with `resume`, goes on from the checkpoint in `dir`.
inline void pretrain(
    const PretrainOptions& options,
    const fs::path& dir,
    GlyphRenderer& renderer,
    const Runtime& runtime) {
  const Tokenizer tokenizer;
  auto config = options.config;
  config.vocabulary = tokenizer.vocabulary_size();
  config.context = tokenizer.length();
  torch::manual_seed(options.seed);
  auto model = options.init.empty() ? TextToImage(config)
                                    : load_base(options.init, runtime.device);
  config = model->config;
  if (renderer.size() != config.image_size) {
    throw std::invalid_argument(
        "the renderer draws " + std::to_string(renderer.size()) +
        " px images but the model expects " +
        std::to_string(config.image_size));
  }
  model->to(runtime.device);
  // An exponential moving average of the weights is what gets saved and
  // sampled (as DDPM does): it evens out the last steps' noise.
  TextToImage average(config);
  average->to(runtime.device);
  const auto weights = model->parameters();
  auto averaged = average->parameters();
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < weights.size(); ++i) {
      averaged[i].copy_(weights[i]);
      averaged[i].requires_grad_(false);
    }
  }
  torch::optim::AdamW optimizer(
      weights, torch::optim::AdamWOptions(options.lr).weight_decay(0));
  // The weights and their average, for the checkpoint.
  auto tensors = prefixed("model.", model->named_parameters());
  for (auto& item : prefixed("average.", average->named_parameters())) {
    tensors.push_back(std::move(item));
  }
  int64_t step = 0;
  const auto checkpoint = dir / "training.pt";
  if (options.resume) {
    if (!fs::exists(config_file(dir)) || !fs::exists(checkpoint)) {
      throw std::runtime_error(
          "--resume: no checkpoint in " + dir.string() + " to resume from");
    }
    const auto state = read_json(config_file(dir));
    if (ModelConfig::from_json(state.at("model")).to_json() !=
        config.to_json()) {
      throw std::runtime_error(
          "--resume: the checkpoint in " + dir.string() +
          " is of another model: " + state.at("model").dump() + " vs " +
          config.to_json().dump());
    }
    step = load_checkpoint(checkpoint, tensors, optimizer, runtime.device);
  }
  const auto save = [&] {
    if (!runtime.is_main()) {
      return;
    }
    save_checkpoint(checkpoint, tensors, optimizer, step);
    styleinject::save_weights(
        *average,
        model_file(dir).string(),
        {{"what", "typeface base model (EMA weights)"},
         {"step", std::to_string(step)},
         {"steps", std::to_string(options.steps)},
         {"seed", std::to_string(options.seed)}});
    write_text(
        config_file(dir),
        ordered_json{
            {"model", config.to_json()},
            {"step", step},
            {"steps", options.steps},
            {"batch", options.batch},
            {"lr", options.lr},
            {"ema_decay", kAverageDecay},
            {"seed", options.seed}}
            .dump(2));
  };
  int64_t count = 0;
  for (const auto& p : weights) {
    count += p.numel();
  }
  std::cerr << "pretraining a model of " << count << " parameters on "
            << options.fonts.size() << " fonts x " << options.chars.size()
            << " characters, " << options.steps << " steps of " << options.batch
            << "\n";
  // The data stream is seeded by the seed and the step it starts at: a
  // resumed run is reproducible (but draws another stream than the
  // uninterrupted run would have).
  std::mt19937_64 rng(options.seed * 1000003 + step);
  torch::manual_seed(options.seed * 1000003 + step);
  Progress progress("pretrain", options.steps, step);
  const NoiseSchedule schedule(1000, runtime.device);
  model->train();
  while (step < options.steps) {
    set_learning_rate(
        optimizer, scheduled_learning_rate(options.lr, step, options.steps));
    const auto batch = draw_batch(
        renderer,
        tokenizer,
        options.fonts,
        options.chars,
        options.batch,
        rng,
        0.1);
    const auto loss =
        diffusion_step(model, schedule, batch, optimizer, runtime);
    {
      torch::NoGradGuard no_grad;
      const double decay =
          std::min(kAverageDecay, (1.0 + step) / (10.0 + step));
      torch::_foreach_mul_(averaged, decay);
      torch::_foreach_add_(averaged, weights, 1 - decay);
    }
    ++step;
    progress.step(shown_loss(runtime, loss, step, options.steps));
    if (step % options.checkpoint_every == 0 || step == options.steps) {
      save();
    }
  }
}

// ------------------------------------------------------------- fine-tune

/// The characters of the fine-tune set (the "shots"): the first `shots` of
/// a fixed shuffle, the same for every method and seed, so that the
/// held-out characters are too.
inline std::string shot_characters(int64_t shots) {
  if (shots < 1 || shots >= static_cast<int64_t>(characters().size())) {
    throw std::invalid_argument(
        "--shots must be between 1 and " +
        std::to_string(characters().size() - 1) + ", but got " +
        std::to_string(shots));
  }
  std::string order = characters();
  std::shuffle(order.begin(), order.end(), std::mt19937_64(2024));
  auto chosen = order.substr(0, shots);
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

inline std::string held_out_characters(const std::string& shots) {
  std::string rest;
  for (const char c : characters()) {
    if (shots.find(c) == std::string::npos) {
      rest += c;
    }
  }
  return rest;
}

/// Prints, on rank 0, a fine-tune's seconds per step over its `steps`
/// steps and, with several processes, what they communicated since the
/// group's counters stood at `bytes` and `seconds`.
inline void print_speed(
    const Runtime& runtime,
    const Progress& progress,
    int64_t steps,
    int64_t bytes,
    double seconds) {
  if (!runtime.is_main() || steps == 0) {
    return;
  }
  const auto& group = *runtime.group;
  const double elapsed = progress.seconds();
  std::cerr << "finetune: " << elapsed / steps << " s per step";
  if (group.size() > 1) {
    std::cerr << "; data-parallel over " << group.size() << " processes: "
              << std::llround(
                     static_cast<double>(group.bytes_communicated() - bytes) /
                     steps)
              << " bytes communicated per step, in "
              << 100 * (group.seconds_communicating() - seconds) / elapsed
              << " % of the time";
  }
  std::cerr << "\n";
}

struct FinetuneOptions {
  std::string method = "styleinject"; // or "lora"
  std::vector<std::string> styles = {"lobster"}; // one adapter for them all
  int64_t shots = 16;
  int64_t steps = 200;
  int64_t batch = 16;
  double lr = 3e-3;
  int64_t rank = 4;
  int64_t branches = 4; // StyleInject only
  int64_t checkpoint_every = 100;
  uint64_t seed = 0;
  bool resume = false;
  /// Adapter options that replace those of method, rank and branches (the
  /// experiments' arms), and the name the run goes by then.
  c10::optional<styleinject::StyleInjectOptions> adapter;
  std::string label;
  /// The layers adapted: a regular expression over their qualified names
  /// (e.g. "dit\\..*"); empty: every Linear and Conv2d.
  std::string targets;
  /// Each step one replay of a CUDA graph captured once (on CUDA; elsewhere
  /// the same step runs eagerly), with styleinject::CapturableAdamW.
  bool cuda_graph = false;
};

/// The `inject` targets of a layer-name pattern (empty: every layer).
inline styleinject::Targets layer_targets(const std::string& pattern) {
  return pattern.empty() ? styleinject::Targets::all()
                         : styleinject::Targets::regex(pattern);
}

/// The adapter options of a method.
inline styleinject::StyleInjectOptions adapter_options(
    const FinetuneOptions& options) {
  if (options.adapter) {
    return *options.adapter;
  }
  if (options.method == "lora") {
    return styleinject::StyleInjectOptions::lora(options.rank);
  }
  if (options.method == "styleinject") {
    return styleinject::StyleInjectOptions(options.rank)
        .branches(options.branches);
  }
  throw std::invalid_argument(
      "--method must be styleinject or lora, but got '" + options.method + "'");
}

/// What a student learns from instead of renders: a teacher, and images
/// that the teacher generated for the training prompts. Noised at random
/// timesteps, they are the inputs; the teacher's predictions there are the
/// targets (diffusion_loss).
struct Distillation {
  TextToImage teacher{nullptr};
  Batch pool; // images (in [0, 1]) and ids; characters and fonts as labels
};

/// `n` random rows of the pool; a caption left empty with probability
/// `drop_caption` (so that the student learns the teacher's unconditional
/// prediction too, which guidance needs).
inline Batch draw_from_pool(
    const Batch& pool,
    int64_t n,
    std::mt19937_64& rng,
    double drop_caption) {
  std::uniform_int_distribution<int64_t> pick(0, pool.images.size(0) - 1);
  std::uniform_real_distribution<double> coin(0, 1);
  const auto empty = Tokenizer().encode("");
  std::vector<int64_t> rows;
  std::vector<torch::Tensor> ids;
  for (int64_t i = 0; i < n; ++i) {
    rows.push_back(pick(rng));
    ids.push_back(coin(rng) < drop_caption ? empty : pool.ids[rows.back()]);
  }
  const auto index = torch::tensor(rows);
  return {
      pool.images.index_select(0, index),
      torch::stack(ids),
      pool.characters.index_select(0, index),
      pool.fonts.index_select(0, index)};
}

/// The catalogue indices of new styles; a base font is refused.
inline std::vector<int64_t> new_style_fonts(
    const std::vector<std::string>& styles) {
  if (styles.empty()) {
    throw std::invalid_argument("--style: expected at least one new style");
  }
  std::vector<int64_t> fonts;
  for (const auto& style : styles) {
    fonts.push_back(font_index(style));
    if (catalogue()[fonts.back()].base) {
      throw std::invalid_argument(
          "--style '" + style +
          "' is one of the base model's fonts; pick a new style");
    }
  }
  return fonts;
}

/// Fine-tunes adapters on the targeted layers (default: every Linear and
/// Conv2d) of a fresh copy of the base model, on `shots` characters of each of
/// `styles` (one adapter for all of them): only the adapter parameters reach
/// the optimizer. Saves adapters.safetensors (and optimizer + state for
/// --resume) into `dir`; returns the adapted model. `curve`, if given, receives
/// (step, loss) every tenth step. With a `distillation`, the adapter learns the
/// teacher's predictions on its pool instead of renders.
inline TextToImage finetune(
    const FinetuneOptions& options,
    const fs::path& base_dir,
    const fs::path& dir,
    GlyphRenderer& renderer,
    const Runtime& runtime,
    std::vector<std::pair<int64_t, double>>* curve = nullptr,
    Distillation* distillation = nullptr) {
  const Tokenizer tokenizer;
  const auto fonts = new_style_fonts(options.styles);
  const auto adapter = adapter_options(options);
  const auto name = options.label.empty() ? options.method : options.label;
  torch::manual_seed(options.seed);
  auto model = load_base(base_dir, runtime.device);
  const auto report =
      styleinject::inject(*model, layer_targets(options.targets), adapter);
  if (runtime.is_main()) {
    std::cerr << name << ": adapters on " << report.layers.size() << " layers, "
              << report.trainable_parameters
              << " trainable parameters (the base model has "
              << report.total_parameters - report.trainable_parameters << ")\n";
  }
  const auto parameters = styleinject::adapter_parameters(*model);
  const auto adam = torch::optim::AdamWOptions(options.lr).weight_decay(0);
  auto holder = options.cuda_graph
      ? std::unique_ptr<torch::optim::Optimizer>(
            std::make_unique<styleinject::CapturableAdamW>(parameters, adam))
      : std::make_unique<torch::optim::AdamW>(parameters, adam);
  auto& optimizer = *holder;
  const std::string optimizer_name =
      options.cuda_graph ? "CapturableAdamW" : "AdamW";
  if (options.cuda_graph && runtime.group->size() > 1) {
    throw std::invalid_argument(
        "--cuda-graph: a captured step runs on one process, but " +
        std::to_string(runtime.group->size()) +
        " were started (its gradients' all-reduce is not captured)");
  }
  int64_t step = 0;
  const auto checkpoint = dir / "checkpoint.pt";
  const auto tensors = trainable(*model);
  if (options.resume) {
    // Every process reads the checkpoint: --out must be one folder that
    // they all see (one machine, or a shared file system).
    if (!fs::exists(checkpoint)) {
      throw std::runtime_error(
          "--resume: no fine-tune checkpoint (checkpoint.pt) in " +
          dir.string());
    }
    const auto made_with = fs::exists(dir / "state.json")
        ? read_json(dir / "state.json").value("optimizer", "AdamW")
        : optimizer_name;
    if (made_with != optimizer_name) {
      throw std::runtime_error(
          "--resume: the checkpoint in " + dir.string() + " holds " +
          made_with + "'s state, but this fine-tune steps with " +
          optimizer_name + "; resume it " +
          (options.cuda_graph ? "without" : "with") + " --cuda-graph");
    }
    step = load_checkpoint(checkpoint, tensors, optimizer, runtime.device);
  }
  // All processes start from rank 0's adapter (and step).
  styleinject::distributed::broadcast_parameters(*runtime.group, parameters);
  if (static_cast<int64_t>(from_main(runtime, static_cast<double>(step))) !=
      step) {
    throw std::runtime_error(
        "--resume: this process read step " + std::to_string(step) + " from " +
        checkpoint.string() + ", rank 0 another");
  }
  const auto shots = shot_characters(options.shots);
  const auto save = [&] {
    if (!runtime.is_main()) {
      return;
    }
    save_checkpoint(checkpoint, tensors, optimizer, step);
    styleinject::save_adapters(*model, (dir / "adapters.safetensors").string());
    write_text(
        dir / "state.json",
        ordered_json{
            {"method", name},
            {"adapter", styleinject::detail::options_to_json(adapter)},
            {"styles", options.styles},
            {"shots", shots},
            {"step", step},
            {"steps", options.steps},
            {"lr", options.lr},
            {"seed", options.seed},
            {"optimizer", optimizer_name}}
            .dump(2));
  };
  if (runtime.is_main()) {
    fs::create_directories(dir);
  }
  // Every process draws the whole batch from one stream and trains on its
  // rows of it (diffusion_step): the processes see distinct rows, and
  // together the batch that one process would.
  std::mt19937_64 rng(options.seed * 1000003 + step + 17);
  torch::manual_seed(options.seed * 1000003 + step + 17);
  Progress progress("finetune " + name, options.steps, step);
  const NoiseSchedule schedule(1000, runtime.device);
  model->train();
  if (runtime.group->size() > 1) {
    const auto rows = rows_of(runtime, options.batch);
    std::cerr << "rank " << runtime.group->rank() << " of "
              << runtime.group->size() << " trains on rows " << rows.begin
              << "-" << rows.end - 1 << " of each batch of " << options.batch
              << "\n";
  }
  const auto first = step;
  const auto bytes = runtime.group->bytes_communicated();
  const auto communicating = runtime.group->seconds_communicating();
  // One step on a batch's images and captions; with --cuda-graph, replayed.
  const auto train_on = [&](const std::vector<torch::Tensor>& batch) {
    return diffusion_step(
        model,
        schedule,
        {batch[0], batch[1], {}, {}},
        optimizer,
        runtime,
        distillation ? &distillation->teacher : nullptr);
  };
  styleinject::CapturedStep captured(train_on);
  while (step < options.steps) {
    const auto batch = distillation
        ? draw_from_pool(distillation->pool, options.batch, rng, 0.1)
        : draw_batch(
              renderer, tokenizer, fonts, shots, options.batch, rng, 0.1);
    const std::vector<torch::Tensor> inputs{
        on_device(batch.images, runtime), on_device(batch.ids, runtime)};
    const auto loss = options.cuda_graph ? captured(inputs) : train_on(inputs);
    ++step;
    const double shown = shown_loss(runtime, loss, step, options.steps);
    progress.step(shown);
    if (curve != nullptr && shown >= 0) {
      curve->emplace_back(step, shown);
    }
    if (step % options.checkpoint_every == 0 || step == options.steps) {
      save();
    }
  }
  print_speed(runtime, progress, step - first, bytes, communicating);
  return model;
}

// ------------------------------------------------------------- classifier

/// Images moved and resized as generated glyphs may be: each scaled about
/// its centre by a factor in [smallest, 1] and shifted by up to `shift` of
/// its size in each direction (bilinear, zero outside).
/// images: (N, 1, S, S) -> the same shape
inline torch::Tensor displace(
    const torch::Tensor& images,
    double smallest,
    double shift,
    std::mt19937_64& rng) {
  namespace F = torch::nn::functional;
  std::uniform_real_distribution<double> zoom(smallest, 1.0);
  std::uniform_real_distribution<double> move(-shift, shift);
  auto theta = torch::zeros({images.size(0), 2, 3});
  auto t = theta.accessor<float, 3>();
  for (int64_t i = 0; i < images.size(0); ++i) {
    // theta maps output to input coordinates ([-1, 1] spans the image).
    const double scale = zoom(rng);
    t[i][0][0] = t[i][1][1] = static_cast<float>(1 / scale);
    t[i][0][2] = static_cast<float>(-2 * move(rng) / scale);
    t[i][1][2] = static_cast<float>(-2 * move(rng) / scale);
  }
  const auto grid = F::affine_grid(
      theta.to(images.device()), images.sizes(), /*align_corners=*/false);
  return F::grid_sample(
      images,
      grid,
      F::GridSampleFuncOptions()
          .mode(torch::kBilinear)
          .padding_mode(torch::kZeros)
          .align_corners(false));
}

/// Trains a glyph classifier on renders of every font of the renderer, half
/// of each batch displaced (sizes down to 70 %, shifts up to 1/8), so that
/// it reads glyphs wherever and however large a model draws them.
inline void train_classifier(
    GlyphClassifier& classifier,
    GlyphRenderer& renderer,
    int64_t steps,
    uint64_t seed,
    const Runtime& runtime) {
  const Tokenizer tokenizer;
  torch::manual_seed(seed);
  classifier->to(runtime.device);
  torch::optim::AdamW optimizer(
      classifier->parameters(), torch::optim::AdamWOptions(2e-3));
  std::mt19937_64 rng(seed + 99);
  Progress progress("classifier", steps);
  classifier->train();
  for (int64_t step = 0; step < steps; ++step) {
    set_learning_rate(optimizer, scheduled_learning_rate(2e-3, step, steps));
    auto batch = draw_batch(
        renderer, tokenizer, renderer.fonts(), characters(), 128, rng);
    batch.images.slice(0, 0, 64).copy_(
        displace(batch.images.slice(0, 0, 64), 0.7, 0.125, rng));
    const auto [char_logits, font_logits] =
        classifier->forward(batch.images.to(runtime.device));
    const auto loss = torch::cross_entropy_loss(
                          char_logits, batch.characters.to(runtime.device)) +
        torch::cross_entropy_loss(font_logits, batch.fonts.to(runtime.device));
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    progress.step(step % 10 == 0 ? loss.item<double>() : -1.0);
  }
  classifier->eval();
}

// ------------------------------------------------------------- evaluation

/// Prompts of an evaluation: (font, character) pairs.
using Prompts = std::vector<std::pair<int64_t, char>>;

inline torch::Tensor encode(
    const Tokenizer& tokenizer,
    const Prompts& prompts) {
  std::vector<std::string> captions;
  for (const auto& [font, c] : prompts) {
    captions.push_back(caption(c, catalogue()[font].name));
  }
  return tokenizer.encode(captions);
}

/// Generates images for prompts in batches of `batch`.
inline torch::Tensor generate(
    TextToImage& model,
    const Prompts& prompts,
    const SamplerOptions& sampler,
    const Runtime& runtime,
    int64_t batch = 64) {
  const Tokenizer tokenizer;
  const auto ids = encode(tokenizer, prompts).to(runtime.device);
  const auto batches = (ids.size(0) + batch - 1) / batch;
  Progress progress(
      "sample " + std::to_string(ids.size(0)) + " prompts",
      batches * sampler.steps);
  std::vector<torch::Tensor> parts;
  for (int64_t start = 0; start < ids.size(0); start += batch) {
    auto options = sampler;
    options.seed = sampler.seed + static_cast<uint64_t>(start);
    AutocastGuard autocast(runtime);
    parts.push_back(sample(
                        model,
                        NoiseSchedule(),
                        ids.slice(0, start, start + batch),
                        options,
                        &progress)
                        .cpu());
  }
  return torch::cat(parts);
}

} // namespace typeface
