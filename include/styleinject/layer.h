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

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
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

namespace detail {

/// Where StyleInject layers report the style weights of their inputs while a
/// styleinject::RoutingRecord (<styleinject/inject.h>) records on this
/// thread.
class RoutingObserver {
 public:
  virtual ~RoutingObserver() = default;
  /// `weights(name)`: the style weights that the layer's enabled adapter
  /// `name` gives this forward's input; undefined where it has none.
  virtual void observe(
      const torch::nn::Module& layer,
      const std::function<torch::Tensor(const std::string&)>& weights) = 0;
};

/// The observer of this thread's forwards; null: none records.
inline RoutingObserver*& routing_observer() {
  static thread_local RoutingObserver* observer = nullptr;
  return observer;
}

/// Whether StyleInject layers built on this thread skip initialising their
/// base (see SkipInit).
inline bool& skip_init() {
  static thread_local bool skip = false;
  return skip;
}

/// The run-time controls of one adapter.
struct AdapterControls {
  bool enabled = true;
  double scale = 1.0;
  /// A fixed style, (n) or (N, n); undefined: the router's.
  torch::Tensor style;
};

/// The tensors of the adapter that `owner` holds (a layer's first adapter,
/// or a NamedAdapterImpl), under SPEC §5's names.
template <typename Owner>
functional::AdapterTensors adapter_tensors_of(const Owner& owner) {
  return {
      owner.lora_A,
      owner.lora_B,
      owner.router ? owner.router->weight : torch::Tensor(),
      owner.router ? owner.router->bias : torch::Tensor(),
      owner.gate};
}

/// Initialises an adapter as the identity: A Kaiming-uniform, B, router
/// and gate zero.
inline void reset_adapter(const functional::AdapterTensors& adapter) {
  torch::NoGradGuard no_grad;
  for (int64_t i = 0; i < adapter.lora_A.size(0); ++i) {
    // Branch by branch, so that the fan-in is that of one LoRA A: the
    // same init as PEFT's kaiming_uniform_(a=sqrt(5)).
    torch::nn::init::kaiming_uniform_(adapter.lora_A[i], std::sqrt(5.0));
  }
  // B = 0 makes the update zero at step 0 (LoRA, Hu et al. 2021); a zero
  // router gives s = 1/n, a zero gate g = 0 (SPEC §1, §3).
  for (const auto* zero :
       {&adapter.lora_B,
        &adapter.router_weight,
        &adapter.router_bias,
        &adapter.gate}) {
    if (zero->defined()) {
      zero->zero_();
    }
  }
}

/// Registers on `owner` the parameters that an adapter with options
/// `adapter` has on a base layer with options `base` (SPEC §5), with the
/// device and dtype of `on`, and initialises them (reset_adapter).
template <typename Base, typename Owner>
void register_adapter_parameters(
    Owner& owner,
    const typename layer_traits<Base>::Options& base,
    const StyleInjectOptions& adapter,
    const torch::TensorOptions& on) {
  using Traits = layer_traits<Base>;
  const auto tensor = on.requires_grad(false);
  const int64_t branches = adapter.branches(), rank = adapter.rank();
  owner.lora_A = owner.register_parameter(
      "lora_A",
      torch::empty(Traits::lora_A_shape(base, branches, rank), tensor));
  owner.lora_B = owner.register_parameter(
      "lora_B", torch::empty(Traits::lora_B_shape(base, rank), tensor));
  owner.router = nullptr;
  if (adapter.router()) {
    owner.router = owner.register_module(
        "router", torch::nn::Linear(Traits::in_features(base), branches));
    owner.router->to(on.device(), on.dtype().toScalarType());
  }
  owner.gate = adapter.gate() == GateMode::kScale
      ? owner.register_parameter(
            "gate",
            torch::empty({branches, Traits::out_features(base)}, tensor))
      : torch::Tensor();
  reset_adapter(adapter_tensors_of(owner));
}

/// An adapter's options as the layers print them: "rank=2, branches=4,
/// alpha=2, router=true, gate=scale", and dropout, rslora, temperature and
/// dtype where they differ from their defaults.
inline void print_adapter_options(
    std::ostream& stream,
    const StyleInjectOptions& a) {
  std::ostringstream text;
  text << std::boolalpha << "rank=" << a.rank() << ", branches=" << a.branches()
       << ", alpha=" << a.alpha().value_or(a.rank());
  if (a.dropout() > 0.0) {
    text << ", dropout=" << a.dropout();
  }
  if (a.rslora()) {
    text << ", rslora=true";
  }
  if (a.temperature() != 1.0) {
    text << ", temperature=" << a.temperature();
  }
  text << ", router=" << a.router() << ", gate=" << gate_mode_name(a.gate());
  if (a.dtype()) {
    text << ", dtype=" << adapter_dtype_name(*a.dtype());
  }
  stream << text.str();
}

/// An adapter of a layer beyond its first (kDefaultAdapter): a child module
/// of the layer under the adapter's name, so that its parameters are
/// `<layer>.<name>.lora_A`, `<layer>.<name>.lora_B`,
/// `<layer>.<name>.router.weight`, ... It holds the parameters and options;
/// the layer computes with them and keeps their controls.
template <typename Base>
class NamedAdapterImpl : public torch::nn::Cloneable<NamedAdapterImpl<Base>> {
 public:
  using BaseOptions = typename layer_traits<Base>::Options;

  NamedAdapterImpl(
      std::string name,
      BaseOptions base,
      StyleInjectOptions options,
      torch::TensorOptions on)
      : name(std::move(name)),
        base(std::move(base)),
        options(std::move(options)),
        on(on) {
    reset();
  }

  void reset() override {
    register_adapter_parameters<Base>(*this, base, options, on);
  }

  /// `styleinject::Adapter(rank=4, branches=1, ...)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "styleinject::Adapter(";
    print_adapter_options(stream, options);
    stream << ")";
  }

  /// Saves the parameters and, as the layer does for its first adapter,
  /// the options, so that torch::load can attach the adapter.
  void save(torch::serialize::OutputArchive& archive) const override {
    torch::nn::Module::save(archive);
    archive.write(
        kCheckpointOptionsKey, c10::IValue(options_to_json(options).dump()));
  }

  std::string name;
  BaseOptions base;
  StyleInjectOptions options;
  torch::TensorOptions on;
  torch::Tensor lora_A, lora_B, gate;
  torch::nn::Linear router{nullptr};
};

} // namespace detail

/// While alive, the StyleInject layers built on this thread leave their base
/// weight and bias uninitialised (torch::empty) instead of drawing them as
/// the base layer type does, as PyTorch's `skip_init` and accelerate's
/// `init_empty_weights` do for a model whose weights are loaded next: no
/// random numbers are drawn. SD-1.5's UNet builds in milliseconds instead
/// of 7-10 s on a 2-core CPU. Load every weight afterwards (load_weights,
/// strict, does) or the values are whatever the memory held.
///
/// Example:
/// ```
/// UNet unet{nullptr};
/// {
///   styleinject::SkipInit skip;
///   unet = UNet(config);
/// }
/// styleinject::load_weights(*unet, "unet.safetensors");
/// ```
class SkipInit : detail::ScopedFlag {
 public:
  SkipInit() : ScopedFlag(detail::skip_init()) {}
};

/// A base layer (`weight`, `bias`) that can carry StyleInject adapters. The
/// first (kDefaultAdapter, "default") has SPEC §5's parameters (`lora_A`,
/// `lora_B`, `router.weight`, `router.bias`, `gate`) registered beside the
/// base's, so that a base checkpoint loads unchanged; more adapters, added
/// under names of their own, are children of the layer
/// (`<name>.lora_A`, ...). The forward sums the enabled adapters' updates
/// (see the list overload of functional::style_inject_linear). With
/// adapters, the base is frozen and each adapter lives on the base weight's
/// device, in the base weight's dtype or its own
/// (StyleInjectOptions::dtype). Without one the layer is the base layer
/// type in all but name. As in torch::nn, `options` are the base layer's
/// options; the first adapter's are `adapter_options`. Users declare
/// `StyleInjectLinear` or `StyleInjectConv2d`.
///
/// The math is in `styleinject::functional`; this module holds parameters,
/// options and the run-time controls of each adapter (enable/disable,
/// scale, fixed style), which take the adapter's name, "default" if none
/// is given.
template <typename Base>
class StyleInjectLayerImpl
    : public torch::nn::Cloneable<StyleInjectLayerImpl<Base>> {
 public:
  using Traits = layer_traits<Base>;
  using BaseHolder = typename Traits::Holder;
  using BaseOptions = typename Traits::Options;
  using NamedAdapter = std::shared_ptr<detail::NamedAdapterImpl<Base>>;

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
    if (adapter_options) {
      controls_[kDefaultAdapter] = {};
    }
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

  /// Registers a new base layer, and the adapters the layer records
  /// (clone() relies on it).
  void reset() override {
    if (detail::skip_init()) { // trainable, as the base layer type's are
      const auto weight_shape = Traits::weight_shape(options);
      register_base(
          torch::empty(weight_shape).requires_grad_(),
          options.bias() ? torch::empty({weight_shape[0]}).requires_grad_()
                         : torch::Tensor());
    } else {
      BaseHolder fresh(options);
      register_base(fresh->weight, fresh->bias);
    }
    if (adapter_options) {
      register_default_adapter();
    }
    for (auto& named : named_) {
      named = make_named(named->name, named->options);
    }
  }

  /// Attaches an adapter to the layer under `name` and freezes the base's
  /// weight and bias. The adapter starts as the identity, enabled, at scale
  /// 1: the output does not change. "default" is the adapter with SPEC §5's
  /// parameter names; others are children of the layer under their names.
  /// Refused where add_obstacle says why.
  void add_adapter(
      StyleInjectOptions adapter,
      const std::string& name = kDefaultAdapter) {
    const std::string context =
        std::string(Traits::name) + ": add_adapter(\"" + name + "\")";
    detail::check_adapter_name(name, context);
    adapter = checked(std::move(adapter));
    const auto obstacle = add_obstacle(adapter, name);
    TORCH_CHECK(obstacle.empty(), context, ": the layer ", obstacle);
    if (name == kDefaultAdapter) {
      adapter_options = std::move(adapter);
      register_default_adapter();
    } else {
      named_.push_back(make_named(name, std::move(adapter)));
    }
    controls_[name] = {};
  }

  /// Why `add_adapter(adapter, name)` would be refused, completing "the
  /// layer ..."; empty if it would not: the layer has an adapter of that
  /// name, or its adapters are merged, or one of the two adapters has a
  /// parameter-free gate (gate=adain and gate=residual take an adapter
  /// alone).
  std::string add_obstacle(
      const StyleInjectOptions& adapter,
      const std::string& name) const {
    if (has_adapter(name)) {
      return "has an adapter already under the name '" + name +
          "'; remove_adapter(\"" + name + "\") takes it off";
    }
    if (merged_) {
      return "has its adapters merged into the weight; unmerge() first";
    }
    auto gates = adapter_gates();
    gates.emplace_back(name, adapter.gate());
    return detail::shared_layer_obstacle(gates);
  }

  /// Removes the adapter `name`, whatever parts it has (the base stays
  /// frozen); an adapter the layer does not have is no error. A layer's only
  /// adapter, merged, stays in the weight: the layer becomes a plain layer
  /// with the merged weight (PEFT's "merge and unload"), except where the
  /// gate is still an op of the layer (gate=scale). Of several merged
  /// adapters none can be taken out alone: unmerge() first.
  void remove_adapter(const std::string& name = kDefaultAdapter) {
    if (!has_adapter(name)) {
      return;
    }
    if (merged_) {
      TORCH_CHECK(
          adapter_names().size() == 1,
          Traits::name,
          ": remove_adapter(\"",
          name,
          "\") while several adapters are merged into the weight would "
          "leave its update there; unmerge() first");
      TORCH_CHECK(
          !merged_gate_.defined(),
          Traits::name,
          ": remove_adapter() would drop the merged adapter's gate, which "
          "is not in the weight; unmerge() first");
      merged_ = false;
      unmerged_weight_ = torch::Tensor();
    }
    controls_.erase(name);
    if (name != kDefaultAdapter) {
      this->unregister_module(name);
      named_.erase(named_at(name));
      return;
    }
    for (const char* parameter : {"lora_A", "lora_B", "gate"}) {
      if (this->parameters_.contains(parameter)) {
        this->parameters_.erase(parameter);
      }
    }
    if (router) {
      this->unregister_module("router");
    }
    lora_A = lora_B = gate = torch::Tensor();
    router = nullptr;
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

  /// Whether any adapter is attached.
  bool has_adapter() const {
    return !controls_.empty();
  }
  /// The name and gate of each attached adapter, in adapter_names() order.
  std::vector<std::pair<std::string, GateMode>> adapter_gates() const {
    std::vector<std::pair<std::string, GateMode>> gates;
    for (const auto& name : adapter_names()) {
      gates.emplace_back(name, adapter_options_of(name).gate());
    }
    return gates;
  }

  /// Whether the adapter `name` is attached.
  bool has_adapter(const std::string& name) const {
    return controls_.count(name) > 0;
  }

  /// The names of the attached adapters: "default" first if attached, then
  /// the others in the order they were added; the forward sums them in
  /// this order.
  std::vector<std::string> adapter_names() const {
    std::vector<std::string> names;
    if (adapter_options) {
      names.emplace_back(kDefaultAdapter);
    }
    for (const auto& named : named_) {
      names.push_back(named->name);
    }
    return names;
  }

  /// The options of the adapter `name` (`adapter_options` for "default").
  const StyleInjectOptions& adapter_options_of(const std::string& name) const {
    check_has_adapter(name, "adapter_options_of");
    return name == kDefaultAdapter ? *adapter_options : find(name).options;
  }

  /// The tensors of the adapter `name`, for functional::.
  functional::AdapterTensors adapter_tensors(
      const std::string& name = kDefaultAdapter) const {
    check_has_adapter(name, "adapter_tensors");
    return name == kDefaultAdapter ? detail::adapter_tensors_of(*this)
                                   : detail::adapter_tensors_of(find(name));
  }

  /// Re-initialises the adapters only, which makes the layer equal to its
  /// base again: A Kaiming-uniform, B, router and gate zero.
  void reset_parameters() {
    for (const auto& name : adapter_names()) {
      detail::reset_adapter(adapter_tensors(name));
    }
  }

  /// The base layer's output with the enabled adapters' updates and gates;
  /// without an enabled adapter exactly the base layer's output. Reads the
  /// layer's state and writes none of it, so threads may share a layer for
  /// inference.
  torch::Tensor forward(const torch::Tensor& input) {
    if (merged_) {
      return Traits::merged_forward(options, input, weight, bias, merged_gate_);
    }
    if (auto* observer = detail::routing_observer()) {
      observer->observe(*this, [&](const std::string& name) {
        return has_adapter(name) && is_enabled(name)
            ? style_weights(input, name)
            : torch::Tensor();
      });
    }
    std::vector<functional::AdapterTerm> terms;
    for (const auto& name : enabled_names()) {
      terms.push_back({adapter_tensors(name), func_options(name)});
    }
    return terms.empty() ? Traits::base_forward(options, input, weight, bias)
                         : Traits::forward(options, input, weight, bias, terms);
  }

  /// The router's style weights for each instance of `input` (the fixed
  /// style if one is set; 1/n with the router off), e.g. to see which style
  /// an input is routed to. For Linear: (d_in) -> (n), (N, d_in) -> (N, n),
  /// (..., L, d_in) -> (..., n).
  torch::Tensor style_weights(
      const torch::Tensor& input,
      const std::string& name = kDefaultAdapter) {
    check_has_adapter(name, "style_weights");
    return Traits::style_weights(
        input, adapter_tensors(name), func_options(name));
  }

  /// Switches the adapter `name` on or off; with every adapter off, forward
  /// is bit-identical to the base layer's.
  void set_enabled(bool enabled, const std::string& name = kDefaultAdapter) {
    controls("set_enabled", name).enabled = enabled;
  }
  bool is_enabled(const std::string& name = kDefaultAdapter) const {
    check_has_adapter(name, "is_enabled");
    return controls_.at(name).enabled;
  }

  /// Strength of the adapter `name`: it multiplies the low-rank update and
  /// the gate's logits (inside the gate's tanh, so that each channel's
  /// spread stays within (0, 2) times the base's at any strength). 0 gives
  /// the base layer, 1 the trained adapter; above 1 strengthens it, below 0
  /// inverts it. Default: 1
  void set_scale(double scale, const std::string& name = kDefaultAdapter) {
    TORCH_CHECK_VALUE(
        std::isfinite(scale),
        Traits::name,
        ": expected a finite scale, but got ",
        scale);
    controls("set_scale", name).scale = scale;
  }
  double scale(const std::string& name = kDefaultAdapter) const {
    check_has_adapter(name, "scale");
    return controls_.at(name).scale;
  }

  /// Replaces the router's weights of the adapter `name` with a fixed
  /// style: (n) for every instance (one-hot = one style), or (N, n) per
  /// instance. Entries must be finite and non-negative; that is checked
  /// here, once (a host read), so that forward never reads from the device.
  /// The style moves with the layer (to(), clone()).
  void set_style(
      const torch::Tensor& style,
      const std::string& name = kDefaultAdapter) {
    auto& control = controls("set_style", name);
    const int64_t branches = adapter_options_of(name).branches();
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
    {
      torch::NoGradGuard no_grad;
      TORCH_CHECK_VALUE(
          (torch::isfinite(style) & (style >= 0)).all().template item<bool>(),
          Traits::name,
          ": expected finite, non-negative style weights, but got values from ",
          style.min().template item<double>(),
          " to ",
          style.max().template item<double>());
    }
    control.style = style.detach().to(weight.device());
  }
  /// Goes back to the router's own weights.
  void clear_style(const std::string& name = kDefaultAdapter) {
    controls("clear_style", name).style = torch::Tensor();
  }
  const torch::Tensor& style(const std::string& name = kDefaultAdapter) const {
    check_has_adapter(name, "style");
    return controls_.at(name).style;
  }

  /// Why no one style serves every input of the adapter `name` (a router
  /// that reads the input, or a fixed style per instance); empty where one
  /// does: the router off, or a fixed style of shape [n]. Merge and LoRA
  /// export need one.
  std::string shared_style_obstacle(
      const std::string& name = kDefaultAdapter) const {
    check_has_adapter(name, "shared_style_obstacle");
    const auto& style = controls_.at(name).style;
    if (style.defined() ? style.dim() == 1
                        : !adapter_tensors(name).router_weight.defined()) {
      return {};
    }
    return std::string(
               style.defined() ? "its fixed style is per instance"
                               : "its router picks a style per input") +
        ", so no one weight serves every input; fix one style of shape [" +
        std::to_string(adapter_options_of(name).branches()) +
        "] with set_style()";
  }

  /// The one style that every input of the adapter `name` gets, (n), in
  /// float32 or wider: the fixed style, or 1/n with the router off (see
  /// shared_style_obstacle).
  torch::Tensor shared_style(const std::string& name = kDefaultAdapter) const {
    const auto obstacle = shared_style_obstacle(name);
    TORCH_CHECK(obstacle.empty(), Traits::name, ": shared_style(): ", obstacle);
    return detail::style_weights(
        weight, torch::Tensor(), adapter_tensors(name), func_options(name));
  }

  /// Why the enabled adapters cannot be folded into the base weight; empty
  /// if they can. They can where each has one style for every input (the
  /// router off, or a fixed style of shape [n]) and the gate off or kScale.
  std::string merge_obstacle() const {
    if (!has_adapter()) {
      return "the layer has no adapter";
    }
    const auto names = enabled_names();
    if (names.empty()) {
      return "no adapter is enabled (set_enabled(false))";
    }
    for (const auto& name : names) {
      const auto which = adapter_names().size() == 1
          ? std::string()
          : "adapter '" + name + "': ";
      const auto style = shared_style_obstacle(name);
      if (!style.empty()) {
        return which + style;
      }
      const auto gate = adapter_options_of(name).gate();
      if (detail::parameter_free(gate)) {
        return which + "gate=" + gate_mode_name(gate) +
            " reads the frozen and the adapted output apart; only gate=off "
            "and gate=scale merge";
      }
    }
    return {};
  }

  /// Folds the enabled adapters into the base weight, `W0 += sum_k
  /// c_k·B_k·(s_k·A_k)` (for Conv2d the composed k×k kernels), in place and
  /// rounded once, so that forward costs the base layer alone. The kScale
  /// gates keep their per-channel factors g_k = tanh(scale_k·s_k·gate_k),
  /// fixed now and combined into one, and stay an op: each channel's spread
  /// around its token (H×W) mean times prod_k (1 + g_k), one pass over the
  /// output (for Linear, folded into the GEMM where the output outnumbers
  /// the weight). Refused (see merge_obstacle) where a router reads the
  /// input. While merged, the controls (enable, scale, style), adding
  /// adapters, save and load are refused until `unmerge`; merging twice
  /// does nothing.
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
    merged_gate_ = torch::Tensor();
    for (const auto& name : enabled_names()) {
      const auto tensors = adapter_tensors(name);
      if (tensors.gate.defined()) {
        merged_gate_ = detail::combined_gate(
            merged_gate_,
            detail::gate_factor(
                shared_style(name), tensors.gate, controls_.at(name).scale));
      }
    }
    merged_ = true;
  }

  /// Takes the adapters out of the base weight again: bit for bit with
  /// MergeOptions::keep_base (the default); otherwise `W0 = W - sum_k
  /// c_k·B_k·(s_k·A_k)` computed in float32 or wider and rounded once. With
  /// merge's rounding, that is within two roundings of the weight's dtype:
  /// |W0' - W0| <= ε·(2|W0| + |update|) per element, ε its unit roundoff.
  /// Does nothing where the layer is not merged.
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

  /// Whether the adapters are folded into the base weight.
  bool is_merged() const {
    return merged_;
  }

  /// The adapters' tensors, for the optimizer (the base is frozen); empty
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
  /// The tensors of the adapter `name` alone.
  std::vector<torch::Tensor> adapter_parameters(const std::string& name) const {
    std::vector<torch::Tensor> result;
    for (const auto& parameter : named_adapter_parameters(name)) {
      result.push_back(parameter.second);
    }
    return result;
  }
  /// The tensors of the adapter `name` by SPEC §5's names ("lora_A",
  /// "router.weight", ...), whatever its name, as adapter files hold them.
  std::vector<std::pair<std::string, torch::Tensor>> named_adapter_parameters(
      const std::string& name) const {
    check_has_adapter(name, "named_adapter_parameters");
    const size_t prefix = name == kDefaultAdapter ? 0 : name.size() + 1;
    std::vector<std::pair<std::string, torch::Tensor>> result;
    for (const auto& parameter : this->named_parameters()) {
      if (!detail::is_base_parameter(parameter.key()) &&
          owner_of(parameter.key()) == name) {
        result.emplace_back(parameter.key().substr(prefix), parameter.value());
      }
    }
    return result;
  }

  /// One line, as LibTorch prints its layers, e.g.
  /// `styleinject::StyleInjectLinear(in_features=8, out_features=4,
  /// bias=true, rank=2, branches=4, alpha=2, router=true, gate=scale)`, the
  /// first adapter's options after the base's; the other adapters print
  /// as children. The stream's formatting is left as it was.
  void pretty_print(std::ostream& stream) const override {
    std::ostringstream text;
    text << std::boolalpha << Traits::name << "(";
    Traits::pretty_print(text, options);
    if (adapter_options) {
      text << ", ";
      detail::print_adapter_options(text, *adapter_options);
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

  /// A deep copy, on `device` if one is given; the fixed styles move along.
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device =
          c10::nullopt) const override {
    auto copy = torch::nn::Cloneable<StyleInjectLayerImpl>::clone(device);
    auto& layer = dynamic_cast<StyleInjectLayerImpl&>(*copy);
    if (device) {
      std::vector<torch::Tensor*> state{
          &layer.unmerged_weight_, &layer.merged_gate_};
      for (auto& control : layer.controls_) {
        state.push_back(&control.second.style);
      }
      for (auto* tensor : state) {
        if (tensor->defined()) {
          *tensor = tensor->to(*device);
        }
      }
    }
    return copy;
  }

  /// Saves the layer as torch::nn::Module does, and with adapters their
  /// options too (as JSON: the first's under "styleinject_options", each
  /// other's in its own archive), so that torch::load can attach them to a
  /// layer that has none.
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
  /// - a base-layer checkpoint (weight and bias only) leaves the adapters'
  ///   values as they are, and so does a checkpoint without one adapter;
  /// - an adapter of the checkpoint is attached, with the options it
  ///   records, where the layer lacks it; where the layer has it, the two
  ///   must compute the same (detail::same_computation).
  /// Adapter tensors without recorded options (a checkpoint made by hand or
  /// before 0.3) load only into an adapter attached already. Everything is
  /// read and checked before anything changes, so a checkpoint that does
  /// not fit leaves the layer as it was. Values are copied into the layer's
  /// own dtypes and device.
  void load(torch::serialize::InputArchive& archive) override {
    check_unmerged("load");
    const auto plan = detail::plan_checkpoint_load(*this, archive);
    for (const auto& adapter : plan.attach) {
      add_adapter(adapter.second, adapter.first);
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
  /// Options of the first adapter ("default"); empty without one.
  c10::optional<StyleInjectOptions> adapter_options;
  /// The base layer's parameters, frozen; `bias` is undefined without bias.
  torch::Tensor weight, bias;
  /// The first adapter's n down-projections: (n, r, d_in) for Linear,
  /// (n, r, C_in, k, k) for Conv2d. Undefined without it, as are the three
  /// below.
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

  void freeze_base() {
    weight.set_requires_grad(false);
    if (bias.defined()) {
      bias.set_requires_grad(false);
    }
  }

  /// Where and in what dtype an adapter with `adapter` options lives.
  torch::TensorOptions adapter_tensor_options(
      const StyleInjectOptions& adapter) const {
    return weight.options().dtype(
        adapter.dtype().value_or(weight.scalar_type()));
  }

  void register_default_adapter() {
    freeze_base();
    detail::register_adapter_parameters<Base>(
        *this,
        options,
        *adapter_options,
        adapter_tensor_options(*adapter_options));
  }

  NamedAdapter make_named(const std::string& name, StyleInjectOptions adapter) {
    freeze_base();
    const auto on = adapter_tensor_options(adapter);
    return this->register_module(
        name,
        std::make_shared<detail::NamedAdapterImpl<Base>>(
            name, options, std::move(adapter), on));
  }

  typename std::vector<NamedAdapter>::const_iterator named_at(
      const std::string& name) const {
    return std::find_if(
        named_.begin(), named_.end(), [&](const NamedAdapter& named) {
          return named->name == name;
        });
  }

  const detail::NamedAdapterImpl<Base>& find(const std::string& name) const {
    const auto found = named_at(name);
    TORCH_INTERNAL_ASSERT(found != named_.end(), "no adapter '", name, "'");
    return **found;
  }

  /// The adapter that owns the parameter `key` of this layer.
  std::string owner_of(const std::string& key) const {
    const auto child = key.substr(0, key.find('.'));
    return has_adapter(child) && child != kDefaultAdapter
        ? child
        : std::string(kDefaultAdapter);
  }

  std::vector<std::string> enabled_names() const {
    std::vector<std::string> names;
    for (const auto& name : adapter_names()) {
      if (controls_.at(name).enabled) {
        names.push_back(name);
      }
    }
    return names;
  }

  void convert(
      c10::optional<torch::Device> device,
      c10::optional<torch::Dtype> dtype,
      bool non_blocking) {
    for (const auto& parameter : this->named_parameters()) {
      auto tensor = parameter.value();
      auto to_dtype = dtype;
      if (!detail::is_base_parameter(parameter.key())) {
        const auto& own = adapter_options_of(owner_of(parameter.key())).dtype();
        to_dtype = own ? own : dtype;
      }
      tensor.set_data(tensor.to(
          device.value_or(tensor.device()),
          to_dtype.value_or(tensor.scalar_type()),
          non_blocking));
    }
    for (auto& named : named_) {
      named->on = adapter_tensor_options(named->options);
    }
    for (auto& control : controls_) {
      auto& style = control.second.style;
      if (device && style.defined()) {
        style = style.to(*device, non_blocking);
      }
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
        "() while the adapters are merged into the weight; unmerge() first");
  }

  /// What merge adds to the base weight: the enabled adapters' updates,
  /// each in the wider of its dtype and float32 (float64 stays float64).
  torch::Tensor weight_update() const {
    torch::Tensor update;
    for (const auto& name : enabled_names()) {
      const auto tensors = adapter_tensors(name);
      const auto dtype = at::promote_types(
          detail::statistics_dtype(weight.scalar_type()),
          tensors.lora_A.scalar_type());
      const auto term = detail::weight_update(
          shared_style(name).to(dtype),
          tensors.lora_A.to(dtype),
          tensors.lora_B,
          adapter_options_of(name).scaling() * controls_.at(name).scale);
      update = update.defined() ? update + term : term;
    }
    return update;
  }

  void check_has_adapter(const std::string& name, const char* method) const {
    TORCH_CHECK(
        has_adapter(name),
        Traits::name,
        ": ",
        method,
        "() needs ",
        has_adapter() ? "the adapter '" + name + "', but the layer has only " +
                detail::quoted_list(adapter_names())
                      : std::string("an adapter, but the layer has none"),
        "; add one with add_adapter() or styleinject::inject()");
  }

  /// The controls of the adapter `name`, to change them.
  detail::AdapterControls& controls(
      const char* method,
      const std::string& name) {
    check_has_adapter(name, method);
    check_unmerged(method);
    return controls_.at(name);
  }

  functional::StyleInjectFuncOptions func_options(
      const std::string& name) const {
    const auto& adapter = adapter_options_of(name);
    const auto& control = controls_.at(name);
    return functional::StyleInjectFuncOptions()
        .scaling(adapter.scaling())
        .scale(control.scale)
        .temperature(adapter.temperature())
        .dropout(adapter.dropout())
        .training(this->is_training())
        .style(control.style)
        .path(adapter.path())
        .gate(adapter.gate());
  }

  std::vector<NamedAdapter> named_;
  std::map<std::string, detail::AdapterControls> controls_;
  bool merged_ = false;
  /// The base weight before merge, with MergeOptions::keep_base.
  torch::Tensor unmerged_weight_;
  /// The merged kScale gates' combined factor g, (d_out), in float32 or
  /// wider.
  torch::Tensor merged_gate_;
};

} // namespace styleinject
