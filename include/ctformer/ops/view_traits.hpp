// Concepts over tensor views that the public operations constrain on.
#pragma once

#include <concepts>
#include <type_traits>

#include "ctformer/core/tensor_view.hpp"

namespace ctformer {

template <class V>
struct is_tensor_view : std::false_type {};
template <class T, int Rank>
struct is_tensor_view<tensor_view<T, Rank>> : std::true_type {};

/// Any tensor_view of the given rank.
template <class V, int Rank>
concept view_of_rank = is_tensor_view<std::remove_cvref_t<V>>::value && std::remove_cvref_t<V>::rank == Rank;

/// A view whose elements may be written.
template <class V>
concept writable_view = is_tensor_view<std::remove_cvref_t<V>>::value &&
                        !std::is_const_v<typename std::remove_cvref_t<V>::element_type>;

/// The read-only version of a view (what kernels take for inputs).
template <class T, int Rank>
CTFORMER_HOST_DEVICE tensor_view<const T, Rank> as_const(const tensor_view<T, Rank>& v) {
  return tensor_view<const T, Rank>(v.data(), v.extents(), v.strides());
}

}  // namespace ctformer
