// CPU kernels for packed weights: row quantize / dequantize over threads, the
// fused dequantise-and-dot GEMV used at decode (q8_0, q4_0, int8_rowwise: the
// activation is quantized to int8 blocks once per call and the dots are integer;
// bf16, fp32: widening FMA), and a tiled GEMM for prefill.
//
// Instruction sets are chosen at compile time by kernels/cpu/isa.hpp: the
// user's -march picks the path, there is no cpuid dispatch. Each path has a portable fallback with the same results
// up to float summation order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ctformer/core/number_types.hpp"
#include "ctformer/kernels/cpu/isa.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"
#include "ctformer/quant/formats.hpp"
#include "ctformer/quant/packed_matrix.hpp"

namespace ctformer::cpu {

namespace detail {

using quant::qk;

inline float fp16_to_float(fp16 h) {
#if defined(CTFORMER_CPU_F16C)
  return _cvtsh_ss(h.bits);
#else
  return fp16::to_float(h.bits);
#endif
}

/// The activation vector quantized to int8 in blocks of 32 (as ggml's q8_0,
/// but with an fp32 scale): x[i] ~ d[b] * q[i], |x[i] - d[b] q[i]| <= d[b]/2,
/// d[b] = max|x in block b| / 127, and sum[b] the sum of block b's q. The columns past the last whole block stay
/// fp32 in `tail` (only int8_rowwise rows have such columns).
struct q8_activations {
  std::vector<float> d;
  std::vector<std::int32_t> sum;  // sum of q over each block (the q4_0 offset correction)
  std::vector<std::int8_t> q;
  std::vector<float> tail;
  index_t blocks = 0;
};

/// Scratch kept per thread so that steady-state calls allocate nothing: the
/// vectors only grow.
inline q8_activations& activation_scratch() {
  thread_local q8_activations scratch;
  return scratch;
}

#if defined(CTFORMER_CPU_AVX2)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

/// Quantizes n floats into `act` (n / 32 whole blocks + an fp32 tail).
inline void quantize_activations(const float* x, index_t n, q8_activations& act) {
  const index_t nb = n / qk;
  act.blocks = nb;
  act.d.resize(std::size_t(nb));
  act.sum.resize(std::size_t(nb));
  act.q.resize(std::size_t(nb * qk));
  act.tail.assign(x + nb * qk, x + n);
  for (index_t b = 0; b < nb; ++b) {
    const float* xb = x + b * qk;
    std::int8_t* qb = act.q.data() + b * qk;
#if defined(CTFORMER_CPU_AVX2)
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
           v3 = _mm256_loadu_ps(xb + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    act.d[std::size_t(b)] = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    // cvtps rounds to nearest even; |x * id| <= 127 so packs never saturates.
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id)),
            i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
    i0 = _mm256_packs_epi32(i0, i1);
    i2 = _mm256_packs_epi32(i2, i3);
    i0 = _mm256_packs_epi16(i0, i2);
    // packs work within 128-bit lanes: restore element order.
    i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), i0);
#else
    float amax = 0.0f;
    for (index_t i = 0; i < qk; ++i) amax = std::max(amax, std::fabs(xb[i]));
    act.d[std::size_t(b)] = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    for (index_t i = 0; i < qk; ++i) qb[i] = std::int8_t(std::nearbyint(xb[i] * id));
#endif
    std::int32_t sum = 0;
    for (index_t i = 0; i < qk; ++i) sum += qb[i];
    act.sum[std::size_t(b)] = sum;
  }
}

/// Bytes ahead of the GEMV's read position that are requested early. One
/// thread's GEMV is a single stream that does enough arithmetic per byte
/// that the hardware prefetcher alone leaves it waiting on DRAM; asking
/// 2 KiB ahead keeps enough lines in flight (docs/performance.md;
/// CTFORMER_GEMV_PREFETCH overrides it for other machines).
#if defined(CTFORMER_GEMV_PREFETCH)
inline constexpr std::ptrdiff_t gemv_prefetch_bytes = CTFORMER_GEMV_PREFETCH;
#else
inline constexpr std::ptrdiff_t gemv_prefetch_bytes = 2048;
#endif

/// Hints the line gemv_prefetch_bytes past p (never faults, also past the end).
inline void prefetch_weights(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(static_cast<const char*>(p) + gemv_prefetch_bytes, 0, 0);
#else
  (void)p;
#endif
}

// ---- integer dot products of one packed row with the q8 activations ---------
//
// Each returns sum_b scale_b * sum_{i in b} w_q[i] * x_q[i] for the row, where
// scale_b = d_w[b] * d_x[b] (q8_0, q4_0) or d_x[b] (int8_rowwise, whose row
// scale is applied by the caller).

#if defined(CTFORMER_CPU_AVX512_VNNI)
// 64 signed int8 pairs -> 16 int32 sums with vpdpbusd (u8 x s8): |w| against
// x with w's sign moved onto it, as AVX-512 has no vpsignb.
inline __m512i dot_s8_s8_512(__m512i w, __m512i x) {
  const __mmask64 negative = _mm512_movepi8_mask(w);
  const __m512i xs = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), xs);
}
inline __m512i join_256(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
inline __m512 join_scales(float lo, float hi) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(lo)), _mm256_set1_ps(hi), 1);
}
#endif

#if defined(CTFORMER_CPU_AVX2)
// 32 signed int8 pairs -> 8 int32 sums. maddubs wants u8 x s8, so |w| meets
// x * sign(w); |w| <= 127 and |x| <= 127 keep each int16 pair sum below 32767.
inline __m256i dot_s8_s8(__m256i w, __m256i x) {
  const __m256i uw = _mm256_sign_epi8(w, w);
  const __m256i sx = _mm256_sign_epi8(x, w);
#if defined(CTFORMER_CPU_AVX512_VNNI)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), uw, sx);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(uw, sx), _mm256_set1_epi16(1));
#endif
}
// 32 q4_0 quants q in [0, 15] as unsigned bytes, in element order (low nibbles first).
inline __m256i unpack_q4_0(const std::uint8_t* qs) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  // High nibbles shifted down into the upper half, then one mask for both.
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(0x0f));
}
// sum (q - 8) x over a q4_0 block as 8 int32 lanes: q is already unsigned, so
// maddubs / vpdpbusd take it as is (pair sums <= 2 * 15 * 127, no saturation),
// and subtracting sum(x) from each of the 8 lanes removes 8 * sum(x) in total.
inline __m256i dot_q4_x8(__m256i q, __m256i x, std::int32_t xsum) {
#if defined(CTFORMER_CPU_AVX512_VNNI)
  const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x);
#else
  const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
#endif
  return _mm256_sub_epi32(p, _mm256_set1_epi32(xsum));
}
#endif

inline float dot_row(const quant::block_q8_0* w, const q8_activations& a) {
  const index_t nb = a.blocks;
  const std::int8_t* xq = a.q.data();
  const float* xd = a.d.data();
  index_t b = 0;
  float total = 0.0f;
#if defined(CTFORMER_CPU_AVX512_VNNI)
  __m512 acc = _mm512_setzero_ps();
  for (; b + 2 <= nb; b += 2) {
    const __m512i wv = join_256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs)),
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b + 1].qs)));
    const __m512i xv = _mm512_loadu_si512(xq + b * qk);
    const __m512 s = join_scales(fp16_to_float(w[b].d) * xd[b], fp16_to_float(w[b + 1].d) * xd[b + 1]);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_s8_s8_512(wv, xv)), s, acc);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
#if defined(CTFORMER_CPU_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; b + 2 <= nb; b += 2) {
    prefetch_weights(w + b);
    const __m256i p0 = dot_s8_s8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs)),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * qk)));
    const __m256i p1 = dot_s8_s8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b + 1].qs)),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (b + 1) * qk)));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(fp16_to_float(w[b].d) * xd[b]), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(fp16_to_float(w[b + 1].d) * xd[b + 1]), acc1);
  }
  for (; b < nb; ++b) {
    const __m256i p = dot_s8_s8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs)),
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * qk)));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(fp16_to_float(w[b].d) * xd[b]), acc0);
  }
  total += hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; b < nb; ++b) {
    int s = 0;
    for (index_t i = 0; i < qk; ++i) s += int(w[b].qs[i]) * int(xq[b * qk + i]);
    total += fp16_to_float(w[b].d) * xd[b] * float(s);
  }
  return total;
}

inline float dot_row(const quant::block_q4_0* w, const q8_activations& a) {
  const index_t nb = a.blocks;
  const std::int8_t* xq = a.q.data();
  const float* xd = a.d.data();
  const std::int32_t* xs = a.sum.data();
  (void)xs;
  index_t b = 0;
  float total = 0.0f;
#if defined(CTFORMER_CPU_AVX512_VNNI)
  __m512 acc = _mm512_setzero_ps();
  for (; b + 2 <= nb; b += 2) {
    const __m512i qv = join_256(unpack_q4_0(w[b].qs), unpack_q4_0(w[b + 1].qs));
    const __m512i xv = _mm512_loadu_si512(xq + b * qk);
    const __m512i offset = join_256(_mm256_set1_epi32(xs[b]), _mm256_set1_epi32(xs[b + 1]));
    const __m512i p = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), qv, xv), offset);
    const __m512 s = join_scales(fp16_to_float(w[b].d) * xd[b], fp16_to_float(w[b + 1].d) * xd[b + 1]);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
#if defined(CTFORMER_CPU_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; b + 2 <= nb; b += 2) {
    prefetch_weights(w + b);
    const __m256i p0 =
        dot_q4_x8(unpack_q4_0(w[b].qs), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * qk)), xs[b]);
    const __m256i p1 = dot_q4_x8(unpack_q4_0(w[b + 1].qs),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (b + 1) * qk)), xs[b + 1]);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(fp16_to_float(w[b].d) * xd[b]), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(fp16_to_float(w[b + 1].d) * xd[b + 1]), acc1);
  }
  for (; b < nb; ++b) {
    const __m256i p =
        dot_q4_x8(unpack_q4_0(w[b].qs), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * qk)), xs[b]);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(fp16_to_float(w[b].d) * xd[b]), acc0);
  }
  total += hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; b < nb; ++b) {
    int s = 0;
    for (index_t j = 0; j < qk / 2; ++j) {
      s += (int(w[b].qs[j] & 0x0f) - 8) * int(xq[b * qk + j]);
      s += (int(w[b].qs[j] >> 4) - 8) * int(xq[b * qk + j + qk / 2]);
    }
    total += fp16_to_float(w[b].d) * xd[b] * float(s);
  }
  return total;
}

#if defined(CTFORMER_CPU_AVX2) && !defined(CTFORMER_CPU_AVX512_VNNI)
/// One block's integer dot with the activation block x (sum xsum): 8 int32 lanes.
inline __m256i block_dot(const quant::block_q4_0& w, __m256i x, std::int32_t xsum) {
  return dot_q4_x8(unpack_q4_0(w.qs), x, xsum);
}

/// dot_row for two q4_0 rows at once: each activation block, its sum and scale
/// are loaded once for both rows, and the two rows' chains overlap. Per row
/// the same operations in the same order as dot_row, so the same bits.
inline void dot_two_rows(const quant::block_q4_0* w0, const quant::block_q4_0* w1, const q8_activations& a, float& out0, float& out1) {
  const index_t nb = a.blocks;
  const std::int8_t* xq = a.q.data();
  const float* xd = a.d.data();
  const std::int32_t* xs = a.sum.data();
  __m256 acc00 = _mm256_setzero_ps(), acc01 = _mm256_setzero_ps();  // row 0, even / odd blocks
  __m256 acc10 = _mm256_setzero_ps(), acc11 = _mm256_setzero_ps();  // row 1
  index_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    prefetch_weights(w0 + b);
    prefetch_weights(w1 + b);
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * qk));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (b + 1) * qk));
    const float d0 = xd[b], d1 = xd[b + 1];
    acc00 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w0[b], x0, xs[b])),
                            _mm256_set1_ps(fp16_to_float(w0[b].d) * d0), acc00);
    acc10 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w1[b], x0, xs[b])),
                            _mm256_set1_ps(fp16_to_float(w1[b].d) * d0), acc10);
    acc01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w0[b + 1], x1, xs[b + 1])),
                            _mm256_set1_ps(fp16_to_float(w0[b + 1].d) * d1), acc01);
    acc11 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w1[b + 1], x1, xs[b + 1])),
                            _mm256_set1_ps(fp16_to_float(w1[b + 1].d) * d1), acc11);
  }
  for (; b < nb; ++b) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * qk));
    acc00 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w0[b], x0, xs[b])),
                            _mm256_set1_ps(fp16_to_float(w0[b].d) * xd[b]), acc00);
    acc10 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w1[b], x0, xs[b])),
                            _mm256_set1_ps(fp16_to_float(w1[b].d) * xd[b]), acc10);
  }
  out0 = 0.0f + hsum(_mm256_add_ps(acc00, acc01));
  out1 = 0.0f + hsum(_mm256_add_ps(acc10, acc11));
}
#endif

/// int8_rowwise: sum_b d_x[b] * (w_q . x_q)_b + (w_q . x)_tail, without the row scale.
inline float dot_row_i8(const std::int8_t* w, const q8_activations& a) {
  const index_t nb = a.blocks;
  const std::int8_t* xq = a.q.data();
  const float* xd = a.d.data();
  index_t b = 0;
  float total = 0.0f;
#if defined(CTFORMER_CPU_AVX512_VNNI)
  __m512 acc = _mm512_setzero_ps();
  for (; b + 2 <= nb; b += 2) {
    const __m512i wv = _mm512_loadu_si512(w + b * qk);
    const __m512i xv = _mm512_loadu_si512(xq + b * qk);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_s8_s8_512(wv, xv)), join_scales(xd[b], xd[b + 1]), acc);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
#if defined(CTFORMER_CPU_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; b + 2 <= nb; b += 2) {
    prefetch_weights(w + b * qk);
    const __m256i p0 = dot_s8_s8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * qk)),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * qk)));
    const __m256i p1 = dot_s8_s8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (b + 1) * qk)),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (b + 1) * qk)));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(xd[b]), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(xd[b + 1]), acc1);
  }
  for (; b < nb; ++b) {
    const __m256i p = dot_s8_s8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * qk)),
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * qk)));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xd[b]), acc0);
  }
  total += hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; b < nb; ++b) {
    int s = 0;
    for (index_t i = 0; i < qk; ++i) s += int(w[b * qk + i]) * int(xq[b * qk + i]);
    total += xd[b] * float(s);
  }
  const std::int8_t* wt = w + nb * qk;
  for (std::size_t i = 0; i < a.tail.size(); ++i) total += float(wt[i]) * a.tail[i];
  return total;
}

/// bf16 row . fp32 x, fp32 accumulation (bf16 widens to fp32 exactly).
inline float dot_row_bf16(const bf16* w, const float* x, index_t n) {
  index_t i = 0;
  float total = 0.0f;
#if defined(CTFORMER_CPU_AVX512)
  __m512 acc512 = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i)));
    acc512 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)), _mm512_loadu_ps(x + i), acc512);
  }
  total = _mm512_reduce_add_ps(acc512);
#endif
#if defined(CTFORMER_CPU_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m256i w0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    const __m256i w1 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 8)));
    acc0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), _mm256_loadu_ps(x + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)), _mm256_loadu_ps(x + i + 8), acc1);
  }
  total += hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) total += float(w[i]) * x[i];
  return total;
}

/// fp32 row . fp32 x.
inline float dot_row_f32(const float* w, const float* x, index_t n) {
  index_t i = 0;
  float total = 0.0f;
#if defined(CTFORMER_CPU_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
  total = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
#else
#pragma omp simd reduction(+ : total)
  for (index_t j = 0; j < n - n % 8; ++j) total += w[j] * x[j];
  i = n - n % 8;
#endif
  for (; i < n; ++i) total += w[i] * x[i];
  return total;
}

/// One packed row to fp32: the format's scalar dequantize_row, vectorized
/// for q8_0 and q4_0 (the GEMM dequantizes a tile per call, and the scalar
/// loop would cost a third of its time). Same values as the scalar code.
/// row: Format::row_bytes(cols) bytes -> out: (cols).
template <class Format>
void dequantize_row_fast(const std::byte* row, float* out, index_t cols) {
#if defined(CTFORMER_CPU_AVX2)
  if constexpr (std::is_same_v<Format, quant::q8_0> || std::is_same_v<Format, quant::q4_0>) {
    const auto* blocks = reinterpret_cast<const typename Format::block_type*>(row);
    for (index_t b = 0; b < cols / qk; ++b) {
      __m256i q;
      if constexpr (std::is_same_v<Format, quant::q8_0>) {
        q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks[b].qs));
      } else {
        q = _mm256_sub_epi8(unpack_q4_0(blocks[b].qs), _mm256_set1_epi8(8));
      }
      const __m256 d = _mm256_set1_ps(fp16_to_float(blocks[b].d));
      const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
      float* o = out + b * qk;
      _mm256_storeu_ps(o, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))));
      _mm256_storeu_ps(o + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)))));
      _mm256_storeu_ps(o + 16, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))));
      _mm256_storeu_ps(o + 24, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))));
    }
    return;
  }
#endif
  Format::dequantize_row(row, out, cols);
}

/// Splits [0, rows) into contiguous ranges (so each thread streams its own
/// slices of the weights) and calls body(begin, end) for each. The ranges
/// are handed out first come, first served, sixteen per thread: two threads
/// rarely stream DRAM at the same speed (a shared core, a noisy neighbour),
/// and a fixed half each would leave the faster one waiting at the barrier.
/// Sixteen rather than a few, so that the range a thread is still finishing
/// when the others run out is a small share of the matrix.
/// Matrices under 64 KiB stay on the calling thread: waking the pool costs more.
template <class Body>
void for_row_ranges(const par_t& exec, index_t rows, std::size_t bytes, Body&& body) {
  const index_t threads = bytes < (std::size_t(64) << 10) ? 1 : std::min<index_t>(exec.thread_count(), rows);
  if (threads <= 1) {
    body(index_t(0), rows);
    return;
  }
  const index_t ranges = std::min<index_t>(rows, 16 * threads);
  parallel_for_shared(exec, ranges, threads, [&](index_t i) { body(rows * i / ranges, rows * (i + 1) / ranges); });
}

/// A contiguous copy of x when it is strided (kernels read x with unit stride).
inline const float* contiguous(tensor_view<const float, 1> x, std::vector<float>& copy) {
  if (x.stride(0) == 1) return x.data();
  copy.resize(std::size_t(x.extent(0)));
  for (index_t i = 0; i < x.extent(0); ++i) copy[std::size_t(i)] = x(i);
  return copy.data();
}

inline std::vector<float>& strided_x_scratch() {
  thread_local std::vector<float> s;
  return s;
}

/// y[r] = (W x)[r] for r in [begin, end); xf is x (contiguous), act its q8 form.
template <class Format>
void gemv_rows(const quant::packed_matrix<Format>& w, const float* xf, const q8_activations& act,
               tensor_view<float, 1> y, index_t begin, index_t end) {
  const index_t cols = w.cols();
  index_t r = begin;
#if defined(CTFORMER_CPU_AVX2) && !defined(CTFORMER_CPU_AVX512_VNNI)
  // q4_0 only: its GEMV is compute-bound (nibble unpacking), so sharing the
  // activation loads between two rows pays. q8_0 is nearer its memory bound,
  // where two interleaved row streams slow a DRAM-resident matrix down, so it
  // stays one row at a time.
  if constexpr (std::is_same_v<Format, quant::q4_0>) {
    using block = typename Format::block_type;
    for (; r + 2 <= end; r += 2) {
      float v0, v1;
      dot_two_rows(reinterpret_cast<const block*>(w.row(r)), reinterpret_cast<const block*>(w.row(r + 1)), act, v0,
                   v1);
      y(r) = v0;
      y(r + 1) = v1;
    }
  }
#endif
  for (; r < end; ++r) {
    const std::byte* row = w.row(r);
    float v;
    if constexpr (std::is_same_v<Format, quant::q8_0> || std::is_same_v<Format, quant::q4_0>) {
      v = dot_row(reinterpret_cast<const typename Format::block_type*>(row), act);
    } else if constexpr (std::is_same_v<Format, quant::int8_rowwise>) {
      v = quant::int8_rowwise::row_scale(row) * dot_row_i8(quant::int8_rowwise::row_quants(row), act);
    } else if constexpr (std::is_same_v<Format, quant::bf16_weights>) {
      v = dot_row_bf16(reinterpret_cast<const bf16*>(row), xf, cols);
    } else if constexpr (std::is_same_v<Format, quant::fp32>) {
      v = dot_row_f32(reinterpret_cast<const float*>(row), xf, cols);
    } else {
      static_assert(dependent_false<Format>, "ctformer: quantized_gemv has no CPU kernel for this weight format");
    }
    y(r) = v;
  }
}

template <class Format>
inline constexpr bool uses_q8_activations =
    std::is_same_v<Format, quant::q8_0> || std::is_same_v<Format, quant::q4_0> ||
    std::is_same_v<Format, quant::int8_rowwise>;

// ---- GEMM micro-kernel: TT tokens x RR weight rows, fp32 FMA ----------------

/// out[t][r] = x_t . w_r over k columns for TT token rows and RR weight rows:
/// each loaded weight vector is used TT times and each x vector RR times.
/// AVX2 4 x 3 keeps 12 accumulators + 3 weights + 1 x in the 16 ymm registers.
template <int TT, int RR>
inline void micro_dot(const float* const* x, const float* const* w, index_t k, float (&out)[4][3]) {
  index_t p = 0;
#if defined(CTFORMER_CPU_AVX2)
  __m256 acc[TT][RR];
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < RR; ++r) acc[t][r] = _mm256_setzero_ps();
  for (; p + 8 <= k; p += 8) {
    __m256 wv[RR];
    for (int r = 0; r < RR; ++r) wv[r] = _mm256_loadu_ps(w[r] + p);
    for (int t = 0; t < TT; ++t) {
      const __m256 xv = _mm256_loadu_ps(x[t] + p);
      for (int r = 0; r < RR; ++r) acc[t][r] = _mm256_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < RR; ++r) out[t][r] = hsum(acc[t][r]);
#else
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < RR; ++r) out[t][r] = 0.0f;
#endif
  for (; p < k; ++p)
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < RR; ++r) out[t][r] += x[t][p] * w[r][p];
}

template <int TT>
inline void micro_dot_rows(int rr, const float* const* x, const float* const* w, index_t k, float (&out)[4][3]) {
  if (rr == 3) micro_dot<TT, 3>(x, w, k, out);
  else if (rr == 2) micro_dot<TT, 2>(x, w, k, out);
  else micro_dot<TT, 1>(x, w, k, out);
}

/// Weight rows dequantized per tile for the GEMM (48 rows x 768 columns = 144 KiB:
/// inside a 512 KiB L2 with room for the token rows).
inline constexpr index_t gemm_row_tile = 48;

inline std::vector<float>& gemm_tile_scratch() {
  thread_local std::vector<float> s;
  return s;
}

}  // namespace detail

/// Quantizes every row of w into out (same shape), rows split over threads.
/// w: (rows, cols) fp32, rows contiguous.
template <class Format>
void quantize_rows_impl(const par_t& exec, tensor_view<const float, 2> w, quant::packed_matrix<Format>& out) {
  detail::for_row_ranges(exec, w.extent(0), out.bytes(), [&](index_t begin, index_t end) {
    for (index_t r = begin; r < end; ++r) Format::quantize_row(&w(r, 0), out.row(r), w.extent(1));
  });
}

/// out = the fp32 values of w. out: (rows, cols), rows contiguous.
template <class Format>
void dequantize_rows_impl(const par_t& exec, const quant::packed_matrix<Format>& w, tensor_view<float, 2> out) {
  detail::for_row_ranges(exec, w.rows(), w.bytes(), [&](index_t begin, index_t end) {
    for (index_t r = begin; r < end; ++r) detail::dequantize_row_fast<Format>(w.row(r), &out(r, 0), w.cols());
  });
}

/// y = W x with W still packed. For q8_0, q4_0 and int8_rowwise, x is first
/// quantized to int8 blocks of 32 (once per call, on the calling thread) and
/// every row is an integer dot product; bf16 and fp32 rows widen to fp32 FMA.
/// w: (out, in), x: (in), y: (out).
template <class Format>
void quantized_gemv_impl(const par_t& exec, const quant::packed_matrix<Format>& w, tensor_view<const float, 1> x,
                         tensor_view<float, 1> y) {
  const float* xf = detail::contiguous(x, detail::strided_x_scratch());
  detail::q8_activations& act = detail::activation_scratch();
  if constexpr (detail::uses_q8_activations<Format>) detail::quantize_activations(xf, w.cols(), act);
  detail::for_row_ranges(exec, w.rows(), w.bytes(), [&](index_t begin, index_t end) {
    detail::gemv_rows(w, xf, act, y, begin, end);
  });
}

/// y = x W^T for T tokens at once (prefill). Tiles of gemm_row_tile weight rows
/// are dequantized to fp32 into per-thread scratch, then every token is dotted
/// against the tile with a 4-token x 3-row FMA micro-kernel, so each weight
/// byte is read from memory once per call rather than once per token.
///
/// Where a real int8 GEMM would go: for q8_0 / q4_0 / int8_rowwise, quantize
/// the T token rows to q8 blocks once (as the GEMV does for one) and replace
/// the fp32 micro-kernel by an integer one (vpmaddubsw on AVX2, vpdpbusd on
/// AVX512-VNNI, AMX-INT8 tiles where the CPU has them): 4x the multiply-adds per
/// instruction and no dequantization, at the price of the activation rounding
/// the GEMV already accepts.
/// w: (out, in), x: (T, in) rows contiguous, y: (T, out).
template <class Format>
void quantized_gemm_impl(const par_t& exec, const quant::packed_matrix<Format>& w, tensor_view<const float, 2> x,
                         tensor_view<float, 2> y) {
  const index_t tokens = x.extent(0), out = w.rows(), in = w.cols();
  if (tokens == 1) {
    quantized_gemv_impl(exec, w, x[0], y[0]);
    return;
  }
  const index_t tiles = (out + detail::gemm_row_tile - 1) / detail::gemm_row_tile;
  detail::parallel_for(exec, tiles, [&](index_t tile) {
    const index_t r0 = tile * detail::gemm_row_tile;
    const index_t rows = std::min(detail::gemm_row_tile, out - r0);
    const float* wt;  // this tile's weights as fp32, row-major (rows, in)
    if constexpr (std::is_same_v<Format, quant::fp32>) {
      wt = reinterpret_cast<const float*>(w.row(r0));
    } else {
      std::vector<float>& scratch = detail::gemm_tile_scratch();
      scratch.resize(std::size_t(rows * in));
      for (index_t r = 0; r < rows; ++r) detail::dequantize_row_fast<Format>(w.row(r0 + r), scratch.data() + r * in, in);
      wt = scratch.data();
    }
    for (index_t t0 = 0; t0 < tokens; t0 += 4) {
      const int tt = int(std::min<index_t>(4, tokens - t0));
      const float* xr[4];
      for (int t = 0; t < tt; ++t) xr[t] = &x(t0 + t, 0);
      for (index_t r = 0; r < rows; r += 3) {
        const int rr = int(std::min<index_t>(3, rows - r));
        const float* wr[3];
        for (int i = 0; i < rr; ++i) wr[i] = wt + (r + i) * in;
        float acc[4][3];
        switch (tt) {  // tail sizes of the token loop, not a type dispatch
          case 4: detail::micro_dot_rows<4>(rr, xr, wr, in, acc); break;
          case 3: detail::micro_dot_rows<3>(rr, xr, wr, in, acc); break;
          case 2: detail::micro_dot_rows<2>(rr, xr, wr, in, acc); break;
          default: detail::micro_dot_rows<1>(rr, xr, wr, in, acc); break;
        }
        for (int t = 0; t < tt; ++t)
          for (int i = 0; i < rr; ++i) y(t0 + t, r0 + r + i) = acc[t][i];
      }
    }
  });
}

}  // namespace ctformer::cpu
