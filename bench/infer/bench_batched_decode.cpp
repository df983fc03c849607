// Batched decode: aggregate decode tokens/s of 1, 4, 16 and 64 sequences
// decoding together in one forward call per step (infer::batch) at contexts
// 128 and 1024, on the LLaMA-shaped 110 M model of bench_decode (random
// weights) in fp32, q8_0 and q4_0, 1 and 2 threads, over a paged bf16 KV
// cache (llama.cpp's default F16 cache has the same bytes per element).
// Each format's prefill of a 512-token prompt runs first on the same
// threads: the compute ceiling a growing batch approaches, printed beside
// every decode row as of_prefill = decode tokens/s / prefill tokens/s.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "ctformer/ctformer.hpp"
#include "../common/memory_bandwidth.hpp"

using namespace ctformer;

namespace {

struct llama_110m {
  static constexpr int vocab = 32000, d_model = 768, n_layer = 12, n_head = 12, n_kv_head = 12, d_ff = 2048,
                       max_seq = 2048;
  static constexpr float rope_base = 10000.0f;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
};

constexpr index_t block_tokens = 16;
using kv_policy = infer::kv::paged<block_tokens, bf16>;
template <class Format>
using model_for = infer::inference_model<llama_110m, Format, kv_policy>;

constexpr index_t prompt_tokens = 512, most_sequences = 64, longest_context = 1024;

double bandwidth[3] = {0, 0, 0};
// Prefill tokens/s by (format, threads), filled by the prefill rows that run first.
std::map<std::pair<std::string, int>, double> prefill_rate;

const std::vector<float>& random_parameters() {
  static const std::vector<float> params = [] {
    const auto table = model_for<quant::fp32>::parameter_table();
    std::vector<float> p(std::size_t(model_for<quant::fp32>::parameter_count()), 0.0f);
    std::mt19937 rng(2024);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    for (const auto& info : table)
      for (index_t i = 0; i < info.size(); ++i)
        p[std::size_t(info.offset + i)] = info.kind == nn::parameter_kind::norm ? 1.0f : normal(rng);
    return p;
  }();
  return params;
}

template <class Format>
model_for<Format>& model() {
  static const std::unique_ptr<model_for<Format>> m = [] {
    const auto& p = random_parameters();
    return std::make_unique<model_for<Format>>(tensor_view<const float, 1>(p.data(), {index_t(p.size())}),
                                               model_for<Format>::parameter_table(), prompt_tokens,
                                               cpu::par.with_threads(2));
  }();
  return *m;
}

// One pool for every decode row: 64 sequences whose keys and values are
// random up to the longest context (the values do not change the work, and
// writing them directly saves 64 long prefills).
struct shared_cache {
  static constexpr index_t head_dim = llama_110m::d_model / llama_110m::n_head;
  infer::kv_cache<kv_policy> cache{llama_110m::n_layer, llama_110m::n_kv_head, head_dim, llama_110m::max_seq,
                                   most_sequences * (longest_context + block_tokens)};
  std::vector<infer::sequence_id> ids;
  shared_cache() {
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> rows(std::size_t(longest_context * llama_110m::n_kv_head * head_dim));
    for (auto& x : rows) x = normal(rng);
    const tensor_view<const float, 3> kv(rows.data(), {longest_context, llama_110m::n_kv_head, head_dim});
    for (index_t s = 0; s < most_sequences; ++s) {
      ids.push_back(cache.open_sequence());
      cache.reserve(ids.back(), longest_context + 1);
      for (index_t l = 0; l < llama_110m::n_layer; ++l) cache.write(l, ids.back(), 0, kv, kv);
    }
  }
};
shared_cache& cache() {
  static shared_cache c;
  return c;
}

std::vector<std::int32_t> random_prompt(index_t n) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> dist(0, llama_110m::vocab - 1);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = dist(rng);
  return t;
}

template <class Format>
void bm_prefill(benchmark::State& state) {
  const int threads = int(state.range(0));
  auto& m = model<Format>();
  m.set_exec(cpu::par.with_threads(threads));
  auto pool = m.make_cache(prompt_tokens);
  const auto prompt = random_prompt(prompt_tokens);
  {  // untimed: faults in the cache's pages and the kernels' scratch
    const auto seq = pool.open_sequence();
    benchmark::DoNotOptimize(m.prefill(pool, seq, prompt).data());
    pool.close_sequence(seq);
  }
  double seconds = 0;
  std::int64_t runs = 0;
  for (auto _ : state) {
    const auto seq = pool.open_sequence();
    const auto t0 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(m.prefill(pool, seq, prompt).data());
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++runs;
    pool.close_sequence(seq);
  }
  const double rate = double(runs * prompt_tokens) / seconds;
  prefill_rate[{std::string(Format::name), threads}] = rate;
  state.counters["tok/s"] = rate;
}

/// state.range: sequences, context (128 or 1024), threads.
template <class Format>
void bm_batched_decode(benchmark::State& state) {
  const index_t sequences = state.range(0), context = state.range(1);
  const int threads = int(state.range(2));
  auto& m = model<Format>();
  m.set_exec(cpu::par.with_threads(threads));
  auto& c = cache();
  infer::batch rows(sequences);
  double seconds = 0;
  std::int64_t steps = 0;
  for (auto _ : state) {
    rows.clear();
    for (index_t s = 0; s < sequences; ++s) {
      c.cache.set_length(c.ids[std::size_t(s)], context);  // every step decodes at exactly this context
      rows.add(42 + std::int32_t(s), context, c.ids[std::size_t(s)], true);
    }
    const auto t0 = std::chrono::steady_clock::now();
    const auto logits = m.forward(c.cache, rows);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++steps;
    benchmark::DoNotOptimize(logits.data());
  }
  const double tokens_per_s = double(steps * sequences) / seconds;
  state.counters["sequences"] = double(sequences);
  state.counters["context"] = double(context);
  state.counters["tok/s"] = tokens_per_s;
  state.counters["ms/step"] = 1e3 * seconds / double(steps);
  const auto prefill = prefill_rate.find({std::string(Format::name), threads});
  if (prefill != prefill_rate.end()) {
    state.counters["prefill_tok/s"] = prefill->second;
    state.counters["of_prefill"] = tokens_per_s / prefill->second;
  }
}

void prefill_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads"})->ArgsProduct({{1, 2}})->Iterations(2)->Unit(benchmark::kMillisecond)->UseRealTime();
}
void batched_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"sequences", "context", "threads"})
      ->ArgsProduct({{1, 4, 16, 64}, {128, longest_context}, {1, 2}})
      ->MinTime(0.3)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

BENCHMARK(bm_prefill<quant::fp32>)->Apply(prefill_args);
BENCHMARK(bm_prefill<quant::q8_0>)->Apply(prefill_args);
BENCHMARK(bm_prefill<quant::q4_0>)->Apply(prefill_args);
BENCHMARK(bm_batched_decode<quant::fp32>)->Apply(batched_args);
BENCHMARK(bm_batched_decode<quant::q8_0>)->Apply(batched_args);
BENCHMARK(bm_batched_decode<quant::q4_0>)->Apply(batched_args);

}  // namespace

int main(int argc, char** argv) { return bench::run_with_bandwidth(argc, argv, bandwidth); }
