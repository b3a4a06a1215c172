// typeface: text-to-image fine-tuning on real typefaces, StyleInject against
// LoRA. See README.md ("The typeface example") for what each command does.
//
//   typeface pretrain                 # the base model on the base fonts
//   typeface finetune --method styleinject --style lobster --out runs/si
//   typeface sample --adapter runs/si/adapters.safetensors \
//       --prompt "the letter g in lobster style" --out g.png
//   typeface eval --adapter runs/si/adapters.safetensors --style lobster
//   typeface judge                    # the judge's classifiers
//   typeface experiment --setting few-shot [--quick]   # results/few-shot/
//   typeface experiment --setting targets --arch dit   # results/targets-dit/
//   typeface experiment --setting frontier             # results/frontier/
//   typeface demo                     # a small few-shot run, results/demo/
//
// finetune and experiment also run data-parallel on several processes:
//   torchrun --nproc-per-node 2 --no-python typeface finetune --out runs/si

#include "frontier.h"

#include "../keep_freed_memory.h"

#include <CLI/CLI.hpp>

#include <cstdlib>
#include <iostream>

namespace {

using namespace typeface;

/// The default cache of the base model and the classifier:
/// $XDG_CACHE_HOME/styleinject/typeface, or ~/.cache/styleinject/typeface.
std::string default_cache() {
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) {
    return (fs::path(xdg) / "styleinject" / "typeface").string();
  }
  const char* home = std::getenv("HOME");
  return (fs::path(home && *home ? home : ".") / ".cache" / "styleinject" /
          "typeface")
      .string();
}

Runtime runtime_of(const std::string& device, const std::string& dtype) {
  Runtime runtime;
  if (device == "cuda") {
    if (!torch::cuda::is_available()) {
      throw std::runtime_error(
          "--device cuda: this LibTorch sees no CUDA device (a CPU build, or no "
          "GPU); use --device cpu");
    }
    runtime.device = torch::kCUDA;
  }
  runtime.bfloat16 = dtype == "bfloat16";
  return runtime;
}

/// Joins the processes that torchrun (or RANK, WORLD_SIZE, MASTER_ADDR and
/// MASTER_PORT set by hand) started: each on its own GPU (LOCAL_RANK) with
/// CUDA; only rank 0 draws progress bars. One process: nothing to join.
void join_processes(Runtime& runtime, double timeout_seconds) {
  namespace dist = styleinject::distributed;
  const auto env = dist::Environment::from_env();
  if (runtime.device.is_cuda()) {
    runtime.device = torch::Device(
        torch::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
  }
  runtime.group = std::make_shared<dist::ProcessGroup>(
      env,
      runtime.device,
      dist::ProcessGroupOptions().timeout(std::chrono::milliseconds(
          static_cast<int64_t>(timeout_seconds * 1000))));
  progress_drawn() = runtime.is_main();
}

} // namespace

int main(int argc, char** argv) {
  examples::keep_freed_memory();
  CLI::App app{
      "typeface: fine-tune a small text-to-image model on real typefaces with "
      "StyleInject or LoRA"};
  app.require_subcommand(1);

  // Options every command shares.
  std::string device = "cpu", dtype = "float32", cache = default_cache();
  std::string model_size = "small", arch = "unet";
  uint64_t seed = 0;
  std::vector<std::string> font_files;
  double timeout = 300;
  // The commands that run on several processes.
  const auto parallel = [&](CLI::App* command) {
    command
        ->add_option(
            "--timeout",
            timeout,
            "seconds a process waits for the others (several processes) "
            "before it stops with an error")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
  };
  const auto shared = [&](CLI::App* command) {
    command->add_option("--device", device, "cpu or cuda")
        ->check(CLI::IsMember({"cpu", "cuda"}))
        ->capture_default_str();
    command
        ->add_option(
            "--dtype",
            dtype,
            "float32, or bfloat16 (autocast; weights stay float32)")
        ->check(CLI::IsMember({"float32", "bfloat16"}))
        ->capture_default_str();
    command->add_option("--seed", seed, "random seed")->capture_default_str();
    command
        ->add_option(
            "--cache", cache, "folder of the cached base model and judge")
        ->capture_default_str();
    command
        ->add_option(
            "--model",
            model_size,
            "model size: small (default) or tiny (tests)")
        ->check(CLI::IsMember({"small", "tiny"}))
        ->capture_default_str();
    command
        ->add_option(
            "--arch",
            arch,
            "denoiser: unet or dit; pretrain builds it, the other commands "
            "take base-<model> or base-dit-<model> (a --base has its own)")
        ->check(CLI::IsMember({"unet", "dit"}))
        ->capture_default_str();
    command->add_option(
        "--font",
        font_files,
        "NAME=PATH: a font file to use instead of fontconfig's, e.g. "
        "lobster=/usr/share/fonts/opentype/lobster/lobster.otf");
  };
  const auto font_paths = [&] {
    std::map<std::string, std::string> paths;
    for (const auto& entry : font_files) {
      const auto eq = entry.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == entry.size()) {
        throw std::invalid_argument(
            "--font expects NAME=PATH, but got '" + entry + "'");
      }
      if (!fs::exists(entry.substr(eq + 1))) {
        throw std::invalid_argument(
            "--font " + entry + ": no such file " + entry.substr(eq + 1));
      }
      paths[entry.substr(0, eq)] = entry.substr(eq + 1);
    }
    return paths;
  };
  const auto config = [&] {
    return model_size == "tiny" ? ModelConfig::tiny(arch)
                                : ModelConfig::small(arch);
  };

  // Options that several commands share.
  std::string base_dir, judge_dir;
  const auto base_option = [&](CLI::App* command) {
    command->add_option(
        "--base",
        base_dir,
        "base model folder (default: the shipped one, else the cache's)");
  };
  const auto judge_option = [&](CLI::App* command) {
    command->add_option(
        "--judge",
        judge_dir,
        "the judge's folder (default: the shipped one, else the cache's)");
  };
  // Returns the --base-prompts option.
  const auto judged_images = [](CLI::App* command, ExperimentOptions& options) {
    command->add_option("--images", options.images, "per prompt")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    return command
        ->add_option(
            "--base-prompts", options.base_prompts, "base-font prompts")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
  };

  // pretrain
  PretrainOptions pre;
  auto* pretrain_cmd = app.add_subcommand(
      "pretrain", "train the base model on the base fonts (cached)");
  shared(pretrain_cmd);
  pretrain_cmd->add_option("--steps", pre.steps, "training steps")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  pretrain_cmd->add_option("--batch", pre.batch)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  pretrain_cmd->add_option("--lr", pre.lr)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  pretrain_cmd->add_option("--checkpoint-every", pre.checkpoint_every)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  pretrain_cmd->add_flag(
      "--resume", pre.resume, "go on from the checkpoint in --out");
  pretrain_cmd->add_option(
      "--out",
      base_dir,
      "folder of the base model (default: <cache>/base-<model> for the UNet, "
      "<cache>/base-dit-<model> for the DiT)");

  // finetune
  FinetuneOptions tune;
  std::string run_dir;
  auto* finetune_cmd = app.add_subcommand(
      "finetune", "fine-tune an adapter on a few characters of a new style");
  shared(finetune_cmd);
  parallel(finetune_cmd);
  finetune_cmd->add_option("--method", tune.method)
      ->check(CLI::IsMember({"styleinject", "lora"}))
      ->capture_default_str();
  finetune_cmd
      ->add_option(
          "--style",
          tune.styles,
          "new styles (not base fonts), comma-separated: one adapter for all")
      ->delimiter(',')
      ->capture_default_str();
  finetune_cmd
      ->add_option("--shots", tune.shots, "characters of the style to train on")
      ->capture_default_str();
  finetune_cmd->add_flag(
      "--cuda-graph",
      tune.cuda_graph,
      "capture one training step in a CUDA graph and replay it (one "
      "process; on the CPU the step runs as without)");
  finetune_cmd->add_option("--steps", tune.steps)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  finetune_cmd->add_option("--batch", tune.batch)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  finetune_cmd->add_option("--lr", tune.lr)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  finetune_cmd->add_option("--rank", tune.rank)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  finetune_cmd->add_option("--branches", tune.branches, "StyleInject branches")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  finetune_cmd->add_option(
      "--targets",
      tune.targets,
      "the layers to adapt: a regular expression over their names, e.g. "
      "'.*attn[12]\\.to_(q|k|v|out)' (default: every Linear and Conv2d)");
  finetune_cmd->add_option("--checkpoint-every", tune.checkpoint_every)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  finetune_cmd->add_flag(
      "--resume", tune.resume, "go on from the checkpoint in --out");
  base_option(finetune_cmd);
  finetune_cmd
      ->add_option(
          "--out", run_dir, "folder for the adapter and its checkpoint")
      ->required();

  // sample
  std::vector<std::string> prompts;
  std::string adapter_file, out_file;
  SamplerOptions sampler;
  auto* sample_cmd =
      app.add_subcommand("sample", "generate a PNG row of prompts");
  shared(sample_cmd);
  sample_cmd
      ->add_option(
          "--prompt",
          prompts,
          "a caption, e.g. \"the letter g in lobster style\"")
      ->required();
  sample_cmd->add_option(
      "--adapter", adapter_file, "adapters.safetensors from finetune");
  base_option(sample_cmd);
  sample_cmd->add_option("--steps", sampler.steps, "DDIM steps")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  sample_cmd
      ->add_option(
          "--guidance", sampler.guidance, "classifier-free guidance scale")
      ->capture_default_str();
  sample_cmd->add_option("--out", out_file, "PNG file")->required();

  // eval
  std::string style = "lobster", metrics_file;
  int64_t shots = tune.shots;
  auto* eval_cmd = app.add_subcommand(
      "eval", "alignment, style fit and base retention, as JSON");
  shared(eval_cmd);
  eval_cmd->add_option(
      "--adapter", adapter_file, "adapters.safetensors (none: the base model)");
  base_option(eval_cmd);
  eval_cmd->add_option("--style", style)->capture_default_str();
  eval_cmd
      ->add_option(
          "--shots", shots, "the fine-tune's --shots (to hold out the rest)")
      ->capture_default_str();
  eval_cmd->add_option("--out", metrics_file, "JSON file (default: stdout)");
  ExperimentOptions evaluation;
  judged_images(eval_cmd, evaluation);
  eval_cmd->add_option("--sample-steps", evaluation.sampler.steps, "DDIM steps")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  eval_cmd
      ->add_option(
          "--guidance",
          evaluation.sampler.guidance,
          "classifier-free guidance scale")
      ->capture_default_str();
  judge_option(eval_cmd);

  // demo
  ExperimentOptions demo = ExperimentOptions::demo();
  int64_t pretrain_steps = PretrainOptions{}.steps;
  auto* demo_cmd = app.add_subcommand(
      "demo",
      "the few-shot experiment on one style, small: fine-tune StyleInject and "
      "LoRA on the shipped base model, judge, write results/");
  shared(demo_cmd);
  demo_cmd->add_option("--style", demo.styles[0])->capture_default_str();
  demo_cmd->add_option("--shots", demo.shots[0])->capture_default_str();
  demo_cmd->add_option("--seeds", demo.seeds, "seeds per method")
      ->check(CLI::Range(2, 1000))
      ->capture_default_str();
  judged_images(demo_cmd, demo);
  demo_cmd->add_option("--steps", demo.steps, "fine-tune steps per run")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  demo_cmd
      ->add_option(
          "--pretrain-steps",
          pretrain_steps,
          "where no base model is shipped or cached: pretraining steps")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  demo_cmd
      ->add_option(
          "--judge-steps",
          demo.judge_steps,
          "where no judge is shipped or cached: its training steps")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  demo_cmd
      ->add_option(
          "--lrs",
          demo.lrs,
          "learning rates searched for every method (one: no search)")
      ->delimiter(',')
      ->capture_default_str();
  demo_cmd->add_option("--results", demo.results, "output folder")
      ->capture_default_str();

  judge_option(demo_cmd);

  // judge
  ExperimentOptions experiment;
  auto* judge_cmd = app.add_subcommand(
      "judge",
      "train (or load) the experiments' judge, an ensemble of glyph "
      "classifiers, and print its held-out accuracy");
  shared(judge_cmd);
  judge_cmd->add_option(
      "--out", judge_dir, "its folder (default: the cache's)");
  judge_cmd->add_option("--members", experiment.judge_members)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  judge_cmd->add_option("--steps", experiment.judge_steps)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();

  // experiment
  auto* experiment_cmd = app.add_subcommand(
      "experiment",
      "StyleInject against LoRA (few-shot, multi-style, distill), its own "
      "variants (ablation) or on fewer layers (targets), or as a trade-off "
      "of style fit against retention over learning rate and strength "
      "(frontier), with seeds, several images per prompt and paired 95 % "
      "intervals");
  shared(experiment_cmd);
  parallel(experiment_cmd);
  experiment_cmd->add_option("--setting", experiment.setting)
      ->check(CLI::IsMember(
          {"few-shot",
           "ablation",
           "targets",
           "multi-style",
           "distill",
           "frontier"}))
      ->capture_default_str();
  experiment_cmd->add_flag(
      "--quick",
      experiment.quick,
      "one style (multi-style, distill: two), one K, 2 seeds, 2 images per "
      "prompt, 40 steps (and teacher steps), no search (frontier: learning "
      "rates 0.001,0.003, strengths 0.5,1)");
  experiment_cmd
      ->add_option(
          "--styles",
          experiment.styles,
          "new styles (default: all six; ablation, targets: lobster)")
      ->delimiter(',');
  auto* shots_option =
      experiment_cmd
          ->add_option(
              "--shots",
              experiment.shots,
              "K values (default: 16,4; ablation, targets: 16; "
              "multi-style: 38)")
          ->delimiter(',');
  experiment_cmd
      ->add_option(
          "--test-prompts",
          experiment.test_prompts,
          "test characters per style (0: every held-out one)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  experiment_cmd->add_option("--seeds", experiment.seeds)
      ->check(CLI::Range(2, 1000))
      ->capture_default_str();
  auto* base_prompts_option = judged_images(experiment_cmd, experiment);
  auto* steps_option =
      experiment_cmd
          ->add_option(
              "--steps",
              experiment.steps,
              "fine-tune steps (default: 100; multi-style: 600)")
          ->check(CLI::PositiveNumber);
  auto* lrs_option =
      experiment_cmd
          ->add_option(
              "--lrs",
              experiment.lrs,
              "learning rates searched for every arm (default: 0.001,0.003,"
              "0.01; multi-style: 0.001,0.003; frontier: every arm at each "
              "of 0.0003,0.001,0.003)")
          ->delimiter(',');
  experiment_cmd
      ->add_option(
          "--strengths",
          experiment.strengths,
          "frontier: the strengths each adapter is sampled at")
      ->delimiter(',')
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  base_option(experiment_cmd);
  judge_option(experiment_cmd);
  experiment_cmd
      ->add_option(
          "--judge-members",
          experiment.judge_members,
          "classifiers in the judge")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  experiment_cmd
      ->add_option(
          "--judge-steps", experiment.judge_steps, "training steps of each")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  experiment_cmd
      ->add_option(
          "--teacher-steps",
          experiment.teacher_steps,
          "distill: steps of the teacher's full fine-tune")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  experiment_cmd->add_option("--results", experiment.results, "output folder")
      ->capture_default_str();

  CLI11_PARSE(app, argc, argv);

  try {
    auto runtime = runtime_of(device, dtype);
    if (*finetune_cmd || *experiment_cmd) {
      join_processes(runtime, timeout);
    } else if (
        styleinject::distributed::Environment::from_env().world_size > 1) {
      throw std::invalid_argument(
          "only finetune and experiment run on several processes; start " +
          std::string(app.get_subcommands()[0]->get_name()) +
          " as one (WORLD_SIZE is " + std::getenv("WORLD_SIZE") + ")");
    }
    torch::manual_seed(seed);
    const auto model_config = config();
    // The shipped base model and judge (assets/) unless told otherwise;
    // `pretrain` writes into the cache.
    const auto shipped_or_cached = [&](const std::string& name) {
      const auto shipped = shipped_assets() / (name + "-" + model_size);
      return fs::exists(shipped) ? shipped
                                 : fs::path(cache) / (name + "-" + model_size);
    };
    // base-small is the UNet (its name before the DiT), base-dit-small the DiT.
    const std::string base_name = arch == "unet" ? "base" : "base-" + arch;
    const auto base = !base_dir.empty() ? fs::path(base_dir)
        : *pretrain_cmd ? fs::path(cache) / (base_name + "-" + model_size)
                        : shipped_or_cached(base_name);
    const auto judge_path =
        judge_dir.empty() ? shipped_or_cached("judge") : fs::path(judge_dir);
    if (*pretrain_cmd) {
      pre.config = model_config;
      pre.seed = seed;
      GlyphRenderer renderer(
          base_fonts(), model_config.image_size, font_paths());
      pretrain(pre, base, renderer, runtime);
      std::cout << "base model saved in " << base.string() << "\n";
    } else if (*finetune_cmd) {
      tune.seed = seed;
      GlyphRenderer renderer(
          new_style_fonts(tune.styles), model_config.image_size, font_paths());
      finetune(tune, base, run_dir, renderer, runtime);
      if (runtime.is_main()) {
        std::cout << "adapters saved in "
                  << (fs::path(run_dir) / "adapters.safetensors").string()
                  << "\n";
      }
    } else if (*sample_cmd) {
      const Tokenizer tokenizer;
      const auto ids = tokenizer.encode(prompts).to(runtime.device);
      auto model = load_base(base, runtime.device);
      if (!adapter_file.empty()) {
        styleinject::load_adapters(*model, adapter_file);
      }
      sampler.seed = seed;
      torch::Tensor images;
      {
        Progress progress("sample", sampler.steps);
        AutocastGuard autocast(runtime);
        images = sample(model, NoiseSchedule(), ids, sampler, &progress);
      }
      write_png(out_file, grid({images}, 4));
      std::cout << "wrote " << out_file << "\n";
    } else if (*eval_cmd) {
      auto model = load_base(base, runtime.device);
      if (!adapter_file.empty()) {
        styleinject::load_adapters(*model, adapter_file);
      }
      GlyphRenderer renderer(
          all_fonts(), model_config.image_size, font_paths());
      auto judge = load_or_train_judge(
          judge_path,
          evaluation.judge_members,
          evaluation.judge_steps,
          renderer,
          runtime);
      auto metrics = judge_model(
                         model,
                         judge,
                         {font_index(style)},
                         split_characters(shots).test,
                         evaluation,
                         runtime)[0]
                         .scores;
      for (const auto& measure : measures_of(metrics)) {
        metrics[std::string(measure.key) + "_mean"] =
            mean(metrics[measure.key]);
      }
      metrics["test_characters"] = split_characters(shots).test;
      const auto text = metrics.dump(2);
      if (metrics_file.empty()) {
        std::cout << text << "\n";
      } else {
        write_text(metrics_file, text);
      }
    } else if (*judge_cmd) {
      GlyphRenderer renderer(
          all_fonts(), model_config.image_size, font_paths());
      const auto dir = judge_dir.empty()
          ? fs::path(cache) / ("judge-" + model_size)
          : fs::path(judge_dir);
      const auto judge = load_or_train_judge(
          dir,
          experiment.judge_members,
          experiment.judge_steps,
          renderer,
          runtime);
      std::cout << judge.report.dump(2) << "\njudge in " << dir.string()
                << "\n";
    } else if (*experiment_cmd) {
      experiment.base_dir = base;
      experiment.judge_dir = judge_path;
      experiment.seed = seed;
      const ExperimentOptions::Given given{
          shots_option->count() > 0,
          steps_option->count() > 0,
          base_prompts_option->count() > 0,
          lrs_option->count() > 0,
          experiment_cmd->get_option("--images")->count() > 0,
          experiment_cmd->get_option("--strengths")->count() > 0};
      experiment.setting_defaults(given);
      if (experiment.quick) {
        experiment.make_quick(given);
      }
      if (experiment.setting == "frontier") {
        run_frontier(experiment, font_paths(), runtime);
      } else {
        run_experiment(experiment, font_paths(), runtime);
      }
    } else if (*demo_cmd) {
      if (!base_complete(base)) {
        PretrainOptions pre;
        pre.config = model_config;
        pre.steps = pretrain_steps;
        pre.seed = seed;
        pre.resume = fs::exists(config_file(base));
        std::cerr << "no base model shipped or cached: pretraining into "
                  << base << "\n";
        GlyphRenderer renderer(
            base_fonts(), model_config.image_size, font_paths());
        pretrain(pre, base, renderer, runtime);
      }
      demo.base_dir = base;
      demo.judge_dir = judge_path;
      demo.seed = seed;
      run_experiment(demo, font_paths(), runtime);
    }
  } catch (const c10::Error& error) {
    std::cerr << "error: " << error.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
