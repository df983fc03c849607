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
// TPOT <= 0.25 s.
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
                       max_seq = 512;
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

template <class Batching>
void serve_load(benchmark::State& state) {
  const double rate = double(state.range(0)) / 10.0;
  model_type& m = model();
  const auto items = workload(rate);
  for (auto _ : state) {
    infer::engine<model_type, Batching> engine(m, {});
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
    state.counters["preemptions"] = double(engine.metrics().snapshot().preemptions);
  }
  state.SetLabel(rate > 0 ? "poisson" : "all at once");
}

// Arrival rates in tenths of a request per second; 0: every request at once.
#define SERVING_RATES ->Arg(0)->Arg(10)->Arg(20)->UseManualTime()->Iterations(1)->Unit(benchmark::kSecond)
// Every policy holds at most 16 sequences at once.
BENCHMARK(serve_load<infer::static_batching<16>>) SERVING_RATES;
BENCHMARK(serve_load<infer::dynamic_batching<16, 250>>) SERVING_RATES;
BENCHMARK(serve_load<infer::continuous_batching<16, 256, 128>>) SERVING_RATES;

}  // namespace

BENCHMARK_MAIN();
