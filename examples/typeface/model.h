#pragma once
// A miniature Stable-Diffusion-style model built from the library's layers:
// a text encoder (token embedding + transformer) and a denoiser, either a
// UNet of Conv2d ResBlocks with a timestep embedding and spatial-transformer
// blocks (self- and cross-attention to the text), or a DiT of transformer
// blocks with adaLN-Zero modulation and cross-attention. Every Linear and
// Conv2d is declared as a StyleInject layer without an adapter: it computes,
// trains and checkpoints as the plain torch::nn layer until
// `styleinject::inject` attaches one. Last, the glyph classifier of the
// evaluation (plain torch::nn).

#include <styleinject/styleinject.h>

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace typeface {

namespace F = torch::nn::functional;
using styleinject::StyleInjectConv2d;
using styleinject::StyleInjectLinear;

/// The architecture and sizes of the model: a UNet (`arch` "unet", sized
/// by `channels`) or a DiT ("dit", sized by `width`, `depth` and `patch`),
/// with the same text encoder. `small` is the example's default, `tiny` the
/// tests' and the smoke run's.
struct ModelConfig {
  std::string arch = "unet";
  int64_t image_size = 32;
  std::vector<int64_t> channels = {32, 64, 96}; // per UNet level
  int64_t width = 128; // DiT tokens
  int64_t depth = 6; // DiT blocks
  int64_t patch = 4; // DiT patch side, in pixels
  int64_t text_dim = 64;
  int64_t text_layers = 2;
  int64_t heads = 4;
  int64_t vocabulary = 0; // from the Tokenizer
  int64_t context = 10; // caption length in tokens

  static ModelConfig small(const std::string& arch = "unet") {
    ModelConfig config;
    config.arch = arch;
    return config;
  }
  static ModelConfig tiny(const std::string& arch = "unet") {
    ModelConfig config;
    config.arch = arch;
    config.image_size = 16;
    config.channels = {8, 16, 16};
    config.width = 16;
    config.depth = 2;
    config.patch = 4;
    config.text_dim = 16;
    config.text_layers = 1;
    config.heads = 2;
    return config;
  }
  bool is_dit() const {
    return arch == "dit";
  }
  /// Features of the sinusoidal timestep embedding, and of the condition
  /// (timestep + pooled text) that it becomes.
  int64_t time_features() const {
    return is_dit() ? width : channels.at(0);
  }
  int64_t condition_dim() const {
    return is_dit() ? width : 4 * channels.at(0);
  }
  nlohmann::json to_json() const {
    nlohmann::json json = {
        {"arch", arch},
        {"image_size", image_size},
        {"text_dim", text_dim},
        {"text_layers", text_layers},
        {"heads", heads},
        {"vocabulary", vocabulary},
        {"context", context}};
    if (is_dit()) {
      json["width"] = width;
      json["depth"] = depth;
      json["patch"] = patch;
    } else {
      json["channels"] = channels;
    }
    return json;
  }
  /// Reads `to_json`'s object; one without "arch" (before 0.8) is a UNet.
  static ModelConfig from_json(const nlohmann::json& json) {
    ModelConfig config;
    config.arch = json.value("arch", std::string("unet"));
    config.image_size = json.at("image_size");
    if (config.is_dit()) {
      config.width = json.at("width");
      config.depth = json.at("depth");
      config.patch = json.at("patch");
    } else {
      config.channels = json.at("channels").get<std::vector<int64_t>>();
    }
    config.text_dim = json.at("text_dim");
    config.text_layers = json.at("text_layers");
    config.heads = json.at("heads");
    config.vocabulary = json.at("vocabulary");
    config.context = json.at("context");
    return config;
  }
};

// Normalisation layers get float32 input: LibTorch 1.13's CPU autocast
// leaves group_norm and layer_norm out of its float32 list, and a bfloat16
// input then meets their float32 weights. A no-op without autocast.
inline torch::Tensor in_float32(const torch::Tensor& x) {
  return x.to(torch::kFloat);
}

/// Multi-head attention of `x` to `context` (self-attention when they are
/// the same tensor). x: (N, L, dim), context: (N, S, context_dim) ->
/// (N, L, dim).
struct AttentionImpl : torch::nn::Module {
  AttentionImpl(int64_t dim, int64_t context_dim, int64_t heads)
      : heads(heads),
        to_q(register_module("to_q", StyleInjectLinear(dim, dim))),
        to_k(register_module("to_k", StyleInjectLinear(context_dim, dim))),
        to_v(register_module("to_v", StyleInjectLinear(context_dim, dim))),
        to_out(register_module("to_out", StyleInjectLinear(dim, dim))) {
    TORCH_CHECK(dim % heads == 0, "dim ", dim, " is not a multiple of heads");
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context) {
    const auto split =
        [&](const torch::Tensor& t) { // (N, L, h, d) -> (N, h, L, d)
          return t.view({t.size(0), t.size(1), heads, -1}).transpose(1, 2);
        };
    const auto q = split(to_q(x)), k = split(to_k(context)),
               v = split(to_v(context));
    const auto weights = torch::softmax(
        q.matmul(k.transpose(-2, -1)) / std::sqrt(q.size(-1)), -1);
    const auto y = weights.matmul(v).transpose(1, 2).reshape(x.sizes());
    return to_out(y);
  }
  int64_t heads;
  StyleInjectLinear to_q, to_k, to_v, to_out;
};
TORCH_MODULE(Attention);

/// Two-layer MLP of a transformer block. x: (N, L, dim) -> (N, L, dim).
struct FeedForwardImpl : torch::nn::Module {
  explicit FeedForwardImpl(int64_t dim)
      : fc1(register_module("fc1", StyleInjectLinear(dim, 4 * dim))),
        fc2(register_module("fc2", StyleInjectLinear(4 * dim, dim))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return fc2(torch::gelu(fc1(x)));
  }
  StyleInjectLinear fc1, fc2;
};
TORCH_MODULE(FeedForward);

/// The text encoder: token and position embeddings, pre-norm transformer
/// blocks. ids: (N, L) int64 -> (N, L, text_dim).
struct TextEncoderImpl : torch::nn::Module {
  explicit TextEncoderImpl(const ModelConfig& c) {
    embed = register_module(
        "embed", torch::nn::Embedding(c.vocabulary, c.text_dim));
    position = register_parameter(
        "position", torch::randn({c.context, c.text_dim}) * 0.02);
    for (int64_t i = 0; i < c.text_layers; ++i) {
      norms1.push_back(register_module(
          "norm1_" + std::to_string(i),
          torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.text_dim}))));
      attentions.push_back(register_module(
          "attn_" + std::to_string(i),
          Attention(c.text_dim, c.text_dim, c.heads)));
      norms2.push_back(register_module(
          "norm2_" + std::to_string(i),
          torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.text_dim}))));
      mlps.push_back(
          register_module("ff_" + std::to_string(i), FeedForward(c.text_dim)));
    }
    final_norm = register_module(
        "final_norm",
        torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.text_dim})));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto h = embed(ids) + position.slice(0, 0, ids.size(1));
    for (size_t i = 0; i < attentions.size(); ++i) {
      const auto a = norms1[i](in_float32(h));
      h = h + attentions[i](a, a);
      h = h + mlps[i](norms2[i](in_float32(h)));
    }
    return final_norm(in_float32(h));
  }
  torch::nn::Embedding embed{nullptr};
  torch::Tensor position;
  std::vector<torch::nn::LayerNorm> norms1, norms2;
  std::vector<Attention> attentions;
  std::vector<FeedForward> mlps;
  torch::nn::LayerNorm final_norm{nullptr};
};
TORCH_MODULE(TextEncoder);

inline torch::nn::GroupNorm group_norm(int64_t channels) {
  return torch::nn::GroupNorm(
      torch::nn::GroupNormOptions(std::min<int64_t>(8, channels), channels));
}

inline StyleInjectConv2d conv3x3(int64_t in, int64_t out, int64_t stride = 1) {
  return StyleInjectConv2d(
      torch::nn::Conv2dOptions(in, out, 3).stride(stride).padding(1));
}

/// ResBlock with the timestep added between its two convolutions.
/// x: (N, in, H, W), time: (N, time_dim) -> (N, out, H, W).
struct ResBlockImpl : torch::nn::Module {
  ResBlockImpl(int64_t in, int64_t out, int64_t time_dim)
      : norm1(register_module("norm1", group_norm(in))),
        conv1(register_module("conv1", conv3x3(in, out))),
        time(register_module("time", StyleInjectLinear(time_dim, out))),
        norm2(register_module("norm2", group_norm(out))),
        conv2(register_module("conv2", conv3x3(out, out))) {
    if (in != out) {
      skip = register_module(
          "skip", StyleInjectConv2d(torch::nn::Conv2dOptions(in, out, 1)));
    }
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t) {
    auto h = conv1(torch::silu(norm1(in_float32(x))));
    h = h + time(t).unsqueeze(-1).unsqueeze(-1);
    h = conv2(torch::silu(norm2(in_float32(h))));
    return h + (skip ? skip(x) : x);
  }
  torch::nn::GroupNorm norm1;
  StyleInjectConv2d conv1;
  StyleInjectLinear time;
  torch::nn::GroupNorm norm2;
  StyleInjectConv2d conv2;
  StyleInjectConv2d skip{nullptr};
};
TORCH_MODULE(ResBlock);

/// Spatial transformer: the feature map as H*W tokens through self-
/// attention, cross-attention to the text and an MLP.
/// x: (N, C, H, W), context: (N, S, text_dim) -> (N, C, H, W).
struct SpatialTransformerImpl : torch::nn::Module {
  SpatialTransformerImpl(int64_t channels, int64_t text_dim, int64_t heads)
      : norm(register_module("norm", group_norm(channels))),
        proj_in(
            register_module("proj_in", StyleInjectLinear(channels, channels))),
        norm1(register_module(
            "norm1",
            torch::nn::LayerNorm(torch::nn::LayerNormOptions({channels})))),
        attn1(register_module("attn1", Attention(channels, channels, heads))),
        norm2(register_module(
            "norm2",
            torch::nn::LayerNorm(torch::nn::LayerNormOptions({channels})))),
        attn2(register_module("attn2", Attention(channels, text_dim, heads))),
        norm3(register_module(
            "norm3",
            torch::nn::LayerNorm(torch::nn::LayerNormOptions({channels})))),
        ff(register_module("ff", FeedForward(channels))),
        proj_out(register_module(
            "proj_out",
            StyleInjectLinear(channels, channels))) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context) {
    const auto n = x.size(0), c = x.size(1), hgt = x.size(2), wdt = x.size(3);
    auto h =
        proj_in(norm(in_float32(x)).flatten(2).transpose(1, 2)); // (N, HW, C)
    const auto a = norm1(in_float32(h));
    h = h + attn1(a, a);
    h = h + attn2(norm2(in_float32(h)), context);
    h = h + ff(norm3(in_float32(h)));
    return x + proj_out(h).transpose(1, 2).reshape({n, c, hgt, wdt});
  }
  torch::nn::GroupNorm norm;
  StyleInjectLinear proj_in;
  torch::nn::LayerNorm norm1;
  Attention attn1;
  torch::nn::LayerNorm norm2;
  Attention attn2;
  torch::nn::LayerNorm norm3;
  FeedForward ff;
  StyleInjectLinear proj_out;
};
TORCH_MODULE(SpatialTransformer);

/// Sinusoidal embedding of the diffusion timestep. t: (N,) -> (N, dim).
inline torch::Tensor timestep_embedding(const torch::Tensor& t, int64_t dim) {
  const auto half = dim / 2;
  const auto frequencies = torch::exp(
      -std::log(10000.0) *
      torch::arange(half, torch::dtype(torch::kFloat).device(t.device())) /
      half);
  const auto angles = t.to(torch::kFloat).unsqueeze(1) * frequencies;
  return torch::cat({angles.sin(), angles.cos()}, 1);
}

/// adaLN's modulation of normalised tokens by the condition's shift and
/// scale. x: (N, L, dim), shift and scale: (N, dim).
inline torch::Tensor modulate(
    const torch::Tensor& x,
    const torch::Tensor& shift,
    const torch::Tensor& scale) {
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1);
}

/// LayerNorm without weights of its own: adaLN supplies shift and scale.
inline torch::nn::LayerNorm plain_layer_norm(int64_t dim) {
  return torch::nn::LayerNorm(
      torch::nn::LayerNormOptions({dim}).elementwise_affine(false).eps(1e-6));
}

/// A Linear whose weight and bias start at zero: adaLN-Zero's modulation and
/// the DiT's output, so that each block starts as the identity.
inline StyleInjectLinear zero_linear(int64_t in, int64_t out) {
  StyleInjectLinear linear(in, out);
  torch::NoGradGuard no_grad;
  linear->weight.zero_();
  linear->bias.zero_();
  return linear;
}

/// A DiT block (Peebles & Xie) with cross-attention to the text between its
/// self-attention and MLP (as PixArt-alpha): adaLN-Zero modulates and gates
/// the self-attention and the MLP from the condition.
/// x: (N, L, dim), condition: (N, dim) after SiLU, context: (N, S,
/// text_dim) -> (N, L, dim).
struct DiTBlockImpl : torch::nn::Module {
  DiTBlockImpl(int64_t dim, int64_t text_dim, int64_t heads)
      : modulation(register_module("modulation", zero_linear(dim, 6 * dim))),
        norm1(register_module("norm1", plain_layer_norm(dim))),
        attn1(register_module("attn1", Attention(dim, dim, heads))),
        norm2(register_module(
            "norm2",
            torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})))),
        attn2(register_module("attn2", Attention(dim, text_dim, heads))),
        norm3(register_module("norm3", plain_layer_norm(dim))),
        ff(register_module("ff", FeedForward(dim))) {}
  torch::Tensor forward(
      torch::Tensor x,
      const torch::Tensor& condition,
      const torch::Tensor& context) {
    // shift, scale and gate of the self-attention, then of the MLP.
    const auto m = modulation(condition).chunk(6, 1);
    const auto a = modulate(norm1(in_float32(x)), m[0], m[1]);
    x = x + m[2].unsqueeze(1) * attn1(a, a);
    x = x + attn2(norm2(in_float32(x)), context);
    return x +
        m[5].unsqueeze(1) * ff(modulate(norm3(in_float32(x)), m[3], m[4]));
  }
  StyleInjectLinear modulation;
  torch::nn::LayerNorm norm1;
  Attention attn1;
  torch::nn::LayerNorm norm2;
  Attention attn2;
  torch::nn::LayerNorm norm3;
  FeedForward ff;
};
TORCH_MODULE(DiTBlock);

/// The image that tokens of patch x patch pixels make, the tokens in rows
/// as a strided Conv2d's output flattens them.
/// tokens: (N, L, patch * patch) with L a square -> (N, 1, S, S).
inline torch::Tensor unpatchify(const torch::Tensor& tokens, int64_t patch) {
  const auto n = tokens.size(0);
  const auto side =
      static_cast<int64_t>(std::lround(std::sqrt(tokens.size(1))));
  TORCH_CHECK(
      side * side == tokens.size(1) && tokens.size(2) == patch * patch,
      "unpatchify: expected (N, side^2, ",
      patch * patch,
      ") tokens, but got ",
      tokens.sizes());
  // (N, row, col, p, p) -> (N, row, p, col, p)
  return tokens.reshape({n, side, side, patch, patch})
      .permute({0, 1, 3, 2, 4})
      .reshape({n, 1, side * patch, side * patch});
}

/// The DiT backbone: the image cut into patch x patch tokens (a strided
/// Conv2d) with learned positions, `depth` blocks, and an adaLN-modulated
/// output layer that puts the patches back.
/// x: (N, 1, S, S), condition: (N, width), context: (N, S', text_dim) ->
/// (N, 1, S, S).
struct DiTImpl : torch::nn::Module {
  explicit DiTImpl(const ModelConfig& c) : patch(c.patch) {
    TORCH_CHECK(
        c.image_size % c.patch == 0,
        "DiT: image size ",
        c.image_size,
        " is not a multiple of the patch size ",
        c.patch);
    const auto tokens = (c.image_size / c.patch) * (c.image_size / c.patch);
    patchify = register_module(
        "patchify",
        StyleInjectConv2d(
            torch::nn::Conv2dOptions(1, c.width, c.patch).stride(c.patch)));
    position =
        register_parameter("position", torch::randn({tokens, c.width}) * 0.02);
    for (int64_t i = 0; i < c.depth; ++i) {
      blocks.push_back(register_module(
          "block" + std::to_string(i), DiTBlock(c.width, c.text_dim, c.heads)));
    }
    norm_out = register_module("norm_out", plain_layer_norm(c.width));
    modulation_out =
        register_module("modulation_out", zero_linear(c.width, 2 * c.width));
    proj_out =
        register_module("proj_out", zero_linear(c.width, c.patch * c.patch));
  }
  torch::Tensor forward(
      const torch::Tensor& x,
      const torch::Tensor& condition,
      const torch::Tensor& context) {
    auto h = patchify(x).flatten(2).transpose(1, 2) + position; // (N, L, D)
    const auto c = torch::silu(condition);
    for (auto& block : blocks) {
      h = block(h, c, context);
    }
    const auto m = modulation_out(c).chunk(2, 1);
    return unpatchify(
        proj_out(modulate(norm_out(in_float32(h)), m[0], m[1])), patch);
  }
  int64_t patch;
  StyleInjectConv2d patchify{nullptr};
  torch::Tensor position;
  std::vector<DiTBlock> blocks;
  torch::nn::LayerNorm norm_out{nullptr};
  StyleInjectLinear modulation_out{nullptr}, proj_out{nullptr};
};
TORCH_MODULE(DiT);

/// The denoiser: predicts v = sqrt(a) eps - sqrt(1 - a) x0 (see
/// diffusion.h) from x_t, t and the caption, with a UNet or a DiT
/// (`config.arch`). Both see the caption's tokens through cross-attention,
/// and a condition made of the timestep and the caption's mean token.
/// The UNet has three levels (full, 1/2, 1/4 resolution) and attention at
/// the two lower ones and in the middle. Its modules sit at the top level,
/// the DiT's under `dit.`: the UNet's names are those of files written
/// before the DiT existed.
/// x: (N, 1, S, S), t: (N,), ids: (N, L) -> v: (N, 1, S, S).
struct TextToImageImpl : torch::nn::Module {
  explicit TextToImageImpl(const ModelConfig& c) : config(c) {
    TORCH_CHECK(
        c.arch == "unet" || c.arch == "dit",
        "expected the architecture \"unet\" or \"dit\", but got \"",
        c.arch,
        "\"");
    const auto td = c.condition_dim();
    text = register_module("text", TextEncoder(c));
    time1 = register_module("time1", StyleInjectLinear(c.time_features(), td));
    time2 = register_module("time2", StyleInjectLinear(td, td));
    text_pool = register_module("text_pool", StyleInjectLinear(c.text_dim, td));
    if (c.is_dit()) {
      dit = register_module("dit", DiT(c));
    } else {
      register_unet(c);
    }
  }

  torch::Tensor forward(
      const torch::Tensor& x,
      const torch::Tensor& t,
      const torch::Tensor& ids) {
    return denoise(x, t, text(ids));
  }

  /// The denoiser alone, for a text encoding computed once (as the sampler
  /// does).
  torch::Tensor denoise(
      const torch::Tensor& x,
      const torch::Tensor& t,
      const torch::Tensor& context) {
    // The caption's mean token joins the timestep embedding (as Imagen and
    // SDXL add a pooled text embedding): every ResBlock (or adaLN) sees the
    // prompt, not only the attention blocks, which speeds up learning it.
    const auto condition =
        time2(
            torch::silu(time1(timestep_embedding(t, config.time_features())))) +
        text_pool(context.mean(1));
    return dit ? dit(x, condition, context) : unet(x, condition, context);
  }

  ModelConfig config;
  TextEncoder text{nullptr};
  StyleInjectLinear time1{nullptr}, time2{nullptr}, text_pool{nullptr};
  DiT dit{nullptr};
  StyleInjectConv2d conv_in{nullptr}, downsample0{nullptr},
      downsample1{nullptr}, conv_out{nullptr};
  ResBlock down0{nullptr}, down1{nullptr}, mid1{nullptr}, mid2{nullptr},
      up1{nullptr}, up0{nullptr};
  SpatialTransformer down1_attn{nullptr}, mid_attn{nullptr}, up1_attn{nullptr};
  torch::nn::GroupNorm norm_out{nullptr};

 private:
  void register_unet(const ModelConfig& c) {
    TORCH_CHECK(c.channels.size() == 3, "expected 3 UNet levels");
    TORCH_CHECK(c.image_size % 4 == 0, "image size must be a multiple of 4");
    const auto c0 = c.channels[0], c1 = c.channels[1], c2 = c.channels[2];
    const auto td = c.condition_dim();
    conv_in = register_module("conv_in", conv3x3(1, c0));
    down0 = register_module("down0", ResBlock(c0, c0, td));
    downsample0 = register_module("downsample0", conv3x3(c0, c0, 2));
    down1 = register_module("down1", ResBlock(c0, c1, td));
    down1_attn = register_module(
        "down1_attn", SpatialTransformer(c1, c.text_dim, c.heads));
    downsample1 = register_module("downsample1", conv3x3(c1, c1, 2));
    mid1 = register_module("mid1", ResBlock(c1, c2, td));
    mid_attn = register_module(
        "mid_attn", SpatialTransformer(c2, c.text_dim, c.heads));
    mid2 = register_module("mid2", ResBlock(c2, c2, td));
    up1 = register_module("up1", ResBlock(c2 + c1, c1, td));
    up1_attn = register_module(
        "up1_attn", SpatialTransformer(c1, c.text_dim, c.heads));
    up0 = register_module("up0", ResBlock(c1 + c0, c0, td));
    norm_out = register_module("norm_out", group_norm(c0));
    conv_out = register_module("conv_out", conv3x3(c0, 1));
  }

  torch::Tensor unet(
      const torch::Tensor& x,
      const torch::Tensor& temb,
      const torch::Tensor& context) {
    const auto h0 = down0(conv_in(x), temb); // S
    const auto h1 = down1_attn(down1(downsample0(h0), temb), context); // S/2
    auto h = downsample1(h1); // S/4
    h = mid2(mid_attn(mid1(h, temb), context), temb);
    h = up1_attn(up1(torch::cat({upsample(h), h1}, 1), temb), context);
    h = up0(torch::cat({upsample(h), h0}, 1), temb);
    return conv_out(torch::silu(norm_out(in_float32(h))));
  }

  static torch::Tensor upsample(const torch::Tensor& x) {
    return F::interpolate(
        x,
        F::InterpolateFuncOptions()
            .scale_factor(std::vector<double>{2, 2})
            .mode(torch::kNearest));
  }
};
TORCH_MODULE(TextToImage);

/// The evaluation's glyph classifier: which character, and which font.
/// images: (N, 1, S, S) in [0, 1] -> (character logits (N, 62),
/// font logits (N, fonts)).
struct GlyphClassifierImpl : torch::nn::Module {
  GlyphClassifierImpl(int64_t image_size, int64_t characters, int64_t fonts)
      : features(register_module(
            "features",
            torch::nn::Sequential(
                torch::nn::Conv2d(
                    torch::nn::Conv2dOptions(1, 32, 3).padding(1)),
                torch::nn::ReLU(),
                torch::nn::Conv2d(
                    torch::nn::Conv2dOptions(32, 32, 3).padding(1)),
                torch::nn::ReLU(),
                torch::nn::MaxPool2d(2),
                torch::nn::Conv2d(
                    torch::nn::Conv2dOptions(32, 64, 3).padding(1)),
                torch::nn::ReLU(),
                torch::nn::MaxPool2d(2),
                torch::nn::Conv2d(
                    torch::nn::Conv2dOptions(64, 128, 3).padding(1)),
                torch::nn::ReLU(),
                torch::nn::AdaptiveAvgPool2d(2),
                torch::nn::Flatten(),
                torch::nn::Linear(512, 256),
                torch::nn::ReLU(),
                torch::nn::Dropout(0.2)))),
        character(
            register_module("character", torch::nn::Linear(256, characters))),
        font(register_module("font", torch::nn::Linear(256, fonts))),
        image_size(image_size) {}
  std::pair<torch::Tensor, torch::Tensor> forward(const torch::Tensor& images) {
    const auto h = features->forward(images);
    return {character(h), font(h)};
  }
  torch::nn::Sequential features;
  torch::nn::Linear character, font;
  int64_t image_size;
};
TORCH_MODULE(GlyphClassifier);

} // namespace typeface
