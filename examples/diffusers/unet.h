#pragma once
// diffusers' UNet2DConditionModel in LibTorch, as Stable Diffusion 1.x, 2.x
// and SDXL configure it: ResNet blocks with the timestep embedding, spatial
// transformers with self- and cross-attention to the text, down, mid and up
// blocks with skip connections. Module names are diffusers', so its
// checkpoints load by their keys.

#include "blocks.h"
#include "config.h"

#include <algorithm>
#include <string>
#include <vector>

namespace diffusers {

/// What a block needs besides its channels.
struct BlockOptions {
  int64_t temb_channels = 0, groups = 32, cross_attention_dim = 768;
  double eps = 1e-5, output_scale_factor = 1.0;
  bool linear_projection = false;
};

/// diffusers' ResnetBlock2D: two GroupNorm-SiLU-Conv3x3 with the timestep
/// embedding added between, and a 1x1 shortcut where the channels change.
struct ResnetBlock2DImpl : torch::nn::Module {
  ResnetBlock2DImpl(int64_t in, int64_t out, const BlockOptions& o)
      : output_scale_factor(o.output_scale_factor) {
    const auto norm = [&](int64_t channels) {
      return torch::nn::GroupNorm(
          torch::nn::GroupNormOptions(o.groups, channels).eps(o.eps));
    };
    const auto conv = [](int64_t from, int64_t to, int64_t kernel) {
      return StyleInjectConv2d(
          torch::nn::Conv2dOptions(from, to, kernel).padding(kernel / 2));
    };
    norm1 = register_module("norm1", norm(in));
    conv1 = register_module("conv1", conv(in, out, 3));
    time_emb_proj = register_module(
        "time_emb_proj", StyleInjectLinear(o.temb_channels, out));
    norm2 = register_module("norm2", norm(out));
    conv2 = register_module("conv2", conv(out, out, 3));
    if (in != out) {
      conv_shortcut = register_module("conv_shortcut", conv(in, out, 1));
    }
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb) {
    auto h = conv1(F::silu(norm1(x)));
    h = h + time_emb_proj(F::silu(temb)).unsqueeze(-1).unsqueeze(-1);
    h = conv2(F::silu(norm2(h)));
    const auto shortcut = conv_shortcut ? conv_shortcut(x) : x;
    return (shortcut + h) / output_scale_factor;
  }
  double output_scale_factor;
  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  StyleInjectConv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
  StyleInjectLinear time_emb_proj{nullptr};
};
TORCH_MODULE(ResnetBlock2D);

/// diffusers' BasicTransformerBlock as the UNet uses it: pre-LayerNorm
/// self-attention, cross-attention to the text, GEGLU feed-forward.
struct TransformerBlockImpl : torch::nn::Module {
  TransformerBlockImpl(int64_t dim, int64_t heads, int64_t context_dim) {
    const auto norm = [&] {
      return torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}));
    };
    const int64_t head_dim = dim / heads;
    norm1 = register_module("norm1", norm());
    attn1 = register_module(
        "attn1", Attention(dim, dim, heads, head_dim, /*bias=*/false));
    norm2 = register_module("norm2", norm());
    attn2 = register_module(
        "attn2", Attention(dim, context_dim, heads, head_dim, /*bias=*/false));
    norm3 = register_module("norm3", norm());
    ff = register_module("ff", FeedForward(dim, "geglu"));
  }
  torch::Tensor forward(torch::Tensor h, const torch::Tensor& context) {
    const auto a = norm1(h);
    h = h + attn1(a, a);
    h = h + attn2(norm2(h), context);
    return h + ff(norm3(h));
  }
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
  Attention attn1{nullptr}, attn2{nullptr};
  FeedForward ff{nullptr};
};
TORCH_MODULE(TransformerBlock);

/// diffusers' Transformer2DModel on a feature map: GroupNorm, proj_in (a
/// 1x1 conv, or a Linear with `linear_projection`), transformer blocks over
/// the H*W tokens, proj_out, plus the input.
struct SpatialTransformerImpl : torch::nn::Module {
  SpatialTransformerImpl(
      int64_t channels,
      int64_t heads,
      int64_t depth,
      const BlockOptions& o)
      : linear_projection(o.linear_projection) {
    // diffusers: head_dim = channels // heads, inner = heads * head_dim.
    const int64_t inner = heads * (channels / heads);
    norm = register_module(
        "norm",
        torch::nn::GroupNorm(
            torch::nn::GroupNormOptions(o.groups, channels).eps(1e-6)));
    if (linear_projection) {
      proj_in_linear =
          register_module("proj_in", StyleInjectLinear(channels, inner));
    } else {
      proj_in_conv =
          register_module("proj_in", StyleInjectConv2d(channels, inner, 1));
    }
    auto blocks =
        register_module("transformer_blocks", torch::nn::ModuleList());
    for (int64_t i = 0; i < depth; ++i) {
      transformer_blocks.push_back(
          TransformerBlock(inner, heads, o.cross_attention_dim));
      blocks->push_back(transformer_blocks.back());
    }
    if (linear_projection) {
      proj_out_linear =
          register_module("proj_out", StyleInjectLinear(inner, channels));
    } else {
      proj_out_conv =
          register_module("proj_out", StyleInjectConv2d(inner, channels, 1));
    }
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context) {
    const auto n = x.size(0), height = x.size(2), width = x.size(3);
    const auto tokens = [&](const torch::Tensor& map) { // (N,C,H,W)->(N,HW,C)
      return map.permute({0, 2, 3, 1}).reshape({n, height * width, -1});
    };
    const auto map = [&](const torch::Tensor& t) { // (N,HW,C)->(N,C,H,W)
      return t.reshape({n, height, width, -1}).permute({0, 3, 1, 2});
    };
    auto h = norm(x);
    h = linear_projection ? proj_in_linear(tokens(h)) : tokens(proj_in_conv(h));
    for (auto& block : transformer_blocks) {
      h = block(h, context);
    }
    h = linear_projection ? map(proj_out_linear(h))
                          : proj_out_conv(map(h).contiguous());
    return h + x;
  }
  bool linear_projection;
  torch::nn::GroupNorm norm{nullptr};
  StyleInjectLinear proj_in_linear{nullptr}, proj_out_linear{nullptr};
  StyleInjectConv2d proj_in_conv{nullptr}, proj_out_conv{nullptr};
  std::vector<TransformerBlock> transformer_blocks;
};
TORCH_MODULE(SpatialTransformer);

/// The layout of one down or up block, from the config.
struct BlockLayout {
  int64_t in = 0, out = 0, layers = 1;
  bool attention = false;
  int64_t heads = 8, transformer_layers = 1;
  bool resample = false; // downsample after, or upsample after
};

/// A down or up block of the UNet (diffusers' DownBlock2D,
/// CrossAttnDownBlock2D, UpBlock2D, CrossAttnUpBlock2D): `layers` ResNet
/// blocks, each followed by a spatial transformer where the block has
/// attention, then a strided conv down or a nearest upsample and conv.
/// Down blocks push each output to `skips`; up blocks pop one per ResNet
/// block and concatenate it to their input.
struct UNetBlockImpl : torch::nn::Module {
  UNetBlockImpl(
      const BlockLayout& layout,
      int64_t prev_out, // up blocks: the previous up block's channels
      bool up,
      int64_t downsample_padding,
      const BlockOptions& o)
      : up(up), downsample_padding(downsample_padding) {
    auto resnet_list = register_module("resnets", torch::nn::ModuleList());
    torch::nn::ModuleList attention_list{nullptr};
    if (layout.attention) {
      attention_list = register_module("attentions", torch::nn::ModuleList());
    }
    for (int64_t j = 0; j < layout.layers; ++j) {
      int64_t in = j == 0 ? layout.in : layout.out;
      if (up) { // diffusers: the input, plus the skip it concatenates
        const int64_t skip = j == layout.layers - 1 ? layout.in : layout.out;
        in = (j == 0 ? prev_out : layout.out) + skip;
      }
      resnets.push_back(ResnetBlock2D(in, layout.out, o));
      resnet_list->push_back(resnets.back());
      if (layout.attention) {
        attentions.push_back(SpatialTransformer(
            layout.out, layout.heads, layout.transformer_layers, o));
        attention_list->push_back(attentions.back());
      }
    }
    if (layout.resample) {
      auto sampler = std::make_shared<torch::nn::Module>();
      resample = sampler->register_module(
          "conv",
          StyleInjectConv2d(torch::nn::Conv2dOptions(layout.out, layout.out, 3)
                                .stride(up ? 1 : 2)
                                .padding(up ? 1 : downsample_padding)));
      register_module(
          up ? "upsamplers" : "downsamplers", torch::nn::ModuleList())
          ->push_back(sampler);
    }
  }
  torch::Tensor forward(
      torch::Tensor h,
      const torch::Tensor& temb,
      const torch::Tensor& context,
      std::vector<torch::Tensor>& skips) {
    for (size_t j = 0; j < resnets.size(); ++j) {
      if (up) {
        h = torch::cat({h, skips.back()}, 1);
        skips.pop_back();
      }
      h = resnets[j](h, temb);
      if (!attentions.empty()) {
        h = attentions[j](h, context);
      }
      if (!up) {
        skips.push_back(h);
      }
    }
    if (resample && up) {
      // To the next skip's size: 2x, or what an odd size was halved from.
      const auto size = skips.back().sizes().slice(2).vec();
      h = resample(F::interpolate(
          h, F::InterpolateFuncOptions().size(size).mode(torch::kNearest)));
    } else if (resample) {
      if (downsample_padding == 0) { // diffusers pads right and bottom
        h = F::pad(h, F::PadFuncOptions({0, 1, 0, 1}));
      }
      h = resample(h);
      skips.push_back(h);
    }
    return h;
  }
  bool up;
  int64_t downsample_padding;
  std::vector<ResnetBlock2D> resnets;
  std::vector<SpatialTransformer> attentions;
  StyleInjectConv2d resample{nullptr};
};
TORCH_MODULE(UNetBlock);

/// diffusers' UNetMidBlock2DCrossAttn: a ResNet block, then (transformer,
/// ResNet block) once.
struct MidBlockImpl : torch::nn::Module {
  MidBlockImpl(
      int64_t channels,
      int64_t heads,
      int64_t depth,
      const BlockOptions& o) {
    auto resnet_list = register_module("resnets", torch::nn::ModuleList());
    auto attention_list =
        register_module("attentions", torch::nn::ModuleList());
    for (int i = 0; i < 2; ++i) {
      resnets.push_back(ResnetBlock2D(channels, channels, o));
      resnet_list->push_back(resnets.back());
    }
    attention = SpatialTransformer(channels, heads, depth, o);
    attention_list->push_back(attention);
  }
  torch::Tensor forward(
      const torch::Tensor& x,
      const torch::Tensor& temb,
      const torch::Tensor& context) {
    const auto h = resnets[0](x, temb);
    return resnets[1](attention(h, context), temb);
  }
  std::vector<ResnetBlock2D> resnets;
  SpatialTransformer attention{nullptr};
};
TORCH_MODULE(MidBlock);

/// The sizes of a UNet2DConditionModel, read from its config.json.
struct UNetConfig {
  int64_t in_channels = 4, out_channels = 4;
  bool center_input_sample = false, flip_sin_to_cos = true;
  double freq_shift = 0;
  std::vector<BlockLayout> down, up;
  int64_t mid_heads = 8, mid_transformer_layers = 1;
  std::vector<int64_t> block_out_channels;
  int64_t downsample_padding = 1, time_embed_dim = 1280;
  int64_t conv_in_kernel = 3, conv_out_kernel = 3;
  double mid_block_scale_factor = 1.0;
  BlockOptions block; // temb, groups, eps, cross dim, projection
  // SDXL's "text_time" addition: time_ids' features and the MLP's input.
  bool text_time = false;
  int64_t addition_time_embed_dim = 0, projection_input_dim = 0;

  static UNetConfig from(Config& c);
};

/// Refuses the features this port does not build: each must be absent or
/// keep diffusers' default.
inline void refuse_unbuilt_features(Config& c) {
  c.require("only_cross_attention", {false});
  c.require("mid_block_only_cross_attention", {nullptr, false});
  c.require("dual_cross_attention", {false});
  c.require("mid_block_type", {"UNetMidBlock2DCrossAttn"});
  c.require("act_fn", {"silu"});
  c.require("dropout", {0.0});
  c.require("encoder_hid_dim", {nullptr});
  c.require("encoder_hid_dim_type", {nullptr});
  c.require("num_attention_heads", {nullptr});
  c.require("class_embed_type", {nullptr});
  c.require("num_class_embeds", {nullptr});
  c.require("addition_embed_type", {nullptr, "text_time"});
  c.require("resnet_time_scale_shift", {"default"});
  c.require("resnet_skip_time_act", {false});
  c.require("time_embedding_type", {"positional"});
  c.require("time_embedding_act_fn", {nullptr});
  c.require("timestep_post_act", {nullptr});
  c.require("time_cond_proj_dim", {nullptr});
  c.require("attention_type", {"default"});
  c.require("class_embeddings_concat", {false});
  c.require("cross_attention_norm", {nullptr});
  // Without effect here: diffusers' default attention (PyTorch's fused
  // attention) ignores upcast_attention too, and the heads of a
  // "text_image" embedding, which is refused above.
  c.ignore({"upcast_attention", "addition_embed_type_num_heads"});
}

/// Whether the block type `type` at `key` is `with_attention` rather than
/// `plain`; any other type is refused.
inline bool has_attention(
    const Config& c,
    const std::string& key,
    const std::string& type,
    const std::string& plain,
    const std::string& with_attention) {
  TORCH_CHECK(
      type == plain || type == with_attention,
      c.context(),
      ": \"",
      key,
      "\": block type \"",
      type,
      "\" is not supported by this port (supported: \"",
      plain,
      "\", \"",
      with_attention,
      "\")");
  return type == with_attention;
}

/// The down, mid and up blocks' layouts, as diffusers lays them out: the up
/// blocks mirror the down blocks, each with one ResNet more.
inline void read_block_layouts(Config& c, UNetConfig& u) {
  const auto down_types = c.get<std::vector<std::string>>(
      "down_block_types",
      {"CrossAttnDownBlock2D",
       "CrossAttnDownBlock2D",
       "CrossAttnDownBlock2D",
       "DownBlock2D"});
  const auto up_types = c.get<std::vector<std::string>>(
      "up_block_types",
      {"UpBlock2D",
       "CrossAttnUpBlock2D",
       "CrossAttnUpBlock2D",
       "CrossAttnUpBlock2D"});
  const auto& channels = u.block_out_channels;
  const size_t blocks = channels.size();
  TORCH_CHECK(
      blocks > 0 && down_types.size() == blocks && up_types.size() == blocks,
      c.context(),
      ": expected as many \"down_block_types\" and \"up_block_types\" as "
      "\"block_out_channels\" (",
      blocks,
      "), but got ",
      down_types.size(),
      " and ",
      up_types.size());
  const auto layers = c.per_block("layers_per_block", blocks, 2);
  // diffusers' quirk: attention_head_dim gives the number of heads.
  const auto heads = c.per_block("attention_head_dim", blocks, 8);
  const auto depth = c.per_block("transformer_layers_per_block", blocks, 1);
  auto up_depth = depth;
  std::reverse(up_depth.begin(), up_depth.end());
  if (c.has("reverse_transformer_layers_per_block")) {
    up_depth = c.per_block("reverse_transformer_layers_per_block", blocks, 1);
  }
  c.ignore({"reverse_transformer_layers_per_block"});
  for (size_t i = 0; i < blocks; ++i) {
    BlockLayout b;
    b.in = channels[i == 0 ? 0 : i - 1];
    b.out = channels[i];
    b.layers = layers[i];
    b.attention = has_attention(
        c,
        "down_block_types",
        down_types[i],
        "DownBlock2D",
        "CrossAttnDownBlock2D");
    b.heads = heads[i];
    b.transformer_layers = depth[i];
    b.resample = i + 1 < blocks;
    u.down.push_back(b);
  }
  for (size_t i = 0; i < blocks; ++i) {
    const size_t r = blocks - 1 - i; // the matching down block
    BlockLayout b;
    b.in = channels[r == 0 ? 0 : r - 1];
    b.out = channels[r];
    b.layers = layers[r] + 1;
    b.attention = has_attention(
        c, "up_block_types", up_types[i], "UpBlock2D", "CrossAttnUpBlock2D");
    b.heads = heads[r];
    b.transformer_layers = up_depth[i];
    b.resample = i + 1 < blocks;
    u.up.push_back(b);
  }
  u.mid_heads = heads.back();
  u.mid_transformer_layers = depth.back();
}

/// Reads `c` as diffusers' UNet2DConditionModel.__init__ does; a feature
/// this port does not build is refused naming its key and value.
inline UNetConfig UNetConfig::from(Config& c) {
  refuse_unbuilt_features(c);
  UNetConfig u;
  c.get<int64_t>("sample_size", 64); // checked; pipelines' default size
  u.in_channels = c.get<int64_t>("in_channels", 4);
  u.out_channels = c.get<int64_t>("out_channels", 4);
  u.center_input_sample = c.get<bool>("center_input_sample", false);
  u.flip_sin_to_cos = c.get<bool>("flip_sin_to_cos", true);
  u.freq_shift = c.get<double>("freq_shift", 0.0);
  u.block_out_channels =
      c.get<std::vector<int64_t>>("block_out_channels", {320, 640, 1280, 1280});
  read_block_layouts(c, u);
  u.downsample_padding = c.get<int64_t>("downsample_padding", 1);
  u.mid_block_scale_factor = c.get<double>("mid_block_scale_factor", 1.0);
  u.conv_in_kernel = c.get<int64_t>("conv_in_kernel", 3);
  u.conv_out_kernel = c.get<int64_t>("conv_out_kernel", 3);
  u.time_embed_dim =
      c.get<int64_t>("time_embedding_dim", 4 * u.block_out_channels[0]);
  u.block.temb_channels = u.time_embed_dim;
  u.block.groups = c.get<int64_t>("norm_num_groups", 32);
  u.block.eps = c.get<double>("norm_eps", 1e-5);
  u.block.cross_attention_dim = c.get<int64_t>("cross_attention_dim", 1280);
  u.block.linear_projection = c.get<bool>("use_linear_projection", false);
  u.block.output_scale_factor = c.get<double>("resnet_out_scale_factor", 1.0);
  u.text_time = c.get<std::string>("addition_embed_type", "") == "text_time";
  if (u.text_time) {
    u.addition_time_embed_dim = c.get<int64_t>("addition_time_embed_dim");
    u.projection_input_dim =
        c.get<int64_t>("projection_class_embeddings_input_dim");
  }
  c.ignore(
      {"addition_time_embed_dim", "projection_class_embeddings_input_dim"});
  c.finish();
  return u;
}

/// diffusers' UNet2DConditionModel.
struct UNet2DConditionModelImpl : DenoiserImpl {
  explicit UNet2DConditionModelImpl(UNetConfig config)
      : config(std::move(config)) {
    const auto& u = this->config;
    const auto c0 = u.block_out_channels.front();
    const auto conv = [](int64_t from, int64_t to, int64_t kernel) {
      return StyleInjectConv2d(
          torch::nn::Conv2dOptions(from, to, kernel).padding((kernel - 1) / 2));
    };
    conv_in =
        register_module("conv_in", conv(u.in_channels, c0, u.conv_in_kernel));
    time_embedding = register_module(
        "time_embedding", TimestepEmbedding(c0, u.time_embed_dim));
    if (u.text_time) {
      add_embedding = register_module(
          "add_embedding",
          TimestepEmbedding(u.projection_input_dim, u.time_embed_dim));
    }
    auto down_list = register_module("down_blocks", torch::nn::ModuleList());
    for (const auto& layout : u.down) {
      down_blocks.push_back(
          UNetBlock(layout, 0, false, u.downsample_padding, u.block));
      down_list->push_back(down_blocks.back());
    }
    auto mid_options = u.block;
    mid_options.output_scale_factor = u.mid_block_scale_factor;
    mid_block = register_module(
        "mid_block",
        MidBlock(
            u.block_out_channels.back(),
            u.mid_heads,
            u.mid_transformer_layers,
            mid_options));
    auto up_list = register_module("up_blocks", torch::nn::ModuleList());
    int64_t prev_out = u.block_out_channels.back();
    for (const auto& layout : u.up) {
      up_blocks.push_back(UNetBlock(layout, prev_out, true, 1, u.block));
      up_list->push_back(up_blocks.back());
      prev_out = layout.out;
    }
    conv_norm_out = register_module(
        "conv_norm_out",
        torch::nn::GroupNorm(
            torch::nn::GroupNormOptions(u.block.groups, c0).eps(u.block.eps)));
    conv_out = register_module(
        "conv_out", conv(c0, u.out_channels, u.conv_out_kernel));
  }

  /// The timestep embedding, plus SDXL's text and size conditioning.
  torch::Tensor embedding(const Inputs& in) {
    const auto& u = config;
    const auto n = in.sample.size(0);
    const auto dtype = in.sample.scalar_type();
    auto emb = time_embedding(timestep_features(
                                  per_sample(in.timestep, n),
                                  u.block_out_channels.front(),
                                  u.flip_sin_to_cos,
                                  u.freq_shift)
                                  .to(dtype));
    if (u.text_time) {
      TORCH_CHECK(
          in.text_embeds.defined() && in.time_ids.defined(),
          "this UNet's config has addition_embed_type \"text_time\" (SDXL): "
          "the inputs need \"text_embeds\" and \"time_ids\"");
      const auto time_features = timestep_features(
          in.time_ids.flatten(),
          u.addition_time_embed_dim,
          u.flip_sin_to_cos,
          u.freq_shift);
      emb = emb +
          add_embedding(
                torch::cat({in.text_embeds, time_features.reshape({n, -1})}, -1)
                    .to(dtype));
    }
    return emb;
  }

  Inputs example_inputs(
      int64_t batch,
      int64_t size,
      int64_t tokens,
      const torch::TensorOptions& options) const override {
    const auto& u = config;
    auto in = random_inputs(
        batch,
        u.in_channels,
        size,
        tokens,
        u.block.cross_attention_dim,
        options);
    if (u.text_time) { // SDXL: 6 size and crop numbers, the pooled text
      in.time_ids = torch::full({batch, 6}, double(8 * size), options);
      in.text_embeds = torch::randn(
          {batch, u.projection_input_dim - 6 * u.addition_time_embed_dim},
          options);
    }
    return in;
  }

  torch::Tensor forward(const Inputs& in) override {
    const auto& sample = in.sample;
    TORCH_CHECK(
        sample.dim() == 4 && sample.size(1) == config.in_channels,
        "sample: expected shape [N, ",
        config.in_channels,
        ", H, W], but got ",
        sample.sizes());
    const auto emb = embedding(in);
    const auto& context = in.encoder_hidden_states;
    auto h = conv_in(config.center_input_sample ? 2 * sample - 1 : sample);
    std::vector<torch::Tensor> skips{h};
    for (auto& block : down_blocks) {
      h = block(h, emb, context, skips);
    }
    h = mid_block(h, emb, context);
    for (auto& block : up_blocks) {
      h = block(h, emb, context, skips);
    }
    return conv_out(F::silu(conv_norm_out(h)));
  }

  UNetConfig config;
  StyleInjectConv2d conv_in{nullptr}, conv_out{nullptr};
  TimestepEmbedding time_embedding{nullptr}, add_embedding{nullptr};
  std::vector<UNetBlock> down_blocks, up_blocks;
  MidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(UNet2DConditionModel);

} // namespace diffusers
