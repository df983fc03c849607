// Two tiny configurations for the inference tests (GPT-2 style and LLaMA
// style), trained-looking random weights, and the uncached reference logits.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "ctformer/infer/inference_model.hpp"
#include "ctformer/nn/nn.hpp"

namespace ctformer::testing {

/// layer_norm, GELU, learned positions, biases, tied embeddings (GPT-2).
/// Widths are multiples of 32 so the q8_0 / q4_0 blocks fit every matrix.
struct infer_gpt {
  static constexpr int vocab = 96, d_model = 64, n_layer = 2, n_head = 4, n_kv_head = 4, d_ff = 128, max_seq = 48;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};

/// rms_norm, SwiGLU, RoPE, grouped-query attention (2 kv heads for 4), untied (LLaMA).
struct infer_llama {
  static constexpr int vocab = 80, d_model = 64, n_layer = 2, n_head = 4, n_kv_head = 2, d_ff = 96, max_seq = 48;
  static constexpr bool tie_embeddings = false;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
};

/// A model whose weights are larger than GPT-2's N(0, 0.02) initialisation
/// (matrices N(0, 0.15), norm gains 1 +- 0.2, biases +- 0.05), so logits
/// spread over several units as a trained model's do and greedy choices are
/// not decided by rounding noise.
template <class Cfg>
void randomise(nn::model<Cfg, cpu::par_t>& m, std::uint32_t seed, float matrix_std = 0.15f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> matrix(0.0f, matrix_std), gain(1.0f, 0.2f), bias(0.0f, 0.05f);
  auto params = m.parameters();
  for (const auto& p : m.parameter_table()) {
    float* dst = params.data() + p.offset;
    for (index_t i = 0; i < p.size(); ++i) {
      switch (p.kind) {
        case nn::parameter_kind::norm: dst[i] = p.name.ends_with(".bias") ? bias(rng) : gain(rng); break;
        case nn::parameter_kind::bias: dst[i] = bias(rng); break;
        default: dst[i] = matrix(rng); break;
      }
    }
  }
  m.parameters_changed();
}

/// Token ids in [0, vocab) from a fixed seed.
inline std::vector<std::int32_t> random_tokens(std::size_t n, int vocab, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(0, vocab - 1);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = dist(rng);
  return t;
}

/// Logits of every position of one sequence by the training model's full,
/// uncached forward: (n, vocab) row-major.
template <class Cfg>
std::vector<float> uncached_logits(nn::model<Cfg, cpu::par_t>& m, std::span<const std::int32_t> tokens) {
  const auto l = m.logits(tensor_view<const std::int32_t, 2>(tokens.data(), {1, index_t(tokens.size())}));
  return std::vector<float>(l.data(), l.data() + l.size());
}

/// Largest |a - b| over max |b|: logits error relative to the row's scale.
inline double scaled_error(std::span<const float> a, std::span<const float> b) {
  double scale = 1e-12, worst = 0;
  for (float x : b) scale = std::max(scale, double(std::fabs(x)));
  for (std::size_t i = 0; i < b.size(); ++i) worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])));
  return worst / scale;
}

/// ||a - b||_2 / ||b||_2.
inline double rms_error(std::span<const float> a, std::span<const float> b) {
  double num = 0, den = 1e-30;
  for (std::size_t i = 0; i < b.size(); ++i) {
    num += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
    den += double(b[i]) * double(b[i]);
  }
  return std::sqrt(num / den);
}

}  // namespace ctformer::testing
