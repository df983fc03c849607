// The parameter table of a model: every tensor's name, place in the one flat
// buffer, shape and kind, built by walking the layers once.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ctformer/core/parameter_range.hpp"
#include "ctformer/core/tensor_view.hpp"

namespace ctformer::nn {

/// What a parameter is, which decides weight decay (matrices only, by default).
enum class parameter_kind { matrix, bias, norm, embedding };

/// One parameter tensor: its name in checkpoints, its offset (in floats) in
/// the flat parameter buffer, its shape and kind. Gradients and optimizer
/// state use the same offsets in buffers of their own.
struct parameter_info {
  std::string name;
  index_t offset = 0;
  std::vector<index_t> shape;
  parameter_kind kind = parameter_kind::matrix;

  index_t size() const {
    index_t n = 1;
    for (index_t e : shape) n *= e;
    return n;
  }
};

/// Lays tensors out one after another, each starting on a 64-byte boundary so
/// every row a kernel streams starts aligned.
class parameter_layout {
 public:
  static constexpr index_t alignment_floats = 16;

  index_t add(std::string name, std::vector<index_t> shape, parameter_kind kind) {
    parameter_info info{std::move(name), total_, std::move(shape), kind};
    total_ += (info.size() + alignment_floats - 1) / alignment_floats * alignment_floats;
    table_.push_back(std::move(info));
    return table_.back().offset;
  }
  const std::vector<parameter_info>& table() const { return table_; }
  index_t total() const { return total_; }

 private:
  std::vector<parameter_info> table_;
  index_t total_ = 0;
};

/// The weight-decay ranges of a table: matrices decay; norms and biases do
/// not unless decay_all; embeddings only with decay_embeddings (nanoGPT
/// decays every 2-D tensor, embeddings included; many recipes do not).
inline std::vector<parameter_range> decay_ranges(const std::vector<parameter_info>& table, bool decay_all = false,
                                                 bool decay_embeddings = false) {
  std::vector<parameter_range> ranges;
  for (const auto& p : table) {
    const bool decay = decay_all || p.kind == parameter_kind::matrix ||
                       (decay_embeddings && p.kind == parameter_kind::embedding);
    if (!ranges.empty() && ranges.back().decay == decay && ranges.back().offset + ranges.back().size == p.offset)
      ranges.back().size += p.size();
    else
      ranges.push_back({p.offset, p.size(), decay});
  }
  return ranges;
}

/// Whether a parameter name matches a pattern: '*' stands for any run of
/// characters (dots included) and "[a-b]" for one decimal number from a to b,
/// so "blocks.[0-3].*" is the first four blocks and "*norm.*" every norm.
inline bool matches_parameter_pattern(std::string_view pattern, std::string_view name) {
  if (pattern.empty()) return name.empty();
  if (pattern.front() == '*') {
    for (std::size_t skip = 0; skip <= name.size(); ++skip)
      if (matches_parameter_pattern(pattern.substr(1), name.substr(skip))) return true;
    return false;
  }
  if (pattern.front() == '[') {
    const auto close = pattern.find(']');
    const auto dash = pattern.find('-');
    if (close != std::string_view::npos && dash != std::string_view::npos && dash < close) {
      auto number = [](std::string_view digits, long& value) {
        if (digits.empty() || digits.size() > 9) return false;
        value = 0;
        for (char ch : digits) {
          if (ch < '0' || ch > '9') return false;
          value = value * 10 + (ch - '0');
        }
        return true;
      };
      long low = 0, high = 0;
      if (number(pattern.substr(1, dash - 1), low) && number(pattern.substr(dash + 1, close - dash - 1), high)) {
        std::size_t digits = 0;
        while (digits < name.size() && digits < 9 && name[digits] >= '0' && name[digits] <= '9') ++digits;
        long value = 0;
        if (!number(name.substr(0, digits), value)) return false;
        return value >= low && value <= high &&
               matches_parameter_pattern(pattern.substr(close + 1), name.substr(digits));
      }
    }
  }
  return !name.empty() && name.front() == pattern.front() &&
         matches_parameter_pattern(pattern.substr(1), name.substr(1));
}

/// The slices of the flat buffer that train, given which tensors are frozen
/// (frozen[i] for table[i]): adjacent trainable tensors merge into one slice,
/// the alignment padding between them included, so an optimizer makes one
/// pass per slice. decay is left true; it is not what these ranges say.
inline std::vector<parameter_range> trainable_ranges(const std::vector<parameter_info>& table,
                                                     const std::vector<bool>& frozen) {
  std::vector<parameter_range> ranges;
  for (std::size_t i = 0; i < table.size(); ++i) {
    if (frozen[i]) continue;
    const index_t end = i + 1 < table.size() ? table[i + 1].offset : table[i].offset + table[i].size();
    if (!ranges.empty() && ranges.back().offset + ranges.back().size == table[i].offset)
      ranges.back().size = end - ranges.back().offset;
    else
      ranges.push_back({table[i].offset, end - table[i].offset, true});
  }
  return ranges;
}

}  // namespace ctformer::nn
