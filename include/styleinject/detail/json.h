#pragma once

// JSON for adapter files and checkpoints: a parser that refuses what readers
// could disagree on, and an adapter's options as a JSON record.

#include <styleinject/options.h>

#include <torch/types.h>

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace styleinject {
namespace detail {

/// How deep JSON from a file may nest: our records need 3 levels, PEFT's
/// config 2; nlohmann::json before 3.10 frees a value recursively, so a
/// deeper one could exhaust the stack.
inline constexpr int kJsonNesting = 64;

/// Parses the JSON text [begin, end). Refuses a syntax error, nesting
/// deeper than kJsonNesting, and a key that appears twice in an object at
/// any depth: nlohmann::json keeps the last of them and other readers the
/// first, so two tools could read two different files. `what` names the
/// text in messages, after `context`.
inline nlohmann::ordered_json parse_json(
    const char* begin,
    const char* end,
    const std::string& context,
    const std::string& what) {
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  const auto on_event = [&](int depth,
                            nlohmann::ordered_json::parse_event_t event,
                            nlohmann::ordered_json& parsed) {
    using Event = nlohmann::ordered_json::parse_event_t;
    TORCH_CHECK(
        depth < kJsonNesting,
        context,
        ": ",
        what,
        " nests deeper than ",
        kJsonNesting,
        " levels");
    if (event == Event::object_start) {
      open_objects.emplace_back();
    } else if (event == Event::object_end && !open_objects.empty()) {
      open_objects.pop_back();
    } else if (event == Event::key && !open_objects.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second && duplicate.empty()) {
        duplicate = key;
      }
    }
    return true;
  };
  auto json = nlohmann::ordered_json::parse(
      begin, end, on_event, /*allow_exceptions=*/false);
  TORCH_CHECK(
      !json.is_discarded(),
      context,
      ": ",
      what,
      " is not valid JSON (",
      end - begin,
      " bytes)");
  TORCH_CHECK(
      duplicate.empty(),
      context,
      ": ",
      what,
      " has the key '",
      duplicate,
      "' twice");
  return json;
}

/// The whole text file at `path`, of at most `limit` bytes (a PEFT config
/// is a few KB, one with a key per module of SDXL a few hundred).
inline std::string read_text(
    const std::string& path,
    const std::string& context,
    std::streamoff limit = 16 << 20) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  TORCH_CHECK(file, context, ": cannot open '", path, "'");
  const auto size = static_cast<std::streamoff>(file.tellg());
  TORCH_CHECK_VALUE(
      size <= limit,
      context,
      ": expected '",
      path,
      "' to hold at most ",
      limit,
      " bytes, but it holds ",
      size);
  file.seekg(0);
  return {
      std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

/// A gate mode as records keep it: true (kScale) and false (kOff), as
/// before there were variants, so that such files still load in older
/// versions; the variants by name ("adain", "residual").
inline nlohmann::ordered_json gate_record(GateMode mode) {
  if (mode == GateMode::kScale || mode == GateMode::kOff) {
    return mode == GateMode::kScale;
  }
  return gate_mode_name(mode);
}

/// The gate mode of a record's 'gate': true, false, or a mode's name.
inline GateMode gate_from_record(
    const nlohmann::ordered_json& record,
    const std::string& where,
    const std::string& source) {
  const auto& gate =
      record.contains("gate") ? record["gate"] : nlohmann::ordered_json();
  c10::optional<GateMode> found;
  if (gate.is_boolean()) {
    found = gate.get<bool>() ? GateMode::kScale : GateMode::kOff;
  }
  for (const auto mode :
       {GateMode::kOff,
        GateMode::kScale,
        GateMode::kAdain,
        GateMode::kResidual}) {
    if (gate.is_string() && gate.get<std::string>() == gate_mode_name(mode)) {
      found = mode;
    }
  }
  TORCH_CHECK(
      found.has_value(),
      where,
      ": expected 'gate' to be true, false, \"off\", \"scale\", \"adain\" "
      "or \"residual\" in ",
      source,
      ", but got ",
      gate.dump());
  return *found;
}

/// An adapter's options as a JSON record (what files and checkpoints keep):
/// rank, branches, alpha (null: the rank), dropout, rslora, temperature,
/// router, gate, dtype (null: the base's). The compute path is a choice of
/// the machine that runs it, and is not recorded.
inline nlohmann::ordered_json options_to_json(
    const StyleInjectOptions& options) {
  nlohmann::ordered_json record{
      {"rank", options.rank()},
      {"branches", options.branches()},
      {"alpha", nullptr},
      {"dropout", options.dropout()},
      {"rslora", options.rslora()},
      {"temperature", options.temperature()},
      {"router", options.router()},
      {"gate", gate_record(options.gate())},
      {"dtype", nullptr}};
  if (options.alpha()) {
    record["alpha"] = *options.alpha();
  }
  if (options.dtype()) {
    record["dtype"] = adapter_dtype_name(*options.dtype());
  }
  return record;
}

/// Options from their JSON record (see options_to_json). Every field is
/// required with its JSON type, except dtype (absent before 0.3), and the
/// options must be valid; `where` starts each message, `source` says where
/// the record came from (e.g. "the file's metadata").
inline StyleInjectOptions options_from_json(
    const nlohmann::ordered_json& record,
    const std::string& where,
    const std::string& source) {
  const auto field =
      [&](const char* key,
          bool (nlohmann::ordered_json::*is)() const,
          const char* expected) -> const nlohmann::ordered_json& {
    TORCH_CHECK(
        record.is_object() && record.contains(key) && (record[key].*is)(),
        where,
        ": expected '",
        key,
        "' to be ",
        expected,
        " in ",
        source);
    return record[key];
  };
  const auto integer = [&](const char* key) {
    const auto& value =
        field(key, &nlohmann::ordered_json::is_number_integer, "an integer");
    TORCH_CHECK(
        value.is_number_unsigned() && value.get<uint64_t>() < (1u << 30),
        where,
        ": expected '",
        key,
        "' to be a non-negative integer below 2^30, but got ",
        value.dump());
    return value.get<int64_t>();
  };
  const auto number = [&](const char* key) {
    return field(key, &nlohmann::ordered_json::is_number, "a number")
        .get<double>();
  };
  const auto boolean = [&](const char* key) {
    return field(key, &nlohmann::ordered_json::is_boolean, "true or false")
        .get<bool>();
  };
  auto options = StyleInjectOptions(integer("rank"))
                     .branches(integer("branches"))
                     .dropout(number("dropout"))
                     .rslora(boolean("rslora"))
                     .temperature(number("temperature"))
                     .router(boolean("router"))
                     .gate(gate_from_record(record, where, source));
  const auto& alpha =
      record.contains("alpha") ? record["alpha"] : nlohmann::ordered_json();
  TORCH_CHECK(
      alpha.is_null() || alpha.is_number(),
      where,
      ": expected 'alpha' to be a number or null in ",
      source);
  if (alpha.is_number()) {
    options.alpha(alpha.get<double>());
  }
  const auto& dtype =
      record.contains("dtype") ? record["dtype"] : nlohmann::ordered_json();
  if (!dtype.is_null()) {
    const auto* known =
        dtype.is_string() ? &dtype.get_ref<const std::string&>() : nullptr;
    for (const auto& entry : adapter_dtypes()) {
      if (known && *known == entry.first) {
        options.dtype(entry.second);
      }
    }
    TORCH_CHECK(
        options.dtype().has_value(),
        where,
        ": expected 'dtype' to be null, \"float32\", \"float64\", "
        "\"bfloat16\" or \"float16\" in ",
        source,
        ", but got ",
        dtype.dump().substr(0, 64));
  }
  check_options(options, where);
  return options;
}

} // namespace detail
} // namespace styleinject
