// Data-parallel training over MPI: mpi_environment (MPI's start and end, only
// when a launcher such as mpirun started the process) and mpi_communicator,
// the communicator policy over MPI_COMM_WORLD. Including this header needs
// <mpi.h>: link MPI (CMake: ctformer::mpi).
#pragma once

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
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

/// Thrown when the other ranks do not all reach a collective within the
/// communicator's timeout: one of them hung, or died without MPI noticing.
class rank_timeout : public error {
 public:
  explicit rank_timeout(const std::string& what) : error(what) {}
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
/// The reductions are ctformer's, over MPI's point-to-point messages: a
/// reduce-scatter sends each other rank its part of x (in blocks of 4 Mi
/// floats) and sums the copies it receives of its own part on the policy
/// (its own copy first, then the others in rank order), so each element is
/// summed once, by its owner, in an order no MPI algorithm choice changes;
/// an all-gather sends each rank its part; average() is the two over
/// near-equal parts, the same bits on every rank. The mean is the sum scaled
/// by 1 / size(): exact for 2 or 4 ranks. (On one machine this is also much
/// faster than MPI_Reduce_scatter, whose implementations reduce through their
/// own staging.)
///
/// Every wait has a deadline (timeout(), ten minutes unless set): a rank
/// whose messages do not come in time is named in a rank_timeout, so a rank
/// that hangs or dies unnoticed fails the job instead of stalling it.
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

  /// How long a rank waits for another's messages before it gives up with
  /// rank_timeout naming it. Shared by the copies of this communicator.
  void set_timeout(std::chrono::duration<double> timeout) { state_->timeout = timeout; }
  std::chrono::duration<double> timeout() const { return state_->timeout; }

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
  double average(double value) const { return sum(value) / double(size_); }

  /// The sum of every rank's value, added in rank order: the same bits on
  /// every rank. (Each rank sends its value to every other, so a late rank
  /// is named here too.)
  double sum(double value) const {
    if (size_ == 1) return value;
    std::vector<double> values(std::size_t(size_), 0.0);
    values[std::size_t(rank_)] = value;
    exchange exchanged(*this, "a sum of scalars (the loss or the gradient norm)");
    for (int k = 0; k < size_; ++k) {
      if (k == rank_) continue;
      exchanged.receive(&values[std::size_t(k)], 1, k);
      exchanged.send(&value, 1, k);
    }
    exchanged.finish();
    double total = 0;
    for (double v : values) total += v;
    return total;
  }

  /// x becomes root's x. x: (N) float, unit stride.
  template <execution_policy Exec>
  void broadcast(const Exec&, tensor_view<float, 1> x, int root) const {
    require_host_memory<Exec>();
    if (size_ == 1) return;
    require_contiguous(x, "broadcast");
    exchange exchanged(*this, "the broadcast of the parameters");
    for (index_t first = 0; first < x.size(); first += chunk) {
      const int count = int(std::min<index_t>(chunk, x.size() - first));
      for (int r = 0; r < size_; ++r) {
        if (r == rank_) continue;
        if (rank_ == root) exchanged.send(x.data() + first, count, r);
        else if (r == root) exchanged.receive(x.data() + first, count, r);
      }
    }
    exchanged.finish();
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
    auto& received = state_->received;
    received.resize(std::size_t(block) * (ranks - 1));
    auto slot = [&](std::size_t k) { return (k < me ? k : k - 1) * std::size_t(block); };  // rank k's copy
    for (int first = 0; first < largest; first += block) {
      exchange exchanged(*this, "the gradient exchange");
      for (std::size_t k = 0; k < ranks; ++k) {
        if (k == me) continue;
        const int outgoing = std::clamp(n[k] - first, 0, block), incoming = std::clamp(n[me] - first, 0, block);
        if (incoming > 0) exchanged.receive(received.data() + slot(k), incoming, int(k));
        if (outgoing > 0) exchanged.send(x.data() + at[k] + first, outgoing, int(k));
      }
      exchanged.finish();
      const index_t length = std::clamp(n[me] - first, 0, block);
      if (length == 0) continue;
      auto term = [&](std::size_t k) {
        return tensor_view<const float, 1>(k == me ? x.data() + at[me] + first : received.data() + slot(k), {length});
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
    exchange exchanged(*this, "the all-gather");
    for (int k = 0; k < size_; ++k) {
      if (k == rank_) continue;
      if (n[std::size_t(k)] > 0) exchanged.receive(x.data() + at[std::size_t(k)], n[std::size_t(k)], k);
      if (n[std::size_t(rank_)] > 0) exchanged.send(x.data() + at[std::size_t(rank_)], n[std::size_t(rank_)], k);
    }
    exchanged.finish();
  }

  /// root's x receives every rank's part (mine, counts[rank] elements); the
  /// other ranks' x is not touched.
  template <execution_policy Exec>
  void gather(const Exec&, tensor_view<const float, 1> mine, tensor_view<float, 1> x, std::span<const index_t> counts,
              int root) const {
    require_host_memory<Exec>();
    require_parts(rank_ == root ? x.size() : total_of(counts), mine.size(), counts, "gather");
    if (mine.data() != x.data() && rank_ == root)
      std::copy_n(mine.data(), mine.size(), x.data() + total_of(counts.first(std::size_t(rank_))));
    if (size_ == 1) return;
    const auto n = int_counts(counts);
    const auto at = displacements(n);
    exchange exchanged(*this, "the gather of the optimizer state");
    if (rank_ == root) {
      for (int k = 0; k < size_; ++k)
        if (k != root && n[std::size_t(k)] > 0) exchanged.receive(x.data() + at[std::size_t(k)], n[std::size_t(k)], k);
    } else if (n[std::size_t(rank_)] > 0) {
      exchanged.send(mine.data(), n[std::size_t(rank_)], root);
    }
    exchanged.finish();
  }

  /// Waits until every rank has called it.
  void barrier() const { sum(0.0); }

 private:
  static constexpr index_t chunk = index_t(1) << 30;
  static constexpr int block = 1 << 22;  // floats per part per exchange: bounds the receive buffer
  static constexpr int tag = 0x5ca1;

  // What copies of a communicator share: the deadline, and the buffer the
  // other ranks' copies of this rank's part arrive in (one block each).
  struct shared_state {
    std::chrono::duration<double> timeout{600.0};
    std::vector<float> received;
  };

  // One round of point-to-point messages, each tagged with its peer, waited
  // for together.
  class exchange {
   public:
    exchange(const mpi_communicator& c, const char* what) : c_(c), what_(what) {}
    exchange(const exchange&) = delete;
    exchange& operator=(const exchange&) = delete;
    ~exchange() {
      // Left by an exception: the job is ending; cancel what is still posted.
      for (MPI_Request& r : requests_)
        if (r != MPI_REQUEST_NULL) MPI_Cancel(&r);
    }
    template <class T>
    void send(const T* data, int count, int peer) {
      post(MPI_Isend(data, count, type_of<T>(), peer, tag, c_.comm_, &next()), "MPI_Isend", peer);
    }
    template <class T>
    void receive(T* data, int count, int peer) {
      post(MPI_Irecv(data, count, type_of<T>(), peer, tag, c_.comm_, &next()), "MPI_Irecv", peer);
    }
    void finish() {
      c_.wait(requests_, peers_, what_);
      requests_.clear();
      peers_.clear();
    }

   private:
    template <class T>
    static MPI_Datatype type_of() {
      static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "ctformer: exchanges carry floats or doubles");
      return std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
    }
    MPI_Request& next() {
      requests_.push_back(MPI_REQUEST_NULL);
      return requests_.back();
    }
    void post(int code, const char* call, int peer) {
      peers_.push_back(peer);
      detail::check_mpi(code, call);
    }
    const mpi_communicator& c_;
    const char* what_;
    std::vector<MPI_Request> requests_;
    std::vector<int> peers_;
  };

  // Polls the requests until all are done or the deadline passes; then
  // names the peers whose messages are still outstanding.
  void wait(std::span<MPI_Request> requests, const std::vector<int>& peers, const char* what) const {
    const auto start = std::chrono::steady_clock::now();
    for (long spins = 0;; ++spins) {
      int done = 0;
      detail::check_mpi(MPI_Testall(int(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE), "MPI_Testall");
      if (done) return;
      // MPI moves the data inside these calls: spin, and only after a second
      // (a rank that far behind is late anyway) poll gently.
      if (spins < 100000 && (spins & 1023) != 0) continue;
      const auto waited = std::chrono::steady_clock::now() - start;
      if (waited > state_->timeout) throw timed_out(requests, peers, what);
      if (waited > std::chrono::seconds(1)) std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

  rank_timeout timed_out(std::span<MPI_Request> requests, const std::vector<int>& peers, const char* what) const {
    std::vector<int> late;
    for (std::size_t i = 0; i < peers.size(); ++i) {
      int done = 0;
      MPI_Test(&requests[i], &done, MPI_STATUS_IGNORE);
      if (!done && std::find(late.begin(), late.end(), peers[i]) == late.end()) late.push_back(peers[i]);
    }
    std::string names;
    for (int r : late) names += (names.empty() ? "" : ", ") + std::to_string(r);
    const std::string seconds = std::to_string(int(state_->timeout.count()));
    if (late.empty())
      return rank_timeout("ctformer::train: rank " + std::to_string(rank_) + " waited " + seconds + " s at " + what +
                          " for the other ranks: one of them hung, or died without MPI noticing");
    return rank_timeout("ctformer::train: rank " + names + " did not answer rank " + std::to_string(rank_) + " at " +
                        what + " within " + seconds + " s: hung, or dead without MPI noticing");
  }

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
  // Where each part starts (in elements; pointers take them, so no int limit).
  static std::vector<std::size_t> displacements(const std::vector<int>& n) {
    std::vector<std::size_t> at(n.size(), 0);
    for (std::size_t r = 1; r < n.size(); ++r) at[r] = at[r - 1] + std::size_t(n[r - 1]);
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
  std::shared_ptr<shared_state> state_ = std::make_shared<shared_state>();
};

static_assert(communicator<mpi_communicator, cpu::par_t>);
static_assert(communicator<single_process, cpu::par_t>);

}  // namespace ctformer::train
