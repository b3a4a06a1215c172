#pragma once
// The progress bar of the typeface example's long loops.

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

namespace typeface {

/// Seconds since `start` on the steady clock.
inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

/// Whether progress bars are drawn: where torchrun starts several
/// processes, only rank 0 draws them.
inline bool& progress_drawn() {
  static bool drawn = true;
  return drawn;
}

/// A progress bar on stderr with the step, ETA and the running loss; on a
/// terminal it redraws one line, elsewhere (logs, CI) it prints a line at each
/// tenth of the loop, at most every 30 s, and the last.
class Progress {
 public:
  Progress(std::string label, int64_t total, int64_t start = 0)
      : label_(std::move(label)),
        total_(total),
        start_step_(start),
        step_(start),
        tty_(isatty(fileno(stderr)) != 0),
        begin_(std::chrono::steady_clock::now()),
        last_draw_(begin_) {}

  /// One step done; `loss` enters an exponential running mean.
  void step(double loss = -1) {
    ++step_;
    if (loss >= 0) {
      loss_ = loss_ < 0 ? loss : 0.95 * loss_ + 0.05 * loss;
    }
    const auto now = std::chrono::steady_clock::now();
    const bool last = step_ == total_;
    const bool tenth = (step_ - start_step_) %
            std::max<int64_t>(1, (total_ - start_step_) / 10) ==
        0;
    const auto since_draw = now - last_draw_;
    if (!progress_drawn()) {
      return;
    }
    if (last || (tty_ && since_draw > std::chrono::milliseconds(200)) ||
        (!tty_ && tenth && since_draw > std::chrono::seconds(30))) {
      draw(now, last);
      last_draw_ = now;
    }
  }

  double seconds() const {
    return seconds_since(begin_);
  }

 private:
  void draw(std::chrono::steady_clock::time_point now, bool last) const {
    const double elapsed = std::chrono::duration<double>(now - begin_).count();
    const double done = static_cast<double>(step_ - start_step_);
    const double eta =
        done > 0 ? elapsed / done * static_cast<double>(total_ - step_) : 0;
    constexpr int width = 24;
    const int filled =
        static_cast<int>(width * step_ / std::max<int64_t>(total_, 1));
    std::string bar(filled, '#');
    bar.resize(width, '.');
    std::fprintf(
        stderr,
        "%s%-22s [%s] %lld/%lld %s %s%s",
        tty_ ? "\r" : "",
        label_.c_str(),
        bar.c_str(),
        static_cast<long long>(step_),
        static_cast<long long>(total_),
        (last ? "took " + clock(elapsed) : "eta " + clock(eta)).c_str(),
        loss_ >= 0 ? ("loss " + std::to_string(loss_).substr(0, 7)).c_str()
                   : "",
        tty_ && !last ? "" : "\n");
    std::fflush(stderr);
  }
  static std::string clock(double seconds) {
    const auto s = static_cast<long long>(seconds + 0.5);
    char text[32];
    std::snprintf(text, sizeof text, "%lld:%02lld", s / 60, s % 60);
    return text;
  }

  std::string label_;
  int64_t total_, start_step_, step_;
  bool tty_;
  double loss_ = -1;
  std::chrono::steady_clock::time_point begin_, last_draw_;
};

} // namespace typeface
