// cpu::par: the CPU execution policy (host threads over host memory).
#pragma once

#include "ctformer/exec/execution_policy.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ctformer::cpu {

/// Runs operations on the host, on ctformer's thread pool
/// (kernels/cpu/thread_pool.hpp). `cpu::par` uses as many threads as OpenMP
/// would (OMP_NUM_THREADS, else every core); `cpu::par.with_threads(1)`
/// pins the count.
struct par_t {
  using memory_space = host_space;

  int threads = 0;  ///< 0: OpenMP's default count (OMP_NUM_THREADS, else all cores)

  constexpr par_t with_threads(int n) const { return par_t{n}; }

  int thread_count() const {
#if defined(_OPENMP)
    return threads > 0 ? threads : omp_get_max_threads();
#else
    return 1;
#endif
  }

  /// Host operations are synchronous: nothing to wait for.
  void synchronize() const {}
};

inline constexpr par_t par{};

}  // namespace ctformer::cpu

static_assert(ctformer::execution_policy<ctformer::cpu::par_t>);
