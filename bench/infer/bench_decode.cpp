// Inference throughput of the two shapes of issue 4, random weights: the
// LLaMA-shaped model (d_model 768, 12 layers, 12 heads, d_ff 2048, vocab
// 32000, RoPE, RMSNorm, SwiGLU, tied embeddings: 109.5 M parameters) and GPT-2
// small (768, 12 layers, 12 heads, d_ff 3072, vocab 50257, learned positions,
// LayerNorm, GELU, biases, tied: 124.4 M). Prefill tokens/s for a 512-token
// prompt and decode tokens/s at contexts 128 and 1024 (GPT-2: 1023, its
// position table ends at 1024) with batch 1, in fp32, bf16, q8_0 and q4_0
// weights, on 1 and 2 threads. Each decode figure
// is printed next to its bandwidth bound: the triad bandwidth on the same
// threads, measured just before and just after that benchmark's timed steps
// (the mean of the two: this VM's bandwidth drifts by tens of percent within
// a run), divided by the bytes one decode step reads (packed weights + the
// bf16 KV cache up to the context), and the ratio. The LLaMA shape's q8_0
// and q4_0 decode also runs over an int8 cache (a scale per token and kv
// head), the cache for long contexts.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "ctformer/ctformer.hpp"
#include "../common/memory_bandwidth.hpp"
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

struct gpt2_small {
  static constexpr int vocab = 50257, d_model = 768, n_layer = 12, n_head = 12, n_kv_head = 12, d_ff = 3072,
                       max_seq = 1024;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};

// The KV cache in bf16, as llama.cpp's default F16 cache: the same bytes per element.
using kv_policy = infer::kv::contiguous<bf16>;
// Half the bytes per position (plus a 4-byte scale per row of 64).
using int8_cache = infer::kv::contiguous<std::int8_t>;
template <class Cfg, class Format, class KV = kv_policy>
using model_for = infer::inference_model<Cfg, Format, KV>;

/// The longest decode context benchmarked: 1024, or the last position the model has.
template <class Cfg>
constexpr index_t long_context = std::min<index_t>(1024, Cfg::max_seq - 1);

constexpr index_t prompt_tokens = 512;

double bandwidth[3] = {0, 0, 0};  // GB/s, [threads]

/// Random weights in nn::model's layout: matrices and embeddings N(0, 0.02),
/// norm gains 1, biases 0.
template <class Cfg>
const std::vector<float>& random_parameters() {
  static const std::vector<float> params = [] {
    const auto table = model_for<Cfg, quant::fp32>::parameter_table();
    std::vector<float> p(std::size_t(model_for<Cfg, quant::fp32>::parameter_count()), 0.0f);
    std::mt19937 rng(2024);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    for (const auto& info : table)
      for (index_t i = 0; i < info.size(); ++i)
        p[std::size_t(info.offset + i)] = info.kind == nn::parameter_kind::norm
                                              ? (info.name.ends_with(".bias") ? 0.0f : 1.0f)
                                              : info.kind == nn::parameter_kind::bias ? 0.0f : normal(rng);
    return p;
  }();
  return params;
}

template <class Cfg, class Format, class KV = kv_policy>
model_for<Cfg, Format, KV>& model() {
  static const std::unique_ptr<model_for<Cfg, Format, KV>> m = [] {
    const auto& p = random_parameters<Cfg>();
    return std::make_unique<model_for<Cfg, Format, KV>>(tensor_view<const float, 1>(p.data(), {index_t(p.size())}),
                                                        model_for<Cfg, Format, KV>::parameter_table(), prompt_tokens,
                                                        cpu::par.with_threads(2));
  }();
  return *m;
}

std::vector<std::int32_t> random_prompt(index_t n, int vocab) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> dist(0, vocab - 1);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = dist(rng);
  return t;
}

/// One cache per shape for every decode benchmark, its sequence filled with
/// random keys and values up to the longest context (the values do not change
/// the work, and filling it directly saves a long prefill per format).
template <class Cfg, class KV>
struct decode_cache {
  static constexpr index_t head_dim = Cfg::d_model / Cfg::n_head;
  infer::kv_cache<KV> cache{Cfg::n_layer, Cfg::n_kv_head, head_dim, Cfg::max_seq, 1};
  infer::sequence_id seq = cache.open_sequence();
  decode_cache() {
    constexpr index_t context = long_context<Cfg>;
    cache.reserve(seq, Cfg::max_seq);
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> rows(std::size_t(context * Cfg::n_kv_head * head_dim));
    for (auto& x : rows) x = normal(rng);
    const tensor_view<const float, 3> kv(rows.data(), {context, Cfg::n_kv_head, head_dim});
    for (index_t l = 0; l < Cfg::n_layer; ++l) cache.write(l, seq, 0, kv, kv);
  }
};
template <class Cfg, class KV>
decode_cache<Cfg, KV>& shared_cache() {
  static decode_cache<Cfg, KV> c;
  return c;
}

template <class Cfg, class Format>
void bm_prefill(benchmark::State& state) {
  const int threads = int(state.range(0));
  auto& m = model<Cfg, Format>();
  m.set_exec(cpu::par.with_threads(threads));
  auto cache = m.make_cache(1);
  const auto prompt = random_prompt(prompt_tokens, Cfg::vocab);
  // One untimed prompt first: it faults in the cache's pages and the kernels'
  // scratch, which a serving process pays once, not per request (on this VM
  // first-touch faults cost several percent of a 1-thread prefill).
  {
    const auto seq = cache.open_sequence();
    benchmark::DoNotOptimize(m.prefill(cache, seq, prompt, prompt_tokens).data());
    cache.close_sequence(seq);
  }
  for (auto _ : state) {
    const auto seq = cache.open_sequence();
    const auto logits = m.prefill(cache, seq, prompt, prompt_tokens);
    benchmark::DoNotOptimize(logits.data());
    cache.close_sequence(seq);
  }
  state.counters["tok/s"] =
      benchmark::Counter(double(prompt_tokens), benchmark::Counter::kIsIterationInvariantRate);
}

/// Decode steps at a fixed context: state.range(0) is 0 for context 128 and
/// 1 for the shape's long context.
template <class Cfg, class Format, class KV = kv_policy>
void bm_decode(benchmark::State& state) {
  const index_t context = state.range(0) == 0 ? 128 : long_context<Cfg>;
  const int threads = int(state.range(1));
  auto& m = model<Cfg, Format, KV>();
  m.set_exec(cpu::par.with_threads(threads));
  auto& c = shared_cache<Cfg, KV>();
  constexpr index_t d = Cfg::d_model / Cfg::n_head;
  // Bytes one step streams: every packed weight once, the keys and values of
  // the context once per layer (int8: with a float scale per row), and one
  // embedding row.
  using element = typename KV::element_type;
  constexpr double row_bytes = d * sizeof(element) + (std::is_same_v<element, std::int8_t> ? sizeof(float) : 0);
  const double kv_bytes = double(context + 1) * Cfg::n_layer * 2 * Cfg::n_kv_head * row_bytes;
  const double bytes = double(m.weight_bytes()) + kv_bytes + Cfg::d_model * sizeof(float);
  double seconds = 0;
  std::int64_t steps = 0;
  const double triad_before = bench::triad_gb_per_s(threads, 3);
  for (auto _ : state) {
    c.cache.set_length(c.seq, context);  // every step decodes at exactly this context
    const auto t0 = std::chrono::steady_clock::now();
    const auto logits = m.decode(c.cache, c.seq, 42);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++steps;
    benchmark::DoNotOptimize(logits.data());
  }
  const double tokens_per_s = double(steps) / seconds;
  const double triad = (triad_before + bench::triad_gb_per_s(threads, 3)) / 2;
  const double bound = triad * 1e9 / bytes;
  state.counters["triad_GB/s"] = triad;
  state.counters["context"] = double(context);
  state.counters["tok/s"] = tokens_per_s;
  state.counters["MB/token"] = bytes / 1e6;
  state.counters["bound_tok/s"] = bound;
  state.counters["of_bound"] = tokens_per_s / bound;
}

void prefill_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads"})->ArgsProduct({{1, 2}})->Iterations(2)->Unit(benchmark::kMillisecond)->UseRealTime();
}
void decode_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"long_context", "threads"})
      ->ArgsProduct({{0, 1}, {1, 2}})
      ->MinTime(0.3)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

BENCHMARK(bm_decode<llama_110m, quant::fp32>)->Apply(decode_args);
BENCHMARK(bm_decode<llama_110m, quant::bf16_weights>)->Apply(decode_args);
BENCHMARK(bm_decode<llama_110m, quant::q8_0>)->Apply(decode_args);
BENCHMARK(bm_decode<llama_110m, quant::q4_0>)->Apply(decode_args);
BENCHMARK(bm_decode<llama_110m, quant::q8_0, int8_cache>)->Apply(decode_args);
BENCHMARK(bm_decode<llama_110m, quant::q4_0, int8_cache>)->Apply(decode_args);
BENCHMARK(bm_prefill<llama_110m, quant::fp32>)->Apply(prefill_args);
BENCHMARK(bm_prefill<llama_110m, quant::bf16_weights>)->Apply(prefill_args);
BENCHMARK(bm_prefill<llama_110m, quant::q8_0>)->Apply(prefill_args);
BENCHMARK(bm_prefill<llama_110m, quant::q4_0>)->Apply(prefill_args);
BENCHMARK(bm_decode<gpt2_small, quant::fp32>)->Apply(decode_args);
BENCHMARK(bm_decode<gpt2_small, quant::bf16_weights>)->Apply(decode_args);
BENCHMARK(bm_decode<gpt2_small, quant::q8_0>)->Apply(decode_args);
BENCHMARK(bm_decode<gpt2_small, quant::q4_0>)->Apply(decode_args);
BENCHMARK(bm_prefill<gpt2_small, quant::fp32>)->Apply(prefill_args);
BENCHMARK(bm_prefill<gpt2_small, quant::bf16_weights>)->Apply(prefill_args);
BENCHMARK(bm_prefill<gpt2_small, quant::q8_0>)->Apply(prefill_args);
BENCHMARK(bm_prefill<gpt2_small, quant::q4_0>)->Apply(prefill_args);

}  // namespace

int main(int argc, char** argv) { return bench::run_with_bandwidth(argc, argv, bandwidth); }
