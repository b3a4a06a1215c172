#pragma once

// torch::load of a StyleInject layer: what a checkpoint holds, checked
// against the layer before anything changes (StyleInjectLayerImpl::load).

#include <styleinject/detail/json.h>
#include <styleinject/options.h>

#include <torch/serialize/input-archive.h>
#include <torch/types.h>

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace styleinject {
namespace detail {

/// The checkpoint key under which an adapted layer records its adapter's
/// options (JSON), so that torch::load can attach or check the adapter.
inline constexpr const char* kCheckpointOptionsKey = "styleinject_options";

inline bool is_base_parameter(const std::string& name) {
  return name == "weight" || name == "bias";
}

/// What a checkpoint changes in a layer: the adapters to attach first, by
/// name, then each parameter's new value, by its name in the layer.
struct CheckpointPlan {
  std::vector<std::pair<std::string, StyleInjectOptions>> attach;
  std::vector<std::pair<std::string, torch::Tensor>> values;
};

/// Checks the shape of a checkpoint's tensor against its parameter's.
inline void check_checkpoint_shape(
    const char* layer,
    const std::string& name,
    const torch::Tensor& value,
    torch::IntArrayRef shape) {
  TORCH_CHECK(
      value.sizes() == shape,
      layer,
      ": expected '",
      name,
      "' of shape ",
      shape,
      " in the checkpoint, but got ",
      value.sizes());
}

/// The adapter tensors a layer's checkpoint holds, by name, whatever their
/// shapes.
inline std::map<std::string, torch::Tensor> checkpoint_adapter_tensors(
    torch::serialize::InputArchive& archive) {
  std::map<std::string, torch::Tensor> found;
  for (const char* key : {"lora_A", "lora_B", "gate"}) {
    torch::Tensor value;
    if (archive.try_read(key, value)) {
      found[key] = value;
    }
  }
  torch::serialize::InputArchive router;
  if (archive.try_read("router", router)) {
    for (const char* key : {"weight", "bias"}) {
      torch::Tensor value;
      if (router.try_read(key, value)) {
        found[std::string("router.") + key] = value;
      }
    }
  }
  return found;
}

/// The adapter options a layer's checkpoint records, if it records any.
inline c10::optional<StyleInjectOptions> checkpoint_options(
    const char* layer,
    torch::serialize::InputArchive& archive) {
  c10::IValue record;
  if (!archive.try_read(kCheckpointOptionsKey, record)) {
    return c10::nullopt;
  }
  const std::string where =
      std::string(layer) + ": the checkpoint's adapter options";
  TORCH_CHECK(record.isString(), where, " are not a string");
  const auto& text = record.toStringRef();
  return options_from_json(
      parse_json(text.data(), text.data() + text.size(), where, "the record"),
      where,
      "the checkpoint");
}

/// Plans the part of a checkpoint that is the adapter `name` of `layer`:
/// `archive` is the layer's own for the first adapter, the adapter's child
/// archive for the others. Recorded options attach the adapter where the
/// layer lacks it, and must compute the same as the layer's where it has
/// it; adapter tensors without recorded options fit only an adapter
/// attached already, exactly. An archive without the adapter changes
/// nothing of it.
template <typename Layer>
void plan_adapter_checkpoint(
    const Layer& layer,
    const std::string& name,
    torch::serialize::InputArchive& archive,
    CheckpointPlan& plan) {
  const std::string where = std::string(Layer::Traits::name) +
      (name == kDefaultAdapter ? "" : ": adapter '" + name + "'");
  const auto found = checkpoint_adapter_tensors(archive);
  const auto recorded = checkpoint_options(where.c_str(), archive);
  const auto current = layer.has_adapter(name)
      ? c10::optional<StyleInjectOptions>(layer.adapter_options_of(name))
      : c10::nullopt;
  if (recorded) {
    TORCH_CHECK(
        !current || same_computation(*current, *recorded),
        where,
        ": the layer's adapter has other options than the checkpoint's: ",
        current ? options_to_json(*current).dump() : "",
        " in the layer, ",
        options_to_json(*recorded).dump(),
        " in the checkpoint");
    if (!current) {
      plan.attach.emplace_back(name, *recorded);
    }
  } else if (found.empty()) {
    return; // a base-layer checkpoint: the adapter keeps its values
  }
  TORCH_CHECK(
      current || recorded,
      where,
      ": the checkpoint has adapter tensors but not their options (a "
      "checkpoint written by hand, or by StyleInject before 0.3); attach "
      "the adapter with add_adapter() or styleinject::inject() before "
      "loading");
  const auto shapes =
      Layer::adapter_shapes(layer.options, recorded ? *recorded : *current);
  for (const auto& tensor : found) {
    TORCH_CHECK(
        std::any_of(
            shapes.begin(),
            shapes.end(),
            [&](const auto& shape) { return shape.first == tensor.first; }),
        where,
        ": the checkpoint has '",
        tensor.first,
        "', which the layer's adapter does not have");
  }
  TORCH_CHECK(
      found.size() == shapes.size(),
      where,
      ": the checkpoint has ",
      found.size(),
      " of the adapter's ",
      shapes.size(),
      " tensors; expected all of them, or none for a base-layer checkpoint");
  const std::string prefix = name == kDefaultAdapter ? "" : name + ".";
  for (const auto& shape : shapes) {
    const auto& value = found.at(shape.first);
    check_checkpoint_shape(where.c_str(), shape.first, value, shape.second);
    plan.values.emplace_back(prefix + shape.first, value);
  }
}

/// Reads a checkpoint of `layer` (a StyleInjectLayerImpl) and checks it
/// against the layer: the base's weight and bias, then each adapter (see
/// plan_adapter_checkpoint): the first in the layer's archive, the others
/// in child archives of their names. Changes nothing.
template <typename Layer>
CheckpointPlan plan_checkpoint_load(
    const Layer& layer,
    torch::serialize::InputArchive& archive) {
  const char* name = Layer::Traits::name;
  CheckpointPlan plan;
  for (const auto& parameter :
       {std::make_pair("weight", &layer.weight),
        std::make_pair("bias", &layer.bias)}) {
    if (parameter.second->defined()) {
      torch::Tensor value;
      TORCH_CHECK(
          archive.try_read(parameter.first, value),
          name,
          ": the checkpoint has no '",
          parameter.first,
          "'");
      check_checkpoint_shape(
          name, parameter.first, value, parameter.second->sizes());
      plan.values.emplace_back(parameter.first, value);
    }
  }
  plan_adapter_checkpoint(layer, kDefaultAdapter, archive, plan);
  for (const auto& key : archive.keys()) {
    torch::serialize::InputArchive child;
    if (key != "router" && archive.try_read(key, child)) {
      check_adapter_name(key, std::string(name) + ": the checkpoint");
      plan_adapter_checkpoint(layer, key, child, plan);
    }
  }
  // The adapters the layer would have, checked together: attaching them
  // one by one would stop half way.
  auto gates = layer.adapter_gates();
  for (const auto& adapter : plan.attach) {
    gates.emplace_back(adapter.first, adapter.second.gate());
  }
  const auto obstacle = shared_layer_obstacle(gates);
  TORCH_CHECK(
      obstacle.empty(), name, ": with the checkpoint, the layer ", obstacle);
  return plan;
}

} // namespace detail
} // namespace styleinject
