// CPU kernel for causal attention of new queries over a KV cache (prefill
// chunks and decode steps): online softmax over tiles of keys read straight
// from the cache's blocks in fp32, bf16 or int8, GQA-aware, no score matrix.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

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

/// One query row against positions [0, n_keys) of kv head g: out = softmax(q k^T * scale) v.
template <class E>
void cached_attention_row(const float* q, const kv_view<const E>& kv, index_t g, index_t n_keys, float scale,
                          float* out) {
  constexpr bool quantized = std::is_same_v<E, std::int8_t>;
  const index_t d = kv.head_dim;
  alignas(64) float acc[cached_attention_max_head_dim];
  alignas(64) float s[cached_attention_tile];
  const E* rows_k[cached_attention_tile];
  const E* rows_v[cached_attention_tile];
  float scales_v[cached_attention_tile];
  for (index_t i = 0; i < d; ++i) acc[i] = 0.0f;
  float running_max = -std::numeric_limits<float>::infinity();
  float running_sum = 0.0f;

  // Tiles are fixed runs of logical positions, whatever the block size, so a
  // paged and a contiguous cache holding the same values give the same bits.
  // The (block, offset) cursor walks the block table without a division per key.
  index_t block = 0, in_block = 0;
  index_t block_base = index_t(kv.block_table[0]) * kv.block_stride;
  const index_t scale_block_stride = kv.block_stride / d;
  for (index_t p0 = 0; p0 < n_keys;) {
    const index_t count = std::min(cached_attention_tile, n_keys - p0);
    float tile_max = -std::numeric_limits<float>::infinity();
    for (index_t j = 0; j < count; ++j) {
      if (in_block == kv.block_tokens) {
        in_block = 0;
        block_base = index_t(kv.block_table[++block]) * kv.block_stride;
      }
      const index_t at = block_base + in_block * kv.token_stride + g * d;
      rows_k[j] = kv.k + at;
      rows_v[j] = kv.v + at;
      float score = dot_kv(q, rows_k[j], d) * scale;
      if constexpr (quantized) {
        const index_t so = index_t(kv.block_table[block]) * scale_block_stride + in_block * kv.kv_heads + g;
        score *= kv.k_scale[so];
        scales_v[j] = kv.v_scale[so];
      }
      s[j] = score;
      tile_max = std::max(tile_max, score);
      ++in_block;
    }
    // Rescale what the earlier tiles summed to the new maximum.
    const float new_max = std::max(running_max, tile_max);
    if (new_max > running_max && running_sum > 0.0f) {
      const float correction = std::exp(running_max - new_max);
      running_sum *= correction;
      for (index_t i = 0; i < d; ++i) acc[i] *= correction;
    }
    running_max = new_max;
    // Probabilities of the tile (relative to the running maximum), vectorised exp.
    const kv_vec m = kv_vec::splat(new_max);
    index_t j = 0;
    for (; j + kv_vec::width <= count; j += kv_vec::width) vexp(kv_vec::load(s + j) - m).store(s + j);
    for (; j < count; ++j) s[j] = exp_approx(s[j] - new_max);
    for (j = 0; j < count; ++j) {
      running_sum += s[j];
      axpy_kv(quantized ? s[j] * scales_v[j] : s[j], rows_v[j], acc, d);
    }
    p0 += count;
  }
  const float inverse = 1.0f / running_sum;
  for (index_t i = 0; i < d; ++i) out[i] = acc[i] * inverse;
}

}  // namespace detail

/// Causal attention of T new queries at positions [start, start + T) over a
/// cache that already holds their keys and values: query t attends to
/// positions [0, start + t]. Head h reads kv head h / (H / KV).
/// q: (T, H, D), out: (T, H, D), unit stride in D; kv: the sequence's layer view.
/// Work is split over (query, head) pairs, dealt round-robin to the threads so
/// the long rows at the end of a prefill chunk are shared out evenly.
template <class E>
void cached_attention_impl(const par_t& exec, tensor_view<const float, 3> q, const kv_view<const E>& kv,
                           tensor_view<float, 3> out, index_t start, float scale) {
  const index_t t_len = q.extent(0), heads = q.extent(1);
  const index_t group = heads / kv.kv_heads;
  const index_t tasks = t_len * heads;
  auto run = [&](index_t task) {
    const index_t t = task / heads, h = task % heads;
    detail::cached_attention_row(&q(t, h, 0), kv, h / group, start + t + 1, scale, &out(t, h, 0));
  };
  // A decode step over a short context is a few microseconds of work: below
  // this many key rows in total, waking the pool costs more than it saves.
  const index_t key_rows = tasks * (start + t_len);
  const index_t threads = key_rows < 2048 ? 1 : std::min<index_t>(exec.thread_count(), tasks);
  if (threads <= 1) {
    for (index_t i = 0; i < tasks; ++i) run(i);
    return;
  }
  detail::parallel_for(exec, threads, [&](index_t th) {
    for (index_t i = th; i < tasks; i += threads) run(i);
  });
}

}  // namespace ctformer::cpu
