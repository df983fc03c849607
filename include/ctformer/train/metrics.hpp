// Training metrics: a JSON Lines writer (one object per logged step, flushed
// at once so a crash loses nothing) and a terminal progress bar.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "ctformer/core/error.hpp"

namespace ctformer::train {

/// The figures of one logged step. Unset optional fields are left out of the line.
struct step_metrics {
  std::int64_t step = 0;
  double loss = 0.0;
  std::optional<double> val_loss;
  double lr = 0.0;
  double grad_norm = 0.0;
  double tokens_per_s = 0.0;

  /// {"step":..,"loss":..,"val_loss":..,"lr":..,"grad_norm":..,"tokens_per_s":..};
  /// a non-finite number is written as null (JSON has no NaN).
  nlohmann::json to_json() const {
    auto number = [](double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr); };
    nlohmann::json j;
    j["step"] = step;
    j["loss"] = number(loss);
    if (val_loss) j["val_loss"] = number(*val_loss);
    j["lr"] = number(lr);
    j["grad_norm"] = number(grad_norm);
    j["tokens_per_s"] = number(tokens_per_s);
    return j;
  }
};

/// Appends one JSON object per line to a file and flushes after each, so the
/// file is readable (`tail -f`, pandas.read_json(lines=True)) while training runs.
class jsonl_writer {
 public:
  jsonl_writer() = default;
  /// Opens path, truncating it, or appending when append is true (a resumed run).
  explicit jsonl_writer(const std::filesystem::path& path, bool append = false)
      : path_(path), out_(path, append ? std::ios::app : std::ios::trunc) {
    if (!out_) throw io_error("ctformer: cannot open metrics file '" + path.string() + "' for writing");
  }

  bool is_open() const { return out_.is_open(); }
  const std::filesystem::path& path() const { return path_; }

  void write(const step_metrics& m) { write(m.to_json()); }
  /// Any JSON value, as one line.
  void write(const nlohmann::json& j) {
    out_ << j.dump() << '\n';
    out_.flush();
    if (!out_) throw io_error("ctformer: writing metrics file '" + path_.string() + "' failed");
  }

 private:
  std::filesystem::path path_;
  std::ofstream out_;
};

/// True when the stream is an interactive terminal.
inline bool is_terminal(std::FILE* stream) { return stream && ::isatty(::fileno(stream)) == 1; }

/// A one-line progress bar redrawn in place with '\r':
///   [#########...........]  <step>/<steps>  loss <loss>  <tokens/s> tok/s
/// Drawn only when the stream is a terminal, so logs and pipes stay clean.
class progress_bar {
 public:
  /// total_steps: the bar's 100%; enabled defaults to "stream is a terminal".
  explicit progress_bar(std::int64_t total_steps, std::FILE* stream = stdout,
                        std::optional<bool> enabled = std::nullopt)
      : total_(total_steps), stream_(stream), enabled_(enabled ? *enabled : is_terminal(stream)) {}

  bool enabled() const { return enabled_; }

  /// Redraws the bar at step (0-based steps done so far = step).
  void update(std::int64_t step, double loss, double tokens_per_s) {
    if (!enabled_) return;
    std::fputs(line(step, loss, tokens_per_s).c_str(), stream_);
    std::fflush(stream_);
    drawn_ = true;
  }

  /// Ends the bar's line, so what is printed next starts on a fresh line.
  void finish() {
    if (enabled_ && drawn_) {
      std::fputc('\n', stream_);
      std::fflush(stream_);
    }
    drawn_ = false;
  }

  /// The text of the bar (starting with '\r'); public so it can be tested.
  std::string line(std::int64_t step, double loss, double tokens_per_s) const {
    constexpr int width = 30;
    const double fraction = total_ > 0 ? std::clamp(double(step) / double(total_), 0.0, 1.0) : 1.0;
    const int filled = int(fraction * width + 0.5);
    std::string bar(std::size_t(filled), '#');
    bar.append(std::size_t(width - filled), '.');
    char text[160];
    std::snprintf(text, sizeof text, "\r[%s] %6lld/%lld  loss %.4f  %.0f tok/s ", bar.c_str(), (long long)step,
                  (long long)total_, loss, tokens_per_s);
    return text;
  }

 private:
  std::int64_t total_ = 0;
  std::FILE* stream_ = nullptr;
  bool enabled_ = false;
  bool drawn_ = false;
};

}  // namespace ctformer::train
