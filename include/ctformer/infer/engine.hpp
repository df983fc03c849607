// infer::engine: requests in from any thread, tokens streamed back, one step
// thread that owns the model and its KV cache and runs ragged batches of
// prefill chunks and decode tokens under a batching policy.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "ctformer/core/error.hpp"
#include "ctformer/infer/batch.hpp"
#include "ctformer/infer/batching.hpp"
#include "ctformer/infer/kv_cache.hpp"
#include "ctformer/infer/metrics.hpp"
#include "ctformer/infer/request.hpp"
#include "ctformer/infer/sampler.hpp"

namespace ctformer::infer {

/// What an engine needs of a model: a cache type it makes, and one forward
/// call over a ragged batch returning the wanted rows' logits in host memory
/// (infer::inference_model is one).
template <class M>
concept batched_model = requires(M& m, const M& cm, typename M::cache_type& cache, const batch& rows) {
  typename M::cache_type;
  { M::vocab } -> std::convertible_to<index_t>;
  { M::max_seq } -> std::convertible_to<index_t>;
  { cm.max_chunk() } -> std::convertible_to<index_t>;
  { cm.make_cache(index_t{}, index_t{}) } -> std::same_as<typename M::cache_type>;
  { m.forward(cache, rows) } -> std::same_as<tensor_view<const float, 2>>;
};

/// The most samples one request may ask for, and the most alternatives per token.
inline constexpr int max_samples_per_request = 128;
inline constexpr int max_top_logprobs = 20;

/// How an engine is set up (its model and batching policy are its template arguments).
struct engine_options {
  /// Requests that may wait to start; one more is refused with queue_full.
  index_t queue_capacity = 1024;
  /// Paged cache: positions in the pool (0: the batching policy's
  /// max_requests full-length sequences). Contiguous cache: sequence slots
  /// (0: max_requests).
  index_t cache_capacity = 0;
  /// The text of a token (bytes, maybe part of a UTF-8 character): needed
  /// for stop strings and the events' text; without it events carry tokens only.
  std::function<std::string(std::int32_t)> token_text;
  /// Tokens [0, sampled_vocabulary) may be drawn (0: all of the model's).
  /// A model whose vocabulary is padded past its tokenizer's (to a multiple
  /// of the GEMM tile) sets the tokenizer's size here.
  index_t sampled_vocabulary = 0;
  /// Requests whose tokens begin with full KV blocks another request
  /// computed (a shared system prompt, a repeated prompt, a preempted
  /// sample recomputed) attach those blocks instead of prefilling them
  /// (a paged cache whose layers are all global; elsewhere it does nothing).
  bool prefix_caching = true;
};

namespace detail {

struct engine_queue;

// One request as both sides see it: the caller's thread reads events and the
// result under `mutex`; the step thread writes them.
struct request_state {
  request req;
  std::chrono::steady_clock::time_point submitted;
  std::atomic<bool> cancel_requested{false};
  std::weak_ptr<engine_queue> queue;  // to wake the step thread on cancel

  std::mutex mutex;
  std::condition_variable changed;
  std::deque<stream_event> events;
  int open_samples = 0;
  bool finished = false;
  request_result result;

  // Step thread only.
  bool started = false;
  bool any_token = false;
  std::chrono::steady_clock::time_point first_token;
};

struct engine_queue {
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<std::shared_ptr<request_state>> waiting;
  bool input_closed = false;  // no more submissions: request-level policies start what waits
  bool stopping = false;      // finish what was accepted, then the step thread ends
};

}  // namespace detail

/// A submitted request: read its events as they come (next), or wait for
/// the whole result. Cheap to copy; every copy names the same request. The
/// request goes on when every handle is gone (cancel() stops it).
class request_handle {
 public:
  request_handle() = default;
  explicit request_handle(std::shared_ptr<detail::request_state> s) : state_(std::move(s)) {}

  /// The next event, waiting for it; nullopt once every sample has ended and
  /// every event was taken.
  std::optional<stream_event> next() {
    std::unique_lock lock(state_->mutex);
    state_->changed.wait(lock, [&] { return !state_->events.empty() || state_->finished; });
    return pop(lock);
  }
  /// The next event if one comes within `timeout`; nullopt otherwise (done() tells the end from a timeout).
  template <class Rep, class Period>
  std::optional<stream_event> try_next(std::chrono::duration<Rep, Period> timeout) {
    std::unique_lock lock(state_->mutex);
    state_->changed.wait_for(lock, timeout, [&] { return !state_->events.empty() || state_->finished; });
    return pop(lock);
  }
  /// Whether every sample has ended and every event was taken.
  bool done() const {
    std::lock_guard lock(state_->mutex);
    return state_->finished && state_->events.empty();
  }
  /// Whether every sample has ended (events may still wait to be taken).
  bool finished() const {
    std::lock_guard lock(state_->mutex);
    return state_->finished;
  }
  /// Asks the engine to stop the request: its unfinished samples end with
  /// finish_reason::cancelled at the next step (a queued request at once).
  void cancel() {
    state_->cancel_requested = true;
    if (auto queue = state_->queue.lock()) {
      std::lock_guard lock(queue->mutex);
      queue->changed.notify_all();
    }
  }
  /// Waits until every sample has ended and returns the outcome (events not
  /// taken stay for next()).
  request_result wait() {
    std::unique_lock lock(state_->mutex);
    state_->changed.wait(lock, [&] { return state_->finished; });
    return state_->result;
  }
  const std::string& id() const { return state_->req.id; }
  explicit operator bool() const { return bool(state_); }

 private:
  std::optional<stream_event> pop(std::unique_lock<std::mutex>&) {
    if (state_->events.empty()) return std::nullopt;
    stream_event e = std::move(state_->events.front());
    state_->events.pop_front();
    return e;
  }
  std::shared_ptr<detail::request_state> state_;
};

/// Serves requests on one model: submit() from any thread queues a request
/// (bounded: a full queue refuses it with queue_full) and returns a handle
/// that streams its tokens; one step thread, started by the constructor,
/// owns the model and the KV cache and is the only thread that calls the
/// model's kernels (and so uses its thread pool).
///
/// Every step runs one forward call over a ragged batch: one decode token of
/// each running sample, then prompt chunks, oldest first, under the policy's
/// token budget. The batching policy decides only when waiting requests
/// start. Request-level policies (static, dynamic) start a request only when
/// the pool can hold each of its samples to the end (prompt plus max_tokens,
/// within max_seq), so a started batch never runs out of blocks; continuous
/// batching starts one when its prompt fits, and when the pool cannot hold a
/// step it preempts the newest sample: its blocks go back to the pool and it
/// is recomputed (prompt and tokens so far prefilled again) when room comes
/// back, before any new request starts. A recomputed sample continues with
/// the same sampler, so its tokens are the ones it would have drawn anyway.
///
/// The n samples of a request share one prefill: the first sample runs the
/// prompt, and its cached prompt is forked for the others at their first
/// token (a paged cache shares the full blocks and copies the last partial
/// one); each sample i draws with seed sampling.seed + i.
///
/// With prefix caching (engine_options::prefix_caching, on by default) every
/// sample files its full blocks after each step, and a sample that opens a
/// sequence (a new request, or a preempted one coming back) first attaches
/// the longest run of filed blocks its tokens begin with; the blocks of
/// finished requests stay cached, as free blocks, until the pool needs them.
///
/// Every accepted request ends: with its tokens (stop or length), cancelled,
/// or with an error naming the problem (a failed forward call fails the
/// samples of that batch, not the engine). shutdown() (and the destructor)
/// stops accepting, finishes everything accepted, and joins the step thread.
/// @tparam Model a batched_model (infer::inference_model); its cache_type is the KV cache policy
/// @tparam Batching static_batching, dynamic_batching or continuous_batching
template <batched_model Model, batching_policy Batching>
class engine {
 public:
  using clock = std::chrono::steady_clock;
  using model_type = Model;
  using cache_type = typename Model::cache_type;
  using batching_type = Batching;

  using options = engine_options;

  /// Starts the step thread. The model must outlive the engine, and no other
  /// thread may call it while the engine runs.
  /// Throws invalid_input for a non-positive queue capacity or a negative cache capacity.
  explicit engine(Model& model, options opts = {})
      : model_(model),
        options_(checked(std::move(opts))),
        cache_(model.make_cache(cache_capacity_of(options_), 0)),
        queue_(std::make_shared<detail::engine_queue>()),
        step_tokens_(step_tokens_of<Batching>(model.max_chunk())),
        prefill_chunk_(prefill_chunk_of<Batching>(model.max_chunk())) {
    rows_.reserve(step_tokens_);
    thread_ = std::thread([this] { loop(); });
  }
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;
  ~engine() { shutdown(); }

  /// Queues a request and returns its handle. Throws invalid_input (naming
  /// the request's id and the problem) for a request that could never run,
  /// queue_full when queue_capacity requests already wait, and error after
  /// shutdown() or close_input(). Thread-safe.
  request_handle submit(request r) {
    validate(r);
    auto state = std::make_shared<detail::request_state>();
    state->req = std::move(r);
    state->queue = queue_;
    state->open_samples = state->req.n;
    state->result.completions.resize(std::size_t(state->req.n));
    for (int i = 0; i < state->req.n; ++i) state->result.completions[std::size_t(i)].index = i;
    {
      std::lock_guard lock(queue_->mutex);
      if (queue_->stopping || queue_->input_closed)
        throw error("ctformer::infer::engine: request " + name_of(state->req) +
                    " came after the engine stopped taking requests");
      if (index_t(queue_->waiting.size()) >= options_.queue_capacity) {
        metrics_.request_refused();
        throw queue_full("ctformer::infer::engine: the queue holds its capacity of " +
                         std::to_string(options_.queue_capacity) + " waiting requests; request " +
                         name_of(state->req) + " was refused, retry later");
      }
      state->submitted = clock::now();
      queue_->waiting.push_back(state);
      metrics_.request_arrived();
      metrics_.set_waiting(index_t(queue_->waiting.size()));
      queue_->changed.notify_all();
    }
    return request_handle(std::move(state));
  }

  /// No more requests will come: request-level policies start what waits
  /// without waiting to fill a batch; submit() throws from now on.
  void close_input() {
    std::lock_guard lock(queue_->mutex);
    queue_->input_closed = true;
    queue_->changed.notify_all();
  }

  /// Stops taking requests, finishes every accepted one, joins the step
  /// thread. Idempotent.
  void shutdown() {
    {
      std::lock_guard lock(queue_->mutex);
      queue_->stopping = true;
      queue_->input_closed = true;
      queue_->changed.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }

  /// Counters, histograms and gauges (thread-safe to read at any time).
  const infer::metrics& metrics() const { return metrics_; }
  /// Blocks in the KV cache's pool (slots for a contiguous cache).
  index_t cache_block_count() const { return cache_.block_count(); }
  index_t step_tokens() const { return step_tokens_; }

 private:
  // One sample of a request: its tokens so far (prompt then generated) and
  // how many of them the cache holds.
  struct sample_run {
    std::shared_ptr<detail::request_state> owner;
    int index = 0;
    std::vector<std::int32_t> tokens;
    std::size_t prompt_length = 0;
    index_t cached = 0;
    sequence_id sequence = -1;
    std::optional<sampler> draw;
    std::uint64_t age = 0;  // admission order: larger is newer
    int forks_pending = 0;  // sample 0 only: samples 1..n-1 wait for its prompt
    std::string text;       // decoded text (cut at a stop string)
    std::size_t released = 0;
    index_t generated = 0;  // tokens drawn, an end token included
    clock::time_point first_token, last_token;
  };
  using run_pointer = std::unique_ptr<sample_run>;

  static options checked(options o) {
    if (o.queue_capacity <= 0) throw invalid_input("ctformer::infer::engine: queue_capacity must be positive");
    if (o.cache_capacity < 0) throw invalid_input("ctformer::infer::engine: cache_capacity must be >= 0");
    if (o.sampled_vocabulary < 0 || o.sampled_vocabulary > Model::vocab)
      throw invalid_input("ctformer::infer::engine: sampled_vocabulary is " + std::to_string(o.sampled_vocabulary) +
                          "; it must be in [0, " + std::to_string(Model::vocab) + "] (0: the whole vocabulary)");
    return o;
  }
  static index_t cache_capacity_of(const options& o) {
    if (o.cache_capacity > 0) return o.cache_capacity;
    return cache_type::paged ? Batching::max_requests * Model::max_seq : Batching::max_requests;
  }
  index_t sampled_vocabulary() const {
    return options_.sampled_vocabulary > 0 ? options_.sampled_vocabulary : index_t(Model::vocab);
  }
  static std::string name_of(const request& r) { return r.id.empty() ? std::string("(no id)") : "'" + r.id + "'"; }

  // Blocks (contiguous: slots) a sample of `length` positions holds.
  index_t units_for(index_t length) const {
    if constexpr (cache_type::paged) return (length + cache_.block_tokens() - 1) / cache_.block_tokens();
    else return 1;
  }
  // The most positions a sample of r can reach.
  static index_t final_length(const request& r) {
    return std::min<index_t>(index_t(r.prompt.size()) + r.max_tokens, Model::max_seq);
  }

  void validate(const request& r) const {
    auto fail = [&](const std::string& what) {
      throw invalid_input("ctformer::infer::engine: request " + name_of(r) + ": " + what);
    };
    if (r.prompt.empty()) fail("the prompt is empty");
    for (std::size_t i = 0; i < r.prompt.size(); ++i)
      if (r.prompt[i] < 0 || r.prompt[i] >= sampled_vocabulary())
        fail("prompt token " + std::to_string(i) + " is " + std::to_string(r.prompt[i]) +
             ", outside the vocabulary [0, " + std::to_string(sampled_vocabulary()) + ")");
    if (index_t(r.prompt.size()) >= Model::max_seq)
      fail("the prompt has " + std::to_string(r.prompt.size()) + " tokens, but the model's context holds " +
           std::to_string(Model::max_seq) + " positions with room for one new token");
    if (r.max_tokens <= 0) fail("max_tokens must be positive");
    if (r.n <= 0 || r.n > max_samples_per_request)
      fail("n must be in [1, " + std::to_string(max_samples_per_request) + "]");
    if (r.top_logprobs < 0 || r.top_logprobs > max_top_logprobs)
      fail("top_logprobs must be in [0, " + std::to_string(max_top_logprobs) + "]");
    try {
      r.sampling.validate();
    } catch (const invalid_input& e) {
      fail(e.what());
    }
    for (std::int32_t t : r.end_tokens)
      if (t < 0 || t >= sampled_vocabulary()) fail("end token " + std::to_string(t) + " is outside the vocabulary");
    for (const std::string& s : r.stop_strings)
      if (s.empty()) fail("a stop string is empty");
    if (!r.stop_strings.empty() && !options_.token_text)
      fail("stop strings need the engine's token_text option (the text of each token)");
    const index_t pool = cache_.block_count();
    if constexpr (Batching::iteration_level) {
      const index_t need = units_for(index_t(r.prompt.size()) + 1);
      if (need > pool)
        fail("the prompt needs " + std::to_string(need) + " KV blocks, more than the pool's " + std::to_string(pool));
      if (!cache_type::paged && r.n > pool)
        fail(std::to_string(r.n) + " samples need as many cache slots, more than the cache's " + std::to_string(pool));
    } else {
      const index_t need = index_t(r.n) * units_for(final_length(r));
      if (need > pool)
        fail(std::to_string(r.n) + " samples of up to " + std::to_string(final_length(r)) + " positions need " +
             std::to_string(need) + " KV " + (cache_type::paged ? "blocks" : "slots") + ", more than the cache's " +
             std::to_string(pool) + " (a request-level policy holds them from the start)");
    }
  }

  // ---- the step thread ----------------------------------------------------

  void loop() {
    for (;;) {
      std::vector<std::shared_ptr<detail::request_state>> admitted;
      {
        std::unique_lock lock(queue_->mutex);
        for (;;) {
          drop_cancelled_waiting();
          if (has_work()) break;
          if (queue_->stopping && queue_->waiting.empty()) return;
          if (!queue_->waiting.empty() && Batching::admit(admission(now())) > 0) break;
          const auto recheck = queue_->waiting.empty() ? clock::duration{} : Batching::recheck_after(admission(now()));
          if (recheck > clock::duration{}) queue_->changed.wait_for(lock, recheck);
          else queue_->changed.wait(lock);
        }
        if (preempted_.empty()) admitted = take_admitted();
        metrics_.set_waiting(index_t(queue_->waiting.size()));
      }
      for (auto& state : admitted) {
        try {
          start(state);
        } catch (const std::exception& e) {
          for (int i = 0; i < state->req.n; ++i)
            end_sample(*state, i, finish_reason::error,
                       "ctformer::infer::engine: request " + name_of(state->req) + " could not start: " + e.what(),
                       {}, {});
        }
      }
      try {
        step();
      } catch (const std::exception& e) {
        fail_everything(e.what());
      } catch (...) {
        fail_everything("an unknown exception in the engine's step");
      }
      metrics_.set_running(running_requests_);
      publish_kv_cache_usage();
    }
  }

  static clock::time_point now() { return clock::now(); }

  bool has_work() const { return !running_.empty() || !preempted_.empty(); }

  admission_state admission(clock::time_point t) const {
    admission_state s;
    s.waiting = index_t(queue_->waiting.size());
    s.running = running_requests_;
    if (!queue_->waiting.empty()) s.oldest_wait = t - queue_->waiting.front()->submitted;
    s.draining = queue_->input_closed;
    return s;
  }

  // Queue lock held: requests cancelled before they started end now.
  void drop_cancelled_waiting() {
    auto& w = queue_->waiting;
    for (auto it = w.begin(); it != w.end();) {
      if ((*it)->cancel_requested) {
        auto state = *it;
        it = w.erase(it);
        for (int i = 0; i < state->req.n; ++i) end_sample(*state, i, finish_reason::cancelled, {}, {}, {});
      } else {
        ++it;
      }
    }
  }

  // Blocks (slots) the running and preempted samples may still take: what a
  // request-level policy keeps free for them.
  index_t promised_units() const {
    index_t promised = 0;
    for (const auto& r : running_) {
      const index_t target = final_length(r->owner->req);
      promised += r->sequence >= 0 ? cache_.blocks_needed(r->sequence, target) : units_for(target);
      promised += index_t(r->forks_pending) * units_for(target);
    }
    for (const auto& r : preempted_) promised += units_for(final_length(r->owner->req));
    return promised;
  }

  // Queue lock held: pops the requests the policy starts now, in arrival
  // order, as far as the cache holds them.
  std::vector<std::shared_ptr<detail::request_state>> take_admitted() {
    std::vector<std::shared_ptr<detail::request_state>> out;
    if (queue_->waiting.empty()) return out;
    index_t count = Batching::admit(admission(now()));
    index_t free = cache_.free_block_count() - (Batching::iteration_level ? 0 : promised_units());
    index_t requests = running_requests_;
    while (count-- > 0 && !queue_->waiting.empty() && requests < Batching::max_requests) {
      const request& r = queue_->waiting.front()->req;
      const index_t need = Batching::iteration_level ? units_for(index_t(r.prompt.size()) + 1)
                                                     : index_t(r.n) * units_for(final_length(r));
      if (need > free) break;  // first come, first served: nothing overtakes it
      free -= need;
      ++requests;
      out.push_back(std::move(queue_->waiting.front()));
      queue_->waiting.pop_front();
    }
    return out;
  }

  // A request starts: its first sample opens a sequence; the others wait for its prompt.
  void start(const std::shared_ptr<detail::request_state>& state) {
    const auto t = now();
    const double queued = std::chrono::duration<double>(t - state->submitted).count();
    {
      std::lock_guard lock(state->mutex);
      state->result.queue_seconds = queued;
      state->result.prompt_tokens = index_t(state->req.prompt.size());
    }
    metrics_.observe_queue_time(queued);
    metrics_.add_prompt_tokens(index_t(state->req.prompt.size()), t);
    auto run = std::make_unique<sample_run>();
    run->owner = state;
    run->index = 0;
    run->tokens = state->req.prompt;
    run->tokens.reserve(state->req.prompt.size() + std::size_t(state->req.max_tokens) + 1);
    run->prompt_length = state->req.prompt.size();
    run->draw.emplace(state->req.sampling);
    run->age = next_age_++;
    run->forks_pending = state->req.n - 1;
    state->started = true;
    ++running_requests_;
    try {
      run->sequence = cache_.open_sequence();
    } catch (const cache_exhausted&) {
      preempted_.push_back(std::move(run));  // starts when a slot frees
      return;
    }
    attach_cached_prefix(*run);
    running_.push_back(std::move(run));
  }

  // Preempted samples come back, oldest first, while the pool holds them whole.
  void readmit() {
    std::sort(preempted_.begin(), preempted_.end(), [](const run_pointer& a, const run_pointer& b) { return a->age < b->age; });
    while (!preempted_.empty()) {
      sample_run& r = *preempted_.front();
      if (units_for(index_t(r.tokens.size())) > cache_.free_block_count()) break;
      try {
        r.sequence = cache_.open_sequence();
      } catch (const cache_exhausted&) {
        break;
      }
      r.cached = 0;
      attach_cached_prefix(r);
      running_.push_back(std::move(preempted_.front()));
      preempted_.pop_front();
    }
  }

  // A sample just given an empty sequence starts from the cached blocks its
  // tokens begin with (the prefix cache's lookups and hits count in blocks).
  void attach_cached_prefix(sample_run& r) {
    if (!options_.prefix_caching || !cache_.prefix_caching()) return;
    r.cached = cache_.attach_cached_prefix(r.sequence, r.tokens);
    metrics_.prefix_cache((index_t(r.tokens.size()) - 1) / cache_.block_tokens(), r.cached / cache_.block_tokens());
  }

  struct planned {
    sample_run* run;
    index_t count;
  };

  void step() {
    cancel_requested_runs();
    readmit();
    if (running_.empty()) {
      if (!preempted_.empty()) fail_unplaceable();
      return;
    }
    std::sort(running_.begin(), running_.end(), [](const run_pointer& a, const run_pointer& b) { return a->age < b->age; });
    std::vector<planned> plan;
    index_t budget = step_tokens_;
    for (auto& r : running_)  // decodes first: one row each
      if (budget > 0 && r->cached + 1 == index_t(r->tokens.size())) {
        plan.push_back({r.get(), 1});
        --budget;
      }
    for (auto& r : running_)  // then prompt chunks, oldest first
      if (budget > 0 && r->cached + 1 < index_t(r->tokens.size())) {
        const index_t k = std::min({index_t(r->tokens.size()) - r->cached, prefill_chunk_, budget});
        plan.push_back({r.get(), k});
        budget -= k;
      }
    reserve(plan);
    if (plan.empty()) return;

    rows_.clear();
    for (const planned& p : plan)
      rows_.add_tokens(p.run->sequence, p.run->cached,
                       std::span<const std::int32_t>(p.run->tokens).subspan(std::size_t(p.run->cached), std::size_t(p.count)),
                       p.run->cached + p.count == index_t(p.run->tokens.size()));
    tensor_view<const float, 2> logits;
    try {
      logits = model_.forward(cache_, rows_);
    } catch (const std::exception& e) {
      for (const planned& p : plan) fail_run(*p.run, std::string("the forward pass failed: ") + e.what());
      remove_finished();
      return;
    }
    index_t row = 0;
    const auto t = now();
    for (const planned& p : plan) {
      sample_run& r = *p.run;
      r.cached += p.count;
      if (options_.prefix_caching) cache_.register_full_blocks(r.sequence, r.tokens);
      if (r.cached != index_t(r.tokens.size())) continue;
      // Only the tokenizer's tokens: a padded vocabulary's extra logits never win.
      const std::span<const float> row_logits(logits.data() + row * Model::vocab, std::size_t(sampled_vocabulary()));
      ++row;
      if (r.forks_pending > 0) fork_samples(r, row_logits, t);
      draw_token(r, row_logits, t);
    }
    remove_finished();
  }

  // Takes the blocks each planned entry needs; when the pool runs dry the
  // newest sample gives its blocks back (it is recomputed later).
  void reserve(std::vector<planned>& plan) {
    for (std::size_t i = 0; i < plan.size();) {
      sample_run& r = *plan[i].run;
      try {
        cache_.reserve(r.sequence, r.cached + plan[i].count);
        ++i;
        continue;
      } catch (const cache_exhausted&) {
      }
      sample_run* victim = newest_running();
      if (victim == &r && running_.size() == 1) {
        fail_run(r, "sample " + std::to_string(r.index) + " needs " + std::to_string(r.cached + plan[i].count) +
                        " positions, more than the whole KV cache pool of " + std::to_string(cache_.pool_tokens()) +
                        " holds");
        remove_finished();
        plan.erase(plan.begin() + std::ptrdiff_t(i));
        continue;
      }
      const auto at = std::find_if(plan.begin(), plan.end(), [&](const planned& p) { return p.run == victim; });
      if (at != plan.end()) {
        if (at < plan.begin() + std::ptrdiff_t(i)) --i;
        plan.erase(at);
      }
      preempt(victim);
    }
  }

  sample_run* newest_running() const {
    sample_run* newest = nullptr;
    for (const auto& r : running_)
      if (!newest || r->age > newest->age) newest = r.get();
    return newest;
  }

  void preempt(sample_run* victim) {
    cache_.close_sequence(victim->sequence);
    victim->sequence = -1;
    victim->cached = 0;
    metrics_.preempted();
    const auto it = std::find_if(running_.begin(), running_.end(), [&](const run_pointer& p) { return p.get() == victim; });
    preempted_.push_back(std::move(*it));
    running_.erase(it);
  }

  // Samples 1..n-1 of a request copy its cached prompt and draw their first
  // token from the same logits row.
  void fork_samples(sample_run& leader, std::span<const float> row, clock::time_point t) {
    const request& req = leader.owner->req;
    for (int i = req.n - leader.forks_pending; i < req.n; ++i) {
      auto run = std::make_unique<sample_run>();
      run->owner = leader.owner;
      run->index = i;
      run->tokens.assign(leader.tokens.begin(), leader.tokens.begin() + std::ptrdiff_t(leader.prompt_length));
      run->tokens.reserve(leader.prompt_length + std::size_t(req.max_tokens) + 1);
      run->prompt_length = leader.prompt_length;
      sampling_settings settings = req.sampling;
      settings.seed += std::uint64_t(i);
      run->draw.emplace(settings);
      run->age = leader.age;
      bool forked = true;
      try {
        run->sequence = cache_.fork(leader.sequence);
        run->cached = index_t(leader.prompt_length);
      } catch (const cache_exhausted&) {
        forked = false;  // it prefills the prompt itself when room comes
      }
      draw_token(*run, row, t);
      if (run->draw) {  // still going
        if (!forked) metrics_.preempted();
        if (forked)
          running_.push_back(std::move(run));
        else
          preempted_.push_back(std::move(run));
      } else if (run->sequence >= 0) {
        cache_.close_sequence(run->sequence);
      }
    }
    leader.forks_pending = 0;
  }

  // Draws the next token of r from its logits row, streams it, and ends the
  // sample when it should. A finished sample's `draw` is reset.
  void draw_token(sample_run& r, std::span<const float> row, clock::time_point t) {
    detail::request_state& state = *r.owner;
    const request& req = state.req;
    std::int32_t token;
    try {
      token = r.draw->sample(row, r.tokens, r.prompt_length);
    } catch (const std::exception& e) {
      fail_run(r, std::string("sampling failed: ") + e.what());
      return;
    }
    ++r.generated;
    metrics_.add_output_tokens(1, t);
    if (r.generated == 1) {
      r.first_token = t;
      if (!state.any_token) {
        state.any_token = true;
        state.first_token = t;
        metrics_.observe_time_to_first_token(std::chrono::duration<double>(t - state.submitted).count());
      }
    } else {
      metrics_.observe_inter_token_latency(std::chrono::duration<double>(t - r.last_token).count());
    }
    r.last_token = t;

    stream_event event;
    event.index = r.index;
    event.token = token;
    if (req.logprobs || req.top_logprobs > 0) describe_logprobs(row, token, req.top_logprobs, event);

    if (std::find(req.end_tokens.begin(), req.end_tokens.end(), token) != req.end_tokens.end()) {
      finish(r, finish_reason::stop, {});
      return;
    }
    r.tokens.push_back(token);
    std::optional<finish_reason> reason;
    if (options_.token_text) {
      const std::size_t before = r.text.size();
      r.text += options_.token_text(token);
      if (const auto cut = find_stop(req, r.text, before)) {
        r.text.resize(*cut);
        reason = finish_reason::stop;
      }
    }
    if (!reason && r.generated >= req.max_tokens) reason = finish_reason::length;
    if (!reason && index_t(r.tokens.size()) - 1 >= Model::max_seq) reason = finish_reason::length;
    event.text = release(r, req, bool(reason));
    push(state, std::move(event));
    if (reason) finish(r, *reason, {});
  }

  static void describe_logprobs(std::span<const float> row, std::int32_t token, int top, stream_event& event) {
    double peak = -std::numeric_limits<double>::infinity();
    for (float x : row) peak = std::max(peak, double(x));
    double sum = 0;
    for (float x : row) sum += std::exp(double(x) - peak);
    const double log_z = peak + std::log(sum);
    event.logprob = float(double(row[std::size_t(token)]) - log_z);
    if (top <= 0) return;
    std::vector<std::int32_t> order(row.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = std::int32_t(i);
    const std::size_t k = std::min(order.size(), std::size_t(top));
    std::partial_sort(order.begin(), order.begin() + std::ptrdiff_t(k), order.end(), [&](std::int32_t a, std::int32_t b) {
      return row[std::size_t(a)] > row[std::size_t(b)] || (row[std::size_t(a)] == row[std::size_t(b)] && a < b);
    });
    for (std::size_t i = 0; i < k; ++i)
      event.top.push_back({order[i], float(double(row[std::size_t(order[i])]) - log_z)});
  }

  // Where the earliest stop string starts, looking only where one could
  // reach into the text appended after `before`.
  static std::optional<std::size_t> find_stop(const request& req, std::string_view text, std::size_t before) {
    std::optional<std::size_t> best;
    for (const std::string& s : req.stop_strings) {
      const std::size_t from = before >= s.size() - 1 ? before - (s.size() - 1) : 0;
      const std::size_t at = text.find(s, from);
      if (at != std::string_view::npos && (!best || at < *best)) best = at;
    }
    return best;
  }

  // The text that can go out now: all of it at the end, otherwise up to a
  // tail that may still become a stop string or completes a UTF-8 character.
  static std::string release(sample_run& r, const request& req, bool final) {
    std::size_t end = r.text.size();
    if (!final) {
      std::size_t hold = 0;
      for (const std::string& s : req.stop_strings)
        for (std::size_t n = std::min(s.size() - 1, end - r.released); n > hold; --n)
          if (std::string_view(r.text).substr(end - n) == std::string_view(s).substr(0, n)) {
            hold = n;
            break;
          }
      end -= hold;
      end -= incomplete_utf8_tail(std::string_view(r.text).substr(r.released, end - r.released));
    }
    std::string out = r.text.substr(r.released, end - r.released);
    r.released = end;
    return out;
  }

  // Bytes at the end of s that begin a UTF-8 character not yet complete.
  static std::size_t incomplete_utf8_tail(std::string_view s) {
    for (std::size_t back = 1; back <= std::min<std::size_t>(3, s.size()); ++back) {
      const auto c = static_cast<unsigned char>(s[s.size() - back]);
      if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back
      const std::size_t length = c >= 0xF0 && c < 0xF8 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
      return length > back ? back : 0;
    }
    return 0;
  }

  static void push(detail::request_state& state, stream_event event) {
    std::lock_guard lock(state.mutex);
    state.events.push_back(std::move(event));
    state.changed.notify_all();
  }

  void fail_run(sample_run& r, const std::string& message) {
    finish(r, finish_reason::error, "ctformer::infer::engine: request " + name_of(r.owner->req) + ": " + message);
  }

  // Ends a sample: its completion, its last text, its sequence closed. The
  // run is removed from the running list by remove_finished().
  void finish(sample_run& r, finish_reason reason, const std::string& message) {
    const std::string tail = release(r, r.owner->req, true);
    if (r.generated > 1)
      metrics_.observe_time_per_output_token(std::chrono::duration<double>(r.last_token - r.first_token).count() /
                                             double(r.generated - 1));
    std::vector<std::int32_t> tokens(r.tokens.begin() + std::ptrdiff_t(r.prompt_length), r.tokens.end());
    // The blocks go back first, so that whoever sees the sample end (its
    // caller, or /metrics) sees them free.
    if (r.sequence >= 0) cache_.close_sequence(r.sequence);
    r.sequence = -1;
    publish_kv_cache_usage();
    end_sample(*r.owner, r.index, reason, message, std::move(tokens), std::move(r.text), tail, r.generated);
    // Samples not yet forked end with their leader.
    for (int i = r.owner->req.n - r.forks_pending; i < r.owner->req.n && r.forks_pending > 0; ++i)
      end_sample(*r.owner, i, reason, message, {}, {}, {});
    r.forks_pending = 0;
    r.draw.reset();
  }

  void publish_kv_cache_usage() {
    metrics_.set_kv_cache_usage(cache_.block_count() > 0
                                    ? 1.0 - double(cache_.free_block_count()) / double(cache_.block_count())
                                    : 0.0);
  }

  void end_sample(detail::request_state& state, int index, finish_reason reason, const std::string& message,
                  std::vector<std::int32_t> tokens, std::string text, std::string tail = {}, index_t generated = 0) {
    bool last = false;
    {
      std::lock_guard lock(state.mutex);
      completion& c = state.result.completions[std::size_t(index)];
      c.tokens = std::move(tokens);
      c.text = std::move(text);
      c.reason = reason;
      c.message = message;
      state.result.output_tokens += generated;
      stream_event event;
      event.index = index;
      event.finished = true;
      event.text = std::move(tail);
      event.reason = reason;
      event.message = message;
      last = state.open_samples == 1;
      if (last) {
        const auto t = now();
        state.result.total_seconds = std::chrono::duration<double>(t - state.submitted).count();
        state.result.first_token_seconds =
            state.any_token ? std::chrono::duration<double>(state.first_token - state.submitted).count() : 0.0;
        // The metrics count the request as ended before its caller can see
        // it end, so a client that reads /metrics after its answer finds it there.
        metrics_.observe_end_to_end(state.result.total_seconds);
        if (state.started) metrics_.set_running(--running_requests_);
      }
      // Counted after the running gauge moves, so a reader that sees it
      // finished sees it no longer running; and before its caller sees the end.
      metrics_.request_finished(reason);
      state.events.push_back(std::move(event));
      --state.open_samples;
      state.finished = last;
      state.changed.notify_all();
    }
  }

  void remove_finished() {
    const auto gone = [](const run_pointer& r) { return !r->draw.has_value(); };
    running_.erase(std::remove_if(running_.begin(), running_.end(), gone), running_.end());
    preempted_.erase(std::remove_if(preempted_.begin(), preempted_.end(), gone), preempted_.end());
  }

  template <class F>
  void for_each_run(F&& f) {
    for (auto& r : running_) f(*r);
    for (auto& r : preempted_) f(*r);
  }

  void cancel_requested_runs() {
    for_each_run([&](sample_run& r) {
      if (r.owner->cancel_requested && r.draw) finish(r, finish_reason::cancelled, {});
    });
    remove_finished();
  }

  // Preempted samples with nothing running cannot wait for room: the pool is
  // smaller than the oldest one needs.
  void fail_unplaceable() {
    std::sort(preempted_.begin(), preempted_.end(), [](const run_pointer& a, const run_pointer& b) { return a->age < b->age; });
    sample_run& r = *preempted_.front();
    fail_run(r, "sample " + std::to_string(r.index) + " needs " + std::to_string(r.tokens.size()) +
                    " positions, more than the whole KV cache can hold");
    remove_finished();
  }

  void fail_everything(const std::string& message) {
    for_each_run([&](sample_run& r) {
      if (r.draw) fail_run(r, message);
    });
    remove_finished();
  }

  Model& model_;
  options options_;
  cache_type cache_;
  std::shared_ptr<detail::engine_queue> queue_;
  index_t step_tokens_, prefill_chunk_;
  infer::metrics metrics_;
  batch rows_;
  std::vector<run_pointer> running_;
  std::deque<run_pointer> preempted_;
  index_t running_requests_ = 0;
  std::uint64_t next_age_ = 0;
  std::thread thread_;
};

}  // namespace ctformer::infer
