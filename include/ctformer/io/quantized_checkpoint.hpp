// Checkpoints of compressed models as safetensors: each linear weight stored
// packed in its quant:: format (dtype U8, shape (rows, row_bytes)), every other
// parameter F32, and metadata naming the weight format, the model
// configuration and the tokenizer. Loads into an nn::model (dequantized) and/or
// packed matrices per weight name; also loads only the parameters of a
// training checkpoint (optimizer state ignored) for inference.
#pragma once

#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "ctformer/io/checkpoint.hpp"
#include "ctformer/io/safetensors.hpp"
#include "ctformer/nn/block.hpp"
#include "ctformer/nn/config.hpp"
#include "ctformer/nn/parameters.hpp"
#include "ctformer/quant/formats.hpp"
#include "ctformer/quant/packed_matrix.hpp"
#include "ctformer/quant/sparse_formats.hpp"

namespace ctformer::io {

/// The value of the "format" metadata key of a quantized checkpoint.
inline constexpr std::string_view quantized_checkpoint_format = "ctformer.quantized.v1";

/// What a quantized checkpoint says about itself, readable before any model exists.
struct quantized_checkpoint_metadata {
  std::string weight_format;  ///< Format::name: q8_0, q4_0, int8_rowwise, bf16, fp32, prune50, prune2of4
  std::string config_json;
  std::string vocabulary;
};

/// Linear weights packed in Format, by parameter name (compress::packed_weights is the same type).
template <quant::weight_format Format>
using packed_weight_map = std::map<std::string, quant::packed_matrix<Format>>;

/// Calls f.template operator()<Format>() for the format whose name is `name`
/// (the "weight_format" metadata): the one run-time choice of a format, made
/// once when a file is opened, never inside a kernel. Throws invalid_input
/// listing the known names for any other.
template <class F>
decltype(auto) visit_weight_format(std::string_view name, F&& f) {
  if (name == quant::q8_0::name) return f.template operator()<quant::q8_0>();
  if (name == quant::q4_0::name) return f.template operator()<quant::q4_0>();
  if (name == quant::int8_rowwise::name) return f.template operator()<quant::int8_rowwise>();
  if (name == quant::bf16_weights::name) return f.template operator()<quant::bf16_weights>();
  if (name == quant::fp32::name) return f.template operator()<quant::fp32>();
  if (name == quant::sparse_half::name) return f.template operator()<quant::sparse_half>();
  if (name == quant::sparse_2of4::name) return f.template operator()<quant::sparse_2of4>();
  throw invalid_input("ctformer::io: unknown weight format '" + std::string(name) +
                      "' (known: q8_0, q4_0, int8_rowwise, bf16, fp32, prune50, prune2of4)");
}

namespace detail {

inline bool is_packed_weight(const nn::parameter_info& p) {
  return p.kind == nn::parameter_kind::matrix && p.shape.size() == 2;
}

inline void check_quantized_format(const safetensors_file& f) {
  const auto format = f.metadata_value("format");
  if (!format || *format != quantized_checkpoint_format)
    fail(f.path(), "not a ctformer quantized checkpoint (metadata \"format\" is " +
                       (format ? "\"" + *format + "\"" : std::string("missing")) + ", expected \"" +
                       std::string(quantized_checkpoint_format) + "\")");
}

template <class Model>
void require_config(const safetensors_file& f, const std::string& config) {
  const std::string expected = nn::config_json<typename Model::config>();
  if (!same_config(config, expected))
    fail(f.path(), "the model configuration differs: the file has " + config + ", the model is " + expected);
}

}  // namespace detail

/// Reads and validates a quantized checkpoint's metadata.
inline quantized_checkpoint_metadata read_quantized_checkpoint_metadata(const std::filesystem::path& path) {
  const safetensors_file f = safetensors_file::read(path);
  detail::check_quantized_format(f);
  return {detail::required_metadata(f, "weight_format"), detail::required_metadata(f, "config"),
          detail::required_metadata(f, "vocabulary")};
}

/// True when the file is a quantized checkpoint (any format), false for any
/// other safetensors file; io_error when it is not readable safetensors.
inline bool is_quantized_checkpoint(const std::filesystem::path& path) {
  const safetensors_file f = safetensors_file::read(path);
  const auto format = f.metadata_value("format");
  return format && *format == quantized_checkpoint_format;
}

/// Writes model as a quantized checkpoint, atomically: the linear weights from
/// `packed` (U8, shape (rows, row_bytes)), every other parameter F32 from the
/// model, and metadata weight_format = Format::name, config, vocabulary.
/// Throws invalid_input when packed lacks a linear weight or has the wrong shape.
/// @tparam Format the weight_format of the packed weights
template <quant::weight_format Format, class Model>
void save_quantized_checkpoint(const std::filesystem::path& path, const Model& model,
                               const packed_weight_map<Format>& packed, const std::string& vocabulary) {
  const tensor_view<const float, 1> params = model.parameters();
  std::vector<tensor_source> sources;
  for (const nn::parameter_info& p : model.parameter_table()) {
    if (detail::is_packed_weight(p)) {
      auto it = packed.find(p.name);
      if (it == packed.end())
        throw invalid_input("ctformer::io::save_quantized_checkpoint: no packed weight named '" + p.name + "'");
      const quant::packed_matrix<Format>& w = it->second;
      if (w.rows() != p.shape[0] || w.cols() != p.shape[1])
        throw invalid_input("ctformer::io::save_quantized_checkpoint: packed '" + p.name + "' is (" +
                            std::to_string(w.rows()) + ", " + std::to_string(w.cols()) + "), the model's is (" +
                            std::to_string(p.shape[0]) + ", " + std::to_string(p.shape[1]) + ")");
      sources.push_back({p.name, dtype::u8, {w.rows(), index_t(w.row_bytes())},
                         std::span<const std::byte>(w.data(), w.bytes())});
    } else {
      sources.push_back(
          make_source<float>(p.name, std::span<const float>(params.data() + p.offset, std::size_t(p.size())), p.shape));
    }
  }
  const std::map<std::string, std::string> metadata{{"format", std::string(quantized_checkpoint_format)},
                                                    {"weight_format", Format::name},
                                                    {"config", nn::config_json<typename Model::config>()},
                                                    {"vocabulary", vocabulary}};
  write_safetensors(path, sources, metadata);
}

/// Loads a quantized checkpoint of Format, all or nothing: the file's format,
/// weight_format (must be Format::name), configuration (must be the model's),
/// and every tensor's dtype and shape are checked first, with no tensor
/// missing or extra; then the model's parameters are overwritten (linear
/// weights dequantized) and the packed linear weights are returned for the
/// inference model. Any mismatch throws io_error naming the file (and the
/// tensor) and leaves the model untouched.
/// @tparam Format the weight_format the caller expects (visit_weight_format picks it from the metadata)
template <quant::weight_format Format, class Model>
packed_weight_map<Format> load_quantized_checkpoint(const std::filesystem::path& path, Model& model) {
  const safetensors_file f = safetensors_file::read(path);
  detail::check_quantized_format(f);
  const std::string format = detail::required_metadata(f, "weight_format");
  if (format != Format::name)
    detail::fail(path, "the weights are stored as '" + format + "', but '" + std::string(Format::name) +
                           "' was requested");
  detail::require_config<Model>(f, detail::required_metadata(f, "config"));
  std::set<std::string> expected;
  for (const nn::parameter_info& p : model.parameter_table()) {
    if (detail::is_packed_weight(p)) {
      const index_t shape[] = {p.shape[0], index_t(Format::row_bytes(p.shape[1]))};
      f.require(p.name, dtype::u8, shape);
    } else {
      f.require(p.name, dtype::f32, p.shape);
    }
    expected.insert(p.name);
  }
  for (const auto& [name, info] : f.tensors())
    if (!expected.count(name))
      detail::fail_tensor(path, name, "is in the file but not in the model (a different model?)");

  // Everything checked: from here on nothing can fail but allocation.
  packed_weight_map<Format> packed;
  for (const nn::parameter_info& p : model.parameter_table()) {
    if (!detail::is_packed_weight(p)) continue;
    quant::packed_matrix<Format> w(p.shape[0], p.shape[1]);
    const auto bytes = f.bytes(p.name);
    if (!bytes.empty()) std::memcpy(w.data(), bytes.data(), bytes.size());
    packed.emplace(p.name, std::move(w));
  }
  tensor_view<float, 1> params = model.parameters();
  for (const nn::parameter_info& p : model.parameter_table()) {
    float* dst = params.data() + p.offset;
    if (detail::is_packed_weight(p)) {
      const quant::packed_matrix<Format>& w = packed.at(p.name);
      for (index_t r = 0; r < w.rows(); ++r) Format::dequantize_row(w.row(r), dst + r * w.cols(), w.cols());
    } else {
      const auto bytes = f.bytes(p.name);
      if (!bytes.empty()) std::memcpy(dst, bytes.data(), bytes.size());
    }
  }
  model.parameters_changed();
  return packed;
}

/// A quantized checkpoint as an inference model's weight source: the linear
/// weights' packed bytes go straight into the model's matrices (no detour
/// through an fp32 model, no gradient buffer), the other tensors are read as
/// fp32. Everything is validated when the source opens (format, weight
/// format, configuration, every tensor's dtype and shape, nothing missing or
/// extra), so building a model from it fails, if it fails, before any weight
/// is packed. A tied LM head is quantized from the F32 token embedding, as
/// the quantizer did.
///
///   io::quantized_checkpoint_source<Cfg, quant::q4_0> source(path);
///   infer::inference_model<Cfg, quant::q4_0, KvPolicy> model(source, max_chunk, exec);
/// @tparam Cfg the model configuration the file must hold
/// @tparam Format the weight_format the file must hold (visit_weight_format picks it from the metadata)
template <class Cfg, quant::weight_format Format>
class quantized_checkpoint_source {
 public:
  explicit quantized_checkpoint_source(const std::filesystem::path& path) : file_(safetensors_file::read(path)) {
    detail::check_quantized_format(file_);
    const std::string format = detail::required_metadata(file_, "weight_format");
    if (format != Format::name)
      detail::fail(path, "the weights are stored as '" + format + "', but '" + std::string(Format::name) +
                             "' was requested");
    const std::string config = detail::required_metadata(file_, "config");
    if (!detail::same_config(config, nn::config_json<Cfg>()))
      detail::fail(path, "the model configuration differs: the file has " + config + ", the model is " +
                             nn::config_json<Cfg>());
    vocabulary_ = detail::required_metadata(file_, "vocabulary");
    std::set<std::string> expected;
    for (const nn::parameter_info& p : nn::parameter_table_of<Cfg>()) {
      if (detail::is_packed_weight(p)) {
        const index_t shape[] = {p.shape[0], index_t(Format::row_bytes(p.shape[1]))};
        file_.require(p.name, dtype::u8, shape);
      } else {
        file_.require(p.name, dtype::f32, p.shape);
      }
      expected.insert(p.name);
    }
    for (const auto& [name, info] : file_.tensors())
      if (!expected.count(name))
        detail::fail_tensor(path, name, "is in the file but not in the model (a different model?)");
  }

  const std::string& vocabulary() const { return vocabulary_; }

  /// The F32 values of a dense tensor (shape already validated).
  const float* dense(const std::string& name, const std::vector<index_t>& shape) const {
    const nn::parameter_info& p = entry(name);
    if (p.shape != shape || detail::is_packed_weight(p))
      detail::fail_tensor(file_.path(), name, "is asked for as a dense tensor of another shape");
    // safetensors gives no alignment guarantee for a tensor's bytes: copy.
    std::vector<float>& values = dense_[name];
    const auto bytes = file_.bytes(name);
    values.resize(bytes.size() / sizeof(float));
    if (!bytes.empty()) std::memcpy(values.data(), bytes.data(), bytes.size());
    return values.data();
  }

  /// Fills `out` with tensor `name`'s packed rows as stored (a dense F32
  /// tensor, the tied head, is quantized).
  void packed(const std::string& name, quant::packed_matrix<Format>& out) const {
    const nn::parameter_info& p = entry(name);
    if (p.shape.size() != 2 || p.shape[0] != out.rows() || p.shape[1] != out.cols())
      detail::fail_tensor(file_.path(), name, "is asked for as a matrix of another shape");
    if (detail::is_packed_weight(p)) {
      const auto bytes = file_.bytes(name);
      if (bytes.size() != out.bytes()) detail::fail_tensor(file_.path(), name, "has the wrong number of bytes");
      if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
    } else {
      const float* values = dense(name, p.shape);
      for (index_t r = 0; r < out.rows(); ++r) Format::quantize_row(values + r * out.cols(), out.row(r), out.cols());
      dense_.erase(name);
    }
  }

 private:
  const nn::parameter_info& entry(const std::string& name) const {
    for (const auto& p : table_)
      if (p.name == name) return p;
    detail::fail_tensor(file_.path(), name, "is not a parameter of the configuration");
    return table_.front();
  }

  safetensors_file file_;
  std::vector<nn::parameter_info> table_ = nn::parameter_table_of<Cfg>();
  std::string vocabulary_;
  mutable std::map<std::string, std::vector<float>> dense_;
};

/// Loads only the parameters of a training checkpoint (io::save_checkpoint's
/// files) into model, for inference or evaluation: tensors named
/// "optimizer.*" are ignored, every parameter must be present as F32 with the
/// model's shape, the configuration must be the model's, and no other tensor
/// may be present. All or nothing; returns the checkpoint's metadata (the
/// vocabulary to build the tokenizer from).
template <class Model>
checkpoint_metadata load_model_parameters(const std::filesystem::path& path, Model& model) {
  const safetensors_file f = safetensors_file::read(path);
  detail::check_format(f);
  checkpoint_metadata meta{detail::parse_int(f, "step"), detail::parse_int(f, "optimizer_step"),
                           detail::required_metadata(f, "config"), detail::required_metadata(f, "vocabulary")};
  detail::require_config<Model>(f, meta.config_json);
  std::set<std::string> expected;
  for (const nn::parameter_info& p : model.parameter_table()) {
    f.require(p.name, dtype::f32, p.shape);
    expected.insert(p.name);
  }
  for (const auto& [name, info] : f.tensors())
    if (!expected.count(name) && !name.starts_with("optimizer."))
      detail::fail_tensor(path, name, "is in the file but not in the model (a different model?)");
  tensor_view<float, 1> params = model.parameters();
  for (const nn::parameter_info& p : model.parameter_table()) {
    const auto bytes = f.bytes(p.name);
    if (!bytes.empty()) std::memcpy(params.data() + p.offset, bytes.data(), bytes.size());
  }
  model.parameters_changed();
  return meta;
}

}  // namespace ctformer::io
