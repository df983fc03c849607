// Inference throughput of the LLaMA-shaped model of issue 4 (d_model 768, 12
// layers, 12 heads, d_ff 2048, vocab 32000, RoPE, RMSNorm, SwiGLU, tied
// embeddings: 109.5 M parameters, random weights): prefill tokens/s for a
// 512-token prompt and decode tokens/s at contexts 128 and 1024 (batch 1), in
// fp32, bf16, q8_0 and q4_0 weights, on 1 and 2 threads. Each decode figure
// is printed next to its bandwidth bound: the triad bandwidth measured in this
// run divided by the bytes one decode step reads (packed weights + the bf16
// KV cache up to the context), and the ratio.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "ctformer/ctformer.hpp"
#include "ctformer/infer/inference_model.hpp"

using namespace ctformer;

namespace {

struct llama_110m {
  static constexpr int vocab = 32000, d_model = 768, n_layer = 12, n_head = 12, n_kv_head = 12, d_ff = 2048,
                       max_seq = 2048;
  static constexpr float rope_base = 10000.0f;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
};

// The KV cache in bf16, as llama.cpp's default F16 cache: the same bytes per element.
using kv_policy = infer::kv::contiguous<bf16>;
template <class Format>
using model_for = infer::inference_model<llama_110m, Format, kv_policy>;

constexpr index_t prompt_tokens = 512;

/// Triad a[i] = b[i] + s c[i] over 3 x 256 MiB (past the 32 MiB L3), best of
/// 5, counting 12 bytes per element as STREAM does.
double triad_gb_per_s(int threads) {
  const std::size_t n = std::size_t(64) << 20;
  buffer<float> a(n), b(n), c(n);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (std::size_t i = 0; i < n; ++i) a[i] = b[i] = c[i] = 1.0f;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (std::size_t i = 0; i < n; ++i) a[i] = b[i] + 3.0f * c[i];
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 12.0 * double(n) / s / 1e9);
  }
  benchmark::DoNotOptimize(a.data());
  return best;
}

double bandwidth[3] = {0, 0, 0};  // GB/s, [threads]

/// Random weights in nn::model's layout: matrices and embeddings N(0, 0.02), norms 1.
const std::vector<float>& random_parameters() {
  static const std::vector<float> params = [] {
    const auto table = model_for<quant::fp32>::parameter_table();
    std::vector<float> p(std::size_t(model_for<quant::fp32>::parameter_count()), 0.0f);
    std::mt19937 rng(2024);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    for (const auto& info : table)
      for (index_t i = 0; i < info.size(); ++i)
        p[std::size_t(info.offset + i)] = info.kind == nn::parameter_kind::norm ? 1.0f : normal(rng);
    return p;
  }();
  return params;
}

template <class Format>
model_for<Format>& model() {
  static const std::unique_ptr<model_for<Format>> m = [] {
    const auto& p = random_parameters();
    return std::make_unique<model_for<Format>>(tensor_view<const float, 1>(p.data(), {index_t(p.size())}),
                                               model_for<Format>::parameter_table(), prompt_tokens,
                                               cpu::par.with_threads(2));
  }();
  return *m;
}

std::vector<std::int32_t> random_prompt(index_t n) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> dist(0, llama_110m::vocab - 1);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = dist(rng);
  return t;
}

/// One cache for every decode benchmark, its sequence filled with random
/// keys and values up to the largest context (the values do not change the
/// work, and filling it directly saves a 1024-token prefill per format).
struct decode_cache {
  infer::kv_cache<kv_policy> cache{llama_110m::n_layer, llama_110m::n_kv_head, llama_110m::d_model / llama_110m::n_head,
                                   llama_110m::max_seq, 1};
  infer::sequence_id seq = cache.open_sequence();
  decode_cache() {
    constexpr index_t context = 1024, d = llama_110m::d_model / llama_110m::n_head;
    cache.reserve(seq, llama_110m::max_seq);
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> rows(std::size_t(context * llama_110m::n_kv_head * d));
    for (auto& x : rows) x = normal(rng);
    const tensor_view<const float, 3> kv(rows.data(), {context, llama_110m::n_kv_head, d});
    for (index_t l = 0; l < llama_110m::n_layer; ++l) cache.write(l, seq, 0, kv, kv);
  }
};
decode_cache& shared_cache() {
  static decode_cache c;
  return c;
}

template <class Format>
void bm_prefill(benchmark::State& state) {
  const int threads = int(state.range(0));
  auto& m = model<Format>();
  m.set_exec(cpu::par.with_threads(threads));
  auto cache = m.make_cache(1);
  const auto prompt = random_prompt(prompt_tokens);
  for (auto _ : state) {
    const auto seq = cache.open_sequence();
    const auto logits = m.prefill(cache, seq, prompt, prompt_tokens);
    benchmark::DoNotOptimize(logits.data());
    cache.close_sequence(seq);
  }
  state.counters["tok/s"] =
      benchmark::Counter(double(prompt_tokens), benchmark::Counter::kIsIterationInvariantRate);
}

template <class Format>
void bm_decode(benchmark::State& state) {
  const index_t context = state.range(0);
  const int threads = int(state.range(1));
  auto& m = model<Format>();
  m.set_exec(cpu::par.with_threads(threads));
  auto& c = shared_cache();
  constexpr index_t d = llama_110m::d_model / llama_110m::n_head;
  // Bytes one step streams: every packed weight once, the keys and values of
  // the context once per layer, and one embedding row.
  const double kv_bytes = double(context + 1) * llama_110m::n_layer * 2 * llama_110m::n_kv_head * d * sizeof(bf16);
  const double bytes = double(m.weight_bytes()) + kv_bytes + llama_110m::d_model * sizeof(float);
  double seconds = 0;
  std::int64_t steps = 0;
  for (auto _ : state) {
    c.cache.set_length(c.seq, context);  // every step decodes at exactly this context
    const auto t0 = std::chrono::steady_clock::now();
    const auto logits = m.decode(c.cache, c.seq, 42);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++steps;
    benchmark::DoNotOptimize(logits.data());
  }
  const double tokens_per_s = double(steps) / seconds;
  const double bound = bandwidth[threads] * 1e9 / bytes;
  state.counters["tok/s"] = tokens_per_s;
  state.counters["MB/token"] = bytes / 1e6;
  state.counters["bound_tok/s"] = bound;
  state.counters["of_bound"] = tokens_per_s / bound;
}

void prefill_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads"})->ArgsProduct({{1, 2}})->Iterations(2)->Unit(benchmark::kMillisecond)->UseRealTime();
}
void decode_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"context", "threads"})
      ->ArgsProduct({{128, 1024}, {1, 2}})
      ->MinTime(0.3)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

BENCHMARK(bm_decode<quant::fp32>)->Apply(decode_args);
BENCHMARK(bm_decode<quant::bf16_weights>)->Apply(decode_args);
BENCHMARK(bm_decode<quant::q8_0>)->Apply(decode_args);
BENCHMARK(bm_decode<quant::q4_0>)->Apply(decode_args);
BENCHMARK(bm_prefill<quant::fp32>)->Apply(prefill_args);
BENCHMARK(bm_prefill<quant::bf16_weights>)->Apply(prefill_args);
BENCHMARK(bm_prefill<quant::q8_0>)->Apply(prefill_args);
BENCHMARK(bm_prefill<quant::q4_0>)->Apply(prefill_args);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  bandwidth[1] = triad_gb_per_s(1);
  bandwidth[2] = triad_gb_per_s(2);
  std::printf("memory bandwidth (triad, 3 x 256 MiB, best of 5): %.1f GB/s 1 thread, %.1f GB/s 2 threads\n",
              bandwidth[1], bandwidth[2]);
  std::printf("model: %lld parameters; decode bound = triad GB/s / (packed weights + bf16 KV cache to the context)\n",
              static_cast<long long>(model_for<quant::fp32>::parameter_count()));
  benchmark::AddCustomContext("triad_GB/s_1_thread", std::to_string(bandwidth[1]));
  benchmark::AddCustomContext("triad_GB/s_2_threads", std::to_string(bandwidth[2]));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
