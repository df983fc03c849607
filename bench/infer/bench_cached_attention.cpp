// Decode attention over a KV cache on its own: one query token of the
// LLaMA-shaped model (12 heads, head dim 64, MHA) attending to the cached
// keys and values of all 12 layers in turn, as one decode step does, at
// contexts 128, 1024 and 4096, with fp32, bf16 and int8 cache elements, on
// 1 and 2 threads. The figure that matters is the cache read rate (GB/s of
// keys, values and int8 scales per second) beside the triad bandwidth
// measured in the same run: at long contexts decode attention is a stream
// over the cache and should run near that limit. Twelve layers of a
// 1024-position bf16 cache are 38 MB, past the 32 MiB L3 of the machines we
// measure on, so the longer contexts read from DRAM. Also a 512-token
// prefill chunk's attention (compute-bound: GFLOP/s beside the FMA peak).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "ctformer/ctformer.hpp"
#include "../common/fma_peak.hpp"
#include "../common/memory_bandwidth.hpp"
#include "ctformer/infer/kv_cache.hpp"

using namespace ctformer;

namespace {

constexpr index_t n_layer = 12, heads = 12, kv_heads = 12, head_dim = 64, max_context = 4096;

double bandwidth[3] = {0, 0, 0};  // GB/s, [threads]

/// One contiguous cache per element type, its sequence filled with random
/// keys and values up to the longest context.
template <class E>
struct filled_cache {
  infer::kv_cache<infer::kv::contiguous<E>> cache{n_layer, kv_heads, head_dim, max_context + 1, 1};
  infer::sequence_id seq = cache.open_sequence();
  filled_cache() {
    cache.reserve(seq, max_context + 1);
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> rows(std::size_t((max_context + 1) * kv_heads * head_dim));
    for (auto& x : rows) x = normal(rng);
    const tensor_view<const float, 3> kv(rows.data(), {max_context + 1, kv_heads, head_dim});
    for (index_t l = 0; l < n_layer; ++l) cache.write(l, seq, 0, kv, kv);
    cache.set_length(seq, max_context + 1);
  }
};
template <class E>
filled_cache<E>& shared_cache() {
  static filled_cache<E> c;
  return c;
}

/// state.range(0): the context (keys attended to, the new token's included);
/// state.range(1): threads.
template <class E>
void bm_decode_attention(benchmark::State& state) {
  const index_t context = state.range(0);
  const auto exec = cpu::par.with_threads(int(state.range(1)));
  auto& c = shared_cache<E>();
  std::vector<float> q(std::size_t(heads * head_dim)), out(q.size());
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& x : q) x = normal(rng);
  const tensor_view<const float, 3> qv(q.data(), {1, heads, head_dim});
  const tensor_view<float, 3> ov(out.data(), {1, heads, head_dim});
  const float scale = 0.125f;
  for (auto _ : state) {
    for (index_t l = 0; l < n_layer; ++l) ops::cached_attention(exec, qv, c.cache.view(l, c.seq), ov, context - 1, scale);
    benchmark::DoNotOptimize(out.data());
  }
  // Keys and values of every position and layer, plus int8's two scales per position and kv head.
  const double scale_bytes = std::is_same_v<E, std::int8_t> ? 2.0 * sizeof(float) * kv_heads : 0.0;
  const double bytes = double(context) * n_layer * (2.0 * kv_heads * head_dim * sizeof(E) + scale_bytes);
  state.counters["GB/s"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["triad_GB/s"] = bandwidth[state.range(1)];
  state.counters["MB/step"] = bytes / 1e6;
}

/// A prefill chunk's attention: queries at positions [0, chunk) of one layer,
/// query t attending to keys [0, t], as the first chunk of a prompt runs it.
/// Compute-bound (each key row serves every later query from cache), so the
/// figure is GFLOP/s of score and value products (2 x 2 x head_dim per
/// (query, key, head) pair) beside the FMA peak of as many threads.
/// state.range(0): the chunk; state.range(1): threads.
template <class E>
void bm_prefill_attention(benchmark::State& state) {
  const index_t chunk = state.range(0);
  const auto exec = cpu::par.with_threads(int(state.range(1)));
  auto& c = shared_cache<E>();
  std::vector<float> q(std::size_t(chunk * heads * head_dim)), out(q.size());
  std::mt19937 rng(6);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& x : q) x = normal(rng);
  const tensor_view<const float, 3> qv(q.data(), {chunk, heads, head_dim});
  const tensor_view<float, 3> ov(out.data(), {chunk, heads, head_dim});
  for (auto _ : state) {
    ops::cached_attention(exec, qv, c.cache.view(0, c.seq), ov, 0, 0.125f);
    benchmark::DoNotOptimize(out.data());
  }
  const double pairs = double(chunk) * double(chunk + 1) / 2 * heads;
  state.counters["GFLOP/s"] =
      benchmark::Counter(pairs * 4.0 * head_dim / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_GFLOP/s"] = bench::fma_peak_once(int(state.range(1)));
}

void attention_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"context", "threads"})
      ->ArgsProduct({{128, 1024, 4096}, {1, 2}})
      ->MinTime(0.3)
      ->Unit(benchmark::kMicrosecond)
      ->UseRealTime();
}

void prefill_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"chunk", "threads"})
      ->ArgsProduct({{512}, {1, 2}})
      ->MinTime(0.3)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

}  // namespace

BENCHMARK(bm_decode_attention<float>)->Apply(attention_args);
BENCHMARK(bm_decode_attention<bf16>)->Apply(attention_args);
BENCHMARK(bm_decode_attention<std::int8_t>)->Apply(attention_args);
BENCHMARK(bm_prefill_attention<float>)->Apply(prefill_args);
BENCHMARK(bm_prefill_attention<bf16>)->Apply(prefill_args);
BENCHMARK(bm_prefill_attention<std::int8_t>)->Apply(prefill_args);

int main(int argc, char** argv) { return bench::run_with_bandwidth(argc, argv, bandwidth); }
