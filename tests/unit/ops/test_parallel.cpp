// The thread pool under every CPU kernel (kernels/cpu/thread_pool.hpp) and
// the loops of kernels/cpu/parallel.hpp: every index exactly once, workers
// running beside the caller, nested calls on the caller, exceptions carried
// to the caller, sleeping workers woken, one pool per application thread.
// Counts are exact: nothing here is numeric. Catch2's assertions are not thread-safe, so
// members only record, and the calling thread asserts.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ctformer/kernels/cpu/parallel.hpp"

using namespace ctformer;
using cpu::detail::parallel_for;
using cpu::detail::parallel_for_shared;
using cpu::detail::parallel_ranges;
using cpu::detail::parallel_team;
using cpu::detail::thread_pool;

TEST_CASE("parallel_for calls every index exactly once", "[parallel]") {
  for (int threads : {1, 2, 3, 4, 8})
    for (index_t n : {0, 1, 2, 3, 7, 1000}) {
      std::vector<std::atomic<int>> calls(static_cast<std::size_t>(n));
      parallel_for(cpu::par.with_threads(threads), n, [&](index_t i) { calls[std::size_t(i)].fetch_add(1); });
      for (index_t i = 0; i < n; ++i) REQUIRE(calls[std::size_t(i)].load() == 1);
    }
}

TEST_CASE("parallel_team runs each member once, member 0 on the caller", "[parallel]") {
  for (int threads : {2, 3, 5}) {
    for (int wanted : {1, 2, 3, 5, 9}) {
      const int team = std::min(wanted, threads);
      std::mutex lock;
      std::vector<int> calls(std::size_t(team), 0);
      std::thread::id first;
      int wrong = 0;
      parallel_team(cpu::par.with_threads(threads), wanted, [&](int member, int size) {
        std::lock_guard guard(lock);
        if (size != team || member < 0 || member >= team) {
          ++wrong;
          return;
        }
        ++calls[std::size_t(member)];
        if (member == 0) first = std::this_thread::get_id();
      });
      CHECK(wrong == 0);
      for (int c : calls) CHECK(c == 1);
      CHECK(first == std::this_thread::get_id());
    }
  }
}

TEST_CASE("The pool's workers run members while the caller runs its own", "[parallel]") {
  // Member 0 (the caller's) waits for member 1 to start: only a worker can
  // run it. The wait gives up after 20 s so that a broken pool fails rather
  // than hangs.
  for (int round = 0; round < 50; ++round) {
    std::atomic<bool> second_started{false}, gave_up{false};
    std::thread::id ids[2];
    parallel_team(cpu::par.with_threads(2), 2, [&](int member, int) {
      ids[member] = std::this_thread::get_id();
      if (member == 1) {
        second_started.store(true);
        return;
      }
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (!second_started.load())
        if (std::chrono::steady_clock::now() > give_up) {
          gave_up.store(true);
          return;
        }
    });
    REQUIRE_FALSE(gave_up.load());
    CHECK(ids[0] == std::this_thread::get_id());
    CHECK(ids[1] != ids[0]);
  }
}

TEST_CASE("parallel_for_shared and parallel_ranges cover the range exactly once", "[parallel]") {
  for (int threads : {1, 2, 4})
    for (index_t n : {0, 1, 5, 333}) {
      std::vector<std::atomic<int>> calls(static_cast<std::size_t>(n));
      parallel_for_shared(cpu::par.with_threads(threads), n, 3, [&](index_t i) { calls[std::size_t(i)].fetch_add(1); });
      for (index_t i = 0; i < n; ++i) REQUIRE(calls[std::size_t(i)].exchange(0) == 1);

      std::atomic<int> highest_thread{0};
      const int used = parallel_ranges(cpu::par.with_threads(threads), n, [&](int thread, index_t begin, index_t end) {
        for (int seen = highest_thread.load(); thread > seen && !highest_thread.compare_exchange_weak(seen, thread);) {
        }
        for (index_t i = begin; i < end; ++i) calls[std::size_t(i)].fetch_add(1);
      });
      CHECK(used == (n >= 2 ? threads : 1));
      CHECK(highest_thread.load() < used);
      for (index_t i = 0; i < n; ++i) REQUIRE(calls[std::size_t(i)].load() == 1);
    }
}

TEST_CASE("A parallel call inside a parallel call runs on its caller", "[parallel]") {
  // As OpenMP's inactive nested regions: the inner loop does not wait for
  // workers that are busy running the outer one (which would deadlock).
  const auto exec = cpu::par.with_threads(2);
  std::vector<std::atomic<int>> calls(4 * 50);
  std::atomic<int> inner_off_caller{0}, outside_a_job{0};
  parallel_for(exec, 4, [&](index_t outer) {
    const auto caller = std::this_thread::get_id();
    if (!thread_pool::running_a_job()) outside_a_job.fetch_add(1);
    parallel_for(exec, 50, [&](index_t inner) {
      calls[std::size_t(outer * 50 + inner)].fetch_add(1);
      if (std::this_thread::get_id() != caller) inner_off_caller.fetch_add(1);
    });
  });
  CHECK_FALSE(thread_pool::running_a_job());
  CHECK(outside_a_job.load() == 0);
  CHECK(inner_off_caller.load() == 0);
  for (auto& c : calls) REQUIRE(c.load() == 1);
}

TEST_CASE("An exception in any member reaches the caller, and the pool stays usable", "[parallel]") {
  const auto exec = cpu::par.with_threads(3);
  for (int thrower : {0, 1, 2}) {
    std::atomic<int> finished{0};
    try {
      parallel_team(exec, 3, [&](int member, int) {
        if (member == thrower) throw std::runtime_error("member " + std::to_string(member) + " failed");
        finished.fetch_add(1);
      });
      FAIL("no exception reached the caller");
    } catch (const std::runtime_error& e) {
      CHECK(std::string(e.what()) == "member " + std::to_string(thrower) + " failed");
    }
    CHECK(finished.load() == 2);  // the other members ran to the end before the rethrow
  }
  std::atomic<index_t> sum{0};
  parallel_for(exec, 100, [&](index_t i) { sum.fetch_add(i); });
  CHECK(sum.load() == 4950);
}

TEST_CASE("Many short jobs of changing team sizes", "[parallel]") {
  // Workers outside a job's team must not run it, nor miss the next one.
  const auto exec = cpu::par.with_threads(4);
  std::atomic<long> total{0};
  long expected = 0;
  for (int job = 0; job < 20000; ++job) {
    const int wanted = 2 + job % 3;
    parallel_team(exec, wanted, [&](int member, int) { total.fetch_add(member + 1); });
    expected += long(wanted) * (wanted + 1) / 2;
  }
  CHECK(total.load() == expected);
}

TEST_CASE("Sleeping workers and a sleeping caller are woken", "[parallel]") {
  // Pauses longer than the pool's spin time put the workers to sleep between
  // jobs; a slow member puts the caller to sleep at the end of one.
  const auto exec = cpu::par.with_threads(3);
  const auto pause = 5 * thread_pool::spin_time;
  for (int round = 0; round < 5; ++round) {
    std::this_thread::sleep_for(pause);
    std::atomic<int> calls{0};
    parallel_team(exec, 3, [&](int member, int) {
      if (member == round % 3) std::this_thread::sleep_for(pause);
      calls.fetch_add(1);
    });
    REQUIRE(calls.load() == 3);
  }
}

TEST_CASE("Each application thread has its own pool", "[parallel]") {
  // Two threads running jobs at the same time, each with workers, and each
  // pool joined when its thread ends.
  const auto exec = cpu::par.with_threads(2);
  std::atomic<long> sums[2] = {0, 0};
  int workers[2] = {0, 0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 2; ++c)
    callers.emplace_back([&, c] {
      for (int job = 0; job < 2000; ++job) parallel_for(exec, 10, [&](index_t i) { sums[c].fetch_add(i); });
      workers[c] = thread_pool::of_this_thread().worker_count();
    });
  for (auto& t : callers) t.join();
  CHECK(workers[0] == 1);
  CHECK(workers[1] == 1);
  CHECK(sums[0].load() == 2000 * 45);
  CHECK(sums[1].load() == 2000 * 45);
}
