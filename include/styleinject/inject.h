#pragma once

#include <styleinject/conv2d.h>
#include <styleinject/layer.h>
#include <styleinject/linear.h>
#include <styleinject/options.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iomanip>
#include <map>
#include <memory>
#include <ostream>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace styleinject {

/// Changes to the adapter options of the layers whose names match a pattern
/// (see `Targets::with`); a field left empty keeps the common value.
///
/// Example:
/// ```
/// styleinject::Override().rank(8).branches(2)
/// ```
struct Override {
  /// Rank of the matched layers. Default: unchanged
  TORCH_ARG(c10::optional<int64_t>, rank) = c10::nullopt;
  /// Number of branches of the matched layers. Default: unchanged
  TORCH_ARG(c10::optional<int64_t>, branches) = c10::nullopt;
  /// alpha of the matched layers. Default: unchanged
  TORCH_ARG(c10::optional<double>, alpha) = c10::nullopt;
};

/// Which layers of a model `inject` adapts (and which layers the model-wide
/// controls act on), by their qualified names as `named_modules()` gives
/// them, e.g. "down.0.attn.to_q", and which of their adapters, by name
/// (`adapter`; "default" unless set).
///
/// Example:
/// ```
/// auto targets = styleinject::Targets::suffixes({"to_q", "to_k", "to_v"})
///                    .with(".*\\.up\\..*", styleinject::Override().rank(8));
/// ```
class Targets {
 public:
  /// Every adaptable layer: the StyleInject layers the model declares, and
  /// the torch::nn::Linear / Conv2d layers inside a torch::nn::Sequential.
  static Targets all() {
    Targets targets;
    targets.all_ = true;
    targets.patterns_.push_back(
        {"all", [](const std::string&) { return true; }});
    return targets;
  }
  /// The layers whose whole qualified name matches an ECMAScript regular
  /// expression, e.g. ".*attn\\.to_(q|k|v)".
  static Targets regex(const std::string& pattern) {
    Targets targets;
    targets.patterns_.push_back(
        {"regex '" + pattern + "'",
         [regex = compile(pattern)](const std::string& name) {
           return std::regex_match(name, regex);
         }});
    return targets;
  }
  /// The layers whose qualified name is one of `suffixes` or ends with "."
  /// and one of them, e.g. {"to_q", "attn.to_out"}. Each suffix must match.
  static Targets suffixes(std::vector<std::string> suffixes) {
    TORCH_CHECK_VALUE(
        !suffixes.empty(),
        "styleinject::Targets::suffixes: expected at least one suffix");
    Targets targets;
    for (auto& suffix : suffixes) {
      targets.patterns_.push_back(
          {"suffix '" + suffix + "'", [suffix](const std::string& name) {
             return ends_with_name(name, suffix);
           }});
    }
    return targets;
  }

  /// Changes the options of the targeted layers whose whole qualified name
  /// matches `pattern` (ECMAScript). Overrides apply in the order given, so
  /// a later one wins where two set the same field.
  Targets& with(const std::string& pattern, Override changes) {
    overrides_.push_back({pattern, compile(pattern), std::move(changes)});
    return *this;
  }

  /// Names the adapter that `inject` attaches and the model-wide controls
  /// act on, e.g. `Targets::all().adapter("community")`. Default: "default"
  Targets& adapter(std::string name) {
    detail::check_adapter_name(name, "styleinject::Targets::adapter");
    adapter_ = std::move(name);
    return *this;
  }
  const std::string& adapter() const {
    return adapter_;
  }

  /// Whether these are the targets of `all()`, which skip the layers that
  /// cannot carry an adapter rather than refuse them.
  bool is_all() const {
    return all_;
  }

  /// Whether the layer named `name` is a target.
  bool matches(const std::string& name) const {
    return std::any_of(
        patterns_.begin(), patterns_.end(), [&](const Pattern& pattern) {
          return pattern.matches(name);
        });
  }

  /// `options` with the overrides that match `name` applied.
  StyleInjectOptions options_for(
      const std::string& name,
      StyleInjectOptions options) const {
    for (const auto& item : overrides_) {
      if (std::regex_match(name, item.regex)) {
        if (item.changes.rank()) {
          options.rank(*item.changes.rank());
        }
        if (item.changes.branches()) {
          options.branches(*item.changes.branches());
        }
        if (item.changes.alpha()) {
          options.alpha(*item.changes.alpha());
        }
      }
    }
    return options;
  }

  /// Refuses a target or override pattern that matches none of `names`: a
  /// typo would otherwise adapt less than asked, silently.
  void check_each_matches(
      const std::vector<std::string>& names,
      const std::string& context) const {
    const auto any = [&](const std::function<bool(const std::string&)>& f) {
      return std::any_of(names.begin(), names.end(), f);
    };
    for (const auto& pattern : patterns_) {
      TORCH_CHECK_VALUE(
          any(pattern.matches),
          context,
          ": the target ",
          pattern.description,
          " matches none of ",
          detail::quoted_list(names));
    }
    for (const auto& item : overrides_) {
      TORCH_CHECK_VALUE(
          any([&](const std::string& n) {
            return matches(n) && std::regex_match(n, item.regex);
          }),
          context,
          ": the override pattern '",
          item.pattern,
          "' matches none of the targeted layers");
    }
  }

 private:
  /// One target: a layer name test, and what it is in words.
  struct Pattern {
    std::string description;
    std::function<bool(const std::string&)> matches;
  };
  struct Item {
    std::string pattern;
    std::regex regex;
    Override changes;
  };

  Targets() = default;

  static std::regex compile(const std::string& pattern) {
    try {
      return std::regex(pattern, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      TORCH_CHECK_VALUE(
          false,
          "styleinject::Targets: expected an ECMAScript regular expression, "
          "but '",
          pattern,
          "' is not one (",
          e.what(),
          ")");
    }
    return {};
  }

  static bool ends_with_name(const std::string& name, const std::string& s) {
    return name == s ||
        (name.size() > s.size() &&
         name.compare(name.size() - s.size(), s.size(), s) == 0 &&
         name[name.size() - s.size() - 1] == '.');
  }

  bool all_ = false;
  std::vector<Pattern> patterns_;
  std::vector<Item> overrides_;
  std::string adapter_ = kDefaultAdapter;
};

/// One adapted layer of a model, as `report` lists it.
struct AdaptedLayer {
  /// Qualified name, e.g. "down.0.attn.to_q".
  std::string name;
  /// The adapter's name in the layer, "default" for the first.
  std::string adapter = kDefaultAdapter;
  /// "Linear" or "Conv2d".
  std::string type;
  /// The base layer in short, e.g. "320 -> 640" or "320 -> 320, 3x3".
  std::string shape;
  /// The adapter's options.
  StyleInjectOptions options;
  /// Number of adapter parameters.
  int64_t parameters = 0;
};

/// What `inject` did, or what a model holds (`report(model)`): the adapted
/// layers, and the trainable and total parameter counts of the whole model.
/// Prints as a table.
struct AdapterReport {
  std::vector<AdaptedLayer> layers;
  int64_t trainable_parameters = 0;
  int64_t total_parameters = 0;
};

namespace detail {

/// A layer of a model that can carry an adapter: a StyleInject layer the
/// model declares, or a plain torch::nn layer inside a Sequential, which
/// `inject` swaps for a StyleInject layer sharing its weights.
struct Candidate {
  std::string name;
  std::string type;
  std::string shape;
  int64_t in = 0, out = 0;
  /// Why the layer cannot carry an adapter; empty if it can.
  std::string refusal;
  /// The options of the adapter the candidates were listed for, if the
  /// layer has it.
  c10::optional<StyleInjectOptions> options;
  /// Where that adapter's parameters are among the layer's: "" for
  /// "default", "<name>." for the others.
  std::string prefix;
  /// The names and shapes of the parameters an adapter with these options
  /// would have on this layer.
  std::function<std::vector<std::pair<std::string, std::vector<int64_t>>>(
      const StyleInjectOptions&)>
      adapter_shapes;
  /// Why that adapter with these options cannot be attached (completing
  /// "the layer ..."); empty if it can.
  std::function<std::string(const StyleInjectOptions&)> attach_obstacle =
      [](const StyleInjectOptions&) { return std::string(); };
  /// Attaches that adapter, swapping the layer in first where it is plain.
  std::function<void(const StyleInjectOptions&)> attach;
};

/// Refuses to attach the adapter `adapter` with `options` to `layer` where
/// the layer cannot take it (Candidate::attach_obstacle), naming both.
inline void check_attachable(
    const Candidate& layer,
    const StyleInjectOptions& options,
    const std::string& adapter,
    const std::string& context) {
  const auto obstacle = layer.attach_obstacle(options);
  TORCH_CHECK_VALUE(
      obstacle.empty(),
      context,
      ": layer '",
      layer.name,
      "' cannot take adapter '",
      adapter,
      "': the layer ",
      obstacle);
}

inline std::string qualified(
    const std::string& prefix,
    const std::string& key) {
  return prefix.empty() ? key : prefix + "." + key;
}

/// Adds `module` to `found` if it is a layer of type Base, declared as a
/// StyleInject layer or plain; `parent` is the module that holds it under
/// `key` (null for the root). Returns whether it was one.
template <typename Base>
bool collect_layer(
    const std::shared_ptr<torch::nn::Module>& module,
    torch::nn::Module* parent,
    const std::string& key,
    const std::string& name,
    const std::string& adapter,
    std::vector<Candidate>& found) {
  using Layer = StyleInjectLayerImpl<Base>;
  using Traits = layer_traits<Base>;
  Candidate candidate;
  candidate.name = name;
  candidate.type = Traits::type;
  candidate.prefix = adapter == kDefaultAdapter ? "" : adapter + ".";
  if (auto layer = std::dynamic_pointer_cast<Layer>(module)) {
    candidate.shape = Traits::shape(layer->options);
    candidate.in = Traits::in_features(layer->options);
    candidate.out = Traits::out_features(layer->options);
    if (layer->has_adapter(adapter)) {
      candidate.options = layer->adapter_options_of(adapter);
    }
    candidate.adapter_shapes =
        [options = layer->options](const StyleInjectOptions& o) {
          return Layer::adapter_shapes(options, o);
        };
    candidate.attach_obstacle = [layer,
                                 adapter](const StyleInjectOptions& options) {
      return layer->add_obstacle(options, adapter);
    };
    candidate.attach = [layer, adapter](const StyleInjectOptions& options) {
      layer->add_adapter(options, adapter);
    };
    found.push_back(std::move(candidate));
    return true;
  }
  auto plain = std::dynamic_pointer_cast<Base>(module);
  if (!plain) {
    return false;
  }
  const auto options = Traits::options_of(*plain);
  candidate.shape = Traits::shape(options);
  candidate.adapter_shapes = [options](const StyleInjectOptions& o) {
    return Layer::adapter_shapes(options, o);
  };
  candidate.in = Traits::in_features(options);
  candidate.out = Traits::out_features(options);
  auto* sequential = parent ? parent->as<torch::nn::SequentialImpl>() : nullptr;
  if (!sequential) {
    // A typed member: the parent's forward calls it through its own
    // pointer, which LibTorch cannot redirect.
    candidate.refusal = std::string("it is a plain torch::nn::") +
        candidate.type +
        " outside a torch::nn::Sequential, whose forward LibTorch cannot "
        "redirect; declare it as styleinject::StyleInject" +
        candidate.type + " in the model";
  } else {
    try {
      Traits::check_base(options);
    } catch (const c10::Error& e) {
      candidate.refusal = e.what_without_backtrace();
    }
  }
  candidate.attach =
      [plain, sequential, key, adapter](const StyleInjectOptions& o) {
        // Sequential calls its modules through AnyModule, so swapping the
        // AnyModule and the registered child swaps the layer for real.
        auto layer = std::make_shared<Layer>(typename Traits::Holder(plain));
        for (auto& any : *sequential) {
          if (any.ptr().get() == plain.get()) {
            any = torch::nn::AnyModule(layer);
          }
        }
        sequential->replace_module(key, layer);
        layer->add_adapter(o, adapter);
      };
  found.push_back(std::move(candidate));
  return true;
}

inline void collect(
    const std::shared_ptr<torch::nn::Module>& module,
    torch::nn::Module* parent,
    const std::string& key,
    const std::string& name,
    const std::string& adapter,
    std::vector<Candidate>& found) {
  // A layer is a leaf here: its router and adapters are its own.
  if (collect_layer<torch::nn::LinearImpl>(
          module, parent, key, name, adapter, found) ||
      collect_layer<torch::nn::Conv2dImpl>(
          module, parent, key, name, adapter, found)) {
    return;
  }
  for (const auto& child : module->named_children()) {
    collect(
        child.value(),
        module.get(),
        child.key(),
        qualified(name, child.key()),
        adapter,
        found);
  }
}

/// Every Linear and Conv2d layer of `model`, in named_modules() order, as
/// candidates for the adapter `adapter`.
inline std::vector<Candidate> candidates(
    torch::nn::Module& model,
    const std::string& adapter = kDefaultAdapter) {
  std::vector<Candidate> found;
  // A non-owning pointer: the root is the caller's.
  collect(
      std::shared_ptr<torch::nn::Module>(&model, [](torch::nn::Module*) {}),
      nullptr,
      "",
      "",
      adapter,
      found);
  return found;
}

/// Calls `f(name, layer)` for every StyleInject layer of `model` that has an
/// adapter, as the concrete layer type.
template <typename F>
void for_each_adapted(const torch::nn::Module& model, F&& f) {
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    if (auto* linear = item.value()->as<StyleInjectLinearImpl>()) {
      if (linear->has_adapter()) {
        f(item.key(), *linear);
      }
    } else if (auto* conv = item.value()->as<StyleInjectConv2dImpl>()) {
      if (conv->has_adapter()) {
        f(item.key(), *conv);
      }
    }
  }
}

/// The names of the adapters in `model`, each once, in the order the
/// layers list them.
inline std::vector<std::string> adapter_names_of(
    const torch::nn::Module& model) {
  std::vector<std::string> names;
  for_each_adapted(model, [&](const std::string&, auto& layer) {
    for (const auto& name : layer.adapter_names()) {
      if (std::find(names.begin(), names.end(), name) == names.end()) {
        names.push_back(name);
      }
    }
  });
  return names;
}

/// What `model` lacks where it has no adapter `adapter` (any adapter
/// where empty), completing "the model has ...".
inline std::string missing_adapter(
    const torch::nn::Module& model,
    const std::string& adapter) {
  const auto names = adapter_names_of(model);
  return names.empty() || adapter.empty()
      ? "no adapters; attach them with styleinject::inject() or "
        "styleinject::load_adapters()"
      : "no adapters named '" + adapter + "'; it has " + quoted_list(names);
}

/// Calls `f(name, layer)` for the layers that `targets` names among those
/// with the adapter `adapter`, or with any adapter where `adapter` is
/// empty; a target that names none of them is an error.
template <typename F>
void for_each_target(
    const torch::nn::Module& model,
    const Targets& targets,
    const std::string& adapter,
    const char* context,
    F&& f) {
  std::vector<std::string> names;
  const auto has = [&](const auto& layer) {
    return adapter.empty() || layer.has_adapter(adapter);
  };
  for_each_adapted(model, [&](const std::string& name, auto& layer) {
    if (has(layer)) {
      names.push_back(name);
    }
  });
  TORCH_CHECK_VALUE(
      !names.empty(),
      context,
      ": the model has ",
      missing_adapter(model, adapter));
  targets.check_each_matches(names, context);
  for_each_adapted(model, [&](const std::string& name, auto& layer) {
    if (has(layer) && targets.matches(name)) {
      f(name, layer);
    }
  });
}

/// Freezes every parameter of `model` but those of the adapter `adapter`,
/// which train.
inline void freeze_all_but_adapter(
    torch::nn::Module& model,
    const std::string& adapter) {
  for (auto& parameter : model.parameters()) {
    parameter.set_requires_grad(false);
  }
  for_each_adapted(model, [&](const std::string&, auto& layer) {
    if (layer.has_adapter(adapter)) {
      for (auto& parameter : layer.adapter_parameters(adapter)) {
        parameter.set_requires_grad(true);
      }
    }
  });
}

/// Thousands separated by commas, for the report: 12345 -> "12,345".
inline std::string grouped(int64_t value) {
  const auto digits = std::to_string(value);
  std::string text;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && digits[i - 1] != '-' && (digits.size() - i) % 3 == 0) {
      text += ',';
    }
    text += digits[i];
  }
  return text;
}

} // namespace detail

/// The adapters of `model`, one entry per layer and adapter, and its
/// parameter counts.
inline AdapterReport report(const torch::nn::Module& model) {
  AdapterReport result;
  detail::for_each_adapted(model, [&](const std::string& name, auto& layer) {
    using Layer = std::decay_t<decltype(layer)>;
    for (const auto& adapter : layer.adapter_names()) {
      AdaptedLayer entry{
          name,
          adapter,
          Layer::Traits::type,
          Layer::Traits::shape(layer.options),
          layer.adapter_options_of(adapter)};
      for (const auto& parameter : layer.adapter_parameters(adapter)) {
        entry.parameters += parameter.numel();
      }
      result.layers.push_back(std::move(entry));
    }
  });
  for (const auto& parameter : model.parameters()) {
    result.total_parameters += parameter.numel();
    result.trainable_parameters +=
        parameter.requires_grad() ? parameter.numel() : 0;
  }
  return result;
}

/// Attaches StyleInject adapters to the layers of `model` that `targets`
/// names, with `options` (changed per layer by the targets' overrides),
/// under the targets' adapter name ("default" unless
/// `Targets::adapter` names another), and freezes every other parameter of
/// the model, other adapters included. Everything is checked before
/// anything changes: a target that matches nothing, a layer that has an
/// adapter of that name already, options that do not fit, or a layer that
/// cannot be adapted leave the model as it was. A rank larger than both
/// dimensions of a layer is legal, but warned about.
///
/// Adaptable layers are the StyleInjectLinear / StyleInjectConv2d layers
/// the model declares, and plain torch::nn::Linear / Conv2d layers directly
/// inside a torch::nn::Sequential (swapped for StyleInject layers that share
/// their weights). Plain layers elsewhere cannot be adapted: a parent's
/// forward calls its typed members directly.
///
/// Example:
/// ```
/// auto report = styleinject::inject(*unet,
///     styleinject::Targets::suffixes({"to_q", "to_k", "to_v", "to_out"}),
///     styleinject::StyleInjectOptions(4));
/// std::cout << report;
/// torch::optim::AdamW opt(styleinject::adapter_parameters(*unet), 1e-3);
///
/// // A second adapter beside it, trained alone (the first is frozen).
/// styleinject::inject(*unet, styleinject::Targets::all().adapter("ink"),
///     styleinject::StyleInjectOptions::lora(8));
/// ```
inline AdapterReport inject(
    torch::nn::Module& model,
    const Targets& targets,
    const StyleInjectOptions& options) {
  constexpr const char* context = "styleinject::inject";
  auto all = detail::candidates(model, targets.adapter());
  if (targets.is_all()) {
    all.erase(
        std::remove_if(
            all.begin(),
            all.end(),
            [](const detail::Candidate& c) { return !c.refusal.empty(); }),
        all.end());
  }
  std::vector<std::string> names;
  for (const auto& candidate : all) {
    names.push_back(candidate.name);
  }
  TORCH_CHECK_VALUE(
      !all.empty(),
      context,
      ": the model has no Linear or Conv2d layer that can carry an adapter");
  targets.check_each_matches(names, context);
  std::vector<std::pair<const detail::Candidate*, StyleInjectOptions>> plan;
  for (const auto& candidate : all) {
    if (!targets.matches(candidate.name)) {
      continue;
    }
    const std::string layer =
        std::string(context) + ": layer '" + candidate.name + "'";
    TORCH_CHECK(
        candidate.refusal.empty(),
        layer,
        " cannot carry an adapter: ",
        candidate.refusal);
    TORCH_CHECK(
        !candidate.options,
        layer,
        " has an adapter already under the name '",
        targets.adapter(),
        "'; inject each layer once per name (remove_adapter() takes one "
        "off)");
    auto layer_options = targets.options_for(candidate.name, options);
    detail::check_options(layer_options, layer);
    detail::check_attachable(
        candidate, layer_options, targets.adapter(), context);
    if (layer_options.rank() > candidate.in &&
        layer_options.rank() > candidate.out) {
      TORCH_WARN(
          layer,
          ": rank ",
          layer_options.rank(),
          " is larger than both of its dimensions (",
          candidate.shape,
          "); the adapter can do no more than a full-rank update");
    }
    plan.emplace_back(&candidate, std::move(layer_options));
  }
  for (const auto& step : plan) {
    step.first->attach(step.second);
  }
  detail::freeze_all_but_adapter(model, targets.adapter());
  return report(model);
}

/// The parameters of every adapter of `model`, for the optimizer; with
/// `adapter`, of the adapters of that name alone.
inline std::vector<torch::Tensor> adapter_parameters(
    const torch::nn::Module& model,
    const c10::optional<std::string>& adapter = c10::nullopt) {
  std::vector<torch::Tensor> result;
  detail::for_each_adapted(model, [&](const std::string&, auto& layer) {
    if (!adapter || layer.has_adapter(*adapter)) {
      for (auto& parameter : adapter ? layer.adapter_parameters(*adapter)
                                     : layer.adapter_parameters()) {
        result.push_back(parameter);
      }
    }
  });
  return result;
}

/// The names of the adapters in `model`, each once, in the order the
/// layers list them.
inline std::vector<std::string> adapter_names(const torch::nn::Module& model) {
  return detail::adapter_names_of(model);
}

/// Switches the targeted adapters on or off (the targets' adapter name,
/// "default" unless set).
inline void set_enabled(
    torch::nn::Module& model,
    bool enabled,
    const Targets& targets = Targets::all()) {
  detail::for_each_target(
      model,
      targets,
      targets.adapter(),
      "styleinject::set_enabled",
      [&](const std::string&, auto& layer) {
        layer.set_enabled(enabled, targets.adapter());
      });
}

/// Sets the strength of the targeted adapters (0: the base model).
inline void set_scale(
    torch::nn::Module& model,
    double scale,
    const Targets& targets = Targets::all()) {
  detail::for_each_target(
      model,
      targets,
      targets.adapter(),
      "styleinject::set_scale",
      [&](const std::string&, auto& layer) {
        layer.set_scale(scale, targets.adapter());
      });
}

/// Gives the targeted adapters a fixed style instead of their routers' (see
/// StyleInjectLayerImpl::set_style); they must have as many branches as the
/// style has entries.
inline void set_style(
    torch::nn::Module& model,
    const torch::Tensor& style,
    const Targets& targets = Targets::all()) {
  detail::for_each_target(
      model,
      targets,
      targets.adapter(),
      "styleinject::set_style",
      [&](const std::string&, auto& layer) {
        layer.set_style(style, targets.adapter());
      });
}

/// Gives the targeted adapters their routers back.
inline void clear_style(
    torch::nn::Module& model,
    const Targets& targets = Targets::all()) {
  detail::for_each_target(
      model,
      targets,
      targets.adapter(),
      "styleinject::clear_style",
      [&](const std::string&, auto& layer) {
        layer.clear_style(targets.adapter());
      });
}

/// Which adapters the targeted layers sum, and at what strength, as
/// diffusers' `set_adapters(names, adapter_weights)`: each named adapter is
/// enabled with its scale, every other adapter of those layers is disabled.
/// Each name must be an adapter of the model; a layer without some of them
/// sums those it has. Checked before anything changes.
///
/// Example:
/// ```
/// styleinject::import_lora(*unet, "ink.safetensors",
///     styleinject::ImportLoraOptions().adapter("ink"));
/// styleinject::set_adapters(*unet, {{"default", 1.0}, {"ink", 0.6}});
/// ```
inline void set_adapters(
    torch::nn::Module& model,
    const std::vector<std::pair<std::string, double>>& scales,
    const Targets& targets = Targets::all()) {
  constexpr const char* context = "styleinject::set_adapters";
  const auto present = adapter_names(model);
  for (const auto& item : scales) {
    TORCH_CHECK_VALUE(
        std::find(present.begin(), present.end(), item.first) != present.end(),
        context,
        ": the model has no adapter '",
        item.first,
        "'; it has ",
        detail::quoted_list(present));
    TORCH_CHECK_VALUE(
        std::isfinite(item.second),
        context,
        ": expected a finite scale for '",
        item.first,
        "', but got ",
        item.second);
  }
  detail::for_each_target(
      model, targets, "", context, [&](const std::string&, auto& layer) {
        TORCH_CHECK(
            !layer.is_merged(),
            context,
            ": a targeted layer has its adapters merged; unmerge_adapters() "
            "first");
      });
  detail::for_each_target(
      model, targets, "", context, [&](const std::string&, auto& layer) {
        for (const auto& name : layer.adapter_names()) {
          layer.set_enabled(false, name);
        }
        for (const auto& item : scales) {
          if (layer.has_adapter(item.first)) {
            layer.set_scale(item.second, item.first);
            layer.set_enabled(true, item.first);
          }
        }
      });
}

/// Removes the adapter `adapter` from every layer of `model` that has it,
/// as diffusers' `delete_adapters`; the layers' other adapters stay. Layers
/// with several adapters merged are refused, naming the first, before
/// anything changes.
inline void delete_adapter(
    torch::nn::Module& model,
    const std::string& adapter) {
  constexpr const char* context = "styleinject::delete_adapter";
  detail::for_each_target(
      model,
      Targets::all(),
      adapter,
      context,
      [&](const std::string& name, auto& layer) {
        TORCH_CHECK(
            !layer.is_merged() || layer.adapter_names().size() == 1,
            context,
            ": layer '",
            name,
            "' has several adapters merged into its weight; "
            "unmerge_adapters() first");
      });
  detail::for_each_target(
      model,
      Targets::all(),
      adapter,
      context,
      [&](const std::string&, auto& layer) { layer.remove_adapter(adapter); });
}

/// Folds the enabled adapters of the targeted layers, whatever their names,
/// into their base weights (see StyleInjectLayerImpl::merge), so that
/// inference costs the base model alone. Every targeted layer is checked first:
/// one that cannot merge (a router that reads the input, a per-instance style,
/// gate=adain or residual, a disabled adapter) is an error naming it, and the
/// model is left as it was. Layers merged already stay as they are.
///
/// Example:
/// ```
/// styleinject::set_style(*unet, torch::tensor({0.f, 1.f, 0.f, 0.f}));
/// styleinject::merge_adapters(*unet);
/// auto image = sample(*unet, prompt); // at the base model's cost
/// styleinject::unmerge_adapters(*unet);
/// ```
inline void merge_adapters(
    torch::nn::Module& model,
    const Targets& targets = Targets::all(),
    MergeOptions options = {}) {
  constexpr const char* context = "styleinject::merge_adapters";
  detail::for_each_target(
      model, targets, "", context, [&](const std::string& name, auto& layer) {
        const auto obstacle =
            layer.is_merged() ? std::string() : layer.merge_obstacle();
        TORCH_CHECK_VALUE(
            obstacle.empty(),
            context,
            ": cannot merge layer '",
            name,
            "': ",
            obstacle,
            "; nothing was merged");
      });
  detail::for_each_target(
      model, targets, "", context, [&](const std::string&, auto& layer) {
        layer.merge(options);
      });
}

/// Takes the adapters of the targeted layers out of their base weights again
/// (see StyleInjectLayerImpl::unmerge); layers not merged stay as they are.
inline void unmerge_adapters(
    torch::nn::Module& model,
    const Targets& targets = Targets::all()) {
  detail::for_each_target(
      model,
      targets,
      "",
      "styleinject::unmerge_adapters",
      [&](const std::string&, auto& layer) { layer.unmerge(); });
}

/// The report as a table: one row per adapted layer, then the counts. The
/// stream's formatting is left as it was.
/// Records, while it lives, the style weights (SPEC §1) that the adapter
/// `adapter` of each layer of `model` gives its inputs in the forwards that
/// run on this thread: which branches each sample uses. A disabled adapter
/// or a merged layer records nothing; of nested records, the innermost
/// records.
///
///   styleinject::RoutingRecord record(*model);
///   model->forward(x);
///   for (const auto& [layer, weights] : record.weights()) ... // (N, n)
class RoutingRecord : detail::RoutingObserver {
 public:
  explicit RoutingRecord(
      const torch::nn::Module& model,
      std::string adapter = kDefaultAdapter)
      : adapter_(std::move(adapter)), previous_(detail::routing_observer()) {
    detail::for_each_adapted(model, [&](const std::string& name, auto& layer) {
      if (layer.has_adapter(adapter_)) {
        slots_.emplace(&layer, names_.size());
        names_.push_back(name);
      }
    });
    recorded_.resize(names_.size());
    detail::routing_observer() = this;
  }
  ~RoutingRecord() override {
    detail::routing_observer() = previous_;
  }
  RoutingRecord(const RoutingRecord&) = delete;
  RoutingRecord& operator=(const RoutingRecord&) = delete;

  /// Per layer with the adapter, in the model's order: the style weights of
  /// every recorded forward, concatenated along the batch, (N, n); an
  /// undefined tensor where none was recorded.
  std::vector<std::pair<std::string, torch::Tensor>> weights() const {
    std::vector<std::pair<std::string, torch::Tensor>> all;
    for (size_t i = 0; i < names_.size(); ++i) {
      all.emplace_back(
          names_[i],
          recorded_[i].empty() ? torch::Tensor() : torch::cat(recorded_[i]));
    }
    return all;
  }

 private:
  void observe(
      const torch::nn::Module& layer,
      const std::function<torch::Tensor(const std::string&)>& weights)
      override {
    const auto slot = slots_.find(&layer);
    if (slot == slots_.end()) {
      return;
    }
    torch::NoGradGuard no_grad;
    auto s = weights(adapter_);
    if (s.defined()) {
      // One row per sample: (d_in) inputs give (n).
      recorded_[slot->second].push_back(s.reshape({-1, s.size(-1)}));
    }
  }

  std::string adapter_;
  detail::RoutingObserver* previous_;
  std::map<const torch::nn::Module*, size_t> slots_;
  std::vector<std::string> names_;
  std::vector<std::vector<torch::Tensor>> recorded_;
};

inline std::ostream& operator<<(std::ostream& stream, const AdapterReport& r) {
  std::vector<std::vector<std::string>> rows{
      {"layer", "type", "shape", "rank", "branches", "alpha", "parameters"}};
  int64_t adapter = 0;
  std::set<std::string> layers;
  for (const auto& layer : r.layers) {
    std::ostringstream alpha;
    alpha << layer.options.alpha().value_or(layer.options.rank());
    layers.insert(layer.name);
    rows.push_back(
        {(layer.name.empty() ? "(the model)" : layer.name) +
             (layer.adapter == kDefaultAdapter ? ""
                                               : " [" + layer.adapter + "]"),
         layer.type,
         layer.shape,
         std::to_string(layer.options.rank()),
         std::to_string(layer.options.branches()),
         alpha.str(),
         detail::grouped(layer.parameters)});
    adapter += layer.parameters;
  }
  std::vector<size_t> widths(rows.front().size(), 0);
  for (const auto& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) {
      widths[i] = std::max(widths[i], row[i].size());
    }
  }
  // Formatted in a stream of its own, so that the caller's keeps its flags.
  std::ostringstream text;
  for (const auto& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) {
      // Numbers right-aligned, words left-aligned.
      const bool number = i >= 3;
      text << (i ? "  " : "") << (number ? std::right : std::left)
           << std::setw(static_cast<int>(widths[i])) << row[i];
    }
    text << "\n";
  }
  const double percent = r.total_parameters
      ? 100.0 * static_cast<double>(r.trainable_parameters) /
          static_cast<double>(r.total_parameters)
      : 0.0;
  text << layers.size() << " adapted layers, " << detail::grouped(adapter)
       << " adapter parameters; trainable "
       << detail::grouped(r.trainable_parameters) << " of "
       << detail::grouped(r.total_parameters) << " parameters (" << std::fixed
       << std::setprecision(2) << percent << "%)\n";
  return stream << text.str();
}

} // namespace styleinject
