// CPU kernel for causal attention of new queries over a KV cache (prefill
// chunks and decode steps): online softmax over tiles of keys read straight
// from the cache's blocks in fp32, bf16 or int8, GQA-aware, no score matrix.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "ctformer/core/kv_view.hpp"
#include "ctformer/kernels/cpu/detail/vector_math.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {

/// The largest head dimension the cached-attention kernel takes: its per-query
/// accumulator lives on the stack, so nothing is allocated per call.
inline constexpr index_t cached_attention_max_head_dim = 512;
/// Keys scored per tile: the tile's scores sit on the stack, one exp pass and
/// one rescale of the accumulator per tile rather than per key.
inline constexpr index_t cached_attention_tile = 64;

// The kernel's vector: 8 floats on AVX2 (also on AVX-512 targets: the element
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
  return {to_float(*p)};
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
    // hadd pairs within 128-bit lanes: after two rounds the low lane holds
    // keys 0-3 (s0123) or 4-7 (s4567) summed over elements 0-3 of each
    // 8-block, the high lane over elements 4-7; adding the lanes finishes.
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                        _mm256_permute2f128_ps(s0123, s4567, 0x31)));
    return;
  }
#endif
  for (int r = 0; r < 8; ++r) out[r] = dot_kv(q, rows[r], d);
}

/// acc[0, d) += sum_j p[j] * rows[j][0, d) over `count` rows, j in order (the
/// same fused multiply-adds as axpy_kv row by row). With AVX2 each 64-wide
/// stretch of acc stays in registers across all the rows.
template <class E>
inline void accumulate_rows(const float* p, const E* const* rows, index_t count, index_t d, float* acc) {
#if defined(CTFORMER_CPU_AVX2)
  index_t c = 0;
  for (; c + 64 <= d; c += 64) {
    __m256 a[8];
    for (int v = 0; v < 8; ++v) a[v] = _mm256_loadu_ps(acc + c + 8 * v);
    for (index_t j = 0; j < count; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      for (int v = 0; v < 8; ++v) a[v] = _mm256_fmadd_ps(pj, load_kv(rows[j] + c + 8 * v).v, a[v]);
    }
    for (int v = 0; v < 8; ++v) _mm256_storeu_ps(acc + c + 8 * v, a[v]);
  }
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

/// Keys per part of a decode step's key range: the parts are scored on
/// separate threads and merged. Fixed positions (not a share of the thread
/// count) so that the result does not depend on how many threads ran.
inline constexpr index_t cached_attention_part = 256;

/// The running softmax of heads [h0, h1) of one query over key positions
/// [k0, k1) of kv_view `kv` (head h reads kv head h / group). On return,
/// for each head i = h - h0: max[i] is the largest scaled score, sum[i] the sum
/// of exp(score - max[i]) and acc[i * d ...] the matching exp-weighted sum of
/// values (not yet divided by sum[i]).
///
/// The loop runs over positions and, inside, over heads: a position's keys
/// for all its kv heads are one contiguous run of the cache, so the cache is
/// streamed front to back (which the hardware prefetchers follow) instead of
/// one 128-byte head row per token stride, each of which would wait on DRAM.
/// Tiles are fixed runs of logical positions, whatever the block size, so a
/// paged and a contiguous cache holding the same values give the same bits.
/// scores: room for (h1 - h0) * cached_attention_tile floats.
template <class E>
void attend_key_range(const float* q, index_t h0, index_t h1, index_t group, const kv_view<const E>& kv,
                      index_t k0, index_t k1, float scale, float* max, float* sum, float* acc, float* scores) {
  constexpr bool quantized = std::is_same_v<E, std::int8_t>;
  constexpr index_t tile = cached_attention_tile;
  const index_t d = kv.head_dim, heads = h1 - h0;
  index_t slot[tile];        // element offset of each position's key/value slot
  index_t scale_slot[tile];  // int8: index of each position's first scale
  for (index_t i = 0; i < heads; ++i) {
    max[i] = -std::numeric_limits<float>::infinity();
    sum[i] = 0.0f;
  }
  for (index_t i = 0; i < heads * d; ++i) acc[i] = 0.0f;

  // A (block, offset) cursor walks the block table without a division per key.
  index_t block = k0 / kv.block_tokens, in_block = k0 % kv.block_tokens;
  const index_t scale_block_stride = kv.block_stride / d;
  for (index_t p0 = k0; p0 < k1;) {
    const index_t count = std::min(tile, k1 - p0);
    for (index_t j = 0; j < count; ++j) {
      if (in_block == kv.block_tokens) {
        in_block = 0;
        ++block;
      }
      const index_t physical = index_t(kv.block_table[block]);
      slot[j] = physical * kv.block_stride + in_block * kv.token_stride;
      if constexpr (quantized) scale_slot[j] = physical * scale_block_stride + in_block * kv.kv_heads;
      ++in_block;
    }
    // Scores, 8 keys at a time. The values of those 8 positions are asked
    // for meanwhile: the value pass below reads them head by head, a stride
    // the hardware prefetchers would not follow.
    const index_t g0 = h0 / group, g1 = (h1 - 1) / group + 1;
    const index_t value_bytes = (g1 - g0) * d * index_t(sizeof(E));
    index_t key = 0;
    for (; key + 8 <= count; key += 8) {
      for (index_t r = 0; r < 8; ++r) prefetch_bytes(kv.v + slot[key + r] + g0 * d, value_bytes);
      for (index_t h = h0; h < h1; ++h) {
        const index_t g = h / group;
        const E* rows[8];
        for (index_t r = 0; r < 8; ++r) rows[r] = kv.k + slot[key + r] + g * d;
        float dots[8];
        dot_kv_8(q + h * d, rows, d, dots);
        for (index_t r = 0; r < 8; ++r) {
          float score = dots[r] * scale;
          if constexpr (quantized) score *= kv.k_scale[scale_slot[key + r] + g];
          scores[(h - h0) * tile + key + r] = score;
        }
      }
    }
    for (; key < count; ++key)
      for (index_t h = h0; h < h1; ++h) {
        const index_t g = h / group;
        float score = dot_kv(q + h * d, kv.k + slot[key] + g * d, d) * scale;
        if constexpr (quantized) score *= kv.k_scale[scale_slot[key] + g];
        scores[(h - h0) * tile + key] = score;
      }
    for (index_t i = 0; i < heads; ++i) {
      float* s = scores + i * tile;
      float tile_max = -std::numeric_limits<float>::infinity();
      for (index_t j = 0; j < count; ++j) tile_max = std::max(tile_max, s[j]);
      // Rescale what the earlier tiles summed to the new maximum.
      const float new_max = std::max(max[i], tile_max);
      if (new_max > max[i] && sum[i] > 0.0f) {
        const float correction = std::exp(max[i] - new_max);
        sum[i] *= correction;
        for (index_t e = 0; e < d; ++e) acc[i * d + e] *= correction;
      }
      max[i] = new_max;
      // Probabilities of the tile (relative to the running maximum), vectorised exp.
      const kv_vec m = kv_vec::splat(new_max);
      index_t j = 0;
      for (; j + kv_vec::width <= count; j += kv_vec::width) vexp(kv_vec::load(s + j) - m).store(s + j);
      for (; j < count; ++j) s[j] = exp_approx(s[j] - new_max);
      for (j = 0; j < count; ++j) sum[i] += s[j];
    }
    // Values, head by head, the accumulator in registers across the tile.
    const E* rows[tile];
    for (index_t h = h0; h < h1; ++h) {
      const index_t g = h / group;
      float* p = scores + (h - h0) * tile;
      for (index_t r = 0; r < count; ++r) {
        rows[r] = kv.v + slot[r] + g * d;
        if constexpr (quantized) p[r] *= kv.v_scale[scale_slot[r] + g];
      }
      accumulate_rows(p, rows, count, d, acc + (h - h0) * d);
    }
    p0 += count;
  }
}

/// Per-thread scratch floats of cached attention, which only grow: slot 0
/// holds a decode step's partial results (calling thread), slot 1 a task's
/// running state (every thread, the calling one included).
inline float* attention_scratch(int slot, std::size_t n) {
  thread_local std::vector<float> slots[2];
  std::vector<float>& s = slots[slot];
  if (s.size() < n) s.resize(n);
  return s.data();
}

}  // namespace detail

/// Causal attention of T new queries at positions [start, start + T) over a
/// cache that already holds their keys and values: query t attends to
/// positions [0, start + t]. Head h reads kv head h / (H / KV).
/// q: (T, H, D), out: (T, H, D), unit stride in D; kv: the sequence's layer view.
///
/// Work is split into tasks of (query, part of its keys, range of kv heads):
/// a prefill chunk has queries enough to share out; a decode step (T = 1)
/// splits its keys into parts of cached_attention_part positions, each
/// scored separately and merged (flash-decoding), and splits heads when the
/// parts are fewer than the threads. The split never depends on the thread
/// count, so neither do the results.
template <class E>
void cached_attention_impl(const par_t& exec, tensor_view<const float, 3> q, const kv_view<const E>& kv,
                           tensor_view<float, 3> out, index_t start, float scale) {
  const index_t t_len = q.extent(0), heads = q.extent(1), d = kv.head_dim;
  const index_t group = heads / kv.kv_heads;
  const index_t threads = exec.thread_count();
  // Below this many key rows in total (a decode step over a context of a
  // few dozen positions) the work is a few microseconds: waking the pool
  // would cost more than it saves.
  const index_t key_rows = t_len * heads * (start + t_len);
  const index_t workers = key_rows < 512 ? 1 : threads;
  const index_t parts = t_len == 1 ? (start + 1 + detail::cached_attention_part - 1) / detail::cached_attention_part : 1;
  const index_t splits =
      std::clamp<index_t>((workers + t_len * parts - 1) / (t_len * parts), 1, kv.kv_heads);
  const index_t tasks = t_len * parts * splits;
  // Partial results of the parts of a decode step: (part, head) max and sum,
  // then (part, head, d) accumulators, then one merge weight per part; a
  // single part writes out directly.
  float* partial = parts > 1 ? detail::attention_scratch(0, std::size_t(parts * (heads * (d + 2) + 1))) : nullptr;
  auto run = [&](index_t task) {
    const index_t split = task % splits, part = (task / splits) % parts, t = task / (splits * parts);
    const index_t g0 = kv.kv_heads * split / splits, g1 = kv.kv_heads * (split + 1) / splits;
    const index_t h0 = g0 * group, h1 = g1 * group, n = h1 - h0;
    const index_t n_keys = start + t + 1;
    const index_t k0 = part * detail::cached_attention_part;
    const index_t k1 = parts > 1 ? std::min(n_keys, k0 + detail::cached_attention_part) : n_keys;
    float* scratch = detail::attention_scratch(1, std::size_t(n * (d + 2 + detail::cached_attention_tile)));
    float* max = scratch;
    float* sum = scratch + n;
    float* acc = scratch + 2 * n;
    if (parts > 1) {
      max = partial + part * heads + h0;
      sum = partial + parts * heads + part * heads + h0;
      acc = partial + 2 * parts * heads + (part * heads + h0) * d;
    }
    detail::attend_key_range(&q(t, 0, 0), h0, h1, group, kv, k0, k1, scale, max, sum, acc,
                             scratch + n * (d + 2));
    if (parts == 1)
      for (index_t i = 0; i < n; ++i) {
        const float inverse = 1.0f / sum[i];
        for (index_t e = 0; e < d; ++e) out(t, h0 + i, e) = acc[i * d + e] * inverse;
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
  if (parts == 1) return;
  // Merge the parts in a fixed order: weights exp(max_p - max) bring each
  // part's sum and accumulator to the common maximum.
  const float* maxes = partial;
  const float* sums = partial + parts * heads;
  const float* accs = partial + 2 * parts * heads;
  float* weights = partial + parts * heads * (d + 2);
  for (index_t h = 0; h < heads; ++h) {
    float m = -std::numeric_limits<float>::infinity();
    for (index_t p = 0; p < parts; ++p) m = std::max(m, maxes[p * heads + h]);
    float total = 0.0f;
    for (index_t p = 0; p < parts; ++p) {
      weights[p] = std::exp(maxes[p * heads + h] - m);
      total += weights[p] * sums[p * heads + h];
    }
    const float inverse = 1.0f / total;
    for (index_t e = 0; e < d; ++e) {
      float v = 0.0f;
      for (index_t p = 0; p < parts; ++p) v += weights[p] * accs[(p * heads + h) * d + e];
      out(0, h, e) = v * inverse;
    }
  }
}

}  // namespace ctformer::cpu
