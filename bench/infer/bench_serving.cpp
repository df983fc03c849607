// Serving under load: an in-process load generator submits requests to an
// infer::engine at Poisson arrival times and reports throughput, time to
// first token and time per output token (p50 and p99), and goodput, for
// static, dynamic and continuous batching. The LLaMA-shaped 110 M model of
// bench_decode has random weights, q8_0, 2 threads, and a paged bf16 KV
// cache. Each request's prompt length is uniform in [16, 128] tokens and its
// output length uniform in [32, 192] (max_tokens, no end token): chat-like,
// decode-heavy, where how sequences share steps decides the throughput. The seeds
// are fixed, so every policy serves the same requests at the same times.
// Goodput counts the requests per second that meet both TTFT <= 4 s and
// TPOT <= 0.25 s. Prefix caching: a shared-prefix workload (every prompt is
// one 512-token system prompt and its own question) with the cache on and
// off, and the time to first token of a repeated 1,000-token prompt.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "ctformer/ctformer.hpp"
#include "ctformer/infer/engine.hpp"

using namespace ctformer;

namespace {

struct llama_110m {
  static constexpr int vocab = 32000, d_model = 768, n_layer = 12, n_head = 12, n_kv_head = 12, d_ff = 2048,
                       max_seq = 1024;
  static constexpr float rope_base = 10000.0f;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
};

using model_type = infer::inference_model<llama_110m, quant::q8_0, infer::kv::paged<16, bf16>>;
constexpr int requests_per_run = 32;
constexpr double ttft_slo_seconds = 4.0, tpot_slo_seconds = 0.25;

model_type& model() {
  static const std::unique_ptr<model_type> m = [] {
    const auto table = model_type::parameter_table();
    std::vector<float> p(std::size_t(model_type::parameter_count()), 0.0f);
    std::mt19937 rng(2024);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    for (const auto& info : table)
      for (index_t i = 0; i < info.size(); ++i)
        p[std::size_t(info.offset + i)] = info.kind == nn::parameter_kind::norm ? 1.0f : normal(rng);
    return std::make_unique<model_type>(tensor_view<const float, 1>(p.data(), {index_t(p.size())}), table, 256,
                                        cpu::par.with_threads(2));
  }();
  return *m;
}

struct workload_item {
  double arrival_seconds;
  infer::request request;
};

// The same requests and arrival times for every policy at one rate
// (requests per second; 0: all at once, as batch inference sees them).
std::vector<workload_item> workload(double rate) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> prompt_length(16, 128), output_length(32, 192), token(0, llama_110m::vocab - 1);
  std::exponential_distribution<double> gap(rate > 0 ? rate : 1.0);
  std::vector<workload_item> items;
  double t = 0;
  for (int i = 0; i < requests_per_run; ++i) {
    infer::request r;
    r.prompt.resize(std::size_t(prompt_length(rng)));
    for (auto& x : r.prompt) x = token(rng);
    r.max_tokens = output_length(rng);
    r.sampling.temperature = 0;
    items.push_back({t, std::move(r)});
    if (rate > 0) t += gap(rng);
  }
  return items;
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, std::size_t(q * double(v.size() - 1) + 0.5))];
}

// Every prompt opens with the same 512-token system prompt, then a question
// of uniform [16, 64] tokens; answers of uniform [16, 64] tokens.
std::vector<workload_item> shared_prefix_workload(double rate) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> question_length(16, 64), output_length(16, 64), token(0, llama_110m::vocab - 1);
  std::exponential_distribution<double> gap(rate > 0 ? rate : 1.0);
  std::vector<std::int32_t> system(512);
  for (auto& x : system) x = token(rng);
  std::vector<workload_item> items;
  double t = 0;
  for (int i = 0; i < requests_per_run / 2; ++i) {
    infer::request r;
    r.prompt = system;
    r.prompt.resize(system.size() + std::size_t(question_length(rng)));
    for (std::size_t j = system.size(); j < r.prompt.size(); ++j) r.prompt[j] = token(rng);
    r.max_tokens = output_length(rng);
    r.sampling.temperature = 0;
    items.push_back({t, std::move(r)});
    if (rate > 0) t += gap(rng);
  }
  return items;
}

template <class Batching>
void run_load(benchmark::State& state, const std::vector<workload_item>& items, infer::engine_options options) {
  model_type& m = model();
  const double rate = double(state.range(0)) / 10.0;
  for (auto _ : state) {
    infer::engine<model_type, Batching> engine(m, options);
    std::vector<infer::request_handle> handles;
    const auto start = std::chrono::steady_clock::now();
    for (const auto& item : items) {
      std::this_thread::sleep_until(start + std::chrono::duration<double>(item.arrival_seconds));
      handles.push_back(engine.submit(item.request));
    }
    engine.close_input();  // request-level policies start a last partial batch
    std::vector<double> ttft, tpot;
    std::size_t prompt = 0, output = 0, good = 0;
    for (auto& h : handles) {
      const auto r = h.wait();
      prompt += std::size_t(r.prompt_tokens);
      output += std::size_t(r.output_tokens);
      ttft.push_back(r.first_token_seconds);
      const double per_token =
          r.output_tokens > 1 ? (r.total_seconds - r.first_token_seconds) / double(r.output_tokens - 1) : 0.0;
      tpot.push_back(per_token);
      good += r.first_token_seconds <= ttft_slo_seconds && per_token <= tpot_slo_seconds ? 1 : 0;
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    state.SetIterationTime(seconds);
    state.counters["output_tokens_per_s"] = double(output) / seconds;
    state.counters["total_tokens_per_s"] = double(prompt + output) / seconds;
    state.counters["ttft_p50_s"] = percentile(ttft, 0.5);
    state.counters["ttft_p99_s"] = percentile(ttft, 0.99);
    state.counters["tpot_p50_s"] = percentile(tpot, 0.5);
    state.counters["tpot_p99_s"] = percentile(tpot, 0.99);
    state.counters["goodput_requests_per_s"] = double(good) / seconds;
    const auto metrics = engine.metrics().snapshot();
    state.counters["preemptions"] = double(metrics.preemptions);
    state.counters["prefix_cache_hit_rate"] = metrics.prefix_cache_hit_rate;
  }
  state.SetLabel(rate > 0 ? "poisson" : "all at once");
}

template <class Batching>
void serve_load(benchmark::State& state) {
  run_load<Batching>(state, workload(double(state.range(0)) / 10.0), {});
}

template <bool PrefixCaching>
void serve_shared_prefix(benchmark::State& state) {
  run_load<infer::continuous_batching<16, 256, 128>>(state, shared_prefix_workload(double(state.range(0)) / 10.0),
                                                     {.prefix_caching = PrefixCaching});
}

// One 1,000-token prompt, then the same prompt again (one output token
// each): the repeat's time to first token is its prefill, which the prefix
// cache cuts to the positions after the last whole cached block.
template <bool PrefixCaching>
void repeated_prompt(benchmark::State& state) {
  model_type& m = model();
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> token(0, llama_110m::vocab - 1);
  infer::request r;
  r.prompt.resize(1000);
  for (auto& x : r.prompt) x = token(rng);
  r.max_tokens = 1;
  for (auto _ : state) {
    infer::engine<model_type, infer::continuous_batching<16, 256, 128>> engine(m, {.prefix_caching = PrefixCaching});
    const double first = engine.submit(r).wait().first_token_seconds;
    const double repeat = engine.submit(r).wait().first_token_seconds;
    state.SetIterationTime(repeat);
    state.counters["ttft_first_s"] = first;
    state.counters["ttft_repeat_s"] = repeat;
    state.counters["first_over_repeat"] = first / repeat;
    state.counters["prefill_tokens_per_s"] = 1000.0 / first;
  }
}

// Arrival rates in tenths of a request per second; 0: every request at once.
#define SERVING_RATES ->Arg(0)->Arg(10)->Arg(20)->UseManualTime()->Iterations(1)->Unit(benchmark::kSecond)
// Every policy holds at most 16 sequences at once.
BENCHMARK(serve_load<infer::static_batching<16>>) SERVING_RATES;
BENCHMARK(serve_load<infer::dynamic_batching<16, 250>>) SERVING_RATES;
BENCHMARK(serve_load<infer::continuous_batching<16, 256, 128>>) SERVING_RATES;
BENCHMARK(serve_shared_prefix<false>)->Arg(10)->Arg(20)->UseManualTime()->Iterations(1)->Unit(benchmark::kSecond);
BENCHMARK(serve_shared_prefix<true>)->Arg(10)->Arg(20)->UseManualTime()->Iterations(1)->Unit(benchmark::kSecond);
BENCHMARK(repeated_prompt<false>)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(repeated_prompt<true>)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
