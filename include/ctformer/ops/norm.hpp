// ops::layer_norm_* and ops::rms_norm_*: normalisation over the last dimension.
#pragma once

#include "ctformer/core/error.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

/// y = (x - mean) * rstd * weight + bias, per row. Saves mean and rstd
/// (1 / sqrt(var + eps)) for the backward pass.
/// x, y: (N, C); weight, bias: (C); mean, rstd: (N). y may alias x.
template <execution_policy P, class X, class W, class Bias, class Y, class M, class R>
void layer_norm_forward(const P& exec, const X& x, const W& weight, const Bias& bias, const Y& y, const M& mean,
                        const R& rstd, float eps = 1e-5f) {
  static_assert(view_of_rank<X, 2> && view_of_rank<Y, 2> && view_of_rank<W, 1> && view_of_rank<Bias, 1> &&
                    view_of_rank<M, 1> && view_of_rank<R, 1>,
                "ctformer: layer_norm_forward takes x, y of rank 2 and weight, bias, mean, rstd of rank 1");
  require_same_shape("layer_norm_forward", "x", x, "y", y);
  require_same_extent("layer_norm_forward", "weight", weight, 0, "x", x, 1);
  require_same_extent("layer_norm_forward", "bias", bias, 0, "x", x, 1);
  require_same_extent("layer_norm_forward", "mean", mean, 0, "x", x, 0);
  require_same_extent("layer_norm_forward", "rstd", rstd, 0, "x", x, 0);
  if constexpr (requires { layer_norm_forward_impl(exec, as_const(x), as_const(weight), as_const(bias), y, mean, rstd, eps); }) {
    layer_norm_forward_impl(exec, as_const(x), as_const(weight), as_const(bias), y, mean, rstd, eps);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: layer_norm_forward has no implementation for this execution policy and these number types");
  }
}

/// Backward of layer_norm_forward. dx is overwritten; dweight and dbias are
/// accumulated (+=), so micro-batches add up.
/// dy, x, dx: (N, C); weight, dweight, dbias: (C); mean, rstd: (N).
template <execution_policy P, class DY, class X, class W, class M, class R, class DX, class DW, class DB>
void layer_norm_backward(const P& exec, const DY& dy, const X& x, const W& weight, const M& mean, const R& rstd,
                         const DX& dx, const DW& dweight, const DB& dbias) {
  require_same_shape("layer_norm_backward", "dy", dy, "x", x);
  require_same_shape("layer_norm_backward", "dx", dx, "x", x);
  require_same_extent("layer_norm_backward", "weight", weight, 0, "x", x, 1);
  require_same_extent("layer_norm_backward", "dweight", dweight, 0, "x", x, 1);
  require_same_extent("layer_norm_backward", "dbias", dbias, 0, "x", x, 1);
  require_same_extent("layer_norm_backward", "mean", mean, 0, "x", x, 0);
  require_same_extent("layer_norm_backward", "rstd", rstd, 0, "x", x, 0);
  if constexpr (requires { layer_norm_backward_impl(exec, as_const(dy), as_const(x), as_const(weight), as_const(mean), as_const(rstd), dx, dweight, dbias); }) {
    layer_norm_backward_impl(exec, as_const(dy), as_const(x), as_const(weight), as_const(mean), as_const(rstd), dx, dweight, dbias);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: layer_norm_backward has no implementation for this execution policy and these number types");
  }
}

/// y = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) + eps), per row.
/// x, y: (N, C); weight: (C); rstd: (N). y may alias x.
template <execution_policy P, class X, class W, class Y, class R>
void rms_norm_forward(const P& exec, const X& x, const W& weight, const Y& y, const R& rstd, float eps = 1e-5f) {
  static_assert(view_of_rank<X, 2> && view_of_rank<Y, 2> && view_of_rank<W, 1> && view_of_rank<R, 1>,
                "ctformer: rms_norm_forward takes x, y of rank 2 and weight, rstd of rank 1");
  require_same_shape("rms_norm_forward", "x", x, "y", y);
  require_same_extent("rms_norm_forward", "weight", weight, 0, "x", x, 1);
  require_same_extent("rms_norm_forward", "rstd", rstd, 0, "x", x, 0);
  if constexpr (requires { rms_norm_forward_impl(exec, as_const(x), as_const(weight), y, rstd, eps); }) {
    rms_norm_forward_impl(exec, as_const(x), as_const(weight), y, rstd, eps);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: rms_norm_forward has no implementation for this execution policy and these number types");
  }
}

/// Backward of rms_norm_forward. dx is overwritten; dweight accumulated (+=).
/// dy, x, dx: (N, C); weight, dweight: (C); rstd: (N).
template <execution_policy P, class DY, class X, class W, class R, class DX, class DW>
void rms_norm_backward(const P& exec, const DY& dy, const X& x, const W& weight, const R& rstd, const DX& dx,
                       const DW& dweight) {
  require_same_shape("rms_norm_backward", "dy", dy, "x", x);
  require_same_shape("rms_norm_backward", "dx", dx, "x", x);
  require_same_extent("rms_norm_backward", "weight", weight, 0, "x", x, 1);
  require_same_extent("rms_norm_backward", "dweight", dweight, 0, "x", x, 1);
  require_same_extent("rms_norm_backward", "rstd", rstd, 0, "x", x, 0);
  if constexpr (requires { rms_norm_backward_impl(exec, as_const(dy), as_const(x), as_const(weight), as_const(rstd), dx, dweight); }) {
    rms_norm_backward_impl(exec, as_const(dy), as_const(x), as_const(weight), as_const(rstd), dx, dweight);
  } else {
    static_assert(dependent_false<P, X>, "ctformer: rms_norm_backward has no implementation for this execution policy and these number types");
  }
}

}  // namespace ctformer::ops
