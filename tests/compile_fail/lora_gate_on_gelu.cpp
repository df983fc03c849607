// A LoRA gate target on a model whose MLP is not gated.
// expect: a LoRA gate target needs a gated (SwiGLU) MLP
#include "ctformer/nn/nn.hpp"

struct gelu_model {
  static constexpr int vocab = 8, d_model = 8, n_layer = 1, n_head = 2, n_kv_head = 2, d_ff = 16, max_seq = 4;
  using norm = ctformer::nn::layer_norm;
  using activation = ctformer::nn::gelu;
  using position = ctformer::nn::learned_position;
};
using adapted = ctformer::nn::with_lora<gelu_model, ctformer::nn::lora<4, ctformer::nn::lora_target::gate, 8.0f>>;

int main() { ctformer::nn::model<adapted> m; }
