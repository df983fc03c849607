// A tokenized text split into training and validation parts: random windows
// for training batches, fixed windows for a deterministic validation loss.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "ctformer/core/error.hpp"
#include "ctformer/core/tensor_view.hpp"

namespace ctformer::io {

/// The whole file as bytes; io_error naming the file when it cannot be read.
inline std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error("ctformer::io: cannot open '" + path.string() + "' for reading");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw io_error("ctformer::io: reading '" + path.string() + "' failed");
  return text;
}

/// Token ids of a text, the first train_fraction of them for training and the
/// rest for validation (nanoGPT's split: train = tokens[:int(n * 0.9)]).
/// Batches are windows of T + 1 consecutive tokens: inputs the first T,
/// targets the last T (each position predicts the next token).
class text_dataset {
 public:
  /// tokens: the whole text, tokenized. context: the longest T batches will
  /// use. source names the text in messages. Throws invalid_input naming the
  /// source and the sizes when either split has fewer than context + 1 tokens.
  text_dataset(std::vector<std::int32_t> tokens, index_t context, double train_fraction = 0.9,
               std::string source = "<memory>")
      : tokens_(std::move(tokens)), context_(context), source_(std::move(source)) {
    if (!(train_fraction > 0.0 && train_fraction < 1.0))
      throw invalid_input("ctformer::io::text_dataset: the training fraction must lie in (0, 1), got " +
                          std::to_string(train_fraction));
    if (context < 1)
      throw invalid_input("ctformer::io::text_dataset: the context length must be at least 1, got " +
                          std::to_string(context));
    const index_t n = index_t(tokens_.size());
    train_size_ = index_t(double(n) * train_fraction);
    const index_t val_size = n - train_size_;
    if (n == 0)
      throw invalid_input("ctformer::io::text_dataset: '" + source_ + "' is empty: there is no text to train on");
    if (train_size_ < context + 1 || val_size < context + 1)
      throw invalid_input("ctformer::io::text_dataset: '" + source_ + "' is too short: " + std::to_string(n) +
                          " tokens split into " + std::to_string(train_size_) + " for training and " +
                          std::to_string(val_size) + " for validation, but each part needs at least context + 1 = " +
                          std::to_string(context + 1) + " tokens");
  }

  /// Reads path, tokenizes it with tokenizer (anything with
  /// encode(std::string_view) -> std::vector<int32_t>) and splits it.
  template <class Tokenizer>
  static text_dataset from_file(const std::filesystem::path& path, const Tokenizer& tokenizer, index_t context,
                                double train_fraction = 0.9) {
    return text_dataset(tokenizer.encode(read_text_file(path)), context, train_fraction, path.string());
  }

  index_t context() const { return context_; }
  const std::string& source() const { return source_; }
  std::span<const std::int32_t> train_tokens() const { return {tokens_.data(), std::size_t(train_size_)}; }
  std::span<const std::int32_t> val_tokens() const {
    return {tokens_.data() + train_size_, tokens_.size() - std::size_t(train_size_)};
  }

  /// Random training windows: each row starts uniformly in [0, N_train - T - 1].
  /// inputs, targets: (B, T) int32 host memory, T <= context().
  void sample_batch(std::mt19937_64& rng, tensor_view<std::int32_t, 2> inputs,
                    tensor_view<std::int32_t, 2> targets) const {
    sample(train_tokens(), rng, inputs, targets, "sample_batch");
  }

  /// Random validation windows (nanoGPT's estimate_loss draws these).
  /// inputs, targets: (B, T) int32 host memory.
  void sample_validation_batch(std::mt19937_64& rng, tensor_view<std::int32_t, 2> inputs,
                               tensor_view<std::int32_t, 2> targets) const {
    sample(val_tokens(), rng, inputs, targets, "sample_validation_batch");
  }

  /// Number of fixed validation windows of length T: window k covers
  /// validation tokens [k*T, k*T + T] (non-overlapping inputs).
  index_t validation_windows(index_t t) const {
    check_t(t, "validation_windows");
    return (index_t(val_tokens().size()) - 1) / t;
  }

  /// Fills rows with the fixed validation windows first_window, first_window + 1, ...
  /// and returns how many rows were filled; rows past the last window get
  /// inputs 0 and targets -1 (ignored by the loss). Iterating first_window
  /// over 0, B, 2B, ... < validation_windows(T) visits every window once, so
  /// the validation loss is deterministic.
  /// inputs, targets: (B, T) int32 host memory.
  index_t validation_batch(index_t first_window, tensor_view<std::int32_t, 2> inputs,
                           tensor_view<std::int32_t, 2> targets) const {
    require_same_shape("io::text_dataset::validation_batch", "inputs", inputs, "targets", targets);
    const index_t t = inputs.extent(1);
    const index_t windows = validation_windows(t);
    const auto val = val_tokens();
    index_t filled = 0;
    for (index_t r = 0; r < inputs.extent(0); ++r) {
      const index_t w = first_window + r;
      if (w >= 0 && w < windows) {
        write_window(val, w * t, r, inputs, targets);
        ++filled;
      } else {
        for (index_t i = 0; i < t; ++i) {
          inputs(r, i) = 0;
          targets(r, i) = -1;
        }
      }
    }
    return filled;
  }

 private:
  void check_t(index_t t, const char* operation) const {
    if (t < 1 || t > context_)
      throw shape_error("ctformer::io::text_dataset::" + std::string(operation) + ": sequence length " +
                        std::to_string(t) + " must lie in [1, context = " + std::to_string(context_) + "]");
  }

  static void write_window(std::span<const std::int32_t> split, index_t start, index_t row,
                           tensor_view<std::int32_t, 2> inputs, tensor_view<std::int32_t, 2> targets) {
    const index_t t = inputs.extent(1);
    for (index_t i = 0; i < t; ++i) {
      inputs(row, i) = split[std::size_t(start + i)];
      targets(row, i) = split[std::size_t(start + i + 1)];
    }
  }

  void sample(std::span<const std::int32_t> split, std::mt19937_64& rng, tensor_view<std::int32_t, 2> inputs,
              tensor_view<std::int32_t, 2> targets, const char* operation) const {
    require_same_shape(operation, "inputs", inputs, "targets", targets);
    const index_t t = inputs.extent(1);
    check_t(t, operation);
    // Raw generator output modulo the range: the same windows with every
    // standard library (std::uniform_int_distribution is implementation-defined).
    const std::uint64_t starts = std::uint64_t(index_t(split.size()) - t);
    for (index_t r = 0; r < inputs.extent(0); ++r) write_window(split, index_t(rng() % starts), r, inputs, targets);
  }

  std::vector<std::int32_t> tokens_;
  index_t context_ = 0;
  index_t train_size_ = 0;
  std::string source_;
};

}  // namespace ctformer::io
