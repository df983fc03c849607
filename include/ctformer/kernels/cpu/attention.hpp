// CPU kernels for causal multi-head attention (MHA, GQA and MQA alike) in the
// training form: forward saves the probabilities, backward reads them.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ctformer/kernels/cpu/detail/attention_rows.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"
#include "ctformer/kernels/cpu/softmax.hpp"

namespace ctformer::cpu {

namespace detail {
/// Per-thread row pointers that only grow (the floats beside them come from
/// scratch_floats): no allocation in steady state.
inline const float** row_pointer_scratch(index_t n) {
  thread_local std::vector<const float*> pointers;
  if (pointers.size() < std::size_t(n)) pointers.resize(std::size_t(n));
  return pointers.data();
}

/// n rounded up to a multiple of 8, at most limit.
inline index_t whole_eights(index_t n, index_t limit) { return std::min(limit, (n + 7) / 8 * 8); }

/// out[j] = a . rows[j] for j in [0, count): eight rows per transposing
/// reduction, the rest one by one.
inline void dot_rows(const float* a, const float* const* rows, index_t count, index_t d, float* out) {
  index_t j = 0;
  for (; j + 8 <= count; j += 8) dot_kv_8(a, rows + j, d, out + j);
  for (; j < count; ++j) out[j] = dot_kv(a, rows[j], d);
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
    const float** key_rows = detail::row_pointer_scratch(2 * t_len);
    const float** value_rows = key_rows + t_len;
    for (index_t j = 0; j < t_len; ++j) key_rows[j] = &k(b, j, g, 0), value_rows[j] = &v(b, j, g, 0);
    for (index_t i = 0; i < t_len; ++i) {
      const index_t n = i + 1;
      float* p = &probs(b, h, i, 0);
      // Scores in whole groups of 8: the keys past i exist (up to T) and
      // cost less than single dot products; softmax_row then zeroes them.
      detail::dot_rows(&q(b, i, h, 0), key_rows, detail::whole_eights(n, t_len), d, p);
      detail::softmax_row(p, p, n, t_len, scale);
      float* oi = &out(b, i, h, 0);
      for (index_t c = 0; c < d; ++c) oi[c] = 0.0f;
      detail::accumulate_rows(p, value_rows, n, d, oi);
    }
  });
}

/// Backward of causal_attention_forward. dq is overwritten; dk and dv are
/// overwritten too (each key/value head sums the heads of its group, so the
/// work is split by (batch, key/value head) and no two threads share a row).
///
/// Per head, a pass over query rows finds dS = P * (dO V^T - rowsum) * scale
/// and dQ = dS K; a pass over key rows then sums dV = P^T dO and dK = dS^T Q,
/// so every sum runs into registers instead of into a row in memory per term.
inline void causal_attention_backward_impl(const par_t& exec, tensor_view<const float, 4> dout,
                                           tensor_view<const float, 4> q, tensor_view<const float, 4> k,
                                           tensor_view<const float, 4> v, tensor_view<const float, 4> probs,
                                           tensor_view<float, 4> dq, tensor_view<float, 4> dk,
                                           tensor_view<float, 4> dv, float scale) {
  const index_t batch = q.extent(0), t_len = q.extent(1), heads = q.extent(2), d = q.extent(3);
  const index_t kv_heads = k.extent(2), group = heads / kv_heads;
  detail::parallel_for(exec, batch * kv_heads, [&](index_t bg) {
    const index_t b = bg / kv_heads, g = bg % kv_heads;
    // dS (T, T), then one column of P and of dS; rows of K, V, dO and Q.
    float* dscores = detail::scratch_floats(6, std::size_t(t_len * t_len + 2 * t_len));
    float* p_column = dscores + t_len * t_len;
    float* ds_column = p_column + t_len;
    const float** key_rows = detail::row_pointer_scratch(4 * t_len);
    const float** value_rows = key_rows + t_len;
    const float** dout_rows = value_rows + t_len;
    const float** query_rows = dout_rows + t_len;
    for (index_t j = 0; j < t_len; ++j) {
      key_rows[j] = &k(b, j, g, 0), value_rows[j] = &v(b, j, g, 0);
      for (index_t c = 0; c < d; ++c) dk(b, j, g, c) = dv(b, j, g, c) = 0.0f;
    }
    for (index_t h = g * group; h < (g + 1) * group; ++h) {
      for (index_t i = 0; i < t_len; ++i) dout_rows[i] = &dout(b, i, h, 0), query_rows[i] = &q(b, i, h, 0);
      for (index_t i = 0; i < t_len; ++i) {
        const index_t n = i + 1;
        const float* p = &probs(b, h, i, 0);
        float* ds = dscores + i * t_len;
        detail::dot_rows(dout_rows[i], value_rows, detail::whole_eights(n, t_len), d, ds);  // dP = dO V^T
        float weighted = 0.0f;
#pragma omp simd reduction(+ : weighted)
        for (index_t j = 0; j < n; ++j) weighted += p[j] * ds[j];
#pragma omp simd
        for (index_t j = 0; j < n; ++j) ds[j] = scale * p[j] * (ds[j] - weighted);
        float* dqi = &dq(b, i, h, 0);
        for (index_t c = 0; c < d; ++c) dqi[c] = 0.0f;
        detail::accumulate_rows(ds, key_rows, n, d, dqi);
      }
      for (index_t j = 0; j < t_len; ++j) {
        const index_t n = t_len - j;  // query rows i >= j see key j
        for (index_t i = j; i < t_len; ++i) {
          p_column[i - j] = probs(b, h, i, j);
          ds_column[i - j] = dscores[i * t_len + j];
        }
        detail::accumulate_rows(p_column, dout_rows + j, n, d, &dv(b, j, g, 0));
        detail::accumulate_rows(ds_column, query_rows + j, n, d, &dk(b, j, g, 0));
      }
    }
  });
}

}  // namespace ctformer::cpu
