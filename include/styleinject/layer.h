#pragma once

#include <styleinject/detail/checkpoint.h>
#include <styleinject/detail/json.h>
#include <styleinject/functional.h>
#include <styleinject/options.h>

#include <torch/nn/cloneable.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/linear.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cmath>
#include <memory>
#include <ostream>
#include <sstream>
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
/// is frozen and the adapter lives on the base weight's device, in the base
/// weight's dtype or its own (StyleInjectOptions::dtype). As in torch::nn,
/// `options` are the base layer's options; the adapter's are
/// `adapter_options`. Users declare `StyleInjectLinear` or
/// `StyleInjectConv2d`.
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
      : options(Traits::options_of(*checked(base))) {
    register_base(base->weight, base->bias);
  }

  /// Wraps `base` with an adapter: the layer shares base's weight and bias
  /// and freezes them (`requires_grad` becomes false on both).
  StyleInjectLayerImpl(BaseHolder base, StyleInjectOptions adapter)
      : StyleInjectLayerImpl(std::move(base)) {
    add_adapter(std::move(adapter));
  }

  /// A new base layer from `options`, initialised as the base layer type
  /// initialises itself, with an adapter on it (the base frozen) if one is
  /// given: without, it trains, computes and saves exactly as the base layer
  /// type does, until `add_adapter`.
  explicit StyleInjectLayerImpl(
      BaseOptions options,
      c10::optional<StyleInjectOptions> adapter = c10::nullopt)
      : options(std::move(options)),
        adapter_options(adapter ? checked(*adapter) : adapter) {
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

  /// Registers a new base layer, and an adapter if `adapter_options` has one
  /// (clone() relies on it).
  void reset() override {
    BaseHolder fresh(options);
    register_base(fresh->weight, fresh->bias);
    if (adapter_options) {
      register_adapter();
    }
  }

  /// Attaches an adapter to the layer and freezes the base's weight and
  /// bias. The adapter starts as the identity: the output does not change.
  void add_adapter(StyleInjectOptions adapter) {
    TORCH_CHECK(
        !adapter_options,
        Traits::name,
        ": the layer has an adapter already; call remove_adapter() first");
    adapter_options = checked(std::move(adapter));
    register_adapter();
  }

  /// Removes the adapter, whatever parts it has, which leaves the base layer
  /// (still frozen). A merged adapter stays in the weight: the layer becomes
  /// a plain layer with the merged weight (PEFT's "merge and unload"),
  /// except where the gate is still an op of the layer (gate=scale).
  void remove_adapter() {
    if (!adapter_options) {
      return;
    }
    TORCH_CHECK(
        !merged_gate_.defined(),
        Traits::name,
        ": remove_adapter() would drop the merged adapter's gate, which is "
        "not in the weight; unmerge() first");
    merged_ = false;
    unmerged_weight_ = torch::Tensor();
    for (const char* name : {"lora_A", "lora_B", "gate"}) {
      if (this->parameters_.contains(name)) {
        this->parameters_.erase(name);
      }
    }
    if (router) {
      this->unregister_module("router");
    }
    lora_A = lora_B = gate = torch::Tensor();
    router = nullptr;
    style_ = torch::Tensor();
    adapter_options = c10::nullopt;
  }

  /// The names and shapes of the parameters that an adapter with `adapter`
  /// options has on a base layer with `options` (SPEC §5).
  static std::vector<std::pair<std::string, std::vector<int64_t>>>
  adapter_shapes(
      const BaseOptions& options,
      const StyleInjectOptions& adapter) {
    const int64_t branches = adapter.branches(), rank = adapter.rank();
    std::vector<std::pair<std::string, std::vector<int64_t>>> shapes{
        {"lora_A", Traits::lora_A_shape(options, branches, rank)},
        {"lora_B", Traits::lora_B_shape(options, rank)}};
    if (adapter.gate() == GateMode::kScale) {
      shapes.push_back({"gate", {branches, Traits::out_features(options)}});
    }
    if (adapter.router()) {
      shapes.push_back(
          {"router.weight", {branches, Traits::in_features(options)}});
      shapes.push_back({"router.bias", {branches}});
    }
    return shapes;
  }

  /// Whether an adapter is attached.
  bool has_adapter() const {
    return adapter_options.has_value();
  }

  /// Re-initialises the adapter only, which makes the layer equal to its base
  /// again: A Kaiming-uniform, B, router and gate zero.
  void reset_parameters() {
    if (!adapter_options) {
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
  /// adapter, or with it disabled, exactly the base layer's output. Reads
  /// the layer's state and writes none of it, so threads may share a layer
  /// for inference.
  torch::Tensor forward(const torch::Tensor& input) {
    if (merged_) {
      return Traits::merged_forward(options, input, weight, bias, merged_gate_);
    }
    return adapter_options && enabled_
        ? Traits::forward(
              options, input, weight, bias, adapter(), func_options())
        : Traits::base_forward(options, input, weight, bias);
  }

  /// The router's style weights for each instance of `input` (the fixed
  /// style if one is set; 1/n with the router off), e.g. to see which style
  /// an input is routed to. For Linear: (d_in) -> (n), (N, d_in) -> (N, n),
  /// (..., L, d_in) -> (..., n).
  torch::Tensor style_weights(const torch::Tensor& input) {
    check_has_adapter("style_weights");
    return Traits::style_weights(input, adapter(), func_options());
  }

  /// Switches the adapter on or off; off, forward is bit-identical to the
  /// base layer's.
  void set_enabled(bool enabled) {
    check_unmerged("set_enabled");
    enabled_ = enabled;
  }
  bool is_enabled() const {
    return enabled_;
  }

  /// Strength of the whole adapter: it multiplies the low-rank update and
  /// the gate's logits (inside the gate's tanh, so that each channel's
  /// spread stays within (0, 2) times the base's at any strength). 0 gives
  /// the base layer, 1 the trained adapter; above 1 strengthens it, below 0
  /// inverts it. Default: 1
  void set_scale(double scale) {
    check_unmerged("set_scale");
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
  /// that forward never reads from the device. The style moves with the
  /// layer (to(), clone()).
  void set_style(const torch::Tensor& style) {
    check_has_adapter("set_style");
    check_unmerged("set_style");
    const int64_t branches = adapter_options->branches();
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
    check_unmerged("clear_style");
    style_ = torch::Tensor();
  }
  const torch::Tensor& style() const {
    return style_;
  }

  /// Why no one style serves every input (a router that reads the input, or
  /// a fixed style per instance); empty where one does: the router off, or
  /// a fixed style of shape [n]. Merge and LoRA export need one.
  std::string shared_style_obstacle() const {
    check_has_adapter("shared_style_obstacle");
    if (style_.defined() ? style_.dim() == 1 : router.is_empty()) {
      return {};
    }
    return std::string(
               style_.defined() ? "its fixed style is per instance"
                                : "its router picks a style per input") +
        ", so no one weight serves every input; fix one style of shape [" +
        std::to_string(adapter_options->branches()) + "] with set_style()";
  }

  /// The one style that every input gets, (n), in float32 or wider: the
  /// fixed style, or 1/n with the router off (see shared_style_obstacle).
  torch::Tensor shared_style() const {
    TORCH_CHECK(
        shared_style_obstacle().empty(),
        Traits::name,
        ": shared_style(): ",
        shared_style_obstacle());
    return detail::style_weights(
        weight, torch::Tensor(), adapter(), func_options());
  }

  /// Why the adapter cannot be folded into the base weight; empty if it
  /// can. It can where one style serves every input: the router off, or a
  /// fixed style of shape [n]; and where the gate is off or kScale.
  std::string merge_obstacle() const {
    if (!adapter_options) {
      return "the layer has no adapter";
    }
    if (!enabled_) {
      return "the adapter is disabled (set_enabled(false))";
    }
    const auto style = shared_style_obstacle();
    if (!style.empty()) {
      return style;
    }
    if (detail::parameter_free(adapter_options->gate())) {
      return std::string("gate=") + gate_mode_name(adapter_options->gate()) +
          " reads the frozen and the adapted output apart; only gate=off and "
          "gate=scale merge";
    }
    return {};
  }

  /// Folds the adapter into the base weight, `W0 += c·B·(s·A)` (for
  /// Conv2d the composed k×k kernel), in place and rounded once, so that
  /// forward costs the base layer alone. A kScale gate keeps its per-channel
  /// factor g = tanh(scale·s·gate), fixed now, and stays an op: each
  /// channel's spread around its token (H×W) mean times (1 + g), one pass
  /// over the output (for Linear, folded into the GEMM where the output
  /// outnumbers the weight). Refused (see merge_obstacle) where the
  /// router reads the input. While merged, the controls (enable, scale,
  /// style), save and load are refused until `unmerge`; merging twice does
  /// nothing.
  void merge(MergeOptions merge_options = {}) {
    if (merged_) {
      return;
    }
    const auto obstacle = merge_obstacle();
    TORCH_CHECK_VALUE(
        obstacle.empty(), Traits::name, ": cannot merge: ", obstacle);
    torch::NoGradGuard no_grad;
    const auto update = weight_update();
    unmerged_weight_ =
        merge_options.keep_base() ? weight.clone() : torch::Tensor();
    weight.copy_(weight.to(update.scalar_type()) + update);
    merged_gate_ = gate.defined()
        ? detail::gate_factor(shared_style(), gate, scale_)
        : torch::Tensor();
    merged_ = true;
  }

  /// Takes the adapter out of the base weight again: bit for bit with
  /// MergeOptions::keep_base (the default); otherwise `W0 = W - c·B·(s·A)`
  /// computed in float32 or wider and rounded once. With merge's rounding,
  /// that is within two roundings of the weight's dtype: |W0' - W0| <=
  /// ε·(2|W0| + |c·B·(s·A)|) per element, ε its unit roundoff. Does nothing
  /// where the layer is not merged.
  void unmerge() {
    if (!merged_) {
      return;
    }
    torch::NoGradGuard no_grad;
    if (unmerged_weight_.defined()) {
      weight.copy_(unmerged_weight_);
    } else {
      const auto update = weight_update();
      weight.copy_(weight.to(update.scalar_type()) - update);
    }
    unmerged_weight_ = merged_gate_ = torch::Tensor();
    merged_ = false;
  }

  /// Whether the adapter is folded into the base weight.
  bool is_merged() const {
    return merged_;
  }

  /// The adapter's tensors, for the optimizer (the base is frozen); empty
  /// without an adapter.
  std::vector<torch::Tensor> adapter_parameters() const {
    std::vector<torch::Tensor> result;
    for (const auto& parameter : this->named_parameters()) {
      if (!detail::is_base_parameter(parameter.key())) {
        result.push_back(parameter.value());
      }
    }
    return result;
  }

  /// One line, as LibTorch prints its layers, e.g.
  /// `styleinject::StyleInjectLinear(in_features=8, out_features=4,
  /// bias=true, rank=2, branches=4, alpha=2, router=true, gate=scale)`. The
  /// stream's formatting is left as it was.
  void pretty_print(std::ostream& stream) const override {
    std::ostringstream text;
    text << std::boolalpha << Traits::name << "(";
    Traits::pretty_print(text, options);
    if (const auto& adapter = adapter_options) {
      text << ", rank=" << adapter->rank()
           << ", branches=" << adapter->branches()
           << ", alpha=" << adapter->alpha().value_or(adapter->rank());
      if (adapter->dropout() > 0.0) {
        text << ", dropout=" << adapter->dropout();
      }
      if (adapter->rslora()) {
        text << ", rslora=true";
      }
      if (adapter->temperature() != 1.0) {
        text << ", temperature=" << adapter->temperature();
      }
      text << ", router=" << adapter->router()
           << ", gate=" << gate_mode_name(adapter->gate());
      if (adapter->dtype()) {
        text << ", dtype=" << detail::adapter_dtype_name(*adapter->dtype());
      }
    }
    stream << text.str() << ")";
  }

  /// Moves and converts the layer as torch::nn::Module::to does, except
  /// that an adapter with its own dtype (StyleInjectOptions::dtype) keeps
  /// it; a fixed style moves along.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false)
      override {
    convert(device, dtype, non_blocking);
  }
  void to(torch::Dtype dtype, bool non_blocking = false) override {
    convert(c10::nullopt, dtype, non_blocking);
  }
  void to(torch::Device device, bool non_blocking = false) override {
    convert(device, c10::nullopt, non_blocking);
  }

  /// A deep copy, on `device` if one is given; the fixed style moves along.
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device =
          c10::nullopt) const override {
    auto copy = torch::nn::Cloneable<StyleInjectLayerImpl>::clone(device);
    auto& layer = dynamic_cast<StyleInjectLayerImpl&>(*copy);
    if (device) {
      for (auto* tensor :
           {&layer.style_, &layer.unmerged_weight_, &layer.merged_gate_}) {
        if (tensor->defined()) {
          *tensor = tensor->to(*device);
        }
      }
    }
    return copy;
  }

  /// Saves the layer as torch::nn::Module does, and with an adapter its
  /// options too (under "styleinject_options", as JSON), so that torch::load
  /// can attach the adapter to a layer that has none.
  void save(torch::serialize::OutputArchive& archive) const override {
    // A merged weight beside its adapter would apply the update twice once
    // loaded.
    check_unmerged("save");
    torch::nn::Module::save(archive);
    if (adapter_options) {
      archive.write(
          detail::kCheckpointOptionsKey,
          c10::IValue(detail::options_to_json(*adapter_options).dump()));
    }
  }

  /// Loads a checkpoint of this layer, or of its plain base layer:
  /// - a base-layer checkpoint (weight and bias only) leaves the adapter's
  ///   values as they are;
  /// - a checkpoint of an adapted layer attaches its adapter, with the
  ///   options it records, where the layer has none; where it has one, the
  ///   two must compute the same (detail::same_computation).
  /// Adapter tensors without recorded options (a checkpoint made by hand or
  /// before 0.3) load only into an adapter attached already. Everything is
  /// read and checked before anything changes, so a checkpoint that does
  /// not fit leaves the layer as it was. Values are copied into the layer's
  /// own dtypes and device.
  void load(torch::serialize::InputArchive& archive) override {
    check_unmerged("load");
    const auto plan = detail::plan_checkpoint_load(*this, archive);
    if (plan.attach) {
      add_adapter(*plan.attach);
    }
    torch::NoGradGuard no_grad;
    auto parameters = this->named_parameters();
    for (const auto& value : plan.values) {
      parameters[value.first].copy_(value.second);
    }
  }

  /// Options of the base layer (e.g. torch::nn::LinearOptions), as
  /// torch::nn::Linear's `options`.
  BaseOptions options;
  /// Options of the adapter; empty without one.
  c10::optional<StyleInjectOptions> adapter_options;
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

  static StyleInjectOptions checked(StyleInjectOptions adapter) {
    detail::check_options(adapter, Traits::name);
    return adapter;
  }

  // The base's tensors keep their own requires_grad: a layer without an
  // adapter trains like the base layer type.
  void register_base(torch::Tensor base_weight, torch::Tensor base_bias) {
    Traits::check_base(options);
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
    const auto dtype = adapter_options->dtype().value_or(weight.scalar_type());
    const auto on_device = weight.options().dtype(dtype).requires_grad(false);
    const int64_t branches = adapter_options->branches();
    const int64_t rank = adapter_options->rank();
    lora_A = this->register_parameter(
        "lora_A",
        torch::empty(Traits::lora_A_shape(options, branches, rank), on_device));
    lora_B = this->register_parameter(
        "lora_B", torch::empty(Traits::lora_B_shape(options, rank), on_device));
    router = nullptr;
    if (adapter_options->router()) {
      router = this->register_module(
          "router", torch::nn::Linear(Traits::in_features(options), branches));
      router->to(weight.device(), dtype);
    }
    gate = adapter_options->gate() == GateMode::kScale
        ? this->register_parameter(
              "gate",
              torch::empty(
                  {branches, Traits::out_features(options)}, on_device))
        : torch::Tensor();
    reset_parameters();
  }

  void convert(
      c10::optional<torch::Device> device,
      c10::optional<torch::Dtype> dtype,
      bool non_blocking) {
    const auto adapter_dtype = adapter_options && adapter_options->dtype()
        ? adapter_options->dtype()
        : dtype;
    for (const auto& parameter : this->named_parameters()) {
      auto tensor = parameter.value();
      const auto to_dtype =
          detail::is_base_parameter(parameter.key()) ? dtype : adapter_dtype;
      tensor.set_data(tensor.to(
          device.value_or(tensor.device()),
          to_dtype.value_or(tensor.scalar_type()),
          non_blocking));
    }
    if (device && style_.defined()) {
      style_ = style_.to(*device, non_blocking);
    }
    if (unmerged_weight_.defined()) {
      unmerged_weight_ = unmerged_weight_.to(
          device.value_or(weight.device()), weight.scalar_type(), non_blocking);
    }
    if (device && merged_gate_.defined()) {
      merged_gate_ = merged_gate_.to(*device, non_blocking);
    }
  }

  void check_unmerged(const char* method) const {
    TORCH_CHECK(
        !merged_,
        Traits::name,
        ": ",
        method,
        "() while the adapter is merged into the weight; unmerge() first");
  }

  /// What merge adds to the base weight, in the wider of the adapter's
  /// dtype and float32 (float64 stays float64).
  torch::Tensor weight_update() const {
    const auto dtype = at::promote_types(
        detail::statistics_dtype(weight.scalar_type()), lora_A.scalar_type());
    return detail::weight_update(
        shared_style().to(dtype),
        lora_A.to(dtype),
        lora_B,
        adapter_options->scaling() * scale_);
  }

  void check_has_adapter(const char* method) const {
    TORCH_CHECK(
        adapter_options.has_value(),
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

  functional::StyleInjectFuncOptions func_options() const {
    return functional::StyleInjectFuncOptions()
        .scaling(adapter_options->scaling())
        .scale(scale_)
        .temperature(adapter_options->temperature())
        .dropout(adapter_options->dropout())
        .training(this->is_training())
        .style(style_)
        .path(adapter_options->path())
        .gate(adapter_options->gate());
  }

  bool enabled_ = true;
  double scale_ = 1.0;
  torch::Tensor style_;
  bool merged_ = false;
  /// The base weight before merge, with MergeOptions::keep_base.
  torch::Tensor unmerged_weight_;
  /// A merged kScale gate's factor g, (d_out), in float32 or wider.
  torch::Tensor merged_gate_;
};

} // namespace styleinject
