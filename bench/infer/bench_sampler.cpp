// Drawing one token from a logits row with infer::sampler, per sampling
// setting, for the vocabularies of the LLaMA-shaped model (32000) and GPT-2
// (50257). The sampler runs once per generated token on the calling thread,
// after the decode step, so its time adds straight to the time per output
// token: the figure to read is microseconds per token beside a decode step
// (about 3-5 ms for the 110 M models of bench_decode on this machine).
// Logits are normal with standard deviation 3, a spread like a trained
// model's; a history of 64 tokens feeds the repetition penalty.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "ctformer/infer/sampler.hpp"

using namespace ctformer;

namespace {

enum class setting { greedy, temperature, top_k, top_p, min_p, repetition_penalty };

infer::sampling_settings settings_for(setting s) {
  infer::sampling_settings out;
  out.temperature = 0.8f;
  switch (s) {
    case setting::greedy: out.temperature = 0.0f; break;
    case setting::temperature: break;
    case setting::top_k: out.top_k = 40; break;
    case setting::top_p: out.top_p = 0.9f; break;
    case setting::min_p: out.min_p = 0.05f; break;
    case setting::repetition_penalty: out.repetition_penalty = 1.1f; break;
  }
  return out;
}

void bm_sample(benchmark::State& state, setting s) {
  const auto vocab = std::size_t(state.range(0));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(vocab);
  for (auto& x : logits) x = normal(rng);
  std::vector<std::int32_t> history(64);
  for (auto& t : history) t = std::int32_t(rng() % vocab);
  infer::sampler sampler(settings_for(s));
  std::int64_t sum = 0;
  for (auto _ : state) sum += sampler.sample(logits, history);
  benchmark::DoNotOptimize(sum);
  state.counters["tokens/s"] = benchmark::Counter(1.0, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["candidates"] = double(sampler.last_candidates().size());
}

#define CTFORMER_SAMPLER_BENCH(name) \
  BENCHMARK_CAPTURE(bm_sample, name, setting::name)->Arg(32000)->Arg(50257)->Unit(benchmark::kMicrosecond)

CTFORMER_SAMPLER_BENCH(greedy);
CTFORMER_SAMPLER_BENCH(temperature);
CTFORMER_SAMPLER_BENCH(top_k);
CTFORMER_SAMPLER_BENCH(top_p);
CTFORMER_SAMPLER_BENCH(min_p);
CTFORMER_SAMPLER_BENCH(repetition_penalty);

}  // namespace

BENCHMARK_MAIN();
