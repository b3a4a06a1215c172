#pragma once
// `typeface experiment`: StyleInject against LoRA (few-shot), against its
// own variants (ablation) and on fewer layers (targets), with power. Every arm
// trains on the same data stream for a seed and is judged on the same prompts
// and the same initial noise, several images per prompt; differences are paired
// and get 95 % bootstrap intervals over seeds and prompts. Results in
// results/<setting>/: summary.md, metrics.json, grids (and plots, where
// python3 has matplotlib). Runs already on disk are reused, so an
// interrupted experiment goes on where it stopped.

#include "evaluation.h"
#include "statistics.h"

#include <styleinject/styleinject.h>

#include <algorithm>
#include <cstdlib>
#include <iomanip>
#include <map>
#include <memory>
#include <set>
#include <sstream>

namespace typeface {

/// The folder of the shipped base models and judges.
inline fs::path shipped_assets() {
  return fs::path(TYPEFACE_SOURCE_DIR) / "assets";
}

// ------------------------------------------------------------------ judge

/// The judge: glyph classifiers trained with different seeds, whose
/// averaged probabilities score images. One classifier's verdicts on
/// generated glyphs moved from one training to the next by more than the
/// methods differed; this one is trained once and shipped, so every run is
/// judged by the same classifiers, and each member's verdict is kept too.
struct Judge {
  std::vector<GlyphClassifier> members;
  ordered_json report; // held-out accuracies, per member and ensemble
};

/// What the judge says of a batch of images.
struct Scores {
  torch::Tensor characters; // (N, characters) mean probabilities
  torch::Tensor fonts; // (N, fonts)
  torch::Tensor features; // (N, 256) the first member's penultimate layer
  torch::Tensor votes; // (members, N) each member's character
};

inline Scores score(Judge& judge, const torch::Tensor& images) {
  torch::NoGradGuard no_grad;
  Scores scores;
  std::vector<torch::Tensor> votes;
  for (auto& member : judge.members) {
    member->eval();
    const auto device = member->character->weight.device();
    const auto h = member->features->forward(images.to(device, torch::kFloat));
    const auto characters = torch::softmax(member->character(h), 1).cpu();
    const auto fonts = torch::softmax(member->font(h), 1).cpu();
    if (!scores.features.defined()) {
      scores.features = h.cpu();
      scores.characters = torch::zeros_like(characters);
      scores.fonts = torch::zeros_like(fonts);
    }
    const auto share = 1.0 / static_cast<double>(judge.members.size());
    scores.characters += characters * share;
    scores.fonts += fonts * share;
    votes.push_back(characters.argmax(1));
  }
  scores.votes = torch::stack(votes);
  return scores;
}

/// The held-out accuracy of a judge on fresh renders of every font: with
/// the renderer's jitter, and (`moved`) displaced as half of each training
/// batch is (sizes down to 70 %, shifts up to 1/8), fresh draws of both.
inline ordered_json judge_accuracy(
    Judge& judge,
    GlyphRenderer& renderer,
    bool moved,
    uint64_t seed) {
  const Tokenizer tokenizer;
  std::mt19937_64 rng(seed);
  double characters = 0, fonts = 0;
  std::vector<double> members(judge.members.size(), 0.0);
  int64_t count = 0;
  for (int round = 0; round < 8; ++round) {
    auto batch = draw_batch(
        renderer,
        tokenizer,
        renderer.fonts(),
        typeface::characters(),
        256,
        rng);
    if (moved) {
      batch.images = displace(batch.images, 0.7, 0.125, rng);
    }
    const auto scores = score(judge, batch.images);
    characters +=
        scores.characters.argmax(1).eq(batch.characters).sum().item<double>();
    fonts += scores.fonts.argmax(1).eq(batch.fonts).sum().item<double>();
    for (size_t m = 0; m < members.size(); ++m) {
      members[m] += scores.votes[m].eq(batch.characters).sum().item<double>();
    }
    count += batch.images.size(0);
  }
  ordered_json report{
      {"renders", count},
      {"character_accuracy", characters / count},
      {"font_accuracy", fonts / count}};
  for (auto& m : members) {
    report["member_character_accuracy"].push_back(m / count);
  }
  return report;
}

/// The judge of `dir` (classifier-<i>.safetensors and judge.json), trained
/// there first where it is missing: `members` classifiers, seeds 0, 1, ...
/// (a trained judge keeps its own number of members).
inline Judge load_or_train_judge(
    const fs::path& dir,
    int64_t members,
    int64_t steps,
    GlyphRenderer& renderer,
    const Runtime& runtime) {
  Judge judge;
  const bool trained = exists_on_main(runtime, dir / "judge.json");
  if (trained) {
    members = read_json(dir / "judge.json").at("members");
  } else if (runtime.is_main()) {
    fs::create_directories(dir);
  }
  for (int64_t i = 0; i < members; ++i) {
    GlyphClassifier classifier(
        renderer.size(),
        static_cast<int64_t>(characters().size()),
        static_cast<int64_t>(catalogue().size()));
    const auto file =
        dir / ("classifier-" + std::to_string(i) + ".safetensors");
    if (trained) {
      styleinject::load_weights(*classifier, file.string());
      classifier->to(runtime.device);
    } else {
      // Every process trains it (the same seed, the same classifier), so
      // that none waits on rank 0 for longer than the timeout.
      train_classifier(classifier, renderer, steps, i, runtime);
    }
    if (!trained && runtime.is_main()) {
      styleinject::save_weights(
          *classifier,
          file.string(),
          {{"command",
            "typeface experiment (judge member " + std::to_string(i) + ")"},
           {"steps", std::to_string(steps)},
           {"seed", std::to_string(i)}});
    }
    judge.members.push_back(classifier);
  }
  if (trained) {
    judge.report = read_json(dir / "judge.json");
    return judge;
  }
  judge.report = {
      {"members", members},
      {"steps", steps},
      {"held_out", judge_accuracy(judge, renderer, false, 7777)},
      {"held_out_moved", judge_accuracy(judge, renderer, true, 8888)}};
  if (runtime.is_main()) {
    write_text(dir / "judge.json", judge.report.dump(2));
  }
  return judge;
}

// ------------------------------------------------------------------- arms

/// One configuration that the experiment fine-tunes and judges.
struct Arm {
  std::string label;
  styleinject::StyleInjectOptions adapter;
  std::string targets; // the adapted layers' names (empty: every layer)
  int64_t parameters = 0;
  double lr = 3e-3;
  double steps_factor = 1; // > 1: LoRA given StyleInject's wall-clock time

  /// A fine-tune's options with this arm's adapter on its layers.
  FinetuneOptions applied_to(FinetuneOptions options) const {
    options.adapter = adapter;
    options.label = label;
    options.targets = targets;
    return options;
  }
};

/// The rank whose adapter count on `config` comes nearest to `target`. The
/// count is linear in the rank, so two counts give it.
inline int64_t rank_for(
    const ModelConfig& config,
    styleinject::StyleInjectOptions options,
    int64_t target) {
  const auto one = adapter_parameter_count(config, options.rank(1));
  const auto per_rank = adapter_parameter_count(config, options.rank(2)) - one;
  return std::max<int64_t>(
      1, 1 + std::llround(static_cast<double>(target - one) / per_rank));
}

inline Arm make_arm(
    const ModelConfig& config,
    std::string label,
    styleinject::StyleInjectOptions adapter,
    std::string targets = "") {
  Arm arm{std::move(label), adapter, std::move(targets)};
  arm.parameters = adapter_parameter_count(config, adapter, arm.targets);
  return arm;
}

/// The targets setting's arms: StyleInject's defaults on every layer, then
/// on the denoiser's attention projections only (the usual LoRA targets of
/// diffusers and PEFT), on the denoiser only (no text encoder, no
/// condition), and on every layer but those that turn the condition into
/// the blocks' shifts and scales (a DiT's adaLN modulation; a UNet's time
/// projection in each ResBlock).
inline std::vector<Arm> target_arms(const ModelConfig& config) {
  const styleinject::StyleInjectOptions defaults(4);
  return {
      make_arm(config, "every layer", defaults),
      make_arm(
          config, "attention only", defaults, R"(.*attn[12]\.to_(q|k|v|out))"),
      make_arm(
          config,
          "denoiser only",
          defaults,
          R"((?!text\.|time[12]$|text_pool$).*)"),
      config.is_dit()
          ? make_arm(config, "no modulation", defaults, "(?!.*modulation).*")
          : make_arm(
                config, "no time projection", defaults, R"((?!.*\.time$).*)")};
}

/// The arms of a setting; the first is the reference of every comparison.
/// few-shot: StyleInject with the library's defaults, LoRA of about its
/// parameter count, LoRA of twice that, and the first LoRA given
/// StyleInject's wall-clock time; multi-style and distill: the same but the
/// last; frontier: the same but StyleInject with gate adain last. ablation: the
/// defaults, then one change each (n at equal parameters). targets: see
/// target_arms.
inline std::vector<Arm> setting_arms(
    const std::string& setting,
    const ModelConfig& config) {
  using styleinject::GateMode;
  using styleinject::StyleInjectOptions;
  if (setting == "targets") {
    return target_arms(config);
  }
  const StyleInjectOptions defaults(4);
  std::vector<Arm> arms{make_arm(config, "StyleInject", defaults)};
  const auto target = arms[0].parameters;
  if (setting != "ablation") {
    const auto rank = rank_for(config, StyleInjectOptions::lora(1), target);
    arms.push_back(make_arm(
        config,
        "LoRA r=" + std::to_string(rank),
        StyleInjectOptions::lora(rank)));
    arms.push_back(make_arm(
        config,
        "LoRA r=" + std::to_string(2 * rank),
        StyleInjectOptions::lora(2 * rank)));
    if (setting == "few-shot") {
      auto timed = arms[1];
      timed.label += " (equal time)";
      arms.push_back(timed);
    }
    if (setting == "frontier") {
      arms.push_back(make_arm(
          config,
          "StyleInject gate adain",
          StyleInjectOptions(defaults).gate(GateMode::kAdain)));
    }
    return arms;
  }
  arms.push_back(make_arm(
      config, "router off", StyleInjectOptions(defaults).router(false)));
  arms.push_back(make_arm(
      config, "gate off", StyleInjectOptions(defaults).gate(GateMode::kOff)));
  arms.push_back(make_arm(
      config,
      "gate adain",
      StyleInjectOptions(defaults).gate(GateMode::kAdain)));
  arms.push_back(make_arm(
      config,
      "gate residual",
      StyleInjectOptions(defaults).gate(GateMode::kResidual)));
  for (const int64_t n : {1, 2, 8}) {
    auto options = StyleInjectOptions(defaults).branches(n);
    options.rank(rank_for(config, options, target));
    arms.push_back(make_arm(
        config,
        "n=" + std::to_string(n) + " r=" + std::to_string(options.rank()),
        options));
  }
  for (const double tau : {0.5, 2.0}) {
    std::ostringstream label;
    label << "temperature " << tau;
    arms.push_back(make_arm(
        config, label.str(), StyleInjectOptions(defaults).temperature(tau)));
  }
  return arms;
}

// --------------------------------------------------------------- settings

struct ExperimentOptions {
  std::string setting = "few-shot"; // ablation, targets, multi-style,
                                    // distill, frontier
  std::string name; // of the results' subfolder; empty: the setting's
  bool quick = false;
  fs::path base_dir; // the pretrained base model (its config.json: which)
  fs::path judge_dir; // the judge (trained there if missing)
  int64_t judge_members = 3;
  int64_t judge_steps = 2000;
  std::vector<std::string> styles; // empty: every new style
  std::vector<int64_t> shots = {16, 4};
  int64_t seeds = 5; // the protocol's minimum
  int64_t images = 4; // per prompt, each from its own noise
  int64_t test_prompts = 16; // per style, spread over its held-out characters
  int64_t base_prompts = 16;
  SamplerOptions sampler; // of every judged image
  int64_t steps = 100;
  int64_t teacher_steps = 1500; // distill: the teacher's full fine-tune
  std::vector<double> lrs = {1e-3, 3e-3, 1e-2}; // the search's candidates
  // frontier: every adapter is sampled at each of these strengths
  std::vector<double> strengths = {0.5, 0.75, 1.0, 1.25};
  fs::path results = "results";
  uint64_t seed = 0;

  /// `typeface demo`: the few-shot setting on one style, sized to run in
  /// minutes (see README.md for its time), into results/demo.
  static ExperimentOptions demo() {
    ExperimentOptions options;
    options.setting = "few-shot";
    options.name = "demo";
    options.styles = {"lobster"};
    options.shots = {16};
    options.seeds = 3;
    options.images = 2;
    options.lrs = {3e-3};
    return options;
  }

  /// Which options the command line gave; the rest take the setting's.
  struct Given {
    bool shots = false, steps = false, base_prompts = false, lrs = false,
         images = false, strengths = false;
  };

  /// The setting's defaults where not given. ablation and targets: K = 16
  /// only, on lobster, which keeps the ablation's 50 runs near 35 minutes
  /// on a 2-core CPU (--styles adds more). multi-style and distill: one adapter
  /// on all of each style's training characters (K = 38: all but the 8
  /// validation and 16 test ones), 600 steps, 8 base-font prompts per style,
  /// learning rates 1e-3 and 3e-3. frontier: K = 16, 2 images per prompt,
  /// and every arm at each of the learning rates 3e-4, 1e-3 and 3e-3.
  void setting_defaults(const Given& given) {
    if (setting == "frontier") {
      if (!given.shots) {
        shots = {16};
      }
      if (!given.images) {
        images = 2;
      }
      if (!given.lrs) {
        lrs = {3e-4, 1e-3, 3e-3};
      }
    } else if (setting == "ablation" || setting == "targets") {
      if (!given.shots) {
        shots = {16};
      }
      if (styles.empty()) {
        styles = {"lobster"};
      }
    } else if (setting == "multi-style" || setting == "distill") {
      if (!given.shots) {
        shots = {38};
      }
      if (!given.steps) {
        steps = 600;
      }
      if (!given.base_prompts) {
        base_prompts = 48;
      }
      if (!given.lrs) {
        lrs = {1e-3, 3e-3};
      }
    }
  }

  /// The quick mode's cuts: one style (multi-style, distill: two), one K,
  /// two seeds, two images per prompt, few steps (the teacher's too), no
  /// learning-rate search (frontier: two rates and two strengths); where the
  /// command line gave images, base-font prompts, learning rates or
  /// strengths, those.
  void make_quick(const Given& given) {
    quick = true;
    styles = setting == "multi-style" || setting == "distill"
        ? std::vector<std::string>{"lobster", "comic neue"}
        : std::vector<std::string>{"lobster"};
    teacher_steps = std::min<int64_t>(teacher_steps, 40);
    shots = {shots[0]};
    seeds = 2;
    images = given.images ? images : 2;
    base_prompts = given.base_prompts ? base_prompts : 12;
    steps = std::min<int64_t>(steps, 40);
    if (!given.lrs) {
      lrs = setting == "frontier" ? std::vector<double>{1e-3, 3e-3}
                                  : std::vector<double>{3e-3};
    }
    if (!given.strengths) {
      strengths = {0.5, 1.0};
    }
  }
};

inline Split experiment_split(const ExperimentOptions& options, int64_t shots) {
  return split_characters(shots, 8, options.test_prompts);
}

inline std::vector<std::string> experiment_styles(
    const ExperimentOptions& options) {
  if (!options.styles.empty()) {
    return options.styles;
  }
  std::vector<std::string> styles;
  for (const auto& font : catalogue()) {
    if (!font.base) {
      styles.push_back(font.name);
    }
  }
  return styles;
}

// ------------------------------------------------------------------- runs

/// A file-system name for a label: "LoRA r=15 (equal time)" ->
/// "lora-r-15-equal-time".
inline std::string slug(const std::string& label) {
  std::string out;
  for (const char c : label) {
    if (std::isalnum(static_cast<unsigned char>(c)) || c == '.') {
      out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    } else if (!out.empty() && out.back() != '-') {
      out += '-';
    }
  }
  while (!out.empty() && out.back() == '-') {
    out.pop_back();
  }
  return out;
}

/// Every prompt `images` times, image-major: image k of prompt p is at
/// k · P + p, so that each image gets its own initial noise and every arm
/// the same noise for it.
inline Prompts repeated(const Prompts& prompts, int64_t images) {
  Prompts all;
  for (int64_t k = 0; k < images; ++k) {
    all.insert(all.end(), prompts.begin(), prompts.end());
  }
  return all;
}

/// Per prompt, the mean over its images of a per-image score.
/// values: (images · P) image-major -> P
inline std::vector<double> per_prompt(
    const torch::Tensor& values,
    int64_t prompts) {
  const auto means = values.to(torch::kDouble).view({-1, prompts}).mean(0);
  return {means.data_ptr<double>(), means.data_ptr<double>() + prompts};
}

/// Per prompt, over only the images on which every judge member reads the
/// same character: the sum of a per-image score and the number of such
/// images (a verdict that rests on disputed images is not one).
/// values, agreed: (images · P) image-major
inline ordered_json agreed_per_prompt(
    const torch::Tensor& values,
    const torch::Tensor& agreed,
    int64_t prompts,
    size_t begin,
    size_t end) {
  const auto kept = agreed.to(torch::kDouble).view({-1, prompts});
  const auto sums = (values.to(torch::kDouble).view({-1, prompts}) * kept)
                        .sum(0)
                        .contiguous();
  const auto counts = kept.sum(0).contiguous();
  const auto range = [&](const torch::Tensor& t) {
    return std::vector<double>(
        t.data_ptr<double>() + begin, t.data_ptr<double>() + end);
  };
  return {{"sum", range(sums)}, {"count", range(counts)}};
}

/// The mean of a JSON array of numbers.
inline double mean(const ordered_json& values) {
  const auto v = values.get<std::vector<double>>();
  return std::accumulate(v.begin(), v.end(), 0.0) / v.size();
}

/// What a model gave on one style's test prompts.
struct Judged {
  ordered_json scores; // per-prompt means over the images, and agreement
  torch::Tensor images; // (images · P, 1, S, S), image-major
  torch::Tensor features; // the judge's features of `images`
};

/// The elements [begin, end) of a vector.
inline std::vector<double> slice_of(
    const std::vector<double>& values,
    size_t begin,
    size_t end) {
  return {values.begin() + begin, values.begin() + end};
}

/// What prompts ask for: (character indices, font indices), (N) each.
inline std::pair<torch::Tensor, torch::Tensor> labels_of(
    const Prompts& prompts) {
  std::vector<int64_t> chars, fonts;
  for (const auto& [font, c] : prompts) {
    chars.push_back(static_cast<int64_t>(characters().find(c)));
    fonts.push_back(font);
  }
  return {torch::tensor(chars), torch::tensor(fonts)};
}

/// One fine-tuned model judged on the test characters of each of `styles`:
/// per-prompt scores (means over the images). The base-font prompts are
/// shared out among the styles, each its own, so that the styles' scores
/// stay independent strata of the report's intervals.
inline std::vector<Judged> judge_model(
    TextToImage& model,
    Judge& judge,
    const std::vector<int64_t>& styles,
    const std::string& test_characters,
    const ExperimentOptions& options,
    const Runtime& runtime) {
  const auto base = base_font_prompts(options.base_prompts);
  const auto S = styles.size(), B = base.size();
  if (B < S) {
    throw std::invalid_argument(
        "--base-prompts " + std::to_string(B) + " is fewer than the " +
        std::to_string(S) + " styles that share them");
  }
  std::vector<Judged> judged;
  for (const auto style : styles) {
    Prompts test;
    for (const char c : test_characters) {
      test.emplace_back(style, c);
    }
    auto images = generate(
        model, repeated(test, options.images), options.sampler, runtime);
    const auto on_test = score(judge, images);
    const auto [chars, fonts] = labels_of(repeated(test, options.images));
    const auto P = static_cast<int64_t>(test.size());
    const auto member_alignment =
        on_test.votes.eq(chars).to(torch::kDouble).mean(1).contiguous();
    const auto aligned = on_test.characters.argmax(1).eq(chars);
    const auto fit = on_test.fonts.gather(1, fonts.unsqueeze(1)).squeeze(1);
    const auto agreed = on_test.votes.eq(on_test.votes[0]).all(0);
    const auto whole = static_cast<size_t>(P);
    judged.push_back(
        {{{"alignment", per_prompt(aligned, P)},
          {"style_fit", per_prompt(fit, P)},
          {"judge_agreement", agreed.to(torch::kDouble).mean().item<double>()},
          {"agreed",
           {{"alignment", agreed_per_prompt(aligned, agreed, P, 0, whole)},
            {"style_fit", agreed_per_prompt(fit, agreed, P, 0, whole)}}},
          // What each member alone would have said of the alignment.
          {"member_alignment",
           std::vector<double>(
               member_alignment.data_ptr<double>(),
               member_alignment.data_ptr<double>() +
                   member_alignment.numel())}},
         images,
         on_test.features});
  }
  const auto base_images =
      generate(model, repeated(base, options.images), options.sampler, runtime);
  const auto on_base = score(judge, base_images);
  const auto [chars, fonts] = labels_of(repeated(base, options.images));
  const auto read = on_base.characters.argmax(1).eq(chars);
  const auto kept = on_base.fonts.argmax(1).eq(fonts);
  const auto agreed = on_base.votes.eq(on_base.votes[0]).all(0);
  const auto B64 = static_cast<int64_t>(B);
  const auto retention = per_prompt(read, B64);
  const auto font_kept = per_prompt(kept, B64);
  for (size_t i = 0; i < S; ++i) {
    const auto begin = i * B / S, end = (i + 1) * B / S;
    auto& scores = judged[i].scores;
    scores["retention"] = slice_of(retention, begin, end);
    scores["font_kept"] = slice_of(font_kept, begin, end);
    scores["agreed"]["retention"] =
        agreed_per_prompt(read, agreed, B64, begin, end);
    scores["agreed"]["font_kept"] =
        agreed_per_prompt(kept, agreed, B64, begin, end);
  }
  return judged;
}

/// The measures of a run, how each is named in the report, and whether
/// higher is better.
struct Measure {
  const char* key;
  const char* title;
  bool higher_is_better;
};
inline const std::vector<Measure>& measures() {
  static const std::vector<Measure> list{
      {"alignment", "alignment", true},
      {"style_fit", "style fit", true},
      {"retention", "retention (character)", true},
      {"font_kept", "retention (font)", true},
      {"output_error", "output error (vs teacher)", false}};
  return list;
}

/// The measures that a run's scores hold (output_error: distill only).
inline std::vector<Measure> measures_of(const ordered_json& scores) {
  std::vector<Measure> held;
  for (const auto& m : measures()) {
    if (scores.contains(m.key)) {
      held.push_back(m);
    }
  }
  return held;
}

// ----------------------------------------------------------------- driver

// ----------------------------------------------------------- distill

/// Every (style, character) prompt of `styles` and `chars`.
inline Prompts style_prompts(
    const std::vector<std::string>& styles,
    const std::string& chars) {
  Prompts prompts;
  for (const auto& style : styles) {
    for (const char c : chars) {
      prompts.emplace_back(font_index(style), c);
    }
  }
  return prompts;
}

/// What the teacher generates for `prompts`, each `images` times
/// (image-major, as `repeated`), as a batch: a distillation's inputs. Read
/// from `file` where an earlier run left it, else generated and saved.
inline Batch teacher_pool(
    TextToImage& teacher,
    const Prompts& prompts,
    int64_t images,
    const ExperimentOptions& options,
    const Runtime& runtime,
    const fs::path& file) {
  const auto all = repeated(prompts, images);
  const auto [chars, fonts] = labels_of(all);
  Batch pool{torch::Tensor(), encode(Tokenizer(), all), chars, fonts};
  if (exists_on_main(runtime, file)) {
    pool.images =
        styleinject::load_safetensors(file.string()).tensors.at(0).second;
  } else {
    pool.images = generate(teacher, all, options.sampler, runtime);
    if (runtime.is_main()) {
      fs::create_directories(file.parent_path());
      styleinject::save_safetensors(file.string(), {{"images", pool.images}});
    }
  }
  TORCH_CHECK(
      pool.images.size(0) == static_cast<int64_t>(all.size()),
      file.string(),
      " holds ",
      pool.images.size(0),
      " images, expected ",
      all.size(),
      "; use another --results folder");
  return pool;
}

/// How far `student`'s predictions lie from the teacher's on a pool of
/// `prompts` prompts (image-major), each image noised at t = 100, 300, 500,
/// 700 and 900 with fixed noise: per image, the mean over t of |s − T|² /
/// |T|²; per prompt, the mean over its images. 0: the teacher's output.
inline std::vector<double> output_error(
    TextToImage& student,
    TextToImage& teacher,
    const Batch& pool,
    int64_t prompts,
    const Runtime& runtime) {
  torch::NoGradGuard no_grad;
  student->eval();
  const NoiseSchedule schedule(1000, runtime.device);
  const auto x0 = pool.images.to(runtime.device) * 2 - 1;
  const auto ids = pool.ids.to(runtime.device);
  torch::Tensor total = torch::zeros({x0.size(0)}, torch::kDouble);
  for (const int64_t step : {100, 300, 500, 700, 900}) {
    auto generator = at::detail::createCPUGenerator(step);
    const auto noise = torch::randn(x0.sizes(), generator);
    const auto a = schedule.alpha_bar[step];
    const auto noisy =
        a.sqrt() * x0 + (1 - a).sqrt() * noise.to(runtime.device);
    const auto t =
        torch::full({x0.size(0)}, step, torch::kLong).to(runtime.device);
    AutocastGuard autocast(runtime);
    const auto target = teacher(noisy, t, ids).to(torch::kDouble).flatten(1);
    const auto out = student(noisy, t, ids).to(torch::kDouble).flatten(1);
    total += ((out - target).pow(2).sum(1) / target.pow(2).sum(1)).cpu() / 5;
  }
  student->train();
  return per_prompt(total, prompts);
}

/// The distill setting's teacher, made as the community makes one: every
/// weight of the base fine-tuned on `styles` (all `chars` of each), into
/// `dir`, or read from there.
inline TextToImage make_teacher(
    const ExperimentOptions& options,
    const std::vector<std::string>& styles,
    const std::string& chars,
    GlyphRenderer& renderer,
    const Runtime& runtime) {
  const auto dir = options.results / "teacher";
  // Rank 0's view in one broadcast: 2 done, 1 a checkpoint to go on from.
  const auto found = from_main(
      runtime,
      base_complete(dir)                    ? 2
          : fs::exists(dir / "training.pt") ? 1
                                            : 0);
  if (found < 2) {
    PretrainOptions teach;
    teach.init = options.base_dir;
    teach.fonts = new_style_fonts(styles);
    teach.chars = chars;
    teach.steps = options.teacher_steps;
    teach.lr = 3e-4;
    teach.checkpoint_every = options.teacher_steps;
    teach.seed = options.seed;
    teach.resume = found == 1;
    pretrain(teach, dir, renderer, runtime);
    from_main(runtime, 1); // every rank reads it after rank 0 wrote it
  }
  auto teacher = load_base(dir, runtime.device);
  teacher->eval();
  for (auto& p : teacher->parameters()) {
    p.requires_grad_(false);
  }
  return teacher;
}

/// The distill setting's teacher and pools: the training pool (each
/// training character of every style, 2 images), the validation
/// characters' (the learning-rate search's), and each style's test
/// characters' (`images` each, for the output error).
struct Teaching {
  Distillation training;
  Batch validation;
  std::vector<Batch> test;
};

inline Teaching make_teaching(
    const ExperimentOptions& options,
    const std::vector<std::string>& styles,
    const Split& split,
    GlyphRenderer& renderer,
    const Runtime& runtime) {
  Teaching teaching;
  auto& teacher = teaching.training.teacher;
  teacher = make_teacher(options, styles, split.shots, renderer, runtime);
  const auto dir = options.results / "teacher";
  teaching.training.pool = teacher_pool(
      teacher,
      style_prompts(styles, split.shots),
      2,
      options,
      runtime,
      dir / "pool-train.safetensors");
  teaching.validation = teacher_pool(
      teacher,
      style_prompts(styles, split.validation),
      1,
      options,
      runtime,
      dir / "pool-validation.safetensors");
  for (const auto& style : styles) {
    teaching.test.push_back(teacher_pool(
        teacher,
        style_prompts({style}, split.test),
        options.images,
        options,
        runtime,
        dir / ("pool-test-" + slug(style) + ".safetensors")));
  }
  return teaching;
}

/// The mean output error of `model` over every style's test pool.
inline double mean_output_error(
    TextToImage& model,
    Teaching& teaching,
    int64_t prompts,
    const Runtime& runtime) {
  double total = 0;
  for (const auto& pool : teaching.test) {
    const auto error =
        output_error(model, teaching.training.teacher, pool, prompts, runtime);
    total += std::accumulate(error.begin(), error.end(), 0.0) /
        static_cast<double>(error.size() * teaching.test.size());
  }
  return total;
}

/// What one arm gave on one (shots, style, seed): its scores.json.
struct Run {
  ordered_json scores;
  torch::Tensor features; // the judge's features of its test images
  torch::Tensor grid_row; // image 0 of every test prompt
};

/// Where a run keeps a style's scores and test images: scores.json and
/// test_images.safetensors for a run of one style, prefixed by the style
/// for one of several.
inline std::pair<fs::path, fs::path> run_files(
    const fs::path& dir,
    const std::string& style,
    size_t styles) {
  const auto prefix = styles == 1 ? std::string() : slug(style) + ".";
  return {
      dir / (prefix + "scores.json"),
      dir / (prefix + "test_images.safetensors")};
}

/// Whether `dir` holds the scores and test images of every one of `styles`.
inline bool runs_on_disk(
    const fs::path& dir,
    const std::vector<std::string>& styles) {
  for (const auto& style : styles) {
    const auto [scores_file, images_file] =
        run_files(dir, style, styles.size());
    if (!fs::exists(scores_file) || !fs::exists(images_file)) {
      return false;
    }
  }
  return true;
}

/// The runs of `styles` that `dir` holds, one per style.
inline std::vector<Run> read_runs(
    const fs::path& dir,
    const std::vector<std::string>& styles) {
  std::vector<Run> runs(styles.size());
  for (size_t i = 0; i < styles.size(); ++i) {
    const auto [scores_file, images_file] =
        run_files(dir, styles[i], styles.size());
    runs[i].scores = read_json(scores_file);
    const auto contents = styleinject::load_safetensors(images_file.string());
    runs[i].features = contents.tensors.at(0).second;
    runs[i].grid_row = contents.tensors.at(1).second;
  }
  return runs;
}

/// Keeps `runs` (one per style of `styles`) in `dir`, for read_runs.
inline void write_runs(
    const fs::path& dir,
    const std::vector<std::string>& styles,
    const std::vector<Run>& runs) {
  fs::create_directories(dir);
  for (size_t i = 0; i < styles.size(); ++i) {
    const auto [scores_file, images_file] =
        run_files(dir, styles[i], styles.size());
    styleinject::save_safetensors(
        images_file.string(),
        {{"features", runs[i].features}, {"grid_row", runs[i].grid_row}});
    write_text(scores_file, runs[i].scores.dump());
  }
}

/// A judged model as a Run: its scores, its test images' features and the
/// first image of each of its `prompts` test prompts.
inline Run run_of(Judged judged, int64_t prompts) {
  return {
      std::move(judged.scores),
      judged.features,
      judged.images.slice(0, 0, prompts)};
}

/// The teacher judged as the students are, one Run per style, kept in
/// teacher/ as a run's files are; and into `record` the output error of the
/// base model itself, where a student starts.
inline std::vector<Run> judge_teacher(
    Teaching& teaching,
    Judge& judge,
    const std::vector<std::string>& styles,
    const std::string& test,
    const ExperimentOptions& options,
    const Runtime& runtime,
    ordered_json& record) {
  const auto dir = options.results / "teacher";
  const auto file = dir / "judged.json";
  const bool on_disk = fs::exists(file) && runs_on_disk(dir, styles);
  if (from_main(runtime, on_disk ? 1 : 0) != 0) {
    record = read_json(file);
    return read_runs(dir, styles);
  }
  auto judged = judge_model(
      teaching.training.teacher,
      judge,
      new_style_fonts(styles),
      test,
      options,
      runtime);
  std::vector<Run> runs;
  for (auto& one : judged) {
    runs.push_back(run_of(std::move(one), static_cast<int64_t>(test.size())));
  }
  auto base = load_base(options.base_dir, runtime.device);
  record = {
      {"base_output_error",
       mean_output_error(
           base, teaching, static_cast<int64_t>(test.size()), runtime)}};
  if (runtime.is_main()) {
    write_runs(dir, styles, runs);
    write_text(file, record.dump(2));
  }
  return runs;
}

/// How a model's images were judged: what a judged run on disk must share
/// with this experiment to be reused.
inline ordered_json judging_settings(const ExperimentOptions& options) {
  return {
      {"images", options.images},
      {"test_prompts", options.test_prompts},
      {"base_prompts", options.base_prompts},
      {"guidance", options.sampler.guidance}};
}

/// What a run on disk must have been made with to be reused.
inline ordered_json run_settings(
    const Arm& arm,
    const FinetuneOptions& base_options,
    const ExperimentOptions& options) {
  ordered_json settings{
      {"steps", std::llround(base_options.steps * arm.steps_factor)},
      {"lr", arm.lr}};
  settings.update(judging_settings(options)); // in the order runs keep
  settings["adapter"] = styleinject::detail::options_to_json(arm.adapter);
  if (!arm.targets.empty()) { // absent: every layer, as in older runs
    settings["targets"] = arm.targets;
  }
  return settings;
}

/// Refuses a run on disk in `dir` that was not made with `settings`: reusing
/// it would mix two experiments.
inline void check_made_with(
    const fs::path& dir,
    const Run& run,
    const ordered_json& settings) {
  const auto made_with = run.scores.value("settings", ordered_json());
  if (made_with != settings) {
    throw std::runtime_error(
        dir.string() + " holds a run made with other settings (" +
        made_with.dump() + ", now " + settings.dump() +
        "); use another --results folder");
  }
}

/// Fine-tunes one arm on one (shots, styles, seed) and judges it on each
/// style, or reads what an earlier experiment left in `dir`. One Run per
/// style of `base_options.styles`. With `teaching`, the arm is distilled
/// from its teacher and also scored by its output error.
inline std::vector<Run> run_arm(
    const Arm& arm,
    const FinetuneOptions& base_options,
    const Split& split,
    Judge& judge,
    const ExperimentOptions& options,
    GlyphRenderer& renderer,
    const Runtime& runtime,
    const fs::path& dir,
    Teaching* teaching = nullptr) {
  const auto& styles = base_options.styles;
  const auto settings = run_settings(arm, base_options, options);
  if (from_main(runtime, runs_on_disk(dir, styles) ? 1 : 0) != 0) {
    auto runs = read_runs(dir, styles);
    for (const auto& run : runs) {
      check_made_with(dir, run, settings);
    }
    return runs;
  }
  auto tune = arm.applied_to(base_options);
  tune.lr = arm.lr;
  tune.steps = std::llround(base_options.steps * arm.steps_factor);
  tune.checkpoint_every = tune.steps;
  std::vector<std::pair<int64_t, double>> curve;
  const auto start = std::chrono::steady_clock::now();
  auto model = finetune(
      tune,
      options.base_dir,
      dir,
      renderer,
      runtime,
      &curve,
      teaching ? &teaching->training : nullptr);
  const double seconds = seconds_since(start);
  auto judged = judge_model(
      model, judge, new_style_fonts(styles), split.test, options, runtime);
  const auto prompts = static_cast<int64_t>(split.test.size());
  std::vector<Run> runs;
  for (size_t i = 0; i < styles.size(); ++i) {
    auto run = run_of(std::move(judged[i]), prompts);
    run.scores["seconds"] = seconds;
    run.scores["steps"] = tune.steps;
    run.scores["lr"] = tune.lr;
    run.scores["settings"] = settings;
    run.scores["loss"] = curve;
    if (teaching != nullptr) {
      run.scores["output_error"] = output_error(
          model,
          teaching->training.teacher,
          teaching->test.at(i),
          prompts,
          runtime);
    }
    runs.push_back(std::move(run));
  }
  if (runtime.is_main()) {
    write_runs(dir, styles, runs);
    fs::remove(dir / "checkpoint.pt"); // the run is done: only its results stay
  }
  return runs;
}

/// The learning rate of an arm: the candidate with the lowest validation
/// loss (held-out characters, never test ones; distill: the output error
/// on them) after a fine-tune of the first style group and K at seed 1000,
/// the same budget for every arm.
inline double search_learning_rate(
    const Arm& arm,
    const FinetuneOptions& base_options,
    const Split& split,
    const ExperimentOptions& options,
    GlyphRenderer& renderer,
    const Runtime& runtime,
    ordered_json& record,
    Teaching* teaching = nullptr) {
  if (options.lrs.size() == 1) {
    return options.lrs[0];
  }
  double best = options.lrs[0], best_loss = -1;
  for (const double lr : options.lrs) {
    std::ostringstream name;
    name << slug(arm.label) << "-lr" << lr;
    const auto dir = options.results / "lr-search" / name.str();
    double loss = 0;
    if (exists_on_main(runtime, dir / "validation.json")) {
      loss = read_json(dir / "validation.json").at("loss");
    } else {
      auto tune = arm.applied_to(base_options);
      tune.lr = lr;
      tune.seed = 1000;
      tune.checkpoint_every = tune.steps;
      auto model = finetune(
          tune,
          options.base_dir,
          dir,
          renderer,
          runtime,
          nullptr,
          teaching ? &teaching->training : nullptr);
      if (teaching != nullptr) {
        const auto error = output_error(
            model,
            teaching->training.teacher,
            teaching->validation,
            teaching->validation.images.size(0),
            runtime);
        loss = std::accumulate(error.begin(), error.end(), 0.0) /
            static_cast<double>(error.size());
      } else {
        loss = validation_loss(
            model,
            renderer,
            new_style_fonts(tune.styles),
            split.validation,
            runtime);
      }
      loss = from_main(runtime, loss);
      if (runtime.is_main()) {
        write_text(
            dir / "validation.json", ordered_json{{"loss", loss}}.dump());
      }
    }
    record[std::to_string(lr)] = loss;
    if (best_loss < 0 || loss < best_loss) {
      best_loss = loss;
      best = lr;
    }
  }
  return best;
}

/// Seconds per fine-tune step of an arm, the median of three short runs.
inline double seconds_per_step(
    const Arm& arm,
    const FinetuneOptions& base_options,
    const ExperimentOptions& options,
    GlyphRenderer& renderer,
    const Runtime& runtime) {
  std::vector<double> times;
  for (int round = 0; round < 3; ++round) {
    auto tune = arm.applied_to(base_options);
    tune.steps = 10;
    tune.checkpoint_every = tune.steps;
    const auto start = std::chrono::steady_clock::now();
    finetune(
        tune, options.base_dir, options.results / "timing", renderer, runtime);
    times.push_back(seconds_since(start));
  }
  std::sort(times.begin(), times.end());
  if (runtime.is_main()) {
    fs::remove_all(options.results / "timing");
  }
  return from_main(runtime, times[1] / 10);
}

/// Renders of the test characters of a style with the training's jitter,
/// `per_character` each: the real side of the Fréchet distance.
inline torch::Tensor real_features(
    Judge& judge,
    GlyphRenderer& renderer,
    int64_t style,
    const std::string& test_characters,
    int64_t per_character) {
  std::mt19937_64 rng(4242);
  std::vector<torch::Tensor> renders;
  for (int64_t k = 0; k < per_character; ++k) {
    for (const char c : test_characters) {
      renders.push_back(renderer.render(style, c, &rng));
    }
  }
  return score(judge, torch::stack(renders).unsqueeze(1)).features;
}

inline std::string fixed(double value, int digits = 3) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(digits) << value;
  return text.str();
}

/// A markdown table's separator row of `columns` columns.
inline std::string separator(size_t columns) {
  std::string row = "|";
  for (size_t c = 0; c < columns; ++c) {
    row += " --- |";
  }
  return row;
}

/// A mean and its interval: "0.480 [0.438, 0.523]".
inline std::string mean_text(const Interval& interval) {
  return fixed(interval.mean) + " [" + fixed(interval.low) + ", " +
      fixed(interval.high) + "]";
}

/// A difference and its interval: "+0.044 [+0.023, +0.064]".
inline std::string interval_text(const Interval& interval) {
  return (interval.mean >= 0 ? "+" : "") + fixed(interval.mean) + " [" +
      fixed(interval.low) + ", " + fixed(interval.high) + "]";
}

/// Every run of a setting: [shots][style][arm][seed].
using Runs = std::vector<std::vector<std::vector<std::vector<Run>>>>;

/// The per-prompt scores of `measure` of one arm over the seeds.
inline Grid arm_grid(
    const std::vector<Run>& seeds,
    const std::string& measure) {
  Grid grid;
  for (const auto& run : seeds) {
    grid.push_back(run.scores.at(measure).get<std::vector<double>>());
  }
  return grid;
}

inline Grid difference(const Grid& a, const Grid& b) {
  Grid d = a;
  for (size_t i = 0; i < d.size(); ++i) {
    for (size_t j = 0; j < d[i].size(); ++j) {
      d[i][j] -= b[i][j];
    }
  }
  return d;
}

/// The Fréchet distance of an arm's test images (pooled over the seeds
/// `picks`) to real renders.
inline double pooled_distance(
    const std::vector<Run>& seeds,
    const std::vector<size_t>& picks,
    const torch::Tensor& real) {
  std::vector<torch::Tensor> features;
  for (const auto i : picks) {
    features.push_back(seeds[i].features);
  }
  return frechet_distance(torch::cat(features), real);
}

/// The paired bootstrap interval over seeds of FID(a) − FID(b). A resample
/// is a multiset of seeds: s seeds give C(2s−1, s) of them (3 for two
/// seeds, 126 for five), so each is computed once.
inline Interval distance_difference(
    const std::vector<Run>& a,
    const std::vector<Run>& b,
    const torch::Tensor& real,
    int64_t resamples = 200) {
  std::map<std::vector<size_t>, double> known;
  const auto difference = [&](const std::vector<size_t>& picks) {
    const auto found = known.find(picks);
    if (found != known.end()) {
      return found->second;
    }
    return known[picks] = pooled_distance(a, picks, real) -
        pooled_distance(b, picks, real);
  };
  std::vector<size_t> picks(a.size());
  std::iota(picks.begin(), picks.end(), 0);
  Interval interval;
  interval.mean = difference(picks);
  std::mt19937_64 rng(2);
  std::uniform_int_distribution<size_t> pick(0, a.size() - 1);
  std::vector<double> values;
  for (int64_t r = 0; r < resamples; ++r) {
    for (auto& p : picks) {
      p = pick(rng);
    }
    std::sort(picks.begin(), picks.end());
    values.push_back(difference(picks));
  }
  return percentile_interval(interval.mean, std::move(values));
}

/// What the report's parts read: the finished runs and what made them.
struct Finished {
  const ExperimentOptions& options;
  const std::vector<std::string>& styles;
  const std::vector<Arm>& arms;
  const Runs& runs;
  const std::vector<Run>& teacher; // distill: one per style; else none
  std::vector<Measure> measures() const {
    return measures_of(runs[0][0][0][0].scores);
  }
};

inline ordered_json to_json(const Interval& interval) {
  return {
      {"mean", interval.mean}, {"low", interval.low}, {"high", interval.high}};
}

/// The report's opening: the settings, the judge, the base model, and a
/// table of the arms with their mean fine-tune time.
inline std::string settings_section(
    const Finished& done,
    const Judge& judge,
    const ordered_json& report) {
  const auto& options = done.options;
  std::ostringstream md;
  md << "# Typeface experiment: " << options.setting
     << (options.quick ? " (quick)" : "") << "\n\n"
     << "Styles: " << report["styles"].dump() << "; " << options.seeds
     << " seeds; " << options.images
     << " images per prompt (each with its own initial noise, the same for "
        "every arm); "
     << options.steps << " fine-tune steps; learning rate per arm from "
     << report["lr_candidates"].dump()
     << " by validation loss on held-out characters. Judge: "
     << judge.members.size() << " classifiers, held-out character accuracy "
     << fixed(judge.report["held_out"]["character_accuracy"]) << " (font "
     << fixed(judge.report["held_out"]["font_accuracy"])
     << "), at other sizes and positions "
     << fixed(judge.report["held_out_moved"]["character_accuracy"])
     << ".\n\nThe base model (no adapter) reads "
     << fixed(mean(report["base_model"]["retention"]))
     << " of its own fonts' prompts correctly (font "
     << fixed(mean(report["base_model"]["font_kept"])) << "), and "
     << fixed(mean(report["base_model"]["alignment"])) << " of "
     << done.styles[0] << "'s test prompts.\n\n";
  if (report.contains("teacher")) {
    md << "The teacher (every weight of the base fine-tuned on the styles, "
       << report["teacher_steps"]
       << " steps) is judged as the students are: the means table's last "
          "row, and the grids' second. The base model's output error "
          "against it is "
       << fixed(report["teacher"]["base_output_error"])
       << ": a student's starts there, and 0 is the teacher's own.\n\n";
  }
  md << "| arm | adapter parameters | lr | steps | fine-tune time |\n"
     << separator(5) << "\n";
  for (size_t a = 0; a < done.arms.size(); ++a) {
    double seconds = 0;
    int64_t count = 0;
    for (const auto& shots : done.runs) {
      for (const auto& style : shots) {
        for (const auto& run : style[a]) {
          seconds += run.scores.at("seconds").get<double>();
          ++count;
        }
      }
    }
    md << "| " << done.arms[a].label << " | " << done.arms[a].parameters
       << " | " << done.arms[a].lr << " | " << report["arms"][a]["steps"]
       << " | " << fixed(seconds / count, 0) << " s |\n";
  }
  return md.str();
}

/// A row of the means table: the mean of every measure over styles, seeds
/// and prompts with its interval, of the runs `by_style` (each style's, one
/// per seed); into `md` and `results` under `label`.
inline void means_row(
    const Finished& done,
    const std::string& label,
    const std::vector<std::vector<Run>>& by_style,
    std::ostream& md,
    ordered_json& results) {
  md << "| " << label << " |";
  for (const auto& m : done.measures()) {
    if (!by_style[0][0].scores.contains(m.key)) {
      md << " 0 |"; // the teacher's output error against itself
      continue;
    }
    std::vector<Grid> strata;
    for (size_t si = 0; si < done.styles.size(); ++si) {
      strata.push_back(arm_grid(by_style[si], m.key));
      results["per_style"][done.styles[si]][label][m.key] =
          to_json(paired_bootstrap({strata.back()}, 1000));
    }
    const auto all = paired_bootstrap(strata, 1000);
    md << " " << mean_text(all) << " |";
    results["means"][label][m.key] = to_json(all);
  }
}

/// Each arm's means (means_row) and its FID per style, then the teacher's
/// means where there is one; into `md` and `results`.
inline void means_section(
    const Finished& done,
    size_t k,
    const std::vector<torch::Tensor>& real,
    std::ostream& md,
    ordered_json& results) {
  md << "Mean over styles, seeds and prompts (95 % interval):\n\n| arm |";
  for (const auto& m : done.measures()) {
    md << " " << m.title << " |";
  }
  md << " FID |\n" << separator(done.measures().size() + 2) << "\n";
  std::vector<size_t> every_seed(done.options.seeds);
  std::iota(every_seed.begin(), every_seed.end(), 0);
  for (size_t a = 0; a < done.arms.size(); ++a) {
    const auto& label = done.arms[a].label;
    std::vector<std::vector<Run>> by_style;
    std::vector<double> fid;
    for (size_t si = 0; si < done.styles.size(); ++si) {
      by_style.push_back(done.runs[k][si][a]);
      fid.push_back(pooled_distance(by_style.back(), every_seed, real[si]));
    }
    means_row(done, label, by_style, md, results);
    md << " "
       << fixed(std::accumulate(fid.begin(), fid.end(), 0.0) / fid.size(), 1)
       << " |\n";
    results["fid"][label] = fid;
  }
  if (!done.teacher.empty()) {
    std::vector<std::vector<Run>> by_style;
    for (const auto& run : done.teacher) {
      by_style.push_back({run});
    }
    // No FID: from one model's images, not the students' five seeds', it
    // would not compare (FID grows as the sample shrinks).
    means_row(done, "teacher", by_style, md, results);
    md << " |\n";
  }
}

/// The level at which a difference counts across all of a setting's
/// comparisons (Bonferroni): among (arms − 1) × 4 measures, some 95 %
/// verdicts are wins by chance alone.
inline double family_level(const Finished& done) {
  const auto comparisons = (done.arms.size() - 1) * done.measures().size();
  return 1 - 0.05 / static_cast<double>(comparisons);
}

/// The paired differences of the first arm and arm `a`, every measure, over
/// all styles (also at the family-wise level) and per style, with
/// verdicts; into `md` and `results`.
inline void differences_section(
    const Finished& done,
    size_t k,
    size_t a,
    const std::vector<torch::Tensor>& real,
    std::ostream& md,
    ordered_json& results) {
  const auto& reference = done.arms[0].label;
  const auto& other = done.arms[a].label;
  const auto family = family_level(done);
  md << "\n"
     << reference << " − " << other
     << " (paired over seeds and prompts; 95 % bootstrap interval and, over "
        "all styles, the "
     << fixed(100 * family, 2)
     << " % one that holds across every comparison of the report; verdict "
        "for "
     << reference << "):\n\n| measure | all styles | family-wise |";
  for (const auto& style : done.styles) {
    md << " " << style << " |";
  }
  md << "\n" << separator(done.styles.size() + 3) << "\n";
  const auto judged = [](const Interval& interval, bool higher_is_better) {
    auto json = to_json(interval);
    json["verdict"] = verdict(interval, higher_is_better);
    return json;
  };
  for (const auto& m : done.measures()) {
    auto& record = results["differences"][other][m.key];
    std::vector<Grid> strata;
    std::vector<Interval> per_style;
    for (size_t si = 0; si < done.styles.size(); ++si) {
      strata.push_back(difference(
          arm_grid(done.runs[k][si][0], m.key),
          arm_grid(done.runs[k][si][a], m.key)));
      per_style.push_back(paired_bootstrap({strata.back()}));
      record[done.styles[si]] = judged(per_style.back(), m.higher_is_better);
    }
    const auto all = paired_bootstrap(strata);
    // Far tails need more resamples.
    const auto wide = paired_bootstrap(strata, 20000, 1, family);
    record["all"] = judged(all, m.higher_is_better);
    record["all_family_wise"] = judged(wide, m.higher_is_better);
    record["all_family_wise"]["level"] = family;
    md << "| " << m.title << " | " << interval_text(all) << " "
       << verdict(all, m.higher_is_better) << " | " << interval_text(wide)
       << " " << verdict(wide, m.higher_is_better) << " |";
    for (const auto& interval : per_style) {
      md << " " << interval_text(interval) << " |";
    }
    md << "\n";
  }
  // Resampling 3 seeds gives 10 distinct sets: too few for an interval.
  const bool fid_verdict = done.options.seeds >= 5;
  md << "| FID (lower is better) | | |";
  for (size_t si = 0; si < done.styles.size(); ++si) {
    const auto one =
        distance_difference(done.runs[k][si][0], done.runs[k][si][a], real[si]);
    md << " " << interval_text(one) << " "
       << (fid_verdict ? verdict(one, false) : "(no verdict: < 5 seeds)")
       << " |";
    results["differences"][other]["fid"][done.styles[si]] = judged(one, false);
  }
  md << "\n";
}

/// grids/<style>-k<K>.png: the real font, the teacher where there is one,
/// then every arm's first seed.
inline void write_grids(
    const Finished& done,
    size_t k,
    const Split& split,
    GlyphRenderer& renderer) {
  for (size_t si = 0; si < done.styles.size(); ++si) {
    const auto style = font_index(done.styles[si]);
    std::vector<torch::Tensor> rows, real;
    for (const char c : split.test) {
      real.push_back(renderer.render(style, c, nullptr).unsqueeze(0));
    }
    rows.push_back(torch::stack(real));
    if (!done.teacher.empty()) {
      rows.push_back(done.teacher[si].grid_row);
    }
    for (size_t a = 0; a < done.arms.size(); ++a) {
      rows.push_back(done.runs[k][si][a][0].grid_row);
    }
    write_png(
        done.options.results / "grids" /
            (slug(done.styles[si]) + "-k" +
             std::to_string(done.options.shots[k]) + ".png"),
        grid(rows, 2));
  }
}

/// Every run's scores into report["runs"]; returns the judge members'
/// mean agreement on the generated test images.
inline double collect_runs(const Finished& done, ordered_json& report) {
  double agreement = 0;
  int64_t count = 0;
  for (size_t k = 0; k < done.runs.size(); ++k) {
    for (size_t si = 0; si < done.styles.size(); ++si) {
      for (size_t a = 0; a < done.arms.size(); ++a) {
        const auto& seeds = done.runs[k][si][a];
        for (size_t seed = 0; seed < seeds.size(); ++seed) {
          auto entry = seeds[seed].scores;
          entry["shots"] = done.options.shots[k];
          entry["style"] = done.styles[si];
          entry["arm"] = done.arms[a].label;
          entry["seed"] = done.options.seed + seed;
          agreement += entry["judge_agreement"].get<double>();
          ++count;
          report["runs"].push_back(std::move(entry));
        }
      }
    }
  }
  return agreement / count;
}

// ----------------------------------------------------------- routing

/// Where a layer sits in the model, for the router report: its first name
/// part (UNet levels: down0, mid_attn, ...), or two for the text encoder's
/// and the DiT's blocks (text.attn_0, dit.block3).
inline std::string depth_group(const std::string& layer) {
  const auto first = layer.find('.');
  const auto head = layer.substr(0, first);
  if ((head == "text" || head == "dit") && first != std::string::npos) {
    const auto second = layer.find('.', first + 1);
    return second == std::string::npos ? layer : layer.substr(0, second);
  }
  return head;
}

/// The mean of style weights (N, n) and their mean entropy over log n (1:
/// uniform, 0: one branch).
inline ordered_json usage_of(const torch::Tensor& weights) {
  const auto entropy = -(weights * weights.clamp_min(1e-12).log()).sum(1) /
      std::log(static_cast<double>(weights.size(1)));
  const auto mean = weights.mean(0).contiguous();
  return {
      {"weights",
       std::vector<double>(
           mean.data_ptr<double>(), mean.data_ptr<double>() + mean.numel())},
      {"entropy", entropy.mean().item<double>()}};
}

/// Which branches the routers of the adapter give each style, per layer
/// ("layers") and per depth group ("depth"): over renders of `chars` in the
/// style noised at five timesteps, with the style's captions.
inline ordered_json router_usage(
    TextToImage& model,
    GlyphRenderer& renderer,
    const std::vector<std::string>& styles,
    const std::string& chars,
    const Runtime& runtime) {
  torch::NoGradGuard no_grad;
  model->eval();
  const NoiseSchedule schedule(1000, runtime.device);
  const Tokenizer tokenizer;
  ordered_json usage;
  for (const auto& style : styles) {
    std::vector<torch::Tensor> renders;
    std::vector<std::string> captions;
    for (const char c : chars) {
      renders.push_back(renderer.render(font_index(style), c, nullptr));
      captions.push_back(caption(c, style));
    }
    const auto x0 =
        (torch::stack(renders).unsqueeze(1) * 2 - 1).to(runtime.device);
    const auto ids = tokenizer.encode(captions).to(runtime.device);
    torch::manual_seed(7);
    styleinject::RoutingRecord record(*model);
    for (const int64_t step : {100, 300, 500, 700, 900}) {
      const auto a = schedule.alpha_bar[step];
      const auto t =
          torch::full({x0.size(0)}, step, torch::kLong).to(runtime.device);
      AutocastGuard autocast(runtime);
      model(a.sqrt() * x0 + (1 - a).sqrt() * torch::randn_like(x0), t, ids);
    }
    // Per layer, and per depth group (the mean of its layers' weights).
    std::map<std::string, std::vector<torch::Tensor>> groups;
    std::vector<std::string> order;
    for (const auto& [layer, s] : record.weights()) {
      const auto w = s.to(torch::kDouble).cpu();
      usage[style]["layers"][layer] = usage_of(w);
      const auto group = depth_group(layer);
      if (groups[group].empty()) {
        order.push_back(group);
      }
      groups[group].push_back(w);
    }
    for (const auto& group : order) {
      usage[style]["depth"][group] =
          usage_of(torch::stack(groups[group]).mean(0));
    }
  }
  model->train();
  return usage;
}

/// The router report: per style, the mean weight of each branch over the
/// layers, the mean normalised entropy, and how far the style's mean
/// weights lie from the styles' average (total variation, mean over
/// layers). Per depth group: plots/router-usage.png.
inline std::string router_section(const ordered_json& usage) {
  std::ostringstream md;
  const auto& first = usage.begin().value().at("layers");
  const auto n = first.begin().value().at("weights").size();
  // The styles' average weights per layer.
  std::map<std::string, std::vector<double>> average;
  for (const auto& [style, record] : usage.items()) {
    const auto& layers = record.at("layers");
    for (const auto& [layer, cell] : layers.items()) {
      auto& sum = average[layer];
      sum.resize(n);
      for (size_t j = 0; j < n; ++j) {
        sum[j] += cell.at("weights")[j].get<double>() / usage.size();
      }
    }
  }
  md << "\n## Routing\n\nThe StyleInject adapter of seed 0: each style's "
        "renders of its test characters, noised at t = 100, 300, 500, 700 "
        "and 900, through the routers of all "
     << first.size()
     << " layers. Mean weight of each branch over the layers; entropy over "
        "log n (1: all branches alike, 0: one branch); distance: total "
        "variation between the style's weights and the styles' average, "
        "mean over layers (0: every style routed alike).\n\n| style |";
  for (size_t j = 0; j < n; ++j) {
    md << " branch " << j + 1 << " |";
  }
  md << " entropy | distance |\n" << separator(n + 3) << "\n";
  for (const auto& [style, record] : usage.items()) {
    const auto& layers = record.at("layers");
    std::vector<double> weights(n);
    double entropy = 0, distance = 0;
    for (const auto& [layer, cell] : layers.items()) {
      double tv = 0;
      for (size_t j = 0; j < n; ++j) {
        const auto w = cell.at("weights")[j].get<double>();
        weights[j] += w / layers.size();
        tv += std::abs(w - average[layer][j]) / 2;
      }
      entropy += cell.at("entropy").get<double>() / layers.size();
      distance += tv / layers.size();
    }
    md << "| " << style << " |";
    for (const auto w : weights) {
      md << " " << fixed(w) << " |";
    }
    md << " " << fixed(entropy) << " | " << fixed(distance) << " |\n";
  }
  md << "\nPer depth group: plots/router-usage.png. Style mixing at inference "
        "in grids/style-mixing.png: two test characters in every style "
        "(columns), generated with the routers (first row), then with each "
        "branch alone (`set_style` one-hot), then all branches alike.\n";
  return md.str();
}

/// grids/style-mixing.png: the StyleInject adapter of seed 0 generating two
/// characters in every style, with its routers (first row), then with each
/// branch alone (`set_style` one-hot), then all branches alike.
inline void write_style_mixing(
    TextToImage& model,
    const std::vector<std::string>& styles,
    const std::string& chars,
    int64_t branches,
    const ExperimentOptions& options,
    const Runtime& runtime) {
  Prompts prompts;
  for (const char c : chars.substr(0, 2)) {
    for (const auto& style : styles) {
      prompts.emplace_back(font_index(style), c);
    }
  }
  std::vector<torch::Tensor> rows{
      generate(model, prompts, options.sampler, runtime)};
  auto mixes = torch::eye(branches).unbind(0);
  mixes.push_back(torch::full({branches}, 1.0 / branches));
  for (const auto& style : mixes) {
    styleinject::set_style(*model, style.to(runtime.device));
    rows.push_back(generate(model, prompts, options.sampler, runtime));
  }
  styleinject::clear_style(*model);
  write_png(options.results / "grids" / "style-mixing.png", grid(rows, 2));
}

/// summary.md, metrics.json and grids/ of a finished experiment.
inline void write_experiment_report(
    const Finished& done,
    Judge& judge,
    GlyphRenderer& renderer,
    ordered_json& report) {
  std::ostringstream md;
  md << settings_section(done, judge, report);
  for (size_t k = 0; k < done.runs.size(); ++k) {
    const auto shots = done.options.shots[k];
    const auto split = experiment_split(done.options, shots);
    auto& results = report["results"][std::to_string(shots)];
    std::vector<torch::Tensor> real;
    for (const auto& style : done.styles) {
      real.push_back(real_features(
          judge,
          renderer,
          font_index(style),
          split.test,
          2 * done.options.images));
    }
    md << "\n## K = " << shots << " shots\n\n";
    means_section(done, k, real, md, results);
    for (size_t a = 1; a < done.arms.size(); ++a) {
      differences_section(done, k, a, real, md, results);
    }
    write_grids(done, k, split, renderer);
  }
  const double agreement = collect_runs(done, report);
  report["judge_agreement_on_generated"] = agreement;
  if (report.contains("router_usage")) {
    md << router_section(report["router_usage"]);
  }
  md << "\nThe judge's members agree on the character of "
     << fixed(100 * agreement, 1)
     << " % of the generated test images. Grids (rows: the real font, "
     << (done.teacher.empty() ? "" : "the teacher, ")
     << "then each arm's first seed) in grids/; every run's per-prompt "
        "scores in metrics.json.\n";
  write_text(done.options.results / "metrics.json", report.dump(1));
  write_text(done.options.results / "summary.md", md.str());
  std::cout << md.str();
}

/// Draws results/plots/ with plot.py, through the first python3 that has
/// matplotlib ($TYPEFACE_PYTHON, python3, /usr/bin/python3); says how to
/// get one where none has.
inline void make_plots(const fs::path& results) {
  const auto quoted = [](const std::string& text) {
    std::string out = "'";
    for (const char c : text) {
      out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    }
    return out + "'";
  };
  std::vector<std::string> pythons{"python3", "/usr/bin/python3"};
  if (const char* own = std::getenv("TYPEFACE_PYTHON"); own && *own) {
    pythons.insert(pythons.begin(), own);
  }
  const auto script = fs::path(TYPEFACE_SOURCE_DIR) / "plot.py";
  for (const auto& python : pythons) {
    const auto probe =
        quoted(python) + " -c 'import matplotlib' >/dev/null 2>&1";
    if (std::system(probe.c_str()) == 0) {
      const auto command = quoted(python) + " " + quoted(script.string()) +
          " " + quoted(results.string());
      if (std::system(command.c_str()) != 0) {
        std::cerr << "plot.py failed: " << command << "\n";
      }
      return;
    }
  }
  std::cerr << "no plots: no python3 with matplotlib found (Debian: apt "
               "install python3-matplotlib; or set TYPEFACE_PYTHON)\n";
}

/// The styles that one adapter learns together: each alone, or (multi-style)
/// all of them at once.
inline std::vector<std::vector<std::string>> style_groups(
    const std::string& setting,
    const std::vector<std::string>& styles) {
  if (setting == "multi-style" || setting == "distill") {
    return {styles};
  }
  std::vector<std::vector<std::string>> groups;
  for (const auto& style : styles) {
    groups.push_back({style});
  }
  return groups;
}

/// The folder name of a style group's runs: the style's, or "together".
inline std::string group_name(const std::vector<std::string>& group) {
  return group.size() == 1 ? slug(group[0]) : "together";
}

/// The experiment's styles; a base font is refused.
inline std::vector<std::string> checked_styles(
    const ExperimentOptions& options) {
  const auto styles = experiment_styles(options);
  for (const auto& style : styles) {
    if (catalogue()[font_index(style)].base) {
      throw std::invalid_argument(
          "'" + style + "' is a base font, not a new style");
    }
  }
  return styles;
}

/// The configuration of the experiment's base model, which must load. It
/// decides the architecture and sizes that the arms are counted on, and
/// the results' folder: results/<setting>, a DiT's beside it in
/// results/<setting>-dit (or results/<name>).
inline ModelConfig base_config(
    ExperimentOptions& options,
    const Runtime& runtime) {
  load_base(options.base_dir, runtime.device); // fails early where missing
  const auto config = ModelConfig::from_json(
      read_json(config_file(options.base_dir)).at("model"));
  options.results = options.results /
      (!options.name.empty() ? options.name
           : config.is_dit() ? options.setting + "-dit"
                             : options.setting);
  return config;
}

/// The experiment's judge (trained where missing).
inline Judge experiment_judge(
    const ExperimentOptions& options,
    GlyphRenderer& renderer,
    const Runtime& runtime) {
  return load_or_train_judge(
      options.judge_dir,
      options.judge_members,
      options.judge_steps,
      renderer,
      runtime);
}

/// What a report's metrics.json opens with: the settings, the base model
/// and the judge.
inline ordered_json report_header(
    const ExperimentOptions& options,
    const std::vector<std::string>& styles,
    const Judge& judge) {
  return {
      {"setting", options.setting},
      {"quick", options.quick},
      {"styles", styles},
      {"shots", options.shots},
      {"seeds", options.seeds},
      {"images_per_prompt", options.images},
      {"test_prompts", options.test_prompts},
      {"base_prompts", options.base_prompts},
      {"guidance", options.sampler.guidance},
      {"steps", options.steps},
      {"lr_candidates", options.lrs},
      {"base", read_json(config_file(options.base_dir))},
      {"judge", judge.report}};
}

/// The whole experiment of `options.setting`, into results/<setting>/.
inline void run_experiment(
    ExperimentOptions options,
    const std::map<std::string, std::string>& font_paths,
    const Runtime& runtime) {
  const auto begin = std::chrono::steady_clock::now();
  const auto elapsed = [&] { return seconds_since(begin); };
  const std::set<std::string> settings{
      "few-shot", "ablation", "targets", "multi-style", "distill"};
  if (settings.count(options.setting) == 0) {
    throw std::invalid_argument(
        "--setting must be few-shot, ablation, targets, multi-style or "
        "distill, but got '" +
        options.setting + "'");
  }
  const auto styles = checked_styles(options);
  const auto config = base_config(options, runtime);
  GlyphRenderer renderer(all_fonts(), config.image_size, font_paths);
  auto judge = experiment_judge(options, renderer, runtime);
  auto report = report_header(options, styles, judge);

  // The arms, their learning rates (searched on the first style and K)
  // and the wall-clock factor of the equal-time arm.
  auto arms = setting_arms(options.setting, config);
  const auto groups = style_groups(options.setting, styles);
  FinetuneOptions first;
  first.styles = groups[0];
  first.shots = options.shots[0];
  first.steps = options.steps;
  const auto first_split = experiment_split(options, first.shots);
  std::unique_ptr<Teaching> teaching;
  if (options.setting == "distill") {
    teaching = std::make_unique<Teaching>(
        make_teaching(options, styles, first_split, renderer, runtime));
    report["teacher_steps"] = options.teacher_steps;
  }
  for (auto& arm : arms) {
    if (arm.label.find("(equal time)") != std::string::npos) {
      arm.lr = arms[1].lr;
      // Measured once per results folder, so that a resumed experiment
      // gives this arm the steps it gave it before.
      const auto timing_file = options.results / "timing.json";
      ordered_json timing;
      if (exists_on_main(runtime, timing_file)) {
        timing = read_json(timing_file);
      } else {
        timing = {
            {arms[0].label,
             seconds_per_step(arms[0], first, options, renderer, runtime)},
            {arm.label,
             seconds_per_step(arm, first, options, renderer, runtime)}};
        if (runtime.is_main()) {
          write_text(timing_file, timing.dump(2));
        }
      }
      arm.steps_factor = std::max(
          1.0,
          timing.at(arms[0].label).get<double>() /
              timing.at(arm.label).get<double>());
      report["seconds_per_step"] = timing;
    } else {
      arm.lr = search_learning_rate(
          arm,
          first,
          first_split,
          options,
          renderer,
          runtime,
          report["lr_search"][arm.label],
          teaching.get());
    }
    report["arms"].push_back(
        {{"label", arm.label},
         {"options", styleinject::detail::options_to_json(arm.adapter)},
         {"targets", arm.targets.empty() ? ".*" : arm.targets},
         {"parameters", arm.parameters},
         {"lr", arm.lr},
         {"steps", std::llround(options.steps * arm.steps_factor)}});
  }

  // The base model itself: on its own fonts' prompts (where retention
  // starts from) and on the first style's test characters.
  const auto base_file = options.results / "base-model.json";
  if (exists_on_main(runtime, base_file)) {
    report["base_model"] = read_json(base_file);
  } else {
    auto model = load_base(options.base_dir, runtime.device);
    report["base_model"] = judge_model(
                               model,
                               judge,
                               {font_index(styles[0])},
                               first_split.test,
                               options,
                               runtime)[0]
                               .scores;
    if (runtime.is_main()) {
      write_text(base_file, report["base_model"].dump());
    }
  }
  std::vector<Run> teacher;
  if (teaching) {
    teacher = judge_teacher(
        *teaching,
        judge,
        styles,
        first_split.test,
        options,
        runtime,
        report["teacher"]);
  }

  // Every (shots, style group, seed, arm), into runs[shots][style][arm].
  Runs runs(options.shots.size());
  for (size_t k = 0; k < options.shots.size(); ++k) {
    const auto split = experiment_split(options, options.shots[k]);
    runs[k].assign(styles.size(), std::vector<std::vector<Run>>(arms.size()));
    for (const auto& group : groups) {
      const auto name = group_name(group);
      for (int64_t seed = 0; seed < options.seeds; ++seed) {
        for (size_t a = 0; a < arms.size(); ++a) {
          FinetuneOptions tune;
          tune.styles = group;
          tune.shots = options.shots[k];
          tune.steps = options.steps;
          tune.seed = options.seed + seed;
          const auto dir = options.results / "runs" /
              (name + "-k" + std::to_string(tune.shots)) /
              (slug(arms[a].label) + "-seed" + std::to_string(tune.seed));
          if (runtime.is_main()) {
            std::cerr << "[" << fixed(elapsed(), 0) << " s] " << name
                      << ", K=" << tune.shots << ", seed " << tune.seed << ": "
                      << arms[a].label << "\n";
          }
          const auto judged = run_arm(
              arms[a],
              tune,
              split,
              judge,
              options,
              renderer,
              runtime,
              dir,
              teaching.get());
          for (size_t i = 0; i < group.size(); ++i) {
            const auto at = std::find(styles.begin(), styles.end(), group[i]);
            runs[k][at - styles.begin()][a].push_back(judged[i]);
          }
        }
      }
    }
  }
  report["run_seconds"] = elapsed();
  if (!runtime.is_main()) {
    return; // rank 0 writes the report
  }
  // One adapter for all styles: how its routers tell them apart.
  TextToImage together{nullptr};
  const auto test = experiment_split(options, options.shots[0]).test;
  if (options.setting == "multi-style") {
    together = load_base(options.base_dir, runtime.device);
    styleinject::load_adapters(
        *together,
        (options.results / "runs" /
         (group_name(styles) + "-k" + std::to_string(options.shots[0])) /
         (slug(arms[0].label) + "-seed" + std::to_string(options.seed)) /
         "adapters.safetensors")
            .string());
    report["router_usage"] =
        router_usage(together, renderer, styles, test, runtime);
  }
  write_experiment_report(
      Finished{options, styles, arms, runs, teacher}, judge, renderer, report);
  if (together) {
    write_style_mixing(
        together, styles, test, arms[0].adapter.branches(), options, runtime);
  }
  make_plots(options.results);
  std::cout << "results in " << options.results.string() << " ("
            << fixed(elapsed(), 0) << " s)\n";
}

} // namespace typeface
