// ops::cached_attention: causal attention of new queries over a KV cache (the
// inference form: no probabilities saved), on any policy with a kernel for it.
#pragma once

#include <span>
#include <string>
#include <type_traits>

#include "ctformer/core/error.hpp"
#include "ctformer/core/kv_view.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

/// Causal softmax(q k^T * scale) v over a KV cache for the rows of many
/// sequences at once (a ragged batch): each segment's query rows are
/// positions [start, start + rows) of its sequence, whose keys and values
/// are already written to the cache at positions [0, start + rows); the
/// query at position p attends to [0, p], or to its last `window` positions
/// when the segment has a window. Head h reads kv head h / (H / KV) (MHA,
/// GQA, MQA). Online softmax over tiles of keys: nothing of size (T, start +
/// T) is materialised. Every query gets the bits it gets alone, whatever
/// else is in the call and however many threads run it.
/// q: (N, H, D) fp32; out: (N, H, D) fp32; unit stride in D for both.
/// A bf16 cache's scores use the query rounded to bf16 where the policy says
/// so (cpu: bf16_cache_rounds_query(D), an AVX512_BF16 build with D % 32 == 0),
/// an int8 cache's the query rounded to int8 per head (cpu:
/// int8_cache_rounds_query(D), an AVX512_VNNI build with D % 64 == 0);
/// otherwise every query element stays fp32.
/// @tparam Element the cache's element type (float, bf16, std::int8_t)
template <execution_policy P, view_of_rank<3> Q, class Element, view_of_rank<3> O>
  requires writable_view<O>
void cached_attention(const P& exec, const Q& q, std::span<const attention_segment<Element>> segments, const O& out,
                      float scale) {
  static_assert(std::is_same_v<typename Q::value_type, float> && std::is_same_v<typename O::value_type, float>,
                "ctformer: cached_attention takes fp32 queries and output");
  require_same_shape("cached_attention", "q", q, "out", out);
  const auto fail = [&](std::size_t i, const std::string& what) {
    throw shape_error("ctformer::cached_attention: segment " + std::to_string(i) + ": " + what + " (q has shape " +
                      shape_string(q) + ")");
  };
  if ((q.extent(2) > 1 && q.stride(2) != 1) || (out.extent(2) > 1 && out.stride(2) != 1))
    fail(0, "q and out need unit stride in D");
  for (std::size_t i = 0; i < segments.size(); ++i) {
    const auto& seg = segments[i];
    if (q.extent(2) != seg.kv.head_dim)
      fail(i, "the head dimension of q must equal the cache's head_dim " + std::to_string(seg.kv.head_dim));
    if (seg.kv.kv_heads <= 0 || q.extent(1) % seg.kv.kv_heads != 0)
      fail(i, "the cache's " + std::to_string(seg.kv.kv_heads) + " key/value heads must divide the query heads");
    if (seg.rows < 0 || seg.first_row < 0 || seg.first_row + seg.rows > q.extent(0))
      fail(i, "rows [" + std::to_string(seg.first_row) + ", " + std::to_string(seg.first_row + seg.rows) +
                  ") are not rows of q");
    if (seg.start < 0 || seg.start + seg.rows > seg.kv.capacity)
      fail(i, "positions [" + std::to_string(seg.start) + ", " + std::to_string(seg.start + seg.rows) +
                  ") are not all reserved in the cache (room for " + std::to_string(seg.kv.capacity) + ")");
    if (seg.window < 0) fail(i, "a window must be positive (or 0 for none)");
  }
  if (segments.empty()) return;
  if constexpr (requires { cached_attention_impl(exec, as_const(q), segments, out, scale); }) {
    cached_attention_impl(exec, as_const(q), segments, out, scale);
  } else {
    static_assert(dependent_false<P, Element>,
                  "ctformer: cached_attention has no implementation for this execution policy and cache element type");
  }
}

/// The same for T queries of one sequence at positions [start, start + T):
/// query t attends to positions [0, start + t] (or its last `window`).
/// q: (T, H, D), out: (T, H, D).
template <execution_policy P, view_of_rank<3> Q, class Element, view_of_rank<3> O>
  requires writable_view<O>
void cached_attention(const P& exec, const Q& q, const kv_view<Element>& kv, const O& out, index_t start,
                      float scale, index_t window = 0) {
  using E = std::remove_cv_t<Element>;
  const attention_segment<const E> segment{
      kv_view<const E>{kv.k, kv.v, kv.k_scale, kv.v_scale, kv.block_table, kv.block_tokens, kv.block_stride,
                       kv.token_stride, kv.head_stride, kv.kv_heads, kv.head_dim, kv.capacity},
      0, q.extent(0), start, window};
  cached_attention(exec, q, std::span<const attention_segment<const E>>(&segment, 1), out, scale);
}

}  // namespace ctformer::ops
