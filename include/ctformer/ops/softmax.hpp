// ops::softmax_forward / softmax_backward over the last dimension, with an
// optional causal mask (the attention-score form), and ops::scan_logits.
#pragma once

#include "ctformer/core/error.hpp"
#include "ctformer/core/logits_scan.hpp"
#include "ctformer/core/softmax_mask.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

using ctformer::softmax_mask;

/// y = softmax(scale * x) along the last dimension; masked entries of y are 0.
/// x, y: (B, Tq, Tk). y may alias x.
template <execution_policy P, view_of_rank<3> X, view_of_rank<3> Y>
  requires writable_view<Y>
void softmax_forward(const P& exec, const X& x, const Y& y, float scale = 1.0f,
                     softmax_mask mask = softmax_mask::none) {
  require_same_shape("softmax_forward", "x", x, "y", y);
  if (mask == softmax_mask::causal && x.extent(1) > x.extent(2))
    throw shape_error("ctformer::softmax_forward: a causal mask needs Tq <= Tk, got x of shape " + shape_string(x));
  if constexpr (requires { softmax_forward_impl(exec, as_const(x), y, scale, mask); }) {
    softmax_forward_impl(exec, as_const(x), y, scale, mask);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: softmax_forward has no implementation for this execution policy and these number types");
  }
}

/// dx = scale * y * (dy - sum(y * dy)), the backward of softmax_forward
/// (masked entries have y = 0 and so dx = 0). y, dy, dx: (B, Tq, Tk); dx may alias dy.
template <execution_policy P, view_of_rank<3> Y, view_of_rank<3> DY, view_of_rank<3> DX>
  requires writable_view<DX>
void softmax_backward(const P& exec, const Y& y, const DY& dy, const DX& dx, float scale = 1.0f) {
  require_same_shape("softmax_backward", "y", y, "dy", dy);
  require_same_shape("softmax_backward", "y", y, "dx", dx);
  if constexpr (requires { softmax_backward_impl(exec, as_const(y), as_const(dy), dx, scale); }) {
    softmax_backward_impl(exec, as_const(y), as_const(dy), dx, scale);
  } else {
    static_assert(dependent_false<P, Y>, "ctformer: softmax_backward has no implementation for this execution policy and these number types");
  }
}

/// The maximum of a logits row and its first index, the lowest finite
/// logit, and whether any logit is NaN or +inf: what a sampler checks before
/// it builds a distribution. x: (V), host memory (a sampler runs on the host).
template <execution_policy P, view_of_rank<1> X>
logits_scan scan_logits(const P& exec, const X& x) {
  if constexpr (requires { scan_logits_impl(exec, as_const(x)); }) {
    return scan_logits_impl(exec, as_const(x));
  } else {
    static_assert(dependent_false<P, X>, "ctformer: scan_logits has no implementation for this execution policy and these number types");
  }
}

}  // namespace ctformer::ops
