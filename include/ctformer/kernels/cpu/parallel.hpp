// parallel_for and its relatives over the threads of a cpu::par_t: the one
// place CPU kernels start threads (a thread_pool per calling thread).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ctformer/core/tensor_view.hpp"
#include "ctformer/exec/cpu.hpp"
#include "ctformer/kernels/cpu/thread_pool.hpp"

namespace ctformer::cpu::detail {

/// Calls body(member, team) once for every member in [0, team), team =
/// min(wanted, the policy's threads), each on its own thread where the pool
/// can: the primitive the loops below split work with. From inside another
/// parallel call, every member runs on the calling thread.
template <class Body>
void parallel_team(const par_t& exec, int wanted, Body&& body) {
  const int team = std::min(wanted, exec.thread_count());
  if (team <= 1) {
    body(0, 1);
    return;
  }
  auto task = [&body](int member, int size) { body(member, size); };
  thread_pool::of_this_thread().run(team, task);
}

/// Calls body(i) for i in [0, n), split statically over the policy's threads.
/// Small loops (n < min_parallel) stay on the calling thread: waking the pool
/// costs more than a few rows of work.
template <class Body>
void parallel_for(const par_t& exec, index_t n, Body&& body, index_t min_parallel = 2) {
  const int threads = exec.thread_count();
  if (threads > 1 && n >= min_parallel) {
    // Contiguous blocks, as OpenMP's schedule(static): neighbouring i share
    // cache lines of their outputs.
    parallel_team(exec, int(std::min<index_t>(threads, n)), [&](int member, int team) {
      const index_t end = n * (member + 1) / team;
      for (index_t i = n * member / team; i < end; ++i) body(i);
    });
    return;
  }
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
  parallel_team(exec, int(workers), [&](int, int) {
    for (index_t i = next.fetch_add(1, std::memory_order_relaxed); i < n; i = next.fetch_add(1, std::memory_order_relaxed))
      body(i);
  });
}

/// About this many floats of work per thread before a loop is worth
/// splitting (waking the pool's workers costs about a microsecond, a few
/// when they sleep).
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
  parallel_team(exec, threads, [&](int member, int team) { body(member, n * member / team, n * (member + 1) / team); });
  return threads;
}

/// Scratch floats owned by the calling thread, one buffer per slot, that only
/// ever grow: a kernel borrows slot s for the duration of one call (and may
/// hand it to its worker threads), so nothing allocates in steady state.
/// Slots: 0, 1 parameter-gradient partials; 2, 3 contiguous copies of strided
/// parameters; 4 a decode step's attention partials (calling thread); 5 an
/// attention task's running state (any thread); 6 the training attention's
/// dS rows (any thread); 7 cached attention's packed copy of a query whose
/// heads are strided (calling thread).
inline constexpr int scratch_slots = 8;
inline float* scratch_floats(int slot, std::size_t n) {
  thread_local std::vector<float> slots[scratch_slots];
  std::vector<float>& s = slots[slot];
  if (s.size() < n) s.resize(n);
  return s.data();
}

}  // namespace ctformer::cpu::detail
