// libFuzzer target for the adapter-file reader: any input must give either
// contents or a c10::Error, never a crash, a hang or an out-of-bounds read
// (the build adds AddressSanitizer and UndefinedBehaviorSanitizer).

#include <styleinject/serialize.h>

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace detail = styleinject::detail;
  try {
    const auto contents = detail::safetensors::parse(data, size, "fuzz");
    const auto layers = contents.metadata.find(detail::kLayersKey);
    if (layers != contents.metadata.end()) {
      detail::parse_layer_records(layers->second, "fuzz");
    }
  } catch (const c10::Error&) {
    // A clear refusal is the expected outcome for most inputs.
  }
  return 0;
}
