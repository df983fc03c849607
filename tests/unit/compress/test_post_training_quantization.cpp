// compress::quantize_weights / fake_quantize / weight_bytes on a tiny model:
// linear weights become exactly what the format stores, everything else stays.
#include <catch2/catch.hpp>

#include <vector>

#include "ctformer/compress/post_training_quantization.hpp"
#include "ctformer/ctformer.hpp"

using namespace ctformer;

namespace {
struct tiny_config {
  static constexpr int vocab = 16, d_model = 32, n_layer = 1, n_head = 2, n_kv_head = 2, d_ff = 64, max_seq = 8;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};
}  // namespace

TEMPLATE_TEST_CASE("fake_quantize sets linear weights to their packed values and leaves the rest", "[compress]",
                   quant::q8_0, quant::q4_0, quant::int8_rowwise, quant::bf16_weights, quant::sparse_2of4,
                   quant::sparse_half) {
  nn::model<tiny_config> model(cpu::par, 7);
  const auto before = std::vector<float>(model.parameters().data(), model.parameters().data() + model.parameter_count());
  const auto packed = compress::quantize_weights<TestType>(model);
  compress::fake_quantize<TestType>(model);
  std::size_t linear = 0;
  for (const auto& p : model.parameter_table()) {
    const float* now = model.parameters().data() + p.offset;
    if (compress::is_linear_weight(p)) {
      ++linear;
      std::vector<float> expected(std::size_t(p.size()));
      packed.at(p.name).dequantize(tensor_view<float, 2>(expected.data(), {p.shape[0], p.shape[1]}));
      CHECK(std::vector<float>(now, now + p.size()) == expected);  // exact: the same dequantize
    } else {
      CHECK(std::vector<float>(now, now + p.size()) == std::vector<float>(before.begin() + p.offset,
                                                                          before.begin() + p.offset + p.size()));
    }
  }
  CHECK(linear == 4);  // qkv, attention output, mlp up, mlp down (the lm_head is the tied embedding)
  // Quantizing an already fake-quantized model changes nothing: the values are
  // representable. Not for int8_rowwise, whose fp32 scale max|w|/127 may move
  // by an ulp when recomputed from the dequantized maximum.
  if constexpr (std::is_same_v<TestType, quant::int8_rowwise>) return;
  const auto once = std::vector<float>(model.parameters().data(), model.parameters().data() + model.parameter_count());
  compress::fake_quantize<TestType>(model);
  CHECK(std::vector<float>(model.parameters().data(), model.parameters().data() + model.parameter_count()) == once);
}

TEST_CASE("weight_bytes counts packed linear weights and fp32 for the rest", "[compress]") {
  nn::model<tiny_config> model(cpu::par, 7);
  const std::size_t linear = 96 * 32 + 32 * 32 + 64 * 32 + 32 * 64;  // qkv, output, up, down
  const std::size_t rest = 16 * 32 + 8 * 32 + 4 * 32 + 2 * 32;        // embeddings, 2 norms (w, b), final norm
  CHECK(compress::weight_bytes<quant::fp32>(model) == (linear + rest) * 4);
  CHECK(compress::weight_bytes<quant::q8_0>(model) == linear / 32 * 34 + rest * 4);
  CHECK(compress::weight_bytes<quant::sparse_2of4>(model) == linear / 32 * 68 + rest * 4);
}
