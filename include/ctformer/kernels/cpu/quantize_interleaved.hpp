// CPU kernels for quant::interleaved_matrix<q4_0 | q8_0>: the decode GEMV and
// the prefill GEMM as integer dot products of eight rows at once against int8
// activations, and dequantization back to fp32 rows.
//
// Every path computes a row's result with the same operations in the same
// order: per block of 32 the exact integer dot (q4_0: sum (q - 8) x_q; q8_0:
// sum q x_q), converted to float, then acc = fma(dot, d_w * d_x, acc) over
// the blocks in order. So the AVX2, VNNI and portable paths, tail rows, the
// GEMV and each token of the GEMM all give a row the same bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ctformer/kernels/cpu/detail/vnni.hpp"
#include "ctformer/kernels/cpu/isa.hpp"
#include "ctformer/kernels/cpu/quantize.hpp"
#include "ctformer/quant/interleaved_matrix.hpp"

namespace ctformer::cpu {

namespace detail {

inline std::int32_t load_i32(const void* p) {
  std::int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

/// One row's result, block by block in the kernels' order (tail rows, the
/// portable path, and the reference every lane of the SIMD kernels matches).
template <class Format>
float interleaved_row_dot(const quant::interleaved_matrix<Format>& w, index_t r, const q8_activations& a) {
  float acc = 0.0f;
  for (index_t b = 0; b < a.blocks; ++b) {
    const auto blk = w.block(r, b);
    const std::int8_t* x = a.q.data() + b * qk;
    std::int32_t dot = 0;
    if constexpr (std::is_same_v<Format, quant::q4_0>) {
      for (index_t j = 0; j < qk / 2; ++j) dot += int(blk.qs[j] & 0x0f) * x[j] + int(blk.qs[j] >> 4) * x[j + qk / 2];
      dot -= 8 * a.sum[std::size_t(b)];
    } else {
      for (index_t j = 0; j < qk; ++j) dot += int(blk.qs[j]) * x[j];
    }
    acc = std::fma(float(dot), fp16_to_float(blk.d) * a.d[std::size_t(b)], acc);
  }
  return acc;
}

#if defined(CTFORMER_CPU_AVX2)

/// Adds the products of one 32-byte chunk of quants (4 per row: unsigned
/// after unpacking for q4_0; for q8_0 signed, or q + 128 with VNNI) with the
/// token's 4 matching bytes to the block's running sum `s`: 8 int32 lanes
/// (VNNI, and q8_0 everywhere) or 16 int16 pairs widened at the end (q4_0 on
/// AVX2).
template <class Format>
inline __m256i add_chunk(__m256i s, __m256i quants, __m256i x4) {
  if constexpr (std::is_same_v<Format, quant::q4_0>) {
#if defined(CTFORMER_CPU_AVX512_VNNI)
    return multiply_add_unsigned_signed(s, quants, x4);
#else
    // q <= 15 and |x| <= 127: each int16 pair sum is at most 3810, eight of
    // them at most 30480, so adding in int16 cannot overflow.
    return _mm256_add_epi16(s, _mm256_maddubs_epi16(quants, x4));
#endif
  } else {
#if defined(CTFORMER_CPU_AVX512_VNNI)
    // quants holds q + 128 (chunk() flips the sign bit): vpdpbusd takes it as
    // unsigned and sums in int32 without saturating; finish_block removes
    // 128 sum x.
    return multiply_add_unsigned_signed(s, quants, x4);
#else
    // |q|, |x| <= 127: a pair is at most 32258 and is widened at once.
    return _mm256_add_epi32(s, dot_s8_s8(quants, x4));
#endif
  }
}

/// The 8 rows' integer dots of the block from its sum (q4_0: minus 8 sum x).
template <class Format>
inline __m256i finish_block(__m256i s, std::int32_t xsum) {
  if constexpr (std::is_same_v<Format, quant::q4_0>) {
#if !defined(CTFORMER_CPU_AVX512_VNNI)
    s = _mm256_madd_epi16(s, _mm256_set1_epi16(1));
#endif
    return _mm256_sub_epi32(s, _mm256_set1_epi32(8 * xsum));
  } else {
#if defined(CTFORMER_CPU_AVX512_VNNI)
    return _mm256_sub_epi32(s, _mm256_set1_epi32(128 * xsum));
#else
    (void)xsum;
    return s;
#endif
  }
}

/// Activation bytes [4 c, 4 c + 4) of a block, broadcast to the 8 row lanes.
inline __m256i x4_of(const std::int8_t* x, int c) { return _mm256_set1_epi32(load_i32(x + 4 * c)); }

/// Chunk c in [0, 8) of a group block's quants, as the integers the
/// multiply-add takes against activation bytes [4 c, 4 c + 4): q4_0 stores 4
/// chunks of 32 bytes, each giving two (low, then high nibbles); q8_0 gives
/// its signed bytes, or q + 128 where vpdpbusd takes them. Called in a
/// fully unrolled loop, so q4_0's load of a stored chunk is shared.
template <class Format>
inline __m256i chunk(const std::uint8_t* quants, int c) {
  if constexpr (std::is_same_v<Format, quant::q4_0>) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 32 * (c / 2)));
    const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
    return _mm256_and_si256(c % 2 == 0 ? v : _mm256_srli_epi16(v, 4), low_nibbles);
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 32 * c));
#if defined(CTFORMER_CPU_AVX512_VNNI)
    // q + 128 as an unsigned byte, for vpdpbusd's unsigned operand: one xor
    // per chunk, shared by every token, instead of two sign operations per
    // chunk and token.
    return _mm256_xor_si256(v, _mm256_set1_epi8(char(0x80)));
#else
    return v;
#endif
  }
}

/// The 8 rows' scales of a group block as floats.
inline __m256 group_scales(const std::byte* group_block) {
#if defined(CTFORMER_CPU_F16C)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group_block)));
#else
  alignas(32) float scales[8];
  for (int r = 0; r < 8; ++r) {
    fp16 d;
    std::memcpy(&d, group_block + r * sizeof(fp16), sizeof d);
    scales[r] = fp16_to_float(d);
  }
  return _mm256_load_ps(scales);
#endif
}
#endif

/// out[0..8) = group g's rows dotted with one token's activations.
template <class Format>
void group_dot(const quant::interleaved_matrix<Format>& w, index_t g, const q8_activations& a, float* out) {
  using matrix = quant::interleaved_matrix<Format>;
#if defined(CTFORMER_CPU_AVX2)
  __m256 acc = _mm256_setzero_ps();
  const std::byte* gb = w.group_block(g, 0);
  for (index_t b = 0; b < a.blocks; ++b, gb += matrix::group_block_bytes) {
    // A group block spans 2.25 (q4_0) or 4.25 (q8_0) cache lines: one hint per
    // block would skip lines, so hint every line it can start in.
    for (std::size_t line = 0; line < matrix::group_block_bytes; line += 64) prefetch_weights(gb + line);
    const std::int8_t* x = a.q.data() + b * qk;
    const auto* quants = reinterpret_cast<const std::uint8_t*>(gb + matrix::scale_bytes);
    __m256i s = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) s = add_chunk<Format>(s, chunk<Format>(quants, c), x4_of(x, c));
    const __m256i dot = finish_block<Format>(s, a.sum[std::size_t(b)]);
    const __m256 scale = _mm256_mul_ps(group_scales(gb), _mm256_set1_ps(a.d[std::size_t(b)]));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc);
  }
  _mm256_storeu_ps(out, acc);
#else
  for (index_t r = 0; r < matrix::rows_per_group; ++r) out[r] = interleaved_row_dot(w, g * matrix::rows_per_group + r, a);
#endif
}

/// Tokens per pass of the GEMM kernel: each unpacked chunk of quants is used
/// this many times (4 block sums and 4 accumulators stay in registers).
inline constexpr index_t interleaved_gemm_tokens = 4;

/// out[t][0..8) = group g's rows dotted with tokens a[0..n), n <= 4: the
/// group's quants are loaded and unpacked once per chunk for all n tokens.
template <class Format>
void group_dot_tokens(const quant::interleaved_matrix<Format>& w, index_t g, const q8_activations* const* a, int n,
                      float (*out)[8]) {
#if defined(CTFORMER_CPU_AVX2)
  using matrix = quant::interleaved_matrix<Format>;
  if (n == interleaved_gemm_tokens) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const std::byte* gb = w.group_block(g, 0);
    for (index_t b = 0; b < a[0]->blocks; ++b, gb += matrix::group_block_bytes) {
      const std::int8_t* x[4] = {a[0]->q.data() + b * qk, a[1]->q.data() + b * qk, a[2]->q.data() + b * qk,
                                 a[3]->q.data() + b * qk};
      const auto* quants = reinterpret_cast<const std::uint8_t*>(gb + matrix::scale_bytes);
      __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
      // Two chunks (one stored q4_0 chunk) per iteration and no further
      // unrolling: fully unrolled, GCC hoists all 32 multiply-adds ahead of
      // their sums and spills them to the stack.
#pragma GCC unroll 1
      for (int c = 0; c < 8; c += 2) {
        const __m256i q0 = chunk<Format>(quants, c), q1 = chunk<Format>(quants, c + 1);
        s0 = add_chunk<Format>(add_chunk<Format>(s0, q0, x4_of(x[0], c)), q1, x4_of(x[0], c + 1));
        s1 = add_chunk<Format>(add_chunk<Format>(s1, q0, x4_of(x[1], c)), q1, x4_of(x[1], c + 1));
        s2 = add_chunk<Format>(add_chunk<Format>(s2, q0, x4_of(x[2], c)), q1, x4_of(x[2], c + 1));
        s3 = add_chunk<Format>(add_chunk<Format>(s3, q0, x4_of(x[3], c)), q1, x4_of(x[3], c + 1));
      }
      const __m256i sums[4] = {s0, s1, s2, s3};
      const __m256 scales = group_scales(gb);
      for (int t = 0; t < 4; ++t) {
        const __m256i dot = finish_block<Format>(sums[t], a[t]->sum[std::size_t(b)]);
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

#if defined(CTFORMER_CPU_AVX512_VNNI)
/// out[t][0..16) = groups g and g + 1 (16 rows) dotted with tokens a[0..4):
/// each activation broadcast feeds one vpdpbusd per group. With VNNI the
/// single-group tile spends a load on a broadcast for every multiply-add and
/// its four sums form dependent chains of vpdpbusd; here it is one load per
/// two, over eight independent sums. Each row's arithmetic is
/// group_dot_tokens' (the same bits).
template <class Format>
void group_pair_dot_tokens(const quant::interleaved_matrix<Format>& w, index_t g, const q8_activations* const* a,
                           float (*out)[16]) {
  using matrix = quant::interleaved_matrix<Format>;
  __m256 acc[2][4];
  for (auto& group : acc)
    for (auto& v : group) v = _mm256_setzero_ps();
  const std::byte* gb0 = w.group_block(g, 0);
  const std::byte* gb1 = w.group_block(g + 1, 0);
  for (index_t b = 0; b < a[0]->blocks; ++b, gb0 += matrix::group_block_bytes, gb1 += matrix::group_block_bytes) {
    const std::int8_t* x[4] = {a[0]->q.data() + b * qk, a[1]->q.data() + b * qk, a[2]->q.data() + b * qk,
                               a[3]->q.data() + b * qk};
    const auto* quants0 = reinterpret_cast<const std::uint8_t*>(gb0 + matrix::scale_bytes);
    const auto* quants1 = reinterpret_cast<const std::uint8_t*>(gb1 + matrix::scale_bytes);
    __m256i s[2][4];
    for (auto& group : s)
      for (auto& v : group) v = _mm256_setzero_si256();
#pragma GCC unroll 1
    for (int c = 0; c < 8; c += 2) {
      const __m256i q00 = chunk<Format>(quants0, c), q01 = chunk<Format>(quants0, c + 1);
      const __m256i q10 = chunk<Format>(quants1, c), q11 = chunk<Format>(quants1, c + 1);
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const __m256i x0 = x4_of(x[t], c), x1 = x4_of(x[t], c + 1);
        s[0][t] = add_chunk<Format>(add_chunk<Format>(s[0][t], q00, x0), q01, x1);
        s[1][t] = add_chunk<Format>(add_chunk<Format>(s[1][t], q10, x0), q11, x1);
      }
    }
    const __m256 scales[2] = {group_scales(gb0), group_scales(gb1)};
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const std::int32_t xsum = a[t]->sum[std::size_t(b)];
      const __m256 d = _mm256_set1_ps(a[t]->d[std::size_t(b)]);
      for (int h = 0; h < 2; ++h)
        acc[h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(finish_block<Format>(s[h][t], xsum)),
                                    _mm256_mul_ps(scales[h], d), acc[h][t]);
    }
  }
  for (int t = 0; t < 4; ++t) {
    _mm256_storeu_ps(out[t], acc[0][t]);
    _mm256_storeu_ps(out[t] + 8, acc[1][t]);
  }
}
#endif

/// Group g's 8 rows of fp32 weights: row r to out + r * out_stride.
template <class Format>
void dequantize_group(const quant::interleaved_matrix<Format>& w, index_t g, float* out, index_t out_stride) {
  using matrix = quant::interleaved_matrix<Format>;
  const index_t nb = w.blocks_per_row();
  for (index_t b = 0; b < nb; ++b) {
    const std::byte* gb = w.group_block(g, b);
    [[maybe_unused]] const auto* quants = reinterpret_cast<const std::uint8_t*>(gb + matrix::scale_bytes);
    for (index_t r = 0; r < matrix::rows_per_group; ++r) {
      fp16 d;
      std::memcpy(&d, gb + r * sizeof(fp16), sizeof d);
      [[maybe_unused]] const float scale = fp16_to_float(d);
      float* o = out + r * out_stride + b * qk;
#if defined(CTFORMER_CPU_AVX2)
      // Row r's 32 quants as signed bytes in element order.
      __m128i first, second;
      if constexpr (std::is_same_v<Format, quant::q4_0>) {
        // Row r's 4 bytes of each chunk: low nibbles are quants 8c..8c+3, high
        // nibbles 8c+4..8c+7; interleaving the two restores element order.
        const __m128i bytes = _mm_setr_epi32(load_i32(quants + 4 * r), load_i32(quants + 32 + 4 * r),
                                             load_i32(quants + 64 + 4 * r), load_i32(quants + 96 + 4 * r));
        const __m128i mask = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
        const __m128i low = _mm_sub_epi8(_mm_and_si128(bytes, mask), eight);
        const __m128i high = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), eight);
        first = _mm_unpacklo_epi32(low, high);
        second = _mm_unpackhi_epi32(low, high);
      } else {
        first = _mm_setr_epi32(load_i32(quants + 4 * r), load_i32(quants + 32 + 4 * r), load_i32(quants + 64 + 4 * r),
                               load_i32(quants + 96 + 4 * r));
        second = _mm_setr_epi32(load_i32(quants + 128 + 4 * r), load_i32(quants + 160 + 4 * r),
                                load_i32(quants + 192 + 4 * r), load_i32(quants + 224 + 4 * r));
      }
      const __m256 s = _mm256_set1_ps(scale);
      _mm256_storeu_ps(o, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(first))));
      _mm256_storeu_ps(o + 8, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(first, 8)))));
      _mm256_storeu_ps(o + 16, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(second))));
      _mm256_storeu_ps(o + 24, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(second, 8)))));
#else
      const auto blk = w.block(g * matrix::rows_per_group + r, b);
      Format::dequantize_row(reinterpret_cast<const std::byte*>(&blk), o, qk);
#endif
    }
  }
}

/// Whether this build's interleaved kernels multiply with VNNI's vpdpbusd.
inline constexpr bool interleaved_vnni =
#if defined(CTFORMER_CPU_AVX512_VNNI)
    true;
#else
    false;
#endif

/// Per-thread activations of the GEMM's token rows (grown, never shrunk).
inline std::vector<q8_activations>& token_activation_scratch() {
  thread_local std::vector<q8_activations> scratch;
  return scratch;
}

}  // namespace detail

/// Whether q8_0 weights are better kept interleaved by 8 rows than row-major
/// in this build, behind ops::interleave_q8_0. Prefill is what decides: a
/// row-major q8_0 matrix is dequantized to fp32 for the fp32 GEMM, an
/// interleaved one runs the int8 GEMM above, which does 32 multiply-adds per
/// vpdpbusd (VNNI) or per sign-trick step of four instructions (AVX2: sign,
/// maddubs, madd, add), against 8 per fp32 FMA; its GEMV is as fast as the
/// row-major one. AVX-512 builds without VNNI keep row-major q8_0: their
/// 16-wide fp32 GEMM against the 8-row AVX2 int8 kernel is unmeasured.
constexpr bool interleave_q8_0_impl(const par_t*) {
  return detail::interleaved_vnni || (isa::avx2 && !isa::avx512);
}

/// out = the fp32 values of w. out: (rows, cols), rows contiguous.
template <class Format>
void dequantize_rows_impl(const par_t& exec, const quant::interleaved_matrix<Format>& w, tensor_view<float, 2> out) {
  constexpr index_t group_rows = quant::interleaved_matrix<Format>::rows_per_group;
  const index_t groups = w.groups();
  const index_t row_stride = out.stride(0);
  detail::for_row_ranges(exec, groups, w.bytes(), [&](index_t begin, index_t end) {
    for (index_t g = begin; g < end; ++g) detail::dequantize_group(w, g, &out(g * group_rows, 0), row_stride);
  });
  for (index_t r = groups * group_rows; r < w.rows(); ++r) Format::dequantize_row(w.tail_row(r), &out(r, 0), w.cols());
}

/// y = W x: x is quantized to int8 blocks of 32 once, then each group of 8
/// rows is one integer kernel call; groups split over threads.
/// w: (out, in), x: (in), y: (out).
template <class Format>
void quantized_gemv_impl(const par_t& exec, const quant::interleaved_matrix<Format>& w, tensor_view<const float, 1> x,
                         tensor_view<float, 1> y) {
  constexpr index_t group_rows = quant::interleaved_matrix<Format>::rows_per_group;
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
/// blocks once, then each group's quants are loaded and unpacked once per 4
/// tokens and dotted with all four: an int8 GEMM, where one maddubs does 32
/// multiply-adds and an fp32 FMA 8. Each token's row of y equals
/// quantized_gemv of that token, bit for bit. Threads take tiles of groups;
/// a tile (about 48 KiB of weights) stays in L2 while every token passes over it.
/// w: (out, in), x: (T, in) rows contiguous, y: (T, out).
template <class Format>
void quantized_gemm_impl(const par_t& exec, const quant::interleaved_matrix<Format>& w, tensor_view<const float, 2> x,
                         tensor_view<float, 2> y) {
  using matrix = quant::interleaved_matrix<Format>;
  constexpr index_t group_rows = matrix::rows_per_group;
  const index_t tokens = x.extent(0);
  if (tokens == 1) {
    quantized_gemv_impl(exec, w, x[0], y[0]);
    return;
  }
  std::vector<detail::q8_activations>& acts = detail::token_activation_scratch();
  if (index_t(acts.size()) < tokens) acts.resize(std::size_t(tokens));
  const index_t threads = exec.thread_count();
  detail::parallel_for(exec, std::min(threads, tokens), [&](index_t part) {
    const index_t parts = std::min(threads, tokens);
    for (index_t t = tokens * part / parts; t < tokens * (part + 1) / parts; ++t)
      detail::quantize_activations(&x(t, 0), w.cols(), acts[std::size_t(t)]);
  });
  // Tiles of about 48 KiB of weights (at least 8 per thread), handed out
  // first come, first served: with a static split, a thread slowed by
  // anything else on the machine would leave the other waiting at the end of
  // every GEMM. Tiles are whole pairs of groups where the kernel takes two at
  // once, so that no tile ends in a group run alone.
  const index_t groups = w.groups();
  constexpr index_t unit = detail::interleaved_vnni ? 2 : 1;
  const index_t units = (groups + unit - 1) / unit;
  const index_t group_bytes = w.blocks_per_row() * index_t(matrix::group_block_bytes);
  const index_t tiles =
      std::min(units, std::max<index_t>(8 * threads, groups * group_bytes / (index_t(48) << 10)));
  auto run_tile = [&](index_t tile) {
    const index_t g0 = std::min(groups, unit * (units * tile / tiles));
    const index_t g1 = std::min(groups, unit * (units * (tile + 1) / tiles));
    for (index_t t0 = 0; t0 < tokens; t0 += detail::interleaved_gemm_tokens) {
      const int n = int(std::min(detail::interleaved_gemm_tokens, tokens - t0));
      const detail::q8_activations* a[detail::interleaved_gemm_tokens];
      for (int t = 0; t < n; ++t) a[t] = &acts[std::size_t(t0 + t)];
      index_t g = g0;
#if defined(CTFORMER_CPU_AVX512_VNNI)
      if (n == detail::interleaved_gemm_tokens) {
        for (; g + 2 <= g1; g += 2) {
          float out[detail::interleaved_gemm_tokens][2 * group_rows];
          detail::group_pair_dot_tokens(w, g, a, out);
          for (int t = 0; t < n; ++t) std::copy(out[t], out[t] + 2 * group_rows, &y(t0 + t, g * group_rows));
        }
      }
#endif
      for (; g < g1; ++g) {
        float out[detail::interleaved_gemm_tokens][group_rows];
        detail::group_dot_tokens(w, g, a, n, out);
        for (int t = 0; t < n; ++t) std::copy(out[t], out[t] + group_rows, &y(t0 + t, g * group_rows));
      }
    }
  };
  detail::parallel_for_shared(exec, tiles, threads, run_tile);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t r = w.groups() * group_rows; r < w.rows(); ++r)
      y(t, r) = detail::interleaved_row_dot(w, r, acts[std::size_t(t)]);
}

}  // namespace ctformer::cpu
