// The shapes of the Hugging Face folders in tests/data/hf, written by
// tools/make_hf_reference.py (the shapes must equal the script's).
#pragma once

#include "ctformer/nn/config.hpp"

namespace ctformer::testing {

struct hf_gpt2_tiny {
  static constexpr int vocab = 96, d_model = 32, n_layer = 2, n_head = 4, n_kv_head = 4, d_ff = 128, max_seq = 32;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  static constexpr const char* folder = "gpt2_tiny";
};
struct hf_llama_tiny {
  static constexpr int vocab = 96, d_model = 32, n_layer = 2, n_head = 4, n_kv_head = 2, d_ff = 64, max_seq = 32;
  static constexpr bool tie_embeddings = false;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  static constexpr const char* folder = "llama_tiny";
};

}  // namespace ctformer::testing
