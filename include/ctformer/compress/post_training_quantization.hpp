// Post-training quantization of a trained model's linear weights into any
// quant::weight_format (q8_0, q4_0, int8_rowwise, bf16, fp32, and the pruned
// sparse_2of4 / sparse_half): packed matrices per parameter name for the
// inference model, a fake-quantized fp32 model (quantize, then dequantize in
// place) whose ordinary forward measures the format's perplexity, and the
// bytes a model takes in a format.
#pragma once

#include <cstddef>
#include <map>
#include <string>

#include "ctformer/nn/model.hpp"
#include "ctformer/ops/quantize.hpp"
#include "ctformer/quant/packed_matrix.hpp"
#include "ctformer/quant/sparse_formats.hpp"
#include "ctformer/kernels/cpu/sparse_gemv.hpp"

namespace ctformer::compress {

/// The weights a format applies to: the 2-D matrices of the linear layers
/// (qkv, attention output, MLP up and down, an untied lm_head). Embeddings,
/// norms and biases stay fp32 -- they are a few percent of a model's bytes
/// and, for a tied lm_head, the embedding is also the output projection.
inline bool is_linear_weight(const nn::parameter_info& p) {
  return p.kind == nn::parameter_kind::matrix && p.shape.size() == 2;
}

/// Every linear weight of a model packed in Format, by parameter name.
template <quant::weight_format Format>
using packed_weights = std::map<std::string, quant::packed_matrix<Format>>;

namespace detail {
template <class Model>
tensor_view<float, 2> matrix_of(Model& model, const nn::parameter_info& p) {
  return tensor_view<float, 2>(model.parameters().data() + p.offset, {p.shape[0], p.shape[1]});
}
}  // namespace detail

/// Packs every linear weight of model in Format (rows over the model's threads).
/// The sparse formats prune while packing (per row for sparse_half, 2:4 for sparse_2of4).
/// Throws shape_error when a weight's column count does not fit the format.
/// @tparam Format a quant::weight_format
/// @tparam Model an nn::model on a host-memory policy
template <quant::weight_format Format, class Model>
packed_weights<Format> quantize_weights(Model& model) {
  packed_weights<Format> out;
  for (const nn::parameter_info& p : model.parameter_table()) {
    if (!is_linear_weight(p)) continue;
    quant::packed_matrix<Format> packed(p.shape[0], p.shape[1]);
    ops::quantize(model.exec(), detail::matrix_of(model, p), packed);
    out.emplace(p.name, std::move(packed));
  }
  model.exec().synchronize();
  return out;
}

/// Writes the packed weights' fp32 values back into the model's linear
/// weights (the model then computes exactly what the packed weights stand for).
template <quant::weight_format Format, class Model>
void load_dequantized(Model& model, const packed_weights<Format>& weights) {
  for (const nn::parameter_info& p : model.parameter_table()) {
    if (!is_linear_weight(p)) continue;
    auto it = weights.find(p.name);
    if (it == weights.end())
      throw invalid_input("ctformer::compress::load_dequantized: no packed weight named '" + p.name + "'");
    ops::dequantize(model.exec(), it->second, detail::matrix_of(model, p));
  }
  model.exec().synchronize();
  model.parameters_changed();
}

/// Quantize-then-dequantize every linear weight in place: the model keeps its
/// fp32 forward but its weights are exactly the values Format can hold, so its
/// loss is the quantized model's loss (up to the GEMV's activation rounding,
/// which q8_0/q4_0/int8_rowwise kernels add at inference).
template <quant::weight_format Format, class Model>
void fake_quantize(Model& model) {
  load_dequantized<Format>(model, quantize_weights<Format>(model));
}

/// Bytes of the model's weights with the linear weights in Format and every
/// other parameter fp32 (tensor sizes, without the flat buffer's alignment padding).
template <quant::weight_format Format, class Model>
std::size_t weight_bytes(const Model& model) {
  std::size_t bytes = 0;
  for (const nn::parameter_info& p : model.parameter_table())
    bytes += is_linear_weight(p) ? Format::bytes_for(p.shape[0], p.shape[1]) : std::size_t(p.size()) * sizeof(float);
  return bytes;
}

}  // namespace ctformer::compress
