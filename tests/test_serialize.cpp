// Adapter files: save_adapters / load_adapters round trips, what they refuse,
// the safetensors reader against hostile files, atomic writes; and the
// public safetensors API: any tensors, mapped reads, a module's weights.

#include "support.h"

#include <catch2/catch.hpp>

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

using styleinject::inject;
using styleinject::load_adapters;
using styleinject::save_adapters;
using styleinject::StyleInjectOptions;
using styleinject::Targets;
using styleinject_test::error_of;
using styleinject_test::snapshot;
using styleinject_test::TempDir;
using styleinject_test::TinyNet;

namespace {

std::string read_bytes(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  return {
      std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

/// A safetensors file with this header text and data, written by hand.
std::string file_with(const std::string& header, const std::string& data) {
  std::string bytes(8, '\0');
  const uint64_t length = header.size();
  std::memcpy(&bytes[0], &length, 8);
  return bytes + header + data;
}

/// A model with seeded base weights, and adapters on the attention only.
TinyNet adapted_net(int64_t seed = 51) {
  torch::manual_seed(seed);
  TinyNet model;
  inject(
      *model,
      Targets::suffixes({"to_q", "to_v", "body.0"}),
      StyleInjectOptions(2).branches(3));
  torch::NoGradGuard no_grad;
  for (auto& p : styleinject::adapter_parameters(*model)) {
    p.copy_(torch::randn_like(p));
  }
  return model;
}

/// A model with the same base weights as adapted_net(seed), no adapters.
TinyNet base_net(int64_t seed = 51) {
  torch::manual_seed(seed);
  return TinyNet();
}

/// Checks that `model` has no adapters and every parameter as at `before`.
void check_untouched(
    const torch::nn::Module& model,
    const std::map<std::string, torch::Tensor>& before) {
  CHECK(styleinject::report(model).layers.empty());
  const auto now = snapshot(model);
  REQUIRE(now.size() == before.size());
  for (const auto& p : before) {
    CHECK(torch::equal(now.at(p.first), p.second));
  }
}

} // namespace

TEST_CASE(
    "save -> load into a fresh model gives identical outputs",
    "[serialize]") {
  TempDir dir;
  const auto path = dir.path + "/style.safetensors";
  auto trained = adapted_net();
  save_adapters(*trained, path);
  const auto x = torch::randn({2, 4, 5, 5});
  const auto context = torch::randn({2, 3, 6});

  SECTION("into a model without adapters: attached from the file's options") {
    auto fresh = base_net();
    load_adapters(*fresh, path);
    CHECK(torch::equal(fresh(x, context), trained(x, context)));
    const auto loaded = styleinject::report(*fresh);
    const auto saved = styleinject::report(*trained);
    REQUIRE(loaded.layers.size() == 4); // to_q, to_v, two body.0 convs
    for (size_t i = 0; i < loaded.layers.size(); ++i) {
      CHECK(loaded.layers[i].name == saved.layers[i].name);
      CHECK(loaded.layers[i].options.rank() == 2);
      CHECK(loaded.layers[i].options.branches() == 3);
    }
    CHECK(loaded.trainable_parameters == saved.trainable_parameters);
  }
  SECTION("into a model with the same adapters, in another dtype") {
    auto fresh = base_net();
    inject(
        *fresh,
        Targets::suffixes({"to_q", "to_v", "body.0"}),
        StyleInjectOptions(2).branches(3));
    fresh->to(torch::kDouble);
    load_adapters(*fresh, path);
    CHECK(fresh->attn->to_q->lora_A.scalar_type() == torch::kDouble);
    CHECK(torch::allclose(
        fresh(x.to(torch::kDouble), context.to(torch::kDouble))
            .to(torch::kFloat),
        trained(x, context),
        1e-5,
        1e-5));
  }
  SECTION("the file holds the adapter tensors, options and version only") {
    const auto bytes = read_bytes(path);
    const auto contents = styleinject::detail::safetensors::parse(
        reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "test");
    std::set<std::string> names;
    for (const auto& t : contents.tensors) {
      names.insert(t.first);
    }
    std::set<std::string> expected;
    for (const auto& p : trained->named_parameters()) {
      if (p.value().requires_grad()) {
        expected.insert(p.key());
        CHECK(torch::equal(
            std::find_if(
                contents.tensors.begin(),
                contents.tensors.end(),
                [&](const auto& t) { return t.first == p.key(); })
                ->second,
            p.value()));
      }
    }
    CHECK(names == expected);
    CHECK(names.count("attn.to_q.router.weight"));
    CHECK(names.count("blocks.0.body.0.lora_A"));
    CHECK(contents.metadata.at("format") == "styleinject");
    CHECK(contents.metadata.at("styleinject.version") == styleinject::version);
    const auto layers = nlohmann::ordered_json::parse(
        contents.metadata.at("styleinject.layers"));
    CHECK(
        layers["attn.to_v"].dump() ==
        R"({"type":"Linear","rank":2,"branches":3,"alpha":null,"dropout":0.0,)"
        R"("rslora":false,"temperature":1.0,"router":true,"gate":true,)"
        R"("dtype":null})");
    CHECK(layers["blocks.0.body.0"]["type"] == "Conv2d");
  }
}

TEST_CASE(
    "load_adapters refuses a file that does not fit, and changes nothing",
    "[serialize]") {
  TempDir dir;
  const auto path = dir.path + "/style.safetensors";
  const auto context = "styleinject::load_adapters: '" + path + "'";
  auto trained = adapted_net();
  save_adapters(*trained, path);
  const auto bytes = read_bytes(path);
  const auto contents = styleinject::detail::safetensors::parse(
      reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "test");
  auto metadata = contents.metadata;
  auto tensors = contents.tensors;
  const auto rewrite = [&] {
    write_bytes(
        path,
        styleinject::detail::safetensors::serialize(tensors, metadata, "test"));
  };
  auto fresh = base_net();
  const auto before = snapshot(*fresh);

  SECTION("a tensor of the wrong shape") {
    tensors[0].second = torch::zeros({1});
    rewrite();
    CHECK(
        error_of([&] { load_adapters(*fresh, path); }) ==
        context + ": expected '" + tensors[0].first +
            "' of shape [3, 2, 4, 3, 3], but the file has [1]");
  }
  SECTION("a missing tensor") {
    const auto name = tensors.back().first;
    tensors.pop_back();
    rewrite();
    CHECK(error_of([&] {
            load_adapters(*fresh, path);
          }) == context + ": the file has no tensor '" + name + "'");
  }
  SECTION("a tensor the adapters do not have") {
    tensors.emplace_back("head.lora_A", torch::zeros({2}));
    rewrite();
    CHECK(
        error_of([&] { load_adapters(*fresh, path); }) ==
        context +
            ": the file has the tensor 'head.lora_A', which is not a "
            "parameter of the model's adapters");
  }
  SECTION("an integer tensor") {
    tensors[0].second = tensors[0].second.to(torch::kInt);
    rewrite();
    CHECK(
        error_of([&] { load_adapters(*fresh, path); }) ==
        context + ": expected '" + tensors[0].first +
            "' of a floating-point dtype, but the file has Int");
  }
  // The error of loading the file with its layers' metadata edited.
  const auto error_with_layers =
      [&](const std::function<void(nlohmann::json&)>& edit) {
        auto layers =
            nlohmann::json::parse(contents.metadata.at("styleinject.layers"));
        edit(layers);
        metadata["styleinject.layers"] = layers.dump();
        rewrite();
        return error_of([&] { load_adapters(*fresh, path); });
      };
  SECTION("a layer the model does not have") {
    CHECK(
        error_with_layers([](nlohmann::json& layers) {
          layers["attn.to_z"] = layers["attn.to_q"];
        }) ==
        context +
            ": the file has an adapter for layer 'attn.to_z', but the model "
            "has no Linear or Conv2d layer of that name");
  }
  SECTION("a layer of another type") {
    CHECK(
        error_with_layers([](nlohmann::json& layers) {
          layers["attn.to_q"]["type"] = "Conv2d";
        }) ==
        context +
            ": layer 'attn.to_q' is a Linear in the model, but a Conv2d in "
            "the file");
  }
  SECTION("options that are not valid, or not there") {
    CHECK(
        error_with_layers(
            [](nlohmann::json& layers) { layers["attn.to_q"]["rank"] = -1; }) ==
        context +
            ": layer 'attn.to_q': expected 'rank' to be a non-negative "
            "integer below 2^30, but got -1");
    CHECK(
        error_with_layers(
            [](nlohmann::json& layers) { layers["attn.to_q"]["rank"] = 0; }) ==
        context + ": layer 'attn.to_q': expected rank >= 1, but got rank=0");
    CHECK(
        error_with_layers([](nlohmann::json& layers) {
          layers["attn.to_q"].erase("rank");
        }) ==
        context +
            ": layer 'attn.to_q': expected 'rank' to be an integer in the "
            "file's metadata");
    CHECK(
        error_with_layers([](nlohmann::json& layers) {
          layers = {1, 2};
        }) ==
        context +
            ": expected the metadata 'styleinject.layers' to be a JSON object "
            "of layers, but it is not");
  }
  SECTION("a model whose adapters differ from the file's") {
    inject(
        *fresh,
        Targets::suffixes({"to_q", "to_v", "body.0"}),
        StyleInjectOptions(3).branches(3));
    const auto adapted = snapshot(*fresh);
    CHECK(
        error_of([&] { load_adapters(*fresh, path); }) ==
        context +
            ": layer 'attn.to_q' has an adapter with other options than the "
            "file's: "
            R"({"type":"Linear","rank":3,"branches":3,"alpha":null,)"
            R"("dropout":0.0,"rslora":false,"temperature":1.0,"router":true,)"
            R"("gate":true,"dtype":null} in the model, {"type":"Linear",)"
            R"("rank":2,"branches":3,"alpha":null,"dropout":0.0,)"
            R"("rslora":false,"temperature":1.0,"router":true,"gate":true,)"
            R"("dtype":null} in the file)");
    for (const auto& p : adapted) {
      CHECK(torch::equal(fresh->named_parameters()[p.first], p.second));
    }
    return;
  }
  SECTION("a model with an adapter that the file lacks") {
    inject(*fresh, Targets::suffixes({"to_k"}), StyleInjectOptions(2));
    CHECK(
        error_of([&] { load_adapters(*fresh, path); }) ==
        context +
            ": the model's layer 'attn.to_k' has an adapter 'default', but "
            "the file has none for it");
    return;
  }
  SECTION(
      "a file without StyleInject metadata, into a model without adapters") {
    metadata.clear();
    rewrite();
    CHECK(
        error_of([&] { load_adapters(*fresh, path); }) ==
        context +
            ": the file has no StyleInject metadata ('styleinject.layers'), so "
            "it can only fill adapters that the model has already, and the "
            "model has none; attach them first with styleinject::inject()");
  }
  SECTION("a file that is not there") {
    CHECK(
        error_of([&] { load_adapters(*fresh, path + ".missing"); }) ==
        "styleinject::load_adapters: '" + path + ".missing': cannot open '" +
            path + ".missing' for reading: No such file or directory");
  }
  check_untouched(*fresh, before);
}

TEST_CASE(
    "a file without metadata loads into adapters attached already",
    "[serialize]") {
  // As another tool would write it: the tensors under their names only.
  TempDir dir;
  const auto path = dir.path + "/bare.safetensors";
  auto trained = adapted_net();
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& p : trained->named_parameters()) {
    if (p.value().requires_grad()) {
      tensors.emplace_back(p.key(), p.value());
    }
  }
  write_bytes(
      path, styleinject::detail::safetensors::serialize(tensors, {}, "test"));
  auto fresh = base_net();
  inject(
      *fresh,
      Targets::suffixes({"to_q", "to_v", "body.0"}),
      StyleInjectOptions(2).branches(3));
  load_adapters(*fresh, path);
  const auto x = torch::randn({1, 4, 5, 5});
  const auto context = torch::randn({1, 2, 6});
  CHECK(torch::equal(fresh(x, context), trained(x, context)));
}

TEST_CASE(
    "the reader refuses hostile files with a clear error",
    "[serialize]") {
  TempDir dir;
  const auto path = dir.path + "/hostile.safetensors";
  const auto context = "styleinject::load_adapters: '" + path + "'";
  auto model = base_net();
  const auto before = snapshot(*model);
  const auto error_for = [&](const std::string& bytes) {
    write_bytes(path, bytes);
    auto message = error_of([&] { load_adapters(*model, path); });
    const auto prefix = context + ": ";
    return message.rfind(prefix, 0) == 0 ? message.substr(prefix.size())
                                         : message;
  };
  const std::string eight_floats(32, '\0');
  const auto entry = [](const std::string& fields) {
    return "{\"a\":{" + fields + "}}";
  };

  CHECK(
      error_for(std::string("\x05\0\0\0", 4)) ==
      "the file is truncated: expected at least 8 bytes (the header length), "
      "but it has 4");
  CHECK(
      error_for(file_with("{}", "").substr(0, 9)) ==
      "the header length 2 runs past the end of the file (1 bytes follow it)");
  std::string huge(8, '\0');
  const uint64_t too_long = 200'000'000;
  std::memcpy(&huge[0], &too_long, 8);
  CHECK(
      error_for(huge + "{}") ==
      "expected a header of at most 100000000 bytes, but the file declares "
      "200000000");
  std::string past_end(8, '\0');
  const uint64_t max_length = ~uint64_t{0};
  std::memcpy(&past_end[0], &max_length, 8);
  CHECK(
      error_for(past_end + "{}") ==
      "expected a header of at most 100000000 bytes, but the file declares "
      "18446744073709551615");
  CHECK(
      error_for(file_with("{\"a\": [1, 2", "")) ==
      "the header is not valid JSON (11 bytes)");
  CHECK(
      error_for(file_with("[1, 2]", "")) ==
      "expected the header to be a JSON object, but got a JSON array");
  CHECK(
      error_for(file_with(
          R"({"a":{"dtype":"F32","shape":[8],"data_offsets":[0,32]},)"
          R"("a":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}})",
          eight_floats)) == "the header has the key 'a' twice");
  CHECK(
      error_for(file_with(
          entry(R"("dtype":"F32","dtype":"F16","shape":[8],)"
                R"("data_offsets":[0,32])"),
          eight_floats)) == "the header has the key 'dtype' twice");
  CHECK(
      error_for(file_with(
          entry(R"("dtype":"F7","shape":[8],"data_offsets":[0,32])"),
          eight_floats)) ==
      "tensor 'a' has the unknown dtype 'F7'; expected one of F64, F32, F16, "
      "BF16, I64, I32, I16, I8, U8, BOOL");
  CHECK(
      error_for(file_with(
          entry(R"("dtype":"F32","shape":[-8],"data_offsets":[0,32])"),
          eight_floats)) ==
      "expected the sizes of tensor 'a' to be non-negative integers, but got "
      "[-8]");
  CHECK(
      error_for(file_with(
          entry(R"("dtype":"F32","shape":[4294967296,4294967296],)"
                R"("data_offsets":[0,32])"),
          eight_floats)) ==
      "the shape of tensor 'a' is too large: [4294967296,4294967296]");
  // A zero size must not hide the overflow of the others.
  CHECK(
      error_for(file_with(
          entry(R"("dtype":"F32","shape":[0,2305843009213693952,)"
                R"(2305843009213693952],"data_offsets":[0,0])"),
          "")) ==
      "the shape of tensor 'a' is too large: "
      "[0,2305843009213693952,2305843009213693952]");
  CHECK(
      error_for(file_with(
          entry(R"("dtype":"F32","shape":[8],"data_offsets":[0,64])"),
          eight_floats)) ==
      "the data_offsets [0, 64] of tensor 'a' run past the end of the data "
      "(32 bytes)");
  CHECK(
      error_for(file_with(
          entry(R"("dtype":"F32","shape":[8],"data_offsets":[32,0])"),
          eight_floats)) ==
      "expected the data_offsets of tensor 'a' to be [begin, end] with 0 <= "
      "begin <= end, but got [32,0]");
  CHECK(
      error_for(file_with(
          entry(R"("dtype":"F32","shape":[4],"data_offsets":[0,32])"),
          eight_floats)) ==
      "tensor 'a' of dtype F32 and shape [4] needs 16 bytes, but its "
      "data_offsets span 32");
  CHECK(
      error_for(file_with(
          R"({"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]},)"
          R"("b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})",
          std::string(24, '\0'))) ==
      "the data_offsets of tensor 'b' begin at 16, but the data before ends "
      "at 24; tensors must not overlap or leave gaps");
  CHECK(
      error_for(file_with(
          entry(R"("dtype":"F32","shape":[4],"data_offsets":[0,16])"),
          eight_floats)) ==
      "the tensors' data ends at 16, but the file has 32 bytes of data");
  CHECK(
      error_for(
          file_with(entry(R"("dtype":"F32","shape":[8])"), eight_floats)) ==
      "expected tensor 'a' to be an object with dtype, shape and "
      "data_offsets, but got {\"dtype\":\"F32\",\"shape\":[8]}");
  CHECK(
      error_for(file_with(R"({"__metadata__":{"k":1}})", "")) ==
      "expected __metadata__ values to be strings, but 'k' is a JSON number");
  CHECK(
      error_for(file_with(std::string("{\"\xff\":1}"), "")) ==
      "the header is not valid JSON (7 bytes)");
  const std::string layer =
      R"({"type":"Linear","rank":2,"branches":3,"alpha":null,"dropout":0.0,)"
      R"("rslora":false,"temperature":1.0,"router":true,"gate":true})";
  CHECK(
      error_for(styleinject::detail::safetensors::serialize(
          {},
          {{"styleinject.layers",
            "{\"attn.to_q\":" + layer + ",\"attn.to_q\":" + layer + "}"}},
          "test")) ==
      "the metadata 'styleinject.layers' has the key 'attn.to_q' twice");
  check_untouched(*model, before);
}

TEST_CASE(
    "writes are atomic: a failed write leaves the previous file",
    "[serialize]") {
  TempDir dir;
  const auto path = dir.path + "/style.safetensors";
  auto first = adapted_net(61);
  save_adapters(*first, path);
  const auto previous = read_bytes(path);
  auto second = adapted_net(62);

  SECTION("a successful save replaces the file, leaving nothing else") {
    save_adapters(*second, path);
    CHECK(read_bytes(path) != previous);
    CHECK(dir.files() == std::vector<std::string>{"style.safetensors"});
  }
  SECTION("a write that fails midway (file size limit) changes nothing") {
    // RLIMIT_FSIZE makes write() fail with EFBIG past 1 KiB, in the middle
    // of the file, like a full disk would.
    rlimit old_limit{};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
    const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    rlimit small = old_limit;
    small.rlim_cur = 1024;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
    const auto message = error_of([&] { save_adapters(*second, path); });
    ::setrlimit(RLIMIT_FSIZE, &old_limit);
    std::signal(SIGXFSZ, old_handler);
    CHECK(
        message ==
        "styleinject::save_adapters: '" + path + "': writing '" + path +
            "' failed: File too large; the file is as it was");
    CHECK(read_bytes(path) == previous);
    CHECK(dir.files() == std::vector<std::string>{"style.safetensors"});
  }
  SECTION("a folder that does not exist") {
    const auto missing = dir.path + "/no/style.safetensors";
    CHECK_THAT(
        error_of([&] { save_adapters(*second, missing); }),
        Catch::StartsWith(
            "styleinject::save_adapters: '" + missing + "': cannot create '" +
            missing + ".tmp."));
  }
  SECTION("a model without adapters") {
    CHECK(
        error_of([&] { save_adapters(*base_net(), path); }) ==
        "styleinject::save_adapters: '" + path +
            "': nothing to save: the model has no adapters; attach them with "
            "styleinject::inject() or styleinject::load_adapters()");
    CHECK(read_bytes(path) == previous);
  }
}

TEST_CASE(
    "stale temporary files beside the target do not block a save",
    "[serialize]") {
  // Files left by a crashed writer with the names an earlier version used,
  // <path>.tmp.<pid>.<n>: pids repeat in containers.
  TempDir dir;
  const auto path = dir.path + "/style.safetensors";
  const auto stale = path + ".tmp." + std::to_string(::getpid()) + ".";
  for (int n = 0; n < 1000; ++n) {
    write_bytes(stale + std::to_string(n), "stale");
  }
  auto model = adapted_net();
  save_adapters(*model, path);
  CHECK(dir.files().size() == 1001); // the stale files, and the new one
  CHECK(read_bytes(stale + "0") == "stale");
  auto fresh = base_net();
  load_adapters(*fresh, path);
  CHECK(styleinject::report(*fresh).layers.size() == 4);
}

TEST_CASE(
    "load_adapters compares what computes, not training settings",
    "[serialize]") {
  TempDir dir;
  const auto path = dir.path + "/style.safetensors";
  const auto injected = [](const StyleInjectOptions& options) {
    auto model = base_net();
    inject(*model, Targets::suffixes({"to_q", "to_v", "body.0"}), options);
    return model;
  };
  const auto saved_with = [&](const StyleInjectOptions& options) {
    auto model = injected(options);
    torch::NoGradGuard no_grad;
    for (auto& p : styleinject::adapter_parameters(*model)) {
      p.copy_(torch::randn_like(p));
    }
    save_adapters(*model, path);
    return model;
  };
  const auto x = torch::randn({2, 4, 5, 5});
  const auto context = torch::randn({2, 3, 6});
  const auto base = StyleInjectOptions(2).branches(3);

  SECTION("dropout, compute path and alpha unset against alpha = rank") {
    auto trained = saved_with(StyleInjectOptions(base).dropout(0.1));
    trained->eval();
    auto model = injected(StyleInjectOptions(base).alpha(2).path(
        styleinject::ComputePath::kStacked));
    load_adapters(*model, path);
    // Another path rounds differently in float32.
    CHECK(torch::allclose(model(x, context), trained(x, context), 1e-4, 1e-5));
  }
  SECTION("another scale is a mismatch") {
    saved_with(base);
    auto model = injected(StyleInjectOptions(base).alpha(3));
    CHECK_THAT(
        error_of([&] { load_adapters(*model, path); }),
        Catch::Contains(
            "layer 'attn.to_q' has an adapter with other options than the "
            "file's"));
  }
}

TEST_CASE(
    "hot swap: a file loads into attached adapters in place",
    "[serialize]") {
  TempDir dir;
  const auto path = dir.path + "/other.safetensors";
  save_adapters(*adapted_net(52), path);
  auto model = adapted_net(51);
  auto parameters = styleinject::adapter_parameters(*model);
  torch::optim::Adam adam(parameters, 1e-3);
  const auto x = torch::randn({2, 4, 5, 5});
  const auto context = torch::randn({2, 3, 6});
  model(x, context).sum().backward();
  adam.step();
  std::vector<const void*> storage;
  for (const auto& p : parameters) {
    storage.push_back(p.data_ptr());
  }

  load_adapters(*model, path);
  // The same storage: the optimizer's references (and a captured CUDA
  // graph's pointers) stay valid, and the values are the file's.
  const auto now = styleinject::adapter_parameters(*model);
  REQUIRE(now.size() == parameters.size());
  for (size_t i = 0; i < now.size(); ++i) {
    CHECK(now[i].data_ptr() == storage[i]);
  }
  const auto file = styleinject::adapter_parameters(*adapted_net(52));
  for (size_t i = 0; i < now.size(); ++i) {
    CHECK(torch::equal(now[i], file[i]));
  }
  adam.zero_grad();
  model(x, context).sum().backward();
  adam.step();
  CHECK(parameters[0].data_ptr() == storage[0]);
}

TEST_CASE("adapter files keep the adapter's own dtype", "[serialize][dtype]") {
  TempDir dir;
  const auto path = dir.path + "/float32_on_bfloat16.safetensors";
  auto trained = base_net();
  trained->to(torch::kBFloat16);
  inject(
      *trained,
      Targets::suffixes({"to_q", "body.0"}),
      StyleInjectOptions(2).branches(3).dtype(torch::kFloat));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : styleinject::adapter_parameters(*trained)) {
      p.copy_(torch::randn_like(p) * 0.1);
    }
  }
  save_adapters(*trained, path);
  const auto bytes = read_bytes(path);
  const auto contents = styleinject::detail::safetensors::parse(
      reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "test");
  for (const auto& t : contents.tensors) {
    CAPTURE(t.first);
    CHECK(t.second.scalar_type() == torch::kFloat);
  }
  const auto layers =
      nlohmann::ordered_json::parse(contents.metadata.at("styleinject.layers"));
  CHECK(layers["attn.to_q"]["dtype"] == "float32");

  auto fresh = base_net();
  fresh->to(torch::kBFloat16);
  load_adapters(*fresh, path);
  CHECK(fresh->attn->to_q->lora_A.scalar_type() == torch::kFloat);
  fresh->to(torch::kBFloat16); // the model's to() reaches each layer's
  CHECK(fresh->attn->to_q->lora_A.scalar_type() == torch::kFloat);
  CHECK(
      fresh->blocks->ptr<styleinject_test::ResBlockImpl>(0)
          ->body->ptr<styleinject::StyleInjectConv2dImpl>(0)
          ->lora_A.scalar_type() == torch::kFloat);
  CHECK(fresh->attn->to_q->weight.scalar_type() == torch::kBFloat16);
  const auto x = torch::randn({2, 4, 5, 5}).to(torch::kBFloat16);
  const auto context = torch::randn({2, 3, 6}).to(torch::kBFloat16);
  torch::NoGradGuard no_grad;
  CHECK(torch::equal(fresh(x, context), trained(x, context)));
}

// The C++ half of tests/interop/interop.py, which runs these two hidden
// cases with STYLEINJECT_INTEROP_DIR set.
namespace {

/// interop.py's formula: ((i mod period) - period / 2) / 4 plus
/// (length of name mod 5) · offset; exact in float16.
torch::Tensor interop_values(
    const std::string& name,
    torch::IntArrayRef shape,
    int64_t period,
    double offset) {
  const auto count = c10::multiply_integers(shape);
  const auto base =
      (torch::arange(count, torch::kDouble).fmod(period) - period / 2) / 4.0;
  return (base + static_cast<double>(name.size() % 5) * offset).reshape(shape);
}

std::string interop_dir() {
  const char* dir = std::getenv("STYLEINJECT_INTEROP_DIR");
  REQUIRE(dir != nullptr);
  return dir;
}

} // namespace

TEST_CASE(
    "interop: the library writes a file for Python",
    "[.interop][interop-write]") {
  auto model = base_net(71);
  inject(
      *model,
      Targets::suffixes({"attn.to_v", "blocks.0.body.0"}),
      StyleInjectOptions(2).branches(3));
  torch::NoGradGuard no_grad;
  for (const auto& p : model->named_parameters()) {
    if (p.value().requires_grad()) {
      p.value().copy_(interop_values(p.key(), p.value().sizes(), 17, 1.0));
    }
  }
  save_adapters(*model, interop_dir() + "/from_cpp.safetensors");
}

TEST_CASE(
    "interop: the library reads a file from Python",
    "[.interop][interop-read]") {
  auto model = base_net(71); // no adapters: the file's metadata attaches them
  load_adapters(*model, interop_dir() + "/from_python.safetensors");
  int adapter_tensors = 0;
  for (const auto& p : model->named_parameters()) {
    if (p.value().requires_grad()) {
      CAPTURE(p.key());
      CHECK(torch::equal(
          p.value(),
          interop_values(p.key(), p.value().sizes(), 13, -0.5)
              .to(torch::kFloat)));
      ++adapter_tensors;
    }
  }
  CHECK(adapter_tensors == 10);
}

namespace {

/// interop.py's tensor for each safetensors dtype, by the dtype's name:
/// i = 0 ... 14 as (3, 5), then (i - 7) / 4 for floats, 9i - 60 for signed
/// integers, 17i for U8 and i mod 3 == 0 for BOOL.
std::vector<std::pair<std::string, torch::Tensor>> interop_dtype_tensors() {
  const std::vector<std::pair<std::string, torch::ScalarType>> dtypes{
      {"F64", torch::kDouble},
      {"F32", torch::kFloat},
      {"F16", torch::kHalf},
      {"I64", torch::kLong},
      {"I32", torch::kInt},
      {"I16", torch::kShort},
      {"I8", torch::kChar},
      {"U8", torch::kByte},
      {"BOOL", torch::kBool}};
  const auto i = torch::arange(15, torch::kLong).view({3, 5});
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& [name, dtype] : dtypes) {
    torch::Tensor value = name == "BOOL" ? i.fmod(3).eq(0)
        : name == "U8"                   ? i * 17
        : name[0] == 'I'                 ? i * 9 - 60
                                         : (i.to(torch::kDouble) - 7) / 4;
    tensors.emplace_back(name, value.to(dtype));
  }
  return tensors;
}

} // namespace

TEST_CASE(
    "interop: every dtype from Python, and back",
    "[.interop][interop-dtypes]") {
  const auto loaded =
      styleinject::load_safetensors(interop_dir() + "/dtypes.safetensors");
  CHECK(
      loaded.metadata == std::map<std::string, std::string>{{"who", "python"}});
  // Python's writer orders tensors its own way: compare by name.
  const auto expected = interop_dtype_tensors();
  std::map<std::string, torch::Tensor> by_name(
      loaded.tensors.begin(), loaded.tensors.end());
  REQUIRE(by_name.size() == expected.size());
  for (const auto& [name, value] : expected) {
    CAPTURE(name);
    REQUIRE(by_name.count(name) == 1);
    CHECK(by_name.at(name).scalar_type() == value.scalar_type());
    CHECK(torch::equal(by_name.at(name), value));
  }
  styleinject::save_safetensors(
      interop_dir() + "/dtypes_from_cpp.safetensors",
      expected,
      {{"who", "cpp"}});
}

// ------------------------------------------- safetensors files, public API

namespace {

/// Whether this process has `path` mapped, per /proc/self/maps.
bool is_mapped(const std::string& path) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    if (line.size() >= path.size() &&
        line.compare(line.size() - path.size(), path.size(), path) == 0) {
      return true;
    }
  }
  return false;
}

/// A module with parameters, a frozen parameter and buffers.
struct WeightsNetImpl : torch::nn::Module {
  WeightsNetImpl() {
    fc = register_module("fc", torch::nn::Linear(3, 2));
    norm = register_module("norm", torch::nn::BatchNorm1d(2));
    fc->bias.set_requires_grad(false);
  }
  torch::nn::Linear fc{nullptr};
  torch::nn::BatchNorm1d norm{nullptr};
};
TORCH_MODULE(WeightsNet);

/// Every parameter and buffer of `module`, cloned, by qualified name.
std::map<std::string, torch::Tensor> weights_of(
    const torch::nn::Module& module) {
  auto values = snapshot(module);
  for (const auto& b : module.named_buffers()) {
    values[b.key()] = b.value().clone();
  }
  return values;
}

/// A WeightsNet whose parameters and buffers are all drawn from `seed`.
WeightsNet weights_net(int64_t seed) {
  torch::manual_seed(seed);
  WeightsNet net;
  torch::NoGradGuard no_grad;
  for (auto& p : net->parameters()) {
    p.normal_();
  }
  for (auto& b : net->buffers()) {
    b.copy_(torch::randint(1, 9, b.sizes(), b.options()));
  }
  return net;
}

} // namespace

TEST_CASE(
    "save_safetensors and load_safetensors keep every dtype, the order and "
    "the metadata",
    "[safetensors]") {
  TempDir dir;
  const auto path = dir.path + "/all.safetensors";
  torch::manual_seed(3);
  const auto reals = torch::randn({3, 4}, torch::kDouble);
  std::vector<std::pair<std::string, torch::Tensor>> tensors{
      {"z.f64", reals},
      {"a.f32.transposed", reals.to(torch::kFloat).t()}, // not contiguous
      {"m.f16", reals.to(torch::kHalf)},
      {"b.bf16", reals.to(torch::kBFloat16)},
      {"i64", torch::arange(-5, 7, torch::kLong).view({3, 4})},
      {"i32", torch::arange(-5, 7, torch::kInt)},
      {"i16", torch::arange(-5, 7, torch::kShort)},
      {"i8", torch::arange(-5, 7, torch::kChar)},
      {"u8", torch::arange(0, 250, 7, torch::kByte)},
      {"bool", torch::tensor({true, false, true})},
      {"scalar", torch::tensor(2.5)},
      {"empty", torch::zeros({0, 3})}};
  const std::map<std::string, std::string> metadata{
      {"format", "pt"}, {"note", "ünïcode"}};
  styleinject::save_safetensors(path, tensors, metadata);
  const auto loaded = styleinject::load_safetensors(path);
  CHECK(loaded.metadata == metadata);
  REQUIRE(loaded.tensors.size() == tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    INFO(tensors[i].first);
    CHECK(loaded.tensors[i].first == tensors[i].first);
    CHECK(
        loaded.tensors[i].second.scalar_type() ==
        tensors[i].second.scalar_type());
    CHECK(torch::equal(loaded.tensors[i].second, tensors[i].second));
  }
  CHECK_THAT(
      error_of([&] {
        styleinject::save_safetensors(
            path, {{"c", torch::ones({2}, torch::kComplexFloat)}});
      }),
      Catch::Contains("tensor 'c' has dtype ComplexFloat, which safetensors "
                      "cannot hold"));
  CHECK(torch::equal(
      styleinject::load_safetensors(path).tensors.at(0).second, reals));
}

TEST_CASE(
    "load_safetensors maps the file, and writes to its tensors stay private",
    "[safetensors]") {
  TempDir dir;
  const auto path = dir.path + "/mapped.safetensors";
  styleinject::save_safetensors(path, {{"w", torch::arange(1024.)}});
  {
    auto loaded = styleinject::load_safetensors(path);
    CHECK(is_mapped(path));
    auto w = loaded.tensors.at(0).second;
    loaded = {};
    CHECK(is_mapped(path)); // w keeps the mapping alive
    w.mul_(-1);
    CHECK(w[5].item<double>() == -5);
  }
  CHECK_FALSE(is_mapped(path));
  CHECK(torch::equal(
      styleinject::load_safetensors(path).tensors.at(0).second,
      torch::arange(1024.)));
}

TEST_CASE(
    "load_safetensors reads a tensor that is not aligned for its dtype",
    "[safetensors]") {
  TempDir dir;
  const auto path = dir.path + "/unaligned.safetensors";
  // One byte, then two floats that start at an odd offset.
  std::string header =
      R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  const float b[2] = {1.5f, -2.25f};
  write_bytes(
      path,
      file_with(
          header,
          std::string(1, '\x07') +
              std::string(reinterpret_cast<const char*>(b), sizeof b)));
  const auto loaded = styleinject::load_safetensors(path);
  const auto& read = loaded.tensors.at(1).second;
  CHECK(reinterpret_cast<uintptr_t>(read.data_ptr()) % alignof(float) == 0);
  CHECK(torch::equal(read, torch::tensor({1.5f, -2.25f})));
  CHECK(loaded.tensors.at(0).second.item<int>() == 7);
}

TEST_CASE(
    "load_safetensors names the problem with a path that is no file",
    "[safetensors]") {
  TempDir dir;
  CHECK_THAT(
      error_of([&] { styleinject::load_safetensors(dir.path + "/none"); }),
      Catch::Contains(
          "cannot open '" + dir.path +
          "/none' for reading: No "
          "such file or directory"));
  CHECK_THAT(
      error_of([&] { styleinject::load_safetensors(dir.path); }),
      Catch::Contains("'" + dir.path + "' is not a regular file"));
  write_bytes(dir.path + "/empty", "");
  CHECK_THAT(
      error_of([&] { styleinject::load_safetensors(dir.path + "/empty"); }),
      Catch::Contains("expected at least 8 bytes (the header length), but it "
                      "has 0"));
}

/// Checks that each parameter and buffer of `module` equals `expected`'s.
void check_weights(
    const torch::nn::Module& module,
    const std::map<std::string, torch::Tensor>& expected) {
  for (const auto& [name, value] : weights_of(module)) {
    INFO(name);
    CHECK(torch::equal(value, expected.at(name)));
  }
}

TEST_CASE(
    "save_weights and load_weights move parameters and buffers by name",
    "[safetensors]") {
  TempDir dir;
  const auto path = dir.path + "/net.safetensors";
  auto source = weights_net(1);
  source->to(torch::kDouble); // the file is float64; the target float32
  styleinject::save_weights(*source, path, {{"what", "test"}});
  auto target = weights_net(2);
  const auto report = styleinject::load_weights(*target, path);
  CHECK(report.metadata.at("what") == "test");
  CHECK(report.missing.empty());
  CHECK(report.unexpected.empty());
  CHECK(
      report.loaded ==
      std::vector<std::string>{
          "fc.bias",
          "fc.weight",
          "norm.bias",
          "norm.num_batches_tracked",
          "norm.running_mean",
          "norm.running_var",
          "norm.weight"});
  const auto expected = weights_of(*source);
  for (const auto& [name, value] : weights_of(*target)) {
    INFO(name);
    CHECK(value.scalar_type() != torch::kDouble);
    CHECK(torch::equal(value, expected.at(name).to(value.scalar_type())));
  }
}

TEST_CASE(
    "load_weights with assign takes the file's memory, copy-on-write",
    "[safetensors]") {
  TempDir dir;
  const auto path = dir.path + "/net.safetensors";
  auto source = weights_net(1);
  styleinject::save_weights(*source, path);
  const auto expected = weights_of(*source);
  auto target = weights_net(2);
  // A tensor of another dtype than the file's is copied into.
  target->fc->weight.set_data(target->fc->weight.to(torch::kDouble));
  styleinject::load_weights(
      *target, path, styleinject::LoadWeightsOptions().assign(true));
  for (const auto& weight : styleinject::detail::named_weights(*target)) {
    INFO(weight.key());
    CHECK(torch::equal(
        weight.value().to(torch::kFloat), expected.at(weight.key())));
    // A mapped file's tensor has storage that cannot grow; a copy's can.
    CHECK(
        weight.value().storage().resizable() == (weight.key() == "fc.weight"));
  }
  CHECK(target->norm->weight.requires_grad()); // as each was
  CHECK(!target->fc->bias.requires_grad());
  // Writes stay in memory: the file still holds what was saved.
  {
    torch::NoGradGuard no_grad;
    target->fc->bias.add_(1);
  }
  auto fresh = weights_net(3);
  styleinject::load_weights(*fresh, path);
  check_weights(*fresh, expected);
  CHECK(torch::equal(target->fc->bias, expected.at("fc.bias") + 1));
}

TEST_CASE(
    "load_weights refuses what does not fit and leaves the module as it was",
    "[safetensors]") {
  TempDir dir;
  const auto path = dir.path + "/net.safetensors";
  auto source = weights_net(1);
  auto tensors = std::vector<std::pair<std::string, torch::Tensor>>{};
  for (const auto& [name, value] : weights_of(*source)) {
    if (name != "norm.running_var") {
      tensors.emplace_back(name, value);
    }
  }
  tensors.emplace_back("extra.weight", torch::ones({2}));
  styleinject::save_safetensors(path, tensors);

  auto target = weights_net(2);
  const auto before = weights_of(*target);
  const auto unchanged = [&] { check_weights(*target, before); };
  SECTION("strict: a missing and an unexpected name") {
    CHECK_THAT(
        error_of([&] { styleinject::load_weights(*target, path); }),
        Catch::Contains("expected exactly the module's 7 parameters and "
                        "buffers, but the file lacks 1 ('norm.running_var') "
                        "and has 1 the module does not ('extra.weight')"));
    unchanged();
  }
  SECTION("a shape that differs, strict or not") {
    styleinject::save_safetensors(path, {{"fc.weight", torch::ones({3, 2})}});
    CHECK_THAT(
        error_of([&] {
          styleinject::load_weights(
              *target, path, styleinject::LoadWeightsOptions().strict(false));
        }),
        Catch::Contains("tensor 'fc.weight' has shape [3, 2], but the "
                        "module's 'fc.weight' has [2, 3]"));
    unchanged();
  }
  SECTION("two of the file's names renamed onto one") {
    styleinject::save_safetensors(
        path, {{"fc.bias", torch::ones({2})}, {"b", torch::ones({2})}});
    CHECK_THAT(
        error_of([&] {
          styleinject::load_weights(
              *target,
              path,
              styleinject::LoadWeightsOptions().strict(false).rename(
                  {{"b", "fc.bias"}}));
        }),
        Catch::Contains("two of the file's tensors load into the module's "
                        "'fc.bias'"));
    unchanged();
  }
  SECTION("non-strict: what fits loads, the rest is reported") {
    const auto report = styleinject::load_weights(
        *target, path, styleinject::LoadWeightsOptions().strict(false));
    CHECK(report.missing == std::vector<std::string>{"norm.running_var"});
    CHECK(report.unexpected == std::vector<std::string>{"extra.weight"});
    CHECK(report.loaded.size() == 6);
    const auto now = weights_of(*target);
    const auto expected = weights_of(*source);
    CHECK(torch::equal(now.at("fc.weight"), expected.at("fc.weight")));
    CHECK(torch::equal(
        now.at("norm.running_var"), before.at("norm.running_var")));
  }
}

/// `source`'s weights as the shards of a checkpoint in `folder`: the fc
/// layer's in one, the norm's in the other.
void save_shards(const WeightsNet& source, const std::string& folder) {
  std::vector<std::pair<std::string, torch::Tensor>> fc, norm;
  for (const auto& [name, value] : weights_of(*source)) {
    (name.rfind("fc.", 0) == 0 ? fc : norm).emplace_back(name, value);
  }
  styleinject::save_safetensors(folder + "/net-00001-of-00002.safetensors", fc);
  styleinject::save_safetensors(
      folder + "/net-00002-of-00002.safetensors", norm);
}

/// The index of save_shards' checkpoint, as transformers writes it, with
/// `extra` entries added to its weight_map.
std::string shard_index(const std::string& extra = "") {
  std::string map;
  for (const auto* name : {"fc.bias", "fc.weight"}) {
    map +=
        std::string("\"") + name + "\": \"net-00001-of-00002.safetensors\", ";
  }
  for (const auto* name :
       {"norm.bias",
        "norm.num_batches_tracked",
        "norm.running_mean",
        "norm.running_var",
        "norm.weight"}) {
    map +=
        std::string("\"") + name + "\": \"net-00002-of-00002.safetensors\", ";
  }
  map += extra;
  map.erase(map.find_last_of(','));
  return "{\"metadata\": {\"total_size\": 72}, \"weight_map\": {" + map + "}}";
}

TEST_CASE(
    "load_weights reads a sharded checkpoint through its index",
    "[safetensors]") {
  TempDir dir;
  const auto index = dir.path + "/net.safetensors.index.json";
  auto source = weights_net(1);
  save_shards(source, dir.path);
  write_bytes(index, shard_index());
  auto target = weights_net(2);
  const auto report = styleinject::load_weights(*target, index);
  CHECK(report.metadata.at("total_size") == "72");
  CHECK(report.loaded.size() == 7);
  check_weights(*target, weights_of(*source));
}

TEST_CASE(
    "load_weights refuses a sharded checkpoint that does not add up, and "
    "leaves the module as it was",
    "[safetensors]") {
  TempDir dir;
  const auto index = dir.path + "/net.safetensors.index.json";
  save_shards(weights_net(1), dir.path);
  auto target = weights_net(2);
  const auto before = weights_of(*target);
  const auto refusal = [&](const std::string& text) {
    write_bytes(index, text);
    const auto error =
        error_of([&] { styleinject::load_weights(*target, index); });
    check_weights(*target, before);
    return error;
  };
  const std::string context = "styleinject::load_weights: '" + index + "': ";
  CHECK_THAT(
      refusal(
          shard_index("\"extra.weight\": \"net-00002-of-00002.safetensors\",")),
      Catch::Contains(
          context +
          "the index puts tensor 'extra.weight' in shard "
          "'net-00002-of-00002.safetensors', which does not hold it"));
  auto moved = shard_index();
  const std::string fc_bias =
      "\"fc.bias\": \"net-00001-of-00002.safetensors\", ";
  moved.erase(moved.find(fc_bias), fc_bias.size());
  CHECK_THAT(
      refusal(moved),
      Catch::Contains(
          context +
          "shard 'net-00001-of-00002.safetensors' holds tensor "
          "'fc.bias', which the index does not put there"));
  CHECK_THAT(
      refusal(shard_index("\"x\": \"../net-00001-of-00002.safetensors\",")),
      Catch::Contains(
          context +
          "expected the name of a file beside the index for tensor "
          "'x', but got \"../net-00001-of-00002.safetensors\""));
  CHECK_THAT(
      refusal(shard_index("\"x\": \"net-00003-of-00002.safetensors\",")),
      Catch::Contains(
          context + "shard 'net-00003-of-00002.safetensors': cannot open '" +
          dir.path + "/net-00003-of-00002.safetensors' for reading"));
  CHECK_THAT(
      refusal("{\"metadata\": {}}"),
      Catch::Contains(
          context +
          "expected a JSON object with a non-empty object "
          "\"weight_map\" (tensor name: shard file), but got no "
          "\"weight_map\""));
  CHECK_THAT(refusal("[1, 2]"), Catch::Contains("but got a JSON array"));
  CHECK_THAT(
      refusal("{\"weight_map\": {}}"),
      Catch::Contains("but got \"weight_map\": {}"));
  CHECK_THAT(
      refusal("{\"weight_map\": "),
      Catch::Contains(context + "the index is not valid JSON"));
}

TEST_CASE(
    "interop: a sharded checkpoint that huggingface_hub wrote",
    "[.interop][interop-shards]") {
  auto net = weights_net(3);
  const auto report = styleinject::load_weights(
      *net, interop_dir() + "/shards/net.safetensors.index.json");
  CHECK(report.loaded.size() == 7);
  for (const auto& [name, value] : weights_of(*net)) {
    INFO(name);
    const auto expected = name == "norm.num_batches_tracked"
        ? torch::tensor(7, torch::kLong)
        : interop_values(name, value.sizes(), 5, 0.5).to(torch::kFloat);
    CHECK(torch::equal(value, expected));
  }
}

TEST_CASE(
    "load_weights renames the file's names onto the module's",
    "[safetensors]") {
  TempDir dir;
  const auto path = dir.path + "/renamed.safetensors";
  auto source = weights_net(1);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& [name, value] : weights_of(*source)) {
    tensors.emplace_back("model." + name, value);
  }
  styleinject::save_safetensors(path, tensors);
  std::map<std::string, std::string> rename;
  for (const auto& [name, value] : tensors) {
    rename[name] = name.substr(6);
  }
  auto target = weights_net(2);
  styleinject::load_weights(
      *target, path, styleinject::LoadWeightsOptions().rename(rename));
  check_weights(*target, weights_of(*source));
}
