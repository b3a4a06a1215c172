#pragma once
// The pieces that diffusers' UNet and PixArt share, under diffusers' module
// names so that a checkpoint's keys are the modules' names: the sinusoidal
// timestep features, the timestep MLP, attention, the feed-forward, and the
// inputs of a denoiser. Every Linear and Conv2d is a StyleInject layer
// without an adapter: it computes as torch::nn's until `inject` attaches one.

#include <styleinject/styleinject.h>

#include <torch/torch.h>
#include <torch/version.h>

#include <cmath>
#include <string>

namespace diffusers {

using styleinject::StyleInjectConv2d;
using styleinject::StyleInjectLinear;
namespace F = torch::nn::functional;

/// What a denoiser reads. `sample` (N, C, H, W), `timestep` (N) or a
/// scalar, `encoder_hidden_states` (N, L, D); the rest only where the
/// config asks: SDXL's "text_time" conditioning (`text_embeds` (N, P),
/// `time_ids` (N, 6)), PixArt's additional conditions (`resolution` (N, 2),
/// `aspect_ratio` (N, 1)), and a caption mask (N, L), 1 keep, 0 drop.
struct Inputs {
  torch::Tensor sample, timestep, encoder_hidden_states;
  torch::Tensor text_embeds, time_ids;
  torch::Tensor resolution, aspect_ratio;
  torch::Tensor encoder_attention_mask;
};

/// A model of diffusers that maps Inputs to the predicted `sample`.
struct DenoiserImpl : torch::nn::Module {
  virtual torch::Tensor forward(const Inputs& inputs) = 0;
  /// Random inputs of the shapes the model reads: `batch` latents of
  /// `size` x `size`, a caption of `tokens` tokens.
  virtual Inputs example_inputs(
      int64_t batch,
      int64_t size,
      int64_t tokens,
      const torch::TensorOptions& options) const = 0;
};

/// Random Inputs of the three that every denoiser reads: `batch` latents of
/// `channels` x `size` x `size`, timesteps, a caption of `tokens` x `width`.
inline Inputs random_inputs(
    int64_t batch,
    int64_t channels,
    int64_t size,
    int64_t tokens,
    int64_t width,
    const torch::TensorOptions& options) {
  Inputs in;
  in.sample = torch::randn({batch, channels, size, size}, options);
  in.timestep = torch::randint(1000, {batch}, options);
  in.encoder_hidden_states = torch::randn({batch, tokens, width}, options);
  return in;
}

/// The timestep(s) as one float32 value per sample: (N).
inline torch::Tensor per_sample(const torch::Tensor& timestep, int64_t n) {
  TORCH_CHECK(
      timestep.dim() == 0 || (timestep.dim() == 1 && timestep.size(0) == n),
      "timestep: expected a scalar or shape [",
      n,
      "] (one per sample), but got ",
      timestep.sizes());
  return timestep.to(torch::kFloat).expand({n});
}

/// diffusers' get_timestep_embedding: sinusoids of t at `dim` frequencies,
/// (N) -> (N, dim) float32, cos first where `flip_sin_to_cos`.
inline torch::Tensor timestep_features(
    const torch::Tensor& t,
    int64_t dim,
    bool flip_sin_to_cos,
    double freq_shift) {
  const int64_t half = dim / 2;
  const auto exponent = torch::arange(half, t.options().dtype(torch::kFloat)) *
      (-std::log(10000.0) / (double(half) - freq_shift));
  const auto angles = t.to(torch::kFloat).unsqueeze(1) * exponent.exp();
  auto features = flip_sin_to_cos
      ? torch::cat({angles.cos(), angles.sin()}, -1)
      : torch::cat({angles.sin(), angles.cos()}, -1);
  return dim % 2 == 1 ? F::pad(features, F::PadFuncOptions({0, 1})) : features;
}

/// diffusers' TimestepEmbedding: linear_1, SiLU, linear_2.
struct TimestepEmbeddingImpl : torch::nn::Module {
  TimestepEmbeddingImpl(int64_t in, int64_t out)
      : linear_1(register_module("linear_1", StyleInjectLinear(in, out))),
        linear_2(register_module("linear_2", StyleInjectLinear(out, out))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return linear_2(F::silu(linear_1(x)));
  }
  StyleInjectLinear linear_1, linear_2;
};
TORCH_MODULE(TimestepEmbedding);

/// Softmax attention of q to k, v (N, heads, L, d), with an additive bias
/// broadcast over the scores; PyTorch 2's fused kernel where it exists.
inline torch::Tensor attend(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& bias) {
#if TORCH_VERSION_MAJOR >= 2
  return at::scaled_dot_product_attention(
      q,
      k,
      v,
      bias.defined() ? c10::optional<torch::Tensor>(bias) : c10::nullopt);
#else
  auto scores = q.matmul(k.transpose(-2, -1)) / std::sqrt(double(q.size(-1)));
  if (bias.defined()) {
    scores = scores + bias;
  }
  return scores.softmax(-1).matmul(v);
#endif
}

/// diffusers' Attention: to_q, to_k, to_v and to_out.0 (to_out.1 is a
/// dropout). x (N, L, query_dim), context (N, S, context_dim), bias
/// broadcastable to (N, heads, L, S) -> (N, L, query_dim).
struct AttentionImpl : torch::nn::Module {
  AttentionImpl(
      int64_t query_dim,
      int64_t context_dim,
      int64_t heads,
      int64_t head_dim,
      bool bias)
      : heads(heads) {
    const int64_t inner = heads * head_dim;
    const auto linear = [&](int64_t in, int64_t out, bool with_bias) {
      return StyleInjectLinear(
          torch::nn::LinearOptions(in, out).bias(with_bias));
    };
    to_q = register_module("to_q", linear(query_dim, inner, bias));
    to_k = register_module("to_k", linear(context_dim, inner, bias));
    to_v = register_module("to_v", linear(context_dim, inner, bias));
    to_out_0 = linear(inner, query_dim, true);
    auto to_out = register_module("to_out", torch::nn::ModuleList());
    to_out->push_back(to_out_0);
    to_out->push_back(torch::nn::Dropout(0.0));
  }
  torch::Tensor forward(
      const torch::Tensor& x,
      const torch::Tensor& context,
      const torch::Tensor& bias = {}) {
    const auto heads_first = [&](const torch::Tensor& t) {
      return t.view({t.size(0), t.size(1), heads, -1}).transpose(1, 2);
    };
    const auto y = attend(
        heads_first(to_q(x)),
        heads_first(to_k(context)),
        heads_first(to_v(context)),
        bias.defined() ? bias.to(x.scalar_type()) : bias);
    return to_out_0(y.transpose(1, 2).reshape({x.size(0), x.size(1), -1}));
  }
  int64_t heads;
  StyleInjectLinear to_q{nullptr}, to_k{nullptr}, to_v{nullptr},
      to_out_0{nullptr};
};
TORCH_MODULE(Attention);

/// diffusers' FeedForward with 4x width: net.0 is the activation with its
/// projection `proj` (GEGLU: a gated GELU, twice as wide; or a GELU, tanh-
/// approximated where `approximate`), net.1 a dropout, net.2 the output.
struct FeedForwardImpl : torch::nn::Module {
  FeedForwardImpl(int64_t dim, const std::string& activation)
      : activation(activation) {
    TORCH_CHECK(
        activation == "geglu" || activation == "gelu" ||
            activation == "gelu-approximate",
        "activation_fn: expected \"geglu\", \"gelu\" or \"gelu-approximate\", "
        "but got \"",
        activation,
        "\"");
    const int64_t inner = 4 * dim;
    auto act = std::make_shared<torch::nn::Module>();
    proj = act->register_module(
        "proj",
        StyleInjectLinear(dim, activation == "geglu" ? 2 * inner : inner));
    out = StyleInjectLinear(inner, dim);
    auto net = register_module("net", torch::nn::ModuleList());
    net->push_back(act);
    net->push_back(torch::nn::Dropout(0.0));
    net->push_back(out);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = proj(x);
    if (activation == "geglu") {
      const auto halves = h.chunk(2, -1);
      h = halves[0] * F::gelu(halves[1]);
    } else {
      h = F::gelu(
          h,
          F::GELUFuncOptions().approximate(
              activation == "gelu" ? "none" : "tanh"));
    }
    return out(h);
  }
  std::string activation;
  StyleInjectLinear proj{nullptr}, out{nullptr};
};
TORCH_MODULE(FeedForward);

} // namespace diffusers
