// kv_view<Element>: the layout of one sequence's keys and values in one layer of
// a KV cache (pointers, strides, block table), the plain struct through which
// the cached-attention kernels read a cache without knowing its policy.
#pragma once

#include <cstdint>
#include <type_traits>

#include "ctformer/core/number_types.hpp"
#include "ctformer/core/tensor_view.hpp"

namespace ctformer {

/// Where the keys and values of one sequence live in one layer of a cache.
///
/// Tokens are stored in blocks of `block_tokens` positions; logical block i
/// of the sequence is physical block `block_table[i]`. Inside a block, token
/// j of key/value head g starts at `g * head_stride + j * token_stride`
/// elements from the block's start; blocks are `block_stride` elements apart.
/// The caches of infer/ lay a block out head by head (head_stride =
/// block_tokens * head_dim, token_stride = head_dim), so that a decode step,
/// which reads every head of a block, streams the block front to back.
///
/// For int8 elements, `k_scale` / `v_scale` hold one fp32 scale per (token,
/// kv head) in the same block layout with every stride divided by head_dim
/// (value = scale * int8); they are null for fp32 and bf16. The scales are
/// writable exactly when the elements are (a view for writing the cache).
///
/// The pointers, block_table included, are in the memory of the policy the
/// cache runs on: device memory for a CUDA cache, so offset() is callable
/// on the device and the host reads such a view's fields, never its pointees.
/// @tparam Element float, bf16 or std::int8_t (const-qualified for reading)
template <class Element>
struct kv_view {
  using element_type = Element;
  using value_type = std::remove_cv_t<Element>;
  static_assert(std::is_same_v<value_type, float> || std::is_same_v<value_type, bf16> ||
                    std::is_same_v<value_type, std::int8_t>,
                "ctformer: a KV cache holds float, bf16 or std::int8_t elements");

  using scale_type = std::conditional_t<std::is_const_v<Element>, const float, float>;

  Element* k = nullptr;                       ///< keys: the layer's block 0
  Element* v = nullptr;                       ///< values: same layout as k
  scale_type* k_scale = nullptr;              ///< int8 only: (block, token, kv head)
  scale_type* v_scale = nullptr;              ///< int8 only
  const std::int32_t* block_table = nullptr;  ///< physical block of each logical block
  index_t block_tokens = 0;                   ///< positions per block
  index_t block_stride = 0;                   ///< elements between physical blocks
  index_t token_stride = 0;                   ///< elements between positions of one head in a block
  index_t head_stride = 0;                    ///< elements between kv heads in a block
  index_t kv_heads = 0;
  index_t head_dim = 0;
  index_t capacity = 0;  ///< positions the block table covers (readable: [0, capacity))

  /// Offset (in elements) of position pos, kv head g, from k / v.
  CTFORMER_HOST_DEVICE index_t offset(index_t pos, index_t g) const {
    return index_t(block_table[pos / block_tokens]) * block_stride + (pos % block_tokens) * token_stride +
           g * head_stride;
  }
  /// Index of the scale of position pos, kv head g (int8 only).
  /// (Every stride is a multiple of head_dim: one scale per head_dim elements.)
  CTFORMER_HOST_DEVICE index_t scale_offset(index_t pos, index_t g) const { return offset(pos, g) / head_dim; }
};

/// The rows of one sequence in a batched cached-attention call: query rows
/// [first_row, first_row + rows) are positions [start, start + rows) of the
/// sequence whose layer view is `kv`, and the query at position p attends to
/// positions [max(0, p - window + 1), p] (window 0: [0, p]).
template <class Element>
struct attention_segment {
  kv_view<Element> kv;
  index_t first_row = 0, rows = 0, start = 0;
  index_t window = 0;
};

}  // namespace ctformer
