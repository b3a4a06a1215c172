#pragma once

#include <styleinject/cuda/kernels.h>
#include <styleinject/detail/torch_compat.h>
#include <styleinject/options.h>

#include <torch/autograd.h>
#include <torch/nn/functional/conv.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/functional/linear.h>
#include <torch/types.h>

#include <c10/util/accumulate.h>

#include <array>
#include <string>
#include <utility>
#include <vector>

namespace styleinject {
namespace functional {

/// The tensors of one adapter, under the names of SPEC §5 (shapes here for
/// Linear; Conv2d's are in StyleInjectConv2d). An undefined
/// `router_weight` means router off (every branch weighs 1/n); an undefined
/// `gate` means gate off.
struct AdapterTensors {
  /// (n, r, d_in): the n down-projections.
  torch::Tensor lora_A;
  /// (d_out, r): the shared up-projection.
  torch::Tensor lora_B;
  /// (n, d_in) and (n): the router's logits are `router_weight p + bias`.
  torch::Tensor router_weight;
  torch::Tensor router_bias;
  /// (n, d_out): the gate's per-branch log-gains, `g = tanh(s · gate)`.
  torch::Tensor gate;
};

/// Options for `functional::style_inject_linear` and `style_inject_conv2d`.
/// The modules derive them from their StyleInjectOptions and run-time
/// controls.
///
/// Example:
/// ```
/// namespace SF = styleinject::functional;
/// SF::style_inject_linear(x, w, b, adapter,
///     SF::StyleInjectFuncOptions().scaling(2.0).training(true));
/// ```
struct StyleInjectFuncOptions {
  /// Factor of the low-rank update, `alpha / r` or `alpha / sqrt(r)`.
  /// Default: 1
  TORCH_ARG(double, scaling) = 1.0;
  /// Strength of the whole adapter: multiplies the update and the gate's
  /// logits (inside its tanh, so that 1 + g stays in (0, 2)); 0 gives the
  /// base layer. Default: 1
  TORCH_ARG(double, scale) = 1.0;
  /// Router softmax temperature. Default: 1
  TORCH_ARG(double, temperature) = 1.0;
  /// Dropout probability on the branches' input. Default: 0
  TORCH_ARG(double, dropout) = 0.0;
  /// Dropout is applied only while training. Default: false
  TORCH_ARG(bool, training) = false;
  /// A fixed style, (n) for every instance or (N, n) per instance, that
  /// replaces the router's weights. Its entries must be non-negative; that is
  /// not checked here, to keep the forward free of host reads (the modules
  /// check it once, in set_style). Default: undefined (use the router)
  TORCH_ARG(torch::Tensor, style) = {};
  /// Down-projection compute path. Default: kAuto
  TORCH_ARG(ComputePath, path) = ComputePath::kAuto;
  /// The variance gate (SPEC §3b). kScale uses the adapter's `gate` tensor
  /// and is off where it is undefined; kAdain and kResidual have no
  /// parameters, and neither has kOff: with them `gate` must be undefined.
  /// Default: kScale
  TORCH_ARG(GateMode, gate) = GateMode::kScale;
};

/// One of several adapters that a layer sums (see the overloads of
/// style_inject_linear and style_inject_conv2d that take a list): its
/// tensors and options.
struct AdapterTerm {
  AdapterTensors adapter;
  StyleInjectFuncOptions options;
};

} // namespace functional

namespace detail {

inline constexpr const char* kLinearName = "styleinject::StyleInjectLinear";
inline constexpr const char* kConv2dName = "styleinject::StyleInjectConv2d";

/// SPEC's eps wherever a division by a standard deviation appears.
inline constexpr double kEps = 1e-5;

/// The dtype of per-instance statistics: float32 for half types, the
/// tensor's own dtype otherwise (SPEC: at least float32).
inline torch::ScalarType statistics_dtype(torch::ScalarType dtype) {
  return dtype == torch::kHalf || dtype == torch::kBFloat16 ? torch::kFloat
                                                            : dtype;
}

/// The dtype the adapter's part of the forward runs in: the wider of the
/// input's and the adapter's, so that an adapter kept in float32 on a
/// bfloat16 base computes in float32. Under autocast, the input's: autocast
/// picks each op's dtype itself.
inline torch::ScalarType adapter_dtype(
    const torch::Tensor& input,
    const torch::Tensor& lora_A) {
  return autocast_enabled(input.device().type())
      ? input.scalar_type()
      : at::promote_types(input.scalar_type(), lora_A.scalar_type());
}

/// The mean of `t` over its token dims in `dtype`; 0 where there are no
/// tokens (torch's mean gives NaN there, which would reach the gradients).
/// t: (N, L, C) over {1}, or (N, C, H, W) over {2, 3}
inline torch::Tensor token_mean(
    const torch::Tensor& t,
    torch::IntArrayRef token_dims,
    torch::ScalarType dtype,
    bool keepdim) {
  int64_t tokens = 1;
  for (const auto dim : token_dims) {
    tokens *= t.size(dim);
  }
  return tokens == 0 ? t.sum(token_dims, keepdim, dtype)
                     : t.mean(token_dims, keepdim, dtype);
}

/// Mixes the leading branch axis of `t` with the style weights, in the dtype
/// of `s`.
/// s: (n) or (N, n), t: (n, *) -> (*) or (N, *)
inline torch::Tensor mix_branches(
    const torch::Tensor& s,
    const torch::Tensor& t) {
  const NoAutocast no_autocast;
  auto sizes = t.sizes().slice(1).vec();
  if (s.dim() == 2) {
    sizes.insert(sizes.begin(), s.size(0));
  }
  return torch::matmul(s, t.flatten(1).to(s.scalar_type())).view(sizes);
}

/// Mixes the branch axis `dim` of per-instance outputs with the style
/// weights, in the dtype of `s` (as mix_branches does), back in t's dtype.
/// s: (n) or (N, n), t: (N, ..., n, ...) -> t without axis `dim`
inline torch::Tensor mix_branch_outputs(
    const torch::Tensor& s,
    const torch::Tensor& t,
    int64_t dim) {
  const NoAutocast no_autocast;
  std::vector<int64_t> shape(t.dim(), 1);
  shape[0] = s.dim() == 2 ? s.size(0) : 1;
  shape[dim] = s.size(-1);
  return (t.to(s.scalar_type()) * s.view(shape)).sum(dim).to(t.scalar_type());
}

/// The style weights s of SPEC §1, in float32 or wider: the fixed style if
/// one is given, 1/n per branch with the router off, else the softmax of the
/// router's logits on `pooled`, the per-instance mean of the input over its
/// tokens in the statistics dtype (needed only with the router on).
/// -> (n) shared by all instances, or (N, n)
inline torch::Tensor style_weights(
    const torch::Tensor& x,
    const torch::Tensor& pooled,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
  const NoAutocast no_autocast;
  const auto dtype = statistics_dtype(x.scalar_type());
  if (options.style().defined()) {
    return options.style().to(dtype);
  }
  const int64_t branches = adapter.lora_A.size(0);
  if (!adapter.router_weight.defined()) {
    return torch::full({branches}, 1.0 / branches, x.options().dtype(dtype));
  }
  const auto logits = torch::nn::functional::linear(
      pooled, adapter.router_weight.to(dtype), adapter.router_bias.to(dtype));
  return torch::softmax(logits / options.temperature(), /*dim=*/-1);
}

/// Whether the router reads the input (it is on and no style is fixed).
inline bool routes(
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
  return adapter.router_weight.defined() && !options.style().defined();
}

/// style_weights of x, pooling x over its token dims where the router reads
/// it.
inline torch::Tensor input_style_weights(
    const torch::Tensor& x,
    torch::IntArrayRef token_dims,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
  const NoAutocast no_autocast;
  const auto pooled = routes(adapter, options)
      ? token_mean(x, token_dims, statistics_dtype(x.scalar_type()), false)
      : torch::Tensor();
  return style_weights(x, pooled, adapter, options);
}

/// The down-projection's path (kMerged or kStacked) for `instances`
/// instances of `tokens` tokens each, where the layer is not one fused node.
/// Merging costs n·r·d_in per instance plus L·r·d_in per token row;
/// stacking costs L·n·r·d_in. A shared style needs one matrix in all; an
/// empty batch has no instance to merge for.
inline ComputePath resolve_path(
    ComputePath path,
    const torch::Tensor& s,
    int64_t instances,
    int64_t tokens) {
  const int64_t branches = s.size(-1);
  if (instances == 0) {
    return ComputePath::kStacked;
  }
  if (path == ComputePath::kMergedWeight) {
    return ComputePath::kMerged;
  }
  if (path != ComputePath::kAuto) {
    return path;
  }
  return s.dim() == 1 || branches + tokens < branches * tokens
      ? ComputePath::kMerged
      : ComputePath::kStacked;
}

/// A Linear input as instances and tokens; with no token axis, each row is
/// an instance of one token.
/// input: (d_in) -> (1, 1, d_in); (N, d_in) -> (N, 1, d_in);
///   (..., L, d_in) -> (prod(...), L, d_in)
inline torch::Tensor linear_instances(const torch::Tensor& input) {
  if (input.dim() >= 3) {
    return input.flatten(0, -3);
  }
  return input.dim() == 2 ? input.unsqueeze(1)
                          : input.view({1, 1, input.size(0)});
}

/// The mixed down-projection `sum_i s_i A_i x` of SPEC §2 by either path,
/// in the dtype of x and lora_A.
/// x: (N, L, d_in), lora_A: (n, r, d_in), s: (n) or (N, n) -> (N, L, r)
inline torch::Tensor linear_down_projection(
    const torch::Tensor& x,
    const torch::Tensor& lora_A,
    const torch::Tensor& s,
    ComputePath path) {
  const int64_t instances = x.size(0), tokens = x.size(1);
  const int64_t branches = lora_A.size(0), rank = lora_A.size(1);
  path = resolve_path(path, s, instances, tokens);
  if (path == ComputePath::kMerged) {
    const auto a = mix_branches(s, lora_A).to(lora_A.scalar_type());
    return s.dim() == 1 ? torch::nn::functional::linear(x, a)
                        : torch::bmm(x, a.transpose(1, 2));
  }
  const auto z = torch::nn::functional::linear(x, lora_A.flatten(0, 1))
                     .view({instances, tokens, branches, rank});
  return mix_branch_outputs(s, z, /*dim=*/2);
}

/// SPEC §3's variance gate, `h = u + g ⊙ (u - mean_tok(u))`, as one autograd
/// node. The forward is one fused pass, `u ⊙ (1 + g) - g ⊙ mean_tok(u)`, with
/// the statistics in g's dtype (float32 or wider). For backward it keeps u
/// and g: never its output, which the caller may change in place (an
/// in-place ReLU), and so u costs one tensor of the output's size in u's
/// dtype. The backward is written with differentiable ops on u and g, so
/// that second derivatives (a gradient penalty) are exact.
struct VarianceGate : torch::autograd::Function<VarianceGate> {
  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& u,
      const torch::Tensor& g,
      std::vector<int64_t> token_dims) {
    const NoAutocast no_autocast;
    const auto dtype = g.scalar_type();
    const auto mean = token_mean(u, token_dims, dtype, /*keepdim=*/true);
    ctx->save_for_backward({u, g});
    ctx->saved_data["token_dims"] = std::move(token_dims);
    // At g = 0 this is u exactly: -0 + u·1.
    return torch::addcmul(-(g * mean), u.to(dtype), 1 + g).to(u.scalar_type());
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    const NoAutocast no_autocast;
    const auto saved = ctx->get_saved_variables();
    const auto &u = saved[0], &g = saved[1];
    const auto dims = ctx->saved_data["token_dims"].toIntVector();
    const auto dtype = g.scalar_type();
    const auto grad_h = grads[0].to(dtype);
    torch::Tensor grad_u, grad_g;
    if (ctx->needs_input_grad(0)) {
      // dh_t/du_s = (1 + g) δ_ts - g / L.
      grad_u = torch::addcmul(
                   -g * token_mean(grad_h, dims, dtype, /*keepdim=*/true),
                   grad_h,
                   1 + g)
                   .to(u.scalar_type());
    }
    if (ctx->needs_input_grad(1)) {
      const auto centered =
          u.to(dtype) - token_mean(u, dims, dtype, /*keepdim=*/true);
      grad_g = (grad_h * centered)
                   .sum(dims, /*keepdim=*/true)
                   .sum_to_size(g.sizes());
    }
    return {grad_u, grad_g, torch::Tensor()};
  }
};

/// The gate an adapter applies: options.gate(), where kScale without a
/// `gate` tensor is off.
inline GateMode gate_mode(
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
  return options.gate() == GateMode::kScale && !adapter.gate.defined()
      ? GateMode::kOff
      : options.gate();
}

/// SPEC §3b's parameter-free gates, composed by autograd, on the frozen
/// path's output h0 and the update dh, with statistics over `token_dims` in
/// float32 or wider; the output has h0's dtype. A variance is clamped away
/// from 0 before its square root, so that a constant channel (one token)
/// has a finite gradient; the values move by less than 1e-15.
inline torch::Tensor parameter_free_gate(
    const torch::Tensor& h0,
    const torch::Tensor& dh,
    GateMode mode,
    torch::IntArrayRef token_dims) {
  const NoAutocast no_autocast;
  const auto dtype =
      c10::promoteTypes(statistics_dtype(h0.scalar_type()), dh.scalar_type());
  const auto base = h0.to(dtype), update = dh.to(dtype);
  if (mode == GateMode::kResidual) {
    return (base + (update - update.mean(token_dims, /*keepdim=*/true)))
        .to(h0.scalar_type());
  }
  TORCH_INTERNAL_ASSERT(mode == GateMode::kAdain);
  const auto mean = base.mean(token_dims, /*keepdim=*/true);
  const auto centred = base - mean;
  // The spread over the tokens of t, given t - mean(t) where at hand. On
  // the CPU, ATen's var over the tokens is a Welford loop 10-40x slower
  // than two passes of mean (torch 2.x, one thread); on a GPU it is one
  // kernel.
  const auto spread = [&](const torch::Tensor& t,
                          const torch::Tensor& t_centred = {}) {
    const auto variance = !t.is_cpu()
        ? t.var(token_dims, /*unbiased=*/false, /*keepdim=*/true)
        : (t_centred.defined() ? t_centred
                               : t - t.mean(token_dims, /*keepdim=*/true))
              .square()
              .mean(token_dims, /*keepdim=*/true);
    return variance.clamp_min(1e-30).sqrt() + kEps;
  };
  const auto k = spread(base + update) / spread(base, centred);
  return torch::addcmul(mean, centred, k).to(h0.scalar_type());
}

/// Applies the variance gate; see VarianceGate.
/// u: (N, L, d_out) or (N, C, H, W), g: broadcastable to u's statistics
///   -> u's shape
inline torch::Tensor variance_gate(
    const torch::Tensor& u,
    const torch::Tensor& g,
    torch::IntArrayRef token_dims) {
  return VarianceGate::apply(u, g, token_dims.vec());
}

/// x times a shared or per-instance matrix.
/// x: (N, L, k), m: (k, j) or (N, k, j) -> (N, L, j)
inline torch::Tensor instance_matmul(
    const torch::Tensor& x,
    const torch::Tensor& m) {
  return m.dim() == 2 ? torch::matmul(x, m) : torch::bmm(x, m);
}

/// A linear map with a shared or per-instance weight and bias.
/// x: (N, L, d_in), weight: (d_out, d_in) or (N, d_out, d_in),
///   bias: (d_out), (N, d_out) or undefined -> (N, L, d_out)
inline torch::Tensor instance_linear(
    const torch::Tensor& x,
    const torch::Tensor& weight,
    const torch::Tensor& bias) {
  if (weight.dim() == 2 && (!bias.defined() || bias.dim() == 1)) {
    return torch::nn::functional::linear(x, weight, bias);
  }
  auto out = instance_matmul(x, weight.transpose(-1, -2));
  // In place: a broadcast bias copied into a GEMM's output first is slower.
  return bias.defined() ? out.add_(bias.dim() == 2 ? bias.unsqueeze(1) : bias)
                        : out;
}

/// The scale gate on a linear map whose per-instance token mean is known,
/// `(1 + g) ⊙ (W x + b) − g ⊙ mean_u`, as one GEMM: the weight scaled per
/// output channel, and a bias per instance.
/// x: (N, L, d_in), weight: (d_out, d_in) or (N, d_out, d_in), bias: (d_out)
///   or undefined, g: (d_out) or (N, d_out), mean_u: (N, d_out)
///   -> (N, L, d_out)
inline torch::Tensor gated_linear(
    const torch::Tensor& x,
    const torch::Tensor& weight,
    const torch::Tensor& bias,
    const torch::Tensor& g,
    const torch::Tensor& mean_u) {
  return instance_linear(
      x,
      (1 + g).unsqueeze(-1) * weight,
      bias.defined() ? bias - g * (mean_u - bias) : -g * mean_u);
}

/// Checks the device of an input, and a fixed style if given, against an
/// adapter, and that the gate mode fits the adapter's tensors; `instances`
/// is the input's number of instances.
inline void check_input_against_adapter(
    const char* layer,
    const torch::Tensor& input,
    int64_t instances,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
  TORCH_CHECK_VALUE(
      !adapter.gate.defined() || options.gate() == GateMode::kScale,
      layer,
      ": the adapter has a gate tensor, which only GateMode::kScale uses, "
      "but the gate mode is ",
      gate_mode_name(options.gate()));
  const auto& lora_A = adapter.lora_A;
  TORCH_CHECK(
      input.device() == lora_A.device(),
      layer,
      ": expected input on device ",
      lora_A.device(),
      " (the layer's device), but got input on ",
      input.device());
  const auto& style = options.style();
  if (style.defined()) {
    const int64_t branches = lora_A.size(0);
    TORCH_CHECK_VALUE(
        (style.dim() == 1 && style.size(0) == branches) ||
            (style.dim() == 2 && style.size(0) == instances &&
             style.size(1) == branches),
        layer,
        ": expected a style of shape [",
        branches,
        "] or [",
        instances,
        ", ",
        branches,
        "] (instances, branches), but got ",
        style.sizes());
    TORCH_CHECK_VALUE(
        style.device() == input.device(),
        layer,
        ": expected the style on device ",
        input.device(),
        ", but got it on ",
        style.device());
  }
}

/// Checks that the input has the base weight's dtype. Like torch::nn::Linear,
/// a mismatch is refused rather than cast silently; under autocast the ops
/// cast by autocast's own rules. The adapter may have another dtype.
inline void check_input_dtype(
    const char* layer,
    const torch::Tensor& input,
    const torch::Tensor& weight) {
  TORCH_CHECK_TYPE(
      input.scalar_type() == weight.scalar_type() ||
          autocast_enabled(input.device().type()),
      layer,
      ": expected input of dtype ",
      weight.scalar_type(),
      " (the layer's dtype), but got ",
      input.scalar_type(),
      "; convert the input with .to(), or the layer with ->to()");
}

/// Checks an input, and a fixed style if given, against a Linear adapter.
inline void check_linear_input(
    const torch::Tensor& input,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
  const int64_t in_features = adapter.lora_A.size(2);
  TORCH_CHECK(
      input.dim() >= 1 && input.size(-1) == in_features,
      kLinearName,
      ": expected input of shape (in_features), (N, in_features) or (..., L, "
      "in_features) with in_features=",
      in_features,
      ", but got input of shape ",
      input.sizes());
  const int64_t instances = input.dim() <= 2
      ? input.numel() / in_features
      : c10::multiply_integers(input.sizes().slice(0, input.dim() - 2));
  check_input_against_adapter(kLinearName, input, instances, adapter, options);
}

/// Checks an input, and a fixed style if given, against a Conv2d adapter.
inline void check_conv2d_input(
    const torch::Tensor& input,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
  const int64_t in_channels = adapter.lora_A.size(2);
  TORCH_CHECK(
      input.dim() == 4 && input.size(1) == in_channels,
      kConv2dName,
      ": expected input of shape (N, in_channels, H, W) with in_channels=",
      in_channels,
      ", but got input of shape ",
      input.sizes());
  check_input_against_adapter(
      kConv2dName, input, input.size(0), adapter, options);
}

/// Checks the router and gate of an adapter with `branches` down-projections
/// from `in` features to `out` outputs, named `in_name` and `out_name` in
/// the messages.
inline void check_router_and_gate(
    const char* layer,
    const functional::AdapterTensors& adapter,
    int64_t branches,
    int64_t in,
    int64_t out,
    const char* in_name,
    const char* out_name) {
  const auto& router = adapter.router_weight;
  const auto& router_bias = adapter.router_bias;
  TORCH_CHECK(
      !router.defined() ||
          (router.dim() == 2 && router.size(0) == branches &&
           router.size(1) == in && router_bias.defined() &&
           router_bias.dim() == 1 && router_bias.size(0) == branches),
      layer,
      ": expected router weight (n, ",
      in_name,
      ") = [",
      branches,
      ", ",
      in,
      "] and bias (n), but got ",
      router.sizes(),
      " and ",
      router_bias.defined() ? router_bias.sizes() : torch::IntArrayRef());
  const auto& gate = adapter.gate;
  TORCH_CHECK(
      !gate.defined() ||
          (gate.dim() == 2 && gate.size(0) == branches && gate.size(1) == out),
      layer,
      ": expected gate (n, ",
      out_name,
      ") = [",
      branches,
      ", ",
      out,
      "], but got ",
      gate.sizes());
}

/// Checks that a Linear adapter's tensors fit each other and the base
/// weight.
inline void check_linear_adapter(
    const torch::Tensor& weight,
    const functional::AdapterTensors& adapter) {
  const auto& a = adapter.lora_A;
  const auto& b = adapter.lora_B;
  TORCH_CHECK(
      weight.dim() == 2 && a.dim() == 3 && a.size(2) == weight.size(1) &&
          b.dim() == 2 && b.size(0) == weight.size(0) && b.size(1) == a.size(1),
      kLinearName,
      ": expected weight (d_out, d_in), lora_A (n, r, d_in) and lora_B "
      "(d_out, r), but got weight ",
      weight.sizes(),
      ", lora_A ",
      a.sizes(),
      ", lora_B ",
      b.sizes());
  check_router_and_gate(
      kLinearName, adapter, a.size(0), a.size(2), b.size(0), "d_in", "d_out");
}

/// Checks that a Conv2d adapter's tensors fit each other and the base
/// weight, and that the convolution is one the adapter supports.
inline void check_conv2d_adapter(
    const torch::Tensor& weight,
    const functional::AdapterTensors& adapter,
    const torch::nn::functional::Conv2dFuncOptions& conv) {
  const auto& a = adapter.lora_A;
  const auto& b = adapter.lora_B;
  TORCH_CHECK(
      weight.dim() == 4 && a.dim() == 5 && a.size(2) == weight.size(1) &&
          a.size(3) == weight.size(2) && a.size(4) == weight.size(3) &&
          b.dim() == 4 && b.size(0) == weight.size(0) &&
          b.size(1) == a.size(1) && b.size(2) == 1 && b.size(3) == 1,
      kConv2dName,
      ": expected weight (C_out, C_in, kH, kW), lora_A (n, r, C_in, kH, kW) "
      "and lora_B (C_out, r, 1, 1), but got weight ",
      weight.sizes(),
      ", lora_A ",
      a.sizes(),
      ", lora_B ",
      b.sizes());
  TORCH_CHECK_VALUE(
      conv.groups() == 1,
      kConv2dName,
      ": expected groups=1 (an adapter on a grouped convolution is not "
      "supported), but got groups=",
      conv.groups());
  check_router_and_gate(
      kConv2dName, adapter, a.size(0), a.size(2), b.size(0), "C_in", "C_out");
}

/// The convolution `conv` describes, with another weight, no bias and
/// `groups` groups.
inline torch::nn::functional::Conv2dFuncOptions conv2d_geometry(
    const torch::nn::functional::Conv2dFuncOptions& conv,
    int64_t groups) {
  return torch::nn::functional::Conv2dFuncOptions()
      .stride(conv.stride())
      .padding(conv.padding())
      .dilation(conv.dilation())
      .groups(groups);
}

/// The gradients, given `grad` at its output, of what `recompute` makes of
/// the first N saved inputs, by autograd once more: on views of those
/// inputs, at which the gradients stop (the engine carries them further
/// itself), so that with create_graph they differentiate again. Into
/// `result` at the wanted inputs' positions. The backward of a node that
/// keeps less than autograd would, or whose own backward is first-order.
template <size_t N, typename Recompute>
void recomputed_gradients(
    const torch::autograd::variable_list& saved,
    const std::array<bool, N>& wanted,
    const torch::Tensor& grad,
    bool create_graph,
    const Recompute& recompute,
    torch::autograd::variable_list& result) {
  const torch::AutoGradMode enable_grad(true);
  std::array<torch::Tensor, N> inputs;
  std::vector<torch::Tensor> wrt;
  std::vector<size_t> positions;
  for (size_t i = 0; i < N; ++i) {
    inputs[i] = saved[i].defined() ? saved[i].view_as(saved[i]) : saved[i];
    if (wanted[i]) {
      wrt.push_back(inputs[i]);
      positions.push_back(i);
    }
  }
  const auto found = torch::autograd::grad(
      {recompute(inputs)}, wrt, {grad}, create_graph, create_graph);
  for (size_t k = 0; k < wrt.size(); ++k) {
    result[positions[k]] = found[k];
  }
}

/// A convolution's geometry, kept for a backward that runs it again.
struct ConvGeometryHolder : torch::CustomClassHolder {
  explicit ConvGeometryHolder(torch::nn::functional::Conv2dFuncOptions conv)
      : conv(std::move(conv)) {}
  torch::nn::functional::Conv2dFuncOptions conv;
};

/// `F::conv2d(x.to(kernel's dtype), kernel, conv)` that keeps x itself for
/// backward, not the wider copy that the convolution would keep: for a
/// float32 adapter on a bfloat16 base, nothing new (x is the layer's
/// input) instead of twice x's bytes. Backward makes the copy and the
/// low-rank convolution again (r channels out, against the base's C_out)
/// and differentiates them, so second derivatives hold.
struct WidenedConv2d : torch::autograd::Function<WidenedConv2d> {
  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& x,
      const torch::Tensor& kernel,
      const torch::nn::functional::Conv2dFuncOptions& conv) {
    ctx->save_for_backward({x, kernel});
    ctx->saved_data["conv"] = c10::IValue::make_capsule(
        c10::make_intrusive<ConvGeometryHolder>(conv));
    return torch::nn::functional::conv2d(
        x.to(kernel.scalar_type()), kernel, conv);
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    const auto& conv = c10::static_intrusive_pointer_cast<ConvGeometryHolder>(
                           ctx->saved_data["conv"].toCapsule())
                           ->conv;
    torch::autograd::variable_list result(3);
    recomputed_gradients<2>(
        ctx->get_saved_variables(),
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1)},
        grads[0],
        /*create_graph=*/torch::GradMode::is_enabled(),
        [&](const std::array<torch::Tensor, 2>& inputs) {
          return torch::nn::functional::conv2d(
              inputs[0].to(inputs[1].scalar_type()), inputs[1], conv);
        },
        result);
    return result;
  }
};

/// `F::conv2d(x.to(kernel's dtype), kernel, conv)`, through WidenedConv2d
/// where that widens x and a backward may follow.
inline torch::Tensor widened_conv2d(
    const torch::Tensor& x,
    const torch::Tensor& kernel,
    const torch::nn::functional::Conv2dFuncOptions& conv) {
  if (x.scalar_type() == kernel.scalar_type() ||
      !torch::GradMode::is_enabled()) {
    return torch::nn::functional::conv2d(
        x.to(kernel.scalar_type()), kernel, conv);
  }
  return WidenedConv2d::apply(x, kernel, conv);
}

/// The mixed down-projection `sum_i s_i A_i * x` of SPEC §2 for Conv2d, by
/// either path, in lora_A's dtype (x's may be narrower: widened_conv2d keeps
/// x, not its wider copy, for backward): merged kernels per instance
/// through one grouped convolution, or all n·r kernels as one convolution,
/// then mixing.
/// x: (N, C_in, H, W), lora_A: (n, r, C_in, kH, kW), s: (n) or (N, n)
///   -> (N, r, H', W')
inline torch::Tensor conv2d_down_projection(
    const torch::Tensor& x,
    const torch::Tensor& lora_A,
    const torch::Tensor& s,
    const torch::nn::functional::Conv2dFuncOptions& conv,
    ComputePath path) {
  const int64_t instances = x.size(0), channels = x.size(1);
  const int64_t branches = lora_A.size(0), rank = lora_A.size(1);
  // A kernel per instance runs as a grouped convolution, whose backward
  // oneDNN runs far below a dense one's speed (measured on SD 1.5's 3×3
  // 320-channel ResBlock convolution at 64×64: a train step 15-25 % slower
  // than stacking). So kAuto stacks unless one kernel serves all instances.
  path = path == ComputePath::kAuto && s.dim() == 2
      ? ComputePath::kStacked
      : resolve_path(path, s, instances, x.size(2) * x.size(3));
  if (path == ComputePath::kMerged) {
    const auto a = mix_branches(s, lora_A).to(lora_A.scalar_type());
    if (s.dim() == 1) {
      return widened_conv2d(x, a, conv2d_geometry(conv, 1));
    }
    // Instance i is group i: its channels meet only its own kernels.
    const auto z = widened_conv2d(
        x.reshape({1, instances * channels, x.size(2), x.size(3)}),
        a.flatten(0, 1),
        conv2d_geometry(conv, instances));
    return z.view({instances, rank, z.size(2), z.size(3)});
  }
  const auto z =
      widened_conv2d(x, lora_A.flatten(0, 1), conv2d_geometry(conv, 1));
  return mix_branch_outputs(
      s,
      z.view({instances, branches, rank, z.size(2), z.size(3)}),
      /*dim=*/1);
}

/// The update that an adapter with one style for all instances adds to the
/// base weight, `factor·B·(s·A)`, in s's dtype: a (d_out, d_in) matrix for
/// Linear; for Conv2d the composed kernel (C_out, C_in, kH, kW), exact
/// because B is a 1×1 convolution applied after A's k×k one.
/// s: (n), lora_A: (n, r, ...), lora_B: (d_out, r[, 1, 1]) -> (d_out, ...)
inline torch::Tensor weight_update(
    const torch::Tensor& s,
    const torch::Tensor& lora_A,
    const torch::Tensor& lora_B,
    double factor) {
  const auto a = mix_branches(s, lora_A); // (r, ...)
  auto sizes = a.sizes().vec();
  sizes[0] = lora_B.size(0);
  const auto b = lora_B.flatten(1).to(s.scalar_type());
  return torch::mm(b, a.flatten(1)).mul_(factor).view(sizes);
}

/// Dropout on the branches' input while training, as LoRA applies it.
inline torch::Tensor branch_input(
    const torch::Tensor& x,
    const functional::StyleInjectFuncOptions& options) {
  if (!options.training() || options.dropout() == 0.0) {
    return x;
  }
  return torch::nn::functional::dropout(
      x,
      torch::nn::functional::DropoutFuncOptions()
          .p(options.dropout())
          .training(true));
}

/// The gate factor of SPEC §3, `g = tanh(scale · s · gate)`, in s's dtype.
/// The strength `scale` acts inside the tanh, so that the factor 1 + g stays
/// in (0, 2) at any strength.
/// s: (n) or (N, n), gate: (n, d_out) -> (d_out) or (N, d_out)
inline torch::Tensor gate_factor(
    const torch::Tensor& s,
    const torch::Tensor& gate,
    double scale) {
  const NoAutocast no_autocast;
  return torch::tanh(mix_branches(s, gate) * scale);
}

/// One adapter's down-projection on x (SPEC §1–2): its style weights s and
/// `z = sum_i s_i A_i dropout(x)`, in the adapter's dtype.
struct DownProjection {
  torch::Tensor s, z;
};

/// x: (N, L, d_in) -> s: (n) or (N, n), z: (N, L, r)
inline DownProjection linear_down(
    const torch::Tensor& x,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
  const auto s = input_style_weights(x, /*token_dims=*/{1}, adapter, options);
  const auto dtype = adapter_dtype(x, adapter.lora_A);
  return {
      s,
      linear_down_projection(
          branch_input(x, options).to(dtype),
          adapter.lora_A.to(dtype),
          s,
          options.path())};
}

/// The gate factors of two kScale gates applied one after the other, as
/// one: (1 + a)(1 + b) = 1 + (a + b + a·b). Each keeps the token mean and
/// scales the spread around it, so the order does not matter.
inline torch::Tensor combined_gate(
    const torch::Tensor& a,
    const torch::Tensor& b) {
  return a.defined() ? a + b + a * b : b;
}

/// The widest dtype that the adapters' parts of the forward run in.
inline torch::ScalarType summed_dtype(
    const torch::Tensor& x,
    const std::vector<functional::AdapterTerm>& adapters) {
  auto dtype = adapter_dtype(x, adapters.front().adapter.lora_A);
  for (const auto& term : adapters) {
    dtype = at::promote_types(dtype, adapter_dtype(x, term.adapter.lora_A));
  }
  return dtype;
}

/// Base and adapters as autograd composes them from SPEC's formula, for
/// kScale and off gates: each adapter's up-projection accumulates onto the
/// base's output inside its GEMM (beta = 1), in the adapters' widest dtype,
/// rounded once to the base's; then the gates, combined (combined_gate),
/// where there is a token axis.
/// x: (N, L, d_in) -> (N, L, d_out)
inline torch::Tensor summed_linear(
    const torch::Tensor& x,
    const torch::Tensor& weight,
    const torch::Tensor& bias,
    const std::vector<functional::AdapterTerm>& adapters,
    bool tokens) {
  const auto base = torch::nn::functional::linear(x, weight, bias);
  const auto dtype = summed_dtype(x, adapters);
  auto h = base.view({-1, base.size(-1)}).to(dtype);
  torch::Tensor g;
  for (const auto& term : adapters) {
    const auto down = linear_down(x, term.adapter, term.options);
    h = torch::addmm(
        h,
        down.z.reshape({-1, down.z.size(-1)}).to(dtype),
        term.adapter.lora_B.to(dtype).t(),
        /*beta=*/1,
        /*alpha=*/term.options.scaling() * term.options.scale());
    if (tokens && gate_mode(term.adapter, term.options) == GateMode::kScale) {
      g = combined_gate(
          g, gate_factor(down.s, term.adapter.gate, term.options.scale()));
    }
  }
  h = h.to(base.scalar_type()).view(base.sizes());
  return g.defined() ? variance_gate(h, g.dim() == 2 ? g.unsqueeze(1) : g, {1})
                     : h;
}

/// style_inject_linear as autograd composes it from SPEC's formula. It runs
/// where FusedLinear does not (a base that trains, an adapter in another
/// dtype than the statistics', autocast, dropout, no token axis, a
/// parameter-free gate), and for second derivatives.
/// x: (N, L, d_in) -> (N, L, d_out)
inline torch::Tensor composite_linear(
    const torch::Tensor& x,
    const torch::Tensor& weight,
    const torch::Tensor& bias,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options,
    bool tokens) {
  const auto gate = tokens ? gate_mode(adapter, options) : GateMode::kOff;
  if (!parameter_free(gate)) {
    return summed_linear(x, weight, bias, {{adapter, options}}, tokens);
  }
  const auto down = linear_down(x, adapter, options);
  const auto dh =
      torch::matmul(down.z, adapter.lora_B.to(down.z.scalar_type()).t()) *
      (options.scaling() * options.scale());
  return parameter_free_gate(
      torch::nn::functional::linear(x, weight, bias), dh, gate, {1});
}

/// One adapter's down-projection on a Conv2d input, as linear_down.
/// input: (N, C_in, H, W) -> s: (n) or (N, n), z: (N, r, H', W')
inline DownProjection conv2d_down(
    const torch::Tensor& input,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options,
    const torch::nn::functional::Conv2dFuncOptions& conv) {
  const auto s =
      input_style_weights(input, /*token_dims=*/{2, 3}, adapter, options);
  const auto dtype = adapter_dtype(input, adapter.lora_A);
  return {
      s,
      conv2d_down_projection(
          branch_input(input, options),
          adapter.lora_A.to(dtype),
          s,
          conv,
          options.path())};
}

/// The 1×1 up-projection as one matrix per instance, for a batched GEMM.
/// lora_B: (C_out, r, 1, 1) -> (N, C_out, r)
inline torch::Tensor conv2d_up(const torch::Tensor& lora_B, int64_t instances) {
  const int64_t channels = lora_B.size(0), rank = lora_B.size(1);
  return lora_B.view({1, channels, rank}).expand({instances, channels, rank});
}

/// summed_linear for Conv2d: the up-projections accumulate onto the base's
/// output inside batched GEMMs, the gates' statistics are over H'×W'.
/// input: (N, C_in, H, W) -> (N, C_out, H', W')
inline torch::Tensor summed_conv2d(
    const torch::Tensor& input,
    const torch::Tensor& weight,
    const torch::nn::functional::Conv2dFuncOptions& conv,
    const std::vector<functional::AdapterTerm>& adapters) {
  const auto base = torch::nn::functional::conv2d(input, weight, conv);
  const int64_t instances = base.size(0), channels = base.size(1);
  const int64_t positions = base.size(2) * base.size(3);
  const auto dtype = summed_dtype(input, adapters);
  auto h = base.view({instances, channels, positions}).to(dtype);
  torch::Tensor g;
  for (const auto& term : adapters) {
    const auto down = conv2d_down(input, term.adapter, term.options, conv);
    h = torch::baddbmm(
        h,
        conv2d_up(term.adapter.lora_B.to(dtype), instances),
        down.z.reshape({instances, down.z.size(1), positions}).to(dtype),
        /*beta=*/1,
        /*alpha=*/term.options.scaling() * term.options.scale());
    if (gate_mode(term.adapter, term.options) == GateMode::kScale) {
      g = combined_gate(
          g, gate_factor(down.s, term.adapter.gate, term.options.scale()));
    }
  }
  h = h.to(base.scalar_type()).view(base.sizes());
  return g.defined()
      ? variance_gate(
            h, g.view({g.dim() == 2 ? instances : 1, channels, 1, 1}), {2, 3})
      : h;
}

/// Refuses a parameter-free gate in a sum of adapters.
inline void check_summable(
    const char* layer,
    const functional::AdapterTerm& term) {
  const auto gate = gate_mode(term.adapter, term.options);
  TORCH_CHECK_VALUE(
      !parameter_free(gate),
      layer,
      ": expected gate=scale or gate=off for each of several adapters, but "
      "one has gate=",
      gate_mode_name(gate),
      ", which reads the frozen output and its own update apart; it takes "
      "one adapter alone");
}

/// A Linear output (N, L, d_out) in the shape of its input's instances.
inline torch::Tensor linear_output(
    const torch::Tensor& input,
    const torch::Tensor& weight,
    const torch::Tensor& h) {
  if (input.dim() == 3) {
    return h;
  }
  auto sizes = input.sizes().vec();
  sizes.back() = weight.size(0);
  return h.view(sizes);
}

/// Sets a thread's flag while it lives, then gives the flag back the value
/// it had: the guards SkipInit and RecomputeGate.
class ScopedFlag {
 public:
  explicit ScopedFlag(bool& flag) : flag_(flag), previous_(flag) {
    flag_ = true;
  }
  ~ScopedFlag() {
    flag_ = previous_;
  }
  ScopedFlag(const ScopedFlag&) = delete;
  ScopedFlag& operator=(const ScopedFlag&) = delete;

 private:
  bool& flag_;
  bool previous_;
};

/// Whether gated Linear layers on this thread recompute u in backward
/// instead of keeping it (see RecomputeGate).
inline bool& recompute_gate() {
  static thread_local bool on = false;
  return on;
}

/// `write(out)`'s result, an element-wise op on tensors like `like`, in
/// `dtype`, rounded once. CUDA's kernels write another dtype than they
/// compute in, so there `out` has `dtype` and no copy is made; LibTorch
/// 1.13's CPU kernels cannot, so there the result is converted after.
template <typename Write>
torch::Tensor written_in(
    torch::ScalarType dtype,
    const torch::Tensor& like,
    const Write& write) {
  const bool direct = like.scalar_type() == dtype || like.is_cuda();
  auto out = torch::empty_like(
      like, like.options().dtype(direct ? dtype : like.scalar_type()));
  return write(out).to(dtype);
}

/// How FusedLinear computes u = W0 x + b0 + c·B (a x).
enum class FusedForm {
  /// One GEMM with the weight W0 + c·B·a, shared or per instance.
  kWeight,
  /// The base's GEMM, then the low-rank update added in place.
  kLowRank,
};

/// What FusedLinear takes besides tensors.
struct FusedSettings {
  functional::StyleInjectFuncOptions options;
  FusedForm form;
  /// Whether a backward may follow: grad mode is on and an input requires
  /// grad. Without one, the kWeight form folds the gate into its GEMM too.
  bool differentiable;
  /// Whether a gated backward makes u again rather than keep it.
  bool recompute_u = false;
  /// Whether the backward uses the library's CUDA kernels (CudaKernels).
  bool kernels = false;
};

/// StyleInjectLinear's forward for a frozen base as one autograd node, with
/// its backward written out. The router and the gate factor (small tensors)
/// give `a = s · A` (shared (r, d_in) or per instance (N, r, d_in)) and g;
/// then `u = W0 x + b0 + c·B (a x)` and
/// `h = (1 + g) ⊙ u − g ⊙ mean_tok(u)`, where mean_tok(u) follows from
/// mean_tok(x) with no pass over u, as u is linear in x. A gate that trains
/// needs u in backward, which is kept in x's dtype (less its token mean
/// where that dtype is narrower than the adapter's). The
/// backward is a few GEMMs and reductions over the activations, then the
/// small tensors' own (the router's share of the input's gradient joins it
/// without a pass of its own); second derivatives go through autograd on
/// composite_linear. A float32 adapter on a bfloat16 or float16 base (SPEC
/// §7's usual recipe): the base's GEMMs run in its dtype, the rest in
/// float32, and the output is rounded once.
/// x: (N, L, d_in) with N, L > 0 -> (N, L, d_out)
struct FusedLinear : torch::autograd::Function<FusedLinear> {
  // The tensors' positions among forward's arguments.
  enum Input { kX, kA, kB, kRouterWeight, kRouterBias, kGate, kWeight, kBias };
  static constexpr size_t kInputs = 8;

  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& x,
      const torch::Tensor& lora_A,
      const torch::Tensor& lora_B,
      // Optional: LibTorch 1.13's autograd takes no undefined tensor input.
      const c10::optional<torch::Tensor>& router_weight,
      const c10::optional<torch::Tensor>& router_bias,
      const c10::optional<torch::Tensor>& gate,
      const torch::Tensor& weight,
      const c10::optional<torch::Tensor>& bias_or_none,
      const FusedSettings& settings) {
    const auto& options = settings.options;
    const functional::AdapterTensors adapter{
        lora_A,
        lora_B,
        router_weight.value_or(torch::Tensor()),
        router_bias.value_or(torch::Tensor()),
        gate.value_or(torch::Tensor())};
    const auto bias = bias_or_none.value_or(torch::Tensor());
    // The adapter's part runs in its own dtype: x's, or float32 on a
    // half-precision base (fuses).
    const auto dtype = lora_A.scalar_type();
    const auto pooled = routes(adapter, options) || adapter.gate.defined()
        ? x.mean(1, /*keepdim=*/false, dtype)
        : torch::Tensor();
    const auto mixed = mixing(x, pooled, adapter, options, settings.kernels);
    const auto &a = mixed.a, &g = mixed.g;
    const double scaling = options.scaling() * options.scale();
    const auto mean_u = g.defined()
        ? update_mean(pooled, a, lora_B, weight, bias, scaling)
        : torch::Tensor();
    torch::Tensor merged, z, u;
    if (settings.form == FusedForm::kWeight) {
      merged = merged_weight(weight, a, lora_B, scaling);
      if (g.defined() && !settings.differentiable) {
        return gated_linear(x, merged, bias, g, mean_u);
      }
      u = instance_linear(x, merged, bias);
    } else {
      z = instance_matmul(x.to(dtype), a.transpose(-1, -2));
      u = low_rank_output(x, weight, bias, z, lora_B, scaling);
    }
    const bool keep_u =
        settings.differentiable && g.defined() && !settings.recompute_u;
    // For the gate's gradient, u in x's dtype; where that rounds it (a
    // half-precision base), less its token mean first, so that the rounding
    // keeps the spread's precision however large the mean.
    const bool centered = keep_u && dtype != x.scalar_type();
    const auto kept = !centered
        ? (keep_u ? u : torch::Tensor())
        : written_in(x.scalar_type(), u, [&](torch::Tensor& out) {
            return torch::sub_out(out, u, mean_u.unsqueeze(1));
          });
    ctx->save_for_backward(
        {x,
         lora_A,
         lora_B,
         adapter.router_weight,
         adapter.router_bias,
         adapter.gate,
         weight,
         bias,
         options.style(),
         pooled,
         a,
         g,
         mean_u,
         z,
         kept,
         mixed.s});
    ctx->saved_data["merged_weight"] = settings.form == FusedForm::kWeight;
    ctx->saved_data["centered"] = centered;
    ctx->saved_data["kernels"] = settings.kernels;
    ctx->saved_data["scaling"] = options.scaling();
    ctx->saved_data["scale"] = options.scale();
    ctx->saved_data["temperature"] = options.temperature();
    if (!g.defined()) {
      return u.to(x.scalar_type());
    }
    return written_in(x.scalar_type(), u, [&](torch::Tensor& out) {
      return torch::addcmul_out(
          out, -(g * mean_u).unsqueeze(1), u, (1 + g).unsqueeze(-2));
    });
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto options =
        functional::StyleInjectFuncOptions()
            .scaling(ctx->saved_data["scaling"].toDouble())
            .scale(ctx->saved_data["scale"].toDouble())
            .temperature(ctx->saved_data["temperature"].toDouble())
            .style(saved[8]);
    // Which inputs want a gradient; edges count the defined tensors only.
    std::array<bool, kInputs> wanted{};
    for (size_t i = 0, edge = 0; i < kInputs; ++i) {
      if (saved[i].defined()) {
        wanted[i] = ctx->needs_input_grad(edge++);
      }
    }
    torch::autograd::variable_list result(kInputs + 1);
    if (torch::GradMode::is_enabled()) {
      second_order_backward(saved, options, grads[0], wanted, result);
      return result;
    }
    first_order_backward(
        saved,
        options,
        {ctx->saved_data["merged_weight"].toBool(),
         ctx->saved_data["centered"].toBool(),
         ctx->saved_data["kernels"].toBool()},
        grads[0],
        wanted,
        result);
    return result;
  }

 private:
  /// The adapter's tensors among the saved ones.
  static functional::AdapterTensors adapter_of(
      const torch::autograd::variable_list& saved) {
    return {
        saved[kA],
        saved[kB],
        saved[kRouterWeight],
        saved[kRouterBias],
        saved[kGate]};
  }

  /// What the router and the gate give: s, a = s · A and g.
  struct Mixing {
    torch::Tensor s, a, g;
  };

  /// s, a and g: in one launch of the library's kernel where it serves
  /// (the router reads the input), else by ATen's ops.
  static Mixing mixing(
      const torch::Tensor& x,
      const torch::Tensor& pooled,
      const functional::AdapterTensors& adapter,
      const functional::StyleInjectFuncOptions& options,
      bool kernels) {
    if (kernels && routes(adapter, options) &&
        adapter.lora_A.size(0) <= cuda::detail::kMaxBranches) {
      const auto mixed = cuda::detail::route_and_mix(
          pooled,
          adapter.router_weight,
          adapter.router_bias,
          adapter.lora_A,
          adapter.gate,
          options.temperature(),
          options.scale());
      return {mixed.s, mixed.a, mixed.g};
    }
    const auto s = style_weights(x, pooled, adapter, options);
    return {
        s,
        mix_branches(s, adapter.lora_A).to(adapter.lora_A.scalar_type()),
        adapter.gate.defined() ? gate_factor(s, adapter.gate, options.scale())
                               : torch::Tensor()};
  }

  /// mean_tok(u) = W0 mean_tok(x) + b0 + c·B (a mean_tok(x)), in the
  /// adapter's dtype. -> (N, d_out)
  static torch::Tensor update_mean(
      const torch::Tensor& pooled,
      const torch::Tensor& a,
      const torch::Tensor& lora_B,
      const torch::Tensor& weight,
      const torch::Tensor& bias,
      double scaling) {
    const auto dtype = pooled.scalar_type();
    return torch::addmm(
        torch::nn::functional::linear(
            pooled, weight.to(dtype), bias.defined() ? bias.to(dtype) : bias),
        instance_vector(pooled, a.transpose(-1, -2)), // a mean_tok(x)
        lora_B.t(),
        1,
        scaling);
  }

  /// u = W0 x + b0 + c·B z, from the low-rank activations z = a x: the
  /// base's GEMM in its dtype, the update added in z's.
  static torch::Tensor low_rank_output(
      const torch::Tensor& x,
      const torch::Tensor& weight,
      const torch::Tensor& bias,
      const torch::Tensor& z,
      const torch::Tensor& lora_B,
      double scaling) {
    auto u = torch::nn::functional::linear(x, weight, bias).to(z.scalar_type());
    u.view({-1, u.size(-1)})
        .addmm_(z.view({-1, z.size(-1)}), lora_B.t(), 1, scaling);
    return u;
  }

  /// u once more, for a backward whose forward did not keep it
  /// (RecomputeGate): the forward's GEMM again.
  static torch::Tensor recomputed_u(
      const torch::autograd::variable_list& saved,
      bool merged_form,
      double scaling) {
    const auto &x = saved[kX], &lora_B = saved[kB], &weight = saved[kWeight];
    const auto &bias = saved[kBias], &a = saved[10], &z = saved[13];
    return merged_form
        ? instance_linear(x, merged_weight(weight, a, lora_B, scaling), bias)
        : low_rank_output(x, weight, bias, z, lora_B, scaling);
  }

  /// W0 + c·B·a, shared or per instance.
  static torch::Tensor merged_weight(
      const torch::Tensor& weight,
      const torch::Tensor& a,
      const torch::Tensor& lora_B,
      double scaling) {
    return a.dim() == 2
        ? torch::addmm(weight, lora_B, a, 1, scaling)
        : torch::baddbmm(
              weight, lora_B.expand({a.size(0), -1, -1}), a, 1, scaling);
  }

  /// How the forward ran, as far as its backward needs to know.
  struct Run {
    bool merged_form;
    /// Whether the forward kept u less its token mean.
    bool centered;
    /// FusedSettings::kernels.
    bool kernels;
  };

  /// The gradients of a first backward. With δ = (1 + g) ⊙ grad −
  /// g ⊙ mean_tok(grad), the gradient at u, every big term is a GEMM or a
  /// reduction on grad itself; δ is written out only for the low-rank
  /// input gradient.
  static void first_order_backward(
      const torch::autograd::variable_list& saved,
      const functional::StyleInjectFuncOptions& options,
      const Run& run,
      const torch::Tensor& grad_h,
      const std::array<bool, kInputs>& wanted,
      torch::autograd::variable_list& result) {
    const auto &x = saved[0], &lora_B = saved[2], &weight = saved[6];
    const auto &pooled = saved[9], &a = saved[10], &g = saved[11];
    const auto& mean_u = saved[12];
    const double scaling = options.scaling() * options.scale();
    // u, or u − mean_u where the forward kept it centred.
    const auto u = g.defined() && !saved[14].defined()
        ? recomputed_u(saved, run.merged_form, scaling)
        : saved[14];
    // The adapter's part runs in its dtype, x's or wider; so does the
    // gradient until it reaches the base's GEMM.
    const auto dtype = a.scalar_type();
    const auto grad = grad_h.to(dtype).contiguous();
    const auto x_wide = x.to(dtype);
    const int64_t tokens = x.size(1);
    // The merged weight is formed again, not kept (it is W0's size): where
    // it serves more token rows than it has output rows, that costs less
    // than the low-rank form's extra pass over the input's gradient.
    const int64_t rows = a.dim() == 2 ? x.size(0) * tokens : tokens;
    const auto merged = run.merged_form && wanted[kX] && rows >= weight.size(0)
        ? merged_weight(weight, a, lora_B, scaling)
        : torch::Tensor();
    torch::Tensor shift, gain, grad_g;
    if (g.defined()) {
      // shift = g ⊙ mean_tok(grad), and sum_t grad ⊙ (u − mean_u).
      const auto sums = token_sums(grad, u, run.kernels);
      shift = g * sums.first / tokens;
      gain = (1 + g).unsqueeze(-1);
      if (sums.second.defined()) {
        grad_g =
            (run.centered ? sums.second : sums.second - sums.first * mean_u)
                .sum_to_size(g.sizes());
      }
    }
    // δ B, (N, L, r): the gradient at the low-rank activations z = a x.
    auto grad_z = instance_matmul(grad, g.defined() ? gain * lora_B : lora_B);
    if (g.defined()) {
      grad_z.sub_(torch::mm(shift, lora_B).unsqueeze(1));
    }
    const bool routed = routes(adapter_of(saved), options);
    const bool router_wanted = wanted[kRouterWeight] || wanted[kRouterBias];
    const auto grad_a = wanted[kA] || (routed && (wanted[kX] || router_wanted))
        ? (scaling * torch::bmm(grad_z.transpose(1, 2), x_wide))
              .sum_to_size(a.sizes())
        : torch::Tensor();
    if (wanted[kB]) {
      const auto z = saved[13].defined()
          ? saved[13]
          : instance_matmul(x_wide, a.transpose(-1, -2));
      auto grad_zt = torch::bmm(grad.transpose(1, 2), z); // (N, d_out, r)
      if (g.defined()) {
        const auto z_sum =
            tokens * instance_vector(pooled, a.transpose(-1, -2));
        grad_zt = gain * grad_zt - shift.unsqueeze(-1) * z_sum.unsqueeze(1);
      }
      result[kB] = scaling * grad_zt.sum(0);
    }
    // The router's and the gate's parameters, and the router's share of
    // x's gradient.
    const auto grad_pooled = mixing_backward(
        saved, options, grad_a, grad_g, wanted, run.kernels, result);
    if (wanted[kX]) {
      result[kX] = merged.defined()
          ? input_grad_merged(grad, gain, shift, merged)
          : input_grad_low_rank(grad, gain, shift, grad_z, weight, a, scaling);
      if (grad_pooled.defined()) {
        // The router's share: every token of an instance takes it.
        result[kX].add_((grad_pooled / tokens).unsqueeze(1));
      }
      result[kX] = result[kX].to(x.scalar_type());
    }
  }

  /// Sums over the tokens, of t and of t ⊙ u, (N, C) each, in t's dtype, from
  /// (N, L, C): in chunks of tokens that stay in cache, as a product of the
  /// full size would cost an allocation and a pass through memory; or by
  /// the library's CUDA kernel, in one pass.
  static std::pair<torch::Tensor, torch::Tensor> token_sums(
      const torch::Tensor& t,
      const torch::Tensor& u,
      bool kernels) {
    if (!u.defined()) {
      return {t.sum(1), torch::Tensor()};
    }
    if (kernels) {
      return cuda::detail::token_sums(t, u);
    }
    const int64_t tokens = t.size(1);
    const int64_t chunk = t.is_cuda()
        ? tokens
        : std::max<int64_t>(1, (int64_t{1} << 17) / (t.size(0) * t.size(2)));
    torch::Tensor sum, dot;
    for (int64_t start = 0; start < tokens; start += chunk) {
      const auto part = t.narrow(1, start, std::min(chunk, tokens - start));
      const auto product = part * u.narrow(1, start, part.size(1));
      sum = sum.defined() ? sum.add_(part.sum(1)) : part.sum(1);
      dot = dot.defined() ? dot.add_(product.sum(1)) : product.sum(1);
    }
    return {sum, dot};
  }

  /// v · m per instance: v (N, k), m (k, j) or (N, k, j) -> (N, j)
  static torch::Tensor instance_vector(
      const torch::Tensor& v,
      const torch::Tensor& m) {
    return instance_matmul(v.unsqueeze(1), m).squeeze(1);
  }

  /// δ W with the merged weight W, δ = (1 + g) ⊙ grad − shift: as
  /// grad ((1 + g) ⊙ W) less the shift's vector, so that δ is never
  /// written out.
  static torch::Tensor input_grad_merged(
      const torch::Tensor& grad,
      const torch::Tensor& gain,
      const torch::Tensor& shift,
      const torch::Tensor& merged) {
    if (!gain.defined()) {
      return instance_matmul(grad, merged);
    }
    return instance_matmul(grad, gain * merged)
        .sub_(instance_vector(shift, merged).unsqueeze(1));
  }

  /// δ W0 + c (δ B) a, δ = (1 + g) ⊙ grad − shift, in grad's dtype: δ
  /// written out for the base's GEMM (in the base's dtype), δ B given.
  static torch::Tensor input_grad_low_rank(
      const torch::Tensor& grad,
      const torch::Tensor& gain,
      const torch::Tensor& shift,
      const torch::Tensor& grad_z,
      const torch::Tensor& weight,
      const torch::Tensor& a,
      double scaling) {
    const auto delta = gain.defined()
        ? torch::addcmul(-shift.unsqueeze(1), grad, gain.transpose(-1, -2))
        : grad;
    auto grad_x = torch::matmul(delta.to(weight.scalar_type()), weight)
                      .to(grad.scalar_type());
    grad_x.baddbmm_(
        grad_z, a.expand({grad.size(0), a.size(-2), a.size(-1)}), 1, scaling);
    return grad_x;
  }

  /// The small tensors' backward, written out: from the gradients at
  /// a = s · A and g = tanh(scale · s · G), those of A, G and the router
  /// into `result`; returns the gradient at the pooled input (undefined
  /// where the router does not read it).
  static torch::Tensor mixing_backward(
      const torch::autograd::variable_list& saved,
      const functional::StyleInjectFuncOptions& options,
      const torch::Tensor& grad_a,
      const torch::Tensor& grad_g,
      const std::array<bool, kInputs>& wanted,
      bool kernels,
      torch::autograd::variable_list& result) {
    const auto &lora_A = saved[kA], &gate = saved[kGate], &g = saved[11];
    const auto& s = saved[15]; // (n) shared, or (N, n)
    const functional::AdapterTensors adapter = adapter_of(saved);
    if (kernels && grad_a.defined() && routes(adapter, options) &&
        lora_A.size(0) <= cuda::detail::kMaxBranches) {
      return mixing_backward_by_kernels(
          saved, options, grad_a, grad_g, wanted, result);
    }
    // sum over instances of s ⊗ t: the gradient of a branch-stacked tensor
    // mixed by s. t: like s · branches -> (n, ...)
    const auto by_branch = [&](const torch::Tensor& t,
                               const torch::Tensor& of) {
      const auto weights = s.dim() == 2 ? s : s.unsqueeze(0);
      const auto flat = s.dim() == 2 ? t.flatten(1) : t.flatten().unsqueeze(0);
      return weights.t().mm(flat).view_as(of);
    };
    torch::Tensor grad_s;
    if (grad_a.defined()) {
      if (wanted[kA]) {
        result[kA] = by_branch(grad_a, lora_A);
      }
      grad_s =
          torch::matmul(grad_a.flatten(s.dim() - 1), lora_A.flatten(1).t());
    }
    if (grad_g.defined()) {
      const auto grad_logit = grad_g * (1 - g * g) * options.scale();
      if (wanted[kGate]) {
        result[kGate] = by_branch(grad_logit, gate);
      }
      const auto from_gate = torch::matmul(grad_logit, gate.t());
      grad_s = grad_s.defined() ? grad_s + from_gate : from_gate;
    }
    if (!grad_s.defined() || !routes(adapter, options)) {
      return torch::Tensor();
    }
    // Softmax's backward, then the router's linear map.
    const auto grad_logits = s *
        (grad_s - (s * grad_s).sum(-1, /*keepdim=*/true)) /
        options.temperature();
    if (wanted[kRouterWeight]) {
      result[kRouterWeight] = grad_logits.t().mm(saved[9]);
    }
    if (wanted[kRouterBias]) {
      result[kRouterBias] = grad_logits.sum(0);
    }
    return wanted[kX] ? grad_logits.mm(adapter.router_weight) : torch::Tensor();
  }

  /// mixing_backward where the router reads the input, by the library's
  /// CUDA kernels: two launches.
  static torch::Tensor mixing_backward_by_kernels(
      const torch::autograd::variable_list& saved,
      const functional::StyleInjectFuncOptions& options,
      const torch::Tensor& grad_a,
      const torch::Tensor& grad_g,
      const std::array<bool, kInputs>& wanted,
      torch::autograd::variable_list& result) {
    const auto grads = cuda::detail::route_and_mix_backward(
        grad_a,
        grad_g,
        saved[15], // s
        saved[11], // g
        saved[9], // pooled
        saved[kA],
        saved[kGate],
        saved[kRouterWeight],
        options.temperature(),
        options.scale(),
        {wanted[kA],
         wanted[kGate],
         wanted[kRouterWeight],
         wanted[kRouterBias],
         wanted[kX]});
    result[kA] = grads.lora_A;
    result[kGate] = grads.gate;
    result[kRouterWeight] = grads.router_weight;
    result[kRouterBias] = grads.router_bias;
    return grads.pooled;
  }

  /// Backward with create_graph (a gradient penalty): autograd through
  /// composite_linear on the saved inputs, so that it differentiates again.
  static void second_order_backward(
      const torch::autograd::variable_list& saved,
      const functional::StyleInjectFuncOptions& options,
      const torch::Tensor& grad,
      const std::array<bool, kInputs>& wanted,
      torch::autograd::variable_list& result) {
    recomputed_gradients(
        saved,
        wanted,
        grad,
        /*create_graph=*/true,
        [&](const std::array<torch::Tensor, kInputs>& inputs) {
          return composite_linear(
              inputs[kX],
              inputs[kWeight],
              inputs[kBias],
              {inputs[kA],
               inputs[kB],
               inputs[kRouterWeight],
               inputs[kRouterBias],
               inputs[kGate]},
              options,
              /*tokens=*/true);
        },
        result);
  }
};

/// Whether style_inject_linear runs as one FusedLinear node: a frozen base
/// (or no backward to come), an adapter in the statistics' dtype (float32
/// or float64 as its base, or float32 on a bfloat16 or float16 base), no
/// autocast, no dropout to apply, no style that wants a gradient, and
/// instances with tokens.
/// x: (N, L, d_in)
inline bool fuses(
    const torch::Tensor& x,
    const torch::Tensor& weight,
    const torch::Tensor& bias,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
  const auto dtype = x.scalar_type();
  const bool grad = torch::GradMode::is_enabled();
  const bool base_trains = grad &&
      (weight.requires_grad() || (bias.defined() && bias.requires_grad()));
  const auto& style = options.style();
  return options.path() != ComputePath::kStacked && x.size(0) > 0 &&
      x.size(1) > 0 && !autocast_enabled(x.device().type()) &&
      adapter.lora_A.scalar_type() == statistics_dtype(dtype) && !base_trains &&
      (!options.training() || options.dropout() == 0.0) &&
      !(grad && style.defined() && style.requires_grad()) &&
      !parameter_free(options.gate());
}

/// The form of FusedLinear for `path` on input x. kAuto merges the weight
/// where one weight serves every instance (a shared style): then the layer
/// is the base's GEMM alone. Per instance, measured, neither form wins
/// clearly, and the low-rank one keeps the base's own GEMM, so that an
/// adapter at its initialisation (B = 0) gives the base's output bit for
/// bit. An adapter wider than its base keeps the low-rank form: a merged
/// weight in the base's dtype would round the update away.
inline FusedForm fused_form(
    const torch::Tensor& x,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
  if (adapter.lora_A.scalar_type() != x.scalar_type()) {
    return FusedForm::kLowRank;
  }
  if (options.path() == ComputePath::kMergedWeight) {
    return FusedForm::kWeight;
  }
  const bool shared = !routes(adapter, options) &&
      !(options.style().defined() && options.style().dim() == 2);
  return options.path() == ComputePath::kAuto && shared ? FusedForm::kWeight
                                                        : FusedForm::kLowRank;
}

/// style_inject_linear through FusedLinear. x: (N, L, d_in)
inline torch::Tensor fused_linear(
    const torch::Tensor& x,
    const torch::Tensor& weight,
    const torch::Tensor& bias,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
  const auto optional = [](const torch::Tensor& t) {
    return t.defined() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
  };
  const bool differentiable = torch::GradMode::is_enabled() &&
      (x.requires_grad() || adapter.lora_A.requires_grad() ||
       adapter.lora_B.requires_grad() ||
       (adapter.router_weight.defined() &&
        adapter.router_weight.requires_grad()) ||
       (adapter.gate.defined() && adapter.gate.requires_grad()));
  return FusedLinear::apply(
      x,
      adapter.lora_A,
      adapter.lora_B,
      optional(adapter.router_weight),
      optional(adapter.router_bias),
      optional(adapter.gate),
      weight,
      optional(bias),
      FusedSettings{
          options,
          fused_form(x, adapter, options),
          differentiable,
          recompute_gate(),
          cuda::detail::kernels_serve(x)});
}

} // namespace detail

/// While one lives, gated StyleInjectLinear layers on this thread keep
/// nothing of their output's size for backward: the gate's gradient needs
/// u (the adapted output before the gate), which backward then computes
/// again from the input, one more GEMM of the base layer's size. What a
/// layer keeps falls to LoRA's (its low-rank activations and vectors per
/// instance); its backward costs about half a forward more. The forward
/// decides, so the guard needs to live around the forward only. It acts
/// on the fused node (see detail::fuses: a frozen base, its adapter in the
/// base's dtype or in float32 on a half-precision base); Conv2d layers are
/// composed by autograd and keep what autograd keeps.
/// ```
/// {
///   styleinject::RecomputeGate recompute;
///   loss = loss_of(model(x));
/// }
/// loss.backward();
/// ```
class RecomputeGate : detail::ScopedFlag {
 public:
  RecomputeGate() : ScopedFlag(detail::recompute_gate()) {}
};

/// While one lives, StyleInject layers on this thread whose input is on a
/// CUDA device use the library's own kernels where it has one (today, in
/// the fused Linear node: the router and mixing and their backward, and the
/// gate's token statistics), each compiled by NVRTC at its first use on a
/// device (<styleinject/cuda/>). The forward decides, so the guard needs to
/// live around the forward only. Off by default: every CUDA build's tests
/// compile the kernels, but they have yet to pass their [cuda] tests on a
/// device. Without CUDA it changes nothing.
class CudaKernels : detail::ScopedFlag {
 public:
  CudaKernels() : ScopedFlag(cuda::detail::kernels_on()) {}
};

namespace functional {

/// The style weights that StyleInjectLinear's router gives each instance of
/// `input` (the fixed style if `options.style()` is set; 1/n with the router
/// off), in float32 or wider.
/// input: (d_in) -> (n); (N, d_in) -> (N, n); (..., L, d_in) -> (..., n)
inline torch::Tensor linear_style_weights(
    const torch::Tensor& input,
    const AdapterTensors& adapter,
    const StyleInjectFuncOptions& options = {}) {
  detail::check_linear_input(input, adapter, options);
  const auto x = detail::linear_instances(input);
  auto sizes =
      input.sizes().slice(0, input.dim() - (input.dim() >= 3 ? 2 : 1)).vec();
  sizes.push_back(adapter.lora_A.size(0));
  const auto s =
      detail::input_style_weights(x, /*token_dims=*/{1}, adapter, options);
  return s.expand({x.size(0), s.size(-1)}).reshape(sizes);
}

/// StyleInjectLinear's forward (SPEC §1–3):
/// `u = W0 x + b0 + scale·scaling·B (sum_i s_i A_i dropout(x))`, then
/// `h = u + g ⊙ (u - mean_tok(u))` with `g = tanh(scale · s · gate)`. With
/// no token axis there is nothing to take a statistic over, and the gate is
/// skipped. The input has the base weight's dtype, and so has the output;
/// the adapter may have another (see detail::adapter_dtype).
/// input: (d_in) -> (d_out); (N, d_in) -> (N, d_out);
///   (..., L, d_in) -> (..., L, d_out)
///
/// Example:
/// ```
/// namespace SF = styleinject::functional;
/// auto h = SF::style_inject_linear(x, layer->weight, layer->bias,
///     {layer->lora_A, layer->lora_B, {}, {}, {}});  // LoRA with scaling 1
/// ```
inline torch::Tensor style_inject_linear(
    const torch::Tensor& input,
    const torch::Tensor& weight,
    const torch::Tensor& bias,
    const AdapterTensors& adapter,
    const StyleInjectFuncOptions& options = {}) {
  detail::check_linear_adapter(weight, adapter);
  detail::check_linear_input(input, adapter, options);
  detail::check_input_dtype(detail::kLinearName, input, weight);
  const auto x = detail::linear_instances(input); // (N, L, d_in)
  const bool tokens = input.dim() >= 3;
  const auto h = tokens && detail::fuses(x, weight, bias, adapter, options)
      ? detail::fused_linear(x, weight, bias, adapter, options)
      : detail::composite_linear(x, weight, bias, adapter, options, tokens);
  return detail::linear_output(input, weight, h);
}

/// Several adapters on one Linear, summed as diffusers' `set_adapters`
/// sums LoRAs: `u = W0 x + b0 + sum_k dh_k`, each `dh_k` with its own
/// options (scaling, strength, style); then each adapter's kScale gate,
/// `h = m + prod_k (1 + g_k) ⊙ (u - m)` with `m = mean_tok(u)`: every gate
/// keeps the token mean and scales the spread, so their order does not
/// matter. The parameter-free gates (kAdain, kResidual) read the frozen
/// output and one update apart, so they take one adapter alone. One
/// adapter is exactly the overload above; none is the base layer.
/// input, output: as style_inject_linear
inline torch::Tensor style_inject_linear(
    const torch::Tensor& input,
    const torch::Tensor& weight,
    const torch::Tensor& bias,
    const std::vector<AdapterTerm>& adapters) {
  if (adapters.size() == 1) {
    return style_inject_linear(
        input, weight, bias, adapters[0].adapter, adapters[0].options);
  }
  for (const auto& term : adapters) {
    detail::check_linear_adapter(weight, term.adapter);
    detail::check_linear_input(input, term.adapter, term.options);
    detail::check_summable(detail::kLinearName, term);
  }
  detail::check_input_dtype(detail::kLinearName, input, weight);
  const auto x = detail::linear_instances(input);
  const auto h = adapters.empty()
      ? torch::nn::functional::linear(x, weight, bias)
      : detail::summed_linear(x, weight, bias, adapters, input.dim() >= 3);
  return detail::linear_output(input, weight, h);
}

/// The style weights that StyleInjectConv2d's router gives each instance
/// of `input`: the softmax of the router on the spatially pooled input (the
/// fixed style if `options.style()` is set; 1/n with the router off), in
/// float32 or wider.
/// input: (N, C_in, H, W) -> (N, n)
inline torch::Tensor conv2d_style_weights(
    const torch::Tensor& input,
    const AdapterTensors& adapter,
    const StyleInjectFuncOptions& options = {}) {
  detail::check_conv2d_input(input, adapter, options);
  const auto s = detail::input_style_weights(
      input, /*token_dims=*/{2, 3}, adapter, options);
  return s.expand({input.size(0), s.size(-1)});
}

/// StyleInjectConv2d's forward (SPEC §1–3), with the convolution of
/// F::conv2d: `conv` gives the base's bias, stride, padding and dilation
/// (groups must be 1). Each branch's down-projection is a convolution like
/// the base's, the shared up-projection a 1×1 convolution, the router reads
/// the spatially pooled input, and the gate's statistics are over H'×W':
/// `u = conv(x, W0) + b0 + scale·scaling·B * (sum_i s_i A_i * dropout(x))`,
/// `h = u + g ⊙ (u - mean_hw(u))` with `g = tanh(scale · s · gate)`. dtypes
/// as in style_inject_linear.
/// input: (N, C_in, H, W) -> (N, C_out, H', W')
///
/// Example:
/// ```
/// namespace F = torch::nn::functional;
/// namespace SF = styleinject::functional;
/// auto h = SF::style_inject_conv2d(x, layer->weight,
///     {layer->lora_A, layer->lora_B, {}, {}, {}},
///     F::Conv2dFuncOptions().bias(layer->bias).padding(1));
/// ```
inline torch::Tensor style_inject_conv2d(
    const torch::Tensor& input,
    const torch::Tensor& weight,
    const AdapterTensors& adapter,
    const torch::nn::functional::Conv2dFuncOptions& conv = {},
    const StyleInjectFuncOptions& options = {}) {
  detail::check_conv2d_adapter(weight, adapter, conv);
  detail::check_conv2d_input(input, adapter, options);
  detail::check_input_dtype(detail::kConv2dName, input, weight);
  const auto gate = detail::gate_mode(adapter, options);
  if (!detail::parameter_free(gate)) {
    return detail::summed_conv2d(input, weight, conv, {{adapter, options}});
  }
  const auto down = detail::conv2d_down(input, adapter, options, conv);
  const auto base = torch::nn::functional::conv2d(input, weight, conv);
  const int64_t instances = base.size(0), rank = down.z.size(1);
  const auto dh = torch::bmm(
      detail::conv2d_up(adapter.lora_B.to(down.z.scalar_type()), instances),
      down.z.reshape({instances, rank, base.size(2) * base.size(3)}));
  return detail::parameter_free_gate(
      base,
      (dh * (options.scaling() * options.scale())).view(base.sizes()),
      gate,
      {2, 3});
}

/// Several adapters on one Conv2d, summed as the list overload of
/// style_inject_linear sums them, with the gates' statistics over H'×W'.
inline torch::Tensor style_inject_conv2d(
    const torch::Tensor& input,
    const torch::Tensor& weight,
    const std::vector<AdapterTerm>& adapters,
    const torch::nn::functional::Conv2dFuncOptions& conv = {}) {
  if (adapters.size() == 1) {
    return style_inject_conv2d(
        input, weight, adapters[0].adapter, conv, adapters[0].options);
  }
  for (const auto& term : adapters) {
    detail::check_conv2d_adapter(weight, term.adapter, conv);
    detail::check_conv2d_input(input, term.adapter, term.options);
    detail::check_summable(detail::kConv2dName, term);
  }
  detail::check_input_dtype(detail::kConv2dName, input, weight);
  return adapters.empty()
      ? torch::nn::functional::conv2d(input, weight, conv)
      : detail::summed_conv2d(input, weight, conv, adapters);
}

} // namespace functional
} // namespace styleinject
