#pragma once
// A diffusers `config.json`, read key by key: each key the model reads is
// checked for its type, each feature the port lacks must keep diffusers'
// default, and a key it does not know is refused, so that a config is
// either built as diffusers builds it or refused with the key and value.

#include <nlohmann/json.hpp>

#include <c10/util/Exception.h>

#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace diffusers {

class Config {
 public:
  Config(nlohmann::json json, std::string context)
      : json_(std::move(json)), context_(std::move(context)) {
    TORCH_CHECK(
        json_.is_object(),
        context_,
        ": expected a JSON object, but got a JSON ",
        json_.type_name());
  }

  /// Reads `path`; a syntax error names the file and the place.
  static Config read(const std::string& path) {
    std::ifstream file(path);
    TORCH_CHECK(file, path, ": cannot be read (no such file?)");
    std::stringstream text;
    text << file.rdbuf();
    try {
      return Config(nlohmann::json::parse(text.str()), path);
    } catch (const nlohmann::json::parse_error& e) {
      TORCH_CHECK(false, path, ": not JSON: ", e.what());
    }
  }

  const std::string& context() const {
    return context_;
  }
  bool has(const std::string& key) const {
    return json_.contains(key) && !json_[key].is_null();
  }

  /// The value of `key`, or `fallback` where it is absent or null.
  template <typename T>
  T get(const std::string& key, const T& fallback) {
    used_.insert(key);
    return has(key) ? convert<T>(key, json_[key]) : fallback;
  }
  template <typename T>
  T get(const std::string& key) {
    used_.insert(key);
    TORCH_CHECK(has(key), context_, ": expected a value for \"", key, "\"");
    return convert<T>(key, json_[key]);
  }
  /// An int for every one of `count` blocks: one int for all, or a list.
  std::vector<int64_t> per_block(
      const std::string& key,
      size_t count,
      int64_t fallback) {
    used_.insert(key);
    if (!has(key)) {
      return std::vector<int64_t>(count, fallback);
    }
    if (json_[key].is_number()) {
      return std::vector<int64_t>(count, convert<int64_t>(key, json_[key]));
    }
    const auto list = convert<std::vector<int64_t>>(key, json_[key]);
    TORCH_CHECK(
        list.size() == count,
        context_,
        ": expected \"",
        key,
        "\" to be an int or a list of ",
        count,
        " ints (one per block), but got ",
        json_[key].dump());
    return list;
  }
  /// A feature this port does not build: `key` must be absent or hold
  /// one of `supported` (diffusers' default first).
  void require(
      const std::string& key,
      const std::vector<nlohmann::json>& supported) {
    used_.insert(key);
    if (!json_.contains(key)) {
      return;
    }
    for (const auto& value : supported) {
      if (json_[key] == value) {
        return;
      }
    }
    TORCH_CHECK(
        false,
        context_,
        ": \"",
        key,
        "\": ",
        json_[key].dump(),
        " is not supported by this port (supported: ",
        nlohmann::json(supported).dump(),
        ")");
  }
  /// Keys read elsewhere or without effect here.
  void ignore(const std::vector<std::string>& keys) {
    used_.insert(keys.begin(), keys.end());
  }
  /// Refuses the keys nothing read (diffusers' own "_..." keys aside).
  void finish() const {
    for (const auto& item : json_.items()) {
      TORCH_CHECK(
          item.key().rfind('_', 0) == 0 || used_.count(item.key()) > 0,
          context_,
          ": unknown key \"",
          item.key(),
          "\": ",
          item.value().dump(),
          " (a newer diffusers' feature this port does not build)");
    }
  }

 private:
  template <typename T>
  T convert(const std::string& key, const nlohmann::json& value) const {
    // nlohmann::json turns 1.5 or true into an int; a config must not.
    const bool fits =
        !std::is_same<T, int64_t>::value || value.is_number_integer();
    TORCH_CHECK(
        fits,
        context_,
        ": \"",
        key,
        "\" must be an int, but got ",
        value.dump());
    try {
      return value.get<T>();
    } catch (const nlohmann::json::exception&) {
      TORCH_CHECK(
          false,
          context_,
          ": \"",
          key,
          "\" has the wrong type: ",
          value.dump());
    }
  }

  nlohmann::json json_;
  std::string context_;
  std::set<std::string> used_;
};

} // namespace diffusers
