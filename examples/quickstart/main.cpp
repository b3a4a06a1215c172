// Quick start: fine-tune one layer of a frozen model with StyleInject, and
// compare it with LoRA of at least the same number of trainable parameters.
//
// The task. Every sample is a sequence of tokens in one of four "styles";
// the style shows only in the sequence's mean. A pretrained model (frozen)
// is to learn a new behaviour per style: its hidden layer should map each
// style differently and change the spread of its features per style. That
// is what StyleInject's router (which style is this input?) and variance
// gate are for; LoRA applies one update to every input.

#include <styleinject/styleinject.h>

#include <fmt/format.h>
#include <torch/torch.h>

#include <chrono>
#include <sstream>

namespace {

constexpr int64_t kWidth = 16, kHidden = 64, kTokens = 16, kStyles = 4;
constexpr int64_t kBatch = 32, kSteps = 300;

// The model as it was pretrained, with plain torch::nn layers.
struct PretrainedNetImpl : torch::nn::Module {
  PretrainedNetImpl()
      : embed(register_module("embed", torch::nn::Linear(kWidth, kHidden))),
        hidden(register_module("hidden", torch::nn::Linear(kHidden, kHidden))),
        head(register_module("head", torch::nn::Linear(kHidden, kWidth))) {}
  torch::nn::Linear embed, hidden, head;
};
TORCH_MODULE(PretrainedNet);

// The same model, with the hidden layer declared as a StyleInject layer: the
// one-line change a user makes. Its weight and bias keep their names, so the
// pretrained checkpoint loads unchanged.
struct NetImpl : torch::nn::Module {
  explicit NetImpl(const styleinject::StyleInjectOptions& adapter)
      : embed(register_module("embed", torch::nn::Linear(kWidth, kHidden))),
        hidden(register_module(
            "hidden",
            styleinject::StyleInjectLinear(
                torch::nn::LinearOptions(kHidden, kHidden),
                adapter))),
        head(register_module("head", torch::nn::Linear(kHidden, kWidth))) {
    for (auto& p : embed->parameters()) {
      p.requires_grad_(false);
    }
    for (auto& p : head->parameters()) {
      p.requires_grad_(false);
    }
  }
  // x: (N, L, kWidth) -> (N, L, kWidth)
  torch::Tensor forward(const torch::Tensor& x) {
    return head(torch::gelu(hidden(torch::gelu(embed(x)))));
  }
  torch::nn::Linear embed;
  styleinject::StyleInjectLinear hidden;
  torch::nn::Linear head;
};
TORCH_MODULE(Net);

// Sequences in random styles: the style's centre plus noise on every token.
torch::Tensor sample(const torch::Tensor& centres, int64_t count) {
  const auto style = torch::randint(kStyles, {count});
  return centres.index_select(0, style).unsqueeze(1) +
      torch::randn({count, kTokens, kWidth});
}

int64_t count(const std::vector<torch::Tensor>& tensors) {
  int64_t total = 0;
  for (const auto& t : tensors) {
    total += t.numel();
  }
  return total;
}

struct Result {
  std::string method;
  int64_t trainable = 0, total = 0;
  double initial = 0, final = 0, seconds = 0;
};

Result finetune(
    const std::string& method,
    const styleinject::StyleInjectOptions& adapter,
    const std::string& pretrained,
    Net& teacher,
    const torch::Tensor& centres,
    const torch::Tensor& x_eval) {
  Net net(adapter);
  std::istringstream checkpoint(pretrained);
  torch::load(net, checkpoint);

  const auto target = [&](const torch::Tensor& x) {
    torch::NoGradGuard no_grad;
    return teacher(x);
  };
  const auto evaluate = [&] {
    torch::NoGradGuard no_grad;
    return torch::mse_loss(net(x_eval), target(x_eval)).item<double>();
  };
  Result result{
      method,
      count(net->hidden->adapter_parameters()),
      count(net->parameters())};
  result.initial = evaluate();

  // Only the adapter is trained.
  torch::optim::Adam optimizer(
      net->hidden->adapter_parameters(), torch::optim::AdamOptions(1e-2));
  const auto start = std::chrono::steady_clock::now();
  for (int64_t step = 1; step <= kSteps; ++step) {
    const auto x = sample(centres, kBatch);
    optimizer.zero_grad();
    const auto loss = torch::mse_loss(net(x), target(x));
    loss.backward();
    optimizer.step();
    if (step % 50 == 0) {
      fmt::print(
          "  {:<12} step {:>3}/{}  train loss {:.5f}\n",
          method,
          step,
          kSteps,
          loss.item<double>());
    }
  }
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  result.final = evaluate();
  return result;
}

} // namespace

int main() {
  torch::manual_seed(0);
  fmt::print(
      "StyleInject {} quick start (LibTorch {})\n\n",
      styleinject::version,
      TORCH_VERSION);

  // 1. A "pretrained" model, saved as an ordinary LibTorch checkpoint.
  PretrainedNet pretrained_net;
  std::ostringstream checkpoint;
  torch::save(pretrained_net, checkpoint);
  const std::string pretrained = checkpoint.str();

  // 2. The new behaviour to learn, made by a teacher: the same model whose
  //    hidden layer routes each style to its own update and variance gain.
  const auto centres = torch::randn({kStyles, kWidth}) * 1.5;
  Net teacher(styleinject::StyleInjectOptions(2).branches(kStyles));
  {
    std::istringstream in(pretrained);
    torch::load(teacher, in);
    torch::NoGradGuard no_grad;
    auto& layer = *teacher->hidden;
    layer.lora_B.normal_(0.0, 0.5);
    layer.gate.normal_(0.0, 1.0);
    // Route by style: the router's rows are the (centred) hidden features of
    // the style centres.
    const auto hidden_centres = torch::gelu(teacher->embed(centres));
    layer.router->weight.copy_(hidden_centres - hidden_centres.mean(0));
  }
  const auto x_eval = sample(centres, 512);

  // 3. Fine-tune StyleInject and LoRA with at least its parameter budget.
  const auto styleinject_options =
      styleinject::StyleInjectOptions(2).branches(kStyles);
  std::vector<Result> results;
  results.push_back(finetune(
      "StyleInject",
      styleinject_options,
      pretrained,
      teacher,
      centres,
      x_eval));
  const int64_t lora_rank =
      (results[0].trainable + 2 * kHidden - 1) / (2 * kHidden);
  results.push_back(finetune(
      fmt::format("LoRA r={}", lora_rank),
      styleinject::StyleInjectOptions::lora(lora_rank),
      pretrained,
      teacher,
      centres,
      x_eval));

  // 4. Report.
  fmt::print(
      "\n{:<12} | {:>9} | {:>9} | {:>12} | {:>12} | {:>6}\n",
      "method",
      "trainable",
      "total",
      "initial MSE",
      "final MSE",
      "time");
  fmt::print(
      "{:-<12}-|-{:->9}-|-{:->9}-|-{:->12}-|-{:->12}-|-{:->6}\n",
      "",
      "",
      "",
      "",
      "",
      "");
  for (const auto& r : results) {
    fmt::print(
        "{:<12} | {:>9} | {:>9} | {:>12.5f} | {:>12.5f} | {:>5.1f}s\n",
        r.method,
        r.trainable,
        r.total,
        r.initial,
        r.final,
        r.seconds);
  }
  fmt::print(
      "\nFinal error, LoRA over StyleInject: {:.1f}x, with {} vs {} trainable "
      "parameters.\n",
      results[1].final / results[0].final,
      results[0].trainable,
      results[1].trainable);
  return 0;
}
