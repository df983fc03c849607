// ops::gelu_* (tanh form, as GPT-2) and ops::silu_*, elementwise.
#pragma once

#include "ctformer/core/error.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

/// y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). x, y: (n), y may alias x.
template <execution_policy P, view_of_rank<1> X, view_of_rank<1> Y>
  requires writable_view<Y>
void gelu_forward(const P& exec, const X& x, const Y& y) {
  require_same_shape("gelu_forward", "x", x, "y", y);
  if constexpr (requires { gelu_forward_impl(exec, as_const(x), y); }) {
    gelu_forward_impl(exec, as_const(x), y);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: gelu_forward has no implementation for this execution policy and these number types");
  }
}

/// dx = dy * gelu'(x) (overwritten). x, dy, dx: (n); dx may alias dy.
template <execution_policy P, view_of_rank<1> X, view_of_rank<1> DY, view_of_rank<1> DX>
  requires writable_view<DX>
void gelu_backward(const P& exec, const X& x, const DY& dy, const DX& dx) {
  require_same_shape("gelu_backward", "x", x, "dy", dy);
  require_same_shape("gelu_backward", "x", x, "dx", dx);
  if constexpr (requires { gelu_backward_impl(exec, as_const(x), as_const(dy), dx); }) {
    gelu_backward_impl(exec, as_const(x), as_const(dy), dx);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: gelu_backward has no implementation for this execution policy and these number types");
  }
}

/// y = x * sigmoid(x). x, y: (n), y may alias x.
template <execution_policy P, view_of_rank<1> X, view_of_rank<1> Y>
  requires writable_view<Y>
void silu_forward(const P& exec, const X& x, const Y& y) {
  require_same_shape("silu_forward", "x", x, "y", y);
  if constexpr (requires { silu_forward_impl(exec, as_const(x), y); }) {
    silu_forward_impl(exec, as_const(x), y);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: silu_forward has no implementation for this execution policy and these number types");
  }
}

/// dx = dy * silu'(x) (overwritten). x, dy, dx: (n); dx may alias dy.
template <execution_policy P, view_of_rank<1> X, view_of_rank<1> DY, view_of_rank<1> DX>
  requires writable_view<DX>
void silu_backward(const P& exec, const X& x, const DY& dy, const DX& dx) {
  require_same_shape("silu_backward", "x", x, "dy", dy);
  require_same_shape("silu_backward", "x", x, "dx", dx);
  if constexpr (requires { silu_backward_impl(exec, as_const(x), as_const(dy), dx); }) {
    silu_backward_impl(exec, as_const(x), as_const(dy), dx);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: silu_backward has no implementation for this execution policy and these number types");
  }
}

}  // namespace ctformer::ops
