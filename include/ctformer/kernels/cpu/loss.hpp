// CPU kernels for the fused softmax + cross-entropy loss and its gradient.
// The forward reads each row of logits once (an online log-sum-exp: per-lane
// running max and rescaled sum); the backward reads it once more to write the
// gradient. exp is the vector approximation of detail/vector_math.hpp.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "ctformer/kernels/cpu/detail/vector_math.hpp"
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

// max and log(sum(exp(x - max))) of one row, the two numbers both passes
// need, in one pass: each lane keeps a running max M and a sum S of
// exp(x - M); a block of four vectors rescales S once (one extra exp per
// four vectors). Padding lanes hold -Inf, whose exp is 0.
inline void row_logsumexp(const float* row, index_t v, float& maximum, float& log_sum) {
  constexpr index_t w = vf::width;
  vf m = vf::splat(-FLT_MAX), s = vf::splat(0.0f);
  index_t j = 0;
  for (; j + 4 * w <= v; j += 4 * w) {
    const vf x0 = vf::load(row + j), x1 = vf::load(row + j + w), x2 = vf::load(row + j + 2 * w),
             x3 = vf::load(row + j + 3 * w);
    const vf m_new = max(m, max(max(x0, x1), max(x2, x3)));
    s = s * vexp(m - m_new);
    s = s + vexp(x0 - m_new) + vexp(x1 - m_new) + (vexp(x2 - m_new) + vexp(x3 - m_new));
    m = m_new;
  }
  for (; j < v; j += w) {
    const int k = v - j < w ? int(v - j) : int(w);
    const vf x = load_n(row + j, k, -std::numeric_limits<float>::infinity());
    const vf m_new = max(m, x);
    s = fma(s, vexp(m - m_new), vexp(x - m_new));
    m = m_new;
  }
  maximum = reduce_max(m);
  log_sum = std::log(reduce_add(s * vexp(m - vf::splat(maximum))));
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
    if (target < 0) {  // ignored position
      losses(n) = 0.0f;
      return;
    }
    float maximum, log_sum;
    detail::row_logsumexp(&logits(n, 0), v, maximum, log_sum);
    losses(n) = maximum + log_sum - logits(n, target);
  }, detail::min_rows_for_parallel(v));
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
    if (target < 0) {  // ignored position
      std::memset(drow, 0, std::size_t(v) * sizeof(float));
      return;
    }
    float maximum, log_sum;
    detail::row_logsumexp(row, v, maximum, log_sum);
    const detail::vf shift = detail::vf::splat(maximum + log_sum), scale = detail::vf::splat(grad_scale);
    // row may alias drow: each element is read before it is written.
    detail::for_vectors(v, [&](index_t j, int k, int) {
      detail::store_n(drow + j, detail::vexp(detail::load_n(row + j, k) - shift) * scale, k);
    });
    drow[target] -= grad_scale;
  }, detail::min_rows_for_parallel(v));
}

}  // namespace ctformer::cpu
