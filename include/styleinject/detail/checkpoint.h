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

/// What a checkpoint changes in a layer: the adapter to attach first, if
/// any, then each parameter's new value, by name.
struct CheckpointPlan {
  c10::optional<StyleInjectOptions> attach;
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

/// Reads a checkpoint of `layer` (a StyleInjectLayerImpl) and checks it
/// against the layer: the base's weight and bias, then the adapter. Recorded
/// options attach an adapter where the layer has none, and must compute the
/// same as the layer's where it has one; adapter tensors without recorded
/// options fit only an adapter attached already, exactly. Changes nothing.
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
  const auto found = checkpoint_adapter_tensors(archive);
  const auto recorded = checkpoint_options(name, archive);
  const auto& current = layer.adapter_options;
  if (recorded) {
    TORCH_CHECK(
        !current || same_computation(*current, *recorded),
        name,
        ": the layer's adapter has other options than the checkpoint's: ",
        current ? options_to_json(*current).dump() : "",
        " in the layer, ",
        options_to_json(*recorded).dump(),
        " in the checkpoint");
    if (!current) {
      plan.attach = recorded;
    }
  } else if (found.empty()) {
    return plan; // a base-layer checkpoint: the adapter keeps its values
  }
  TORCH_CHECK(
      current || recorded,
      name,
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
        name,
        ": the checkpoint has '",
        tensor.first,
        "', which the layer's adapter does not have");
  }
  TORCH_CHECK(
      found.size() == shapes.size(),
      name,
      ": the checkpoint has ",
      found.size(),
      " of the adapter's ",
      shapes.size(),
      " tensors; expected all of them, or none for a base-layer checkpoint");
  for (const auto& shape : shapes) {
    const auto& value = found.at(shape.first);
    check_checkpoint_shape(name, shape.first, value, shape.second);
    plan.values.emplace_back(shape.first, value);
  }
  return plan;
}

} // namespace detail
} // namespace styleinject
