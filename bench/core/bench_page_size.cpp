// Why host_space asks for huge pages: one thread (or two, halves each)
// reading 76 MB front to back, as decode streams its weights, from a plain
// 4 KiB-page allocation and from a ctformer::buffer (2 MiB aligned and
// advised MADV_HUGEPAGE). Reports GB/s beside the triad of the same run. On
// a machine with transparent huge pages off (or "always"), both rows read the
// same memory and should match.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <cstring>
#include <memory>

#include "ctformer/core/buffer.hpp"
#include "../common/memory_bandwidth.hpp"

#if defined(__AVX2__)
#include "ctformer/kernels/cpu/detail/intrinsics.hpp"
#endif

using namespace ctformer;

namespace {

constexpr std::size_t bytes = std::size_t(76) << 20;

double bandwidth[3] = {0, 0, 0};  // GB/s, [threads]

/// Sum of [p, p + n) as floats, two vectors per 64-byte line: a read stream.
float read_stream(const float* p, std::size_t n) {
#if defined(__AVX2__)
  __m256 a = _mm256_setzero_ps(), b = a;
  for (std::size_t i = 0; i + 16 <= n; i += 16) {
    a = _mm256_add_ps(a, _mm256_loadu_ps(p + i));
    b = _mm256_add_ps(b, _mm256_loadu_ps(p + i + 8));
  }
  alignas(32) float out[8];
  _mm256_store_ps(out, _mm256_add_ps(a, b));
  return out[0] + out[7];
#else
  float s = 0;
  for (std::size_t i = 0; i < n; ++i) s += p[i];
  return s;
#endif
}

void run(benchmark::State& state, const float* p) {
  const int threads = int(state.range(0));
  const std::size_t n = bytes / sizeof(float);
  for (auto _ : state) {
    float partial[64] = {};
    cpu::detail::parallel_ranges(cpu::par.with_threads(threads), index_t(n), [&](int t, index_t begin, index_t end) {
      partial[t] = read_stream(p + begin, std::size_t(end - begin));
    });
    benchmark::DoNotOptimize(partial);
  }
  state.counters["GB/s"] = benchmark::Counter(double(bytes) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["triad_GB/s"] = bandwidth[threads];
}

void bm_read_4k_pages(benchmark::State& state) {
  // aligned_alloc without advice: 4 KiB pages where huge pages are "madvise" only.
  const std::unique_ptr<float, decltype(&std::free)> p(static_cast<float*>(std::aligned_alloc(64, bytes)), &std::free);
  std::memset(p.get(), 0, bytes);
  run(state, p.get());
}

void bm_read_host_buffer(benchmark::State& state) {
  buffer<float> b(bytes / sizeof(float), 0.0f);
  run(state, b.data());
}

void thread_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads"})->Arg(1)->Arg(2)->MinTime(0.5)->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(bm_read_4k_pages)->Apply(thread_args);
BENCHMARK(bm_read_host_buffer)->Apply(thread_args);

int main(int argc, char** argv) { return bench::run_with_bandwidth(argc, argv, bandwidth); }
