// The whole model's gradients against central finite differences, on tiny
// configurations covering both norms, both activations, both position
// schemes, biases, untied heads and GQA / MQA.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "ctformer/nn/nn.hpp"

using namespace ctformer;

namespace {

struct gpt_tiny {  // GPT-2 style: layer_norm, GELU, learned positions, biases, tied head
  static constexpr int vocab = 11, d_model = 8, n_layer = 2, n_head = 2, n_kv_head = 2, d_ff = 12, max_seq = 6;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};
struct llama_tiny {  // LLaMA style: rms_norm, SwiGLU, RoPE, GQA, untied head
  static constexpr int vocab = 13, d_model = 8, n_layer = 2, n_head = 4, n_kv_head = 2, d_ff = 10, max_seq = 6;
  static constexpr bool tie_embeddings = false;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
};
struct mqa_tiny {  // mixed: layer_norm, SwiGLU, RoPE, one key/value head
  static constexpr int vocab = 9, d_model = 8, n_layer = 1, n_head = 2, n_kv_head = 1, d_ff = 8, max_seq = 5;
  using norm = nn::layer_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
};
struct rms_gelu_tiny {  // rms_norm, GELU, learned positions, biases
  static constexpr int vocab = 7, d_model = 4, n_layer = 1, n_head = 1, n_kv_head = 1, d_ff = 6, max_seq = 4;
  static constexpr bool bias = true;
  using norm = nn::rms_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};

struct windowed_tiny {  // a sliding window of 2 on the first layer of each pair, global the second
  static constexpr int vocab = 11, d_model = 8, n_layer = 2, n_head = 2, n_kv_head = 1, d_ff = 8, max_seq = 6;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  using attention_pattern = nn::layer_pattern<nn::sliding_window<2>, nn::global_attention>;
};

// LoRA on every projection each MLP kind has (fused q/k/v rows, gate and up
// rows of a gated MLP), with the base frozen as an adapted model starts and,
// for the GPT-2 shape, with everything training.
using llama_lora_tiny = nn::with_lora<llama_tiny, nn::lora<2, nn::lora_target::q | nn::lora_target::k |
                                                                nn::lora_target::v | nn::lora_target::o |
                                                                nn::lora_target::gate | nn::lora_target::up |
                                                                nn::lora_target::down,
                                                            4.0f>>;
using gpt_lora_tiny =
    nn::with_lora<gpt_tiny, nn::lora<3, nn::lora_target::v | nn::lora_target::up | nn::lora_target::down, 6.0f>>;

}  // namespace

TEMPLATE_TEST_CASE("model gradients match central finite differences", "[nn][model][gradient]", gpt_tiny, llama_tiny,
                   mqa_tiny, rms_gelu_tiny, windowed_tiny, llama_lora_tiny, gpt_lora_tiny) {
  using model_type = nn::model<TestType, cpu::par_t>;
  model_type m(cpu::par.with_threads(1), 7);
  if constexpr (std::is_same_v<TestType, gpt_lora_tiny>) m.unfreeze_all();
  // Larger random weights than the GPT-2 initialisation so every path
  // (attention pattern, norms) carries gradient of a measurable size.
  auto params = m.parameters();
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-0.5f, 0.5f);
  for (const auto& p : m.parameter_table())
    for (index_t i = 0; i < p.size(); ++i) params(p.offset + i) += dist(rng);
  m.parameters_changed();

  const index_t b = 2, t = TestType::max_seq - 1;
  std::vector<std::int32_t> inputs(std::size_t(b * t)), targets(std::size_t(b * t));
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    inputs[i] = std::int32_t((i * 5 + 3) % TestType::vocab);
    targets[i] = i % 4 == 1 ? -1 : std::int32_t((i * 7 + 1) % TestType::vocab);  // some ignored positions
  }
  tensor_view<const std::int32_t, 2> in(inputs.data(), {b, t}), tgt(targets.data(), {b, t});

  m.zero_gradients();
  m.forward_backward(in, tgt);
  std::vector<float> analytic(m.gradients().data(), m.gradients().data() + m.gradient_count());

  // Central differences in double-checked float: step 1e-2 keeps truncation
  // error (O(h^2) ~ 1e-4 relative) and float rounding of the loss (~1e-7 / h
  // = 1e-5) both well below the 2e-2 tolerance, which still catches any
  // wrong term (those are O(1) relative errors).
  const float h = 1e-2f;
  int checked = 0;
  for (std::size_t k = 0; k < m.parameter_table().size(); ++k) {
    const auto& p = m.parameter_table()[k];
    if (m.frozen()[k]) continue;  // frozen tensors have no gradient (tests/unit/train/test_fine_tuning.cpp)
    // Every tensor, a few elements each (all of them for small ones).
    const index_t stride = std::max<index_t>(1, p.size() / 7);
    for (index_t i = 0; i < p.size(); i += stride) {
      const index_t at = p.offset + i, gradient_at = m.gradient_offset(k) + i;
      const float saved = params(at);
      params(at) = saved + h;
      m.parameters_changed();
      const double plus = m.evaluate(in, tgt);
      params(at) = saved - h;
      m.parameters_changed();
      const double minus = m.evaluate(in, tgt);
      params(at) = saved;
      m.parameters_changed();
      const double numeric = (plus - minus) / (2.0 * h);
      INFO(p.name << "[" << i << "] analytic " << analytic[std::size_t(gradient_at)] << " numeric " << numeric);
      CHECK(std::fabs(analytic[std::size_t(gradient_at)] - numeric) <= 2e-2 * std::fabs(numeric) + 2e-4);
      ++checked;
    }
  }
  CHECK(checked > 20);
}

TEST_CASE("gradients accumulate across calls until zeroed", "[nn][model]") {
  nn::model<gpt_tiny, cpu::par_t> m(cpu::par.with_threads(2), 1);
  std::vector<std::int32_t> tokens{1, 2, 3, 4, 5, 6, 7, 8};
  tensor_view<const std::int32_t, 2> in(tokens.data(), {2, 4});
  m.zero_gradients();
  m.forward_backward(in, in, 0.5f);
  std::vector<float> once(m.gradients().data(), m.gradients().data() + m.parameter_count());
  m.forward_backward(in, in, 0.5f);
  for (index_t i = 0; i < m.parameter_count(); i += 17)
    CHECK(m.gradients()(i) == Approx(2 * once[std::size_t(i)]).margin(1e-7));  // same batch twice: exactly doubles up to rounding
}

TEST_CASE("the model refuses sequences longer than max_seq and bad token ids", "[nn][model]") {
  nn::model<gpt_tiny, cpu::par_t> m;
  std::vector<std::int32_t> tokens(14, 1);
  CHECK_THROWS_AS(m.evaluate(tensor_view<const std::int32_t, 2>(tokens.data(), {2, 7}),
                             tensor_view<const std::int32_t, 2>(tokens.data(), {2, 7})),
                  shape_error);
  tokens[3] = 11;
  CHECK_THROWS_WITH(m.evaluate(tensor_view<const std::int32_t, 2>(tokens.data(), {2, 5}),
                               tensor_view<const std::int32_t, 2>(tokens.data(), {2, 5})),
                    Catch::Contains("token id 11"));
}
