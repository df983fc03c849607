// Batching policies for infer::engine: static (fill N, run to completion),
// dynamic (wait up to a deadline to fill N, run to completion) and continuous
// (sequences join and leave at every step under a per-step token budget).
#pragma once

#include <algorithm>
#include <chrono>
#include <concepts>
#include <cstddef>

#include "ctformer/core/tensor_view.hpp"

namespace ctformer::infer {

/// What a batching policy sees when the engine asks whether to admit work.
struct admission_state {
  index_t waiting = 0;      ///< requests queued, not yet started
  index_t running = 0;      ///< requests started and not finished
  std::chrono::steady_clock::duration oldest_wait{};  ///< how long the oldest waiting request has waited
  bool draining = false;    ///< no more requests will come soon (the engine is closing, or was told to flush)
};

/// Request-level batching of exactly BatchSize requests: a batch starts when
/// BatchSize requests wait (or the engine drains) and runs until all of them
/// finish; nothing joins meanwhile. Each request's whole KV need (prompt plus
/// max_tokens) is reserved when it starts, so a started batch never runs out.
template <index_t BatchSize>
struct static_batching {
  static_assert(BatchSize > 0, "ctformer: static_batching needs a positive batch size");
  static constexpr index_t max_requests = BatchSize;
  static constexpr bool iteration_level = false;
  /// Requests to start now (0: wait).
  static index_t admit(const admission_state& s) {
    if (s.running > 0 || s.waiting == 0) return 0;
    return s.waiting >= BatchSize || s.draining ? std::min(s.waiting, BatchSize) : 0;
  }
  /// How long the engine may sleep before asking again with no new arrival (zero: until one).
  static std::chrono::steady_clock::duration recheck_after(const admission_state&) { return {}; }
};

/// Request-level batching with a deadline: a batch starts when BatchSize
/// requests wait or the oldest has waited MaxWaitMilliseconds, and runs until
/// all of its requests finish (reserved up front, as static_batching).
template <index_t BatchSize, int MaxWaitMilliseconds>
struct dynamic_batching {
  static_assert(BatchSize > 0, "ctformer: dynamic_batching needs a positive batch size");
  static_assert(MaxWaitMilliseconds >= 0, "ctformer: dynamic_batching needs a non-negative wait");
  static constexpr index_t max_requests = BatchSize;
  static constexpr bool iteration_level = false;
  static constexpr std::chrono::milliseconds max_wait{MaxWaitMilliseconds};
  static index_t admit(const admission_state& s) {
    if (s.running > 0 || s.waiting == 0) return 0;
    const bool full = s.waiting >= BatchSize, late = s.oldest_wait >= max_wait;
    return full || late || s.draining ? std::min(s.waiting, BatchSize) : 0;
  }
  static std::chrono::steady_clock::duration recheck_after(const admission_state& s) {
    if (s.running > 0 || s.waiting == 0) return {};
    return max_wait > s.oldest_wait ? max_wait - s.oldest_wait : std::chrono::steady_clock::duration{1};
  }
};

/// Iteration-level batching: at every step waiting requests join while fewer
/// than MaxSequences sequences run and the KV pool holds their prompts;
/// finished ones leave. A step holds every running decode (one token each)
/// and prompt chunks of at most PrefillChunk tokens, oldest first, up to
/// StepTokens rows (0: the model's max_chunk). When the pool cannot hold the
/// next step, the newest sequence is preempted: its blocks are freed and it
/// is recomputed (its prompt and tokens so far prefilled again) when there
/// is room, so no request fails for want of memory that frees up later.
template <index_t MaxSequences, index_t StepTokens = 0, index_t PrefillChunk = StepTokens>
struct continuous_batching {
  static_assert(MaxSequences > 0, "ctformer: continuous_batching needs a positive number of sequences");
  static_assert(StepTokens >= 0 && PrefillChunk >= 0, "ctformer: continuous_batching's token budgets are >= 0");
  static constexpr index_t max_requests = MaxSequences;
  static constexpr bool iteration_level = true;
  static constexpr index_t step_tokens = StepTokens;
  static constexpr index_t prefill_chunk = PrefillChunk;
  static index_t admit(const admission_state& s) {
    return s.running < MaxSequences ? std::min(s.waiting, MaxSequences - s.running) : 0;
  }
  static std::chrono::steady_clock::duration recheck_after(const admission_state&) { return {}; }
};

/// A batching policy: how many waiting requests start, when to look again,
/// and whether sequences join at every step (iteration level) or per batch.
template <class B>
concept batching_policy = requires(const admission_state& s) {
  { B::admit(s) } -> std::convertible_to<index_t>;
  { B::recheck_after(s) } -> std::convertible_to<std::chrono::steady_clock::duration>;
  { B::max_requests } -> std::convertible_to<index_t>;
  { B::iteration_level } -> std::convertible_to<bool>;
};

/// The per-step row budget of a policy (request-level policies: the model's max_chunk).
template <class B>
constexpr index_t step_tokens_of(index_t model_max_chunk) {
  if constexpr (requires { B::step_tokens; })
    return B::step_tokens > 0 ? std::min(B::step_tokens, model_max_chunk) : model_max_chunk;
  else
    return model_max_chunk;
}
/// The longest prompt chunk one step gives a sequence.
template <class B>
constexpr index_t prefill_chunk_of(index_t model_max_chunk) {
  const index_t step = step_tokens_of<B>(model_max_chunk);
  if constexpr (requires { B::prefill_chunk; })
    return B::prefill_chunk > 0 ? std::min(B::prefill_chunk, step) : step;
  else
    return step;
}

}  // namespace ctformer::infer
