// infer::generate: prompt -> streamed tokens for one sequence on an
// inference_model and its KV cache, with the sampler and stop criteria, and
// the prefill / decode throughput of the run.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "ctformer/core/error.hpp"
#include "ctformer/infer/kv_cache.hpp"
#include "ctformer/infer/sampler.hpp"

namespace ctformer::infer {

/// What generate() produced and how fast.
struct generation_result {
  std::vector<std::int32_t> tokens;       ///< the new tokens (not the prompt), stop tokens included
  stop_reason reason = stop_reason::none;  ///< why it stopped (none: the callback or the context ended it)
  std::size_t matched_length = 0;          ///< trailing tokens the stop criteria matched (strip them for display)
  bool context_full = false;               ///< stopped because the sequence reached max_seq
  index_t prompt_tokens = 0;
  double prefill_seconds = 0;  ///< the prompt's forward pass, to its logits (time to first token minus sampling)
  double decode_seconds = 0;   ///< every decode step
  index_t decode_steps = 0;
  double prefill_tokens_per_s = 0;  ///< prompt tokens / prefill_seconds
  double decode_tokens_per_s = 0;   ///< decode steps / decode_seconds
};

/// Generates tokens after a prompt: prefill (in chunks of `chunk`, 0 for the
/// model's max_chunk), then one decode step per new token, each drawn by a
/// sampler with `settings` (its seed makes the run reproducible) and passed to
/// on_token(token) as soon as it is drawn. on_token may return void, or bool
/// (false stops the generation after that token).
///
/// Stops at stop criteria (max tokens, an end token, a stop sequence), when
/// the sequence reaches the model's max_seq, or when on_token says so. The
/// sequence is opened in `cache` for the call and closed before returning
/// (also when an error is thrown), so its blocks go back to the pool.
/// Errors: those of prefill/decode (bad token ids, a prompt longer than the
/// context, cache_exhausted) and of the sampler.
/// @tparam Model an inference_model
/// @tparam OnToken callable as on_token(std::int32_t) -> void | bool
template <class Model, class OnToken>
generation_result generate(Model& model, typename Model::cache_type& cache, std::span<const std::int32_t> prompt,
                           const sampling_settings& settings, stop_criteria stop, OnToken&& on_token,
                           index_t chunk = 0) {
  using clock = std::chrono::steady_clock;
  sampler draw(settings);
  generation_result result;
  result.prompt_tokens = index_t(prompt.size());
  result.tokens.reserve(std::size_t(stop.max_tokens()));
  // The sampler's repetition penalty reads the prompt and the new tokens,
  // its presence and frequency penalties the new tokens.
  std::vector<std::int32_t> history(prompt.begin(), prompt.end());
  history.reserve(prompt.size() + std::size_t(stop.max_tokens()));

  struct sequence_guard {
    typename Model::cache_type& cache;
    sequence_id id;
    ~sequence_guard() { cache.close_sequence(id); }
  } guard{cache, cache.open_sequence()};

  auto start = clock::now();
  std::span<const float> logits = model.prefill(cache, guard.id, prompt, chunk);
  result.prefill_seconds = std::chrono::duration<double>(clock::now() - start).count();

  for (;;) {
    const std::int32_t token = draw.sample(logits, history, prompt.size());
    result.tokens.push_back(token);
    history.push_back(token);
    bool keep_going = true;
    if constexpr (std::is_same_v<std::invoke_result_t<OnToken&, std::int32_t>, bool>)
      keep_going = on_token(token);
    else
      on_token(token);
    result.reason = stop.check(result.tokens);
    result.matched_length = stop.matched_length();
    if (result.reason != stop_reason::none || !keep_going) break;
    if (cache.length(guard.id) >= Model::max_seq) {
      result.context_full = true;
      break;
    }
    start = clock::now();
    logits = model.decode(cache, guard.id, token);
    result.decode_seconds += std::chrono::duration<double>(clock::now() - start).count();
    ++result.decode_steps;
  }
  if (result.prefill_seconds > 0) result.prefill_tokens_per_s = double(result.prompt_tokens) / result.prefill_seconds;
  if (result.decode_seconds > 0) result.decode_tokens_per_s = double(result.decode_steps) / result.decode_seconds;
  return result;
}

}  // namespace ctformer::infer
