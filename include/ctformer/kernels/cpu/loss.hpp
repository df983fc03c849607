// CPU kernels for the fused softmax + cross-entropy loss and its gradient,
// and for the distillation loss (cross-entropy mixed with the tempered KL
// divergence from a teacher's distribution) and its gradient.
// The forward reads each row of logits once (an online log-sum-exp: per-lane
// running max and rescaled sum); the backward reads it once more to write the
// gradient. exp is the vector approximation of detail/vector_math.hpp.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "ctformer/kernels/cpu/detail/vector_math.hpp"
#include "ctformer/kernels/cpu/norm.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {
inline void check_targets(const char* operation, tensor_view<const std::int32_t, 1> targets, index_t vocab) {
  for (index_t n = 0; n < targets.extent(0); ++n)
    if (targets(n) >= vocab)
      throw invalid_input(std::string("ctformer::") + operation + ": target " + std::to_string(targets(n)) +
                          " at position " + std::to_string(n) + " is outside the vocabulary [0, " +
                          std::to_string(vocab) + ")");
}

// max and log(sum(exp(x - max))) of one row (x = row * scale when Scaled:
// a temperature's 1/T), the two numbers both passes need, in one pass: each
// lane keeps a running max M and a sum S of exp(x - M); a block of four
// vectors rescales S once (one extra exp per four vectors). Padding lanes
// hold -Inf, whose exp is 0.
template <bool Scaled = false>
inline void row_logsumexp(const float* row, index_t v, float& maximum, float& log_sum, float scale = 1.0f) {
  constexpr index_t w = vf::width;
  const vf by = vf::splat(scale);
  auto at = [&](index_t j) { return Scaled ? vf::load(row + j) * by : vf::load(row + j); };
  vf m = vf::splat(-FLT_MAX), s = vf::splat(0.0f);
  index_t j = 0;
  for (; j + 4 * w <= v; j += 4 * w) {
    const vf x0 = at(j), x1 = at(j + w), x2 = at(j + 2 * w), x3 = at(j + 3 * w);
    const vf m_new = max(m, max(max(x0, x1), max(x2, x3)));
    s = s * vexp(m - m_new);
    s = s + vexp(x0 - m_new) + vexp(x1 - m_new) + (vexp(x2 - m_new) + vexp(x3 - m_new));
    m = m_new;
  }
  for (; j < v; j += w) {
    const int k = v - j < w ? int(v - j) : int(w);
    vf x = load_n(row + j, k, -std::numeric_limits<float>::infinity());
    if constexpr (Scaled) x = x * by;
    const vf m_new = max(m, x);
    s = fma(s, vexp(m - m_new), vexp(x - m_new));
    m = m_new;
  }
  maximum = reduce_max(m);
  log_sum = std::log(reduce_add(s * vexp(m - vf::splat(maximum))));
}
}  // namespace detail

inline void softmax_cross_entropy_forward_impl(const par_t& exec, tensor_view<const float, 2> logits,
                                               tensor_view<const std::int32_t, 1> targets,
                                               tensor_view<float, 1> losses) {
  detail::require_unit_inner_stride("softmax_cross_entropy_forward", "logits", logits);
  const index_t v = logits.extent(1);
  detail::check_targets("softmax_cross_entropy_forward", targets, v);
  detail::parallel_for(exec, logits.extent(0), [&](index_t n) {
    const std::int32_t target = targets(n);
    if (target < 0) {  // ignored position
      losses(n) = 0.0f;
      return;
    }
    float maximum, log_sum;
    detail::row_logsumexp(&logits(n, 0), v, maximum, log_sum);
    losses(n) = maximum + log_sum - logits(n, target);
  }, detail::min_rows_for_parallel(v));
}

inline void softmax_cross_entropy_backward_impl(const par_t& exec, tensor_view<const float, 2> logits,
                                                tensor_view<const std::int32_t, 1> targets, float grad_scale,
                                                tensor_view<float, 2> dlogits) {
  detail::require_unit_inner_stride("softmax_cross_entropy_backward", "logits", logits);
  detail::require_unit_inner_stride("softmax_cross_entropy_backward", "dlogits", dlogits);
  const index_t v = logits.extent(1);
  detail::check_targets("softmax_cross_entropy_backward", targets, v);
  detail::parallel_for(exec, logits.extent(0), [&](index_t n) {
    const std::int32_t target = targets(n);
    const float* row = &logits(n, 0);
    float* drow = &dlogits(n, 0);
    if (target < 0) {  // ignored position
      std::memset(drow, 0, std::size_t(v) * sizeof(float));
      return;
    }
    float maximum, log_sum;
    detail::row_logsumexp(row, v, maximum, log_sum);
    const detail::vf shift = detail::vf::splat(maximum + log_sum), scale = detail::vf::splat(grad_scale);
    // row may alias drow: each element is read before it is written.
    detail::for_vectors(v, [&](index_t j, int k, int) {
      detail::store_n(drow + j, detail::vexp(detail::load_n(row + j, k) - shift) * scale, k);
    });
    drow[target] -= grad_scale;
  }, detail::min_rows_for_parallel(v));
}

namespace detail {
// The three log-sum-exps of one row of the distillation loss: the student's
// at temperature 1 and both at temperature T (as max + log sum).
struct distillation_row {
  float student, student_tempered, teacher_tempered;
  distillation_row(const float* z, const float* teacher, index_t v, float inverse_temperature) {
    float m, l;
    row_logsumexp(z, v, m, l);
    student = m + l;
    row_logsumexp<true>(z, v, m, l, inverse_temperature);
    student_tempered = m + l;
    row_logsumexp<true>(teacher, v, m, l, inverse_temperature);
    teacher_tempered = m + l;
  }
};

inline void check_distillation(const char* operation, float alpha, float temperature) {
  if (!(alpha >= 0.0f && alpha <= 1.0f) || !(temperature > 0.0f))
    throw invalid_input(std::string("ctformer::") + operation + ": alpha " + std::to_string(alpha) +
                        " must lie in [0, 1] and the temperature " + std::to_string(temperature) +
                        " must be positive");
}
}  // namespace detail

inline void distillation_loss_forward_impl(const par_t& exec, tensor_view<const float, 2> logits,
                                           tensor_view<const float, 2> teacher_logits,
                                           tensor_view<const std::int32_t, 1> targets, float alpha, float temperature,
                                           tensor_view<float, 1> losses) {
  detail::require_unit_inner_stride("distillation_loss_forward", "logits", logits);
  detail::require_unit_inner_stride("distillation_loss_forward", "teacher_logits", teacher_logits);
  detail::check_distillation("distillation_loss_forward", alpha, temperature);
  const index_t v = logits.extent(1);
  detail::check_targets("distillation_loss_forward", targets, v);
  const float inverse = 1.0f / temperature;
  detail::parallel_for(exec, logits.extent(0), [&](index_t n) {
    const std::int32_t target = targets(n);
    if (target < 0) {
      losses(n) = 0.0f;
      return;
    }
    const float* z = &logits(n, 0);
    const float* t = &teacher_logits(n, 0);
    const detail::distillation_row lse(z, t, v, inverse);
    // KL(p_t || p_s) at temperature T = sum_j p_t(j) (t_j - z_j) / T + lse_s - lse_t;
    // padding lanes: teacher -1e30 (p_t = 0), student 0, so 0 * finite.
    detail::vf cross[2] = {detail::vf::splat(0.0f), detail::vf::splat(0.0f)};
    const detail::vf by = detail::vf::splat(inverse), shift = detail::vf::splat(lse.teacher_tempered);
    detail::for_vectors(v, [&](index_t j, int k, int lane) {
      const detail::vf tj = detail::load_n(t + j, k, -1e30f), zj = detail::load_n(z + j, k);
      const detail::vf p = detail::vexp(tj * by - shift);
      cross[lane] = detail::fma(p, tj - zj, cross[lane]);
    });
    const double kl = double(detail::reduce_add(cross[0] + cross[1])) * inverse + lse.student_tempered -
                      lse.teacher_tempered;
    const double ce = double(lse.student) - z[target];
    losses(n) = float(alpha * ce + (1.0 - alpha) * double(temperature) * temperature * kl);
  }, detail::min_rows_for_parallel(v));
}

inline void distillation_loss_backward_impl(const par_t& exec, tensor_view<const float, 2> logits,
                                            tensor_view<const float, 2> teacher_logits,
                                            tensor_view<const std::int32_t, 1> targets, float alpha,
                                            float temperature, float grad_scale, tensor_view<float, 2> dlogits) {
  detail::require_unit_inner_stride("distillation_loss_backward", "logits", logits);
  detail::require_unit_inner_stride("distillation_loss_backward", "teacher_logits", teacher_logits);
  detail::require_unit_inner_stride("distillation_loss_backward", "dlogits", dlogits);
  detail::check_distillation("distillation_loss_backward", alpha, temperature);
  const index_t v = logits.extent(1);
  detail::check_targets("distillation_loss_backward", targets, v);
  const float inverse = 1.0f / temperature;
  detail::parallel_for(exec, logits.extent(0), [&](index_t n) {
    const std::int32_t target = targets(n);
    const float* z = &logits(n, 0);
    const float* t = &teacher_logits(n, 0);
    float* d = &dlogits(n, 0);
    if (target < 0) {
      std::memset(d, 0, std::size_t(v) * sizeof(float));
      return;
    }
    const detail::distillation_row lse(z, t, v, inverse);
    // d/dz = alpha (p_s - onehot) + (1 - alpha) T (p_s,T - p_t,T), times grad_scale.
    using detail::vf;
    const vf hard = vf::splat(grad_scale * alpha), soft = vf::splat(grad_scale * (1.0f - alpha) * temperature);
    const vf by = vf::splat(inverse), s1 = vf::splat(lse.student), st = vf::splat(lse.student_tempered),
             tt = vf::splat(lse.teacher_tempered);
    // z may alias d: each element is read before it is written.
    detail::for_vectors(v, [&](index_t j, int k, int) {
      const vf zj = detail::load_n(z + j, k), tj = detail::load_n(t + j, k);
      const vf ps = detail::vexp(zj - s1), pst = detail::vexp(zj * by - st), ptt = detail::vexp(tj * by - tt);
      detail::store_n(d + j, hard * ps + soft * (pst - ptt), k);
    });
    d[target] -= grad_scale * alpha;
  }, detail::min_rows_for_parallel(v));
}

}  // namespace ctformer::cpu
