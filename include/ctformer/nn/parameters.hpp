// The parameter table of a model: every tensor's name, place in the one flat
// buffer, shape and kind, built by walking the layers once.
#pragma once

#include <string>
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

}  // namespace ctformer::nn
