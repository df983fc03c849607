// infer::sampler (greedy, temperature, top-k, top-p, min-p, repetition,
// presence and frequency penalties over one logits row, with a seeded RNG)
// and infer::stop_criteria (max tokens, end-of-sequence tokens, stop
// sequences of tokens or of text).
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
#include "ctformer/ops/ops.hpp"

namespace ctformer::infer {

/// How the next token is drawn from a logits row. Every filter is off at its
/// default, so `sampling_settings{}` samples from softmax(logits).
///
/// Applied in this order (the order of HF transformers' logits processors):
///  1. repetition penalty on the raw logits of every distinct token in the
///     history window (CTRL, Keskar et al. 2019: a positive logit is divided
///     by the penalty, a negative one multiplied, so the token always loses);
///     then the OpenAI API's presence and frequency penalties, over the
///     generated tokens only: logit -= presence * [count > 0] + frequency * count;
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
  float presence_penalty = 0.0f;     ///< 0: off; in [-2, 2], subtracted once from each generated token's logit
  float frequency_penalty = 0.0f;    ///< 0: off; in [-2, 2], subtracted per occurrence in the generated tokens
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
    if (!(presence_penalty >= -2.0f && presence_penalty <= 2.0f)) fail("presence_penalty must be in [-2, 2]");
    if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f)) fail("frequency_penalty must be in [-2, 2]");
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
  /// generated, as HF does), read only for the penalties: the repetition
  /// penalty reads all of it, the presence and frequency penalties the
  /// generated part history[generated_from, end).
  /// Throws invalid_input for an empty row, a row longer than int32 token ids
  /// can index, a NaN logit, or a history token outside [0, vocab).
  std::int32_t sample(std::span<const float> logits, std::span<const std::int32_t> history = {},
                      std::size_t generated_from = 0) {
    const std::size_t vocab = logits.size();
    if (vocab == 0) throw invalid_input("ctformer::infer::sampler: empty logits row");
    if (vocab > std::size_t(std::numeric_limits<std::int32_t>::max()))
      throw invalid_input("ctformer::infer::sampler: a logits row of " + std::to_string(vocab) +
                          " entries, more than int32 token ids can index");
    work_.assign(logits.begin(), logits.end());
    apply_repetition_penalty(history);
    apply_occurrence_penalties(history.subspan(std::min(generated_from, history.size())));
    // One vectorised pass rejects NaN and +inf and finds the most likely
    // token (ties: the smallest id). Each pass over a 32000-token row costs
    // microseconds, so the sampler makes as few as its filters need.
    const logits_scan scan = ops::scan_logits(cpu::par.with_threads(1), tensor_view<const float, 1>(work_.data(), {index_t(vocab)}));
    const std::size_t best = std::size_t(scan.argmax);
    const float best_logit = scan.max, lowest_logit = scan.lowest_finite;
    const bool invalid = scan.nan_or_positive_infinity;
    if (invalid) throw invalid_input("ctformer::infer::sampler: NaN or +inf in the logits row");

    // A temperature so small that 1 / T overflows is the greedy limit.
    if (settings_.temperature == 0.0f || std::isinf(1.0f / settings_.temperature)) {
      if (candidates_.empty()) candidates_.resize(1);
      candidates_[0] = candidate{std::int32_t(best), 1.0f};
      candidate_count_ = 1;
      return std::int32_t(best);
    }
    if (std::isinf(best_logit)) throw invalid_input("ctformer::infer::sampler: every logit is -inf, nothing to sample");
    const float inv_t = 1.0f / settings_.temperature;

    // softmax(logits / T) over the whole row in one vectorised pass (float
    // exp, a few ulp; a scalar double exp per token cost about 0.4 ms per
    // pass over a 32000-token row). When logit / T could overflow (a tiny
    // temperature), the row is first shifted to its maximum, which then maps
    // to exactly 0. Keeping the top k and renormalising below is the same
    // distribution as the softmax over the kept logits alone.
    probabilities_.resize(vocab);
    const tensor_view<float, 3> row(probabilities_.data(), {1, 1, index_t(vocab)});
    if (std::isinf(best_logit * inv_t) || std::isinf(lowest_logit * inv_t)) {
      for (std::size_t i = 0; i < vocab; ++i) probabilities_[i] = work_[i] - best_logit;
      ops::softmax_forward(cpu::par.with_threads(1), as_const(row), row, inv_t);
    } else {
      ops::softmax_forward(cpu::par.with_threads(1), tensor_view<const float, 3>(work_.data(), {1, 1, index_t(vocab)}),
                           row, inv_t);
    }

    // Candidates sorted by logit, descending, only as far as a filter needs:
    // top-k needs k, top-p a prefix reaching p (found by growing it), min-p
    // and plain sampling none (the whole row, in token order).
    const bool top_k = settings_.top_k > 0 && std::size_t(settings_.top_k) < vocab;
    const bool top_p = settings_.top_p < 1.0f;
    const bool sorted = top_k || top_p;
    std::size_t kept = vocab;
    auto token_at = [&](std::size_t i) { return sorted ? std::size_t(order_[i]) : i; };
    auto by_logit = [&](std::int32_t a, std::int32_t b) {
      return work_[std::size_t(a)] > work_[std::size_t(b)] || (work_[std::size_t(a)] == work_[std::size_t(b)] && a < b);
    };
    order_.resize(vocab);
    if (top_k) {
      for (std::size_t i = 0; i < vocab; ++i) order_[i] = std::int32_t(i);
      kept = std::size_t(settings_.top_k);
      std::partial_sort(order_.begin(), order_.begin() + std::ptrdiff_t(kept), order_.end(), by_logit);
    }

    if (top_p) {
      // The mass of the kept set (1 up to rounding when top-k is off).
      double z = 0.0;
      if (top_k) {
        for (std::size_t i = 0; i < kept; ++i) z += double(probabilities_[std::size_t(order_[i])]);
      } else {
        z = sum_in_four_chains(0, vocab, [&](std::size_t i) { return probabilities_[i]; });
        // Only tokens with p >= tau can be in the nucleus: together the
        // others hold less than vocab * tau = (1 - top_p) z / 2, so the rest
        // reaches top_p with room to spare, and it is a top set (p grows with
        // the logit). Sorting just those replaces partial sorts of the whole
        // row (about 0.9 ms per token for 32000 tokens).
        const double tau = 0.5 * (1.0 - double(settings_.top_p)) * z / double(vocab);
        std::size_t n = 0;
        for (std::size_t t = 0; t < vocab; ++t) {
          order_[n] = std::int32_t(t);
          n += double(probabilities_[t]) >= tau ? 1 : 0;
        }
        kept = n;
      }
      // Narrow down a prefix [0, hi) of the sorted order that holds the
      // nucleus: nth_element halves the unsettled range [lo, hi), and its
      // upper half joins the settled prefix when its mass falls short. About
      // two passes over the kept tokens, then one sort of [0, hi).
      const double target = double(settings_.top_p) * z;
      std::size_t lo = 0, hi = kept;
      double settled = 0.0;  // the mass of [0, lo)
      while (hi - lo > 256) {
        const std::size_t mid = lo + (hi - lo) / 2;
        std::nth_element(order_.begin() + std::ptrdiff_t(lo), order_.begin() + std::ptrdiff_t(mid),
                         order_.begin() + std::ptrdiff_t(hi), by_logit);
        double upper = 0.0;
        for (std::size_t i = lo; i < mid; ++i) upper += double(probabilities_[std::size_t(order_[i])]);
        if (settled + upper >= target) {
          hi = mid;
        } else {
          settled += upper;
          lo = mid;
        }
      }
      std::sort(order_.begin(), order_.begin() + std::ptrdiff_t(hi), by_logit);
      double mass = 0.0;
      std::size_t cut = 0;
      while (cut < hi && mass < double(settings_.top_p)) mass += double(probabilities_[std::size_t(order_[cut++])]) / z;
      kept = cut;
    }

    // Final probabilities (not yet renormalised) and the min-p filter,
    // p_i >= min_p * p_max. Without min-p every kept token stays, even one
    // whose probability underflowed to 0: it can never be drawn.
    const float floor = settings_.min_p * probabilities_[best];
    if (candidates_.size() < kept) candidates_.resize(kept);  // grows once, never shrinks
    std::size_t n = 0;
    if (floor > 0.0f) {
      for (std::size_t i = 0; i < kept; ++i) {
        const std::size_t t = token_at(i);
        if (probabilities_[t] >= floor) candidates_[n++] = candidate{std::int32_t(t), probabilities_[t]};
      }
    } else {
      for (std::size_t i = 0; i < kept; ++i) {
        const std::size_t t = token_at(i);
        candidates_[i] = candidate{std::int32_t(t), probabilities_[t]};
      }
      n = kept;
    }
    candidate_count_ = n;
    const double total = sum_of_probabilities(0, n);
    // Draw: a uniform double in [0, total) from 53 random bits, computed here
    // (not by std::uniform_real_distribution) so the stream is the same on
    // every standard library. The running sum advances four candidates at a
    // time (one dependent add per four, not per candidate), then steps
    // through the four where it passes u.
    const double u = double(rng_() >> 11) * 0x1.0p-53 * total;
    double running = 0.0;
    // If rounding leaves u past the last running sum, the most likely token.
    std::int32_t chosen = std::int32_t(best);
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4) {
      const double block = sum_of_probabilities(i, i + 4);
      if (u < running + block) break;
      running += block;
    }
    for (; i < n; ++i) {
      running += double(candidates_[i].probability);
      if (u < running) {
        chosen = candidates_[i].token;
        break;
      }
    }
    const double inverse_total = 1.0 / total;
    for (std::size_t j = 0; j < n; ++j)
      candidates_[j].probability = float(double(candidates_[j].probability) * inverse_total);
    return chosen;
  }

  /// The tokens the last sample() chose from, with their probabilities after
  /// every filter (summing to 1); sorted by probability when top-k or top-p ran.
  std::span<const candidate> last_candidates() const { return {candidates_.data(), candidate_count_}; }

 private:
  // value(i) for i in [begin, end) summed in double, four chains of adds in
  // flight (one chain would wait on every add), combined in a fixed order.
  template <class Value>
  static double sum_in_four_chains(std::size_t begin, std::size_t end, Value value) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    // Counted in groups of four: with `i + 4 <= end` g++ 12 could not rule
    // out a wrap and warned (-Waggressive-loop-optimizations) once it
    // inlined a vector's operator[].
    const std::size_t groups = end > begin ? (end - begin) / 4 : 0;
    for (std::size_t g = 0; g < groups; ++g)
      for (std::size_t j = 0; j < 4; ++j) s[j] += double(value(begin + 4 * g + j));
    for (std::size_t i = begin + 4 * groups; i < end; ++i) s[0] += double(value(i));
    return (s[0] + s[1]) + (s[2] + s[3]);
  }
  // The candidates' probabilities [begin, end), summed as above.
  double sum_of_probabilities(std::size_t begin, std::size_t end) const {
    return sum_in_four_chains(begin, end, [&](std::size_t i) { return candidates_[i].probability; });
  }

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

  // OpenAI's presence and frequency penalties, additive on the logits.
  void apply_occurrence_penalties(std::span<const std::int32_t> generated) {
    const float presence = settings_.presence_penalty, frequency = settings_.frequency_penalty;
    if ((presence == 0.0f && frequency == 0.0f) || generated.empty()) return;
    const std::size_t vocab = work_.size();
    counts_.resize(vocab);  // all zero between calls: cleared below
    for (std::int32_t t : generated)
      if (t < 0 || std::size_t(t) >= vocab) {
        throw invalid_input("ctformer::infer::sampler: generated token " + std::to_string(t) +
                            " is outside the vocabulary of " + std::to_string(vocab));
      }
    for (std::int32_t t : generated) ++counts_[std::size_t(t)];
    for (std::int32_t t : generated) {
      std::uint32_t& c = counts_[std::size_t(t)];
      if (c == 0) continue;  // already applied
      work_[std::size_t(t)] -= presence + frequency * float(c);
      c = 0;
    }
  }

  sampling_settings settings_;
  std::mt19937_64 rng_;
  std::vector<float> work_;            // (vocab) penalised logits
  std::vector<float> probabilities_;   // (vocab) softmax(work_ / temperature)
  std::vector<std::int32_t> order_;    // (vocab) token ids, sorted as far as needed
  std::vector<std::uint8_t> seen_;     // (vocab) marks for the penalty, kept all-zero
  std::vector<std::uint32_t> counts_;  // (vocab) occurrences for the additive penalties, kept all-zero
  std::vector<candidate> candidates_;  // what the last draw chose from: the first candidate_count_
  std::size_t candidate_count_ = 0;
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
