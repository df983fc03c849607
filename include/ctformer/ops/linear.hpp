// ops::linear and its backward halves: y = x W^T for whatever a weight matrix
// is stored as (fp32, fp32 master weights with operands rounded to bf16, the
// packed and interleaved quantized matrices), so a layer never asks.
#pragma once

#include <type_traits>

#include "ctformer/core/error.hpp"
#include "ctformer/core/number_types.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/elementwise.hpp"
#include "ctformer/ops/gemm.hpp"
#include "ctformer/ops/view_traits.hpp"
#include "ctformer/quant/interleaved_matrix.hpp"
#include "ctformer/quant/packed_matrix.hpp"

namespace ctformer::ops {

/// A weight matrix whose GEMMs run with both operands rounded to T (mixed
/// precision; accumulation stays fp32): `weight` is the rounded copy of the
/// fp32 master weights, and each activation operand is rounded into
/// `scratch_a` (the backward's second activation operand into `scratch_b`)
/// just before its GEMM. Each scratch holds the widest activation operand.
/// @tparam T the GEMM operand type (bf16)
template <class T>
struct mixed_precision_weight {
  tensor_view<const T, 2> weight;  // (out, in)
  tensor_view<T, 1> scratch_a, scratch_b;
};

template <class W>
inline constexpr bool is_mixed_precision_weight = false;
template <class T>
inline constexpr bool is_mixed_precision_weight<mixed_precision_weight<T>> = true;

template <class W>
inline constexpr bool is_dense_weight = false;
template <>
inline constexpr bool is_dense_weight<tensor_view<float, 2>> = true;
template <>
inline constexpr bool is_dense_weight<tensor_view<const float, 2>> = true;

/// What ops::linear takes as weights: an fp32 (out, in) view, a
/// mixed_precision_weight, or a quant::packed_matrix / interleaved_matrix.
template <class W>
concept linear_weight = is_dense_weight<W> || is_mixed_precision_weight<W> || quant::packed_weights<W>;

namespace detail {

template <class W>
index_t weight_rows(const W& w) {
  if constexpr (is_dense_weight<W>) return w.extent(0);
  else if constexpr (is_mixed_precision_weight<W>) return w.weight.extent(0);
  else return w.rows();
}
template <class W>
index_t weight_cols(const W& w) {
  if constexpr (is_dense_weight<W>) return w.extent(1);
  else if constexpr (is_mixed_precision_weight<W>) return w.weight.extent(1);
  else return w.cols();
}

// Rounds a row-major (rows, cols) activation into the first rows * cols
// elements of scratch: the mixed-precision operand of one GEMM.
template <execution_policy P, class T>
tensor_view<const T, 2> round_operand(const P& exec, tensor_view<const float, 2> x, tensor_view<T, 1> scratch,
                                      const char* operation) {
  const index_t rows = x.extent(0), cols = x.extent(1);
  if (rows * cols > scratch.extent(0))
    throw shape_error(std::string("ctformer::") + operation + ": an operand of shape " + shape_string(x) +
                      " does not fit the mixed-precision scratch of " + std::to_string(scratch.extent(0)) +
                      " elements");
  if (cols > 0 && x.stride(0) != cols && rows > 1)
    throw shape_error(std::string("ctformer::") + operation + ": a mixed-precision operand needs contiguous rows, "
                      "got strides of " + shape_string(x));
  ops::convert(exec, tensor_view<const float, 1>(x.data(), {rows * cols}),
               tensor_view<T, 1>(scratch.data(), {rows * cols}));
  return tensor_view<const T, 2>(scratch.data(), {rows, cols});
}

}  // namespace detail

/// y = x W^T, or y += x W^T when accumulate (the residual stream adds a
/// projection in place). x: (N, in) fp32, contiguous rows; W: (out, in);
/// y: (N, out) fp32. A packed matrix's kernel decides how (a GEMV for one
/// row, an integer or dequantizing GEMM for many) on the policies that have
/// one (linear_impl hooks: the CPU).
/// @tparam W a linear_weight
template <execution_policy P, view_of_rank<2> X, linear_weight W, view_of_rank<2> Y>
  requires writable_view<Y>
void linear(const P& exec, const X& x, const W& w, const Y& y, bool accumulate = false) {
  static_assert(std::is_same_v<typename X::value_type, float> && std::is_same_v<typename Y::value_type, float>,
                "ctformer: linear takes fp32 activations");
  if (x.extent(1) != detail::weight_cols(w) || y.extent(1) != detail::weight_rows(w) || x.extent(0) != y.extent(0))
    throw shape_error("ctformer::linear: x " + shape_string(x) + " and y " + shape_string(y) +
                      " do not fit a weight of (out, in) = (" + std::to_string(detail::weight_rows(w)) + ", " +
                      std::to_string(detail::weight_cols(w)) + ")");
  const float beta = accumulate ? 1.0f : 0.0f;
  if constexpr (is_dense_weight<W>) {
    ops::gemm(exec, as_const(x), as_const(w).transposed(), y, 1.0f, beta);
  } else if constexpr (is_mixed_precision_weight<W>) {
    ops::gemm(exec, detail::round_operand(exec, as_const(x), w.scratch_a, "linear"), w.weight.transposed(), y, 1.0f,
              beta);
  } else if constexpr (requires { linear_impl(exec, as_const(x), w, y, accumulate); }) {
    linear_impl(exec, as_const(x), w, y, accumulate);
  } else {
    static_assert(dependent_false<P, W>,
                  "ctformer: linear has no implementation for this execution policy and this weight matrix type "
                  "(packed and interleaved quantized matrices run on the CPU)");
  }
}

/// The backward of linear to its input: dx = dy W, or dx += dy W.
/// dy: (N, out), dx: (N, in). Training weights only (fp32 or mixed precision).
template <execution_policy P, view_of_rank<2> DY, linear_weight W, view_of_rank<2> DX>
  requires writable_view<DX>
void linear_backward_input(const P& exec, const DY& dy, const W& w, const DX& dx, bool accumulate = false) {
  static_assert(is_dense_weight<W> || is_mixed_precision_weight<W>,
                "ctformer: linear_backward_input runs on training weights (fp32, or fp32 with mixed-precision "
                "operands), not on packed inference matrices");
  const float beta = accumulate ? 1.0f : 0.0f;
  if constexpr (is_dense_weight<W>)
    ops::gemm(exec, as_const(dy), as_const(w), dx, 1.0f, beta);
  else
    ops::gemm(exec, detail::round_operand(exec, as_const(dy), w.scratch_a, "linear_backward_input"), w.weight, dx,
              1.0f, beta);
}

/// The backward of linear to its weight: dW += dy^T x (accumulated, as every
/// parameter gradient is). dy: (N, out), x: (N, in), dw: (out, in) fp32.
template <execution_policy P, view_of_rank<2> DY, view_of_rank<2> X, linear_weight W, view_of_rank<2> DW>
  requires writable_view<DW>
void linear_backward_weight(const P& exec, const DY& dy, const X& x, const W& w, const DW& dw) {
  static_assert(is_dense_weight<W> || is_mixed_precision_weight<W>,
                "ctformer: linear_backward_weight runs on training weights (fp32, or fp32 with mixed-precision "
                "operands), not on packed inference matrices");
  if constexpr (is_dense_weight<W>) {
    ops::gemm(exec, as_const(dy).transposed(), as_const(x), dw, 1.0f, 1.0f);
  } else {
    const auto dy_rounded = detail::round_operand(exec, as_const(dy), w.scratch_a, "linear_backward_weight");
    const auto x_rounded = detail::round_operand(exec, as_const(x), w.scratch_b, "linear_backward_weight");
    ops::gemm(exec, dy_rounded.transposed(), x_rounded, dw, 1.0f, 1.0f);
  }
}

}  // namespace ctformer::ops
