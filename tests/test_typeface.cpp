// The typeface example (examples/typeface): glyph rendering, captions, the
// model's shapes, one training step, the sampler. Its command line and an
// end-to-end run are CTest tests of the executable (tests/typeface/).

#include <catch2/catch.hpp>

#include "demo.h"

#include <torch/torch.h>

#include <set>

using namespace typeface;

namespace {

std::string error_text(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

ModelConfig tiny_config() {
  auto config = ModelConfig::tiny();
  const Tokenizer tokenizer;
  config.vocabulary = tokenizer.vocabulary_size();
  config.context = tokenizer.length();
  return config;
}

} // namespace

TEST_CASE("every font of the catalogue renders all 62 glyphs", "[typeface]") {
  REQUIRE(characters().size() == 62);
  GlyphRenderer renderer(all_fonts(), 32); // throws for a missing glyph
  std::mt19937_64 rng(0);
  for (const auto font : all_fonts()) {
    for (const char c : characters()) {
      const auto image = renderer.render(font, c, &rng);
      REQUIRE(image.sizes() == torch::IntArrayRef({32, 32}));
      INFO(catalogue()[font].name << " '" << c << "'");
      // Ink, inside [0, 1], and not a filled box.
      CHECK(image.sum().item<double>() > 3);
      CHECK(image.min().item<float>() >= 0);
      CHECK(image.max().item<float>() <= 1);
      CHECK(image.mean().item<double>() < 0.5);
    }
  }
}

TEST_CASE("renders are deterministic with a seed and jittered", "[typeface]") {
  GlyphRenderer renderer({font_index("dejavu sans")}, 24);
  const auto font = font_index("dejavu sans");
  std::mt19937_64 a(7), b(7), c(8);
  const auto first = renderer.render(font, 'g', &a);
  CHECK(torch::equal(first, renderer.render(font, 'g', &b)));
  CHECK(!torch::equal(first, renderer.render(font, 'g', &c)));
  // No two renders of one stream are identical.
  CHECK(!torch::equal(
      renderer.render(font, 'g', &a), renderer.render(font, 'g', &a)));
  // Without jitter, the same image every time.
  CHECK(torch::equal(
      renderer.render(font, 'g', nullptr),
      renderer.render(font, 'g', nullptr)));
}

TEST_CASE(
    "glyphs keep their size relations: lower case below capitals",
    "[typeface]") {
  GlyphRenderer renderer({font_index("dejavu serif")}, 32);
  const auto font = font_index("dejavu serif");
  const auto ink_rows = [&](char c) {
    return renderer.render(font, c, nullptr)
        .sum(1)
        .gt(0.1)
        .sum()
        .item<int64_t>();
  };
  CHECK(ink_rows('o') < ink_rows('O'));
  CHECK(ink_rows('x') < ink_rows('X'));
}

TEST_CASE(
    "a missing font is an error that names its Debian package",
    "[typeface]") {
  const FontSpec missing{
      "nowhere", "No Such Family 12345", "Regular", "fonts-nowhere", false};
  const auto message = error_text([&] { find_font_file(missing, {}); });
  CHECK_THAT(message, Catch::Contains("font 'nowhere'"));
  CHECK_THAT(message, Catch::Contains("apt-get install fonts-nowhere"));
  CHECK_THAT(
      error_text([] {
        GlyphRenderer(
            {font_index("lobster")}, 32, {{"lobster", "/nonexistent.otf"}});
      }),
      Catch::Contains("could not open '/nonexistent.otf'"));
  CHECK_THAT(
      error_text([] { font_index("comic sans"); }),
      Catch::Contains(
          "unknown font 'comic sans'; expected one of: dejavu sans"));
}

TEST_CASE("captions round-trip through the tokenizer", "[typeface]") {
  const Tokenizer tokenizer;
  std::set<std::string> seen;
  for (const auto& font : catalogue()) {
    for (const char c : characters()) {
      const auto text = caption(c, font.name);
      CHECK(tokenizer.decode(tokenizer.encode(text)) == text);
      seen.insert(text);
    }
  }
  CHECK(seen.size() == catalogue().size() * 62);
  CHECK(caption('g', "lobster") == "the letter g in lobster style");
  CHECK(caption('7', "humor sans") == "the digit 7 in humor sans style");
  // The empty caption is all padding: the unconditional prompt.
  CHECK(tokenizer.encode("").sum().item<int64_t>() == 0);
  CHECK_THAT(
      error_text([&] { tokenizer.encode("the letter g in papyrus style"); }),
      Catch::Contains("unknown word 'papyrus'"));
}

TEST_CASE("the model's shapes", "[typeface]") {
  torch::manual_seed(0);
  const auto config = tiny_config();
  TextToImage model(config);
  const auto s = config.image_size;
  const auto ids = Tokenizer().encode(std::vector<std::string>{
      "the letter g in lobster style", "the digit 7 in dejavu sans style", ""});
  CHECK(
      model->text(ids).sizes() ==
      torch::IntArrayRef({3, config.context, config.text_dim}));
  const auto eps =
      model(torch::randn({3, 1, s, s}), torch::tensor({0, 500, 999}), ids);
  CHECK(eps.sizes() == torch::IntArrayRef({3, 1, s, s}));
  GlyphClassifier classifier(s, 62, static_cast<int64_t>(catalogue().size()));
  const auto [chars, fonts] = classifier->forward(torch::rand({5, 1, s, s}));
  CHECK(chars.sizes() == torch::IntArrayRef({5, 62}));
  CHECK(
      fonts.sizes() ==
      torch::IntArrayRef({5, static_cast<int64_t>(catalogue().size())}));
  // Every Linear and Conv2d takes an adapter; the base stays frozen.
  const auto report = styleinject::inject(
      *model, styleinject::Targets::all(), styleinject::StyleInjectOptions(2));
  CHECK(report.layers.size() > 30);
  for (const auto& p : model->named_parameters()) {
    const bool adapter = p.key().find("lora_") != std::string::npos ||
        p.key().find("router") != std::string::npos ||
        p.key().find("gate") != std::string::npos;
    INFO(p.key());
    CHECK(p.value().requires_grad() == adapter);
  }
}

TEST_CASE("one training step lowers the loss on a fixed batch", "[typeface]") {
  const auto config = tiny_config();
  GlyphRenderer renderer(base_fonts(), config.image_size);
  std::mt19937_64 rng(3);
  const auto batch =
      draw_batch(renderer, Tokenizer(), base_fonts(), characters(), 16, rng);
  const auto images = batch.images * 2 - 1;
  const auto loss_at_fixed_noise = [&](TextToImage& model) {
    torch::manual_seed(11); // the same timesteps and noise every time
    return diffusion_loss(model, NoiseSchedule(), images, batch.ids);
  };
  SECTION("the whole model (pretraining)") {
    torch::manual_seed(0);
    TextToImage model(config);
    torch::optim::AdamW optimizer(
        model->parameters(), torch::optim::AdamWOptions(1e-3));
    const auto before = loss_at_fixed_noise(model);
    optimizer.zero_grad();
    before.backward();
    optimizer.step();
    CHECK(loss_at_fixed_noise(model).item<double>() < before.item<double>());
  }
  SECTION("only the adapters (fine-tuning)") {
    torch::manual_seed(0);
    TextToImage model(config);
    styleinject::inject(
        *model,
        styleinject::Targets::all(),
        styleinject::StyleInjectOptions(2));
    const auto base = model->conv_in->weight.clone();
    torch::optim::AdamW optimizer(
        styleinject::adapter_parameters(*model),
        torch::optim::AdamWOptions(1e-3));
    const auto before = loss_at_fixed_noise(model);
    optimizer.zero_grad();
    before.backward();
    optimizer.step();
    CHECK(loss_at_fixed_noise(model).item<double>() < before.item<double>());
    CHECK(torch::equal(model->conv_in->weight, base));
  }
}

TEST_CASE("the sampler is deterministic for a seed", "[typeface]") {
  torch::manual_seed(0);
  const auto config = tiny_config();
  TextToImage model(config);
  const auto ids = Tokenizer().encode(std::vector<std::string>{
      "the letter a in dejavu sans style", "the digit 3 in lobster style"});
  SamplerOptions options;
  options.steps = 4;
  options.seed = 5;
  const auto first = sample(model, NoiseSchedule(), ids, options);
  CHECK(
      first.sizes() ==
      torch::IntArrayRef({2, 1, config.image_size, config.image_size}));
  CHECK(first.min().item<float>() >= 0);
  CHECK(first.max().item<float>() <= 1);
  torch::manual_seed(123); // the global generator plays no part
  CHECK(torch::equal(first, sample(model, NoiseSchedule(), ids, options)));
  options.seed = 6;
  CHECK(!torch::equal(first, sample(model, NoiseSchedule(), ids, options)));
}

TEST_CASE("the fine-tune split and the parameter budget", "[typeface]") {
  const auto split = split_characters(16);
  CHECK(split.shots.size() == 16);
  CHECK(split.validation.size() == 8);
  CHECK(split.shots.size() + split.validation.size() + split.test.size() == 62);
  for (const char c : split.test) {
    CHECK(split.shots.find(c) == std::string::npos);
    CHECK(split.validation.find(c) == std::string::npos);
  }
  CHECK(shot_characters(16) == split.shots); // the same for every run
  CHECK_THAT(
      error_text([] { shot_characters(62); }),
      Catch::Contains("--shots must be between 1 and 61, but got 62"));
  // The count that picks LoRA's equal-budget rank follows SPEC section 5's
  // formula, n*r*d_in*k*k + r*d_out + n*d_in + n + n*d_out, layer by layer.
  const auto config = tiny_config();
  const int64_t n = 2, r = 3;
  TextToImage model(config);
  int64_t expected = 0;
  for (const auto& module : model->modules()) {
    torch::Tensor weight;
    if (auto* linear = module->as<styleinject::StyleInjectLinearImpl>()) {
      weight = linear->weight;
    } else if (auto* conv = module->as<styleinject::StyleInjectConv2dImpl>()) {
      weight = conv->weight;
    } else {
      continue;
    }
    const auto d_out = weight.size(0), d_in = weight.size(1);
    const auto kk = weight.numel() / (d_out * d_in);
    expected += n * r * d_in * kk + r * d_out + n * d_in + n + n * d_out;
  }
  CHECK(expected > 0);
  CHECK(
      adapter_parameter_count(
          config, styleinject::StyleInjectOptions(r).branches(n)) == expected);
  // LoRA: r * (d_in * k * k + d_out) per layer.
  int64_t lora = 0;
  for (const auto& p : model->named_parameters()) {
    if (p.key().size() >= 6 && p.key().substr(p.key().size() - 6) == "weight" &&
        p.value().dim() >= 2 && p.key().find("norm") == std::string::npos &&
        p.key().find("embed") == std::string::npos) {
      lora += r * (p.value().numel() / p.value().size(0) + p.value().size(0));
    }
  }
  CHECK(
      adapter_parameter_count(
          config, styleinject::StyleInjectOptions::lora(r)) == lora);
}

TEST_CASE(
    "grids are written as PNG files that libpng reads back",
    "[typeface]") {
  const auto row1 = torch::rand({3, 1, 8, 8});
  const auto row2 = torch::rand({2, 1, 8, 8});
  const auto picture = grid({row1, row2}, 2);
  // 2 rows and 3 columns of 8 px cells with 2 px gaps, then doubled.
  REQUIRE(
      picture.sizes() ==
      torch::IntArrayRef({2 * (2 + 10 * 2), 2 * (2 + 10 * 3)}));
  CHECK(picture[2 * 2][2 * 2].item<float>() == row1[0][0][0][0].item<float>());
  CHECK(
      picture[2 * 12][2 * 12].item<float>() == row2[1][0][0][0].item<float>());
  const auto path = fs::temp_directory_path() / "styleinject_typeface_grid.png";
  write_png(path, picture);
  png_image png{};
  png.version = PNG_IMAGE_VERSION;
  REQUIRE(png_image_begin_read_from_file(&png, path.c_str()));
  png.format = PNG_FORMAT_GRAY;
  std::vector<uint8_t> pixels(PNG_IMAGE_SIZE(png));
  REQUIRE(png_image_finish_read(&png, nullptr, pixels.data(), 0, nullptr));
  REQUIRE(png.width == picture.size(1));
  REQUIRE(png.height == picture.size(0));
  const auto expected =
      (picture * 255).round().to(torch::kUInt8).flatten().contiguous();
  CHECK(std::equal(pixels.begin(), pixels.end(), expected.data_ptr<uint8_t>()));
  fs::remove(path);
}
