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
/// by one PTX instruction.
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
)";

/// Per instance n and channel c, the sums over a slice of the tokens of
/// t[n, l, c] and of t[n, l, c] · u[n, l, c], for slice s at
/// partial[s][0][n][c] and partial[s][1][n][c]; the caller sums the slices.
/// A block is 32 channels by 8 token rows; grid (channel tiles, N, slices).
/// Reads t and u once, writes no product. t: (N, L, C) in t_type, u: the
/// same in u_type, both contiguous.
inline const char* const kTokenSums = R"(
extern "C" __global__ void token_sums(
    const t_type* t, const u_type* u, float* partial,
    long long instances, long long tokens, long long channels,
    long long slice_tokens) {
  __shared__ float sums[8][32];
  __shared__ float dots[8][32];
  const long long c = blockIdx.x * 32LL + threadIdx.x;
  const long long n = blockIdx.y;
  const long long begin = blockIdx.z * slice_tokens;
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
  partial[2 * blockIdx.z * plane + n * channels + c] = sum;
  partial[(2 * blockIdx.z + 1) * plane + n * channels + c] = dot;
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

/// Every kernel in every choice of its types: what the tests compile.
inline std::vector<KernelSource> every_kernel_source() {
  std::vector<KernelSource> sources;
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
