// infer::metrics and infer::latency_histogram: quantiles on known data (and
// exact for one sample), cumulative buckets, tokens per minute over a ring that
// wraps, tokens per day, prefix-cache hit rate, requests by finish reason, a
// Prometheus text that parses, and counts that survive concurrent callers.
#include <catch2/catch.hpp>

#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "ctformer/infer/metrics.hpp"

using namespace ctformer;
using infer::latency_histogram;
using infer::metrics;
using std::chrono::milliseconds;
using std::chrono::seconds;

namespace {

// The width of the bucket that holds v (the first bucket starts at 0).
double width_of_bucket_holding(const latency_histogram& h, double v) {
  const auto b = h.bounds();
  for (std::size_t i = 0; i < b.size(); ++i)
    if (v <= b[i]) return b[i] - (i == 0 ? 0.0 : b[i - 1]);
  return std::numeric_limits<double>::infinity();
}

}  // namespace

TEST_CASE("an empty histogram answers 0", "[infer][metrics]") {
  latency_histogram h;
  CHECK(h.count() == 0);
  CHECK(h.sum() == 0);
  CHECK(h.min() == 0);
  CHECK(h.max() == 0);
  CHECK(h.mean() == 0);
  for (double q : {0.0, 0.5, 0.9, 0.99, 1.0}) CHECK(h.quantile(q) == 0);
  for (std::size_t i = 0; i < h.bounds().size(); ++i) CHECK(h.bucket_count(i) == 0);
}

TEST_CASE("one observation is every quantile exactly", "[infer][metrics]") {
  for (double v : {0.0, 0.0004, 0.0123, 0.3, 1.0, 3000.0}) {
    latency_histogram h;
    h.observe(v);
    CHECK(h.count() == 1);
    CHECK(h.min() == v);
    CHECK(h.max() == v);
    CHECK(h.mean() == v);
    for (double q : {0.0, 0.01, 0.5, 0.9, 0.99, 1.0}) CHECK(h.quantile(q) == v);
  }
}

TEST_CASE("quantiles of uniform data fall within the width of the true quantile's bucket", "[infer][metrics]") {
  // 2000 values evenly spread over (0, 2 s). The estimate interpolates inside
  // the bucket that holds the true quantile, so it can be wrong by at most
  // that bucket's width (the histogram keeps nothing finer); q = 0 and q = 1
  // are clamped to the observed extremes and so are exact.
  latency_histogram h;
  const int n = 2000;
  for (int i = 0; i < n; ++i) h.observe((i + 0.5) / n * 2.0);
  CHECK(h.count() == static_cast<std::uint64_t>(n));
  CHECK(h.mean() == Approx(1.0).epsilon(1e-12));
  for (double q : {0.1, 0.5, 0.9, 0.99}) {
    const double truth = 2.0 * q;
    INFO("q = " << q << ", estimate " << h.quantile(q));
    CHECK(std::abs(h.quantile(q) - truth) <= width_of_bucket_holding(h, truth));
  }
  CHECK(h.quantile(0.0) == h.min());
  CHECK(h.quantile(1.0) == h.max());
  CHECK(h.min() == Approx(0.5 / n * 2.0));
  CHECK(h.max() == Approx((n - 0.5) / n * 2.0));
  // Quantiles never decrease with q.
  double previous = 0;
  for (int i = 0; i <= 100; ++i) {
    const double v = h.quantile(i / 100.0);
    CHECK(v >= previous);
    previous = v;
  }
}

TEST_CASE("bucket counts are cumulative, a bound belongs to its own bucket, bad values are handled",
          "[infer][metrics]") {
  latency_histogram h;
  const auto b = h.bounds();
  REQUIRE(b.size() == 23);
  CHECK(b.front() == 0.001);
  CHECK(b[b.size() - 2] == 2560);
  CHECK(std::isinf(b.back()));
  h.observe(0.001);   // exactly a bound: counted in le="0.001"
  h.observe(0.002);   // le="0.0025"
  h.observe(0.3);     // le="0.5"
  h.observe(3000.0);  // past the last finite bound: only +Inf
  CHECK(h.bucket_count(0) == 1);
  CHECK(h.bucket_count(1) == 2);
  CHECK(h.bucket_count(8) == 2);  // le="0.25"
  CHECK(h.bucket_count(9) == 3);  // le="0.5"
  CHECK(h.bucket_count(21) == 3); // le="2560"
  CHECK(h.bucket_count(22) == 4); // le="+Inf"
  CHECK(h.bucket_count(22) == h.count());
  CHECK_THROWS_AS(h.bucket_count(23), invalid_input);
  CHECK(h.sum() == Approx(3000.303));

  // NaN and infinities are ignored; a negative duration counts as 0.
  latency_histogram g;
  g.observe(std::numeric_limits<double>::quiet_NaN());
  g.observe(std::numeric_limits<double>::infinity());
  CHECK(g.count() == 0);
  g.observe(-0.5);
  CHECK(g.count() == 1);
  CHECK(g.min() == 0);
  CHECK(g.sum() == 0);
  CHECK(g.bucket_count(0) == 1);
  CHECK_THROWS_AS(g.quantile(1.5), invalid_input);
  CHECK_THROWS_AS(g.quantile(-0.1), invalid_input);
  CHECK_THROWS_AS(g.quantile(std::numeric_limits<double>::quiet_NaN()), invalid_input);
}

TEST_CASE("tokens per minute counts the last 60 s and drops older seconds as the ring wraps", "[infer][metrics]") {
  const auto start = metrics::clock::time_point{} + std::chrono::hours(1);
  metrics m(start);
  for (int t = 0; t < 60; ++t) {
    m.add_prompt_tokens(100, start + seconds(t) + milliseconds(250));
    m.add_output_tokens(10, start + seconds(t) + milliseconds(250));
  }
  auto s = m.snapshot(start + seconds(59) + milliseconds(500));
  CHECK(s.prompt_tokens_per_minute == 6000);
  CHECK(s.output_tokens_per_minute == 600);
  // Not extrapolated in the first minute: at 30.5 s, the tokens of seconds 0..30.
  CHECK(m.snapshot(start + seconds(30) + milliseconds(500)).output_tokens_per_minute == 310);

  // Seconds 60..64 reuse the buckets of seconds 0..4: those leave the window.
  for (int t = 60; t < 65; ++t) m.add_output_tokens(10, start + seconds(t));
  s = m.snapshot(start + seconds(64) + milliseconds(500));
  CHECK(s.output_tokens_per_minute == 600);  // seconds 5..64
  CHECK(s.prompt_tokens_per_minute == 100 * 55);  // seconds 5..59
  CHECK(s.output_tokens == 650);
  CHECK(s.prompt_tokens == 6000);

  // A time older than its bucket's second is out of the window, but in the total.
  m.add_output_tokens(7, start + seconds(1));
  s = m.snapshot(start + seconds(64) + milliseconds(500));
  CHECK(s.output_tokens_per_minute == 600);
  CHECK(s.output_tokens == 657);

  // Long after: nothing in the window; a stale bucket reused starts from 0.
  CHECK(m.snapshot(start + seconds(200)).output_tokens_per_minute == 0);
  m.add_output_tokens(3, start + seconds(200));  // reuses the bucket that held second 20
  s = m.snapshot(start + seconds(200) + milliseconds(1));
  CHECK(s.output_tokens_per_minute == 3);
  CHECK(s.prompt_tokens_per_minute == 0);
}

TEST_CASE("tokens per day is the total over the uptime, scaled to 86400 s", "[infer][metrics]") {
  const auto start = metrics::clock::time_point{} + std::chrono::hours(2);
  metrics m(start);
  auto s = m.snapshot(start);
  CHECK(s.uptime_seconds == 0);
  CHECK(s.output_tokens_per_day == 0);
  m.add_output_tokens(1000, start + seconds(10));
  m.add_prompt_tokens(250, start + seconds(10));
  s = m.snapshot(start + seconds(100));
  CHECK(s.uptime_seconds == Approx(100));
  CHECK(s.output_tokens_per_day == Approx(1000.0 / 100.0 * 86400.0));
  CHECK(s.prompt_tokens_per_day == Approx(250.0 / 100.0 * 86400.0));
  CHECK_THROWS_AS(m.add_output_tokens(-1, start), invalid_input);
}

TEST_CASE("prefix-cache hit rate is hits over queries, 0 when none", "[infer][metrics]") {
  metrics m;
  CHECK(m.snapshot().prefix_cache_hit_rate == 0);
  m.prefix_cache(10, 4);
  m.prefix_cache(10, 6);
  m.prefix_cache(0, 0);
  const auto s = m.snapshot();
  CHECK(s.prefix_cache_queries == 20);
  CHECK(s.prefix_cache_hits == 10);
  CHECK(s.prefix_cache_hit_rate == 0.5);
  CHECK_THROWS_AS(m.prefix_cache(3, 4), invalid_input);
  CHECK_THROWS_AS(m.prefix_cache(-1, 0), invalid_input);
}

TEST_CASE("requests are counted by finish reason; gauges hold the last value", "[infer][metrics]") {
  metrics m;
  for (int i = 0; i < 6; ++i) m.request_arrived();
  m.request_refused();
  m.request_finished(infer::finish_reason::stop);
  m.request_finished(infer::finish_reason::stop);
  m.request_finished(infer::finish_reason::length);
  m.request_finished(infer::finish_reason::cancelled);
  m.request_finished(infer::finish_reason::error);
  m.preempted();
  m.preempted();
  m.set_running(2);
  m.set_waiting(5);
  m.set_waiting(3);
  m.set_kv_cache_usage(0.25);
  auto s = m.snapshot();
  CHECK(s.requests_arrived == 6);
  CHECK(s.requests_refused == 1);
  CHECK(s.requests_finished_stop == 2);
  CHECK(s.requests_finished_length == 1);
  CHECK(s.requests_finished_cancelled == 1);
  CHECK(s.requests_finished_error == 1);
  CHECK(s.preemptions == 2);
  CHECK(s.requests_running == 2);
  CHECK(s.requests_waiting == 3);
  CHECK(s.kv_cache_usage == 0.25);
  m.set_kv_cache_usage(1.0000001);  // rounding past full reads as full
  CHECK(m.snapshot().kv_cache_usage == 1.0);
  CHECK_THROWS_AS(m.set_running(-1), invalid_input);

  m.observe_time_to_first_token(0.02);
  m.observe_time_per_output_token(0.005);
  s = m.snapshot();
  CHECK(s.time_to_first_token.count == 1);
  CHECK(s.time_to_first_token.p50 == 0.02);
  CHECK(s.time_to_first_token.p99 == 0.02);
  CHECK(s.time_to_first_token.max == 0.02);
  CHECK(s.time_per_output_token.mean == 0.005);
  CHECK(s.end_to_end.count == 0);
  const std::string summary = infer::format_summary(s);
  CHECK(summary.find("TTFT ms: p50 20.00") != std::string::npos);
  CHECK(summary.find("TPOT ms: p50 5.00") != std::string::npos);
  CHECK(summary.find("2 stop") != std::string::npos);
  CHECK(summary.find("tokens per minute") != std::string::npos);
  CHECK(summary.find("tokens per day") != std::string::npos);
}

TEST_CASE("prometheus_text names every metric once and every sample line parses", "[infer][metrics]") {
  const auto start = metrics::clock::time_point{} + std::chrono::hours(3);
  metrics m(start);
  for (double v : {0.0005, 0.004, 0.03, 0.2, 1.5, 9.0, 3000.0}) {
    m.observe_time_to_first_token(v);
    m.observe_time_per_output_token(v / 10);
    m.observe_inter_token_latency(v / 10);
    m.observe_end_to_end(v * 2);
    m.observe_queue_time(v / 2);
  }
  m.request_arrived();
  m.request_finished(infer::finish_reason::length);
  m.add_prompt_tokens(123, start + seconds(1));
  m.add_output_tokens(45, start + seconds(2));
  m.prefix_cache(8, 2);
  m.set_kv_cache_usage(0.125);
  const std::string text = m.prometheus_text(start + seconds(10));

  const std::vector<std::string> histograms = {
      "ctformer:time_to_first_token_seconds", "ctformer:time_per_output_token_seconds",
      "ctformer:inter_token_latency_seconds", "ctformer:e2e_request_latency_seconds",
      "ctformer:request_queue_time_seconds"};
  const std::vector<std::string> others = {
      "ctformer:prompt_tokens_total",           "ctformer:generation_tokens_total",
      "ctformer:request_success_total",         "ctformer:num_preemptions_total",
      "ctformer:prefix_cache_queries_total",    "ctformer:prefix_cache_hits_total",
      "ctformer:requests_refused_total",        "ctformer:num_requests_running",
      "ctformer:num_requests_waiting",          "ctformer:kv_cache_usage_perc",
      "ctformer:prompt_tokens_per_minute",      "ctformer:generation_tokens_per_minute",
      "ctformer:prompt_tokens_per_day",         "ctformer:generation_tokens_per_day"};

  std::map<std::string, int> type_lines;
  std::map<std::string, std::vector<double>> buckets;  // per histogram, in order
  std::map<std::string, double> values;                // name{labels} -> value
  std::set<std::string> reasons;
  const std::regex sample(R"(^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? (\S+)$)");
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    INFO(line);
    REQUIRE(!line.empty());
    if (line.starts_with("# TYPE ")) {
      std::istringstream words(line.substr(7));
      std::string name, type;
      words >> name >> type;
      ++type_lines[name];
      CHECK((type == "counter" || type == "gauge" || type == "histogram"));
      continue;
    }
    if (line.starts_with("# HELP ")) continue;
    std::smatch match;
    REQUIRE(std::regex_match(line, match, sample));
    const std::string name = match[1], labels = match[3], number = match[4];
    double v = 0;
    if (number == "+Inf") {
      v = std::numeric_limits<double>::infinity();
    } else {
      const auto result = std::from_chars(number.data(), number.data() + number.size(), v);
      REQUIRE(result.ec == std::errc{});
      REQUIRE(result.ptr == number.data() + number.size());
      REQUIRE(std::isfinite(v));
    }
    values[name + (labels.empty() ? "" : "{" + labels + "}")] = v;
    if (name.ends_with("_bucket")) {
      REQUIRE(labels.starts_with("le=\""));
      buckets[name.substr(0, name.size() - 7)].push_back(v);
    }
    if (name == "ctformer:request_success_total") reasons.insert(labels);
  }

  for (const auto& name : histograms) {
    INFO(name);
    CHECK(type_lines[name] == 1);
    const auto& b = buckets[name];
    REQUIRE(b.size() == 23);
    for (std::size_t i = 1; i < b.size(); ++i) CHECK(b[i] >= b[i - 1]);
    CHECK(values.count(name + "_bucket{le=\"+Inf\"}") == 1);
    CHECK(values[name + "_bucket{le=\"+Inf\"}"] == values[name + "_count"]);
    CHECK(values[name + "_count"] == 7);
    CHECK(values.count(name + "_sum") == 1);
  }
  for (const auto& name : others) {
    INFO(name);
    CHECK(type_lines[name] == 1);
  }
  for (const auto& [name, n] : type_lines) CHECK(n == 1);
  CHECK(type_lines.size() == histograms.size() + others.size());
  CHECK(reasons == std::set<std::string>{"finished_reason=\"stop\"", "finished_reason=\"length\"",
                                         "finished_reason=\"cancelled\"", "finished_reason=\"error\""});
  CHECK(values["ctformer:request_success_total{finished_reason=\"length\"}"] == 1);
  CHECK(values["ctformer:prompt_tokens_total"] == 123);
  CHECK(values["ctformer:generation_tokens_total"] == 45);
  CHECK(values["ctformer:prefix_cache_hits_total"] == 2);
  CHECK(values["ctformer:kv_cache_usage_perc"] == 0.125);
  CHECK(values["ctformer:generation_tokens_per_minute"] == 45);
  CHECK(values["ctformer:generation_tokens_per_day"] == Approx(45.0 / 10.0 * 86400.0));
  CHECK(values["ctformer:time_to_first_token_seconds_bucket{le=\"0.001\"}"] == 1);
  CHECK(values["ctformer:time_to_first_token_seconds_bucket{le=\"2560\"}"] == 6);
}

TEST_CASE("concurrent callers lose no observation", "[infer][metrics]") {
  metrics m;
  const int threads = 4, per_thread = 10000;
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&m, t] {
      for (int i = 0; i < per_thread; ++i) {
        m.observe_time_to_first_token(0.001 * (i % 100 + t));
        m.add_output_tokens(1, metrics::clock::now());
        if (i % 1000 == 0) (void)m.prometheus_text();  // a scraper racing the writers
      }
    });
  }
  for (auto& w : workers) w.join();
  const auto s = m.snapshot();
  CHECK(s.time_to_first_token.count == static_cast<std::uint64_t>(threads * per_thread));
  CHECK(s.output_tokens == static_cast<std::uint64_t>(threads * per_thread));
}
