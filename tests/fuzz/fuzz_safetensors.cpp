// libFuzzer target for the safetensors reader that load_safetensors,
// load_weights and load_adapters use: any input must give either contents
// or a c10::Error, never a crash, a hang or an out-of-bounds read (the build
// adds AddressSanitizer and UndefinedBehaviorSanitizer). The input is parsed
// as a mapped file is, its tensors aliasing the bytes, and every tensor is
// read, so that a span past the bytes is caught.

#include <styleinject/serialize.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace detail = styleinject::detail;
  // A heap copy of exactly `size` bytes, so that AddressSanitizer sees its
  // end; it lives as long as a tensor aliases it.
  const auto bytes = std::make_shared<std::vector<uint8_t>>(data, data + size);
  try {
    const auto contents =
        detail::safetensors::parse(bytes->data(), size, "fuzz", bytes);
    for (const auto& tensor : contents.tensors) {
      tensor.second.to(torch::kDouble).sum();
    }
    const auto layers = contents.metadata.find(detail::kLayersKey);
    if (layers != contents.metadata.end()) {
      detail::parse_layer_records(layers->second, "fuzz");
    }
  } catch (const c10::Error&) {
    // A clear refusal is the expected outcome for most inputs.
  }
  return 0;
}
