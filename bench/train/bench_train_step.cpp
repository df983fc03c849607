// Training-step throughput (forward + backward + AdamW) in tokens/s for the
// nanoGPT CPU configuration, llm.c's 6-layer shape and the GPT-2 small shape,
// fp32 and bf16, 1 and 2 threads, with the share of the step spent in GEMM
// and the step's GFLOP/s beside the FMA peak. tools/compare_training_speed.py
// runs PyTorch eager on the same configurations in the same session and
// prints the ratio. Peers on this kind of machine (../shared/PEERS.md): llm.c
// manages 170 tok/s (6 layers, 384 wide, 4 x 256) and 43 tok/s (GPT-2 small,
// 4 x 64) on two threads.
#define CTFORMER_PROFILE_GEMM 1
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "ctformer/nn/nn.hpp"
#include "ctformer/train/optimizer.hpp"
#include "ctformer/train/precision.hpp"
#include "../common/fma_peak.hpp"

using namespace ctformer;

namespace {

struct nanogpt_cpu {  // 4 layers, 4 heads, width 128, context 64, 65 characters
  static constexpr int vocab = 65, d_model = 128, n_layer = 4, n_head = 4, n_kv_head = 4, d_ff = 512, max_seq = 64;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  static constexpr int batch = 12, context = 64;
};
struct gpt2_small {  // 12 layers, 12 heads, width 768, context 256, GPT-2 vocabulary
  static constexpr int vocab = 50257, d_model = 768, n_layer = 12, n_head = 12, n_kv_head = 12, d_ff = 3072,
                       max_seq = 256;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  static constexpr int batch = 4, context = 256;
};
struct gpt2_small_context_64 : gpt2_small {  // llm.c's measured GPT-2 small shape (4 x 64)
  static constexpr int context = 64;
};
struct llmc_6_layer : gpt2_small {  // llm.c's other measured shape: 6 layers, width 384, 6 heads, 4 x 256 (30 M)
  static constexpr int d_model = 384, n_layer = 6, n_head = 6, n_kv_head = 6, d_ff = 1536;
};

template <class Cfg, class Precision>
void train_step(benchmark::State& state) {
  const int threads = int(state.range(0));
  const auto exec = cpu::par.with_threads(threads);
  nn::model<Cfg, cpu::par_t> model(exec, 1);
  train::adamw_config config;
  config.weight_decay = 0.1f;
  train::adamw<cpu::par_t> optimizer(exec, model.parameter_count(), config);
  const auto ranges = model.decay_ranges();
  const index_t b = Cfg::batch, t = Cfg::context;
  std::vector<std::int32_t> inputs(std::size_t(b * t)), targets(std::size_t(b * t));
  std::mt19937 rng(7);
  for (auto& x : inputs) x = std::int32_t(rng() % Cfg::vocab);
  for (auto& x : targets) x = std::int32_t(rng() % Cfg::vocab);
  tensor_view<const std::int32_t, 2> in(inputs.data(), {b, t}), tgt(targets.data(), {b, t});
  auto step = [&] {
    model.zero_gradients();
    model.template forward_backward<typename Precision::compute_type>(in, tgt);
    optimizer.step(exec, model.parameters(), as_const(model.gradients()), ranges, 1e-4f);
    model.parameters_changed();
  };
  step();  // grows the arena and warms caches
  ops::gemm_profile_seconds = 0;
  double total_seconds = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    step();
    total_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  state.counters["tokens/s"] = benchmark::Counter(double(b * t), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["gemm_share"] = total_seconds > 0 ? ops::gemm_profile_seconds / total_seconds : 0.0;
  state.counters["params_M"] = double(model.parameter_count()) / 1e6;
  // The activation arena a step of this shape needs (it holds the (B, H, T, T)
  // attention probabilities, which grow with T squared).
  state.counters["activation_MB"] = double(model.activation_bytes()) / 1e6;
  // The step's matrix products, as the model FLOPs of its forward times 3
  // (backward is two products per forward one): 2 flops per matrix weight and
  // token (the LM head included; a tied head is the embedding table), plus
  // causal attention's QK^T and PV, 2 x 2 x d_model flops per (query, key <=
  // query) pair and layer.
  double matrix_weights = nn::config_traits<Cfg>::tie_embeddings ? double(Cfg::vocab) * Cfg::d_model : 0.0;
  for (const auto& p : model.parameter_table())
    if (p.kind == nn::parameter_kind::matrix) matrix_weights += double(p.size());
  const double pairs = double(t) * double(t + 1) / 2.0;
  const double step_flops = 3.0 * (2.0 * matrix_weights * double(b * t) + double(b) * Cfg::n_layer * 4.0 * pairs * Cfg::d_model);
  state.counters["GFLOP/s"] = benchmark::Counter(step_flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_GFLOP/s"] = bench::fma_peak_once(threads);
}

}  // namespace

BENCHMARK_TEMPLATE(train_step, nanogpt_cpu, train::fp32)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);
BENCHMARK_TEMPLATE(train_step, nanogpt_cpu, train::bf16_mixed)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);
BENCHMARK_TEMPLATE(train_step, llmc_6_layer, train::fp32)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);
BENCHMARK_TEMPLATE(train_step, gpt2_small_context_64, train::fp32)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);
BENCHMARK_TEMPLATE(train_step, gpt2_small, train::fp32)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);
BENCHMARK_TEMPLATE(train_step, gpt2_small, train::bf16_mixed)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);

BENCHMARK_MAIN();
