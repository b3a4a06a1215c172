#pragma once

// LoRA files of the Python tools, out and in: PEFT adapter directories,
// kohya-ss files (LoCon for Conv2d) and diffusers' LoRA files.

#include <styleinject/detail/json.h>
#include <styleinject/detail/regex.h>
#include <styleinject/inject.h>
#include <styleinject/safetensors.h>
#include <styleinject/serialize.h>
#include <styleinject/version.h>

#include <torch/types.h>

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace styleinject {

/// The LoRA formats of the Python tools.
enum class LoraFormat {
  /// PEFT's adapter directory: `adapter_model.safetensors`, keys
  /// "base_model.model.<layer>.lora_A.weight" and ".lora_B.weight", and
  /// `adapter_config.json` (r, lora_alpha, rank_pattern, alpha_pattern,
  /// target_modules, use_rslora).
  kPeft,
  /// kohya-ss's one file: keys "lora_unet_<layer, '.' as
  /// '_'>.lora_down.weight",
  /// ".lora_up.weight" and ".alpha"; LoCon for Conv2d.
  kKohya,
  /// diffusers' LoRA file (import only): PEFT's keys under a component's
  /// prefix, "unet.<layer>.lora_A.weight", or none (a model's
  /// `save_lora_adapter`), with ".alpha" where it has one, and PEFT's config
  /// in the metadata's "lora_adapter_metadata" where diffusers wrote it.
  kDiffusers,
};

/// "peft", "kohya", "diffusers".
inline const char* lora_format_name(LoraFormat format) {
  switch (format) {
    case LoraFormat::kPeft:
      return "peft";
    case LoraFormat::kKohya:
      return "kohya";
    case LoraFormat::kDiffusers:
      return "diffusers";
  }
  return "?";
}

/// Options for export_lora.
struct ExportLoraOptions {
  /// The file's module name for a model's layer name, where the format's
  /// default does not fit, spelled as the file's keys spell it before
  /// ".lora_A.weight" / ".lora_down.weight": for kPeft
  /// "base_model.model.<module>", for kKohya the whole name (e.g.
  /// "lora_te_text_model_encoder_layers_0_mlp_fc1").
  TORCH_ARG(NameMap, rename) = {};
  /// The prefix of kKohya's default module names. Default: "lora_unet_"
  TORCH_ARG(std::string, kohya_prefix) = "lora_unet_";
  /// Export adapters whose gate is on as their low-rank update alone: the
  /// file then lacks the variance gate (SPEC §3), and a tool that loads it
  /// computes `W0 x + b0 + c·B·(s·A) x`, not the layer's output. Without
  /// this, such an adapter is refused. Default: false
  TORCH_ARG(bool, drop_gate) = false;
  /// Which of the layers' adapters to export. Default: "default"
  TORCH_ARG(std::string, adapter) = kDefaultAdapter;
};

/// Options for import_lora.
struct ImportLoraOptions {
  /// The file's module name for a model's layer name, where the format's
  /// defaults do not find it, spelled as the file's keys spell it before
  /// ".lora_A.weight" / ".lora_down.weight".
  TORCH_ARG(NameMap, rename) = {};
  /// alpha for the layers whose file gives none (a bare PEFT file, or a
  /// diffusers file without "lora_adapter_metadata": PEFT keeps alpha in
  /// its config). Unset, such a file is refused; diffusers itself assumes
  /// alpha = rank there.
  TORCH_ARG(c10::optional<double>, alpha) = c10::nullopt;
  /// Every module of the file must fit a layer of the model. Off, modules
  /// that name no layer (say a community SD LoRA's text-encoder modules,
  /// "lora_te_...", imported into a UNet) are skipped and listed in the
  /// report; a module that names a layer and does not fit is still an
  /// error. Default: true
  TORCH_ARG(bool, strict) = true;
  /// dtype of the attached adapters (StyleInjectOptions::dtype), e.g.
  /// torch::kFloat on a bfloat16 base. Default: the base weight's
  TORCH_ARG(c10::optional<torch::Dtype>, dtype) = c10::nullopt;
  /// The name the LoRA is attached under, e.g. "community" beside a
  /// trained "default" (see set_adapters). Default: "default"
  TORCH_ARG(std::string, adapter) = kDefaultAdapter;
};

/// One layer that import_lora attached.
struct ImportedLora {
  /// The model's layer, e.g. "down.0.attn.to_q".
  std::string name;
  /// The file's module name, e.g. "lora_unet_down_0_attn_to_q".
  std::string module;
  int64_t rank = 0;
  double alpha = 0.0;
};

/// What import_lora read and attached.
struct ImportLoraReport {
  LoraFormat format = LoraFormat::kPeft;
  /// In the model's layer order.
  std::vector<ImportedLora> layers;
  /// The file's modules that named no layer, with ImportLoraOptions::strict
  /// off.
  std::vector<std::string> skipped;
  /// The safetensors file's `__metadata__`.
  std::map<std::string, std::string> metadata;
};

namespace detail {

inline constexpr const char* kPeftPrefix = "base_model.model.";
inline constexpr const char* kPeftWeights = "adapter_model.safetensors";
inline constexpr const char* kPeftConfig = "adapter_config.json";

/// A layer's name as kohya spells it: "down.0.to_q" -> "down_0_to_q".
inline std::string kohya_name(std::string name) {
  std::replace(name.begin(), name.end(), '.', '_');
  return name;
}

/// One layer as a plain LoRA, `W0 x + b0 + (alpha / r)·up·down x`: down
/// (r, d_in[, kH, kW]), up (d_out, r[, 1, 1]).
struct PlainLora {
  std::string name;
  torch::Tensor down, up;
  double alpha = 0.0;
};

/// The plain LoRA that `layer`, named `name`, computes: the branches mixed
/// by its one style, `down = s·A`, and its strength folded into alpha
/// (`alpha / r = scaling · scale`). A router that reads the input is
/// refused, and so is a gate unless `drop_gate`.
template <typename Layer>
PlainLora plain_lora(
    const std::string& name,
    const Layer& layer,
    const ExportLoraOptions& options,
    const std::string& context) {
  const auto& adapter = options.adapter();
  const auto obstacle = layer.shared_style_obstacle(adapter);
  TORCH_CHECK_VALUE(
      obstacle.empty(),
      context,
      ": cannot export layer '",
      name,
      "' as a LoRA: ",
      obstacle);
  const auto& adapter_options = layer.adapter_options_of(adapter);
  const auto gate = adapter_options.gate();
  TORCH_CHECK_VALUE(
      gate == GateMode::kOff || options.drop_gate(),
      context,
      ": layer '",
      name,
      "' has gate=",
      gate_mode_name(gate),
      ", which a LoRA file cannot hold; ExportLoraOptions().drop_gate(true) "
      "exports its low-rank update alone, without the variance gate");
  torch::NoGradGuard no_grad;
  const auto tensors = layer.adapter_tensors(adapter);
  const auto& a = tensors.lora_A;
  const auto s = layer.shared_style(adapter);
  const auto dtype = at::promote_types(s.scalar_type(), a.scalar_type());
  const int64_t rank = a.size(1);
  return {
      name,
      mix_branches(s.to(dtype), a).to(a.scalar_type()),
      tensors.lora_B.detach(),
      static_cast<double>(rank) * adapter_options.scaling() *
          layer.scale(adapter)};
}

/// The file's module name of layer `name`, as export_lora writes it.
inline std::string export_module_name(
    LoraFormat format,
    const std::string& name,
    const ExportLoraOptions& options) {
  const auto renamed = options.rename().find(name);
  if (renamed != options.rename().end()) {
    return renamed->second;
  }
  return format == LoraFormat::kPeft
      ? kPeftPrefix + name
      : options.kohya_prefix() + kohya_name(name);
}

/// `module` without PEFT's "base_model.model." in front, as PEFT's config
/// names modules.
inline std::string peft_config_name(const std::string& module) {
  const std::string prefix = kPeftPrefix;
  return module.compare(0, prefix.size(), prefix) == 0
      ? module.substr(prefix.size())
      : module;
}

/// The value that most layers have, for PEFT's r and lora_alpha; the others
/// go into rank_pattern and alpha_pattern.
template <typename T>
T most_common(const std::vector<T>& values) {
  std::map<T, int> counts;
  for (const auto& value : values) {
    ++counts[value];
  }
  return std::max_element(
             counts.begin(),
             counts.end(),
             [](const auto& a, const auto& b) { return a.second < b.second; })
      ->first;
}

/// A rank_pattern / alpha_pattern key that names exactly the module
/// `name`. PEFT matches a key as the regex "(.*\.)?(key)$", so a plain "a"
/// would also pick "x.a"; "^a" cannot.
inline std::string exact_pattern(const std::string& name) {
  std::string pattern = "^";
  for (const char c : name) {
    if (std::strchr(".^$*+?()[]{}|\\", c) != nullptr) {
      pattern += '\\';
    }
    pattern += c;
  }
  return pattern;
}

/// PEFT's adapter_config.json for `loras`, whose config names are `names`.
inline nlohmann::ordered_json peft_config(
    const std::vector<PlainLora>& loras,
    const std::vector<std::string>& names) {
  std::vector<int64_t> ranks;
  std::vector<double> alphas;
  for (const auto& lora : loras) {
    ranks.push_back(lora.down.size(0));
    alphas.push_back(lora.alpha);
  }
  const int64_t rank = most_common(ranks);
  const double alpha = most_common(alphas);
  auto rank_pattern = nlohmann::ordered_json::object();
  auto alpha_pattern = nlohmann::ordered_json::object();
  for (size_t i = 0; i < loras.size(); ++i) {
    if (ranks[i] != rank) {
      rank_pattern[exact_pattern(names[i])] = ranks[i];
    }
    if (alphas[i] != alpha) {
      alpha_pattern[exact_pattern(names[i])] = alphas[i];
    }
  }
  return {
      {"peft_type", "LORA"},
      {"r", rank},
      {"lora_alpha", alpha},
      {"target_modules", names},
      {"rank_pattern", rank_pattern},
      {"alpha_pattern", alpha_pattern},
      {"use_rslora", false},
      {"lora_dropout", 0.0},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"init_lora_weights", true},
      {"inference_mode", true},
      {"task_type", nullptr},
      {"base_model_name_or_path", nullptr},
      {"modules_to_save", nullptr}};
}

/// Makes the directory `path` unless it is one already.
inline void make_directory(
    const std::string& path,
    const std::string& context) {
  struct stat info {};
  if (::stat(path.c_str(), &info) == 0) {
    TORCH_CHECK(
        S_ISDIR(info.st_mode),
        context,
        ": expected a directory for a PEFT adapter, but a file is there");
    return;
  }
  TORCH_CHECK(
      ::mkdir(path.c_str(), 0777) == 0,
      context,
      ": cannot create the directory (",
      std::strerror(errno),
      ")");
}

/// Whether `path` is a directory.
inline bool is_directory(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

} // namespace detail

/// Writes the adapters of `model` as a LoRA file that the Python tools
/// load: `LoraFormat::kPeft`, a PEFT adapter directory at `path`
/// (`PeftModel.from_pretrained` loads it), or `LoraFormat::kKohya`, one
/// safetensors file (diffusers' `load_lora_weights` and kohya-ss read it).
/// LoRA-preset adapters export exactly. A StyleInject adapter exports as the
/// plain rank-r LoRA of its one style, `down = s·A` (a fixed style of shape
/// [n], or 1/n with the router off): exact with the gate off; with a gate,
/// only with ExportLoraOptions::drop_gate, and then without it. A router
/// that reads the input cannot become a LoRA and is refused, naming the
/// layer. Each layer's strength (set_scale) is folded into its alpha. Every
/// layer is checked before anything is written; each file is written
/// atomically.
///
/// Example:
/// ```
/// styleinject::export_lora(*unet, "style-peft",
/// styleinject::LoraFormat::kPeft);
/// // Python: PeftModel.from_pretrained(model, "style-peft")
/// ```
inline void export_lora(
    const torch::nn::Module& model,
    const std::string& path,
    LoraFormat format,
    const ExportLoraOptions& options = {}) {
  const std::string context = "styleinject::export_lora: '" + path + "'";
  TORCH_CHECK_VALUE(
      format != LoraFormat::kDiffusers,
      context,
      ": expected LoraFormat::kPeft or kKohya (diffusers loads both), but got "
      "kDiffusers");
  std::vector<detail::PlainLora> loras;
  detail::for_each_adapted(model, [&](const std::string& name, auto& layer) {
    if (layer.has_adapter(options.adapter())) {
      loras.push_back(detail::plain_lora(name, layer, options, context));
    }
  });
  TORCH_CHECK_VALUE(
      !loras.empty(),
      context,
      ": nothing to export: the model has ",
      detail::missing_adapter(model, options.adapter()));
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::vector<std::string> config_names;
  for (const auto& lora : loras) {
    const auto module = detail::export_module_name(format, lora.name, options);
    if (format == LoraFormat::kPeft) {
      tensors.emplace_back(module + ".lora_A.weight", lora.down);
      tensors.emplace_back(module + ".lora_B.weight", lora.up);
      config_names.push_back(detail::peft_config_name(module));
    } else {
      tensors.emplace_back(module + ".lora_down.weight", lora.down);
      tensors.emplace_back(module + ".lora_up.weight", lora.up);
      tensors.emplace_back(
          module + ".alpha", torch::tensor(lora.alpha, torch::kFloat));
    }
  }
  const std::map<std::string, std::string> metadata{
      {"format", "pt"}, {"styleinject.version", version}};
  const auto bytes = detail::safetensors::serialize(tensors, metadata, context);
  if (format == LoraFormat::kKohya) {
    detail::safetensors::write_file_atomically(path, bytes, context);
    return;
  }
  detail::make_directory(path, context);
  detail::safetensors::write_file_atomically(
      path + "/" + detail::kPeftWeights, bytes, context);
  detail::safetensors::write_file_atomically(
      path + "/" + detail::kPeftConfig,
      detail::peft_config(loras, config_names).dump(2) + "\n",
      context);
}

namespace detail {

/// One module's tensors in a LoRA file.
struct LoraModule {
  std::string down_key, up_key;
  torch::Tensor down, up, alpha;
};

/// The tensors of a LoRA file by module, and its format (kPeft for every
/// module under "base_model.model.", else kDiffusers; kKohya by its keys).
/// A key of no LoRA tensor is an error.
inline std::map<std::string, LoraModule> lora_modules(
    const Safetensors& file,
    LoraFormat& format,
    const std::string& context) {
  static const std::vector<std::pair<std::string, char>> suffixes{
      {".lora_A.weight", 'A'},
      {".lora_B.weight", 'B'},
      {".lora_down.weight", 'a'},
      {".lora_up.weight", 'b'},
      {".alpha", '='}};
  std::map<std::string, LoraModule> modules;
  bool peft = false, kohya = false, prefixed = true;
  for (const auto& entry : file.tensors) {
    const auto& key = entry.first;
    const auto suffix = std::find_if(
        suffixes.begin(), suffixes.end(), [&](const auto& candidate) {
          const auto& s = candidate.first;
          return key.size() > s.size() &&
              key.compare(key.size() - s.size(), s.size(), s) == 0;
        });
    TORCH_CHECK_VALUE(
        suffix != suffixes.end(),
        context,
        ": expected LoRA tensors (keys ending in .lora_A.weight, "
        ".lora_B.weight, .lora_down.weight, .lora_up.weight or .alpha), but "
        "got '",
        key,
        "'");
    const auto name = key.substr(0, key.size() - suffix->first.size());
    auto& module = modules[name];
    switch (suffix->second) {
      case 'A':
      case 'a':
        module.down_key = key;
        module.down = entry.second;
        break;
      case 'B':
      case 'b':
        module.up_key = key;
        module.up = entry.second;
        break;
      default:
        module.alpha = entry.second;
    }
    peft = peft || suffix->second == 'A' || suffix->second == 'B';
    kohya = kohya || suffix->second == 'a' || suffix->second == 'b';
    prefixed = prefixed && name != peft_config_name(name);
  }
  TORCH_CHECK_VALUE(
      !(peft && kohya),
      context,
      ": expected one format, but the file mixes PEFT's lora_A/lora_B keys "
      "with kohya's lora_down/lora_up");
  TORCH_CHECK_VALUE(
      peft || kohya, context, ": expected LoRA tensors, but the file has none");
  format = kohya ? LoraFormat::kKohya
      : prefixed ? LoraFormat::kPeft
                 : LoraFormat::kDiffusers;
  for (const auto& module : modules) {
    const auto& found = module.second;
    TORCH_CHECK_VALUE(
        found.down.defined() && found.up.defined(),
        context,
        ": expected both the down (A) and the up (B) tensor of module '",
        module.first,
        "', but the file has only ",
        found.down.defined()     ? "'" + found.down_key + "'"
            : found.up.defined() ? "'" + found.up_key + "'"
                                 : std::string("its alpha"));
  }
  return modules;
}

/// The module names that a layer named `name` may have in a `format` file.
inline std::vector<std::string> import_module_names(
    LoraFormat format,
    const std::string& name) {
  std::vector<std::string> names;
  if (format == LoraFormat::kKohya) {
    for (const char* prefix :
         {"lora_unet_",
          "lora_transformer_",
          "lora_te_",
          "lora_te1_",
          "lora_te2_"}) {
      names.push_back(prefix + kohya_name(name));
    }
  } else {
    for (const char* prefix :
         {kPeftPrefix,
          "unet.",
          "transformer.",
          "text_encoder.",
          "text_encoder_2.",
          ""}) {
      names.push_back(prefix + name);
    }
  }
  return names;
}

/// A key of PEFT's rank_pattern / alpha_pattern, which PEFT matches as
/// re.match(r"(.*\.)?(KEY)$", name): a regular expression from a file, run
/// as an automaton (detail::Regex: time linear in the name). A key that is
/// a plain module name, as PEFT, diffusers and export_lora write them (its
/// dots escaped or not, maybe after '^'), is compared with the name's end
/// directly, in one pass. Throws std::invalid_argument for a key that
/// detail::Regex refuses.
class PeftPattern {
 public:
  explicit PeftPattern(const std::string& key)
      : regex_("(.*\\.)?(" + key + ")$") {
    plain_ = !key.empty();
    anchored_ = !key.empty() && key[0] == '^';
    for (size_t i = anchored_ ? 1 : 0; i < key.size() && plain_; ++i) {
      const char c = key[i];
      if (c == '\\' && i + 1 < key.size() && key[i + 1] == '.') {
        characters_ += '.';
        any_.push_back(false);
        ++i;
      } else {
        plain_ =
            std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.';
        characters_ += c;
        any_.push_back(c == '.'); // an unescaped '.' matches any character
      }
    }
  }

  /// Whether PEFT's match picks `name`; adds the automaton's steps, if it
  /// ran, to `*steps`.
  bool matches(const std::string& name, size_t* steps = nullptr) const {
    const bool simple =
        plain_ && std::all_of(name.begin(), name.end(), [](char c) {
          return c != '\n' && static_cast<unsigned char>(c) < 0x80;
        });
    return simple ? matches_end(name) : regex_.match_prefix(name, steps);
  }

 private:
  // The key is the name's end, after nothing (or, unanchored, after a '.').
  bool matches_end(const std::string& name) const {
    if (name.size() < characters_.size()) {
      return false;
    }
    const size_t start = name.size() - characters_.size();
    if (anchored_ ? start != 0 : start != 0 && name[start - 1] != '.') {
      return false;
    }
    for (size_t i = 0; i < characters_.size(); ++i) {
      if (!any_[i] && name[start + i] != characters_[i]) {
        return false;
      }
    }
    return true;
  }

  Regex regex_;
  bool plain_ = false, anchored_ = false;
  std::string characters_;
  std::vector<bool> any_;
};

/// PEFT's alphas of an adapter_config.json: lora_alpha, and alpha_pattern,
/// whose keys (PeftPattern) PEFT tries in order, the first that matches
/// winning. All matching together is bounded by kSteps automaton steps; a
/// key PeftPattern refuses, or a file that asks for more, is an error that
/// says so.
class PeftAlphas {
 public:
  /// About a second of matching on a slow core; the automaton runs only
  /// for keys that are not plain module names.
  static constexpr size_t kSteps = 100000000;

  PeftAlphas(const nlohmann::ordered_json& config, std::string context)
      : context_(std::move(context)) {
    const auto alpha = config.find("lora_alpha");
    if (alpha != config.end() && alpha->is_number()) {
      default_ = alpha->get<double>();
    }
    const auto patterns = config.find("alpha_pattern");
    if (patterns == config.end() || !patterns->is_object()) {
      return;
    }
    for (const auto& item : patterns->items()) {
      if (!item.value().is_number()) {
        continue; // PEFT would fail on it; it picks no alpha here
      }
      try {
        patterns_.emplace_back(
            PeftPattern(item.key()), item.value().get<double>());
      } catch (const std::invalid_argument& error) {
        TORCH_CHECK_VALUE(
            false,
            context_,
            ": expected the alpha_pattern key '",
            item.key(),
            "' of ",
            kPeftConfig,
            " to be a regular expression of the kind this library matches: ",
            error.what());
      }
    }
  }

  /// The alpha of the module the config names `name`: the first
  /// alpha_pattern key that matches it, else lora_alpha; unset where the
  /// config has neither.
  c10::optional<double> of(const std::string& name) {
    for (const auto& pattern : patterns_) {
      const bool matches = pattern.first.matches(name, &steps_);
      TORCH_CHECK_VALUE(
          steps_ <= kSteps,
          context_,
          ": matching the ",
          patterns_.size(),
          " alpha_pattern keys of ",
          kPeftConfig,
          " against the module names took more than ",
          kSteps,
          " automaton steps; expected keys of PEFT's kind (module names)");
      if (matches) {
        return pattern.second;
      }
    }
    return default_;
  }

 private:
  std::string context_;
  c10::optional<double> default_;
  std::vector<std::pair<PeftPattern, double>> patterns_;
  size_t steps_ = 0;
};

/// The alpha of `module`, named `name` in the file: its ".alpha" tensor,
/// else the PEFT config's, else the caller's; an error naming the module
/// where none gives one.
inline double lora_alpha(
    const std::string& name,
    const LoraModule& module,
    PeftAlphas& config,
    const ImportLoraOptions& options,
    const std::string& context) {
  if (module.alpha.defined()) {
    TORCH_CHECK_VALUE(
        module.alpha.numel() == 1 && module.alpha.scalar_type() != torch::kBool,
        context,
        ": expected '",
        name,
        ".alpha' to be one number, but got ",
        module.alpha.scalar_type(),
        " of shape ",
        module.alpha.sizes());
    return module.alpha.item<double>();
  }
  if (const auto alpha = config.of(peft_config_name(name))) {
    return *alpha;
  }
  TORCH_CHECK_VALUE(
      options.alpha().has_value(),
      context,
      ": expected an alpha for module '",
      name,
      "' (a '",
      name,
      ".alpha' tensor, lora_alpha in a PEFT adapter directory's ",
      kPeftConfig,
      " or in a diffusers file's lora_adapter_metadata), but the file has "
      "none; pass it with ImportLoraOptions().alpha()");
  return *options.alpha();
}

/// What import_lora attaches to one layer.
struct LoraImport {
  const Candidate* layer = nullptr;
  std::string module;
  StyleInjectOptions options{1};
  torch::Tensor down, up;
};

/// Checks one module of the file against the layer it names: both tensors
/// there, of the layer's shapes for a rank-r LoRA, r = down.size(0).
inline LoraImport plan_lora_import(
    const Candidate& layer,
    const std::string& name,
    const LoraModule& module,
    double alpha,
    bool rslora,
    const ImportLoraOptions& options,
    const std::string& context) {
  TORCH_CHECK_VALUE(
      layer.refusal.empty(),
      context,
      ": module '",
      name,
      "' names layer '",
      layer.name,
      "', which cannot carry an adapter: ",
      layer.refusal);
  TORCH_CHECK_VALUE(
      !layer.options,
      context,
      ": layer '",
      layer.name,
      "' has an adapter '",
      options.adapter(),
      "' already; import under another name (ImportLoraOptions().adapter()) "
      "or remove_adapter() first");
  const int64_t rank = module.down.dim() >= 1 ? module.down.size(0) : 0;
  TORCH_CHECK_VALUE(
      rank >= 1 && alpha > 0.0 && std::isfinite(alpha),
      context,
      ": expected a rank >= 1 and a finite alpha > 0 for module '",
      name,
      "', but got rank ",
      rank,
      " and alpha ",
      alpha);
  auto adapter = StyleInjectOptions::lora(rank).alpha(alpha).rslora(rslora);
  adapter.dtype(options.dtype());
  const auto shapes = layer.adapter_shapes(adapter);
  const std::vector<int64_t> down(
      shapes[0].second.begin() + 1, shapes[0].second.end());
  const auto& up = shapes[1].second;
  TORCH_CHECK_VALUE(
      module.down.sizes() == down && module.up.sizes() == up &&
          module.down.is_floating_point() && module.up.is_floating_point(),
      context,
      ": module '",
      name,
      "' does not fit layer '",
      layer.name,
      "' (",
      layer.type,
      " ",
      layer.shape,
      "): expected floating-point '",
      module.down_key,
      "' ",
      torch::IntArrayRef(down),
      " and '",
      module.up_key,
      "' ",
      torch::IntArrayRef(up),
      ", but got ",
      module.down.sizes(),
      " and ",
      module.up.sizes());
  check_attachable(layer, adapter, options.adapter(), context);
  return {&layer, name, adapter, module.down, module.up};
}

/// A boolean field of PEFT's config, `otherwise` where it is absent.
inline bool config_flag(
    const nlohmann::ordered_json& config,
    const char* key,
    bool otherwise,
    const std::string& context) {
  const auto value = config.find(key);
  if (value == config.end() || value->is_null()) {
    return otherwise;
  }
  TORCH_CHECK_VALUE(
      value->is_boolean(),
      context,
      ": expected ",
      key,
      " in ",
      kPeftConfig,
      " to be true or false, but got ",
      value->dump());
  return value->get<bool>();
}

/// The PEFT config that diffusers keeps in a LoRA file's metadata, under
/// "lora_adapter_metadata": a model's `save_lora_adapter` writes the
/// config's fields, a pipeline's `save_lora_weights` the same fields under
/// each component's prefix ("unet.lora_alpha"). Components whose configs
/// differ in r, lora_alpha, their patterns or use_rslora cannot share one
/// and are refused. An empty object where the file has none.
inline nlohmann::ordered_json diffusers_lora_config(
    const std::map<std::string, std::string>& metadata,
    const std::string& context) {
  const auto found = metadata.find("lora_adapter_metadata");
  if (found == metadata.end()) {
    return nlohmann::ordered_json::object();
  }
  const auto& text = found->second;
  auto fields = parse_json(
      text.data(),
      text.data() + text.size(),
      context,
      "the metadata's lora_adapter_metadata");
  TORCH_CHECK_VALUE(
      fields.is_object(),
      context,
      ": expected the metadata's lora_adapter_metadata to hold a JSON "
      "object, but got a JSON ",
      fields.type_name());
  std::map<std::string, nlohmann::ordered_json> components;
  for (const auto& item : fields.items()) {
    const auto dot = item.key().find('.');
    if (dot == std::string::npos) {
      return fields; // save_lora_adapter's: unprefixed
    }
    components[item.key().substr(0, dot)][item.key().substr(dot + 1)] =
        item.value();
  }
  if (components.empty()) {
    return nlohmann::ordered_json::object();
  }
  const auto& [first_name, first] = *components.begin();
  for (const auto& [name, config] : components) {
    for (const char* key :
         {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"}) {
      const auto ours = config.value(key, nlohmann::ordered_json());
      const auto theirs = first.value(key, nlohmann::ordered_json());
      TORCH_CHECK_VALUE(
          ours == theirs,
          context,
          ": the metadata's lora_adapter_metadata gives components '",
          first_name,
          "' and '",
          name,
          "' different ",
          key,
          " (",
          theirs.dump(),
          " and ",
          ours.dump(),
          "); import a file of one component");
    }
  }
  return first;
}

/// import_lora on what it read: the weights file's tensors and PEFT's
/// config (an empty object for a single file).
inline ImportLoraReport import_lora_contents(
    torch::nn::Module& model,
    const Safetensors& file,
    const nlohmann::ordered_json& config,
    const ImportLoraOptions& options,
    const std::string& context) {
  TORCH_CHECK_VALUE(
      config.is_object(),
      context,
      ": expected ",
      kPeftConfig,
      " to hold a JSON object");
  TORCH_CHECK_VALUE(
      !config_flag(config, "use_dora", false, context),
      context,
      ": expected a plain LoRA, but ",
      kPeftConfig,
      " says use_dora=true (DoRA is not supported)");
  const bool rslora = config_flag(config, "use_rslora", false, context);
  PeftAlphas alphas(config, context);
  ImportLoraReport report;
  const auto modules = lora_modules(file, report.format, context);
  report.metadata = file.metadata;

  // Each module of the file to the one layer it names.
  check_adapter_name(options.adapter(), context);
  const auto layers = candidates(model, options.adapter());
  std::map<std::string, const Candidate*> by_module;
  for (const auto& layer : layers) {
    const auto renamed = options.rename().find(layer.name);
    const auto names = renamed != options.rename().end()
        ? std::vector<std::string>{renamed->second}
        : import_module_names(report.format, layer.name);
    for (const auto& name : names) {
      const auto found = by_module.emplace(name, &layer);
      TORCH_CHECK_VALUE(
          found.second || found.first->second == &layer ||
              modules.count(name) == 0,
          context,
          ": module '",
          name,
          "' could be layer '",
          found.first->second->name,
          "' or '",
          layer.name,
          "'; say which with ImportLoraOptions().rename()");
    }
  }
  std::vector<LoraImport> plan;
  std::map<const Candidate*, std::string> named;
  for (const auto& module : modules) {
    const auto layer = by_module.find(module.first);
    if (layer == by_module.end() && !options.strict()) {
      report.skipped.push_back(module.first);
      continue;
    }
    TORCH_CHECK_VALUE(
        layer != by_module.end(),
        context,
        ": module '",
        module.first,
        "' (key '",
        module.second.down_key.empty() ? module.second.up_key
                                       : module.second.down_key,
        "') fits no Linear or Conv2d layer of the model; map it with "
        "ImportLoraOptions().rename(), or skip such modules with strict(false)");
    const auto twice = named.emplace(layer->second, module.first);
    TORCH_CHECK_VALUE(
        twice.second,
        context,
        ": modules '",
        twice.first->second,
        "' and '",
        module.first,
        "' both name layer '",
        layer->second->name,
        "'");
    const double alpha =
        lora_alpha(module.first, module.second, alphas, options, context);
    plan.push_back(plan_lora_import(
        *layer->second,
        module.first,
        module.second,
        alpha,
        rslora,
        options,
        context));
  }

  // Everything fits: attach, then copy the values in.
  AdapterLoadPlan load;
  load.adapter = options.adapter();
  for (const auto& item : plan) {
    const auto& name = item.layer->name;
    const auto& prefix = item.layer->prefix;
    load.attach.emplace_back(item.layer, item.options);
    load.values.emplace_back(
        qualified(name, prefix + "lora_A"), item.down.unsqueeze(0));
    load.values.emplace_back(qualified(name, prefix + "lora_B"), item.up);
    report.layers.push_back(
        {name, item.module, item.options.rank(), *item.options.alpha()});
  }
  apply_adapter_load(model, load);
  std::sort(
      report.layers.begin(),
      report.layers.end(),
      [&](const ImportedLora& a, const ImportedLora& b) {
        return by_module.at(a.module) < by_module.at(b.module);
      });
  return report;
}

} // namespace detail

/// Attaches the LoRA in a file of the Python tools to `model`, as
/// LoRA-preset adapters (StyleInjectOptions::lora) with the file's rank and
/// alpha, which may differ per layer; Linear and Conv2d. `path` is a PEFT
/// adapter directory (adapter_model.safetensors and adapter_config.json), a
/// kohya-ss file, or a PEFT or diffusers safetensors file; the format is
/// recognised from the keys. The file's module names are matched to the
/// model's layers by each format's spelling: "base_model.model.<layer>"
/// (PEFT), "unet.<layer>", "transformer.<layer>", "text_encoder.<layer>"
/// or "<layer>" (diffusers), "lora_unet_<layer with '.' as '_'>" and the
/// other kohya prefixes; ImportLoraOptions::rename for any other. A key
/// that fits no layer, a shape misfit, a missing alpha, or a layer that has
/// an adapter of that name already is an error naming the key and shapes,
/// and the model is left as it was. The LoRA is attached under
/// ImportLoraOptions::adapter ("default" unless set), so that it can sit
/// beside a trained adapter (see set_adapters). As load_adapters does, the
/// model's other parameters, other adapters included, are frozen.
///
/// Example:
/// ```
/// auto report = styleinject::import_lora(*unet, "community.safetensors");
/// styleinject::set_scale(*unet, 0.8);
///
/// // Or beside a trained adapter, summed with it.
/// styleinject::import_lora(*unet, "community.safetensors",
///     styleinject::ImportLoraOptions().adapter("community"));
/// styleinject::set_adapters(*unet, {{"default", 1.0}, {"community", 0.8}});
/// ```
inline ImportLoraReport import_lora(
    torch::nn::Module& model,
    const std::string& path,
    const ImportLoraOptions& options = {}) {
  const std::string context = "styleinject::import_lora: '" + path + "'";
  const bool directory = detail::is_directory(path);
  const auto weights = directory ? path + "/" + detail::kPeftWeights : path;
  const auto file = detail::safetensors::read_mapped(weights, context);
  auto config = detail::diffusers_lora_config(file.metadata, context);
  if (directory) {
    const auto text =
        detail::read_text(path + "/" + detail::kPeftConfig, context);
    config = detail::parse_json(
        text.data(), text.data() + text.size(), context, detail::kPeftConfig);
  }
  return detail::import_lora_contents(model, file, config, options, context);
}

} // namespace styleinject
