// fixed_view<T, Extents...>: a contiguous view whose extents are compile-time
// constants, so operations on it check shapes while compiling.
#pragma once

#include <array>

#include "ctformer/core/tensor_view.hpp"

namespace ctformer {

/// A row-major view with compile-time extents, for tensors whose shape comes
/// from a model configuration (weights: (d_ff, d_model), ...). Operations
/// overloaded on fixed_view reject a shape mismatch with a static_assert
/// sentence; `view()` gives the run-time tensor_view for everything else.
/// @tparam T element type
/// @tparam Extents the extents, outermost first
template <class T, index_t... Extents>
class fixed_view {
  static_assert(sizeof...(Extents) >= 1, "ctformer: a fixed_view needs at least one extent");
  static_assert(((Extents > 0) && ...), "ctformer: fixed_view extents must be positive");

 public:
  static constexpr int rank = int(sizeof...(Extents));
  static constexpr std::array<index_t, sizeof...(Extents)> extents{Extents...};
  static constexpr index_t size = (index_t(1) * ... * Extents);

  constexpr explicit fixed_view(T* data) : data_(data) {}
  constexpr T* data() const { return data_; }
  static constexpr index_t extent(int d) { return extents[std::size_t(d)]; }
  tensor_view<T, rank> view() const { return tensor_view<T, rank>(data_, extents); }
  operator tensor_view<T, rank>() const { return view(); }

 private:
  T* data_;
};

}  // namespace ctformer
