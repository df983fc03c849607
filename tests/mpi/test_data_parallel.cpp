// Data-parallel training over MPI, run by ctest under mpirun with 2 and 4
// ranks (and once without a launcher, as one process): N ranks with batch b
// train as one process with batch N x b, every rank holds the same
// parameters after every step, frozen tensors and accumulation go through
// the average like the rest, and ZeRO-1 (sharded optimizer state) trains as
// the replicated optimizer does, its state gathered and scattered whole.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ctformer/nn/nn.hpp"
#include "ctformer/train/addition_task.hpp"
#include "ctformer/train/mpi_communicator.hpp"
#include "ctformer/train/trainer.hpp"

using namespace ctformer;

namespace {

struct llama_shape {
  static constexpr int vocab = 13, d_model = 32, n_layer = 2, n_head = 4, n_kv_head = 2, d_ff = 64, max_seq = 12;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  static constexpr bool tie_embeddings = false;
};
struct gpt2_shape {
  static constexpr int vocab = 13, d_model = 32, n_layer = 2, n_head = 4, n_kv_head = 4, d_ff = 128, max_seq = 12;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  static constexpr bool bias = true, tie_embeddings = true;
};

const train::addition_task& task() {
  static const train::addition_task t(3);
  return t;
}

struct run_settings {
  index_t batch_size = 2;  // per rank
  int accumulation = 1;
  std::vector<std::string> frozen;
  int steps = 20;
  bool zero_1 = false;
};

struct run_result {
  std::vector<float> parameters;
  double loss = 0;
  std::vector<std::vector<float>> optimizer_state;  // as one process holds it (rank 0's gathered copy under ZeRO-1)
};

// Trains `steps` steps of a fresh model (initialisation seed 5) with
// `communicator`, each rank drawing batch_size rows of every global batch;
// returns the parameters, the last step's loss and the optimizer's state.
template <class Cfg, class Communicator>
run_result train_steps(const run_settings& s, index_t batch_size, Communicator comm) {
  using model_type = nn::model<Cfg, cpu::par_t>;
  const auto exec = cpu::par.with_threads(1);
  model_type model(exec, 5);
  if (!s.frozen.empty()) model.freeze(s.frozen);
  train::adamw_config adam;
  adam.weight_decay = 0.1f;
  const auto shard = train::shard_of(model.trainable_ranges(), comm.rank(), comm.size());
  train::adamw<cpu::par_t> optimizer(exec, model.parameter_count(),
                                     s.zero_1 ? shard.ranges : model.trainable_ranges(), adam);
  train::warmup_cosine_schedule schedule{3e-3f, 3e-4f, 5, s.steps};
  train::trainer_settings settings;
  settings.batch_size = batch_size;
  settings.sequence_length = task().context_length();
  settings.accumulation_steps = s.accumulation;
  settings.seed = 11;
  settings.shard_optimizer_state = s.zero_1;
  train::trainer<model_type, train::adamw<cpu::par_t>, train::fp32, cpu::par_t, train::warmup_cosine_schedule,
                 Communicator>
      trainer(model, optimizer, schedule, settings, comm);
  auto sample = [](std::mt19937_64& rng, tensor_view<std::int32_t, 2> in, tensor_view<std::int32_t, 2> out) {
    task().make_batch(rng, in, out);
  };
  run_result result;
  for (int i = 0; i < s.steps; ++i) result.loss = trainer.step(sample).loss;
  const auto p = model.parameters();
  result.parameters.assign(p.data(), p.data() + p.size());
  trainer.gather_optimizer_state();
  for (const auto& t : trainer.optimizer_state())
    result.optimizer_state.emplace_back(t.data.data(), t.data.data() + t.data.size());
  return result;
}

double largest_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, double(std::fabs(a[i] - b[i])));
  return d;
}

// Whether every rank's buffer has rank 0's bits.
bool same_on_every_rank(const train::mpi_communicator& world, const std::vector<float>& x) {
  std::vector<float> root = x;
  world.broadcast(cpu::par.with_threads(1), tensor_view<float, 1>(root.data(), {index_t(root.size())}), 0);
  int same = std::memcmp(root.data(), x.data(), x.size() * sizeof(float)) == 0, all = same;
  if (world.size() > 1) MPI_Allreduce(&same, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

}  // namespace

TEMPLATE_TEST_CASE("N ranks with batch b train as one process with batch N x b", "[train][mpi]", llama_shape,
                   gpt2_shape) {
  const train::mpi_communicator world;
  run_settings s;
  SECTION("plain steps") {}
  SECTION("two micro-batches per step") { s.accumulation = 2; }
  SECTION("embeddings and the first block frozen") { s.frozen = {"token_embedding.*", "blocks.0.*"}; }
  INFO("ranks " << world.size() << ", accumulation " << s.accumulation << ", frozen tensors " << s.frozen.size());

  const auto parallel_run = train_steps<TestType>(s, s.batch_size, world);
  // The same run in one process (on each rank, independently), with the
  // global batch of every step in one micro-batch of N x b rows.
  const auto single_run = train_steps<TestType>(s, s.batch_size * world.size(), train::single_process{});
  const auto& parallel = parallel_run.parameters;
  const auto& single = single_run.parameters;
  const double parallel_loss = parallel_run.loss, single_loss = single_run.loss;

  // Every rank takes the same step from the same average: the replicas are
  // bit-identical, not merely close.
  CHECK(same_on_every_rank(world, parallel));
  // Against one process the gradients differ only by summation order (each
  // rank sums its rows, MPI sums the ranks; one process sums all rows in one
  // GEMM): a few fp32 ulp, which AdamW's normalised steps carry into the
  // parameters (most where a gradient is near zero) at lr 3e-3 over 20
  // steps: up to about 1e-5 with 2 and 4 ranks. 1e-4 (3% of the peak step)
  // still fails a wrong average (a sum, or a rank's own gradient), whose
  // parameters move by whole steps.
  const double difference = largest_difference(parallel, single);
  INFO("largest parameter difference " << difference << ", losses " << parallel_loss << " and " << single_loss);
  CHECK(difference <= 1e-4);
  // The loss is the global batch's mean (the ranks' means averaged).
  CHECK(std::fabs(parallel_loss - single_loss) <= 1e-5 * std::fabs(single_loss));
  if (world.size() == 1) CHECK(difference == 0.0);
}

TEST_CASE("the trainer starts every rank from rank 0's parameters", "[train][mpi]") {
  const train::mpi_communicator world;
  using model_type = nn::model<llama_shape, cpu::par_t>;
  const auto exec = cpu::par.with_threads(1);
  // Each rank initialises with another seed; the trainer broadcasts rank 0's.
  model_type model(exec, 100 + std::uint64_t(world.rank()));
  model_type rank0(exec, 100);
  train::adamw<cpu::par_t> optimizer(exec, model.parameter_count(), model.trainable_ranges(), train::adamw_config{});
  train::trainer_settings settings;
  settings.batch_size = 1;
  settings.sequence_length = 4;
  train::trainer<model_type, train::adamw<cpu::par_t>, train::fp32, cpu::par_t, train::warmup_cosine_schedule,
                 train::mpi_communicator>
      trainer(model, optimizer, train::warmup_cosine_schedule{1e-3f, 1e-4f, 1, 10}, settings, world);
  const auto p = model.parameters(), q = rank0.parameters();
  CHECK(std::memcmp(p.data(), q.data(), std::size_t(p.size()) * sizeof(float)) == 0);
  CHECK(trainer.tokens_per_step() == index_t(world.size()) * 4);
}

TEMPLATE_TEST_CASE("ZeRO-1 trains as every rank holding the whole optimizer state", "[train][mpi][zero]", llama_shape,
                   gpt2_shape) {
  const train::mpi_communicator world;
  run_settings s;
  SECTION("plain steps") {}
  SECTION("two micro-batches per step") { s.accumulation = 2; }
  // Frozen tensors between trainable ones: the parameters are all-gathered
  // through a packed copy.
  SECTION("embeddings and the first block frozen") { s.frozen = {"token_embedding.*", "blocks.0.*"}; }
  INFO("ranks " << world.size() << ", accumulation " << s.accumulation << ", frozen tensors " << s.frozen.size());
  const auto replicated = train_steps<TestType>(s, s.batch_size, world);
  s.zero_1 = true;
  const auto sharded = train_steps<TestType>(s, s.batch_size, world);

  CHECK(same_on_every_rank(world, sharded.parameters));
  // The gradients are the same average (MPI's reduce-scatter sums as its
  // all-reduce does, or in another order); only the global norm is summed
  // shard by shard, which moves the clipping coefficient by an ulp or so:
  // the bound of one process against N ranks holds.
  const double difference = largest_difference(sharded.parameters, replicated.parameters);
  INFO("largest parameter difference " << difference);
  CHECK(difference <= 1e-4);
  CHECK(std::fabs(sharded.loss - replicated.loss) <= 1e-5 * std::fabs(replicated.loss));
  // Rank 0's gathered state is the replicated optimizer's (m within the
  // parameters' bound scaled to gradients, v likewise).
  if (world.rank() == 0) {
    REQUIRE(sharded.optimizer_state.size() == replicated.optimizer_state.size());
    for (std::size_t i = 0; i < sharded.optimizer_state.size(); ++i) {
      REQUIRE(sharded.optimizer_state[i].size() == replicated.optimizer_state[i].size());
      double largest = 0;
      for (float x : replicated.optimizer_state[i]) largest = std::max(largest, double(std::fabs(x)));
      INFO("state tensor " << i << ", largest element " << largest);
      CHECK(largest_difference(sharded.optimizer_state[i], replicated.optimizer_state[i]) <= 1e-3 * largest);
    }
  }
}

TEST_CASE("a ZeRO-1 rank takes its shard of a whole optimizer state, and refuses an optimizer of another shape",
          "[train][mpi][zero]") {
  const train::mpi_communicator world;
  using model_type = nn::model<llama_shape, cpu::par_t>;
  const auto exec = cpu::par.with_threads(1);
  model_type model(exec, 3);
  const auto shard = train::shard_of(model.trainable_ranges(), world.rank(), world.size());
  train::adamw<cpu::par_t> optimizer(exec, model.parameter_count(), shard.ranges, train::adamw_config{});
  train::trainer_settings settings;
  settings.batch_size = 1;
  settings.sequence_length = 4;
  settings.shard_optimizer_state = true;
  using trainer_type = train::trainer<model_type, train::adamw<cpu::par_t>, train::fp32, cpu::par_t,
                                      train::warmup_cosine_schedule, train::mpi_communicator>;
  trainer_type trainer(model, optimizer, train::warmup_cosine_schedule{1e-3f, 1e-4f, 1, 10}, settings, world);
  // A whole state (as a checkpoint holds it), element i = i + 1000 * tensor.
  auto whole = trainer.optimizer_state();
  REQUIRE(whole.size() == 2);
  for (std::size_t t = 0; t < whole.size(); ++t) {
    REQUIRE(whole[t].data.size() == model.gradient_count());
    for (index_t i = 0; i < whole[t].data.size(); ++i) whole[t].data(i) = float(i) + 1000.0f * float(t);
  }
  trainer.scatter_optimizer_state();
  const auto own = optimizer.state_tensors();
  bool exact = true;
  for (std::size_t t = 0; t < own.size(); ++t)
    for (index_t i = 0; i < own[t].data.size(); ++i)
      exact = exact && own[t].data(i) == float(shard.begin + i) + 1000.0f * float(t);
  CHECK(exact);
  // Gathered back, rank 0 holds the whole state again.
  for (auto& t : whole)
    for (index_t i = 0; i < t.data.size(); ++i) t.data(i) = -1.0f;
  trainer.gather_optimizer_state();
  if (world.rank() == 0) {
    bool back = true;
    for (std::size_t t = 0; t < whole.size(); ++t)
      for (index_t i = 0; i < whole[t].data.size(); ++i) back = back && whole[t].data(i) == float(i) + 1000.0f * float(t);
    CHECK(back);
  }

  // An optimizer over every trainable element is not this rank's shard
  // (with one rank it is: the shard is everything).
  train::adamw<cpu::par_t> whole_optimizer(exec, model.parameter_count(), model.trainable_ranges(),
                                           train::adamw_config{});
  if (world.size() > 1)
    CHECK_THROWS_WITH(trainer_type(model, whole_optimizer, train::warmup_cosine_schedule{1e-3f, 1e-4f, 1, 10},
                                   settings, world),
                      Catch::Contains("must be built for this rank's shard"));
}

TEST_CASE("shard_of cuts the packed trainable elements into aligned runs, one per rank", "[train][zero]") {
  // Three trainable slices with frozen gaps: 100 at 0, 37 at 200, 500 at 300.
  const std::vector<parameter_range> trainable = {{0, 100, true}, {200, 37, true}, {300, 500, true}};
  for (int ranks : {1, 2, 3, 4, 7}) {
    index_t covered = 0;
    std::vector<index_t> seen;
    for (int r = 0; r < ranks; ++r) {
      const auto shard = train::shard_of(trainable, r, ranks);
      INFO("rank " << r << " of " << ranks);
      CHECK(shard.begin == covered);
      CHECK(shard.begin % 16 == 0);
      CHECK(index_t(shard.counts.size()) == ranks);
      CHECK(shard.counts[std::size_t(r)] == shard.size());
      index_t in_ranges = 0;
      for (const auto& range : shard.ranges) {
        in_ranges += range.size;
        for (index_t i = 0; i < range.size; ++i) seen.push_back(range.offset + i);
      }
      CHECK(in_ranges == shard.size());
      covered = shard.end;
    }
    CHECK(covered == 637);
    // Every trainable parameter once, in order, and no frozen one.
    std::vector<index_t> expected;
    for (const auto& range : trainable)
      for (index_t i = 0; i < range.size; ++i) expected.push_back(range.offset + i);
    CHECK(seen == expected);
  }
  CHECK_THROWS_AS(train::shard_of(trainable, 2, 2), invalid_input);
}

TEST_CASE("the collectives: average, reduce-scatter, all-gather and gather over any split", "[train][mpi]") {
  const train::mpi_communicator world;
  const auto exec = cpu::par.with_threads(1);
  const int ranks = world.size(), me = world.rank();
  // Sizes around the exchange's block of 2^22 floats, and below one element per rank.
  for (index_t n : {index_t(1), index_t(3), index_t(1000), index_t(1) << 22, (index_t(1) << 23) + 5}) {
    INFO("n " << n << ", ranks " << ranks);
    // Small integers: every sum is exact, so the mean is known to the bit.
    auto value = [](int rank, index_t i) { return float(rank * 8 + int(i % 7)); };
    std::vector<float> x(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) x[std::size_t(i)] = value(me, i);
    world.average(exec, tensor_view<float, 1>(x.data(), {n}));
    bool exact = true;
    for (index_t i = 0; i < n; ++i) {
      double mean = 0;
      for (int r = 0; r < ranks; ++r) mean += value(r, i);
      exact = exact && x[std::size_t(i)] == float(mean / ranks);
    }
    CHECK(exact);

    // ZeRO-1's split: reduce-scatter this rank's part, then gather it back.
    std::vector<parameter_range> all = {{0, n, true}};
    const auto shard = train::shard_of(all, me, ranks);
    for (index_t i = 0; i < n; ++i) x[std::size_t(i)] = value(me, i);
    std::vector<float> mine(std::size_t(shard.size()));
    world.reduce_scatter_average(exec, tensor_view<const float, 1>(x.data(), {n}),
                                 tensor_view<float, 1>(mine.data(), {shard.size()}), shard.counts);
    exact = true;
    for (index_t i = 0; i < shard.size(); ++i) {
      double mean = 0;
      for (int r = 0; r < ranks; ++r) mean += value(r, shard.begin + i);
      exact = exact && mine[std::size_t(i)] == float(mean / ranks);
    }
    CHECK(exact);
    std::copy(mine.begin(), mine.end(), x.begin() + shard.begin);
    world.all_gather(exec, tensor_view<float, 1>(x.data(), {n}), shard.counts);
    std::vector<float> root(std::size_t(n), -1.0f);
    world.gather(exec, tensor_view<const float, 1>(mine.data(), {shard.size()}),
                 tensor_view<float, 1>(root.data(), {n}), shard.counts, 0);
    exact = true;
    for (index_t i = 0; i < n; ++i) {
      double mean = 0;
      for (int r = 0; r < ranks; ++r) mean += value(r, i);
      exact = exact && x[std::size_t(i)] == float(mean / ranks) && (me != 0 || root[std::size_t(i)] == x[std::size_t(i)]);
    }
    CHECK(exact);
  }
  CHECK(world.sum(double(me + 1)) == double(ranks * (ranks + 1) / 2));
  CHECK(world.average(double(me)) == double(ranks - 1) / 2);
}
