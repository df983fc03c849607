// CPU GEMM: c = alpha * a b + beta * c for fp32 and bf16 inputs (fp32 accumulation).
// (Reference implementation; replaced by the packed, blocked micro-kernel.)
#pragma once

#include <type_traits>

#include "ctformer/core/number_types.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

template <class T>
concept gemm_input = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

template <gemm_input T>
void gemm_impl(const par_t& exec, tensor_view<const T, 2> a, tensor_view<const T, 2> b, tensor_view<float, 2> c,
               float alpha, float beta) {
  const index_t m = c.extent(0), n = c.extent(1), k = a.extent(1);
  detail::parallel_for(exec, m, [&](index_t i) {
    for (index_t j = 0; j < n; ++j) {
      float sum = 0.0f;
      for (index_t p = 0; p < k; ++p) sum += static_cast<float>(a(i, p)) * static_cast<float>(b(p, j));
      c(i, j) = alpha * sum + (beta == 0.0f ? 0.0f : beta * c(i, j));
    }
  });
}

template <gemm_input T>
void gemm_batched_impl(const par_t& exec, tensor_view<const T, 3> a, tensor_view<const T, 3> b,
                       tensor_view<float, 3> c, float alpha, float beta) {
  for (index_t i = 0; i < a.extent(0); ++i) gemm_impl(exec, a[i], b[i], c[i], alpha, beta);
}

}  // namespace ctformer::cpu
