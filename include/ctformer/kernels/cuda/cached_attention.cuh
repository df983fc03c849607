// The CUDA hook of ops::cached_attention: causal attention of a ragged
// batch's query rows over a paged (or contiguous) KV cache in device memory,
// decode rows and prefill chunks alike, fp32, bf16 and int8 caches.
//
// One warp per (segment, query row, head): the query row's head is staged in
// shared memory, then the warp walks the row's keys [max(0, p - W + 1), p]
// in tiles of 32 through the block table, one key per lane for the scores,
// with an online softmax (running maximum and sum, the accumulator rescaled
// when the maximum grows); for the values each lane owns the channels
// lane, lane + 32, ... and adds every key of the tile, its weight broadcast
// by a shuffle. Correct and parallel over rows and heads, not tuned: no
// split of long contexts across warps, keys read one lane per row.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

#include <cuda/std/limits>

#include "ctformer/core/kv_view.hpp"
#include "ctformer/core/number_types.hpp"
#include "ctformer/kernels/cuda/softmax.cuh"

namespace ctformer::cuda {

namespace detail {

inline constexpr int cached_attention_warps = 4;  // warps (query heads) per block
/// The largest head dimension the kernel takes: a lane holds head_dim / 32 output channels in registers.
inline constexpr index_t cached_attention_max_head_dim = 256;
inline constexpr int cached_attention_channels = int(cached_attention_max_head_dim / 32);

template <class E>
__device__ inline float kv_element(const E* p, index_t i) {
  if constexpr (std::is_same_v<E, float>) return p[i];
  else return float(p[i]);  // bf16: exact widening; int8: the integer, scaled by the caller
}

// segments: device copies of the call's segments; blockIdx.y picks one (a
// grid-stride over segments beyond gridDim.y), blockIdx.x and the warp pick
// (row in the segment, head).
template <class E>
__global__ void cached_attention_kernel(tensor_view<const float, 3> q, const attention_segment<const E>* segments,
                                        index_t segment_count, tensor_view<float, 3> out, float scale) {
  constexpr bool quantized = std::is_same_v<E, std::int8_t>;
  constexpr unsigned all_lanes = 0xffffffffu;
  extern __shared__ float staged_queries[];  // (warps, D)
  const index_t heads = q.extent(1), d = q.extent(2);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  float* qs = staged_queries + index_t(warp) * d;

  for (index_t s = blockIdx.y; s < segment_count; s += gridDim.y) {
    const attention_segment<const E> seg = segments[s];
    const index_t item = index_t(blockIdx.x) * cached_attention_warps + warp;
    if (item >= seg.rows * heads) continue;  // the whole warp: item is per warp
    const index_t t = item / heads, h = item % heads;
    const index_t row = seg.first_row + t, p = seg.start + t;
    const index_t g = h / (heads / seg.kv.kv_heads);  // GQA / MQA: kv head of query head h
    const index_t k0 = seg.window > 0 && p - seg.window + 1 > 0 ? p - seg.window + 1 : 0;

    for (index_t c = lane; c < d; c += 32) qs[c] = q(row, h, c);
    __syncwarp();

    float maximum = -::cuda::std::numeric_limits<float>::infinity(), sum = 0.0f;
    float acc[cached_attention_channels];
#pragma unroll
    for (int i = 0; i < cached_attention_channels; ++i) acc[i] = 0.0f;

    for (index_t base = k0; base <= p; base += 32) {
      const index_t j = base + lane;
      const bool valid = j <= p;
      const int count = int(p - base + 1 < 32 ? p - base + 1 : 32);  // keys in this tile, the same in every lane
      long long at = 0;  // element offset of key j (the same for its value)
      float score = -::cuda::std::numeric_limits<float>::infinity(), value_scale = 1.0f;
      if (valid) {
        at = (long long)seg.kv.offset(j, g);
        const E* key = seg.kv.k + at;
        float dot = 0.0f;
        for (index_t c = 0; c < d; ++c) dot += qs[c] * kv_element(key, c);
        if constexpr (quantized) {
          const index_t scale_at = seg.kv.scale_offset(j, g);
          dot *= seg.kv.k_scale[scale_at];
          value_scale = seg.kv.v_scale[scale_at];
        }
        score = dot * scale;
      }
      // The tile holds key base (lane 0 is valid), so its maximum is finite.
      const float new_maximum = fmaxf(maximum, warp_max(score));
      const float correction = expf(maximum - new_maximum);  // 0 for the first tile (maximum = -inf)
      const float weight = valid ? expf(score - new_maximum) : 0.0f;
      sum = sum * correction + warp_sum(weight);
      maximum = new_maximum;
#pragma unroll
      for (int i = 0; i < cached_attention_channels; ++i) acc[i] *= correction;
      const float scaled_weight = weight * value_scale;  // int8: the value's scale folded into its weight
      for (int kk = 0; kk < count; ++kk) {
        const float w = __shfl_sync(all_lanes, scaled_weight, kk);
        const E* value = seg.kv.v + __shfl_sync(all_lanes, at, kk);
#pragma unroll
        for (int i = 0; i < cached_attention_channels; ++i) {
          const index_t c = lane + 32 * i;
          if (c < d) acc[i] += w * kv_element(value, c);
        }
      }
    }
    const float inverse = 1.0f / sum;
#pragma unroll
    for (int i = 0; i < cached_attention_channels; ++i) {
      const index_t c = lane + 32 * i;
      if (c < d) out(row, h, c) = acc[i] * inverse;
    }
    __syncwarp();  // every lane has read qs before the next segment stages its query there
  }
}

}  // namespace detail

/// Causal attention over a KV cache for the rows of many sequences at once
/// (ops::cached_attention, which has checked the segments against q): the
/// segments' layouts point to device memory (keys, values, scales, block
/// tables); q (N, H, D) and out (N, H, D) are device views, any strides. The
/// descriptors are copied to stream-ordered scratch for the kernel; the
/// host reads only their fields. Head dimensions up to
/// cached_attention_max_head_dim.
template <class E>
void cached_attention_impl(const par_t& exec, tensor_view<const float, 3> q,
                           std::span<const attention_segment<const E>> segments, tensor_view<float, 3> out,
                           float scale) {
  const index_t heads = q.extent(1), d = q.extent(2);
  if (d > detail::cached_attention_max_head_dim)
    throw shape_error("ctformer::cached_attention: cuda::par takes head dimensions up to " +
                      std::to_string(detail::cached_attention_max_head_dim) + ", q has shape " + shape_string(q));
  index_t most_rows = 0;
  for (const auto& seg : segments) most_rows = seg.rows > most_rows ? seg.rows : most_rows;
  if (most_rows == 0 || heads == 0 || d == 0) return;
  const index_t count = index_t(segments.size());
  detail::scratch<attention_segment<const E>> device_segments(segments.size(), exec.stream);
  // From pageable host memory the copy returns once the descriptors are
  // staged: the caller may reuse its vector at once.
  CTFORMER_CUDA_CHECK(cudaMemcpyAsync(device_segments.data(), segments.data(), segments.size_bytes(),
                                      cudaMemcpyHostToDevice, exec.stream));
  const index_t items = most_rows * heads;
  const dim3 grid(unsigned((items + detail::cached_attention_warps - 1) / detail::cached_attention_warps),
                  unsigned(count < 65535 ? count : 65535));
  const std::size_t shared = std::size_t(detail::cached_attention_warps) * std::size_t(d) * sizeof(float);
  detail::cached_attention_kernel<E><<<grid, 32 * detail::cached_attention_warps, shared, exec.stream>>>(
      q, device_segments.data(), count, out, scale);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

}  // namespace ctformer::cuda
