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
#include "ctformer/kernels/cpu/isa.hpp"
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

/// Up to this many rows, fp32 weights are dotted with every row in one
/// stream over the matrix (the decode GEMV's arithmetic for each row, so a
/// batched decode row gets the bits it gets alone); from there on the
/// blocked GEMM, which packs the matrix once per call, is faster.
inline constexpr index_t linear_gemv_max_rows = 32;

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

// dots[t] = wr . xs[t] for Tokens tokens, each with exactly dot_row_f32's
// arithmetic (four 8-lane accumulators over 32 columns, then its horizontal
// sum), so every token gets the bits a lone decode GEMV gives it.
template <int Tokens>
void dot_row_f32_tokens(const float* wr, index_t in, const float* const* xs, float* dots) {
#if defined(CTFORMER_CPU_AVX2)
  __m256 acc[Tokens][4];
  for (int t = 0; t < Tokens; ++t)
    for (int k = 0; k < 4; ++k) acc[t][k] = _mm256_setzero_ps();
  index_t i = 0;
  for (; i + 32 <= in; i += 32)
    for (int k = 0; k < 4; ++k) {
      const __m256 wv = _mm256_loadu_ps(wr + i + 8 * k);
      for (int t = 0; t < Tokens; ++t) acc[t][k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t] + i + 8 * k), acc[t][k]);
    }
  for (; i + 8 <= in; i += 8) {
    const __m256 wv = _mm256_loadu_ps(wr + i);
    for (int t = 0; t < Tokens; ++t) acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t] + i), acc[t][0]);
  }
  for (int t = 0; t < Tokens; ++t) {
    float total = hsum(_mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])));
    for (index_t j = i; j < in; ++j) total += wr[j] * xs[t][j];
    dots[t] = total;
  }
#else
  for (int t = 0; t < Tokens; ++t) dots[t] = dot_row_f32(wr, xs[t], in);
#endif
}

// y = x W^T for a few tokens and an fp32 matrix: each weight row is read
// from memory once and stays in L1 while every token is dotted with it.
inline void fp32_gemv_tokens(const par_t& exec, tensor_view<const float, 2> x, const quant::packed_matrix<quant::fp32>& w,
                             tensor_view<float, 2> y) {
  const index_t tokens = x.extent(0), in = w.cols();
  const float* weights = reinterpret_cast<const float*>(w.data());
  for_row_ranges(exec, w.rows(), w.bytes(), [&](index_t begin, index_t end) {
    const float* xs[linear_gemv_max_rows];
    for (index_t t = 0; t < tokens; ++t) xs[t] = &x(t, 0);
    float dots[3];
    for (index_t r = begin; r < end; ++r) {
      const float* wr = weights + r * in;
      index_t t = 0;
      for (; t + 3 <= tokens; t += 3) {
        dot_row_f32_tokens<3>(wr, in, xs + t, dots);
        for (int k = 0; k < 3; ++k) y(t + k, r) = dots[k];
      }
      if (tokens - t == 2) dot_row_f32_tokens<2>(wr, in, xs + t, dots);
      else if (tokens - t == 1) dot_row_f32_tokens<1>(wr, in, xs + t, dots);
      for (int k = 0; t + k < tokens; ++k) y(t + k, r) = dots[k];
    }
  });
}

// y = x W^T for a row-major packed matrix, overwriting y.
template <class Format>
void packed_linear(const par_t& exec, tensor_view<const float, 2> x, const quant::packed_matrix<Format>& w,
                   tensor_view<float, 2> y) {
  const index_t rows = x.extent(0), in = w.cols(), out = w.rows();
  if (rows == 1) {
    quantized_gemv_impl(exec, w, x[0], y[0]);
  } else if constexpr (std::is_same_v<Format, quant::fp32>) {
    if (rows <= linear_gemv_max_rows) {
      fp32_gemv_tokens(exec, x, w, y);
    } else {
      // fp32 rows are a plain (out, in) matrix: for many rows the packed,
      // blocked fp32 GEMM beats the packed-weight GEMM's small micro-kernel.
      const tensor_view<const float, 2> weights(reinterpret_cast<const float*>(w.data()), {out, in});
      gemm_impl(exec, x, weights.transposed(), y, 1.0f, 0.0f);
    }
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
    if (rows > linear_gemv_max_rows) {
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
