// ops::softmax_cross_entropy_*: the fused softmax + cross-entropy loss over a
// vocabulary; ops::distillation_loss_*: the same mixed with the tempered KL
// divergence from a teacher's distribution (knowledge distillation).
#pragma once

#include <cstdint>

#include "ctformer/core/error.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

/// losses[n] = logsumexp(logits[n]) - logits[n][targets[n]]; a negative target
/// means "ignore this position" (loss 0). A target >= V throws invalid_input.
/// logits: (N, V) float; targets: (N) int32; losses: (N) float.
template <execution_policy P, view_of_rank<2> L, view_of_rank<1> Tgt, view_of_rank<1> Loss>
  requires writable_view<Loss>
void softmax_cross_entropy_forward(const P& exec, const L& logits, const Tgt& targets, const Loss& losses) {
  static_assert(std::is_same_v<typename Tgt::value_type, std::int32_t>, "ctformer: targets are int32 token ids");
  require_same_extent("softmax_cross_entropy_forward", "targets", targets, 0, "logits", logits, 0);
  require_same_extent("softmax_cross_entropy_forward", "losses", losses, 0, "logits", logits, 0);
  if constexpr (requires { softmax_cross_entropy_forward_impl(exec, as_const(logits), as_const(targets), losses); }) {
    softmax_cross_entropy_forward_impl(exec, as_const(logits), as_const(targets), losses);
  } else {
    static_assert(dependent_false<P, L>, "ctformer: softmax_cross_entropy_forward has no implementation for this execution policy and these number types");
  }
}

/// dlogits[n] = (softmax(logits[n]) - onehot(targets[n])) * grad_scale, and 0
/// for ignored positions (the gradient of grad_scale * sum(losses)).
/// logits, dlogits: (N, V); targets: (N). dlogits may alias logits (in place).
template <execution_policy P, view_of_rank<2> L, view_of_rank<1> Tgt, view_of_rank<2> DL>
  requires writable_view<DL>
void softmax_cross_entropy_backward(const P& exec, const L& logits, const Tgt& targets, float grad_scale,
                                    const DL& dlogits) {
  static_assert(std::is_same_v<typename Tgt::value_type, std::int32_t>, "ctformer: targets are int32 token ids");
  require_same_extent("softmax_cross_entropy_backward", "targets", targets, 0, "logits", logits, 0);
  require_same_shape("softmax_cross_entropy_backward", "logits", logits, "dlogits", dlogits);
  if constexpr (requires { softmax_cross_entropy_backward_impl(exec, as_const(logits), as_const(targets), grad_scale, dlogits); }) {
    softmax_cross_entropy_backward_impl(exec, as_const(logits), as_const(targets), grad_scale, dlogits);
  } else {
    static_assert(dependent_false<P, L>, "ctformer: softmax_cross_entropy_backward has no implementation for this execution policy and these number types");
  }
}

/// Knowledge distillation (Hinton et al.): losses[n] = alpha * CE(logits[n],
/// targets[n]) + (1 - alpha) * T^2 * KL(softmax(teacher[n] / T) ||
/// softmax(logits[n] / T)); 0 where the target is negative. T^2 keeps the
/// soft term's gradient on the hard term's scale as T grows.
/// logits, teacher_logits: (N, V) float; targets: (N) int32; losses: (N).
/// Throws invalid_input for alpha outside [0, 1] or T <= 0.
template <execution_policy P, view_of_rank<2> L, view_of_rank<2> TL, view_of_rank<1> Tgt, view_of_rank<1> Loss>
  requires writable_view<Loss>
void distillation_loss_forward(const P& exec, const L& logits, const TL& teacher_logits, const Tgt& targets,
                               float alpha, float temperature, const Loss& losses) {
  static_assert(std::is_same_v<typename Tgt::value_type, std::int32_t>, "ctformer: targets are int32 token ids");
  require_same_shape("distillation_loss_forward", "logits", logits, "teacher_logits", teacher_logits);
  require_same_extent("distillation_loss_forward", "targets", targets, 0, "logits", logits, 0);
  require_same_extent("distillation_loss_forward", "losses", losses, 0, "logits", logits, 0);
  if constexpr (requires {
                  distillation_loss_forward_impl(exec, as_const(logits), as_const(teacher_logits), as_const(targets),
                                                 alpha, temperature, losses);
                }) {
    distillation_loss_forward_impl(exec, as_const(logits), as_const(teacher_logits), as_const(targets), alpha,
                                   temperature, losses);
  } else {
    static_assert(dependent_false<P, L>, "ctformer: distillation_loss_forward has no implementation for this execution policy and these number types");
  }
}

/// Whether policy P has the distillation kernels (the CPU has; CUDA not yet).
template <class P>
inline constexpr bool has_distillation_loss =
    requires(const P& exec, tensor_view<const float, 2> logits, tensor_view<const std::int32_t, 1> targets,
             tensor_view<float, 2> dlogits) {
      distillation_loss_backward_impl(exec, logits, logits, targets, 0.5f, 1.0f, 1.0f, dlogits);
    };

/// The gradient of grad_scale * sum(losses) of distillation_loss_forward:
/// dlogits[n] = grad_scale * (alpha * (softmax(logits[n]) - onehot) +
/// (1 - alpha) * T * (softmax(logits[n] / T) - softmax(teacher[n] / T))), 0
/// where the target is negative. dlogits may alias logits (in place).
template <execution_policy P, view_of_rank<2> L, view_of_rank<2> TL, view_of_rank<1> Tgt, view_of_rank<2> DL>
  requires writable_view<DL>
void distillation_loss_backward(const P& exec, const L& logits, const TL& teacher_logits, const Tgt& targets,
                                float alpha, float temperature, float grad_scale, const DL& dlogits) {
  static_assert(std::is_same_v<typename Tgt::value_type, std::int32_t>, "ctformer: targets are int32 token ids");
  require_same_shape("distillation_loss_backward", "logits", logits, "teacher_logits", teacher_logits);
  require_same_extent("distillation_loss_backward", "targets", targets, 0, "logits", logits, 0);
  require_same_shape("distillation_loss_backward", "logits", logits, "dlogits", dlogits);
  if constexpr (requires {
                  distillation_loss_backward_impl(exec, as_const(logits), as_const(teacher_logits), as_const(targets),
                                                  alpha, temperature, grad_scale, dlogits);
                }) {
    distillation_loss_backward_impl(exec, as_const(logits), as_const(teacher_logits), as_const(targets), alpha,
                                    temperature, grad_scale, dlogits);
  } else {
    static_assert(dependent_false<P, L>, "ctformer: distillation_loss_backward has no implementation for this execution policy and these number types");
  }
}

}  // namespace ctformer::ops
