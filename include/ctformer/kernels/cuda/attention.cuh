// CUDA kernels for causal multi-head attention (MHA, GQA, MQA) in the
// training form (forward saves the probabilities, backward reads them), and
// rotary position embeddings. Straightforward kernels, the reference the
// fused (online-softmax) attention will be checked against:
//   forward:  one warp per (b, h, query i): scores, softmax, p v;
//   backward: one warp per (b, h, i) for dscores and dq, then one thread per
//             (b, key j, kv head g, channel c) summing dk and dv over the
//             group's heads and queries i >= j in a fixed order (deterministic,
//             no atomics). dscores live in stream-ordered scratch (B, H, T, T).
#pragma once

#include <cuda/std/limits>

#include "ctformer/kernels/cuda/softmax.cuh"

namespace ctformer::cuda {

namespace detail {

inline constexpr int attention_block = 128;  // 4 warps: 4 query rows per block

// q: (B, T, H, D); k, v: (B, T, KV, D); out: (B, T, H, D); probs: (B, H, T, T).
// Query i attends to keys [first, i], first = max(0, i - window + 1) (0 without a window).
template <class T = float>
__global__ void attention_forward_kernel(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                         tensor_view<const T, 4> v, tensor_view<T, 4> out, tensor_view<T, 4> probs,
                                         float scale, index_t group, index_t window) {
  const index_t batch = q.extent(0), t_len = q.extent(1), heads = q.extent(2), d = q.extent(3);
  const index_t row = index_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= batch * heads * t_len) return;
  const index_t i = row % t_len, h = (row / t_len) % heads, b = row / (t_len * heads), g = h / group;
  const index_t first = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;

  float maximum = -::cuda::std::numeric_limits<float>::infinity();
  for (index_t j = first + lane; j <= i; j += 32) {
    float score = 0.0f;
    for (index_t c = 0; c < d; ++c) score += q(b, i, h, c) * k(b, j, g, c);
    score *= scale;
    probs(b, h, i, j) = score;
    maximum = fmaxf(maximum, score);
  }
  maximum = warp_max(maximum);
  float sum = 0.0f;
  for (index_t j = first + lane; j <= i; j += 32) {
    const float e = expf(probs(b, h, i, j) - maximum);
    probs(b, h, i, j) = e;
    sum += e;
  }
  sum = warp_sum(sum);
  const float inverse = 1.0f / sum;
  for (index_t j = first + lane; j <= i; j += 32) probs(b, h, i, j) *= inverse;
  for (index_t j = lane; j < first; j += 32) probs(b, h, i, j) = 0.0f;
  for (index_t j = i + 1 + lane; j < t_len; j += 32) probs(b, h, i, j) = 0.0f;
  __syncwarp();  // every lane's probabilities are visible to the whole warp
  for (index_t c = lane; c < d; c += 32) {
    float acc = 0.0f;
    for (index_t j = first; j <= i; ++j) acc += probs(b, h, i, j) * v(b, j, g, c);
    out(b, i, h, c) = acc;
  }
}

// dscores(b, h, i, j) = scale * p * (dout_i . v_j - sum_j' p dout_i . v_j'), and dq_i = sum_j dscores k_j.
template <class T = float>
__global__ void attention_backward_query_kernel(tensor_view<const T, 4> dout, tensor_view<const T, 4> k,
                                                tensor_view<const T, 4> v, tensor_view<const T, 4> probs,
                                                tensor_view<T, 4> dq, T* dscores, float scale, index_t group) {
  const index_t batch = dout.extent(0), t_len = dout.extent(1), heads = dout.extent(2), d = dout.extent(3);
  const index_t row = index_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= batch * heads * t_len) return;
  const index_t i = row % t_len, h = (row / t_len) % heads, b = row / (t_len * heads), g = h / group;
  T* ds = dscores + ((b * heads + h) * t_len + i) * t_len;

  float weighted = 0.0f;
  for (index_t j = lane; j <= i; j += 32) {
    float dp = 0.0f;
    for (index_t c = 0; c < d; ++c) dp += dout(b, i, h, c) * v(b, j, g, c);
    ds[j] = dp;
    weighted += probs(b, h, i, j) * dp;
  }
  weighted = warp_sum(weighted);
  for (index_t j = lane; j <= i; j += 32) ds[j] = scale * probs(b, h, i, j) * (ds[j] - weighted);
  for (index_t j = i + 1 + lane; j < t_len; j += 32) ds[j] = 0.0f;
  __syncwarp();
  for (index_t c = lane; c < d; c += 32) {
    float acc = 0.0f;
    for (index_t j = 0; j <= i; ++j) acc += ds[j] * k(b, j, g, c);
    dq(b, i, h, c) = acc;
  }
}

// dk(b, j, g, c) = sum over heads h of group g and queries i >= j of dscores(b, h, i, j) q(b, i, h, c);
// dv(b, j, g, c) = the same sum of probs(b, h, i, j) dout(b, i, h, c). Overwritten.
template <class T = float>
__global__ void attention_backward_key_kernel(tensor_view<const T, 4> dout, tensor_view<const T, 4> q,
                                              tensor_view<const T, 4> probs, const T* dscores, tensor_view<T, 4> dk,
                                              tensor_view<T, 4> dv, index_t heads, index_t group) {
  const index_t batch = dk.extent(0), t_len = dk.extent(1), kv_heads = dk.extent(2), d = dk.extent(3);
  const index_t total = batch * t_len * kv_heads * d;
  for (index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += index_t(gridDim.x) * blockDim.x) {
    const index_t c = e % d, g = (e / d) % kv_heads, j = (e / (d * kv_heads)) % t_len, b = e / (d * kv_heads * t_len);
    float dk_acc = 0.0f, dv_acc = 0.0f;
    for (index_t h = g * group; h < (g + 1) * group; ++h) {
      const T* ds = dscores + (b * heads + h) * t_len * t_len;
      for (index_t i = j; i < t_len; ++i) {
        dk_acc += ds[i * t_len + j] * q(b, i, h, c);
        dv_acc += probs(b, h, i, j) * dout(b, i, h, c);
      }
    }
    dk(b, j, g, c) = dk_acc;
    dv(b, j, g, c) = dv_acc;
  }
}

// x: (B, T, H, D) rotated in place; cos/sin tables: (S, D/2).
template <class T = float>
__global__ void rope_rotate_kernel(tensor_view<T, 4> x, tensor_view<const T, 2> cos_table,
                                   tensor_view<const T, 2> sin_table, index_t position_offset, float sign) {
  const index_t batch = x.extent(0), t_len = x.extent(1), heads = x.extent(2), half = x.extent(3) / 2;
  const index_t total = batch * t_len * heads * half;
  for (index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += index_t(gridDim.x) * blockDim.x) {
    const index_t c = e % half, h = (e / half) % heads, t = (e / (half * heads)) % t_len,
                  b = e / (half * heads * t_len);
    const float cs = cos_table(position_offset + t, c), s = sign * sin_table(position_offset + t, c);
    const float x1 = x(b, t, h, c), x2 = x(b, t, h, c + half);
    x(b, t, h, c) = x1 * cs - x2 * s;
    x(b, t, h, c + half) = x2 * cs + x1 * s;
  }
}

// x: (N, H, D) rotated in place, row i at position positions[i]; tables (S, D/2).
template <class T = float>
__global__ void rope_rotate_rows_kernel(tensor_view<T, 3> x, tensor_view<const T, 2> cos_table,
                                        tensor_view<const T, 2> sin_table, tensor_view<const std::int32_t, 1> positions,
                                        float sign) {
  const index_t rows = x.extent(0), heads = x.extent(1), half = x.extent(2) / 2;
  const index_t total = rows * heads * half;
  for (index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += index_t(gridDim.x) * blockDim.x) {
    const index_t c = e % half, h = (e / half) % heads, i = e / (half * heads);
    const index_t pos = positions(i);
    const float cs = cos_table(pos, c), s = sign * sin_table(pos, c);
    const float x1 = x(i, h, c), x2 = x(i, h, c + half);
    x(i, h, c) = x1 * cs - x2 * s;
    x(i, h, c + half) = x2 * cs + x1 * s;
  }
}

inline unsigned warp_rows_grid(index_t rows, int block) {
  const index_t per_block = block / 32;
  return unsigned((rows + per_block - 1) / per_block);
}

}  // namespace detail

// q: (B, T, H, D); k, v: (B, T, KV, D); out: (B, T, H, D); probs: (B, H, T, T)
inline void causal_attention_forward_impl(const par_t& exec, tensor_view<const float, 4> q,
                                          tensor_view<const float, 4> k, tensor_view<const float, 4> v,
                                          tensor_view<float, 4> out, tensor_view<float, 4> probs, float scale,
                                          index_t window) {
  const index_t rows = q.extent(0) * q.extent(2) * q.extent(1);
  if (rows == 0) return;
  const index_t group = q.extent(2) / k.extent(2);
  detail::attention_forward_kernel<float><<<detail::warp_rows_grid(rows, detail::attention_block),
                                            detail::attention_block, 0, exec.stream>>>(q, k, v, out, probs, scale,
                                                                                        group, window);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

// dout, q, dq: (B, T, H, D); k, v, dk, dv: (B, T, KV, D); probs: (B, H, T, T). dq, dk, dv overwritten.
inline void causal_attention_backward_impl(const par_t& exec, tensor_view<const float, 4> dout,
                                           tensor_view<const float, 4> q, tensor_view<const float, 4> k,
                                           tensor_view<const float, 4> v, tensor_view<const float, 4> probs,
                                           tensor_view<float, 4> dq, tensor_view<float, 4> dk,
                                           tensor_view<float, 4> dv, float scale) {
  const index_t batch = q.extent(0), t_len = q.extent(1), heads = q.extent(2);
  const index_t rows = batch * heads * t_len;
  if (rows == 0) return;
  const index_t group = heads / k.extent(2);
  detail::scratch<float> dscores(std::size_t(rows * t_len), exec.stream);
  detail::attention_backward_query_kernel<float><<<detail::warp_rows_grid(rows, detail::attention_block),
                                                   detail::attention_block, 0, exec.stream>>>(
      dout, k, v, probs, dq, dscores.data(), scale, group);
  CTFORMER_CUDA_CHECK_LAUNCH();
  const index_t key_elements = dk.size();
  if (key_elements == 0) return;
  detail::attention_backward_key_kernel<float><<<detail::elementwise_grid(key_elements), detail::elementwise_block, 0,
                                                 exec.stream>>>(dout, q, probs, dscores.data(), dk, dv, heads, group);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

// x: (B, T, H, D) in place; direction -1 is the inverse rotation (the backward).
inline void rope_rotate_impl(const par_t& exec, tensor_view<float, 4> x, tensor_view<const float, 2> cos_table,
                             tensor_view<const float, 2> sin_table, index_t position_offset, int direction) {
  const index_t total = x.extent(0) * x.extent(1) * x.extent(2) * (x.extent(3) / 2);
  if (total == 0) return;
  detail::rope_rotate_kernel<float><<<detail::elementwise_grid(total), detail::elementwise_block, 0, exec.stream>>>(
      x, cos_table, sin_table, position_offset, direction >= 0 ? 1.0f : -1.0f);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

// x: (N, H, D); positions: (N) in device memory, validated by the caller.
inline void rope_rotate_rows_impl(const par_t& exec, tensor_view<float, 3> x, tensor_view<const float, 2> cos_table,
                                  tensor_view<const float, 2> sin_table, tensor_view<const std::int32_t, 1> positions,
                                  int direction) {
  const index_t total = x.extent(0) * x.extent(1) * (x.extent(2) / 2);
  if (total == 0) return;
  detail::rope_rotate_rows_kernel<float><<<detail::elementwise_grid(total), detail::elementwise_block, 0,
                                           exec.stream>>>(x, cos_table, sin_table, positions,
                                                          direction >= 0 ? 1.0f : -1.0f);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

}  // namespace ctformer::cuda
