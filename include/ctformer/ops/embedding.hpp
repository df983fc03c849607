// ops::embedding_forward (row lookup) and embedding_backward (scatter-add).
#pragma once

#include <cstdint>

#include "ctformer/core/error.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

/// out[n] = table[tokens[n]]. tokens: (N) int32; table: (V, C); out: (N, C).
/// A token outside [0, V) throws invalid_input naming the token and position
/// (on the CPU before anything is written; on CUDA at the next synchronisation).
template <execution_policy P, view_of_rank<1> Tok, view_of_rank<2> Table, view_of_rank<2> Out>
  requires writable_view<Out>
void embedding_forward(const P& exec, const Tok& tokens, const Table& table, const Out& out) {
  static_assert(std::is_same_v<typename Tok::value_type, std::int32_t>, "ctformer: token ids are int32");
  require_same_extent("embedding_forward", "out", out, 0, "tokens", tokens, 0);
  require_same_extent("embedding_forward", "out", out, 1, "table", table, 1);
  if constexpr (requires { embedding_forward_impl(exec, as_const(tokens), as_const(table), out); }) {
    embedding_forward_impl(exec, as_const(tokens), as_const(table), out);
  } else {
    static_assert(dependent_false<P, Table>, "ctformer: embedding_forward has no implementation for this execution policy and these number types");
  }
}

/// dtable[tokens[n]] += dout[n] (scatter-add; repeated tokens sum).
/// tokens: (N) int32; dout: (N, C); dtable: (V, C).
template <execution_policy P, view_of_rank<1> Tok, view_of_rank<2> DOut, view_of_rank<2> DTable>
  requires writable_view<DTable>
void embedding_backward(const P& exec, const Tok& tokens, const DOut& dout, const DTable& dtable) {
  static_assert(std::is_same_v<typename Tok::value_type, std::int32_t>, "ctformer: token ids are int32");
  require_same_extent("embedding_backward", "dout", dout, 0, "tokens", tokens, 0);
  require_same_extent("embedding_backward", "dout", dout, 1, "dtable", dtable, 1);
  if constexpr (requires { embedding_backward_impl(exec, as_const(tokens), as_const(dout), dtable); }) {
    embedding_backward_impl(exec, as_const(tokens), as_const(dout), dtable);
  } else {
    static_assert(dependent_false<P, DOut>, "ctformer: embedding_backward has no implementation for this execution policy and these number types");
  }
}

}  // namespace ctformer::ops
