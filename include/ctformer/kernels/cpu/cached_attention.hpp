// CPU kernel for causal attention of new queries over a KV cache (prefill
// chunks and decode steps): online softmax over tiles of keys read straight
// from the cache's blocks in fp32, bf16 or int8, GQA-aware, no score matrix.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "ctformer/core/kv_view.hpp"
#include "ctformer/kernels/cpu/detail/attention_rows.hpp"
#include "ctformer/kernels/cpu/detail/vector_math.hpp"
#include "ctformer/kernels/cpu/detail/vnni.hpp"
#include "ctformer/kernels/cpu/isa.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {

/// Keys scored per tile: the tile's scores sit in the query's scratch, one
/// exp pass and one rescale of the accumulator per tile rather than per key.
inline constexpr index_t cached_attention_tile = 64;

/// Keys per part of a decode step's key range: the parts are scored on
/// separate threads and merged. Fixed positions (not a share of the thread
/// count) so that the result does not depend on how many threads ran.
inline constexpr index_t cached_attention_part = 256;

/// The most prefill queries taken together (attend_queries): they share
/// every tile of the cache while it is in L1/L2.
inline constexpr index_t cached_attention_query_block = 8;

#if defined(CTFORMER_CPU_AVX2)
/// bf16 rows read as pairs: 16 elements in one 32-byte load become the floats
/// of the even elements (0, 2, ..., 14: a shift) and of the odd ones (a mask),
/// two instructions per 16 elements where widening 8 at a time takes four.
/// Dot products use a query permuted the same way once per query (pair_permute);
/// value sums keep the accumulator permuted until the end of the key range
/// (pair_unpermute). Each value element still sums its positions in order
/// with one fused multiply-add each, so only the scores' reduction order differs.
inline bool bf16_pairs(index_t d) { return d % 16 == 0; }

inline void load_bf16_pairs(const bf16* p, __m256& even, __m256& odd) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xFFFF0000u))));
}
inline void load_bf16_pairs(const bf16* p, f32x8& even, f32x8& odd) { load_bf16_pairs(p, even.v, odd.v); }

/// out[16 b + i] = in[16 b + 2 i], out[16 b + 8 + i] = in[16 b + 2 i + 1] (i < 8), d % 16 == 0.
inline void pair_permute(const float* in, float* out, index_t d) {
  for (index_t b = 0; b < d; b += 16)
    for (index_t i = 0; i < 8; ++i) {
      out[b + i] = in[b + 2 * i];
      out[b + 8 + i] = in[b + 2 * i + 1];
    }
}
/// The inverse of pair_permute (Block 16), in place; with Block 32, of the
/// same permutation in blocks of 32 (the AVX-512 value sums).
template <index_t Block = 16>
inline void pair_unpermute(float* x, index_t d) {
  float block[Block];
  for (index_t b = 0; b < d; b += Block) {
    std::copy(x + b, x + b + Block, block);
    for (index_t i = 0; i < Block / 2; ++i) {
      x[b + 2 * i] = block[i];
      x[b + 2 * i + 1] = block[Block / 2 + i];
    }
  }
}

/// Scores of 8 bf16 keys: out[r] = q . rows[r], q permuted by pair_permute.
inline void dot_bf16_pairs_8(const float* q, const bf16* const* rows, index_t d, float* out) {
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  for (index_t i = 0; i < d; i += 16) {
    const __m256 q_even = _mm256_loadu_ps(q + i), q_odd = _mm256_loadu_ps(q + i + 8);
    for (int r = 0; r < 8; ++r) {
      __m256 even, odd;
      load_bf16_pairs(rows[r] + i, even, odd);
      acc[r] = _mm256_fmadd_ps(q_odd, odd, _mm256_fmadd_ps(q_even, even, acc[r]));
    }
  }
  store_lane_sums_8(acc, out);
}

/// acc[0, 2 w B) += sum_j p[j] rows[j][offset, offset + 2 w B) for vectors V
/// of w floats: the accumulator permuted in blocks of 2 w (even elements,
/// then odd), held in 2 B registers.
template <class V, int B>
inline void accumulate_bf16_pairs(const float* p, const bf16* const* rows, index_t count, index_t offset, float* acc) {
  constexpr int w = V::width;
  V a[2 * B];
  for (int v = 0; v < 2 * B; ++v) a[v] = V::load(acc + w * v);
  for (index_t j = 0; j < count; ++j) {
    const V pj = V::splat(p[j]);
    for (int b = 0; b < B; ++b) {
      V even, odd;
      load_bf16_pairs(rows[j] + offset + 2 * w * b, even, odd);
      a[2 * b] = fma(pj, even, a[2 * b]);
      a[2 * b + 1] = fma(pj, odd, a[2 * b + 1]);
    }
  }
  for (int v = 0; v < 2 * B; ++v) a[v].store(acc + w * v);
}

/// accumulate_rows for bf16 rows with an accumulator permuted in blocks of
/// 2 V::width, d a multiple of that.
template <class V>
inline void accumulate_bf16_rows(const float* p, const bf16* const* rows, index_t count, index_t d, float* acc) {
  constexpr index_t block = 2 * V::width;
  index_t c = 0;
  for (; c + 4 * block <= d; c += 4 * block) accumulate_bf16_pairs<V, 4>(p, rows, count, c, acc + c);
  switch ((d - c) / block) {
    case 3: accumulate_bf16_pairs<V, 3>(p, rows, count, c, acc + c); break;
    case 2: accumulate_bf16_pairs<V, 2>(p, rows, count, c, acc + c); break;
    case 1: accumulate_bf16_pairs<V, 1>(p, rows, count, c, acc + c); break;
    default: break;
  }
}
#endif

#if defined(CTFORMER_CPU_AVX512_BF16)
/// AVX512_BF16 builds read a bf16 cache natively. Scores: the query is
/// rounded to bf16 once (as llama.cpp rounds it to an F16 cache's type) and
/// vdpbf16ps multiplies it with 32 key elements per instruction, in fp32
/// (a product of two bf16 is exact in fp32), with no widening of the keys.
/// Values: pairs as above, 32 elements per 64-byte load, the accumulator
/// permuted in blocks of 32 (pair_unpermute<32>); each value element still
/// sums its positions in order with one fused multiply-add each.
inline bool bf16_native(index_t d) { return d % 32 == 0; }

inline void load_bf16_pairs(const bf16* p, f32x16& even, f32x16& odd) {
  const __m512i x = _mm512_loadu_si512(p);
  even.v = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd.v = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xFFFF0000u))));
}

/// Scores of 8 bf16 keys against a bf16 query: out[r] = q . rows[r], d % 32 == 0.
inline void dot_bf16_native_8(const bf16* q, const bf16* const* rows, index_t d, float* out) {
  __m512 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps();
  for (index_t i = 0; i < d; i += 32) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + i);
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], qv, (__m512bh)_mm512_loadu_si512(rows[r] + i));
  }
  // Each sum folded to 8 lanes, then the same reduction as the 8-wide kernels.
  __m256 h[8];
  for (int r = 0; r < 8; ++r)
    h[r] = _mm256_add_ps(_mm512_castps512_ps256(acc[r]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r]), 1)));
  store_lane_sums_8(h, out);
}

#endif

#if defined(CTFORMER_CPU_AVX512_VNNI)
/// AVX512_VNNI builds score an int8 cache with vpdpbusd. The query is
/// rounded to int8 once per head, with scale max|q| / 127 (llama.cpp
/// likewise rounds a query to its q8_0 K cache's type). vpdpbusd multiplies
/// unsigned by signed bytes, so the query is kept as |q| with q's signs put
/// on the key: one masked subtraction per 64 key bytes. The cache clamps its
/// values to [-127, 127], so the negation cannot overflow. One instruction
/// then does 64 multiply-adds, where widening to fp32 takes three
/// instructions per 8. The sums are exact integers, so a score does not
/// depend on the order of summation.
inline bool int8_native(index_t d) { return d % 64 == 0; }

/// Bytes of one head's rounded query: d magnitudes, d / 8 bytes of sign bits
/// (bit e of byte e / 8 set when element e is negative), the fp32 scale.
inline index_t int8_query_bytes(index_t d) { return d + d / 8 + index_t(sizeof(float)); }

/// Rounds one head's query q (d floats, d % 64 == 0) into `out`
/// (int8_query_bytes(d)): to nearest, ties to even.
inline void round_query_to_int8(const float* q, index_t d, std::uint8_t* out) {
  __m512 largest = _mm512_setzero_ps();
  for (index_t e = 0; e < d; e += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_loadu_ps(q + e)));
  const float amax = _mm512_reduce_max_ps(largest);
  const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  std::uint8_t* signs = out + d;
  for (index_t e = 0; e < d; e += 16) {
    // |q| * 127 / max|q| <= 127 (up to rounding of the product, which the
    // saturating conversion to bytes absorbs).
    const __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(q + e), inverse));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + e), _mm512_cvtusepi32_epi8(_mm512_abs_epi32(rounded)));
    const std::uint16_t negative = _mm512_movepi32_mask(rounded);
    std::memcpy(signs + e / 8, &negative, sizeof negative);
  }
  const float scale = amax / 127.0f;
  std::memcpy(signs + d / 8, &scale, sizeof scale);
}

/// accumulate_rows for int8 rows, 16 elements per instruction (the generic
/// kernel widens 8), d % 64 == 0: each element still sums its rows in order
/// with one fused multiply-add each, so the bits are the same.
inline void accumulate_int8_rows_16(const float* p, const std::int8_t* const* rows, index_t count, index_t d,
                                    float* acc) {
  for (index_t c = 0; c < d; c += 64) {
    __m512 a[4];
    for (int v = 0; v < 4; ++v) a[v] = _mm512_loadu_ps(acc + c + 16 * v);
    for (index_t j = 0; j < count; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      const std::int8_t* row = rows[j] + c;
      for (int v = 0; v < 4; ++v) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * v));
        a[v] = _mm512_fmadd_ps(pj, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), a[v]);
      }
    }
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(acc + c + 16 * v, a[v]);
  }
}

/// Scores of 8 int8 keys against a rounded query: out[r] = q . rows[r] in
/// the query's scale (the keys' scales are applied by the caller), d % 64 == 0.
inline void dot_int8_native_8(const std::uint8_t* query, const std::int8_t* const* rows, index_t d, float* out) {
  const std::uint8_t* signs = query + d;
  __m512i acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_si512();
  for (index_t i = 0; i < d; i += 64) {
    const __m512i magnitudes = _mm512_loadu_si512(query + i);
    std::uint64_t bits;
    std::memcpy(&bits, signs + i / 8, sizeof bits);
    const __mmask64 negative = _cvtu64_mask64(bits);
    for (int r = 0; r < 8; ++r) {
      const __m512i k = _mm512_loadu_si512(rows[r] + i);
      acc[r] = multiply_add_unsigned_signed(acc[r], magnitudes,
                                               _mm512_mask_sub_epi8(k, negative, _mm512_setzero_si512(), k));
    }
  }
  // Folded to 8 lanes and converted: each lane is an integer below 2^24 in
  // magnitude for d < 1040, so the float sums of store_lane_sums_8 are exact.
  __m256 h[8];
  for (int r = 0; r < 8; ++r)
    h[r] = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm512_castsi512_si256(acc[r]), _mm512_extracti64x4_epi64(acc[r], 1)));
  store_lane_sums_8(h, out);
  float scale;
  std::memcpy(&scale, signs + d / 8, sizeof scale);
  for (int r = 0; r < 8; ++r) out[r] *= scale;
}
#endif

/// Where a tile's positions live: the element offset of each position's
/// kv head 0 row and (int8) the index of its scale; and the tile cut into
/// segments, runs of positions inside one block ([segment_end[i - 1],
/// segment_end[i]), from 0, the last ending at the tile's end), which the
/// kernel reads head by head, in the order a block lays them out.
struct tile_slots {
  index_t slot[cached_attention_tile];
  index_t scale_slot[cached_attention_tile];
  index_t segment_end[cached_attention_tile];
};

/// Whether find_tile_slots cuts tiles at block edges, so that every segment
/// lies inside one block (and its positions' scales side by side): blocks of
/// a multiple of 8 positions cut a tile into whole groups of 8 keys (the
/// scoring kernel's width) but at its end; other block sizes would leave
/// partial groups, so their tiles stay one segment across several blocks.
template <class E>
bool segments_in_one_block(const kv_view<const E>& kv) {
  return kv.block_tokens % 8 == 0;
}

/// Fills `slots` for positions [p0, p0 + count) of kv.
template <class E>
void find_tile_slots(const kv_view<const E>& kv, index_t p0, index_t count, tile_slots& slots) {
  constexpr bool quantized = std::is_same_v<E, std::int8_t>;
  // A (block, offset) cursor walks the block table without a division per key.
  index_t block = p0 / kv.block_tokens, in_block = p0 % kv.block_tokens;
  const bool segmented = segments_in_one_block(kv);
  index_t segments = 0;
  for (index_t j = 0; j < count; ++j) {
    if (in_block == kv.block_tokens) {
      in_block = 0;
      ++block;
      if (segmented) slots.segment_end[segments++] = j;
    }
    const index_t physical = index_t(kv.block_table[block]);
    slots.slot[j] = physical * kv.block_stride + in_block * kv.token_stride;
    if constexpr (quantized) slots.scale_slot[j] = slots.slot[j] / kv.head_dim;
    ++in_block;
  }
  slots.segment_end[segments] = count;
}

/// One query's running softmax over heads [h0, h1): for each head i = h - h0,
/// max[i] is the largest scaled score so far, sum[i] the sum of exp(score -
/// max[i]) and acc[i * d ...] the matching exp-weighted sum of values (not
/// yet divided by sum[i]); scores (heads, tile) holds a tile's scores and
/// paired_q (heads, d) a bf16 cache's permuted query (AVX2) or its query
/// rounded to bf16 (AVX512_BF16, in the same floats' bytes).
struct query_state {
  const float* q;
  float* max;
  float* sum;
  float* acc;
  float* scores;
  float* paired_q;
};

/// Floats of scratch one query_state needs for `heads` heads of dimension d.
inline index_t query_state_floats(index_t heads, index_t d) { return heads * (2 * d + 2 + cached_attention_tile); }

/// A query_state over `scratch` (query_state_floats floats).
inline query_state make_query_state(const float* q, float* scratch, index_t heads, index_t d) {
  return {q, scratch, scratch + heads, scratch + 2 * heads, scratch + 2 * heads + heads * d,
          scratch + 2 * heads + heads * d + heads * cached_attention_tile};
}

/// Whether a cache of element E and head dimension d reads bf16 rows as pairs.
template <class E>
bool reads_pairs(index_t d) {
#if defined(CTFORMER_CPU_AVX512_BF16)
  return std::is_same_v<E, bf16> && bf16_native(d);
#elif defined(CTFORMER_CPU_AVX2)
  return std::is_same_v<E, bf16> && bf16_pairs(d);
#else
  (void)d;
  return false;
#endif
}

/// Whether a cache of element E and head dimension d is scored with the
/// query rounded to int8 (an int8 cache on AVX512_VNNI, d % 64 == 0).
template <class E>
bool rounds_query_to_int8(index_t d) {
#if defined(CTFORMER_CPU_AVX512_VNNI)
  return std::is_same_v<E, std::int8_t> && int8_native(d);
#else
  (void)d;
  return false;
#endif
}

/// Starts a query: no keys seen; a bf16 cache's query permuted once, an
/// int8 cache's rounded to int8 once.
template <class E>
void begin_query(query_state& st, index_t h0, index_t h1, index_t d) {
  const index_t heads = h1 - h0;
  for (index_t i = 0; i < heads; ++i) {
    st.max[i] = -std::numeric_limits<float>::infinity();
    st.sum[i] = 0.0f;
  }
  for (index_t i = 0; i < heads * d; ++i) st.acc[i] = 0.0f;
#if defined(CTFORMER_CPU_AVX512_VNNI)
  if (rounds_query_to_int8<E>(d))  // int8_query_bytes(d) <= 4 d: fits paired_q's d floats per head
    for (index_t i = 0; i < heads; ++i)
      round_query_to_int8(st.q + (h0 + i) * d, d,
                          reinterpret_cast<std::uint8_t*>(st.paired_q) + i * int8_query_bytes(d));
#endif
#if defined(CTFORMER_CPU_AVX512_BF16)
  if (reads_pairs<E>(d)) {
    bf16* rounded = reinterpret_cast<bf16*>(st.paired_q);
    for (index_t i = 0; i < heads * d; ++i) rounded[i] = bf16(st.q[h0 * d + i]);
  }
#elif defined(CTFORMER_CPU_AVX2)
  if (reads_pairs<E>(d))
    for (index_t i = 0; i < heads; ++i) pair_permute(st.q + (h0 + i) * d, st.paired_q + i * d, d);
#endif
}

/// Ends a query: a bf16 cache's accumulator back in element order.
template <class E>
void end_query(query_state& st, index_t heads, index_t d) {
#if defined(CTFORMER_CPU_AVX512_BF16)
  if (reads_pairs<E>(d))
    for (index_t i = 0; i < heads; ++i) pair_unpermute<32>(st.acc + i * d, d);
#elif defined(CTFORMER_CPU_AVX2)
  if (reads_pairs<E>(d))
    for (index_t i = 0; i < heads; ++i) pair_unpermute(st.acc + i * d, d);
#else
  (void)st, (void)heads, (void)d;
#endif
}

/// Turns head i's scores of a tile (count of them, in st.scores) into
/// probabilities relative to the running maximum, rescaling what the earlier
/// tiles summed when the maximum grows.
inline void tile_softmax(query_state& st, index_t i, index_t count, index_t d) {
  float* s = st.scores + i * cached_attention_tile;
  // Maximum and sum run across vector lanes: a scalar loop would be a
  // chain of 64 dependent adds per head and tile, about a tenth of the
  // kernel's time. The order is still fixed by the tile's positions.
  constexpr index_t w = kv_vec::width;
  kv_vec lanes_max = kv_vec::splat(-std::numeric_limits<float>::infinity());
  index_t j = 0;
  for (; j + w <= count; j += w) lanes_max = ctformer::cpu::detail::max(lanes_max, kv_vec::load(s + j));
  float tile_max = reduce_max(lanes_max);
  for (; j < count; ++j) tile_max = std::max(tile_max, s[j]);
  const float new_max = std::max(st.max[i], tile_max);
  if (new_max > st.max[i] && st.sum[i] > 0.0f) {
    const float correction = std::exp(st.max[i] - new_max);
    st.sum[i] *= correction;
    for (index_t e = 0; e < d; ++e) st.acc[i * d + e] *= correction;
  }
  st.max[i] = new_max;
  // Probabilities of the tile (relative to the running maximum), vectorised exp.
  const kv_vec m = kv_vec::splat(new_max);
  kv_vec lanes_sum = kv_vec::splat(0.0f);
  for (j = 0; j + w <= count; j += w) {
    const kv_vec p = vexp(kv_vec::load(s + j) - m);
    p.store(s + j);
    lanes_sum = lanes_sum + p;
  }
  float tile_sum = reduce_add(lanes_sum);
  for (; j < count; ++j) tile_sum += s[j] = exp_approx(s[j] - new_max);
  st.sum[i] += tile_sum;
}

/// Adds the first `count` positions of a tile (slots) to one query's running
/// softmax over heads [h0, h1) (head h reads kv head h / group).
///
/// Each segment of the tile (a run of positions in one block) is read head
/// by head, keys first and values after: the order in which a block lays out
/// its rows, so the cache streams front to back. Tiles are fixed runs of
/// logical positions whatever the block size, and neither a score (8 keys
/// at a time, each from its own lanes) nor a value sum (positions in order,
/// one fused multiply-add each) depends on how the tile is cut, so a paged
/// and a contiguous cache holding the same values give the same bits.
template <class E>
void attend_tile(query_state& st, index_t h0, index_t h1, index_t group, const kv_view<const E>& kv,
                 const tile_slots& slots, index_t count, float scale) {
  constexpr bool quantized = std::is_same_v<E, std::int8_t>;
  constexpr index_t tile = cached_attention_tile;
  const index_t d = kv.head_dim, heads = h1 - h0;
  const index_t scale_head_stride = kv.head_stride / d;
  const index_t* slot = slots.slot;
  const index_t* scale_slot = slots.scale_slot;
  float* scores = st.scores;
  const float* q = st.q;
#if defined(CTFORMER_CPU_AVX2)
  constexpr bool may_pair = std::is_same_v<E, bf16>;
  const bool paired = reads_pairs<E>(d);
#endif
#if defined(CTFORMER_CPU_AVX512_VNNI)
  const bool int8_query = rounds_query_to_int8<E>(d);
#endif
  // Scales are read as vectors only where a segment lies inside one block;
  // otherwise one by one. (Comparing a run's first and last scale index is
  // not enough: blocks out of order can add up to the same distance.)
  const bool scales_side_by_side = segments_in_one_block(kv);
  // Scores of head h for keys [key, key + 8) of a segment; rows past `valid`
  // repeat the segment's last key and their scores are dropped, so every
  // score comes from the same vector kernel.
  auto score_group = [&](index_t h, index_t key, index_t valid) {
    const index_t g = h / group;
    const E* rows[8];
    for (index_t r = 0; r < 8; ++r) rows[r] = kv.k + slot[key + std::min(r, valid - 1)] + g * kv.head_stride;
    float dots[8];
    // The query's form for this cache: bf16 pairs or bf16-rounded (bf16
    // caches), int8-rounded (int8 caches on VNNI), else fp32 as it is.
    bool scored = false;
#if defined(CTFORMER_CPU_AVX2)
    if constexpr (may_pair) {
      if (paired) {
#if defined(CTFORMER_CPU_AVX512_BF16)
        dot_bf16_native_8(reinterpret_cast<const bf16*>(st.paired_q) + (h - h0) * d, rows, d, dots);
#else
        dot_bf16_pairs_8(st.paired_q + (h - h0) * d, rows, d, dots);
#endif
        scored = true;
      }
    }
#endif
#if defined(CTFORMER_CPU_AVX512_VNNI)
    if constexpr (quantized) {
      if (int8_query) {
        dot_int8_native_8(reinterpret_cast<const std::uint8_t*>(st.paired_q) + (h - h0) * int8_query_bytes(d), rows,
                          d, dots);
        scored = true;
      }
    }
#endif
    if (!scored) dot_kv_8(q + h * d, rows, d, dots);
    float* out = scores + (h - h0) * tile + key;
#if defined(CTFORMER_CPU_AVX2)
    // Eight keys whose scales lie side by side (inside one block): the same
    // products, eight at a time.
    if (valid == 8 && (!quantized || scales_side_by_side)) {
      __m256 product = _mm256_mul_ps(_mm256_loadu_ps(dots), _mm256_set1_ps(scale));
      if constexpr (quantized)
        product = _mm256_mul_ps(product, _mm256_loadu_ps(kv.k_scale + scale_slot[key] + g * scale_head_stride));
      _mm256_storeu_ps(out, product);
      return;
    }
#endif
    for (index_t r = 0; r < valid; ++r) {
      float score = dots[r] * scale;
      if constexpr (quantized) score *= kv.k_scale[scale_slot[key + r] + g * scale_head_stride];
      out[r] = score;
    }
  };
  // slots may cover more positions than count (a prefill block's earlier
  // queries stop short of the tile's end): segments are cut at count.
  for (index_t s = 0, begin = 0; begin < count; begin = slots.segment_end[s++]) {
    const index_t end = std::min(slots.segment_end[s], count);
    for (index_t h = h0; h < h1; ++h)
      for (index_t key = begin; key < end; key += 8) {
        // fp32 keys (four cache lines a row at d = 64) are asked for two
        // groups ahead, since the hardware prefetcher cannot follow the block
        // table; bf16 and int8 rows are short enough that the hint costs more
        // than it saves (docs/performance.md, cached attention).
        if constexpr (std::is_same_v<E, float>)
          if (key + 16 < end) prefetch_bytes(kv.k + slot[key + 16] + (h / group) * kv.head_stride, 8 * d * index_t(sizeof(E)));
        score_group(h, key, std::min<index_t>(8, end - key));
      }
  }
  for (index_t i = 0; i < heads; ++i) tile_softmax(st, i, count, d);
  if constexpr (quantized)
    for (index_t s = 0, begin = 0; begin < count; begin = slots.segment_end[s++]) {
      const index_t end = std::min(slots.segment_end[s], count);
      for (index_t h = h0; h < h1; ++h) {
        float* p = scores + (h - h0) * tile;
        const index_t offset = (h / group) * scale_head_stride;
        if (scales_side_by_side) {
          const float* v_scale = kv.v_scale + scale_slot[begin] + offset - begin;
          for (index_t r = begin; r < end; ++r) p[r] *= v_scale[r];
        } else {
          for (index_t r = begin; r < end; ++r) p[r] *= kv.v_scale[scale_slot[r] + offset];
        }
      }
    }
  // Values, segment by segment and head by head, each head's accumulator in
  // registers across a segment.
  const E* rows[tile];
  for (index_t s = 0, begin = 0; begin < count; begin = slots.segment_end[s++]) {
    const index_t end = std::min(slots.segment_end[s], count);
    for (index_t h = h0; h < h1; ++h) {
      const index_t g = h / group;
      const float* p = scores + (h - h0) * tile + begin;
      for (index_t r = begin; r < end; ++r) rows[r - begin] = kv.v + slot[r] + g * kv.head_stride;
      float* acc = st.acc + (h - h0) * d;
#if defined(CTFORMER_CPU_AVX512_BF16)
      if constexpr (may_pair) {
        if (paired) {
          accumulate_bf16_rows<f32x16>(p, rows, end - begin, d, acc);
          continue;
        }
      }
#elif defined(CTFORMER_CPU_AVX2)
      if constexpr (may_pair) {
        if (paired) {
          accumulate_bf16_rows<f32x8>(p, rows, end - begin, d, acc);
          continue;
        }
      }
#endif
#if defined(CTFORMER_CPU_AVX512_VNNI)
      if constexpr (quantized) {
        if (int8_query) {
          accumulate_int8_rows_16(p, rows, end - begin, d, acc);
          continue;
        }
      }
#endif
      accumulate_rows(p, rows, end - begin, d, acc);
    }
  }
}

/// One query over key positions [k0, k1): begin_query, attend_tile per
/// tile of cached_attention_tile positions from k0, end_query.
template <class E>
void attend_key_range(query_state& st, index_t h0, index_t h1, index_t group, const kv_view<const E>& kv,
                      index_t k0, index_t k1, float scale) {
  begin_query<E>(st, h0, h1, kv.head_dim);
  tile_slots slots;
  for (index_t p0 = k0; p0 < k1; p0 += cached_attention_tile) {
    const index_t count = std::min(cached_attention_tile, k1 - p0);
    find_tile_slots(kv, p0, count, slots);
    attend_tile(st, h0, h1, group, kv, slots, count, scale);
  }
  end_query<E>(st, h1 - h0, kv.head_dim);
}

/// Queries that attend to key positions [0, key_ends[i]) each, taken
/// together: every tile of positions is gathered once for all of them (the
/// first query brings its rows into L1/L2, the others find them there)
/// instead of once per query from L3. Each query still runs exactly
/// attend_key_range's arithmetic, tile by tile in the same order, so its
/// result has the same bits as when it is attended to alone -- and as a
/// decode step of it, as long as that step runs as one part (position <
/// cached_attention_part; longer decode steps merge parts).
template <class E>
void attend_queries(query_state* states, const index_t* key_ends, index_t queries, index_t h0, index_t h1,
                    index_t group, const kv_view<const E>& kv, float scale) {
  index_t last = 0;
  for (index_t i = 0; i < queries; ++i) {
    begin_query<E>(states[i], h0, h1, kv.head_dim);
    last = std::max(last, key_ends[i]);
  }
  tile_slots slots;
  for (index_t p0 = 0; p0 < last; p0 += cached_attention_tile) {
    find_tile_slots(kv, p0, std::min(cached_attention_tile, last - p0), slots);
    for (index_t i = 0; i < queries; ++i)
      if (key_ends[i] > p0)  // a query whose keys ended at this tile's edge has no part in it
        attend_tile(states[i], h0, h1, group, kv, slots, std::min(cached_attention_tile, key_ends[i] - p0), scale);
  }
  for (index_t i = 0; i < queries; ++i) end_query<E>(states[i], h1 - h0, kv.head_dim);
}

}  // namespace detail

/// Whether this build scores a bf16 cache of head dimension d with the query
/// rounded to bf16 (vdpbf16ps: an AVX512_BF16 build and d % 32 == 0); false
/// where the query stays fp32. Tests and callers that reproduce the scores
/// need it.
inline bool bf16_cache_rounds_query(index_t d) {
#if defined(CTFORMER_CPU_AVX512_BF16)
  return detail::bf16_native(d);
#else
  (void)d;
  return false;
#endif
}

/// Whether this build scores an int8 cache of head dimension d with the
/// query rounded to int8 per head (scale max|q| / 127, each element
/// q * (127 / max|q|) rounded to nearest, ties to even: an AVX512_VNNI build
/// and d % 64 == 0); false where the query stays fp32. Tests and callers that
/// reproduce the scores need it.
inline bool int8_cache_rounds_query(index_t d) {
#if defined(CTFORMER_CPU_AVX512_VNNI)
  return detail::int8_native(d);
#else
  (void)d;
  return false;
#endif
}

/// Causal attention over a KV cache for the rows of many sequences at once
/// (ops::cached_attention): each segment's query rows are positions
/// [start, start + rows) of its sequence, the query at position p attends to
/// [0, p] (a window W: [max(0, p - W + 1), p]). Head h reads kv head h / (H / KV).
/// q: (N, H, D), out: (N, H, D), unit stride in D.
///
/// Work is split into tasks of (segment, queries, part of their keys, range
/// of kv heads), all segments' tasks shared out in one parallel loop: a
/// prefill chunk has queries enough to share out, in blocks of up to
/// cached_attention_query_block that read each tile of the cache once; a
/// decode step (one row) splits its keys into parts of cached_attention_part
/// positions, each scored separately and merged (flash-decoding); heads are
/// split when the tasks would be fewer than the threads. How many tasks
/// there are depends on the threads and on the other segments; the results
/// do not (every head and query is computed the same way in any task, and
/// parts are fixed positions). Windowed queries run one per task over their
/// own key range.
template <class E>
void cached_attention_impl(const par_t& exec, tensor_view<const float, 3> q,
                           std::span<const attention_segment<const E>> segments, tensor_view<float, 3> out,
                           float scale) {
  const index_t n_rows = q.extent(0), heads = q.extent(1), d = q.extent(2);
  // The kernels find head h of a query at q + h * d: a query whose heads are
  // not packed (a view into wider rows) is copied once into packed scratch.
  if (heads > 1 && q.stride(1) != d) {
    float* packed = detail::scratch_floats(7, std::size_t(n_rows * heads * d));
    for (index_t t = 0; t < n_rows; ++t)
      for (index_t h = 0; h < heads; ++h)
        for (index_t e = 0; e < d; ++e) packed[(t * heads + h) * d + e] = q(t, h, e);
    cached_attention_impl(exec, tensor_view<const float, 3>(packed, {n_rows, heads, d}), segments, out, scale);
    return;
  }
  constexpr index_t part_keys = detail::cached_attention_part, max_block = detail::cached_attention_query_block;
  const auto key_begin = [](const attention_segment<const E>& seg, index_t position) {
    return seg.window > 0 ? std::max<index_t>(0, position - seg.window + 1) : index_t(0);
  };
  // How each segment is cut into tasks.
  struct plan {
    index_t parts = 1, block = 1, query_blocks = 0, splits = 1, first_task = 0, partial = 0;
  };
  // The calling thread's plans, named by reference: the tasks below run on
  // pool threads, where the thread_local names would mean their own vectors.
  thread_local std::vector<plan> calling_thread_plans;
  thread_local std::vector<std::int32_t> calling_thread_tasks;
  std::vector<plan>& plans = calling_thread_plans;
  std::vector<std::int32_t>& task_segment = calling_thread_tasks;
  plans.assign(segments.size(), plan{});
  const index_t threads = exec.thread_count();
  // Below this many key rows in total (a decode step over a context of a
  // few dozen positions) the work is a few microseconds: waking the pool
  // would cost more than it saves.
  index_t key_rows = 0;
  for (const auto& seg : segments) {
    const index_t last = seg.start + seg.rows;
    key_rows += seg.rows * heads * (last - key_begin(seg, seg.start));
  }
  const index_t workers = key_rows < 512 ? 1 : threads;
  index_t base_tasks = 0, min_kv_heads = std::numeric_limits<index_t>::max();
  for (std::size_t i = 0; i < segments.size(); ++i) {
    const auto& seg = segments[i];
    plan& p = plans[i];
    if (seg.rows == 0) continue;
    if (seg.rows == 1) {
      const index_t k0 = key_begin(seg, seg.start), k1 = seg.start + 1;
      p.parts = (k1 - 1) / part_keys - k0 / part_keys + 1;
    }
    // Blocks of up to 8 queries, smaller when a short chunk would otherwise
    // leave threads without a task (a chunk of 8 queries on 2 threads: 2 blocks).
    p.block = seg.window > 0 ? 1 : std::clamp<index_t>((seg.rows + workers - 1) / workers, 1, max_block);
    p.query_blocks = (seg.rows + p.block - 1) / p.block;
    base_tasks += p.query_blocks * p.parts;
    min_kv_heads = std::min(min_kv_heads, seg.kv.kv_heads);
  }
  if (base_tasks == 0) return;
  const index_t splits = std::clamp<index_t>((workers + base_tasks - 1) / base_tasks, 1, min_kv_heads);
  index_t tasks = 0, partial_floats = 0;
  for (auto& p : plans) {
    if (p.query_blocks == 0) continue;
    p.splits = splits;
    p.first_task = tasks;
    tasks += p.query_blocks * p.parts * p.splits;
    if (p.parts > 1) {
      p.partial = partial_floats;
      partial_floats += p.parts * (heads * (d + 2) + 1);
    }
  }
  task_segment.resize(std::size_t(tasks));
  for (std::size_t i = 0; i < segments.size(); ++i) {
    const plan& p = plans[i];
    for (index_t t = 0; t < p.query_blocks * p.parts * p.splits; ++t)
      task_segment[std::size_t(p.first_task + t)] = std::int32_t(i);
  }
  // Partial results of the parts of decode steps: per segment, (part, head)
  // max and sum, then (part, head, d) accumulators, then one merge weight per
  // part; a segment of one part writes out directly.
  float* partials = partial_floats > 0 ? detail::scratch_floats(4, std::size_t(partial_floats)) : nullptr;
  auto run = [&](index_t task) {
    const std::size_t which = std::size_t(task_segment[std::size_t(task)]);
    const attention_segment<const E>& seg = segments[which];
    const plan& p = plans[which];
    const kv_view<const E>& kv = seg.kv;
    const index_t local = task - p.first_task;
    const index_t split = local % p.splits, part = (local / p.splits) % p.parts, qb = local / (p.splits * p.parts);
    const index_t group = heads / kv.kv_heads;
    const index_t g0 = kv.kv_heads * split / p.splits, g1 = kv.kv_heads * (split + 1) / p.splits;
    const index_t h0 = g0 * group, h1 = g1 * group, n = h1 - h0;
    const index_t t0 = qb * p.block, queries = std::min(p.block, seg.rows - t0);
    const index_t state_floats = detail::query_state_floats(n, d);
    float* scratch = detail::scratch_floats(5, std::size_t(queries * state_floats));
    detail::query_state states[max_block];
    index_t key_ends[max_block];
    for (index_t i = 0; i < queries; ++i) {
      states[i] = detail::make_query_state(&q(seg.first_row + t0 + i, 0, 0), scratch + i * state_floats, n, d);
      key_ends[i] = seg.start + t0 + i + 1;
    }
    if (p.parts > 1) {  // one decode query, one part of its keys
      float* partial = partials + p.partial;
      detail::query_state& st = states[0];
      st.max = partial + part * heads + h0;
      st.sum = partial + p.parts * heads + part * heads + h0;
      st.acc = partial + 2 * p.parts * heads + (part * heads + h0) * d;
      const index_t k0 = key_begin(seg, seg.start), first_part = k0 / part_keys;
      const index_t from = std::max(k0, (first_part + part) * part_keys);
      detail::attend_key_range(st, h0, h1, group, kv, from, std::min(key_ends[0], (first_part + part + 1) * part_keys),
                               scale);
      return;
    }
    if (queries == 1)
      detail::attend_key_range(states[0], h0, h1, group, kv, key_begin(seg, seg.start + t0), key_ends[0], scale);
    else
      detail::attend_queries(states, key_ends, queries, h0, h1, group, kv, scale);
    for (index_t t = 0; t < queries; ++t)
      for (index_t i = 0; i < n; ++i) {
        const float inverse = 1.0f / states[t].sum[i];
        for (index_t e = 0; e < d; ++e) out(seg.first_row + t0 + t, h0 + i, e) = states[t].acc[i * d + e] * inverse;
      }
  };
  if (workers <= 1 || tasks <= 1) {
    for (index_t i = 0; i < tasks; ++i) run(i);
  } else {
    // Round-robin, so the long rows at the end of a prefill chunk are shared out evenly.
    const index_t used = std::min(workers, tasks);
    detail::parallel_for(exec, used, [&](index_t th) {
      for (index_t i = th; i < tasks; i += used) run(i);
    });
  }
  // Merge each decode step's parts in a fixed order: weights exp(max_p -
  // max) bring each part's sum and accumulator to the common maximum.
  for (std::size_t which = 0; which < segments.size(); ++which) {
    const plan& p = plans[which];
    if (p.parts <= 1) continue;
    const index_t parts = p.parts, row = segments[which].first_row;
    const float* maxes = partials + p.partial;
    const float* sums = maxes + parts * heads;
    const float* accs = maxes + 2 * parts * heads;
    float* weights = partials + p.partial + parts * heads * (d + 2);
    for (index_t h = 0; h < heads; ++h) {
      float m = -std::numeric_limits<float>::infinity();
      for (index_t part = 0; part < parts; ++part) m = std::max(m, maxes[part * heads + h]);
      float total = 0.0f;
      for (index_t part = 0; part < parts; ++part) {
        weights[part] = std::exp(maxes[part * heads + h] - m);
        total += weights[part] * sums[part * heads + h];
      }
      const float inverse = 1.0f / total;
      for (index_t e = 0; e < d; ++e) {
        float v = 0.0f;
        for (index_t part = 0; part < parts; ++part) v += weights[part] * accs[(part * heads + h) * d + e];
        out(row, h, e) = v * inverse;
      }
    }
  }
}

}  // namespace ctformer::cpu
