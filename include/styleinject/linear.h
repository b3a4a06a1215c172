#pragma once

#include <styleinject/functional.h>
#include <styleinject/layer.h>

#include <torch/nn/functional/linear.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <ostream>
#include <string>
#include <vector>

namespace styleinject {

/// torch::nn::Linear as a StyleInject base layer.
template <>
struct layer_traits<torch::nn::LinearImpl> {
  using Holder = torch::nn::Linear;
  using Options = torch::nn::LinearOptions;
  static constexpr const char* name = detail::kLinearName;
  static constexpr const char* type = "Linear";

  static Options options_of(const torch::nn::LinearImpl& base) {
    return base.options;
  }
  static int64_t in_features(const Options& options) {
    return options.in_features();
  }
  static int64_t out_features(const Options& options) {
    return options.out_features();
  }
  static std::vector<int64_t> weight_shape(const Options& options) {
    return {options.out_features(), options.in_features()};
  }
  static std::vector<int64_t> lora_A_shape(
      const Options& options,
      int64_t branches,
      int64_t rank) {
    return {branches, rank, options.in_features()};
  }
  static std::vector<int64_t> lora_B_shape(
      const Options& options,
      int64_t rank) {
    return {options.out_features(), rank};
  }
  /// Every Linear can carry an adapter.
  static void check_base(const Options& /*options*/) {}
  static torch::Tensor base_forward(
      const Options& /*options*/,
      const torch::Tensor& input,
      const torch::Tensor& weight,
      const torch::Tensor& bias) {
    return torch::nn::functional::linear(input, weight, bias);
  }
  static torch::Tensor forward(
      const Options& /*options*/,
      const torch::Tensor& input,
      const torch::Tensor& weight,
      const torch::Tensor& bias,
      const std::vector<functional::AdapterTerm>& adapters) {
    return functional::style_inject_linear(input, weight, bias, adapters);
  }
  /// A merged layer's forward: the base's map with the merged weight, then
  /// a kScale gate's fixed factor g (d_out), where the input has a token
  /// axis: each channel's spread around its token mean times (1 + g).
  /// Where the output outnumbers the weight and g has the input's dtype,
  /// the gate folds into one GEMM (detail::gated_linear), as the fused
  /// inference does; elsewhere it is one pass over the output.
  static torch::Tensor merged_forward(
      const Options& /*options*/,
      const torch::Tensor& input,
      const torch::Tensor& weight,
      const torch::Tensor& bias,
      const torch::Tensor& g) {
    namespace F = torch::nn::functional;
    if (!g.defined() || input.dim() < 3) {
      return F::linear(input, weight, bias);
    }
    const auto x = input.reshape({-1, input.size(-2), input.size(-1)});
    auto sizes = input.sizes().vec();
    sizes.back() = weight.size(0);
    if (x.size(0) * x.size(1) >= x.size(2) &&
        g.scalar_type() == x.scalar_type()) {
      const auto mean_u = F::linear(x.mean(1), weight, bias);
      return detail::gated_linear(x, weight, bias, g, mean_u).view(sizes);
    }
    return detail::variance_gate(F::linear(x, weight, bias), g, {1})
        .view(sizes);
  }
  static torch::Tensor style_weights(
      const torch::Tensor& input,
      const functional::AdapterTensors& adapter,
      const functional::StyleInjectFuncOptions& options) {
    return functional::linear_style_weights(input, adapter, options);
  }
  /// The layer in short, for reports: "320 -> 640".
  static std::string shape(const Options& options) {
    return std::to_string(options.in_features()) + " -> " +
        std::to_string(options.out_features());
  }
  static void pretty_print(std::ostream& stream, const Options& options) {
    stream << "in_features=" << options.in_features()
           << ", out_features=" << options.out_features()
           << ", bias=" << options.bias();
  }
};

/// A torch::nn::Linear that can carry a StyleInject adapter (SPEC §1–3).
/// Without one it trains, computes and saves exactly as torch::nn::Linear
/// does, so a model declares it where it wants adaptability and
/// `styleinject::inject` attaches adapters later. See `StyleInjectLayerImpl`
/// for the controls, `functional::style_inject_linear` for the math.
using StyleInjectLinearImpl = StyleInjectLayerImpl<torch::nn::LinearImpl>;

/// A `ModuleHolder` subclass for `StyleInjectLinearImpl`.
///
/// Example:
/// ```
/// // In a model: declared as torch::nn::Linear would be.
/// styleinject::StyleInjectLinear to_q(320, 320);
/// to_q->add_adapter(styleinject::StyleInjectOptions(4));
/// auto h = to_q(torch::randn({2, 64, 320})); // (N, L, 320) -> (N, L, 320)
/// torch::optim::Adam adam(to_q->adapter_parameters(), 1e-3);
///
/// // Or around a layer that exists, here as LoRA of rank 16.
/// torch::nn::Linear proj(320, 320);
/// styleinject::StyleInjectLinear lora(
///     proj, styleinject::StyleInjectOptions::lora(16));
/// ```
TORCH_MODULE(StyleInjectLinear);

} // namespace styleinject
