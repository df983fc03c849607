// CPU kernels for causal multi-head attention (MHA, GQA and MQA alike) in the
// training form: forward saves the probabilities, backward reads them.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ctformer/kernels/cpu/detail/attention_rows.hpp"
#include "ctformer/kernels/cpu/gemm.hpp"
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

/// From this many positions on, a head's attention runs as blocked matrix
/// products on the GEMM micro-kernel instead of query row by query row. Below
/// it the products are too small to pay for their packing; the crossover
/// and the gains above it are in docs/performance.md (bench_attention).
inline constexpr index_t attention_gemm_min_tokens = 32;
/// Query rows (and key rows, in the backward's key pass) per block: each
/// block multiplies against keys [0, block end), so the causal upper
/// triangle costs R / 2 wasted columns per row instead of T / 2.
inline constexpr index_t attention_gemm_rows = 64;

/// Rows [r0, r1) and columns [c0, c1) of a matrix view.
template <class T>
tensor_view<T, 2> block_of(tensor_view<T, 2> x, index_t r0, index_t r1, index_t c0, index_t c1) {
  return {&x(r0, c0), {r1 - r0, c1 - c0}, {x.stride(0), x.stride(1)}};
}

/// One (batch, head) of causal_attention_forward as blocked products: for each
/// block of query rows, S = Q K^T against the keys up to the block's end
/// (straight into the probability rows), the row softmax (which zeroes the
/// columns past each row's own position), then O = P V.
/// q, out: (T, D); k, v: (T, D); probs: (T, T); any row strides.
/// Softmax of query row i's scores p[0, T) over keys [first, i], first =
/// max(0, i - window + 1) (0 without a window); every other entry becomes 0.
inline void windowed_softmax_row(float* p, index_t i, index_t t_len, float scale, index_t window) {
  const index_t first = window > 0 ? std::max<index_t>(0, i - window + 1) : 0;
  softmax_row(p + first, p + first, i + 1 - first, t_len - first, scale);
  for (index_t j = 0; j < first; ++j) p[j] = 0.0f;
}

inline void attention_forward_blocked(tensor_view<const float, 2> q, tensor_view<const float, 2> k,
                                      tensor_view<const float, 2> v, tensor_view<float, 2> out,
                                      tensor_view<float, 2> probs, float scale, index_t window) {
  const index_t t_len = q.extent(0), d = q.extent(1);
  for (index_t i0 = 0; i0 < t_len; i0 += attention_gemm_rows) {
    const index_t i1 = std::min(t_len, i0 + attention_gemm_rows);
    const tensor_view<float, 2> scores = block_of(probs, i0, i1, 0, i1);
    gemm_one_thread<float>(block_of(q, i0, i1, 0, d), block_of(k, 0, i1, 0, d).transposed(), scores, 1.0f, 0.0f);
    for (index_t i = i0; i < i1; ++i) windowed_softmax_row(&probs(i, 0), i, t_len, scale, window);
    gemm_one_thread<float>(tensor_view<const float, 2>(scores), block_of(v, 0, i1, 0, d), block_of(out, i0, i1, 0, d),
                           1.0f, 0.0f);
  }
}

/// One (batch, head) of causal_attention_backward as blocked products, adding
/// its dK and dV into dk, dv (or overwriting them when `first`, the group's
/// first head). dscores: room for (T, T).
///   per block of query rows: dP = dO V^T, dS = P * (dP - rowsum(P * dP)) * scale,
///   dQ = dS K; per block of key rows j: dV += P[j.., j]^T dO[j..],
///   dK += dS[j.., j]^T Q[j..] (queries before the block see none of its keys).
inline void attention_backward_blocked(tensor_view<const float, 2> dout, tensor_view<const float, 2> q,
                                       tensor_view<const float, 2> k, tensor_view<const float, 2> v,
                                       tensor_view<const float, 2> probs, tensor_view<float, 2> dq,
                                       tensor_view<float, 2> dk, tensor_view<float, 2> dv,
                                       tensor_view<float, 2> dscores, float scale, bool first) {
  const index_t t_len = q.extent(0), d = q.extent(1);
  for (index_t i0 = 0; i0 < t_len; i0 += attention_gemm_rows) {
    const index_t i1 = std::min(t_len, i0 + attention_gemm_rows);
    const tensor_view<float, 2> ds_block = block_of(dscores, i0, i1, 0, i1);
    gemm_one_thread<float>(block_of(dout, i0, i1, 0, d), block_of(v, 0, i1, 0, d).transposed(), ds_block, 1.0f, 0.0f);
    for (index_t i = i0; i < i1; ++i) {
      const index_t n = i + 1;
      const float* p = &probs(i, 0);
      float* ds = &dscores(i, 0);
      float weighted = 0.0f;
#pragma omp simd reduction(+ : weighted)
      for (index_t j = 0; j < n; ++j) weighted += p[j] * ds[j];
#pragma omp simd
      for (index_t j = 0; j < n; ++j) ds[j] = scale * p[j] * (ds[j] - weighted);
      for (index_t j = n; j < i1; ++j) ds[j] = 0.0f;  // past the row's position: no gradient
    }
    gemm_one_thread<float>(tensor_view<const float, 2>(ds_block), block_of(k, 0, i1, 0, d), block_of(dq, i0, i1, 0, d),
                           1.0f, 0.0f);
  }
  const float beta = first ? 0.0f : 1.0f;
  for (index_t j0 = 0; j0 < t_len; j0 += attention_gemm_rows) {
    const index_t j1 = std::min(t_len, j0 + attention_gemm_rows);
    gemm_one_thread<float>(block_of(probs, j0, t_len, j0, j1).transposed(), block_of(dout, j0, t_len, 0, d),
                           block_of(dv, j0, j1, 0, d), 1.0f, beta);
    gemm_one_thread<float>(block_of(tensor_view<const float, 2>(dscores), j0, t_len, j0, j1).transposed(),
                           block_of(q, j0, t_len, 0, d), block_of(dk, j0, j1, 0, d), 1.0f, beta);
  }
}

/// Head h of batch b of a (B, T, H, D) tensor as a (T, D) matrix.
template <class T>
tensor_view<T, 2> head_matrix(tensor_view<T, 4> x, index_t b, index_t h) {
  return {&x(b, 0, h, 0), {x.extent(1), x.extent(3)}, {x.stride(1), x.stride(3)}};
}
/// The (T, T) probabilities of head h of batch b in a (B, H, T, T) tensor.
template <class T>
tensor_view<T, 2> head_probabilities(tensor_view<T, 4> probs, index_t b, index_t h) {
  return {&probs(b, h, 0, 0), {probs.extent(2), probs.extent(3)}, {probs.stride(2), probs.stride(3)}};
}
}  // namespace detail

/// q: (B, T, H, D); k, v: (B, T, KV, D); out: (B, T, H, D); probs: (B, H, T, T).
/// Head h reads key/value head h / (H / KV). Every view has unit stride in D.
/// From attention_gemm_min_tokens positions on, attention_forward_blocked;
/// below, query row by query row.
inline void causal_attention_forward_impl(const par_t& exec, tensor_view<const float, 4> q,
                                          tensor_view<const float, 4> k, tensor_view<const float, 4> v,
                                          tensor_view<float, 4> out, tensor_view<float, 4> probs, float scale,
                                          index_t window) {
  const index_t batch = q.extent(0), t_len = q.extent(1), heads = q.extent(2), d = q.extent(3);
  const index_t group = heads / k.extent(2);
  if (t_len >= detail::attention_gemm_min_tokens) {
    detail::parallel_for(exec, batch * heads, [&](index_t bh) {
      const index_t b = bh / heads, h = bh % heads, g = h / group;
      detail::attention_forward_blocked(detail::head_matrix(q, b, h), detail::head_matrix(k, b, g),
                                        detail::head_matrix(v, b, g), detail::head_matrix(out, b, h),
                                        detail::head_probabilities(probs, b, h), scale, window);
    });
    return;
  }
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
      detail::windowed_softmax_row(p, i, t_len, scale, window);
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
/// From attention_gemm_min_tokens positions on, attention_backward_blocked
/// does this as matrix products. Below that, per head, a pass over query rows
/// finds dS = P * (dO V^T - rowsum) * scale and dQ = dS K; a pass over key
/// rows then sums dV = P^T dO and dK = dS^T Q, so every sum runs into
/// registers instead of into a row in memory per term.
inline void causal_attention_backward_impl(const par_t& exec, tensor_view<const float, 4> dout,
                                           tensor_view<const float, 4> q, tensor_view<const float, 4> k,
                                           tensor_view<const float, 4> v, tensor_view<const float, 4> probs,
                                           tensor_view<float, 4> dq, tensor_view<float, 4> dk,
                                           tensor_view<float, 4> dv, float scale) {
  const index_t batch = q.extent(0), t_len = q.extent(1), heads = q.extent(2), d = q.extent(3);
  const index_t kv_heads = k.extent(2), group = heads / kv_heads;
  if (t_len >= detail::attention_gemm_min_tokens) {
    detail::parallel_for(exec, batch * kv_heads, [&](index_t bg) {
      const index_t b = bg / kv_heads, g = bg % kv_heads;
      const tensor_view<float, 2> dscores(detail::scratch_floats(6, std::size_t(t_len * t_len)), {t_len, t_len});
      for (index_t h = g * group; h < (g + 1) * group; ++h)
        detail::attention_backward_blocked(
            detail::head_matrix(dout, b, h), detail::head_matrix(q, b, h), detail::head_matrix(k, b, g),
            detail::head_matrix(v, b, g), detail::head_probabilities(probs, b, h), detail::head_matrix(dq, b, h),
            detail::head_matrix(dk, b, g), detail::head_matrix(dv, b, g), dscores, scale, h == g * group);
    });
    return;
  }
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
