// The communicator policy of data-parallel training: what every rank of a job
// shares (gradient averages, the starting parameters, ZeRO-1's shards), the
// single-process communicator that makes a one-process trainer pay nothing
// for it, and optimizer_shard, the slice of the state one rank owns.
#pragma once

#include <algorithm>
#include <concepts>
#include <span>
#include <string>
#include <vector>

#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/ops/ops.hpp"

namespace ctformer::train {

/// What the trainer asks of a communicator over the ranks of one job, all of
/// them collective (every rank calls them in the same order):
/// - rank() in [0, size());
/// - average(exec, x): x becomes the element-wise mean of every rank's x,
///   the same bits on every rank (so clipping and the optimizer step stay
///   identical and the replicas never drift apart);
/// - average(value): the mean of a scalar (the step's loss);
/// - broadcast(exec, x, root): x becomes root's x (the starting parameters);
/// and for ZeRO-1 (optimizer state sharded), with counts[r] the elements
/// rank r owns, laid end to end in rank order:
/// - reduce_scatter_average(exec, x, mine, counts): mine becomes the mean over
///   the ranks of this rank's part of x;
/// - all_gather(exec, x, counts): every rank's part of x (in place) reaches
///   every rank;
/// - gather(exec, mine, x, counts, root): root's x receives every rank's part;
/// - sum(value): the sum of a scalar, the same on every rank.
template <class C, class Exec>
concept communicator = requires(C& c, const Exec& exec, tensor_view<float, 1> x, tensor_view<const float, 1> cx,
                                std::span<const index_t> counts, double value) {
  { c.rank() } -> std::convertible_to<int>;
  { c.size() } -> std::convertible_to<int>;
  c.average(exec, x);
  { c.average(value) } -> std::convertible_to<double>;
  { c.sum(value) } -> std::convertible_to<double>;
  c.broadcast(exec, x, 0);
  c.reduce_scatter_average(exec, cx, x, counts);
  c.all_gather(exec, x, counts);
  c.gather(exec, cx, x, counts, 0);
};

/// One process, no communication: the default of train::trainer. Its only
/// part of a buffer is the whole buffer.
struct single_process {
  static constexpr int rank() { return 0; }
  static constexpr int size() { return 1; }
  template <execution_policy Exec>
  void average(const Exec&, tensor_view<float, 1>) const {}
  double average(double value) const { return value; }
  double sum(double value) const { return value; }
  template <execution_policy Exec>
  void broadcast(const Exec&, tensor_view<float, 1>, int) const {}
  template <execution_policy Exec>
  void reduce_scatter_average(const Exec& exec, tensor_view<const float, 1> x, tensor_view<float, 1> mine,
                              std::span<const index_t>) const {
    if (mine.data() != x.data()) ops::copy(exec, tensor_view<const float, 1>(x.data(), {mine.size()}), mine);
  }
  template <execution_policy Exec>
  void all_gather(const Exec&, tensor_view<float, 1>, std::span<const index_t>) const {}
  template <execution_policy Exec>
  void gather(const Exec& exec, tensor_view<const float, 1> mine, tensor_view<float, 1> x, std::span<const index_t>,
              int) const {
    if (mine.data() != x.data()) ops::copy(exec, mine, tensor_view<float, 1>(x.data(), {mine.size()}));
  }
};

/// The part of the optimizer's state one rank owns under ZeRO-1: the packed
/// trainable elements (nn::model::gradients()'s layout) cut into size() runs
/// of near-equal length, rank r owning run r. `ranges` are the parameter
/// slices of this rank's run, what its optimizer is built for:
///   adamw<...> optimizer(exec, model.parameter_count(), shard.ranges, config);
struct optimizer_shard {
  index_t begin = 0, end = 0;          ///< this rank's run of the packed elements
  std::vector<index_t> counts;         ///< every rank's run length, in rank order
  std::vector<parameter_range> ranges; ///< this rank's run as parameter slices

  index_t size() const { return end - begin; }
};

/// Cuts the packed trainable elements of `trainable` (sorted, disjoint
/// parameter slices, as nn::model::trainable_ranges gives) into `ranks` runs
/// and returns rank `rank`'s. Runs start on multiples of 16 elements (64
/// bytes), so no two ranks' updates share a cache line.
inline optimizer_shard shard_of(std::span<const parameter_range> trainable, int rank, int ranks) {
  if (ranks <= 0 || rank < 0 || rank >= ranks)
    throw invalid_input("ctformer::train::shard_of: rank " + std::to_string(rank) + " is outside [0, " +
                        std::to_string(ranks) + ")");
  index_t total = 0;
  for (const auto& r : trainable) total += r.size;
  constexpr index_t align = 16;
  const index_t per_rank = (total + ranks - 1) / ranks, step = (per_rank + align - 1) / align * align;
  optimizer_shard shard;
  for (int r = 0; r < ranks; ++r) {
    const index_t lo = std::min(total, index_t(r) * step), hi = std::min(total, index_t(r + 1) * step);
    shard.counts.push_back(hi - lo);
    if (r == rank) shard.begin = lo, shard.end = hi;
  }
  index_t packed = 0;  // where the current slice starts among the packed elements
  for (const auto& r : trainable) {
    const index_t lo = std::max(packed, shard.begin), hi = std::min(packed + r.size, shard.end);
    if (lo < hi) shard.ranges.push_back({r.offset + (lo - packed), hi - lo, r.decay});
    packed += r.size;
  }
  return shard;
}

}  // namespace ctformer::train
