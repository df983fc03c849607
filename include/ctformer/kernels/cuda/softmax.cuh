// CUDA kernels for softmax over the last dimension (optionally causal) and its
// backward: one warp per row, reductions with warp shuffles.
#pragma once

#include <cuda/std/limits>

#include "ctformer/core/softmax_mask.hpp"
#include "ctformer/kernels/cuda/common.cuh"

namespace ctformer::cuda {

namespace detail {

inline constexpr int softmax_block = 256;  // 8 warps: 8 rows per block

__device__ inline float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
__device__ inline float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// x, y: (B, Tq, Tk) with strides (s0, s1, 1); y may alias x (each lane reads
// an element of its row before it writes that element).
template <class T = float>
__global__ void softmax_forward_kernel(const T* x, index_t sx0, index_t sx1, T* y, index_t sy0, index_t sy1,
                                       index_t rows, index_t tq, index_t tk, float scale, bool causal) {
  const index_t row = index_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const index_t b = row / tq, i = row % tq;
  const T* xr = x + b * sx0 + i * sx1;
  T* yr = y + b * sy0 + i * sy1;
  const index_t visible = causal ? i + (tk - tq) + 1 : tk;

  float maximum = -::cuda::std::numeric_limits<float>::infinity();
  for (index_t j = lane; j < visible; j += 32) maximum = fmaxf(maximum, xr[j]);
  maximum = warp_max(maximum);
  float sum = 0.0f;
  for (index_t j = lane; j < visible; j += 32) sum += expf(scale * (xr[j] - maximum));
  sum = warp_sum(sum);
  const float inverse = 1.0f / sum;
  for (index_t j = lane; j < visible; j += 32) yr[j] = expf(scale * (xr[j] - maximum)) * inverse;
  for (index_t j = visible + lane; j < tk; j += 32) yr[j] = 0.0f;
}

// dx = scale * y * (dy - sum(y dy)); dx may alias dy.
template <class T = float>
__global__ void softmax_backward_kernel(const T* y, index_t sy0, index_t sy1, const T* dy, index_t sdy0, index_t sdy1,
                                        T* dx, index_t sdx0, index_t sdx1, index_t rows, index_t tq, index_t tk,
                                        float scale) {
  const index_t row = index_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const index_t b = row / tq, i = row % tq;
  const T* yr = y + b * sy0 + i * sy1;
  const T* dyr = dy + b * sdy0 + i * sdy1;
  T* dxr = dx + b * sdx0 + i * sdx1;
  float dot = 0.0f;
  for (index_t j = lane; j < tk; j += 32) dot += yr[j] * dyr[j];
  dot = warp_sum(dot);
  for (index_t j = lane; j < tk; j += 32) dxr[j] = scale * yr[j] * (dyr[j] - dot);
}

inline unsigned softmax_grid(index_t rows) {
  constexpr int rows_per_block = softmax_block / 32;
  return unsigned((rows + rows_per_block - 1) / rows_per_block);
}

}  // namespace detail

// x, y: (B, Tq, Tk)
inline void softmax_forward_impl(const par_t& exec, tensor_view<const float, 3> x, tensor_view<float, 3> y, float scale,
                                 softmax_mask mask) {
  detail::require_unit_inner_stride("softmax_forward", "x", x);
  detail::require_unit_inner_stride("softmax_forward", "y", y);
  const index_t batch = x.extent(0), tq = x.extent(1), tk = x.extent(2);
  const index_t rows = batch * tq;
  if (rows == 0 || tk == 0) return;
  detail::softmax_forward_kernel<float><<<detail::softmax_grid(rows), detail::softmax_block, 0, exec.stream>>>(
      x.data(), x.stride(0), x.stride(1), y.data(), y.stride(0), y.stride(1), rows, tq, tk, scale,
      mask == softmax_mask::causal);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

// y, dy, dx: (B, Tq, Tk)
inline void softmax_backward_impl(const par_t& exec, tensor_view<const float, 3> y, tensor_view<const float, 3> dy,
                                  tensor_view<float, 3> dx, float scale) {
  detail::require_unit_inner_stride("softmax_backward", "y", y);
  detail::require_unit_inner_stride("softmax_backward", "dy", dy);
  detail::require_unit_inner_stride("softmax_backward", "dx", dx);
  const index_t batch = y.extent(0), tq = y.extent(1), tk = y.extent(2);
  const index_t rows = batch * tq;
  if (rows == 0 || tk == 0) return;
  detail::softmax_backward_kernel<float><<<detail::softmax_grid(rows), detail::softmax_block, 0, exec.stream>>>(
      y.data(), y.stride(0), y.stride(1), dy.data(), dy.stride(0), dy.stride(1), dx.data(), dx.stride(0), dx.stride(1),
      rows, tq, tk, scale);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

}  // namespace ctformer::cuda
