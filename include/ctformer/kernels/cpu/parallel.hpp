// parallel_for over the threads of a cpu::par_t: the one place CPU kernels
// meet OpenMP.
#pragma once

#include <cstdint>

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

}  // namespace ctformer::cpu::detail
