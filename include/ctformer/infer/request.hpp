// infer::request and what an engine streams back for it: the prompt with its
// sampling and stopping settings, the token events of each of its n samples,
// and why each sample ended.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ctformer/core/error.hpp"
#include "ctformer/infer/sampler.hpp"

namespace ctformer::infer {

/// Why a sample ended, in the OpenAI API's words (plus the two an engine adds).
enum class finish_reason {
  stop,       ///< an end token or a stop string
  length,     ///< max_tokens new tokens, or the model's context is full
  cancelled,  ///< the caller cancelled the request (or its client went away)
  error,      ///< the request failed; the event's message says why
};

/// "stop", "length", "cancelled" or "error": the OpenAI API's finish_reason strings.
constexpr std::string_view to_string(finish_reason r) {
  switch (r) {
    case finish_reason::stop: return "stop";
    case finish_reason::length: return "length";
    case finish_reason::cancelled: return "cancelled";
    case finish_reason::error: return "error";
  }
  return "error";
}

/// One generation request: a tokenized prompt, how to sample, when to stop.
struct request {
  std::vector<std::int32_t> prompt;       ///< token ids (not empty)
  sampling_settings sampling;             ///< sample i uses seed sampling.seed + i
  int max_tokens = 16;                    ///< the most new tokens per sample (> 0)
  int n = 1;                              ///< samples of the same prompt (prefilled once)
  std::vector<std::int32_t> end_tokens;   ///< tokens that end a sample (kept out of its tokens and text)
  std::vector<std::string> stop_strings;  ///< text that ends a sample (cut there, never streamed)
  int top_logprobs = 0;                   ///< the most likely alternatives reported per token (0-20)
  bool logprobs = false;                  ///< report each chosen token's log-probability
  std::string id;                         ///< the caller's name for it (in errors and logs)
};

/// An alternative token and its log-probability under the model.
struct token_logprob {
  std::int32_t token;
  float logprob;
};

/// What the engine streams: a new token of sample `index` (with the text it
/// completes: stop strings and incomplete UTF-8 held back until they are
/// settled), or the end of that sample.
struct stream_event {
  int index = 0;                    ///< which of the request's n samples
  bool finished = false;            ///< false: a token; true: the sample ended
  std::int32_t token = -1;          ///< the new token (when !finished)
  std::string text;                 ///< text released by this event (may be empty)
  float logprob = 0;                ///< the token's log-probability (when logprobs were asked for)
  std::vector<token_logprob> top;   ///< the top_logprobs most likely tokens at this step
  finish_reason reason = finish_reason::stop;  ///< why it ended (when finished)
  std::string message;              ///< the error (reason == error)
};

/// One finished sample.
struct completion {
  int index = 0;
  std::vector<std::int32_t> tokens;  ///< the new tokens (an end token stripped; a stop string's tokens kept)
  std::string text;                  ///< their text, cut before a stop string
  finish_reason reason = finish_reason::stop;
  std::string message;  ///< the error (reason == error)
};

/// A request's outcome: every sample, and the token counts and times of the run.
struct request_result {
  std::vector<completion> completions;  ///< in index order
  index_t prompt_tokens = 0;
  index_t output_tokens = 0;      ///< over every sample
  double queue_seconds = 0;       ///< submit to the first step that ran it
  double first_token_seconds = 0; ///< submit to the first token of any sample
  double total_seconds = 0;       ///< submit to the end of the last sample
};

/// The engine's queue is full: the request was refused (not queued); retry later.
class queue_full : public error {
 public:
  using error::error;
};

}  // namespace ctformer::infer
