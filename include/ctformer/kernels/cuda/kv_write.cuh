// The CUDA hooks of ops::kv_cache_write (fp32 rows stored as a cache's
// element, the CPU's arithmetic: the same bits) and ops::kv_cache_copy.
// One thread per (tensor, position, kv head) row: a step writes a few rows
// per layer, so the kernel is simple rather than fast.
#pragma once

#include <cstdint>
#include <type_traits>

#include "ctformer/core/kv_view.hpp"
#include "ctformer/core/number_types.hpp"
#include "ctformer/kernels/cuda/common.cuh"

namespace ctformer::cuda {

namespace detail {

// One row of d elements as the cache's element; *scale is written for int8.
// The int8 arithmetic is the CPU's step by step (IEEE division and product,
// round to nearest even, the same max): both give the same bits.
template <class E>
__device__ void store_kv_row(const float* x, E* dst, float* scale, index_t d) {
  if constexpr (std::is_same_v<E, float>) {
    for (index_t i = 0; i < d; ++i) dst[i] = x[i];
  } else if constexpr (std::is_same_v<E, bf16>) {
    for (index_t i = 0; i < d; ++i) dst[i] = bf16(x[i]);
  } else {
    float amax = 0.0f;
    for (index_t i = 0; i < d; ++i) {
      const float a = fabsf(x[i]);
      amax = amax < a ? a : amax;  // std::max's choice
    }
    const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (index_t i = 0; i < d; ++i) {
      const int r = int(rintf(x[i] * inverse));
      dst[i] = std::int8_t(r < -127 ? -127 : (r > 127 ? 127 : r));
    }
    *scale = amax / 127.0f;
  }
}

// Rows [0, 2 T KV): the keys' (t, g) rows, then the values'.
template <class E>
__global__ void kv_cache_write_kernel(kv_view<E> kv, index_t start, tensor_view<const float, 3> k,
                                      tensor_view<const float, 3> v) {
  constexpr bool quantized = std::is_same_v<E, std::int8_t>;
  const index_t rows = k.extent(0) * kv.kv_heads;
  for (index_t r = index_t(blockIdx.x) * blockDim.x + threadIdx.x; r < 2 * rows;
       r += index_t(gridDim.x) * blockDim.x) {
    const bool value = r >= rows;
    const index_t row = value ? r - rows : r, t = row / kv.kv_heads, g = row % kv.kv_heads;
    const index_t at = kv.offset(start + t, g);
    const float* x = value ? &v(t, g, 0) : &k(t, g, 0);
    float* scale = nullptr;
    if constexpr (quantized) scale = (value ? kv.v_scale : kv.k_scale) + kv.scale_offset(start + t, g);
    store_kv_row(x, (value ? kv.v : kv.k) + at, scale, kv.head_dim);
  }
}

// Rows [0, 2 (last - first) KV): keys' (position, g) rows, then the values'.
template <class E>
__global__ void kv_cache_copy_kernel(kv_view<const E> from, kv_view<E> to, index_t first, index_t last) {
  const index_t rows = (last - first) * from.kv_heads, d = from.head_dim;
  for (index_t r = index_t(blockIdx.x) * blockDim.x + threadIdx.x; r < 2 * rows;
       r += index_t(gridDim.x) * blockDim.x) {
    const bool value = r >= rows;
    const index_t row = value ? r - rows : r, pos = first + row / from.kv_heads, g = row % from.kv_heads;
    const E* src = (value ? from.v : from.k) + from.offset(pos, g);
    E* dst = (value ? to.v : to.k) + to.offset(pos, g);
    for (index_t i = 0; i < d; ++i) dst[i] = src[i];
    if constexpr (std::is_same_v<E, std::int8_t>) {
      const float* src_scale = value ? from.v_scale : from.k_scale;
      float* dst_scale = value ? to.v_scale : to.k_scale;
      dst_scale[to.scale_offset(pos, g)] = src_scale[from.scale_offset(pos, g)];
    }
  }
}

}  // namespace detail

/// kv: a layout whose pointers (block table included) are device memory;
/// k, v: (T, KV, D) in device memory (checked by ops::kv_cache_write).
template <class E>
void kv_cache_write_impl(const par_t& exec, const kv_view<E>& kv, index_t start, tensor_view<const float, 3> k,
                         tensor_view<const float, 3> v) {
  const index_t rows = 2 * k.extent(0) * kv.kv_heads;
  if (rows == 0) return;
  detail::kv_cache_write_kernel<E><<<detail::elementwise_grid(rows), detail::elementwise_block, 0, exec.stream>>>(
      kv, start, k, v);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

/// from, to: layouts in device memory (checked by ops::kv_cache_copy).
template <class E>
void kv_cache_copy_impl(const par_t& exec, const kv_view<const E>& from, const kv_view<E>& to, index_t first,
                        index_t last) {
  const index_t rows = 2 * (last - first) * from.kv_heads;
  if (rows <= 0) return;
  detail::kv_cache_copy_kernel<E><<<detail::elementwise_grid(rows), detail::elementwise_block, 0, exec.stream>>>(
      from, to, first, last);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

}  // namespace ctformer::cuda
