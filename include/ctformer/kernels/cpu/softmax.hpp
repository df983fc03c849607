// CPU kernels for softmax over the last dimension (optionally causal) and its
// backward. Each row is read from memory once and written once (the max and
// normalise passes revisit it in L1); exp is the vector approximation of
// detail/vector_math.hpp. Also the scan of a logits row that sampling starts with.
#pragma once

#include <cmath>
#include <limits>

#include "ctformer/core/logits_scan.hpp"
#include "ctformer/core/softmax_mask.hpp"
#include "ctformer/kernels/cpu/detail/vector_math.hpp"
#include "ctformer/kernels/cpu/isa.hpp"
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

/// One pass over a logits row for its maximum, its lowest finite value and
/// any NaN or +inf, then a search for the first index of the maximum (ties:
/// the smallest index, as a scalar scan would find). Eight lanes at a time:
/// it runs over the whole vocabulary for every sampled token.
inline logits_scan scan_logits_impl(const par_t&, tensor_view<const float, 1> logits) {
  constexpr float infinity = std::numeric_limits<float>::infinity();
  const index_t n = logits.extent(0);
  [[maybe_unused]] const bool contiguous = logits.stride(0) == 1;
  logits_scan r;
  auto take = [&](float v) {
    r.nan_or_positive_infinity |= !(v < infinity);
    if (v > r.max) r.max = v;
    if (v < r.lowest_finite && v > -infinity) r.lowest_finite = v;
  };
  index_t i = 0;
#if defined(CTFORMER_CPU_AVX2)
  if (contiguous && n >= 8) {
    const float* x = logits.data();
    const __m256 positive = _mm256_set1_ps(infinity), negative = _mm256_set1_ps(-infinity);
    __m256 vmax = negative, vlow = positive, invalid = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      // maxps/minps return the second operand when either is NaN: a NaN in v
      // leaves the running values alone (the NaN is caught by `invalid`).
      vmax = _mm256_max_ps(v, vmax);
      vlow = _mm256_min_ps(_mm256_blendv_ps(positive, v, _mm256_cmp_ps(v, negative, _CMP_GT_OQ)), vlow);
      invalid = _mm256_or_ps(invalid, _mm256_cmp_ps(v, positive, _CMP_NLT_UQ));  // NaN or +inf
    }
    alignas(32) float lanes_max[8], lanes_low[8];
    _mm256_store_ps(lanes_max, vmax);
    _mm256_store_ps(lanes_low, vlow);
    // A lane with no finite value holds +inf in lanes_low, so the lanes are
    // reduced here rather than passed through take().
    for (int lane = 0; lane < 8; ++lane) {
      if (lanes_max[lane] > r.max) r.max = lanes_max[lane];
      if (lanes_low[lane] < r.lowest_finite) r.lowest_finite = lanes_low[lane];
    }
    r.nan_or_positive_infinity = _mm256_movemask_ps(invalid) != 0;
  }
#endif
  // A pointer walk rather than logits(i): GCC then sees no index product
  // that could overflow (it warned, -Waggressive-loop-optimizations).
  const index_t stride = logits.stride(0);
  for (const float* p = logits.data() + i * stride; i < n; ++i, p += stride) take(*p);
  if (r.nan_or_positive_infinity) return r;
  // The first index holding the maximum (every value is <= max: no NaN).
  index_t j = 0;
#if defined(CTFORMER_CPU_AVX2)
  if (contiguous) {
    const float* x = logits.data();
    const __m256 target = _mm256_set1_ps(r.max);
    for (; j + 8 <= n; j += 8) {
      const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), target, _CMP_EQ_OQ));
      if (hits != 0) {
        r.argmax = j + __builtin_ctz(unsigned(hits));
        return r;
      }
    }
  }
#endif
  for (; j < n; ++j)
    if (logits(j) == r.max) {
      r.argmax = j;
      return r;
    }
  return r;  // n == 0: argmax 0
}

}  // namespace ctformer::cpu
