// CPU kernels for softmax over the last dimension (optionally causal) and its backward.
#pragma once

#include <cmath>
#include <limits>

#include "ctformer/kernels/cpu/norm.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"
#include "ctformer/core/softmax_mask.hpp"

namespace ctformer::cpu {

inline void softmax_forward_impl(const par_t& exec, tensor_view<const float, 3> x, tensor_view<float, 3> y, float scale,
                                 softmax_mask mask) {
  detail::require_unit_inner_stride("softmax_forward", "x", x);
  detail::require_unit_inner_stride("softmax_forward", "y", y);
  const index_t batch = x.extent(0), tq = x.extent(1), tk = x.extent(2);
  detail::parallel_for(exec, batch * tq, [&](index_t r) {
    const index_t b = r / tq, i = r % tq;
    const float* xr = &x(b, i, 0);
    float* yr = &y(b, i, 0);
    const index_t visible = mask == softmax_mask::causal ? i + (tk - tq) + 1 : tk;
    float maximum = -std::numeric_limits<float>::infinity();
    for (index_t j = 0; j < visible; ++j) maximum = std::max(maximum, xr[j]);
    float sum = 0.0f;
    for (index_t j = 0; j < visible; ++j) {
      const float e = std::exp(scale * (xr[j] - maximum));
      yr[j] = e;
      sum += e;
    }
    const float inverse = 1.0f / sum;
#pragma omp simd
    for (index_t j = 0; j < visible; ++j) yr[j] *= inverse;
    for (index_t j = visible; j < tk; ++j) yr[j] = 0.0f;
  });
}

inline void softmax_backward_impl(const par_t& exec, tensor_view<const float, 3> y, tensor_view<const float, 3> dy,
                                  tensor_view<float, 3> dx, float scale) {
  detail::require_unit_inner_stride("softmax_backward", "y", y);
  detail::require_unit_inner_stride("softmax_backward", "dy", dy);
  detail::require_unit_inner_stride("softmax_backward", "dx", dx);
  const index_t batch = y.extent(0), tq = y.extent(1), tk = y.extent(2);
  detail::parallel_for(exec, batch * tq, [&](index_t r) {
    const index_t b = r / tq, i = r % tq;
    const float* yr = &y(b, i, 0);
    const float* dyr = &dy(b, i, 0);
    float* dxr = &dx(b, i, 0);
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (index_t j = 0; j < tk; ++j) dot += yr[j] * dyr[j];
#pragma omp simd
    for (index_t j = 0; j < tk; ++j) dxr[j] = scale * yr[j] * (dyr[j] - dot);
  });
}

}  // namespace ctformer::cpu
