#pragma once

#include <styleinject/detail/torch_compat.h>
#include <styleinject/options.h>

#include <torch/autograd.h>
#include <torch/nn/functional/conv.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/functional/linear.h>
#include <torch/types.h>

#include <c10/util/accumulate.h>

#include <string>
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
};

} // namespace functional

namespace detail {

inline constexpr const char* kLinearName = "styleinject::StyleInjectLinear";
inline constexpr const char* kConv2dName = "styleinject::StyleInjectConv2d";

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
/// router's logits on the per-instance mean of x over its token dims.
/// x: (N, d_in, ...) -> (n) shared by all instances, or (N, n)
inline torch::Tensor style_weights(
    const torch::Tensor& x,
    torch::IntArrayRef token_dims,
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
  const auto pooled = token_mean(x, token_dims, dtype, /*keepdim=*/false);
  const auto logits = torch::nn::functional::linear(
      pooled, adapter.router_weight.to(dtype), adapter.router_bias.to(dtype));
  return torch::softmax(logits / options.temperature(), /*dim=*/-1);
}

/// The compute path for `instances` instances of `tokens` tokens each.
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
      grad_u = (grad_h * (1 + g) -
                g * token_mean(grad_h, dims, dtype, /*keepdim=*/true))
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

/// Applies the variance gate; see VarianceGate.
/// u: (N, L, d_out) or (N, C, H, W), g: broadcastable to u's statistics
///   -> u's shape
inline torch::Tensor variance_gate(
    const torch::Tensor& u,
    const torch::Tensor& g,
    torch::IntArrayRef token_dims) {
  return VarianceGate::apply(u, g, token_dims.vec());
}

/// Checks the device of an input, and a fixed style if given, against an
/// adapter; `instances` is the input's number of instances.
inline void check_input_against_adapter(
    const char* layer,
    const torch::Tensor& input,
    int64_t instances,
    const functional::AdapterTensors& adapter,
    const functional::StyleInjectFuncOptions& options) {
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

/// The mixed down-projection `sum_i s_i A_i * x` of SPEC §2 for Conv2d, by
/// either path, in the dtype of x and lora_A: merged kernels per instance
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
  namespace F = torch::nn::functional;
  const int64_t instances = x.size(0), channels = x.size(1);
  const int64_t branches = lora_A.size(0), rank = lora_A.size(1);
  // As for Linear, with the positions of the map as tokens.
  path = resolve_path(path, s, instances, x.size(2) * x.size(3));
  if (path == ComputePath::kMerged) {
    const auto a = mix_branches(s, lora_A).to(lora_A.scalar_type());
    if (s.dim() == 1) {
      return F::conv2d(x, a, conv2d_geometry(conv, 1));
    }
    // Instance i is group i: its channels meet only its own kernels.
    const auto z = F::conv2d(
        x.reshape({1, instances * channels, x.size(2), x.size(3)}),
        a.flatten(0, 1),
        conv2d_geometry(conv, instances));
    return z.view({instances, rank, z.size(2), z.size(3)});
  }
  const auto z = F::conv2d(x, lora_A.flatten(0, 1), conv2d_geometry(conv, 1));
  return mix_branch_outputs(
      s,
      z.view({instances, branches, rank, z.size(2), z.size(3)}),
      /*dim=*/1);
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

} // namespace detail

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
  const auto s = detail::style_weights(x, /*token_dims=*/{1}, adapter, options);
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
  const auto s = detail::style_weights(x, /*token_dims=*/{1}, adapter, options);
  const auto dtype = detail::adapter_dtype(input, adapter.lora_A);
  const auto z = detail::linear_down_projection(
      detail::branch_input(x, options).to(dtype),
      adapter.lora_A.to(dtype),
      s,
      options.path()); // (N, L, r)
  const auto base = torch::nn::functional::linear(x, weight, bias);
  // The up-projection accumulates onto the base output inside its GEMM
  // (beta = 1), in the adapter's dtype, rounded once to the base's.
  auto h = torch::addmm(
               base.view({-1, base.size(-1)}).to(dtype),
               z.reshape({-1, z.size(-1)}),
               adapter.lora_B.to(dtype).t(),
               /*beta=*/1,
               /*alpha=*/options.scaling() * options.scale())
               .to(base.scalar_type())
               .view(base.sizes());
  if (adapter.gate.defined() && input.dim() >= 3) {
    const auto g = detail::gate_factor(s, adapter.gate, options.scale());
    h = detail::variance_gate(h, s.dim() == 2 ? g.unsqueeze(1) : g, {1});
  }
  auto sizes = input.sizes().vec();
  sizes.back() = weight.size(0);
  return h.view(sizes);
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
  const auto s =
      detail::style_weights(input, /*token_dims=*/{2, 3}, adapter, options);
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
  namespace F = torch::nn::functional;
  detail::check_conv2d_adapter(weight, adapter, conv);
  detail::check_conv2d_input(input, adapter, options);
  detail::check_input_dtype(detail::kConv2dName, input, weight);
  const auto s =
      detail::style_weights(input, /*token_dims=*/{2, 3}, adapter, options);
  const auto dtype = detail::adapter_dtype(input, adapter.lora_A);
  const auto z = detail::conv2d_down_projection(
      detail::branch_input(input, options).to(dtype),
      adapter.lora_A.to(dtype),
      s,
      conv,
      options.path()); // (N, r, H', W')
  const auto base = F::conv2d(input, weight, conv);
  // The 1×1 up-projection accumulates onto the base output inside a batched
  // GEMM (beta = 1), in the adapter's dtype, rounded once to the base's.
  const int64_t instances = base.size(0), channels = base.size(1);
  const int64_t positions = base.size(2) * base.size(3), rank = z.size(1);
  auto h = torch::baddbmm(
               base.view({instances, channels, positions}).to(dtype),
               adapter.lora_B.to(dtype)
                   .view({1, channels, rank})
                   .expand({instances, channels, rank}),
               z.reshape({instances, rank, positions}),
               /*beta=*/1,
               /*alpha=*/options.scaling() * options.scale())
               .to(base.scalar_type())
               .view(base.sizes());
  if (adapter.gate.defined()) {
    const auto g = detail::gate_factor(s, adapter.gate, options.scale());
    h = detail::variance_gate(
        h, g.view({s.dim() == 2 ? instances : 1, channels, 1, 1}), {2, 3});
  }
  return h;
}

} // namespace functional
} // namespace styleinject
