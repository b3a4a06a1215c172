#pragma once

/// The CUDA source of the library's own kernels, compiled at run time by
/// NVRTC (see nvrtc.h). A kernel's source is the preamble, the typedefs of
/// its element types and its body; each choice of element types is
/// compiled on its own, at its first use on a device.

#include <string>
#include <vector>

namespace styleinject {
namespace cuda {
namespace detail {

/// Loads of the element types, to float, without CUDA's headers (NVRTC
/// compiles with none): bfloat16 is float's upper half, float16 converts
/// by one PTX instruction; a weighted sum of branches' rows and a warp's
/// sum.
inline const char* const kPreamble = R"(
struct bfloat16 { unsigned short bits; };
struct float16 { unsigned short bits; };
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bfloat16 v) {
  return __uint_as_float(static_cast<unsigned>(v.bits) << 16);
}
__device__ __forceinline__ float to_float(float16 v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}
// Column j of weights · table, table (branches, width): the weighted sum
// of the branches' rows.
__device__ __forceinline__ float mix(
    const float* weights, const float* table, long long branches,
    long long width, long long j) {
  float mixed = 0.0f;
  for (long long i = 0; i < branches; ++i) {
    mixed += weights[i] * table[i * width + j];
  }
  return mixed;
}
// The sum of v over a warp's 32 lanes, at lane 0.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}
)";

/// Per instance n and channel c, the sums over a slice of the tokens of
/// t[n, l, c] and of t[n, l, c] · u[n, l, c], for slice s at
/// partial[s][0][n][c] and partial[s][1][n][c]; the caller sums the slices.
/// A block is 32 channels by 8 token rows; grid (channel tiles · N,
/// slices).
/// Reads t and u once, writes no product. t: (N, L, C) in t_type, u: the
/// same in u_type, both contiguous.
inline const char* const kTokenSums = R"(
extern "C" __global__ void token_sums(
    const t_type* t, const u_type* u, float* partial,
    long long instances, long long tokens, long long channels,
    long long slice_tokens) {
  __shared__ float sums[8][32];
  __shared__ float dots[8][32];
  const long long tiles = (channels + 31) / 32;
  const long long c = (blockIdx.x % tiles) * 32 + threadIdx.x;
  const long long n = blockIdx.x / tiles;
  const long long begin = blockIdx.y * slice_tokens;
  const long long end = min(tokens, begin + slice_tokens);
  float sum = 0.0f, dot = 0.0f;
  if (c < channels) {
    for (long long l = begin + threadIdx.y; l < end; l += 8) {
      const long long i = (n * tokens + l) * channels + c;
      const float value = to_float(t[i]);
      sum += value;
      dot += value * to_float(u[i]);
    }
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  dots[threadIdx.y][threadIdx.x] = dot;
  __syncthreads();
  if (threadIdx.y != 0 || c >= channels) {
    return;
  }
  for (int row = 1; row < 8; ++row) {
    sum += sums[row][threadIdx.x];
    dot += dots[row][threadIdx.x];
  }
  const long long plane = instances * channels;
  partial[2 * blockIdx.y * plane + n * channels + c] = sum;
  partial[(2 * blockIdx.y + 1) * plane + n * channels + c] = dot;
}
)";

/// The router, the branch mixing and the gate factor of one instance per
/// block (SPEC §1–3), all in float32: the logits `router_weight · pooled +
/// router_bias` (one warp per branch; a null bias is none), s = softmax(logits
/// / temperature), a = sum_i s_i A_i and, where `gate` is given, g = tanh(scale
/// · sum_i s_i gate_i). At most 64 branches; blocks of 256 threads. pooled: (N,
/// d_in), router_weight: (n, d_in), lora_A: (n, a_size), gate: (n, d_out) or
/// null -> s: (N, n), a: (N, a_size), g: (N, d_out)
inline const char* const kRouteAndMix = R"(
extern "C" __global__ void route_and_mix(
    const float* pooled, const float* router_weight, const float* router_bias,
    const float* lora_A, const float* gate, float* s, float* a, float* g,
    long long branches, long long d_in, long long a_size, long long d_out,
    float temperature, float scale) {
  __shared__ float weights[64];
  const long long n = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float* p = pooled + n * d_in;
  for (long long i = warp; i < branches; i += blockDim.x / 32) {
    float dot = 0.0f;
    for (long long k = lane; k < d_in; k += 32) {
      dot += router_weight[i * d_in + k] * p[k];
    }
    dot = warp_sum(dot);
    if (lane == 0) {
      weights[i] = (dot + (router_bias ? router_bias[i] : 0.0f)) / temperature;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float largest = weights[0];
    for (long long i = 1; i < branches; ++i) {
      largest = fmaxf(largest, weights[i]);
    }
    float total = 0.0f;
    for (long long i = 0; i < branches; ++i) {
      weights[i] = expf(weights[i] - largest);
      total += weights[i];
    }
    for (long long i = 0; i < branches; ++i) {
      weights[i] /= total;
      s[n * branches + i] = weights[i];
    }
  }
  __syncthreads();
  for (long long j = threadIdx.x; j < a_size; j += blockDim.x) {
    a[n * a_size + j] = mix(weights, lora_A, branches, a_size, j);
  }
  if (gate == nullptr) {
    return;
  }
  for (long long j = threadIdx.x; j < d_out; j += blockDim.x) {
    g[n * d_out + j] = tanhf(scale * mix(weights, gate, branches, d_out, j));
  }
}
)";

/// route_and_mix's backward, per instance (one block of 256 threads each):
/// the gradient at the style weights, from a = s · A and g = tanh(scale ·
/// s · gate), `grad_s_i = <grad_a, A_i> + <grad_g ⊙ (1 − g²) · scale,
/// gate_i>`; through the softmax, `grad_logits = s ⊙ (grad_s − <s,
/// grad_s>) / temperature`; and where `grad_pooled` is given, the gradient
/// at the pooled input, `grad_logits · router_weight`.
/// grad_a: (N, a_size), lora_A: (n, a_size), grad_g and g: (N, d_out) or
/// null, gate: (n, d_out), s: (N, n), router_weight: (n, d_in)
/// -> grad_logits: (N, n), grad_pooled: (N, d_in)
inline const char* const kRouteBackward = R"(
extern "C" __global__ void route_backward(
    const float* grad_a, const float* lora_A, const float* grad_g,
    const float* g, const float* gate, const float* s,
    const float* router_weight, float* grad_logits, float* grad_pooled,
    long long branches, long long a_size, long long d_out, long long d_in,
    float scale, float temperature) {
  __shared__ float grads[64];
  const long long n = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (long long i = warp; i < branches; i += blockDim.x / 32) {
    float dot = 0.0f;
    for (long long j = lane; j < a_size; j += 32) {
      dot += grad_a[n * a_size + j] * lora_A[i * a_size + j];
    }
    if (grad_g != nullptr) {
      for (long long k = lane; k < d_out; k += 32) {
        const float factor = g[n * d_out + k];
        dot += grad_g[n * d_out + k] * (1.0f - factor * factor) * scale *
            gate[i * d_out + k];
      }
    }
    dot = warp_sum(dot);
    if (lane == 0) {
      grads[i] = dot;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float weighted = 0.0f;
    for (long long i = 0; i < branches; ++i) {
      weighted += s[n * branches + i] * grads[i];
    }
    for (long long i = 0; i < branches; ++i) {
      grads[i] = s[n * branches + i] * (grads[i] - weighted) / temperature;
      grad_logits[n * branches + i] = grads[i];
    }
  }
  __syncthreads();
  if (grad_pooled == nullptr) {
    return;
  }
  for (long long k = threadIdx.x; k < d_in; k += blockDim.x) {
    grad_pooled[n * d_in + k] = mix(grads, router_weight, branches, d_in, k);
  }
}
)";

/// The branch parameters' gradients, summed over the N instances, one
/// thread per element of: grad_A = sum_N s ⊗ grad_a (n, a_size),
/// grad_gate = sum_N s ⊗ (grad_g ⊙ (1 − g²) · scale) (n, d_out),
/// grad_router_weight = sum_N grad_logits ⊗ pooled (n, d_in) and
/// grad_router_bias = sum_N grad_logits (n), in that order; an output
/// given as null is skipped.
inline const char* const kBranchGradients = R"(
extern "C" __global__ void branch_gradients(
    const float* s, const float* grad_a, const float* grad_g, const float* g,
    const float* grad_logits, const float* pooled, float* grad_A,
    float* grad_gate, float* grad_router_weight, float* grad_router_bias,
    long long instances, long long branches, long long a_size,
    long long d_out, long long d_in, float scale) {
  long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long sizes[4] = {
      branches * a_size, branches * d_out, branches * d_in, branches};
  int part = 0;
  while (part < 4 && e >= sizes[part]) {
    e -= sizes[part];
    ++part;
  }
  if (part == 4) {
    return;
  }
  float sum = 0.0f;
  if (part == 0 && grad_A != nullptr) {
    const long long i = e / a_size, j = e % a_size;
    for (long long n = 0; n < instances; ++n) {
      sum += s[n * branches + i] * grad_a[n * a_size + j];
    }
    grad_A[e] = sum;
  } else if (part == 1 && grad_gate != nullptr) {
    const long long i = e / d_out, k = e % d_out;
    for (long long n = 0; n < instances; ++n) {
      const float factor = g[n * d_out + k];
      sum += s[n * branches + i] * grad_g[n * d_out + k] *
          (1.0f - factor * factor) * scale;
    }
    grad_gate[e] = sum;
  } else if (part == 2 && grad_router_weight != nullptr) {
    const long long i = e / d_in, k = e % d_in;
    for (long long n = 0; n < instances; ++n) {
      sum += grad_logits[n * branches + i] * pooled[n * d_in + k];
    }
    grad_router_weight[e] = sum;
  } else if (part == 3 && grad_router_bias != nullptr) {
    for (long long n = 0; n < instances; ++n) {
      sum += grad_logits[n * branches + e];
    }
    grad_router_bias[e] = sum;
  }
}
)";

/// The element types of the kernels' inputs, as the preamble names them.
inline const std::vector<std::string>& element_types() {
  static const std::vector<std::string> types = {
      "float", "bfloat16", "float16"};
  return types;
}

/// A kernel's entry point and full source for one choice of its types.
struct KernelSource {
  std::string name;
  std::string source;
};

/// token_sums for t of `t_type` and u of `u_type`.
inline KernelSource token_sums_source(
    const std::string& t_type,
    const std::string& u_type) {
  return {
      "token_sums",
      std::string(kPreamble) + "typedef " + t_type + " t_type;\ntypedef " +
          u_type + " u_type;\n" + kTokenSums};
}

/// route_and_mix, in float32 only.
inline KernelSource route_and_mix_source() {
  return {"route_and_mix", std::string(kPreamble) + kRouteAndMix};
}

/// route_backward, in float32 only.
inline KernelSource route_backward_source() {
  return {"route_backward", std::string(kPreamble) + kRouteBackward};
}

/// branch_gradients, in float32 only.
inline KernelSource branch_gradients_source() {
  return {"branch_gradients", std::string(kPreamble) + kBranchGradients};
}

/// Every kernel in every choice of its types: what the tests compile.
inline std::vector<KernelSource> every_kernel_source() {
  std::vector<KernelSource> sources = {
      route_and_mix_source(),
      route_backward_source(),
      branch_gradients_source()};
  for (const auto& t : element_types()) {
    for (const auto& u : element_types()) {
      sources.push_back(token_sums_source(t, u));
    }
  }
  return sources;
}

} // namespace detail
} // namespace cuda
} // namespace styleinject
