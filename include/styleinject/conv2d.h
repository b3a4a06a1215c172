#pragma once

#include <styleinject/detail/torch_compat.h>
#include <styleinject/functional.h>
#include <styleinject/layer.h>

#include <torch/enum.h>
#include <torch/nn/functional/conv.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/pimpl.h>

#include <ostream>
#include <string>
#include <vector>

namespace styleinject {

/// torch::nn::Conv2d as a StyleInject base layer: any kernel size, stride,
/// padding (including kValid and kSame) and dilation, with groups=1 and
/// padding_mode kZeros; other convolutions are refused with an error that
/// says so.
template <>
struct layer_traits<torch::nn::Conv2dImpl> {
  using Holder = torch::nn::Conv2d;
  using Options = torch::nn::Conv2dOptions;
  static constexpr const char* name = detail::kConv2dName;
  static constexpr const char* type = "Conv2d";

  static Options options_of(const torch::nn::Conv2dImpl& base) {
    // Conv2dImpl keeps the options of any N-d convolution; take ours back.
    const auto& o = base.options;
    return Options(o.in_channels(), o.out_channels(), o.kernel_size())
        .stride(o.stride())
        .padding(o.padding())
        .dilation(o.dilation())
        .groups(o.groups())
        .bias(o.bias())
        .padding_mode(o.padding_mode());
  }
  static int64_t in_features(const Options& options) {
    return options.in_channels();
  }
  static int64_t out_features(const Options& options) {
    return options.out_channels();
  }
  static std::vector<int64_t> weight_shape(const Options& options) {
    const auto kernel = *options.kernel_size();
    return {
        options.out_channels(), options.in_channels(), kernel[0], kernel[1]};
  }
  static std::vector<int64_t> lora_A_shape(
      const Options& options,
      int64_t branches,
      int64_t rank) {
    const auto kernel = *options.kernel_size();
    return {branches, rank, options.in_channels(), kernel[0], kernel[1]};
  }
  static std::vector<int64_t> lora_B_shape(
      const Options& options,
      int64_t rank) {
    return {options.out_channels(), rank, 1, 1};
  }
  static void check_base(const Options& options) {
    TORCH_CHECK_VALUE(
        options.groups() == 1,
        name,
        ": expected groups=1 (an adapter on a grouped convolution is not "
        "supported; keep torch::nn::Conv2d there), but got groups=",
        options.groups());
    TORCH_CHECK_VALUE(
        detail::holds<torch::enumtype::kZeros>(options.padding_mode()),
        name,
        ": expected padding_mode kZeros (other padding modes are not "
        "supported; keep torch::nn::Conv2d there), but got ",
        torch::enumtype::get_enum_name(options.padding_mode()));
  }
  /// The convolution of the base layer, as F::conv2d takes it.
  static torch::nn::functional::Conv2dFuncOptions conv(
      const Options& options,
      const torch::Tensor& bias) {
    return torch::nn::functional::Conv2dFuncOptions()
        .bias(bias)
        .stride(options.stride())
        .padding(options.padding())
        .dilation(options.dilation())
        .groups(options.groups());
  }
  static torch::Tensor base_forward(
      const Options& options,
      const torch::Tensor& input,
      const torch::Tensor& weight,
      const torch::Tensor& bias) {
    return torch::nn::functional::conv2d(input, weight, conv(options, bias));
  }
  static torch::Tensor forward(
      const Options& options,
      const torch::Tensor& input,
      const torch::Tensor& weight,
      const torch::Tensor& bias,
      const std::vector<functional::AdapterTerm>& adapters) {
    return functional::style_inject_conv2d(
        input, weight, adapters, conv(options, bias));
  }
  /// A merged layer's forward: the base's convolution with the merged
  /// kernel, then a kScale gate's fixed factor g (C_out): each channel's
  /// spread around its H×W mean times (1 + g), one pass over the output.
  static torch::Tensor merged_forward(
      const Options& options,
      const torch::Tensor& input,
      const torch::Tensor& weight,
      const torch::Tensor& bias,
      const torch::Tensor& g) {
    const auto h = base_forward(options, input, weight, bias);
    return g.defined() ? detail::variance_gate(h, g.view({1, -1, 1, 1}), {2, 3})
                       : h;
  }
  static torch::Tensor style_weights(
      const torch::Tensor& input,
      const functional::AdapterTensors& adapter,
      const functional::StyleInjectFuncOptions& options) {
    return functional::conv2d_style_weights(input, adapter, options);
  }
  /// The layer in short, for reports: "320 -> 320, 3x3".
  static std::string shape(const Options& options) {
    const auto kernel = *options.kernel_size();
    return std::to_string(options.in_channels()) + " -> " +
        std::to_string(options.out_channels()) + ", " +
        std::to_string(kernel[0]) + "x" + std::to_string(kernel[1]);
  }
  static void pretty_print(std::ostream& stream, const Options& options) {
    stream << "in_channels=" << options.in_channels()
           << ", out_channels=" << options.out_channels()
           << ", kernel_size=" << options.kernel_size()
           << ", stride=" << options.stride();
  }
};

/// A torch::nn::Conv2d that can carry a StyleInject adapter (SPEC §1–3):
/// each branch's down-projection is a convolution with the base's kernel
/// size, stride, padding and dilation, the shared up-projection is 1×1, the
/// router reads the spatially pooled input, and the gate's statistics are
/// over the output's H×W. Without an adapter it trains, computes and saves
/// exactly as torch::nn::Conv2d does. See `StyleInjectLayerImpl` for the
/// controls, `functional::style_inject_conv2d` for the math.
using StyleInjectConv2dImpl = StyleInjectLayerImpl<torch::nn::Conv2dImpl>;

/// A `ModuleHolder` subclass for `StyleInjectConv2dImpl`.
///
/// Example:
/// ```
/// // In a ResBlock: declared as torch::nn::Conv2d would be.
/// styleinject::StyleInjectConv2d conv(
///     torch::nn::Conv2dOptions(320, 320, 3).padding(1));
/// conv->add_adapter(styleinject::StyleInjectOptions(4));
/// auto h = conv(torch::randn({2, 320, 64, 64})); // -> (2, 320, 64, 64)
/// ```
TORCH_MODULE(StyleInjectConv2d);

} // namespace styleinject
