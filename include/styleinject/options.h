#pragma once

#include <torch/arg.h>
#include <torch/types.h>

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace styleinject {

/// How the layer computes its update (SPEC §2). Every path gives the same
/// numbers; they differ only in cost.
enum class ComputePath {
  /// Pick the cheaper path from the input's shape. Default.
  kAuto,
  /// Mix the branches first, per sample (`A_eff = s · A`), then one batched
  /// matmul: cost close to one branch when there are many tokens.
  kMerged,
  /// Run all n·r rows as one matmul, then mix the branch outputs: cheaper
  /// when each sample has a single token.
  kStacked,
  /// Fold the whole update into one weight per sample,
  /// `W0 + (alpha/r)·B·A_eff`, so that the layer is one GEMM of the base's
  /// size (and, with no backward to come, the gate folds in too). kAuto does
  /// this where one weight serves all samples (a fixed style, router off).
  /// Linear with a token axis, a frozen base and one dtype for base and
  /// adapter; elsewhere the same as kMerged.
  kMergedWeight,
};

/// The variance gate of SPEC §3b: how the adapted feature `u = h0 + dh`
/// (h0 the frozen path's output, dh the low-rank update) becomes the
/// layer's output. Statistics are per instance and channel, over the tokens
/// (Linear) or H×W (Conv2d); each variant is the identity at initialisation.
/// Where the input has no token axis, every gate is off (`h = u`).
enum class GateMode {
  /// `h = u`: the plain multi-branch update (SPEC's DMA alone).
  kOff,
  /// `h = u + g ⊙ (u - mean(u))`, `g = tanh(s · gate)`: each channel's
  /// spread times (1 + g), chosen per instance by the router; the mean
  /// kept. The only variant with parameters (`gate`, n × d_out).
  kScale,
  /// `h = mean(h0) + k ⊙ (h0 - mean(h0))`, `k = (std(u) + eps) /
  /// (std(h0) + eps)`: content and mean from the frozen path, the spread
  /// from the adapted one (AdaIN). The update reaches the output only
  /// through the spread it gives.
  kAdain,
  /// `h = h0 + (dh - mean(dh))`: only the zero-mean part of the update,
  /// so each channel's mean stays the base's.
  kResidual,
};

/// The name of a gate mode in records and messages: "off", "scale",
/// "adain", "residual".
inline const char* gate_mode_name(GateMode mode) {
  switch (mode) {
    case GateMode::kOff:
      return "off";
    case GateMode::kScale:
      return "scale";
    case GateMode::kAdain:
      return "adain";
    case GateMode::kResidual:
      return "residual";
  }
  return "?";
}

/// Options for a StyleInject adapter on a Linear or Conv2d layer.
///
/// Example:
/// ```
/// styleinject::StyleInjectLinear layer(
///     torch::nn::Linear(320, 320),
///     styleinject::StyleInjectOptions(4).branches(4).alpha(8));
/// ```
struct StyleInjectOptions {
  /* implicit */ StyleInjectOptions(int64_t rank) : rank_(rank) {}

  /// LoRA as the special case of StyleInject (SPEC §4): one branch, no
  /// router, no gate, `h = W0 x + b0 + (alpha / r) B A dropout(x)`.
  static StyleInjectOptions lora(int64_t rank) {
    return StyleInjectOptions(rank).branches(1).router(false).gate(false);
  }

  /// `gate(true)` is GateMode::kScale, `gate(false)` GateMode::kOff.
  StyleInjectOptions& gate(bool on) {
    gate_ = on ? GateMode::kScale : GateMode::kOff;
    return *this;
  }

  /// The factor in front of `B (sum_i s_i A_i x)`: `alpha / r`, or
  /// `alpha / sqrt(r)` with rslora.
  double scaling() const {
    const double r = static_cast<double>(rank_);
    return alpha_.value_or(r) / (rslora_ ? std::sqrt(r) : r);
  }

  /// Rank r of every branch's down-projection and of the shared
  /// up-projection.
  TORCH_ARG(int64_t, rank);

  /// Number n of parallel down-projections (styles). Default: 4
  TORCH_ARG(int64_t, branches) = 4;

  /// Numerator of the update's scale `alpha / r` (or `alpha / sqrt(r)` with
  /// rslora). Default: the rank, so that the scale is 1.
  TORCH_ARG(c10::optional<double>, alpha) = c10::nullopt;

  /// Dropout probability on the branches' input, in [0, 1). Default: 0
  TORCH_ARG(double, dropout) = 0.0;

  /// Scale the update by `alpha / sqrt(r)` instead of `alpha / r` (rsLoRA,
  /// Kalajdzievski 2023). Default: false
  TORCH_ARG(bool, rslora) = false;

  /// Softmax temperature tau of the router. Default: 1
  TORCH_ARG(double, temperature) = 1.0;

  /// Route per instance from the input (SPEC §1); off: every branch weighs
  /// 1/n. Default: true
  TORCH_ARG(bool, router) = true;

  /// The input-conditioned variance gate (SPEC §3, variants §3b).
  /// Default: kScale
  TORCH_ARG(GateMode, gate) = GateMode::kScale;

  /// How the update is computed; every path gives the same numbers.
  /// Default: kAuto
  TORCH_ARG(ComputePath, path) = ComputePath::kAuto;

  /// dtype of the adapter's parameters, e.g. torch::kFloat on a bfloat16
  /// base, as diffusion fine-tuning usually keeps them. The adapter keeps it
  /// through `to(dtype)`; its part of the forward runs in the wider of it
  /// and the input's dtype. Default: the base weight's dtype, which the
  /// adapter then follows
  TORCH_ARG(c10::optional<torch::Dtype>, dtype) = c10::nullopt;
};

/// The name of a layer's first adapter: the one whose parameters keep SPEC
/// §5's names (`<layer>.lora_A`, ...). Adapters added under other names are
/// children of the layer (`<layer>.<name>.lora_A`, ...).
inline constexpr const char* kDefaultAdapter = "default";

/// Options for folding an adapter into its base weight (`merge`).
///
/// Example:
/// ```
/// styleinject::merge_adapters(*unet, styleinject::Targets::all(),
///     styleinject::MergeOptions().keep_base(false));
/// ```
struct MergeOptions {
  /// Keep a copy of each base weight, so that unmerge restores it bit for
  /// bit; it costs one more weight's memory per merged layer. Without it,
  /// unmerge subtracts the update again, which restores the weight within
  /// the rounding of its dtype (see StyleInjectLayerImpl::unmerge).
  /// Default: true
  TORCH_ARG(bool, keep_base) = true;
};

namespace detail {

/// The dtypes an adapter can be kept in, by the names records give them.
inline const std::vector<std::pair<std::string, torch::Dtype>>& adapter_dtypes() {
  static const std::vector<std::pair<std::string, torch::Dtype>> table{
      {"float32", torch::kFloat},
      {"float64", torch::kDouble},
      {"bfloat16", torch::kBFloat16},
      {"float16", torch::kHalf}};
  return table;
}

/// The name records give an adapter dtype ("float32", ...); empty for a
/// dtype an adapter cannot have.
inline std::string adapter_dtype_name(torch::Dtype dtype) {
  for (const auto& entry : adapter_dtypes()) {
    if (entry.second == dtype) {
      return entry.first;
    }
  }
  return {};
}

/// Names as a message lists them: ['a', 'b', ...], the first 12 and a
/// count.
inline std::string quoted_list(const std::vector<std::string>& names) {
  std::string text = "[";
  const size_t shown = std::min<size_t>(names.size(), 12);
  for (size_t i = 0; i < shown; ++i) {
    text += (i ? ", '" : "'") + names[i] + "'";
  }
  if (shown < names.size()) {
    text += ", ... (" + std::to_string(names.size()) + " in all)";
  }
  return text + "]";
}

/// Whether a gate mode takes no parameters but both the frozen path's
/// output and the update (kAdain, kResidual).
inline bool parameter_free(GateMode mode) {
  return mode == GateMode::kAdain || mode == GateMode::kResidual;
}

/// Why adapters with these names and gates cannot sit on one layer
/// together, completing "the layer ..."; empty if they can. A
/// parameter-free gate reads the frozen output and its own update apart,
/// so it takes an adapter alone.
inline std::string shared_layer_obstacle(
    const std::vector<std::pair<std::string, GateMode>>& adapters) {
  if (adapters.size() < 2) {
    return {};
  }
  std::vector<std::string> names;
  for (const auto& adapter : adapters) {
    names.push_back(adapter.first);
  }
  for (const auto& adapter : adapters) {
    if (parameter_free(adapter.second)) {
      return "would have adapters " + quoted_list(names) + ", but '" +
          adapter.first + "' has gate=" + gate_mode_name(adapter.second) +
          ", which takes an adapter alone; several adapters need gate=scale "
          "or gate=off on each";
    }
  }
  return {};
}

/// Refuses an adapter name that cannot be a child module of a layer: it
/// must be made of letters, digits, '_' and '-', and must not be a name the
/// layer uses itself. `context` names the caller in the message.
inline void check_adapter_name(
    const std::string& name,
    const std::string& context) {
  const bool spelled =
      !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '_' ||
            c == '-';
      });
  TORCH_CHECK_VALUE(
      spelled,
      context,
      ": expected an adapter name of letters, digits, '_' and '-', but got '",
      name.substr(0, 64),
      "'");
  for (const char* taken :
       {"weight", "bias", "lora_A", "lora_B", "gate", "router"}) {
    TORCH_CHECK_VALUE(
        name != taken,
        context,
        ": the adapter name '",
        name,
        "' is taken by the layer's own parameters; choose another");
  }
}

/// Refuses options that cannot describe an adapter; `layer` names the module
/// in the message.
inline void check_options(
    const StyleInjectOptions& options,
    const std::string& layer) {
  TORCH_CHECK_VALUE(
      options.rank() >= 1,
      layer,
      ": expected rank >= 1, but got rank=",
      options.rank());
  TORCH_CHECK_VALUE(
      options.branches() >= 1,
      layer,
      ": expected branches >= 1, but got branches=",
      options.branches());
  TORCH_CHECK_VALUE(
      options.dropout() >= 0.0 && options.dropout() < 1.0,
      layer,
      ": expected dropout in [0, 1), but got dropout=",
      options.dropout());
  TORCH_CHECK_VALUE(
      options.temperature() > 0.0 && std::isfinite(options.temperature()),
      layer,
      ": expected a finite temperature > 0, but got temperature=",
      options.temperature());
  TORCH_CHECK_VALUE(
      !options.alpha().has_value() ||
          (*options.alpha() > 0.0 && std::isfinite(*options.alpha())),
      layer,
      ": expected a finite alpha > 0, but got alpha=",
      options.alpha().value_or(0.0),
      "; use set_scale() to weaken or switch off the update");
  TORCH_CHECK_VALUE(
      !options.dtype().has_value() ||
          !adapter_dtype_name(*options.dtype()).empty(),
      layer,
      ": expected dtype float32, float64, bfloat16 or float16, but got dtype=",
      options.dtype().value_or(torch::kFloat));
}

/// Whether adapters with these options have the same parameters and compute
/// the same function: what a saved adapter must agree on to load. Training
/// settings (dropout), the compute path and the dtype do not count, nor
/// does how the scale is spelled (alpha unset or equal to the rank), nor the
/// temperature of a router that is off.
inline bool same_computation(
    const StyleInjectOptions& a,
    const StyleInjectOptions& b) {
  const double tolerance =
      1e-12 * std::max(std::abs(a.scaling()), std::abs(b.scaling()));
  return a.rank() == b.rank() && a.branches() == b.branches() &&
      a.router() == b.router() && a.gate() == b.gate() &&
      (!a.router() || a.temperature() == b.temperature()) &&
      std::abs(a.scaling() - b.scaling()) <= tolerance;
}

} // namespace detail
} // namespace styleinject
