#pragma once

#include <styleinject/functional.h>
#include <styleinject/options.h>

#include <torch/nn/cloneable.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/linear.h>
#include <torch/serialize/input-archive.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cmath>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace styleinject {

/// What StyleInject needs to know about a base layer type: its holder and
/// options types, the adapter's shapes, and which functional computes it.
/// Specialised for torch::nn::LinearImpl in <styleinject/linear.h>.
template <typename Base>
struct layer_traits;

/// A frozen base layer (`weight`, `bias`) with a StyleInject adapter
/// (`lora_A`, `lora_B`, `router.weight`, `router.bias`, `gate`, as in SPEC §5)
/// registered beside them, so that a base checkpoint loads unchanged. The
/// adapter lives on the base weight's device and dtype. See
/// `StyleInjectLinear` for the layer users declare.
///
/// The math is in `styleinject::functional`; this module holds parameters,
/// options and the run-time controls: enable/disable, scale, fixed style.
template <typename Base>
class StyleInjectLayerImpl
    : public torch::nn::Cloneable<StyleInjectLayerImpl<Base>> {
 public:
  using Traits = layer_traits<Base>;
  using BaseHolder = typename Traits::Holder;
  using BaseOptions = typename Traits::Options;

  /// Wraps `base`: the layer shares base's weight and bias (and freezes
  /// them: `requires_grad` becomes false on both).
  StyleInjectLayerImpl(BaseHolder base, StyleInjectOptions options)
      : base_options(checked(base)->options), options(std::move(options)) {
    register_all(base->weight, base->bias);
  }

  /// Builds a new base layer from `base_options`, initialised as the base
  /// layer type initialises itself, with an adapter on it.
  StyleInjectLayerImpl(BaseOptions base_options, StyleInjectOptions options)
      : base_options(std::move(base_options)), options(std::move(options)) {
    reset();
  }

  /// Registers a new base layer and adapter (clone() relies on it).
  void reset() override {
    BaseHolder fresh(base_options);
    register_all(fresh->weight, fresh->bias);
  }

  /// Re-initialises the adapter only, which makes the layer equal to its base
  /// again: A Kaiming-uniform, B, router and gate zero.
  void reset_parameters() {
    torch::NoGradGuard no_grad;
    for (int64_t i = 0; i < lora_A.size(0); ++i) {
      // Branch by branch, so that the fan-in is that of one LoRA A: the
      // same init as PEFT's kaiming_uniform_(a=sqrt(5)).
      torch::nn::init::kaiming_uniform_(lora_A[i], std::sqrt(5.0));
    }
    // B = 0 makes the update zero at step 0 (LoRA, Hu et al. 2021); a zero
    // router gives s = 1/n, a zero gate g = 0 (SPEC §1, §3).
    lora_B.zero_();
    if (router) {
      router->weight.zero_();
      router->bias.zero_();
    }
    if (gate.defined()) {
      gate.zero_();
    }
  }

  /// The base layer's output with the adapter's update and gate; with the
  /// adapter disabled, exactly the base layer's output.
  torch::Tensor forward(const torch::Tensor& input) {
    return enabled_
        ? Traits::forward(input, weight, bias, adapter(), func_options())
        : Traits::base_forward(base_options, input, weight, bias);
  }

  /// The router's style weights for each instance of `input` (the fixed
  /// style if one is set; 1/n with the router off), e.g. to see which style
  /// an input is routed to. For Linear: (N, d_in) -> (N, n),
  /// (..., L, d_in) -> (..., n).
  torch::Tensor style_weights(const torch::Tensor& input) {
    return Traits::style_weights(input, adapter(), func_options());
  }

  /// Switches the adapter on or off; off, forward is bit-identical to the
  /// base layer's.
  void set_enabled(bool enabled) {
    enabled_ = enabled;
  }
  bool is_enabled() const {
    return enabled_;
  }

  /// Strength of the whole adapter, multiplying both the low-rank update and
  /// the gate: 0 gives the base layer, 1 the trained adapter. Default: 1
  void set_scale(double scale) {
    TORCH_CHECK_VALUE(
        std::isfinite(scale),
        Traits::name,
        ": expected a finite scale, but got ",
        scale);
    scale_ = scale;
  }
  double scale() const {
    return scale_;
  }

  /// Replaces the router's weights with a fixed style: (n) for every
  /// instance (one-hot = one style), or (N, n) per instance. Entries must be
  /// finite and non-negative; that is checked here, once (a host read), so
  /// that forward never reads from the device.
  void set_style(const torch::Tensor& style) {
    const int64_t branches = options.branches();
    TORCH_CHECK_VALUE(
        style.defined() && style.is_floating_point() &&
            (style.dim() == 1 || style.dim() == 2) &&
            style.size(-1) == branches,
        Traits::name,
        ": expected a floating-point style of shape [",
        branches,
        "] or [N, ",
        branches,
        "] (one weight per branch), but got ",
        style.defined() ? style.toString() : std::string("an undefined tensor"),
        " of shape ",
        style.defined() ? style.sizes() : torch::IntArrayRef{});
    if (!style.is_meta()) {
      TORCH_CHECK_VALUE(
          (torch::isfinite(style) & (style >= 0)).all().template item<bool>(),
          Traits::name,
          ": expected finite, non-negative style weights, but got values from ",
          style.min().template item<double>(),
          " to ",
          style.max().template item<double>());
    }
    style_ = style.detach().to(weight.device());
  }
  /// Goes back to the router's own weights.
  void clear_style() {
    style_ = torch::Tensor();
  }
  const torch::Tensor& style() const {
    return style_;
  }

  /// The adapter's tensors, for the optimizer (the base is frozen).
  std::vector<torch::Tensor> adapter_parameters() const {
    std::vector<torch::Tensor> result;
    for (const auto& parameter : this->named_parameters()) {
      if (parameter.key() != "weight" && parameter.key() != "bias") {
        result.push_back(parameter.value());
      }
    }
    return result;
  }

  /// One line, as LibTorch prints its layers, e.g.
  /// `styleinject::StyleInjectLinear(in_features=8, out_features=4,
  /// bias=true, rank=2, branches=4, alpha=2, router=true, gate=true)`.
  void pretty_print(std::ostream& stream) const override {
    stream << std::boolalpha << Traits::name << "(";
    Traits::pretty_print(stream, base_options);
    stream << ", rank=" << options.rank() << ", branches=" << options.branches()
           << ", alpha=" << options.alpha().value_or(options.rank());
    if (options.dropout() > 0.0) {
      stream << ", dropout=" << options.dropout();
    }
    if (options.rslora()) {
      stream << ", rslora=true";
    }
    if (options.temperature() != 1.0) {
      stream << ", temperature=" << options.temperature();
    }
    stream << ", router=" << options.router() << ", gate=" << options.gate()
           << ")";
  }

  /// Loads a checkpoint of this layer, or of its plain base layer (which has
  /// only weight and bias: the adapter then keeps its values). Everything is
  /// read and checked before anything is written, so a checkpoint that does
  /// not fit leaves the layer as it was. Values are copied into the layer's
  /// own dtype and device.
  void load(torch::serialize::InputArchive& archive) override {
    std::vector<std::pair<torch::Tensor, torch::Tensor>> updates;
    const auto read = [&](torch::serialize::InputArchive& from,
                          const std::string& key,
                          const std::string& name,
                          const torch::Tensor& parameter) {
      torch::Tensor value;
      if (!from.try_read(key, value)) {
        return false;
      }
      TORCH_CHECK(
          value.sizes() == parameter.sizes(),
          Traits::name,
          ": expected '",
          name,
          "' of shape ",
          parameter.sizes(),
          " in the checkpoint, but got ",
          value.sizes());
      updates.emplace_back(parameter, value);
      return true;
    };
    TORCH_CHECK(
        read(archive, "weight", "weight", weight),
        Traits::name,
        ": the checkpoint has no 'weight'");
    TORCH_CHECK(
        !bias.defined() || read(archive, "bias", "bias", bias),
        Traits::name,
        ": the checkpoint has no 'bias'");
    int found = 0, expected = 0;
    for (const auto& parameter : this->named_parameters(/*recurse=*/false)) {
      if (parameter.key() != "weight" && parameter.key() != "bias") {
        ++expected;
        found +=
            read(archive, parameter.key(), parameter.key(), parameter.value());
      }
    }
    if (router) {
      expected += 2;
      torch::serialize::InputArchive router_archive;
      if (archive.try_read("router", router_archive)) {
        found +=
            read(router_archive, "weight", "router.weight", router->weight);
        found += read(router_archive, "bias", "router.bias", router->bias);
      }
    }
    TORCH_CHECK(
        found == 0 || found == expected,
        Traits::name,
        ": the checkpoint has ",
        found,
        " of the adapter's ",
        expected,
        " tensors; expected all of them, or none for a base-layer checkpoint");
    torch::NoGradGuard no_grad;
    for (auto& update : updates) {
      update.first.copy_(update.second);
    }
  }

  /// Options of the base layer (e.g. torch::nn::LinearOptions).
  BaseOptions base_options;
  /// Options of the adapter.
  StyleInjectOptions options;
  /// The base layer's parameters, frozen; `bias` is undefined without bias.
  torch::Tensor weight, bias;
  /// (n, r, d_in) for Linear: the n down-projections.
  torch::Tensor lora_A;
  /// (d_out, r) for Linear: the shared up-projection.
  torch::Tensor lora_B;
  /// (n, d_out): the variance gate; undefined with the gate off.
  torch::Tensor gate;
  /// d_in -> n logits; empty with the router off.
  torch::nn::Linear router{nullptr};

 private:
  static const BaseHolder& checked(const BaseHolder& base) {
    TORCH_CHECK(
        !base.is_empty(),
        Traits::name,
        ": expected a base layer to wrap, but got an empty holder (nullptr)");
    return base;
  }

  void register_all(torch::Tensor base_weight, torch::Tensor base_bias) {
    detail::check_options(options, Traits::name);
    weight = this->register_parameter(
        "weight", std::move(base_weight), /*requires_grad=*/false);
    bias = this->register_parameter(
        "bias", std::move(base_bias), /*requires_grad=*/false);
    const auto on_base = weight.options().requires_grad(false);
    const int64_t branches = options.branches(), rank = options.rank();
    const int64_t in = Traits::in_features(base_options);
    const int64_t out = Traits::out_features(base_options);
    lora_A = this->register_parameter(
        "lora_A",
        torch::empty(
            Traits::lora_A_shape(base_options, branches, rank), on_base));
    lora_B = this->register_parameter(
        "lora_B",
        torch::empty(Traits::lora_B_shape(base_options, rank), on_base));
    router = nullptr;
    if (options.router()) {
      router = this->register_module("router", torch::nn::Linear(in, branches));
      router->to(weight.device(), weight.scalar_type());
    }
    gate = options.gate() ? this->register_parameter(
                                "gate", torch::empty({branches, out}, on_base))
                          : torch::Tensor();
    reset_parameters();
  }

  functional::AdapterTensors adapter() const {
    return {
        lora_A,
        lora_B,
        router ? router->weight : torch::Tensor(),
        router ? router->bias : torch::Tensor(),
        gate};
  }

  functional::StyleInjectFuncOptions func_options() {
    // The style follows the layer when it moves: copied once, on the first
    // forward after the move.
    if (style_.defined() && style_.device() != weight.device()) {
      style_ = style_.to(weight.device());
    }
    return functional::StyleInjectFuncOptions()
        .scaling(options.scaling())
        .scale(scale_)
        .temperature(options.temperature())
        .dropout(options.dropout())
        .training(this->is_training())
        .style(style_)
        .path(options.path());
  }

  bool enabled_ = true;
  double scale_ = 1.0;
  torch::Tensor style_;
};

} // namespace styleinject
