// libFuzzer target for import_lora's inputs: a PEFT adapter directory's
// adapter_config.json (its alpha_pattern keys are regular expressions that
// a file supplies) and the LoRA tensors' names, shapes and values. Any input
// must give either a report or a c10::Error, never a crash, a hang or
// another exception; after an error the model holds no adapter. The input
// is the config's text, a NUL byte, then the safetensors file.

#include <styleinject/styleinject.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace {

/// Layers with a UNet's names, a Linear and a Conv2d, under plain modules.
std::shared_ptr<torch::nn::Module> unet_like() {
  auto root = std::make_shared<torch::nn::Module>();
  auto attn =
      root->register_module("attn", std::make_shared<torch::nn::Module>());
  attn->register_module("to_q", styleinject::StyleInjectLinear(4, 4));
  attn->register_module("to_out", styleinject::StyleInjectLinear(4, 3));
  auto block =
      root->register_module("block", std::make_shared<torch::nn::Module>());
  block->register_module(
      "conv1",
      styleinject::StyleInjectConv2d(torch::nn::Conv2dOptions(4, 4, 3)));
  return root;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace detail = styleinject::detail;
  const auto* text = reinterpret_cast<const char*>(data);
  const auto* nul = static_cast<const char*>(std::memchr(text, 0, size));
  if (nul == nullptr) {
    return 0;
  }
  const auto bytes = std::make_shared<std::vector<uint8_t>>(
      data + (nul - text) + 1, data + size);
  auto model = unet_like();
  try {
    const auto config = detail::parse_json(text, nul, "fuzz", "config");
    const auto file =
        detail::safetensors::parse(bytes->data(), bytes->size(), "fuzz", bytes);
    detail::import_lora_contents(
        *model, file, config, styleinject::ImportLoraOptions(), "fuzz");
  } catch (const c10::Error&) {
    // A clear refusal, which leaves the model as it was.
    if (!styleinject::report(*model).layers.empty()) {
      std::abort();
    }
  }
  return 0;
}
