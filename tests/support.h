#pragma once

// Helpers shared by the tests: the naive float64 reference of SPEC §1-3,
// random adapters, and the text of an error.

#include <styleinject/styleinject.h>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace styleinject_test {

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
};

/// SPEC §1-3 written out naively in float64: explicit loops over instances,
/// tokens, branches and channels, explicit per-instance statistics.
/// x: (N, L, d_in) -> (N, L, d_out); `has_tokens` false means x came as
/// (N, d_in) (L = 1, and the gate is a no-op).
inline torch::Tensor reference_forward(
    const ReferenceLinear& p,
    const torch::Tensor& x_in,
    bool has_tokens) {
  const auto f64 = [](const torch::Tensor& t) {
    return t.defined() ? t.detach().to(torch::kCPU, torch::kDouble).contiguous()
                       : t;
  };
  const auto x = f64(x_in), W = f64(p.weight), b = f64(p.bias);
  const auto A = f64(p.lora_A), B = f64(p.lora_B), G = f64(p.gate);
  const auto R = f64(p.router_weight), c = f64(p.router_bias);
  const auto style = f64(p.style);
  const int64_t N = x.size(0), L = x.size(1), d_in = x.size(2);
  const int64_t d_out = W.size(0), n = A.size(0), r = A.size(1);
  auto xa = x.accessor<double, 3>();
  auto Wa = W.accessor<double, 2>();
  auto Aa = A.accessor<double, 3>();
  auto Ba = B.accessor<double, 2>();
  auto out = torch::zeros({N, L, d_out}, torch::kDouble);
  auto oa = out.accessor<double, 3>();
  for (int64_t i = 0; i < N; ++i) {
    // §1: style weights of instance i.
    std::vector<double> s(n, 1.0 / n);
    if (style.defined()) {
      for (int64_t j = 0; j < n; ++j) {
        s[j] = style.dim() == 1 ? style[j].item<double>()
                                : style[i][j].item<double>();
      }
    } else if (R.defined()) {
      std::vector<double> pooled(d_in, 0.0);
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t k = 0; k < d_in; ++k) {
          pooled[k] += xa[i][t][k] / L;
        }
      }
      std::vector<double> logits(n);
      double largest = -INFINITY, total = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        logits[j] = c[j].item<double>();
        for (int64_t k = 0; k < d_in; ++k) {
          logits[j] += R[j][k].item<double>() * pooled[k];
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
    // §2: u = W0 x + b0 + scale * scaling * B (sum_j s_j A_j x), per token.
    for (int64_t t = 0; t < L; ++t) {
      std::vector<double> z(r, 0.0);
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t q = 0; q < r; ++q) {
          double a_x = 0.0;
          for (int64_t k = 0; k < d_in; ++k) {
            a_x += Aa[j][q][k] * xa[i][t][k];
          }
          z[q] += s[j] * a_x;
        }
      }
      for (int64_t o = 0; o < d_out; ++o) {
        double u = b.defined() ? b[o].item<double>() : 0.0;
        for (int64_t k = 0; k < d_in; ++k) {
          u += Wa[o][k] * xa[i][t][k];
        }
        double update = 0.0;
        for (int64_t q = 0; q < r; ++q) {
          update += Ba[o][q] * z[q];
        }
        oa[i][t][o] = u + p.scale * p.scaling * update;
      }
    }
    // §3: h = u + g (u - mean_tok(u)), g = scale * tanh(s · G).
    if (G.defined() && has_tokens) {
      for (int64_t o = 0; o < d_out; ++o) {
        double mean = 0.0, mixed = 0.0;
        for (int64_t t = 0; t < L; ++t) {
          mean += oa[i][t][o] / L;
        }
        for (int64_t j = 0; j < n; ++j) {
          mixed += s[j] * G[j][o].item<double>();
        }
        const double g = p.scale * std::tanh(mixed);
        for (int64_t t = 0; t < L; ++t) {
          oa[i][t][o] += g * (oa[i][t][o] - mean);
        }
      }
    }
  }
  return out;
}

/// Gives every adapter tensor of `layer` random, non-zero values, so that no
/// term of the forward is trivially zero.
inline void randomize_adapter(styleinject::StyleInjectLinearImpl& layer) {
  torch::NoGradGuard no_grad;
  for (auto& parameter : layer.adapter_parameters()) {
    parameter.copy_(torch::randn_like(parameter) * 0.5);
  }
}

/// The reference's view of a module, with its run-time controls.
inline ReferenceLinear reference_of(
    const styleinject::StyleInjectLinearImpl& layer,
    double scale = 1.0) {
  ReferenceLinear p;
  p.weight = layer.weight;
  p.bias = layer.bias;
  p.lora_A = layer.lora_A;
  p.lora_B = layer.lora_B;
  if (layer.router) {
    p.router_weight = layer.router->weight;
    p.router_bias = layer.router->bias;
  }
  p.gate = layer.gate;
  p.style = layer.style();
  p.scaling = layer.options.scaling();
  p.scale = scale;
  p.temperature = layer.options.temperature();
  return p;
}

/// float64 closeness for results that only rounding separates.
inline bool close64(const torch::Tensor& a, const torch::Tensor& b) {
  return a.sizes() == b.sizes() &&
      torch::allclose(a.to(torch::kDouble), b.to(torch::kDouble), 1e-10, 1e-10);
}

} // namespace styleinject_test
