// Decode-step GEMV y = W x for pruned weights: dense fp32 (the pruned matrix
// stored as is) vs quant::sparse_2of4 and quant::sparse_half (17 bits per
// weight), all through ops::quantized_gemv. Counters: bytes of W per call
// and the GB/s of W streamed; time is what pruning's storage saves (or not).
#include <benchmark/benchmark.h>

#include <vector>

#include "ctformer/compress/pruning.hpp"
#include "ctformer/exec/cpu.hpp"
#include "ctformer/kernels/cpu/quantize.hpp"
#include "ctformer/kernels/cpu/sparse_gemv.hpp"
#include "ctformer/ops/quantize.hpp"
#include "ctformer/quant/sparse_formats.hpp"

using namespace ctformer;

namespace {

std::vector<float> random_matrix(index_t n, std::uint32_t seed) {
  std::vector<float> v(static_cast<std::size_t>(n));
  std::uint32_t s = seed;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = float(int(s >> 9) - (1 << 22)) / float(1 << 22);
  }
  return v;
}

// Format: the storage; Pruning: how the dense baseline was pruned (so the
// fp32 matrix holds the same values the sparse one does).
template <class Format, class Pruning>
void bench_gemv(benchmark::State& state) {
  const index_t rows = state.range(0), cols = state.range(1);
  const int threads = int(state.range(2));
  const auto exec = cpu::par.with_threads(threads);
  auto w = random_matrix(rows * cols, 7);
  const tensor_view<float, 2> wv(w.data(), {rows, cols});
  if constexpr (std::is_same_v<Pruning, quant::sparse_2of4>) compress::prune_2of4(wv);
  else compress::prune_magnitude(wv, 0.5, compress::prune_scope::per_row);
  const quant::packed_matrix<Format> p{tensor_view<const float, 2>(wv)};
  const auto x = random_matrix(cols, 8);
  std::vector<float> y(static_cast<std::size_t>(rows));
  for (auto _ : state) {
    ops::quantized_gemv(exec, p, tensor_view<const float, 1>(x.data(), {cols}), tensor_view<float, 1>(y.data(), {rows}));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["weight_bytes"] = double(p.bytes());
  state.counters["GB/s"] = benchmark::Counter(double(p.bytes()) * double(state.iterations()) / 1e9,
                                              benchmark::Counter::kIsRate);
}

// Shapes: 768 x 768 (2.25 MiB fp32, cache resident on Zen 3's 32 MiB L3),
// 2048 x 768 and 768 x 2048 (a LLaMA-small MLP, 6 MiB), and 4096 x 4096
// (64 MiB fp32: streamed from DRAM, where bytes decide the time).
void shapes(benchmark::internal::Benchmark* b) {
  b->ArgsProduct({{768, 2048, 4096}, {768, 4096}, {1, 2}})->ArgNames({"rows", "cols", "threads"});
}

}  // namespace

BENCHMARK_TEMPLATE(bench_gemv, quant::fp32, quant::sparse_2of4)->Apply(shapes)->Name("dense_fp32_2of4_pruned");
BENCHMARK_TEMPLATE(bench_gemv, quant::sparse_2of4, quant::sparse_2of4)->Apply(shapes)->Name("sparse_2of4");
BENCHMARK_TEMPLATE(bench_gemv, quant::fp32, quant::sparse_half)->Apply(shapes)->Name("dense_fp32_half_pruned");
BENCHMARK_TEMPLATE(bench_gemv, quant::sparse_half, quant::sparse_half)->Apply(shapes)->Name("sparse_half");

BENCHMARK_MAIN();
