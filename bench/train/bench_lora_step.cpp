// LoRA against full fine-tuning on the GPT-2 small shape: tokens/s of a
// training step (forward, backward, AdamW) and the bytes of gradients plus
// optimizer state, for full fine-tuning and for LoRA with rank 8 on q and v,
// 1 and 2 threads. tools/compare_lora_speed.py runs PEFT on PyTorch eager on
// the same shapes in the same session and prints the ratios.
#include <benchmark/benchmark.h>

#include <chrono>
#include <random>
#include <vector>

#include "ctformer/nn/nn.hpp"
#include "ctformer/train/optimizer.hpp"
#include "../common/fma_peak.hpp"

using namespace ctformer;

namespace {

struct gpt2_small {  // 12 layers, 12 heads, width 768, GPT-2 vocabulary, 4 x 128 tokens per step
  static constexpr int vocab = 50257, d_model = 768, n_layer = 12, n_head = 12, n_kv_head = 12, d_ff = 3072,
                       max_seq = 128;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};
using gpt2_small_lora = nn::with_lora<gpt2_small, nn::lora<8, nn::lora_target::q | nn::lora_target::v, 16.0f>>;
constexpr index_t batch = 4, context = 128;

template <class Cfg>
void fine_tune_step(benchmark::State& state) {
  const int threads = int(state.range(0));
  const auto exec = cpu::par.with_threads(threads);
  nn::model<Cfg, cpu::par_t> model(exec, 1);
  train::adamw_config config;
  config.weight_decay = 0.1f;
  train::adamw<cpu::par_t> optimizer(exec, model.parameter_count(), model.trainable_ranges(), config);
  const auto ranges = model.decay_ranges();
  std::vector<std::int32_t> inputs(std::size_t(batch * context)), targets(std::size_t(batch * context));
  std::mt19937 rng(7);
  for (auto& x : inputs) x = std::int32_t(rng() % Cfg::vocab);
  for (auto& x : targets) x = std::int32_t(rng() % Cfg::vocab);
  tensor_view<const std::int32_t, 2> in(inputs.data(), {batch, context}), tgt(targets.data(), {batch, context});
  auto step = [&] {
    model.zero_gradients();
    model.forward_backward(in, tgt);
    optimizer.step(exec, model.parameters(), as_const(model.gradients()), ranges, 1e-4f);
    model.parameters_changed();
  };
  step();  // grows the arena and warms caches
  for (auto _ : state) step();
  state.counters["tokens/s"] = benchmark::Counter(double(batch * context), benchmark::Counter::kIsIterationInvariantRate);
  // What training adds to the weights: the gradients and AdamW's two moments.
  const double bytes = double(model.gradient_count()) * sizeof(float) + double(optimizer.state_bytes());
  state.counters["grad_and_state_MB"] = bytes / 1e6;
  state.counters["trainable_M"] = double(model.gradient_count()) / 1e6;
  state.counters["activation_MB"] = double(model.activation_bytes()) / 1e6;
  state.counters["peak_GFLOP/s"] = bench::fma_peak_once(threads);
}

}  // namespace

BENCHMARK_TEMPLATE(fine_tune_step, gpt2_small)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);
BENCHMARK_TEMPLATE(fine_tune_step, gpt2_small_lora)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);

BENCHMARK_MAIN();
