// The training model's forward + backward on one GPU (cuda::par): tokens/s
// and model TFLOP/s for the GPT-2 small shape at the CPU benchmark's 4 x 256
// and at llm.c's context of 1024, fp32 and bf16 compute, beside the GEMM
// limit measured in the same run (cuBLASLt through ops::gemm on 8192^3 with
// the same number types). The optimizer is not in the step: AdamW has no
// CUDA kernel yet (ROADMAP, CUDA end to end). The attention kernels are the
// plain reference ones (kernels/cuda/attention.cuh), so these figures are the
// baseline the fused attention will be measured against.
#include <benchmark/benchmark.h>

#include <chrono>
#include <random>
#include <vector>

#include "ctformer/nn/nn.hpp"

using namespace ctformer;
using device_policy = ctformer::cuda::par_t;

namespace {

struct gpt2_small {  // 12 layers, 12 heads, width 768, GPT-2 vocabulary
  static constexpr int vocab = 50257, d_model = 768, n_layer = 12, n_head = 12, n_kv_head = 12, d_ff = 3072,
                       max_seq = 1024;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};

/// TFLOP/s of one (n x n) x (n x n) product through ops::gemm, T operands and
/// fp32 accumulation: the practical matrix limit the model step is judged by.
template <class T>
double gemm_limit_tflops(index_t n) {
  const device_policy exec{};
  buffer_for<T, device_policy> a(std::size_t(n * n)), b(std::size_t(n * n));
  buffer_for<float, device_policy> c(std::size_t(n * n));
  ops::fill(exec, tensor_view<T, 1>(a.data(), {n * n}), T(0.5f));
  ops::fill(exec, tensor_view<T, 1>(b.data(), {n * n}), T(0.25f));
  const tensor_view<const T, 2> av(a.data(), {n, n}), bv(b.data(), {n, n});
  const tensor_view<float, 2> cv(c.data(), {n, n});
  ops::gemm(exec, av, bv, cv);  // warm-up: heuristic, workspace, clocks
  exec.synchronize();
  const int repeats = 10;
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < repeats; ++r) ops::gemm(exec, av, bv, cv);
  exec.synchronize();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return 2.0 * double(n) * double(n) * double(n) * repeats / seconds / 1e12;
}

template <class T>
double gemm_limit_once() {
  static const double limit = gemm_limit_tflops<T>(8192);
  return limit;
}

template <class Cfg, class Compute>
void forward_backward_step(benchmark::State& state) {
  const index_t b = state.range(0), t = state.range(1);
  nn::model<Cfg, device_policy> model(device_policy{}, 1);
  std::vector<std::int32_t> inputs(std::size_t(b * t)), targets(std::size_t(b * t));
  std::mt19937 rng(7);
  for (auto& x : inputs) x = std::int32_t(rng() % Cfg::vocab);
  for (auto& x : targets) x = std::int32_t(rng() % Cfg::vocab);
  const tensor_view<const std::int32_t, 2> in(inputs.data(), {b, t}), tgt(targets.data(), {b, t});
  auto step = [&] {
    model.zero_gradients();
    // The loss comes back to the host, so each step ends with the GPU idle.
    benchmark::DoNotOptimize(model.template forward_backward<Compute>(in, tgt));
  };
  step();  // grows the arena, creates the cuBLASLt handle and workspace
  step();
  for (auto _ : state) step();
  state.counters["tokens/s"] = benchmark::Counter(double(b * t), benchmark::Counter::kIsIterationInvariantRate);
  // Model FLOPs as bench_train_step counts them: 3 x the forward's 2 flops per
  // matrix weight and token (the tied head is the embedding table) plus causal
  // attention's QK^T and PV, 2 x 2 x d_model per (query, key <= query) pair.
  double matrix_weights = nn::config_traits<Cfg>::tie_embeddings ? double(Cfg::vocab) * Cfg::d_model : 0.0;
  for (const auto& p : model.parameter_table())
    if (p.kind == nn::parameter_kind::matrix) matrix_weights += double(p.size());
  const double pairs = double(t) * double(t + 1) / 2.0;
  const double step_flops =
      3.0 * (2.0 * matrix_weights * double(b * t) + double(b) * Cfg::n_layer * 4.0 * pairs * Cfg::d_model);
  state.counters["TFLOP/s"] = benchmark::Counter(step_flops / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["gemm_limit_TFLOP/s"] = gemm_limit_once<Compute>();
}

}  // namespace

BENCHMARK_TEMPLATE(forward_backward_step, gpt2_small, float)
    ->ArgNames({"batch", "T"})->Args({4, 256})->Args({8, 1024})
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);
BENCHMARK_TEMPLATE(forward_backward_step, gpt2_small, bf16)
    ->ArgNames({"batch", "T"})->Args({4, 256})->Args({8, 1024})
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);

BENCHMARK_MAIN();
