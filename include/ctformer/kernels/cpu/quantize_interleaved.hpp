// CPU kernels for quant::interleaved_q4_0_matrix: the decode GEMV and the
// prefill GEMM as integer dot products of eight rows at once against int8
// activations, and dequantization back to fp32 rows.
//
// Every path computes a row's result with the same operations in the same
// order: per block of 32 the exact integer dot sum (q - 8) x_q, converted to
// float, then acc = fma(dot, d_w * d_x, acc) over the blocks in order. So the
// AVX2, VNNI and portable paths, tail rows, the GEMV and each token of the GEMM
// all give a row the same bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ctformer/kernels/cpu/quantize.hpp"
#include "ctformer/quant/interleaved_q4_0.hpp"

namespace ctformer::cpu {

namespace detail {

using interleaved_matrix = quant::interleaved_q4_0_matrix;

inline std::int32_t load_i32(const void* p) {
  std::int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

/// One row's result, block by block in the kernels' order (tail rows, the
/// portable path, and the reference every lane of the SIMD kernels matches).
inline float interleaved_row_dot(const interleaved_matrix& w, index_t r, const q8_activations& a) {
  float acc = 0.0f;
  for (index_t b = 0; b < a.blocks; ++b) {
    const quant::block_q4_0 blk = w.block(r, b);
    const std::int8_t* x = a.q.data() + b * qk;
    std::int32_t dot = 0;
    for (index_t j = 0; j < qk / 2; ++j) dot += int(blk.qs[j] & 0x0f) * x[j] + int(blk.qs[j] >> 4) * x[j + qk / 2];
    dot -= 8 * a.sum[std::size_t(b)];
    acc = std::fma(float(dot), fp16_to_float(blk.d) * a.d[std::size_t(b)], acc);
  }
  return acc;
}

#if defined(__AVX2__)
/// The 8 rows' integer dots of one group block with one token's activation
/// block x (32 int8) whose quants sum to xsum: lane r = sum_i (q[r][i] - 8) x[i].
/// Each 32-byte chunk holds 8 quants per row (low nibbles: 4 of them, high
/// nibbles: the next 4); the token's 4 matching bytes are broadcast.
inline __m256i group_block_dot(const std::uint8_t* quants, const std::int8_t* x, std::int32_t xsum) {
  const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  __m256i sum = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 32 * c));
    sum = _mm256_dpbusd_epi32(sum, _mm256_and_si256(v, low_nibbles), _mm256_set1_epi32(load_i32(x + 8 * c)));
    sum = _mm256_dpbusd_epi32(sum, _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles),
                              _mm256_set1_epi32(load_i32(x + 8 * c + 4)));
  }
#else
  // maddubs pairs: q <= 15 and |x| <= 127, so each int16 is at most 3810 in
  // magnitude and the eight summed here at most 30480: no overflow before the
  // widening madd.
  __m256i sum16 = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 32 * c));
    sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(_mm256_and_si256(v, low_nibbles),
                                                         _mm256_set1_epi32(load_i32(x + 8 * c))));
    sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles),
                                                         _mm256_set1_epi32(load_i32(x + 8 * c + 4))));
  }
  const __m256i sum = _mm256_madd_epi16(sum16, _mm256_set1_epi16(1));
#endif
  return _mm256_sub_epi32(sum, _mm256_set1_epi32(8 * xsum));
}

/// The 8 rows' scales of a group block as floats.
inline __m256 group_scales(const std::byte* group_block) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group_block)));
}
#endif

/// out[0..8) = group g's rows dotted with one token's activations.
inline void group_dot(const interleaved_matrix& w, index_t g, const q8_activations& a, float* out) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  const std::byte* gb = w.group_block(g, 0);
  for (index_t b = 0; b < a.blocks; ++b, gb += interleaved_matrix::group_block_bytes) {
    // A group block is 144 bytes, 2.25 cache lines: one hint per block would
    // skip every other line, so hint each line it can start in.
    prefetch_weights(gb);
    prefetch_weights(gb + 64);
    prefetch_weights(gb + 128);
    const __m256i dot = group_block_dot(reinterpret_cast<const std::uint8_t*>(gb + interleaved_matrix::scale_bytes),
                                        a.q.data() + b * qk, a.sum[std::size_t(b)]);
    const __m256 scale = _mm256_mul_ps(group_scales(gb), _mm256_set1_ps(a.d[std::size_t(b)]));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc);
  }
  _mm256_storeu_ps(out, acc);
#else
  for (index_t r = 0; r < interleaved_matrix::rows_per_group; ++r)
    out[r] = interleaved_row_dot(w, g * interleaved_matrix::rows_per_group + r, a);
#endif
}

/// Tokens per pass of the GEMM kernel: each unpacked weight chunk is used
/// this many times (4 accumulators and 4 int16 sums stay in registers).
inline constexpr index_t interleaved_gemm_tokens = 4;

/// out[t][0..8) = group g's rows dotted with tokens a[0..n), n <= 4: the
/// group's quants are unpacked once per chunk for all n tokens.
inline void group_dot_tokens(const interleaved_matrix& w, index_t g, const q8_activations* const* a, int n,
                             float (*out)[8]) {
#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
  if (n == interleaved_gemm_tokens) {
    const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const std::byte* gb = w.group_block(g, 0);
    for (index_t b = 0; b < a[0]->blocks; ++b, gb += interleaved_matrix::group_block_bytes) {
      const auto* quants = reinterpret_cast<const std::uint8_t*>(gb + interleaved_matrix::scale_bytes);
      __m256i sum16[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256()};
      for (int c = 0; c < 4; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 32 * c));
        const __m256i low = _mm256_and_si256(v, low_nibbles);
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles);
        for (int t = 0; t < 4; ++t) {  // same adds in the same order as group_block_dot
          const std::int8_t* x = a[t]->q.data() + b * qk + 8 * c;
          sum16[t] = _mm256_add_epi16(sum16[t], _mm256_maddubs_epi16(low, _mm256_set1_epi32(load_i32(x))));
          sum16[t] = _mm256_add_epi16(sum16[t], _mm256_maddubs_epi16(high, _mm256_set1_epi32(load_i32(x + 4))));
        }
      }
      const __m256 scales = group_scales(gb);
      for (int t = 0; t < 4; ++t) {
        const __m256i dot = _mm256_sub_epi32(_mm256_madd_epi16(sum16[t], _mm256_set1_epi16(1)),
                                             _mm256_set1_epi32(8 * a[t]->sum[std::size_t(b)]));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scales, _mm256_set1_ps(a[t]->d[std::size_t(b)])),
                                 acc[t]);
      }
    }
    for (int t = 0; t < 4; ++t) _mm256_storeu_ps(out[t], acc[t]);
    return;
  }
#endif
  for (int t = 0; t < n; ++t) group_dot(w, g, *a[t], out[t]);
}

/// Group g's 8 rows of fp32 weights: out + r * out_stride for row r.
inline void dequantize_group(const interleaved_matrix& w, index_t g, float* out, index_t out_stride) {
  const index_t nb = w.blocks_per_row();
  for (index_t b = 0; b < nb; ++b) {
    const std::byte* gb = w.group_block(g, b);
    const auto* quants = reinterpret_cast<const std::uint8_t*>(gb + interleaved_matrix::scale_bytes);
    for (index_t r = 0; r < interleaved_matrix::rows_per_group; ++r) {
      fp16 d;
      std::memcpy(&d, gb + r * sizeof(fp16), sizeof d);
      const float scale = fp16_to_float(d);
      float* o = out + r * out_stride + b * qk;
#if defined(__AVX2__)
      // Row r's 4 bytes of each chunk: low nibbles are quants 8c..8c+3, high
      // nibbles 8c+4..8c+7; interleaving the two restores element order.
      const __m128i bytes = _mm_setr_epi32(load_i32(quants + 4 * r), load_i32(quants + 32 + 4 * r),
                                           load_i32(quants + 64 + 4 * r), load_i32(quants + 96 + 4 * r));
      const __m128i mask = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
      const __m128i low = _mm_sub_epi8(_mm_and_si128(bytes, mask), eight);
      const __m128i high = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), eight);
      const __m128i first = _mm_unpacklo_epi32(low, high), second = _mm_unpackhi_epi32(low, high);
      const __m256 s = _mm256_set1_ps(scale);
      _mm256_storeu_ps(o, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(first))));
      _mm256_storeu_ps(o + 8, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(first, 8)))));
      _mm256_storeu_ps(o + 16, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(second))));
      _mm256_storeu_ps(o + 24, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(second, 8)))));
#else
      for (index_t c = 0; c < 4; ++c)
        for (index_t j = 0; j < 4; ++j) {
          const std::uint8_t byte = quants[32 * c + 4 * r + j];
          o[8 * c + j] = scale * float(int(byte & 0x0f) - 8);
          o[8 * c + 4 + j] = scale * float(int(byte >> 4) - 8);
        }
#endif
    }
  }
}

/// Per-thread activations of the GEMM's token rows (grown, never shrunk).
inline std::vector<q8_activations>& token_activation_scratch() {
  thread_local std::vector<q8_activations> scratch;
  return scratch;
}

}  // namespace detail

/// out = the fp32 values of w. out: (rows, cols), rows contiguous.
inline void dequantize_rows_impl(const par_t& exec, const quant::interleaved_q4_0_matrix& w,
                                 tensor_view<float, 2> out) {
  const index_t groups = w.groups();
  const index_t row_stride = out.stride(0);
  detail::for_row_ranges(exec, groups, w.bytes(), [&](index_t begin, index_t end) {
    for (index_t g = begin; g < end; ++g)
      detail::dequantize_group(w, g, &out(g * quant::interleaved_q4_0_matrix::rows_per_group, 0), row_stride);
  });
  for (index_t r = groups * quant::interleaved_q4_0_matrix::rows_per_group; r < w.rows(); ++r)
    quant::q4_0::dequantize_row(w.tail_row(r), &out(r, 0), w.cols());
}

/// y = W x: x is quantized to int8 blocks of 32 once, then each group of 8
/// rows is one integer kernel call; groups split over threads.
/// w: (out, in), x: (in), y: (out).
inline void quantized_gemv_impl(const par_t& exec, const quant::interleaved_q4_0_matrix& w,
                                tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  constexpr index_t group_rows = quant::interleaved_q4_0_matrix::rows_per_group;
  const float* xf = detail::contiguous(x, detail::strided_x_scratch());
  detail::q8_activations& act = detail::activation_scratch();
  detail::quantize_activations(xf, w.cols(), act);
  const bool unit = y.stride(0) == 1;
  detail::for_row_ranges(exec, w.groups(), w.bytes(), [&](index_t begin, index_t end) {
    for (index_t g = begin; g < end; ++g) {
      float out[group_rows];
      detail::group_dot(w, g, act, unit ? &y(g * group_rows) : out);
      if (!unit)
        for (index_t r = 0; r < group_rows; ++r) y(g * group_rows + r) = out[r];
    }
  });
  for (index_t r = w.groups() * group_rows; r < w.rows(); ++r) y(r) = detail::interleaved_row_dot(w, r, act);
}

/// y = x W^T for T tokens (prefill): every token row is quantized to int8
/// blocks once, then each group's quants are unpacked once per 4 tokens and
/// dotted with all four (an int8 GEMM: maddubs does 32 multiply-adds where an
/// fp32 FMA does 8). Each token's row equals quantized_gemv of that token,
/// bit for bit. Threads take tiles of groups; a tile (about 48 KiB of weights)
/// stays in L2 while every token passes over it.
/// w: (out, in), x: (T, in) rows contiguous, y: (T, out).
inline void quantized_gemm_impl(const par_t& exec, const quant::interleaved_q4_0_matrix& w,
                                tensor_view<const float, 2> x, tensor_view<float, 2> y) {
  constexpr index_t group_rows = quant::interleaved_q4_0_matrix::rows_per_group;
  const index_t tokens = x.extent(0);
  if (tokens == 1) {
    quantized_gemv_impl(exec, w, x[0], y[0]);
    return;
  }
  std::vector<detail::q8_activations>& acts = detail::token_activation_scratch();
  if (index_t(acts.size()) < tokens) acts.resize(std::size_t(tokens));
  detail::parallel_for(exec, std::min<index_t>(exec.thread_count(), tokens), [&](index_t part) {
    const index_t parts = std::min<index_t>(exec.thread_count(), tokens);
    for (index_t t = tokens * part / parts; t < tokens * (part + 1) / parts; ++t)
      detail::quantize_activations(&x(t, 0), w.cols(), acts[std::size_t(t)]);
  });
  const index_t group_bytes = w.blocks_per_row() * index_t(quant::interleaved_q4_0_matrix::group_block_bytes);
  // Tiles of about 48 KiB, their count a multiple of the thread count so the
  // static split gives every thread the same work.
  const index_t threads = exec.thread_count();
  index_t tiles = std::max<index_t>(1, w.groups() * group_bytes / (index_t(48) << 10));
  tiles = std::min(w.groups(), (tiles + threads - 1) / threads * threads);
  const index_t tile_groups = tiles > 0 ? (w.groups() + tiles - 1) / tiles : 1;
  tiles = tiles > 0 ? (w.groups() + tile_groups - 1) / tile_groups : 0;
  detail::parallel_for(exec, tiles, [&](index_t tile) {
    const index_t g0 = tile * tile_groups, g1 = std::min(w.groups(), g0 + tile_groups);
    for (index_t t0 = 0; t0 < tokens; t0 += detail::interleaved_gemm_tokens) {
      const int n = int(std::min(detail::interleaved_gemm_tokens, tokens - t0));
      const detail::q8_activations* a[detail::interleaved_gemm_tokens];
      for (int t = 0; t < n; ++t) a[t] = &acts[std::size_t(t0 + t)];
      for (index_t g = g0; g < g1; ++g) {
        float out[detail::interleaved_gemm_tokens][group_rows];
        detail::group_dot_tokens(w, g, a, n, out);
        for (int t = 0; t < n; ++t) std::copy(out[t], out[t] + group_rows, &y(t0 + t, g * group_rows));
      }
    }
  });
  for (index_t t = 0; t < tokens; ++t)
    for (index_t r = w.groups() * group_rows; r < w.rows(); ++r)
      y(t, r) = detail::interleaved_row_dot(w, r, acts[std::size_t(t)]);
}

}  // namespace ctformer::cpu
