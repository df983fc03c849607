// The CPU hooks of ops::kv_cache_write (fp32 rows stored as a cache's
// element) and ops::kv_cache_copy (positions copied between two layouts).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ctformer/core/kv_view.hpp"
#include "ctformer/core/number_types.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/exec/cpu.hpp"

namespace ctformer::cpu {

namespace detail {

// One row of d elements as the cache's element; *scale is written for int8.
template <class E>
void store_kv_row(const float* x, E* dst, float* scale, index_t d) {
  if constexpr (std::is_same_v<E, float>) {
    for (index_t i = 0; i < d; ++i) dst[i] = x[i];
  } else if constexpr (std::is_same_v<E, bf16>) {
    for (index_t i = 0; i < d; ++i) dst[i] = bf16(x[i]);
  } else {
    static_assert(std::is_same_v<E, std::int8_t>, "ctformer: a KV cache holds float, bf16 or std::int8_t elements");
    float amax = 0.0f;
    for (index_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (index_t i = 0; i < d; ++i) dst[i] = std::int8_t(std::clamp(int(std::nearbyint(x[i] * inverse)), -127, 127));
    *scale = amax / 127.0f;
  }
}

}  // namespace detail

/// Stores rows (T, KV, D) of k and v at positions [start, start + T) of kv
/// (checked by ops::kv_cache_write). A few rows per layer and step: one thread.
template <class E>
void kv_cache_write_impl(const par_t&, const kv_view<E>& kv, index_t start, tensor_view<const float, 3> k,
                         tensor_view<const float, 3> v) {
  constexpr bool quantized = std::is_same_v<E, std::int8_t>;
  for (index_t t = 0; t < k.extent(0); ++t)
    for (index_t g = 0; g < kv.kv_heads; ++g) {
      const index_t at = kv.offset(start + t, g);
      const index_t at_scale = quantized ? kv.scale_offset(start + t, g) : 0;
      detail::store_kv_row(&k(t, g, 0), kv.k + at, quantized ? kv.k_scale + at_scale : nullptr, kv.head_dim);
      detail::store_kv_row(&v(t, g, 0), kv.v + at, quantized ? kv.v_scale + at_scale : nullptr, kv.head_dim);
    }
}

/// Copies positions [first, last) of every kv head from `from` to `to`.
template <class E>
void kv_cache_copy_impl(const par_t&, const kv_view<const E>& from, const kv_view<E>& to, index_t first,
                        index_t last) {
  const index_t d = from.head_dim;
  for (index_t pos = first; pos < last; ++pos)
    for (index_t g = 0; g < from.kv_heads; ++g) {
      const index_t a = from.offset(pos, g), b = to.offset(pos, g);
      std::copy(from.k + a, from.k + a + d, to.k + b);
      std::copy(from.v + a, from.v + a + d, to.v + b);
      if constexpr (std::is_same_v<E, std::int8_t>) {
        to.k_scale[to.scale_offset(pos, g)] = from.k_scale[from.scale_offset(pos, g)];
        to.v_scale[to.scale_offset(pos, g)] = from.v_scale[from.scale_offset(pos, g)];
      }
    }
}

}  // namespace ctformer::cpu
