// CPU kernels for adding a bias to every row and for its gradient (a column sum).
#pragma once

#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

/// y[n] += bias for every row n. y: (N, O); bias: (O).
inline void add_bias_impl(const par_t& exec, tensor_view<float, 2> y, tensor_view<const float, 1> bias) {
  const index_t n = y.extent(0), o = y.extent(1);
  detail::parallel_for(exec, n, [&](index_t i) {
    float* row = &y(i, 0);
    const float* b = bias.data();
#pragma omp simd
    for (index_t j = 0; j < o; ++j) row[j] += b[j];
  }, 16);
}

/// dbias += sum over rows of dy. dy: (N, O); dbias: (O). Threads split the
/// columns, so each sum is taken in row order (deterministic).
inline void bias_backward_impl(const par_t& exec, tensor_view<const float, 2> dy, tensor_view<float, 1> dbias) {
  const index_t n = dy.extent(0), o = dy.extent(1);
  const int threads = exec.thread_count();
  detail::parallel_for(exec, threads, [&](index_t t) {
    const index_t begin = o * t / threads, end = o * (t + 1) / threads;
    float* db = dbias.data();
    for (index_t i = 0; i < n; ++i) {
      const float* row = &dy(i, 0);
#pragma omp simd
      for (index_t j = begin; j < end; ++j) db[j] += row[j];
    }
  }, 1);
}

}  // namespace ctformer::cpu
