// thread_pool: the persistent worker threads under parallel_for, one pool per
// calling thread. Workers spin briefly between jobs, then sleep on a futex.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include "ctformer/kernels/cpu/detail/intrinsics.hpp"
#endif

namespace ctformer::cpu::detail {

/// One iteration of a spin-wait: tells the core the loop is a wait, so it
/// yields pipeline resources to its SMT sibling and leaves the loop without a
/// memory-order mis-speculation when the awaited line changes.
inline void spin_pause() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

/// Why not OpenMP's parallel regions: a decode step forks and joins about 60
/// times, tens of microseconds apart, and libgomp's fork/join costs several
/// times this pool's (docs/performance.md).
///
/// A job's members are claimed, not assigned: the caller runs member 0, then
/// every thread (caller included) takes the next unclaimed member until none
/// is left. A worker that is asleep, or descheduled because another program
/// holds its core, therefore delays nobody: the caller runs its members
/// instead, and a late worker finds nothing left to do. Two programs of two
/// threads each on two cores both run at one-thread speed, where with
/// libgomp each waits for the other's time slices (docs/performance.md).
///
/// It keeps OpenMP's contract where kernels rely on it: each calling thread
/// has its own workers (two application threads never share a team), and a
/// call made from inside a job runs on its caller alone.
class thread_pool {
 public:
  /// How long an idle worker (or a caller waiting for its workers) spins
  /// before it sleeps: longer than the gaps inside a decode step (tens of
  /// microseconds), short enough that an idle pool gives the cores back
  /// almost at once. Teams larger than the machine's hardware threads do not
  /// spin at all: a spinning thread would hold a core its partner needs.
  static constexpr std::chrono::microseconds spin_time{200};

  thread_pool() = default;
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() {
    if (workers_.empty()) return;
    stopping_.store(true, std::memory_order_relaxed);
    ticket_.fetch_add(generation_step);
    ticket_.notify_all();
    for (std::thread& worker : workers_) worker.join();
  }

  /// The pool owned by the calling thread, started on first use.
  static thread_pool& of_this_thread() {
    thread_local thread_pool pool;
    return pool;
  }

  /// True while the calling thread runs a member of some pool's job.
  static bool running_a_job() { return running_flag(); }

  /// Calls task(member, team) once for every member in [0, team), and
  /// returns when every call has returned. Member 0 runs on the calling
  /// thread, first; the others on whichever thread claims them first, this
  /// pool's workers (started as needed) or the caller. From inside a job
  /// (nested parallelism) every member runs on the calling thread, in order.
  /// If members throw, the first exception is rethrown once all have ended.
  template <class Task>
  void run(int team, Task& task) {
    static_assert(std::is_invocable_v<Task&, int, int>, "ctformer: a pool task is called as task(member, team)");
    if (team <= 1 || running_flag()) {
      for (int member = 0; member < team; ++member) task(member, team);
      return;
    }
    grow_to(team - 1);
    spin_.store(team <= hardware_threads() ? spin_time.count() : 0, std::memory_order_relaxed);
    call_ = [](void* erased, int member, int size) { (*static_cast<Task*>(erased))(member, size); };
    task_ = &task;
    ended_.store(0, std::memory_order_relaxed);
    const std::uint64_t generation = (ticket_.load(std::memory_order_relaxed) & ~low_mask) + generation_step;
    claim_.store(generation | 1, std::memory_order_release);  // member 0 is the caller's
    // seq_cst pairs with a worker's increment of sleepers_: either this load
    // sees it and wakes the worker, or the worker's wait sees the new ticket.
    ticket_.store(generation | std::uint64_t(team), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) ticket_.notify_all();
    run_member(0, team);
    for (int member; (member = claim(generation, team)) >= 0;) run_member(member, team);
    await_members(team);
    if (failed_.load(std::memory_order_relaxed)) {
      std::exception_ptr error = std::exchange(error_, nullptr);
      failed_.store(false, std::memory_order_relaxed);
      std::rethrow_exception(error);
    }
  }

  /// Workers started so far (a team of n starts n - 1).
  int worker_count() const { return int(workers_.size()); }

 private:
  // ticket_ packs a job's generation (high 32 bits) with its team size,
  // claim_ the same generation with the next unclaimed member: a worker that
  // wakes late compares generations, so it can neither run a member of a job
  // that has ended nor read the fields of the next job before it is posted.
  static constexpr std::uint64_t low_mask = 0xffff'ffffu;
  static constexpr std::uint64_t generation_step = std::uint64_t(1) << 32;

  static bool& running_flag() {
    thread_local bool running = false;
    return running;
  }

  static int hardware_threads() {
    static const int count = std::max(1, int(std::thread::hardware_concurrency()));
    return count;
  }

  /// The next unclaimed member of the job of `generation`, or -1 when every
  /// member is claimed or that job is over.
  int claim(std::uint64_t generation, int team) {
    std::uint64_t next = claim_.load(std::memory_order_acquire);
    while ((next & ~low_mask) == generation && int(next & low_mask) < team)
      if (claim_.compare_exchange_weak(next, next + 1, std::memory_order_acq_rel, std::memory_order_acquire))
        return int(next & low_mask);
    return -1;
  }

  void run_member(int member, int team) {
    {
      struct running_guard {
        running_guard() { running_flag() = true; }
        ~running_guard() { running_flag() = false; }
      } guard;
      try {
        call_(task_, member, team);
      } catch (...) {
        if (!failed_.exchange(true, std::memory_order_acq_rel)) error_ = std::current_exception();
      }
    }
    // seq_cst pairs with the caller's store to caller_sleeping_: either it
    // sees this increment, or this load sees that it sleeps.
    if (ended_.fetch_add(1, std::memory_order_seq_cst) + 1 == team && caller_sleeping_.load(std::memory_order_seq_cst))
      ended_.notify_one();
  }

  void grow_to(int workers) {
    // Only the owning thread posts jobs, and it is between jobs here: a new
    // worker starts from the current ticket and waits for the next.
    while (int(workers_.size()) < workers) {
      const std::uint64_t seen = ticket_.load(std::memory_order_relaxed);
      workers_.emplace_back([this, seen] { work(seen); });
    }
  }

  void work(std::uint64_t seen) {
    for (;;) {
      seen = await_ticket(seen);
      if (stopping_.load(std::memory_order_relaxed)) return;
      const std::uint64_t generation = seen & ~low_mask;
      const int team = int(seen & low_mask);
      for (int member; (member = claim(generation, team)) >= 0;) run_member(member, team);
    }
  }

  /// Spins up to spin_ microseconds until `done()`, checking the clock every
  /// 64 pauses; returns whether it became true.
  template <class Done>
  bool spin_until(Done done) const {
    if (done()) return true;
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_.load(std::memory_order_relaxed));
    for (unsigned spins = 1;; ++spins) {
      spin_pause();
      if (done()) return true;
      if (spins % 64 == 0 && std::chrono::steady_clock::now() > give_up) return false;
    }
  }

  std::uint64_t await_ticket(std::uint64_t seen) {
    std::uint64_t now = seen;
    if (spin_until([&] { return (now = ticket_.load(std::memory_order_acquire)) != seen; })) return now;
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while ((now = ticket_.load(std::memory_order_seq_cst)) == seen) ticket_.wait(seen, std::memory_order_seq_cst);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return now;
  }

  void await_members(int team) {
    if (spin_until([&] { return ended_.load(std::memory_order_acquire) == team; })) return;
    caller_sleeping_.store(true, std::memory_order_seq_cst);
    for (int ended; (ended = ended_.load(std::memory_order_seq_cst)) != team;)
      ended_.wait(ended, std::memory_order_seq_cst);
    caller_sleeping_.store(false, std::memory_order_relaxed);
  }

  std::vector<std::thread> workers_;
  void (*call_)(void*, int, int) = nullptr;  // the posted job, stable until every member has ended
  void* task_ = nullptr;
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
  std::atomic<bool> stopping_{false};  // stored before the last ticket, read after it
  std::atomic<long> spin_{spin_time.count()};
  std::atomic<bool> caller_sleeping_{false};
  // Each on its own cache line: workers poll ticket_ while members claim from
  // claim_ and count themselves out on ended_.
  alignas(64) std::atomic<std::uint64_t> ticket_{0};
  alignas(64) std::atomic<std::uint64_t> claim_{0};
  alignas(64) std::atomic<int> ended_{0};
  alignas(64) std::atomic<int> sleepers_{0};
};

}  // namespace ctformer::cpu::detail
