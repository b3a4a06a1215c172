#pragma once
// Evaluation and the demo: StyleInject against LoRA of the same and of a
// larger parameter count, several seeds, written to results/.

#include "training.h"

#include <styleinject/styleinject.h>

#include <cmath>
#include <iomanip>
#include <numeric>
#include <sstream>

namespace typeface {

inline std::vector<int64_t> all_fonts() {
  std::vector<int64_t> fonts(catalogue().size());
  std::iota(fonts.begin(), fonts.end(), 0);
  return fonts;
}

/// The evaluation's classifier from the cache, trained (and cached) first
/// where it is missing. Its held-out accuracy is in classifier.json.
inline GlyphClassifier cached_classifier(
    const fs::path& cache,
    const std::string& model_size,
    int64_t steps,
    GlyphRenderer& renderer,
    const Runtime& runtime) {
  const auto dir = cache / ("classifier-" + model_size);
  GlyphClassifier classifier(
      renderer.size(),
      static_cast<int64_t>(characters().size()),
      static_cast<int64_t>(catalogue().size()));
  if (fs::exists(dir / "classifier.json")) {
    torch::load(classifier, (dir / "classifier.pt").string());
    classifier->to(runtime.device);
    return classifier;
  }
  const auto report = train_classifier(classifier, renderer, steps, 0, runtime);
  save_atomically(classifier, dir / "classifier.pt");
  write_text(
      dir / "classifier.json",
      ordered_json{
          {"steps", steps},
          {"held_out_renders", report.held_out},
          {"character_accuracy", report.character_accuracy},
          {"font_accuracy", report.font_accuracy}}
          .dump(2));
  return classifier;
}

/// Where the held-out characters go: the first `validation` of them choose
/// the learning rate, the rest are the test prompts.
struct Split {
  std::string shots, validation, test;
};

inline Split split_characters(int64_t shots, int64_t validation = 8) {
  Split split;
  split.shots = shot_characters(shots);
  const auto rest = held_out_characters(split.shots);
  if (static_cast<int64_t>(rest.size()) <= validation) {
    throw std::invalid_argument(
        "--shots " + std::to_string(shots) +
        " leaves too few characters to "
        "hold out");
  }
  split.validation = rest.substr(0, validation);
  split.test = rest.substr(validation);
  return split;
}

struct EvalOptions {
  int64_t base_prompts = 24; // base-font prompts for retention
  SamplerOptions sampler;
};

/// The three measures of a model on a new style, and the images behind them.
struct Evaluation {
  ordered_json json;
  torch::Tensor test_images; // (T, 1, S, S): the style's test characters
  torch::Tensor base_images; // (B, 1, S, S): the base-font prompts
  Prompts test_prompts, base_prompts;
};

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

/// alignment: the classifier recognises the prompt's character in images
/// of held-out (test) characters of the new style; style fit: its mean
/// probability of the new style's font on them; retention: alignment on
/// base-font prompts with the adapter active.
inline Evaluation evaluate(
    TextToImage& model,
    GlyphClassifier& classifier,
    int64_t style,
    const std::string& test_characters,
    const EvalOptions& options,
    const Runtime& runtime) {
  Evaluation result;
  for (const char c : test_characters) {
    result.test_prompts.emplace_back(style, c);
  }
  result.base_prompts = base_font_prompts(options.base_prompts);
  result.test_images =
      generate(model, result.test_prompts, options.sampler, runtime);
  result.base_images =
      generate(model, result.base_prompts, options.sampler, runtime);
  const auto test = judge(classifier, result.test_images, result.test_prompts);
  const auto base = judge(classifier, result.base_images, result.base_prompts);
  result.json = {
      {"alignment", test.character_accuracy},
      {"style_fit", test.font_probability},
      {"retention", base.character_accuracy},
      {"test_characters", test_characters},
      {"base_prompts", options.base_prompts},
      {"ddim_steps", options.sampler.steps},
      {"guidance", options.sampler.guidance}};
  return result;
}

/// The denoising loss on renders of the validation characters at fixed
/// noise and timesteps: what the learning-rate search minimises.
inline double validation_loss(
    TextToImage& model,
    GlyphRenderer& renderer,
    int64_t style,
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
        draw_batch(renderer, tokenizer, {style}, validation, 64, rng);
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

/// The number of adapter parameters that `options` puts on the model.
inline int64_t adapter_parameter_count(
    const ModelConfig& config,
    const styleinject::StyleInjectOptions& options) {
  TextToImage model(config);
  styleinject::inject(*model, styleinject::Targets::all(), options);
  int64_t count = 0;
  for (const auto& p : styleinject::adapter_parameters(*model)) {
    count += p.numel();
  }
  return count;
}

struct DemoOptions {
  ModelConfig config = ModelConfig::small();
  std::string model_size = "small";
  std::string cache;
  std::string style = "lobster";
  int64_t shots = 16;
  int64_t seeds = 3;
  int64_t steps = 150; // fits the demo in 15 minutes on 2 CPU cores
  int64_t pretrain_steps = PretrainOptions{}.steps;
  int64_t classifier_steps = 1500;
  std::vector<double> lrs; // empty: each method's default
  std::string results = "results";
  uint64_t seed = 0;
};

struct Method {
  std::string label;
  FinetuneOptions options;
  int64_t parameters = 0;
};

inline std::string mean_std(const std::vector<double>& values) {
  const double mean =
      std::accumulate(values.begin(), values.end(), 0.0) / values.size();
  double var = 0;
  for (const double v : values) {
    var += (v - mean) * (v - mean);
  }
  const double std =
      values.size() > 1 ? std::sqrt(var / (values.size() - 1)) : 0;
  std::ostringstream text;
  text << std::fixed << std::setprecision(3) << mean << " ± "
       << std::setprecision(3) << std;
  return text.str();
}

/// The whole demo: base model (cached), classifier (cached), fine-tunes of
/// StyleInject and two LoRAs over seeds, evaluation, results/.
inline void run_demo(
    const DemoOptions& demo,
    const std::map<std::string, std::string>& font_paths,
    const Runtime& runtime) {
  const auto begin = std::chrono::steady_clock::now();
  const auto elapsed = [&] {
    return std::chrono::duration<double>(
               std::chrono::steady_clock::now() - begin)
        .count();
  };
  const fs::path cache = demo.cache, results = demo.results;
  const auto style = font_index(demo.style);
  if (catalogue()[style].base) {
    throw std::invalid_argument(
        "--style '" + demo.style + "' is a base font; pick a new style");
  }
  const auto split = split_characters(demo.shots);
  GlyphRenderer renderer(all_fonts(), demo.config.image_size, font_paths);
  ordered_json report;

  // 1. The base model, from the cache or pretrained now.
  const auto base_dir = cache / ("base-" + demo.model_size);
  if (!base_complete(base_dir)) {
    PretrainOptions pre;
    pre.config = demo.config;
    pre.steps = demo.pretrain_steps;
    pre.seed = demo.seed;
    pre.resume = fs::exists(config_file(base_dir));
    std::cerr << (pre.resume ? "resuming" : "no cached base model: pretraining")
              << " into " << base_dir << "\n";
    const auto start = elapsed();
    pretrain(pre, base_dir, renderer, runtime);
    report["pretrain_seconds"] = elapsed() - start;
  }
  report["base"] = read_json(config_file(base_dir));

  // 2. The classifier that judges the images.
  auto classifier = cached_classifier(
      cache, demo.model_size, demo.classifier_steps, renderer, runtime);
  report["classifier"] =
      read_json(cache / ("classifier-" + demo.model_size) / "classifier.json");

  // 3. The methods: StyleInject with the SPEC's defaults (rank 4, 4
  // branches, router, gate), LoRA with the nearest parameter count, and
  // LoRA with twice that rank.
  FinetuneOptions defaults;
  defaults.style = demo.style;
  defaults.shots = demo.shots;
  defaults.steps = demo.steps;
  std::vector<Method> methods;
  {
    Method si{"StyleInject r=4 n=4", defaults};
    si.parameters =
        adapter_parameter_count(demo.config, adapter_options(si.options));
    // LoRA's count is linear in its rank: r * (d_in * k * k + d_out).
    const auto per_rank = adapter_parameter_count(
        demo.config, styleinject::StyleInjectOptions::lora(1));
    const auto best_rank = std::max<int64_t>(
        1, std::llround(static_cast<double>(si.parameters) / per_rank));
    const auto best_count = best_rank * per_rank;
    Method lora{"LoRA r=" + std::to_string(best_rank), defaults};
    lora.options.method = "lora";
    lora.options.rank = best_rank;
    lora.parameters = best_count;
    Method large{"LoRA r=" + std::to_string(2 * best_rank), lora.options};
    large.options.rank = 2 * best_rank;
    large.parameters = large.options.rank * per_rank;
    // Without --lrs, each method's winner of the search in README.md
    // (`typeface demo --lrs 1e-3,3e-3,1e-2`): 3e-3, 3e-3 and 1e-3.
    si.options.lr = 3e-3;
    lora.options.lr = 3e-3;
    large.options.lr = 1e-3;
    methods = {si, lora, large};
  }

  // 4. Learning rates: the same search (same candidates, seed 0) for every
  // method, by the denoising loss on the validation characters.
  std::vector<std::string> run_dirs;
  for (auto& method : methods) {
    if (demo.lrs.size() > 1) {
      double best_lr = demo.lrs[0], best_loss = -1;
      for (const double lr : demo.lrs) {
        auto options = method.options;
        options.lr = lr;
        options.seed = 1000; // not one of the reported seeds
        const auto dir = results / "runs" / "lr-search" /
            (options.method + "-r" + std::to_string(options.rank) + "-lr" +
             std::to_string(lr));
        auto model = finetune(options, base_dir, dir, renderer, runtime);
        const auto loss =
            validation_loss(model, renderer, style, split.validation, runtime);
        std::cerr << method.label << " lr " << lr << ": validation loss "
                  << loss << "\n";
        report["lr_search"][method.label][std::to_string(lr)] = loss;
        if (best_loss < 0 || loss < best_loss) {
          best_loss = loss;
          best_lr = lr;
        }
      }
      method.options.lr = best_lr;
    } else if (demo.lrs.size() == 1) {
      method.options.lr = demo.lrs[0];
    }
  }

  // 5. The base model's own scores, and the real renders, for reference.
  EvalOptions eval_options;
  std::vector<torch::Tensor> test_rows, base_rows;
  std::vector<std::string> row_labels;
  {
    auto model = load_base(base_dir, runtime.device);
    auto evaluation =
        evaluate(model, classifier, style, split.test, eval_options, runtime);
    report["base_model"] = evaluation.json;
    std::vector<torch::Tensor> real_test, real_base;
    for (const auto& [font, c] : evaluation.test_prompts) {
      real_test.push_back(renderer.render(font, c, nullptr).unsqueeze(0));
    }
    for (const auto& [font, c] : evaluation.base_prompts) {
      real_base.push_back(renderer.render(font, c, nullptr).unsqueeze(0));
    }
    test_rows = {torch::stack(real_test), evaluation.test_images};
    base_rows = {torch::stack(real_base), evaluation.base_images};
    row_labels = {"real font", "base model"};
  }

  // 6. Every method over the seeds.
  std::vector<std::string> table;
  for (const auto& method : methods) {
    std::vector<double> alignment, style_fit, retention, seconds;
    for (int64_t s = 0; s < demo.seeds; ++s) {
      auto options = method.options;
      options.seed = demo.seed + s;
      const auto dir = results / "runs" /
          (options.method + "-r" + std::to_string(options.rank) + "-seed" +
           std::to_string(options.seed));
      const auto start = elapsed();
      auto model = finetune(options, base_dir, dir, renderer, runtime);
      seconds.push_back(elapsed() - start);
      auto evaluation =
          evaluate(model, classifier, style, split.test, eval_options, runtime);
      evaluation.json["finetune_seconds"] = seconds.back();
      evaluation.json["lr"] = options.lr;
      evaluation.json["seed"] = options.seed;
      write_text(dir / "metrics.json", evaluation.json.dump(2));
      report["runs"][method.label].push_back(evaluation.json);
      alignment.push_back(evaluation.json["alignment"]);
      style_fit.push_back(evaluation.json["style_fit"]);
      retention.push_back(evaluation.json["retention"]);
      if (s == 0) {
        test_rows.push_back(evaluation.test_images);
        base_rows.push_back(evaluation.base_images);
        row_labels.push_back(method.label);
      }
      std::cerr << method.label << " seed " << options.seed << ": alignment "
                << alignment.back() << ", style fit " << style_fit.back()
                << ", retention " << retention.back() << "\n";
    }
    std::ostringstream row;
    row << "| " << method.label << " | " << method.parameters << " | "
        << method.options.lr << " | " << mean_std(alignment) << " | "
        << mean_std(style_fit) << " | " << mean_std(retention) << " | "
        << std::fixed << std::setprecision(0)
        << std::accumulate(seconds.begin(), seconds.end(), 0.0) / seconds.size()
        << " s |";
    table.push_back(row.str());
    report["summary"][method.label] = {
        {"parameters", method.parameters},
        {"lr", method.options.lr},
        {"alignment", alignment},
        {"style_fit", style_fit},
        {"retention", retention}};
  }

  // 7. results/: grids, metrics.json, summary.md.
  write_png(results / "test_prompts.png", grid(test_rows, 3));
  write_png(results / "base_prompts.png", grid(base_rows, 3));
  report["seconds"] = elapsed();
  report["grid_rows"] = row_labels;
  write_text(results / "metrics.json", report.dump(2));
  std::ostringstream md;
  md << "# Typeface demo: " << demo.style << ", " << demo.shots << " shots ("
     << split.shots << ")\n\n"
     << "Held-out test characters: `" << split.test << "`; " << demo.seeds
     << " seeds, " << demo.steps << " fine-tune steps each; mean ± std.\n\n"
     << "| method | adapter parameters | lr | alignment | style fit | retention | fine-tune time |\n"
     << "| --- | --- | --- | --- | --- | --- | --- |\n"
     << "| base model (no adapter) | 0 | - | " << std::fixed
     << std::setprecision(3) << report["base_model"]["alignment"].get<double>()
     << " | " << report["base_model"]["style_fit"].get<double>() << " | "
     << report["base_model"]["retention"].get<double>() << " | - |\n";
  for (const auto& row : table) {
    md << row << "\n";
  }
  md << "\nalignment: the classifier reads the prompt's character in images of "
        "held-out characters of the style; style fit: its mean probability of "
        "the style's font on them; retention: alignment on "
     << eval_options.base_prompts
     << " base-font prompts with the adapter on. Classifier held-out accuracy: "
        "character "
     << report["classifier"]["character_accuracy"].get<double>() << ", font "
     << report["classifier"]["font_accuracy"].get<double>() << ".\n\n"
     << "Grids (rows: ";
  for (size_t i = 0; i < row_labels.size(); ++i) {
    md << (i ? ", " : "") << row_labels[i];
  }
  md << "): test_prompts.png (the style's test characters), base_prompts.png "
        "(base-font prompts).\n\nDemo time: "
     << std::setprecision(0) << elapsed() << " s.\n";
  write_text(results / "summary.md", md.str());
  std::cout << md.str();
}

} // namespace typeface
