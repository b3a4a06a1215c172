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
#include <cstdint>
#include <functional>
#include <iomanip>
#include <memory>
#include <ostream>
#include <regex>
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
/// them, e.g. "down.0.attn.to_q".
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
          list(names));
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

  static std::string list(const std::vector<std::string>& names) {
    std::string text = "[";
    const size_t shown = std::min<size_t>(names.size(), 12);
    for (size_t i = 0; i < shown; ++i) {
      text += (i ? ", '" : "'") + names[i] + "'";
    }
    if (shown < names.size()) {
      text += ", ... (" + std::to_string(names.size()) + " in all)";
    }
    return text + "]";
  }

  bool all_ = false;
  std::vector<Pattern> patterns_;
  std::vector<Item> overrides_;
};

/// One adapted layer of a model, as `report` lists it.
struct AdaptedLayer {
  /// Qualified name, e.g. "down.0.attn.to_q".
  std::string name;
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
  /// The adapter's options, if the layer has one.
  c10::optional<StyleInjectOptions> options;
  /// The names and shapes of the parameters an adapter with these options
  /// would have on this layer.
  std::function<std::vector<std::pair<std::string, std::vector<int64_t>>>(
      const StyleInjectOptions&)>
      adapter_shapes;
  /// Attaches an adapter, swapping the layer in first where it is plain.
  std::function<void(const StyleInjectOptions&)> attach;
};

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
    std::vector<Candidate>& found) {
  using Layer = StyleInjectLayerImpl<Base>;
  using Traits = layer_traits<Base>;
  Candidate candidate;
  candidate.name = name;
  candidate.type = Traits::type;
  if (auto layer = std::dynamic_pointer_cast<Layer>(module)) {
    candidate.shape = Traits::shape(layer->options);
    candidate.in = Traits::in_features(layer->options);
    candidate.out = Traits::out_features(layer->options);
    candidate.options = layer->adapter_options;
    candidate.adapter_shapes =
        [options = layer->options](const StyleInjectOptions& o) {
          return Layer::adapter_shapes(options, o);
        };
    candidate.attach = [layer](const StyleInjectOptions& options) {
      layer->add_adapter(options);
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
  candidate.attach = [plain, sequential, key](const StyleInjectOptions& o) {
    // Sequential calls its modules through AnyModule, so swapping the
    // AnyModule and the registered child swaps the layer for real.
    auto layer = std::make_shared<Layer>(typename Traits::Holder(plain));
    for (auto& any : *sequential) {
      if (any.ptr().get() == plain.get()) {
        any = torch::nn::AnyModule(layer);
      }
    }
    sequential->replace_module(key, layer);
    layer->add_adapter(o);
  };
  found.push_back(std::move(candidate));
  return true;
}

inline void collect(
    const std::shared_ptr<torch::nn::Module>& module,
    torch::nn::Module* parent,
    const std::string& key,
    const std::string& name,
    std::vector<Candidate>& found) {
  // A layer is a leaf here: its router is part of its adapter.
  if (collect_layer<torch::nn::LinearImpl>(module, parent, key, name, found) ||
      collect_layer<torch::nn::Conv2dImpl>(module, parent, key, name, found)) {
    return;
  }
  for (const auto& child : module->named_children()) {
    collect(
        child.value(),
        module.get(),
        child.key(),
        qualified(name, child.key()),
        found);
  }
}

/// Every Linear and Conv2d layer of `model`, in named_modules() order.
inline std::vector<Candidate> candidates(torch::nn::Module& model) {
  std::vector<Candidate> found;
  // A non-owning pointer: the root is the caller's.
  collect(
      std::shared_ptr<torch::nn::Module>(&model, [](torch::nn::Module*) {}),
      nullptr,
      "",
      "",
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

/// Calls `f(name, layer)` for the adapted layers that `targets` names; a
/// target that names none of them is an error.
template <typename F>
void for_each_target(
    const torch::nn::Module& model,
    const Targets& targets,
    const char* context,
    F&& f) {
  std::vector<std::string> names;
  for_each_adapted(
      model, [&](const std::string& name, auto&) { names.push_back(name); });
  TORCH_CHECK_VALUE(
      !names.empty(),
      context,
      ": the model has no adapters; attach them with styleinject::inject() "
      "or styleinject::load_adapters()");
  targets.check_each_matches(names, context);
  for_each_adapted(model, [&](const std::string& name, auto& layer) {
    if (targets.matches(name)) {
      f(name, layer);
    }
  });
}

/// Freezes every parameter of `model` but the adapters'.
inline void freeze_all_but_adapters(torch::nn::Module& model) {
  for (auto& parameter : model.parameters()) {
    parameter.set_requires_grad(false);
  }
  for_each_adapted(model, [](const std::string&, auto& layer) {
    for (auto& parameter : layer.adapter_parameters()) {
      parameter.set_requires_grad(true);
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

/// The adapted layers of `model` and its parameter counts.
inline AdapterReport report(const torch::nn::Module& model) {
  AdapterReport result;
  detail::for_each_adapted(model, [&](const std::string& name, auto& layer) {
    using Layer = std::decay_t<decltype(layer)>;
    AdaptedLayer entry{
        name,
        Layer::Traits::type,
        Layer::Traits::shape(layer.options),
        *layer.adapter_options};
    for (const auto& parameter : layer.adapter_parameters()) {
      entry.parameters += parameter.numel();
    }
    result.layers.push_back(std::move(entry));
  });
  for (const auto& parameter : model.parameters()) {
    result.total_parameters += parameter.numel();
    result.trainable_parameters +=
        parameter.requires_grad() ? parameter.numel() : 0;
  }
  return result;
}

/// Attaches StyleInject adapters to the layers of `model` that `targets`
/// names, with `options` (changed per layer by the targets' overrides), and
/// freezes every other parameter of the model. Everything is checked before
/// anything changes: a target that matches nothing, a layer that has an
/// adapter already, options that do not fit, or a layer that cannot be
/// adapted leave the model as it was. A rank larger than both dimensions of
/// a layer is legal, but warned about.
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
/// ```
inline AdapterReport inject(
    torch::nn::Module& model,
    const Targets& targets,
    const StyleInjectOptions& options) {
  constexpr const char* context = "styleinject::inject";
  auto all = detail::candidates(model);
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
        " has an adapter already; inject each layer once (remove_adapter() "
        "takes one off)");
    auto layer_options = targets.options_for(candidate.name, options);
    detail::check_options(layer_options, layer);
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
  detail::freeze_all_but_adapters(model);
  return report(model);
}

/// The adapter parameters of every adapted layer of `model`, for the
/// optimizer.
inline std::vector<torch::Tensor> adapter_parameters(
    const torch::nn::Module& model) {
  std::vector<torch::Tensor> result;
  detail::for_each_adapted(model, [&](const std::string&, auto& layer) {
    for (auto& parameter : layer.adapter_parameters()) {
      result.push_back(parameter);
    }
  });
  return result;
}

/// Switches the adapters of the targeted layers on or off.
inline void set_enabled(
    torch::nn::Module& model,
    bool enabled,
    const Targets& targets = Targets::all()) {
  detail::for_each_target(
      model,
      targets,
      "styleinject::set_enabled",
      [&](const std::string&, auto& layer) { layer.set_enabled(enabled); });
}

/// Sets the strength of the targeted layers' adapters (0: the base model).
inline void set_scale(
    torch::nn::Module& model,
    double scale,
    const Targets& targets = Targets::all()) {
  detail::for_each_target(
      model,
      targets,
      "styleinject::set_scale",
      [&](const std::string&, auto& layer) { layer.set_scale(scale); });
}

/// Gives the targeted layers a fixed style instead of their routers' (see
/// StyleInjectLayerImpl::set_style); they must have as many branches as the
/// style has entries.
inline void set_style(
    torch::nn::Module& model,
    const torch::Tensor& style,
    const Targets& targets = Targets::all()) {
  detail::for_each_target(
      model,
      targets,
      "styleinject::set_style",
      [&](const std::string&, auto& layer) { layer.set_style(style); });
}

/// Gives the targeted layers their routers back.
inline void clear_style(
    torch::nn::Module& model,
    const Targets& targets = Targets::all()) {
  detail::for_each_target(
      model,
      targets,
      "styleinject::clear_style",
      [&](const std::string&, auto& layer) { layer.clear_style(); });
}

/// Folds the adapters of the targeted layers into their base weights (see
/// StyleInjectLayerImpl::merge), so that inference costs the base model
/// alone. Every targeted layer is checked first: one that cannot merge (a
/// router that reads the input, a per-instance style, gate=adain or
/// residual, a disabled adapter) is an error naming it, and the model is
/// left as it was. Layers merged already stay as they are.
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
      model, targets, context, [&](const std::string& name, auto& layer) {
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
      model, targets, context, [&](const std::string&, auto& layer) {
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
      "styleinject::unmerge_adapters",
      [&](const std::string&, auto& layer) { layer.unmerge(); });
}

/// The report as a table: one row per adapted layer, then the counts. The
/// stream's formatting is left as it was.
inline std::ostream& operator<<(std::ostream& stream, const AdapterReport& r) {
  std::vector<std::vector<std::string>> rows{
      {"layer", "type", "shape", "rank", "branches", "alpha", "parameters"}};
  int64_t adapter = 0;
  for (const auto& layer : r.layers) {
    std::ostringstream alpha;
    alpha << layer.options.alpha().value_or(layer.options.rank());
    rows.push_back(
        {layer.name.empty() ? "(the model)" : layer.name,
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
  text << r.layers.size() << " adapted layers, " << detail::grouped(adapter)
       << " adapter parameters; trainable "
       << detail::grouped(r.trainable_parameters) << " of "
       << detail::grouped(r.total_parameters) << " parameters (" << std::fixed
       << std::setprecision(2) << percent << "%)\n";
  return stream << text.str();
}

} // namespace styleinject
