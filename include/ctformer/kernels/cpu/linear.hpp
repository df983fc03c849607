// CPU hooks of ops::linear for packed and interleaved weight matrices: which
// kernel runs a linear layer for a given row count and format.
#pragma once

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "ctformer/core/number_types.hpp"
#include "ctformer/kernels/cpu/elementwise.hpp"
#include "ctformer/kernels/cpu/gemm.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"
#include "ctformer/kernels/cpu/quantize.hpp"
#include "ctformer/kernels/cpu/quantize_interleaved.hpp"
#include "ctformer/quant/interleaved_matrix.hpp"
#include "ctformer/quant/packed_matrix.hpp"

namespace ctformer::cpu {

/// Row counts from which a row-major packed matrix (bf16, q8_0 where it is
/// not interleaved, int8_rowwise) is dequantized whole into fp32 and run
/// through the blocked fp32 GEMM (bf16 with a native bf16 GEMM: the
/// activations rounded to bf16 and the bf16 GEMM): dequantizing costs one
/// pass over the weights, cheap next to that many dot products per weight.
/// Fewer rows use the packed-weight GEMM (one row: the fused GEMV).
inline constexpr index_t linear_dequantize_min_rows = 16;

/// Matrices larger than this many weights are never dequantized whole (the
/// scratch would be larger than the matrix's share of the cache and of
/// memory): they use the packed-weight GEMM, which dequantizes tiles.
inline constexpr index_t linear_dequantize_max_weights = index_t(1) << 23;

namespace detail {

// Per-thread scratch that only grows, for the linear hooks: one slot for a
// dequantized weight matrix, one for a rounded or accumulated activation.
template <class T>
T* linear_scratch(int slot, std::size_t n) {
  thread_local std::vector<T> slots[2];
  std::vector<T>& s = slots[slot];
  if (s.size() < n) s.resize(n);
  return s.data();
}

// y = x W^T for a row-major packed matrix, overwriting y.
template <class Format>
void packed_linear(const par_t& exec, tensor_view<const float, 2> x, const quant::packed_matrix<Format>& w,
                   tensor_view<float, 2> y) {
  const index_t rows = x.extent(0), in = w.cols(), out = w.rows();
  if (rows == 1) {
    quantized_gemv_impl(exec, w, x[0], y[0]);
  } else if constexpr (std::is_same_v<Format, quant::fp32>) {
    // fp32 rows are a plain (out, in) matrix: the packed, blocked fp32 GEMM
    // beats the packed-weight GEMM's small micro-kernel.
    const tensor_view<const float, 2> weights(reinterpret_cast<const float*>(w.data()), {out, in});
    gemm_impl(exec, x, weights.transposed(), y, 1.0f, 0.0f);
  } else if (rows < linear_dequantize_min_rows || out * in > linear_dequantize_max_weights) {
    quantized_gemm_impl(exec, w, x, y);
  } else if constexpr (std::is_same_v<Format, quant::bf16_weights> && gemm_bf16_native_impl(nullptr)) {
    // Round the activations to bf16 (as bf16 autocast does) and run the
    // native bf16 GEMM on the weights as stored.
    bf16* rounded = linear_scratch<bf16>(0, std::size_t(rows * in));
    convert_impl(exec, tensor_view<const float, 1>(x.data(), {rows * in}), tensor_view<bf16, 1>(rounded, {rows * in}));
    const tensor_view<const bf16, 2> weights(reinterpret_cast<const bf16*>(w.data()), {out, in});
    gemm_impl(exec, tensor_view<const bf16, 2>(rounded, {rows, in}), weights.transposed(), y, 1.0f, 0.0f);
  } else {
    const tensor_view<float, 2> weights(linear_scratch<float>(0, std::size_t(out * in)), {out, in});
    dequantize_rows_impl(exec, w, weights);
    gemm_impl(exec, x, tensor_view<const float, 2>(weights).transposed(), y, 1.0f, 0.0f);
  }
}

}  // namespace detail

/// ops::linear for a row-major packed matrix: x (N, in), y (N, out).
template <class Format>
void linear_impl(const par_t& exec, tensor_view<const float, 2> x, const quant::packed_matrix<Format>& w,
                 tensor_view<float, 2> y, bool accumulate) {
  const index_t rows = x.extent(0), out = w.rows();
  if (rows == 0) return;
  if (!accumulate) {
    detail::packed_linear(exec, x, w, y);
    return;
  }
  if constexpr (std::is_same_v<Format, quant::fp32>) {
    if (rows > 1) {
      const tensor_view<const float, 2> weights(reinterpret_cast<const float*>(w.data()), {out, w.cols()});
      gemm_impl(exec, x, weights.transposed(), y, 1.0f, 1.0f);
      return;
    }
  }
  // y += x W^T through a scratch product: the packed kernels overwrite.
  const tensor_view<float, 2> product(detail::linear_scratch<float>(1, std::size_t(rows * out)), {rows, out});
  detail::packed_linear(exec, x, w, product);
  for (index_t r = 0; r < rows; ++r) add_impl(exec, tensor_view<const float, 1>(y[r]), tensor_view<const float, 1>(product[r]), y[r]);
}

/// ops::linear for an interleaved matrix: the integer GEMV for one row, the
/// integer GEMM (rows rounded to int8 blocks as the GEMV rounds them) for more.
template <class Format>
void linear_impl(const par_t& exec, tensor_view<const float, 2> x, const quant::interleaved_matrix<Format>& w,
                 tensor_view<float, 2> y, bool accumulate) {
  const index_t rows = x.extent(0), out = w.rows();
  if (rows == 0) return;
  const tensor_view<float, 2> target =
      accumulate ? tensor_view<float, 2>(detail::linear_scratch<float>(1, std::size_t(rows * out)), {rows, out}) : y;
  if (rows == 1) quantized_gemv_impl(exec, w, x[0], target[0]);
  else quantized_gemm_impl(exec, w, x, target);
  if (accumulate)
    for (index_t r = 0; r < rows; ++r) add_impl(exec, tensor_view<const float, 1>(y[r]), tensor_view<const float, 1>(target[r]), y[r]);
}

}  // namespace ctformer::cpu
