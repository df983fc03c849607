// infer::sampler (greedy, temperature, top-k, top-p, min-p, repetition penalty
// over one logits row, with a seeded RNG) and infer::stop_criteria (max
// tokens, end-of-sequence tokens, stop sequences of tokens or of text).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ctformer/core/error.hpp"

namespace ctformer::infer {

/// How the next token is drawn from a logits row. Every filter is off at its
/// default, so `sampling_settings{}` samples from softmax(logits).
///
/// Applied in this order (the order of HF transformers' logits processors):
///  1. repetition penalty on the raw logits of every distinct token in the
///     history window (CTRL, Keskar et al. 2019: a positive logit is divided
///     by the penalty, a negative one multiplied, so the token always loses);
///  2. temperature == 0: greedy, argmax of the penalised logits (ties: the
///     smallest id), and the steps below are skipped;
///  3. divide by the temperature;
///  4. top-k: keep the k largest logits;
///  5. softmax over what is kept;
///  6. top-p: keep the smallest set of most probable tokens whose probability
///     sum reaches top_p (at least one token);
///  7. min-p: drop tokens whose probability is below min_p times the largest;
///  8. renormalise and draw one token with the sampler's RNG.
struct sampling_settings {
  float temperature = 1.0f;          ///< 0: greedy; otherwise > 0
  int top_k = 0;                     ///< 0: off; else keep the k most likely
  float top_p = 1.0f;                ///< 1: off; in (0, 1]
  float min_p = 0.0f;                ///< 0: off; in [0, 1]
  float repetition_penalty = 1.0f;   ///< 1: off; > 1 discourages repeats
  int repetition_window = 0;         ///< the last n history tokens penalised; 0: all of them
  std::uint64_t seed = 0x5eed;       ///< the same seed gives the same tokens

  /// Throws invalid_input naming the first out-of-range setting.
  void validate() const {
    auto fail = [](const std::string& what) { throw invalid_input("ctformer::infer::sampling_settings: " + what); };
    if (!(temperature >= 0.0f) || std::isinf(temperature)) fail("temperature must be >= 0 and finite");
    if (top_k < 0) fail("top_k must be >= 0 (0 turns it off)");
    if (!(top_p > 0.0f && top_p <= 1.0f)) fail("top_p must be in (0, 1]");
    if (!(min_p >= 0.0f && min_p <= 1.0f)) fail("min_p must be in [0, 1]");
    if (!(repetition_penalty > 0.0f) || std::isinf(repetition_penalty)) fail("repetition_penalty must be > 0 and finite");
    if (repetition_window < 0) fail("repetition_window must be >= 0");
  }
};

/// A token still in the running after the filters, with its final probability.
struct candidate {
  std::int32_t token;
  float probability;
};

/// Draws tokens from logits rows under one sampling_settings. Holds the RNG
/// (std::mt19937_64) and scratch buffers that grow to the vocabulary once and
/// are then reused: no allocation per token after the first.
class sampler {
 public:
  explicit sampler(sampling_settings settings = {}) : settings_(settings), rng_(settings.seed) { settings_.validate(); }

  const sampling_settings& settings() const { return settings_; }

  /// Restarts the random stream: the tokens after reseed(s) equal those of a
  /// fresh sampler with seed s.
  void reseed(std::uint64_t seed) {
    settings_.seed = seed;
    rng_.seed(seed);
  }

  /// The next token. logits: (vocab); history: the tokens so far (prompt and
  /// generated, as HF does), read only for the repetition penalty.
  /// Throws invalid_input for an empty row, a NaN logit, or a history token
  /// outside [0, vocab).
  std::int32_t sample(std::span<const float> logits, std::span<const std::int32_t> history = {}) {
    const std::size_t vocab = logits.size();
    if (vocab == 0) throw invalid_input("ctformer::infer::sampler: empty logits row");
    work_.assign(logits.begin(), logits.end());
    apply_repetition_penalty(history);
    for (float v : work_)
      if (std::isnan(v) || (std::isinf(v) && v > 0.0f))
        throw invalid_input("ctformer::infer::sampler: NaN or +inf in the logits row");

    if (settings_.temperature == 0.0f) {
      const auto best = std::int32_t(std::max_element(work_.begin(), work_.end()) - work_.begin());
      candidates_.assign(1, candidate{best, 1.0f});
      return best;
    }
    const float inv_t = 1.0f / settings_.temperature;

    // Candidates sorted by logit, descending, only as far as a filter needs:
    // top-k needs k, top-p a prefix reaching p (found by doubling), min-p and
    // plain sampling none (the whole row, unsorted).
    order_.resize(vocab);
    for (std::size_t i = 0; i < vocab; ++i) order_[i] = std::int32_t(i);
    auto by_logit = [&](std::int32_t a, std::int32_t b) {
      return work_[std::size_t(a)] > work_[std::size_t(b)] || (work_[std::size_t(a)] == work_[std::size_t(b)] && a < b);
    };
    std::size_t kept = vocab;
    bool sorted = false;
    if (settings_.top_k > 0 && std::size_t(settings_.top_k) < vocab) {
      kept = std::size_t(settings_.top_k);
      std::partial_sort(order_.begin(), order_.begin() + std::ptrdiff_t(kept), order_.end(), by_logit);
      sorted = true;
    }
    // The maximum logit: the softmax shift, and the reference of min-p.
    const float max_logit = sorted ? work_[std::size_t(order_[0])] : *std::max_element(work_.begin(), work_.end());
    if (std::isinf(max_logit) && max_logit < 0.0f)
      throw invalid_input("ctformer::infer::sampler: every logit is -inf, nothing to sample");

    // Softmax normaliser over the kept set (before top-p / min-p: they are
    // defined on these probabilities).
    double z = 0.0;
    for (std::size_t i = 0; i < kept; ++i) z += std::exp(double((work_[std::size_t(order_[i])] - max_logit) * inv_t));

    if (settings_.top_p < 1.0f) {
      // Grow a sorted prefix until its mass reaches top_p (partial sorts of
      // 64, 256, ... candidates: a full sort of a 32000-token row per token
      // would cost more than the decode step it follows).
      std::size_t prefix = std::min<std::size_t>(kept, 64);
      std::size_t cut = 0;
      for (;;) {
        std::partial_sort(order_.begin(), order_.begin() + std::ptrdiff_t(prefix),
                          order_.begin() + std::ptrdiff_t(kept), by_logit);
        double mass = 0.0;
        for (cut = 0; cut < prefix && mass < double(settings_.top_p);)
          mass += std::exp(double((work_[std::size_t(order_[cut++])] - max_logit) * inv_t)) / z;
        if (mass >= double(settings_.top_p) || prefix == kept) break;
        prefix = std::min(kept, prefix * 4);
      }
      kept = cut;
    }

    // Final probabilities (unnormalised: relative to the max), min-p filter.
    const double floor = double(settings_.min_p);  // p_i / p_max >= min_p
    candidates_.clear();
    double total = 0.0;
    for (std::size_t i = 0; i < kept; ++i) {
      const std::int32_t t = order_[i];
      const double rel = std::exp(double((work_[std::size_t(t)] - max_logit) * inv_t));
      if (rel < floor) continue;
      candidates_.push_back(candidate{t, float(rel)});
      total += rel;
    }
    // Draw: a uniform double in [0, total) from 53 random bits, computed here
    // (not by std::uniform_real_distribution) so the stream is the same on
    // every standard library.
    const double u = double(rng_() >> 11) * 0x1.0p-53 * total;
    double running = 0.0;
    std::int32_t chosen = candidates_.back().token;
    for (const candidate& c : candidates_) {
      running += double(c.probability);
      if (u < running) {
        chosen = c.token;
        break;
      }
    }
    for (candidate& c : candidates_) c.probability = float(double(c.probability) / total);
    return chosen;
  }

  /// The tokens the last sample() chose from, with their probabilities after
  /// every filter (summing to 1); sorted by probability when top-k or top-p ran.
  std::span<const candidate> last_candidates() const { return candidates_; }

 private:
  void apply_repetition_penalty(std::span<const std::int32_t> history) {
    const float penalty = settings_.repetition_penalty;
    if (penalty == 1.0f || history.empty()) return;
    const std::size_t vocab = work_.size();
    if (settings_.repetition_window > 0 && history.size() > std::size_t(settings_.repetition_window))
      history = history.last(std::size_t(settings_.repetition_window));
    seen_.resize(vocab);  // all zero between calls: cleared below
    for (std::int32_t t : history) {
      if (t < 0 || std::size_t(t) >= vocab) {
        for (std::int32_t u : history)
          if (u >= 0 && std::size_t(u) < vocab) seen_[std::size_t(u)] = 0;
        throw invalid_input("ctformer::infer::sampler: history token " + std::to_string(t) +
                            " is outside the vocabulary of " + std::to_string(vocab));
      }
      if (seen_[std::size_t(t)]) continue;  // each distinct token penalised once
      seen_[std::size_t(t)] = 1;
      float& v = work_[std::size_t(t)];
      v = v > 0.0f ? v / penalty : v * penalty;
    }
    for (std::int32_t t : history) seen_[std::size_t(t)] = 0;
  }

  sampling_settings settings_;
  std::mt19937_64 rng_;
  std::vector<float> work_;            // (vocab) penalised logits
  std::vector<std::int32_t> order_;    // (vocab) token ids, sorted as far as needed
  std::vector<std::uint8_t> seen_;     // (vocab) marks for the penalty, kept all-zero
  std::vector<candidate> candidates_;  // what the last draw chose from
};

/// The greedy token of a logits row (ties: the smallest id).
inline std::int32_t greedy(std::span<const float> logits) {
  if (logits.empty()) throw invalid_input("ctformer::infer::greedy: empty logits row");
  return std::int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

/// Why generation stopped.
enum class stop_reason {
  none,           ///< keep going
  max_tokens,     ///< the token budget is spent
  end_of_text,    ///< the last token is an end-of-sequence token
  stop_sequence,  ///< the generated tokens end with a stop sequence
};

/// When to stop generating: after max_tokens new tokens, at an end-of-sequence
/// token, or when the generated tokens end with one of the stop sequences.
/// Text stop strings (as in the OpenAI API) are matched by find_stop_text on
/// the decoded text, since a string may end in the middle of a token.
class stop_criteria {
 public:
  /// @param max_tokens the most new tokens (> 0)
  /// @param end_tokens tokens that end the text (e.g. <|endoftext|>)
  /// @param stop_sequences token sequences that end the text (none empty)
  /// @param stop_strings strings that end the text (none empty)
  explicit stop_criteria(int max_tokens, std::vector<std::int32_t> end_tokens = {},
                         std::vector<std::vector<std::int32_t>> stop_sequences = {},
                         std::vector<std::string> stop_strings = {})
      : max_tokens_(max_tokens),
        end_tokens_(std::move(end_tokens)),
        stop_sequences_(std::move(stop_sequences)),
        stop_strings_(std::move(stop_strings)) {
    if (max_tokens <= 0) throw invalid_input("ctformer::infer::stop_criteria: max_tokens must be > 0");
    for (const auto& s : stop_sequences_)
      if (s.empty()) throw invalid_input("ctformer::infer::stop_criteria: an empty stop sequence");
    for (const auto& s : stop_strings_)
      if (s.empty()) throw invalid_input("ctformer::infer::stop_criteria: an empty stop string");
  }

  /// Checks the generated tokens so far (not the prompt), after each new token.
  /// A stop sequence or end token wins over max_tokens when both apply, so the
  /// caller knows to strip it (matched_length() tokens).
  stop_reason check(std::span<const std::int32_t> generated) {
    matched_ = 0;
    if (!generated.empty()) {
      const std::int32_t last = generated.back();
      if (std::find(end_tokens_.begin(), end_tokens_.end(), last) != end_tokens_.end()) {
        matched_ = 1;
        return stop_reason::end_of_text;
      }
      for (const auto& s : stop_sequences_)
        if (s.size() <= generated.size() && std::equal(s.begin(), s.end(), generated.end() - std::ptrdiff_t(s.size()))) {
          matched_ = s.size();
          return stop_reason::stop_sequence;
        }
    }
    if (generated.size() >= std::size_t(max_tokens_)) return stop_reason::max_tokens;
    return stop_reason::none;
  }

  /// Tokens at the end of the output that the last check() matched (the stop
  /// sequence or end token), 0 otherwise.
  std::size_t matched_length() const { return matched_; }

  /// Where the earliest stop string starts in text, searching only where one
  /// could involve the last new_chars characters (the text just appended);
  /// nullopt when none occurs. The caller cuts the text there.
  std::optional<std::size_t> find_stop_text(std::string_view text, std::size_t new_chars) const {
    std::optional<std::size_t> best;
    for (const std::string& s : stop_strings_) {
      const std::size_t reach = new_chars + s.size() - 1;
      const std::size_t from = text.size() > reach ? text.size() - reach : 0;
      const std::size_t at = text.find(s, from);
      if (at != std::string_view::npos && (!best || at < *best)) best = at;
    }
    return best;
  }

  int max_tokens() const { return max_tokens_; }

 private:
  int max_tokens_;
  std::vector<std::int32_t> end_tokens_;
  std::vector<std::vector<std::int32_t>> stop_sequences_;
  std::vector<std::string> stop_strings_;
  std::size_t matched_ = 0;
};

}  // namespace ctformer::infer
