// infer::batch: the tokens of one forward call over many sequences (prefill
// chunks of some, single decode tokens of others), in the shape of
// llama.cpp's llama_batch: per token its id, position, sequence, and whether
// its logits are wanted.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "ctformer/core/tensor_view.hpp"
#include "ctformer/infer/kv_cache.hpp"

namespace ctformer::infer {

/// The rows of one forward call. The rows of one sequence are consecutive
/// in the batch and at consecutive positions starting at the sequence's
/// length in the cache (the model checks this and names the row that breaks
/// it); different sequences may come in any order. A row's logits are
/// returned when `logits` is set, in row order.
class batch {
 public:
  batch() = default;
  /// Room for `tokens` rows without reallocating.
  explicit batch(index_t tokens) { reserve(tokens); }

  void reserve(index_t tokens) {
    tokens_.reserve(std::size_t(tokens));
    positions_.reserve(std::size_t(tokens));
    sequences_.reserve(std::size_t(tokens));
    logits_.reserve(std::size_t(tokens));
  }
  void clear() {
    tokens_.clear();
    positions_.clear();
    sequences_.clear();
    logits_.clear();
  }

  /// Appends one row: token at `position` of `sequence`.
  void add(std::int32_t token, index_t position, sequence_id sequence, bool logits = false) {
    tokens_.push_back(token);
    positions_.push_back(std::int32_t(position));
    sequences_.push_back(sequence);
    logits_.push_back(logits ? 1 : 0);
  }

  /// Appends tokens at positions [start, start + n) of `sequence`, asking for
  /// the last one's logits when last_logits (a prefill chunk, or a decode step).
  void add_tokens(sequence_id sequence, index_t start, std::span<const std::int32_t> tokens, bool last_logits = true) {
    for (std::size_t i = 0; i < tokens.size(); ++i)
      add(tokens[i], start + index_t(i), sequence, last_logits && i + 1 == tokens.size());
  }

  index_t size() const { return index_t(tokens_.size()); }
  bool empty() const { return tokens_.empty(); }
  std::span<const std::int32_t> tokens() const { return tokens_; }
  std::span<const std::int32_t> positions() const { return positions_; }
  std::span<const sequence_id> sequences() const { return sequences_; }
  /// 1 where the row's logits are wanted.
  std::span<const std::uint8_t> wants_logits() const { return logits_; }
  /// Rows whose logits are wanted.
  index_t logit_rows() const {
    index_t n = 0;
    for (std::uint8_t l : logits_) n += l;
    return n;
  }

 private:
  std::vector<std::int32_t> tokens_, positions_;
  std::vector<sequence_id> sequences_;
  std::vector<std::uint8_t> logits_;
};

}  // namespace ctformer::infer
