// ops::kv_cache_write and ops::kv_cache_copy: storing new keys and values in a
// KV cache's layout, and copying positions from one sequence's layout to
// another's (a fork), on any policy with a kernel for them.
#pragma once

#include <string>
#include <type_traits>

#include "ctformer/core/error.hpp"
#include "ctformer/core/kv_view.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

/// Stores the keys and values of positions [start, start + T) of one sequence
/// in one layer through its writable layout `kv`, converting each fp32 row of
/// head_dim elements to the cache's element: fp32 as it is; bf16 rounded to
/// nearest, ties to even; int8 with one scale max|row| / 127 per (position,
/// kv head) and each element nearbyint(x * (127 / max|row|)) clamped to
/// [-127, 127] (a zero row: scale 0, elements 0). Every policy stores the same bits.
/// k, v: (T, KV, D) fp32 in the policy's memory, unit stride in D; the
/// positions must lie in [0, kv.capacity).
/// @tparam Element the cache's element type (float, bf16, std::int8_t; not const)
template <execution_policy P, view_of_rank<3> K, view_of_rank<3> V, class Element>
void kv_cache_write(const P& exec, const kv_view<Element>& kv, index_t start, const K& k, const V& v) {
  static_assert(!std::is_const_v<Element>, "ctformer: kv_cache_write needs a writable kv_view (non-const elements)");
  static_assert(std::is_same_v<typename K::value_type, float> && std::is_same_v<typename V::value_type, float>,
                "ctformer: kv_cache_write takes fp32 keys and values");
  require_same_shape("kv_cache_write", "k", k, "v", v);
  if (k.extent(1) != kv.kv_heads || k.extent(2) != kv.head_dim ||
      (kv.head_dim > 1 && (k.stride(2) != 1 || v.stride(2) != 1)))
    throw shape_error("ctformer::kv_cache_write: k has shape " + shape_string(k) + ", expected (T, " +
                      std::to_string(kv.kv_heads) + ", " + std::to_string(kv.head_dim) + ") with unit stride in D");
  if (start < 0 || start + k.extent(0) > kv.capacity)
    throw invalid_input("ctformer::kv_cache_write: positions [" + std::to_string(start) + ", " +
                        std::to_string(start + k.extent(0)) + ") are not all in the layout's [0, " +
                        std::to_string(kv.capacity) + ")");
  if (k.extent(0) == 0) return;
  if constexpr (requires { kv_cache_write_impl(exec, kv, start, as_const(k), as_const(v)); }) {
    kv_cache_write_impl(exec, kv, start, as_const(k), as_const(v));
  } else {
    static_assert(dependent_false<P, Element>,
                  "ctformer: kv_cache_write has no implementation for this execution policy and cache element type");
  }
}

/// Copies positions [first, last) of every kv head, keys, values and (int8)
/// scales, bit for bit, from layout `from` to layout `to` (two sequences of
/// one layer of one cache: the same block shape, different blocks).
template <execution_policy P, class Element>
void kv_cache_copy(const P& exec, const kv_view<const Element>& from, const kv_view<Element>& to, index_t first,
                   index_t last) {
  static_assert(!std::is_const_v<Element>, "ctformer: kv_cache_copy needs a writable target kv_view");
  if (from.kv_heads != to.kv_heads || from.head_dim != to.head_dim || from.block_tokens != to.block_tokens ||
      from.block_stride != to.block_stride || from.token_stride != to.token_stride ||
      from.head_stride != to.head_stride)
    throw shape_error("ctformer::kv_cache_copy: the two layouts have different block shapes");
  if (first < 0 || last > from.capacity || last > to.capacity)
    throw invalid_input("ctformer::kv_cache_copy: positions [" + std::to_string(first) + ", " +
                        std::to_string(last) + ") are not all in both layouts (capacities " +
                        std::to_string(from.capacity) + " and " + std::to_string(to.capacity) + ")");
  if (last <= first) return;
  if constexpr (requires { kv_cache_copy_impl(exec, from, to, first, last); }) {
    kv_cache_copy_impl(exec, from, to, first, last);
  } else {
    static_assert(dependent_false<P, Element>,
                  "ctformer: kv_cache_copy has no implementation for this execution policy and cache element type");
  }
}

}  // namespace ctformer::ops
