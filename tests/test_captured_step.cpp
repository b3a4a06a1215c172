// <styleinject/captured_step.h>: CapturableAdamW against LibTorch's AdamW,
// its state through a file, and CapturedStep's fixed shapes; on CUDA
// ([.cuda]), a captured and replayed StyleInject training step against the
// same steps run eagerly.

#include "support.h"

#include <styleinject/captured_step.h>

#include <catch2/catch.hpp>

#include <sstream>
#include <vector>

using styleinject::CapturableAdamW;
using styleinject::CapturedStep;
using styleinject_test::error_of;

namespace {

/// Parameters of a few shapes, float64, the same for a seed.
std::vector<torch::Tensor> some_parameters(uint64_t seed) {
  torch::manual_seed(seed);
  return {
      torch::randn({3, 4}, torch::kDouble).requires_grad_(),
      torch::randn({5}, torch::kDouble).requires_grad_(),
      torch::randn({2, 3, 2}, torch::kDouble).requires_grad_()};
}

/// Gives every parameter the gradient of step `k` (the same for a k).
void set_gradients(const std::vector<torch::Tensor>& params, int64_t k) {
  torch::manual_seed(100 + k);
  for (const auto& p : params) {
    p.mutable_grad() = torch::randn_like(p);
  }
}

/// A small model and a loss that it trains on: a StyleInject layer between
/// two plain ones.
struct StepNet : torch::nn::Module {
  StepNet() {
    in = register_module("in", torch::nn::Linear(6, 8));
    adapted = register_module(
        "adapted",
        styleinject::StyleInjectLinear(
            torch::nn::LinearOptions(8, 8),
            styleinject::StyleInjectOptions(2)));
    out = register_module("out", torch::nn::Linear(8, 3));
  }
  torch::Tensor loss(const torch::Tensor& x, const torch::Tensor& y) {
    const auto h = adapted(torch::gelu(in(x)));
    return torch::mse_loss(out(h).mean(1), y);
  }
  torch::nn::Linear in{nullptr}, out{nullptr};
  styleinject::StyleInjectLinear adapted{nullptr};
};

/// `to` takes `from`'s parameter values.
void copy_parameters(const StepNet& from, StepNet& to) {
  torch::NoGradGuard no_grad;
  const auto source = from.parameters();
  const auto target = to.parameters();
  for (size_t i = 0; i < source.size(); ++i) {
    target[i].copy_(source[i]);
  }
}

/// Two equal nets with random adapters and frozen plain layers: one to
/// train through CapturedStep, one by hand.
std::pair<std::shared_ptr<StepNet>, std::shared_ptr<StepNet>> twin_nets(
    uint64_t seed) {
  torch::manual_seed(seed);
  auto one = std::make_shared<StepNet>(), other = std::make_shared<StepNet>();
  styleinject_test::randomize_adapter(*one->adapted);
  copy_parameters(*one, *other);
  for (auto* net : {one.get(), other.get()}) {
    for (auto* plain : {&net->in, &net->out}) {
      (*plain)->weight.requires_grad_(false);
      (*plain)->bias.requires_grad_(false);
    }
  }
  return {one, other};
}

/// One training step of the adapter, in the form CapturedStep takes.
CapturedStep::Step training_step(
    StepNet& net,
    torch::optim::Optimizer& optimizer) {
  return [&](const std::vector<torch::Tensor>& in) {
    optimizer.zero_grad();
    auto loss = net.loss(in[0], in[1]);
    loss.backward();
    optimizer.step();
    return loss.detach();
  };
}

} // namespace

TEST_CASE("CapturableAdamW steps as LibTorch's AdamW", "[captured]") {
  for (const double decay : {0.0, 0.05}) {
    CAPTURE(decay);
    const auto ours = some_parameters(1), theirs = some_parameters(1);
    const auto options = torch::optim::AdamWOptions(3e-2)
                             .betas({0.8, 0.95})
                             .eps(1e-6)
                             .weight_decay(decay);
    CapturableAdamW capturable(ours, options);
    torch::optim::AdamW reference(theirs, options);
    for (int64_t k = 0; k < 6; ++k) {
      if (k == 3) { // a new learning rate on both
        capturable.set_learning_rate(1e-2);
        for (auto& group : reference.param_groups()) {
          static_cast<torch::optim::AdamWOptions&>(group.options()).lr(1e-2);
        }
      }
      set_gradients(ours, k);
      set_gradients(theirs, k);
      capturable.step();
      reference.step();
      for (size_t i = 0; i < ours.size(); ++i) {
        CHECK(torch::allclose(ours[i], theirs[i], 1e-12, 1e-14));
      }
    }
    // And they moved: the comparison is not of untouched tensors.
    CHECK_FALSE(torch::allclose(ours[0], some_parameters(1)[0], 1e-3, 1e-3));
  }
}

TEST_CASE(
    "CapturableAdamW skips a parameter without a gradient",
    "[captured]") {
  const auto params = some_parameters(2);
  const auto untouched = params[1].detach().clone();
  CapturableAdamW optimizer(params, torch::optim::AdamWOptions(0.1));
  set_gradients(params, 0);
  params[1].mutable_grad() = torch::Tensor();
  optimizer.step();
  CHECK(torch::equal(params[1], untouched));
}

TEST_CASE("CapturableAdamW's state through an archive", "[captured]") {
  const auto a = some_parameters(3), b = some_parameters(3);
  CapturableAdamW first(a, torch::optim::AdamWOptions(0.05));
  for (int64_t k = 0; k < 3; ++k) {
    set_gradients(a, k);
    first.step();
  }
  torch::serialize::OutputArchive out;
  first.save(out);
  std::stringstream bytes;
  out.save_to(bytes);
  // b takes a's values and state; both then step alike.
  CapturableAdamW second(b, torch::optim::AdamWOptions(0.05));
  torch::serialize::InputArchive in;
  in.load_from(bytes);
  second.load(in);
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < a.size(); ++i) {
      b[i].copy_(a[i]);
    }
  }
  set_gradients(a, 3);
  set_gradients(b, 3);
  first.step();
  second.step();
  for (size_t i = 0; i < a.size(); ++i) {
    CHECK(torch::equal(a[i], b[i]));
  }
  // A fresh optimizer that took no state steps otherwise (its step count
  // is 1, not 4).
  const auto c = some_parameters(3);
  {
    torch::NoGradGuard no_grad;
    c[0].copy_(b[0]);
  }
  CapturableAdamW fresh({c[0]}, torch::optim::AdamWOptions(0.05));
  set_gradients(a, 4);
  set_gradients(b, 4);
  c[0].mutable_grad() = b[0].grad().clone();
  second.step();
  fresh.step();
  CHECK_FALSE(torch::allclose(c[0], b[0], 1e-9, 1e-9));

  // The state of another number of parameters is refused.
  torch::serialize::InputArchive again;
  std::stringstream copy(bytes.str());
  again.load_from(copy);
  CHECK(
      error_of([&] { fresh.load(again); }) ==
      "styleinject::CapturableAdamW::load: the archive holds the state of 3 "
      "parameters, but this optimizer has 1");
}

TEST_CASE("CapturableAdamW's refusals", "[captured]") {
  const auto params = some_parameters(4);
  CHECK(
      error_of([&] {
        CapturableAdamW(params, torch::optim::AdamWOptions(0.1).amsgrad(true));
      }) ==
      "styleinject::CapturableAdamW: expected amsgrad(false), but got "
      "amsgrad(true), which it does not implement");
  // A second group, which its step would leave out.
  CapturableAdamW grouped(params, torch::optim::AdamWOptions(0.1));
  grouped.add_param_group(torch::optim::OptimizerParamGroup(
      {torch::zeros({2}, torch::kDouble).requires_grad_()}));
  CHECK(
      error_of([&] { grouped.step(); }) ==
      "styleinject::CapturableAdamW: expected its one parameter group, but "
      "it has 2");
  // A learning rate written to the options behind the tensor's back.
  CapturableAdamW optimizer(params, torch::optim::AdamWOptions(0.1));
  static_cast<torch::optim::AdamWOptions&>(
      optimizer.param_groups()[0].options())
      .lr(0.5);
  set_gradients(params, 0);
  CHECK(
      error_of([&] { optimizer.step(); }) ==
      "styleinject::CapturableAdamW: the learning rate was changed to 0.5 in "
      "its options, which a captured step would not see; use "
      "set_learning_rate");
}

TEST_CASE("CapturedStep runs the step on its own tensors", "[captured]") {
  const auto [stepped, direct] = twin_nets(5);
  CapturableAdamW opt_a(
      styleinject::adapter_parameters(*stepped),
      torch::optim::AdamWOptions(1e-2));
  CapturableAdamW opt_b(
      styleinject::adapter_parameters(*direct),
      torch::optim::AdamWOptions(1e-2));
  CapturedStep step(training_step(*stepped, opt_a), 2);
  const auto by_hand = training_step(*direct, opt_b);
  for (int64_t k = 0; k < 5; ++k) {
    const auto x = torch::randn({4, 5, 6});
    const auto y = torch::randn({4, 3});
    const auto loss = step({x, y});
    CHECK(torch::equal(loss, by_hand({x, y})));
  }
  CHECK_FALSE(step.captured()); // CPU tensors run eagerly
  const auto a = styleinject::adapter_parameters(*stepped);
  const auto b = styleinject::adapter_parameters(*direct);
  for (size_t i = 0; i < a.size(); ++i) {
    CHECK(torch::equal(a[i], b[i]));
  }

  // Shapes, dtypes, devices and the number of inputs stay as they were.
  CHECK(
      error_of([&] {
        step({torch::randn({2, 5, 6}), torch::randn({2, 3})});
      }) ==
      "styleinject::CapturedStep: input 0 is [2, 5, 6] float on cpu, but the "
      "step was made for [4, 5, 6] float on cpu; a captured step replays "
      "fixed shapes: make another CapturedStep for these");
  CHECK(
      error_of([&] {
        step({torch::randn({4, 5, 6}), torch::randn({4, 3}, torch::kDouble)});
      }) ==
      "styleinject::CapturedStep: input 1 is [4, 3] double on cpu, but the "
      "step was made for [4, 3] float on cpu; a captured step replays fixed "
      "shapes: make another CapturedStep for these");
  CHECK(
      error_of([&] {
        step({torch::randn({4, 5, 6})});
      }) ==
      "styleinject::CapturedStep: expected 2 inputs, as at its first call, "
      "but got 1");
  CHECK(error_of([&] {
          step({});
        }) == "styleinject::CapturedStep: expected inputs, got none");
  CHECK(
      error_of(
          [&] { CapturedStep([](const auto& in) { return in[0]; }, 0); }) ==
      "styleinject::CapturedStep: expected at least one warm-up call, but got "
      "0");
}

TEST_CASE(
    "on CUDA: a captured training step replays the eager steps",
    "[.cuda][captured]") {
  // main() reports this case as skipped without a CUDA device.
  REQUIRE(torch::cuda::is_available());
#ifdef STYLEINJECT_CUDA_GRAPHS
  const auto [captured, eager] = twin_nets(7);
  captured->to(torch::kCUDA);
  eager->to(torch::kCUDA);
  CapturableAdamW opt_a(
      styleinject::adapter_parameters(*captured),
      torch::optim::AdamWOptions(1e-2).weight_decay(0.01));
  CapturableAdamW opt_b(
      styleinject::adapter_parameters(*eager),
      torch::optim::AdamWOptions(1e-2).weight_decay(0.01));
  CapturedStep step(training_step(*captured, opt_a), 2);
  const auto by_hand = training_step(*eager, opt_b);
  for (int64_t k = 0; k < 8; ++k) {
    if (k == 5) { // a learning rate the captured graph must see
      opt_a.set_learning_rate(3e-3);
      opt_b.set_learning_rate(3e-3);
    }
    const auto x = torch::randn({4, 5, 6});
    const auto y = torch::randn({4, 3});
    const auto loss = step({x.cuda(), y.cuda()}).cpu();
    CHECK(
        torch::allclose(loss, by_hand({x.cuda(), y.cuda()}).cpu(), 1e-5, 1e-6));
  }
  CHECK(step.captured());
  const auto a = styleinject::adapter_parameters(*captured);
  const auto b = styleinject::adapter_parameters(*eager);
  for (size_t i = 0; i < a.size(); ++i) {
    CHECK(torch::allclose(a[i].cpu(), b[i].cpu(), 1e-5, 1e-6));
  }
#else
  FAIL("a CUDA device, but a build without STYLEINJECT_CUDA_GRAPHS");
#endif
}
