// CPU kernels for softmax over the last dimension (optionally causal) and its
// backward. Each row is read from memory once and written once (the max and
// normalise passes revisit it in L1); exp is the vector approximation of
// detail/vector_math.hpp.
#pragma once

#include <cmath>

#include "ctformer/core/softmax_mask.hpp"
#include "ctformer/kernels/cpu/detail/vector_math.hpp"
#include "ctformer/kernels/cpu/norm.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {
// yr[0, visible) = softmax(scale * xr[0, visible)), yr[visible, tk) = 0.
// yr may alias xr.
inline void softmax_row(const float* xr, float* yr, index_t visible, index_t tk, float scale) {
  const vf vscale = vf::splat(scale);
  if (visible > 0) {
    // Padding lanes hold xr[0], a real element, so they do not change the max.
    vf mx[2] = {vf::splat(xr[0] * scale), vf::splat(xr[0] * scale)};
    for_vectors(visible, [&](index_t j, int k, int lane) { mx[lane] = max(mx[lane], load_n(xr + j, k, xr[0]) * vscale); });
    const vf vmax = vf::splat(reduce_max(max(mx[0], mx[1])));
    vf sum[2] = {vf::splat(0.0f), vf::splat(0.0f)};
    for_vectors(visible, [&](index_t j, int k, int lane) {
      const vf e = vexp(fma(load_n(xr + j, k), vscale, vf::splat(0.0f) - vmax));
      store_n(yr + j, e, k);
      sum[lane] = sum[lane] + e.keep_first(k);
    });
    const vf inverse = vf::splat(1.0f / reduce_add(sum[0] + sum[1]));
    for_vectors(visible, [&](index_t j, int k, int) { store_n(yr + j, load_n(yr + j, k) * inverse, k); });
  }
  for (index_t j = visible; j < tk; ++j) yr[j] = 0.0f;
}
}  // namespace detail

inline void softmax_forward_impl(const par_t& exec, tensor_view<const float, 3> x, tensor_view<float, 3> y, float scale,
                                 softmax_mask mask) {
  detail::require_unit_inner_stride("softmax_forward", "x", x);
  detail::require_unit_inner_stride("softmax_forward", "y", y);
  const index_t batch = x.extent(0), tq = x.extent(1), tk = x.extent(2);
  detail::parallel_for(exec, batch * tq, [&](index_t r) {
    const index_t b = r / tq, i = r % tq;
    // Causal: query i of Tq sees keys j <= i + (Tk - Tq).
    const index_t visible = mask == softmax_mask::causal ? i + (tk - tq) + 1 : tk;
    detail::softmax_row(&x(b, i, 0), &y(b, i, 0), visible < tk ? visible : tk, tk, scale);
  }, detail::min_rows_for_parallel(tk));
}

inline void softmax_backward_impl(const par_t& exec, tensor_view<const float, 3> y, tensor_view<const float, 3> dy,
                                  tensor_view<float, 3> dx, float scale) {
  using detail::vf;
  detail::require_unit_inner_stride("softmax_backward", "y", y);
  detail::require_unit_inner_stride("softmax_backward", "dy", dy);
  detail::require_unit_inner_stride("softmax_backward", "dx", dx);
  const index_t batch = y.extent(0), tq = y.extent(1), tk = y.extent(2);
  detail::parallel_for(exec, batch * tq, [&](index_t r) {
    const index_t b = r / tq, i = r % tq;
    const float* yr = &y(b, i, 0);
    const float* dyr = &dy(b, i, 0);
    float* dxr = &dx(b, i, 0);  // may alias dy: each element is read before it is written
    vf acc[2] = {vf::splat(0.0f), vf::splat(0.0f)};
    detail::for_vectors(tk, [&](index_t j, int k, int lane) {
      acc[lane] = fma(detail::load_n(yr + j, k), detail::load_n(dyr + j, k), acc[lane]);
    });
    const vf dot = vf::splat(reduce_add(acc[0] + acc[1]));
    const vf vscale = vf::splat(scale);
    detail::for_vectors(tk, [&](index_t j, int k, int) {
      detail::store_n(dxr + j, vscale * detail::load_n(yr + j, k) * (detail::load_n(dyr + j, k) - dot), k);
    });
  }, detail::min_rows_for_parallel(tk));
}

}  // namespace ctformer::cpu
