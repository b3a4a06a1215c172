#pragma once

#include <styleinject/detail/json.h>
#include <styleinject/inject.h>
#include <styleinject/options.h>
#include <styleinject/safetensors.h>
#include <styleinject/version.h>

#include <torch/nn/module.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

// Adapter files: the adapters of a model in a safetensors file, with each
// adapted layer's options in its metadata.

namespace styleinject {
namespace detail {

/// The metadata key that holds each adapted layer's options, as JSON.
inline constexpr const char* kLayersKey = "styleinject.layers";

/// One layer's record in an adapter file's metadata.
struct LayerRecord {
  std::string type;
  StyleInjectOptions options = StyleInjectOptions(1);
};

/// A layer's record: its type ("Linear", "Conv2d"), then its options.
inline nlohmann::ordered_json to_json(
    const std::string& type,
    const StyleInjectOptions& options) {
  nlohmann::ordered_json record{{"type", type}};
  record.update(options_to_json(options));
  return record;
}

/// Parses the layers' records of an adapter file's metadata; every field is
/// required (but dtype), with its JSON type, and the options must be valid.
inline std::map<std::string, LayerRecord> parse_layer_records(
    const std::string& text,
    const std::string& context) {
  const std::string what = std::string("the metadata '") + kLayersKey + "'";
  const auto json =
      parse_json(text.data(), text.data() + text.size(), context, what);
  TORCH_CHECK(
      json.is_object(),
      context,
      ": expected ",
      what,
      " to be a JSON object of layers, but it is not");
  std::map<std::string, LayerRecord> records;
  for (const auto& item : json.items()) {
    const std::string where = context + ": layer '" + item.key() + "'";
    const auto& r = item.value();
    TORCH_CHECK(
        r.is_object() && r.contains("type") && r["type"].is_string(),
        where,
        ": expected 'type' to be a string in the file's metadata");
    LayerRecord record;
    record.type = r["type"].get<std::string>();
    TORCH_CHECK(
        record.type == "Linear" || record.type == "Conv2d",
        where,
        ": expected type Linear or Conv2d, but got '",
        record.type.substr(0, 64),
        "'");
    record.options = options_from_json(r, where, "the file's metadata");
    records.emplace(item.key(), std::move(record));
  }
  return records;
}

/// What loading an adapter file changes: the layers that get the adapter
/// `adapter` first, then each parameter's new value, by its qualified name
/// in the model.
struct AdapterLoadPlan {
  std::string adapter = kDefaultAdapter;
  std::vector<std::pair<const Candidate*, StyleInjectOptions>> attach;
  std::vector<std::pair<std::string, torch::Tensor>> values;
};

/// Carries out a plan that was checked whole: attaches its adapters (and
/// then freezes the rest of `model`, as `inject` does), then copies each
/// value into the parameter of that name.
inline void apply_adapter_load(
    torch::nn::Module& model,
    const AdapterLoadPlan& plan) {
  for (const auto& layer : plan.attach) {
    layer.first->attach(layer.second);
  }
  if (!plan.attach.empty()) {
    freeze_all_but_adapter(model, plan.adapter);
  }
  auto parameters = model.named_parameters();
  torch::NoGradGuard no_grad;
  for (const auto& value : plan.values) {
    parameters[value.first].copy_(value.second);
  }
}

/// A tensor an adapter file must hold: its shape, and the model's
/// parameter it goes to.
struct ExpectedTensor {
  std::vector<int64_t> shape;
  std::string parameter;
};

/// The tensors a file must hold for `model`, by their names in the file:
/// the adapters its records describe (checked against the model's layers),
/// or, for a file without records, the adapters the model has.
inline std::map<std::string, ExpectedTensor> expected_tensors(
    const std::vector<Candidate>& candidates,
    const std::map<std::string, LayerRecord>* records,
    AdapterLoadPlan& plan,
    const std::string& context) {
  std::map<std::string, ExpectedTensor> expected;
  const auto add = [&](const Candidate& layer, const StyleInjectOptions& o) {
    for (const auto& shape : layer.adapter_shapes(o)) {
      expected[qualified(layer.name, shape.first)] = {
          shape.second, qualified(layer.name, layer.prefix + shape.first)};
    }
  };
  if (!records) {
    for (const auto& candidate : candidates) {
      if (candidate.options) {
        add(candidate, *candidate.options);
      }
    }
    TORCH_CHECK(
        !expected.empty(),
        context,
        ": the file has no StyleInject metadata ('",
        kLayersKey,
        "'), so it can only fill adapters that the model has already, and "
        "the model has none; attach them first with styleinject::inject()");
    return expected;
  }
  for (const auto& record : *records) {
    const auto found = std::find_if(
        candidates.begin(), candidates.end(), [&](const Candidate& c) {
          return c.name == record.first;
        });
    TORCH_CHECK(
        found != candidates.end(),
        context,
        ": the file has an adapter for layer '",
        record.first,
        "', but the model has no Linear or Conv2d layer of that name");
    const auto& layer = *found;
    const auto& options = record.second.options;
    TORCH_CHECK(
        layer.type == record.second.type,
        context,
        ": layer '",
        record.first,
        "' is a ",
        layer.type,
        " in the model, but a ",
        record.second.type,
        " in the file");
    TORCH_CHECK(
        layer.refusal.empty(),
        context,
        ": layer '",
        record.first,
        "' cannot carry an adapter: ",
        layer.refusal);
    TORCH_CHECK(
        !layer.options || same_computation(*layer.options, options),
        context,
        ": layer '",
        record.first,
        "' has an adapter with other options than the file's: ",
        layer.options ? to_json(layer.type, *layer.options).dump() : "",
        " in the model, ",
        to_json(record.second.type, options).dump(),
        " in the file");
    if (!layer.options) {
      check_attachable(layer, options, plan.adapter, context);
      plan.attach.emplace_back(&layer, options);
    }
    add(layer, options);
  }
  for (const auto& candidate : candidates) {
    TORCH_CHECK(
        !candidate.options || records->count(candidate.name),
        context,
        ": the model's layer '",
        candidate.name,
        "' has an adapter '",
        plan.adapter,
        "', but the file has none for it");
  }
  return expected;
}

/// Everything a file changes in `model`, validated before anything does:
/// the file's records against the model's layers, then its tensors
/// against the expected names, shapes and dtypes, one to one.
inline AdapterLoadPlan plan_adapter_load(
    const std::vector<Candidate>& candidates,
    const std::string& adapter,
    Safetensors contents,
    const std::string& context) {
  AdapterLoadPlan plan;
  plan.adapter = adapter;
  const auto layers = contents.metadata.find(kLayersKey);
  std::map<std::string, LayerRecord> records;
  if (layers != contents.metadata.end()) {
    records = parse_layer_records(layers->second, context);
  }
  const auto expected = expected_tensors(
      candidates,
      layers != contents.metadata.end() ? &records : nullptr,
      plan,
      context);
  std::set<std::string> seen;
  for (auto& item : contents.tensors) {
    const auto shape = expected.find(item.first);
    TORCH_CHECK(
        shape != expected.end(),
        context,
        ": the file has the tensor '",
        item.first,
        "', which is not a parameter of the model's adapters");
    TORCH_CHECK(
        item.second.sizes() == torch::IntArrayRef(shape->second.shape),
        context,
        ": expected '",
        item.first,
        "' of shape ",
        torch::IntArrayRef(shape->second.shape),
        ", but the file has ",
        item.second.sizes());
    TORCH_CHECK(
        item.second.is_floating_point(),
        context,
        ": expected '",
        item.first,
        "' of a floating-point dtype, but the file has ",
        item.second.scalar_type());
    seen.insert(item.first);
    plan.values.emplace_back(shape->second.parameter, std::move(item.second));
  }
  for (const auto& shape : expected) {
    TORCH_CHECK(
        seen.count(shape.first),
        context,
        ": the file has no tensor '",
        shape.first,
        "'");
  }
  return plan;
}

} // namespace detail

/// Saves the adapters of `model` named `adapter` ("default" unless given),
/// and nothing else, to a safetensors file at `path`: each adapter tensor
/// under its layer's qualified name and SPEC §5's name (e.g.
/// "attn.to_q.lora_A", whatever the adapter's name), in its own dtype, and
/// in the file's `__metadata__` every adapted layer's type and options
/// ("styleinject.layers", JSON) and the library version
/// ("styleinject.version"). So a file saved from one adapter loads into
/// any other name. The write is atomic: if it fails, whatever was at
/// `path` stays as it was.
///
/// Example:
/// ```
/// styleinject::save_adapters(*unet, "style.safetensors");
/// styleinject::save_adapters(*unet, "ink.safetensors", "ink");
/// ```
inline void save_adapters(
    const torch::nn::Module& model,
    const std::string& path,
    const std::string& adapter = kDefaultAdapter) {
  const std::string context = "styleinject::save_adapters: '" + path + "'";
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  nlohmann::ordered_json layers = nlohmann::ordered_json::object();
  detail::for_each_adapted(model, [&](const std::string& name, auto& layer) {
    using Layer = std::decay_t<decltype(layer)>;
    if (!layer.has_adapter(adapter)) {
      return;
    }
    layers[name] =
        detail::to_json(Layer::Traits::type, layer.adapter_options_of(adapter));
    for (const auto& parameter : layer.named_adapter_parameters(adapter)) {
      tensors.emplace_back(
          detail::qualified(name, parameter.first), parameter.second);
    }
  });
  TORCH_CHECK_VALUE(
      !tensors.empty(),
      context,
      ": nothing to save: the model has ",
      detail::missing_adapter(model, adapter));
  const std::map<std::string, std::string> metadata{
      {"format", "styleinject"},
      {"styleinject.version", version},
      {detail::kLayersKey, layers.dump()}};
  detail::safetensors::write(path, tensors, metadata, context);
}

/// Loads the adapters in the safetensors file at `path` into `model`, as
/// its adapters named `adapter` ("default" unless given). Where a layer of
/// the file has no such adapter in the model, one is attached with the
/// file's options (the model's other parameters, other adapters included,
/// are then frozen, as `inject` does); where it has one, the values are
/// copied into it in place (a hot swap: optimizers and captured CUDA
/// graphs keep their tensors), and the two must compute the same: the
/// same rank, branches, router, gate, temperature and scale (alpha / r, or
/// alpha / sqrt(r)), while dropout, the compute path and the dtype may
/// differ. The file must hold every adapter the model has, and nothing
/// else; values are converted to each layer's dtype and device. A file
/// without StyleInject metadata (e.g. written by another tool) loads into a
/// model whose adapters are attached already.
///
/// Everything is read and validated before the model changes: a file that
/// is malformed or does not fit leaves the model exactly as it was.
///
/// Example:
/// ```
/// UNet fresh;  // declares StyleInject layers, no adapters yet
/// torch::load(fresh, "base.pt");
/// styleinject::load_adapters(*fresh, "style.safetensors");
/// styleinject::load_adapters(*fresh, "ink.safetensors", "ink"); // beside it
/// ```
inline void load_adapters(
    torch::nn::Module& model,
    const std::string& path,
    const std::string& adapter = kDefaultAdapter) {
  const std::string context = "styleinject::load_adapters: '" + path + "'";
  detail::check_adapter_name(adapter, context);
  detail::for_each_adapted(model, [&](const std::string& name, auto& layer) {
    TORCH_CHECK(
        !layer.is_merged(),
        context,
        ": layer '",
        name,
        "' has its adapter merged into the weight; unmerge_adapters() first");
  });
  const auto candidates = detail::candidates(model, adapter);
  detail::apply_adapter_load(
      model,
      detail::plan_adapter_load(
          candidates,
          adapter,
          detail::safetensors::read_mapped(path, context),
          context));
}

} // namespace styleinject
