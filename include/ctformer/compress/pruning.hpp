// Pruning of a trained model's linear weights in fp32: magnitude pruning to a
// sparsity (per row, the form quant::sparse_half stores, or per matrix) and
// 2:4 structured pruning (the form quant::sparse_2of4 stores). The pruned
// matrices stay dense fp32 here; packing them into a sparse format is what
// saves memory (compress/post_training_quantization.hpp, io/quantized_checkpoint.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "ctformer/core/error.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/nn/parameters.hpp"
#include "ctformer/quant/sparse_formats.hpp"

namespace ctformer::compress {

/// Which weights compete for survival in magnitude pruning.
enum class prune_scope {
  per_row,     ///< each output row loses the same count (storable as quant::sparse_half at 50%)
  per_matrix,  ///< the smallest |w| of the whole matrix go, rows end up uneven
};

/// The number of weights magnitude pruning zeroes out of n at this sparsity:
/// round(sparsity * n), so the count is exact and reproducible.
inline index_t pruned_count(index_t n, double sparsity) {
  if (!(sparsity >= 0.0 && sparsity <= 1.0))
    throw invalid_input("ctformer::compress: sparsity must lie in [0, 1], got " + std::to_string(sparsity));
  return index_t(std::llround(sparsity * double(n)));
}

namespace detail {
// Zeroes the `drop` elements of smallest |x| among the n at x[i * stride]
// (ties: the higher index goes first, so the lower index survives, as in quant::sparse_half).
inline void zero_smallest(float* x, index_t n, index_t stride, index_t drop) {
  if (drop <= 0) return;
  std::vector<index_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), index_t(0));
  auto smaller = [&](index_t a, index_t b) {
    const float fa = std::fabs(x[a * stride]), fb = std::fabs(x[b * stride]);
    return fa != fb ? fa < fb : a > b;
  };
  if (drop < n) std::nth_element(order.begin(), order.begin() + drop, order.end(), smaller);
  for (index_t i = 0; i < std::min(drop, n); ++i) x[order[std::size_t(i)] * stride] = 0.0f;
}

inline void require_contiguous_rows(const char* operation, tensor_view<float, 2> w) {
  if (w.extent(1) > 1 && w.stride(1) != 1)
    throw shape_error(std::string("ctformer::compress::") + operation + ": the matrix of shape " + shape_string(w) +
                      " must have contiguous rows");
}
}  // namespace detail

/// Magnitude pruning in place: zeroes exactly pruned_count(n, sparsity) of the
/// weights of smallest |w|, n being a row's length (per_row: every row loses
/// that many) or the matrix's size (per_matrix). Ties in |w| keep the lower
/// index. Returns the number of weights zeroed.
/// w: (out, in), rows contiguous.
inline index_t prune_magnitude(tensor_view<float, 2> w, double sparsity, prune_scope scope = prune_scope::per_row) {
  detail::require_contiguous_rows("prune_magnitude", w);
  const index_t rows = w.extent(0), cols = w.extent(1);
  if (scope == prune_scope::per_row) {
    const index_t drop = pruned_count(cols, sparsity);
    for (index_t r = 0; r < rows; ++r) detail::zero_smallest(&w(r, 0), cols, 1, drop);
    return drop * rows;
  }
  // per_matrix: the rows may be strided apart, so rank (row, col) pairs.
  const index_t drop = pruned_count(rows * cols, sparsity);
  std::vector<float> flat(std::size_t(rows * cols));
  for (index_t r = 0; r < rows; ++r) std::copy_n(&w(r, 0), cols, flat.begin() + r * cols);
  detail::zero_smallest(flat.data(), rows * cols, 1, drop);
  for (index_t r = 0; r < rows; ++r) std::copy_n(flat.begin() + r * cols, cols, &w(r, 0));
  return drop;
}

/// 2:4 structured pruning in place: in every group of 4 consecutive input
/// weights of a row, the 2 of smallest |w| become 0 (ties: the lower column is
/// kept), exactly what quant::sparse_2of4 stores. Returns the weights zeroed.
/// w: (out, in) with in a multiple of 4, rows contiguous.
inline index_t prune_2of4(tensor_view<float, 2> w) {
  detail::require_contiguous_rows("prune_2of4", w);
  const index_t rows = w.extent(0), cols = w.extent(1);
  if (cols % 4 != 0)
    throw shape_error("ctformer::compress::prune_2of4: rows of " + std::to_string(cols) +
                      " columns do not split into groups of 4");
  for (index_t r = 0; r < rows; ++r)
    for (index_t g = 0; g < cols; g += 4) detail::zero_smallest(&w(r, g), 4, 1, 2);
  return rows * cols / 2;
}

/// True when every group of 4 consecutive weights of every row has at most 2 non-zeros.
inline bool satisfies_2of4(tensor_view<const float, 2> w) {
  for (index_t r = 0; r < w.extent(0); ++r)
    for (index_t g = 0; g + 4 <= w.extent(1); g += 4) {
      int nonzero = 0;
      for (index_t i = 0; i < 4; ++i) nonzero += w(r, g + i) != 0.0f;
      if (nonzero > 2) return false;
    }
  return true;
}

/// Fraction of exact zeros in w.
inline double sparsity_of(tensor_view<const float, 2> w) {
  index_t zeros = 0;
  for (index_t r = 0; r < w.extent(0); ++r)
    for (index_t c = 0; c < w.extent(1); ++c) zeros += w(r, c) == 0.0f;
  return w.size() ? double(zeros) / double(w.size()) : 0.0;
}

}  // namespace ctformer::compress
