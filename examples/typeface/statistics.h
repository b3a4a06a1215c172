#pragma once
// The experiments' statistics: the paired bootstrap interval of a mean
// difference, and the Fréchet distance between two sets of features.

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace typeface {

/// A mean and its confidence interval (95 % unless said otherwise).
struct Interval {
  double mean = 0, low = 0, high = 0;
};

/// `mean` with the central `level` of its bootstrap resamples (0.95: the
/// 2.5 and 97.5 percentiles).
inline Interval percentile_interval(
    double mean,
    std::vector<double> resamples,
    double level = 0.95) {
  TORCH_CHECK(!resamples.empty(), "percentile_interval: no resamples");
  std::sort(resamples.begin(), resamples.end());
  const auto quantile = [&](double q) {
    return resamples[static_cast<size_t>(
        std::lround(q * static_cast<double>(resamples.size() - 1)))];
  };
  return {mean, quantile((1 - level) / 2), quantile((1 + level) / 2)};
}

/// Paired differences of one stratum (a style): rows are seeds, columns
/// prompts; each entry is one method's score minus the other's on the same
/// seed and prompt.
using Grid = std::vector<std::vector<double>>;

/// The mean of the strata's means, and its percentile bootstrap interval
/// at `level`: each resample draws, within every stratum, the seeds and the
/// prompts with replacement (the two sources of variation).
inline Interval paired_bootstrap(
    const std::vector<Grid>& strata,
    int64_t resamples = 2000,
    uint64_t seed = 1,
    double level = 0.95) {
  using Picks = std::vector<std::vector<size_t>>; // per stratum
  const auto mean_of = [&](const Picks& seeds, const Picks& prompts) {
    double total = 0;
    for (size_t k = 0; k < strata.size(); ++k) {
      double sum = 0;
      for (const auto i : seeds[k]) {
        for (const auto j : prompts[k]) {
          sum += strata[k][i][j];
        }
      }
      total += sum / static_cast<double>(seeds[k].size() * prompts[k].size());
    }
    return total / static_cast<double>(strata.size());
  };
  // The sample itself: every seed and prompt once.
  Picks seeds(strata.size()), prompts(strata.size());
  for (size_t k = 0; k < strata.size(); ++k) {
    TORCH_CHECK(
        !strata[k].empty() && !strata[k][0].empty(),
        "paired_bootstrap: stratum ",
        k,
        " is empty");
    for (size_t i = 0; i < strata[k].size(); ++i) {
      seeds[k].push_back(i);
    }
    for (size_t j = 0; j < strata[k][0].size(); ++j) {
      prompts[k].push_back(j);
    }
  }
  Interval interval;
  interval.mean = mean_of(seeds, prompts);
  std::mt19937_64 rng(seed);
  const auto redraw = [&](Picks& picks) {
    for (auto& stratum : picks) {
      std::uniform_int_distribution<size_t> pick(0, stratum.size() - 1);
      for (auto& index : stratum) {
        index = pick(rng);
      }
    }
  };
  std::vector<double> means;
  for (int64_t b = 0; b < resamples; ++b) {
    redraw(seeds);
    redraw(prompts);
    means.push_back(mean_of(seeds, prompts));
  }
  return percentile_interval(interval.mean, std::move(means), level);
}

/// "better", "worse" or "no difference" at the interval's level, for a
/// difference A − B of a measure where higher (or, for a distance, lower) is
/// better for A.
inline std::string verdict(const Interval& difference, bool higher_is_better) {
  if (difference.low > 0) {
    return higher_is_better ? "better" : "worse";
  }
  if (difference.high < 0) {
    return higher_is_better ? "worse" : "better";
  }
  return "no difference";
}

/// A point of a trade-off: what is kept (x) and what is gained (y), both
/// better when higher.
struct Tradeoff {
  double x = 0, y = 0;
};

/// The upper envelope of `points`: those that no other point beats or
/// equals in both x and y, by decreasing x (so increasing y). Points with
/// a NaN are left out.
inline std::vector<Tradeoff> upper_envelope(std::vector<Tradeoff> points) {
  points.erase(
      std::remove_if(
          points.begin(),
          points.end(),
          [](const Tradeoff& p) { return std::isnan(p.x) || std::isnan(p.y); }),
      points.end());
  std::sort(points.begin(), points.end(), [](const auto& a, const auto& b) {
    return a.x != b.x ? a.x > b.x : a.y > b.y;
  });
  std::vector<Tradeoff> envelope;
  for (const auto& p : points) {
    if (envelope.empty() || p.y > envelope.back().y) {
      envelope.push_back(p);
    }
  }
  return envelope;
}

/// The envelope's y at `x`: linear between its points (the strength in
/// between them is continuous); below its smallest x, its largest y (every
/// point keeps that much); above its largest x, the y there. NaN when empty.
inline double envelope_at(const std::vector<Tradeoff>& envelope, double x) {
  if (envelope.empty()) {
    return std::nan("");
  }
  if (x >= envelope.front().x) {
    return envelope.front().y;
  }
  for (size_t i = 1; i < envelope.size(); ++i) {
    const auto& high = envelope[i - 1];
    const auto& low = envelope[i];
    if (x >= low.x) {
      return low.y + (high.y - low.y) * (x - low.x) / (high.x - low.x);
    }
  }
  return envelope.back().y;
}

/// The Fréchet distance between Gaussians fitted to two sets of features
/// (FID's formula): |μa − μb|² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), in
/// float64, through symmetric eigendecompositions.
/// a: (N, D), b: (M, D) with N, M >= 2
inline double frechet_distance(const torch::Tensor& a, const torch::Tensor& b) {
  TORCH_CHECK(
      a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) &&
          a.size(0) >= 2 && b.size(0) >= 2,
      "frechet_distance: expected (N, D) and (M, D) with N, M >= 2, but got ",
      a.sizes(),
      " and ",
      b.sizes());
  const auto fit = [](const torch::Tensor& x) {
    const auto x64 = x.to(torch::kDouble);
    const auto mean = x64.mean(0);
    const auto centered = x64 - mean;
    return std::make_pair(
        mean, centered.t().mm(centered) / static_cast<double>(x.size(0) - 1));
  };
  const auto [mean_a, cov_a] = fit(a);
  const auto [mean_b, cov_b] = fit(b);
  // Σa^½ from Σa's eigendecomposition (negative rounding clamped to 0).
  const auto [values, vectors] = torch::linalg_eigh(cov_a, "L");
  const auto root_a =
      vectors.mm(torch::diag(values.clamp_min(0).sqrt())).mm(vectors.t());
  const auto inner = root_a.mm(cov_b).mm(root_a);
  const auto inner_values =
      std::get<0>(torch::linalg_eigh((inner + inner.t()) / 2, "L"));
  const double trace_root =
      inner_values.clamp_min(0).sqrt().sum().item<double>();
  return (mean_a - mean_b).pow(2).sum().item<double>() +
      cov_a.trace().item<double>() + cov_b.trace().item<double>() -
      2 * trace_root;
}

} // namespace typeface
