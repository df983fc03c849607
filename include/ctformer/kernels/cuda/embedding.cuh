// CUDA kernels for embedding lookup and its scatter-add backward.
//
// Token ids outside [0, V): the kernels skip those rows and record the first
// bad position in a device flag; at the end of the call the host reads the
// flag, which synchronises the stream, and throws invalid_input naming the
// token and position as the CPU does (the other rows have been processed).
// The backward adds with atomicAdd, so when a token repeats, the order of
// its additions (and the last bits of the sum) may differ from run to run.
#pragma once

#include <cstdint>

#include "ctformer/kernels/cuda/common.cuh"

namespace ctformer::cuda {

namespace detail {

inline constexpr int embedding_block = 256;

// out[n] = table[tokens[n]]: one block per token (grid-strided), threads over channels.
template <class T = float>
__global__ void embedding_forward_kernel(const std::int32_t* tokens, index_t st, const T* table, index_t stable,
                                         T* out, index_t so, index_t n, index_t v, index_t c,
                                         unsigned long long* bad) {
  for (index_t i = blockIdx.x; i < n; i += gridDim.x) {
    const std::int32_t token = tokens[i * st];
    if (token < 0 || token >= v) {
      if (threadIdx.x == 0) report_bad_index(bad, i);
      continue;
    }
    const T* src = table + index_t(token) * stable;
    T* dst = out + i * so;
    for (index_t j = threadIdx.x; j < c; j += blockDim.x) dst[j] = src[j];
  }
}

// dtable[tokens[n]] += dout[n], one thread per (n, channel).
template <class T = float>
__global__ void embedding_backward_kernel(const std::int32_t* tokens, index_t st, const T* dout, index_t sd,
                                          T* dtable, index_t stable, index_t n, index_t v, index_t c,
                                          unsigned long long* bad) {
  const index_t total = n * c;
  for (index_t k = index_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += index_t(gridDim.x) * blockDim.x) {
    const index_t i = k / c, j = k % c;
    const std::int32_t token = tokens[i * st];
    if (token < 0 || token >= v) {
      if (j == 0) report_bad_index(bad, i);
      continue;
    }
    atomicAdd(dtable + index_t(token) * stable + j, dout[i * sd + j]);
  }
}

inline unsigned rows_grid(index_t rows) { return unsigned(rows < 65536 ? rows : 65536); }

}  // namespace detail

// tokens: (N) int32; table: (V, C); out: (N, C)
inline void embedding_forward_impl(const par_t& exec, tensor_view<const std::int32_t, 1> tokens,
                                   tensor_view<const float, 2> table, tensor_view<float, 2> out) {
  detail::require_unit_inner_stride("embedding_forward", "table", table);
  detail::require_unit_inner_stride("embedding_forward", "out", out);
  const index_t n = tokens.extent(0), v = table.extent(0), c = table.extent(1);
  if (n == 0) return;
  detail::bad_index_flag bad(exec.stream);
  detail::embedding_forward_kernel<float><<<detail::rows_grid(n), detail::embedding_block, 0, exec.stream>>>(
      tokens.data(), tokens.stride(0), table.data(), table.stride(0), out.data(), out.stride(0), n, v, c,
      bad.device());
  CTFORMER_CUDA_CHECK_LAUNCH();
  if (const index_t position = bad.first_bad(); position >= 0)
    detail::throw_bad_index("embedding_forward", "token id", tokens, position, v, exec.stream);
}

// tokens: (N) int32; dout: (N, C); dtable: (V, C), accumulated (+=)
inline void embedding_backward_impl(const par_t& exec, tensor_view<const std::int32_t, 1> tokens,
                                    tensor_view<const float, 2> dout, tensor_view<float, 2> dtable) {
  detail::require_unit_inner_stride("embedding_backward", "dout", dout);
  detail::require_unit_inner_stride("embedding_backward", "dtable", dtable);
  const index_t n = tokens.extent(0), v = dtable.extent(0), c = dtable.extent(1);
  if (n == 0) return;
  detail::bad_index_flag bad(exec.stream);
  if (c > 0) {
    detail::embedding_backward_kernel<float><<<detail::elementwise_grid(n * c), detail::elementwise_block, 0,
                                               exec.stream>>>(tokens.data(), tokens.stride(0), dout.data(),
                                                              dout.stride(0), dtable.data(), dtable.stride(0), n, v, c,
                                                              bad.device());
    CTFORMER_CUDA_CHECK_LAUNCH();
  }
  if (const index_t position = bad.first_bad(); position >= 0)
    detail::throw_bad_index("embedding_backward", "token id", tokens, position, v, exec.stream);
}

}  // namespace ctformer::cuda
