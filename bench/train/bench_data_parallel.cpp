// Data-parallel training steps (train::trainer over mpi_communicator): global
// tokens/s of the nanoGPT CPU configuration and of GPT-2 small (4 x 64
// tokens, llm.c's shape), with the global batch fixed, so one process with
// 2 threads and `mpirun -np 2` ranks of 1 thread each run the same samples.
// Each shape runs with the whole optimizer state on every rank and with
// ZeRO-1 (zero_1=1: each rank steps its shard, reduce-scatter + all-gather).
// Beside each row: the gradient bytes each rank reduces per step, its
// optimizer state, the share of the step spent in collectives (not yet
// overlapped with the backward: none of it is hidden), and the FMA peak of
// the threads in use.
//
//   bench_data_parallel                                 # 1 process, 1 and 2 threads
//   mpirun -np 2 --bind-to none bench_data_parallel     # 2 ranks (rank 0 reports)
// tools/compare_data_parallel.py runs these and PyTorch DDP (gloo) with the
// same ranks, shapes and global batch, alternating.
#include <benchmark/benchmark.h>

#include <chrono>
#include <random>
#include <span>
#include <thread>
#include <vector>

#include "ctformer/nn/nn.hpp"
#include "ctformer/train/mpi_communicator.hpp"
#include "ctformer/train/trainer.hpp"
#include "../common/fma_peak.hpp"

using namespace ctformer;

namespace {

struct nanogpt_cpu {  // 4 layers, 4 heads, width 128, context 64, 65 characters
  static constexpr int vocab = 65, d_model = 128, n_layer = 4, n_head = 4, n_kv_head = 4, d_ff = 512, max_seq = 64;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  static constexpr int global_batch = 12, context = 64;
};
struct gpt2_small {  // 12 layers, 12 heads, width 768, GPT-2 vocabulary; llm.c's 4 x 64
  static constexpr int vocab = 50257, d_model = 768, n_layer = 12, n_head = 12, n_kv_head = 12, d_ff = 3072,
                       max_seq = 64;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  static constexpr int global_batch = 4, context = 64;
};

/// The MPI communicator, timing the collectives of each step (the gradient
/// average, or ZeRO-1's reduce-scatter and all-gather): what the step spends
/// communicating (a policy wrapping a policy, so the trainer is unchanged).
struct timed_communicator {
  train::mpi_communicator inner;
  double* seconds;
  int rank() const { return inner.rank(); }
  int size() const { return inner.size(); }
  template <class F>
  void timed(F&& f) const {
    const auto start = std::chrono::steady_clock::now();
    f();
    *seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  template <execution_policy Exec>
  void average(const Exec& exec, tensor_view<float, 1> x) const {
    timed([&] { inner.average(exec, x); });
  }
  double average(double value) const { return inner.average(value); }
  double sum(double value) const { return inner.sum(value); }
  template <execution_policy Exec>
  void broadcast(const Exec& exec, tensor_view<float, 1> x, int root) const {
    inner.broadcast(exec, x, root);
  }
  template <execution_policy Exec>
  void reduce_scatter_average(const Exec& exec, tensor_view<const float, 1> x, tensor_view<float, 1> mine,
                              std::span<const index_t> counts) const {
    timed([&] { inner.reduce_scatter_average(exec, x, mine, counts); });
  }
  template <execution_policy Exec>
  void all_gather(const Exec& exec, tensor_view<float, 1> x, std::span<const index_t> counts) const {
    timed([&] { inner.all_gather(exec, x, counts); });
  }
  template <execution_policy Exec>
  void gather(const Exec& exec, tensor_view<const float, 1> mine, tensor_view<float, 1> x,
              std::span<const index_t> counts, int root) const {
    inner.gather(exec, mine, x, counts, root);
  }
};

/// state.range(0): threads per rank; state.range(1): 1 for ZeRO-1.
template <class Cfg>
void data_parallel_step(benchmark::State& state) {
  using model_type = nn::model<Cfg, cpu::par_t>;
  const int threads = int(state.range(0));
  const bool zero_1 = state.range(1) != 0;
  const train::mpi_communicator world;
  if (Cfg::global_batch % world.size() != 0) {
    state.SkipWithError("the global batch does not split evenly over the ranks");
    return;
  }
  if (threads > 1 && threads * world.size() > int(std::thread::hardware_concurrency())) {
    // OpenMP's barriers on shared cores would measure the oversubscription.
    state.SkipWithError("more threads than cores");
    return;
  }
  const auto exec = cpu::par.with_threads(threads);
  model_type model(exec, 1);
  train::adamw_config adam;
  adam.weight_decay = 0.1f;
  const auto shard = train::shard_of(model.trainable_ranges(), world.rank(), world.size());
  train::adamw<cpu::par_t> optimizer(exec, model.parameter_count(),
                                     zero_1 ? shard.ranges : model.trainable_ranges(), adam);
  train::trainer_settings settings;
  settings.shard_optimizer_state = zero_1;
  settings.batch_size = Cfg::global_batch / world.size();
  settings.sequence_length = Cfg::context;
  double communication_seconds = 0;
  train::trainer<model_type, train::adamw<cpu::par_t>, train::fp32, cpu::par_t, train::warmup_cosine_schedule,
                 timed_communicator>
      trainer(model, optimizer, train::warmup_cosine_schedule{1e-4f, 1e-5f, 0, 1000}, settings,
              timed_communicator{world, &communication_seconds});
  auto sample = [](std::mt19937_64& rng, tensor_view<std::int32_t, 2> in, tensor_view<std::int32_t, 2> out) {
    for (index_t r = 0; r < in.extent(0); ++r)
      for (index_t t = 0; t < in.extent(1); ++t) {
        in(r, t) = std::int32_t(rng() % Cfg::vocab);
        out(r, t) = std::int32_t(rng() % Cfg::vocab);
      }
  };
  trainer.step(sample);  // grows the arena and warms caches
  communication_seconds = 0;
  double seconds = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    trainer.step(sample);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  // Each step ends in the ranks' all-reduce, so rank 0's time is the job's.
  state.counters["ranks"] = world.size();
  state.counters["tokens/s"] =
      benchmark::Counter(double(trainer.tokens_per_step()), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["allreduce_MB"] = double(model.gradient_count()) * sizeof(float) / 1e6;
  state.counters["state_MB"] = double(optimizer.state_bytes()) / 1e6;
  state.counters["comm_share"] = seconds > 0 ? communication_seconds / seconds : 0.0;
  state.counters["params_M"] = double(model.parameter_count()) / 1e6;
  state.counters["peak_GFLOP/s"] = bench::fma_peak_once(threads) * world.size();
}

// A reporter that prints nothing, for the ranks other than 0.
class silent_reporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

// Fixed iteration counts: every rank must run the same number of collective steps.
BENCHMARK_TEMPLATE(data_parallel_step, nanogpt_cpu)->ArgNames({"threads", "zero_1"})->ArgsProduct({{1, 2}, {0, 1}})
    ->Iterations(40)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(data_parallel_step, gpt2_small)->ArgNames({"threads", "zero_1"})->ArgsProduct({{1, 2}, {0, 1}})
    ->Iterations(4)->Unit(benchmark::kMillisecond)->UseRealTime();

int main(int argc, char** argv) {
  train::mpi_environment mpi(argc, argv);
  benchmark::Initialize(&argc, argv);
  const train::mpi_communicator world;
  if (world.rank() == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    silent_reporter silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  return 0;
}
