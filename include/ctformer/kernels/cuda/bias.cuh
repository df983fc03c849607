// CUDA kernels for adding a bias to every row and for its gradient (a column
// sum, deterministic: per-row-group partials summed in a fixed order, no atomics).
#pragma once

#include "ctformer/kernels/cuda/norm.cuh"

namespace ctformer::cuda {

namespace detail {

template <class T = float>
__global__ void add_bias_kernel(T* y, index_t sy0, index_t sy1, const T* bias, index_t sb, index_t n, index_t o) {
  const index_t total = n * o;
  for (index_t k = index_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += index_t(gridDim.x) * blockDim.x) {
    const index_t i = k / o, j = k % o;
    y[i * sy0 + j * sy1] += bias[j * sb];
  }
}

// partial[g * o + j] = sum of dy(i, j) over rows i = g, g + G, ... (in order); grid.y = G.
template <class T = float>
__global__ void column_partials_kernel(const T* dy, index_t s0, index_t s1, index_t n, index_t o, T* partial) {
  const index_t groups = gridDim.y, g = blockIdx.y;
  for (index_t j = index_t(blockIdx.x) * blockDim.x + threadIdx.x; j < o; j += index_t(gridDim.x) * blockDim.x) {
    T sum = 0;
    for (index_t i = g; i < n; i += groups) sum += dy[i * s0 + j * s1];
    partial[g * o + j] = sum;
  }
}

}  // namespace detail

// y: (N, O) += bias: (O) on every row
inline void add_bias_impl(const par_t& exec, tensor_view<float, 2> y, tensor_view<const float, 1> bias) {
  const index_t n = y.extent(0), o = y.extent(1);
  if (n == 0 || o == 0) return;
  detail::add_bias_kernel<float><<<detail::elementwise_grid(n * o), detail::elementwise_block, 0, exec.stream>>>(
      y.data(), y.stride(0), y.stride(1), bias.data(), bias.stride(0), n, o);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

// dbias: (O) += column sums of dy: (N, O)
inline void bias_backward_impl(const par_t& exec, tensor_view<const float, 2> dy, tensor_view<float, 1> dbias) {
  const index_t n = dy.extent(0), o = dy.extent(1);
  if (n == 0 || o == 0) return;
  const index_t groups = n < 64 ? n : 64;
  detail::scratch<float> partial(std::size_t(groups * o), exec.stream);
  const dim3 grid(unsigned((o + detail::elementwise_block - 1) / detail::elementwise_block < 1024
                               ? (o + detail::elementwise_block - 1) / detail::elementwise_block
                               : 1024),
                  unsigned(groups));
  detail::column_partials_kernel<float><<<grid, detail::elementwise_block, 0, exec.stream>>>(
      dy.data(), dy.stride(0), dy.stride(1), n, o, partial.data());
  CTFORMER_CUDA_CHECK_LAUNCH();
  detail::add_partials(exec, partial.data(), groups, o, dbias);
}

}  // namespace ctformer::cuda
