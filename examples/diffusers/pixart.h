#pragma once
// diffusers' PixArtTransformer2DModel in LibTorch (PixArt-α and -Σ): a DiT
// over latent patches with fixed 2-D sinusoidal positions, one adaLN-single
// modulation from the timestep shared by all blocks (each adds its own
// table), and cross-attention to the projected caption. Module names are
// diffusers', so its checkpoints load by their keys.

#include "blocks.h"
#include "config.h"

#include <cmath>
#include <string>
#include <vector>

namespace diffusers {

/// The sizes of a PixArtTransformer2DModel, read from its config.json.
struct PixArtConfig {
  int64_t heads = 16, head_dim = 72, in_channels = 4, out_channels = 8;
  int64_t layers = 28, sample_size = 128, patch_size = 2;
  int64_t cross_attention_dim = 1152, caption_channels = 4096;
  double interpolation_scale = 2, norm_eps = 1e-6;
  bool additional_conditions = true, attention_bias = true;
  std::string activation = "gelu-approximate";

  int64_t inner() const {
    return heads * head_dim;
  }
  static PixArtConfig from(Config& c);
};

/// Reads `c` as diffusers' PixArtTransformer2DModel.__init__ does; a feature
/// this port does not build is refused naming its key and value.
inline PixArtConfig PixArtConfig::from(Config& c) {
  c.require("norm_type", {"ada_norm_single"});
  c.require("norm_elementwise_affine", {false});
  c.require("attention_type", {"default"});
  c.require("dropout", {0.0});
  // num_embeds_ada_norm only has to be set; norm_num_groups has no use in
  // this model; and diffusers' default attention (PyTorch's fused
  // attention) ignores upcast_attention too.
  c.ignore({"num_embeds_ada_norm", "norm_num_groups", "upcast_attention"});
  PixArtConfig p;
  p.heads = c.get<int64_t>("num_attention_heads", 16);
  p.head_dim = c.get<int64_t>("attention_head_dim", 72);
  p.in_channels = c.get<int64_t>("in_channels", 4);
  p.out_channels = c.get<int64_t>("out_channels", p.in_channels);
  p.layers = c.get<int64_t>("num_layers", 28);
  p.sample_size = c.get<int64_t>("sample_size", 128);
  p.patch_size = c.get<int64_t>("patch_size", 2);
  p.cross_attention_dim = c.get<int64_t>("cross_attention_dim", p.inner());
  TORCH_CHECK(
      c.has("caption_channels"),
      c.context(),
      ": \"caption_channels\": null (no caption projection) is not supported "
      "by this port");
  p.caption_channels = c.get<int64_t>("caption_channels");
  p.attention_bias = c.get<bool>("attention_bias", true);
  p.activation = c.get<std::string>("activation_fn", "gelu-approximate");
  p.norm_eps = c.get<double>("norm_eps", 1e-6);
  p.interpolation_scale = c.get<double>(
      "interpolation_scale", std::max<int64_t>(p.sample_size / 64, 1));
  // diffusers: the 1024-px model (sample size 128) adds resolution and
  // aspect ratio to the timestep unless the config says.
  p.additional_conditions =
      c.get<bool>("use_additional_conditions", p.sample_size == 128);
  TORCH_CHECK(
      p.inner() % 4 == 0 && (!p.additional_conditions || p.inner() % 3 == 0),
      c.context(),
      ": num_attention_heads * attention_head_dim = ",
      p.inner(),
      " must be a multiple of 4 (the 2-D sin-cos positions)",
      p.additional_conditions ? " and of 3 (the size conditions' thirds)" : "");
  TORCH_CHECK(
      p.cross_attention_dim == p.inner(),
      c.context(),
      ": \"cross_attention_dim\" ",
      p.cross_attention_dim,
      " must equal num_attention_heads * attention_head_dim = ",
      p.inner(),
      " (the caption is projected to that width)");
  c.finish();
  return p;
}

/// diffusers' get_2d_sincos_pos_embed for a grid of `height` x `width`
/// patches on `device`: (H*W, dim), each row the sinusoids of its column
/// position, then of its row position, positions scaled to `base_size` patches.
inline torch::Tensor sincos_positions(
    int64_t dim,
    int64_t height,
    int64_t width,
    int64_t base_size,
    double interpolation_scale,
    const torch::Device& device) {
  const auto on = torch::TensorOptions().device(device);
  const auto axis = [&](int64_t count) { // float32, as diffusers computes it
    return torch::arange(count, on.dtype(torch::kFloat)) /
        (double(count) / double(base_size)) / interpolation_scale;
  };
  const auto sincos = [&](const torch::Tensor& pos) { // (M) -> (M, dim/2)
    const int64_t quarter = dim / 4;
    const auto omega = 1.0 /
        torch::pow(10000.0,
                   torch::arange(quarter, on.dtype(torch::kDouble)) /
                       double(quarter));
    const auto angles = pos.to(torch::kDouble).unsqueeze(1) * omega;
    return torch::cat({angles.sin(), angles.cos()}, 1);
  };
  const auto rows = axis(height).unsqueeze(1).expand({height, width});
  const auto columns = axis(width).unsqueeze(0).expand({height, width});
  return torch::cat({sincos(columns.reshape(-1)), sincos(rows.reshape(-1))}, 1)
      .to(torch::kFloat);
}

/// One PixArt block: self-attention and feed-forward, each on a LayerNorm
/// shifted, scaled and gated by the timestep's modulation plus the block's
/// `scale_shift_table`; cross-attention to the caption without a norm.
struct PixArtBlockImpl : torch::nn::Module {
  explicit PixArtBlockImpl(const PixArtConfig& p) {
    const auto dim = p.inner();
    const auto norm = [&] {
      return torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})
                                      .eps(p.norm_eps)
                                      .elementwise_affine(false));
    };
    norm1 = register_module("norm1", norm());
    attn1 = register_module(
        "attn1", Attention(dim, dim, p.heads, p.head_dim, p.attention_bias));
    norm2 = register_module("norm2", norm());
    attn2 = register_module(
        "attn2",
        Attention(
            dim, p.cross_attention_dim, p.heads, p.head_dim, p.attention_bias));
    ff = register_module("ff", FeedForward(dim, p.activation));
    scale_shift_table = register_parameter(
        "scale_shift_table", torch::randn({6, dim}) / std::sqrt(double(dim)));
  }
  /// modulation: (N, 6 * dim); caption_bias: broadcastable to the scores.
  torch::Tensor forward(
      torch::Tensor h,
      const torch::Tensor& caption,
      const torch::Tensor& modulation,
      const torch::Tensor& caption_bias) {
    const auto m =
        (scale_shift_table.unsqueeze(0) +
         modulation.reshape({h.size(0), 6, -1}))
            .chunk(6, 1); // shift, scale, gate of attention; then of the MLP
    const auto a = norm1(h) * (1 + m[1]) + m[0];
    h = h + m[2] * attn1(a, a);
    h = h + attn2(h, caption, caption_bias);
    return h + m[5] * ff(norm2(h) * (1 + m[4]) + m[3]);
  }
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  Attention attn1{nullptr}, attn2{nullptr};
  FeedForward ff{nullptr};
  torch::Tensor scale_shift_table;
};
TORCH_MODULE(PixArtBlock);

/// diffusers' PixArtTransformer2DModel.
struct PixArtTransformer2DModelImpl : DenoiserImpl {
  explicit PixArtTransformer2DModelImpl(PixArtConfig config)
      : config(std::move(config)) {
    const auto& p = this->config;
    const auto dim = p.inner();
    auto patch = std::make_shared<torch::nn::Module>();
    patch_proj = patch->register_module(
        "proj",
        StyleInjectConv2d(
            torch::nn::Conv2dOptions(p.in_channels, dim, p.patch_size)
                .stride(p.patch_size)));
    register_module("pos_embed", patch);
    auto blocks =
        register_module("transformer_blocks", torch::nn::ModuleList());
    for (int64_t i = 0; i < p.layers; ++i) {
      transformer_blocks.push_back(PixArtBlock(p));
      blocks->push_back(transformer_blocks.back());
    }
    norm_out = register_module(
        "norm_out",
        torch::nn::LayerNorm(
            torch::nn::LayerNormOptions({dim}).eps(1e-6).elementwise_affine(
                false)));
    scale_shift_table = register_parameter(
        "scale_shift_table", torch::randn({2, dim}) / std::sqrt(double(dim)));
    proj_out = register_module(
        "proj_out",
        StyleInjectLinear(dim, p.patch_size * p.patch_size * p.out_channels));
    // adaln_single: emb (timestep_embedder, and the size embedders), linear.
    auto adaln = std::make_shared<torch::nn::Module>();
    auto emb =
        adaln->register_module("emb", std::make_shared<torch::nn::Module>());
    timestep_embedder =
        emb->register_module("timestep_embedder", TimestepEmbedding(256, dim));
    if (p.additional_conditions) {
      resolution_embedder = emb->register_module(
          "resolution_embedder", TimestepEmbedding(256, dim / 3));
      aspect_ratio_embedder = emb->register_module(
          "aspect_ratio_embedder", TimestepEmbedding(256, dim / 3));
    }
    adaln_linear =
        adaln->register_module("linear", StyleInjectLinear(dim, 6 * dim));
    register_module("adaln_single", adaln);
    auto caption = std::make_shared<torch::nn::Module>();
    caption_1 = caption->register_module(
        "linear_1", StyleInjectLinear(p.caption_channels, dim));
    caption_2 =
        caption->register_module("linear_2", StyleInjectLinear(dim, dim));
    register_module("caption_projection", caption);
  }

  /// adaLN-single's embedding of the timestep (N, dim), with resolution
  /// and aspect ratio where the config adds them.
  torch::Tensor embedded_timestep(const Inputs& in) {
    const auto n = in.sample.size(0);
    const auto dtype = in.sample.scalar_type();
    const auto features = [&](const torch::Tensor& t) {
      return timestep_features(t, 256, true, 0).to(dtype);
    };
    auto emb = timestep_embedder(features(per_sample(in.timestep, n)));
    if (config.additional_conditions) {
      TORCH_CHECK(
          in.resolution.defined() && in.aspect_ratio.defined(),
          "this PixArt's config uses additional conditions (sample_size 128 or "
          "use_additional_conditions): the inputs need \"resolution\" and "
          "\"aspect_ratio\"");
      const auto size_embedding = [&](TimestepEmbedding& embedder,
                                      const torch::Tensor& values) {
        return embedder(features(values.flatten())).reshape({n, -1});
      };
      emb = emb +
          torch::cat(
                {size_embedding(resolution_embedder, in.resolution),
                 size_embedding(aspect_ratio_embedder, in.aspect_ratio)},
                1);
    }
    return emb;
  }

  Inputs example_inputs(
      int64_t batch,
      int64_t size,
      int64_t tokens,
      const torch::TensorOptions& options) const override {
    const auto& p = config;
    auto in = random_inputs(
        batch, p.in_channels, size, tokens, p.caption_channels, options);
    if (p.additional_conditions) { // the image's pixels, and h / w
      in.resolution = torch::full({batch, 2}, double(8 * size), options);
      in.aspect_ratio = torch::ones({batch, 1}, options);
    }
    return in;
  }

  torch::Tensor forward(const Inputs& in) override {
    const auto& p = config;
    const auto& x = in.sample;
    TORCH_CHECK(
        x.dim() == 4 && x.size(1) == p.in_channels &&
            x.size(2) % p.patch_size == 0 && x.size(3) % p.patch_size == 0,
        "sample: expected shape [N, ",
        p.in_channels,
        ", H, W] with H and W multiples of ",
        p.patch_size,
        ", but got ",
        x.sizes());
    const auto n = x.size(0);
    const auto height = x.size(2) / p.patch_size,
               width = x.size(3) / p.patch_size;
    auto h = patch_proj(x).flatten(2).transpose(1, 2) +
        sincos_positions(
            p.inner(),
            height,
            width,
            p.sample_size / p.patch_size,
            p.interpolation_scale,
            x.device())
            .to(x.scalar_type());
    const auto t = embedded_timestep(in);
    const auto modulation = adaln_linear(F::silu(t));
    const auto caption = caption_2(F::gelu(
        caption_1(in.encoder_hidden_states),
        F::GELUFuncOptions().approximate("tanh")));
    torch::Tensor caption_bias; // diffusers: (1 - mask) * -10000
    if (in.encoder_attention_mask.defined()) {
      caption_bias =
          ((1 - in.encoder_attention_mask.to(x.scalar_type())) * -10000.0)
              .reshape({n, 1, 1, -1});
    }
    for (auto& block : transformer_blocks) {
      h = block(h, caption, modulation, caption_bias);
    }
    const auto shift_scale =
        (scale_shift_table.unsqueeze(0) + t.unsqueeze(1)).chunk(2, 1);
    h = proj_out(norm_out(h) * (1 + shift_scale[1]) + shift_scale[0]);
    // Patches back to an image: (N, h, w, p, q, C) -> (N, C, h*p, w*q).
    return h
        .reshape({n, height, width, p.patch_size, p.patch_size, p.out_channels})
        .permute({0, 5, 1, 3, 2, 4})
        .reshape(
            {n, p.out_channels, height * p.patch_size, width * p.patch_size});
  }

  PixArtConfig config;
  StyleInjectConv2d patch_proj{nullptr};
  std::vector<PixArtBlock> transformer_blocks;
  torch::nn::LayerNorm norm_out{nullptr};
  torch::Tensor scale_shift_table;
  StyleInjectLinear proj_out{nullptr}, adaln_linear{nullptr};
  TimestepEmbedding timestep_embedder{nullptr}, resolution_embedder{nullptr},
      aspect_ratio_embedder{nullptr};
  StyleInjectLinear caption_1{nullptr}, caption_2{nullptr};
};
TORCH_MODULE(PixArtTransformer2DModel);

} // namespace diffusers
