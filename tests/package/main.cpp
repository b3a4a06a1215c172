// Wraps a Linear, runs it, and checks what a user would check first.

#include <styleinject/styleinject.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  torch::nn::Linear base(8, 4);
  styleinject::StyleInjectLinear layer(
      base, styleinject::StyleInjectOptions(2));
  const auto x = torch::randn({3, 5, 8});
  const auto h = layer(x);
  layer->set_enabled(false);
  const bool ok = h.sizes() == torch::IntArrayRef{3, 5, 4} &&
      torch::equal(layer(x), base(x)) && torch::allclose(h, base(x));
  std::cout << "styleinject " << styleinject::version << ": "
            << (ok ? "ok" : "FAILED") << '\n';
  return ok ? 0 : 1;
}
