// CPU kernels for the optimizers: fused AdamW and SGD-with-momentum updates
// over the whole flat parameter buffer, sum of squares (global gradient norm)
// and in-place scaling.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <span>

#include "ctformer/core/parameter_range.hpp"
#include "ctformer/kernels/cpu/detail/vector_math.hpp"
#include "ctformer/kernels/cpu/isa.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {

// Chunk of the flat buffer one thread updates at a time: large enough that a
// parallel step is a handful of OpenMP iterations, small enough to balance.
inline constexpr index_t optimizer_chunk = 1 << 14;

// Calls body(lo, hi, decay) for the pieces of [begin, end) cut by the ranges'
// boundaries; pieces covered by no range get decay = false. The ranges are
// sorted and disjoint (ops/ checks), so a binary search finds the first one.
template <class Body>
void for_decay_segments(std::span<const parameter_range> ranges, index_t begin, index_t end, Body&& body) {
  auto it = std::partition_point(ranges.begin(), ranges.end(),
                                 [&](const parameter_range& r) { return r.offset + r.size <= begin; });
  index_t at = begin;
  for (; at < end && it != ranges.end(); ++it) {
    if (it->offset >= end) break;
    if (it->offset > at) {
      body(at, it->offset, false);
      at = it->offset;
    }
    const index_t stop = std::min(end, it->offset + it->size);
    if (stop > at) body(at, stop, it->decay);
    at = std::max(at, stop);
  }
  if (at < end) body(at, end, false);
}

template <class Body>
void for_optimizer_chunks(const par_t& exec, index_t n, Body&& body) {
  const index_t chunks = (n + optimizer_chunk - 1) / optimizer_chunk;
  parallel_for(exec, chunks, [&](index_t c) {
    const index_t begin = c * optimizer_chunk;
    body(begin, std::min(n, begin + optimizer_chunk));
  });
}

}  // namespace detail

namespace detail::optim {
// Square root per lane: IEEE-exact in every width, so vector body and tail agree.
inline f32x1 vsqrt(f32x1 a) { return {std::sqrt(a.v)}; }
#if defined(CTFORMER_CPU_AVX2)
inline f32x8 vsqrt(f32x8 a) { return {_mm256_sqrt_ps(a.v)}; }
#endif
#if defined(CTFORMER_CPU_AVX512)
inline f32x16 vsqrt(f32x16 a) { return {_mm512_sqrt_ps(a.v)}; }
#endif
}  // namespace detail::optim

// params, grads, m, v: (P), contiguous (ops/ checks).
inline void adamw_update_impl(const par_t& exec, tensor_view<float, 1> params, tensor_view<const float, 1> grads,
                              tensor_view<float, 1> m, tensor_view<float, 1> v,
                              std::span<const parameter_range> ranges, const adamw_coefficients& c) {
  using V = detail::vf;
  // Bias corrections in double, once per step, as PyTorch computes them on the host.
  const double bias1 = 1.0 - std::pow(double(c.beta1), double(c.step));
  const double bias2 = 1.0 - std::pow(double(c.beta2), double(c.step));
  const V step_size = V::splat(float(double(c.lr) / bias1));
  const V sqrt_bias2 = V::splat(float(std::sqrt(bias2)));
  const V b2 = V::splat(c.beta2), one_minus_b1 = V::splat(1.0f - c.beta1), one_minus_b2 = V::splat(1.0f - c.beta2);
  const V eps = V::splat(c.eps), gs = V::splat(c.grad_scale);
  const float decay_keep = 1.0f - c.lr * c.weight_decay;
  float* p = params.data();
  const float* g = grads.data();
  float* pm = m.data();
  float* pv = v.data();
  // Every element, the tail included, goes through the same vector arithmetic
  // (separate multiplies and adds, no FMA), so the result does not depend on
  // where chunks or ranges cut the buffer.
  auto segment = [&](index_t lo, index_t hi, bool decay) {
    const V keep = V::splat((decay || c.decay_all) ? decay_keep : 1.0f);
    detail::for_vectors(hi - lo, [&](index_t j, int count, int) {
      const index_t i = lo + j;
      const V gi = detail::load_n<V>(g + i, count) * gs;
      const V mo = detail::load_n<V>(pm + i, count), vo = detail::load_n<V>(pv + i, count);
      // m as torch's lerp (m + (1-b1)(g-m)), v as its addcmul: the reference's rounding.
      const V mi = mo + one_minus_b1 * (gi - mo);
      const V vi = b2 * vo + one_minus_b2 * (gi * gi);
      detail::store_n(pm + i, mi, count);
      detail::store_n(pv + i, vi, count);
      const V denom = detail::optim::vsqrt(vi) / sqrt_bias2 + eps;
      detail::store_n(p + i, detail::load_n<V>(p + i, count) * keep - step_size * (mi / denom), count);
    });
  };
  detail::for_optimizer_chunks(exec, params.extent(0), [&](index_t begin, index_t end) {
    if (c.decay_all || c.weight_decay == 0.0f)
      segment(begin, end, false);
    else
      detail::for_decay_segments(ranges, begin, end, segment);
  });
}

// params, grads, momentum: (P), contiguous.
inline void sgd_update_impl(const par_t& exec, tensor_view<float, 1> params, tensor_view<const float, 1> grads,
                            tensor_view<float, 1> momentum, std::span<const parameter_range> ranges,
                            const sgd_coefficients& c) {
  using V = detail::vf;
  const V mu = V::splat(c.momentum), lr = V::splat(c.lr), gs = V::splat(c.grad_scale);
  float* p = params.data();
  const float* g = grads.data();
  float* buf = momentum.data();
  auto segment = [&](index_t lo, index_t hi, bool decay) {
    const V wd = V::splat((decay || c.decay_all) ? c.weight_decay : 0.0f);
    detail::for_vectors(hi - lo, [&](index_t j, int count, int) {
      const index_t i = lo + j;
      const V pi = detail::load_n<V>(p + i, count);
      const V gi = detail::load_n<V>(g + i, count) * gs + wd * pi;
      const V bi = mu * detail::load_n<V>(buf + i, count) + gi;
      detail::store_n(buf + i, bi, count);
      // Nesterov looks one momentum step ahead: d = g + mu*buf; plain: d = buf.
      const V d = c.nesterov ? gi + mu * bi : bi;
      detail::store_n(p + i, pi - lr * d, count);
    });
  };
  detail::for_optimizer_chunks(exec, params.extent(0), [&](index_t begin, index_t end) {
    if (c.decay_all || c.weight_decay == 0.0f)
      segment(begin, end, c.decay_all);
    else
      detail::for_decay_segments(ranges, begin, end, segment);
  });
}

// x: (n). Summed in a fixed number of contiguous blocks, each in double, then
// the blocks in order: the result does not depend on the thread count, so a
// run resumed with other threads clips identically.
inline double sum_of_squares_impl(const par_t& exec, tensor_view<const float, 1> x) {
  constexpr index_t blocks = 64;
  std::array<double, blocks> partial{};
  const index_t n = x.extent(0);
  const float* px = x.data();
  const index_t stride = x.stride(0);
  detail::parallel_for(exec, n >= blocks * 1024 ? blocks : 1, [&](index_t b) {
    const index_t nb = n >= blocks * 1024 ? blocks : 1;
    const index_t lo = n * b / nb, hi = n * (b + 1) / nb;
    double s = 0.0;
    if (stride == 1) {
      // 16 running sums: four independent vector chains hide the add latency.
      double acc[16] = {};
      index_t i = lo;
      for (; i + 16 <= hi; i += 16) {
#pragma omp simd
        for (int k = 0; k < 16; ++k) acc[k] += double(px[i + k]) * double(px[i + k]);
      }
      for (; i < hi; ++i) s += double(px[i]) * double(px[i]);
      for (double a : acc) s += a;
    } else {
      for (index_t i = lo; i < hi; ++i) s += double(px[i * stride]) * double(px[i * stride]);
    }
    partial[std::size_t(b)] = s;
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

// x: (n), scaled in place.
inline void scale_impl(const par_t& exec, float alpha, tensor_view<float, 1> x) {
  float* px = x.data();
  const index_t stride = x.stride(0);
  detail::for_optimizer_chunks(exec, x.extent(0), [&](index_t lo, index_t hi) {
    if (stride == 1) {
#pragma omp simd
      for (index_t i = lo; i < hi; ++i) px[i] *= alpha;
    } else {
      for (index_t i = lo; i < hi; ++i) px[i * stride] *= alpha;
    }
  });
}

}  // namespace ctformer::cpu
