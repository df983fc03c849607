// ops::swiglu_forward / swiglu_backward: the gated activation of LLaMA's MLP.
#pragma once

#include "ctformer/core/error.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

/// out = silu(gate) * up, where gate_up: (N, 2F) holds gate in [0, F) and up in [F, 2F); out: (N, F).
template <execution_policy P, view_of_rank<2> G, view_of_rank<2> O>
  requires writable_view<O>
void swiglu_forward(const P& exec, const G& gate_up, const O& out) {
  require_same_extent("swiglu_forward", "out", out, 0, "gate_up", gate_up, 0);
  if (gate_up.extent(1) != 2 * out.extent(1))
    throw shape_error("ctformer::swiglu_forward: gate_up has shape " + shape_string(gate_up) + ", out has shape " +
                      shape_string(out) + "; gate_up must be twice as wide");
  if constexpr (requires { swiglu_forward_impl(exec, as_const(gate_up), out); }) {
    swiglu_forward_impl(exec, as_const(gate_up), out);
  } else {
    static_assert(dependent_false<P, G>, "ctformer: swiglu_forward has no implementation for this execution policy and these number types");
  }
}

/// dgate_up (N, 2F), overwritten, from dout (N, F) and the forward's gate_up.
template <execution_policy P, view_of_rank<2> G, view_of_rank<2> DO, view_of_rank<2> DG>
  requires writable_view<DG>
void swiglu_backward(const P& exec, const G& gate_up, const DO& dout, const DG& dgate_up) {
  require_same_shape("swiglu_backward", "gate_up", gate_up, "dgate_up", dgate_up);
  if (gate_up.extent(1) != 2 * dout.extent(1) || gate_up.extent(0) != dout.extent(0))
    throw shape_error("ctformer::swiglu_backward: gate_up has shape " + shape_string(gate_up) + ", dout has shape " +
                      shape_string(dout));
  if constexpr (requires { swiglu_backward_impl(exec, as_const(gate_up), as_const(dout), dgate_up); }) {
    swiglu_backward_impl(exec, as_const(gate_up), as_const(dout), dgate_up);
  } else {
    static_assert(dependent_false<P, G>, "ctformer: swiglu_backward has no implementation for this execution policy and these number types");
  }
}

}  // namespace ctformer::ops
