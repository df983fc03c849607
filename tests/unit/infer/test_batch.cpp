// infer::inference_model::forward over a ragged batch: prefill chunks of some
// sequences and decode tokens of others in one call give each sequence the
// logits it gets alone (every weight format and KV-cache policy), greedy
// generation of 16 sequences together equals each alone, forked sequences
// equal independent runs, and bad batches are clear errors that leave the
// cache unchanged.
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <span>
#include <vector>

#include "ctformer/infer/generate.hpp"
#include "inference_test_models.hpp"

using namespace ctformer;
using testing::infer_gpt;
using testing::infer_llama;

namespace {

template <class Cfg, class Format, class Kv>
struct setup {
  using config = Cfg;
  using format = Format;
  using kv = Kv;
  using model_type = infer::inference_model<Cfg, Format, Kv>;
};

// The logits of one sequence's steps run alone: a prefill of `prompt`, then
// one decode per token of `extension`; rows: the prefill's last, then each decode.
template <class Model>
std::vector<float> alone(Model& model, std::span<const std::int32_t> prompt, std::span<const std::int32_t> extension,
                         index_t chunk) {
  auto cache = model.make_cache(infer::kv::is_paged<typename Model::kv_policy_type> ? 256 : 1);
  const auto seq = cache.open_sequence();
  std::vector<float> out;
  auto l = model.prefill(cache, seq, prompt, chunk);
  out.insert(out.end(), l.begin(), l.end());
  for (auto t : extension) {
    l = model.decode(cache, seq, t);
    out.insert(out.end(), l.begin(), l.end());
  }
  return out;
}

std::span<const float> row(const std::vector<float>& rows, std::size_t r, index_t vocab) {
  return {rows.data() + r * std::size_t(vocab), std::size_t(vocab)};
}

// A batched row against the same row run alone. Attention gives each query
// the bits it gets alone whatever else is in the call, so the differences
// are the linear layers':
// - interleaved q4_0 / q8_0: the int8 GEMM gives each row the GEMV's bits: exact.
// - fp32: up to cpu::linear_gemv_max_rows rows per call, every row gets the
//   GEMV's bits (exact); past that (the first batch here has 34 rows), and
//   for bf16 weights where the build has no native bf16 GEMM, the blocked
//   GEMM where a lone decode row runs the GEMV: the same products summed in
//   another order, a few ulp per dot product, observed up to 1.1e-6 of the
//   row's largest logit after two layers; bound 2e-6 of it.
// - bf16 weights with a native bf16 GEMM: a call of 16 rows or more rounds
//   its activations to bf16 (one 2^-9 relative rounding per linear input),
//   a lone decode row keeps them fp32; as against fp32 weights, 1% RMS.
// - row-major q8_0 and int8_rowwise: a call of 16 rows or more dequantizes
//   the weights and keeps fp32 activations, a lone decode row rounds them to
//   int8 blocks (about 0.3% per linear input); as against fp32 weights, 4% RMS.
template <class Model>
bool close_to_alone(std::span<const float> batched, std::span<const float> alone) {
  using format = typename Model::format;
  const double scaled = testing::scaled_error(batched, alone), rms = testing::rms_error(batched, alone);
  UNSCOPED_INFO("scaled error " << scaled << ", RMS error " << rms);
  if constexpr (Model::integer_gemm) return scaled == 0.0;
  else if constexpr (std::is_same_v<format, quant::fp32>) return scaled <= 2e-6;
  else if constexpr (std::is_same_v<format, quant::bf16_weights>)
    return ops::gemm_bf16_native<cpu::par_t> ? rms <= 1e-2 : scaled <= 2e-6;
  else return rms <= 4e-2;
}

}  // namespace

TEMPLATE_TEST_CASE("a ragged batch gives each sequence the logits it gets alone", "[infer][batch]",
                   (setup<infer_gpt, quant::fp32, infer::kv::contiguous<float>>),
                   (setup<infer_llama, quant::fp32, infer::kv::paged<8, float>>),
                   (setup<infer_llama, quant::fp32, infer::kv::paged<16, bf16>>),
                   (setup<infer_gpt, quant::bf16_weights, infer::kv::paged<4, float>>),
                   (setup<infer_llama, quant::q8_0, infer::kv::paged<8, std::int8_t>>),
                   (setup<infer_gpt, quant::q8_0, infer::kv::contiguous<bf16>>),
                   (setup<infer_llama, quant::q4_0, infer::kv::paged<8, float>>),
                   (setup<infer_gpt, quant::q4_0, infer::kv::paged<16, std::int8_t>>),
                   (setup<infer_llama, quant::int8_rowwise, infer::kv::paged<8, float>>)) {
  using Cfg = typename TestType::config;
  using model_type = typename TestType::model_type;
  constexpr index_t vocab = Cfg::vocab;
  nn::model<Cfg, cpu::par_t> trained(cpu::par.with_threads(2), 7);
  testing::randomise(trained, 31);
  model_type model(trained, 32, cpu::par.with_threads(2));

  // Four sequences: a and b were prefilled earlier and decode one token
  // each in the batch; c and d start in it with prefill chunks of 7 and 20
  // tokens (20: a chunk long enough for the dequantizing GEMM path).
  const auto prompt_a = testing::random_tokens(11, vocab, 1), prompt_b = testing::random_tokens(5, vocab, 2);
  const auto chunk_c = testing::random_tokens(7, vocab, 3), chunk_d = testing::random_tokens(20, vocab, 4);
  const std::int32_t next_a = 5, next_b = 9;

  auto cache = model.make_cache(infer::kv::is_paged<typename TestType::kv> ? 256 : 4);
  const auto a = cache.open_sequence(), b = cache.open_sequence();
  model.prefill(cache, a, prompt_a);
  model.prefill(cache, b, prompt_b);
  const auto c = cache.open_sequence(), d = cache.open_sequence();
  infer::batch rows;
  rows.add(next_a, 11, a, true);
  rows.add_tokens(c, 0, chunk_c);
  rows.add(next_b, 5, b, true);
  rows.add_tokens(d, 0, chunk_d);
  const auto first_view = model.forward(cache, rows);
  REQUIRE(first_view.extent(0) == 4);
  // The logits are valid until the model's next call: keep a copy.
  const std::vector<float> first(first_view.data(), first_view.data() + first_view.size());
  CHECK(cache.length(a) == 12);
  CHECK(cache.length(b) == 6);
  CHECK(cache.length(c) == 7);
  CHECK(cache.length(d) == 20);

  const auto expect_a = alone(model, prompt_a, std::vector<std::int32_t>{next_a}, 0);
  const auto expect_b = alone(model, prompt_b, std::vector<std::int32_t>{next_b}, 0);
  const auto expect_c = alone(model, chunk_c, {}, 0);
  const auto expect_d = alone(model, chunk_d, {}, 0);
  auto batched = [&](index_t r) { return row(first, std::size_t(r), vocab); };
  CHECK(close_to_alone<model_type>(batched(0), row(expect_a, 1, vocab)));
  CHECK(close_to_alone<model_type>(batched(1), row(expect_c, 0, vocab)));
  CHECK(close_to_alone<model_type>(batched(2), row(expect_b, 1, vocab)));
  CHECK(close_to_alone<model_type>(batched(3), row(expect_d, 0, vocab)));

  // Every sequence decodes once more, all four in one call of four rows.
  rows.clear();
  const std::int32_t step[4] = {4, 3, 2, 1};
  const infer::sequence_id order[4] = {d, c, b, a};
  for (int i = 0; i < 4; ++i) rows.add(step[i], cache.length(order[i]), order[i], true);
  const auto second_view = model.forward(cache, rows);
  const std::vector<float> second(second_view.data(), second_view.data() + second_view.size());
  const std::int32_t one_d[] = {4}, one_c[] = {3};
  const std::int32_t two_b[] = {next_b, 2}, two_a[] = {next_a, 1};
  CHECK(close_to_alone<model_type>(row(second, 0, vocab), row(alone(model, chunk_d, one_d, 0), 1, vocab)));
  CHECK(close_to_alone<model_type>(row(second, 1, vocab), row(alone(model, chunk_c, one_c, 0), 1, vocab)));
  CHECK(close_to_alone<model_type>(row(second, 2, vocab), row(alone(model, prompt_b, two_b, 0), 2, vocab)));
  CHECK(close_to_alone<model_type>(row(second, 3, vocab), row(alone(model, prompt_a, two_a, 0), 2, vocab)));
}

TEMPLATE_TEST_CASE("greedy generation of 16 sequences together equals each alone", "[infer][batch][generate]",
                   (setup<infer_gpt, quant::fp32, infer::kv::paged<8, float>>),
                   (setup<infer_llama, quant::q4_0, infer::kv::paged<8, bf16>>),
                   (setup<infer_llama, quant::q8_0, infer::kv::paged<16, std::int8_t>>)) {
  using Cfg = typename TestType::config;
  using model_type = typename TestType::model_type;
  nn::model<Cfg, cpu::par_t> trained(cpu::par.with_threads(2), 7);
  testing::randomise(trained, 41);
  constexpr int sequences = 16, steps = 12;
  model_type model(trained, 128, cpu::par.with_threads(2));

  std::vector<std::vector<std::int32_t>> prompts, expected;
  for (int s = 0; s < sequences; ++s) prompts.push_back(testing::random_tokens(std::size_t(2 + s % 7), Cfg::vocab, 100 + s));
  {
    auto cache = model.make_cache(512);
    for (int s = 0; s < sequences; ++s)
      expected.push_back(infer::generate(model, cache, prompts[std::size_t(s)], {.temperature = 0.0f},
                                         infer::stop_criteria(steps), [](std::int32_t) {})
                             .tokens);
  }

  // Together: one call prefills every prompt, then each call decodes one
  // token of every sequence.
  auto cache = model.make_cache(512);
  std::vector<infer::sequence_id> ids;
  infer::batch rows(128);
  for (int s = 0; s < sequences; ++s) {
    ids.push_back(cache.open_sequence());
    rows.add_tokens(ids.back(), 0, prompts[std::size_t(s)]);
  }
  std::vector<std::vector<std::int32_t>> together(sequences);
  for (int step = 0; step < steps; ++step) {
    const auto logits = model.forward(cache, rows);
    REQUIRE(logits.extent(0) == sequences);
    rows.clear();
    for (int s = 0; s < sequences; ++s) {
      const std::int32_t next = infer::greedy(std::span<const float>(&logits(s, 0), std::size_t(Cfg::vocab)));
      together[std::size_t(s)].push_back(next);
      rows.add(next, cache.length(ids[std::size_t(s)]), ids[std::size_t(s)], true);
    }
  }
  for (int s = 0; s < sequences; ++s) {
    INFO("sequence " << s);
    if constexpr (model_type::integer_gemm || std::is_same_v<typename TestType::format, quant::fp32>) {
      CHECK(together[std::size_t(s)] == expected[std::size_t(s)]);
    } else {
      // A row-major packed matrix (q8_0 where the build has no integer GEMM
      // for it) keeps fp32 activations in a call of 16 rows or more and
      // rounds them to int8 blocks for a lone decode row: the logits differ
      // by the activations' rounding (see close_to_alone), enough to flip a
      // near-tie after a few steps. The first steps agree.
      CHECK(std::equal(expected[std::size_t(s)].begin(), expected[std::size_t(s)].begin() + 3,
                       together[std::size_t(s)].begin()));
    }
  }
}

TEMPLATE_TEST_CASE("a forked sequence and its parent, extended apart, equal two independent runs",
                   "[infer][batch][fork]", (setup<infer_llama, quant::fp32, infer::kv::paged<4, float>>),
                   (setup<infer_gpt, quant::q4_0, infer::kv::contiguous<std::int8_t>>),
                   (setup<infer_llama, quant::q8_0, infer::kv::paged<8, bf16>>)) {
  using Cfg = typename TestType::config;
  using model_type = typename TestType::model_type;
  nn::model<Cfg, cpu::par_t> trained(cpu::par.with_threads(2), 7);
  testing::randomise(trained, 51);
  model_type model(trained, 16, cpu::par.with_threads(2));
  const auto prompt = testing::random_tokens(13, Cfg::vocab, 5);
  const auto branch_x = testing::random_tokens(6, Cfg::vocab, 6), branch_y = testing::random_tokens(6, Cfg::vocab, 7);

  auto cache = model.make_cache(infer::kv::is_paged<typename TestType::kv> ? 128 : 3);
  const auto parent = cache.open_sequence();
  model.prefill(cache, parent, prompt);
  const auto child = cache.fork(parent);
  CHECK(cache.length(child) == 13);
  for (index_t l = 0; l < Cfg::n_layer; ++l)
    for (index_t pos = 0; pos < 13; pos += 4) CHECK(cache.key(l, child, pos, 0, 1) == cache.key(l, parent, pos, 0, 1));
  std::vector<float> got_x, got_y;
  for (std::size_t i = 0; i < branch_x.size(); ++i) {
    // Both branches decode in one call: the parent's token first, then the child's.
    infer::batch rows;
    rows.add(branch_x[i], cache.length(parent), parent, true);
    rows.add(branch_y[i], cache.length(child), child, true);
    const auto logits = model.forward(cache, rows);
    got_x.insert(got_x.end(), &logits(0, 0), &logits(0, 0) + Cfg::vocab);
    got_y.insert(got_y.end(), &logits(1, 0), &logits(1, 0) + Cfg::vocab);
  }
  const auto run_x = alone(model, prompt, branch_x, 0), run_y = alone(model, prompt, branch_y, 0);
  for (std::size_t i = 0; i < branch_x.size(); ++i) {
    INFO("step " << i);
    CHECK(close_to_alone<model_type>(row(got_x, i, Cfg::vocab), row(run_x, i + 1, Cfg::vocab)));
    CHECK(close_to_alone<model_type>(row(got_y, i, Cfg::vocab), row(run_y, i + 1, Cfg::vocab)));
  }
  cache.close_sequence(parent);
  cache.close_sequence(child);
  CHECK(cache.bytes_in_use() == 0);
}

TEST_CASE("bad batches are clear errors naming the row, and leave the cache unchanged", "[infer][batch][errors]") {
  nn::model<infer_llama, cpu::par_t> trained(cpu::par, 7);
  testing::randomise(trained, 61);
  infer::inference_model<infer_llama, quant::fp32, infer::kv::paged<8>> model(trained, 8);
  auto cache = model.make_cache(64);  // 8 blocks of 8
  const auto a = cache.open_sequence(), b = cache.open_sequence();
  model.prefill(cache, a, testing::random_tokens(5, infer_llama::vocab, 1));
  model.prefill(cache, b, testing::random_tokens(9, infer_llama::vocab, 2));
  const float key_before = cache.key(1, b, 8, 1, 3);
  const index_t free_before = cache.free_block_count();
  auto unchanged = [&] {
    CHECK(cache.length(a) == 5);
    CHECK(cache.length(b) == 9);
    CHECK(cache.free_block_count() == free_before);
    CHECK(cache.key(1, b, 8, 1, 3) == key_before);
  };

  infer::batch rows;
  rows.add(1, 5, a, true);
  rows.add(2, 9, b);
  rows.add(3, 0, 77, true);  // no such sequence
  CHECK_THROWS_WITH(model.forward(cache, rows), Catch::Contains("row 2") && Catch::Contains("sequence 77 is not open"));
  unchanged();

  rows.clear();
  rows.add(1, 5, a);
  rows.add(2, 11, b, true);  // b's next position is 9
  CHECK_THROWS_WITH(model.forward(cache, rows), Catch::Contains("row 1") && Catch::Contains("position 11") &&
                                                    Catch::Contains("next position 9"));
  unchanged();

  rows.clear();
  rows.add(2, 9, b);
  rows.add(infer_llama::vocab, 10, b, true);
  CHECK_THROWS_WITH(model.forward(cache, rows), Catch::Contains("row 1") && Catch::Contains("token id 80"));
  unchanged();

  rows.clear();
  rows.add(2, 9, b);
  rows.add(1, 5, a);
  rows.add(2, 10, b, true);  // b's rows are split
  CHECK_THROWS_WITH(model.forward(cache, rows), Catch::Contains("row 2") && Catch::Contains("consecutive"));
  unchanged();

  rows.clear();
  rows.add_tokens(a, 5, testing::random_tokens(6, infer_llama::vocab, 3));
  rows.add_tokens(b, 9, testing::random_tokens(3, infer_llama::vocab, 4));  // 9 rows: the scratch holds 8
  CHECK_THROWS_WITH(model.forward(cache, rows), Catch::Contains("9 rows") && Catch::Contains("row 8"));
  unchanged();

  rows.clear();
  CHECK_THROWS_WITH(model.forward(cache, rows), Catch::Contains("empty"));
  unchanged();

  // The pool runs out for the second sequence of the batch: nothing is
  // reserved for the first either.
  const auto c = cache.open_sequence();
  rows.add_tokens(c, 0, testing::random_tokens(8, infer_llama::vocab, 5));
  model.forward(cache, rows);  // c holds 1 block; 8 - 2 - 1 - 1 = 4 blocks free
  rows.clear();
  const auto d = cache.open_sequence(), e = cache.open_sequence();
  rows.add_tokens(d, 0, testing::random_tokens(8, infer_llama::vocab, 6));
  model.forward(cache, rows);
  rows.clear();
  rows.add_tokens(e, 0, testing::random_tokens(8, infer_llama::vocab, 7));
  model.forward(cache, rows);  // 2 blocks free
  rows.clear();
  rows.add(1, 8, d);
  rows.add_tokens(e, 8, testing::random_tokens(6, infer_llama::vocab, 8));  // d: 1 block, e: 1 block
  rows.add(1, 8, c);                                                        // c: a third
  const index_t free_now = cache.free_block_count();
  REQUIRE(free_now == 2);
  CHECK_THROWS_AS(model.forward(cache, rows), infer::cache_exhausted);
  CHECK_THROWS_WITH(model.forward(cache, rows), Catch::Contains("sequence " + std::to_string(c)) &&
                                                    Catch::Contains("rows 7..7") && Catch::Contains("nothing was written"));
  CHECK(cache.free_block_count() == free_now);
  CHECK(cache.length(c) == 8);
  CHECK(cache.length(d) == 8);
  CHECK(cache.length(e) == 8);
  CHECK(cache.length(a) == 5);
  CHECK(cache.length(b) == 9);
  CHECK(cache.key(1, b, 8, 1, 3) == key_before);

  // Past the context: position 48 of a 48-position model.
  infer::inference_model<infer_llama> whole(trained, 8);
  auto full = whole.make_cache(1);
  const auto f = full.open_sequence();
  whole.prefill(full, f, std::vector<std::int32_t>(48, 2));
  rows.clear();
  rows.add(1, 48, f, true);
  CHECK_THROWS_WITH(whole.forward(full, rows), Catch::Contains("row 0") && Catch::Contains("max_seq = 48"));
  CHECK(full.length(f) == 48);
}
