// CUDA kernels for copy, fill, convert, add and add_scaled (1-D, any stride).
#pragma once

#include <cstring>
#include <type_traits>

#include "ctformer/core/number_types.hpp"
#include "ctformer/kernels/cuda/common.cuh"

namespace ctformer::cuda {

namespace detail {

template <class T>
__global__ void fill_kernel(T* __restrict__ dst, index_t stride, index_t n, T value) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    dst[i * stride] = value;
}

template <class From, class To>
__global__ void convert_kernel(const From* __restrict__ src, index_t src_stride, To* __restrict__ dst,
                               index_t dst_stride, index_t n) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    dst[i * dst_stride] = number_cast<To>(src[i * src_stride]);
}

// out may alias a or b: each element is read, then written, by one thread.
// (Kernels are templates, even on float, so a header-only library defines them
// once per program however many translation units include it.)
template <class T>
__global__ void add_kernel(const T* a, index_t sa, const T* b, index_t sb, T* out, index_t so, index_t n) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    out[i * so] = a[i * sa] + b[i * sb];
}

template <class T>
__global__ void add_scaled_kernel(T alpha, const T* x, index_t sx, T* y, index_t sy, index_t n) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    y[i * sy] += alpha * x[i * sx];
}

}  // namespace detail

/// dst = src. Either side may be host or device memory (cudaMemcpyDefault,
/// unified addressing): this is how data moves to and from the GPU. Queued on
/// the policy's stream; from pageable host memory the call returns once the
/// source has been read, to pageable host memory once the copy is done.
template <class T>
void copy_impl(const par_t& exec, tensor_view<const T, 1> src, tensor_view<T, 1> dst) {
  const index_t n = src.extent(0);
  if (n == 0) return;
  const index_t ss = n == 1 ? 1 : src.stride(0), ds = n == 1 ? 1 : dst.stride(0);
  if (ss == 1 && ds == 1) {
    CTFORMER_CUDA_CHECK(
        cudaMemcpyAsync(dst.data(), src.data(), std::size_t(n) * sizeof(T), cudaMemcpyDefault, exec.stream));
  } else {
    if (ss < 1 || ds < 1)
      throw shape_error("ctformer::copy: cuda::par copies views with positive strides only, got src stride " +
                        std::to_string(src.stride(0)) + " and dst stride " + std::to_string(dst.stride(0)));
    // A strided 1-D copy is a 2-D copy of n rows of one element each.
    CTFORMER_CUDA_CHECK(cudaMemcpy2DAsync(dst.data(), std::size_t(ds) * sizeof(T), src.data(),
                                          std::size_t(ss) * sizeof(T), sizeof(T), std::size_t(n), cudaMemcpyDefault,
                                          exec.stream));
  }
}

/// dst[i] = value (device memory).
template <class T>
void fill_impl(const par_t& exec, tensor_view<T, 1> dst, T value) {
  const index_t n = dst.extent(0);
  if (n == 0) return;
  detail::fill_kernel<<<detail::elementwise_grid(n), detail::elementwise_block, 0, exec.stream>>>(
      dst.data(), dst.stride(0), n, value);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

/// dst[i] = To(src[i]), round to nearest even (the same conversions as the host).
template <number_type From, number_type To>
void convert_impl(const par_t& exec, tensor_view<const From, 1> src, tensor_view<To, 1> dst) {
  const index_t n = src.extent(0);
  if (n == 0) return;
  detail::convert_kernel<<<detail::elementwise_grid(n), detail::elementwise_block, 0, exec.stream>>>(
      src.data(), src.stride(0), dst.data(), dst.stride(0), n);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

inline void add_impl(const par_t& exec, tensor_view<const float, 1> a, tensor_view<const float, 1> b,
                     tensor_view<float, 1> out) {
  const index_t n = a.extent(0);
  if (n == 0) return;
  detail::add_kernel<<<detail::elementwise_grid(n), detail::elementwise_block, 0, exec.stream>>>(
      a.data(), a.stride(0), b.data(), b.stride(0), out.data(), out.stride(0), n);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

inline void add_scaled_impl(const par_t& exec, float alpha, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  const index_t n = x.extent(0);
  if (n == 0) return;
  detail::add_scaled_kernel<<<detail::elementwise_grid(n), detail::elementwise_block, 0, exec.stream>>>(
      alpha, x.data(), x.stride(0), y.data(), y.stride(0), n);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

}  // namespace ctformer::cuda
