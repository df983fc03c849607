// CPU GEMV for the pruned formats (quant::sparse_2of4, quant::sparse_half):
// quantized_gemv_impl overloads found by ADL from ops::quantized_gemv, so a
// packed_matrix of a sparse format goes through the same public operation as
// q8_0 or fp32. (Prefill's ops::quantized_gemm needs nothing here: the generic
// CPU GEMM dequantizes tiles with the format's dequantize_row, and for one
// token it calls quantized_gemv_impl, which resolves to these overloads.)
//
// Both read only the stored bytes (53% of the dense fp32 matrix). sparse_2of4
// multiplies only the kept values: the x values under the kept positions are
// gathered with two in-register permutes per 16 columns. sparse_half expands
// each 8-column chunk's kept values to their columns (one permute by a
// 256-entry table) and multiplies all 8 lanes, zeros included: what it saves
// is bandwidth, not arithmetic.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "ctformer/kernels/cpu/isa.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"
#include "ctformer/kernels/cpu/quantize.hpp"
#include "ctformer/quant/packed_matrix.hpp"
#include "ctformer/quant/sparse_formats.hpp"

namespace ctformer::cpu {

namespace detail {

/// One sparse_2of4 row . x (contiguous, cols entries).
inline float dot_row_2of4(const quant::block_2of4* w, const float* x, index_t cols) {
  const index_t nb = cols / quant::sparse_2of4::block_size;
  index_t b = 0;
  float total = 0.0f;
#if defined(CTFORMER_CPU_AVX2)
  // Per 16 columns (half a block, 4 groups): lane l holds kept value l, of
  // group l/2, so its column is (bits >> 2l) & 3 within the group, plus 4 for
  // the odd groups (the upper half of their 8-column x vector).
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i group_offset = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i three = _mm256_set1_epi32(3);
  auto half = [&](const float* values, std::uint32_t bits, const float* xh) {
    const __m256i idx =
        _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(bits)), shifts), three), group_offset);
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xh), idx);      // groups 0, 1
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xh + 8), idx);  // groups 2, 3
    return _mm256_mul_ps(_mm256_loadu_ps(values), _mm256_blend_ps(lo, hi, 0xf0));
  };
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; b < nb; ++b) {
    const float* xb = x + b * 32;
    acc0 = _mm256_add_ps(acc0, half(w[b].values, w[b].index & 0xffffu, xb));
    acc1 = _mm256_add_ps(acc1, half(w[b].values + 8, w[b].index >> 16, xb + 16));
  }
  total = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; b < nb; ++b) {
    const float* xb = x + b * 32;
    for (int g = 0; g < 8; ++g)
      for (int k = 0; k < 2; ++k) total += w[b].values[2 * g + k] * xb[4 * g + w[b].position(g, k)];
  }
  return total;
}

#if defined(CTFORMER_CPU_AVX2)
/// For each mask byte m: lane l's rank among m's set bits (where bit l is
/// set), i.e. the permute that moves packed value k to the k-th set column.
inline const std::array<std::uint64_t, 256>& expand_table() {
  static const std::array<std::uint64_t, 256> table = [] {
    std::array<std::uint64_t, 256> t{};
    for (unsigned m = 0; m < 256; ++m) {
      std::uint64_t lanes = 0;
      unsigned rank = 0;
      for (unsigned l = 0; l < 8; ++l)
        if (m & (1u << l)) lanes |= std::uint64_t(rank++) << (8 * l);
      t[m] = lanes;
    }
    return t;
  }();
  return table;
}
#endif

/// One sparse_half row . x (contiguous, cols entries).
inline float dot_row_half(const std::byte* row, const float* x, index_t cols) {
  const std::uint8_t* mask = quant::sparse_half::row_mask(row, cols);
  const float* values = quant::sparse_half::row_values(row);
  const index_t chunks = cols / 8;
  [[maybe_unused]] const index_t stored = cols / 2;  // read by the AVX2 loop only
  index_t c = 0, k = 0;
  float total = 0.0f;
#if defined(CTFORMER_CPU_AVX2)
  const auto& table = expand_table();
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  // 8 values are loaded per chunk whatever its count, so stop while a full
  // load still lies inside this row's values; the scalar loop does the rest.
  for (; c + 2 <= chunks && k + 16 <= stored; c += 2) {
    for (int half = 0; half < 2; ++half) {
      const unsigned m = mask[c + half];
      const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(&table[m])));
      const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(m)), bit), bit);
      const __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(values + k), perm);
      const __m256 prod = _mm256_mul_ps(_mm256_and_ps(v, _mm256_castsi256_ps(keep)), _mm256_loadu_ps(x + (c + half) * 8));
      if (half == 0) acc0 = _mm256_add_ps(acc0, prod);
      else acc1 = _mm256_add_ps(acc1, prod);
      k += std::popcount(m);
    }
  }
  total = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; c < chunks; ++c) {
    const unsigned m = mask[c];
    for (unsigned l = 0; l < 8; ++l)
      if (m & (1u << l)) {
        total += values[k] * x[c * 8 + index_t(l)];
        ++k;
      }
  }
  return total;
}

}  // namespace detail

/// y = W x for a 2:4-pruned W: 8 multiplies per 16 columns.
/// w: (out, in), x: (in), y: (out).
inline void quantized_gemv_impl(const par_t& exec, const quant::packed_matrix<quant::sparse_2of4>& w,
                                tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  const float* xf = detail::contiguous(x, detail::strided_x_scratch());
  detail::for_row_ranges(exec, w.rows(), w.bytes(), [&](index_t begin, index_t end) {
    for (index_t r = begin; r < end; ++r)
      y(r) = detail::dot_row_2of4(reinterpret_cast<const quant::block_2of4*>(w.row(r)), xf, w.cols());
  });
}

/// y = W x for a per-row 50%-pruned W (bitmask + kept values).
/// w: (out, in), x: (in), y: (out).
inline void quantized_gemv_impl(const par_t& exec, const quant::packed_matrix<quant::sparse_half>& w,
                                tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  const float* xf = detail::contiguous(x, detail::strided_x_scratch());
  detail::for_row_ranges(exec, w.rows(), w.bytes(), [&](index_t begin, index_t end) {
    for (index_t r = begin; r < end; ++r) y(r) = detail::dot_row_half(w.row(r), xf, w.cols());
  });
}

}  // namespace ctformer::cpu
