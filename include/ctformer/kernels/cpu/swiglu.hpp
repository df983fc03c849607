// CPU kernels for the SwiGLU gate: out = silu(gate) * up, and its backward.
// One vectorised pass per row (the sigmoid's exp is detail::vexp, 2 ulp);
// views whose columns are not contiguous take the same formulas one element
// at a time.
#pragma once

#include "ctformer/kernels/cpu/detail/vector_math.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {
// silu(g) u, generic over the vector type.
template <class V>
inline V swiglu_value(V g, V u) {
  return g * vsigmoid(g) * u;
}
// (d/dg, d/du) of d silu(g) u: silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
template <class V>
inline void swiglu_gradients(V g, V u, V d, V& dg, V& du) {
  const V s = vsigmoid(g);
  dg = d * u * s * fma(g, V::splat(1.0f) - s, V::splat(1.0f));
  du = d * g * s;
}
}  // namespace detail

/// gate_up: (N, 2F) with the gate in columns [0, F) and up in [F, 2F); out: (N, F).
inline void swiglu_forward_impl(const par_t& exec, tensor_view<const float, 2> gate_up, tensor_view<float, 2> out) {
  const index_t n = out.extent(0), f = out.extent(1);
  const bool contiguous = gate_up.stride(1) == 1 && out.stride(1) == 1;
  detail::parallel_for(exec, n, [&](index_t i) {
    if (!contiguous) {
      for (index_t j = 0; j < f; ++j)
        out(i, j) = detail::swiglu_value(detail::f32x1{gate_up(i, j)}, detail::f32x1{gate_up(i, j + f)}).v;
      return;
    }
    const float* gate = &gate_up(i, 0);
    const float* up = gate + f;
    float* o = &out(i, 0);
    // Vector exp (vexp): a scalar std::exp per element is a visible share of a prefill.
    detail::for_vectors(f, [&](index_t j, int k, int) {
      detail::store_n(o + j, detail::swiglu_value(detail::load_n(gate + j, k), detail::load_n(up + j, k)), k);
    });
  }, 8);
}

/// dgate_up (N, 2F) overwritten from dout (N, F) and the saved gate_up. Each
/// (i, j) reads gate, up and dout before writing its two gradients, so
/// dgate_up may be gate_up itself.
inline void swiglu_backward_impl(const par_t& exec, tensor_view<const float, 2> gate_up,
                                 tensor_view<const float, 2> dout, tensor_view<float, 2> dgate_up) {
  const index_t n = dout.extent(0), f = dout.extent(1);
  const bool contiguous = gate_up.stride(1) == 1 && dout.stride(1) == 1 && dgate_up.stride(1) == 1;
  detail::parallel_for(exec, n, [&](index_t i) {
    if (!contiguous) {
      for (index_t j = 0; j < f; ++j) {
        detail::f32x1 dg, du;
        detail::swiglu_gradients(detail::f32x1{gate_up(i, j)}, detail::f32x1{gate_up(i, j + f)},
                                 detail::f32x1{dout(i, j)}, dg, du);
        dgate_up(i, j) = dg.v;
        dgate_up(i, j + f) = du.v;
      }
      return;
    }
    const float* gate = &gate_up(i, 0);
    const float* up = gate + f;
    const float* d = &dout(i, 0);
    float* dgate = &dgate_up(i, 0);
    float* dup = dgate + f;
    detail::for_vectors(f, [&](index_t j, int k, int) {
      detail::vf dg, du;
      detail::swiglu_gradients(detail::load_n(gate + j, k), detail::load_n(up + j, k), detail::load_n(d + j, k), dg, du);
      detail::store_n(dgate + j, dg, k);
      detail::store_n(dup + j, du, k);
    });
  }, 8);
}

}  // namespace ctformer::cpu
