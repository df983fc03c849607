// The embedded default task: fixed-width addition "a+b=c" generated on the
// fly, with a held-out set of problems never seen in training, measured by
// exact match of greedy continuations.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "ctformer/core/error.hpp"
#include "ctformer/core/tensor_view.hpp"

namespace ctformer::train {

/// Addition of two `digits`-digit numbers, written as a character sequence:
///
///   a (digits, most significant first, zero-padded) '+' b '=' c '$'
///
/// where c, the sum, has digits + 1 digits written LEAST significant digit
/// first, and '$' is the end token. Example (digits = 3): 123+456 = 579 is
/// "123+456=9750$".
///
/// Why reversed: a model generates left to right. With the answer least
/// significant digit first, each output digit depends only on the operand
/// digits at its own position and the carry from the digit it has just
/// written, so the carry is computed in generation order. Written most
/// significant first, the first digit depends on a carry chain through every
/// position, which a small model must resolve before emitting anything; small
/// models learn the reversed form many times faster (Lee et al. 2023,
/// "Teaching Arithmetic to Small Transformers").
///
/// Vocabulary (13 tokens): '0'..'9' -> 0..9, '+' -> 10, '=' -> 11, '$' (end) -> 12.
/// Every sequence has the same length, 3*digits + 4 tokens; a model sees the
/// first 3*digits + 3 as input and predicts the next token at each position.
///
/// Held-out set: `heldout_count` distinct problems drawn from a fixed seed
/// (independent of the training generator); training sampling rejects them,
/// so the held-out exact match measures generalisation, not memory.
class addition_task {
 public:
  static constexpr std::int32_t plus_token = 10;
  static constexpr std::int32_t equals_token = 11;
  static constexpr std::int32_t end_token = 12;
  static constexpr int vocab_size = 13;
  /// The characters of tokens 0..12.
  static constexpr std::string_view alphabet = "0123456789+=$";
  static constexpr std::int32_t ignore_target = -1;

  /// digits: operand width, 1..9. heldout_count: size of the held-out set,
  /// capped at a tenth of all digits-digit problems. seed: picks the held-out set.
  explicit addition_task(int digits = 3, std::size_t heldout_count = 1000, std::uint64_t seed = 0x5eed)
      : digits_(digits) {
    if (digits < 1 || digits > 9)
      throw invalid_input("ctformer::train::addition_task: digits must be 1..9, got " + std::to_string(digits));
    limit_ = 1;
    for (int i = 0; i < digits; ++i) limit_ *= 10;
    const std::uint64_t total = limit_ * limit_;
    heldout_count = std::size_t(std::min<std::uint64_t>(heldout_count, total / 10));
    std::mt19937_64 rng(seed);
    heldout_keys_.reserve(heldout_count);
    std::unordered_set<std::uint64_t> seen;
    while (heldout_keys_.size() < heldout_count) {
      const std::uint64_t a = uniform_below(rng, limit_), b = uniform_below(rng, limit_);
      if (seen.insert(key(a, b)).second) heldout_keys_.push_back(key(a, b));
    }
    // The evaluation order is the draw order (so a prefix is a random subset);
    // membership queries use a sorted copy.
    sorted_keys_ = heldout_keys_;
    std::sort(sorted_keys_.begin(), sorted_keys_.end());
  }

  int digits() const { return digits_; }
  /// Tokens in one full problem: 3*digits + 4.
  index_t sequence_length() const { return 3 * index_t(digits_) + 4; }
  /// The model's input length T: the full problem less its last token.
  index_t context_length() const { return sequence_length() - 1; }
  /// Tokens in a prompt "a+b=": 2*digits + 2.
  index_t prompt_length() const { return 2 * index_t(digits_) + 2; }
  /// Tokens generated after the prompt: digits + 1 answer digits and the end token.
  index_t answer_length() const { return index_t(digits_) + 2; }
  /// Exclusive upper bound of an operand: 10^digits.
  std::uint64_t operand_limit() const { return limit_; }

  /// The held-out problems as (a, b) pairs, in a fixed order.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> heldout_problems() const {
    std::vector<std::pair<std::uint64_t, std::uint64_t>> out;
    out.reserve(heldout_keys_.size());
    for (std::uint64_t k : heldout_keys_) out.emplace_back(k / limit_, k % limit_);
    return out;
  }
  std::size_t heldout_size() const { return heldout_keys_.size(); }
  bool is_heldout(std::uint64_t a, std::uint64_t b) const {
    return std::binary_search(sorted_keys_.begin(), sorted_keys_.end(), key(a, b));
  }

  /// A training problem: uniform over all pairs, held-out ones rejected.
  std::pair<std::uint64_t, std::uint64_t> sample_problem(std::mt19937_64& rng) const {
    for (;;) {
      const std::uint64_t a = uniform_below(rng, limit_), b = uniform_below(rng, limit_);
      if (!is_heldout(a, b)) return {a, b};
    }
  }

  /// The full token sequence of a + b (sequence_length() tokens).
  std::vector<std::int32_t> encode(std::uint64_t a, std::uint64_t b) const {
    std::vector<std::int32_t> t(static_cast<std::size_t>(sequence_length()));
    encode_into(a, b, t.data());
    return t;
  }

  /// Writes the sequence_length() tokens of a + b to out (no allocation).
  void encode_into(std::uint64_t a, std::uint64_t b, std::int32_t* out) const {
    check_operands(a, b);
    out = write_number(out, a, digits_);
    *out++ = plus_token;
    out = write_number(out, b, digits_);
    *out++ = equals_token;
    std::uint64_t c = a + b;
    for (int i = 0; i <= digits_; ++i, c /= 10) *out++ = std::int32_t(c % 10);  // least significant first
    *out = end_token;
  }

  /// The prompt "a+b=" (prompt_length() tokens).
  std::vector<std::int32_t> prompt(std::uint64_t a, std::uint64_t b) const {
    auto t = encode(a, b);
    t.resize(std::size_t(prompt_length()));
    return t;
  }

  /// Fills a batch of training problems. Row r of inputs is a problem's first
  /// context_length() tokens; targets[r][i] is token i + 1 where that token is
  /// an answer digit or the end token, and -1 (ignored by the loss) elsewhere:
  /// the operands are random, so predicting them only adds noise to the loss.
  /// inputs, targets: (B, context_length()) int32, host memory.
  void make_batch(std::mt19937_64& rng, tensor_view<std::int32_t, 2> inputs,
                  tensor_view<std::int32_t, 2> targets) const {
    require_same_shape("train::addition_task::make_batch", "inputs", inputs, "targets", targets);
    if (inputs.extent(1) != context_length())
      throw shape_error("ctformer::train::addition_task::make_batch: inputs has shape " + shape_string(inputs) +
                        "; its second extent must be the context length " + std::to_string(context_length()));
    const index_t first_answer = prompt_length() - 1;  // input position whose next token is the first answer digit
    std::int32_t seq[3 * 9 + 4];  // the longest sequence (digits = 9)
    for (index_t r = 0; r < inputs.extent(0); ++r) {
      const auto [a, b] = sample_problem(rng);
      encode_into(a, b, seq);
      for (index_t i = 0; i < context_length(); ++i) {
        inputs(r, i) = seq[i];
        targets(r, i) = i >= first_answer ? seq[i + 1] : ignore_target;
      }
    }
  }

  /// True when `generated` (the tokens after a prompt) is exactly the
  /// answer of a + b followed by the end token; anything after it is ignored.
  bool is_correct(std::uint64_t a, std::uint64_t b, std::span<const std::int32_t> generated) const {
    const auto seq = encode(a, b);
    if (index_t(generated.size()) < answer_length()) return false;
    return std::equal(seq.begin() + prompt_length(), seq.end(), generated.begin());
  }

  /// The fraction of held-out problems answered exactly by `predict`, a greedy
  /// continuation: predict(prompt, max_new_tokens) returns the new tokens
  /// (not the prompt). limit > 0 evaluates only the first `limit` held-out
  /// problems (a fixed, random subset).
  template <class Predict>
    requires std::invocable<Predict&, std::span<const std::int32_t>, int>
  double exact_match(Predict&& predict, std::size_t limit = 0) const {
    const std::size_t n = limit > 0 ? std::min(limit, heldout_keys_.size()) : heldout_keys_.size();
    if (n == 0) throw invalid_input("ctformer::train::addition_task::exact_match: the held-out set is empty");
    std::size_t correct = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint64_t a = heldout_keys_[i] / limit_, b = heldout_keys_[i] % limit_;
      const auto p = prompt(a, b);
      const std::vector<std::int32_t> out =
          predict(std::span<const std::int32_t>(p.data(), p.size()), int(answer_length()));
      if (is_correct(a, b, out)) ++correct;
    }
    return double(correct) / double(n);
  }

  /// Tokens as characters of alphabet ("123+456=9750$"); an id outside the
  /// vocabulary shows as '?'.
  static std::string to_text(std::span<const std::int32_t> tokens) {
    std::string s;
    s.reserve(tokens.size());
    for (std::int32_t t : tokens) s.push_back(t >= 0 && t < vocab_size ? alphabet[std::size_t(t)] : '?');
    return s;
  }

  /// Characters of alphabet to tokens; throws invalid_input naming an unknown
  /// character and its position.
  static std::vector<std::int32_t> from_text(std::string_view text) {
    std::vector<std::int32_t> t;
    t.reserve(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) {
      const auto at = alphabet.find(text[i]);
      if (at == std::string_view::npos)
        throw invalid_input("ctformer::train::addition_task: character '" + std::string(1, text[i]) +
                            "' at position " + std::to_string(i) + " is not one of \"" + std::string(alphabet) + "\"");
      t.push_back(std::int32_t(at));
    }
    return t;
  }

  /// The problem as a person writes it: "123+456=579" (no padding, normal order).
  static std::string display(std::uint64_t a, std::uint64_t b) {
    return std::to_string(a) + "+" + std::to_string(b) + "=" + std::to_string(a + b);
  }

  /// The number a generated answer denotes (its digits read least significant
  /// first, up to the end token), or -1 when it is not digits followed by the end token.
  static std::int64_t decode_answer(std::span<const std::int32_t> generated) {
    std::int64_t value = 0, place = 1;
    for (std::int32_t t : generated) {
      if (t == end_token) return value;
      if (t < 0 || t > 9 || place > 1'000'000'000'000'000LL) return -1;
      value += t * place;
      place *= 10;
    }
    return -1;
  }

 private:
  // Uniform in [0, n) from the generator's raw output; the modulo bias is
  // below 1e-9 for n <= 10^9, and unlike std::uniform_int_distribution the
  // sequence is the same with every standard library.
  static std::uint64_t uniform_below(std::mt19937_64& rng, std::uint64_t n) { return rng() % n; }
  std::uint64_t key(std::uint64_t a, std::uint64_t b) const { return a * limit_ + b; }
  void check_operands(std::uint64_t a, std::uint64_t b) const {
    if (a >= limit_ || b >= limit_)
      throw invalid_input("ctformer::train::addition_task: operands " + std::to_string(a) + " and " +
                          std::to_string(b) + " must have at most " + std::to_string(digits_) + " digits");
  }
  static std::int32_t* write_number(std::int32_t* out, std::uint64_t x, int width) {
    std::uint64_t div = 1;
    for (int i = 1; i < width; ++i) div *= 10;
    for (; div > 0; div /= 10) *out++ = std::int32_t((x / div) % 10);
    return out;
  }

  int digits_ = 3;
  std::uint64_t limit_ = 1000;
  std::vector<std::uint64_t> heldout_keys_;  // draw order
  std::vector<std::uint64_t> sorted_keys_;   // for membership
};

}  // namespace ctformer::train
