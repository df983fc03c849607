// The machine's memory bandwidth as the benchmarks measure it in their own run
// (STREAM-style triad), and the line that reports it: the limit the decode
// and GEMV figures are printed against.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <string>

#include "ctformer/core/buffer.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::bench {

/// Triad a[i] = b[i] + s c[i] over 3 x 256 MiB (well past a 32 MiB L3), best
/// of `passes`, counting 3 x 4 bytes per element as STREAM does. The arrays
/// are allocated and first touched (by the same threads as the timed loop)
/// once per thread count and kept, so a benchmark can measure the triad
/// again next to its own figure for a fraction of a second: on a shared
/// machine the bandwidth drifts by tens of percent within one run.
inline double triad_gb_per_s(int threads, int passes = 5) {
  const std::size_t n = std::size_t(64) << 20;
  struct arrays {
    buffer<float> a, b, c;
  };
  static arrays kept[3];
  arrays& x = kept[std::clamp(threads, 0, 2)];
  // The same threads (the library's pool) as the kernels measured against it.
  const cpu::par_t exec = cpu::par.with_threads(threads);
  auto each_thread = [&](auto&& loop) {
    cpu::detail::parallel_ranges(exec, index_t(n), [&](int, index_t begin, index_t end) {
      loop(std::size_t(begin), std::size_t(end));
    });
  };
  if (x.a.size() != n) {
    x = {buffer<float>(n), buffer<float>(n), buffer<float>(n)};
    each_thread([&](std::size_t begin, std::size_t end) {
      for (std::size_t i = begin; i < end; ++i) x.a[i] = x.b[i] = x.c[i] = 1.0f;
    });
  }
  float* a = x.a.data();
  const float* b = x.b.data();
  const float* c = x.c.data();
  double best = 0;
  for (int rep = 0; rep < passes; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    each_thread([&](std::size_t begin, std::size_t end) {
      for (std::size_t i = begin; i < end; ++i) a[i] = b[i] + 3.0f * c[i];
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 3.0 * 4.0 * double(n) / s / 1e9);
  }
  benchmark::DoNotOptimize(a);
  return best;
}

/// Measures the triad on 1 and 2 threads into bandwidth[1], bandwidth[2],
/// prints them and adds them to the benchmark context.
inline void measure_bandwidth(double (&bandwidth)[3]) {
  bandwidth[1] = triad_gb_per_s(1);
  bandwidth[2] = triad_gb_per_s(2);
  std::printf("memory bandwidth (triad, 3 x 256 MiB, best of 5): %.1f GB/s 1 thread, %.1f GB/s 2 threads\n",
              bandwidth[1], bandwidth[2]);
  benchmark::AddCustomContext("triad_GB/s_1_thread", std::to_string(bandwidth[1]));
  benchmark::AddCustomContext("triad_GB/s_2_threads", std::to_string(bandwidth[2]));
}

/// The main() of a program whose figures are printed against the triad:
/// flags first (so --help and a bad flag cost no measurement), then the
/// bandwidth into `bandwidth`, then the benchmarks.
inline int run_with_bandwidth(int argc, char** argv, double (&bandwidth)[3]) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  measure_bandwidth(bandwidth);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace ctformer::bench
