// GEMV y = W x with packed weights (the decode step of linear<Format>): fp32,
// bf16, q8_0, q4_0 (row-major, and rows interleaved by 8) and int8_rowwise at
// 768x768, 2048x768 and 32000x768, on 1 and 2 threads, reported as GB/s of
// weight bytes read next to this machine's STREAM-style triad bandwidth
// measured in the same run; and the prefill GEMM (T = 128 tokens) in GFLOP/s.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "ctformer/ctformer.hpp"
#include "../common/memory_bandwidth.hpp"
#include "ctformer/quant/quant.hpp"

using namespace ctformer;

namespace {

constexpr index_t cols = 768;

double bandwidth[3] = {0, 0, 0};  // [threads]

/// Benchmark tags for the row-interleaved layouts (same bytes as q4_0, q8_0).
struct q4_0_interleaved {};
struct q8_0_interleaved {};
template <class Format>
struct matrix_of {
  using type = quant::packed_matrix<Format>;
};
template <>
struct matrix_of<q4_0_interleaved> {
  using type = quant::interleaved_matrix<quant::q4_0>;
};
template <>
struct matrix_of<q8_0_interleaved> {
  using type = quant::interleaved_matrix<quant::q8_0>;
};

template <class Format>
const typename matrix_of<Format>::type& weights(index_t rows) {
  using matrix = typename matrix_of<Format>::type;
  static std::map<index_t, std::unique_ptr<matrix>> cache;
  auto& slot = cache[rows];
  if (!slot) {
    std::vector<float> w(std::size_t(rows * cols));
    std::mt19937 rng{static_cast<unsigned>(rows)};
    std::normal_distribution<float> dist(0.0f, 0.02f);
    for (float& v : w) v = dist(rng);
    slot = std::make_unique<matrix>(tensor_view<const float, 2>(w.data(), {rows, cols}));
  }
  return *slot;
}

void set_counters(benchmark::State& state, std::size_t bytes, int threads) {
  state.counters["GB/s"] = benchmark::Counter(double(bytes) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["weight_MB"] = double(bytes) / 1e6;
  state.counters["triad_GB/s"] = bandwidth[threads];
}

template <class Format>
void bm_gemv(benchmark::State& state) {
  const index_t rows = state.range(0);
  const int threads = int(state.range(1));
  const auto& w = weights<Format>(rows);
  std::vector<float> x(static_cast<std::size_t>(cols), 0.5f), y(static_cast<std::size_t>(rows));
  const auto exec = cpu::par.with_threads(threads);
  for (auto _ : state) {
    ops::quantized_gemv(exec, w, tensor_view<const float, 1>(x.data(), {cols}), tensor_view<float, 1>(y.data(), {rows}));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, w.bytes(), threads);
}

/// The fp32 baseline through the general GEMM with N = 1: (rows, 768) x (768, 1).
void bm_gemv_ops_gemm(benchmark::State& state) {
  const index_t rows = state.range(0);
  const int threads = int(state.range(1));
  const auto& w = weights<quant::fp32>(rows);
  std::vector<float> x(static_cast<std::size_t>(cols), 0.5f), y(static_cast<std::size_t>(rows));
  const auto exec = cpu::par.with_threads(threads);
  const tensor_view<const float, 2> a(reinterpret_cast<const float*>(w.data()), {rows, cols});
  for (auto _ : state) {
    ops::gemm(exec, a, tensor_view<const float, 2>(x.data(), {cols, 1}), tensor_view<float, 2>(y.data(), {rows, 1}));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, w.bytes(), threads);
}

/// The prefill path for comparison: y = x W^T for T tokens (dequantized tiles
/// and an fp32 FMA micro-kernel), in GFLOP/s.
template <class Format>
void bm_gemm(benchmark::State& state) {
  const index_t rows = state.range(0), tokens = state.range(1);
  const int threads = int(state.range(2));
  const auto& w = weights<Format>(rows);
  std::vector<float> x(static_cast<std::size_t>(tokens * cols), 0.5f), y(static_cast<std::size_t>(tokens * rows));
  const auto exec = cpu::par.with_threads(threads);
  for (auto _ : state) {
    ops::quantized_gemm(exec, w, tensor_view<const float, 2>(x.data(), {tokens, cols}),
                        tensor_view<float, 2>(y.data(), {tokens, rows}));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(rows * tokens * cols) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

void gemm_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"rows", "tokens", "threads"})->ArgsProduct({{2048}, {128}, {1, 2}})->Unit(benchmark::kMillisecond)->UseRealTime();
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"rows", "threads"})->ArgsProduct({{768, 2048, 32000}, {1, 2}})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

BENCHMARK(bm_gemv<quant::fp32>)->Apply(shapes);
BENCHMARK(bm_gemv_ops_gemm)->Apply(shapes);
BENCHMARK(bm_gemv<quant::bf16_weights>)->Apply(shapes);
BENCHMARK(bm_gemv<quant::q8_0>)->Apply(shapes);
BENCHMARK(bm_gemv<quant::q4_0>)->Apply(shapes);
BENCHMARK(bm_gemv<q4_0_interleaved>)->Apply(shapes);
BENCHMARK(bm_gemv<q8_0_interleaved>)->Apply(shapes);
BENCHMARK(bm_gemv<quant::int8_rowwise>)->Apply(shapes);
BENCHMARK(bm_gemm<quant::fp32>)->Apply(gemm_shapes);
BENCHMARK(bm_gemm<quant::q8_0>)->Apply(gemm_shapes);
BENCHMARK(bm_gemm<quant::q4_0>)->Apply(gemm_shapes);
BENCHMARK(bm_gemm<q4_0_interleaved>)->Apply(gemm_shapes);
BENCHMARK(bm_gemm<q8_0_interleaved>)->Apply(gemm_shapes);

}  // namespace

int main(int argc, char** argv) { return bench::run_with_bandwidth(argc, argv, bandwidth); }
