// GEMM throughput: ctformer's CPU GEMM (fp32 and bf16 inputs) against
// OpenBLAS cblas_sgemm in the same program, over size and thread count, plus
// the machine's measured fp32 FMA peak so every figure has its ceiling.
//
// Compare within one run (the machines are shared and noisy), e.g.
//   bench_gemm --benchmark_filter='/1024/2'    all variants at N = 1024, 2 threads
#include <benchmark/benchmark.h>

#include <cstdint>
#include <utility>
#include <vector>

// Only what GEMM needs (the CPU hook before the public operation that finds
// it), so this program builds quickly and alone.
#include "ctformer/core/buffer.hpp"
#include "ctformer/exec/cpu.hpp"
#include "ctformer/kernels/cpu/gemm.hpp"
#include "ctformer/ops/gemm.hpp"

#if defined(CTFORMER_BENCH_OPENBLAS)
#include <cblas.h>
// Declared by OpenBLAS's cblas.h; repeated so that a cblas.h from another
// vendor still compiles against the OpenBLAS library.
extern "C" void openblas_set_num_threads(int threads);
#endif

#include "../common/fma_peak.hpp"

namespace {

using ctformer::index_t;

constexpr double min_time_s = 0.3;

/// Square n x n matrices of T (values in [-1, 1)) and an fp32 result.
template <class T>
struct gemm_operands {
  explicit gemm_operands(index_t n) : a(std::size_t(n * n)), b(std::size_t(n * n)), c(std::size_t(n * n)) {
    std::uint32_t state = 12345;
    auto next = [&] {
      state = state * 1664525u + 1013904223u;
      return float(state >> 8) / float(1u << 24) * 2.0f - 1.0f;
    };
    for (auto& x : a) x = ctformer::number_cast<T>(next());
    for (auto& x : b) x = ctformer::number_cast<T>(next());
    c.zero();
  }
  ctformer::buffer<T> a, b;
  ctformer::buffer<float> c;
};

void set_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iteration / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

/// c = a b (both row-major), or c = a b^T with b stored (N, K) as a linear
/// layer's weight is (TransposedB), on ctformer's cpu::par with state.range(1) threads.
template <class T, bool TransposedB>
void bm_ctformer_gemm(benchmark::State& state) {
  const index_t n = state.range(0);
  const auto exec = ctformer::cpu::par.with_threads(int(state.range(1)));
  gemm_operands<T> x(n);
  auto a = std::as_const(x.a).view(n, n);
  auto b = std::as_const(x.b).view(n, n);
  auto c = x.c.view(n, n);
  auto run = [&] {
    if constexpr (TransposedB)
      ctformer::ops::gemm(exec, a, b.transposed(), c);
    else
      ctformer::ops::gemm(exec, a, b, c);
  };
  run();  // grows the packing scratch and faults in c before timing
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  set_flops(state, 2.0 * double(n) * double(n) * double(n));
}

/// Attention's score product: (B*H, T, d) x (B*H, d, T) with the key matrix
/// transposed, B*H = 48, d = 64, T = state.range(0).
void bm_ctformer_gemm_batched_attention(benchmark::State& state) {
  const index_t t = state.range(0), heads = 48, d = 64;
  const auto exec = ctformer::cpu::par.with_threads(int(state.range(1)));
  ctformer::buffer<float> q(std::size_t(heads * t * d), 0.5f), k(std::size_t(heads * t * d), 0.25f),
      s(std::size_t(heads * t * t), 0.0f);
  auto qv = std::as_const(q).view(heads, t, d);
  auto kv = std::as_const(k).view(heads, t, d).transposed();
  auto sv = s.view(heads, t, t);
  ctformer::ops::gemm_batched(exec, qv, kv, sv, 0.125f);
  for (auto _ : state) {
    ctformer::ops::gemm_batched(exec, qv, kv, sv, 0.125f);
    benchmark::ClobberMemory();
  }
  set_flops(state, 2.0 * double(heads) * double(t) * double(t) * double(d));
}

/// Decode: a few rows of activations (state.range(0)) times a 4096 x 4096
/// weight stored (N, K) and used transposed; memory-bound, so GB/s of weights
/// read is the figure that matters (the machine's DRAM bandwidth is its limit).
template <class T>
void bm_ctformer_gemm_decode(benchmark::State& state) {
  const index_t rows = state.range(0), n = 4096;
  const auto exec = ctformer::cpu::par.with_threads(int(state.range(1)));
  ctformer::buffer<T> x(std::size_t(rows * n), ctformer::number_cast<T>(0.5f)),
      w(std::size_t(n * n), ctformer::number_cast<T>(0.25f));
  ctformer::buffer<float> y(std::size_t(rows * n), 0.0f);
  auto xv = std::as_const(x).view(rows, n);
  auto wv = std::as_const(w).view(n, n).transposed();
  auto yv = y.view(rows, n);
  ctformer::ops::gemm(exec, xv, wv, yv);
  for (auto _ : state) {
    ctformer::ops::gemm(exec, xv, wv, yv);
    benchmark::ClobberMemory();
  }
  set_flops(state, 2.0 * double(rows) * double(n) * double(n));
  state.counters["GB/s"] =
      benchmark::Counter(double(n) * double(n) * sizeof(T) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

#if defined(CTFORMER_BENCH_OPENBLAS)
/// The same product through OpenBLAS's cblas_sgemm, with its own thread pool
/// set to state.range(1) threads.
template <bool TransposedB>
void bm_openblas_sgemm(benchmark::State& state) {
  const index_t n = state.range(0);
  openblas_set_num_threads(int(state.range(1)));
  gemm_operands<float> x(n);
  auto run = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, TransposedB ? CblasTrans : CblasNoTrans, int(n), int(n), int(n), 1.0f,
                x.a.data(), int(n), x.b.data(), int(n), 0.0f, x.c.data(), int(n));
  };
  run();
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  set_flops(state, 2.0 * double(n) * double(n) * double(n));
}

/// OpenBLAS on the decode shape (sgemm with M = rows; it switches to its gemv
/// kernels itself for one row).
void bm_openblas_sgemm_decode(benchmark::State& state) {
  const index_t rows = state.range(0), n = 4096;
  openblas_set_num_threads(int(state.range(1)));
  std::vector<float> x(std::size_t(rows * n), 0.5f), w(std::size_t(n * n), 0.25f), y(std::size_t(rows * n));
  auto run = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(n), int(n), 1.0f, x.data(), int(n), w.data(),
                int(n), 0.0f, y.data(), int(n));
  };
  run();
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  set_flops(state, 2.0 * double(rows) * double(n) * double(n));
  state.counters["GB/s"] =
      benchmark::Counter(double(n) * double(n) * sizeof(float) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}
#endif

#if defined(CTFORMER_BENCH_HAS_FMA_PEAK)
/// The machine limit: bench::fma_peak_run on state.range(1) threads.
void bm_fp32_fma_peak(benchmark::State& state) {
  const int threads = int(state.range(1));
  double flops = 0;
  for (auto _ : state) flops = ctformer::bench::fma_peak_run(threads, std::int64_t(1) << 20);
  set_flops(state, flops);
}
BENCHMARK(bm_fp32_fma_peak)->ArgsProduct({{0}, {1, 2}})->UseRealTime()->MinTime(min_time_s);
#endif

// Args: {size N (M = N = K), threads}. Real time: the work runs on other threads.
const std::vector<std::vector<std::int64_t>> sizes_and_threads = {{256, 512, 1024, 2048}, {1, 2}};

BENCHMARK(bm_ctformer_gemm<float, false>)
    ->Name("gemm_fp32/ctformer")
    ->ArgsProduct(sizes_and_threads)
    ->UseRealTime()
    ->MinTime(min_time_s);
#if defined(CTFORMER_BENCH_OPENBLAS)
BENCHMARK(bm_openblas_sgemm<false>)
    ->Name("gemm_fp32/openblas")
    ->ArgsProduct(sizes_and_threads)
    ->UseRealTime()
    ->MinTime(min_time_s);
#endif
BENCHMARK(bm_ctformer_gemm<ctformer::bf16, false>)
    ->Name("gemm_bf16/ctformer")
    ->ArgsProduct(sizes_and_threads)
    ->UseRealTime()
    ->MinTime(min_time_s);
// c = a b^T, the linear layer's product with weights stored (out, in).
BENCHMARK(bm_ctformer_gemm<float, true>)
    ->Name("gemm_fp32_bt/ctformer")
    ->ArgsProduct({{512, 1024}, {1, 2}})
    ->UseRealTime()
    ->MinTime(min_time_s);
#if defined(CTFORMER_BENCH_OPENBLAS)
BENCHMARK(bm_openblas_sgemm<true>)
    ->Name("gemm_fp32_bt/openblas")
    ->ArgsProduct({{512, 1024}, {1, 2}})
    ->UseRealTime()
    ->MinTime(min_time_s);
#endif
BENCHMARK(bm_ctformer_gemm_decode<float>)
    ->Name("gemm_fp32_decode_4096x4096_bt/ctformer")
    ->ArgsProduct({{1, 4}, {1, 2}})
    ->UseRealTime()
    ->MinTime(min_time_s);
BENCHMARK(bm_ctformer_gemm_decode<ctformer::bf16>)
    ->Name("gemm_bf16_decode_4096x4096_bt/ctformer")
    ->ArgsProduct({{1, 4}, {1, 2}})
    ->UseRealTime()
    ->MinTime(min_time_s);
#if defined(CTFORMER_BENCH_OPENBLAS)
BENCHMARK(bm_openblas_sgemm_decode)
    ->Name("gemm_fp32_decode_4096x4096_bt/openblas")
    ->ArgsProduct({{1, 4}, {1, 2}})
    ->UseRealTime()
    ->MinTime(min_time_s);
#endif
BENCHMARK(bm_ctformer_gemm_batched_attention)
    ->Name("gemm_batched_attention_48x_TxT_d64/ctformer")
    ->ArgsProduct({{64, 128, 256}, {1, 2}})
    ->UseRealTime()
    ->MinTime(min_time_s);

}  // namespace

BENCHMARK_MAIN();
