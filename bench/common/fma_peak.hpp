// The machine's fp32 FMA peak as the benchmarks measure it in their own run:
// the limit compute-bound figures (GEMM, prefill attention) are printed against.
#pragma once

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>

#include "ctformer/kernels/cpu/parallel.hpp"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include "ctformer/kernels/cpu/detail/intrinsics.hpp"
#define CTFORMER_BENCH_HAS_FMA_PEAK 1

namespace ctformer::bench {

// The widest fp32 FMA the build targets.
#if defined(__AVX512F__)
using peak_vector = __m512;
inline constexpr int peak_lanes = 16;
inline peak_vector peak_set1(float x) { return _mm512_set1_ps(x); }
inline peak_vector peak_fma(peak_vector a, peak_vector b, peak_vector c) { return _mm512_fmadd_ps(a, b, c); }
inline peak_vector peak_add(peak_vector a, peak_vector b) { return _mm512_add_ps(a, b); }
#else
using peak_vector = __m256;
inline constexpr int peak_lanes = 8;
inline peak_vector peak_set1(float x) { return _mm256_set1_ps(x); }
inline peak_vector peak_fma(peak_vector a, peak_vector b, peak_vector c) { return _mm256_fmadd_ps(a, b, c); }
inline peak_vector peak_add(peak_vector a, peak_vector b) { return _mm256_add_ps(a, b); }
#endif

/// Independent fp32 FMAs on `threads` threads, as many in flight as a core
/// can overlap (12 chains hide the 4-cycle latency of two FMA pipes): cores
/// x FMA pipes x lanes x 2 flops x clock. Returns the flops of one run.
inline double fma_peak_run(int threads, std::int64_t steps) {
  cpu::detail::parallel_team(cpu::par.with_threads(threads), threads, [steps](int, int) {
    peak_vector acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = peak_set1(float(i));
    const peak_vector x = peak_set1(0.999999f), y = peak_set1(1e-7f);
    for (std::int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) acc[i] = peak_fma(acc[i], x, y);
    }
    // One result that depends on every chain keeps the loop alive without
    // touching memory inside it.
    for (int i = 1; i < 12; ++i) acc[0] = peak_add(acc[0], acc[i]);
    benchmark::DoNotOptimize(acc[0]);
  });
  return double(threads) * double(steps) * 12.0 * peak_lanes * 2.0;
}

/// The peak in GFLOP/s on `threads` threads, best of 5 runs of about 20 ms.
inline double fma_peak_gflops(int threads) {
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    const double flops = fma_peak_run(threads, std::int64_t(1) << 22);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (flops / s / 1e9 > best) best = flops / s / 1e9;
  }
  return best;
}

}  // namespace ctformer::bench
#endif

namespace ctformer::bench {

/// fma_peak_gflops on 1 or 2 threads, measured once per program on first use
/// (0 where the build targets no FMA): the peak_GFLOP/s counter beside a
/// compute-bound figure.
inline double fma_peak_once(int threads) {
  static const double peak[3] = {0,
#if defined(CTFORMER_BENCH_HAS_FMA_PEAK)
                                 fma_peak_gflops(1), fma_peak_gflops(2)
#else
                                 0, 0
#endif
  };
  return threads >= 1 && threads <= 2 ? peak[threads] : 0.0;
}

}  // namespace ctformer::bench
