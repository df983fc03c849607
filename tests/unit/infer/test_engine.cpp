// infer::engine: every batching policy gives each request the tokens it gets
// generated alone (greedy and seeded, n samples, under preemption), streams
// text without ever showing a stop string or half a UTF-8 character,
// cancels, refuses a full queue, rejects bad requests by name, and ends
// every accepted request.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ctformer/infer/engine.hpp"
#include "ctformer/infer/generate.hpp"
#include "inference_test_models.hpp"

using namespace ctformer;
using testing::infer_gpt;
using testing::infer_llama;

namespace {

template <class Cfg, class Format, class Kv, class Batching>
struct setup {
  using config = Cfg;
  using model_type = infer::inference_model<Cfg, Format, Kv>;
  using batching = Batching;
  using engine_type = infer::engine<model_type, Batching>;
};

// The three policies over an exact format (interleaved q4_0: every row gets
// the bits it gets alone), fp32 (a few ulp from the GEMM's summation order,
// far from flipping a token of these models) and a contiguous cache.
using static4 = infer::static_batching<4>;
using dynamic4 = infer::dynamic_batching<4, 5>;
using continuous8 = infer::continuous_batching<8, 32, 8>;
#define ENGINE_SETUPS                                                                    \
  (setup<infer_llama, quant::q4_0, infer::kv::paged<8, bf16>, static4>),                 \
      (setup<infer_llama, quant::q4_0, infer::kv::paged<8, bf16>, dynamic4>),            \
      (setup<infer_llama, quant::q4_0, infer::kv::paged<8, bf16>, continuous8>),         \
      (setup<infer_gpt, quant::fp32, infer::kv::paged<8, float>, continuous8>),          \
      (setup<infer_gpt, quant::fp32, infer::kv::contiguous<float>, static4>),            \
      (setup<infer_gpt, quant::fp32, infer::kv::contiguous<float>, continuous8>)

template <class Model>
std::vector<std::int32_t> alone(Model& model, const std::vector<std::int32_t>& prompt,
                                infer::sampling_settings settings, int max_tokens) {
  auto cache = model.make_cache(infer::kv::is_paged<typename Model::kv_policy_type> ? Model::max_seq : 1);
  return infer::generate(model, cache, prompt, settings, infer::stop_criteria(max_tokens), [](std::int32_t) {}).tokens;
}

template <class Cfg>
struct fixture {
  nn::model<Cfg, cpu::par_t> trained{cpu::par.with_threads(1), 7};
  fixture() { testing::randomise(trained, 41); }
};

infer::sampling_settings varied_settings(int i) {
  if (i % 3 == 0) return {.temperature = 0.0f};
  return {.temperature = 0.8f, .top_k = 20, .top_p = 0.95f, .seed = std::uint64_t(1000 + i)};
}

// Token t's text: printable, distinct, of one to three bytes.
std::string text_of(std::int32_t t) {
  std::string s(std::size_t(1 + t % 3), char('a' + t % 26));
  return s;
}

}  // namespace

TEMPLATE_TEST_CASE("each request gets the tokens it gets alone, whatever the batching", "[infer][engine]",
                   ENGINE_SETUPS) {
  using Cfg = typename TestType::config;
  using model_type = typename TestType::model_type;
  fixture<Cfg> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));

  constexpr int requests = 12;
  std::vector<infer::request> batch;
  std::vector<std::vector<std::int32_t>> expected;
  for (int i = 0; i < requests; ++i) {
    infer::request r;
    r.prompt = testing::random_tokens(std::size_t(2 + (i * 5) % 19), Cfg::vocab, 300 + i);
    r.sampling = varied_settings(i);
    r.max_tokens = 3 + (i * 7) % 14;
    r.id = "r" + std::to_string(i);
    expected.push_back(alone(model, r.prompt, r.sampling, r.max_tokens));
    batch.push_back(r);
  }

  typename TestType::engine_type engine(model);
  // Submitted from three threads at once; results read by index.
  std::vector<infer::request_handle> handles(requests);
  std::vector<std::thread> submitters;
  for (int t = 0; t < 3; ++t)
    submitters.emplace_back([&, t] {
      for (int i = t; i < requests; i += 3) handles[std::size_t(i)] = engine.submit(batch[std::size_t(i)]);
    });
  for (auto& s : submitters) s.join();
  engine.close_input();  // static batching starts a short last batch

  index_t prompt_tokens = 0, output_tokens = 0;
  for (int i = 0; i < requests; ++i) {
    INFO("request " << i);
    // The streamed tokens, then the result, both equal the lone run.
    std::vector<std::int32_t> streamed;
    int ends = 0;
    while (auto e = handles[std::size_t(i)].next()) {
      if (e->finished) {
        ++ends;
        CHECK(e->reason == infer::finish_reason::length);
      } else {
        streamed.push_back(e->token);
      }
    }
    CHECK(ends == 1);
    CHECK(streamed == expected[std::size_t(i)]);
    const auto result = handles[std::size_t(i)].wait();
    REQUIRE(result.completions.size() == 1);
    CHECK(result.completions[0].tokens == expected[std::size_t(i)]);
    CHECK(result.completions[0].reason == infer::finish_reason::length);
    CHECK(result.output_tokens == index_t(expected[std::size_t(i)].size()));
    CHECK(result.queue_seconds <= result.first_token_seconds);
    CHECK(result.first_token_seconds <= result.total_seconds);
    prompt_tokens += index_t(batch[std::size_t(i)].prompt.size());
    output_tokens += result.output_tokens;
  }
  engine.shutdown();
  const auto m = engine.metrics().snapshot();
  CHECK(m.requests_arrived == requests);
  CHECK(m.requests_finished_length == requests);
  CHECK(m.prompt_tokens == std::uint64_t(prompt_tokens));
  CHECK(m.output_tokens == std::uint64_t(output_tokens));
  CHECK(m.time_to_first_token.count == requests);
  CHECK(m.end_to_end.count == requests);
  CHECK(m.requests_running == 0);
  CHECK(m.requests_waiting == 0);
  CHECK(m.kv_cache_usage == 0.0);  // every sequence closed
  if constexpr (!TestType::batching::iteration_level) CHECK(m.preemptions == 0);
}

TEMPLATE_TEST_CASE("n samples share the prompt and equal lone runs with seeds seed + i", "[infer][engine]",
                   ENGINE_SETUPS) {
  using Cfg = typename TestType::config;
  using model_type = typename TestType::model_type;
  fixture<Cfg> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  infer::request r;
  r.prompt = testing::random_tokens(11, Cfg::vocab, 5);
  r.sampling = {.temperature = 1.0f, .seed = 77};
  r.max_tokens = 9;
  r.n = 3;
  std::vector<std::vector<std::int32_t>> expected;
  for (int i = 0; i < r.n; ++i) {
    auto s = r.sampling;
    s.seed += std::uint64_t(i);
    expected.push_back(alone(model, r.prompt, s, r.max_tokens));
  }
  // A contiguous cache needs a slot per sample.
  typename TestType::engine_type engine(model, {.cache_capacity = infer::kv::is_paged<typename model_type::kv_policy_type> ? 0 : 4});
  auto handle = engine.submit(r);
  engine.close_input();
  std::vector<std::vector<std::int32_t>> streamed(3);
  while (auto e = handle.next())
    if (!e->finished) streamed[std::size_t(e->index)].push_back(e->token);
  const auto result = handle.wait();
  REQUIRE(result.completions.size() == 3);
  for (int i = 0; i < 3; ++i) {
    INFO("sample " << i);
    CHECK(result.completions[std::size_t(i)].index == i);
    CHECK(result.completions[std::size_t(i)].tokens == expected[std::size_t(i)]);
    CHECK(streamed[std::size_t(i)] == expected[std::size_t(i)]);
  }
  CHECK(result.prompt_tokens == 11);
  CHECK(result.output_tokens == 27);
  CHECK(expected[0] != expected[1]);  // the seeds differ, so do the samples (a check on the test itself)
}

// The policies over paged caches, where prefix caching works.
#define PREFIX_CACHE_SETUPS                                                      \
  (setup<infer_llama, quant::q4_0, infer::kv::paged<8, bf16>, static4>),         \
      (setup<infer_llama, quant::q4_0, infer::kv::paged<8, bf16>, dynamic4>),    \
      (setup<infer_llama, quant::q4_0, infer::kv::paged<8, bf16>, continuous8>), \
      (setup<infer_gpt, quant::fp32, infer::kv::paged<8, float>, continuous8>)

TEMPLATE_TEST_CASE("prefix caching: requests sharing a prompt prefix attach its blocks and get the tokens they get alone",
                   "[infer][engine][prefix_cache]", PREFIX_CACHE_SETUPS) {
  using Cfg = typename TestType::config;
  using model_type = typename TestType::model_type;
  fixture<Cfg> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  // A 19-token "system prompt" (two full blocks of 8 and three positions),
  // then a different question per request; request 0 repeats exactly later.
  const auto system = testing::random_tokens(19, Cfg::vocab, 900);
  std::vector<infer::request> requests;
  std::vector<std::vector<std::int32_t>> expected;
  for (int i = 0; i < 6; ++i) {
    infer::request r;
    r.prompt = system;
    const auto question = testing::random_tokens(std::size_t(3 + i % 4), Cfg::vocab, 950 + i % 5);
    r.prompt.insert(r.prompt.end(), question.begin(), question.end());
    r.sampling = varied_settings(i);
    r.max_tokens = 5 + i % 3;
    expected.push_back(alone(model, r.prompt, r.sampling, r.max_tokens));
    requests.push_back(r);
  }
  for (bool caching : {true, false}) {
    INFO("prefix caching " << (caching ? "on" : "off"));
    typename TestType::engine_type engine(model, {.prefix_caching = caching});
    // Four copies of the first request (a static batch of four starts when
    // four wait) file the shared blocks; then the rest and a fifth copy.
    std::vector<infer::request_handle> copies;
    for (int i = 0; i < 4; ++i) copies.push_back(engine.submit(requests[0]));
    for (auto& c : copies) CHECK(c.wait().completions[0].tokens == expected[0]);
    std::vector<infer::request_handle> handles;
    for (std::size_t i = 1; i < requests.size(); ++i) handles.push_back(engine.submit(requests[i]));
    handles.push_back(engine.submit(requests[0]));  // the repeat
    engine.close_input();
    for (std::size_t i = 0; i < handles.size(); ++i) {
      const std::size_t which = i + 1 < handles.size() ? i + 1 : 0;
      INFO("request " << which);
      const auto result = handles[i].wait();
      CHECK(result.completions[0].tokens == expected[which]);
    }
    engine.shutdown();
    const auto m = engine.metrics().snapshot();
    if (caching) {
      // Every request after the first finds at least the system prompt's two
      // full blocks (the repeat may find its whole first blocks too).
      CHECK(m.prefix_cache_hits >= 2 * requests.size());
      CHECK(m.prefix_cache_hit_rate > 0.5);
    } else {
      CHECK(m.prefix_cache_hits == 0);
      CHECK(m.prefix_cache_queries == 0);
    }
    CHECK(m.kv_cache_usage == 0.0);  // cached blocks are free blocks
  }
}

TEST_CASE("a prompt cached in full skips its prefill: the repeat computes only its last block",
          "[infer][engine][prefix_cache]") {
  using model_type = infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<8, float>>;
  fixture<infer_gpt> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  infer::request r{.prompt = testing::random_tokens(33, infer_gpt::vocab, 3), .max_tokens = 4};
  infer::engine<model_type, infer::continuous_batching<4>> engine(model);
  const auto once = engine.submit(r).wait();
  const auto before = engine.metrics().snapshot();
  const auto again = engine.submit(r).wait();
  const auto after = engine.metrics().snapshot();
  CHECK(again.completions[0].tokens == once.completions[0].tokens);
  // 33 prompt tokens: 4 full blocks of 8 before the last token, all found.
  CHECK(after.prefix_cache_queries - before.prefix_cache_queries == 4);
  CHECK(after.prefix_cache_hits - before.prefix_cache_hits == 4);
}

TEST_CASE("continuous batching preempts the newest sequence when the pool runs out, and outputs do not change",
          "[infer][engine]") {
  using model_type = infer::inference_model<infer_llama, quant::q4_0, infer::kv::paged<8, bf16>>;
  fixture<infer_llama> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  std::vector<infer::request> requests;
  std::vector<std::vector<std::int32_t>> expected;
  for (int i = 0; i < 6; ++i) {
    infer::request r;
    r.prompt = testing::random_tokens(std::size_t(9 + i), infer_llama::vocab, 50 + i);
    r.sampling = varied_settings(i);
    r.max_tokens = 24;
    expected.push_back(alone(model, r.prompt, r.sampling, r.max_tokens));
    requests.push_back(r);
  }
  // 10 blocks of 8 positions: every prompt fits, six sequences growing to
  // 33-38 positions (5 blocks each) do not.
  infer::engine<model_type, infer::continuous_batching<6, 32, 16>> engine(model, {.cache_capacity = 80});
  std::vector<infer::request_handle> handles;
  for (const auto& r : requests) handles.push_back(engine.submit(r));
  for (std::size_t i = 0; i < handles.size(); ++i) {
    INFO("request " << i);
    const auto result = handles[i].wait();
    CHECK(result.completions[0].reason == infer::finish_reason::length);
    CHECK(result.completions[0].tokens == expected[i]);
  }
  engine.shutdown();
  const auto m = engine.metrics().snapshot();
  CHECK(m.preemptions > 0);
  CHECK(m.kv_cache_usage == 0.0);
}

TEST_CASE("a sample that outgrows the whole pool ends with an error that says so; the others go on",
          "[infer][engine]") {
  using model_type = infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<8, float>>;
  fixture<infer_gpt> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  infer::engine<model_type, infer::continuous_batching<4>> engine(model, {.cache_capacity = 16});
  infer::request big{.prompt = testing::random_tokens(10, infer_gpt::vocab, 1), .max_tokens = 30, .id = "big"};
  const auto result = engine.submit(big).wait();
  CHECK(result.completions[0].reason == infer::finish_reason::error);
  CHECK_THAT(result.completions[0].message, Catch::Contains("'big'") && Catch::Contains("more than the whole"));
  // Positions 0..15 held: 7 tokens drawn; the 8th needs a 17th position.
  CHECK(result.completions[0].tokens.size() == 7);
  infer::request small{.prompt = {1, 2, 3}, .max_tokens = 4};
  CHECK(engine.submit(small).wait().completions[0].reason == infer::finish_reason::length);
}

TEST_CASE("stop strings end a sample, are cut from its text and never streamed", "[infer][engine]") {
  using model_type = infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<8, float>>;
  fixture<infer_gpt> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  const auto prompt = testing::random_tokens(6, infer_gpt::vocab, 9);
  const auto tokens = alone(model, prompt, {.temperature = 0.0f}, 20);
  std::string full;
  std::vector<std::size_t> ends;  // where each token's text ends
  for (auto t : tokens) {
    full += text_of(t);
    ends.push_back(full.size());
  }
  // A stop string that starts inside token 4's text and ends inside token 6's.
  const std::size_t start = ends[3] - 1;
  const std::string stop = full.substr(start, ends[5] - start - (ends[5] - ends[4] > 1 ? 1 : 0));
  const std::size_t cut = full.find(stop);
  REQUIRE(cut <= start);

  infer::engine<model_type, infer::continuous_batching<4>> engine(model, {.token_text = text_of});
  infer::request r{.prompt = prompt, .sampling = {.temperature = 0.0f}, .max_tokens = 20, .stop_strings = {"#!", stop}};
  auto handle = engine.submit(r);
  std::string streamed;
  int finished = 0;
  while (auto e = handle.next()) {
    streamed += e->text;
    finished += e->finished ? 1 : 0;
    // Nothing past the cut ever goes out, not even while the string is being matched.
    CHECK(streamed.size() <= cut);
    if (e->finished) CHECK(e->reason == infer::finish_reason::stop);
  }
  CHECK(finished == 1);
  CHECK(streamed == full.substr(0, cut));
  const auto result = handle.wait();
  CHECK(result.completions[0].text == full.substr(0, cut));
  CHECK(result.completions[0].reason == infer::finish_reason::stop);
}

TEST_CASE("streamed text never ends inside a UTF-8 character until the sample ends", "[infer][engine]") {
  using model_type = infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<8, float>>;
  fixture<infer_gpt> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  // Every token is half of "é" (C3 A9) or of "€" (E2 82 AC), split at a byte.
  auto piece = [](std::int32_t t) -> std::string {
    switch (t % 4) {
      case 0: return "\xC3";
      case 1: return "\xA9";
      case 2: return "\xE2\x82";
      default: return "\xAC";
    }
  };
  infer::engine<model_type, infer::continuous_batching<4>> engine(model, {.token_text = piece});
  infer::request r{.prompt = testing::random_tokens(5, infer_gpt::vocab, 3), .sampling = {.seed = 4}, .max_tokens = 30};
  auto handle = engine.submit(r);
  std::string streamed;
  std::vector<std::size_t> cuts;  // where each event before the last one ended
  while (auto e = handle.next()) {
    streamed += e->text;
    if (!e->finished) cuts.push_back(streamed.size());
  }
  const infer::request_result result = handle.wait();
  const std::string& full = result.completions[0].text;
  CHECK(streamed == full);
  std::string expected;
  for (auto t : result.completions[0].tokens) expected += piece(t);
  CHECK(streamed == expected);
  // Random halves make invalid sequences too (a lead byte followed by another
  // lead byte); those can never complete and may go out. A character that is
  // well formed in the final text must never be split across two events.
  const auto splits_character = [&](std::size_t p) {
    std::size_t q = p;
    while (q > 0 && p - q < 3 && (static_cast<unsigned char>(full[q - 1]) & 0xC0) == 0x80) --q;
    if (q == 0) return false;
    const auto lead = static_cast<unsigned char>(full[--q]);
    const std::size_t length = lead >= 0xF0 && lead < 0xF8 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (q + length <= p || q + length > full.size()) return false;
    for (std::size_t i = q + 1; i < q + length; ++i)
      if ((static_cast<unsigned char>(full[i]) & 0xC0) != 0x80) return false;
    return true;
  };
  std::size_t split = 0;
  for (const std::size_t p : cuts) split += splits_character(p) ? 1 : 0;
  CHECK(split == 0);
  CHECK(cuts.size() > 3);  // the text did go out in pieces
}

TEST_CASE("an end token ends a sample with reason stop and is not part of its output", "[infer][engine]") {
  using model_type = infer::inference_model<infer_llama, quant::q4_0, infer::kv::paged<8, bf16>>;
  fixture<infer_llama> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  const auto prompt = testing::random_tokens(7, infer_llama::vocab, 21);
  const auto tokens = alone(model, prompt, {.temperature = 0.0f}, 12);
  const auto first_at = [&](std::int32_t t) { return std::size_t(std::find(tokens.begin(), tokens.end(), t) - tokens.begin()); };
  const std::int32_t end = tokens[4];
  infer::engine<model_type, infer::static_batching<1>> engine(model);
  infer::request r{.prompt = prompt, .sampling = {.temperature = 0.0f}, .max_tokens = 12, .end_tokens = {end}};
  const auto result = engine.submit(r).wait();
  CHECK(result.completions[0].reason == infer::finish_reason::stop);
  CHECK(result.completions[0].tokens == std::vector<std::int32_t>(tokens.begin(), tokens.begin() + std::ptrdiff_t(first_at(end))));
  CHECK(result.output_tokens == index_t(first_at(end) + 1));  // the end token was generated, then dropped
}

TEST_CASE("log-probabilities: the chosen token's and the top alternatives, sorted", "[infer][engine]") {
  using model_type = infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<8, float>>;
  fixture<infer_gpt> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  infer::engine<model_type, infer::continuous_batching<4>> engine(model);
  infer::request r{.prompt = {4, 5, 6}, .sampling = {.temperature = 0.0f}, .max_tokens = 5, .top_logprobs = 3, .logprobs = true};
  auto handle = engine.submit(r);
  int tokens = 0;
  while (auto e = handle.next()) {
    if (e->finished) continue;
    ++tokens;
    REQUIRE(e->top.size() == 3);
    CHECK(e->top[0].token == e->token);  // greedy picks the most likely
    // The same double log-sum-exp for both, rounded to float once each: equal.
    CHECK(e->top[0].logprob == e->logprob);
    CHECK(e->logprob <= 0.0f);
    CHECK(e->top[0].logprob >= e->top[1].logprob);
    CHECK(e->top[1].logprob >= e->top[2].logprob);
    double mass = 0;
    for (const auto& a : e->top) mass += std::exp(double(a.logprob));
    CHECK(mass <= 1.0 + 1e-6);  // float log-probabilities of a distribution: within rounding of 1
  }
  CHECK(tokens == 5);
}

TEST_CASE("cancel ends a running request and a queued one; the engine goes on", "[infer][engine]") {
  using model_type = infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<8, float>>;
  fixture<infer_gpt> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  // Each token's text takes 5 ms: the long request runs long enough to be cancelled.
  infer::engine<model_type, infer::static_batching<1>> engine(model, {.token_text = [](std::int32_t t) {
                                                                   std::this_thread::sleep_for(std::chrono::milliseconds(5));
                                                                   return text_of(t);
                                                                 }});
  infer::request long_one{.prompt = {1, 2, 3}, .sampling = {.temperature = 0.0f}, .max_tokens = 40, .id = "long"};
  auto running = engine.submit(long_one);
  auto queued = engine.submit(infer::request{.prompt = {4, 5}, .max_tokens = 40, .id = "queued"});
  // The queued one waits for the first batch (static batching of one).
  queued.cancel();
  const auto queued_result = queued.wait();
  CHECK(queued_result.completions[0].reason == infer::finish_reason::cancelled);
  CHECK(queued_result.output_tokens == 0);
  REQUIRE(running.next().has_value());  // it has started
  running.cancel();
  const auto result = running.wait();
  CHECK(result.completions[0].reason == infer::finish_reason::cancelled);
  CHECK(result.completions[0].tokens.size() < 40);
  CHECK(engine.submit(infer::request{.prompt = {7}, .max_tokens = 3}).wait().completions[0].reason ==
        infer::finish_reason::length);
  engine.shutdown();
  CHECK(engine.metrics().snapshot().requests_finished_cancelled == 2);
  CHECK(engine.metrics().snapshot().kv_cache_usage == 0.0);
}

TEST_CASE("a request is counted as ended before its caller sees it end", "[infer][engine][metrics]") {
  using model_type = infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<8, float>>;
  fixture<infer_gpt> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  infer::engine<model_type, infer::continuous_batching<4>> engine(model);
  // A client that reads the metrics right after its answer (a server's
  // /metrics) finds every finished request there: none still running, each
  // in the end-to-end histogram. Repeated, since a late update is a race.
  for (int i = 1; i <= 20; ++i) {
    INFO("request " << i);
    engine.submit(infer::request{.prompt = {std::int32_t(i % 7)}, .max_tokens = 2}).wait();
    const auto m = engine.metrics().snapshot();
    CHECK(m.requests_running == 0);
    CHECK(m.end_to_end.count == std::uint64_t(i));
    CHECK(m.requests_finished_length == std::uint64_t(i));
  }
  engine.shutdown();
}

TEST_CASE("a full queue refuses a request explicitly; what was queued still runs", "[infer][engine]") {
  using model_type = infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<8, float>>;
  fixture<infer_gpt> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  // Static batching of 8 waits for 8 requests: two stay queued.
  infer::engine<model_type, infer::static_batching<8>> engine(model, {.queue_capacity = 2});
  auto a = engine.submit(infer::request{.prompt = {1}, .max_tokens = 2});
  auto b = engine.submit(infer::request{.prompt = {2}, .max_tokens = 2});
  CHECK_THROWS_AS(engine.submit(infer::request{.prompt = {3}, .max_tokens = 2, .id = "third"}), infer::queue_full);
  CHECK_THROWS_WITH(engine.submit(infer::request{.prompt = {3}, .max_tokens = 2, .id = "third"}),
                    Catch::Contains("'third'") && Catch::Contains("capacity of 2"));
  CHECK(engine.metrics().snapshot().requests_refused == 2);
  engine.close_input();
  CHECK(a.wait().completions[0].tokens.size() == 2);
  CHECK(b.wait().completions[0].tokens.size() == 2);
  CHECK_THROWS_AS(engine.submit(infer::request{.prompt = {3}, .max_tokens = 2}), error);
}

TEST_CASE("requests that could never run are rejected at submit, naming the request and the problem",
          "[infer][engine]") {
  using model_type = infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<8, float>>;
  fixture<infer_gpt> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  infer::engine<model_type, infer::static_batching<2>> engine(model, {.cache_capacity = 32});
  auto rejects = [&](infer::request r, const std::string& why) {
    r.id = "bad";
    CHECK_THROWS_WITH(engine.submit(r), Catch::Contains("'bad'") && Catch::Contains(why));
  };
  rejects({.prompt = {}}, "empty");
  rejects({.prompt = {1, 96}}, "outside the vocabulary");
  rejects({.prompt = std::vector<std::int32_t>(48, 1)}, "context holds 48");
  rejects({.prompt = {1}, .max_tokens = 0}, "max_tokens");
  rejects({.prompt = {1}, .n = 0}, "n must be");
  rejects({.prompt = {1}, .top_logprobs = 21}, "top_logprobs");
  rejects({.prompt = {1}, .sampling = {.top_p = 0.0f}}, "top_p");
  rejects({.prompt = {1}, .stop_strings = {"x"}}, "token_text");
  rejects({.prompt = {1}, .stop_strings = {""}}, "empty");
  rejects({.prompt = {1}, .end_tokens = {-1}}, "end token");
  rejects({.prompt = {1, 2}, .max_tokens = 40}, "more than the cache's 4");  // 42 positions: 6 blocks of 8
  CHECK(engine.metrics().snapshot().requests_arrived == 0);
}

TEST_CASE("under concurrent submits and cancels every accepted request ends, and nothing is counted twice",
          "[infer][engine]") {
  using model_type = infer::inference_model<infer_llama, quant::q4_0, infer::kv::paged<8, bf16>>;
  fixture<infer_llama> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  infer::engine<model_type, infer::continuous_batching<6, 24, 8>> engine(model, {.queue_capacity = 8, .cache_capacity = 96});
  // Catch's assertions are not thread-safe: the clients count, the test checks.
  std::atomic<int> accepted{0}, refused{0}, ended{0}, cancelled{0}, wrong{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 4; ++c)
    clients.emplace_back([&, c] {
      std::mt19937 random{std::uint32_t(c)};
      for (int i = 0; i < 15; ++i) {
        infer::request r;
        r.prompt = testing::random_tokens(std::size_t(1 + random() % 20), infer_llama::vocab, std::uint32_t(c * 100 + i));
        r.max_tokens = int(1 + random() % 20);
        r.n = int(1 + random() % 2);
        r.sampling.seed = random();
        try {
          auto h = engine.submit(r);
          ++accepted;
          if (random() % 4 == 0) h.cancel();
          int finished = 0;
          while (auto e = h.next()) finished += e->finished ? 1 : 0;
          wrong += finished == r.n ? 0 : 1;
          const auto result = h.wait();
          for (const auto& completion : result.completions) {
            wrong += completion.reason == infer::finish_reason::error ? 1 : 0;
            cancelled += completion.reason == infer::finish_reason::cancelled ? 1 : 0;
          }
          ++ended;
        } catch (const infer::queue_full&) {
          ++refused;
        }
      }
    });
  for (auto& c : clients) c.join();
  engine.shutdown();
  CHECK(accepted + refused == 60);
  CHECK(ended == accepted);
  CHECK(wrong == 0);
  const auto m = engine.metrics().snapshot();
  CHECK(m.requests_arrived == std::uint64_t(accepted));
  CHECK(m.requests_refused == std::uint64_t(refused));
  CHECK(m.requests_finished_cancelled == std::uint64_t(cancelled));
  CHECK(m.requests_finished_error == 0);
  CHECK(m.kv_cache_usage == 0.0);
}

TEST_CASE("sampled_vocabulary keeps a padded vocabulary's extra tokens out of every sample", "[infer][engine]") {
  using model_type = infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<8, float>>;
  fixture<infer_gpt> f;
  model_type model(f.trained, 64, cpu::par.with_threads(1));
  infer::engine<model_type, infer::continuous_batching<4>> engine(model, {.sampled_vocabulary = 10});
  // Hot sampling over 96 logits would draw a token >= 10 almost every step.
  infer::request r{.prompt = {1, 2, 3}, .sampling = {.temperature = 2.0f, .seed = 5}, .max_tokens = 40, .n = 3};
  const auto result = engine.submit(r).wait();
  for (const auto& c : result.completions) {
    CHECK(c.tokens.size() == 40);
    for (auto t : c.tokens) CHECK(t < 10);
  }
  CHECK_THROWS_WITH(engine.submit(infer::request{.prompt = {1, 50}, .id = "padded"}),
                    Catch::Contains("'padded'") && Catch::Contains("outside the vocabulary [0, 10)"));
  using engine_type = infer::engine<model_type, infer::continuous_batching<4>>;
  CHECK_THROWS_AS(engine_type(model, {.sampled_vocabulary = 97}), invalid_input);
}
