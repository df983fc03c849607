// CPU kernels for layer_norm and rms_norm, forward and backward. Each row is
// read from memory once and written once: the statistics passes revisit the
// row in L1. Rows go over threads; parameter gradients are summed per thread
// in scratch that is reused between calls (nothing allocates in steady state)
// and added up in thread order.
#pragma once

#include <cmath>
#include <cstring>
#include <string>

#include "ctformer/kernels/cpu/detail/vector_math.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {
template <class V>
void require_unit_inner_stride(const char* operation, const char* name, const V& v) {
  if (v.stride(V::rank - 1) != 1 && v.extent(V::rank - 1) > 1)
    throw shape_error(std::string("ctformer::") + operation + ": the last dimension of " + name + " of shape " +
                      shape_string(v) + " must have stride 1");
}

// A pointer to p's elements with unit stride: p's own data when it already is,
// else a copy in the calling thread's scratch slot.
inline const float* unit_stride_data(tensor_view<const float, 1> p, int slot) {
  if (p.stride(0) == 1 || p.extent(0) <= 1) return p.data();
  float* copy = scratch_floats(slot, std::size_t(p.extent(0)));
  for (index_t j = 0; j < p.extent(0); ++j) copy[j] = p(j);
  return copy;
}

// Per-thread partial sums of a parameter gradient of length count, in the
// calling thread's scratch slot; rows padded to 64 bytes so threads never
// share a cache line.
struct gradient_partials {
  float* data;
  index_t stride;
  int threads;
  gradient_partials(int slot, int threads_, index_t count)
      : stride((count + 15) / 16 * 16), threads(threads_) {
    data = scratch_floats(slot, std::size_t(stride) * std::size_t(threads_));
    std::memset(data, 0, sizeof(float) * std::size_t(stride) * std::size_t(threads_));
  }
  float* row(int t) const { return data + std::size_t(t) * std::size_t(stride); }
  // out[j] += sum over threads (in thread order) of row(t)[j].
  void add_to(tensor_view<float, 1> out, int used) const {
    const index_t count = out.extent(0);
    if (out.stride(0) == 1 || count <= 1) {
      float* o = out.data();
      for_vectors(count, [&](index_t j, int n, int) {
        vf sum = load_n(row(0) + j, n);
        for (int t = 1; t < used; ++t) sum = sum + load_n(row(t) + j, n);
        store_n(o + j, load_n(o + j, n) + sum, n);
      });
    } else {
      for (index_t j = 0; j < count; ++j) {
        float sum = row(0)[j];
        for (int t = 1; t < used; ++t) sum += row(t)[j];
        out(j) += sum;
      }
    }
  }
};
}  // namespace detail

inline void layer_norm_forward_impl(const par_t& exec, tensor_view<const float, 2> x, tensor_view<const float, 1> weight,
                                    tensor_view<const float, 1> bias, tensor_view<float, 2> y,
                                    tensor_view<float, 1> mean, tensor_view<float, 1> rstd, float eps) {
  using detail::vf;
  detail::require_unit_inner_stride("layer_norm_forward", "x", x);
  detail::require_unit_inner_stride("layer_norm_forward", "y", y);
  const index_t n = x.extent(0), c = x.extent(1);
  const float* w = detail::unit_stride_data(weight, 2);
  const float* b = detail::unit_stride_data(bias, 3);
  detail::parallel_for(exec, n, [&](index_t i) {
    const float* xr = &x(i, 0);
    float* yr = &y(i, 0);  // may alias xr: each element is read before it is written
    vf acc[2] = {vf::splat(0.0f), vf::splat(0.0f)};
    detail::for_vectors(c, [&](index_t j, int k, int lane) { acc[lane] = acc[lane] + detail::load_n(xr + j, k); });
    const float m = reduce_add(acc[0] + acc[1]) / float(c);
    // Variance from centred values (no cancellation), the row now in L1.
    const vf vm = vf::splat(m);
    acc[0] = acc[1] = vf::splat(0.0f);
    detail::for_vectors(c, [&](index_t j, int k, int lane) {
      const vf d = detail::load_n(xr + j, k, m) - vm;  // fill m: padding lanes add 0
      acc[lane] = fma(d, d, acc[lane]);
    });
    const float s = 1.0f / std::sqrt(reduce_add(acc[0] + acc[1]) / float(c) + eps);
    const vf vs = vf::splat(s);
    detail::for_vectors(c, [&](index_t j, int k, int) {
      const vf xhat = (detail::load_n(xr + j, k) - vm) * vs;
      detail::store_n(yr + j, fma(xhat, detail::load_n(w + j, k), detail::load_n(b + j, k)), k);
    });
    mean(i) = m;
    rstd(i) = s;
  }, detail::min_rows_for_parallel(c));
}

inline void layer_norm_backward_impl(const par_t& exec, tensor_view<const float, 2> dy, tensor_view<const float, 2> x,
                                     tensor_view<const float, 1> weight, tensor_view<const float, 1> mean,
                                     tensor_view<const float, 1> rstd, tensor_view<float, 2> dx,
                                     tensor_view<float, 1> dweight, tensor_view<float, 1> dbias) {
  using detail::vf;
  detail::require_unit_inner_stride("layer_norm_backward", "x", x);
  detail::require_unit_inner_stride("layer_norm_backward", "dy", dy);
  detail::require_unit_inner_stride("layer_norm_backward", "dx", dx);
  const index_t n = x.extent(0), c = x.extent(1);
  const index_t min_rows = detail::min_rows_for_parallel(2 * c);
  const int threads = n >= min_rows ? exec.thread_count() : 1;
  const float* w = detail::unit_stride_data(weight, 2);
  const detail::gradient_partials dw(0, threads, c), db(1, threads, c);
  const int used = detail::parallel_ranges(exec, n, [&](int t, index_t begin, index_t end) {
    float* dwp = dw.row(t);
    float* dbp = db.row(t);
    for (index_t i = begin; i < end; ++i) {
      const float* xr = &x(i, 0);
      const float* dyr = &dy(i, 0);
      float* dxr = &dx(i, 0);  // may alias dy or x: each element is read before it is written
      const vf vm = vf::splat(mean(i)), vs = vf::splat(rstd(i));
      vf sum_dyw[2] = {vf::splat(0.0f), vf::splat(0.0f)}, sum_dyw_xhat[2] = {vf::splat(0.0f), vf::splat(0.0f)};
      detail::for_vectors(c, [&](index_t j, int k, int lane) {
        const vf xhat = (detail::load_n(xr + j, k) - vm) * vs;
        const vf g = detail::load_n(dyr + j, k);
        const vf dyw = g * detail::load_n(w + j, k);
        sum_dyw[lane] = sum_dyw[lane] + dyw;
        sum_dyw_xhat[lane] = fma(dyw, xhat, sum_dyw_xhat[lane]);
        detail::store_n(dwp + j, fma(g, xhat, detail::load_n(dwp + j, k)), k);
        detail::store_n(dbp + j, detail::load_n(dbp + j, k) + g, k);
      });
      const vf mean_dyw = vf::splat(reduce_add(sum_dyw[0] + sum_dyw[1]) / float(c));
      const vf mean_dyw_xhat = vf::splat(reduce_add(sum_dyw_xhat[0] + sum_dyw_xhat[1]) / float(c));
      detail::for_vectors(c, [&](index_t j, int k, int) {
        const vf xhat = (detail::load_n(xr + j, k) - vm) * vs;
        const vf dyw = detail::load_n(dyr + j, k) * detail::load_n(w + j, k);
        detail::store_n(dxr + j, (dyw - mean_dyw - xhat * mean_dyw_xhat) * vs, k);
      });
    }
  }, min_rows);
  dw.add_to(dweight, used);
  db.add_to(dbias, used);
}

inline void rms_norm_forward_impl(const par_t& exec, tensor_view<const float, 2> x, tensor_view<const float, 1> weight,
                                  tensor_view<float, 2> y, tensor_view<float, 1> rstd, float eps) {
  using detail::vf;
  detail::require_unit_inner_stride("rms_norm_forward", "x", x);
  detail::require_unit_inner_stride("rms_norm_forward", "y", y);
  const index_t n = x.extent(0), c = x.extent(1);
  const float* w = detail::unit_stride_data(weight, 2);
  detail::parallel_for(exec, n, [&](index_t i) {
    const float* xr = &x(i, 0);
    float* yr = &y(i, 0);  // may alias xr
    vf acc[2] = {vf::splat(0.0f), vf::splat(0.0f)};
    detail::for_vectors(c, [&](index_t j, int k, int lane) {
      const vf v = detail::load_n(xr + j, k);
      acc[lane] = fma(v, v, acc[lane]);
    });
    const float s = 1.0f / std::sqrt(reduce_add(acc[0] + acc[1]) / float(c) + eps);
    const vf vs = vf::splat(s);
    detail::for_vectors(c, [&](index_t j, int k, int) {
      detail::store_n(yr + j, detail::load_n(xr + j, k) * vs * detail::load_n(w + j, k), k);
    });
    rstd(i) = s;
  }, detail::min_rows_for_parallel(c));
}

inline void rms_norm_backward_impl(const par_t& exec, tensor_view<const float, 2> dy, tensor_view<const float, 2> x,
                                   tensor_view<const float, 1> weight, tensor_view<const float, 1> rstd,
                                   tensor_view<float, 2> dx, tensor_view<float, 1> dweight) {
  using detail::vf;
  detail::require_unit_inner_stride("rms_norm_backward", "x", x);
  detail::require_unit_inner_stride("rms_norm_backward", "dy", dy);
  detail::require_unit_inner_stride("rms_norm_backward", "dx", dx);
  const index_t n = x.extent(0), c = x.extent(1);
  const index_t min_rows = detail::min_rows_for_parallel(2 * c);
  const int threads = n >= min_rows ? exec.thread_count() : 1;
  const float* w = detail::unit_stride_data(weight, 2);
  const detail::gradient_partials dw(0, threads, c);
  const int used = detail::parallel_ranges(exec, n, [&](int t, index_t begin, index_t end) {
    float* dwp = dw.row(t);
    for (index_t i = begin; i < end; ++i) {
      const float* xr = &x(i, 0);
      const float* dyr = &dy(i, 0);
      float* dxr = &dx(i, 0);  // may alias dy or x
      const vf vs = vf::splat(rstd(i));
      vf sum_dyw_xhat[2] = {vf::splat(0.0f), vf::splat(0.0f)};
      detail::for_vectors(c, [&](index_t j, int k, int lane) {
        const vf xhat = detail::load_n(xr + j, k) * vs;
        const vf g = detail::load_n(dyr + j, k);
        sum_dyw_xhat[lane] = fma(g * detail::load_n(w + j, k), xhat, sum_dyw_xhat[lane]);
        detail::store_n(dwp + j, fma(g, xhat, detail::load_n(dwp + j, k)), k);
      });
      const vf mean_dyw_xhat = vf::splat(reduce_add(sum_dyw_xhat[0] + sum_dyw_xhat[1]) / float(c));
      detail::for_vectors(c, [&](index_t j, int k, int) {
        const vf xhat = detail::load_n(xr + j, k) * vs;
        const vf dyw = detail::load_n(dyr + j, k) * detail::load_n(w + j, k);
        detail::store_n(dxr + j, (dyw - xhat * mean_dyw_xhat) * vs, k);
      });
    }
  }, min_rows);
  dw.add_to(dweight, used);
}

}  // namespace ctformer::cpu
