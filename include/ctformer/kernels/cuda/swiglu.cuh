// CUDA kernels for the SwiGLU gate: out = silu(gate) * up, and its backward.
#pragma once

#include "ctformer/kernels/cuda/common.cuh"

namespace ctformer::cuda {

namespace detail {

// gate_up: (N, 2F), gate in columns [0, F), up in [F, 2F); out: (N, F).
template <class T = float>
__global__ void swiglu_forward_kernel(const T* gate_up, index_t sg0, index_t sg1, T* out, index_t so0, index_t so1,
                                      index_t n, index_t f) {
  const index_t total = n * f;
  for (index_t k = index_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += index_t(gridDim.x) * blockDim.x) {
    const index_t i = k / f, j = k % f;
    const T gate = gate_up[i * sg0 + j * sg1], up = gate_up[i * sg0 + (j + f) * sg1];
    out[i * so0 + j * so1] = gate / (1.0f + expf(-gate)) * up;
  }
}

// dgate_up (N, 2F), overwritten; one thread reads gate, up and dout before it
// writes the two gradient elements of the same (i, j).
template <class T = float>
__global__ void swiglu_backward_kernel(const T* gate_up, index_t sg0, index_t sg1, const T* dout, index_t sd0,
                                       index_t sd1, T* dgate_up, index_t sdg0, index_t sdg1, index_t n, index_t f) {
  const index_t total = n * f;
  for (index_t k = index_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += index_t(gridDim.x) * blockDim.x) {
    const index_t i = k / f, j = k % f;
    const T gate = gate_up[i * sg0 + j * sg1], up = gate_up[i * sg0 + (j + f) * sg1], d = dout[i * sd0 + j * sd1];
    const T sigmoid = 1.0f / (1.0f + expf(-gate));
    dgate_up[i * sdg0 + j * sdg1] = d * up * sigmoid * (1.0f + gate * (1.0f - sigmoid));
    dgate_up[i * sdg0 + (j + f) * sdg1] = d * gate * sigmoid;
  }
}

}  // namespace detail

inline void swiglu_forward_impl(const par_t& exec, tensor_view<const float, 2> gate_up, tensor_view<float, 2> out) {
  const index_t n = out.extent(0), f = out.extent(1);
  if (n == 0 || f == 0) return;
  detail::swiglu_forward_kernel<float><<<detail::elementwise_grid(n * f), detail::elementwise_block, 0, exec.stream>>>(
      gate_up.data(), gate_up.stride(0), gate_up.stride(1), out.data(), out.stride(0), out.stride(1), n, f);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

inline void swiglu_backward_impl(const par_t& exec, tensor_view<const float, 2> gate_up,
                                 tensor_view<const float, 2> dout, tensor_view<float, 2> dgate_up) {
  const index_t n = dout.extent(0), f = dout.extent(1);
  if (n == 0 || f == 0) return;
  detail::swiglu_backward_kernel<float><<<detail::elementwise_grid(n * f), detail::elementwise_block, 0,
                                          exec.stream>>>(gate_up.data(), gate_up.stride(0), gate_up.stride(1),
                                                         dout.data(), dout.stride(0), dout.stride(1), dgate_up.data(),
                                                         dgate_up.stride(0), dgate_up.stride(1), n, f);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

}  // namespace ctformer::cuda
