// ops::causal_attention_* (training form, probabilities saved) and ops::rope_*.
#pragma once

#include <cstdint>
#include <type_traits>

#include "ctformer/core/error.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

namespace detail {
template <class Q, class K>
void check_attention_heads(const char* operation, const Q& q, const K& k) {
  require_same_extent(operation, "k", k, 0, "q", q, 0);
  require_same_extent(operation, "k", k, 1, "q", q, 1);
  require_same_extent(operation, "k", k, 3, "q", q, 3);
  if (k.extent(2) == 0 || q.extent(2) % k.extent(2) != 0)
    throw shape_error(std::string("ctformer::") + operation + ": the key/value heads of k " + shape_string(k) +
                      " must divide the query heads of q " + shape_string(q));
}
}  // namespace detail

/// Causal softmax(q k^T * scale) v per head, saving the probabilities.
/// Query i attends to keys [0, i], or with a window W > 0 to its last W
/// keys [max(0, i - W + 1), i] (a sliding-window layer); probabilities
/// outside are 0, so the backward needs no window of its own.
/// q: (B, T, H, D); k, v: (B, T, KV, D) with KV dividing H (GQA; KV = 1 is MQA);
/// out: (B, T, H, D); probs: (B, H, T, T). Unit stride in D everywhere.
template <execution_policy P, view_of_rank<4> Q, view_of_rank<4> K, view_of_rank<4> V, view_of_rank<4> O,
          view_of_rank<4> Pr>
void causal_attention_forward(const P& exec, const Q& q, const K& k, const V& v, const O& out, const Pr& probs,
                              float scale, index_t window = 0) {
  if (window < 0)
    throw invalid_input("ctformer::causal_attention_forward: window " + std::to_string(window) +
                        " must be positive (or 0 for none)");
  detail::check_attention_heads("causal_attention_forward", q, k);
  require_same_shape("causal_attention_forward", "k", k, "v", v);
  require_same_shape("causal_attention_forward", "q", q, "out", out);
  if (probs.extent(0) != q.extent(0) || probs.extent(1) != q.extent(2) || probs.extent(2) != q.extent(1) ||
      probs.extent(3) != q.extent(1))
    throw shape_error("ctformer::causal_attention_forward: probs has shape " + shape_string(probs) +
                      ", expected (B, H, T, T) for q of shape " + shape_string(q));
  if constexpr (requires { causal_attention_forward_impl(exec, as_const(q), as_const(k), as_const(v), out, probs, scale, window); }) {
    causal_attention_forward_impl(exec, as_const(q), as_const(k), as_const(v), out, probs, scale, window);
  } else {
    static_assert(dependent_false<P, Q>, "ctformer: causal_attention_forward has no implementation for this execution policy and these number types");
  }
}

/// Backward of causal_attention_forward: dq, dk, dv are overwritten.
template <execution_policy P, class DO, class Q, class K, class V, class Pr, class DQ, class DK, class DV>
void causal_attention_backward(const P& exec, const DO& dout, const Q& q, const K& k, const V& v, const Pr& probs,
                               const DQ& dq, const DK& dk, const DV& dv, float scale) {
  detail::check_attention_heads("causal_attention_backward", q, k);
  require_same_shape("causal_attention_backward", "q", q, "dout", dout);
  require_same_shape("causal_attention_backward", "q", q, "dq", dq);
  require_same_shape("causal_attention_backward", "k", k, "dk", dk);
  require_same_shape("causal_attention_backward", "v", v, "dv", dv);
  if constexpr (requires { causal_attention_backward_impl(exec, as_const(dout), as_const(q), as_const(k), as_const(v), as_const(probs), dq, dk, dv, scale); }) {
    causal_attention_backward_impl(exec, as_const(dout), as_const(q), as_const(k), as_const(v), as_const(probs), dq, dk, dv, scale);
  } else {
    static_assert(dependent_false<P, Q>, "ctformer: causal_attention_backward has no implementation for this execution policy and these number types");
  }
}

/// Rotary embedding in place: pairs (x[c], x[c + D/2]) of each head at sequence
/// position position_offset + t rotate by the angle whose cos and sin the
/// tables (max_seq, D/2) hold. x: (B, T, H, D).
template <execution_policy P, view_of_rank<4> X, view_of_rank<2> Tab>
  requires writable_view<X>
void rope_forward(const P& exec, const X& x, const Tab& cos_table, const Tab& sin_table, index_t position_offset = 0) {
  if (x.extent(3) % 2 != 0 || cos_table.extent(1) * 2 != x.extent(3) || sin_table.extent(1) * 2 != x.extent(3) ||
      position_offset + x.extent(1) > cos_table.extent(0))
    throw shape_error("ctformer::rope_forward: x of shape " + shape_string(x) + " at offset " +
                      std::to_string(position_offset) + " does not fit cos/sin tables of shape " +
                      shape_string(cos_table));
  if constexpr (requires { rope_rotate_impl(exec, x, as_const(cos_table), as_const(sin_table), position_offset, 1); }) {
    rope_rotate_impl(exec, x, as_const(cos_table), as_const(sin_table), position_offset, 1);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: rope_forward has no implementation for this execution policy and these number types");
  }
}

/// Backward of rope_forward (the inverse rotation), in place on the gradient dx: (B, T, H, D).
template <execution_policy P, view_of_rank<4> X, view_of_rank<2> Tab>
  requires writable_view<X>
void rope_backward(const P& exec, const X& dx, const Tab& cos_table, const Tab& sin_table, index_t position_offset = 0) {
  if (dx.extent(3) % 2 != 0 || cos_table.extent(1) * 2 != dx.extent(3) ||
      position_offset + dx.extent(1) > cos_table.extent(0))
    throw shape_error("ctformer::rope_backward: dx of shape " + shape_string(dx) + " does not fit cos/sin tables of shape " +
                      shape_string(cos_table));
  if constexpr (requires { rope_rotate_impl(exec, dx, as_const(cos_table), as_const(sin_table), position_offset, -1); }) {
    rope_rotate_impl(exec, dx, as_const(cos_table), as_const(sin_table), position_offset, -1);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: rope_backward has no implementation for this execution policy and these number types");
  }
}


/// Rotary embedding in place on rows at their own positions (a ragged batch,
/// or a (B, T) batch flattened to rows): row i of x sits at position
/// positions[i] and rotates by that row of the cos and sin tables (S, D/2).
/// x: (N, H, D); positions: (N) int32 in the policy's memory, each in [0, S)
/// (the CPU checks; callers on other policies validate their batch first).
/// direction: +1 forward, -1 the inverse rotation (the backward pass).
template <execution_policy P, view_of_rank<3> X, view_of_rank<2> Tab, view_of_rank<1> Pos>
  requires writable_view<X>
void rope_rotate_rows(const P& exec, const X& x, const Tab& cos_table, const Tab& sin_table, const Pos& positions,
                      int direction) {
  static_assert(std::is_same_v<typename Pos::value_type, std::int32_t>, "ctformer: rope positions are int32");
  if (x.extent(2) % 2 != 0 || cos_table.extent(1) * 2 != x.extent(2) || sin_table.extent(1) * 2 != x.extent(2) ||
      cos_table.extent(0) != sin_table.extent(0))
    throw shape_error("ctformer::rope_rotate_rows: x of shape " + shape_string(x) +
                      " does not fit cos/sin tables of shape " + shape_string(cos_table));
  require_same_extent("rope_rotate_rows", "positions", positions, 0, "x", x, 0);
  if constexpr (requires { rope_rotate_rows_impl(exec, x, as_const(cos_table), as_const(sin_table), as_const(positions), direction); }) {
    rope_rotate_rows_impl(exec, x, as_const(cos_table), as_const(sin_table), as_const(positions), direction);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: rope_rotate_rows has no implementation for this execution policy and these number types");
  }
}

}  // namespace ctformer::ops
