// CPU kernels for the fused softmax + cross-entropy loss and its gradient.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "ctformer/kernels/cpu/norm.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {
inline void check_targets(const char* operation, tensor_view<const std::int32_t, 1> targets, index_t vocab) {
  for (index_t n = 0; n < targets.extent(0); ++n)
    if (targets(n) >= vocab)
      throw invalid_input(std::string("ctformer::") + operation + ": target " + std::to_string(targets(n)) +
                          " at position " + std::to_string(n) + " is outside the vocabulary [0, " +
                          std::to_string(vocab) + ")");
}

// max and log(sum(exp(x - max))) of one row, the two numbers both passes need.
inline void row_logsumexp(const float* row, index_t v, float& maximum, float& log_sum) {
  maximum = -std::numeric_limits<float>::infinity();
  for (index_t j = 0; j < v; ++j) maximum = std::max(maximum, row[j]);
  float sum = 0.0f;
  for (index_t j = 0; j < v; ++j) sum += std::exp(row[j] - maximum);
  log_sum = std::log(sum);
}
}  // namespace detail

inline void softmax_cross_entropy_forward_impl(const par_t& exec, tensor_view<const float, 2> logits,
                                               tensor_view<const std::int32_t, 1> targets,
                                               tensor_view<float, 1> losses) {
  detail::require_unit_inner_stride("softmax_cross_entropy_forward", "logits", logits);
  const index_t v = logits.extent(1);
  detail::check_targets("softmax_cross_entropy_forward", targets, v);
  detail::parallel_for(exec, logits.extent(0), [&](index_t n) {
    const std::int32_t target = targets(n);
    if (target < 0) {
      losses(n) = 0.0f;
      return;
    }
    float maximum, log_sum;
    detail::row_logsumexp(&logits(n, 0), v, maximum, log_sum);
    losses(n) = maximum + log_sum - logits(n, target);
  });
}

inline void softmax_cross_entropy_backward_impl(const par_t& exec, tensor_view<const float, 2> logits,
                                                tensor_view<const std::int32_t, 1> targets, float grad_scale,
                                                tensor_view<float, 2> dlogits) {
  detail::require_unit_inner_stride("softmax_cross_entropy_backward", "logits", logits);
  detail::require_unit_inner_stride("softmax_cross_entropy_backward", "dlogits", dlogits);
  const index_t v = logits.extent(1);
  detail::check_targets("softmax_cross_entropy_backward", targets, v);
  detail::parallel_for(exec, logits.extent(0), [&](index_t n) {
    const std::int32_t target = targets(n);
    const float* row = &logits(n, 0);
    float* drow = &dlogits(n, 0);
    if (target < 0) {
      for (index_t j = 0; j < v; ++j) drow[j] = 0.0f;
      return;
    }
    float maximum, log_sum;
    detail::row_logsumexp(row, v, maximum, log_sum);
    const float shift = maximum + log_sum;
    for (index_t j = 0; j < v; ++j) drow[j] = std::exp(row[j] - shift) * grad_scale;  // row may alias drow
    drow[target] -= grad_scale;
  });
}

}  // namespace ctformer::cpu
