#pragma once

/// A whole training step (forward, backward, optimizer step) captured once
/// in a CUDA graph and replayed: one launch per step instead of one per
/// kernel, PyTorch's "whole network capture" for any LibTorch model.
/// Not part of <styleinject/styleinject.h>.
///
/// Example:
///   styleinject::CapturableAdamW optimizer(
///       styleinject::adapter_parameters(*model), AdamWOptions(1e-3));
///   styleinject::CapturedStep step([&](const std::vector<Tensor>& in) {
///     optimizer.zero_grad();
///     auto loss = loss_of(model, in[0], in[1]);
///     loss.backward();
///     optimizer.step();
///     return loss.detach();
///   });
///   for (...) {
///     const auto loss = step({images, labels}); // same shapes every call
///   }
///
/// The graph replays the kernels the step launched while it was captured,
/// on the tensors they used, and nothing the host did: a step must not
/// read tensors back (`.item()`), branch on their values or change its
/// shapes, and what changes from step to step must live in tensors (inputs,
/// parameters, optimizer state; random numbers from the CUDA generator
/// advance by themselves). LibTorch's own optimizers compute their bias
/// corrections on the host, so a captured step keeps the first one:
/// CapturableAdamW keeps its step count and learning rate in tensors.
///
/// CUDA graphs need a LibTorch built with CUDA and STYLEINJECT_CUDA_GRAPHS
/// defined (CMake's styleinject::styleinject defines it where Torch has
/// `torch_cuda`). Elsewhere, and on CPU tensors, the step runs eagerly with
/// the same checks, so the same program runs on every machine.

#include <torch/torch.h>

#ifdef STYLEINJECT_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace styleinject {

/// AdamW (decoupled weight decay, no amsgrad) over one group of parameters
/// whose step is tensor operations only, on the parameters' device: each
/// parameter's step count and the learning rate are float64 tensors, so
/// that a CUDA graph replays every later step as it would run. The update
/// equals torch::optim::AdamW's. Change the learning rate with
/// set_learning_rate, which writes the tensor that a captured step reads.
class CapturableAdamW : public torch::optim::Optimizer {
 public:
  CapturableAdamW(
      std::vector<torch::Tensor> parameters,
      torch::optim::AdamWOptions options = {})
      : Optimizer(
            {torch::optim::OptimizerParamGroup(std::move(parameters))},
            std::make_unique<torch::optim::AdamWOptions>(options)) {
    TORCH_CHECK_VALUE(
        !options.amsgrad(),
        "styleinject::CapturableAdamW: expected amsgrad(false), but got "
        "amsgrad(true), which it does not implement");
    const auto& params = param_groups()[0].params();
    learning_rate_value_ = options.lr();
    learning_rate_ = torch::full(
        {},
        options.lr(),
        torch::dtype(torch::kDouble)
            .device(params.empty() ? torch::kCPU : params[0].device()));
    for (const auto& p : params) {
      states_.push_back(
          {torch::zeros_like(p, torch::MemoryFormat::Preserve),
           torch::zeros_like(p, torch::MemoryFormat::Preserve),
           torch::zeros({}, p.options().dtype(torch::kDouble))});
    }
  }

  /// The learning rate from now on; a captured step sees it too, as this
  /// writes the tensor that the step reads.
  void set_learning_rate(double lr) {
    options().lr(lr);
    learning_rate_.fill_(lr);
    learning_rate_value_ = lr;
  }

  torch::Tensor step(LossClosure closure = nullptr) override {
    torch::NoGradGuard no_grad;
    torch::Tensor loss;
    if (closure != nullptr) {
      torch::AutoGradMode enable_grad(true);
      loss = closure();
    }
    TORCH_CHECK(
        param_groups().size() == 1,
        "styleinject::CapturableAdamW: expected its one parameter group, but "
        "it has ",
        param_groups().size());
    const auto& options = this->options();
    TORCH_CHECK(
        options.lr() == learning_rate_value_,
        "styleinject::CapturableAdamW: the learning rate was changed to ",
        options.lr(),
        " in its options, which a captured step would not see; use "
        "set_learning_rate");
    const auto& lr = learning_rate_;
    const auto [beta1, beta2] = options.betas();
    const auto& params = param_groups()[0].params();
    for (size_t i = 0; i < params.size(); ++i) {
      auto p = params[i];
      if (!p.grad().defined()) {
        continue;
      }
      auto& state = states_[i];
      // Tensors only: the host adds nothing that changes between steps.
      state.step.add_(1);
      if (options.weight_decay() != 0) {
        p.mul_(1 - lr * options.weight_decay());
      }
      const auto& grad = p.grad();
      state.exp_avg.mul_(beta1).add_(grad, 1 - beta1);
      state.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
      const auto correction1 = 1 - torch::pow(beta1, state.step);
      const auto correction2 = 1 - torch::pow(beta2, state.step);
      const auto denominator =
          (state.exp_avg_sq.sqrt() / correction2.sqrt()).add_(options.eps());
      p.sub_(state.exp_avg / denominator * (lr / correction1));
    }
    return loss;
  }

  void save(torch::serialize::OutputArchive& archive) const override {
    archive.write("parameters", c10::IValue(int64_t(states_.size())));
    for (size_t i = 0; i < states_.size(); ++i) {
      const auto key = std::to_string(i);
      archive.write("exp_avg/" + key, states_[i].exp_avg);
      archive.write("exp_avg_sq/" + key, states_[i].exp_avg_sq);
      archive.write("step/" + key, states_[i].step);
    }
  }

  /// Reads what save() wrote, in place (a captured step goes on with it).
  void load(torch::serialize::InputArchive& archive) override {
    c10::IValue count;
    archive.read("parameters", count);
    TORCH_CHECK_VALUE(
        count.toInt() == static_cast<int64_t>(states_.size()),
        "styleinject::CapturableAdamW::load: the archive holds the state of ",
        count.toInt(),
        " parameters, but this optimizer has ",
        states_.size());
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < states_.size(); ++i) {
      auto& state = states_[i];
      const auto key = std::to_string(i);
      for (const auto& [name, into] :
           {std::pair<std::string, torch::Tensor*>{"exp_avg/", &state.exp_avg},
            {"exp_avg_sq/", &state.exp_avg_sq},
            {"step/", &state.step}}) {
        torch::Tensor value;
        archive.read(name + key, value);
        TORCH_CHECK_VALUE(
            value.sizes() == into->sizes(),
            "styleinject::CapturableAdamW::load: ",
            name,
            key,
            " is ",
            value.sizes(),
            " in the archive, but ",
            into->sizes(),
            " here");
        into->copy_(value);
      }
    }
  }

 private:
  /// One parameter's moments and step count.
  struct State {
    torch::Tensor exp_avg, exp_avg_sq, step;
  };

  torch::optim::AdamWOptions& options() {
    return static_cast<torch::optim::AdamWOptions&>(
        param_groups()[0].options());
  }

  torch::Tensor learning_rate_;
  double learning_rate_value_ = 0; // what the tensor holds, on the host
  std::vector<State> states_;
};

/// A training step of fixed input shapes, run as a CUDA graph where its
/// inputs are CUDA tensors and CUDA graphs are built in (see the file's
/// comment): `warmup` eager calls on a side stream, then one capture, then
/// replays. Each call copies its inputs into the step's own tensors first,
/// and returns the step's output tensor, which the next call overwrites.
class CapturedStep {
 public:
  using Step = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;

  explicit CapturedStep(Step step, int64_t warmup = 3)
      : step_(std::move(step)), warmup_(warmup) {
    TORCH_CHECK_VALUE(
        warmup_ >= 1,
        "styleinject::CapturedStep: expected at least one warm-up call, but "
        "got ",
        warmup_);
  }

  torch::Tensor operator()(const std::vector<torch::Tensor>& inputs) {
    take(inputs);
    ++calls_;
#ifdef STYLEINJECT_CUDA_GRAPHS
    if (inputs_[0].is_cuda()) {
      return on_cuda();
    }
#endif
    output_ = step_(inputs_);
    return output_;
  }

  /// Whether the step now replays a graph.
  bool captured() const {
#ifdef STYLEINJECT_CUDA_GRAPHS
    return graph_ != nullptr;
#else
    return false;
#endif
  }

 private:
  static std::string describe(const torch::Tensor& t) {
    std::ostringstream text;
    text << t.sizes() << " " << t.dtype() << " on " << t.device();
    return text.str();
  }

  /// Copies `inputs` into the step's tensors, made like them at the first
  /// call; any later difference but their values is refused.
  void take(const std::vector<torch::Tensor>& inputs) {
    TORCH_CHECK_VALUE(
        !inputs.empty(),
        "styleinject::CapturedStep: expected inputs, got none");
    if (inputs_.empty()) {
      for (const auto& input : inputs) {
        inputs_.push_back(input.detach().clone());
      }
      return;
    }
    TORCH_CHECK_VALUE(
        inputs.size() == inputs_.size(),
        "styleinject::CapturedStep: expected ",
        inputs_.size(),
        " inputs, as at its first call, but got ",
        inputs.size());
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const auto& in = inputs[i];
      TORCH_CHECK_VALUE(
          in.sizes() == inputs_[i].sizes() &&
              in.scalar_type() == inputs_[i].scalar_type() &&
              in.device() == inputs_[i].device(),
          "styleinject::CapturedStep: input ",
          i,
          " is ",
          describe(in),
          ", but the step was made for ",
          describe(inputs_[i]),
          "; a captured step replays fixed shapes: make another CapturedStep "
          "for these");
      inputs_[i].copy_(in, /*non_blocking=*/true);
    }
  }

#ifdef STYLEINJECT_CUDA_GRAPHS
  torch::Tensor on_cuda() {
    if (graph_ != nullptr) {
      graph_->replay();
      return output_;
    }
    // Warm-up and capture on a side stream, as CUDA graphs want; the host
    // waits at these first calls only.
    torch::cuda::synchronize();
    {
      c10::cuda::CUDAStreamGuard side(c10::cuda::getStreamFromPool());
      if (calls_ <= warmup_) {
        output_ = step_(inputs_);
      } else {
        graph_ = std::make_unique<at::cuda::CUDAGraph>();
        graph_->capture_begin();
        output_ = step_(inputs_);
        graph_->capture_end();
      }
    }
    torch::cuda::synchronize();
    if (graph_ != nullptr) {
      graph_->replay(); // a capture records the step without running it
    }
    return output_;
  }

  std::unique_ptr<at::cuda::CUDAGraph> graph_;
#endif

  Step step_;
  int64_t warmup_;
  int64_t calls_ = 0;
  std::vector<torch::Tensor> inputs_;
  torch::Tensor output_;
};

} // namespace styleinject
