// ops::quantize, ops::dequantize, ops::quantized_gemv and ops::quantized_gemm:
// the operations on weights packed in a quant:: format, on any policy.
#pragma once

#include <string>
#include <type_traits>

#include "ctformer/core/error.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"
#include "ctformer/quant/interleaved_matrix.hpp"
#include "ctformer/quant/packed_matrix.hpp"

namespace ctformer::ops {

namespace detail {
template <class W, class V>
void require_packed_rows(const char* operation, const W& w, const char* name, const V& v, int dim, index_t expected,
                         const char* what) {
  if (v.extent(dim) != expected)
    throw shape_error(std::string("ctformer::") + operation + ": dimension " + std::to_string(dim) + " of " + name +
                      " must equal the weights' " + what + ": weights are (" + std::to_string(w.rows()) + ", " +
                      std::to_string(w.cols()) + "), " + name + " has shape " + shape_string(v));
}
template <class V>
void require_unit_last_stride(const char* operation, const char* name, const V& v) {
  if (v.extent(V::rank - 1) > 1 && v.stride(V::rank - 1) != 1)
    throw shape_error(std::string("ctformer::") + operation + ": the last dimension of " + name + " of shape " +
                      shape_string(v) + " must be contiguous");
}
}  // namespace detail

/// Packs the fp32 matrix w into out, rows split over the policy's threads.
/// w: (rows, cols) with contiguous rows; out: a packed_matrix of the same shape
/// (construct it with `packed_matrix<F>(rows, cols)`).
/// @tparam Format the weight_format of out
template <execution_policy P, view_of_rank<2> W, quant::weight_format Format>
void quantize(const P& exec, const W& w, quant::packed_matrix<Format>& out) {
  detail::require_packed_rows("quantize", out, "w", w, 0, out.rows(), "rows");
  detail::require_packed_rows("quantize", out, "w", w, 1, out.cols(), "columns");
  detail::require_unit_last_stride("quantize", "w", w);
  if constexpr (requires { quantize_rows_impl(exec, as_const(w), out); }) {
    quantize_rows_impl(exec, as_const(w), out);
  } else {
    static_assert(dependent_false<P, W>, "ctformer: quantize has no implementation for this execution policy");
  }
}

/// out = the fp32 values the packed weights stand for. out: (rows, cols), rows contiguous.
template <execution_policy P, quant::packed_weights W, view_of_rank<2> O>
  requires writable_view<O>
void dequantize(const P& exec, const W& w, const O& out) {
  detail::require_packed_rows("dequantize", w, "out", out, 0, w.rows(), "rows");
  detail::require_packed_rows("dequantize", w, "out", out, 1, w.cols(), "columns");
  detail::require_unit_last_stride("dequantize", "out", out);
  if constexpr (requires { dequantize_rows_impl(exec, w, out); }) {
    dequantize_rows_impl(exec, w, out);
  } else {
    static_assert(dependent_false<P, O>, "ctformer: dequantize has no implementation for this execution policy");
  }
}

/// y = W x with W still packed (the decode step of linear<Format>).
/// For q8_0, q4_0 and int8_rowwise, x is rounded to int8 blocks of 32
/// (scale max|x_b| / 127) and the dots are integer: the result differs from
/// dequantize(W) x by at most sum_b (d_x[b] / 2) * sum_{i in b} |W[r, i]|.
/// bf16 and fp32 weights are dotted with x in fp32.
/// w: (out, in), x: (in), y: (out).
/// @tparam W a quant::packed_matrix of any format, or quant::interleaved_matrix
template <execution_policy P, quant::packed_weights W, view_of_rank<1> X, view_of_rank<1> Y>
  requires writable_view<Y>
void quantized_gemv(const P& exec, const W& w, const X& x, const Y& y) {
  static_assert(std::is_same_v<typename X::value_type, float> && std::is_same_v<typename Y::value_type, float>,
                "ctformer: quantized_gemv takes fp32 x and y");
  detail::require_packed_rows("quantized_gemv", w, "x", x, 0, w.cols(), "columns");
  detail::require_packed_rows("quantized_gemv", w, "y", y, 0, w.rows(), "rows");
  if constexpr (requires { quantized_gemv_impl(exec, w, as_const(x), y); }) {
    quantized_gemv_impl(exec, w, as_const(x), y);
  } else {
    static_assert(dependent_false<P, W>,
                  "ctformer: quantized_gemv has no implementation for this execution policy and weight format");
  }
}

/// y = x W^T for T tokens at once (prefill of linear<Format>), with W packed.
/// For a packed_matrix it matches dequantize(W) then an fp32 GEMM, up to
/// summation order (tiles of weights are dequantized; x stays fp32). An
/// interleaved_matrix rounds x to int8 blocks as the GEMV does, and each
/// token's row of y is bit-identical to quantized_gemv of that token.
/// w: (out, in), x: (T, in) rows contiguous, y: (T, out).
/// @tparam W a quant::packed_matrix of any format, or quant::interleaved_matrix
template <execution_policy P, quant::packed_weights W, view_of_rank<2> X, view_of_rank<2> Y>
  requires writable_view<Y>
void quantized_gemm(const P& exec, const W& w, const X& x, const Y& y) {
  static_assert(std::is_same_v<typename X::value_type, float> && std::is_same_v<typename Y::value_type, float>,
                "ctformer: quantized_gemm takes fp32 x and y");
  detail::require_packed_rows("quantized_gemm", w, "x", x, 1, w.cols(), "columns");
  detail::require_packed_rows("quantized_gemm", w, "y", y, 1, w.rows(), "rows");
  require_same_extent("quantized_gemm", "x", x, 0, "y", y, 0);
  detail::require_unit_last_stride("quantized_gemm", "x", x);
  if constexpr (requires { quantized_gemm_impl(exec, w, as_const(x), y); }) {
    quantized_gemm_impl(exec, w, as_const(x), y);
  } else {
    static_assert(dependent_false<P, W>,
                  "ctformer: quantized_gemm has no implementation for this execution policy and weight format");
  }
}

/// True when q8_0 weights run faster on policy P in a
/// quant::interleaved_matrix (8 rows interleaved, an int8 GEMM for prefill)
/// than in a row-major packed_matrix: on the CPU, a build with AVX512_VNNI,
/// or AVX2 without AVX-512. Lets an engine choose its weight layout at
/// compile time.
template <execution_policy P>
inline constexpr bool interleave_q8_0 = [] {
  if constexpr (requires { interleave_q8_0_impl(static_cast<const P*>(nullptr)); })
    return interleave_q8_0_impl(static_cast<const P*>(nullptr));
  else
    return false;
}();

}  // namespace ctformer::ops
