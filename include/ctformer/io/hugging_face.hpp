// Hugging Face model directories: config.json read and checked against a
// compiled configuration, model.safetensors (or sharded model-*.safetensors
// with their index) read into and written from an nn::model, for
// GPT2LMHeadModel and LlamaForCausalLM.
#pragma once

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/core/core.hpp"
#include "ctformer/nn/config.hpp"
#include "ctformer/nn/model.hpp"
#include "ctformer/io/safetensors.hpp"

namespace ctformer::io {

/// The architectures whose Hugging Face layout ctformer reads and writes.
enum class hugging_face_architecture { gpt2, llama };

/// A config.json's model, in ctformer's terms: every field the layout
/// depends on, with Hugging Face's defaults filled in.
struct hugging_face_config {
  std::filesystem::path file;
  hugging_face_architecture architecture = hugging_face_architecture::gpt2;
  std::string model_type;
  index_t vocab = 0, d_model = 0, n_layer = 0, n_head = 0, n_kv_head = 0, d_ff = 0, max_positions = 0;
  double norm_eps = 1e-5, rope_theta = 10000;
  bool tie_embeddings = true;
  std::string activation;
};

namespace detail {

[[noreturn]] inline void bad_config(const std::filesystem::path& file, const std::string& what) {
  throw invalid_input("ctformer::io: '" + file.string() + "': " + what);
}

inline const char* json_kind(const nlohmann::json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  return "an object";
}

// One field of a config.json: absent (or null, where the fallback allows it)
// gives the fallback; a value of another type is an error naming the field.
struct config_reader {
  const nlohmann::json& j;
  const std::filesystem::path& file;

  const nlohmann::json* find(const char* key) const {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  }
  [[noreturn]] void wrong(const char* key, const char* expected) const {
    bad_config(file, std::string("field \"") + key + "\" is " + json_kind(j.at(key)) + ", not " + expected);
  }
  index_t integer(const char* key, std::optional<index_t> fallback = {}) const {
    const nlohmann::json* v = find(key);
    if (!v) {
      if (fallback) return *fallback;
      bad_config(file, std::string("field \"") + key + "\" is missing");
    }
    if (!v->is_number_integer()) wrong(key, "an integer");
    const auto value = v->get<std::int64_t>();
    if (value <= 0) bad_config(file, std::string("field \"") + key + "\" is " + std::to_string(value) + ", not positive");
    return index_t(value);
  }
  double number(const char* key, double fallback) const {
    const nlohmann::json* v = find(key);
    if (!v) return fallback;
    if (!v->is_number()) wrong(key, "a number");
    return v->get<double>();
  }
  bool boolean(const char* key, bool fallback) const {
    const nlohmann::json* v = find(key);
    if (!v) return fallback;
    if (!v->is_boolean()) wrong(key, "a boolean");
    return v->get<bool>();
  }
  std::string text(const char* key, std::string fallback) const {
    const nlohmann::json* v = find(key);
    if (!v) return fallback;
    if (!v->is_string()) wrong(key, "a string");
    return v->get<std::string>();
  }
};

inline nlohmann::json read_json_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw io_error("ctformer::io: '" + file.string() + "': cannot open the file for reading");
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, false);
  if (j.is_discarded()) bad_config(file, "not valid JSON");
  if (!j.is_object()) bad_config(file, "not a JSON object");
  return j;
}

}  // namespace detail

/// Reads `dir/config.json` (or the file itself when given one). Throws
/// invalid_input naming the file and field for a field of the wrong type, a
/// missing required field, an unknown model_type or a feature ctformer does
/// not run (rope_scaling, biases on a LLaMA, GPT-2's attention variants).
inline hugging_face_config read_hugging_face_config(const std::filesystem::path& path) {
  const std::filesystem::path file = std::filesystem::is_directory(path) ? path / "config.json" : path;
  const nlohmann::json j = detail::read_json_file(file);
  const detail::config_reader r{j, file};
  hugging_face_config c;
  c.file = file;
  c.model_type = r.text("model_type", "");
  if (c.model_type == "gpt2") {
    c.architecture = hugging_face_architecture::gpt2;
    c.vocab = r.integer("vocab_size");
    c.d_model = r.integer("n_embd");
    c.n_layer = r.integer("n_layer");
    c.n_head = r.integer("n_head");
    c.n_kv_head = c.n_head;
    c.d_ff = r.integer("n_inner", 4 * c.d_model);
    c.max_positions = r.integer("n_positions");
    c.norm_eps = r.number("layer_norm_epsilon", 1e-5);
    c.tie_embeddings = r.boolean("tie_word_embeddings", true);
    c.activation = r.text("activation_function", "gelu_new");
    if (!r.boolean("scale_attn_weights", true) || r.boolean("scale_attn_by_inverse_layer_idx", false) ||
        r.boolean("reorder_and_upcast_attn", false))
      detail::bad_config(file, "GPT-2's attention variants (scale_attn_weights false, scale_attn_by_inverse_layer_idx, "
                               "reorder_and_upcast_attn) are not supported");
  } else if (c.model_type == "llama") {
    c.architecture = hugging_face_architecture::llama;
    c.vocab = r.integer("vocab_size");
    c.d_model = r.integer("hidden_size");
    c.n_layer = r.integer("num_hidden_layers");
    c.n_head = r.integer("num_attention_heads");
    c.n_kv_head = r.integer("num_key_value_heads", c.n_head);
    c.d_ff = r.integer("intermediate_size");
    c.max_positions = r.integer("max_position_embeddings");
    c.norm_eps = r.number("rms_norm_eps", 1e-6);
    c.rope_theta = r.number("rope_theta", 10000);
    // Newer transformers keep RoPE's settings in one object.
    if (const nlohmann::json* rope = r.find("rope_parameters")) {
      if (!rope->is_object()) r.wrong("rope_parameters", "an object");
      const detail::config_reader rr{*rope, file};
      if (const std::string type = rr.text("rope_type", "default"); type != "default")
        detail::bad_config(file, "field \"rope_parameters\": rope_type \"" + type + "\" (scaled RoPE) is not supported");
      c.rope_theta = rr.number("rope_theta", c.rope_theta);
    }
    c.tie_embeddings = r.boolean("tie_word_embeddings", false);
    c.activation = r.text("hidden_act", "silu");
    if (r.find("rope_scaling")) detail::bad_config(file, "field \"rope_scaling\": scaled RoPE is not supported");
    if (r.boolean("attention_bias", false) || r.boolean("mlp_bias", false))
      detail::bad_config(file, "a LLaMA with attention_bias or mlp_bias is not supported");
    if (r.find("head_dim") && r.integer("head_dim") * c.n_head != c.d_model)
      detail::bad_config(file, "field \"head_dim\" x num_attention_heads differs from hidden_size; not supported");
  } else {
    detail::bad_config(file, "model_type \"" + c.model_type +
                                 "\" is not one ctformer reads (it reads \"gpt2\" and \"llama\")");
  }
  return c;
}

/// The fields where a config.json and the compiled configuration Cfg differ,
/// each "field: the file has X, the configuration Y"; empty when Cfg can hold
/// the file's model.
template <nn::model_config Cfg>
std::vector<std::string> configuration_mismatches(const hugging_face_config& c) {
  using t = nn::config_traits<Cfg>;
  std::vector<std::string> out;
  auto check = [&](const char* field, auto file_value, auto cfg_value) {
    if (file_value != cfg_value) {
      std::ostringstream s;
      s << std::boolalpha << field << ": the file has " << file_value << ", the configuration " << cfg_value;
      out.push_back(s.str());
    }
  };
  const bool gpt2 = c.architecture == hugging_face_architecture::gpt2;
  constexpr bool cfg_gpt2 = std::same_as<typename Cfg::norm, nn::layer_norm> &&
                            std::same_as<typename Cfg::activation, nn::gelu> &&
                            std::same_as<typename Cfg::position, nn::learned_position> && t::bias;
  constexpr bool cfg_llama = std::same_as<typename Cfg::norm, nn::rms_norm> &&
                             std::same_as<typename Cfg::activation, nn::swiglu> &&
                             std::same_as<typename Cfg::position, nn::rope> && !t::bias;
  check("model_type", c.model_type, cfg_gpt2 ? "gpt2" : cfg_llama ? "llama" : "neither gpt2 nor llama");
  check("vocab_size", c.vocab, index_t(t::vocab));
  check(gpt2 ? "n_embd" : "hidden_size", c.d_model, index_t(t::d_model));
  check(gpt2 ? "n_layer" : "num_hidden_layers", c.n_layer, index_t(t::n_layer));
  check(gpt2 ? "n_head" : "num_attention_heads", c.n_head, index_t(t::n_head));
  check("num_key_value_heads", c.n_kv_head, index_t(t::n_kv_head));
  check(gpt2 ? "n_inner" : "intermediate_size", c.d_ff, index_t(t::d_ff));
  // A compiled context may be shorter than the one the model was trained for.
  if (c.max_positions < t::max_seq)
    out.push_back(std::string(gpt2 ? "n_positions" : "max_position_embeddings") + ": the file has " +
                  std::to_string(c.max_positions) + ", fewer than the configuration's max_seq " +
                  std::to_string(t::max_seq));
  check("tie_word_embeddings", c.tie_embeddings, t::tie_embeddings);
  if (std::abs(c.norm_eps - double(t::norm_eps)) > 1e-6 * std::abs(c.norm_eps))
    check(gpt2 ? "layer_norm_epsilon" : "rms_norm_eps", c.norm_eps, double(t::norm_eps));
  if (!gpt2 && std::abs(c.rope_theta - double(t::rope_base)) > 1e-6 * c.rope_theta)
    check("rope_theta", c.rope_theta, double(t::rope_base));
  check(gpt2 ? "activation_function" : "hidden_act", c.activation, std::string(gpt2 ? "gelu_new" : "silu"));
  if (t::window != 0) out.push_back("attention: the configuration has sliding-window layers, the file none");
  return out;
}

/// One slice of a ctformer parameter as a Hugging Face tensor: rows
/// [first_row, first_row + rows) of the parameter, stored transposed when
/// the file keeps it as (in, out) (GPT-2's Conv1D).
struct hugging_face_piece {
  std::string name;
  index_t first_row = 0, rows = 0;
  bool transposed = false;
};

/// For every parameter of Cfg (by ctformer name), the Hugging Face tensors it
/// is made of. Loading and saving both walk this one list.
template <nn::model_config Cfg>
std::map<std::string, std::vector<hugging_face_piece>> hugging_face_layout() {
  using t = nn::config_traits<Cfg>;
  static_assert(!t::has_adapters,
                "ctformer: a Hugging Face model folder holds a model without LoRA adapters: merge them "
                "(nn::merge_lora) or save them alone (io::save_peft_adapter)");
  constexpr bool gpt2 = std::same_as<typename Cfg::position, nn::learned_position>;
  std::map<std::string, std::vector<hugging_face_piece>> out;
  for (const nn::parameter_info& p : nn::parameter_table_of<Cfg>()) {
    const index_t rows = p.shape.front();
    auto whole = [&](std::string name, bool transposed = false) {
      out[p.name] = {{std::move(name), 0, rows, transposed}};
    };
    std::string rest;
    int layer = -1;
    if (p.name.starts_with("blocks.")) {
      const std::size_t dot = p.name.find('.', 7);
      layer = std::stoi(p.name.substr(7, dot - 7));
      rest = p.name.substr(dot + 1);
    }
    if constexpr (gpt2) {
      const std::string h = "transformer.h." + std::to_string(layer) + ".";
      if (p.name == "token_embedding.weight") whole("transformer.wte.weight");
      else if (p.name == "position_embedding.weight") whole("transformer.wpe.weight");
      else if (p.name == "final_norm.weight") whole("transformer.ln_f.weight");
      else if (p.name == "final_norm.bias") whole("transformer.ln_f.bias");
      else if (p.name == "lm_head.weight") whole("lm_head.weight");
      else if (rest == "attention_norm.weight") whole(h + "ln_1.weight");
      else if (rest == "attention_norm.bias") whole(h + "ln_1.bias");
      else if (rest == "attention.qkv.weight") whole(h + "attn.c_attn.weight", true);
      else if (rest == "attention.qkv.bias") whole(h + "attn.c_attn.bias");
      else if (rest == "attention.output.weight") whole(h + "attn.c_proj.weight", true);
      else if (rest == "attention.output.bias") whole(h + "attn.c_proj.bias");
      else if (rest == "mlp_norm.weight") whole(h + "ln_2.weight");
      else if (rest == "mlp_norm.bias") whole(h + "ln_2.bias");
      else if (rest == "mlp.up.weight") whole(h + "mlp.c_fc.weight", true);
      else if (rest == "mlp.up.bias") whole(h + "mlp.c_fc.bias");
      else if (rest == "mlp.down.weight") whole(h + "mlp.c_proj.weight", true);
      else if (rest == "mlp.down.bias") whole(h + "mlp.c_proj.bias");
    } else {
      const std::string h = "model.layers." + std::to_string(layer) + ".";
      constexpr index_t q_rows = index_t(t::n_head) * t::head_dim, kv_rows = index_t(t::n_kv_head) * t::head_dim;
      if (p.name == "token_embedding.weight") whole("model.embed_tokens.weight");
      else if (p.name == "final_norm.weight") whole("model.norm.weight");
      else if (p.name == "lm_head.weight") whole("lm_head.weight");
      else if (rest == "attention_norm.weight") whole(h + "input_layernorm.weight");
      else if (rest == "attention.qkv.weight")
        out[p.name] = {{h + "self_attn.q_proj.weight", 0, q_rows},
                       {h + "self_attn.k_proj.weight", q_rows, kv_rows},
                       {h + "self_attn.v_proj.weight", q_rows + kv_rows, kv_rows}};
      else if (rest == "attention.output.weight") whole(h + "self_attn.o_proj.weight");
      else if (rest == "mlp_norm.weight") whole(h + "post_attention_layernorm.weight");
      else if (rest == "mlp.up.weight")
        out[p.name] = {{h + "mlp.gate_proj.weight", 0, t::d_ff}, {h + "mlp.up_proj.weight", t::d_ff, t::d_ff}};
      else if (rest == "mlp.down.weight") whole(h + "mlp.down_proj.weight");
    }
    if (!out.count(p.name))
      throw invalid_input("ctformer::io: parameter '" + p.name + "' has no place in the Hugging Face layout");
  }
  return out;
}

/// The tensors of a Hugging Face model directory: model.safetensors, or the
/// shards model.safetensors.index.json names. Every shard is read and
/// validated when opened.
class hugging_face_weights {
 public:
  explicit hugging_face_weights(const std::filesystem::path& dir) {
    const auto single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
    if (std::filesystem::exists(index)) {
      const nlohmann::json j = detail::read_json_file(index);
      const auto map = j.find("weight_map");
      if (map == j.end() || !map->is_object())
        detail::bad_config(index, "no \"weight_map\" object naming each tensor's shard");
      std::map<std::string, std::size_t> shard_of_file;
      for (const auto& [tensor, shard] : map->items()) {
        if (!shard.is_string())
          detail::bad_config(index, "the shard of tensor '" + tensor + "' is " + detail::json_kind(shard) +
                                        ", not a file name");
        const std::string name = shard.get<std::string>();
        if (name.find('/') != std::string::npos || name == "..")
          detail::bad_config(index, "shard '" + name + "' is not a file name in the model's folder");
        auto [it, added] = shard_of_file.emplace(name, shards_.size());
        if (added) {
          if (!std::filesystem::exists(dir / name))
            throw io_error("ctformer::io: '" + index.string() + "' names shard '" + name +
                           "', which is missing from the folder");
          shards_.push_back(safetensors_file::read(dir / name));
        }
        if (!shards_[it->second].contains(tensor))
          throw io_error("ctformer::io: '" + index.string() + "' puts tensor '" + tensor + "' in '" + name +
                         "', which does not hold it");
        where_[tensor] = it->second;
      }
    } else if (std::filesystem::exists(single)) {
      shards_.push_back(safetensors_file::read(single));
      for (const auto& [tensor, info] : shards_.front().tensors()) where_[tensor] = 0;
    } else {
      throw io_error("ctformer::io: '" + dir.string() +
                     "' holds neither model.safetensors nor model.safetensors.index.json");
    }
  }

  /// The tensors of one safetensors file (a PEFT adapter's, say).
  static hugging_face_weights of_file(const std::filesystem::path& file) {
    hugging_face_weights w;
    w.shards_.push_back(safetensors_file::read(file));
    for (const auto& [tensor, info] : w.shards_.front().tensors()) w.where_[tensor] = 0;
    return w;
  }

  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const safetensors_file& file_of(const std::string& name) const {
    auto it = where_.find(name);
    if (it == where_.end()) throw io_error("ctformer::io: the model's files hold no tensor '" + name + "'");
    return shards_[it->second];
  }
  /// Every tensor name the files hold.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, shard] : where_) out.push_back(name);
    return out;
  }

  /// The tensor as float, converted from F32, BF16 or F16; its shape must be `shape`.
  std::vector<float> floats(const std::string& name, std::span<const index_t> shape) const {
    const safetensors_file& f = file_of(name);
    const tensor_info& info = f.info(name);
    if (!std::equal(info.shape.begin(), info.shape.end(), shape.begin(), shape.end()))
      throw io_error("ctformer::io: '" + f.path().string() + "': tensor '" + name + "' has shape " +
                     shape_text(info.shape) + ", the model expects " + shape_text(shape));
    const auto bytes = f.bytes(name);
    std::vector<float> out(std::size_t(info.element_count()));
    switch (info.type) {
      case dtype::f32: std::memcpy(out.data(), bytes.data(), bytes.size()); break;
      case dtype::bf16:
      case dtype::f16:
        for (std::size_t i = 0; i < out.size(); ++i) {
          std::uint16_t bits;
          std::memcpy(&bits, bytes.data() + 2 * i, 2);
          out[i] = info.type == dtype::bf16 ? float(bf16::from_bits(bits)) : fp16::to_float(bits);
        }
        break;
      default:
        throw io_error("ctformer::io: '" + f.path().string() + "': tensor '" + name + "' is " +
                       std::string(dtype_name(info.type)) + "; model weights must be F32, BF16 or F16");
    }
    return out;
  }

 private:
  hugging_face_weights() = default;
  std::vector<safetensors_file> shards_;
  std::map<std::string, std::size_t> where_;
};

namespace detail {
// Tensors a Hugging Face checkpoint may hold that are buffers, not weights.
inline bool hugging_face_buffer(const std::string& name) {
  return name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name.ends_with("rotary_emb.inv_freq");
}
}  // namespace detail

/// Loads a Hugging Face model directory into model: the config.json must
/// match Model's configuration (else invalid_input listing every field that
/// differs), every tensor of the layout must be present with its shape, and
/// no other weight may be. All or nothing: the model changes only once every
/// tensor has been read.
template <class Model>
void load_hugging_face(const std::filesystem::path& dir, Model& model) {
  using Cfg = typename Model::config;
  static_assert(Model::template storage<float>::space::host_accessible,
                "ctformer: Hugging Face weights load into host memory; load on the CPU, then copy to the device");
  const hugging_face_config config = read_hugging_face_config(dir);
  if (const auto differences = configuration_mismatches<Cfg>(config); !differences.empty()) {
    std::string text;
    for (const auto& d : differences) text += "\n  " + d;
    throw invalid_input("ctformer::io: '" + config.file.string() + "' is not the compiled configuration:" + text);
  }
  const hugging_face_weights weights(dir);
  const auto layout = hugging_face_layout<Cfg>();
  std::vector<float> staged(std::size_t(model.parameters().size()), 0.0f);
  std::set<std::string> used;
  for (const nn::parameter_info& p : model.parameter_table()) {
    const index_t columns = p.shape.size() == 2 ? p.shape[1] : 1;
    float* dst = staged.data() + p.offset;
    for (const hugging_face_piece& piece : layout.at(p.name)) {
      // Learned positions: the compiled context may be a prefix of the file's.
      const bool prefix = p.name == "position_embedding.weight";
      const index_t file_rows = prefix ? config.max_positions : piece.rows;
      std::vector<index_t> shape = p.shape.size() == 2 ? std::vector<index_t>{file_rows, columns}
                                                       : std::vector<index_t>{file_rows};
      if (piece.transposed) std::swap(shape[0], shape[1]);
      const std::vector<float> source = weights.floats(piece.name, shape);
      used.insert(piece.name);
      float* rows = dst + piece.first_row * columns;
      if (piece.transposed) {
        for (index_t r = 0; r < piece.rows; ++r)
          for (index_t c = 0; c < columns; ++c) rows[r * columns + c] = source[std::size_t(c * piece.rows + r)];
      } else {
        std::memcpy(rows, source.data(), std::size_t(piece.rows * columns) * sizeof(float));
      }
    }
  }
  for (const std::string& name : weights.names()) {
    if (used.count(name) || detail::hugging_face_buffer(name)) continue;
    // A tied head may still be written out beside the embedding.
    if (name == "lm_head.weight" && nn::config_traits<Cfg>::tie_embeddings) continue;
    throw io_error("ctformer::io: '" + weights.file_of(name).path().string() + "': tensor '" + name +
                   "' is not a weight of the " + config.model_type + " layout (a different model?)");
  }
  std::memcpy(model.parameters().data(), staged.data(), staged.size() * sizeof(float));
  model.parameters_changed();
}

/// The config.json of configuration Cfg, as transformers writes it.
template <nn::model_config Cfg>
nlohmann::json hugging_face_config_json() {
  using t = nn::config_traits<Cfg>;
  static_assert(t::window == 0, "ctformer: Hugging Face export of sliding-window layers is not supported");
  if constexpr (std::same_as<typename Cfg::position, nn::learned_position>) {
    static_assert(std::same_as<typename Cfg::norm, nn::layer_norm> && std::same_as<typename Cfg::activation, nn::gelu> &&
                      t::bias && t::tie_embeddings,
                  "ctformer: a configuration with learned positions exports as GPT-2, which needs layer_norm, gelu, "
                  "biases and a tied head");
    return {{"architectures", {"GPT2LMHeadModel"}},
            {"model_type", "gpt2"},
            {"vocab_size", t::vocab},
            {"n_embd", t::d_model},
            {"n_layer", t::n_layer},
            {"n_head", t::n_head},
            {"n_inner", t::d_ff},
            {"n_positions", t::max_seq},
            {"n_ctx", t::max_seq},
            {"layer_norm_epsilon", double(t::norm_eps)},
            {"activation_function", "gelu_new"},
            {"tie_word_embeddings", true},
            {"torch_dtype", "float32"}};
  } else {
    static_assert(std::same_as<typename Cfg::norm, nn::rms_norm> && std::same_as<typename Cfg::activation, nn::swiglu> &&
                      !t::bias,
                  "ctformer: a configuration with rotary positions exports as LLaMA, which needs rms_norm, swiglu "
                  "and no biases");
    return {{"architectures", {"LlamaForCausalLM"}},
            {"model_type", "llama"},
            {"vocab_size", t::vocab},
            {"hidden_size", t::d_model},
            {"num_hidden_layers", t::n_layer},
            {"num_attention_heads", t::n_head},
            {"num_key_value_heads", t::n_kv_head},
            {"intermediate_size", t::d_ff},
            {"max_position_embeddings", t::max_seq},
            {"rms_norm_eps", double(t::norm_eps)},
            {"rope_theta", double(t::rope_base)},
            {"hidden_act", "silu"},
            {"tie_word_embeddings", t::tie_embeddings},
            {"attention_bias", false},
            {"mlp_bias", false},
            {"torch_dtype", "float32"}};
  }
}

/// Writes model as a Hugging Face directory (config.json, model.safetensors
/// in fp32) that transformers' from_pretrained opens. Each file is written
/// atomically; the weights go first, so a config.json is never beside
/// weights of another model.
template <class Model>
void save_hugging_face(const std::filesystem::path& dir, const Model& model) {
  using Cfg = typename Model::config;
  static_assert(Model::template storage<float>::space::host_accessible,
                "ctformer: Hugging Face files are written from host memory; copy device parameters to the host first");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw io_error("ctformer::io: '" + dir.string() + "': cannot create the folder: " + ec.message());
  const auto layout = hugging_face_layout<Cfg>();
  const float* params = model.parameters().data();
  std::vector<std::vector<float>> copies;  // transposed pieces
  std::vector<tensor_source> tensors;
  copies.reserve(layout.size() * 3);
  for (const nn::parameter_info& p : model.parameter_table()) {
    const index_t columns = p.shape.size() == 2 ? p.shape[1] : 1;
    for (const hugging_face_piece& piece : layout.at(p.name)) {
      const float* rows = params + p.offset + piece.first_row * columns;
      if (piece.transposed) {
        std::vector<float>& t = copies.emplace_back(std::size_t(piece.rows * columns));
        for (index_t r = 0; r < piece.rows; ++r)
          for (index_t c = 0; c < columns; ++c) t[std::size_t(c * piece.rows + r)] = rows[r * columns + c];
        tensors.push_back(make_source<float>(piece.name, t, {columns, piece.rows}));
      } else {
        std::vector<index_t> shape = p.shape.size() == 2 ? std::vector<index_t>{piece.rows, columns}
                                                         : std::vector<index_t>{piece.rows};
        tensors.push_back(make_source<float>(
            piece.name, std::span<const float>(rows, std::size_t(piece.rows * columns)), std::move(shape)));
      }
    }
  }
  write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
  const std::string config = hugging_face_config_json<Cfg>().dump(2) + "\n";
  detail::atomic_write(dir / "config.json", [&](int fd) { detail::write_all(fd, config.data(), config.size(), dir / "config.json"); });
}

}  // namespace ctformer::io
