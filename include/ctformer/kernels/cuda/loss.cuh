// CUDA kernels for the fused softmax + cross-entropy loss and its gradient:
// one block per row, max and sum of exponentials in one pass (online
// softmax) reduced with cub::BlockReduce.
//
// Targets >= V: the kernel skips the row and records the first bad position
// in a device flag; the host reads the flag at the end of the call, which
// synchronises the stream, and throws invalid_input as the CPU does (other
// rows have been written by then).
#pragma once

#include <cstdint>

#include <cub/block/block_reduce.cuh>
#include <cuda/std/limits>

#include "ctformer/kernels/cuda/common.cuh"

namespace ctformer::cuda {

namespace detail {

inline constexpr int loss_block = 256;

/// A running maximum and the sum of exp(x - maximum) of the values seen.
struct max_sum {
  float maximum;
  float sum;
};

struct max_sum_merge {
  __device__ max_sum operator()(const max_sum& a, const max_sum& b) const {
    const float m = fmaxf(a.maximum, b.maximum);
    if (m == -::cuda::std::numeric_limits<float>::infinity()) return {m, 0.0f};
    return {m, a.sum * expf(a.maximum - m) + b.sum * expf(b.maximum - m)};
  }
};

// The (max, log-sum-exp shift) of one row, reduced over the block; every
// thread gets maximum + log(sum). Contains __syncthreads: call from all threads.
template <int Block>
__device__ float row_log_sum_exp(const float* row, index_t v) {
  using reduce = cub::BlockReduce<max_sum, Block>;
  __shared__ typename reduce::TempStorage temp;
  __shared__ float shared_shift;
  constexpr float minus_infinity = -::cuda::std::numeric_limits<float>::infinity();
  max_sum acc{minus_infinity, 0.0f};
  for (index_t j = threadIdx.x; j < v; j += Block) {
    const float x = row[j];
    if (x > acc.maximum) {
      acc.sum = acc.sum * expf(acc.maximum - x) + 1.0f;
      acc.maximum = x;
    } else if (acc.maximum != minus_infinity) {
      acc.sum += expf(x - acc.maximum);
    }
  }
  acc = reduce(temp).Reduce(acc, max_sum_merge{});
  if (threadIdx.x == 0) shared_shift = acc.maximum + logf(acc.sum);
  __syncthreads();
  return shared_shift;
}

// logits: (N, V) row stride sl; losses (N) stride so.
template <int Block>
__global__ void __launch_bounds__(Block)
    cross_entropy_forward_kernel(const float* logits, index_t sl, const std::int32_t* targets, index_t st,
                                 float* losses, index_t so, index_t v, unsigned long long* bad) {
  const index_t n = blockIdx.x;
  const std::int32_t target = targets[n * st];
  if (target < 0 || target >= v) {  // uniform over the block
    if (threadIdx.x == 0) {
      losses[n * so] = 0.0f;
      if (target >= v) report_bad_index(bad, n);
    }
    return;
  }
  const float* row = logits + n * sl;
  const float shift = row_log_sum_exp<Block>(row, v);
  if (threadIdx.x == 0) losses[n * so] = shift - row[target];
}

// dlogits = (softmax(logits) - onehot(target)) * grad_scale; dlogits may alias logits.
template <int Block>
__global__ void __launch_bounds__(Block)
    cross_entropy_backward_kernel(const float* logits, index_t sl, const std::int32_t* targets, index_t st,
                                  float grad_scale, float* dlogits, index_t sd, index_t v, unsigned long long* bad) {
  const index_t n = blockIdx.x;
  const std::int32_t target = targets[n * st];
  float* drow = dlogits + n * sd;
  if (target < 0 || target >= v) {
    for (index_t j = threadIdx.x; j < v; j += Block) drow[j] = 0.0f;
    if (threadIdx.x == 0 && target >= v) report_bad_index(bad, n);
    return;
  }
  const float* row = logits + n * sl;
  // Every thread has finished reading the row when this returns (it holds a
  // barrier), so writing drow in place below is safe.
  const float shift = row_log_sum_exp<Block>(row, v);
  for (index_t j = threadIdx.x; j < v; j += Block) {
    const float g = expf(row[j] - shift) * grad_scale;
    drow[j] = j == target ? g - grad_scale : g;
  }
}

}  // namespace detail

// logits: (N, V); targets: (N) int32, negative = ignore; losses: (N)
inline void softmax_cross_entropy_forward_impl(const par_t& exec, tensor_view<const float, 2> logits,
                                               tensor_view<const std::int32_t, 1> targets,
                                               tensor_view<float, 1> losses) {
  detail::require_unit_inner_stride("softmax_cross_entropy_forward", "logits", logits);
  const index_t n = logits.extent(0), v = logits.extent(1);
  if (n == 0) return;
  detail::bad_index_flag bad(exec.stream);
  detail::cross_entropy_forward_kernel<detail::loss_block><<<unsigned(n), detail::loss_block, 0, exec.stream>>>(
      logits.data(), logits.stride(0), targets.data(), targets.stride(0), losses.data(), losses.stride(0), v,
      bad.device());
  CTFORMER_CUDA_CHECK_LAUNCH();
  if (const index_t position = bad.first_bad(); position >= 0)
    detail::throw_bad_index("softmax_cross_entropy_forward", "target", targets, position, v, exec.stream);
}

// logits, dlogits: (N, V); targets: (N)
inline void softmax_cross_entropy_backward_impl(const par_t& exec, tensor_view<const float, 2> logits,
                                                tensor_view<const std::int32_t, 1> targets, float grad_scale,
                                                tensor_view<float, 2> dlogits) {
  detail::require_unit_inner_stride("softmax_cross_entropy_backward", "logits", logits);
  detail::require_unit_inner_stride("softmax_cross_entropy_backward", "dlogits", dlogits);
  const index_t n = logits.extent(0), v = logits.extent(1);
  if (n == 0) return;
  detail::bad_index_flag bad(exec.stream);
  detail::cross_entropy_backward_kernel<detail::loss_block><<<unsigned(n), detail::loss_block, 0, exec.stream>>>(
      logits.data(), logits.stride(0), targets.data(), targets.stride(0), grad_scale, dlogits.data(),
      dlogits.stride(0), v, bad.device());
  CTFORMER_CUDA_CHECK_LAUNCH();
  if (const index_t position = bad.first_bad(); position >= 0)
    detail::throw_bad_index("softmax_cross_entropy_backward", "target", targets, position, v, exec.stream);
}

}  // namespace ctformer::cuda
