// Uses StyleInject as a user's project would: declares an adaptable layer,
// injects an adapter, saves it to a file and loads it into a fresh model;
// and links the data-parallel part through styleinject::distributed.

#include <styleinject/distributed.h>
#include <styleinject/styleinject.h>

#include <cstdio>
#include <iostream>
#include <string>

struct NetImpl : torch::nn::Module {
  NetImpl()
      : proj(register_module("proj", styleinject::StyleInjectLinear(8, 4))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return proj(x);
  }
  styleinject::StyleInjectLinear proj;
};
TORCH_MODULE(Net);

int main() {
  torch::manual_seed(0);
  Net trained;
  const auto x = torch::randn({3, 5, 8});
  const auto base = trained(x);
  styleinject::inject(
      *trained,
      styleinject::Targets::all(),
      styleinject::StyleInjectOptions(2));
  bool ok = torch::equal(trained(x), base); // a fresh adapter is the identity
  {
    torch::NoGradGuard no_grad;
    for (auto& p : styleinject::adapter_parameters(*trained)) {
      p.add_(0.5);
    }
  }
  const std::string path = "consumer_adapter.safetensors";
  styleinject::save_adapters(*trained, path);
  torch::manual_seed(0);
  Net loaded; // the same base weights, no adapter yet
  styleinject::load_adapters(*loaded, path);
  std::remove(path.c_str());
  ok = ok && torch::equal(loaded(x), trained(x)) &&
      !torch::allclose(loaded(x), base);
  // One process: the data-parallel calls change nothing.
  styleinject::distributed::ProcessGroup group;
  const auto params = styleinject::adapter_parameters(*loaded);
  styleinject::distributed::broadcast_parameters(group, params);
  ok = ok && group.size() == 1 && torch::equal(loaded(x), trained(x));
  std::cout << "styleinject " << styleinject::version << ": "
            << (ok ? "ok" : "FAILED") << '\n';
  return ok ? 0 : 1;
}
