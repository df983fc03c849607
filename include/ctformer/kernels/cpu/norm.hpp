// CPU kernels for layer_norm and rms_norm, forward and backward: one pass
// (two for the backward's reductions) over each row, rows over threads.
#pragma once

#include <cmath>
#include <vector>

#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {
template <class V>
void require_unit_inner_stride(const char* operation, const char* name, const V& v) {
  if (v.stride(V::rank - 1) != 1 && v.extent(V::rank - 1) > 1)
    throw shape_error(std::string("ctformer::") + operation + ": the last dimension of " + name + " of shape " +
                      shape_string(v) + " must have stride 1");
}

// Accumulates per-thread partial sums of parameter gradients, then adds them
// in a fixed order so results do not depend on scheduling.
struct parameter_gradient_partials {
  std::vector<float> partial;  // (threads, count)
  int threads;
  index_t count;
  parameter_gradient_partials(int threads_, index_t count_)
      : partial(std::size_t(threads_) * std::size_t(count_), 0.0f), threads(threads_), count(count_) {}
  float* row(int t) { return partial.data() + std::size_t(t) * std::size_t(count); }
};
}  // namespace detail

inline void layer_norm_forward_impl(const par_t& exec, tensor_view<const float, 2> x, tensor_view<const float, 1> weight,
                                    tensor_view<const float, 1> bias, tensor_view<float, 2> y,
                                    tensor_view<float, 1> mean, tensor_view<float, 1> rstd, float eps) {
  detail::require_unit_inner_stride("layer_norm_forward", "x", x);
  detail::require_unit_inner_stride("layer_norm_forward", "y", y);
  const index_t n = x.extent(0), c = x.extent(1);
  const float* w = weight.data();
  const float* b = bias.data();
  detail::parallel_for(exec, n, [&](index_t i) {
    const float* xr = &x(i, 0);
    float* yr = &y(i, 0);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (index_t j = 0; j < c; ++j) sum += xr[j];
    const float m = sum / float(c);
    float var = 0.0f;
#pragma omp simd reduction(+ : var)
    for (index_t j = 0; j < c; ++j) var += (xr[j] - m) * (xr[j] - m);
    const float s = 1.0f / std::sqrt(var / float(c) + eps);
#pragma omp simd
    for (index_t j = 0; j < c; ++j) yr[j] = (xr[j] - m) * s * w[j * weight.stride(0)] + b[j * bias.stride(0)];
    mean(i) = m;
    rstd(i) = s;
  });
}

inline void layer_norm_backward_impl(const par_t& exec, tensor_view<const float, 2> dy, tensor_view<const float, 2> x,
                                     tensor_view<const float, 1> weight, tensor_view<const float, 1> mean,
                                     tensor_view<const float, 1> rstd, tensor_view<float, 2> dx,
                                     tensor_view<float, 1> dweight, tensor_view<float, 1> dbias) {
  detail::require_unit_inner_stride("layer_norm_backward", "x", x);
  detail::require_unit_inner_stride("layer_norm_backward", "dy", dy);
  detail::require_unit_inner_stride("layer_norm_backward", "dx", dx);
  const index_t n = x.extent(0), c = x.extent(1);
  const int threads = exec.thread_count();
  detail::parameter_gradient_partials dw(threads, c), db(threads, c);
  // Rows are split into one contiguous block per thread; each thread owns one
  // partial row of dweight/dbias.
  detail::parallel_for(exec, threads, [&](index_t t) {
    const index_t begin = n * t / threads, end = n * (t + 1) / threads;
    float* dwp = dw.row(int(t));
    float* dbp = db.row(int(t));
    for (index_t i = begin; i < end; ++i) {
      const float* xr = &x(i, 0);
      const float* dyr = &dy(i, 0);
      float* dxr = &dx(i, 0);
      const float m = mean(i), s = rstd(i);
      float sum_dyw = 0.0f, sum_dyw_xhat = 0.0f;
#pragma omp simd reduction(+ : sum_dyw, sum_dyw_xhat)
      for (index_t j = 0; j < c; ++j) {
        const float xhat = (xr[j] - m) * s;
        const float dyw = dyr[j] * weight(j);
        sum_dyw += dyw;
        sum_dyw_xhat += dyw * xhat;
        dwp[j] += dyr[j] * xhat;
        dbp[j] += dyr[j];
      }
      const float mean_dyw = sum_dyw / float(c), mean_dyw_xhat = sum_dyw_xhat / float(c);
#pragma omp simd
      for (index_t j = 0; j < c; ++j) {
        const float xhat = (xr[j] - m) * s;
        dxr[j] = (dyr[j] * weight(j) - mean_dyw - xhat * mean_dyw_xhat) * s;
      }
    }
  }, 1);
  for (int t = 0; t < threads; ++t)
    for (index_t j = 0; j < c; ++j) {
      dweight(j) += dw.row(t)[j];
      dbias(j) += db.row(t)[j];
    }
}

inline void rms_norm_forward_impl(const par_t& exec, tensor_view<const float, 2> x, tensor_view<const float, 1> weight,
                                  tensor_view<float, 2> y, tensor_view<float, 1> rstd, float eps) {
  detail::require_unit_inner_stride("rms_norm_forward", "x", x);
  detail::require_unit_inner_stride("rms_norm_forward", "y", y);
  const index_t n = x.extent(0), c = x.extent(1);
  detail::parallel_for(exec, n, [&](index_t i) {
    const float* xr = &x(i, 0);
    float* yr = &y(i, 0);
    float sum_squares = 0.0f;
#pragma omp simd reduction(+ : sum_squares)
    for (index_t j = 0; j < c; ++j) sum_squares += xr[j] * xr[j];
    const float s = 1.0f / std::sqrt(sum_squares / float(c) + eps);
#pragma omp simd
    for (index_t j = 0; j < c; ++j) yr[j] = xr[j] * s * weight(j);
    rstd(i) = s;
  });
}

inline void rms_norm_backward_impl(const par_t& exec, tensor_view<const float, 2> dy, tensor_view<const float, 2> x,
                                   tensor_view<const float, 1> weight, tensor_view<const float, 1> rstd,
                                   tensor_view<float, 2> dx, tensor_view<float, 1> dweight) {
  detail::require_unit_inner_stride("rms_norm_backward", "x", x);
  detail::require_unit_inner_stride("rms_norm_backward", "dy", dy);
  detail::require_unit_inner_stride("rms_norm_backward", "dx", dx);
  const index_t n = x.extent(0), c = x.extent(1);
  const int threads = exec.thread_count();
  detail::parameter_gradient_partials dw(threads, c);
  detail::parallel_for(exec, threads, [&](index_t t) {
    const index_t begin = n * t / threads, end = n * (t + 1) / threads;
    float* dwp = dw.row(int(t));
    for (index_t i = begin; i < end; ++i) {
      const float* xr = &x(i, 0);
      const float* dyr = &dy(i, 0);
      float* dxr = &dx(i, 0);
      const float s = rstd(i);
      float sum_dyw_xhat = 0.0f;
#pragma omp simd reduction(+ : sum_dyw_xhat)
      for (index_t j = 0; j < c; ++j) {
        const float xhat = xr[j] * s;
        sum_dyw_xhat += dyr[j] * weight(j) * xhat;
        dwp[j] += dyr[j] * xhat;
      }
      const float mean_dyw_xhat = sum_dyw_xhat / float(c);
#pragma omp simd
      for (index_t j = 0; j < c; ++j) dxr[j] = (dyr[j] * weight(j) - xr[j] * s * mean_dyw_xhat) * s;
    }
  }, 1);
  for (int t = 0; t < threads; ++t)
    for (index_t j = 0; j < c; ++j) dweight(j) += dw.row(t)[j];
}

}  // namespace ctformer::cpu
