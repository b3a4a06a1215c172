#pragma once

// Regular expressions that come from files (PEFT's alpha_pattern keys). A
// backtracking engine such as std::regex takes time exponential in the text
// for a pattern like "(a|aa)+b"; this one runs the pattern's automaton
// (Thompson's construction, simulated as a Pike VM without captures), so a
// match costs at most (program size) x (text length) steps, and the
// program's size is bounded. The syntax is the part of Python's `re` that
// module patterns use, with Python's meaning; the rest is refused.

#include <bitset>
#include <cctype>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace styleinject {
namespace detail {

/// What a pattern may cost. Python allows more; module patterns need far
/// less (PEFT writes module names, this library "^" and escaped names).
struct RegexLimits {
  static constexpr size_t kLength = 1000; // characters
  static constexpr int kRepeat = 1000; // the largest count in {m,n}
  static constexpr size_t kProgram = 10000; // automaton instructions
  static constexpr int kNesting = 100; // groups open at once
};

/// A pattern in Python's `re` syntax, matched in time linear in the text.
///
/// Supported, with Python's meaning: literals; `.`; classes `[a-z_]` and
/// `[^...]`; `\d \w \s \D \W \S`; `\n \t \r \f \v` and escaped punctuation;
/// groups `(...)` and `(?:...)`; `|`; `* + ?` and `{n}`, `{m,}`, `{,n}`,
/// `{m,n}`, each optionally lazy (`*?`: the same texts match); `^` and `$`.
/// Refused with std::invalid_argument naming the character: lookarounds,
/// backreferences, named groups, flags, `\b` and other escapes, possessive
/// repeats, non-ASCII patterns, and anything over RegexLimits. In the text,
/// a non-ASCII character is one symbol that `.`, `\w`, `\D`, `\S` and
/// negated classes match (Python's `\w` matches letters of any script).
///
/// Example:
///   Regex("(.*\\.)?(to_(q|k))$").match_prefix("attn1.to_k")  // true
class Regex {
 public:
  explicit Regex(std::string pattern) : pattern_(std::move(pattern)) {
    if (pattern_.size() > RegexLimits::kLength) {
      throw std::invalid_argument(
          "expected a pattern of at most " +
          std::to_string(RegexLimits::kLength) + " characters, but got " +
          std::to_string(pattern_.size()));
    }
    for (size_t i = 0; i < pattern_.size(); ++i) {
      if (static_cast<unsigned char>(pattern_[i]) >= 0x80) {
        fail(i, "a non-ASCII character");
      }
    }
    const Node root = parse_alternation(0);
    if (!at_end()) {
      fail(position_, "a ')' without its '('");
    }
    emit(root);
    append({Op::kMatch});
  }

  /// Whether the pattern matches at the start of `text`, as Python's
  /// re.match: a prefix of it (all of it where the pattern ends in `$`).
  /// Adds the steps it took, at most size() per character, to `*steps`.
  bool match_prefix(const std::string& text, size_t* steps = nullptr) const {
    Threads current(program_.size()), next(program_.size());
    const bool matched = run(symbols_of(text), current, next);
    if (steps != nullptr) {
      *steps += current.steps + next.steps;
    }
    return matched;
  }

  /// Instructions of the automaton: a match takes at most this many steps
  /// per character of the text.
  size_t size() const {
    return program_.size();
  }

 private:
  // Symbols 0-127 are ASCII characters; kOther is any other code point.
  static constexpr int kOther = 128;
  using Set = std::bitset<kOther + 1>;

  enum class Op { kSet, kSplit, kJump, kBegin, kEnd, kMatch };
  struct Instruction {
    Op op;
    Set set{}; // kSet: the symbols it consumes
    int x = 0, y = 0; // kSplit: both targets (x first); kJump: x
  };

  // The parse tree.
  struct Node {
    enum Kind { kSet, kBegin, kEnd, kSequence, kAlternation, kRepeat } kind;
    Set set{};
    std::vector<Node> children{};
    int min = 0, max = 0; // kRepeat; max -1 is unbounded
  };

  [[noreturn]] void fail(size_t at, const std::string& what) const {
    throw std::invalid_argument(
        "cannot use " + what + " (character " + std::to_string(at + 1) +
        " of '" + pattern_ + "')");
  }

  // --------------------------------------------------------------- parsing

  bool at_end() const {
    return position_ >= pattern_.size();
  }
  bool next_is(char c) const {
    return !at_end() && pattern_[position_] == c;
  }

  // alternation := sequence ('|' sequence)*
  Node parse_alternation(int depth) {
    Node node{Node::kAlternation};
    node.children.push_back(parse_sequence(depth));
    while (next_is('|')) {
      ++position_;
      node.children.push_back(parse_sequence(depth));
    }
    return node.children.size() == 1 ? std::move(node.children[0]) : node;
  }

  // sequence := (atom quantifier?)*
  Node parse_sequence(int depth) {
    Node node{Node::kSequence};
    while (!at_end() && !next_is('|') && !next_is(')')) {
      Node atom = parse_atom(depth);
      if (quantifier_here()) {
        atom = parse_quantifier(std::move(atom));
        if (quantifier_here()) {
          fail(position_, "a repeat of a repeat");
        }
      }
      node.children.push_back(std::move(atom));
    }
    return node;
  }

  Node parse_atom(int depth) {
    const size_t start = position_;
    if (quantifier_here()) {
      fail(start, "a repeat of nothing");
    }
    const char c = pattern_[position_++];
    switch (c) {
      case '(':
        return parse_group(depth, start);
      case '[':
        return set_node(parse_class(start));
      case '.':
        return set_node(~single('\n'));
      case '^':
        return {Node::kBegin};
      case '$':
        return {Node::kEnd};
      case '\\':
        return set_node(parse_escape(start).first);
      default:
        return set_node(single(c));
    }
  }

  Node parse_group(int depth, size_t start) {
    if (depth >= RegexLimits::kNesting) {
      fail(
          start,
          "more than " + std::to_string(RegexLimits::kNesting) +
              " nested groups");
    }
    if (next_is('?')) {
      if (pattern_.compare(position_, 2, "?:") != 0) {
        fail(start, "'(?' other than '(?:' (lookarounds, names, flags)");
      }
      position_ += 2;
    }
    Node inner = parse_alternation(depth + 1);
    if (!next_is(')')) {
      fail(start, "a '(' without its ')'");
    }
    ++position_;
    return inner;
  }

  // Whether a quantifier starts here: * + ? or a '{' of the forms {n},
  // {m,}, {,n}, {m,n} (Python reads any other '{' as a literal).
  bool quantifier_here() const {
    if (next_is('*') || next_is('+') || next_is('?')) {
      return true;
    }
    const auto close = pattern_.find('}', position_);
    if (!next_is('{') || close == std::string::npos) {
      return false;
    }
    const auto body = pattern_.substr(position_ + 1, close - position_ - 1);
    const auto digits = [](const std::string& s) {
      return s.find_first_not_of("0123456789") == std::string::npos;
    };
    const auto comma = body.find(',');
    return comma == std::string::npos
        ? !body.empty() && digits(body)
        : digits(body.substr(0, comma)) && digits(body.substr(comma + 1));
  }

  // The quantifier here, applied to `atom`.
  Node parse_quantifier(Node atom) {
    if (atom.kind == Node::kBegin || atom.kind == Node::kEnd) {
      fail(position_, "a repeat of an anchor");
    }
    Node repeat{Node::kRepeat};
    const char c = pattern_[position_];
    if (c == '{') {
      const auto close = pattern_.find('}', position_);
      const auto body = pattern_.substr(position_ + 1, close - position_ - 1);
      const auto comma = body.find(',');
      repeat.min = count(body.substr(0, comma), 0);
      repeat.max = comma == std::string::npos
          ? repeat.min
          : count(body.substr(comma + 1), -1);
      if (repeat.max != -1 && repeat.min > repeat.max) {
        fail(position_, "a repeat whose minimum exceeds its maximum");
      }
      position_ = close + 1;
    } else {
      repeat.min = c == '+' ? 1 : 0;
      repeat.max = c == '?' ? 1 : -1;
      ++position_;
    }
    if (next_is('?')) {
      ++position_; // lazy: another order, the same texts
    }
    repeat.children.push_back(std::move(atom));
    return repeat;
  }

  // A repeat count of {m,n}; `empty` where it is left out.
  int count(const std::string& digits, int empty) const {
    if (digits.empty()) {
      return empty;
    }
    if (digits.size() > 4 || std::stoi(digits) > RegexLimits::kRepeat) {
      fail(
          position_,
          "a repeat count over " + std::to_string(RegexLimits::kRepeat));
    }
    return std::stoi(digits);
  }

  // [...] or [^...], after the '[' at `start`.
  Set parse_class(size_t start) {
    const bool negated = next_is('^');
    position_ += negated ? 1 : 0;
    Set set;
    for (bool first = true; first || !next_is(']'); first = false) {
      if (at_end()) {
        fail(start, "a '[' without its ']'");
      }
      const size_t at = position_;
      auto item = class_item();
      if (next_is('-') && position_ + 1 < pattern_.size() &&
          pattern_[position_ + 1] != ']') {
        ++position_;
        const auto high = class_item();
        if (item.second < 0 || high.second < 0 || high.second < item.second) {
          fail(at, "a bad character range");
        }
        for (int symbol = item.second; symbol <= high.second; ++symbol) {
          item.first.set(symbol);
        }
      }
      set |= item.first;
    }
    ++position_; // the ']'
    return negated ? ~set : set; // Python's [^...] matches '\n' too
  }

  // One item of a class: its set, and its character where it is one (for
  // ranges), else -1.
  std::pair<Set, int> class_item() {
    const size_t at = position_;
    const char c = pattern_[position_++];
    return c == '\\' ? parse_escape(at) : std::make_pair(single(c), int(c));
  }

  // The escape whose '\' is at `start`: its set, and its character where
  // it is one, else -1.
  std::pair<Set, int> parse_escape(size_t start) {
    if (at_end()) {
      fail(start, "a '\\' at the end");
    }
    const char c = pattern_[position_++];
    const std::string controls = "n\nt\tr\rf\fv\v";
    const auto control = controls.find(c);
    if (control != std::string::npos && control % 2 == 0) {
      return {single(controls[control + 1]), controls[control + 1]};
    }
    Set set;
    switch (c) {
      case 'd':
      case 'D':
        for (char d = '0'; d <= '9'; ++d) {
          set.set(d);
        }
        return {c == 'd' ? set : ~set, -1};
      case 'w':
      case 'W':
        for (int s = 0; s < kOther; ++s) {
          set.set(s, std::isalnum(s) || s == '_');
        }
        set.set(kOther); // a letter of another script
        return {c == 'w' ? set : ~set, -1};
      case 's':
      case 'S':
        for (const char s : std::string(" \t\n\r\f\v")) {
          set.set(s);
        }
        return {c == 's' ? set : ~set, -1};
      default:
        if (std::isalnum(static_cast<unsigned char>(c))) {
          fail(start, std::string("the escape '\\") + c + "'");
        }
        return {single(c), c};
    }
  }

  static Set single(char c) {
    Set set;
    set.set(static_cast<unsigned char>(c));
    return set;
  }
  static Node set_node(const Set& set) {
    Node node{Node::kSet};
    node.set = set;
    return node;
  }

  // ------------------------------------------------------------- compiling

  int append(Instruction instruction) {
    if (program_.size() >= RegexLimits::kProgram) {
      throw std::invalid_argument(
          "expected a pattern of at most " +
          std::to_string(RegexLimits::kProgram) +
          " automaton instructions, but '" + pattern_ +
          "' needs more (its repeat counts multiply it)");
    }
    program_.push_back(std::move(instruction));
    return static_cast<int>(program_.size()) - 1;
  }

  int here() const {
    return static_cast<int>(program_.size());
  }

  void emit(const Node& node) {
    switch (node.kind) {
      case Node::kSet:
        append({Op::kSet, node.set});
        break;
      case Node::kBegin:
        append({Op::kBegin});
        break;
      case Node::kEnd:
        append({Op::kEnd});
        break;
      case Node::kSequence:
        for (const auto& child : node.children) {
          emit(child);
        }
        break;
      case Node::kAlternation:
        emit_alternation(node.children);
        break;
      case Node::kRepeat:
        emit_repeat(node.children[0], node.min, node.max);
        break;
    }
  }

  // a|b|c: split to a or to the next split; each branch jumps to the end.
  void emit_alternation(const std::vector<Node>& branches) {
    std::vector<int> jumps;
    for (size_t i = 0; i + 1 < branches.size(); ++i) {
      const int split = append({Op::kSplit});
      program_[split].x = split + 1;
      emit(branches[i]);
      jumps.push_back(append({Op::kJump}));
      program_[split].y = here();
    }
    emit(branches.back());
    for (const int jump : jumps) {
      program_[jump].x = here();
    }
  }

  // x{m,n}: m copies of x, then n - m optional ones (a loop for n = -1).
  void emit_repeat(const Node& body, int min, int max) {
    for (int i = 0; i < min; ++i) {
      emit(body);
    }
    if (max == -1) {
      const int split = append({Op::kSplit});
      program_[split].x = split + 1;
      emit(body);
      append({Op::kJump, {}, split});
      program_[split].y = here();
      return;
    }
    for (int i = min; i < max; ++i) {
      const int split = append({Op::kSplit});
      program_[split].x = split + 1;
      emit(body);
      program_[split].y = here();
    }
  }

  // -------------------------------------------------------------- matching

  // The threads of one step: each instruction at most once.
  struct Threads {
    explicit Threads(size_t size) : seen(size, false) {}
    void clear() {
      for (const int pc : visited) {
        seen[pc] = false;
      }
      visited.clear();
      list.clear();
    }
    std::vector<int> list; // kSet instructions waiting for a symbol
    std::vector<int> visited, pending;
    std::vector<bool> seen;
    size_t steps = 0; // instructions visited, over all steps
  };

  // The automaton over the text, one symbol at a time: the threads alive
  // before each symbol in `current`, those after it in `next`.
  bool run(const std::vector<int>& symbols, Threads& current, Threads& next)
      const {
    if (add(current, 0, 0, symbols)) {
      return true;
    }
    for (size_t position = 0; position < symbols.size(); ++position) {
      next.clear();
      for (const int pc : current.list) {
        if (program_[pc].set[symbols[position]] &&
            add(next, pc + 1, position + 1, symbols)) {
          return true;
        }
      }
      std::swap(current, next);
      if (current.list.empty()) {
        return false;
      }
    }
    return false;
  }

  // The text as symbols: ASCII as itself, any other UTF-8 code point (or
  // stray byte) as kOther.
  static std::vector<int> symbols_of(const std::string& text) {
    std::vector<int> symbols;
    for (size_t i = 0; i < text.size(); ++i) {
      const auto byte = static_cast<unsigned char>(text[i]);
      symbols.push_back(byte < 0x80 ? byte : kOther);
      if (byte >= 0xC0) { // a lead byte: skip its continuation bytes
        while (i + 1 < text.size() &&
               (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80) {
          ++i;
        }
      }
    }
    return symbols;
  }

  // Adds the thread at `pc` and all that its splits, jumps and satisfied
  // anchors lead to at `position`; true where one reaches kMatch.
  bool add(
      Threads& threads,
      int pc,
      size_t position,
      const std::vector<int>& symbols) const {
    auto& pending = threads.pending;
    pending.assign(1, pc);
    while (!pending.empty()) {
      const int at = pending.back();
      pending.pop_back();
      if (threads.seen[at]) {
        continue;
      }
      threads.seen[at] = true;
      threads.visited.push_back(at);
      ++threads.steps;
      const auto& instruction = program_[at];
      switch (instruction.op) {
        case Op::kSet:
          threads.list.push_back(at);
          break;
        case Op::kSplit:
          pending.push_back(instruction.y);
          pending.push_back(instruction.x);
          break;
        case Op::kJump:
          pending.push_back(instruction.x);
          break;
        case Op::kBegin:
          if (position == 0) {
            pending.push_back(at + 1);
          }
          break;
        case Op::kEnd: // Python's $: the end, or before a last '\n'
          if (position == symbols.size() ||
              (position + 1 == symbols.size() && symbols[position] == '\n')) {
            pending.push_back(at + 1);
          }
          break;
        case Op::kMatch:
          return true;
      }
    }
    return false;
  }

  std::string pattern_;
  size_t position_ = 0; // while parsing
  std::vector<Instruction> program_;
};

} // namespace detail
} // namespace styleinject
