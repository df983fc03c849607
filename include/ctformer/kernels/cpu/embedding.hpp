// CPU kernels for embedding lookup and its scatter-add backward.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "ctformer/kernels/cpu/norm.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {
inline void check_tokens(const char* operation, tensor_view<const std::int32_t, 1> tokens, index_t vocab) {
  for (index_t n = 0; n < tokens.extent(0); ++n) {
    const std::int32_t t = tokens(n);
    if (t < 0 || t >= vocab)
      throw invalid_input(std::string("ctformer::") + operation + ": token id " + std::to_string(t) + " at position " +
                          std::to_string(n) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  }
}
}  // namespace detail

inline void embedding_forward_impl(const par_t& exec, tensor_view<const std::int32_t, 1> tokens,
                                   tensor_view<const float, 2> table, tensor_view<float, 2> out) {
  detail::require_unit_inner_stride("embedding_forward", "table", table);
  detail::require_unit_inner_stride("embedding_forward", "out", out);
  detail::check_tokens("embedding_forward", tokens, table.extent(0));
  const index_t c = table.extent(1);
  detail::parallel_for(exec, tokens.extent(0), [&](index_t n) {
    std::memcpy(&out(n, 0), &table(tokens(n), 0), std::size_t(c) * sizeof(float));
  }, 64);
}

inline void embedding_backward_impl(const par_t& exec, tensor_view<const std::int32_t, 1> tokens,
                                    tensor_view<const float, 2> dout, tensor_view<float, 2> dtable) {
  detail::require_unit_inner_stride("embedding_backward", "dout", dout);
  detail::require_unit_inner_stride("embedding_backward", "dtable", dtable);
  detail::check_tokens("embedding_backward", tokens, dtable.extent(0));
  const index_t c = dtable.extent(1);
  // Threads split the channel dimension, so no two write the same element and
  // each row's sum is taken in token order: deterministic, no atomics.
  const int threads = exec.thread_count();
  detail::parallel_for(exec, threads, [&](index_t t) {
    const index_t begin = c * t / threads, end = c * (t + 1) / threads;
    for (index_t n = 0; n < tokens.extent(0); ++n) {
      const float* src = &dout(n, 0);
      float* dst = &dtable(tokens(n), 0);
#pragma omp simd
      for (index_t j = begin; j < end; ++j) dst[j] += src[j];
    }
  }, 1);
}

}  // namespace ctformer::cpu
