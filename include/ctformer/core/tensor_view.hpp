// tensor_view<T, Rank>: a non-owning pointer + extents + strides (in elements),
// and the shape checks every operation uses to report mismatches.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>

#include "ctformer/core/error.hpp"
#include "ctformer/core/number_types.hpp"

namespace ctformer {

using index_t = std::int64_t;

/// A strided view of Rank dimensions over memory it does not own. Row-major
/// (last stride 1) by default; `transposed()` swaps the two last dimensions
/// without moving data, which is how GEMM receives transposes.
/// @tparam T element type (const-qualified for read-only views)
/// @tparam Rank number of dimensions
template <class T, int Rank>
class tensor_view {
  static_assert(Rank >= 1, "ctformer: a tensor_view needs at least one dimension");

 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  static constexpr int rank = Rank;

  tensor_view() = default;

  /// Contiguous row-major view.
  CTFORMER_HOST_DEVICE tensor_view(T* data, std::array<index_t, Rank> extents) : data_(data), extents_(extents) {
    index_t stride = 1;
    for (int d = Rank - 1; d >= 0; --d) {
      strides_[d] = stride;
      stride *= extents_[d];
    }
  }

  /// View with explicit strides (in elements).
  CTFORMER_HOST_DEVICE tensor_view(T* data, std::array<index_t, Rank> extents, std::array<index_t, Rank> strides)
      : data_(data), extents_(extents), strides_(strides) {}

  /// A mutable view converts to a read-only one.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  CTFORMER_HOST_DEVICE tensor_view(const tensor_view<U, Rank>& other)
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  CTFORMER_HOST_DEVICE T* data() const { return data_; }
  CTFORMER_HOST_DEVICE index_t extent(int d) const { return extents_[d]; }
  CTFORMER_HOST_DEVICE index_t stride(int d) const { return strides_[d]; }
  CTFORMER_HOST_DEVICE const std::array<index_t, Rank>& extents() const { return extents_; }
  CTFORMER_HOST_DEVICE const std::array<index_t, Rank>& strides() const { return strides_; }

  CTFORMER_HOST_DEVICE index_t size() const {
    index_t n = 1;
    for (int d = 0; d < Rank; ++d) n *= extents_[d];
    return n;
  }

  /// True when the elements are densely packed in row-major order.
  CTFORMER_HOST_DEVICE bool is_contiguous() const {
    index_t stride = 1;
    for (int d = Rank - 1; d >= 0; --d) {
      if (extents_[d] != 1 && strides_[d] != stride) return false;
      stride *= extents_[d];
    }
    return true;
  }

  template <class... I>
    requires(sizeof...(I) == Rank)
  CTFORMER_HOST_DEVICE T& operator()(I... index) const {
    const index_t idx[] = {index_t(index)...};
    index_t offset = 0;
    for (int d = 0; d < Rank; ++d) offset += idx[d] * strides_[d];
    return data_[offset];
  }

  /// The two last dimensions swapped (no data moves).
  CTFORMER_HOST_DEVICE tensor_view transposed() const
    requires(Rank >= 2)
  {
    tensor_view t = *this;
    std::swap(t.extents_[Rank - 1], t.extents_[Rank - 2]);
    std::swap(t.strides_[Rank - 1], t.strides_[Rank - 2]);
    return t;
  }

  /// The sub-view at index i of the first dimension.
  CTFORMER_HOST_DEVICE tensor_view<T, Rank - 1> operator[](index_t i) const
    requires(Rank >= 2)
  {
    std::array<index_t, Rank - 1> e{}, s{};
    for (int d = 1; d < Rank; ++d) {
      e[d - 1] = extents_[d];
      s[d - 1] = strides_[d];
    }
    return tensor_view<T, Rank - 1>(data_ + i * strides_[0], e, s);
  }

 private:
  T* data_ = nullptr;
  std::array<index_t, Rank> extents_{};
  std::array<index_t, Rank> strides_{};
};

template <class T, int Rank>
using const_view = tensor_view<const T, Rank>;

/// Makes a contiguous view: `view(ptr, rows, cols)`.
template <class T, class... E>
CTFORMER_HOST_DEVICE tensor_view<T, int(sizeof...(E))> view(T* data, E... extents) {
  return tensor_view<T, int(sizeof...(E))>(data, {index_t(extents)...});
}

/// "(2, 3, 4)"
template <class T, int Rank>
std::string shape_string(const tensor_view<T, Rank>& v) {
  std::ostringstream out;
  out << '(';
  for (int d = 0; d < Rank; ++d) out << (d ? ", " : "") << v.extent(d);
  out << ')';
  return out.str();
}

namespace detail {
template <class A, class B>
std::string two_shapes(const char* operation, const char* name_a, const A& a, const char* name_b, const B& b,
                       const char* what) {
  std::ostringstream out;
  out << "ctformer::" << operation << ": " << what << ": " << name_a << " has shape " << shape_string(a) << ", "
      << name_b << " has shape " << shape_string(b);
  return out.str();
}
}  // namespace detail

/// Throws shape_error unless a.extent(da) == b.extent(db); the message names the
/// operation, both tensors and both shapes.
template <class A, class B>
void require_same_extent(const char* operation, const char* name_a, const A& a, int da, const char* name_b, const B& b,
                         int db) {
  if (a.extent(da) != b.extent(db)) {
    std::ostringstream what;
    what << "dimension " << da << " of " << name_a << " must equal dimension " << db << " of " << name_b;
    throw shape_error(detail::two_shapes(operation, name_a, a, name_b, b, what.str().c_str()));
  }
}

/// Throws shape_error unless both views have identical extents.
template <class A, class B>
void require_same_shape(const char* operation, const char* name_a, const A& a, const char* name_b, const B& b) {
  static_assert(A::rank == B::rank, "ctformer: tensors compared for equal shape must have the same rank");
  if (a.extents() != b.extents())
    throw shape_error(detail::two_shapes(operation, name_a, a, name_b, b, "shapes must be equal"));
}

/// Throws shape_error unless the view is densely packed row-major.
template <class A>
void require_contiguous(const char* operation, const char* name, const A& a) {
  if (!a.is_contiguous()) {
    std::ostringstream out;
    out << "ctformer::" << operation << ": " << name << " of shape " << shape_string(a) << " must be contiguous";
    throw shape_error(out.str());
  }
}

}  // namespace ctformer
