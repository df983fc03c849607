// infer::sampler and infer::stop_criteria: each filter keeps what it should,
// temperature 0 is greedy, the repetition penalty, seeding, and the empirical
// distribution against the softmax (chi-square).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>
#include <vector>

#include "ctformer/infer/sampler.hpp"
#include "../../support/test_support.hpp"

using namespace ctformer;
using infer::sampler;
using infer::sampling_settings;

namespace {
std::vector<double> softmax(const std::vector<float>& logits, double temperature = 1.0) {
  const double m = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(logits.size());
  double z = 0;
  for (std::size_t i = 0; i < p.size(); ++i) z += p[i] = std::exp((logits[i] - m) / temperature);
  for (double& v : p) v /= z;
  return p;
}
std::vector<float> random_logits(std::size_t vocab, std::uint32_t seed, float scale = 3.0f) {
  return testing::random_floats(vocab, seed, -scale, scale);
}
// Tokens sorted by logit, descending.
std::vector<int> ranking(const std::vector<float>& logits) {
  std::vector<int> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[std::size_t(a)] > logits[std::size_t(b)]; });
  return order;
}
// Pearson chi-square of observed counts against expected probabilities.
double chi_square(const std::vector<long>& counts, const std::vector<double>& p, long draws) {
  double chi = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    const double e = p[i] * double(draws);
    chi += (double(counts[i]) - e) * (double(counts[i]) - e) / e;
  }
  return chi;
}
}  // namespace

TEST_CASE("temperature 0 is greedy, ties go to the smallest id", "[infer][sampler]") {
  sampler s({.temperature = 0.0f});
  const std::vector<float> logits = {0.1f, 3.0f, -2.0f, 3.0f, 1.0f};
  CHECK(s.sample(logits) == 1);
  CHECK(infer::greedy(logits) == 1);
  for (std::uint32_t seed = 0; seed < 20; ++seed) {
    const auto l = random_logits(1000, seed);
    CHECK(s.sample(l) == infer::greedy(l));
  }
}

TEST_CASE("temperature towards 0 converges to greedy", "[infer][sampler]") {
  for (std::uint32_t seed = 0; seed < 10; ++seed) {
    auto l = random_logits(500, seed);
    const int best = infer::greedy(l);
    for (float& v : l)
      if (&v != &l[std::size_t(best)]) v = std::min(v, l[std::size_t(best)] - 0.05f);  // a margin of 0.05
    sampler s({.temperature = 1e-3f, .seed = seed});  // others weigh <= e^-50
    for (int i = 0; i < 50; ++i) REQUIRE(s.sample(l) == best);
  }
}

TEST_CASE("extreme temperatures: logit / T overflowing float, 1 / T overflowing, T huge", "[infer][sampler]") {
  const auto l = random_logits(1000, 5, 6.0f);
  const int best = infer::greedy(l);
  // 6 / 1e-38 overflows float: the row is shifted to its maximum first, so
  // the best token keeps probability 1 and no NaN appears.
  sampler tiny({.temperature = 1e-38f, .seed = 1});
  for (int i = 0; i < 20; ++i) REQUIRE(tiny.sample(l) == best);
  for (auto c : tiny.last_candidates()) REQUIRE(c.probability == (c.token == best ? 1.0f : 0.0f));
  // 1 / 1e-45 (a subnormal) is +inf: the greedy limit.
  sampler subnormal({.temperature = 1e-45f});
  CHECK(subnormal.sample(l) == best);
  // A huge temperature flattens the row: every token is a candidate with
  // probability 1 / 1000 (to float rounding of exp(x / 1e30) = 1).
  sampler flat({.temperature = 1e30f, .seed = 2});
  flat.sample(l);
  REQUIRE(flat.last_candidates().size() == l.size());
  for (auto c : flat.last_candidates()) REQUIRE(c.probability == Approx(1e-3).epsilon(1e-5));
}

TEST_CASE("top-k never returns a token outside the k largest", "[infer][sampler]") {
  const auto l = random_logits(1000, 1);
  const auto order = ranking(l);
  for (int k : {1, 5, 40}) {
    const std::set<int> allowed(order.begin(), order.begin() + k);
    sampler s({.temperature = 1.5f, .top_k = k, .seed = 7});
    for (int i = 0; i < 3000; ++i) REQUIRE(allowed.count(s.sample(l)) == 1);
    CHECK(s.last_candidates().size() == std::size_t(k));
  }
}

TEST_CASE("top-p keeps exactly the smallest set whose probability reaches p", "[infer][sampler]") {
  // 32000 tokens: a LLaMA vocabulary, where the sampler first drops tokens
  // too unlikely to matter and then narrows the nucleus down by halving.
  for (std::size_t vocab : {std::size_t(2000), std::size_t(32000)})
  for (float p : {0.1f, 0.5f, 0.9f, 0.99f}) {
    CAPTURE(vocab);
    const auto l = random_logits(vocab, 2, 6.0f);
    const auto probs = softmax(l);
    const auto order = ranking(l);
    std::set<int> nucleus;
    double mass = 0;
    for (int t : order) {
      nucleus.insert(t);
      mass += probs[std::size_t(t)];
      if (mass >= p) break;
    }
    sampler s({.top_p = p, .seed = 3});
    for (int i = 0; i < 2000; ++i) REQUIRE(nucleus.count(s.sample(l)) == 1);
    std::set<int> kept;
    for (auto c : s.last_candidates()) kept.insert(c.token);
    INFO("top_p " << p << ": nucleus of " << nucleus.size());
    CHECK(kept == nucleus);
  }
}

TEST_CASE("min-p drops tokens below min_p times the top probability", "[infer][sampler]") {
  const auto l = random_logits(300, 3);
  const auto probs = softmax(l);
  const double top = *std::max_element(probs.begin(), probs.end());
  sampler s({.min_p = 0.2f, .seed = 4});
  std::set<int> allowed;
  for (std::size_t t = 0; t < probs.size(); ++t)
    if (probs[t] >= 0.2 * top * (1 - 1e-6)) allowed.insert(int(t));
  for (int i = 0; i < 3000; ++i) REQUIRE(allowed.count(s.sample(l)) == 1);
  CHECK(s.last_candidates().size() == allowed.size());
}

TEST_CASE("the repetition penalty lowers every token seen, once per distinct token", "[infer][sampler]") {
  const std::vector<float> logits = {2.0f, 1.5f, -1.0f, 0.5f};
  const std::vector<std::int32_t> history = {0, 2, 0, 0};
  sampler greedy({.temperature = 0.0f, .repetition_penalty = 2.0f});
  CHECK(greedy.sample(logits) == 0);
  CHECK(greedy.sample(logits, history) == 1);  // 2.0 / 2 = 1.0 < 1.5

  sampler s({.repetition_penalty = 2.0f});
  s.sample(logits, history);
  // Penalised logits: {1.0, 1.5, -2.0, 0.5} (not 2.0 / 8 for the thrice-seen 0).
  const auto expected = softmax({1.0f, 1.5f, -2.0f, 0.5f});
  std::vector<double> got(4, 0.0);
  for (auto c : s.last_candidates()) got[std::size_t(c.token)] = c.probability;
  for (int t = 0; t < 4; ++t) CHECK(got[std::size_t(t)] == Approx(expected[std::size_t(t)]).epsilon(1e-5));

  sampler windowed({.temperature = 0.0f, .repetition_penalty = 2.0f, .repetition_window = 2});
  CHECK(windowed.sample(logits, std::vector<std::int32_t>{0, 2, 3}) == 0);  // 0 is outside the last 2
  CHECK_THROWS_AS(s.sample(logits, std::vector<std::int32_t>{1, 4}), invalid_input);
  CHECK(greedy.sample(logits) == 0);  // marks were cleared after the error
}

TEST_CASE("presence and frequency penalties subtract from generated tokens only, as the OpenAI API does",
          "[infer][sampler]") {
  const std::vector<float> logits = {2.0f, 1.5f, -1.0f, 0.5f};
  // History: prompt {1, 1} then generated {0, 0, 3}.
  const std::vector<std::int32_t> history = {1, 1, 0, 0, 3};
  sampler s({.presence_penalty = 0.5f, .frequency_penalty = 0.25f});
  s.sample(logits, history, 2);
  // 0: 2.0 - 0.5 - 2 * 0.25 = 1.0; 3: 0.5 - 0.5 - 0.25 = -0.25; the prompt's 1 untouched.
  const auto expected = softmax({1.0f, 1.5f, -1.0f, -0.25f});
  std::vector<double> got(4, 0.0);
  for (auto c : s.last_candidates()) got[std::size_t(c.token)] = c.probability;
  // float softmax against a double reference over 4 entries: a few ulp.
  for (int t = 0; t < 4; ++t) CHECK(got[std::size_t(t)] == Approx(expected[std::size_t(t)]).epsilon(1e-5));

  sampler greedy({.temperature = 0.0f, .frequency_penalty = 2.0f});
  CHECK(greedy.sample(logits, history, 2) == 1);   // 0 drops to -2.0
  CHECK(greedy.sample(logits, history, 5) == 0);   // nothing generated yet: no penalty
  sampler negative({.temperature = 0.0f, .presence_penalty = -2.0f});
  CHECK(negative.sample(logits, std::vector<std::int32_t>{3}, 0) == 3);  // 0.5 + 2 beats 2.0
  CHECK_THROWS_AS(greedy.sample(logits, std::vector<std::int32_t>{7}, 0), invalid_input);
  CHECK(greedy.sample(logits, history, 5) == 0);  // counts were cleared after the error
  CHECK_THROWS_AS(sampler({.presence_penalty = 2.5f}), invalid_input);
  CHECK_THROWS_AS(sampler({.frequency_penalty = -3.0f}), invalid_input);
}

TEST_CASE("the same seed gives the same tokens; reseed restarts the stream", "[infer][sampler]") {
  const sampling_settings settings{.temperature = 0.9f, .top_k = 50, .top_p = 0.95f, .min_p = 0.01f,
                                   .repetition_penalty = 1.1f, .seed = 1234};
  auto run = [&](sampler& s) {
    std::vector<std::int32_t> out;
    for (int i = 0; i < 200; ++i) out.push_back(s.sample(random_logits(5000, std::uint32_t(i)), out));
    return out;
  };
  sampler a(settings), b(settings);
  const auto first = run(a);
  CHECK(first == run(b));
  a.reseed(1234);
  CHECK(first == run(a));
  sampling_settings other = settings;
  other.seed = 4321;
  sampler c(other);
  CHECK(first != run(c));
}

TEST_CASE("draws follow the softmax: chi-square over 200k draws", "[infer][sampler]") {
  // 200k draws, significance 0.001: the test statistic must stay below the
  // chi-square quantile for the degrees of freedom (9 -> 27.877, 3 -> 16.266).
  // With a fixed seed the outcome is deterministic; the bound says the sampler
  // is indistinguishable from the softmax at that level.
  const long draws = 200000;
  const std::vector<float> logits = {1.0f, 0.5f, -0.3f, 2.0f, 0.0f, -1.5f, 1.2f, 0.7f, -0.8f, 0.2f};
  {
    sampler s({.seed = 99});
    std::vector<long> counts(logits.size(), 0);
    for (long i = 0; i < draws; ++i) ++counts[std::size_t(s.sample(logits))];
    const double chi = chi_square(counts, softmax(logits), draws);
    INFO("chi-square " << chi);
    CHECK(chi < 27.877);
  }
  {
    // Temperature 0.7 and top-k 4: the softmax of logits / 0.7 over the 4 largest.
    sampler s({.temperature = 0.7f, .top_k = 4, .seed = 100});
    std::vector<long> counts(logits.size(), 0);
    for (long i = 0; i < draws; ++i) ++counts[std::size_t(s.sample(logits))];
    const auto order = ranking(logits);
    std::vector<float> top4;
    std::vector<long> top_counts;
    for (int i = 0; i < 4; ++i) {
      top4.push_back(logits[std::size_t(order[std::size_t(i)])]);
      top_counts.push_back(counts[std::size_t(order[std::size_t(i)])]);
    }
    CHECK(std::accumulate(top_counts.begin(), top_counts.end(), 0L) == draws);
    const double chi = chi_square(top_counts, softmax(top4, 0.7), draws);
    INFO("chi-square " << chi);
    CHECK(chi < 16.266);
  }
}

TEST_CASE("sampling settings and logits are validated", "[infer][sampler]") {
  CHECK_THROWS_AS(sampler({.temperature = -1.0f}), invalid_input);
  CHECK_THROWS_AS(sampler({.top_p = 0.0f}), invalid_input);
  CHECK_THROWS_AS(sampler({.min_p = 1.5f}), invalid_input);
  CHECK_THROWS_AS(sampler({.repetition_penalty = 0.0f}), invalid_input);
  sampler s;
  CHECK_THROWS_AS(s.sample(std::vector<float>{}), invalid_input);
  CHECK_THROWS_AS(s.sample(std::vector<float>{1.0f, std::nanf("")}), invalid_input);
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(s.sample(std::vector<float>{-inf, 0.0f, -inf}) == 1);
}

TEST_CASE("stop_criteria: max tokens, end tokens, stop sequences, stop strings", "[infer][stop]") {
  infer::stop_criteria stop(5, {0}, {{7, 8, 9}, {3}}, {"\n\n", "END"});
  using infer::stop_reason;
  std::vector<std::int32_t> out;
  CHECK(stop.check(out) == stop_reason::none);
  out = {1, 7, 8};
  CHECK(stop.check(out) == stop_reason::none);
  out.push_back(9);
  CHECK(stop.check(out) == stop_reason::stop_sequence);
  CHECK(stop.matched_length() == 3);
  out = {1, 2, 4, 5, 6};
  CHECK(stop.check(out) == stop_reason::max_tokens);
  out = {1, 0};
  CHECK(stop.check(out) == stop_reason::end_of_text);
  CHECK(stop.matched_length() == 1);
  out = {1, 2, 4, 5, 3};  // a stop sequence on the last allowed token wins
  CHECK(stop.check(out) == stop_reason::stop_sequence);

  CHECK_FALSE(stop.find_stop_text("hello\n", 1).has_value());
  CHECK(stop.find_stop_text("hello\n\n", 1) == std::size_t(5));    // spans the previous piece
  CHECK(stop.find_stop_text("helloENDmore", 7) == std::size_t(5));  // inside the new piece
  CHECK_FALSE(stop.find_stop_text("END then text", 4).has_value());  // before the window: seen earlier
  CHECK_THROWS_AS(infer::stop_criteria(0), invalid_input);
  CHECK_THROWS_AS(infer::stop_criteria(3, {}, {{}}), invalid_input);
}

namespace {
/// The scalar scan the vectorised ops::scan_logits must agree with exactly.
logits_scan scan_reference(const std::vector<float>& x) {
  constexpr float infinity = std::numeric_limits<float>::infinity();
  logits_scan r;
  for (std::size_t i = 0; i < x.size(); ++i) {
    r.nan_or_positive_infinity |= !(x[i] < infinity);
    if (x[i] > r.max) {
      r.max = x[i];
      r.argmax = index_t(i);
    }
    if (x[i] < r.lowest_finite && x[i] > -infinity) r.lowest_finite = x[i];
  }
  return r;
}
logits_scan scan(const std::vector<float>& x) {
  return ops::scan_logits(cpu::par, tensor_view<const float, 1>(x.data(), {index_t(x.size())}));
}
}  // namespace

// Exact comparisons: the scan only compares and copies values, so it must
// find the very same maximum, index and lowest value as a scalar pass.
TEST_CASE("scan_logits finds what a scalar pass finds, at every length and position", "[infer][sampler]") {
  constexpr float infinity = std::numeric_limits<float>::infinity();
  for (const std::size_t n : {1u, 7u, 8u, 9u, 16u, 31u, 33u, 32000u}) {
    CAPTURE(n);
    std::vector<float> x = random_logits(n, 11u + std::uint32_t(n));
    // The largest value at each position in turn, twice (ties go to the first).
    for (const std::size_t at : {std::size_t(0), n / 2, n - 1}) {
      CAPTURE(at);
      std::vector<float> y = x;
      y[at] = 10.0f;
      if (at + 3 < n) y[at + 3] = 10.0f;
      const logits_scan got = scan(y), want = scan_reference(y);
      CHECK(got.argmax == index_t(at));
      CHECK(got.argmax == want.argmax);
      CHECK(got.max == want.max);
      CHECK(got.lowest_finite == want.lowest_finite);
      CHECK_FALSE(got.nan_or_positive_infinity);
    }
    // -inf is a masked token, not an error; it is not the lowest finite value.
    std::vector<float> masked = x;
    for (std::size_t i = 0; i < n; i += 3) masked[i] = -infinity;
    const logits_scan got = scan(masked), want = scan_reference(masked);
    CHECK(got.argmax == want.argmax);
    CHECK(got.max == want.max);
    CHECK(got.lowest_finite == want.lowest_finite);
    CHECK_FALSE(got.nan_or_positive_infinity);
    // NaN or +inf anywhere, in the vector body or the tail.
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), infinity}) {
      for (const std::size_t at : {std::size_t(0), n - 1}) {
        std::vector<float> y = x;
        y[at] = bad;
        CHECK(scan(y).nan_or_positive_infinity);
      }
    }
  }
  // Every logit -inf: index 0, max -inf, no finite value.
  const std::vector<float> all_masked(20, -infinity);
  const logits_scan got = scan(all_masked);
  CHECK(got.argmax == 0);
  CHECK(got.max == -infinity);
  CHECK(got.lowest_finite == infinity);
  CHECK_FALSE(got.nan_or_positive_infinity);
}

TEST_CASE("scan_logits reads a strided row", "[infer][sampler]") {
  std::vector<float> storage = random_logits(64, 5u);
  storage[2 * 17] = 9.0f;  // element 17 of the every-other view
  storage[2 * 17 + 1] = 50.0f;  // not in the view
  const logits_scan got =
      ops::scan_logits(cpu::par, tensor_view<const float, 1>(storage.data(), {index_t(32)}, {index_t(2)}));
  CHECK(got.argmax == 17);
  CHECK(got.max == 9.0f);
  CHECK_FALSE(got.nan_or_positive_infinity);
}
