// An inference model of a configuration that still has LoRA adapters.
// expect: inference runs a configuration without LoRA adapters
#include "ctformer/infer/inference_model.hpp"

struct base_model {
  static constexpr int vocab = 8, d_model = 8, n_layer = 1, n_head = 2, n_kv_head = 2, d_ff = 16, max_seq = 4;
  using norm = ctformer::nn::rms_norm;
  using activation = ctformer::nn::swiglu;
  using position = ctformer::nn::rope;
};
using adapted = ctformer::nn::with_lora<base_model, ctformer::nn::lora<4, ctformer::nn::lora_target::q, 8.0f>>;

int main() { return sizeof(ctformer::infer::inference_model<adapted>) > 0 ? 0 : 1; }
