// CPU kernels for GELU (tanh form) and SiLU, forward and backward.
#pragma once

#include <cmath>

#include "ctformer/kernels/cpu/elementwise.hpp"

namespace ctformer::cpu {

namespace detail {
inline constexpr float sqrt_2_over_pi = 0.7978845608028654f;
inline constexpr float gelu_cubic = 0.044715f;
}  // namespace detail

inline void gelu_forward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  detail::for_chunks(exec, x.extent(0), [&](index_t lo, index_t hi) {
    for (index_t i = lo; i < hi; ++i) {
      const float v = x(i);
      y(i) = 0.5f * v * (1.0f + std::tanh(detail::sqrt_2_over_pi * (v + detail::gelu_cubic * v * v * v)));
    }
  });
}

inline void gelu_backward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<const float, 1> dy,
                               tensor_view<float, 1> dx) {
  detail::for_chunks(exec, x.extent(0), [&](index_t lo, index_t hi) {
    for (index_t i = lo; i < hi; ++i) {
      const float v = x(i);
      const float inner = detail::sqrt_2_over_pi * (v + detail::gelu_cubic * v * v * v);
      const float t = std::tanh(inner);
      const float sech2 = 1.0f - t * t;
      const float derivative =
          0.5f * (1.0f + t) + 0.5f * v * sech2 * detail::sqrt_2_over_pi * (1.0f + 3.0f * detail::gelu_cubic * v * v);
      dx(i) = dy(i) * derivative;
    }
  });
}

inline void silu_forward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  detail::for_chunks(exec, x.extent(0), [&](index_t lo, index_t hi) {
    for (index_t i = lo; i < hi; ++i) {
      const float v = x(i);
      y(i) = v / (1.0f + std::exp(-v));
    }
  });
}

inline void silu_backward_impl(const par_t& exec, tensor_view<const float, 1> x, tensor_view<const float, 1> dy,
                               tensor_view<float, 1> dx) {
  detail::for_chunks(exec, x.extent(0), [&](index_t lo, index_t hi) {
    for (index_t i = lo; i < hi; ++i) {
      const float v = x(i);
      const float sigmoid = 1.0f / (1.0f + std::exp(-v));
      dx(i) = dy(i) * sigmoid * (1.0f + v * (1.0f - sigmoid));
    }
  });
}

}  // namespace ctformer::cpu
