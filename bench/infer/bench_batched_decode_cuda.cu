// Inference on one GPU (cuda::par): prefill tokens/s of a 512-token prompt
// and aggregate decode tokens/s of 1 to 256 sequences decoding together (one
// forward call per step over a ragged batch), at contexts 128 and 1024, on
// bench_batched_decode's LLaMA-shaped 110 M model (random weights) with fp32
// and bf16 weights over a paged bf16 KV cache. Beside each row the limits
// measured in the same run: a device-to-device copy's bandwidth (what a
// decode step, which streams the weights and the sequences' keys and values,
// is bound by) and ops::gemm's 8192^3 rate (what prefill approaches).
// Each step's logits come back to the host (the sampler runs there), so the
// decode rows include that copy.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#include <cuda_runtime.h>

#include "ctformer/infer/inference_model.hpp"
#include "ctformer/nn/nn.hpp"

using namespace ctformer;
using device_policy = ctformer::cuda::par_t;

namespace {

struct llama_110m {
  static constexpr int vocab = 32000, d_model = 768, n_layer = 12, n_head = 12, n_kv_head = 12, d_ff = 2048,
                       max_seq = 2048;
  static constexpr float rope_base = 10000.0f;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
};

constexpr index_t block_tokens = 16;
using kv_policy = infer::kv::paged<block_tokens, bf16>;
template <class Format>
using model_for = infer::inference_model<llama_110m, Format, kv_policy, device_policy>;

constexpr index_t prompt_tokens = 512, most_sequences = 256, longest_context = 1024;
constexpr index_t head_dim = llama_110m::d_model / llama_110m::n_head;

/// Bytes per second of a device-to-device copy of 1 GiB (read + written).
double copy_bandwidth() {
  static const double rate = [] {
    const std::size_t bytes = std::size_t(1) << 30;
    void *a = nullptr, *b = nullptr;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) return 0.0;
    cudaMemset(a, 1, bytes);
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaDeviceSynchronize();
    const int repeats = 10;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < repeats; ++r) cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaDeviceSynchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    cudaFree(a);
    cudaFree(b);
    return 2.0 * double(bytes) * repeats / s;
  }();
  return rate;
}

/// TFLOP/s of an 8192^3 ops::gemm with T operands and fp32 accumulation.
template <class T>
double gemm_limit_tflops() {
  static const double rate = [] {
    const index_t n = 8192;
    const device_policy exec{};
    buffer_for<T, device_policy> a(std::size_t(n * n)), b(std::size_t(n * n));
    buffer_for<float, device_policy> c(std::size_t(n * n));
    ops::fill(exec, tensor_view<T, 1>(a.data(), {n * n}), T(0.5f));
    ops::fill(exec, tensor_view<T, 1>(b.data(), {n * n}), T(0.25f));
    const tensor_view<const T, 2> av(a.data(), {n, n}), bv(b.data(), {n, n});
    const tensor_view<float, 2> cv(c.data(), {n, n});
    ops::gemm(exec, av, bv, cv);
    exec.synchronize();
    const int repeats = 10;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < repeats; ++r) ops::gemm(exec, av, bv, cv);
    exec.synchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return 2.0 * double(n) * double(n) * double(n) * repeats / s / 1e12;
  }();
  return rate;
}

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

double matrix_weights() {
  double n = 0;
  for (const auto& p : model_for<quant::fp32>::parameter_table())
    if (p.kind == nn::parameter_kind::matrix) n += double(p.size());
  return n;  // the untied head is one of the matrices
}

std::vector<std::int32_t> random_tokens(index_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(0, llama_110m::vocab - 1);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = dist(rng);
  return t;
}

template <class Format>
struct bench_state {
  model_for<Format> model;
  typename model_for<Format>::cache_type cache;
  std::vector<infer::sequence_id> ids;
  bench_state()
      : model(tensor_view<const float, 1>(random_parameters().data(), {index_t(random_parameters().size())}),
              model_for<Format>::parameter_table(), std::max(prompt_tokens, most_sequences), device_policy{}),
        cache(model.make_cache(most_sequences * (longest_context + 2 * block_tokens))) {
    // One real prefill of the longest context, forked to every other
    // sequence: each row then reads keys and values the model wrote.
    const auto first = cache.open_sequence();
    model.prefill(cache, first, random_tokens(longest_context, 11));
    ids.push_back(first);
    for (index_t s = 1; s < most_sequences; ++s) ids.push_back(cache.fork(first));
    for (const auto id : ids) cache.reserve(id, longest_context + 1);
  }
};

template <class Format>
bench_state<Format>& state_of() {
  static const std::unique_ptr<bench_state<Format>> s = std::make_unique<bench_state<Format>>();
  return *s;
}

template <class Format>
void bm_prefill(benchmark::State& state) {
  auto& s = state_of<Format>();
  const auto prompt = random_tokens(prompt_tokens, 7);
  {  // untimed: the cuBLASLt heuristics and workspace
    const auto seq = s.cache.open_sequence();
    benchmark::DoNotOptimize(s.model.prefill(s.cache, seq, prompt).data());
    s.cache.close_sequence(seq);
  }
  double seconds = 0;
  std::int64_t runs = 0;
  for (auto _ : state) {
    const auto seq = s.cache.open_sequence();
    const auto t0 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(s.model.prefill(s.cache, seq, prompt, prompt_tokens).data());
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++runs;
    s.cache.close_sequence(seq);
  }
  const double rate = double(runs * prompt_tokens) / seconds;
  state.counters["tok/s"] = rate;
  state.counters["TFLOP/s"] = 2.0 * matrix_weights() * rate / 1e12;
  using operand = std::conditional_t<std::is_same_v<Format, quant::bf16_weights>, bf16, float>;
  state.counters["gemm_limit_TFLOP/s"] = gemm_limit_tflops<operand>();
}

/// state.range: sequences, context.
template <class Format>
void bm_batched_decode(benchmark::State& state) {
  const index_t sequences = state.range(0), context = state.range(1);
  auto& s = state_of<Format>();
  infer::batch rows(sequences);
  auto fill = [&] {
    rows.clear();
    for (index_t i = 0; i < sequences; ++i) {
      s.cache.set_length(s.ids[std::size_t(i)], context);  // every step decodes at exactly this context
      rows.add(42 + std::int32_t(i), context, s.ids[std::size_t(i)], true);
    }
  };
  fill();
  benchmark::DoNotOptimize(s.model.forward(s.cache, rows).data());  // untimed warm-up
  double seconds = 0;
  std::int64_t steps = 0;
  for (auto _ : state) {
    fill();
    const auto t0 = std::chrono::steady_clock::now();
    const auto logits = s.model.forward(s.cache, rows);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++steps;
    benchmark::DoNotOptimize(logits.data());
  }
  const double step = seconds / double(steps);
  // What one step must read: every weight once, and each sequence's keys and
  // values up to its context in every layer.
  const double kv_bytes =
      double(sequences) * double(context) * llama_110m::n_layer * 2.0 * llama_110m::n_kv_head * head_dim * sizeof(bf16);
  const double bytes = double(s.model.weight_bytes() + s.model.dense_bytes()) + kv_bytes;
  state.counters["tok/s"] = double(sequences) / step;
  state.counters["ms/step"] = 1e3 * step;
  state.counters["GB/s"] = bytes / step / 1e9;
  state.counters["copy_GB/s"] = copy_bandwidth() / 1e9;
  state.counters["of_bound"] = bytes / step / copy_bandwidth();
}

void prefill_args(benchmark::internal::Benchmark* b) {
  b->MinTime(0.5)->Unit(benchmark::kMillisecond)->UseRealTime();
}
void batched_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"sequences", "context"})
      ->ArgsProduct({{1, 16, 64, 256}, {128, longest_context}})
      ->MinTime(0.3)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

BENCHMARK(bm_prefill<quant::fp32>)->Apply(prefill_args);
BENCHMARK(bm_prefill<quant::bf16_weights>)->Apply(prefill_args);
BENCHMARK(bm_batched_decode<quant::fp32>)->Apply(batched_args);
BENCHMARK(bm_batched_decode<quant::bf16_weights>)->Apply(batched_args);

}  // namespace

BENCHMARK_MAIN();
