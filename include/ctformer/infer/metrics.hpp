// infer::metrics: what a serving engine measures (latency histograms, request
// and token counters, tokens per minute and per day, queue and KV gauges), read
// as a plain snapshot or as Prometheus text under vLLM's metric names.
#pragma once

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "ctformer/core/error.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/infer/request.hpp"

namespace ctformer::infer {

/// A histogram of durations in seconds with fixed bucket bounds, kept as the
/// count of each bucket plus the count, sum, least and greatest observation.
/// Not thread-safe by itself: infer::metrics holds it under its mutex.
class latency_histogram {
 public:
  /// Upper bounds of the buckets, the last +Inf. From a millisecond (a decode
  /// step of a small model) to three quarters of an hour (a long generation
  /// queued behind others), denser where time to first token and time per
  /// output token fall.
  static constexpr std::array<double, 23> default_bounds = {
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1,
      2.5,   5,      7.5,   10,   20,    40,   80,    160, 640, 2560, std::numeric_limits<double>::infinity()};

  /// Records one duration. NaN and infinities are ignored (no clock yields
  /// them, so they are a caller's bug and would poison the sum); a negative
  /// value is counted as 0 (two clock reads a hair apart in the wrong order).
  void observe(double seconds) {
    if (!std::isfinite(seconds)) return;
    seconds = std::max(seconds, 0.0);
    const auto bucket = std::lower_bound(default_bounds.begin(), default_bounds.end(), seconds);
    ++counts_[static_cast<std::size_t>(bucket - default_bounds.begin())];
    min_ = count_ == 0 ? seconds : std::min(min_, seconds);
    max_ = count_ == 0 ? seconds : std::max(max_, seconds);
    ++count_;
    sum_ += seconds;
  }

  std::uint64_t count() const { return count_; }
  double sum() const { return sum_; }
  /// The least observation (0 when empty).
  double min() const { return min_; }
  /// The greatest observation (0 when empty).
  double max() const { return max_; }
  /// The mean observation (0 when empty).
  double mean() const { return count_ == 0 ? 0.0 : sum_ / static_cast<double>(count_); }

  /// The q-quantile (q in [0, 1]) estimated as Prometheus' histogram_quantile
  /// does: find the bucket holding rank q * count and interpolate linearly
  /// between its bounds (the first bucket starts at 0; the +Inf bucket ends at
  /// the greatest observation). The answer is then clamped into [min, max]
  /// observed, so q = 0 and q = 1 and a single sample are exact. 0 when empty.
  double quantile(double q) const {
    if (!(q >= 0.0 && q <= 1.0)) throw invalid_input("ctformer: latency_histogram::quantile needs q in [0, 1]");
    if (count_ == 0) return 0.0;
    const double rank = q * static_cast<double>(count_);
    std::uint64_t below = 0;  // observations in the buckets before b
    std::size_t b = 0;
    // The first non-empty bucket whose cumulative count reaches the rank: it
    // exists (the +Inf bucket's cumulative count is count_ >= rank) and it
    // holds at least one observation, so the division below is safe.
    for (; b + 1 < counts_.size(); ++b) {
      const std::uint64_t through = below + counts_[b];
      if (counts_[b] > 0 && static_cast<double>(through) >= rank) break;
      below = through;
    }
    const double lower = b == 0 ? 0.0 : default_bounds[b - 1];
    const double upper = std::isinf(default_bounds[b]) ? max_ : default_bounds[b];
    const double fraction = (rank - static_cast<double>(below)) / static_cast<double>(counts_[b]);
    return std::clamp(lower + (upper - lower) * fraction, min_, max_);
  }

  /// The bucket upper bounds, ending with +Inf.
  std::span<const double> bounds() const { return default_bounds; }

  /// Observations <= bounds()[i] (cumulative, as Prometheus' le buckets).
  std::uint64_t bucket_count(std::size_t i) const {
    if (i >= counts_.size()) throw invalid_input("ctformer: latency_histogram::bucket_count index past the last bucket");
    std::uint64_t total = 0;
    for (std::size_t b = 0; b <= i; ++b) total += counts_[b];
    return total;
  }

 private:
  std::array<std::uint64_t, default_bounds.size()> counts_{};  // per bucket, not cumulative
  std::uint64_t count_ = 0;
  double sum_ = 0, min_ = 0, max_ = 0;
};

/// A histogram reduced to the numbers a dashboard or a log line shows.
struct latency_summary {
  std::uint64_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};

/// Every metric at one moment, as plain values (latencies in seconds).
struct metrics_snapshot {
  latency_summary time_to_first_token;    ///< arrival to the first token of a request
  latency_summary time_per_output_token;  ///< per request: decode time / (output tokens - 1)
  latency_summary inter_token_latency;    ///< between consecutive tokens of a sample
  latency_summary end_to_end;             ///< arrival to the end of a request
  latency_summary queue_time;             ///< arrival to the first step that ran it
  std::uint64_t requests_arrived = 0, requests_refused = 0;
  std::uint64_t requests_finished_stop = 0, requests_finished_length = 0, requests_finished_cancelled = 0,
                requests_finished_error = 0;
  std::uint64_t prompt_tokens = 0, output_tokens = 0;
  std::uint64_t preemptions = 0;
  std::uint64_t prefix_cache_queries = 0, prefix_cache_hits = 0;  ///< in KV blocks
  double prefix_cache_hit_rate = 0;  ///< hits / queries (0 when none)
  index_t requests_running = 0, requests_waiting = 0;
  double kv_cache_usage = 0;  ///< fraction of the KV pool in use, 0..1
  double prompt_tokens_per_minute = 0, output_tokens_per_minute = 0;  ///< counted in the last 60 s
  double prompt_tokens_per_day = 0, output_tokens_per_day = 0;        ///< total / uptime * 86400
  double uptime_seconds = 0;
};

/// An engine's metrics: every method locks one mutex, so request threads, the
/// step loop and a scraper may call them at once. Times are given by the
/// caller where they matter (tokens per minute), so tests can use their own.
class metrics {
 public:
  using clock = std::chrono::steady_clock;

  explicit metrics(clock::time_point start = clock::now()) : start_(start) {
    window_second_.fill(std::numeric_limits<std::int64_t>::min());  // no bucket holds a second yet
  }

  void request_arrived() { locked([&] { ++requests_arrived_; }); }
  void request_refused() { locked([&] { ++requests_refused_; }); }
  void request_finished(finish_reason r) {
    locked([&] {
      switch (r) {
        case finish_reason::stop: ++finished_stop_; break;
        case finish_reason::length: ++finished_length_; break;
        case finish_reason::cancelled: ++finished_cancelled_; break;
        case finish_reason::error: ++finished_error_; break;
      }
    });
  }

  void observe_queue_time(double seconds) { locked([&] { queue_time_.observe(seconds); }); }
  void observe_time_to_first_token(double seconds) { locked([&] { time_to_first_token_.observe(seconds); }); }
  void observe_time_per_output_token(double seconds) { locked([&] { time_per_output_token_.observe(seconds); }); }
  void observe_inter_token_latency(double seconds) { locked([&] { inter_token_latency_.observe(seconds); }); }
  void observe_end_to_end(double seconds) { locked([&] { end_to_end_.observe(seconds); }); }

  /// n prompt tokens processed at `now` (counted in the total and, when `now`
  /// is within the last minute, in tokens per minute).
  void add_prompt_tokens(index_t n, clock::time_point now) { add_tokens(n, now, &second_bucket::prompt); }
  /// n generated tokens at `now`.
  void add_output_tokens(index_t n, clock::time_point now) { add_tokens(n, now, &second_bucket::output); }

  void preempted() { locked([&] { ++preemptions_; }); }

  /// One prefix-cache lookup: of `queried_blocks` full prompt blocks,
  /// `hit_blocks` were found cached (counted in blocks, as vLLM does).
  void prefix_cache(index_t queried_blocks, index_t hit_blocks) {
    if (queried_blocks < 0 || hit_blocks < 0 || hit_blocks > queried_blocks)
      throw invalid_input("ctformer: metrics::prefix_cache needs 0 <= hit_blocks <= queried_blocks");
    locked([&] {
      prefix_cache_queries_ += static_cast<std::uint64_t>(queried_blocks);
      prefix_cache_hits_ += static_cast<std::uint64_t>(hit_blocks);
    });
  }

  void set_running(index_t n) {
    if (n < 0) throw invalid_input("ctformer: metrics::set_running needs a count >= 0");
    locked([&] { running_ = n; });
  }
  void set_waiting(index_t n) {
    if (n < 0) throw invalid_input("ctformer: metrics::set_waiting needs a count >= 0");
    locked([&] { waiting_ = n; });
  }
  /// The fraction of the KV pool in use; clamped into [0, 1] (used / total can
  /// round a hair past either end) and a NaN is ignored, so a gauge never
  /// throws from inside an engine step.
  void set_kv_cache_usage(double fraction) {
    if (std::isnan(fraction)) return;
    locked([&] { kv_cache_usage_ = std::clamp(fraction, 0.0, 1.0); });
  }

  /// Every metric as of `now`.
  metrics_snapshot snapshot(clock::time_point now = clock::now()) const {
    std::lock_guard lock(mutex_);
    return snapshot_locked(now);
  }

  /// The Prometheus text exposition format 0.0.4, with vLLM's metric names
  /// under the prefix "ctformer:" so existing dashboards need only the prefix changed.
  std::string prometheus_text(clock::time_point now = clock::now()) const {
    std::lock_guard lock(mutex_);  // one lock: the histograms and the counters are of the same moment
    const metrics_snapshot s = snapshot_locked(now);
    std::string out;
    write_histogram(out, "ctformer:time_to_first_token_seconds", "Time to first token in seconds.",
                    time_to_first_token_);
    write_histogram(out, "ctformer:time_per_output_token_seconds",
                    "Time per output token in seconds (per request, after the first token).", time_per_output_token_);
    write_histogram(out, "ctformer:inter_token_latency_seconds",
                    "Time between consecutive tokens of a sample in seconds.", inter_token_latency_);
    write_histogram(out, "ctformer:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                    end_to_end_);
    write_histogram(out, "ctformer:request_queue_time_seconds",
                    "Time a request waited before its first step in seconds.", queue_time_);
    write_counter(out, "ctformer:prompt_tokens_total", "Prompt tokens processed.", s.prompt_tokens);
    write_counter(out, "ctformer:generation_tokens_total", "Generation tokens produced.", s.output_tokens);
    write_header(out, "ctformer:request_success_total", "Requests finished, by finish reason.", "counter");
    const std::pair<finish_reason, std::uint64_t> finished[] = {{finish_reason::stop, s.requests_finished_stop},
                                                                {finish_reason::length, s.requests_finished_length},
                                                                {finish_reason::cancelled, s.requests_finished_cancelled},
                                                                {finish_reason::error, s.requests_finished_error}};
    for (const auto& [reason, n] : finished)
      write_sample(out, "ctformer:request_success_total",
                   std::string("finished_reason=\"").append(to_string(reason)).append("\""), n);
    write_counter(out, "ctformer:num_preemptions_total", "Sequences preempted for want of KV-cache blocks.",
                  s.preemptions);
    write_counter(out, "ctformer:prefix_cache_queries_total", "Prompt KV blocks looked up in the prefix cache.",
                  s.prefix_cache_queries);
    write_counter(out, "ctformer:prefix_cache_hits_total", "Prompt KV blocks found in the prefix cache.",
                  s.prefix_cache_hits);
    write_counter(out, "ctformer:requests_refused_total", "Requests refused because the queue was full.",
                  s.requests_refused);
    write_gauge(out, "ctformer:num_requests_running", "Requests running now.",
                static_cast<double>(s.requests_running));
    write_gauge(out, "ctformer:num_requests_waiting", "Requests waiting to start.",
                static_cast<double>(s.requests_waiting));
    write_gauge(out, "ctformer:kv_cache_usage_perc", "Fraction of the KV cache in use (1 is full).",
                s.kv_cache_usage);
    write_gauge(out, "ctformer:prompt_tokens_per_minute", "Prompt tokens processed in the last 60 seconds.",
                s.prompt_tokens_per_minute);
    write_gauge(out, "ctformer:generation_tokens_per_minute", "Generation tokens produced in the last 60 seconds.",
                s.output_tokens_per_minute);
    write_gauge(out, "ctformer:prompt_tokens_per_day", "Prompt tokens per day over the uptime.",
                s.prompt_tokens_per_day);
    write_gauge(out, "ctformer:generation_tokens_per_day", "Generation tokens per day over the uptime.",
                s.output_tokens_per_day);
    return out;
  }

 private:
  static constexpr std::int64_t window_seconds = 60;
  static constexpr double seconds_per_day = 86400.0;

  struct second_bucket {
    std::uint64_t prompt = 0, output = 0;
  };

  metrics_snapshot snapshot_locked(clock::time_point now) const {
    metrics_snapshot s;
    s.time_to_first_token = summarise(time_to_first_token_);
    s.time_per_output_token = summarise(time_per_output_token_);
    s.inter_token_latency = summarise(inter_token_latency_);
    s.end_to_end = summarise(end_to_end_);
    s.queue_time = summarise(queue_time_);
    s.requests_arrived = requests_arrived_;
    s.requests_refused = requests_refused_;
    s.requests_finished_stop = finished_stop_;
    s.requests_finished_length = finished_length_;
    s.requests_finished_cancelled = finished_cancelled_;
    s.requests_finished_error = finished_error_;
    s.prompt_tokens = prompt_tokens_;
    s.output_tokens = output_tokens_;
    s.preemptions = preemptions_;
    s.prefix_cache_queries = prefix_cache_queries_;
    s.prefix_cache_hits = prefix_cache_hits_;
    s.prefix_cache_hit_rate = prefix_cache_queries_ == 0 ? 0.0
                                                         : static_cast<double>(prefix_cache_hits_) /
                                                               static_cast<double>(prefix_cache_queries_);
    s.requests_running = running_;
    s.requests_waiting = waiting_;
    s.kv_cache_usage = kv_cache_usage_;
    // Tokens per minute is what was counted in the last 60 s, never scaled
    // up: in the first minute it is the tokens so far, so a server's first
    // seconds do not show a rate it has not sustained.
    const std::int64_t current = second_of(now);
    for (std::size_t i = 0; i < window_.size(); ++i) {
      if (window_second_[i] > current - window_seconds && window_second_[i] <= current) {
        s.prompt_tokens_per_minute += static_cast<double>(window_[i].prompt);
        s.output_tokens_per_minute += static_cast<double>(window_[i].output);
      }
    }
    s.uptime_seconds = std::max(std::chrono::duration<double>(now - start_).count(), 0.0);
    if (s.uptime_seconds > 0) {
      s.prompt_tokens_per_day = static_cast<double>(prompt_tokens_) / s.uptime_seconds * seconds_per_day;
      s.output_tokens_per_day = static_cast<double>(output_tokens_) / s.uptime_seconds * seconds_per_day;
    }
    return s;
  }

  template <class F>
  void locked(F&& f) {
    std::lock_guard lock(mutex_);
    f();
  }

  // Whole seconds since start (a time before start counts as second 0).
  std::int64_t second_of(clock::time_point t) const {
    return std::max<std::int64_t>(std::chrono::duration_cast<std::chrono::seconds>(t - start_).count(), 0);
  }

  void add_tokens(index_t n, clock::time_point now, std::uint64_t second_bucket::*field) {
    if (n < 0) throw invalid_input("ctformer: metrics token counts must be >= 0");
    const auto count = static_cast<std::uint64_t>(n);
    const std::int64_t second = second_of(now);
    std::lock_guard lock(mutex_);
    (field == &second_bucket::prompt ? prompt_tokens_ : output_tokens_) += count;
    const auto slot = static_cast<std::size_t>(second % window_seconds);
    if (window_second_[slot] < second) {  // the bucket last held a second a minute or more ago: reuse it
      window_[slot] = {};
      window_second_[slot] = second;
    }
    // A time older than the bucket's second is already out of the window
    // (the ring has moved on); it stays in the total only.
    if (window_second_[slot] == second) window_[slot].*field += count;
  }

  static latency_summary summarise(const latency_histogram& h) {
    return {h.count(), h.mean(), h.quantile(0.5), h.quantile(0.9), h.quantile(0.99), h.max()};
  }

  // Shortest text that reads back as the same double; +Inf / -Inf / NaN as Prometheus spells them.
  static void append_number(std::string& out, double v) {
    if (std::isnan(v)) {
      out += "NaN";
      return;
    }
    if (std::isinf(v)) {
      out += v > 0 ? "+Inf" : "-Inf";
      return;
    }
    char text[32];
    const auto result = std::to_chars(text, text + sizeof text, v);
    out.append(text, result.ptr);
  }
  static void append_number(std::string& out, std::uint64_t v) {
    char text[24];
    const auto result = std::to_chars(text, text + sizeof text, v);
    out.append(text, result.ptr);
  }

  static void write_header(std::string& out, std::string_view name, std::string_view help, std::string_view type) {
    out.append("# HELP ").append(name).append(" ").append(help).append("\n");
    out.append("# TYPE ").append(name).append(" ").append(type).append("\n");
  }
  // v: a double or a std::uint64_t (a counter prints exactly past 2^53).
  template <class Value>
  static void write_sample(std::string& out, std::string_view name, std::string_view labels, Value v) {
    out.append(name);
    if (!labels.empty()) out.append("{").append(labels).append("}");
    out += ' ';
    append_number(out, v);
    out += '\n';
  }
  static void write_counter(std::string& out, std::string_view name, std::string_view help, std::uint64_t v) {
    write_header(out, name, help, "counter");
    write_sample(out, name, "", v);
  }
  static void write_gauge(std::string& out, std::string_view name, std::string_view help, double v) {
    write_header(out, name, help, "gauge");
    write_sample(out, name, "", v);
  }
  static void write_histogram(std::string& out, std::string_view name, std::string_view help,
                              const latency_histogram& h) {
    write_header(out, name, help, "histogram");
    const auto bounds = h.bounds();
    for (std::size_t i = 0; i < bounds.size(); ++i) {
      out.append(name).append("_bucket{le=\"");
      append_number(out, bounds[i]);
      out.append("\"} ");
      append_number(out, h.bucket_count(i));
      out += '\n';
    }
    out.append(name).append("_sum ");
    append_number(out, h.sum());
    out.append("\n").append(name).append("_count ");
    append_number(out, h.count());
    out += '\n';
  }

  mutable std::mutex mutex_;
  clock::time_point start_;
  latency_histogram time_to_first_token_, time_per_output_token_, inter_token_latency_, end_to_end_, queue_time_;
  std::uint64_t requests_arrived_ = 0, requests_refused_ = 0;
  std::uint64_t finished_stop_ = 0, finished_length_ = 0, finished_cancelled_ = 0, finished_error_ = 0;
  std::uint64_t prompt_tokens_ = 0, output_tokens_ = 0, preemptions_ = 0;
  std::uint64_t prefix_cache_queries_ = 0, prefix_cache_hits_ = 0;
  index_t running_ = 0, waiting_ = 0;
  double kv_cache_usage_ = 0;
  // Tokens per second for the last minute: bucket i holds second window_second_[i]
  // (whole seconds since start, i == second % 60), reset when a later second reuses it.
  std::array<second_bucket, window_seconds> window_{};
  std::array<std::int64_t, window_seconds> window_second_{};
};

namespace detail {
// Fixed-point text with `digits` decimals, independent of the C locale.
inline std::string fixed(double v, int digits) {
  if (!std::isfinite(v)) return std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf");
  char text[64];
  const auto result = std::to_chars(text, text + sizeof text, v, std::chars_format::fixed, digits);
  if (result.ec != std::errc{}) return std::to_string(v);
  return std::string(text, result.ptr);
}
}  // namespace detail

/// A few lines for a person (an example's log): TTFT and TPOT percentiles in
/// milliseconds, tokens per minute and per day, requests by finish reason.
inline std::string format_summary(const metrics_snapshot& s) {
  const auto latency = [](std::string_view name, const latency_summary& l) {
    return std::string(name)
        .append(" ms: p50 ")
        .append(detail::fixed(l.p50 * 1e3, 2))
        .append("  p90 ")
        .append(detail::fixed(l.p90 * 1e3, 2))
        .append("  p99 ")
        .append(detail::fixed(l.p99 * 1e3, 2))
        .append("  (n=")
        .append(std::to_string(l.count))
        .append(")\n");
  };
  std::string out;
  out.append("requests: ")
      .append(std::to_string(s.requests_arrived))
      .append(" arrived, ")
      .append(std::to_string(s.requests_refused))
      .append(" refused; finished ")
      .append(std::to_string(s.requests_finished_stop))
      .append(" stop, ")
      .append(std::to_string(s.requests_finished_length))
      .append(" length, ")
      .append(std::to_string(s.requests_finished_cancelled))
      .append(" cancelled, ")
      .append(std::to_string(s.requests_finished_error))
      .append(" error\n");
  out += latency("TTFT", s.time_to_first_token);
  out += latency("TPOT", s.time_per_output_token);
  out.append("tokens per minute: prompt ")
      .append(detail::fixed(s.prompt_tokens_per_minute, 0))
      .append(", output ")
      .append(detail::fixed(s.output_tokens_per_minute, 0))
      .append("\n");
  out.append("tokens per day: prompt ")
      .append(detail::fixed(s.prompt_tokens_per_day, 0))
      .append(", output ")
      .append(detail::fixed(s.output_tokens_per_day, 0))
      .append(" (over ")
      .append(detail::fixed(s.uptime_seconds, 1))
      .append(" s)\n");
  return out;
}

}  // namespace ctformer::infer
