// Data-parallel training over MPI: mpi_environment (MPI's start and end, only
// when a launcher such as mpirun started the process) and mpi_communicator,
// the communicator policy over MPI_COMM_WORLD. Including this header needs
// <mpi.h>: link MPI (CMake: ctformer::mpi).
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/ops/ops.hpp"
#include "ctformer/train/communicator.hpp"

namespace ctformer::train {

/// An MPI call that failed, with MPI's own words for why.
class mpi_error : public error {
 public:
  mpi_error(const std::string& call, int code) : error("ctformer::train: " + call + " failed: " + describe(code)) {}

 private:
  static std::string describe(int code) {
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
    return std::string(text, std::size_t(length));
  }
};

namespace detail {
inline void check_mpi(int code, const char* call) {
  if (code != MPI_SUCCESS) throw mpi_error(call, code);
}
}  // namespace detail

/// Starts MPI for the life of this object when the process was started by an
/// MPI launcher (mpirun, mpiexec, srun: they set the variables checked
/// below), and ends it after. A process started on its own does not start
/// MPI at all, so a program built with MPI runs as one process exactly as
/// one built without it.
class mpi_environment {
 public:
  mpi_environment(int& argc, char**& argv) {
    int initialized = 0;
    detail::check_mpi(MPI_Initialized(&initialized), "MPI_Initialized");
    if (initialized || !launched_by_mpi()) return;
    int provided = 0;
    // Only the thread that made this object calls MPI (the kernels' OpenMP
    // threads never do).
    detail::check_mpi(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    owns_ = true;
  }
  ~mpi_environment() {
    if (owns_) MPI_Finalize();
  }
  mpi_environment(const mpi_environment&) = delete;
  mpi_environment& operator=(const mpi_environment&) = delete;

  /// Whether this process runs under an MPI launcher.
  static bool launched_by_mpi() {
    for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"})
      if (std::getenv(name) != nullptr) return true;
    return false;
  }

 private:
  bool owns_ = false;
};

/// The communicator policy over an MPI communicator (MPI_COMM_WORLD by
/// default), for policies whose memory the host reads. When MPI has not been
/// started (a process on its own) it is one process of rank 0 and every
/// collective returns at once.
///
/// The reductions are ctformer's, over MPI's data movement: a reduce-scatter
/// is an MPI_Alltoallv (each rank receives the others' copies of its part,
/// in blocks of 4 Mi floats) and a sum of the copies on the policy (its own
/// copy first, then the others in rank order), so each element is summed
/// once, by its owner, in an order that does not depend on MPI's choice of
/// algorithm; average() is that
/// reduce-scatter over near-equal parts and an MPI_Allgatherv, the same
/// bits on every rank. (Moving the data with MPI and summing locally is
/// also much faster, on one machine, than MPI_Reduce_scatter, whose
/// implementations reduce through their own staging.) The mean is the sum
/// scaled by 1 / size(): exact for 2 or 4 ranks.
class mpi_communicator {
 public:
  mpi_communicator() {
    int initialized = 0;
    detail::check_mpi(MPI_Initialized(&initialized), "MPI_Initialized");
    if (initialized) attach(MPI_COMM_WORLD);
  }
  explicit mpi_communicator(MPI_Comm comm) { attach(comm); }

  int rank() const { return rank_; }
  int size() const { return size_; }
  /// Whether MPI carries this communicator (false: a process on its own).
  bool uses_mpi() const { return comm_ != MPI_COMM_NULL; }

  /// x becomes the mean of every rank's x, the same bits on every rank.
  /// x: (N) float, unit stride.
  template <execution_policy Exec>
  void average(const Exec& exec, tensor_view<float, 1> x) const {
    require_host_memory<Exec>();
    if (size_ == 1) return;
    require_contiguous(x, "average");
    const auto counts = equal_parts(x.size());
    index_t mine = 0;
    for (int r = 0; r < rank_; ++r) mine += counts[std::size_t(r)];
    // The rank's own part is summed in place (its copy is the rank's term).
    reduce_scatter_average(exec, tensor_view<const float, 1>(x.data(), {x.size()}),
                           tensor_view<float, 1>(x.data() + mine, {counts[std::size_t(rank_)]}), counts);
    all_gather(exec, x, counts);
  }

  /// The mean of every rank's value.
  double average(double value) const {
    if (size_ == 1) return value;
    double sum = 0;
    detail::check_mpi(MPI_Allreduce(&value, &sum, 1, MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce");
    return sum / double(size_);
  }

  /// x becomes root's x. x: (N) float, unit stride.
  template <execution_policy Exec>
  void broadcast(const Exec&, tensor_view<float, 1> x, int root) const {
    require_host_memory<Exec>();
    if (size_ == 1) return;
    require_contiguous(x, "broadcast");
    for (index_t first = 0; first < x.size(); first += chunk) {
      const int count = int(std::min<index_t>(chunk, x.size() - first));
      detail::check_mpi(MPI_Bcast(x.data() + first, count, MPI_FLOAT, root, comm_), "MPI_Bcast");
    }
  }

  /// The sum of every rank's value.
  double sum(double value) const {
    if (size_ == 1) return value;
    double total = 0;
    detail::check_mpi(MPI_Allreduce(&value, &total, 1, MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce");
    return total;
  }

  /// mine becomes the mean over the ranks of this rank's part of x (the
  /// parts laid end to end in rank order, counts[r] elements for rank r).
  /// x: (sum of counts) float; mine: (counts[rank]) float; unit strides.
  template <execution_policy Exec>
  void reduce_scatter_average(const Exec& exec, tensor_view<const float, 1> x, tensor_view<float, 1> mine,
                              std::span<const index_t> counts) const {
    require_host_memory<Exec>();
    require_parts(x.size(), mine.size(), counts, "reduce_scatter_average");
    if (size_ == 1) {
      if (mine.data() != x.data()) std::copy_n(x.data(), mine.size(), mine.data());
      return;
    }
    const auto n = int_counts(counts);
    const auto at = displacements(n);
    const std::size_t ranks = std::size_t(size_), me = std::size_t(rank_);
    const int largest = *std::max_element(n.begin(), n.end());
    received_.resize(std::size_t(block) * (ranks - 1));
    std::vector<int> send(ranks), send_at(ranks), receive(ranks), receive_at(ranks);
    auto slot = [&](std::size_t k) { return (k < me ? k : k - 1) * std::size_t(block); };  // rank k's copy
    for (int first = 0; first < largest; first += block) {
      for (std::size_t k = 0; k < ranks; ++k) {
        send[k] = k == me ? 0 : std::clamp(n[k] - first, 0, block);
        send_at[k] = send[k] > 0 ? at[k] + first : 0;
        receive[k] = k == me ? 0 : std::clamp(n[me] - first, 0, block);
        receive_at[k] = k == me ? 0 : int(slot(k));
      }
      detail::check_mpi(MPI_Alltoallv(x.data(), send.data(), send_at.data(), MPI_FLOAT, received_.data(),
                                      receive.data(), receive_at.data(), MPI_FLOAT, comm_),
                        "MPI_Alltoallv");
      const index_t length = std::clamp(n[me] - first, 0, block);
      if (length == 0) continue;
      auto term = [&](std::size_t k) {
        return tensor_view<const float, 1>(k == me ? x.data() + at[me] + first : received_.data() + slot(k), {length});
      };
      // The rank's own copy first (out may be that copy, as in average()),
      // then the others in rank order.
      const tensor_view<float, 1> out(mine.data() + first, {length});
      bool started = false;
      for (std::size_t k = 0; k < ranks; ++k) {
        if (k == me) continue;
        ops::add(exec, started ? as_const(out) : term(me), term(k), out);
        started = true;
      }
    }
    ops::scale(exec, 1.0f / float(size_), mine);
  }

  /// Every rank's part of x reaches every rank, in place.
  template <execution_policy Exec>
  void all_gather(const Exec&, tensor_view<float, 1> x, std::span<const index_t> counts) const {
    require_host_memory<Exec>();
    require_parts(x.size(), counts[std::size_t(rank_)], counts, "all_gather");
    if (size_ == 1) return;
    const auto n = int_counts(counts);
    const auto at = displacements(n);
    detail::check_mpi(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, x.data(), n.data(), at.data(), MPI_FLOAT,
                                     comm_),
                      "MPI_Allgatherv");
  }

  /// root's x receives every rank's part (mine, counts[rank] elements); the
  /// other ranks' x is not touched.
  template <execution_policy Exec>
  void gather(const Exec&, tensor_view<const float, 1> mine, tensor_view<float, 1> x, std::span<const index_t> counts,
              int root) const {
    require_host_memory<Exec>();
    require_parts(rank_ == root ? x.size() : total_of(counts), mine.size(), counts, "gather");
    if (size_ == 1) {
      if (mine.data() != x.data()) std::copy_n(mine.data(), mine.size(), x.data());
      return;
    }
    const auto n = int_counts(counts);
    const auto at = displacements(n);
    detail::check_mpi(MPI_Gatherv(mine.data(), n[std::size_t(rank_)], MPI_FLOAT, x.data(), n.data(), at.data(),
                                  MPI_FLOAT, root, comm_),
                      "MPI_Gatherv");
  }

  /// Waits until every rank has called it.
  void barrier() const {
    if (size_ > 1) detail::check_mpi(MPI_Barrier(comm_), "MPI_Barrier");
  }

 private:
  static constexpr index_t chunk = index_t(1) << 30;
  static constexpr int block = 1 << 22;  // floats per part per exchange: bounds the receive buffer

  // size() near-equal parts of n elements, each but the last a multiple of 16.
  std::vector<index_t> equal_parts(index_t n) const {
    const index_t per = ((n + size_ - 1) / size_ + 15) / 16 * 16;
    std::vector<index_t> counts;
    for (int r = 0; r < size_; ++r) counts.push_back(std::clamp<index_t>(n - index_t(r) * per, 0, per));
    return counts;
  }

  template <execution_policy Exec>
  static constexpr void require_host_memory() {
    static_assert(Exec::memory_space::host_accessible,
                  "ctformer: mpi_communicator reduces buffers the host can read; on a GPU policy use the NCCL "
                  "communicator");
  }
  static index_t total_of(std::span<const index_t> counts) {
    index_t total = 0;
    for (index_t c : counts) total += c;
    return total;
  }
  void require_parts(index_t whole, index_t mine, std::span<const index_t> counts, const char* what) const {
    if (index_t(counts.size()) != size_ || counts[std::size_t(rank_)] != mine || total_of(counts) != whole)
      throw shape_error(std::string("ctformer::train::mpi_communicator::") + what + ": " +
                        std::to_string(counts.size()) + " parts for " + std::to_string(size_) +
                        " ranks, this rank's of " + std::to_string(mine) + " elements, " + std::to_string(whole) +
                        " in all: the parts must be one per rank and add up to the buffer");
  }
  static std::vector<int> int_counts(std::span<const index_t> counts) {
    std::vector<int> n;
    for (index_t c : counts) {
      if (c > index_t(std::numeric_limits<int>::max()))
        throw invalid_input("ctformer::train::mpi_communicator: a part of " + std::to_string(c) +
                            " elements is more than MPI's int counts hold; use more ranks");
      n.push_back(int(c));
    }
    return n;
  }
  static std::vector<int> displacements(const std::vector<int>& n) {
    std::vector<int> at(n.size(), 0);
    long long offset = 0;
    for (std::size_t r = 0; r < n.size(); ++r) {
      if (offset > std::numeric_limits<int>::max())
        throw invalid_input("ctformer::train::mpi_communicator: a buffer of more than 2^31 elements needs more ranks");
      at[r] = int(offset);
      offset += n[r];
    }
    return at;
  }
  static void require_contiguous(tensor_view<float, 1> x, const char* what) {
    if (x.size() > 1 && x.stride(0) != 1)
      throw invalid_input(std::string("ctformer::train::mpi_communicator::") + what +
                          ": the buffer must have unit stride");
  }
  void attach(MPI_Comm comm) {
    comm_ = comm;
    // Errors come back as codes (thrown as mpi_error) instead of aborting
    // the job from inside MPI.
    detail::check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    detail::check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    detail::check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  mutable std::vector<float> received_;  // the other ranks' copies of this rank's part, one block each
};

static_assert(communicator<mpi_communicator, cpu::par_t>);
static_assert(communicator<single_process, cpu::par_t>);

}  // namespace ctformer::train
