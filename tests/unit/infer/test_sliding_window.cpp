// A heterogeneous layer stack (sliding-window and global layers in a
// pattern): the cached logits equal the training model's masked full
// attention, a windowed layer's cache never holds more than the window over
// a long generation, batched and forked sequences keep that, and the
// configuration's pattern reaches the cache and the checkpoint JSON.
#include <catch2/catch.hpp>

#include <span>
#include <vector>

#include "ctformer/infer/generate.hpp"
#include "inference_test_models.hpp"

using namespace ctformer;

namespace {

constexpr int window = 8;

/// LLaMA-style, three layers windowed, global, windowed (a pattern of two
/// repeated: the fold runs one and a half periods).
struct swa_llama {
  static constexpr int vocab = 80, d_model = 64, n_layer = 3, n_head = 4, n_kv_head = 2, d_ff = 96, max_seq = 48;
  static constexpr bool tie_embeddings = false;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  using attention_pattern = nn::layer_pattern<nn::sliding_window<window>, nn::global_attention>;
};

/// GPT-2-style, every layer windowed (Mistral's stack: no global layer).
struct swa_gpt {
  static constexpr int vocab = 96, d_model = 64, n_layer = 2, n_head = 4, n_kv_head = 4, d_ff = 128, max_seq = 48;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  using attention_pattern = nn::layer_pattern<nn::sliding_window<window>>;
};

static_assert(nn::config_traits<swa_llama>::window_of(0) == window && nn::config_traits<swa_llama>::window_of(1) == 0 &&
              nn::config_traits<swa_llama>::window_of(2) == window && !nn::config_traits<swa_llama>::uniform_attention);
static_assert(nn::config_traits<swa_gpt>::uniform_attention && nn::config_traits<swa_gpt>::window == window);

}  // namespace

TEST_CASE("the layer fold visits each layer once, in order, with its pattern's kind", "[infer][window][hana]") {
  std::vector<std::pair<index_t, int>> seen;
  nn::for_each_layer<swa_llama>([&](index_t l, auto kind) { seen.push_back({l, decltype(kind)::window}); });
  CHECK(seen == std::vector<std::pair<index_t, int>>{{0, window}, {1, 0}, {2, window}});
  seen.clear();
  nn::for_each_layer<testing::infer_llama>([&](index_t l, auto kind) { seen.push_back({l, decltype(kind)::window}); });
  CHECK(seen == std::vector<std::pair<index_t, int>>{{0, 0}, {1, 0}});
  // The pattern is part of the configuration a checkpoint stores; an all-global
  // stack's JSON is what it was before patterns existed.
  CHECK(nn::config_json<swa_llama>().find("\"attention\":[8,0,8]") != std::string::npos);
  CHECK(nn::config_json<testing::infer_llama>().find("attention") == std::string::npos);
}

TEMPLATE_TEST_CASE("sliding-window layers: cached logits equal the masked full attention, and the cache holds at "
                   "most the window",
                   "[infer][window]", swa_llama, swa_gpt) {
  nn::model<TestType, cpu::par_t> trained(cpu::par.with_threads(2), 7);
  testing::randomise(trained, 71);
  const auto tokens = testing::random_tokens(44, TestType::vocab, 9);
  // The reference: the training forward, which masks every windowed layer's
  // attention to the last 8 positions, over the whole sequence at once.
  const auto full = testing::uncached_logits(trained, tokens);

  // Blocks of 4 positions: a ring of exactly 8 positions, so a prefill chunk
  // is written and attended one row at a time in the windowed layers.
  infer::inference_model<TestType, quant::fp32, infer::kv::paged<4>> model(trained, 16, cpu::par.with_threads(2));
  auto cache = model.make_cache(64, 2);
  REQUIRE(cache.ring_positions() == window);
  const auto seq = cache.open_sequence();
  std::vector<float> cached;
  auto l = model.prefill(cache, seq, std::span<const std::int32_t>(tokens).first(12), 5);
  cached.insert(cached.end(), l.begin(), l.end());
  for (std::size_t i = 12; i < tokens.size(); ++i) {  // 32 decode steps: 4 x the window
    l = model.decode(cache, seq, tokens[i]);
    cached.insert(cached.end(), l.begin(), l.end());
    for (index_t layer = 0; layer < TestType::n_layer; ++layer) {
      const index_t held = cache.positions_held(layer, seq);
      if (nn::config_traits<TestType>::window_of(int(layer)) > 0) CHECK(held <= window);
      else CHECK(held == cache.length(seq));
    }
    CHECK(cache.ring_blocks_held(seq) <= window / 4);
  }
  // fp32 both ways, summation orders apart (as for global attention): 1e-4 of the largest logit.
  double worst = 0;
  for (std::size_t r = 0; r * TestType::vocab < cached.size(); ++r)
    worst = std::max(worst, testing::scaled_error(
                                std::span<const float>(cached.data() + r * TestType::vocab, TestType::vocab),
                                std::span<const float>(full.data() + (11 + r) * TestType::vocab, TestType::vocab)));
  CHECK(worst < 1e-4);

  // The whole prompt in one chunk, and a contiguous cache (rings of 64
  // positions: chunks attended in steps of 57 rows) give the same logits.
  infer::inference_model<TestType, quant::fp32, infer::kv::contiguous<float>> slots(trained, 48);
  auto slot_cache = slots.make_cache(1);
  const auto s2 = slot_cache.open_sequence();
  const auto all = slots.prefill(slot_cache, s2, tokens);
  CHECK(testing::scaled_error(all, std::span<const float>(full.data() + 43 * TestType::vocab, TestType::vocab)) <
        1e-4);
  cache.close_sequence(seq);
  CHECK(cache.bytes_in_use() == 0);
  CHECK(cache.free_ring_block_count() == 4);  // two sequences' rings of 2 blocks: the pool max_sequences = 2 sized
}

TEST_CASE("sliding-window layers in a ragged batch and a fork", "[infer][window][batch]") {
  nn::model<swa_llama, cpu::par_t> trained(cpu::par.with_threads(2), 7);
  testing::randomise(trained, 72);
  infer::inference_model<swa_llama, quant::q4_0, infer::kv::paged<4, bf16>> model(trained, 32, cpu::par.with_threads(2));
  const auto prompt = testing::random_tokens(20, swa_llama::vocab, 3);
  const auto other = testing::random_tokens(6, swa_llama::vocab, 4);

  // Alone: the prompt then one decode; the other prompt alone.
  auto alone_cache = model.make_cache(128, 4);
  const auto a = alone_cache.open_sequence();
  model.prefill(alone_cache, a, prompt);
  const auto l_a = model.decode(alone_cache, a, 7);
  const std::vector<float> expect_a(l_a.begin(), l_a.end());
  const auto b = alone_cache.open_sequence();
  const auto l_b = model.prefill(alone_cache, b, other);
  const std::vector<float> expect_b(l_b.begin(), l_b.end());

  // Together: a decode row of the long sequence beside a prefill chunk of the
  // other; q4_0's integer GEMM and the attention give each row its bits alone.
  auto cache = model.make_cache(128, 4);
  const auto x = cache.open_sequence();
  model.prefill(cache, x, prompt);
  const auto y = cache.open_sequence();
  infer::batch rows;
  rows.add(7, 20, x, true);
  rows.add_tokens(y, 0, other);
  const auto logits = model.forward(cache, rows);
  CHECK(std::vector<float>(&logits(0, 0), &logits(0, 0) + swa_llama::vocab) == expect_a);
  CHECK(std::vector<float>(&logits(1, 0), &logits(1, 0) + swa_llama::vocab) == expect_b);

  // A fork copies the ring (the last 8 positions) and the global layer's
  // whole context: its next step equals the parent's.
  const auto z = cache.fork(x);
  CHECK(cache.positions_held(0, z) == window);
  CHECK(cache.positions_held(1, z) == 21);
  const auto from_parent = model.decode(cache, x, 3);
  const std::vector<float> parent(from_parent.begin(), from_parent.end());
  const auto from_fork = model.decode(cache, z, 3);
  CHECK(std::vector<float>(from_fork.begin(), from_fork.end()) == parent);

  // A cache built for another pattern is refused.
  infer::kv_cache<infer::kv::paged<4, bf16>> global(3, 2, 16, 48, 64);
  const auto g = global.open_sequence();
  CHECK_THROWS_WITH(model.decode(global, g, 1), Catch::Contains("attention pattern"));
}
