#pragma once

// safetensors files (https://huggingface.co/docs/safetensors): an 8-byte
// little-endian header length, a JSON header naming each tensor's dtype,
// shape and byte span, then the tensors' bytes. The public part reads any
// such file by mapping it, writes one atomically, and loads or saves a
// module's weights by qualified name; detail::safetensors holds the
// bounds-checked parser for hostile files that everything reads through.

#include <styleinject/detail/json.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace styleinject {

/// Named tensors in file order, and a file's `__metadata__`: what
/// load_safetensors reads and save_safetensors writes.
struct Safetensors {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::map<std::string, std::string> metadata;
};

namespace detail {
namespace safetensors {

static_assert(
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
    "safetensors files are little-endian; this host is not");

/// The largest header accepted, as the reference implementation's.
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

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

/// One tensor's entry in a safetensors header: where its bytes are.
struct Entry {
  std::string name;
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

/// The header of a safetensors file held in memory, parsed and checked as
/// JSON: its length, that it fits the file, valid JSON without duplicate
/// keys, an object. Sets `data` and `data_bytes` to the tensors' bytes.
inline nlohmann::ordered_json parse_header(
    const uint8_t* file,
    size_t size,
    const std::string& context,
    const uint8_t*& data,
    uint64_t& data_bytes) {
  TORCH_CHECK(
      size >= 8,
      context,
      ": the file is truncated: expected at least 8 bytes (the header "
      "length), but it has ",
      size);
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, file, 8);
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
  const char* header = reinterpret_cast<const char*>(file + 8);
  // Ordered, so that tensors come back in file order.
  auto json = parse_json(header, header + header_bytes, context, "the header");
  TORCH_CHECK(
      json.is_object(),
      context,
      ": expected the header to be a JSON object, but got a JSON ",
      json.type_name());
  data = file + 8 + header_bytes;
  data_bytes = size - 8 - header_bytes;
  return json;
}

/// The `__metadata__` of a header: an object of strings.
inline std::map<std::string, std::string> parse_metadata(
    const nlohmann::ordered_json& value,
    const std::string& context) {
  TORCH_CHECK(
      value.is_object(),
      context,
      ": expected __metadata__ to be an object of strings, but got a JSON ",
      value.type_name());
  std::map<std::string, std::string> metadata;
  for (const auto& field : value.items()) {
    TORCH_CHECK(
        field.value().is_string(),
        context,
        ": expected __metadata__ values to be strings, but '",
        field.key(),
        "' is a JSON ",
        field.value().type_name());
    metadata[field.key()] = field.value().get<std::string>();
  }
  return metadata;
}

/// The bytes a tensor of `dtype` and the JSON `shape` needs, checked: every
/// size a non-negative integer, and the product of the sizes (zeros counted
/// as ones, so that a zero cannot hide an overflow of the others) below
/// 2^62.
inline uint64_t parse_shape(
    const nlohmann::ordered_json& shape,
    torch::ScalarType dtype,
    const std::string& tensor,
    const std::string& context,
    std::vector<int64_t>& sizes) {
  TORCH_CHECK(
      shape.is_array() && shape.size() <= 64,
      context,
      ": expected the shape of ",
      tensor,
      " to be an array of at most 64 sizes, but got ",
      shape.dump().substr(0, 200));
  constexpr uint64_t kLimit = uint64_t{1} << 62;
  uint64_t bytes = torch::elementSize(dtype), bound = bytes;
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
        bound <= kLimit / std::max<uint64_t>(n, 1),
        context,
        ": the shape of ",
        tensor,
        " is too large: ",
        shape.dump().substr(0, 200));
    bound *= std::max<uint64_t>(n, 1);
    bytes *= n;
    sizes.push_back(static_cast<int64_t>(n));
  }
  return bytes;
}

/// One tensor's entry of the header, checked: its fields, dtype, shape, and
/// a byte span that fits `data_bytes` and matches shape × dtype.
inline Entry parse_entry(
    const std::string& name,
    const nlohmann::ordered_json& value,
    uint64_t data_bytes,
    const std::string& context) {
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
  const uint64_t bytes =
      parse_shape(value["shape"], entry.dtype, tensor, context, entry.shape);
  const auto& offsets = value["data_offsets"];
  TORCH_CHECK(
      offsets.is_array() && offsets.size() == 2 &&
          offsets[0].is_number_unsigned() && offsets[1].is_number_unsigned() &&
          offsets[0].get<uint64_t>() <= offsets[1].get<uint64_t>(),
      context,
      ": expected the data_offsets of ",
      tensor,
      " to be [begin, end] with 0 <= begin <= end, but got ",
      offsets.dump().substr(0, 200));
  entry.begin = offsets[0].get<uint64_t>();
  entry.end = offsets[1].get<uint64_t>();
  TORCH_CHECK(
      entry.end <= data_bytes,
      context,
      ": the data_offsets [",
      entry.begin,
      ", ",
      entry.end,
      "] of ",
      tensor,
      " run past the end of the data (",
      data_bytes,
      " bytes)");
  TORCH_CHECK(
      entry.end - entry.begin == bytes,
      context,
      ": ",
      tensor,
      " of dtype ",
      known->first,
      " and shape ",
      value["shape"].dump(),
      " needs ",
      bytes,
      " bytes, but its data_offsets span ",
      entry.end - entry.begin);
  return entry;
}

/// Checks that the entries' spans, in order, tile the data: each begins
/// where the last ended, and the last ends at the end of the file.
inline void check_tiling(
    const std::vector<Entry>& entries,
    uint64_t data_bytes,
    const std::string& context) {
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
      position == data_bytes,
      context,
      ": the tensors' data ends at ",
      position,
      ", but the file has ",
      data_bytes,
      " bytes of data");
}

/// Parses a whole safetensors file held in memory: the header, then each
/// entry, then the tiling of the data. Everything is validated before any
/// tensor is made. Without an `owner`, each tensor is a copy; with one (what
/// keeps `file` alive), a tensor whose bytes are aligned for its dtype
/// aliases them and holds `owner`. `context` starts every error message.
inline Safetensors parse(
    const uint8_t* file,
    size_t size,
    const std::string& context,
    const std::shared_ptr<const void>& owner = nullptr) {
  const uint8_t* data = nullptr;
  uint64_t data_bytes = 0;
  const auto header = parse_header(file, size, context, data, data_bytes);
  Safetensors contents;
  std::vector<Entry> entries;
  for (const auto& item : header.items()) {
    if (item.key() == "__metadata__") {
      contents.metadata = parse_metadata(item.value(), context);
    } else {
      entries.push_back(
          parse_entry(item.key(), item.value(), data_bytes, context));
    }
  }
  check_tiling(entries, data_bytes, context);
  for (const auto& entry : entries) {
    auto* bytes = const_cast<uint8_t*>(data + entry.begin);
    const auto alignment = torch::elementSize(entry.dtype);
    torch::Tensor tensor;
    if (owner && reinterpret_cast<uintptr_t>(bytes) % alignment == 0) {
      tensor = torch::from_blob(
          bytes, entry.shape, [owner](void*) {}, entry.dtype);
    } else {
      tensor = torch::empty(entry.shape, entry.dtype);
      if (entry.end > entry.begin) {
        std::memcpy(tensor.data_ptr(), bytes, entry.end - entry.begin);
      }
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

/// A file mapped into memory copy-on-write: its pages are read on first
/// use, and writes to them stay private to this process.
class Mapping {
 public:
  Mapping(const std::string& path, const std::string& context) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    TORCH_CHECK(
        fd >= 0,
        context,
        ": cannot open '",
        path,
        "' for reading: ",
        std::strerror(errno));
    struct stat status {};
    const bool regular = ::fstat(fd, &status) == 0 && S_ISREG(status.st_mode);
    size_ = regular ? static_cast<size_t>(status.st_size) : 0;
    if (size_ > 0) {
      address_ =
          ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    }
    const int error = errno;
    ::close(fd);
    TORCH_CHECK(regular, context, ": '", path, "' is not a regular file");
    TORCH_CHECK(
        size_ == 0 || address_ != MAP_FAILED,
        context,
        ": cannot map '",
        path,
        "' (",
        size_,
        " bytes) into memory: ",
        std::strerror(error));
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (size_ > 0 && address_ != MAP_FAILED) {
      ::munmap(address_, size_);
    }
  }
  const uint8_t* data() const {
    return size_ > 0 ? static_cast<const uint8_t*>(address_) : nullptr;
  }
  size_t size() const {
    return size_;
  }

 private:
  void* address_ = MAP_FAILED;
  size_t size_ = 0;
};

/// The safetensors file at `path`, mapped and parsed; its tensors alias
/// the mapping (see parse), which lives as long as any of them.
inline Safetensors read_mapped(
    const std::string& path,
    const std::string& context) {
  const auto mapping = std::make_shared<const Mapping>(path, context);
  return parse(mapping->data(), mapping->size(), context, mapping);
}

/// Creates a new file beside `path` with a random name,
/// `<path>.tmp.<16 hex digits>`, and returns its descriptor (or -1 with errno
/// set) and its name. A name that exists already, say one that a crashed
/// writer left, is never reused: another is drawn.
inline int create_temporary(const std::string& path, std::string& name) {
  thread_local std::mt19937_64 random(
      (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}());
  for (int attempt = 0; attempt < 100; ++attempt) {
    char suffix[17];
    std::snprintf(
        suffix,
        sizeof suffix,
        "%016llx",
        static_cast<unsigned long long>(random()));
    name = path + ".tmp." + suffix;
    const int fd =
        ::open(name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0 || errno != EEXIST) {
      return fd;
    }
  }
  return -1;
}

/// Writes `bytes` to `path` atomically: into a new file beside it, flushed
/// to the disk, then renamed over `path`. A failure at any step removes the
/// new file and leaves whatever was at `path` as it was.
inline void write_file_atomically(
    const std::string& path,
    const std::string& bytes,
    const std::string& context) {
  std::string temporary;
  const int fd = create_temporary(path, temporary);
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

/// Writes `tensors` and `metadata` as a safetensors file at `path`,
/// atomically (see write_file_atomically).
inline void write(
    const std::string& path,
    const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata,
    const std::string& context) {
  write_file_atomically(path, serialize(tensors, metadata, context), context);
}

} // namespace safetensors
} // namespace detail

/// Reads the safetensors file at `path`: every tensor (on the CPU, in the
/// file's dtype) and the `__metadata__`. The file is mapped, not read: the
/// tensors alias its pages, which the kernel reads on first use, so a
/// multi-GB checkpoint loaded into a model costs one copy, the model's.
/// Writing to a tensor changes this process's copy only, never the file.
/// Do not shrink or rewrite the file in place while its tensors live
/// (save_safetensors replaces a file by renaming, which is safe). A tensor
/// whose bytes are not aligned for its dtype is copied instead.
///
/// A malformed file is an error naming what was expected and what it has.
inline Safetensors load_safetensors(const std::string& path) {
  return detail::safetensors::read_mapped(
      path, "styleinject::load_safetensors: '" + path + "'");
}

/// Writes `tensors` (any device; float64/32/16, bfloat16, int64/32/16/8,
/// uint8 or bool) and `metadata` to a safetensors file at `path`. The write
/// is atomic: if it fails, whatever was at `path` stays as it was.
inline void save_safetensors(
    const std::string& path,
    const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata = {}) {
  detail::safetensors::write(
      path, tensors, metadata, "styleinject::save_safetensors: '" + path + "'");
}

/// Names on one side to names on the other (e.g. a file's to a module's).
using NameMap = std::map<std::string, std::string>;

/// Options for load_weights.
struct LoadWeightsOptions {
  /// Every parameter and buffer of the module must be in the file, and
  /// every tensor of the file must be one of them (PyTorch's
  /// `load_state_dict(strict=True)`).
  TORCH_ARG(bool, strict) = true;
  /// The file's tensor names to the module's qualified names, where they
  /// differ; a name not listed is the same on both sides.
  TORCH_ARG(NameMap, rename) = {};
  /// Where a tensor of the file has its module tensor's dtype and device
  /// (the CPU), the module's tensor takes the file's memory instead of a
  /// copy, as PyTorch's `load_state_dict(assign=True)` does: loading copies
  /// nothing, and pages are read from the file on first use. The mapping is
  /// copy-on-write, so training changes the tensors in memory, never the
  /// file; the file must not be truncated in place while the module lives
  /// (an atomic replace, as save_weights does, is safe). Default: false
  TORCH_ARG(bool, assign) = false;
};

/// What load_weights did, each list sorted: the module's names it set, the
/// module's names the file lacks, and the file's names that fit nothing in
/// the module; and the file's `__metadata__`.
struct LoadWeightsReport {
  std::vector<std::string> loaded, missing, unexpected;
  std::map<std::string, std::string> metadata;
};

namespace detail {
/// The parameters and then the buffers of `module`, by qualified name.
inline torch::OrderedDict<std::string, torch::Tensor> named_weights(
    const torch::nn::Module& module) {
  auto weights = module.named_parameters();
  for (const auto& buffer : module.named_buffers()) {
    weights.insert(buffer.key(), buffer.value());
  }
  return weights;
}

/// Whether `path` names a sharded checkpoint's index, as Hugging Face's
/// libraries write it beside the shards (`model.safetensors.index.json`,
/// `diffusion_pytorch_model.safetensors.index.json`).
inline bool is_shard_index(const std::string& path) {
  const std::string suffix = ".index.json";
  return path.size() >= suffix.size() &&
      path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// The shard file names of an index's `weight_map` (tensor name: file
/// name), each with the tensors the index puts in it. A shard lies beside
/// the index: a name with a '/' or a "." or ".." is refused.
inline std::map<std::string, std::set<std::string>> shards_of(
    const nlohmann::ordered_json& index,
    const std::string& context) {
  const auto found = index.is_object() ? index.find("weight_map") : index.end();
  std::string got = std::string("a JSON ") + index.type_name();
  if (index.is_object()) {
    got = found == index.end()
        ? "no \"weight_map\""
        : "\"weight_map\": " + found->dump().substr(0, 80);
  }
  TORCH_CHECK(
      found != index.end() && found->is_object() && !found->empty(),
      context,
      ": expected a JSON object with a non-empty object \"weight_map\" "
      "(tensor name: shard file), but got ",
      got);
  std::map<std::string, std::set<std::string>> shards;
  for (const auto& [name, shard] : found->items()) {
    const auto file = shard.is_string() ? shard.get<std::string>() : "";
    TORCH_CHECK(
        !file.empty() && file != "." && file != ".." &&
            file.find('/') == std::string::npos,
        context,
        ": expected the name of a file beside the index for tensor '",
        name,
        "', but got ",
        shard.dump());
    shards[file].insert(name);
  }
  return shards;
}

/// The tensors of the shards that the index at `path` lists, each shard
/// holding exactly the tensors the index puts in it (a shard of another
/// save is refused, not mixed in), and the index's `metadata`, values
/// that are not strings as JSON text.
inline Safetensors read_shards(
    const std::string& path,
    const std::string& context) {
  const auto text = read_text(path, context);
  const auto index =
      parse_json(text.data(), text.data() + text.size(), context, "the index");
  const auto folder = path.substr(0, path.rfind('/') + 1);
  Safetensors all;
  for (auto& [file, listed] : shards_of(index, context)) {
    const auto shard = safetensors::read_mapped(
        folder + file, context + ": shard '" + file + "'");
    for (const auto& [name, tensor] : shard.tensors) {
      TORCH_CHECK(
          listed.erase(name) == 1,
          context,
          ": shard '",
          file,
          "' holds tensor '",
          name,
          "', which the index does not put there");
      all.tensors.emplace_back(name, tensor);
    }
    TORCH_CHECK(
        listed.empty(),
        context,
        ": the index puts tensor '",
        listed.empty() ? "" : *listed.begin(),
        "' in shard '",
        file,
        "', which does not hold it");
  }
  if (index.contains("metadata") && index["metadata"].is_object()) {
    for (const auto& [key, value] : index["metadata"].items()) {
      all.metadata[key] =
          value.is_string() ? value.get<std::string>() : value.dump();
    }
  }
  return all;
}

/// "a, b, c and 4 more": a list short enough for an error message.
inline std::string some_names(const std::vector<std::string>& names) {
  std::string text;
  for (size_t i = 0; i < names.size() && i < 5; ++i) {
    text += (i > 0 ? ", '" : "'") + names[i] + "'";
  }
  if (names.size() > 5) {
    text += " and " + std::to_string(names.size() - 5) + " more";
  }
  return names.empty() ? "none" : text;
}
} // namespace detail

/// Loads the parameters and buffers of `module`, by the qualified names
/// that named_parameters() and named_buffers() give, from the safetensors
/// file at `path` (a mapped read: see load_safetensors), or from the
/// shards of a sharded checkpoint where `path` is its index (a name ending
/// in `.index.json`, as diffusers' and transformers' `save_pretrained`
/// write it); the report's metadata is then the index's. Values are
/// converted to each tensor's dtype and device. A name that both have must
/// have one shape, strict or not; in strict mode a missing or unexpected
/// name is an error that lists them. Everything is checked before anything
/// changes: an error leaves the module as it was.
///
/// Example:
/// ```
/// UNet unet;
/// styleinject::load_weights(*unet, "unet.safetensors");
/// ```
inline LoadWeightsReport load_weights(
    torch::nn::Module& module,
    const std::string& path,
    const LoadWeightsOptions& options = {}) {
  const std::string context = "styleinject::load_weights: '" + path + "'";
  const auto contents = detail::is_shard_index(path)
      ? detail::read_shards(path, context)
      : detail::safetensors::read_mapped(path, context);
  auto targets = detail::named_weights(module);
  LoadWeightsReport report;
  report.metadata = contents.metadata;
  std::map<std::string, torch::Tensor> values; // by the module's names
  for (const auto& [file_name, tensor] : contents.tensors) {
    const auto renamed = options.rename().find(file_name);
    const auto& name =
        renamed == options.rename().end() ? file_name : renamed->second;
    const auto* target = targets.find(name);
    if (target == nullptr) {
      report.unexpected.push_back(file_name);
      continue;
    }
    TORCH_CHECK(
        target->sizes() == tensor.sizes(),
        context,
        ": tensor '",
        file_name,
        "' has shape ",
        tensor.sizes(),
        ", but the module's '",
        name,
        "' has ",
        target->sizes());
    TORCH_CHECK(
        values.emplace(name, tensor).second,
        context,
        ": two of the file's tensors load into the module's '",
        name,
        "'");
  }
  for (const auto& target : targets) {
    if (values.count(target.key()) == 0) {
      report.missing.push_back(target.key());
    }
  }
  std::sort(report.missing.begin(), report.missing.end());
  std::sort(report.unexpected.begin(), report.unexpected.end());
  TORCH_CHECK(
      !options.strict() ||
          (report.missing.empty() && report.unexpected.empty()),
      context,
      ": expected exactly the module's ",
      targets.size(),
      " parameters and buffers, but the file lacks ",
      report.missing.size(),
      " (",
      detail::some_names(report.missing),
      ") and has ",
      report.unexpected.size(),
      " the module does not (",
      detail::some_names(report.unexpected),
      "); LoadWeightsOptions().strict(false) loads what fits");
  torch::NoGradGuard no_grad;
  for (const auto& [name, value] : values) {
    auto& target = targets[name];
    if (options.assign() && value.scalar_type() == target.scalar_type() &&
        value.device() == target.device()) {
      target.set_data(value);
    } else {
      target.copy_(value);
    }
    report.loaded.push_back(name);
  }
  return report;
}

/// Saves every parameter and buffer of `module` (adapters included, each in
/// its own dtype) under its qualified name to a safetensors file at `path`,
/// with `metadata`, atomically: what load_weights reads.
inline void save_weights(
    const torch::nn::Module& module,
    const std::string& path,
    const std::map<std::string, std::string>& metadata = {}) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& weight : detail::named_weights(module)) {
    tensors.emplace_back(weight.key(), weight.value());
  }
  detail::safetensors::write(
      path, tensors, metadata, "styleinject::save_weights: '" + path + "'");
}
} // namespace styleinject
