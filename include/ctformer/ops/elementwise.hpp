// ops::copy, fill, convert, add, add_scaled: the small elementwise operations
// the layers glue together with.
#pragma once

#include "ctformer/core/error.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

/// dst = src, element for element; both contiguous, same type, same size.
/// Either may live in host or device memory: copying a device buffer to the
/// host is how results are read back (the policy's stream orders it).
template <execution_policy P, view_of_rank<1> S, view_of_rank<1> D>
  requires writable_view<D>
void copy(const P& exec, const S& src, const D& dst) {
  static_assert(std::is_same_v<typename S::value_type, typename D::value_type>,
                "ctformer: copy needs the same number type on both sides; use ops::convert to change it");
  require_same_shape("copy", "src", src, "dst", dst);
  if constexpr (requires { copy_impl(exec, as_const(src), dst); }) {
    copy_impl(exec, as_const(src), dst);
  } else {
    static_assert(dependent_false<P, S>, "ctformer: copy has no implementation for this execution policy");
  }
}

/// dst[i] = value.
template <execution_policy P, view_of_rank<1> D>
  requires writable_view<D>
void fill(const P& exec, const D& dst, typename D::value_type value) {
  if constexpr (requires { fill_impl(exec, dst, value); }) {
    fill_impl(exec, dst, value);
  } else {
    static_assert(dependent_false<P, D>, "ctformer: fill has no implementation for this execution policy and this number type");
  }
}

/// dst[i] = To(src[i]) with round-to-nearest-even (float <-> bf16, fp16, fp8_e4m3).
template <execution_policy P, view_of_rank<1> S, view_of_rank<1> D>
  requires writable_view<D>
void convert(const P& exec, const S& src, const D& dst) {
  require_same_shape("convert", "src", src, "dst", dst);
  if constexpr (requires { convert_impl(exec, as_const(src), dst); }) {
    convert_impl(exec, as_const(src), dst);
  } else {
    static_assert(dependent_false<P, S, D>, "ctformer: convert has no implementation for this execution policy and these number types");
  }
}

/// out[i] = a[i] + b[i] (out may alias a or b).
template <execution_policy P, view_of_rank<1> A, view_of_rank<1> B, view_of_rank<1> O>
  requires writable_view<O>
void add(const P& exec, const A& a, const B& b, const O& out) {
  require_same_shape("add", "a", a, "b", b);
  require_same_shape("add", "a", a, "out", out);
  if constexpr (requires { add_impl(exec, as_const(a), as_const(b), out); }) {
    add_impl(exec, as_const(a), as_const(b), out);
  } else {
    static_assert(dependent_false<P, A>, "ctformer: add has no implementation for this execution policy and these number types");
  }
}

/// y[i] += alpha * x[i].
template <execution_policy P, view_of_rank<1> X, view_of_rank<1> Y>
  requires writable_view<Y>
void add_scaled(const P& exec, float alpha, const X& x, const Y& y) {
  require_same_shape("add_scaled", "x", x, "y", y);
  if constexpr (requires { add_scaled_impl(exec, alpha, as_const(x), y); }) {
    add_scaled_impl(exec, alpha, as_const(x), y);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: add_scaled has no implementation for this execution policy and these number types");
  }
}

}  // namespace ctformer::ops
