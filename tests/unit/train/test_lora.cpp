// LoRA: an adapted model starts as its base model, trains its adapters only
// (no state, no change for the base), and merge_lora folds the adapters into
// a base model that gives the adapted model's logits. The adapters'
// gradients against finite differences are in tests/unit/nn/test_model_gradients.cpp.
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

struct llama_base {
  static constexpr int vocab = 13, d_model = 32, n_layer = 2, n_head = 4, n_kv_head = 2, d_ff = 64, max_seq = 12;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  static constexpr bool tie_embeddings = false;
};
struct gpt2_base {
  static constexpr int vocab = 13, d_model = 32, n_layer = 2, n_head = 4, n_kv_head = 4, d_ff = 128, max_seq = 12;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  static constexpr bool bias = true;
};
using nn::lora_target;
using llama_adapted = nn::with_lora<llama_base, nn::lora<4, lora_target::q | lora_target::v | lora_target::gate |
                                                               lora_target::down,
                                                           8.0f>>;
using gpt2_adapted = nn::with_lora<gpt2_base, nn::lora<4, lora_target::q | lora_target::k | lora_target::o |
                                                             lora_target::up,
                                                         16.0f>>;

template <class Adapted>
using base_of = typename nn::base_config_of<Adapted>::type;

std::vector<std::int32_t> tokens(index_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::int32_t> out(static_cast<std::size_t>(n));
  for (auto& t : out) t = std::int32_t(rng() % 13);
  return out;
}

template <class Model>
std::vector<float> logits_of(Model& m, const std::vector<std::int32_t>& in, index_t b, index_t t) {
  auto l = m.logits(tensor_view<const std::int32_t, 2>(in.data(), {b, t}));
  return {l.data(), l.data() + l.size()};
}

// The base tensors of `adapted` set to those of `base` (they are a prefix of its buffer).
template <class Adapted, class Base>
void copy_base(Adapted& adapted, Base& base) {
  std::memcpy(adapted.parameters().data(), base.parameters().data(), sizeof(float) * std::size_t(base.parameter_count()));
  adapted.parameters_changed();
}

}  // namespace

TEMPLATE_TEST_CASE("an adapted model lays its adapters after the base tensors and trains only them by default",
                   "[nn][lora]", llama_adapted, gpt2_adapted) {
  using adapted = nn::model<TestType, cpu::par_t>;
  using base = nn::model<base_of<TestType>, cpu::par_t>;
  adapted m(cpu::par, 1);
  base b(cpu::par, 1);
  const auto& table = m.parameter_table();
  // The base table is a prefix, names, offsets and shapes alike.
  REQUIRE(table.size() > b.parameter_table().size());
  for (std::size_t i = 0; i < b.parameter_table().size(); ++i) {
    CHECK(table[i].name == b.parameter_table()[i].name);
    CHECK(table[i].offset == b.parameter_table()[i].offset);
    CHECK(m.frozen()[i]);
  }
  for (std::size_t i = b.parameter_table().size(); i < table.size(); ++i) {
    INFO(table[i].name);
    CHECK(table[i].name.find(".lora.") != std::string::npos);
    CHECK_FALSE(m.frozen()[i]);
  }
  // The adapters are one slice: one optimizer pass.
  CHECK(m.trainable_ranges().size() == 1);
  // Checkpoints tell an adapted model from its base.
  CHECK(nn::config_json<TestType>().find("\"lora\":{\"rank\":4") != std::string::npos);
  CHECK(nn::config_json<base_of<TestType>>().find("lora") == std::string::npos);
}

TEMPLATE_TEST_CASE("an adapted model starts with exactly its base model's logits", "[nn][lora]", llama_adapted,
                   gpt2_adapted) {
  nn::model<base_of<TestType>, cpu::par_t> base(cpu::par, 3);
  nn::model<TestType, cpu::par_t> adapted(cpu::par, 4);
  copy_base(adapted, base);
  const auto in = tokens(2 * 12, 5);
  // B starts at zero, so every adapter adds exactly 0 to its projection.
  CHECK(logits_of(adapted, in, 2, 12) == logits_of(base, in, 2, 12));
}

TEMPLATE_TEST_CASE("LoRA training leaves the base bit-identical, and merged weights give the adapted logits",
                   "[train][lora]", llama_adapted, gpt2_adapted) {
  using adapted_type = nn::model<TestType, cpu::par_t>;
  using base_type = nn::model<base_of<TestType>, cpu::par_t>;
  const auto exec = cpu::par.with_threads(2);
  base_type base(exec, 3);
  adapted_type adapted(exec, 4);
  copy_base(adapted, base);

  train::adamw_config config;
  config.weight_decay = 0.1f;
  config.decay_all = true;  // would move base tensors if the optimizer touched them
  train::adamw<cpu::par_t> optimizer(exec, adapted.parameter_count(), adapted.trainable_ranges(), config);
  index_t adapter_elements = 0;
  for (std::size_t i = 0; i < adapted.parameter_table().size(); ++i)
    if (!adapted.frozen()[i]) adapter_elements += adapted.parameter_table()[i].size();
  CHECK(optimizer.layout().state_size() >= adapter_elements);
  CHECK(optimizer.layout().state_size() < adapter_elements + 16 * index_t(adapted.parameter_table().size()));

  train::trainer_settings settings;
  settings.batch_size = 8;
  settings.sequence_length = 12;
  settings.eval_every = 0;
  train::trainer<adapted_type, train::adamw<cpu::par_t>, train::fp32, cpu::par_t, train::constant_schedule> trainer(
      adapted, optimizer, train::constant_schedule{1e-2f}, settings);
  train::addition_task task(3);
  double first = 0, last = 0;
  for (int i = 0; i < 30; ++i) {
    const double loss = trainer
                            .step([&](std::mt19937_64& rng, tensor_view<std::int32_t, 2> in,
                                      tensor_view<std::int32_t, 2> out) { task.make_batch(rng, in, out); })
                            .loss;
    (i == 0 ? first : last) = loss;
  }
  CHECK(last < first);  // the adapters alone learn something
  CHECK(std::memcmp(adapted.parameters().data(), base.parameters().data(),
                    sizeof(float) * std::size_t(base.parameter_count())) == 0);

  base_type merged(exec, 99);
  nn::merge_lora(adapted, merged);
  const auto in = tokens(3 * 12, 8);
  const auto want = logits_of(adapted, in, 3, 12);
  const auto got = logits_of(merged, in, 3, 12);
  REQUIRE(got.size() == want.size());
  // Tolerance: W x + s B (A x) against (W + s B A) x reorders fp32 sums of
  // about d_ff products through two layers; logits are O(1), so 1e-4
  // absolute is many ulps above that and far below any missing term.
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) worst = std::max(worst, double(std::fabs(got[i] - want[i])));
  INFO("largest logit difference " << worst);
  CHECK(worst <= 1e-4);
  // And the merge did change the base: the adapters learnt something.
  CHECK(logits_of(base, in, 3, 12) != got);
}
