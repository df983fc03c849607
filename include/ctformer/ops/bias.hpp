// ops::add_bias and ops::bias_backward: a per-column bias and its gradient.
#pragma once

#include "ctformer/core/error.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

/// y[n] += bias. y: (N, O); bias: (O).
template <execution_policy P, view_of_rank<2> Y, view_of_rank<1> B>
  requires writable_view<Y>
void add_bias(const P& exec, const Y& y, const B& bias) {
  require_same_extent("add_bias", "bias", bias, 0, "y", y, 1);
  if constexpr (requires { add_bias_impl(exec, y, as_const(bias)); }) {
    add_bias_impl(exec, y, as_const(bias));
  } else {
    static_assert(dependent_false<P, Y>, "ctformer: add_bias has no implementation for this execution policy and these number types");
  }
}

/// dbias += sum over rows of dy. dy: (N, O); dbias: (O).
template <execution_policy P, view_of_rank<2> DY, view_of_rank<1> DB>
  requires writable_view<DB>
void bias_backward(const P& exec, const DY& dy, const DB& dbias) {
  require_same_extent("bias_backward", "dbias", dbias, 0, "dy", dy, 1);
  if constexpr (requires { bias_backward_impl(exec, as_const(dy), dbias); }) {
    bias_backward_impl(exec, as_const(dy), dbias);
  } else {
    static_assert(dependent_false<P, DY>, "ctformer: bias_backward has no implementation for this execution policy and these number types");
  }
}

}  // namespace ctformer::ops
