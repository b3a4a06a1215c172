#pragma once

#include <styleinject/inject.h>
#include <styleinject/options.h>
#include <styleinject/version.h>

#include <torch/nn/module.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

// Adapter files in the safetensors format
// (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
// length, a JSON header naming each tensor's dtype, shape and byte span, then
// the tensors' bytes.

namespace styleinject {
namespace detail {
namespace safetensors {

static_assert(
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
    "safetensors files are little-endian; this host is not");

/// The largest header accepted, as the reference implementation's.
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

/// The tensors of a file, in file order, and its `__metadata__`.
struct Contents {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::map<std::string, std::string> metadata;
};

/// The safetensors name of a dtype and back; an empty name or undefined
/// optional for a dtype the format or LibTorch does not have.
inline const std::vector<std::pair<std::string, torch::ScalarType>>& dtypes() {
  static const std::vector<std::pair<std::string, torch::ScalarType>> table{
      {"F64", torch::kDouble},
      {"F32", torch::kFloat},
      {"F16", torch::kHalf},
      {"BF16", torch::kBFloat16},
      {"I64", torch::kLong},
      {"I32", torch::kInt},
      {"I16", torch::kShort},
      {"I8", torch::kChar},
      {"U8", torch::kByte},
      {"BOOL", torch::kBool}};
  return table;
}

inline std::string dtype_name(torch::ScalarType dtype) {
  for (const auto& entry : dtypes()) {
    if (entry.second == dtype) {
      return entry.first;
    }
  }
  return {};
}

/// Parses a whole safetensors file held in memory. Everything is validated
/// before any tensor is made: the header's length, its JSON (duplicate keys
/// included), every entry's fields, dtype, shape and byte span, and that
/// the spans tile the data exactly (no overlap, no gap, nothing after).
/// `context` starts every error message.
inline Contents parse(
    const uint8_t* data,
    size_t size,
    const std::string& context) {
  TORCH_CHECK(
      size >= 8,
      context,
      ": the file is truncated: expected at least 8 bytes (the header "
      "length), but it has ",
      size);
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, data, 8);
  TORCH_CHECK(
      header_bytes <= kMaxHeaderBytes,
      context,
      ": expected a header of at most ",
      kMaxHeaderBytes,
      " bytes, but the file declares ",
      header_bytes);
  TORCH_CHECK(
      header_bytes <= size - 8,
      context,
      ": the header length ",
      header_bytes,
      " runs past the end of the file (",
      size - 8,
      " bytes follow it)");
  const char* header = reinterpret_cast<const char*>(data + 8);
  const uint8_t* buffer = data + 8 + header_bytes;
  const uint64_t buffer_bytes = size - 8 - header_bytes;

  // nlohmann::json keeps the last of duplicate keys; a file whose readers
  // could disagree on a tensor is refused instead.
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  const auto on_event = [&](int,
                            nlohmann::ordered_json::parse_event_t event,
                            nlohmann::ordered_json& parsed) {
    using Event = nlohmann::ordered_json::parse_event_t;
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
  // Ordered, so that tensors come back in file order.
  const auto json = nlohmann::ordered_json::parse(
      header, header + header_bytes, on_event, /*allow_exceptions=*/false);
  TORCH_CHECK(
      !json.is_discarded(),
      context,
      ": the header is not valid JSON (",
      header_bytes,
      " bytes)");
  TORCH_CHECK(
      json.is_object(),
      context,
      ": expected the header to be a JSON object, but got a JSON ",
      json.type_name());
  TORCH_CHECK(
      duplicate.empty(),
      context,
      ": the header has the key '",
      duplicate,
      "' twice");

  struct Entry {
    std::string name;
    torch::ScalarType dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  Contents contents;
  for (const auto& item : json.items()) {
    const auto& name = item.key();
    const auto& value = item.value();
    if (name == "__metadata__") {
      TORCH_CHECK(
          value.is_object(),
          context,
          ": expected __metadata__ to be an object of strings, but got a "
          "JSON ",
          value.type_name());
      for (const auto& field : value.items()) {
        TORCH_CHECK(
            field.value().is_string(),
            context,
            ": expected __metadata__ values to be strings, but '",
            field.key(),
            "' is a JSON ",
            field.value().type_name());
        contents.metadata[field.key()] = field.value().get<std::string>();
      }
      continue;
    }
    const std::string tensor = "tensor '" + name + "'";
    TORCH_CHECK(
        value.is_object() && value.size() == 3 && value.contains("dtype") &&
            value.contains("shape") && value.contains("data_offsets"),
        context,
        ": expected ",
        tensor,
        " to be an object with dtype, shape and data_offsets, but got ",
        value.dump().substr(0, 200));
    const auto& dtype = value["dtype"];
    TORCH_CHECK(
        dtype.is_string(),
        context,
        ": expected the dtype of ",
        tensor,
        " to be a string, but got ",
        dtype.dump().substr(0, 200));
    const auto known =
        std::find_if(dtypes().begin(), dtypes().end(), [&](const auto& entry) {
          return entry.first == dtype.get_ref<const std::string&>();
        });
    TORCH_CHECK(
        known != dtypes().end(),
        context,
        ": ",
        tensor,
        " has the unknown dtype '",
        dtype.get_ref<const std::string&>().substr(0, 64),
        "'; expected one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL");
    Entry entry{name, known->second, {}, 0, 0};
    const auto& shape = value["shape"];
    TORCH_CHECK(
        shape.is_array() && shape.size() <= 64,
        context,
        ": expected the shape of ",
        tensor,
        " to be an array of at most 64 sizes, but got ",
        shape.dump().substr(0, 200));
    // Bytes the shape needs, with every product kept below 2^62.
    uint64_t bytes = torch::elementSize(entry.dtype);
    constexpr uint64_t kLimit = uint64_t{1} << 62;
    for (const auto& dim : shape) {
      TORCH_CHECK(
          dim.is_number_unsigned() && dim.get<uint64_t>() < kLimit,
          context,
          ": expected the sizes of ",
          tensor,
          " to be non-negative integers, but got ",
          shape.dump().substr(0, 200));
      const uint64_t n = dim.get<uint64_t>();
      TORCH_CHECK(
          n == 0 || bytes <= kLimit / n,
          context,
          ": the shape of ",
          tensor,
          " is too large: ",
          shape.dump().substr(0, 200));
      bytes *= n;
      entry.shape.push_back(static_cast<int64_t>(n));
    }
    const auto& offsets = value["data_offsets"];
    TORCH_CHECK(
        offsets.is_array() && offsets.size() == 2 &&
            offsets[0].is_number_unsigned() &&
            offsets[1].is_number_unsigned() &&
            offsets[0].get<uint64_t>() <= offsets[1].get<uint64_t>(),
        context,
        ": expected the data_offsets of ",
        tensor,
        " to be [begin, end] with 0 <= begin <= end, but got ",
        offsets.dump().substr(0, 200));
    entry.begin = offsets[0].get<uint64_t>();
    entry.end = offsets[1].get<uint64_t>();
    TORCH_CHECK(
        entry.end <= buffer_bytes,
        context,
        ": the data_offsets [",
        entry.begin,
        ", ",
        entry.end,
        "] of ",
        tensor,
        " run past the end of the data (",
        buffer_bytes,
        " bytes)");
    TORCH_CHECK(
        entry.end - entry.begin == bytes,
        context,
        ": ",
        tensor,
        " of dtype ",
        known->first,
        " and shape ",
        shape.dump(),
        " needs ",
        bytes,
        " bytes, but its data_offsets span ",
        entry.end - entry.begin);
    entries.push_back(std::move(entry));
  }

  // The spans, in order, must tile the data: each begins where the last
  // ended, and the last ends at the end of the file.
  std::vector<const Entry*> by_offset;
  for (const auto& entry : entries) {
    by_offset.push_back(&entry);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](auto a, auto b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t position = 0;
  for (const auto* entry : by_offset) {
    TORCH_CHECK(
        entry->begin == position,
        context,
        ": the data_offsets of tensor '",
        entry->name,
        "' begin at ",
        entry->begin,
        ", but the data before ends at ",
        position,
        "; tensors must not overlap or leave gaps");
    position = entry->end;
  }
  TORCH_CHECK(
      position == buffer_bytes,
      context,
      ": the tensors' data ends at ",
      position,
      ", but the file has ",
      buffer_bytes,
      " bytes of data");

  for (const auto& entry : entries) {
    auto tensor = torch::empty(entry.shape, entry.dtype);
    if (entry.end > entry.begin) {
      std::memcpy(
          tensor.data_ptr(), buffer + entry.begin, entry.end - entry.begin);
    }
    contents.tensors.emplace_back(entry.name, std::move(tensor));
  }
  return contents;
}

/// The bytes of a safetensors file holding `tensors` (any device; written
/// from a contiguous CPU copy) and `metadata`.
inline std::string serialize(
    const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata,
    const std::string& context) {
  nlohmann::ordered_json header;
  if (!metadata.empty()) {
    header["__metadata__"] = metadata;
  }
  std::vector<torch::Tensor> data;
  uint64_t offset = 0;
  for (const auto& item : tensors) {
    const auto name = dtype_name(item.second.scalar_type());
    TORCH_CHECK(
        !name.empty(),
        context,
        ": tensor '",
        item.first,
        "' has dtype ",
        item.second.scalar_type(),
        ", which safetensors cannot hold");
    TORCH_CHECK(
        !header.contains(item.first),
        context,
        ": two tensors are named '",
        item.first,
        "'");
    auto cpu = item.second.detach().to(torch::kCPU).contiguous();
    const uint64_t bytes = cpu.numel() * cpu.element_size();
    header[item.first] = {
        {"dtype", name},
        {"shape", cpu.sizes().vec()},
        {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(std::move(cpu));
  }
  auto text = header.dump();
  // Pad with spaces so that the data starts 8-byte aligned, as the
  // reference implementation does.
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string bytes(8, '\0');
  const uint64_t length = text.size();
  std::memcpy(&bytes[0], &length, 8);
  bytes += text;
  for (const auto& tensor : data) {
    bytes.append(
        static_cast<const char*>(tensor.data_ptr()),
        tensor.numel() * tensor.element_size());
  }
  return bytes;
}

/// The whole file at `path`.
inline std::string read_file(
    const std::string& path,
    const std::string& context) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(
      file.good(),
      context,
      ": cannot open '",
      path,
      "' for reading: ",
      std::strerror(errno));
  std::ostringstream bytes;
  bytes << file.rdbuf();
  TORCH_CHECK(
      !file.bad(),
      context,
      ": reading '",
      path,
      "' failed: ",
      std::strerror(errno));
  return bytes.str();
}

/// Writes `bytes` to `path` atomically: into a new file beside it, flushed
/// to the disk, then renamed over `path`. A failure at any step removes the
/// new file and leaves whatever was at `path` as it was.
inline void write_file_atomically(
    const std::string& path,
    const std::string& bytes,
    const std::string& context) {
  static std::atomic<uint64_t> counter{0};
  const std::string temporary = path + ".tmp." + std::to_string(::getpid()) +
      "." + std::to_string(counter++);
  const int fd =
      ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  TORCH_CHECK(
      fd >= 0,
      context,
      ": cannot create '",
      temporary,
      "' to write '",
      path,
      "': ",
      std::strerror(errno));
  bool open = true;
  const auto fail = [&](const char* step) {
    const int error = errno;
    if (open) {
      ::close(fd);
    }
    ::unlink(temporary.c_str());
    TORCH_CHECK(
        false,
        context,
        ": ",
        step,
        " '",
        path,
        "' failed: ",
        std::strerror(error),
        "; the file is as it was");
  };
  size_t written = 0;
  while (written < bytes.size()) {
    const auto n = ::write(fd, bytes.data() + written, bytes.size() - written);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      fail("writing");
    }
    written += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    fail("flushing");
  }
  open = false;
  if (::close(fd) != 0) {
    fail("closing");
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    fail("renaming the new file over");
  }
  // Make the rename itself durable; a failure here loses nothing.
  const auto slash = path.find_last_of('/');
  const std::string folder =
      slash == std::string::npos ? "." : path.substr(0, slash + 1);
  const int dir = ::open(folder.c_str(), O_RDONLY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

} // namespace safetensors

/// The metadata key that holds each adapted layer's options, as JSON.
inline constexpr const char* kLayersKey = "styleinject.layers";

/// One layer's record in an adapter file's metadata.
struct LayerRecord {
  std::string type;
  StyleInjectOptions options = StyleInjectOptions(1);
};

inline nlohmann::ordered_json to_json(
    const std::string& type,
    const StyleInjectOptions& options) {
  nlohmann::ordered_json record{
      {"type", type},
      {"rank", options.rank()},
      {"branches", options.branches()},
      {"alpha", nullptr},
      {"dropout", options.dropout()},
      {"rslora", options.rslora()},
      {"temperature", options.temperature()},
      {"router", options.router()},
      {"gate", options.gate()}};
  if (options.alpha()) {
    record["alpha"] = *options.alpha();
  }
  return record;
}

/// Parses the layers' records of an adapter file's metadata; every field is
/// required, with its JSON type, and the options must be valid.
inline std::map<std::string, LayerRecord> parse_layer_records(
    const std::string& text,
    const std::string& context) {
  const auto json =
      nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK(
      json.is_object(),
      context,
      ": expected the metadata '",
      kLayersKey,
      "' to be a JSON object of layers, but it is not");
  std::map<std::string, LayerRecord> records;
  for (const auto& item : json.items()) {
    const std::string where = context + ": layer '" + item.key() + "'";
    const auto& r = item.value();
    const auto field = [&](const char* key,
                           bool (nlohmann::json::*is)() const,
                           const char* expected) -> const nlohmann::json& {
      TORCH_CHECK(
          r.is_object() && r.contains(key) && (r[key].*is)(),
          where,
          ": expected '",
          key,
          "' to be ",
          expected,
          " in the file's metadata");
      return r[key];
    };
    LayerRecord record;
    record.type = field("type", &nlohmann::json::is_string, "a string")
                      .get<std::string>();
    TORCH_CHECK(
        record.type == "Linear" || record.type == "Conv2d",
        where,
        ": expected type Linear or Conv2d, but got '",
        record.type.substr(0, 64),
        "'");
    const auto integer = [&](const char* key) {
      const auto& value =
          field(key, &nlohmann::json::is_number_integer, "an integer");
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
      return field(key, &nlohmann::json::is_number, "a number").get<double>();
    };
    const auto boolean = [&](const char* key) {
      return field(key, &nlohmann::json::is_boolean, "true or false")
          .get<bool>();
    };
    record.options = StyleInjectOptions(integer("rank"))
                         .branches(integer("branches"))
                         .dropout(number("dropout"))
                         .rslora(boolean("rslora"))
                         .temperature(number("temperature"))
                         .router(boolean("router"))
                         .gate(boolean("gate"));
    const auto& alpha = r.contains("alpha") ? r["alpha"] : nlohmann::json();
    TORCH_CHECK(
        alpha.is_null() || alpha.is_number(),
        where,
        ": expected 'alpha' to be a number or null in the file's metadata");
    if (alpha.is_number()) {
      record.options.alpha(alpha.get<double>());
    }
    check_options(record.options, where);
    records.emplace(item.key(), std::move(record));
  }
  return records;
}

/// Whether two adapters have the same shapes and compute the same function.
inline bool same_adapter(
    const StyleInjectOptions& a,
    const StyleInjectOptions& b) {
  return a.rank() == b.rank() && a.branches() == b.branches() &&
      a.alpha() == b.alpha() && a.rslora() == b.rslora() &&
      a.temperature() == b.temperature() && a.router() == b.router() &&
      a.gate() == b.gate() && a.dropout() == b.dropout();
}

} // namespace detail

/// Saves the adapters of `model`, and nothing else, to a safetensors file at
/// `path`: each adapter tensor under its qualified parameter name (e.g.
/// "attn.to_q.lora_A"), in its own dtype, and in the file's `__metadata__`
/// every adapted layer's type and options ("styleinject.layers", JSON) and
/// the library version ("styleinject.version"). The write is atomic: if it
/// fails, whatever was at `path` stays as it was.
///
/// Example:
/// ```
/// styleinject::save_adapters(*unet, "style.safetensors");
/// ```
inline void save_adapters(
    const torch::nn::Module& model,
    const std::string& path) {
  const std::string context = "styleinject::save_adapters: '" + path + "'";
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  nlohmann::ordered_json layers = nlohmann::ordered_json::object();
  detail::for_each_adapted(model, [&](const std::string& name, auto& layer) {
    using Layer = std::decay_t<decltype(layer)>;
    layers[name] = detail::to_json(Layer::Traits::type, *layer.options);
    for (const auto& parameter : layer.named_parameters()) {
      if (parameter.key() != "weight" && parameter.key() != "bias") {
        tensors.emplace_back(
            detail::qualified(name, parameter.key()), parameter.value());
      }
    }
  });
  TORCH_CHECK_VALUE(
      !tensors.empty(),
      context,
      ": the model has no adapters to save; attach them with "
      "styleinject::inject()");
  const std::map<std::string, std::string> metadata{
      {"format", "styleinject"},
      {"styleinject.version", version},
      {detail::kLayersKey, layers.dump()}};
  detail::safetensors::write_file_atomically(
      path,
      detail::safetensors::serialize(tensors, metadata, context),
      context);
}

/// Loads the adapters in the safetensors file at `path` into `model`. Where
/// a layer of the file has no adapter in the model, one is attached with the
/// file's options (the model's other parameters are then frozen, as
/// `inject` does); where it has one, its options must equal the file's.
/// The file must hold every adapter the model has, and nothing else; values
/// are converted to each layer's dtype and device. A file without
/// StyleInject metadata (e.g. written by another tool) loads into a model
/// whose adapters are attached already.
///
/// Everything is read and validated before the model changes: a file that
/// is malformed or does not fit leaves the model exactly as it was.
///
/// Example:
/// ```
/// UNet fresh;  // declares StyleInject layers, no adapters yet
/// torch::load(fresh, "base.pt");
/// styleinject::load_adapters(*fresh, "style.safetensors");
/// ```
inline void load_adapters(torch::nn::Module& model, const std::string& path) {
  const std::string context = "styleinject::load_adapters: '" + path + "'";
  const auto bytes = detail::safetensors::read_file(path, context);
  auto contents = detail::safetensors::parse(
      reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), context);

  // The model's layers, and what the file says each should carry.
  auto candidates = detail::candidates(model);
  std::map<std::string, detail::Candidate*> by_name;
  for (auto& candidate : candidates) {
    by_name[candidate.name] = &candidate;
  }
  std::map<std::string, detail::LayerRecord> records;
  const auto layers = contents.metadata.find(detail::kLayersKey);
  if (layers != contents.metadata.end()) {
    records = detail::parse_layer_records(layers->second, context);
  }
  const bool described = layers != contents.metadata.end();

  // Expected tensors: name -> (shape, parameter to fill, or null for a layer
  // that gets its adapter from the file).
  std::map<std::string, std::vector<int64_t>> expected;
  std::set<std::string> file_layers;
  for (const auto& record : records) {
    const auto found = by_name.find(record.first);
    TORCH_CHECK(
        found != by_name.end(),
        context,
        ": the file has an adapter for layer '",
        record.first,
        "', but the model has no Linear or Conv2d layer of that name");
    const auto& candidate = *found->second;
    TORCH_CHECK(
        candidate.type == record.second.type,
        context,
        ": layer '",
        record.first,
        "' is a ",
        candidate.type,
        " in the model, but a ",
        record.second.type,
        " in the file");
    TORCH_CHECK(
        candidate.refusal.empty(),
        context,
        ": layer '",
        record.first,
        "' cannot carry an adapter: ",
        candidate.refusal);
    TORCH_CHECK(
        !candidate.options ||
            detail::same_adapter(*candidate.options, record.second.options),
        context,
        ": layer '",
        record.first,
        "' has an adapter with other options than the file's: ",
        candidate.options
            ? detail::to_json(candidate.type, *candidate.options).dump()
            : "",
        " in the model, ",
        detail::to_json(record.second.type, record.second.options).dump(),
        " in the file");
    for (const auto& shape : candidate.adapter_shapes(record.second.options)) {
      expected[detail::qualified(record.first, shape.first)] = shape.second;
    }
    file_layers.insert(record.first);
  }
  for (const auto& candidate : candidates) {
    if (!candidate.options) {
      continue;
    }
    if (!described) {
      for (const auto& shape : candidate.adapter_shapes(*candidate.options)) {
        expected[detail::qualified(candidate.name, shape.first)] = shape.second;
      }
    } else {
      TORCH_CHECK(
          file_layers.count(candidate.name),
          context,
          ": the model's layer '",
          candidate.name,
          "' has an adapter, but the file has none for it");
    }
  }
  TORCH_CHECK(
      described || !expected.empty(),
      context,
      ": the file has no StyleInject metadata ('",
      detail::kLayersKey,
      "'), so it can only fill adapters that the model has already, and the "
      "model has none; attach them first with styleinject::inject()");

  std::set<std::string> seen;
  for (const auto& item : contents.tensors) {
    const auto shape = expected.find(item.first);
    TORCH_CHECK(
        shape != expected.end(),
        context,
        ": the file has the tensor '",
        item.first,
        "', which is not a parameter of the model's adapters");
    TORCH_CHECK(
        item.second.sizes() == torch::IntArrayRef(shape->second),
        context,
        ": expected '",
        item.first,
        "' of shape ",
        torch::IntArrayRef(shape->second),
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
  }
  for (const auto& shape : expected) {
    TORCH_CHECK(
        seen.count(shape.first),
        context,
        ": the file has no tensor '",
        shape.first,
        "'");
  }

  // Everything fits: attach what the file adds, then copy the values.
  bool attached = false;
  for (const auto& record : records) {
    auto& candidate = *by_name.at(record.first);
    if (!candidate.options) {
      candidate.attach(record.second.options);
      attached = true;
    }
  }
  if (attached) {
    detail::freeze_all_but_adapters(model);
  }
  auto parameters = model.named_parameters();
  torch::NoGradGuard no_grad;
  for (const auto& item : contents.tensors) {
    parameters[item.first].copy_(item.second);
  }
}

} // namespace styleinject
