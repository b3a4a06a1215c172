#pragma once
// `typeface experiment --setting frontier`: the paper's claim as a
// trade-off. Every arm is fine-tuned at every learning rate, and each
// adapter is sampled at every strength (set_scale), so that no arm is seen
// only at its own optimum. An arm's frontier is the upper envelope of its
// points in (retention, style fit), the base model (strength 0, shared by
// every arm) among them. Verdicts, StyleInject against each other arm:
// style fit at the retention that LoRA of equal parameters reaches at lr
// 1e-3 and strength 1, and at levels across the range; paired bootstrap
// over seeds and prompts, family-wise, on every image and again on the
// images whose character the judge's members agree on.

#include "experiment.h"

namespace typeface {

// ------------------------------------------------------------------ points

/// A point of an arm: the learning rate it was fine-tuned with and the
/// strength its adapter is sampled at.
struct Point {
  size_t arm = 0;
  double lr = 0, strength = 0;
};

/// Every (arm, lr, strength), arm-major.
inline std::vector<Point> frontier_points(
    size_t arms,
    const ExperimentOptions& options) {
  std::vector<Point> points;
  for (size_t a = 0; a < arms; ++a) {
    for (const double lr : options.lrs) {
      for (const double c : options.strengths) {
        points.push_back({a, lr, c});
      }
    }
  }
  return points;
}

/// A number as it reads in a folder name or a report: 0.001, 1.25.
inline std::string number_text(double value) {
  std::ostringstream text;
  text << value;
  return text.str();
}

/// The fine-tune settings of a run's settings: what its adapters depend on.
inline ordered_json training_settings(const ordered_json& settings) {
  ordered_json training;
  for (const char* key : {"steps", "lr", "adapter", "targets"}) {
    if (settings.contains(key)) {
      training[key] = settings[key];
    }
  }
  return training;
}

/// Whether `text` ends with `end`.
inline bool ends_with(const std::string& text, const std::string& end) {
  return text.size() >= end.size() &&
      text.compare(text.size() - end.size(), end.size(), end) == 0;
}

/// Adapters that another setting's run left beside `results` (a few-shot or
/// ablation run, of a DiT where `results` is one's) with the same fine-tune
/// settings, style, K (`run_folder`) and seed: the same run, so it is not
/// trained again. Empty where there is none.
inline fs::path earlier_adapters(
    const fs::path& results,
    const std::string& run_folder,
    uint64_t seed,
    const ordered_json& training) {
  const auto dit = [](const fs::path& dir) {
    return ends_with(dir.filename().string(), "-dit");
  };
  if (!fs::is_directory(results.parent_path())) {
    return {};
  }
  for (const auto& setting : fs::directory_iterator(results.parent_path())) {
    const auto runs = setting.path() / "runs" / run_folder;
    if (setting.path() == results || dit(setting.path()) != dit(results) ||
        !fs::is_directory(runs)) {
      continue;
    }
    for (const auto& run : fs::directory_iterator(runs)) {
      const auto scores = run.path() / "scores.json";
      const auto adapters = run.path() / "adapters.safetensors";
      if (ends_with(
              run.path().filename().string(), "-seed" + std::to_string(seed)) &&
          fs::exists(scores) && fs::exists(adapters) &&
          training_settings(read_json(scores).value(
              "settings", ordered_json())) == training) {
        return adapters;
      }
    }
  }
  return {};
}

/// The arm's adapters on a fresh base model, with what their fine-tune
/// took (training.json in `dir`: seconds, loss curve, or the earlier run
/// they came from). Fine-tuned into `dir` once; taken from `dir` when a
/// fine-tune there finished, or from an earlier setting's same run.
inline std::pair<TextToImage, ordered_json> adapted_model(
    const Arm& arm,
    const FinetuneOptions& base_options,
    const ordered_json& settings,
    const ExperimentOptions& options,
    GlyphRenderer& renderer,
    const Runtime& runtime,
    const fs::path& dir) {
  const auto record_file = dir / "training.json";
  const auto adapters = dir / "adapters.safetensors";
  const auto with_adapters = [&](const fs::path& file) {
    auto model = load_base(options.base_dir, runtime.device);
    styleinject::load_adapters(*model, file.string());
    return model;
  };
  if (exists_on_main(runtime, record_file)) {
    return {with_adapters(adapters), read_json(record_file)};
  }
  const auto earlier = earlier_adapters(
      options.results,
      dir.parent_path().filename().string(),
      base_options.seed,
      training_settings(settings));
  if (from_main(runtime, earlier.empty() ? 0 : 1) != 0) {
    const auto record = ordered_json{
        {"adapters_from", earlier.string()},
        {"seconds",
         read_json(earlier.parent_path() / "scores.json").at("seconds")}};
    if (runtime.is_main()) {
      fs::create_directories(dir);
      fs::copy_file(earlier, adapters, fs::copy_options::overwrite_existing);
      write_text(record_file, record.dump(2));
    }
    return {with_adapters(earlier), record};
  }
  auto tune = arm.applied_to(base_options);
  tune.lr = arm.lr;
  tune.checkpoint_every = tune.steps;
  std::vector<std::pair<int64_t, double>> curve;
  const auto start = std::chrono::steady_clock::now();
  auto model = finetune(tune, options.base_dir, dir, renderer, runtime, &curve);
  const ordered_json record{{"seconds", seconds_since(start)}, {"loss", curve}};
  if (runtime.is_main()) {
    fs::remove(dir / "checkpoint.pt"); // done: no resume needs it
    write_text(record_file, record.dump(2));
  }
  return {std::move(model), record};
}

/// One arm at its learning rate on one style and seed, judged at every
/// strength: one Run per strength, kept in dir/c<strength>/. The adapters
/// are trained once (adapted_model); strengths already judged are read.
inline std::vector<Run> runs_at_strengths(
    const Arm& arm,
    const FinetuneOptions& base_options,
    const Split& split,
    Judge& judge,
    const ExperimentOptions& options,
    GlyphRenderer& renderer,
    const Runtime& runtime,
    const fs::path& dir) {
  const auto& styles = base_options.styles;
  const auto settings = run_settings(arm, base_options, options);
  std::vector<Run> runs(options.strengths.size());
  std::vector<size_t> missing;
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto at = dir / ("c" + number_text(options.strengths[i]));
    if (from_main(runtime, runs_on_disk(at, styles) ? 1 : 0) == 0) {
      missing.push_back(i);
      continue;
    }
    runs[i] = read_runs(at, styles)[0];
    auto expected = settings;
    expected["strength"] = options.strengths[i];
    check_made_with(at, runs[i], expected);
  }
  if (missing.empty()) {
    return runs;
  }
  auto [model, training] = adapted_model(
      arm, base_options, settings, options, renderer, runtime, dir);
  const auto prompts = static_cast<int64_t>(split.test.size());
  for (const auto i : missing) {
    const auto strength = options.strengths[i];
    styleinject::set_scale(*model, strength);
    auto run = run_of(
        std::move(judge_model(
            model,
            judge,
            new_style_fonts(styles),
            split.test,
            options,
            runtime)[0]),
        prompts);
    run.scores["settings"] = settings;
    run.scores["settings"]["strength"] = strength;
    run.scores["seconds"] = training.at("seconds");
    if (runtime.is_main()) {
      write_runs(dir / ("c" + number_text(strength)), styles, {run});
    }
    runs[i] = std::move(run);
  }
  return runs;
}

/// The base model judged on each style's test prompts and on the
/// base-font prompts, one Run per style, kept in base-model/<style>/: the
/// point at strength 0 that every arm's frontier starts from.
inline std::vector<Run> base_model_runs(
    const std::vector<std::string>& styles,
    const Split& split,
    Judge& judge,
    const ExperimentOptions& options,
    const Runtime& runtime) {
  const auto settings = judging_settings(options);
  std::vector<Run> runs;
  for (const auto& style : styles) {
    const auto dir = options.results / "base-model" / slug(style);
    if (from_main(runtime, runs_on_disk(dir, {style}) ? 1 : 0) != 0) {
      runs.push_back(read_runs(dir, {style})[0]);
      check_made_with(dir, runs.back(), settings);
      continue;
    }
    auto model = load_base(options.base_dir, runtime.device);
    runs.push_back(run_of(
        std::move(judge_model(
            model,
            judge,
            new_style_fonts({style}),
            split.test,
            options,
            runtime)[0]),
        static_cast<int64_t>(split.test.size())));
    runs.back().scores["settings"] = settings;
    if (runtime.is_main()) {
      write_runs(dir, {style}, {runs.back()});
    }
  }
  return runs;
}

// -------------------------------------------------------------- analysis

/// The measures of the frontier, and whether each is scored on the style's
/// test prompts (else on the base-font prompts).
inline const std::vector<std::pair<std::string, bool>>& frontier_measures() {
  static const std::vector<std::pair<std::string, bool>> list{
      {"alignment", true},
      {"style_fit", true},
      {"retention", false},
      {"font_kept", false}};
  return list;
}

/// One point's per-prompt scores of one measure in one style, seeds ×
/// prompts, as sums and counts: a plain mean has a count of 1 per prompt,
/// a mean over the images the judge agrees on counts those, and both are
/// then Σ sum / Σ count.
struct Cells {
  Grid sum, count;
};

/// [point][measure][style]: every point's cells; the last point is the
/// base model.
using Table = std::vector<std::vector<std::vector<Cells>>>;

/// The cells of `measure` of one point in one style, over its seeds'
/// runs (the base model: its one run stands for every seed).
inline Cells cells_of(
    const std::vector<Run>& seeds,
    size_t count,
    const std::string& measure,
    bool agreed_only) {
  Cells cells;
  for (size_t i = 0; i < count; ++i) {
    const auto& scores = seeds[seeds.size() == 1 ? 0 : i].scores;
    if (agreed_only) {
      const auto& agreed = scores.at("agreed").at(measure);
      cells.sum.push_back(agreed.at("sum").get<std::vector<double>>());
      cells.count.push_back(agreed.at("count").get<std::vector<double>>());
    } else {
      cells.sum.push_back(scores.at(measure).get<std::vector<double>>());
      cells.count.emplace_back(cells.sum.back().size(), 1.0);
    }
  }
  return cells;
}

/// The seeds and prompts a resample draws in one style (the sample itself:
/// each once).
struct Picks {
  std::vector<size_t> seeds, test, base;
};

/// The mean over styles of Σ sum / Σ count over the picked seeds and
/// prompts; a style without a counted image is left out (NaN: none has).
inline double picked_mean(
    const std::vector<Cells>& by_style,
    const std::vector<Picks>& picks,
    bool on_test_prompts) {
  double total = 0;
  int64_t styles = 0;
  for (size_t k = 0; k < by_style.size(); ++k) {
    const auto& prompts = on_test_prompts ? picks[k].test : picks[k].base;
    double sum = 0, count = 0;
    for (const auto i : picks[k].seeds) {
      for (const auto j : prompts) {
        sum += by_style[k].sum[i][j];
        count += by_style[k].count[i][j];
      }
    }
    if (count > 0) {
      total += sum / count;
      ++styles;
    }
  }
  return styles > 0 ? total / static_cast<double>(styles) : std::nan("");
}

/// What the frontier statistics are read from: which points belong to
/// which arm, the base model's and the reference's points, and for each
/// retention measure the levels of the range verdicts and the x of the
/// confidence bands.
struct FrontierLayout {
  std::vector<std::vector<size_t>> arm_points;
  size_t base = 0; // the base model's point
  size_t reference = 0; // the point whose retention the arms are matched at
  std::vector<size_t> retentions; // measure indices: font, character
  size_t style_fit = 1; // measure index of the gain
  std::vector<std::vector<double>> levels, band; // per retention measure
  std::vector<std::vector<double>> means; // the sample's, [point][measure]
};

/// Named statistics of one (re)sample; names are kept on the first only.
struct Statistics {
  bool named = true;
  std::vector<std::string> names;
  std::vector<double> values;
  /// `name`: a callable that gives the name, called on the first only.
  template <typename Name>
  void add(const Name& name, double value) {
    if (named) {
      names.push_back(name());
    }
    values.push_back(value);
  }
};

/// An arm's envelope in (retention measure `x`, style fit), base included.
inline std::vector<Tradeoff> arm_envelope(
    const std::vector<std::vector<double>>& means,
    const FrontierLayout& layout,
    size_t arm,
    size_t x) {
  std::vector<Tradeoff> points{
      {means[layout.base][x], means[layout.base][layout.style_fit]}};
  for (const auto p : layout.arm_points[arm]) {
    points.push_back({means[p][x], means[p][layout.style_fit]});
  }
  return upper_envelope(points);
}

/// Every statistic of the report from the points' means ([point][measure]):
/// each point's means; per retention measure the reference's retention R,
/// each arm's style fit at R, the first arm's lead over each other arm at
/// R and at each level, and each arm's envelope at the band's x.
inline void frontier_statistics(
    const std::vector<std::vector<double>>& means,
    const FrontierLayout& layout,
    Statistics& out) {
  const auto& measures = frontier_measures();
  for (size_t p = 0; p < means.size(); ++p) {
    for (size_t m = 0; m < measures.size(); ++m) {
      out.add(
          [&] {
            return "point " + std::to_string(p) + " " + measures[m].first;
          },
          means[p][m]);
    }
  }
  for (size_t q = 0; q < layout.retentions.size(); ++q) {
    const auto x = layout.retentions[q];
    const auto& on = measures[x].first;
    std::vector<std::vector<Tradeoff>> envelopes;
    for (size_t a = 0; a < layout.arm_points.size(); ++a) {
      envelopes.push_back(arm_envelope(means, layout, a, x));
    }
    const auto matched = means[layout.reference][x];
    out.add([&] { return on + " matched"; }, matched);
    for (size_t a = 0; a < envelopes.size(); ++a) {
      out.add(
          [&] { return on + " at matched, arm " + std::to_string(a); },
          envelope_at(envelopes[a], matched));
    }
    for (size_t a = 1; a < envelopes.size(); ++a) {
      const auto lead = [&](double level) {
        return envelope_at(envelopes[0], level) -
            envelope_at(envelopes[a], level);
      };
      out.add(
          [&] { return on + " lead at matched, arm " + std::to_string(a); },
          lead(matched));
      for (size_t l = 0; l < layout.levels[q].size(); ++l) {
        out.add(
            [&] {
              return on + " lead at level " + std::to_string(l) + ", arm " +
                  std::to_string(a);
            },
            lead(layout.levels[q][l]));
      }
    }
    for (size_t a = 0; a < envelopes.size(); ++a) {
      for (size_t i = 0; i < layout.band[q].size(); ++i) {
        out.add(
            [&] {
              return on + " band " + std::to_string(i) + ", arm " +
                  std::to_string(a);
            },
            envelope_at(envelopes[a], layout.band[q][i]));
      }
    }
  }
}

/// Every point's means under `picks`: [point][measure].
inline std::vector<std::vector<double>> point_means(
    const Table& table,
    const std::vector<Picks>& picks) {
  std::vector<std::vector<double>> means(table.size());
  for (size_t p = 0; p < table.size(); ++p) {
    for (size_t m = 0; m < frontier_measures().size(); ++m) {
      means[p].push_back(
          picked_mean(table[p][m], picks, frontier_measures()[m].second));
    }
  }
  return means;
}

/// The sample itself: in every style, each seed and prompt once.
inline std::vector<Picks> every_pick(const Table& table) {
  std::vector<Picks> picks(table[0][0].size());
  const auto each = [](size_t n) {
    std::vector<size_t> indices(n);
    std::iota(indices.begin(), indices.end(), 0);
    return indices;
  };
  for (size_t k = 0; k < picks.size(); ++k) {
    picks[k].seeds = each(table[0][0][k].sum.size());
    for (size_t m = 0; m < frontier_measures().size(); ++m) {
      (frontier_measures()[m].second ? picks[k].test : picks[k].base) =
          each(table[0][m][k].sum[0].size());
    }
  }
  return picks;
}

/// The layout of `table`'s points: `arms` arms of `per_arm` points each,
/// then the base model; matched at the retention of `reference`. Each
/// range verdict's levels lie between the highest of the arms' lowest
/// retentions (every arm has measured points down there) and the base
/// model's, at 0, 1/4, 1/2 and 3/4 of the way (at the base model itself
/// every arm is the same); the bands span every point's retention.
inline FrontierLayout frontier_layout(
    const Table& table,
    size_t arms,
    size_t per_arm,
    size_t reference) {
  FrontierLayout layout;
  for (size_t a = 0; a < arms; ++a) {
    layout.arm_points.emplace_back(per_arm);
    std::iota(
        layout.arm_points[a].begin(), layout.arm_points[a].end(), a * per_arm);
  }
  layout.base = arms * per_arm;
  layout.reference = reference;
  layout.retentions = {3, 2}; // font_kept, retention
  layout.means = point_means(table, every_pick(table));
  const auto& means = layout.means;
  for (const auto x : layout.retentions) {
    double lowest = -1, least = 1, top = means[layout.base][x];
    for (const auto& points : layout.arm_points) {
      double arm_lowest = 1;
      for (const auto p : points) {
        arm_lowest = std::min(arm_lowest, means[p][x]);
        least = std::min(least, means[p][x]);
      }
      lowest = std::max(lowest, arm_lowest);
    }
    layout.levels.push_back({});
    for (const double f : {0.0, 0.25, 0.5, 0.75}) {
      layout.levels.back().push_back(lowest + f * (top - lowest));
    }
    layout.band.push_back({});
    for (int i = 0; i <= 24; ++i) {
      layout.band.back().push_back(least + (top - least) * i / 24.0);
    }
  }
  return layout;
}

/// The statistics of the sample with their 95 % and family-wise percentile
/// intervals: each resample draws, within every style, the seeds, the
/// test prompts and the base-font prompts with replacement, the same for
/// every point (paired).
struct Bootstrapped {
  std::vector<std::string> names;
  std::vector<Interval> ci95, family;
  size_t index(const std::string& name) const {
    const auto found = std::find(names.begin(), names.end(), name);
    TORCH_CHECK(found != names.end(), "no frontier statistic '", name, "'");
    return static_cast<size_t>(found - names.begin());
  }
};

inline Bootstrapped bootstrap_frontier(
    const Table& table,
    const FrontierLayout& layout,
    double family_level,
    int64_t resamples,
    uint64_t seed = 3) {
  auto picks = every_pick(table);
  Statistics sample;
  frontier_statistics(layout.means, layout, sample);
  std::vector<std::vector<double>> draws(sample.values.size());
  std::mt19937_64 rng(seed);
  const auto redraw = [&](std::vector<size_t>& indices) {
    std::uniform_int_distribution<size_t> pick(0, indices.size() - 1);
    for (auto& index : indices) {
      index = pick(rng);
    }
  };
  Statistics one;
  one.named = false;
  for (int64_t b = 0; b < resamples; ++b) {
    for (auto& style : picks) {
      redraw(style.seeds);
      redraw(style.test);
      redraw(style.base);
    }
    one.values.clear();
    frontier_statistics(point_means(table, picks), layout, one);
    for (size_t s = 0; s < one.values.size(); ++s) {
      if (!std::isnan(one.values[s])) { // no agreed image in the resample
        draws[s].push_back(one.values[s]);
      }
    }
  }
  Bootstrapped result{sample.names, {}, {}};
  for (size_t s = 0; s < draws.size(); ++s) {
    const auto mean = sample.values[s];
    if (draws[s].empty()) {
      result.ci95.push_back({mean, std::nan(""), std::nan("")});
      result.family.push_back(result.ci95.back());
      continue;
    }
    result.ci95.push_back(percentile_interval(mean, draws[s]));
    result.family.push_back(
        percentile_interval(mean, std::move(draws[s]), family_level));
  }
  return result;
}

// ---------------------------------------------------------------- report

/// The finished runs: runs[point][style][seed], and the base model's per
/// style.
struct FrontierRuns {
  std::vector<Point> points;
  std::vector<std::vector<std::vector<Run>>> runs;
  std::vector<Run> base;
};

/// The runs' cells, every image or (agreed_only) those the judge agrees on.
inline Table frontier_table(
    const FrontierRuns& done,
    size_t seeds,
    bool agreed_only) {
  Table table;
  const auto add = [&](const auto& runs_of_style) {
    table.emplace_back();
    for (const auto& [measure, on_test] : frontier_measures()) {
      table.back().emplace_back();
      for (size_t k = 0; k < done.base.size(); ++k) {
        table.back().back().push_back(
            cells_of(runs_of_style(k), seeds, measure, agreed_only));
      }
    }
  };
  for (const auto& point : done.runs) {
    add([&](size_t k) { return point[k]; });
  }
  add([&](size_t k) { return std::vector<Run>{done.base[k]}; });
  return table;
}

/// The point whose retention the arms are matched at: the second arm (LoRA
/// of equal parameters) at the learning rate nearest 1e-3 and the
/// strength nearest 1.
inline size_t reference_point(const std::vector<Point>& points) {
  size_t best = 0;
  double distance = 1e300;
  for (size_t p = 0; p < points.size(); ++p) {
    const double d = std::abs(std::log(points[p].lr / 1e-3)) +
        std::abs(points[p].strength - 1.0);
    if (points[p].arm == 1 && d < distance) {
      best = p;
      distance = d;
    }
  }
  return best;
}

/// "above over the whole range", "below ...", "no difference at any
/// level", or which levels differ: the first arm's frontier against
/// another's, from its leads at the levels.
inline std::string range_verdict(const std::vector<Interval>& leads) {
  size_t above = 0, below = 0;
  for (const auto& lead : leads) {
    above += lead.low > 0 ? 1 : 0;
    below += lead.high < 0 ? 1 : 0;
  }
  if (above == leads.size()) {
    return "above over the whole range";
  }
  if (below == leads.size()) {
    return "below over the whole range";
  }
  if (above == 0 && below == 0) {
    return "no difference at any level";
  }
  return "above at " + std::to_string(above) + ", below at " +
      std::to_string(below) + " of " + std::to_string(leads.size()) + " levels";
}

/// The verdicts on one retention measure (index q of the layout): each
/// arm's style fit at the matched retention, the first arm's lead there and
/// across the range, with verdicts; into `md` and `json`.
inline void verdict_section(
    const Bootstrapped& b,
    const FrontierLayout& layout,
    const std::vector<Arm>& arms,
    size_t q,
    std::ostream& md,
    ordered_json& json) {
  const auto& on = frontier_measures()[layout.retentions[q]].first;
  const auto matched = b.ci95[b.index(on + " matched")];
  json["matched"] = to_json(matched);
  md << "Matched " << (on == "font_kept" ? "font" : "character")
     << " retention R = " << mean_text(matched)
     << ".\n\n| arm | style fit at R | " << arms[0].label
     << " − arm at R, 95 % | family-wise | verdict |\n"
     << separator(5) << "\n";
  for (size_t a = 0; a < arms.size(); ++a) {
    const auto fit =
        b.ci95[b.index(on + " at matched, arm " + std::to_string(a))];
    auto& record = json["arms"][arms[a].label];
    record["style_fit_at_matched"] = to_json(fit);
    md << "| " << arms[a].label << " | " << mean_text(fit) << " |";
    if (a == 0) {
      md << " | | |\n";
      continue;
    }
    const auto name = on + " lead at matched, arm " + std::to_string(a);
    const auto lead = b.ci95[b.index(name)];
    const auto wide = b.family[b.index(name)];
    record["lead_at_matched"] = to_json(lead);
    record["lead_at_matched_family_wise"] = to_json(wide);
    record["verdict_at_matched"] = verdict(wide, true);
    md << " " << interval_text(lead) << " | " << interval_text(wide) << " | "
       << verdict(wide, true) << " |\n";
  }
  md << "\nAcross the range (" << arms[0].label
     << " − arm, family-wise intervals) at retention";
  for (const auto level : layout.levels[q]) {
    md << " " << fixed(level);
  }
  md << ":\n\n| arm |";
  for (size_t l = 0; l < layout.levels[q].size(); ++l) {
    md << " " << fixed(layout.levels[q][l]) << " |";
  }
  md << " verdict |\n" << separator(layout.levels[q].size() + 2) << "\n";
  json["levels"] = layout.levels[q];
  for (size_t a = 1; a < arms.size(); ++a) {
    std::vector<Interval> leads;
    md << "| " << arms[a].label << " |";
    for (size_t l = 0; l < layout.levels[q].size(); ++l) {
      leads.push_back(b.family[b.index(
          on + " lead at level " + std::to_string(l) + ", arm " +
          std::to_string(a))]);
      md << " " << interval_text(leads.back()) << " |";
      json["arms"][arms[a].label]["leads_family_wise"].push_back(
          to_json(leads.back()));
    }
    const auto range = range_verdict(leads);
    json["arms"][arms[a].label]["verdict_over_range"] = range;
    md << " " << range << " |\n";
  }
}

/// The envelopes (of the sample) and their 95 % bands, for plot.py.
inline ordered_json frontier_curves(
    const Bootstrapped& b,
    const FrontierLayout& layout,
    const std::vector<Arm>& arms) {
  const auto& means = layout.means;
  ordered_json curves;
  for (size_t q = 0; q < layout.retentions.size(); ++q) {
    const auto x = layout.retentions[q];
    const auto& on = frontier_measures()[x].first;
    auto& curve = curves[on];
    curve["band_x"] = layout.band[q];
    curve["matched"] = means[layout.reference][x];
    curve["base"] = {
        means[layout.base][x], means[layout.base][layout.style_fit]};
    for (size_t a = 0; a < arms.size(); ++a) {
      auto& arm = curve["arms"][arms[a].label];
      for (const auto p : layout.arm_points[a]) {
        arm["points"].push_back({means[p][x], means[p][layout.style_fit]});
      }
      for (const auto& e : arm_envelope(means, layout, a, x)) {
        arm["envelope"].push_back({e.x, e.y});
      }
      for (size_t i = 0; i < layout.band[q].size(); ++i) {
        const auto band = b.ci95[b.index(
            on + " band " + std::to_string(i) + ", arm " + std::to_string(a))];
        arm["band_low"].push_back(band.low);
        arm["band_high"].push_back(band.high);
      }
    }
  }
  return curves;
}

/// Each point's means with 95 % intervals, and how often the judge's
/// members agree on the character of its test and base-font images.
inline void points_section(
    const Bootstrapped& b,
    const Table& agreed,
    const FrontierRuns& done,
    const std::vector<Arm>& arms,
    int64_t images,
    std::ostream& md,
    ordered_json& json) {
  const auto& measures = frontier_measures();
  // The share of images the judge agrees on: Σ count / (prompts · images).
  const auto agreement = [&](size_t p, size_t m) {
    double count = 0, cells = 0;
    for (const auto& style : agreed[p][m]) {
      for (const auto& row : style.count) {
        count += std::accumulate(row.begin(), row.end(), 0.0);
        cells += static_cast<double>(row.size() * images);
      }
    }
    return count / cells;
  };
  md << "| arm | lr | c | style fit | retention (font) | retention "
        "(character) | alignment | judge agrees (test) | judge agrees "
        "(base fonts) |\n"
     << separator(9) << "\n";
  for (size_t p = 0; p <= done.points.size(); ++p) {
    const bool base = p == done.points.size();
    ordered_json record;
    md << "| " << (base ? "base model" : arms[done.points[p].arm].label)
       << " | " << (base ? "" : number_text(done.points[p].lr)) << " | "
       << (base ? "0" : number_text(done.points[p].strength)) << " |";
    if (!base) {
      record = {
          {"arm", arms[done.points[p].arm].label},
          {"lr", done.points[p].lr},
          {"strength", done.points[p].strength}};
    } else {
      record = {{"arm", "base model"}, {"strength", 0}};
    }
    for (const size_t m : {1, 3, 2, 0}) {
      const auto interval = b.ci95[b.index(
          "point " + std::to_string(p) + " " + measures[m].first)];
      record[measures[m].first] = to_json(interval);
      md << " " << mean_text(interval) << " |";
    }
    record["judge_agrees_test"] = agreement(p, 1);
    record["judge_agrees_base"] = agreement(p, 3);
    md << " " << fixed(record["judge_agrees_test"]) << " | "
       << fixed(record["judge_agrees_base"]) << " |\n";
    json.push_back(record);
  }
}

/// grids/real.png (each style's test characters as rendered), then per arm
/// grids/matched-<arm>.png: seed 0's images of every style at the arm's
/// point whose font retention is nearest the matched one.
inline void write_matched_grids(
    const FrontierRuns& done,
    const FrontierLayout& layout,
    const std::vector<Arm>& arms,
    const std::vector<std::string>& styles,
    const Split& split,
    GlyphRenderer& renderer,
    const fs::path& results,
    ordered_json& json) {
  const auto& means = layout.means;
  const auto font = layout.retentions[0];
  std::vector<torch::Tensor> real;
  for (const auto& style : styles) {
    std::vector<torch::Tensor> row;
    for (const char c : split.test) {
      row.push_back(
          renderer.render(font_index(style), c, nullptr).unsqueeze(0));
    }
    real.push_back(torch::stack(row));
  }
  write_png(results / "grids" / "real.png", grid(real, 2));
  for (size_t a = 0; a < arms.size(); ++a) {
    size_t nearest = layout.arm_points[a][0];
    for (const auto p : layout.arm_points[a]) {
      if (std::abs(means[p][font] - means[layout.reference][font]) <
          std::abs(means[nearest][font] - means[layout.reference][font])) {
        nearest = p;
      }
    }
    std::vector<torch::Tensor> rows;
    for (const auto& style_runs : done.runs[nearest]) {
      rows.push_back(style_runs[0].grid_row);
    }
    const auto file = "matched-" + slug(arms[a].label) + ".png";
    write_png(results / "grids" / file, grid(rows, 2));
    json[arms[a].label] = {
        {"grid", "grids/" + file},
        {"lr", done.points[nearest].lr},
        {"strength", done.points[nearest].strength},
        {"font_kept", means[nearest][font]}};
  }
}

// ---------------------------------------------------------------- driver

/// Whether the verdicts on every image hold on the agreed images alone:
/// a table of both, per retention measure and arm; into `md`.
inline void holds_section(
    const ordered_json& every,
    const ordered_json& agreed,
    const std::vector<Arm>& arms,
    std::ostream& md) {
  md << "\n## Verdicts, and whether they hold on the agreed images\n\n"
     << "| retention | " << arms[0].label
     << " against | at matched retention | agreed images only | over the "
        "range | agreed images only | holds |\n"
     << separator(7) << "\n";
  for (const auto& [on, title] :
       std::vector<std::pair<std::string, std::string>>{
           {"font_kept", "font"}, {"retention", "character"}}) {
    for (size_t a = 1; a < arms.size(); ++a) {
      const auto& one = every.at(on).at("arms").at(arms[a].label);
      const auto& two = agreed.at(on).at("arms").at(arms[a].label);
      const bool holds =
          one.at("verdict_at_matched") == two.at("verdict_at_matched") &&
          one.at("verdict_over_range") == two.at("verdict_over_range");
      md << "| " << title << " | " << arms[a].label << " | "
         << one.at("verdict_at_matched").get<std::string>() << " | "
         << two.at("verdict_at_matched").get<std::string>() << " | "
         << one.at("verdict_over_range").get<std::string>() << " | "
         << two.at("verdict_over_range").get<std::string>() << " | "
         << (holds ? "yes" : "no") << " |\n";
    }
  }
}

/// Every run's per-prompt scores (the base model's as arm "base model"),
/// labelled, for analyses of one's own.
inline ordered_json every_run(
    const FrontierRuns& done,
    const std::vector<Arm>& arms,
    const std::vector<std::string>& styles,
    uint64_t first_seed) {
  ordered_json runs = ordered_json::array();
  const auto add = [&](ordered_json scores, ordered_json labels) {
    scores.erase("settings");
    scores.erase("loss");
    labels.update(scores);
    runs.push_back(std::move(labels));
  };
  for (size_t p = 0; p < done.points.size(); ++p) {
    for (size_t k = 0; k < styles.size(); ++k) {
      for (size_t seed = 0; seed < done.runs[p][k].size(); ++seed) {
        add(done.runs[p][k][seed].scores,
            {{"arm", arms[done.points[p].arm].label},
             {"lr", done.points[p].lr},
             {"strength", done.points[p].strength},
             {"style", styles[k]},
             {"seed", first_seed + seed}});
      }
    }
  }
  for (size_t k = 0; k < styles.size(); ++k) {
    add(done.base[k].scores,
        {{"arm", "base model"}, {"strength", 0}, {"style", styles[k]}});
  }
  return runs;
}

/// summary.md, metrics.json, runs.json and grids/ of a finished frontier
/// experiment.
inline void write_frontier_report(
    const FrontierRuns& done,
    const std::vector<Arm>& arms,
    const std::vector<std::string>& styles,
    const Split& split,
    const ExperimentOptions& options,
    GlyphRenderer& renderer,
    ordered_json& report) {
  const auto per_arm = options.lrs.size() * options.strengths.size();
  const auto reference = reference_point(done.points);
  // Per retention measure and other arm: the lead at the matched retention
  // and at 4 levels.
  const auto family =
      1 - 0.05 / static_cast<double>(2 * (arms.size() - 1) * (1 + 4));
  const auto seeds = static_cast<size_t>(options.seeds);
  const auto every = frontier_table(done, seeds, false);
  const auto agreed = frontier_table(done, seeds, true);
  std::ostringstream md, points;
  md << "# Typeface experiment: frontier" << (options.quick ? " (quick)" : "")
     << "\n\nStyles: " << report["styles"].dump()
     << "; K = " << options.shots[0] << "; seeds 0–" << options.seeds - 1
     << "; " << options.images << " images per prompt on " << split.test.size()
     << " test and " << options.base_prompts << " base-font prompts per style; "
     << options.steps << " fine-tune steps at each learning rate of "
     << report["lr_candidates"].dump() << "; each adapter sampled at strength "
     << report["strengths"].dump()
     << ". Every arm's frontier includes the base model (strength 0). "
        "Intervals: paired bootstrap over seeds and prompts within each "
        "style (20,000 resamples); family-wise at "
     << fixed(100 * family, 2) << " % over the report's "
     << 2 * (arms.size() - 1) * 5 << " verdicts. Matched at " << arms[1].label
     << ", lr " << number_text(done.points[reference].lr)
     << ", c = " << number_text(done.points[reference].strength)
     << ".\n\n| arm | adapter parameters | fine-tune time (median) |\n"
     << separator(3) << "\n";
  for (size_t a = 0; a < arms.size(); ++a) {
    // The median: a run stopped while something else had the machine
    // counts its pause.
    std::vector<double> seconds;
    for (size_t p = 0; p < done.points.size(); ++p) {
      if (done.points[p].arm != a) {
        continue;
      }
      for (const auto& style : done.runs[p]) {
        for (const auto& run : style) {
          seconds.push_back(run.scores.at("seconds").get<double>());
        }
      }
    }
    const auto middle = seconds.begin() + seconds.size() / 2;
    std::nth_element(seconds.begin(), middle, seconds.end());
    md << "| " << arms[a].label << " | " << arms[a].parameters << " | "
       << fixed(*middle, 0) << " s |\n";
  }
  ordered_json verdicts[2];
  for (const bool agreed_only : {false, true}) {
    const auto& table = agreed_only ? agreed : every;
    const auto layout = frontier_layout(table, arms.size(), per_arm, reference);
    const auto b = bootstrap_frontier(table, layout, family, 20000);
    const auto key = agreed_only ? "agreed_only" : "every_image";
    for (size_t q = 0; q < layout.retentions.size(); ++q) {
      const auto& on = frontier_measures()[layout.retentions[q]].first;
      md << "\n## " << (on == "font_kept" ? "Font" : "Character")
         << " retention against style fit"
         << (agreed_only ? ", on the images the judge agrees on" : "")
         << "\n\n";
      if (!agreed_only) {
        md << "![frontier](plots/frontier-"
           << (on == "font_kept" ? "font" : "character") << ".png)\n\n";
      }
      verdict_section(b, layout, arms, q, md, verdicts[agreed_only][on]);
    }
    report["frontier"][key] = verdicts[agreed_only];
    report["frontier"][key]["curves"] = frontier_curves(b, layout, arms);
    if (!agreed_only) {
      points_section(
          b, agreed, done, arms, options.images, points, report["points"]);
      write_matched_grids(
          done,
          layout,
          arms,
          styles,
          split,
          renderer,
          options.results,
          report["matched_grids"]);
    }
  }
  holds_section(verdicts[0], verdicts[1], arms, md);
  write_text(
      options.results / "runs.json",
      every_run(done, arms, styles, options.seed).dump());
  md << "\n## Every point (95 % intervals)\n\n"
     << points.str()
     << "\nGrids: grids/real.png (the styles as rendered), and per arm "
        "grids/matched-<arm>.png, seed 0 at the arm's point nearest the "
        "matched font retention. Every run's per-prompt scores: "
        "runs.json. Wall time of this invocation (finished runs are read, "
        "not made again): "
     << fixed(report["run_seconds"].get<double>(), 0) << " s.\n";
  write_text(options.results / "metrics.json", report.dump(1));
  write_text(options.results / "summary.md", md.str());
  std::cout << md.str();
}

/// The frontier experiment, into results/frontier/ (a DiT's:
/// results/frontier-dit/). Seed-major, so that the seeds an interrupted
/// run finished can be reported already (--seeds).
inline void run_frontier(
    ExperimentOptions options,
    const std::map<std::string, std::string>& font_paths,
    const Runtime& runtime) {
  const auto begin = std::chrono::steady_clock::now();
  const auto elapsed = [&] { return seconds_since(begin); };
  if (options.shots.size() != 1) {
    throw std::invalid_argument(
        "--setting frontier takes one K in --shots, but got " +
        std::to_string(options.shots.size()));
  }
  const auto styles = checked_styles(options);
  const auto config = base_config(options, runtime);
  GlyphRenderer renderer(all_fonts(), config.image_size, font_paths);
  auto judge = experiment_judge(options, renderer, runtime);
  const auto arms = setting_arms("frontier", config);
  const auto split = experiment_split(options, options.shots[0]);
  FrontierRuns done;
  done.points = frontier_points(arms.size(), options);
  done.runs.assign(
      done.points.size(), std::vector<std::vector<Run>>(styles.size()));
  done.base = base_model_runs(styles, split, judge, options, runtime);
  const auto S = options.strengths.size();
  for (int64_t seed = 0; seed < options.seeds; ++seed) {
    for (size_t k = 0; k < styles.size(); ++k) {
      for (size_t p = 0; p < done.points.size(); p += S) {
        auto arm = arms[done.points[p].arm];
        arm.lr = done.points[p].lr;
        FinetuneOptions tune;
        tune.styles = {styles[k]};
        tune.shots = options.shots[0];
        tune.steps = options.steps;
        tune.seed = options.seed + static_cast<uint64_t>(seed);
        const auto name = slug(arm.label) + "-lr" + number_text(arm.lr) +
            "-seed" + std::to_string(tune.seed);
        if (runtime.is_main()) {
          std::cerr << "[" << fixed(elapsed(), 0) << " s] " << styles[k]
                    << ", seed " << tune.seed << ": " << arm.label << ", lr "
                    << arm.lr << "\n";
        }
        const auto runs = runs_at_strengths(
            arm,
            tune,
            split,
            judge,
            options,
            renderer,
            runtime,
            options.results / "runs" /
                (slug(styles[k]) + "-k" + std::to_string(tune.shots)) / name);
        for (size_t i = 0; i < S; ++i) {
          done.runs[p + i][k].push_back(runs[i]);
        }
      }
    }
  }
  if (!runtime.is_main()) {
    return; // rank 0 writes the report
  }
  auto report = report_header(options, styles, judge);
  report["strengths"] = options.strengths;
  report["run_seconds"] = elapsed();
  for (const auto& arm : arms) {
    report["arms"].push_back(
        {{"label", arm.label},
         {"options", styleinject::detail::options_to_json(arm.adapter)},
         {"parameters", arm.parameters}});
  }
  write_frontier_report(done, arms, styles, split, options, renderer, report);
  make_plots(options.results);
  std::cout << "results in " << options.results.string() << " ("
            << fixed(elapsed(), 0) << " s)\n";
}

} // namespace typeface
