// infer::generate: greedy generation with the cache equals greedy generation
// by the uncached forward, the same seed gives the same tokens, streaming,
// stop criteria, the context limit, and cache blocks returned after a run.
#include <catch2/catch.hpp>

#include <vector>

#include "ctformer/infer/generate.hpp"
#include "inference_test_models.hpp"

using namespace ctformer;
using testing::infer_gpt;
using testing::infer_llama;

TEMPLATE_TEST_CASE("greedy tokens with the cache equal greedy tokens without it", "[infer][generate]", infer_gpt,
                   infer_llama) {
  nn::model<TestType, cpu::par_t> trained(cpu::par.with_threads(2), 7);
  testing::randomise(trained, 21);
  const auto prompt = testing::random_tokens(9, TestType::vocab, 8);
  constexpr int steps = 20;

  // Uncached: the whole sequence through the training forward for every new token.
  std::vector<std::int32_t> sequence = prompt;
  std::vector<std::int32_t> expected;
  for (int i = 0; i < steps; ++i) {
    const auto logits = testing::uncached_logits(trained, sequence);
    const std::span<const float> last(logits.data() + logits.size() - TestType::vocab, TestType::vocab);
    expected.push_back(infer::greedy(last));
    sequence.push_back(expected.back());
  }

  infer::inference_model<TestType, quant::fp32, infer::kv::paged<8>> model(trained, 4);
  auto cache = model.make_cache(64);
  std::vector<std::int32_t> streamed;
  const auto result = infer::generate(model, cache, prompt, {.temperature = 0.0f}, infer::stop_criteria(steps),
                                      [&](std::int32_t t) { streamed.push_back(t); });
  CHECK(result.tokens == expected);
  CHECK(streamed == expected);
  CHECK(result.reason == infer::stop_reason::max_tokens);
  CHECK(result.decode_steps == steps - 1);
  CHECK(result.prefill_tokens_per_s > 0);
  CHECK(result.decode_tokens_per_s > 0);
  CHECK(cache.bytes_in_use() == 0);  // the sequence was closed
}

TEST_CASE("the same seed gives the same tokens", "[infer][generate]") {
  nn::model<infer_llama, cpu::par_t> trained(cpu::par, 7);
  testing::randomise(trained, 22);
  infer::inference_model<infer_llama, quant::q8_0> model(trained);
  auto cache = model.make_cache(1);
  const std::vector<std::int32_t> prompt = {1, 2, 3, 4};
  const infer::sampling_settings settings{.temperature = 1.0f, .top_k = 40, .top_p = 0.95f, .seed = 1234};
  auto run = [&](infer::sampling_settings s) {
    return infer::generate(model, cache, prompt, s, infer::stop_criteria(30), [](std::int32_t) {}).tokens;
  };
  const auto a = run(settings);
  const auto b = run(settings);
  CHECK(a == b);
  CHECK(a.size() == 30);
  auto other = settings;
  other.seed = 99;
  CHECK(run(other) != a);  // 30 draws from spread-out distributions: equal by chance with negligible probability
}

TEST_CASE("generation stops at end tokens, on the callback's word, and at the context", "[infer][generate]") {
  nn::model<infer_gpt, cpu::par_t> trained(cpu::par, 7);
  testing::randomise(trained, 23);
  infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<16, bf16>> model(trained);
  auto cache = model.make_cache(96);
  const std::vector<std::int32_t> prompt = {5, 6, 7};
  const infer::sampling_settings greedy{.temperature = 0.0f};

  const auto free_run = infer::generate(model, cache, prompt, greedy, infer::stop_criteria(10), [](std::int32_t) {});
  REQUIRE(free_run.tokens.size() == 10);
  // The third greedy token as an end token: stops there, and says so.
  const std::int32_t end = free_run.tokens[2];
  const auto stopped =
      infer::generate(model, cache, prompt, greedy, infer::stop_criteria(10, {end}), [](std::int32_t) {});
  const auto first_end = std::find(free_run.tokens.begin(), free_run.tokens.end(), end) - free_run.tokens.begin();
  CHECK(stopped.tokens.size() == std::size_t(first_end + 1));
  CHECK(stopped.reason == infer::stop_reason::end_of_text);
  CHECK(stopped.matched_length == 1);

  // A callback returning false stops after that token.
  int seen = 0;
  const auto cut = infer::generate(model, cache, prompt, greedy, infer::stop_criteria(10),
                                   [&](std::int32_t) { return ++seen < 4; });
  CHECK(cut.tokens.size() == 4);

  // The context (max_seq 48) ends a run that asks for more: a 40-token prompt
  // leaves room for 8 decode steps, so 9 new tokens (the last is not fed back).
  const auto long_prompt = testing::random_tokens(40, infer_gpt::vocab, 9);
  const auto full = infer::generate(model, cache, long_prompt, greedy, infer::stop_criteria(20), [](std::int32_t) {});
  CHECK(full.context_full);
  CHECK(full.tokens.size() == 9);

  // Errors leave the pool as they found it.
  const std::vector<std::int32_t> bad = {1, 999};
  CHECK_THROWS_AS(infer::generate(model, cache, bad, greedy, infer::stop_criteria(5), [](std::int32_t) {}),
                  invalid_input);
  CHECK(cache.bytes_in_use() == 0);
  CHECK(cache.open_sequences() == 0);
}
