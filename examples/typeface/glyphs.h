#pragma once
// The data of the typeface example: glyphs of real fonts rendered with
// FreeType (fonts found through fontconfig, or given by path), their captions
// and a word-level tokenizer.

#include <torch/torch.h>

#include <fontconfig/fontconfig.h>
#include <ft2build.h>
#include FT_FREETYPE_H

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace typeface {

/// The characters every font renders: a-z, A-Z, 0-9.
inline const std::string& characters() {
  static const std::string all =
      "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  return all;
}

/// One typeface: its name in captions, how fontconfig finds it, and the
/// Debian package that ships it.
struct FontSpec {
  std::string name; // as captions spell it, e.g. "lobster"
  std::string family; // fontconfig family, e.g. "Lobster Two"
  std::string style; // fontconfig style, e.g. "Bold Italic"
  std::string package; // Debian package, e.g. "fonts-lobster"
  bool base; // in the base model's pretraining set
};

/// Every font the example knows: the base model's fonts first, then the new
/// styles that the base model never sees.
inline const std::vector<FontSpec>& catalogue() {
  static const std::vector<FontSpec> fonts = {
      {"dejavu sans", "DejaVu Sans", "Book", "fonts-dejavu-core", true},
      {"dejavu serif", "DejaVu Serif", "Book", "fonts-dejavu-core", true},
      {"dejavu mono", "DejaVu Sans Mono", "Book", "fonts-dejavu-core", true},
      {"liberation serif",
       "Liberation Serif",
       "Regular",
       "fonts-liberation",
       true},
      {"liberation narrow",
       "Liberation Sans Narrow",
       "Regular",
       "fonts-liberation",
       true},
      {"liberation bold", "Liberation Sans", "Bold", "fonts-liberation", true},
      {"free mono", "FreeMono", "Regular", "fonts-freefont-ttf", true},
      {"free serif italic", "FreeSerif", "Italic", "fonts-freefont-ttf", true},
      {"lobster", "Lobster Two", "Bold Italic", "fonts-lobster", false},
      {"humor sans", "Humor Sans", "Regular", "fonts-humor-sans", false},
      {"comic neue", "Comic Neue", "Regular", "fonts-comic-neue", false},
      {"eb garamond", "EB Garamond 12", "Regular", "fonts-ebgaramond", false},
      {"dkg handwriting",
       "DkgHandwriting",
       "Roman",
       "fonts-dkg-handwriting",
       false},
      {"isabella", "Isabella", "Medium", "fonts-isabella", false},
  };
  return fonts;
}

/// The index of a font in `catalogue()` by its caption name.
inline int64_t font_index(const std::string& name) {
  const auto& fonts = catalogue();
  for (size_t i = 0; i < fonts.size(); ++i) {
    if (fonts[i].name == name) {
      return static_cast<int64_t>(i);
    }
  }
  std::string known;
  for (const auto& font : fonts) {
    known += (known.empty() ? "" : ", ") + font.name;
  }
  throw std::invalid_argument(
      "unknown font '" + name + "'; expected one of: " + known);
}

/// The indices of the base model's fonts.
inline std::vector<int64_t> base_fonts() {
  std::vector<int64_t> result;
  for (size_t i = 0; i < catalogue().size(); ++i) {
    if (catalogue()[i].base) {
      result.push_back(static_cast<int64_t>(i));
    }
  }
  return result;
}

/// The caption of a glyph, e.g. "the letter g in lobster style" or
/// "the digit 7 in humor sans style".
inline std::string caption(char character, const std::string& font) {
  const bool digit = character >= '0' && character <= '9';
  return std::string("the ") + (digit ? "digit " : "letter ") + character +
      " in " + font + " style";
}

/// The font files of a set of fonts, found through fontconfig unless a path
/// is given for the font's name.
inline std::string find_font_file(
    const FontSpec& font,
    const std::map<std::string, std::string>& paths) {
  const auto given = paths.find(font.name);
  if (given != paths.end()) {
    return given->second;
  }
  FcInit();
  const std::string query = font.family + ":style=" + font.style;
  FcPattern* pattern =
      FcNameParse(reinterpret_cast<const FcChar8*>(query.c_str()));
  FcConfigSubstitute(nullptr, pattern, FcMatchPattern);
  FcDefaultSubstitute(pattern);
  FcResult result = FcResultNoMatch;
  FcPattern* match = FcFontMatch(nullptr, pattern, &result);
  FcPatternDestroy(pattern);
  // fontconfig always answers with its best fallback: accept the answer only
  // if it is the family asked for.
  std::string file;
  bool same_family = false;
  if (match != nullptr) {
    FcChar8* value = nullptr;
    for (int i = 0;
         FcPatternGetString(match, FC_FAMILY, i, &value) == FcResultMatch;
         ++i) {
      same_family |= font.family == reinterpret_cast<const char*>(value);
    }
    if (FcPatternGetString(match, FC_FILE, 0, &value) == FcResultMatch) {
      file = reinterpret_cast<const char*>(value);
    }
    FcPatternDestroy(match);
  }
  if (!same_family || file.empty()) {
    throw std::runtime_error(
        "font '" + font.name + "' (fontconfig \"" + query +
        "\") is not installed; install Debian's package " + font.package +
        " (apt-get install " + font.package +
        "), or give its file with --font " + font.name + "=PATH");
  }
  return file;
}

/// Renders glyphs of real fonts into size x size grayscale images with
/// FreeType, each with a small random scale and sub-pixel offset.
///
/// Each font is scaled once so that all 62 of its glyphs fit the canvas
/// with their baseline at one height: lower-case letters stay smaller than
/// capitals, as on a page.
class GlyphRenderer {
 public:
  /// `fonts`: indices into `catalogue()`; `paths`: font name -> file, for
  /// fonts not to look up with fontconfig.
  GlyphRenderer(
      std::vector<int64_t> fonts,
      int64_t size,
      const std::map<std::string, std::string>& paths = {})
      : fonts_(std::move(fonts)), size_(size) {
    if (size < 8) {
      throw std::invalid_argument(
          "image size must be at least 8, but got " + std::to_string(size));
    }
    for (const auto& [name, path] : paths) {
      font_index(name); // a path for an unknown font name is an error
    }
    if (FT_Init_FreeType(&library_) != 0) {
      throw std::runtime_error("FreeType failed to initialise");
    }
    faces_.resize(catalogue().size(), nullptr);
    layouts_.resize(catalogue().size());
    for (const auto index : fonts_) {
      open(index, find_font_file(catalogue().at(index), paths));
    }
  }
  GlyphRenderer(const GlyphRenderer&) = delete;
  GlyphRenderer& operator=(const GlyphRenderer&) = delete;
  ~GlyphRenderer() {
    for (auto* face : faces_) {
      if (face != nullptr) {
        FT_Done_Face(face);
      }
    }
    FT_Done_FreeType(library_);
  }

  int64_t size() const {
    return size_;
  }
  const std::vector<int64_t>& fonts() const {
    return fonts_;
  }

  /// One glyph as a (size, size) float tensor in [0, 1], ink = 1. `jitter`
  /// draws the random scale (0.9-1.05) and offset (up to 1/16 of the size).
  torch::Tensor render(int64_t font, char character, std::mt19937_64* jitter) {
    FT_Face face = faces_.at(font);
    if (face == nullptr) {
      throw std::invalid_argument(
          "font '" + catalogue().at(font).name +
          "' was not loaded by this renderer");
    }
    const auto& layout = layouts_[font];
    double scale = 1.0, dx = 0.0, dy = 0.0;
    if (jitter != nullptr) {
      std::uniform_real_distribution<double> zoom(0.9, 1.05);
      std::uniform_real_distribution<double> shift(-size_ / 16.0, size_ / 16.0);
      scale = zoom(*jitter);
      dx = shift(*jitter);
      dy = shift(*jitter);
    }
    const double pixels = layout.pixels * scale;
    FT_Set_Char_Size(face, 0, static_cast<FT_F26Dot6>(pixels * 64), 72, 72);
    // Sub-pixel placement through FreeType's transform (26.6 fixed point).
    const double centre = size_ / 2.0;
    const double baseline =
        centre + (layout.ascent + layout.descent) / 2.0 * scale;
    FT_Vector delta;
    delta.x = static_cast<FT_Pos>(std::lround((dx - std::floor(dx)) * 64));
    delta.y = -static_cast<FT_Pos>(std::lround((dy - std::floor(dy)) * 64));
    FT_Set_Transform(face, nullptr, &delta);
    if (FT_Load_Char(face, static_cast<FT_ULong>(character), FT_LOAD_RENDER) !=
        0) {
      throw std::runtime_error(
          std::string("FreeType could not render '") + character + "' of " +
          catalogue().at(font).name);
    }
    const FT_Bitmap& bitmap = face->glyph->bitmap;
    auto image = torch::zeros({size_, size_});
    auto pixel = image.accessor<float, 2>();
    const int64_t left = static_cast<int64_t>(
        std::floor(centre - bitmap.width / 2.0 + std::floor(dx)));
    const int64_t top =
        static_cast<int64_t>(std::floor(baseline + std::floor(dy))) -
        face->glyph->bitmap_top;
    for (unsigned row = 0; row < bitmap.rows; ++row) {
      for (unsigned col = 0; col < bitmap.width; ++col) {
        const int64_t y = top + row, x = left + col;
        if (y >= 0 && y < size_ && x >= 0 && x < size_) {
          pixel[y][x] = bitmap.buffer[row * bitmap.pitch + col] / 255.0f;
        }
      }
    }
    return image;
  }

 private:
  // Per font: the pixel size that fits every glyph, and the glyphs' highest
  // top (ascent) and lowest bottom (descent, negative) at that size.
  struct Layout {
    double pixels = 0, ascent = 0, descent = 0;
  };

  void open(int64_t index, const std::string& file) {
    const auto& spec = catalogue().at(index);
    FT_Face face = nullptr;
    if (FT_New_Face(library_, file.c_str(), 0, &face) != 0) {
      throw std::runtime_error(
          "FreeType could not open '" + file + "' for font '" + spec.name +
          "'");
    }
    faces_[index] = face;
    std::string missing;
    for (const char c : characters()) {
      if (FT_Get_Char_Index(face, static_cast<FT_ULong>(c)) == 0) {
        missing += c;
      }
    }
    if (!missing.empty()) {
      throw std::runtime_error(
          "font '" + spec.name + "' (" + file +
          ") has no glyph for: " + missing);
    }
    // Measure all glyphs at a reference size, then scale them to fill 80%
    // of the canvas's height (and at most 90% of its width).
    constexpr double reference = 64;
    FT_Set_Char_Size(face, 0, static_cast<FT_F26Dot6>(reference * 64), 72, 72);
    FT_Set_Transform(face, nullptr, nullptr);
    double top = 0, bottom = 0, width = 0;
    for (const char c : characters()) {
      FT_Load_Char(face, static_cast<FT_ULong>(c), FT_LOAD_RENDER);
      const auto* glyph = face->glyph;
      top = std::max(top, static_cast<double>(glyph->bitmap_top));
      bottom = std::min(
          bottom, static_cast<double>(glyph->bitmap_top) - glyph->bitmap.rows);
      width = std::max(width, static_cast<double>(glyph->bitmap.width));
    }
    const double fit = std::min(
        0.8 * size_ / std::max(top - bottom, 1.0),
        0.9 * size_ / std::max(width, 1.0));
    layouts_[index] = {reference * fit, top * fit, bottom * fit};
  }

  std::vector<int64_t> fonts_;
  int64_t size_;
  FT_Library library_ = nullptr;
  std::vector<FT_Face> faces_;
  std::vector<Layout> layouts_;
};

/// Word-level tokenizer over a fixed vocabulary: the caption template's
/// words, the 62 characters and the words of every font name in
/// `catalogue()` (so a new style's name is a known word whose embedding the
/// base model never trained). Id 0 pads; an all-padding caption is the
/// empty prompt of classifier-free guidance.
class Tokenizer {
 public:
  explicit Tokenizer(int64_t length = 10) : length_(length) {
    words_ = {"<pad>", "the", "letter", "digit", "in", "style"};
    for (const char c : characters()) {
      words_.emplace_back(1, c);
    }
    for (const auto& font : catalogue()) {
      std::istringstream stream(font.name);
      for (std::string word; stream >> word;) {
        if (std::find(words_.begin(), words_.end(), word) == words_.end()) {
          words_.push_back(word);
        }
      }
    }
    for (size_t i = 0; i < words_.size(); ++i) {
      ids_[words_[i]] = static_cast<int64_t>(i);
    }
  }

  int64_t vocabulary_size() const {
    return static_cast<int64_t>(words_.size());
  }
  int64_t length() const {
    return length_;
  }

  /// caption -> (length,) int64 ids, padded with 0.
  torch::Tensor encode(const std::string& caption) const {
    auto ids = torch::zeros({length_}, torch::kLong);
    std::istringstream stream(caption);
    int64_t position = 0;
    for (std::string word; stream >> word; ++position) {
      const auto found = ids_.find(word);
      if (found == ids_.end()) {
        throw std::invalid_argument(
            "unknown word '" + word + "' in caption \"" + caption +
            "\"; captions look like \"the letter g in lobster style\"");
      }
      if (position == length_) {
        throw std::invalid_argument(
            "caption \"" + caption + "\" has more than " +
            std::to_string(length_) + " words");
      }
      ids[position] = found->second;
    }
    return ids;
  }

  /// captions -> (N, length) int64 ids.
  torch::Tensor encode(const std::vector<std::string>& captions) const {
    std::vector<torch::Tensor> rows;
    for (const auto& text : captions) {
      rows.push_back(encode(text));
    }
    return torch::stack(rows);
  }

  /// (length,) ids -> caption, the inverse of `encode`.
  std::string decode(const torch::Tensor& ids) const {
    std::string text;
    for (int64_t i = 0; i < ids.size(0); ++i) {
      const auto id = ids[i].item<int64_t>();
      if (id != 0) {
        text += (text.empty() ? "" : " ") + words_.at(id);
      }
    }
    return text;
  }

 private:
  int64_t length_;
  std::vector<std::string> words_;
  std::map<std::string, int64_t> ids_;
};

} // namespace typeface
