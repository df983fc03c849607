// ops::cached_attention: causal attention of new queries over a KV cache (the
// inference form: no probabilities saved), on any policy with a kernel for it.
#pragma once

#include <string>

#include "ctformer/core/error.hpp"
#include "ctformer/core/kv_view.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

/// Causal softmax(q k^T * scale) v for T queries at positions [start, start + T)
/// of one sequence, over keys and values already written to the cache at
/// positions [0, start + T): query t attends to positions [0, start + t]. Head
/// h reads kv head h / (H / KV) (MHA, GQA, MQA). Online softmax over tiles of
/// keys: nothing of size (T, start + T) is materialised.
/// q: (T, H, D) fp32; out: (T, H, D) fp32; unit stride in D for both.
/// A bf16 cache's scores use the query rounded to bf16 where the policy says
/// so (cpu: bf16_cache_rounds_query(D), an AVX512_BF16 build with D % 32 == 0),
/// an int8 cache's the query rounded to int8 per head (cpu:
/// int8_cache_rounds_query(D), an AVX512_VNNI build with D % 64 == 0);
/// otherwise every query element stays fp32.
/// @tparam Element the cache's element type (float, bf16, std::int8_t)
template <execution_policy P, view_of_rank<3> Q, class Element, view_of_rank<3> O>
  requires writable_view<O>
void cached_attention(const P& exec, const Q& q, const kv_view<Element>& kv, const O& out, index_t start,
                      float scale) {
  static_assert(std::is_same_v<typename Q::value_type, float> && std::is_same_v<typename O::value_type, float>,
                "ctformer: cached_attention takes fp32 queries and output");
  require_same_shape("cached_attention", "q", q, "out", out);
  const auto fail = [&](const std::string& what) {
    throw shape_error("ctformer::cached_attention: " + what + " (q has shape " + shape_string(q) + ")");
  };
  if (q.extent(2) != kv.head_dim)
    fail("the head dimension of q must equal the cache's head_dim " + std::to_string(kv.head_dim));
  if (kv.kv_heads <= 0 || q.extent(1) % kv.kv_heads != 0)
    fail("the cache's " + std::to_string(kv.kv_heads) + " key/value heads must divide the query heads");
  if (start < 0 || start + q.extent(0) > kv.capacity)
    fail("positions [" + std::to_string(start) + ", " + std::to_string(start + q.extent(0)) +
         ") are not all reserved in the cache (room for " + std::to_string(kv.capacity) + ")");
  if ((q.extent(2) > 1 && q.stride(2) != 1) || (out.extent(2) > 1 && out.stride(2) != 1))
    fail("q and out need unit stride in D");
  if (q.extent(0) == 0) return;
  const kv_view<const std::remove_cv_t<Element>> read{kv.k,           kv.v,          kv.k_scale,
                                                      kv.v_scale,     kv.block_table, kv.block_tokens,
                                                      kv.block_stride, kv.token_stride, kv.head_stride,
                                                      kv.kv_heads,    kv.head_dim,    kv.capacity};
  if constexpr (requires { cached_attention_impl(exec, as_const(q), read, out, start, scale); }) {
    cached_attention_impl(exec, as_const(q), read, out, start, scale);
  } else {
    static_assert(dependent_false<P, Element>,
                  "ctformer: cached_attention has no implementation for this execution policy and cache element type");
  }
}

}  // namespace ctformer::ops
