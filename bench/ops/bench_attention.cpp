// Training attention on its own: ops::causal_attention_forward then
// causal_attention_backward (probabilities saved, dQ, dK, dV) at the shapes
// the training benchmarks use, on 1 and 2 threads. GFLOP/s counts the
// causal products only (2 forward, 4 backward, each 2 x head_dim flops per
// (query, key <= query, head)), beside the fp32 FMA peak measured in the
// same run. From 32 positions the CPU runs blocked products on the GEMM
// micro-kernel (kernels/cpu/attention.hpp), below that query row by row.
#include <benchmark/benchmark.h>

#include <cmath>
#include <random>
#include <vector>

#include "ctformer/ctformer.hpp"
#include "../common/fma_peak.hpp"

using namespace ctformer;

namespace {

/// Args: batch, positions, query heads, head dim, kv heads, threads.
void bm_attention_step(benchmark::State& state) {
  const index_t b = state.range(0), t = state.range(1), h = state.range(2), d = state.range(3), kv = state.range(4);
  const auto exec = cpu::par.with_threads(int(state.range(5)));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto filled = [&](index_t n) {
    std::vector<float> x(static_cast<std::size_t>(n));
    for (auto& e : x) e = normal(rng);
    return x;
  };
  auto q = filled(b * t * h * d), k = filled(b * t * kv * d), v = filled(b * t * kv * d), dout = filled(b * t * h * d);
  std::vector<float> out(q.size()), probs(std::size_t(b * h * t * t)), dq(q.size()), dk(k.size()), dv(v.size());
  const tensor_view<const float, 4> qv(q.data(), {b, t, h, d}), kvw(k.data(), {b, t, kv, d}),
      vv(v.data(), {b, t, kv, d}), dov(dout.data(), {b, t, h, d});
  const tensor_view<float, 4> ov(out.data(), {b, t, h, d}), pv(probs.data(), {b, h, t, t});
  const float scale = 1.0f / std::sqrt(float(d));
  for (auto _ : state) {
    ops::causal_attention_forward(exec, qv, kvw, vv, ov, pv, scale);
    ops::causal_attention_backward(exec, dov, qv, kvw, vv, tensor_view<const float, 4>(pv),
                                   tensor_view<float, 4>(dq.data(), {b, t, h, d}),
                                   tensor_view<float, 4>(dk.data(), {b, t, kv, d}),
                                   tensor_view<float, 4>(dv.data(), {b, t, kv, d}), scale);
    benchmark::DoNotOptimize(dk.data());
  }
  const double pairs = double(b) * double(h) * double(t) * double(t + 1) / 2;
  state.counters["GFLOP/s"] =
      benchmark::Counter(6.0 * 2.0 * double(d) * pairs / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_GFLOP/s"] = bench::fma_peak_once(int(state.range(5)));
}

}  // namespace

// nanoGPT CPU (12 x 64, 4 heads of 32), GPT-2 small at contexts 64 and 256,
// a 512-position sequence, and GQA (12 query heads on 4 kv heads).
BENCHMARK(bm_attention_step)
    ->ArgNames({"batch", "T", "heads", "head_dim", "kv_heads", "threads"})
    ->ArgsProduct({{12}, {64}, {4}, {32}, {4}, {1, 2}})
    ->ArgsProduct({{4}, {64, 256}, {12}, {64}, {12}, {1, 2}})
    ->ArgsProduct({{2}, {512}, {12}, {64}, {12}, {1, 2}})
    ->ArgsProduct({{4}, {256}, {12}, {64}, {4}, {1, 2}})
    ->MinTime(0.3)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK_MAIN();
