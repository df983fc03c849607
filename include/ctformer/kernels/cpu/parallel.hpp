// parallel_for over the threads of a cpu::par_t: the one place CPU kernels
// meet OpenMP.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ctformer/core/tensor_view.hpp"
#include "ctformer/exec/cpu.hpp"

namespace ctformer::cpu::detail {

/// Calls body(i) for i in [0, n), split statically over the policy's threads.
/// Small loops (n < min_parallel) stay on the calling thread: waking the pool
/// costs more than a few rows of work.
template <class Body>
void parallel_for(const par_t& exec, index_t n, Body&& body, index_t min_parallel = 2) {
#if defined(_OPENMP)
  const int threads = exec.thread_count();
  if (threads > 1 && n >= min_parallel) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (index_t i = 0; i < n; ++i) body(i);
    return;
  }
#else
  (void)exec;
  (void)min_parallel;
#endif
  for (index_t i = 0; i < n; ++i) body(i);
}

/// Calls body(i) for i in [0, n) on `workers` threads (at most the policy's),
/// each taking the next unclaimed i when it finishes one: first come, first
/// served. For tasks of uneven or unpredictable cost (two threads rarely
/// stream DRAM at the same speed), where a static split would leave the
/// faster thread waiting at the closing barrier. The shared counter costs an
/// atomic add per task, nothing next to a task worth splitting.
template <class Body>
void parallel_for_shared(const par_t& exec, index_t n, index_t workers, Body&& body) {
  workers = std::min<index_t>(std::min<index_t>(workers, exec.thread_count()), n);
  if (workers <= 1) {
    for (index_t i = 0; i < n; ++i) body(i);
    return;
  }
  std::atomic<index_t> next{0};
  parallel_for(exec, workers, [&](index_t) {
    for (index_t i = next.fetch_add(1, std::memory_order_relaxed); i < n; i = next.fetch_add(1, std::memory_order_relaxed))
      body(i);
  }, 1);
}

/// About this many floats of work per thread before a loop is worth
/// splitting (an OpenMP fork/join costs a few microseconds).
inline constexpr index_t parallel_grain = 1 << 15;

/// The min_parallel for parallel_for over rows of `row_length` floats: rows
/// enough for two threads' grain.
inline index_t min_rows_for_parallel(index_t row_length) {
  const index_t per_row = row_length > 0 ? row_length : 1;
  const index_t rows = 2 * parallel_grain / per_row;
  return rows > 2 ? rows : 2;
}

/// Calls body(thread, begin, end) once per thread with contiguous ranges
/// that partition [0, n) (some may be empty); thread < thread_count.
/// Runs on the calling thread alone (thread 0, whole range) when n is below
/// min_parallel. Returns the number of ranges used.
template <class Body>
int parallel_ranges(const par_t& exec, index_t n, Body&& body, index_t min_parallel = 2) {
  const int threads = n >= min_parallel ? exec.thread_count() : 1;
  if (threads <= 1) {
    body(0, index_t(0), n);
    return 1;
  }
  parallel_for(exec, threads, [&](index_t t) { body(int(t), n * t / threads, n * (t + 1) / threads); }, 1);
  return threads;
}

/// Scratch floats owned by the calling thread, one buffer per slot, that only
/// ever grow: a kernel borrows slot s for the duration of one call (and may
/// hand it to its worker threads), so nothing allocates in steady state.
/// Slots: 0, 1 parameter-gradient partials; 2, 3 contiguous copies of strided
/// parameters; 4 a decode step's attention partials (calling thread); 5 an
/// attention task's running state (any thread); 6 the training attention's
/// dS rows (any thread).
inline constexpr int scratch_slots = 7;
inline float* scratch_floats(int slot, std::size_t n) {
  thread_local std::vector<float> slots[scratch_slots];
  std::vector<float>& s = slots[slot];
  if (s.size() < n) s.resize(n);
  return s.data();
}

}  // namespace ctformer::cpu::detail
