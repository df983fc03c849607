// Row primitives shared by the attention kernels (training and cached): dot
// products of one query with 1 or 8 key rows, and value rows summed into an
// accumulator, for fp32, bf16 and int8 rows widened to fp32.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ctformer/core/number_types.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/kernels/cpu/detail/vector_math.hpp"

namespace ctformer::cpu::detail {

// The rows' vector: 8 floats on AVX2 (also on AVX-512 targets: the element
// widening below is written for 256-bit registers), one float elsewhere.
#if defined(CTFORMER_CPU_AVX2)
using kv_vec = f32x8;
#else
using kv_vec = f32x1;
#endif

template <class E>
inline float to_float(E x) {
  if constexpr (std::is_same_v<E, float>) return x;
  else return float(x);
}

/// kv_vec::width elements of a cache row, widened to float.
template <class E>
inline kv_vec load_kv(const E* p) {
#if defined(CTFORMER_CPU_AVX2)
  if constexpr (std::is_same_v<E, float>) {
    return {_mm256_loadu_ps(p)};
  } else if constexpr (std::is_same_v<E, bf16>) {
    // bf16 is the high half of a float: widen the 16 bits and shift them up.
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  } else {
    const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_cvtepi32_ps(w)};
  }
#else
  return kv_vec::splat(to_float(*p));
#endif
}

/// sum_i q[i] * row[i] over d elements.
template <class E>
inline float dot_kv(const float* q, const E* row, index_t d) {
  constexpr index_t w = kv_vec::width;
  kv_vec acc0 = kv_vec::splat(0.0f), acc1 = kv_vec::splat(0.0f);
  index_t i = 0;
  for (; i + 2 * w <= d; i += 2 * w) {
    acc0 = fma(kv_vec::load(q + i), load_kv(row + i), acc0);
    acc1 = fma(kv_vec::load(q + i + w), load_kv(row + i + w), acc1);
  }
  for (; i + w <= d; i += w) acc0 = fma(kv_vec::load(q + i), load_kv(row + i), acc0);
  float total = reduce_add(acc0 + acc1);
  for (; i < d; ++i) total += q[i] * to_float(row[i]);
  return total;
}

/// acc[i] += alpha * row[i] over d elements.
template <class E>
inline void axpy_kv(float alpha, const E* row, float* acc, index_t d) {
  constexpr index_t w = kv_vec::width;
  const kv_vec a = kv_vec::splat(alpha);
  index_t i = 0;
  for (; i + w <= d; i += w) fma(a, load_kv(row + i), kv_vec::load(acc + i)).store(acc + i);
  for (; i < d; ++i) acc[i] += alpha * to_float(row[i]);
}

#if defined(CTFORMER_CPU_AVX2)
/// out[r] = the sum of acc[r]'s 8 lanes, r < 8, in one transposing
/// reduction. hadd adds pairs within 128-bit lanes: after two rounds the low
/// lane holds sums 0-3 (s0123) or 4-7 (s4567) over lanes 0-3, the high lane
/// over lanes 4-7; adding the two halves finishes. Every r is summed in the
/// same order.
inline void store_lane_sums_8(const __m256 (&acc)[8], float* out) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                      _mm256_permute2f128_ps(s0123, s4567, 0x31)));
}
#endif

/// Scores of 8 keys at once: out[r] = q . rows[r] over d elements. One
/// accumulator per key and a single transposing reduction of the eight, rather
/// than a horizontal sum per key.
template <class E>
inline void dot_kv_8(const float* q, const E* const* rows, index_t d, float* out) {
#if defined(CTFORMER_CPU_AVX2)
  if (d % 8 == 0) {
    __m256 acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
    for (index_t i = 0; i < d; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qv, load_kv(rows[r] + i).v, acc[r]);
    }
    store_lane_sums_8(acc, out);
    return;
  }
#endif
  for (int r = 0; r < 8; ++r) out[r] = dot_kv(q, rows[r], d);
}

#if defined(CTFORMER_CPU_AVX2)
/// acc[0, 8 V) += sum_j p[j] * rows[j][offset, offset + 8 V), acc in V registers.
template <int V, class E>
inline void accumulate_chunk(const float* p, const E* const* rows, index_t count, index_t offset, float* acc) {
  __m256 a[V];
  for (int v = 0; v < V; ++v) a[v] = _mm256_loadu_ps(acc + 8 * v);
  for (index_t j = 0; j < count; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    for (int v = 0; v < V; ++v) a[v] = _mm256_fmadd_ps(pj, load_kv(rows[j] + offset + 8 * v).v, a[v]);
  }
  for (int v = 0; v < V; ++v) _mm256_storeu_ps(acc + 8 * v, a[v]);
}
#endif

/// acc[0, d) += sum_j p[j] * rows[j][0, d) over `count` rows, j in order (the
/// same fused multiply-adds as axpy_kv row by row). With AVX2 each stretch
/// of up to 64 elements of acc stays in registers across all the rows.
template <class E>
inline void accumulate_rows(const float* p, const E* const* rows, index_t count, index_t d, float* acc) {
#if defined(CTFORMER_CPU_AVX2)
  index_t c = 0;
  for (; c + 64 <= d; c += 64) accumulate_chunk<8>(p, rows, count, c, acc + c);
  switch ((d - c) / 8) {  // the last whole vectors: a register count, not a type dispatch
    case 7: accumulate_chunk<7>(p, rows, count, c, acc + c); break;
    case 6: accumulate_chunk<6>(p, rows, count, c, acc + c); break;
    case 5: accumulate_chunk<5>(p, rows, count, c, acc + c); break;
    case 4: accumulate_chunk<4>(p, rows, count, c, acc + c); break;
    case 3: accumulate_chunk<3>(p, rows, count, c, acc + c); break;
    case 2: accumulate_chunk<2>(p, rows, count, c, acc + c); break;
    case 1: accumulate_chunk<1>(p, rows, count, c, acc + c); break;
    default: break;
  }
  c += (d - c) / 8 * 8;
  if (c < d)
    for (index_t j = 0; j < count; ++j) axpy_kv(p[j], rows[j] + c, acc + c, d - c);
#else
  for (index_t j = 0; j < count; ++j) axpy_kv(p[j], rows[j], acc, d);
#endif
}

/// Asks for the cache lines of [p, p + bytes) ahead of use (a hint: never faults).
inline void prefetch_bytes(const void* p, index_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (index_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(c + offset, 0, 3);
#else
  (void)p, (void)bytes;
#endif
}

}  // namespace ctformer::cpu::detail
