// One of two translation units that include every public header: linking
// them into one program proves the headers define nothing twice (ODR).

#include <styleinject/captured_step.h>
#include <styleinject/conv2d.h>
#include <styleinject/cuda/kernels.h>
#include <styleinject/cuda/nvrtc.h>
#include <styleinject/cuda/sources.h>
#include <styleinject/detail/checkpoint.h>
#include <styleinject/detail/json.h>
#include <styleinject/detail/regex.h>
#include <styleinject/detail/torch_compat.h>
#include <styleinject/distributed.h>
#include <styleinject/functional.h>
#include <styleinject/inject.h>
#include <styleinject/layer.h>
#include <styleinject/linear.h>
#include <styleinject/lora_files.h>
#include <styleinject/options.h>
#include <styleinject/safetensors.h>
#include <styleinject/serialize.h>
#include <styleinject/styleinject.h>
#include <styleinject/version.h>

#include <sstream>
#include <string>

std::string odr_b() {
  torch::manual_seed(7);
  styleinject::StyleInjectLinear layer(
      torch::nn::LinearOptions(4, 3), styleinject::StyleInjectOptions(2));
  std::ostringstream stream;
  layer->pretty_print(stream);
  stream << ' ' << styleinject::version << ' '
         << layer(torch::ones({1, 2, 4})).sum().item<float>();
  return stream.str();
}
