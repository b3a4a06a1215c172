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
#include <type_traits>
#include <utility>
#include <vector>

namespace styleinject {

/// What StyleInject needs to know about a base layer type: its holder and
/// options types, the adapter's shapes, and which functionals compute it.
/// Specialised for torch::nn::LinearImpl in <styleinject/linear.h> and
/// torch::nn::Conv2dImpl in <styleinject/conv2d.h>.
template <typename Base>
struct layer_traits;

/// A base layer (`weight`, `bias`) that can carry a StyleInject adapter
/// (`lora_A`, `lora_B`, `router.weight`, `router.bias`, `gate`, as in SPEC §5)
/// registered beside them, so that a base checkpoint loads unchanged. Without
/// an adapter it is the base layer type in all but name; with one, the base
/// is frozen and the adapter lives on the base weight's device and dtype.
/// Users declare `StyleInjectLinear` or `StyleInjectConv2d`.
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

  /// Wraps `base` without an adapter: the layer shares base's weight and bias
  /// and computes exactly what base computes, until `add_adapter`.
  explicit StyleInjectLayerImpl(BaseHolder base)
      : base_options(Traits::options_of(*checked(base))) {
    register_base(base->weight, base->bias);
  }

  /// Wraps `base` with an adapter: the layer shares base's weight and bias
  /// and freezes them (`requires_grad` becomes false on both).
  StyleInjectLayerImpl(BaseHolder base, StyleInjectOptions options)
      : StyleInjectLayerImpl(std::move(base)) {
    add_adapter(std::move(options));
  }

  /// A new base layer from `base_options`, initialised as the base layer type
  /// initialises itself, with no adapter: it trains, computes and saves
  /// exactly as the base layer type does, until `add_adapter`.
  explicit StyleInjectLayerImpl(BaseOptions base_options)
      : base_options(std::move(base_options)) {
    reset();
  }

  /// A new base layer from `base_options` with an adapter on it (the base
  /// frozen).
  StyleInjectLayerImpl(BaseOptions base_options, StyleInjectOptions options)
      : base_options(std::move(base_options)),
        options(checked(std::move(options))) {
    reset();
  }

  /// The base layer type's own short constructors, e.g.
  /// `StyleInjectLinear(320, 640)` or `StyleInjectConv2d(320, 320, 3)`.
  template <
      typename... Args,
      typename = std::enable_if_t<
          std::is_constructible<BaseOptions, int64_t, int64_t, Args...>::value>>
  StyleInjectLayerImpl(int64_t in, int64_t out, Args&&... args)
      : StyleInjectLayerImpl(
            BaseOptions(in, out, std::forward<Args>(args)...)) {}

  /// Registers a new base layer, and an adapter if `options` has one
  /// (clone() relies on it).
  void reset() override {
    BaseHolder fresh(base_options);
    register_base(fresh->weight, fresh->bias);
    if (options) {
      register_adapter();
    }
  }

  /// Attaches an adapter to the layer and freezes the base's weight and
  /// bias. The adapter starts as the identity: the output does not change.
  void add_adapter(StyleInjectOptions adapter_options) {
    TORCH_CHECK(
        !options,
        Traits::name,
        ": the layer has an adapter already; call remove_adapter() first");
    options = checked(std::move(adapter_options));
    register_adapter();
  }

  /// Removes the adapter, which leaves the base layer (still frozen).
  void remove_adapter() {
    if (!options) {
      return;
    }
    for (const char* name : {"lora_A", "lora_B", "gate"}) {
      this->parameters_.erase(name);
    }
    if (router) {
      this->unregister_module("router");
    }
    lora_A = lora_B = gate = torch::Tensor();
    router = nullptr;
    style_ = torch::Tensor();
    options = c10::nullopt;
  }

  /// The names and shapes of the parameters that an adapter with `options`
  /// has on a base layer with `base_options` (SPEC §5).
  static std::vector<std::pair<std::string, std::vector<int64_t>>>
  adapter_shapes(
      const BaseOptions& base_options,
      const StyleInjectOptions& options) {
    const int64_t branches = options.branches(), rank = options.rank();
    std::vector<std::pair<std::string, std::vector<int64_t>>> shapes{
        {"lora_A", Traits::lora_A_shape(base_options, branches, rank)},
        {"lora_B", Traits::lora_B_shape(base_options, rank)}};
    if (options.gate()) {
      shapes.push_back(
          {"gate", {branches, Traits::out_features(base_options)}});
    }
    if (options.router()) {
      shapes.push_back(
          {"router.weight", {branches, Traits::in_features(base_options)}});
      shapes.push_back({"router.bias", {branches}});
    }
    return shapes;
  }

  /// Whether an adapter is attached.
  bool has_adapter() const {
    return options.has_value();
  }

  /// Re-initialises the adapter only, which makes the layer equal to its base
  /// again: A Kaiming-uniform, B, router and gate zero.
  void reset_parameters() {
    if (!options) {
      return;
    }
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

  /// The base layer's output with the adapter's update and gate; without an
  /// adapter, or with it disabled, exactly the base layer's output.
  torch::Tensor forward(const torch::Tensor& input) {
    return options && enabled_
        ? Traits::forward(
              base_options, input, weight, bias, adapter(), func_options())
        : Traits::base_forward(base_options, input, weight, bias);
  }

  /// The router's style weights for each instance of `input` (the fixed
  /// style if one is set; 1/n with the router off), e.g. to see which style
  /// an input is routed to. For Linear: (N, d_in) -> (N, n),
  /// (..., L, d_in) -> (..., n).
  torch::Tensor style_weights(const torch::Tensor& input) {
    check_has_adapter("style_weights");
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
    check_has_adapter("set_style");
    const int64_t branches = options->branches();
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

  /// The adapter's tensors, for the optimizer (the base is frozen); empty
  /// without an adapter.
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
    if (options) {
      stream << ", rank=" << options->rank()
             << ", branches=" << options->branches()
             << ", alpha=" << options->alpha().value_or(options->rank());
      if (options->dropout() > 0.0) {
        stream << ", dropout=" << options->dropout();
      }
      if (options->rslora()) {
        stream << ", rslora=true";
      }
      if (options->temperature() != 1.0) {
        stream << ", temperature=" << options->temperature();
      }
      stream << ", router=" << options->router()
             << ", gate=" << options->gate();
    }
    stream << ")";
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
  /// Options of the adapter; empty without one.
  c10::optional<StyleInjectOptions> options;
  /// The base layer's parameters, frozen; `bias` is undefined without bias.
  torch::Tensor weight, bias;
  /// The n down-projections: (n, r, d_in) for Linear, (n, r, C_in, k, k)
  /// for Conv2d. Undefined without an adapter, as are the three below.
  torch::Tensor lora_A;
  /// The shared up-projection: (d_out, r) for Linear, (C_out, r, 1, 1) for
  /// Conv2d.
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

  static StyleInjectOptions checked(StyleInjectOptions options) {
    detail::check_options(options, Traits::name);
    return options;
  }

  // The base's tensors keep their own requires_grad: a layer without an
  // adapter trains like the base layer type.
  void register_base(torch::Tensor base_weight, torch::Tensor base_bias) {
    Traits::check_base(base_options);
    const bool weight_grad = base_weight.requires_grad();
    const bool bias_grad = base_bias.defined() && base_bias.requires_grad();
    weight =
        this->register_parameter("weight", std::move(base_weight), weight_grad);
    bias = this->register_parameter("bias", std::move(base_bias), bias_grad);
  }

  void register_adapter() {
    weight.set_requires_grad(false);
    if (bias.defined()) {
      bias.set_requires_grad(false);
    }
    const auto on_base = weight.options().requires_grad(false);
    const int64_t branches = options->branches(), rank = options->rank();
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
    if (options->router()) {
      router = this->register_module("router", torch::nn::Linear(in, branches));
      router->to(weight.device(), weight.scalar_type());
    }
    gate = options->gate() ? this->register_parameter(
                                 "gate", torch::empty({branches, out}, on_base))
                           : torch::Tensor();
    reset_parameters();
  }

  void check_has_adapter(const char* method) const {
    TORCH_CHECK(
        options.has_value(),
        Traits::name,
        ": ",
        method,
        "() needs an adapter, but the layer has none; add one with "
        "add_adapter() or styleinject::inject()");
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
        .scaling(options->scaling())
        .scale(scale_)
        .temperature(options->temperature())
        .dropout(options->dropout())
        .training(this->is_training())
        .style(style_)
        .path(options->path());
  }

  bool enabled_ = true;
  double scale_ = 1.0;
  torch::Tensor style_;
};

} // namespace styleinject
