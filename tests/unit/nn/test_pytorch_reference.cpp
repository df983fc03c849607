// The whole model against PyTorch: logits, loss, every gradient and the
// parameters after 3 AdamW steps, for a GPT-2-style and a LLaMA-style tiny
// configuration. tools/make_reference.py writes tests/data/reference_*.safetensors.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "ctformer/io/safetensors.hpp"
#include "ctformer/nn/nn.hpp"
#include "ctformer/train/optimizer.hpp"
#include "../../support/test_data.hpp"

using namespace ctformer;

namespace {

// Must equal CONFIGS in tools/make_reference.py.
struct reference_gpt {
  static constexpr int vocab = 17, d_model = 16, n_layer = 2, n_head = 4, n_kv_head = 4, d_ff = 40, max_seq = 12;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  static constexpr const char* file = "reference_gpt.safetensors";
};
struct reference_llama {
  static constexpr int vocab = 19, d_model = 16, n_layer = 2, n_head = 4, n_kv_head = 2, d_ff = 24, max_seq = 12;
  static constexpr bool tie_embeddings = false;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  static constexpr const char* file = "reference_llama.safetensors";
};

// Largest |a - b| relative to the tensor's own scale (max |b|): per-element
// relative error is meaningless for elements that are nearly zero.
double scaled_error(std::span<const float> a, const std::vector<float>& b) {
  double scale = 1e-12, worst = 0;
  for (float x : b) scale = std::max(scale, double(std::fabs(x)));
  for (std::size_t i = 0; i < b.size(); ++i) worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])));
  return worst / scale;
}

}  // namespace

TEMPLATE_TEST_CASE("model matches the PyTorch reference", "[nn][model][reference]", reference_gpt, reference_llama) {
  const io::safetensors_file file = io::safetensors_file::read(std::string(CTFORMER_TEST_DATA_DIR) + "/" + TestType::file);
  nn::model<TestType, cpu::par_t> m(cpu::par.with_threads(2));
  auto params = m.parameters();
  for (const auto& p : m.parameter_table())
    file.copy_to<float>("param." + p.name, std::span<float>(params.data() + p.offset, std::size_t(p.size())));
  m.parameters_changed();

  const auto tokens = file.to_vector<std::int32_t>("input_tokens");
  const auto targets = file.to_vector<std::int32_t>("targets");
  const auto& shape = file.info("input_tokens").shape;
  tensor_view<const std::int32_t, 2> in(tokens.data(), {shape[0], shape[1]}), tgt(targets.data(), {shape[0], shape[1]});

  // fp32 against a float64 reference: the forward's rounding is a few ulp per
  // operation over ~10 chained operations, so 1e-5 of the tensor's scale
  // (about 100 ulp) holds with room and still catches any wrong term.
  auto logits = m.logits(in);
  const auto expected_logits = file.to_vector<float>("logits");
  CHECK(scaled_error(std::span<const float>(logits.data(), expected_logits.size()), expected_logits) < 1e-5);

  m.zero_gradients();
  const float loss = m.forward_backward(in, tgt);
  CHECK(loss == Approx(file.to_vector<float>("loss")[0]).epsilon(1e-5));
  for (const auto& p : m.parameter_table()) {
    INFO(p.name);
    // Gradients go through the backward's extra operations: 1e-4 of scale.
    CHECK(scaled_error(std::span<const float>(m.gradients().data() + p.offset, std::size_t(p.size())),
                       file.to_vector<float>("grad." + p.name)) < 1e-4);
  }

  // Three AdamW steps on the same batch (lr 1e-2, betas 0.9/0.95, weight
  // decay 0.1 on matrices only, as the script sets).
  train::adamw_config config;
  config.beta1 = 0.9f;
  config.beta2 = 0.95f;
  config.eps = 1e-8f;
  config.weight_decay = 0.1f;
  train::adamw<cpu::par_t> optimizer(cpu::par, m.parameter_count(), config);
  const auto ranges = m.decay_ranges();
  for (int step = 0; step < 3; ++step) {
    m.zero_gradients();
    m.forward_backward(in, tgt);
    optimizer.step(cpu::par, m.parameters(), as_const(m.gradients()), ranges, 1e-2f);
    m.parameters_changed();
  }
  for (const auto& p : m.parameter_table()) {
    INFO(p.name);
    // Adam's first steps move each weight by about lr whatever the gradient's
    // size, so fp32-vs-fp64 differences stay near the weights' rounding:
    // 1e-5 of the tensor's scale. Elements whose true gradient is zero (the
    // key part of the qkv bias: softmax ignores a constant added to a row of
    // scores) are left out: there Adam divides rounding noise by its own
    // size and moves by +-lr in a direction no implementation can agree on.
    const auto gradient = file.to_vector<float>("grad." + p.name);
    double gradient_scale = 0;
    for (float g : gradient) gradient_scale = std::max(gradient_scale, double(std::fabs(g)));
    auto expected = file.to_vector<float>("after3." + p.name);
    std::vector<float> actual(m.parameters().data() + p.offset, m.parameters().data() + p.offset + p.size());
    int left_out = 0;
    for (std::size_t i = 0; i < gradient.size(); ++i)
      if (std::fabs(gradient[i]) < 1e-5 * gradient_scale) {
        actual[i] = expected[i];
        ++left_out;
      }
    CHECK(left_out < int(gradient.size()));
    CHECK(scaled_error(actual, expected) < 1e-5);
  }
}
