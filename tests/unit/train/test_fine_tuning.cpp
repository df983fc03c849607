// Fine-tuning's parts: name patterns, frozen parameters (no gradient, no
// optimizer state, bit-identical after training), the backward skipping what
// frozen tensors do not need, gradient accumulation, and bf16 training
// against fp32.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "ctformer/nn/nn.hpp"
#include "ctformer/train/addition_task.hpp"
#include "ctformer/train/trainer.hpp"

using namespace ctformer;

namespace {

// One LLaMA-shaped and one GPT-2-shaped configuration: the backward's frozen
// paths differ (norm biases, learned positions, a tied or separate head).
struct llama_shape {
  static constexpr int vocab = 13, d_model = 32, n_layer = 3, n_head = 4, n_kv_head = 2, d_ff = 64, max_seq = 12;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  static constexpr bool tie_embeddings = false;  // the head is a tensor of its own
};
struct gpt2_shape {
  static constexpr int vocab = 13, d_model = 32, n_layer = 3, n_head = 4, n_kv_head = 4, d_ff = 128,
                       max_seq = 12;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  static constexpr bool bias = true, tie_embeddings = true;
};

// A fixed batch of the addition task.
struct batch {
  std::vector<std::int32_t> inputs, targets;
  index_t rows, cols;
  batch(index_t b, index_t t, std::uint64_t seed) : inputs(std::size_t(b * t)), targets(std::size_t(b * t)), rows(b), cols(t) {
    train::addition_task task(3);
    std::mt19937_64 rng(seed);
    task.make_batch(rng, in(), out());
  }
  tensor_view<std::int32_t, 2> in() { return {inputs.data(), {rows, cols}}; }
  tensor_view<std::int32_t, 2> out() { return {targets.data(), {rows, cols}}; }
};

}  // namespace

TEST_CASE("parameter name patterns: '*' is any text, [a-b] a number in a range", "[nn][fine-tuning]") {
  using nn::matches_parameter_pattern;
  CHECK(matches_parameter_pattern("token_embedding.*", "token_embedding.weight"));
  CHECK_FALSE(matches_parameter_pattern("token_embedding.*", "position_embedding.weight"));
  CHECK(matches_parameter_pattern("blocks.[0-3].*", "blocks.3.mlp.up.weight"));
  CHECK(matches_parameter_pattern("blocks.[0-3].*", "blocks.0.attention_norm.weight"));
  CHECK_FALSE(matches_parameter_pattern("blocks.[0-3].*", "blocks.4.mlp.up.weight"));
  // A number is read whole: block 12 is not block 1 followed by "2".
  CHECK_FALSE(matches_parameter_pattern("blocks.[0-3].*", "blocks.12.mlp.up.weight"));
  CHECK(matches_parameter_pattern("blocks.[10-12].*", "blocks.12.mlp.up.weight"));
  CHECK(matches_parameter_pattern("*norm.*", "blocks.2.mlp_norm.bias"));
  CHECK(matches_parameter_pattern("*norm.*", "final_norm.weight"));
  CHECK_FALSE(matches_parameter_pattern("*norm.*", "blocks.2.mlp.up.weight"));
  CHECK(matches_parameter_pattern("*", "anything"));
  CHECK(matches_parameter_pattern("lm_head.weight", "lm_head.weight"));
  CHECK_FALSE(matches_parameter_pattern("lm_head.weight", "lm_head.weight2"));
  // A bracket that is not a range is an ordinary character.
  CHECK(matches_parameter_pattern("a[b", "a[b"));
}

TEMPLATE_TEST_CASE("a frozen tensor gets no gradient and the others get exactly the full model's",
                   "[nn][fine-tuning]", llama_shape, gpt2_shape) {
  using model_type = nn::model<TestType, cpu::par_t>;
  const auto exec = cpu::par.with_threads(2);
  // Each case freezes a different amount, down to everything: each stops the
  // backward at a different place (a block, the final norm, the head, nothing).
  const std::vector<std::vector<std::string>> cases = {
      {"token_embedding.*"},
      {"*embedding.*", "blocks.[0-0].*"},
      {"*embedding.*", "blocks.[0-1].*", "*norm.*"},
      {"*embedding.*", "blocks.*"},
      {"*embedding.*", "blocks.*", "final_norm.*"},
      {"*"},
  };
  batch data(4, 12, 7);
  model_type full(exec, 3);
  full.zero_gradients();
  const float full_loss = full.forward_backward(data.in(), data.out());
  for (const auto& patterns : cases) {
    model_type partial(exec, 3);
    partial.freeze(patterns);
    partial.zero_gradients();
    // Frozen tensors change nothing of the forward: the loss is bit-identical.
    REQUIRE(partial.forward_backward(data.in(), data.out()) == full_loss);
    index_t trainable = 0;
    for (std::size_t i = 0; i < partial.parameter_table().size(); ++i) {
      const auto& p = partial.parameter_table()[i];
      INFO("frozen " << patterns.size() << " patterns, tensor " << p.name);
      if (partial.frozen()[i]) {
        CHECK(partial.gradient_offset(i) == -1);  // no gradient memory at all
        continue;
      }
      trainable += p.size();
      const float* got = partial.gradients().data() + partial.gradient_offset(i);
      const float* want = full.gradients().data() + full.gradient_offset(i);
      // Skipping other tensors' GEMMs leaves this one's arithmetic as it
      // was: bit-identical, not merely close.
      CHECK(std::vector<float>(got, got + p.size()) == std::vector<float>(want, want + p.size()));
    }
    // The gradient buffer holds the trainable tensors (and padding between
    // adjacent ones), nothing frozen.
    CHECK(partial.gradient_count() >= trainable);
    CHECK(partial.gradient_count() <= trainable + 16 * index_t(partial.parameter_table().size()));
  }
}

TEST_CASE("freeze refuses a pattern that matches nothing, naming it", "[nn][fine-tuning]") {
  nn::model<llama_shape, cpu::par_t> m(cpu::par, 1);
  const std::vector<std::string> typo = {"blocks.[0-1].*", "token_embeddings.*"};
  try {
    m.freeze(typo);
    FAIL("freeze accepted a pattern matching nothing");
  } catch (const invalid_input& e) {
    CHECK_THAT(e.what(), Catch::Contains("token_embeddings.*") && Catch::Contains("matches no parameter"));
  }
}

TEMPLATE_TEST_CASE("frozen parameters are bit-identical after training and have no optimizer state",
                   "[train][fine-tuning]", llama_shape, gpt2_shape) {
  using model_type = nn::model<TestType, cpu::par_t>;
  using trainer_type = train::trainer<model_type, train::adamw<cpu::par_t>, train::fp32, cpu::par_t,
                                      train::constant_schedule>;
  const auto exec = cpu::par.with_threads(2);
  model_type model(exec, 5);
  const std::vector<std::string> patterns = {"*embedding.*", "blocks.[0-1].*", "*norm.weight"};
  model.freeze(patterns);
  const std::vector<float> before(model.parameters().data(), model.parameters().data() + model.parameter_count());

  train::adamw_config config;
  config.weight_decay = 0.1f;  // decay would move frozen matrices if the optimizer touched them
  config.decay_all = true;
  const auto trainable = model.trainable_ranges();
  train::adamw<cpu::par_t> optimizer(exec, model.parameter_count(), trainable, config);
  index_t trainable_elements = 0, frozen_elements = 0;
  for (std::size_t i = 0; i < model.parameter_table().size(); ++i)
    (model.frozen()[i] ? frozen_elements : trainable_elements) += model.parameter_table()[i].size();
  // State covers the trainable tensors (and the alignment padding between
  // adjacent ones, at most 15 floats each), nothing frozen.
  CHECK(optimizer.layout().state_size() >= trainable_elements);
  CHECK(optimizer.layout().state_size() <= trainable_elements + 16 * index_t(model.parameter_table().size()));
  CHECK(optimizer.state_bytes() == 2 * sizeof(float) * std::size_t(optimizer.layout().state_size()));
  CHECK(frozen_elements > 0);

  train::trainer_settings settings;
  settings.batch_size = 4;
  settings.sequence_length = 12;
  settings.eval_every = 0;
  trainer_type trainer(model, optimizer, train::constant_schedule{3e-3f}, settings);
  train::addition_task task(3);
  for (int i = 0; i < 5; ++i)
    trainer.step([&](std::mt19937_64& rng, tensor_view<std::int32_t, 2> in, tensor_view<std::int32_t, 2> out) {
      task.make_batch(rng, in, out);
    });
  const float* after = model.parameters().data();
  for (std::size_t i = 0; i < model.parameter_table().size(); ++i) {
    const auto& p = model.parameter_table()[i];
    INFO(p.name);
    const bool unchanged = std::memcmp(before.data() + p.offset, after + p.offset, sizeof(float) * std::size_t(p.size())) == 0;
    if (model.frozen()[i]) CHECK(unchanged);
    else CHECK_FALSE(unchanged);
  }
}

TEST_CASE("the optimizer over trainable slices equals the whole-buffer optimizer on those slices", "[train][fine-tuning]") {
  // Two slices of a 100-element buffer; decay ranges crossing a slice's edge.
  const index_t n = 100;
  std::vector<float> p_whole(n), p_sliced(n), g(n);
  for (index_t i = 0; i < n; ++i) {
    p_whole[std::size_t(i)] = p_sliced[std::size_t(i)] = 0.01f * float(i) - 0.3f;
    g[std::size_t(i)] = std::sin(0.37f * float(i));
  }
  const std::vector<parameter_range> decay = {{0, 30, true}, {30, 40, false}, {70, 30, true}};
  const std::vector<parameter_range> slices = {{10, 40, true}, {64, 30, true}};
  train::adamw_config config;
  config.weight_decay = 0.2f;
  train::adamw<cpu::par_t> whole(cpu::par, n, config), sliced(cpu::par, n, slices, config);
  CHECK(sliced.layout().state_size() == 70);
  // The sliced optimizer takes the slices' gradients packed, as nn::model::gradients() holds them.
  std::vector<float> packed;
  for (const auto& r : slices) packed.insert(packed.end(), g.begin() + r.offset, g.begin() + r.offset + r.size);
  for (int step = 0; step < 3; ++step) {
    whole.step(cpu::par, {p_whole.data(), {n}}, {g.data(), {n}}, decay, 1e-2f);
    sliced.step(cpu::par, {p_sliced.data(), {n}}, {packed.data(), {index_t(packed.size())}}, decay, 1e-2f);
  }
  CHECK_THROWS_WITH(sliced.step(cpu::par, {p_sliced.data(), {n}}, {g.data(), {n}}, decay, 1e-2f),
                    Catch::Contains("grads has 100 elements") && Catch::Contains("hold 70"));
  for (index_t i = 0; i < n; ++i) {
    INFO("element " << i);
    const bool in_slice = (i >= 10 && i < 50) || (i >= 64 && i < 94);
    // Inside a slice the same kernel does the same arithmetic: exactly equal.
    if (in_slice) CHECK(p_sliced[std::size_t(i)] == p_whole[std::size_t(i)]);
    else CHECK(p_sliced[std::size_t(i)] == 0.01f * float(i) - 0.3f);
  }
  // Slices must be sorted, disjoint and inside the buffer.
  const std::vector<parameter_range> overlapping = {{0, 20, true}, {10, 20, true}};
  CHECK_THROWS_AS(train::adamw<cpu::par_t>(cpu::par, n, overlapping), invalid_input);
  const std::vector<parameter_range> outside = {{90, 20, true}};
  CHECK_THROWS_AS(train::sgd<cpu::par_t>(cpu::par, n, outside), invalid_input);
}

TEMPLATE_TEST_CASE("k micro-batches of b rows give the gradient of one batch of k x b rows", "[train][accumulation]",
                   llama_shape, gpt2_shape) {
  using model_type = nn::model<TestType, cpu::par_t>;
  const auto exec = cpu::par.with_threads(2);
  const index_t k = 4, b = 2, t = 12;
  batch whole(k * b, t, 11);  // every target of the addition task counts, so the means weigh rows equally
  model_type one(exec, 9), accumulated(exec, 9);
  one.zero_gradients();
  const float loss_one = one.forward_backward(whole.in(), whole.out());
  accumulated.zero_gradients();
  double loss_sum = 0;
  for (index_t micro = 0; micro < k; ++micro) {
    const tensor_view<const std::int32_t, 2> in(whole.inputs.data() + micro * b * t, {b, t});
    const tensor_view<const std::int32_t, 2> out(whole.targets.data() + micro * b * t, {b, t});
    loss_sum += accumulated.forward_backward(in, out, 1.0f / float(k));
  }
  // Tolerance: the same sums in another order (per-micro-batch means, then
  // their mean; GEMM reductions over b rows, k times): fp32 reassociation, a
  // few ulps of each term, far below 1e-5 of the gradient's scale.
  CHECK(loss_sum / double(k) == Approx(loss_one).epsilon(1e-6));
  const auto g1 = one.gradients(), g2 = accumulated.gradients();
  double scale = 0, worst = 0;
  for (index_t i = 0; i < one.parameter_count(); ++i) scale = std::max(scale, double(std::fabs(g1(i))));
  for (index_t i = 0; i < one.parameter_count(); ++i) worst = std::max(worst, double(std::fabs(g1(i) - g2(i))));
  INFO("largest gradient " << scale << ", largest difference " << worst);
  CHECK(worst <= 1e-5 * scale);
}

TEST_CASE("bf16 mixed precision training converges to within 3% of fp32's loss", "[train][precision]") {
  using model_type = nn::model<llama_shape, cpu::par_t>;
  const auto exec = cpu::par.with_threads(2);
  // The same run in each precision: the addition task, 150 steps, the same
  // data stream and initial weights; the held-out loss at the end compared.
  auto final_loss = [&]<class Precision>(Precision) {
    model_type model(exec, 21);
    train::adamw<cpu::par_t> optimizer(exec, model.parameter_count());
    train::trainer_settings settings;
    settings.batch_size = 16;
    settings.sequence_length = 12;
    settings.eval_batches = 8;
    train::trainer<model_type, train::adamw<cpu::par_t>, Precision, cpu::par_t> trainer(
        model, optimizer, train::warmup_cosine_schedule{3e-3f, 3e-4f, 10, 150}, settings);
    train::addition_task task(3);
    for (int i = 0; i < 150; ++i)
      trainer.step([&](std::mt19937_64& rng, tensor_view<std::int32_t, 2> in, tensor_view<std::int32_t, 2> out) {
        task.make_batch(rng, in, out);
      });
    return trainer.evaluate([&](int i, tensor_view<std::int32_t, 2> in, tensor_view<std::int32_t, 2> out) {
      std::mt19937_64 fixed(1000 + std::uint64_t(i));
      task.make_batch(fixed, in, out);
    });
  };
  const double fp32 = final_loss(train::fp32{});
  const double bf16 = final_loss(train::bf16_mixed{});
  INFO("held-out loss after 150 steps: fp32 " << fp32 << ", bf16 " << bf16);
  // The run must have learnt something (the uniform guess is ln 13 = 2.56)...
  CHECK(fp32 < 1.6);
  // ...and bf16's 8-bit mantissa in the GEMM operands (fp32 accumulation and
  // master weights) costs at most 3% of the loss over this many steps.
  CHECK(std::fabs(bf16 - fp32) <= 0.03 * fp32);
}
