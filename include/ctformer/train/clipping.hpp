// Gradient clipping by global norm over the flat gradient buffer.
#pragma once

#include <cmath>

#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/ops.hpp"

namespace ctformer::train {

/// The L2 norm of the whole gradient buffer (accumulated in double).
/// grads: (P) float in the policy's memory.
template <execution_policy P>
double global_norm(const P& exec, tensor_view<const float, 1> grads) {
  return std::sqrt(ops::sum_of_squares(exec, grads));
}

/// The factor clipping would multiply gradients by: torch's
/// max_norm / (norm + 1e-6), capped at 1. It is 1 when the norm is not
/// finite: the trainer stops on a non-finite loss or norm instead of scaling.
/// Pass it as the optimizer's grad_scale to clip inside the update pass.
inline float clip_coefficient(double norm, double max_norm) {
  if (!std::isfinite(norm) || max_norm <= 0.0) return 1.0f;
  const double c = max_norm / (norm + 1e-6);
  return c < 1.0 ? float(c) : 1.0f;
}

/// Scales grads in place so that their global norm is at most max_norm
/// (torch.nn.utils.clip_grad_norm_), and returns the norm before clipping.
/// max_norm <= 0 disables clipping (the norm is still returned).
/// grads: (P) float in the policy's memory.
template <execution_policy P>
double clip_by_global_norm(const P& exec, tensor_view<float, 1> grads, double max_norm) {
  const double norm = global_norm(exec, tensor_view<const float, 1>(grads));
  const float c = clip_coefficient(norm, max_norm);
  if (c < 1.0f) ops::scale(exec, c, grads);
  return norm;
}

}  // namespace ctformer::train
