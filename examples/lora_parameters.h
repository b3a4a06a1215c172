#pragma once
// Shared by the examples' benchmarks.

#include <torch/nn/module.h>

#include <cstdint>

namespace examples {

/// LoRA's parameters per unit of rank over the layers of `model` that carry
/// a default adapter: the sum of in·k·k + out, read from each adapter's
/// lora_A (n, r, in, k, k) and lora_B (out, r). LoRA of about P parameters
/// on those layers has rank P / this.
inline int64_t lora_parameters_per_rank(const torch::nn::Module& model) {
  int64_t total = 0;
  for (const auto& p : model.named_parameters()) {
    const auto& key = p.key();
    if (key.size() >= 6 && key.compare(key.size() - 6, 6, "lora_A") == 0) {
      total += p.value()[0][0].numel(); // in·k·k
    } else if (
        key.size() >= 6 && key.compare(key.size() - 6, 6, "lora_B") == 0) {
      total += p.value().size(0); // out
    }
  }
  return total;
}

} // namespace examples
