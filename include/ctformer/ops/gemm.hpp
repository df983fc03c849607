// ops::gemm and ops::gemm_batched: C = alpha * A B + beta * C, on any policy.
#pragma once

#if defined(CTFORMER_PROFILE_GEMM)
#include <chrono>
#endif

#include "ctformer/core/error.hpp"
#include "ctformer/core/fixed_view.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/view_traits.hpp"

namespace ctformer::ops {

#if defined(CTFORMER_PROFILE_GEMM)
/// Seconds spent inside gemm and gemm_batched since the program started (or
/// the counter was reset). Compiled in only with CTFORMER_PROFILE_GEMM, which
/// the training benchmark defines to report the share of a step in GEMM.
inline double gemm_profile_seconds = 0.0;
namespace detail {
struct gemm_profile_scope {
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  ~gemm_profile_scope() {
    gemm_profile_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
};
}  // namespace detail
#define CTFORMER_GEMM_PROFILE_SCOPE ::ctformer::ops::detail::gemm_profile_scope ctformer_gemm_profile_scope_
#else
#define CTFORMER_GEMM_PROFILE_SCOPE
#endif

/// c = alpha * a @ b + beta * c, accumulated in fp32.
/// a: (M, K), b: (K, N), c: (M, N). a and b may each be row-major or
/// column-major (a transposed view, `w.transposed()`), with any leading
/// dimension; c is row-major. Inputs are float, or bf16 (fp32 accumulation);
/// c is float. When beta == 0, c is not read (NaN in c does not propagate).
/// @tparam P execution policy (cpu::par_t, cuda::par_t)
template <execution_policy P, view_of_rank<2> A, view_of_rank<2> B, view_of_rank<2> C>
  requires writable_view<C>
void gemm(const P& exec, const A& a, const B& b, const C& c, float alpha = 1.0f, float beta = 0.0f) {
  require_same_extent("gemm", "a", a, 1, "b", b, 0);
  require_same_extent("gemm", "c", c, 0, "a", a, 0);
  require_same_extent("gemm", "c", c, 1, "b", b, 1);
  if constexpr (requires { gemm_impl(exec, as_const(a), as_const(b), c, alpha, beta); }) {
    CTFORMER_GEMM_PROFILE_SCOPE;
    gemm_impl(exec, as_const(a), as_const(b), c, alpha, beta);
  } else {
    static_assert(dependent_false<P, A, B>,
                  "ctformer: gemm has no implementation for this execution policy and these number types");
  }
}

/// Batched gemm: for every i, c[i] = alpha * a[i] @ b[i] + beta * c[i].
/// a: (batch, M, K), b: (batch, K, N), c: (batch, M, N); the batch stride is
/// each view's stride(0), the matrices obey the rules of gemm.
template <execution_policy P, view_of_rank<3> A, view_of_rank<3> B, view_of_rank<3> C>
  requires writable_view<C>
void gemm_batched(const P& exec, const A& a, const B& b, const C& c, float alpha = 1.0f, float beta = 0.0f) {
  require_same_extent("gemm_batched", "a", a, 0, "b", b, 0);
  require_same_extent("gemm_batched", "c", c, 0, "a", a, 0);
  require_same_extent("gemm_batched", "a", a, 2, "b", b, 1);
  require_same_extent("gemm_batched", "c", c, 1, "a", a, 1);
  require_same_extent("gemm_batched", "c", c, 2, "b", b, 2);
  if constexpr (requires { gemm_batched_impl(exec, as_const(a), as_const(b), c, alpha, beta); }) {
    CTFORMER_GEMM_PROFILE_SCOPE;
    gemm_batched_impl(exec, as_const(a), as_const(b), c, alpha, beta);
  } else {
    static_assert(dependent_false<P, A, B>,
                  "ctformer: gemm_batched has no implementation for this execution policy and these number types");
  }
}

/// True when gemm on policy P multiplies bf16 inputs natively, at a higher
/// rate than fp32 (on the CPU: a build with AVX512_BF16); false where bf16
/// inputs are widened to fp32, so that rounding operands to bf16 only loses
/// precision. Lets a caller choose bf16 operands at compile time.
template <execution_policy P>
inline constexpr bool gemm_bf16_native = [] {
  if constexpr (requires { gemm_bf16_native_impl(static_cast<const P*>(nullptr)); })
    return gemm_bf16_native_impl(static_cast<const P*>(nullptr));
  else
    return false;
}();

/// gemm on views with compile-time extents: a shape mismatch is a compile
/// error naming the rule, not a run-time shape_error.
/// a: (M, K), b: (K, N), c: (M, N), all row-major.
template <execution_policy P, class TA, index_t M, index_t K, class TB, index_t KB, index_t N, class TC, index_t MC,
          index_t NC>
void gemm(const P& exec, fixed_view<TA, M, K> a, fixed_view<TB, KB, N> b, fixed_view<TC, MC, NC> c,
          float alpha = 1.0f, float beta = 0.0f) {
  static_assert(K == KB, "ctformer: gemm: the columns of a (M, K) must equal the rows of b (K, N)");
  static_assert(MC == M, "ctformer: gemm: c (M, N) must have as many rows as a (M, K)");
  static_assert(NC == N, "ctformer: gemm: c (M, N) must have as many columns as b (K, N)");
  gemm(exec, a.view(), b.view(), c.view(), alpha, beta);
}

}  // namespace ctformer::ops
