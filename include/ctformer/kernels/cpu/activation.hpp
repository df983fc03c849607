// CPU kernels for GELU (tanh form) and SiLU, forward and backward: one
// vectorised pass, tanh / exp from detail/vector_math.hpp (a few ulp).
#pragma once

#include "ctformer/kernels/cpu/detail/vector_math.hpp"
#include "ctformer/kernels/cpu/elementwise.hpp"

namespace ctformer::cpu {

namespace detail {
inline constexpr float sqrt_2_over_pi = 0.7978845608028654f;
inline constexpr float gelu_cubic = 0.044715f;
}  // namespace detail

// 0.5 (1 + tanh(u)) is the logistic sigmoid of 2u, so gelu(v) = v / (1 +
// e^(-2u)): one exp and one division, where tanh would also evaluate its
// small-argument polynomial and blend the two. Near u = 0 the sigmoid form
// loses nothing: its error is relative to 1 + e^(-2u) >= 1.

inline void gelu_forward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  detail::map_unary(exec, x, y, [](auto v) {
    using V = decltype(v);
    // -2 inner = -2 sqrt(2/pi) (v + 0.044715 v^3)
    const V minus_2u = V::splat(-2.0f * detail::sqrt_2_over_pi) * fma(V::splat(detail::gelu_cubic) * v * v, v, v);
    return v / (V::splat(1.0f) + detail::vexp(minus_2u));
  });
}

inline void gelu_backward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<const float, 1> dy,
                               tensor_view<float, 1> dx) {
  detail::map_binary(exec, x, dy, dx, [](auto v, auto g) {
    using V = decltype(v);
    const V v2 = v * v;
    const V minus_2u = V::splat(-2.0f * detail::sqrt_2_over_pi) * fma(V::splat(detail::gelu_cubic) * v2, v, v);
    const V s = V::splat(1.0f) / (V::splat(1.0f) + detail::vexp(minus_2u));  // sigmoid(2u)
    // d/dv [v s] = s + 2 v s (1 - s) du/dv, du/dv = sqrt(2/pi) (1 + 3 * 0.044715 v^2)
    const V du = V::splat(detail::sqrt_2_over_pi) * fma(V::splat(3.0f * detail::gelu_cubic), v2, V::splat(1.0f));
    const V derivative = fma(V::splat(2.0f) * v * s * (V::splat(1.0f) - s), du, s);
    return g * derivative;
  });
}

inline void silu_forward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  detail::map_unary(exec, x, y, [](auto v) { return v * detail::vsigmoid(v); });
}

inline void silu_backward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<const float, 1> dy,
                               tensor_view<float, 1> dx) {
  detail::map_binary(exec, x, dy, dx, [](auto v, auto g) {
    using V = decltype(v);
    const V s = detail::vsigmoid(v);
    // silu'(v) = s (1 + v (1 - s))
    return g * s * fma(v, V::splat(1.0f) - s, V::splat(1.0f));
  });
}

}  // namespace ctformer::cpu
