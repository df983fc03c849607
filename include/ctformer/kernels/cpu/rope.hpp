// CPU kernels for rotary position embeddings (rotate-half form) on (B, T, H, D) views.
#pragma once

#include <cstdint>
#include <string>

#include "ctformer/core/error.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

/// Rotates pairs (x[c], x[c + D/2]) of every head by angle (position_offset + t) * f_c,
/// reading cos and sin from tables (S, D/2); direction -1 applies the inverse
/// rotation, which is the backward pass. x: (B, T, H, D), in place.
inline void rope_rotate_impl(const par_t& exec, tensor_view<float, 4> x, tensor_view<const float, 2> cos_table,
                             tensor_view<const float, 2> sin_table, index_t position_offset, int direction) {
  const index_t batch = x.extent(0), t_len = x.extent(1), heads = x.extent(2), half = x.extent(3) / 2;
  const float sign = direction >= 0 ? 1.0f : -1.0f;
  detail::parallel_for(exec, batch * t_len, [&](index_t bt) {
    const index_t b = bt / t_len, t = bt % t_len;
    const float* cs = &cos_table(position_offset + t, 0);
    const float* sn = &sin_table(position_offset + t, 0);
    for (index_t h = 0; h < heads; ++h) {
      float* row = &x(b, t, h, 0);
#pragma omp simd
      for (index_t c = 0; c < half; ++c) {
        const float x1 = row[c], x2 = row[c + half], s = sign * sn[c];
        row[c] = x1 * cs[c] - x2 * s;
        row[c + half] = x2 * cs[c] + x1 * s;
      }
    }
  }, 4);
}


/// Rotates every row of x (N, H, D) at its own position positions[i] (see
/// rope_rotate_impl). Throws invalid_input, before touching x, for a position
/// outside the tables.
inline void rope_rotate_rows_impl(const par_t& exec, tensor_view<float, 3> x, tensor_view<const float, 2> cos_table,
                                  tensor_view<const float, 2> sin_table, tensor_view<const std::int32_t, 1> positions,
                                  int direction) {
  const index_t rows = x.extent(0), heads = x.extent(1), half = x.extent(2) / 2;
  for (index_t i = 0; i < rows; ++i)
    if (positions(i) < 0 || positions(i) >= cos_table.extent(0))
      throw invalid_input("ctformer::rope_rotate_rows: row " + std::to_string(i) + " has position " +
                          std::to_string(positions(i)) + ", outside the tables' [0, " +
                          std::to_string(cos_table.extent(0)) + ")");
  const float sign = direction >= 0 ? 1.0f : -1.0f;
  detail::parallel_for(exec, rows, [&](index_t i) {
    const float* cs = &cos_table(positions(i), 0);
    const float* sn = &sin_table(positions(i), 0);
    for (index_t h = 0; h < heads; ++h) {
      float* row = &x(i, h, 0);
#pragma omp simd
      for (index_t c = 0; c < half; ++c) {
        const float x1 = row[c], x2 = row[c + half], s = sign * sn[c];
        row[c] = x1 * cs[c] - x2 * s;
        row[c + half] = x2 * cs[c] + x1 * s;
      }
    }
  }, 4);
}

}  // namespace ctformer::cpu
