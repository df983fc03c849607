// Sparse weight formats for pruned matrices: sparse_2of4 (2:4 structured, the
// 2 kept values of every group of 4 plus their 2-bit positions) and
// sparse_half (per-row 50% unstructured: a bitmask plus the kept values),
// both fp32-valued and satisfying quant::weight_format, so packed_matrix,
// ops::quantize / dequantize / quantized_gemv / quantized_gemm accept them.
//
// What they save: bytes. A pruned fp32 matrix stored dense still streams 32
// bits per weight through every GEMV; these store 17 bits per weight
// (sparse_2of4: 2 x 32-bit values + 4 index bits per 4 weights; sparse_half:
// 16 bits of value + 1 mask bit per weight), 53% of dense, and the GEMV in
// kernels/cpu/sparse_gemv.hpp reads only those bytes and multiplies only the
// kept values. Values stay fp32 so that a perplexity measured with them shows
// the cost of pruning alone, not of pruning and rounding together.
//
// Layering: core/ only, like formats.hpp, so kernels/cpu/ can name the layouts.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "ctformer/core/error.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/quant/formats.hpp"

namespace ctformer::quant {

namespace detail {
// Indices of the `keep` largest |x[i]| among n, in ascending index order. Ties
// in |x| go to the lower index, so the choice is deterministic and a row that
// is already pruned (zeros beyond `keep`) keeps all of its non-zeros.
inline void largest_magnitudes(const float* x, index_t n, index_t keep, std::vector<index_t>& order) {
  order.resize(std::size_t(n));
  std::iota(order.begin(), order.end(), index_t(0));
  auto larger = [x](index_t a, index_t b) {
    const float fa = std::fabs(x[a]), fb = std::fabs(x[b]);
    return fa != fb ? fa > fb : a < b;
  };
  if (keep < n) std::nth_element(order.begin(), order.begin() + keep, order.end(), larger);
  order.resize(std::size_t(keep));
  std::sort(order.begin(), order.end());
}
}  // namespace detail

/// 32 weights under 2:4 sparsity: in each of the 8 groups of 4 consecutive
/// columns, 2 values are kept. values[2g], values[2g+1] belong to group g, at
/// columns 4g + position(g, 0) < 4g + position(g, 1); `index` holds the 16
/// two-bit positions, group g's at bits 4g..4g+3 (first position low).
/// 68 bytes, a multiple of the float alignment, so blocks back to back stay aligned.
struct block_2of4 {
  float values[16];
  std::uint32_t index;

  /// Column (0-3 within group g) of kept value k (0 or 1).
  index_t position(int g, int k) const { return index_t((index >> (4 * g + 2 * k)) & 3u); }
};
static_assert(sizeof(block_2of4) == 68, "2:4 block must be 16 fp32 values + 4 index bytes (17 bits per weight)");
static_assert(std::is_trivially_copyable_v<block_2of4>);

/// 2:4 structured sparsity (NVIDIA Ampere's pattern): in every group of 4
/// consecutive input weights of a row, only the 2 of largest |w| are stored
/// (fp32) with their positions. 68 bytes per 32 weights, 53% of fp32.
/// quantize_row prunes to the pattern; a row already 2:4-pruned round-trips
/// exactly. Rows must have a multiple of 32 columns (one block).
struct sparse_2of4 {
  using block_type = block_2of4;
  static constexpr index_t block_size = 32;
  static constexpr const char* name = "prune2of4";

  static void check_cols(index_t cols) { detail::require_block_multiple<sparse_2of4>("quant::sparse_2of4", cols); }
  static std::size_t row_bytes(index_t cols) { return std::size_t(cols / block_size) * sizeof(block_type); }
  static std::size_t bytes_for(index_t rows, index_t cols) { return std::size_t(rows) * row_bytes(cols); }

  /// The block for 32 floats: the 2 largest |x| of each group of 4 (ties to the lower column).
  static block_type quantize_block(const float* x) {
    block_type b{};
    std::uint32_t bits = 0;
    for (int g = 0; g < 8; ++g) {
      const float* xg = x + 4 * g;
      // The two largest of four by |x|, lower column first on ties.
      int first = 0;
      for (int i = 1; i < 4; ++i)
        if (std::fabs(xg[i]) > std::fabs(xg[first])) first = i;
      int second = first == 0 ? 1 : 0;
      for (int i = 0; i < 4; ++i)
        if (i != first && std::fabs(xg[i]) > std::fabs(xg[second])) second = i;
      const int lo = std::min(first, second), hi = std::max(first, second);
      b.values[2 * g] = xg[lo];
      b.values[2 * g + 1] = xg[hi];
      bits |= std::uint32_t(lo | (hi << 2)) << (4 * g);
    }
    b.index = bits;
    return b;
  }
  static void quantize_row(const float* x, std::byte* row, index_t cols) {
    for (index_t b = 0; b < cols / block_size; ++b) {
      const block_type blk = quantize_block(x + b * block_size);
      std::memcpy(row + std::size_t(b) * sizeof(block_type), &blk, sizeof blk);
    }
  }
  static void dequantize_row(const std::byte* row, float* x, index_t cols) {
    std::fill(x, x + cols, 0.0f);
    for (index_t b = 0; b < cols / block_size; ++b) {
      block_type blk;
      std::memcpy(&blk, row + std::size_t(b) * sizeof(block_type), sizeof blk);
      float* xb = x + b * block_size;
      for (int g = 0; g < 8; ++g)
        for (int k = 0; k < 2; ++k) xb[4 * g + blk.position(g, k)] = blk.values[2 * g + k];
    }
  }
};

/// Unstructured 50% sparsity with the same count in every row: each row keeps
/// its cols/2 weights of largest |w| (ties to the lower column). A row is
/// [values: cols/2 fp32 in column order][mask: cols/8 bytes, bit c of byte
/// c/8 set when column c is kept]: 17 bits per weight, 53% of fp32.
/// Per-row rather than per-matrix so that every row has the same size (rows
/// stay addressable as row(r) and GEMV threads get equal work) -- the choice
/// Wanda makes for LLMs, where per-output pruning also loses less accuracy.
/// quantize_row prunes; a row already holding <= cols/2 non-zeros round-trips
/// exactly. Rows must have a multiple of 32 columns (whole mask bytes, and a
/// mask of whole floats so that every row's values start 4-byte aligned).
struct sparse_half {
  using block_type = std::uint8_t;
  static constexpr index_t block_size = 32;
  static constexpr const char* name = "prune50";

  static void check_cols(index_t cols) { detail::require_block_multiple<sparse_half>("quant::sparse_half", cols); }
  static std::size_t mask_bytes(index_t cols) { return std::size_t(cols / 8); }
  static std::size_t row_bytes(index_t cols) { return value_bytes(cols) + mask_bytes(cols); }
  static std::size_t bytes_for(index_t rows, index_t cols) { return std::size_t(rows) * row_bytes(cols); }

  static std::size_t value_bytes(index_t cols) { return std::size_t(cols / 2) * sizeof(float); }
  /// The kept values, in column order.
  static const float* row_values(const std::byte* row) { return reinterpret_cast<const float*>(row); }
  static const std::uint8_t* row_mask(const std::byte* row, index_t cols) {
    return reinterpret_cast<const std::uint8_t*>(row + value_bytes(cols));
  }

  static void quantize_row(const float* x, std::byte* row, index_t cols) {
    thread_local std::vector<index_t> order;
    detail::largest_magnitudes(x, cols, cols / 2, order);
    auto* mask = reinterpret_cast<std::uint8_t*>(row + value_bytes(cols));
    std::fill(mask, mask + mask_bytes(cols), std::uint8_t(0));
    std::byte* values = row;
    for (std::size_t k = 0; k < order.size(); ++k) {
      const index_t c = order[k];
      mask[c / 8] = std::uint8_t(mask[c / 8] | (1u << (c % 8)));
      std::memcpy(values + k * sizeof(float), &x[c], sizeof(float));
    }
  }
  static void dequantize_row(const std::byte* row, float* x, index_t cols) {
    const std::uint8_t* mask = row_mask(row, cols);
    const float* values = row_values(row);
    std::size_t k = 0;
    for (index_t c = 0; c < cols; ++c) {
      if (mask[c / 8] & (1u << (c % 8))) {
        x[c] = values[k++];
      } else {
        x[c] = 0.0f;
      }
    }
  }
};

static_assert(weight_format<sparse_2of4> && weight_format<sparse_half>);

/// True for the pruned (sparse) formats.
template <class F>
inline constexpr bool is_sparse_format = std::is_same_v<F, sparse_2of4> || std::is_same_v<F, sparse_half>;

}  // namespace ctformer::quant
