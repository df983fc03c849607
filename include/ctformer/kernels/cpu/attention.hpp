// CPU kernels for causal multi-head attention (MHA, GQA and MQA alike) in the
// training form: forward saves the probabilities, backward reads them.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {
inline float dot_contiguous(const float* a, const float* b, index_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (index_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}
inline void axpy_contiguous(float alpha, const float* x, float* y, index_t n) {
#pragma omp simd
  for (index_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}
// Per-thread row scratch that grows once and is then reused: no allocation
// in steady state.
inline float* attention_row_scratch(index_t n) {
  thread_local std::vector<float> scratch;
  if (scratch.size() < std::size_t(n)) scratch.resize(std::size_t(n));
  return scratch.data();
}
}  // namespace detail

/// q: (B, T, H, D); k, v: (B, T, KV, D); out: (B, T, H, D); probs: (B, H, T, T).
/// Head h reads key/value head h / (H / KV). Every view has unit stride in D.
inline void causal_attention_forward_impl(const par_t& exec, tensor_view<const float, 4> q,
                                          tensor_view<const float, 4> k, tensor_view<const float, 4> v,
                                          tensor_view<float, 4> out, tensor_view<float, 4> probs, float scale) {
  const index_t batch = q.extent(0), t_len = q.extent(1), heads = q.extent(2), d = q.extent(3);
  const index_t group = heads / k.extent(2);
  detail::parallel_for(exec, batch * heads, [&](index_t bh) {
    const index_t b = bh / heads, h = bh % heads, g = h / group;
    for (index_t i = 0; i < t_len; ++i) {
      const float* qi = &q(b, i, h, 0);
      float* p = &probs(b, h, i, 0);
      float maximum = -std::numeric_limits<float>::infinity();
      for (index_t j = 0; j <= i; ++j) {
        p[j] = scale * detail::dot_contiguous(qi, &k(b, j, g, 0), d);
        maximum = std::max(maximum, p[j]);
      }
      float sum = 0.0f;
      for (index_t j = 0; j <= i; ++j) {
        p[j] = std::exp(p[j] - maximum);
        sum += p[j];
      }
      const float inverse = 1.0f / sum;
      float* oi = &out(b, i, h, 0);
      for (index_t c = 0; c < d; ++c) oi[c] = 0.0f;
      for (index_t j = 0; j <= i; ++j) {
        p[j] *= inverse;
        detail::axpy_contiguous(p[j], &v(b, j, g, 0), oi, d);
      }
      for (index_t j = i + 1; j < t_len; ++j) p[j] = 0.0f;
    }
  });
}

/// Backward of causal_attention_forward. dq is overwritten; dk and dv are
/// overwritten too (each key/value head sums the heads of its group, so the
/// work is split by (batch, key/value head) and no two threads share a row).
inline void causal_attention_backward_impl(const par_t& exec, tensor_view<const float, 4> dout,
                                           tensor_view<const float, 4> q, tensor_view<const float, 4> k,
                                           tensor_view<const float, 4> v, tensor_view<const float, 4> probs,
                                           tensor_view<float, 4> dq, tensor_view<float, 4> dk,
                                           tensor_view<float, 4> dv, float scale) {
  const index_t batch = q.extent(0), t_len = q.extent(1), heads = q.extent(2), d = q.extent(3);
  const index_t kv_heads = k.extent(2), group = heads / kv_heads;
  detail::parallel_for(exec, batch * kv_heads, [&](index_t bg) {
    const index_t b = bg / kv_heads, g = bg % kv_heads;
    float* dp = detail::attention_row_scratch(t_len);
    for (index_t j = 0; j < t_len; ++j)
      for (index_t c = 0; c < d; ++c) dk(b, j, g, c) = dv(b, j, g, c) = 0.0f;
    for (index_t h = g * group; h < (g + 1) * group; ++h) {
      for (index_t i = 0; i < t_len; ++i) {
        const float* p = &probs(b, h, i, 0);
        const float* doi = &dout(b, i, h, 0);
        float weighted = 0.0f;
        for (index_t j = 0; j <= i; ++j) {
          dp[j] = detail::dot_contiguous(doi, &v(b, j, g, 0), d);
          weighted += p[j] * dp[j];
          detail::axpy_contiguous(p[j], doi, &dv(b, j, g, 0), d);
        }
        float* dqi = &dq(b, i, h, 0);
        for (index_t c = 0; c < d; ++c) dqi[c] = 0.0f;
        const float* qi = &q(b, i, h, 0);
        for (index_t j = 0; j <= i; ++j) {
          const float dscore = scale * p[j] * (dp[j] - weighted);
          detail::axpy_contiguous(dscore, &k(b, j, g, 0), dqi, d);
          detail::axpy_contiguous(dscore, qi, &dk(b, j, g, 0), d);
        }
      }
    }
  });
}

}  // namespace ctformer::cpu
