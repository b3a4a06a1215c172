#pragma once

// Helpers shared by the tests: the naive float64 reference of SPEC §1-3,
// random adapters, and the text of an error.

#include <styleinject/styleinject.h>

#include <torch/torch.h>

#include <catch2/catch.hpp>

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

namespace styleinject_test {

/// The small layer of the functional and gate tests.
constexpr int64_t kIn = 5, kOut = 4, kBranches = 3, kRank = 2;

/// The what() of the c10::Error that `f` throws, without LibTorch's
/// backtrace; "no error" if it throws none.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "no error";
}

/// Everything SPEC §1-3 needs, for the reference below.
struct ReferenceLinear {
  torch::Tensor weight, bias; // (d_out, d_in), (d_out)
  torch::Tensor lora_A, lora_B; // (n, r, d_in), (d_out, r)
  torch::Tensor router_weight, router_bias; // (n, d_in), (n); undefined: off
  torch::Tensor gate; // (n, d_out); undefined: off
  torch::Tensor style; // (n) or (N, n); undefined: router decides
  double scaling = 1.0;
  double scale = 1.0;
  double temperature = 1.0;
  /// SPEC §3b's variant; kScale uses `gate` (undefined: no gate).
  styleinject::GateMode gate_mode = styleinject::GateMode::kScale;
};

/// SPEC §3 and §3b on one channel of one instance, naively: the frozen
/// path's output h0 and the update dh over the tokens, and g = tanh(scale ·
/// s · G) of the scale gate -> h.
inline std::vector<double> reference_gate(
    const std::vector<double>& h0,
    const std::vector<double>& dh,
    styleinject::GateMode mode,
    double g) {
  const auto L = static_cast<double>(h0.size());
  std::vector<double> u(h0.size());
  double mean_u = 0, mean_h0 = 0, mean_dh = 0;
  for (size_t t = 0; t < h0.size(); ++t) {
    u[t] = h0[t] + dh[t];
    mean_u += u[t] / L;
    mean_h0 += h0[t] / L;
    mean_dh += dh[t] / L;
  }
  double var_u = 0, var_h0 = 0;
  for (size_t t = 0; t < h0.size(); ++t) {
    var_u += (u[t] - mean_u) * (u[t] - mean_u) / L;
    var_h0 += (h0[t] - mean_h0) * (h0[t] - mean_h0) / L;
  }
  const double eps = 1e-5;
  const double k = (std::sqrt(var_u) + eps) / (std::sqrt(var_h0) + eps);
  std::vector<double> h(h0.size());
  for (size_t t = 0; t < h0.size(); ++t) {
    switch (mode) {
      case styleinject::GateMode::kOff:
        h[t] = u[t];
        break;
      case styleinject::GateMode::kScale:
        h[t] = u[t] + g * (u[t] - mean_u);
        break;
      case styleinject::GateMode::kAdain:
        h[t] = mean_h0 + k * (h0[t] - mean_h0);
        break;
      case styleinject::GateMode::kResidual:
        h[t] = h0[t] + dh[t] - mean_dh;
        break;
    }
  }
  return h;
}

/// The gate mode of the reference on an input with or without tokens.
inline styleinject::GateMode reference_mode(
    const ReferenceLinear& p,
    bool has_tokens) {
  const bool off = !has_tokens ||
      (p.gate_mode == styleinject::GateMode::kScale && !p.gate.defined());
  return off ? styleinject::GateMode::kOff : p.gate_mode;
}

/// g = tanh(scale · s · G) of channel o (0 without G).
inline double reference_gate_factor(
    const ReferenceLinear& p,
    const torch::Tensor& G,
    const std::vector<double>& s,
    int64_t o) {
  if (!G.defined()) {
    return 0.0;
  }
  double mixed = 0.0;
  for (size_t j = 0; j < s.size(); ++j) {
    mixed += s[j] * G[static_cast<int64_t>(j)][o].item<double>();
  }
  return std::tanh(p.scale * mixed);
}

/// A tensor in float64 on the CPU, for the references.
inline torch::Tensor f64(const torch::Tensor& t) {
  return t.defined() ? t.detach().to(torch::kCPU, torch::kDouble).contiguous()
                     : t;
}

/// SPEC §1, naively: the style weights of instance i from its input
/// pooled over the tokens (Linear) or H×W (Conv2d), (d_in).
inline std::vector<double> reference_style(
    const ReferenceLinear& p,
    const std::vector<double>& pooled,
    int64_t i) {
  const auto R = f64(p.router_weight), c = f64(p.router_bias);
  const auto style = f64(p.style);
  const int64_t n = p.lora_A.size(0);
  std::vector<double> s(n, 1.0 / n);
  if (style.defined()) {
    for (int64_t j = 0; j < n; ++j) {
      s[j] = style.dim() == 1 ? style[j].item<double>()
                              : style[i][j].item<double>();
    }
  } else if (R.defined()) {
    std::vector<double> logits(n);
    double largest = -INFINITY, total = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      logits[j] = c[j].item<double>();
      for (size_t k = 0; k < pooled.size(); ++k) {
        logits[j] += R[j][static_cast<int64_t>(k)].item<double>() * pooled[k];
      }
      logits[j] /= p.temperature;
      largest = std::max(largest, logits[j]);
    }
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(logits[j] - largest);
      total += s[j];
    }
    for (int64_t j = 0; j < n; ++j) {
      s[j] /= total;
    }
  }
  return s;
}

/// The mean of instance i of x (N, L, d_in) over its tokens, (d_in).
inline std::vector<double> token_mean_of(const torch::Tensor& x, int64_t i) {
  auto xa = x.accessor<double, 3>();
  const int64_t L = x.size(1), d_in = x.size(2);
  std::vector<double> pooled(d_in, 0.0);
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t k = 0; k < d_in; ++k) {
      pooled[k] += xa[i][t][k] / L;
    }
  }
  return pooled;
}

/// SPEC §2, naively: the frozen path h0 = W0 x + b0 (with `base`) or the
/// update dh = scale * scaling * B (sum_j s_j A_j x) of instance i, per
/// channel and token: [d_out][L].
inline std::vector<std::vector<double>> reference_term(
    const ReferenceLinear& p,
    const torch::Tensor& x,
    int64_t i,
    const std::vector<double>& s,
    bool base) {
  const auto W = f64(p.weight), b = f64(p.bias);
  const auto A = f64(p.lora_A), B = f64(p.lora_B);
  const int64_t L = x.size(1), d_in = x.size(2);
  const int64_t d_out = W.size(0), n = A.size(0), r = A.size(1);
  auto xa = x.accessor<double, 3>();
  auto Wa = W.accessor<double, 2>();
  auto Aa = A.accessor<double, 3>();
  auto Ba = B.accessor<double, 2>();
  std::vector<std::vector<double>> out(d_out, std::vector<double>(L));
  for (int64_t t = 0; t < L; ++t) {
    std::vector<double> z(r, 0.0);
    for (int64_t j = 0; j < n && !base; ++j) {
      for (int64_t q = 0; q < r; ++q) {
        double a_x = 0.0;
        for (int64_t k = 0; k < d_in; ++k) {
          a_x += Aa[j][q][k] * xa[i][t][k];
        }
        z[q] += s[j] * a_x;
      }
    }
    for (int64_t o = 0; o < d_out; ++o) {
      double value = 0.0;
      if (base) {
        value = b.defined() ? b[o].item<double>() : 0.0;
        for (int64_t k = 0; k < d_in; ++k) {
          value += Wa[o][k] * xa[i][t][k];
        }
      } else {
        for (int64_t q = 0; q < r; ++q) {
          value += Ba[o][q] * z[q];
        }
        value *= p.scale * p.scaling;
      }
      out[o][t] = value;
    }
  }
  return out;
}

/// SPEC §1-3 written out naively in float64: explicit loops over instances,
/// tokens, branches and channels, explicit per-instance statistics.
/// x: (N, L, d_in) -> (N, L, d_out); `has_tokens` false means x came as
/// (N, d_in) (L = 1, and the gate is a no-op).
inline torch::Tensor reference_forward(
    const ReferenceLinear& p,
    const torch::Tensor& x_in,
    bool has_tokens) {
  const auto x = f64(x_in), G = f64(p.gate);
  const int64_t N = x.size(0), L = x.size(1), d_out = p.weight.size(0);
  auto out = torch::zeros({N, L, d_out}, torch::kDouble);
  auto oa = out.accessor<double, 3>();
  for (int64_t i = 0; i < N; ++i) {
    const auto s = reference_style(p, token_mean_of(x, i), i);
    const auto h0 = reference_term(p, x, i, s, /*base=*/true);
    const auto dh = reference_term(p, x, i, s, /*base=*/false);
    // §3: the gate, per channel over the tokens.
    for (int64_t o = 0; o < d_out; ++o) {
      const auto h = reference_gate(
          h0[o],
          dh[o],
          reference_mode(p, has_tokens),
          reference_gate_factor(p, G, s, o));
      for (int64_t t = 0; t < L; ++t) {
        oa[i][t][o] = h[t];
      }
    }
  }
  return out;
}

/// Several adapters on one base (the base from the first), naively: the
/// updates summed onto h0, then each adapter's scale gate (SPEC §3) applied
/// in turn to the result of the one before.
/// x: (N, L, d_in) -> (N, L, d_out)
inline torch::Tensor reference_sum_forward(
    const std::vector<ReferenceLinear>& adapters,
    const torch::Tensor& x_in,
    bool has_tokens) {
  const auto x = f64(x_in);
  const auto& first = adapters.front();
  const int64_t N = x.size(0), L = x.size(1), d_out = first.weight.size(0);
  auto out = torch::zeros({N, L, d_out}, torch::kDouble);
  auto oa = out.accessor<double, 3>();
  for (int64_t i = 0; i < N; ++i) {
    auto h = reference_term(first, x, i, {}, /*base=*/true);
    std::vector<std::vector<double>> styles;
    for (const auto& p : adapters) {
      styles.push_back(reference_style(p, token_mean_of(x, i), i));
      const auto dh = reference_term(p, x, i, styles.back(), /*base=*/false);
      for (int64_t o = 0; o < d_out; ++o) {
        for (int64_t t = 0; t < L; ++t) {
          h[o][t] += dh[o][t];
        }
      }
    }
    for (size_t k = 0; k < adapters.size(); ++k) {
      const auto& p = adapters[k];
      for (int64_t o = 0; o < d_out; ++o) {
        h[o] = reference_gate(
            h[o],
            std::vector<double>(L, 0.0),
            reference_mode(p, has_tokens),
            reference_gate_factor(p, f64(p.gate), styles[k], o));
      }
    }
    for (int64_t o = 0; o < d_out; ++o) {
      for (int64_t t = 0; t < L; ++t) {
        oa[i][t][o] = h[o][t];
      }
    }
  }
  return out;
}

/// The reference's adapter tensors for the functional forms, in `dtype`
/// (undefined ones stay so).
inline styleinject::functional::AdapterTensors adapter_of(
    const ReferenceLinear& p,
    torch::Dtype dtype = torch::kDouble) {
  const auto to = [&](const torch::Tensor& t) {
    return t.defined() ? t.to(dtype) : t;
  };
  return {
      to(p.lora_A),
      to(p.lora_B),
      to(p.router_weight),
      to(p.router_bias),
      to(p.gate)};
}

/// The reference's run-time settings as the functional forms take them.
inline styleinject::functional::StyleInjectFuncOptions options_of(
    const ReferenceLinear& p) {
  return styleinject::functional::StyleInjectFuncOptions()
      .scaling(p.scaling)
      .scale(p.scale)
      .temperature(p.temperature)
      .style(p.style)
      .gate(p.gate_mode);
}

/// Gives every adapter tensor of `layer` random, non-zero values, so that no
/// term of the forward is trivially zero.
template <typename Layer>
void randomize_adapter(Layer& layer) {
  torch::NoGradGuard no_grad;
  for (auto& parameter : layer.adapter_parameters()) {
    parameter.copy_(torch::randn_like(parameter) * 0.5);
  }
}

/// The reference's view of a module's adapter `name`, at strength `scale`.
template <typename Layer>
ReferenceLinear reference_of(
    const Layer& layer,
    double scale = 1.0,
    const std::string& name = styleinject::kDefaultAdapter) {
  const auto tensors = layer.adapter_tensors(name);
  const auto& options = layer.adapter_options_of(name);
  ReferenceLinear p;
  p.weight = layer.weight;
  p.bias = layer.bias;
  p.lora_A = tensors.lora_A;
  p.lora_B = tensors.lora_B;
  p.router_weight = tensors.router_weight;
  p.router_bias = tensors.router_bias;
  p.gate = tensors.gate;
  p.style = layer.style(name);
  p.scaling = options.scaling();
  p.scale = scale;
  p.temperature = options.temperature();
  p.gate_mode = options.gate();
  return p;
}

/// Whether `out` is within `fraction` of the reference's largest magnitude.
inline bool near_reference(
    const torch::Tensor& out,
    const torch::Tensor& reference,
    double fraction) {
  const double scale = reference.abs().max().item<double>();
  return (out.to(torch::kDouble) - reference).abs().max().item<double>() <
      fraction * scale;
}

/// Turns CPU autocast on for its lifetime (the call differs between LibTorch
/// 1.13 and 2.x).
struct CpuAutocast {
  CpuAutocast() {
    set(true);
  }
  ~CpuAutocast() {
    set(false);
    at::autocast::clear_cache();
  }
  static void set(bool enabled) {
#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    at::autocast::set_autocast_enabled(at::kCPU, enabled);
#else
    at::autocast::set_cpu_enabled(enabled);
#endif
  }
};

/// The gradients of a gradient penalty on `out`, |d(out · weights)/dx|² +
/// |out|², with respect to `inputs`: second derivatives through whatever
/// made `out` from x. Undefined for an input the penalty does not reach.
inline std::vector<torch::Tensor> penalty_gradients(
    const torch::Tensor& out,
    const torch::Tensor& x,
    const torch::Tensor& weights,
    const std::vector<torch::Tensor>& inputs) {
  const auto dx = torch::autograd::grad(
      {(out * weights).sum()},
      {x},
      {},
      /*retain_graph=*/true,
      /*create_graph=*/true)[0];
  return torch::autograd::grad(
      {dx.pow(2).sum() + out.pow(2).sum()},
      inputs,
      {},
      {},
      {},
      /*allow_unused=*/true);
}

/// What `f` returns, run with CPU autocast on if `on`.
template <typename F>
auto with_cpu_autocast(bool on, F&& f) {
  c10::optional<CpuAutocast> autocast;
  if (on) {
    autocast.emplace();
  }
  return f();
}

/// float64 closeness for results that only rounding separates.
inline bool close64(const torch::Tensor& a, const torch::Tensor& b) {
  return a.sizes() == b.sizes() &&
      torch::allclose(a.to(torch::kDouble), b.to(torch::kDouble), 1e-10, 1e-10);
}

/// The geometry of a convolution, for the Conv2d reference.
struct ConvGeometry {
  int64_t stride = 1, padding = 0, dilation = 1;
};

/// SPEC §1-3 for Conv2d, written out naively in float64: the convolutions as
/// explicit loops over output positions, channels and kernel taps; the
/// router on the spatial mean of the input; the gate's statistics over the
/// output's H×W. Tensors of `p` have the Conv2d layout of SPEC §5.
/// x: (N, C_in, H, W) -> (N, C_out, H', W')
inline torch::Tensor reference_conv2d_forward(
    const ReferenceLinear& p,
    const ConvGeometry& geometry,
    const torch::Tensor& x_in) {
  const auto x = f64(x_in), W = f64(p.weight), b = f64(p.bias);
  const auto A = f64(p.lora_A), B = f64(p.lora_B), G = f64(p.gate);
  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), Wd = x.size(3);
  const int64_t C_out = W.size(0), kH = W.size(2), kW = W.size(3);
  const int64_t n = A.size(0), r = A.size(1);
  const int64_t st = geometry.stride, pad = geometry.padding;
  const int64_t dil = geometry.dilation;
  const int64_t Ho = (H + 2 * pad - dil * (kH - 1) - 1) / st + 1;
  const int64_t Wo = (Wd + 2 * pad - dil * (kW - 1) - 1) / st + 1;
  auto xa = x.accessor<double, 4>();
  auto Wa = W.accessor<double, 4>();
  auto Aa = A.accessor<double, 5>();
  auto Ba = B.accessor<double, 4>();
  // The input at an output position's kernel tap; zero in the padding.
  const auto tap = [&](int64_t i,
                       int64_t ch,
                       int64_t y,
                       int64_t xo,
                       int64_t ky,
                       int64_t kx) {
    const int64_t iy = y * st - pad + ky * dil, ix = xo * st - pad + kx * dil;
    return iy < 0 || iy >= H || ix < 0 || ix >= Wd ? 0.0 : xa[i][ch][iy][ix];
  };
  auto out = torch::zeros({N, C_out, Ho, Wo}, torch::kDouble);
  auto oa = out.accessor<double, 4>();
  for (int64_t i = 0; i < N; ++i) {
    // §1: style weights of instance i, from the spatial mean of x.
    std::vector<double> pooled(C_in, 0.0);
    for (int64_t ch = 0; ch < C_in; ++ch) {
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t xo = 0; xo < Wd; ++xo) {
          pooled[ch] += xa[i][ch][y][xo] / (H * Wd);
        }
      }
    }
    const auto s = reference_style(p, pooled, i);
    // §2: h0 = W0 * x + b0 and dh = scale * scaling * B (sum_j s_j A_j *
    // x), kept per channel over the positions for §3.
    std::vector<std::vector<double>> h0(C_out, std::vector<double>(Ho * Wo));
    auto dh = h0;
    for (int64_t y = 0; y < Ho; ++y) {
      for (int64_t xo = 0; xo < Wo; ++xo) {
        std::vector<double> z(r, 0.0);
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t q = 0; q < r; ++q) {
            double a_x = 0.0;
            for (int64_t ch = 0; ch < C_in; ++ch) {
              for (int64_t ky = 0; ky < kH; ++ky) {
                for (int64_t kx = 0; kx < kW; ++kx) {
                  a_x += Aa[j][q][ch][ky][kx] * tap(i, ch, y, xo, ky, kx);
                }
              }
            }
            z[q] += s[j] * a_x;
          }
        }
        for (int64_t o = 0; o < C_out; ++o) {
          double u = b.defined() ? b[o].item<double>() : 0.0;
          for (int64_t ch = 0; ch < C_in; ++ch) {
            for (int64_t ky = 0; ky < kH; ++ky) {
              for (int64_t kx = 0; kx < kW; ++kx) {
                u += Wa[o][ch][ky][kx] * tap(i, ch, y, xo, ky, kx);
              }
            }
          }
          double update = 0.0;
          for (int64_t q = 0; q < r; ++q) {
            update += Ba[o][q][0][0] * z[q];
          }
          h0[o][y * Wo + xo] = u;
          dh[o][y * Wo + xo] = p.scale * p.scaling * update;
        }
      }
    }
    // §3: the gate, per channel over H'×W'.
    for (int64_t o = 0; o < C_out; ++o) {
      const auto h = reference_gate(
          h0[o],
          dh[o],
          reference_mode(p, /*has_tokens=*/true),
          reference_gate_factor(p, G, s, o));
      for (int64_t y = 0; y < Ho; ++y) {
        for (int64_t xo = 0; xo < Wo; ++xo) {
          oa[i][o][y][xo] = h[y * Wo + xo];
        }
      }
    }
  }
  return out;
}

/// The style weights of SPEC §1 per instance, with plain LibTorch ops.
/// pooled: (N, d_in) -> (N, n)
inline torch::Tensor plain_style(
    const ReferenceLinear& p,
    const torch::Tensor& pooled) {
  const int64_t n = p.lora_A.size(0), instances = pooled.size(0);
  if (p.style.defined()) {
    return p.style.expand({instances, n});
  }
  if (!p.router_weight.defined()) {
    return torch::full({instances, n}, 1.0 / n, pooled.options());
  }
  return torch::softmax(
      (torch::matmul(pooled, p.router_weight.t()) + p.router_bias) /
          p.temperature,
      -1);
}

/// SPEC §3's gate with plain LibTorch ops; g: (N, C) is viewed as `g_view`.
inline torch::Tensor plain_gate(
    const ReferenceLinear& p,
    const torch::Tensor& u,
    const torch::Tensor& s,
    torch::IntArrayRef g_view,
    torch::IntArrayRef token_dims) {
  if (!p.gate.defined()) {
    return u;
  }
  const auto g = torch::tanh(p.scale * torch::matmul(s, p.gate)).view(g_view);
  return u + g * (u - u.mean(token_dims, /*keepdim=*/true));
}

/// SPEC §1-3 for Linear with plain, differentiable LibTorch ops in the dtype
/// of `p`: the autograd reference for derivatives of any order (the loops
/// above give values only).
/// x: (N, L, d_in) -> (N, L, d_out)
inline torch::Tensor plain_linear(
    const ReferenceLinear& p,
    const torch::Tensor& x) {
  const auto s = plain_style(p, x.mean(1));
  const auto a = torch::einsum("nj,jrd->nrd", {s, p.lora_A});
  const auto z = torch::matmul(x, a.transpose(1, 2)); // (N, L, r)
  const auto u = torch::nn::functional::linear(x, p.weight, p.bias) +
      p.scale * p.scaling * torch::matmul(z, p.lora_B.t());
  return plain_gate(p, u, s, {x.size(0), 1, -1}, {1});
}

/// SPEC §1-3 for Conv2d with plain, differentiable LibTorch ops.
/// x: (N, C_in, H, W) -> (N, C_out, H', W')
inline torch::Tensor plain_conv2d(
    const ReferenceLinear& p,
    const ConvGeometry& geometry,
    const torch::Tensor& x) {
  namespace F = torch::nn::functional;
  const auto conv = F::Conv2dFuncOptions()
                        .stride(geometry.stride)
                        .padding(geometry.padding)
                        .dilation(geometry.dilation);
  const int64_t n = p.lora_A.size(0), r = p.lora_A.size(1);
  const auto s = plain_style(p, x.mean({2, 3}));
  const auto branches = F::conv2d(x, p.lora_A.flatten(0, 1), conv);
  const auto z = (branches.view({x.size(0), n, r, branches.size(2), -1}) *
                  s.view({x.size(0), n, 1, 1, 1}))
                     .sum(1);
  const auto u =
      F::conv2d(x, p.weight, F::Conv2dFuncOptions(conv).bias(p.bias)) +
      p.scale * p.scaling * F::conv2d(z, p.lora_B);
  return plain_gate(p, u, s, {x.size(0), -1, 1, 1}, {2, 3});
}

/// Attention with q, k, v, out projections as StyleInject layers, and
/// cross-attention to a context when one is given.
struct AttentionImpl : torch::nn::Module {
  AttentionImpl(int64_t dim, int64_t context_dim) {
    to_q = register_module("to_q", styleinject::StyleInjectLinear(dim, dim));
    to_k = register_module(
        "to_k", styleinject::StyleInjectLinear(context_dim, dim));
    to_v = register_module(
        "to_v", styleinject::StyleInjectLinear(context_dim, dim));
    to_out =
        register_module("to_out", styleinject::StyleInjectLinear(dim, dim));
  }
  /// x: (N, L, dim), context: (N, M, context_dim) -> (N, L, dim)
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context) {
    const auto q = to_q(x), k = to_k(context), v = to_v(context);
    const auto weights = torch::softmax(
        torch::matmul(q, k.transpose(1, 2)) / std::sqrt(double(q.size(-1))),
        -1);
    return to_out(torch::matmul(weights, v));
  }
  styleinject::StyleInjectLinear to_q{nullptr}, to_k{nullptr}, to_v{nullptr},
      to_out{nullptr};
};
TORCH_MODULE(Attention);

/// A residual block whose body is a Sequential of plain torch::nn layers,
/// the one container where LibTorch lets inject swap layers for real.
struct ResBlockImpl : torch::nn::Module {
  explicit ResBlockImpl(int64_t channels) {
    body = register_module(
        "body",
        torch::nn::Sequential(
            torch::nn::Conv2d(
                torch::nn::Conv2dOptions(channels, channels, 3).padding(1)),
            torch::nn::GroupNorm(2, channels),
            torch::nn::SiLU(),
            torch::nn::Conv2d(
                torch::nn::Conv2dOptions(channels, channels, 3).padding(1))));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return x + body->forward(x);
  }
  torch::nn::Sequential body{nullptr};
};
TORCH_MODULE(ResBlock);

/// A miniature UNet-like model: ResBlocks in a ModuleList, a declared
/// StyleInjectConv2d, an attention block over the map's positions with
/// cross-attention to a context, and a plain Linear head.
struct TinyNetImpl : torch::nn::Module {
  static constexpr int64_t kChannels = 4, kContext = 6;
  TinyNetImpl() {
    blocks = register_module(
        "blocks",
        torch::nn::ModuleList(ResBlock(kChannels), ResBlock(kChannels)));
    mix = register_module(
        "mix", styleinject::StyleInjectConv2d(kChannels, kChannels, 1));
    attn = register_module("attn", Attention(kChannels, kContext));
    head = register_module("head", torch::nn::Linear(kChannels, 3));
  }
  /// x: (N, 4, H, W), context: (N, M, 6) -> (N, H·W, 3)
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& context) {
    for (const auto& block : *blocks) {
      x = block->as<ResBlockImpl>()->forward(x);
    }
    const auto tokens = mix(x).flatten(2).transpose(1, 2);
    return head(tokens + attn(tokens, context));
  }
  torch::nn::ModuleList blocks{nullptr};
  styleinject::StyleInjectConv2d mix{nullptr};
  Attention attn{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(TinyNet);

/// A fresh folder in the temporary directory, removed with what it holds
/// (one level of subfolders, as a PEFT adapter directory).
struct TempDir {
  TempDir() {
    std::string pattern = std::string(P_tmpdir) + "/styleinject_XXXXXX";
    REQUIRE(::mkdtemp(&pattern[0]) != nullptr);
    path = pattern;
  }
  ~TempDir() {
    remove_folder(path, /*depth=*/1);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  /// The names in the folder, without "." and "..".
  static std::vector<std::string> names_in(const std::string& folder) {
    std::vector<std::string> names;
    if (DIR* dir = ::opendir(folder.c_str())) {
      while (const dirent* entry = ::readdir(dir)) {
        const std::string name = entry->d_name;
        if (name != "." && name != "..") {
          names.push_back(name);
        }
      }
      ::closedir(dir);
    }
    return names;
  }
  std::vector<std::string> files() const {
    return names_in(path);
  }
  std::string path;

 private:
  static void remove_folder(const std::string& folder, int depth) {
    for (const auto& name : names_in(folder)) {
      const auto inner = folder + "/" + name;
      if (depth > 0) {
        remove_folder(inner, depth - 1); // a file: nothing to remove in it
      }
      std::remove(inner.c_str());
    }
    ::rmdir(folder.c_str());
  }
};

/// Every parameter's value, by name, to see later what changed.
inline std::map<std::string, torch::Tensor> snapshot(
    const torch::nn::Module& model) {
  std::map<std::string, torch::Tensor> values;
  for (const auto& p : model.named_parameters()) {
    values[p.key()] = p.value().detach().clone();
  }
  return values;
}

#if TORCH_VERSION_MAJOR < 2
namespace warning_utils = c10::Warning;
#else
namespace warning_utils = c10::WarningUtils;
#endif

/// Collects LibTorch warnings while alive.
struct WarningCapture : c10::WarningHandler {
  WarningCapture() : previous(warning_utils::get_warning_handler()) {
    warning_utils::set_warning_handler(this);
  }
  ~WarningCapture() override {
    warning_utils::set_warning_handler(previous);
  }
#if TORCH_VERSION_MAJOR < 2
  void process(
      const c10::SourceLocation& /*location*/,
      const std::string& message,
      const bool /*verbatim*/) override {
    messages.push_back(message);
  }
#else
  void process(const c10::Warning& warning) override {
    messages.push_back(warning.msg());
  }
#endif
  c10::WarningHandler* previous;
  std::vector<std::string> messages;
};

} // namespace styleinject_test
