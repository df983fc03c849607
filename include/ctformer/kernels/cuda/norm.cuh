// CUDA kernels for layer_norm and rms_norm, forward and backward.
//
// Forward: one block per row, row sums with cub::BlockReduce.
// Backward: dx per row as in the forward; the parameter gradients (sums over
// rows) are deterministic, with no atomics: block g of a fixed grid of
// G = min(N, 256) blocks takes rows g, g + G, ... and accumulates its own
// partial row (G, C) in stream-ordered scratch memory; a second kernel adds
// the G partials of each column in order g = 0..G-1 into dweight/dbias (+=).
// G depends on N only, so the result is bitwise the same on every run and
// every GPU.
#pragma once

#include <cub/block/block_reduce.cuh>

#include "ctformer/kernels/cuda/common.cuh"

namespace ctformer::cuda {

namespace detail {

inline constexpr int norm_block = 256;
inline constexpr index_t norm_backward_groups = 256;

struct float2_sum {
  __device__ float2 operator()(const float2& a, const float2& b) const { return make_float2(a.x + b.x, a.y + b.y); }
};

// x, y: rows of c (row strides sx, sy; unit inner stride); y may alias x.
template <int Block>
__global__ void __launch_bounds__(Block)
    layer_norm_forward_kernel(const float* x, index_t sx, const float* weight, index_t sw, const float* bias,
                              index_t sb, float* y, index_t sy, float* mean, index_t sm, float* rstd, index_t sr,
                              index_t c, float eps) {
  using reduce = cub::BlockReduce<float, Block>;
  __shared__ typename reduce::TempStorage temp;
  __shared__ float shared_mean, shared_rstd;
  const index_t row = blockIdx.x;
  const float* xr = x + row * sx;
  float* yr = y + row * sy;

  float sum = 0.0f;
  for (index_t j = threadIdx.x; j < c; j += Block) sum += xr[j];
  sum = reduce(temp).Sum(sum);
  if (threadIdx.x == 0) shared_mean = sum / float(c);
  __syncthreads();
  const float m = shared_mean;

  float var = 0.0f;
  for (index_t j = threadIdx.x; j < c; j += Block) {
    const float d = xr[j] - m;
    var += d * d;
  }
  var = reduce(temp).Sum(var);
  if (threadIdx.x == 0) shared_rstd = 1.0f / sqrtf(var / float(c) + eps);
  __syncthreads();
  const float s = shared_rstd;

  for (index_t j = threadIdx.x; j < c; j += Block) yr[j] = (xr[j] - m) * s * weight[j * sw] + bias[j * sb];
  if (threadIdx.x == 0) {
    mean[row * sm] = m;
    rstd[row * sr] = s;
  }
}

// dx per row; block g accumulates rows g, g + G, ... into its partial rows
// dweight_partial[g], dbias_partial[g] (each of c floats). dx may alias dy.
template <int Block>
__global__ void __launch_bounds__(Block)
    layer_norm_backward_kernel(const float* dy, index_t sdy, const float* x, index_t sx, const float* weight,
                               index_t sw, const float* mean, index_t sm, const float* rstd, index_t sr, float* dx,
                               index_t sdx, float* dweight_partial, float* dbias_partial, index_t n, index_t c) {
  using reduce = cub::BlockReduce<float2, Block>;
  __shared__ typename reduce::TempStorage temp;
  __shared__ float2 shared_sums;
  float* dwp = dweight_partial + index_t(blockIdx.x) * c;
  float* dbp = dbias_partial + index_t(blockIdx.x) * c;
  for (index_t j = threadIdx.x; j < c; j += Block) {
    dwp[j] = 0.0f;
    dbp[j] = 0.0f;
  }
  for (index_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float* xr = x + row * sx;
    const float* dyr = dy + row * sdy;
    float* dxr = dx + row * sdx;
    const float m = mean[row * sm], s = rstd[row * sr];
    float2 sums = make_float2(0.0f, 0.0f);  // sum(dy w), sum(dy w xhat)
    for (index_t j = threadIdx.x; j < c; j += Block) {
      const float xhat = (xr[j] - m) * s;
      const float dyw = dyr[j] * weight[j * sw];
      sums.x += dyw;
      sums.y += dyw * xhat;
      dwp[j] += dyr[j] * xhat;
      dbp[j] += dyr[j];
    }
    sums = reduce(temp).Reduce(sums, float2_sum{});
    if (threadIdx.x == 0) shared_sums = sums;
    __syncthreads();
    const float mean_dyw = shared_sums.x / float(c), mean_dyw_xhat = shared_sums.y / float(c);
    for (index_t j = threadIdx.x; j < c; j += Block) {
      const float xhat = (xr[j] - m) * s;
      dxr[j] = (dyr[j] * weight[j * sw] - mean_dyw - xhat * mean_dyw_xhat) * s;
    }
    __syncthreads();  // shared_sums and temp are reused by the next row
  }
}

template <int Block>
__global__ void __launch_bounds__(Block)
    rms_norm_forward_kernel(const float* x, index_t sx, const float* weight, index_t sw, float* y, index_t sy,
                            float* rstd, index_t sr, index_t c, float eps) {
  using reduce = cub::BlockReduce<float, Block>;
  __shared__ typename reduce::TempStorage temp;
  __shared__ float shared_rstd;
  const index_t row = blockIdx.x;
  const float* xr = x + row * sx;
  float* yr = y + row * sy;
  float sum_squares = 0.0f;
  for (index_t j = threadIdx.x; j < c; j += Block) sum_squares += xr[j] * xr[j];
  sum_squares = reduce(temp).Sum(sum_squares);
  if (threadIdx.x == 0) shared_rstd = 1.0f / sqrtf(sum_squares / float(c) + eps);
  __syncthreads();
  const float s = shared_rstd;
  for (index_t j = threadIdx.x; j < c; j += Block) yr[j] = xr[j] * s * weight[j * sw];
  if (threadIdx.x == 0) rstd[row * sr] = s;
}

template <int Block>
__global__ void __launch_bounds__(Block)
    rms_norm_backward_kernel(const float* dy, index_t sdy, const float* x, index_t sx, const float* weight, index_t sw,
                             const float* rstd, index_t sr, float* dx, index_t sdx, float* dweight_partial, index_t n,
                             index_t c) {
  using reduce = cub::BlockReduce<float, Block>;
  __shared__ typename reduce::TempStorage temp;
  __shared__ float shared_sum;
  float* dwp = dweight_partial + index_t(blockIdx.x) * c;
  for (index_t j = threadIdx.x; j < c; j += Block) dwp[j] = 0.0f;
  for (index_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float* xr = x + row * sx;
    const float* dyr = dy + row * sdy;
    float* dxr = dx + row * sdx;
    const float s = rstd[row * sr];
    float sum_dyw_xhat = 0.0f;
    for (index_t j = threadIdx.x; j < c; j += Block) {
      const float xhat = xr[j] * s;
      sum_dyw_xhat += dyr[j] * weight[j * sw] * xhat;
      dwp[j] += dyr[j] * xhat;
    }
    sum_dyw_xhat = reduce(temp).Sum(sum_dyw_xhat);
    if (threadIdx.x == 0) shared_sum = sum_dyw_xhat;
    __syncthreads();
    const float mean_dyw_xhat = shared_sum / float(c);
    for (index_t j = threadIdx.x; j < c; j += Block)
      dxr[j] = (dyr[j] * weight[j * sw] - xr[j] * s * mean_dyw_xhat) * s;
    __syncthreads();
  }
}

// out[j * so] += sum over g of partial[g * c + j], g in order: deterministic.
template <class T = float>
__global__ void sum_partials_kernel(const T* partial, index_t groups, index_t c, T* out, index_t so) {
  for (index_t j = index_t(blockIdx.x) * blockDim.x + threadIdx.x; j < c; j += index_t(gridDim.x) * blockDim.x) {
    T sum = 0;
    for (index_t g = 0; g < groups; ++g) sum += partial[g * c + j];
    out[j * so] += sum;
  }
}

inline void add_partials(const par_t& exec, const float* partial, index_t groups, index_t c, tensor_view<float, 1> out) {
  sum_partials_kernel<float><<<elementwise_grid(c), elementwise_block, 0, exec.stream>>>(partial, groups, c, out.data(),
                                                                                       out.stride(0));
  CTFORMER_CUDA_CHECK_LAUNCH();
}

}  // namespace detail

// x, y: (N, C); weight, bias: (C); mean, rstd: (N)
inline void layer_norm_forward_impl(const par_t& exec, tensor_view<const float, 2> x, tensor_view<const float, 1> weight,
                                    tensor_view<const float, 1> bias, tensor_view<float, 2> y,
                                    tensor_view<float, 1> mean, tensor_view<float, 1> rstd, float eps) {
  detail::require_unit_inner_stride("layer_norm_forward", "x", x);
  detail::require_unit_inner_stride("layer_norm_forward", "y", y);
  const index_t n = x.extent(0), c = x.extent(1);
  if (n == 0) return;
  detail::layer_norm_forward_kernel<detail::norm_block><<<unsigned(n), detail::norm_block, 0, exec.stream>>>(
      x.data(), x.stride(0), weight.data(), weight.stride(0), bias.data(), bias.stride(0), y.data(), y.stride(0),
      mean.data(), mean.stride(0), rstd.data(), rstd.stride(0), c, eps);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

// dy, x, dx: (N, C); weight, dweight, dbias: (C); mean, rstd: (N). dx overwritten, dweight/dbias +=.
inline void layer_norm_backward_impl(const par_t& exec, tensor_view<const float, 2> dy, tensor_view<const float, 2> x,
                                     tensor_view<const float, 1> weight, tensor_view<const float, 1> mean,
                                     tensor_view<const float, 1> rstd, tensor_view<float, 2> dx,
                                     tensor_view<float, 1> dweight, tensor_view<float, 1> dbias) {
  detail::require_unit_inner_stride("layer_norm_backward", "x", x);
  detail::require_unit_inner_stride("layer_norm_backward", "dy", dy);
  detail::require_unit_inner_stride("layer_norm_backward", "dx", dx);
  const index_t n = x.extent(0), c = x.extent(1);
  if (n == 0 || c == 0) return;
  const index_t groups = n < detail::norm_backward_groups ? n : detail::norm_backward_groups;
  detail::scratch<float> partial(std::size_t(2 * groups * c), exec.stream);  // dweight partials, then dbias partials
  detail::layer_norm_backward_kernel<detail::norm_block><<<unsigned(groups), detail::norm_block, 0, exec.stream>>>(
      dy.data(), dy.stride(0), x.data(), x.stride(0), weight.data(), weight.stride(0), mean.data(), mean.stride(0),
      rstd.data(), rstd.stride(0), dx.data(), dx.stride(0), partial.data(), partial.data() + groups * c, n, c);
  CTFORMER_CUDA_CHECK_LAUNCH();
  detail::add_partials(exec, partial.data(), groups, c, dweight);
  detail::add_partials(exec, partial.data() + groups * c, groups, c, dbias);
}

// x, y: (N, C); weight: (C); rstd: (N)
inline void rms_norm_forward_impl(const par_t& exec, tensor_view<const float, 2> x, tensor_view<const float, 1> weight,
                                  tensor_view<float, 2> y, tensor_view<float, 1> rstd, float eps) {
  detail::require_unit_inner_stride("rms_norm_forward", "x", x);
  detail::require_unit_inner_stride("rms_norm_forward", "y", y);
  const index_t n = x.extent(0), c = x.extent(1);
  if (n == 0) return;
  detail::rms_norm_forward_kernel<detail::norm_block><<<unsigned(n), detail::norm_block, 0, exec.stream>>>(
      x.data(), x.stride(0), weight.data(), weight.stride(0), y.data(), y.stride(0), rstd.data(), rstd.stride(0), c,
      eps);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

// dy, x, dx: (N, C); weight, dweight: (C); rstd: (N). dx overwritten, dweight +=.
inline void rms_norm_backward_impl(const par_t& exec, tensor_view<const float, 2> dy, tensor_view<const float, 2> x,
                                   tensor_view<const float, 1> weight, tensor_view<const float, 1> rstd,
                                   tensor_view<float, 2> dx, tensor_view<float, 1> dweight) {
  detail::require_unit_inner_stride("rms_norm_backward", "x", x);
  detail::require_unit_inner_stride("rms_norm_backward", "dy", dy);
  detail::require_unit_inner_stride("rms_norm_backward", "dx", dx);
  const index_t n = x.extent(0), c = x.extent(1);
  if (n == 0 || c == 0) return;
  const index_t groups = n < detail::norm_backward_groups ? n : detail::norm_backward_groups;
  detail::scratch<float> partial(std::size_t(groups * c), exec.stream);
  detail::rms_norm_backward_kernel<detail::norm_block><<<unsigned(groups), detail::norm_block, 0, exec.stream>>>(
      dy.data(), dy.stride(0), x.data(), x.stride(0), weight.data(), weight.stride(0), rstd.data(), rstd.stride(0),
      dx.data(), dx.stride(0), partial.data(), n, c);
  CTFORMER_CUDA_CHECK_LAUNCH();
  detail::add_partials(exec, partial.data(), groups, c, dweight);
}

}  // namespace ctformer::cuda
