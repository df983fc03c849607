// CPU kernels for the SwiGLU gate: out = silu(gate) * up, and its backward.
#pragma once

#include <cmath>

#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

/// gate_up: (N, 2F) with the gate in columns [0, F) and up in [F, 2F); out: (N, F).
inline void swiglu_forward_impl(const par_t& exec, tensor_view<const float, 2> gate_up, tensor_view<float, 2> out) {
  const index_t n = out.extent(0), f = out.extent(1);
  detail::parallel_for(exec, n, [&](index_t i) {
    const float* gate = &gate_up(i, 0);
    const float* up = gate + f;
    float* o = &out(i, 0);
    for (index_t j = 0; j < f; ++j) o[j] = gate[j] / (1.0f + std::exp(-gate[j])) * up[j];
  }, 8);
}

/// dgate_up (N, 2F) overwritten from dout (N, F) and the saved gate_up.
inline void swiglu_backward_impl(const par_t& exec, tensor_view<const float, 2> gate_up,
                                 tensor_view<const float, 2> dout, tensor_view<float, 2> dgate_up) {
  const index_t n = dout.extent(0), f = dout.extent(1);
  detail::parallel_for(exec, n, [&](index_t i) {
    const float* gate = &gate_up(i, 0);
    const float* up = gate + f;
    const float* d = &dout(i, 0);
    float* dgate = &dgate_up(i, 0);
    float* dup = dgate + f;
    for (index_t j = 0; j < f; ++j) {
      const float sigmoid = 1.0f / (1.0f + std::exp(-gate[j]));
      const float silu = gate[j] * sigmoid;
      const float u = up[j], dj = d[j];  // read before writing: dgate_up may alias nothing, but be safe
      dgate[j] = dj * u * sigmoid * (1.0f + gate[j] * (1.0f - sigmoid));
      dup[j] = dj * silu;
    }
  }, 8);
}

}  // namespace ctformer::cpu
