// Knowledge distillation: the loss and its gradient against PyTorch, the
// hard and soft limits (alpha 1 is cross-entropy; a teacher equal to the
// student costs nothing at alpha 0), bad settings and shapes refused, and a
// trainer that distils moves a student towards its teacher.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <random>
#include <vector>

#include "ctformer/nn/nn.hpp"
#include "ctformer/train/trainer.hpp"
#include "../../support/test_data.hpp"

using namespace ctformer;

namespace {

struct tiny {
  static constexpr int vocab = 17, d_model = 32, n_layer = 2, n_head = 4, n_kv_head = 4, d_ff = 64, max_seq = 16;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};
struct tiny_teacher : tiny {  // another configuration with the same vocabulary
  static constexpr int d_model = 48, n_layer = 3, n_head = 4, n_kv_head = 4, d_ff = 96;
};

std::vector<std::int32_t> random_tokens(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = std::int32_t(rng() % tiny::vocab);
  return t;
}

}  // namespace

TEST_CASE("the distillation loss and its gradient match PyTorch", "[train][distillation]") {
  std::ifstream in(std::string(CTFORMER_TEST_DATA_DIR) + "/distillation_reference.json");
  REQUIRE(in);
  const auto reference = nlohmann::json::parse(in);
  const auto exec = cpu::par.with_threads(1);
  for (const auto& c : reference["cases"]) {
    const index_t rows = c["rows"], vocab = c["vocab"];
    const float alpha = c["alpha"], temperature = c["temperature"];
    INFO("rows " << rows << ", vocab " << vocab << ", alpha " << alpha << ", T " << temperature);
    const auto student = c["student"].get<std::vector<float>>(), teacher = c["teacher"].get<std::vector<float>>();
    const auto targets = c["targets"].get<std::vector<std::int32_t>>();
    const auto expected = c["gradient"].get<std::vector<double>>();
    const tensor_view<const float, 2> z(student.data(), {rows, vocab}), t(teacher.data(), {rows, vocab});
    const tensor_view<const std::int32_t, 1> y(targets.data(), {rows});
    std::vector<float> losses(static_cast<std::size_t>(rows)), gradient(student.size());
    ops::distillation_loss_forward(exec, z, t, y, alpha, temperature, tensor_view<float, 1>(losses.data(), {rows}));
    double sum = 0;
    int counted = 0;
    for (index_t n = 0; n < rows; ++n)
      if (targets[std::size_t(n)] >= 0) sum += losses[std::size_t(n)], ++counted;
      else CHECK(losses[std::size_t(n)] == 0.0f);
    // fp32 arithmetic (and the kernels' exp, within 2 ulp) against PyTorch's
    // fp64, over logits of size 10 and sums of up to 129 terms: a few 1e-7
    // relative; 1e-5 leaves room and still fails a wrong T^2 or sign.
    CHECK(sum / counted == Approx(double(c["loss"])).epsilon(1e-5));
    ops::distillation_loss_backward(exec, z, t, y, alpha, temperature, 1.0f / float(counted),
                                    tensor_view<float, 2>(gradient.data(), {rows, vocab}));
    double largest = 0, worst = 0;
    for (std::size_t i = 0; i < expected.size(); ++i) {
      largest = std::max(largest, std::fabs(expected[i]));
      worst = std::max(worst, std::fabs(double(gradient[i]) - expected[i]));
    }
    INFO("largest gradient " << largest << ", largest difference " << worst);
    CHECK(worst <= 1e-5 * largest);
  }
}

TEST_CASE("distillation at alpha 1 is cross-entropy; at alpha 0 a teacher equal to the student costs nothing",
          "[train][distillation]") {
  const auto exec = cpu::par.with_threads(1);
  nn::model<tiny, cpu::par_t> a(exec, 3), b(exec, 3);
  const auto inputs = random_tokens(2 * 8, 1), targets = random_tokens(2 * 8, 2);
  const tensor_view<const std::int32_t, 2> in(inputs.data(), {2, 8}), tgt(targets.data(), {2, 8});
  // The teacher's logits: the student's own (same weights), copied.
  const auto own = a.logits(in);
  const std::vector<float> teacher(own.data(), own.data() + own.size());
  const tensor_view<const float, 3> t(teacher.data(), {2, 8, tiny::vocab});

  a.zero_gradients();
  b.zero_gradients();
  const float hard = a.forward_backward_distilled(in, tgt, t, {1.0f, 3.0f});
  const float plain = b.forward_backward(in, tgt);
  CHECK(hard == Approx(plain).epsilon(1e-6));
  const auto ga = a.gradients(), gb = b.gradients();
  double worst = 0, largest = 0;
  for (index_t i = 0; i < ga.size(); ++i) {
    worst = std::max(worst, double(std::fabs(ga(i) - gb(i))));
    largest = std::max(largest, double(std::fabs(gb(i))));
  }
  // The same arithmetic but for a soft term multiplied by zero.
  CHECK(worst <= 1e-6 * largest);

  a.zero_gradients();
  const float soft = a.forward_backward_distilled(in, tgt, t, {0.0f, 2.0f});
  CHECK(std::fabs(soft) <= 1e-5);  // KL(p || p) = 0, to rounding
  double norm = 0;
  for (index_t i = 0; i < ga.size(); ++i) norm = std::max(norm, double(std::fabs(ga(i))));
  CHECK(norm <= 1e-5 * largest);
}

TEST_CASE("distillation refuses bad settings and a teacher of another shape", "[train][distillation]") {
  const auto exec = cpu::par.with_threads(1);
  nn::model<tiny, cpu::par_t> m(exec, 3);
  const auto inputs = random_tokens(2 * 8, 1);
  const tensor_view<const std::int32_t, 2> in(inputs.data(), {2, 8});
  std::vector<float> teacher(2 * 8 * tiny::vocab, 0.0f);
  const tensor_view<const float, 3> t(teacher.data(), {2, 8, tiny::vocab});
  CHECK_THROWS_WITH(m.forward_backward_distilled(in, in, t, {1.5f, 2.0f}), Catch::Contains("alpha 1.5"));
  CHECK_THROWS_WITH(m.forward_backward_distilled(in, in, t, {0.5f, 0.0f}), Catch::Contains("temperature"));
  const tensor_view<const float, 3> wrong(teacher.data(), {2, 4, 2 * tiny::vocab});
  CHECK_THROWS_AS(m.forward_backward_distilled(in, in, wrong, {0.5f, 2.0f}), shape_error);
}

TEST_CASE("a distilling trainer moves the student towards its teacher", "[train][distillation]") {
  const auto exec = cpu::par.with_threads(1);
  nn::model<tiny_teacher, cpu::par_t> teacher(exec, 9);
  nn::model<tiny, cpu::par_t> student(exec, 4);
  train::adamw<cpu::par_t> optimizer(exec, student.parameter_count(), train::adamw_config{});
  train::trainer_settings settings;
  settings.batch_size = 4;
  settings.sequence_length = 12;
  train::trainer<nn::model<tiny, cpu::par_t>, train::adamw<cpu::par_t>, train::fp32, cpu::par_t> trainer(
      student, optimizer, train::warmup_cosine_schedule{3e-3f, 3e-4f, 2, 60}, settings);
  auto sample = [](std::mt19937_64& rng, tensor_view<std::int32_t, 2> in, tensor_view<std::int32_t, 2> out) {
    for (index_t r = 0; r < in.extent(0); ++r)
      for (index_t c = 0; c < in.extent(1); ++c) {
        in(r, c) = std::int32_t(rng() % tiny::vocab);
        out(r, c) = std::int32_t(rng() % tiny::vocab);
      }
  };
  auto teach = [&](tensor_view<const std::int32_t, 2> in) { return teacher.logits(in); };
  // alpha 0: the labels are noise, the teacher's distribution the only signal.
  const nn::distillation_settings soft{0.0f, 1.0f};
  const double first = trainer.step(sample, teach, soft).loss;
  double last = first;
  for (int i = 1; i < 60; ++i) last = trainer.step(sample, teach, soft).loss;
  INFO("KL to the teacher: first step " << first << ", step 60 " << last);
  // A random student starts several tenths of a nat from the random
  // teacher; 60 steps close most of it.
  CHECK(last < 0.5 * first);
}
