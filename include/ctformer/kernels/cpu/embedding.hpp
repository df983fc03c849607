// CPU kernels for embedding lookup (row copies) and its scatter-add backward
// (vectorised; threads own column slices, so it is deterministic with no atomics).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "ctformer/kernels/cpu/detail/vector_math.hpp"
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
  }, detail::min_rows_for_parallel(c));
}

inline void embedding_backward_impl(const par_t& exec, tensor_view<const std::int32_t, 1> tokens,
                                    tensor_view<const float, 2> dout, tensor_view<float, 2> dtable) {
  detail::require_unit_inner_stride("embedding_backward", "dout", dout);
  detail::require_unit_inner_stride("embedding_backward", "dtable", dtable);
  detail::check_tokens("embedding_backward", tokens, dtable.extent(0));
  const index_t c = dtable.extent(1);
  // Threads split the channel dimension (in whole vectors), so no two write
  // the same element and each row's sum is taken in token order:
  // deterministic, no atomics. dtable is accumulated (+=).
  using detail::vf;
  const index_t tokens_n = tokens.extent(0);
  const index_t vectors = (c + vf::width - 1) / vf::width;
  detail::parallel_ranges(exec, vectors, [&](int, index_t vbegin, index_t vend) {
    const index_t begin = vbegin * vf::width, end = vend * vf::width < c ? vend * vf::width : c;
    if (begin >= end) return;
    for (index_t n = 0; n < tokens_n; ++n) {
      const float* src = &dout(n, 0) + begin;
      float* dst = &dtable(tokens(n), 0) + begin;
      detail::for_vectors(end - begin, [&](index_t j, int k, int) {
        detail::store_n(dst + j, detail::load_n(dst + j, k) + detail::load_n(src + j, k), k);
      });
    }
  }, tokens_n * c >= 2 * detail::parallel_grain ? 2 : vectors + 1);
}

}  // namespace ctformer::cpu
