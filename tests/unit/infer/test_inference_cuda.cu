// infer::inference_model on cuda::par against the same model on cpu::par,
// both built from one trained nn::model: the KV cache's write and copy
// kernels store the CPU's bits, the paged cached-attention kernel matches the
// CPU's (decode rows, prefill chunks, windows, GQA, strided queries), and a
// ragged batch, greedy generation, sliding-window layers, forks and bad
// batches behave as on the CPU, for fp32 and bf16 weights over fp32, bf16
// and int8 caches, paged and contiguous.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../../support/test_support.hpp"
#include "ctformer/infer/generate.hpp"
#include "inference_test_models.hpp"

using namespace ctformer;
using testing::infer_gpt;
using testing::infer_llama;
using device_t = ctformer::cuda::par_t;

namespace {

template <class Cfg, class Format, class Kv>
struct setup {
  using config = Cfg;
  using format = Format;
  using kv = Kv;
  using host_model = infer::inference_model<Cfg, Format, Kv, cpu::par_t>;
  using device_model = infer::inference_model<Cfg, Format, Kv, device_t>;
};

using setups = std::tuple<setup<infer_llama, quant::fp32, infer::kv::paged<8, float>>,
                          setup<infer_gpt, quant::fp32, infer::kv::contiguous<float>>,
                          setup<infer_llama, quant::fp32, infer::kv::paged<16, bf16>>,
                          setup<infer_gpt, quant::fp32, infer::kv::contiguous<bf16>>,
                          setup<infer_llama, quant::fp32, infer::kv::paged<8, std::int8_t>>,
                          setup<infer_gpt, quant::bf16_weights, infer::kv::paged<4, float>>,
                          setup<infer_llama, quant::bf16_weights, infer::kv::paged<8, bf16>>>;

// How far the CUDA model's logits may lie from the CPU model's, as a
// fraction of the row's largest logit (scaled_error), and for bf16 weights
// as an RMS fraction too.
// - fp32 weights, fp32 cache: the same fp32 arithmetic in other orders
//   (cuBLASLt tiles against the CPU's blocked GEMM and GEMV, a warp's online
//   softmax over tiles of 32 keys against the CPU's tiles of 64, the GPU's
//   expf), a few ulp per dot product over two layers, about 1e-6 of the
//   row's scale; 1e-4 leaves a wide margin and still catches a wrong index,
//   window or head mapping (errors of order 1).
// - bf16 or int8 cache: both sides round the same keys and values, but a
//   key or value that the two fp32 computations put on opposite sides of a
//   rounding boundary is stored one step apart (2^-8 relative for bf16,
//   1/127 of the row's largest for int8); a handful of such elements per
//   layer move a logit by well under 1% of the scale: 1e-2.
// - bf16 weights: the CUDA model rounds every linear layer's input to bf16
//   (mixed_precision_weight); the CPU widens the bf16 weights and keeps fp32
//   activations (or, with AVX512_BF16, rounds them in calls of 16 rows or
//   more). One 2^-9 relative rounding per linear input is what test_batch
//   measures as 1% RMS against unrounded activations: 2e-2 RMS, and a 1e-1
//   scaled bound on the largest difference.
template <class S>
double logit_bound() {
  if constexpr (std::is_same_v<typename S::format, quant::bf16_weights>) return 1e-1;
  else if constexpr (std::is_same_v<typename S::kv::element_type, float>) return 1e-4;
  else return 1e-2;
}

template <class S>
bool close_to_cpu(std::span<const float> device, std::span<const float> host) {
  const double scaled = testing::scaled_error(device, host), rms = testing::rms_error(device, host);
  UNSCOPED_INFO("scaled error " << scaled << ", RMS error " << rms);
  if (scaled > logit_bound<S>()) return false;
  return !std::is_same_v<typename S::format, quant::bf16_weights> || rms <= 2e-2;
}

std::vector<float> copy_of(tensor_view<const float, 2> logits) {
  return std::vector<float>(logits.data(), logits.data() + logits.size());
}

std::span<const float> row(const std::vector<float>& rows, std::size_t r, index_t vocab) {
  return {rows.data() + r * std::size_t(vocab), std::size_t(vocab)};
}

// Whether the two greedy choices agree, or the host's two best logits are
// within `tie` of each other: a near-tie that the logits' tolerance may flip.
bool same_greedy_choice(std::span<const float> device, std::span<const float> host, double tie) {
  const std::int32_t a = infer::greedy(device), b = infer::greedy(host);
  if (a == b) return true;
  float best = -1e30f, second = -1e30f;
  for (float x : host) {
    if (x > best) {
      second = best;
      best = x;
    } else if (x > second) {
      second = x;
    }
  }
  UNSCOPED_INFO("greedy choices " << a << " (device) and " << b << " (host), host margin " << best - second);
  return double(best - second) <= tie;
}

double largest_magnitude(std::span<const float> x) {
  double m = 0;
  for (float v : x) m = std::max(m, double(std::fabs(v)));
  return m;
}

template <class Kv>
index_t capacity_for(index_t sequences) {
  return infer::kv::is_paged<Kv> ? 256 : sequences;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("a ragged batch on cuda::par gives the CPU model's logits", "[infer][cuda][batch]", setups) {
  using Cfg = typename TestType::config;
  constexpr index_t vocab = Cfg::vocab;
  nn::model<Cfg, cpu::par_t> trained(cpu::par.with_threads(2), 7);
  testing::randomise(trained, 31);
  typename TestType::host_model host(trained, 32, cpu::par.with_threads(2));
  typename TestType::device_model device(trained, 32, ctformer::cuda::par);
  CHECK(device.weight_bytes() == host.weight_bytes());

  // a and b decode one token each (after prefills of 11 and 5); c and d start
  // with prefill chunks of 7 and 20 tokens; all four in one call.
  const auto prompt_a = testing::random_tokens(11, vocab, 1), prompt_b = testing::random_tokens(5, vocab, 2);
  const auto chunk_c = testing::random_tokens(7, vocab, 3), chunk_d = testing::random_tokens(20, vocab, 4);
  auto run = [&](auto& model) {
    auto cache = model.make_cache(capacity_for<typename TestType::kv>(4));
    const auto a = cache.open_sequence(), b = cache.open_sequence();
    std::vector<float> out;
    auto l = model.prefill(cache, a, prompt_a);
    out.insert(out.end(), l.begin(), l.end());
    l = model.prefill(cache, b, prompt_b, 3);  // in chunks of 3
    out.insert(out.end(), l.begin(), l.end());
    const auto c = cache.open_sequence(), d = cache.open_sequence();
    infer::batch rows;
    rows.add(5, 11, a, true);
    rows.add_tokens(c, 0, chunk_c);
    rows.add(9, 5, b, true);
    rows.add_tokens(d, 0, chunk_d);
    const auto first = copy_of(model.forward(cache, rows));
    REQUIRE(first.size() == std::size_t(4 * vocab));
    out.insert(out.end(), first.begin(), first.end());
    CHECK(cache.length(a) == 12);
    CHECK(cache.length(d) == 20);
    // Every sequence decodes once more, all four in one call.
    rows.clear();
    const infer::sequence_id order[4] = {d, c, b, a};
    for (int i = 0; i < 4; ++i) rows.add(std::int32_t(4 - i), cache.length(order[i]), order[i], true);
    const auto second = copy_of(model.forward(cache, rows));
    out.insert(out.end(), second.begin(), second.end());
    return out;
  };
  const std::vector<float> expected = run(host), got = run(device);
  REQUIRE(got.size() == expected.size());
  for (std::size_t r = 0; r * std::size_t(vocab) < expected.size(); ++r) {
    INFO("logit row " << r);
    CHECK(close_to_cpu<TestType>(row(got, r, vocab), row(expected, r, vocab)));
  }
}

TEMPLATE_LIST_TEST_CASE("greedy generation of several sequences together on cuda::par picks the CPU's tokens",
                        "[infer][cuda][generate]", setups) {
  using Cfg = typename TestType::config;
  constexpr index_t vocab = Cfg::vocab;
  constexpr int sequences = 8, steps = 10;
  nn::model<Cfg, cpu::par_t> trained(cpu::par.with_threads(2), 7);
  testing::randomise(trained, 41);
  typename TestType::host_model host(trained, 64, cpu::par.with_threads(2));
  typename TestType::device_model device(trained, 64, ctformer::cuda::par);
  auto host_cache = host.make_cache(capacity_for<typename TestType::kv>(sequences));
  auto device_cache = device.make_cache(capacity_for<typename TestType::kv>(sequences));

  // Both models take the CPU's token at every step, so they stay in the same
  // state; at every step each sequence's greedy choice on the device must be
  // the CPU's, unless the CPU's two best logits are a near-tie within twice
  // the logits' tolerance. Agreeing everywhere means the two greedy
  // generations are the same tokens.
  std::vector<infer::sequence_id> host_ids, device_ids;
  infer::batch host_rows(64), device_rows(64);
  for (int s = 0; s < sequences; ++s) {
    const auto prompt = testing::random_tokens(std::size_t(2 + s % 5), vocab, 100 + s);
    host_ids.push_back(host_cache.open_sequence());
    device_ids.push_back(device_cache.open_sequence());
    host_rows.add_tokens(host_ids.back(), 0, prompt);
    device_rows.add_tokens(device_ids.back(), 0, prompt);
  }
  int near_ties = 0;
  for (int step = 0; step < steps; ++step) {
    const auto expected = copy_of(host.forward(host_cache, host_rows));
    const auto got = copy_of(device.forward(device_cache, device_rows));
    REQUIRE(expected.size() == std::size_t(sequences * vocab));
    REQUIRE(got.size() == expected.size());
    host_rows.clear();
    device_rows.clear();
    for (int s = 0; s < sequences; ++s) {
      INFO("step " << step << ", sequence " << s);
      const auto e = row(expected, std::size_t(s), vocab), g = row(got, std::size_t(s), vocab);
      const double tie = 2 * logit_bound<TestType>() * largest_magnitude(e);
      CHECK(same_greedy_choice(g, e, tie));
      if (infer::greedy(g) != infer::greedy(e)) ++near_ties;
      const std::int32_t next = infer::greedy(e);
      host_rows.add(next, host_cache.length(host_ids[std::size_t(s)]), host_ids[std::size_t(s)], true);
      device_rows.add(next, device_cache.length(device_ids[std::size_t(s)]), device_ids[std::size_t(s)], true);
    }
  }
  // With fp32 weights the logits differ by far less than the gaps random
  // weights leave between the best two: a near-tie is rare. (bf16 weights
  // move the logits by about 1% and may flip a few close choices; each is
  // held to the margin check above.)
  if constexpr (std::is_same_v<typename TestType::format, quant::fp32>) CHECK(near_ties <= 1);

  // generate() itself runs on the device model (its logits come back to the
  // host); with fp32 throughout it gives the CPU's tokens.
  if constexpr (std::is_same_v<typename TestType::format, quant::fp32> &&
                std::is_same_v<typename TestType::kv::element_type, float>) {
    const auto prompt = testing::random_tokens(6, vocab, 77);
    auto host_gen = host.make_cache(capacity_for<typename TestType::kv>(1));
    auto device_gen = device.make_cache(capacity_for<typename TestType::kv>(1));
    const auto expected = infer::generate(host, host_gen, prompt, {.temperature = 0.0f}, infer::stop_criteria(12),
                                          [](std::int32_t) {});
    const auto got = infer::generate(device, device_gen, prompt, {.temperature = 0.0f}, infer::stop_criteria(12),
                                     [](std::int32_t) {});
    CHECK(got.tokens == expected.tokens);
    CHECK(device_gen.open_sequences() == 0);
  }
}

namespace {

constexpr int window = 8;

/// test_sliding_window's LLaMA-style stack: windowed, global, windowed.
struct swa_llama {
  static constexpr int vocab = 80, d_model = 64, n_layer = 3, n_head = 4, n_kv_head = 2, d_ff = 96, max_seq = 48;
  static constexpr bool tie_embeddings = false;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  using attention_pattern = nn::layer_pattern<nn::sliding_window<window>, nn::global_attention>;
};

}  // namespace

TEST_CASE("sliding-window layers on cuda::par: the CPU's logits, rings bounded by the window", "[infer][cuda][window]") {
  nn::model<swa_llama, cpu::par_t> trained(cpu::par.with_threads(2), 7);
  testing::randomise(trained, 71);
  const auto tokens = testing::random_tokens(44, swa_llama::vocab, 9);
  constexpr double bound = 1e-4;  // fp32 throughout: as for global attention (see logit_bound)

  // Blocks of 4: a ring of exactly 8 positions, so prefill chunks are written
  // and attended one row at a time in the windowed layers.
  using host_model = infer::inference_model<swa_llama, quant::fp32, infer::kv::paged<4>, cpu::par_t>;
  using device_model = infer::inference_model<swa_llama, quant::fp32, infer::kv::paged<4>, device_t>;
  host_model host(trained, 16, cpu::par.with_threads(2));
  device_model device(trained, 16, ctformer::cuda::par);
  auto host_cache = host.make_cache(64, 2);
  auto device_cache = device.make_cache(64, 2);
  REQUIRE(device_cache.ring_positions() == window);
  const auto hs = host_cache.open_sequence();
  const auto ds = device_cache.open_sequence();
  const auto prompt = std::span<const std::int32_t>(tokens).first(12);
  const auto e0 = host.prefill(host_cache, hs, prompt, 5);
  const std::vector<float> expected0(e0.begin(), e0.end());
  const auto g0 = device.prefill(device_cache, ds, prompt, 5);
  CHECK(testing::scaled_error(std::vector<float>(g0.begin(), g0.end()), expected0) < bound);
  for (std::size_t i = 12; i < tokens.size(); ++i) {  // 32 decode steps: 4 x the window
    INFO("position " << i);
    const auto e = host.decode(host_cache, hs, tokens[i]);
    const std::vector<float> expected(e.begin(), e.end());
    const auto g = device.decode(device_cache, ds, tokens[i]);
    CHECK(testing::scaled_error(std::vector<float>(g.begin(), g.end()), expected) < bound);
    for (index_t layer = 0; layer < swa_llama::n_layer; ++layer)
      CHECK(device_cache.positions_held(layer, ds) == host_cache.positions_held(layer, hs));
    CHECK(device_cache.ring_blocks_held(ds) <= window / 4);
  }

  // A ragged batch with windowed layers: a decode row of the long sequence
  // beside a prefill chunk of a new one; and a contiguous cache (rings of 64
  // positions, a chunk attended in steps of 57 rows) with the whole prompt at once.
  const auto other = testing::random_tokens(11, swa_llama::vocab, 4);
  auto batch_of = [&](auto& model, auto& cache, infer::sequence_id seq) {
    const auto fresh = cache.open_sequence();
    infer::batch rows;
    rows.add(3, 44, seq, true);
    rows.add_tokens(fresh, 0, other);
    return copy_of(model.forward(cache, rows));
  };
  const auto expected_batch = batch_of(host, host_cache, hs), got_batch = batch_of(device, device_cache, ds);
  for (std::size_t r = 0; r < 2; ++r)
    CHECK(testing::scaled_error(row(got_batch, r, swa_llama::vocab), row(expected_batch, r, swa_llama::vocab)) < bound);

  using host_slots = infer::inference_model<swa_llama, quant::fp32, infer::kv::contiguous<bf16>, cpu::par_t>;
  using device_slots = infer::inference_model<swa_llama, quant::fp32, infer::kv::contiguous<bf16>, device_t>;
  host_slots host_whole(trained, 48);
  device_slots device_whole(trained, 48, ctformer::cuda::par);
  auto hc = host_whole.make_cache(1);
  auto dc = device_whole.make_cache(1);
  const auto e1 = host_whole.prefill(hc, hc.open_sequence(), tokens);
  const std::vector<float> expected1(e1.begin(), e1.end());
  const auto g1 = device_whole.prefill(dc, dc.open_sequence(), tokens);
  CHECK(testing::scaled_error(std::vector<float>(g1.begin(), g1.end()), expected1) < 1e-2);  // a bf16 cache: see logit_bound

  device_cache.close_sequence(ds);
  CHECK(device_cache.free_ring_block_count() == 2);  // the other sequence of the batch holds its ring
}

TEMPLATE_LIST_TEST_CASE("a fork on cuda::par copies the parent's cache, and both branches match the CPU's",
                        "[infer][cuda][fork]", setups) {
  using Cfg = typename TestType::config;
  constexpr index_t vocab = Cfg::vocab;
  nn::model<Cfg, cpu::par_t> trained(cpu::par.with_threads(2), 7);
  testing::randomise(trained, 51);
  typename TestType::host_model host(trained, 16, cpu::par.with_threads(2));
  typename TestType::device_model device(trained, 16, ctformer::cuda::par);
  const auto prompt = testing::random_tokens(13, vocab, 5);
  const auto branch_x = testing::random_tokens(5, vocab, 6), branch_y = testing::random_tokens(5, vocab, 7);

  auto run = [&](auto& model, bool check_copy) {
    auto cache = model.make_cache(capacity_for<typename TestType::kv>(3));
    const auto parent = cache.open_sequence();
    model.prefill(cache, parent, prompt);
    const auto child = cache.fork(parent);
    CHECK(cache.length(child) == 13);
    if (check_copy)  // the fork's copy is bit for bit (read back from the device)
      for (index_t l = 0; l < Cfg::n_layer; ++l)
        for (index_t pos = 0; pos < 13; ++pos)
          for (index_t g = 0; g < Cfg::n_kv_head; ++g)
            for (index_t d = 0; d < nn::config_traits<Cfg>::head_dim; d += 5) {
              CHECK(cache.key(l, child, pos, g, d) == cache.key(l, parent, pos, g, d));
              CHECK(cache.value(l, child, pos, g, d) == cache.value(l, parent, pos, g, d));
            }
    std::vector<float> out;
    for (std::size_t i = 0; i < branch_x.size(); ++i) {
      infer::batch rows;
      rows.add(branch_x[i], cache.length(parent), parent, true);
      rows.add(branch_y[i], cache.length(child), child, true);
      const auto logits = copy_of(model.forward(cache, rows));
      out.insert(out.end(), logits.begin(), logits.end());
    }
    cache.close_sequence(parent);
    cache.close_sequence(child);
    CHECK(cache.bytes_in_use() == 0);
    return out;
  };
  const auto expected = run(host, false), got = run(device, true);
  REQUIRE(got.size() == expected.size());
  for (std::size_t r = 0; r * std::size_t(vocab) < expected.size(); ++r) {
    INFO("logit row " << r);
    CHECK(close_to_cpu<TestType>(row(got, r, vocab), row(expected, r, vocab)));
  }
}

TEST_CASE("bad batches on cuda::par are the CPU's errors, and leave the cache unchanged", "[infer][cuda][errors]") {
  nn::model<infer_llama, cpu::par_t> trained(cpu::par, 7);
  testing::randomise(trained, 61);
  infer::inference_model<infer_llama, quant::fp32, infer::kv::paged<8>, cpu::par_t> host(trained, 8);
  infer::inference_model<infer_llama, quant::fp32, infer::kv::paged<8>, device_t> device(trained, 8, ctformer::cuda::par);
  auto host_cache = host.make_cache(64);  // 8 blocks of 8
  auto device_cache = device.make_cache(64);
  const auto prompt_a = testing::random_tokens(5, infer_llama::vocab, 1);
  const auto prompt_b = testing::random_tokens(9, infer_llama::vocab, 2);
  const auto a = device_cache.open_sequence(), b = device_cache.open_sequence();
  REQUIRE(host_cache.open_sequence() == a);
  REQUIRE(host_cache.open_sequence() == b);
  host.prefill(host_cache, a, prompt_a);
  host.prefill(host_cache, b, prompt_b);
  device.prefill(device_cache, a, prompt_a);
  device.prefill(device_cache, b, prompt_b);
  const float key_before = device_cache.key(1, b, 8, 1, 3);
  CHECK(std::fabs(key_before - host_cache.key(1, b, 8, 1, 3)) <= 1e-4f * (1.0f + std::fabs(key_before)));
  const index_t free_before = device_cache.free_block_count();

  // Each batch throws on both models with the same message, and the device cache is as it was.
  auto same_error = [&](const infer::batch& rows, const char* expected_text) {
    std::string host_error, device_error;
    try {
      host.forward(host_cache, rows);
    } catch (const error& e) {
      host_error = e.what();
    }
    try {
      device.forward(device_cache, rows);
    } catch (const error& e) {
      device_error = e.what();
    }
    INFO("host: " << host_error << "\ndevice: " << device_error);
    CHECK(!device_error.empty());
    CHECK(device_error == host_error);
    CHECK(device_error.find(expected_text) != std::string::npos);
    CHECK(device_cache.length(a) == 5);
    CHECK(device_cache.length(b) == 9);
    CHECK(device_cache.free_block_count() == free_before);
    CHECK(device_cache.key(1, b, 8, 1, 3) == key_before);
  };
  infer::batch rows;
  rows.add(1, 5, a, true);
  rows.add(2, 9, b);
  rows.add(3, 0, 77, true);
  same_error(rows, "sequence 77 is not open");
  rows.clear();
  rows.add(1, 5, a);
  rows.add(2, 11, b, true);
  same_error(rows, "next position 9");
  rows.clear();
  rows.add(2, 9, b);
  rows.add(infer_llama::vocab, 10, b, true);
  same_error(rows, "token id 80");
  rows.clear();
  rows.add(2, 9, b);
  rows.add(1, 5, a);
  rows.add(2, 10, b, true);
  same_error(rows, "consecutive");
  rows.clear();
  rows.add_tokens(a, 5, testing::random_tokens(6, infer_llama::vocab, 3));
  rows.add_tokens(b, 9, testing::random_tokens(3, infer_llama::vocab, 4));
  same_error(rows, "9 rows");
  rows.clear();
  same_error(rows, "empty");

  // The pool runs out for the second sequence of a batch: nothing is reserved for the first either.
  {
    auto big = device.make_cache(16);  // 2 blocks of 8
    auto big_host = host.make_cache(16);
    const auto x = big.open_sequence();
    REQUIRE(big_host.open_sequence() == x);
    infer::batch long_rows;
    long_rows.add_tokens(x, 0, testing::random_tokens(8, infer_llama::vocab, 7));
    device.forward(big, long_rows);
    host.forward(big_host, long_rows);
    long_rows.clear();
    const auto y = big.open_sequence();
    REQUIRE(big_host.open_sequence() == y);
    long_rows.add(1, 8, x);                                                        // x: a second block
    long_rows.add_tokens(y, 0, testing::random_tokens(7, infer_llama::vocab, 8));  // y: a third
    std::string host_error, device_error;
    try {
      host.forward(big_host, long_rows);
    } catch (const infer::cache_exhausted& e) {
      host_error = e.what();
    }
    try {
      device.forward(big, long_rows);
    } catch (const infer::cache_exhausted& e) {
      device_error = e.what();
    }
    CHECK(!device_error.empty());
    CHECK(device_error == host_error);
    CHECK(big.length(x) == 8);
    CHECK(big.length(y) == 0);
    CHECK(big.free_block_count() == 1);
  }

  // A cache on another stream than the model's is refused before anything runs.
  cudaStream_t stream = nullptr;
  CTFORMER_CUDA_CHECK(cudaStreamCreate(&stream));
  {
    infer::kv_cache<infer::kv::paged<8>, device_t> elsewhere(infer_llama::n_layer, infer_llama::n_kv_head,
                                                              nn::config_traits<infer_llama>::head_dim,
                                                              infer_llama::max_seq, 64, {}, 0,
                                                              ctformer::cuda::par.on(stream));
    const auto s = elsewhere.open_sequence();
    CHECK_THROWS_WITH(device.decode(elsewhere, s, 1), Catch::Contains("another stream"));
    CHECK(elsewhere.length(s) == 0);
    ctformer::cuda::par.on(stream).synchronize();
  }
  CTFORMER_CUDA_CHECK(cudaStreamDestroy(stream));
}

namespace {

constexpr index_t t_layers = 2, t_kv_heads = 2, t_heads = 6, t_head_dim = 48, t_max_seq = 64;

// Fills one sequence of both caches with the same rows (uploaded for the
// device) in chunks the ring allows, and commits its length.
template <class HostCache, class DeviceCache>
void fill_both(HostCache& host, DeviceCache& device, infer::sequence_id seq, index_t n, std::uint32_t seed) {
  const auto k = testing::random_floats(std::size_t(n * t_kv_heads * t_head_dim), seed, -2.0f, 2.0f);
  const auto v = testing::random_floats(std::size_t(n * t_kv_heads * t_head_dim), seed + 1, -2.0f, 2.0f);
  const auto dk = testing::upload(ctformer::cuda::par, k), dv = testing::upload(ctformer::cuda::par, v);
  host.reserve(seq, n);
  device.reserve(seq, n);
  const index_t step = host.window() > 0 ? host.ring_positions() : n;
  for (index_t layer = 0; layer < t_layers; ++layer)
    for (index_t s = 0; s < n; s += step) {
      const index_t m = std::min(step, n - s);
      const index_t at = s * t_kv_heads * t_head_dim;
      host.write(layer, seq, s, tensor_view<const float, 3>(k.data() + at, {m, t_kv_heads, t_head_dim}),
                 tensor_view<const float, 3>(v.data() + at, {m, t_kv_heads, t_head_dim}));
      device.write(layer, seq, s, tensor_view<const float, 3>(dk.data() + at, {m, t_kv_heads, t_head_dim}),
                   tensor_view<const float, 3>(dv.data() + at, {m, t_kv_heads, t_head_dim}));
    }
  host.set_length(seq, n);
  device.set_length(seq, n);
  ctformer::cuda::par.synchronize();  // dk and dv are freed on return
}

}  // namespace

TEMPLATE_TEST_CASE("the CUDA KV write stores the CPU's bits, and the CUDA cached attention matches the CPU's",
                   "[infer][cuda][kv_cache][attention]", float, bf16, std::int8_t) {
  using E = TestType;
  // Layer 0 global, layer 1 a window of 12 (rings of 16 positions in blocks of 8).
  const std::vector<index_t> windows = {0, 12};
  infer::kv_cache<infer::kv::paged<8, E>, cpu::par_t> host(t_layers, t_kv_heads, t_head_dim, t_max_seq, 256, windows, 4);
  infer::kv_cache<infer::kv::paged<8, E>, device_t> device(t_layers, t_kv_heads, t_head_dim, t_max_seq, 256, windows, 4,
                                                          ctformer::cuda::par);
  // Three sequences of 37, 3 and 20 positions; blocks interleave in the pool.
  infer::sequence_id ids[3];
  const index_t lengths[3] = {37, 3, 20};
  for (auto& id : ids) {
    id = host.open_sequence();
    REQUIRE(device.open_sequence() == id);
  }
  for (int s = 0; s < 3; ++s) fill_both(host, device, ids[s], lengths[s], 10 + 2 * std::uint32_t(s));
  for (int s = 0; s < 3; ++s)
    for (index_t layer = 0; layer < t_layers; ++layer) {
      const index_t first = layer == 1 ? std::max<index_t>(0, lengths[s] - host.ring_positions()) : 0;
      for (index_t pos = first; pos < lengths[s]; ++pos)
        for (index_t g = 0; g < t_kv_heads; ++g)
          for (index_t d = 0; d < t_head_dim; d += 7) {
            // The same bits: the kernel repeats the CPU's arithmetic (int8: scale and rounding).
            CHECK(device.key(layer, ids[s], pos, g, d) == host.key(layer, ids[s], pos, g, d));
            CHECK(device.value(layer, ids[s], pos, g, d) == host.value(layer, ids[s], pos, g, d));
          }
    }

  // Queries as a view into wider rows (strided heads, as the model's qkv
  // rows give them): sequence 0 decodes its last position, sequence 1 runs
  // its 3 positions as a chunk, sequence 2 its last 5 (whose windows the
  // ring of 16 still holds).
  const index_t rows = 1 + 3 + 5, row_width = t_heads * t_head_dim + 40;
  const auto q_host = testing::random_floats(std::size_t(rows * row_width), 99);
  const auto q_device = testing::upload(ctformer::cuda::par, q_host);
  const tensor_view<const float, 3> qh(q_host.data(), {rows, t_heads, t_head_dim}, {row_width, t_head_dim, 1});
  const tensor_view<const float, 3> qd(q_device.data(), {rows, t_heads, t_head_dim}, {row_width, t_head_dim, 1});
  std::vector<float> out_host(std::size_t(rows * t_heads * t_head_dim));
  buffer_for<float, device_t> out_device(out_host.size());
  const tensor_view<float, 3> oh(out_host.data(), {rows, t_heads, t_head_dim});
  const tensor_view<float, 3> od(out_device.data(), {rows, t_heads, t_head_dim});
  const float scale = 1.0f / std::sqrt(float(t_head_dim));
  for (index_t layer = 0; layer < t_layers; ++layer) {
    INFO("layer " << layer);
    const index_t w = host.window_of(layer);
    const attention_segment<const E> hs[3] = {{host.view(layer, ids[0]), 0, 1, 36, w},
                                              {host.view(layer, ids[1]), 1, 3, 0, w},
                                              {host.view(layer, ids[2]), 4, 5, 15, w}};
    const attention_segment<const E> ds[3] = {{device.view(layer, ids[0]), 0, 1, 36, w},
                                              {device.view(layer, ids[1]), 1, 3, 0, w},
                                              {device.view(layer, ids[2]), 4, 5, 15, w}};
    ops::cached_attention(cpu::par.with_threads(2), qh, std::span<const attention_segment<const E>>(hs), oh, scale);
    ops::cached_attention(ctformer::cuda::par, qd, std::span<const attention_segment<const E>>(ds), od, scale);
    const std::vector<float> got = testing::download(ctformer::cuda::par, out_device);
    // The same stored keys and values (checked above) and fp32 queries on
    // both sides (head_dim 48: the CPU rounds no query): only the order of
    // the sums differs, a few ulp of outputs that are averages of values in
    // [-2, 2] (int8: dequantized).
    double worst = 0;
    for (std::size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(double(got[i]) - out_host[i]));
    CHECK(worst < 1e-5);
  }
}
