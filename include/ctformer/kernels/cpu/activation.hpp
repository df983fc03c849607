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

inline void gelu_forward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  detail::map_unary(exec, x, y, [](auto v) {
    using V = decltype(v);
    // inner = sqrt(2/pi) (v + 0.044715 v^3)
    const V inner = V::splat(detail::sqrt_2_over_pi) * fma(V::splat(detail::gelu_cubic) * v * v, v, v);
    const V half_v = V::splat(0.5f) * v;
    return fma(half_v, detail::vtanh(inner), half_v);
  });
}

inline void gelu_backward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<const float, 1> dy,
                               tensor_view<float, 1> dx) {
  detail::map_binary(exec, x, dy, dx, [](auto v, auto g) {
    using V = decltype(v);
    const V v2 = v * v;
    const V inner = V::splat(detail::sqrt_2_over_pi) * fma(V::splat(detail::gelu_cubic) * v2, v, v);
    const V t = detail::vtanh(inner);
    const V half = V::splat(0.5f);
    const V sech2 = V::splat(1.0f) - t * t;
    // d/dv inner = sqrt(2/pi) (1 + 3 * 0.044715 v^2)
    const V dinner = V::splat(detail::sqrt_2_over_pi) * fma(V::splat(3.0f * detail::gelu_cubic), v2, V::splat(1.0f));
    const V derivative = fma(half, t, half) + half * v * sech2 * dinner;
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
