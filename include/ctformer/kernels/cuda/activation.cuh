// CUDA kernels for GELU (tanh form) and SiLU, forward and backward (1-D, any stride).
#pragma once

#include "ctformer/kernels/cuda/common.cuh"

namespace ctformer::cuda {

namespace detail {

inline constexpr float sqrt_2_over_pi = 0.7978845608028654f;
inline constexpr float gelu_cubic = 0.044715f;

struct gelu_forward_op {
  __device__ float operator()(float v) const {
    return 0.5f * v * (1.0f + tanhf(sqrt_2_over_pi * (v + gelu_cubic * v * v * v)));
  }
};
struct gelu_backward_op {
  __device__ float operator()(float v, float dy) const {
    const float t = tanhf(sqrt_2_over_pi * (v + gelu_cubic * v * v * v));
    const float sech2 = 1.0f - t * t;
    return dy * (0.5f * (1.0f + t) + 0.5f * v * sech2 * sqrt_2_over_pi * (1.0f + 3.0f * gelu_cubic * v * v));
  }
};
struct silu_forward_op {
  __device__ float operator()(float v) const { return v / (1.0f + expf(-v)); }
};
struct silu_backward_op {
  __device__ float operator()(float v, float dy) const {
    const float sigmoid = 1.0f / (1.0f + expf(-v));
    return dy * sigmoid * (1.0f + v * (1.0f - sigmoid));
  }
};

// y may alias x (and dx may alias dy): one thread reads an element, then writes it.
template <class Op>
__global__ void unary_kernel(Op op, const float* x, index_t sx, float* y, index_t sy, index_t n) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    y[i * sy] = op(x[i * sx]);
}

template <class Op>
__global__ void binary_kernel(Op op, const float* x, index_t sx, const float* dy, index_t sdy, float* dx, index_t sdx,
                              index_t n) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    dx[i * sdx] = op(x[i * sx], dy[i * sdy]);
}

template <class Op>
void launch_unary(const par_t& exec, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  const index_t n = x.extent(0);
  if (n == 0) return;
  unary_kernel<<<elementwise_grid(n), elementwise_block, 0, exec.stream>>>(Op{}, x.data(), x.stride(0), y.data(),
                                                                           y.stride(0), n);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

template <class Op>
void launch_binary(const par_t& exec, tensor_view<const float, 1> x, tensor_view<const float, 1> dy,
                   tensor_view<float, 1> dx) {
  const index_t n = x.extent(0);
  if (n == 0) return;
  binary_kernel<<<elementwise_grid(n), elementwise_block, 0, exec.stream>>>(
      Op{}, x.data(), x.stride(0), dy.data(), dy.stride(0), dx.data(), dx.stride(0), n);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

}  // namespace detail

// x, y, dy, dx: (n)
inline void gelu_forward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  detail::launch_unary<detail::gelu_forward_op>(exec, x, y);
}

inline void gelu_backward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<const float, 1> dy,
                               tensor_view<float, 1> dx) {
  detail::launch_binary<detail::gelu_backward_op>(exec, x, dy, dx);
}

inline void silu_forward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  detail::launch_unary<detail::silu_forward_op>(exec, x, y);
}

inline void silu_backward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<const float, 1> dy,
                               tensor_view<float, 1> dx) {
  detail::launch_binary<detail::silu_backward_op>(exec, x, dy, dx);
}

}  // namespace ctformer::cuda
