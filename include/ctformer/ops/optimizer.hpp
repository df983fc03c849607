// ops::adamw_update, sgd_update, sum_of_squares, scale: the fused optimizer
// updates over the flat parameter buffer and the reductions clipping needs.
#pragma once

#include <span>
#include <string>
#include <type_traits>

#include "ctformer/core/error.hpp"
#include "ctformer/core/parameter_range.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

namespace detail {
// Ranges must be sorted by offset, disjoint and inside the buffer: the kernels
// find a chunk's ranges by binary search and trust this.
inline void check_parameter_ranges(const char* operation, std::span<const parameter_range> ranges, index_t n) {
  index_t end_of_previous = 0;
  for (std::size_t k = 0; k < ranges.size(); ++k) {
    const parameter_range& r = ranges[k];
    if (r.offset < 0 || r.size < 0 || r.offset + r.size > n)
      throw invalid_input(std::string("ctformer::") + operation + ": parameter range " + std::to_string(k) +
                          " [" + std::to_string(r.offset) + ", " + std::to_string(r.offset + r.size) +
                          ") lies outside the parameter buffer of " + std::to_string(n) + " elements");
    if (r.offset < end_of_previous)
      throw invalid_input(std::string("ctformer::") + operation + ": parameter range " + std::to_string(k) +
                          " starts at " + std::to_string(r.offset) + ", before the previous range ends at " +
                          std::to_string(end_of_previous) + " (ranges must be sorted and disjoint)");
    end_of_previous = r.offset + r.size;
  }
}

template <class V>
constexpr bool is_float_view = std::is_same_v<typename std::remove_cvref_t<V>::value_type, float>;
}  // namespace detail

/// One fused AdamW step over the whole parameter buffer (see adamw_coefficients
/// for the formula). Weight decay applies to elements in ranges with
/// decay = true (or everywhere with c.decay_all).
/// params, grads, m, v: (P) float, contiguous, in the policy's memory.
/// ranges: sorted, disjoint, inside [0, P); host memory.
/// @tparam P execution policy
template <execution_policy P, view_of_rank<1> W, view_of_rank<1> G, view_of_rank<1> M, view_of_rank<1> V>
  requires writable_view<W> && writable_view<M> && writable_view<V>
void adamw_update(const P& exec, const W& params, const G& grads, const M& m, const V& v,
                  std::span<const parameter_range> ranges, const adamw_coefficients& c) {
  static_assert(detail::is_float_view<W> && detail::is_float_view<G> && detail::is_float_view<M> &&
                    detail::is_float_view<V>,
                "ctformer: adamw_update works on fp32 master weights, gradients and state");
  require_same_shape("adamw_update", "params", params, "grads", grads);
  require_same_shape("adamw_update", "params", params, "m", m);
  require_same_shape("adamw_update", "params", params, "v", v);
  require_contiguous("adamw_update", "params", params);
  require_contiguous("adamw_update", "grads", grads);
  require_contiguous("adamw_update", "m", m);
  require_contiguous("adamw_update", "v", v);
  if (c.step < 1)
    throw invalid_input("ctformer::adamw_update: step is " + std::to_string(c.step) +
                        "; bias correction counts steps from 1");
  detail::check_parameter_ranges("adamw_update", ranges, params.extent(0));
  if constexpr (requires { adamw_update_impl(exec, params, as_const(grads), m, v, ranges, c); }) {
    adamw_update_impl(exec, params, as_const(grads), m, v, ranges, c);
  } else {
    static_assert(dependent_false<P, W>, "ctformer: adamw_update has no implementation for this execution policy");
  }
}

/// One fused SGD-with-momentum step (see sgd_coefficients for the formula).
/// params, grads, momentum: (P) float, contiguous. ranges as for adamw_update.
template <execution_policy P, view_of_rank<1> W, view_of_rank<1> G, view_of_rank<1> M>
  requires writable_view<W> && writable_view<M>
void sgd_update(const P& exec, const W& params, const G& grads, const M& momentum,
                std::span<const parameter_range> ranges, const sgd_coefficients& c) {
  static_assert(detail::is_float_view<W> && detail::is_float_view<G> && detail::is_float_view<M>,
                "ctformer: sgd_update works on fp32 master weights, gradients and state");
  require_same_shape("sgd_update", "params", params, "grads", grads);
  require_same_shape("sgd_update", "params", params, "momentum", momentum);
  require_contiguous("sgd_update", "params", params);
  require_contiguous("sgd_update", "grads", grads);
  require_contiguous("sgd_update", "momentum", momentum);
  detail::check_parameter_ranges("sgd_update", ranges, params.extent(0));
  if constexpr (requires { sgd_update_impl(exec, params, as_const(grads), momentum, ranges, c); }) {
    sgd_update_impl(exec, params, as_const(grads), momentum, ranges, c);
  } else {
    static_assert(dependent_false<P, W>, "ctformer: sgd_update has no implementation for this execution policy");
  }
}

/// sum(x[i]^2), accumulated in double; the result does not depend on the
/// thread count. x: (n) float.
template <execution_policy P, view_of_rank<1> X>
double sum_of_squares(const P& exec, const X& x) {
  static_assert(detail::is_float_view<X>, "ctformer: sum_of_squares takes a float view");
  if constexpr (requires { sum_of_squares_impl(exec, as_const(x)); }) {
    return sum_of_squares_impl(exec, as_const(x));
  } else {
    static_assert(dependent_false<P, X>, "ctformer: sum_of_squares has no implementation for this execution policy");
    return 0.0;
  }
}

/// x[i] *= alpha, in place. x: (n) float.
template <execution_policy P, view_of_rank<1> X>
  requires writable_view<X>
void scale(const P& exec, float alpha, const X& x) {
  static_assert(detail::is_float_view<X>, "ctformer: scale takes a float view");
  if constexpr (requires { scale_impl(exec, alpha, x); }) {
    scale_impl(exec, alpha, x);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: scale has no implementation for this execution policy");
  }
}

}  // namespace ctformer::ops
