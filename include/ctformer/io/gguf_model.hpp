// Models as GGUF files in llama.cpp's layout: LLaMA-shaped configurations as
// architecture "llama", GPT-2-shaped ones as "gpt2", with llama.cpp's tensor
// names and metadata keys and the tokenizer; the linear weights in F32, F16,
// BF16, Q8_0 or Q4_0. Read back into an nn::model, or straight into an
// inference model's packed weights (gguf_weight_source).
#pragma once

#include <algorithm>
#include <concepts>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/io/bpe_tokenizer.hpp"
#include "ctformer/io/gguf.hpp"
#include "ctformer/nn/config.hpp"
#include "ctformer/nn/model.hpp"
#include "ctformer/nn/parameters.hpp"
#include "ctformer/quant/formats.hpp"
#include "ctformer/quant/packed_matrix.hpp"

namespace ctformer::io {

/// The llama.cpp architectures ctformer writes: LLaMA (rms_norm, swiglu,
/// rope, no biases) and GPT-2 (layer_norm, gelu, learned positions).
template <class Cfg>
constexpr const char* gguf_architecture_of() {
  using t = nn::config_traits<Cfg>;
  if constexpr (std::same_as<typename Cfg::norm, nn::rms_norm> && std::same_as<typename Cfg::activation, nn::swiglu> &&
                std::same_as<typename Cfg::position, nn::rope> && !t::bias && t::window == 0)
    return "llama";
  else if constexpr (std::same_as<typename Cfg::norm, nn::layer_norm> && std::same_as<typename Cfg::activation, nn::gelu> &&
                     std::same_as<typename Cfg::position, nn::learned_position> && t::window == 0)
    return "gpt2";
  else
    return nullptr;
}

/// The ggml type a quant:: weight format is stored as, where GGUF has one.
template <class Format>
constexpr std::optional<gguf_type> gguf_type_of_format() {
  if constexpr (std::same_as<Format, quant::q8_0>) return gguf_type::q8_0;
  else if constexpr (std::same_as<Format, quant::q4_0>) return gguf_type::q4_0;
  else if constexpr (std::same_as<Format, quant::bf16_weights>) return gguf_type::bf16;
  else if constexpr (std::same_as<Format, quant::fp32>) return gguf_type::f32;
  else return std::nullopt;
}

/// One slice of a ctformer parameter as a GGUF tensor: rows [first_row,
/// first_row + rows). rope_heads > 0: the rows of each of that many heads are
/// stored with rotation pairs adjacent (2j, 2j + 1), as llama.cpp's LLaMA
/// rotates them, where ctformer's rope (like Hugging Face's) rotates halves.
struct gguf_piece {
  std::string name;
  index_t first_row = 0, rows = 0;
  index_t rope_heads = 0;
};

/// For every parameter of Cfg (by ctformer name), the GGUF tensors it is made
/// of; saving and loading both walk this one list.
template <nn::model_config Cfg>
std::map<std::string, std::vector<gguf_piece>> gguf_layout() {
  using t = nn::config_traits<Cfg>;
  static_assert(gguf_architecture_of<Cfg>() != nullptr,
                "ctformer: GGUF holds LLaMA-shaped (rms_norm, swiglu, rope, no biases) and GPT-2-shaped (layer_norm, "
                "gelu, learned positions) configurations without sliding-window layers; this one is neither");
  static_assert(!t::has_adapters, "ctformer: merge LoRA adapters (nn::merge_lora) before writing a GGUF file");
  constexpr bool llama = std::string_view(gguf_architecture_of<Cfg>()) == "llama";
  std::map<std::string, std::vector<gguf_piece>> out;
  for (const nn::parameter_info& p : nn::parameter_table_of<Cfg>()) {
    const index_t rows = p.shape.front();
    auto whole = [&](std::string name) { out[p.name] = {{std::move(name), 0, rows, 0}}; };
    std::string rest, b;
    if (p.name.starts_with("blocks.")) {
      const std::size_t dot = p.name.find('.', 7);
      b = "blk." + p.name.substr(7, dot - 7) + ".";
      rest = p.name.substr(dot + 1);
    }
    constexpr index_t q_rows = index_t(t::n_head) * t::head_dim, kv_rows = index_t(t::n_kv_head) * t::head_dim;
    if (p.name == "token_embedding.weight") whole("token_embd.weight");
    else if (p.name == "position_embedding.weight") whole("position_embd.weight");
    else if (p.name == "final_norm.weight") whole("output_norm.weight");
    else if (p.name == "final_norm.bias") whole("output_norm.bias");
    else if (p.name == "lm_head.weight") whole("output.weight");
    else if (rest == "attention_norm.weight") whole(b + "attn_norm.weight");
    else if (rest == "attention_norm.bias") whole(b + "attn_norm.bias");
    else if (rest == "attention.qkv.weight" && llama)
      out[p.name] = {{b + "attn_q.weight", 0, q_rows, index_t(t::n_head)},
                     {b + "attn_k.weight", q_rows, kv_rows, index_t(t::n_kv_head)},
                     {b + "attn_v.weight", q_rows + kv_rows, kv_rows, 0}};
    else if (rest == "attention.qkv.weight") whole(b + "attn_qkv.weight");
    else if (rest == "attention.qkv.bias") whole(b + "attn_qkv.bias");
    else if (rest == "attention.output.weight") whole(b + "attn_output.weight");
    else if (rest == "attention.output.bias") whole(b + "attn_output.bias");
    else if (rest == "mlp_norm.weight") whole(b + "ffn_norm.weight");
    else if (rest == "mlp_norm.bias") whole(b + "ffn_norm.bias");
    else if (rest == "mlp.up.weight" && llama)
      out[p.name] = {{b + "ffn_gate.weight", 0, t::d_ff, 0}, {b + "ffn_up.weight", t::d_ff, t::d_ff, 0}};
    else if (rest == "mlp.up.weight") whole(b + "ffn_up.weight");
    else if (rest == "mlp.up.bias") whole(b + "ffn_up.bias");
    else if (rest == "mlp.down.weight") whole(b + "ffn_down.weight");
    else if (rest == "mlp.down.bias") whole(b + "ffn_down.bias");
    if (!out.count(p.name))
      throw invalid_input("ctformer::io: parameter '" + p.name + "' has no place in the GGUF layout");
  }
  return out;
}

namespace detail {

// Row r of a piece as stored in the file, given the row of the parameter
// (rope pieces: halves -> adjacent pairs within each head).
inline index_t gguf_source_row(const gguf_piece& piece, index_t file_row) {
  if (piece.rope_heads == 0) return piece.first_row + file_row;
  const index_t head_dim = piece.rows / piece.rope_heads, h = file_row / head_dim, i = file_row % head_dim;
  return piece.first_row + h * head_dim + (i % 2) * (head_dim / 2) + i / 2;
}

inline std::vector<std::byte> gguf_encode_rows(const float* x, index_t rows, index_t cols, gguf_type type) {
  std::vector<std::byte> out(std::size_t(rows * cols / index_t(gguf_block_size(type)) * index_t(gguf_block_bytes(type))));
  const std::size_t row_bytes = out.size() / std::size_t(rows);
  for (index_t r = 0; r < rows; ++r) {
    std::byte* row = out.data() + std::size_t(r) * row_bytes;
    const float* in = x + r * cols;
    switch (type) {
      case gguf_type::f32: std::memcpy(row, in, row_bytes); break;
      case gguf_type::f16:
        for (index_t c = 0; c < cols; ++c) {
          const fp16 h(in[c]);
          std::memcpy(row + c * 2, &h, 2);
        }
        break;
      case gguf_type::bf16: quant::bf16_weights::quantize_row(in, row, cols); break;
      case gguf_type::q8_0: quant::q8_0::quantize_row(in, row, cols); break;
      case gguf_type::q4_0: quant::q4_0::quantize_row(in, row, cols); break;
    }
  }
  return out;
}

inline void gguf_decode_row(const std::byte* row, gguf_type type, float* out, index_t cols) {
  switch (type) {
    case gguf_type::f32: std::memcpy(out, row, std::size_t(cols) * sizeof(float)); break;
    case gguf_type::f16:
      for (index_t c = 0; c < cols; ++c) {
        fp16 h;
        std::memcpy(&h, row + c * 2, 2);
        out[c] = float(h);
      }
      break;
    case gguf_type::bf16: quant::bf16_weights::dequantize_row(row, out, cols); break;
    case gguf_type::q8_0: quant::q8_0::dequantize_row(row, out, cols); break;
    case gguf_type::q4_0: quant::q4_0::dequantize_row(row, out, cols); break;
  }
}

inline std::uint64_t gguf_row_bytes(gguf_type type, index_t cols) {
  return std::uint64_t(cols) / gguf_block_size(type) * gguf_block_bytes(type);
}

// llama.cpp's general.file_type for files whose linear weights are `type`.
inline std::uint32_t gguf_file_type(gguf_type type) {
  switch (type) {
    case gguf_type::f32: return 0;
    case gguf_type::f16: return 1;
    case gguf_type::q4_0: return 2;
    case gguf_type::q8_0: return 7;
    case gguf_type::bf16: return 32;
  }
  return 0;
}

}  // namespace detail

/// What a GGUF file says about the model it holds, in ctformer's terms,
/// read before any model exists (the registry of configurations matches it).
struct gguf_model_description {
  std::filesystem::path file;
  std::string architecture;
  index_t vocab = 0, d_model = 0, n_layer = 0, n_head = 0, n_kv_head = 0, d_ff = 0, context = 0;
  double norm_eps = 1e-5, rope_base = 10000;
  bool tie_embeddings = true, bias = false;
  gguf_type linear_type = gguf_type::f32;  ///< the type of the first block's attention output weights
  std::string ctformer_config, ctformer_vocabulary;  ///< set in files ctformer wrote
};

/// Reads the model description of an opened GGUF file. Throws io_error
/// naming the file and key for a missing or mistyped field, and for an
/// architecture other than llama and gpt2.
inline gguf_model_description describe_gguf_model(const gguf_file& f) {
  gguf_model_description d;
  d.file = f.path();
  d.architecture = f.string("general.architecture");
  if (d.architecture != "llama" && d.architecture != "gpt2")
    detail::fail(f.path(), "architecture '" + d.architecture + "' (ctformer reads llama and gpt2)");
  const std::string a = d.architecture + ".";
  auto integer = [&](const std::string& key) { return index_t(f.unsigned_integer(a + key)); };
  d.d_model = integer("embedding_length");
  d.n_layer = integer("block_count");
  d.n_head = integer("attention.head_count");
  d.n_kv_head = f.find(a + "attention.head_count_kv") ? integer("attention.head_count_kv") : d.n_head;
  d.d_ff = integer("feed_forward_length");
  d.context = integer("context_length");
  if (d.architecture == "llama") {
    d.norm_eps = f.number(a + "attention.layer_norm_rms_epsilon");
    d.rope_base = f.find(a + "rope.freq_base") ? f.number(a + "rope.freq_base") : 10000.0;
  } else {
    d.norm_eps = f.number(a + "attention.layer_norm_epsilon");
  }
  const gguf_tensor_info& embedding = f.info("token_embd.weight");
  if (embedding.shape.size() != 2) detail::fail_tensor(f.path(), "token_embd.weight", "is not a matrix");
  d.vocab = index_t(embedding.shape[1]);
  d.tie_embeddings = !f.contains("output.weight");
  d.bias = f.contains("blk.0.attn_output.bias");
  d.linear_type = f.info("blk.0.attn_output.weight").type;
  if (const gguf_value* v = f.find("ctformer.config"); v && !v->is_array() && v->type == gguf_value_type::string)
    d.ctformer_config = f.string("ctformer.config");
  if (const gguf_value* v = f.find("ctformer.vocabulary"); v && !v->is_array() && v->type == gguf_value_type::string)
    d.ctformer_vocabulary = f.string("ctformer.vocabulary");
  return d;
}

/// The fields of a GGUF file's model that Cfg does not hold, each as
/// "field: the file has X, the configuration Y"; empty when Cfg holds it.
template <nn::model_config Cfg>
std::vector<std::string> configuration_mismatches(const gguf_model_description& d) {
  using t = nn::config_traits<Cfg>;
  std::vector<std::string> out;
  const char* arch = gguf_architecture_of<Cfg>();
  if (!arch || d.architecture != arch) {
    out.push_back("general.architecture: the file has " + d.architecture + ", the configuration " +
                  (arch ? std::string(arch) : std::string("neither llama nor gpt2")));
    return out;
  }
  auto check = [&](const char* field, index_t file_value, index_t cfg_value) {
    if (file_value != cfg_value)
      out.push_back(d.architecture + "." + field + ": the file has " + std::to_string(file_value) +
                    ", the configuration " + std::to_string(cfg_value));
  };
  check("embedding_length", d.d_model, t::d_model);
  check("block_count", d.n_layer, t::n_layer);
  check("attention.head_count", d.n_head, t::n_head);
  check("attention.head_count_kv", d.n_kv_head, t::n_kv_head);
  check("feed_forward_length", d.d_ff, t::d_ff);
  if (d.vocab != t::vocab)
    out.push_back("token_embd.weight: the file's vocabulary has " + std::to_string(d.vocab) + " tokens, the configuration " +
                  std::to_string(t::vocab));
  if (d.context < t::max_seq)
    out.push_back(d.architecture + ".context_length: the file has " + std::to_string(d.context) +
                  ", fewer than the configuration's max_seq " + std::to_string(t::max_seq));
  if (d.tie_embeddings != t::tie_embeddings)
    out.push_back(std::string("output.weight: the file ") + (d.tie_embeddings ? "ties" : "does not tie") +
                  " the head to the embedding, the configuration " + (t::tie_embeddings ? "does" : "does not"));
  if (d.bias && !t::bias && d.ctformer_config.empty())
    out.push_back("biases: the file's linear layers have biases, the configuration's none");
  if (!d.bias && t::bias) out.push_back("biases: the configuration's linear layers have biases, the file's none");
  if (std::abs(d.norm_eps - double(t::norm_eps)) > 1e-6 * std::abs(d.norm_eps) + 1e-12)
    out.push_back("norm epsilon: the file has " + std::to_string(d.norm_eps) + ", the configuration " +
                  std::to_string(t::norm_eps));
  if (d.architecture == "llama" && std::abs(d.rope_base - double(t::rope_base)) > 1e-6 * d.rope_base)
    out.push_back("llama.rope.freq_base: the file has " + std::to_string(d.rope_base) + ", the configuration " +
                  std::to_string(t::rope_base));
  return out;
}

/// Writes a model as a GGUF file llama.cpp loads, atomically: its linear
/// weights (every parameter_kind::matrix, the head included) in
/// `weights` (F32, F16, BF16, Q8_0 or Q4_0, quantized as ggml's reference
/// does), embeddings, norms and biases F32; llama.cpp's metadata for the
/// architecture; the tokenizer as tokenizer.ggml.* (model "gpt2": tokens in
/// GPT-2's byte alphabet, merges, special tokens as control tokens, the list
/// padded with unused tokens to the model's vocabulary); and the ctformer
/// configuration (and a non-BPE tokenizer) under ctformer.*, so ctformer's
/// tools reopen it exactly. A GPT-2-shaped model without linear biases gets
/// zero biases, which llama.cpp's gpt2 requires.
/// Throws shape_error when a linear weight's columns are not a multiple of
/// the block of a block format, io_error when writing fails.
template <nn::model_config Cfg, class Tokenizer>
void save_gguf(const std::filesystem::path& path, const nn::model<Cfg, cpu::par_t>& model, const Tokenizer& tokenizer,
               gguf_type weights, const std::string& name = "ctformer") {
  using t = nn::config_traits<Cfg>;
  const std::string arch = gguf_architecture_of<Cfg>() ? gguf_architecture_of<Cfg>() : "";
  const auto layout = gguf_layout<Cfg>();
  gguf_writer w(path);
  w.set("general.architecture", gguf_value::string(arch));
  w.set("general.name", gguf_value::string(name));
  w.set("general.file_type", gguf_value::u32(detail::gguf_file_type(weights)));
  if (weights == gguf_type::q8_0 || weights == gguf_type::q4_0) w.set("general.quantization_version", gguf_value::u32(2));
  const std::string a = arch + ".";
  w.set(a + "context_length", gguf_value::u32(std::uint32_t(t::max_seq)));
  w.set(a + "embedding_length", gguf_value::u32(std::uint32_t(t::d_model)));
  w.set(a + "block_count", gguf_value::u32(std::uint32_t(t::n_layer)));
  w.set(a + "feed_forward_length", gguf_value::u32(std::uint32_t(t::d_ff)));
  w.set(a + "attention.head_count", gguf_value::u32(std::uint32_t(t::n_head)));
  w.set(a + "attention.head_count_kv", gguf_value::u32(std::uint32_t(t::n_kv_head)));
  w.set(a + "vocab_size", gguf_value::u32(std::uint32_t(t::vocab)));
  if (arch == "llama") {
    w.set(a + "attention.layer_norm_rms_epsilon", gguf_value::f32(t::norm_eps));
    w.set(a + "rope.freq_base", gguf_value::f32(t::rope_base));
    w.set(a + "rope.dimension_count", gguf_value::u32(std::uint32_t(t::head_dim)));
  } else {
    w.set(a + "attention.layer_norm_epsilon", gguf_value::f32(t::norm_eps));
  }

  // The tokenizer, as llama.cpp's BPE ("gpt2") reads it.
  std::vector<std::string> tokens;
  std::vector<std::int32_t> types;
  std::vector<std::string> merges;
  std::vector<std::int32_t> specials;
  const index_t known = [&] {
    if constexpr (requires { tokenizer.vocab_size(); }) return index_t(tokenizer.vocab_size());
    else return index_t(Tokenizer::vocab_size);
  }();
  if constexpr (std::same_as<Tokenizer, bpe_tokenizer>) {
    const nlohmann::json j = nlohmann::json::parse(tokenizer.serialize());
    tokens = j["vocab"].get<std::vector<std::string>>();
    merges = j["merges"].get<std::vector<std::string>>();
    specials = j["special"].get<std::vector<std::int32_t>>();
  } else {
    for (index_t id = 0; id < std::min<index_t>(known, t::vocab); ++id) {
      const std::int32_t one[] = {std::int32_t(id)};
      std::string symbol;
      detail::bpe::bytes_to_symbol(tokenizer.decode(one), symbol);
      tokens.push_back(std::move(symbol));
    }
  }
  types.assign(tokens.size(), 1);  // normal
  for (std::int32_t s : specials) types[std::size_t(s)] = 3;  // control
  for (index_t id = index_t(tokens.size()); id < t::vocab; ++id) {
    tokens.push_back("[PAD" + std::to_string(id) + "]");
    types.push_back(5);  // unused
  }
  w.set("tokenizer.ggml.model", gguf_value::string("gpt2"));
  w.set("tokenizer.ggml.pre", gguf_value::string("gpt-2"));
  w.set("tokenizer.ggml.tokens", gguf_value::array(gguf_value_type::string, tokens));
  w.set("tokenizer.ggml.token_type", gguf_value::array(gguf_value_type::int32, types));
  w.set("tokenizer.ggml.merges", gguf_value::array(gguf_value_type::string, merges));
  // ctformer's models take no begin-of-sequence token; llama.cpp would add one.
  w.set("tokenizer.ggml.add_bos_token", gguf_value::boolean(false));
  if (!specials.empty()) {
    w.set("tokenizer.ggml.bos_token_id", gguf_value::u32(std::uint32_t(specials.front())));
    w.set("tokenizer.ggml.eos_token_id", gguf_value::u32(std::uint32_t(specials.front())));
  }
  w.set("ctformer.config", gguf_value::string(nn::config_json<Cfg>()));
  if constexpr (!std::same_as<Tokenizer, bpe_tokenizer>) w.set("ctformer.vocabulary", gguf_value::string(tokenizer.serialize()));

  // Tensors in llama.cpp's order: the embeddings, each block, the head.
  const tensor_view<const float, 1> params = model.parameters();
  std::vector<std::vector<std::byte>> storage;
  storage.reserve(layout.size() * 3 + 4 * std::size_t(t::n_layer));
  for (const nn::parameter_info& p : model.parameter_table()) {
    const index_t cols = p.shape.size() == 2 ? p.shape[1] : 1;
    const bool linear = p.kind == nn::parameter_kind::matrix && p.shape.size() == 2;
    const gguf_type type = linear ? weights : gguf_type::f32;
    if (linear && cols % index_t(gguf_block_size(type)) != 0)
      throw shape_error("ctformer::io::save_gguf: '" + p.name + "' has " + std::to_string(cols) + " columns, not a multiple of " +
                        std::string(gguf_type_name(type)) + "'s block of " + std::to_string(gguf_block_size(type)));
    for (const gguf_piece& piece : layout.at(p.name)) {
      std::vector<float> rows(std::size_t(piece.rows * cols));
      for (index_t r = 0; r < piece.rows; ++r)
        std::memcpy(rows.data() + r * cols, params.data() + p.offset + detail::gguf_source_row(piece, r) * cols,
                    std::size_t(cols) * sizeof(float));
      storage.push_back(detail::gguf_encode_rows(rows.data(), piece.rows, cols, type));
      std::vector<std::uint64_t> shape =
          p.shape.size() == 2 ? std::vector<std::uint64_t>{std::uint64_t(cols), std::uint64_t(piece.rows)}
                              : std::vector<std::uint64_t>{std::uint64_t(piece.rows)};
      w.add_tensor(piece.name, type, std::move(shape), storage.back());
    }
  }
  if (arch == "gpt2" && !t::bias) {
    for (int l = 0; l < t::n_layer; ++l) {
      const std::string b = "blk." + std::to_string(l) + ".";
      const std::pair<const char*, index_t> zero[] = {{"attn_qkv.bias", t::qkv_width},
                                                       {"attn_output.bias", t::d_model},
                                                       {"ffn_up.bias", t::d_ff},
                                                       {"ffn_down.bias", t::d_model}};
      for (const auto& [tensor, n] : zero) {
        storage.emplace_back(std::size_t(n) * sizeof(float), std::byte{0});
        w.add_tensor(b + tensor, gguf_type::f32, {std::uint64_t(n)}, storage.back());
      }
    }
  }
  w.write();
}

/// The weights of a GGUF file for an inference model (or an nn::model) of
/// Cfg: the file is opened and checked whole when constructed (its
/// configuration against Cfg, every tensor of the layout present with its
/// type and shape), then dense() gives fp32 parameters (decoded from any
/// type) and packed<Format>() a linear weight packed in Format -- the file's
/// blocks as they are when its type is Format's (only rope rows reordered),
/// converted otherwise. Throws io_error naming the file (and the tensor, or
/// the fields that differ).
template <nn::model_config Cfg>
class gguf_weight_source {
 public:
  explicit gguf_weight_source(const std::filesystem::path& path)
      : file_(gguf_file::read(path)), layout_(gguf_layout<Cfg>()) {
    const gguf_model_description d = describe_gguf_model(file_);
    if (const auto differences = configuration_mismatches<Cfg>(d); !differences.empty()) {
      std::string text;
      for (const auto& s : differences) text += "\n  " + s;
      detail::fail(path, "does not hold the compiled configuration:" + text);
    }
    for (const nn::parameter_info& p : nn::parameter_table_of<Cfg>()) {
      const index_t cols = p.shape.size() == 2 ? p.shape[1] : 1;
      for (const gguf_piece& piece : layout_.at(p.name)) {
        const gguf_tensor_info& info = file_.info(piece.name);
        const std::vector<std::uint64_t> expected =
            p.shape.size() == 2 ? std::vector<std::uint64_t>{std::uint64_t(cols), std::uint64_t(piece.rows)}
                                : std::vector<std::uint64_t>{std::uint64_t(piece.rows)};
        if (info.shape != expected) {
          std::string got, want;
          for (auto e : info.shape) got += (got.empty() ? "" : ", ") + std::to_string(e);
          for (auto e : expected) want += (want.empty() ? "" : ", ") + std::to_string(e);
          detail::fail_tensor(path, piece.name, "shape is {" + got + "}, the configuration needs {" + want + "}");
        }
      }
    }
    // A configuration without biases reads a file whose biases are all zero (as ctformer writes them for llama.cpp).
    if constexpr (!nn::config_traits<Cfg>::bias)
      for (const gguf_tensor_info& info : file_.tensors())
        if (info.name.starts_with("blk.") && info.name.ends_with(".bias") && !info.name.ends_with("norm.bias")) {
          std::vector<float> values(std::size_t(info.element_count()));
          detail::gguf_decode_row(file_.bytes(info.name).data(), info.type, values.data(), index_t(values.size()));
          if (std::any_of(values.begin(), values.end(), [](float v) { return v != 0.0f; }))
            detail::fail_tensor(path, info.name, "a bias that is not zero, and the configuration has no biases");
        }
  }

  const gguf_file& file() const { return file_; }

  /// The fp32 values of parameter `name` (decoded once, kept while the source lives).
  const float* dense(const std::string& name, const std::vector<index_t>& shape) const {
    if (const auto it = decoded_.find(name); it != decoded_.end()) return it->second.data();
    const nn::parameter_info& p = parameter(name);
    if (p.shape != shape)
      throw shape_error("ctformer::io::gguf_weight_source: parameter " + name + " has another shape than asked for");
    const index_t cols = p.shape.size() == 2 ? p.shape[1] : 1;
    std::vector<float> out(std::size_t(p.size()));
    for (const gguf_piece& piece : layout_.at(name)) {
      const gguf_tensor_info& info = file_.info(piece.name);
      const auto bytes = file_.bytes(piece.name);
      const std::uint64_t row_bytes = detail::gguf_row_bytes(info.type, cols);
      for (index_t r = 0; r < piece.rows; ++r)
        detail::gguf_decode_row(bytes.data() + std::size_t(r) * row_bytes, info.type,
                                out.data() + detail::gguf_source_row(piece, r) * cols, cols);
    }
    return decoded_.emplace(name, std::move(out)).first->second.data();
  }

  /// Fills `out` ((rows, cols), allocated) with linear weight `name` packed in Format.
  template <class Format>
  void packed(const std::string& name, quant::packed_matrix<Format>& out) const {
    const nn::parameter_info& p = parameter(name);
    const auto& pieces = layout_.at(name);
    constexpr auto own = gguf_type_of_format<Format>();
    const bool as_stored = own && std::all_of(pieces.begin(), pieces.end(), [&](const gguf_piece& piece) {
                             return file_.info(piece.name).type == *own;
                           });
    if (as_stored) {
      const std::size_t row_bytes = Format::row_bytes(out.cols());
      for (const gguf_piece& piece : pieces) {
        const auto bytes = file_.bytes(piece.name);
        for (index_t r = 0; r < piece.rows; ++r)
          std::memcpy(out.row(detail::gguf_source_row(piece, r)), bytes.data() + std::size_t(r) * row_bytes, row_bytes);
      }
      return;
    }
    const float* values = dense(name, p.shape);
    for (index_t r = 0; r < out.rows(); ++r) Format::quantize_row(values + r * out.cols(), out.row(r), out.cols());
    decoded_.erase(name);
  }

 private:
  const nn::parameter_info& parameter(const std::string& name) const {
    for (const nn::parameter_info& p : table_)
      if (p.name == name) return p;
    throw shape_error("ctformer::io::gguf_weight_source: the configuration has no parameter " + name);
  }

  gguf_file file_;
  std::map<std::string, std::vector<gguf_piece>> layout_;
  std::vector<nn::parameter_info> table_ = nn::parameter_table_of<Cfg>();
  mutable std::map<std::string, std::vector<float>> decoded_;
};

/// Loads a GGUF file into an fp32 nn::model (every tensor decoded), all or
/// nothing: the file is checked whole first, and the model is untouched
/// when that throws.
template <class Model>
void load_gguf(const std::filesystem::path& path, Model& model) {
  using Cfg = typename Model::config;
  static_assert(Model::template storage<float>::space::host_accessible,
                "ctformer: GGUF weights load into host memory; load on the CPU, then copy to the device");
  const gguf_weight_source<Cfg> source(path);
  std::vector<float> staged(std::size_t(model.parameters().size()));
  for (const nn::parameter_info& p : model.parameter_table()) {
    const float* values = source.dense(p.name, p.shape);
    std::memcpy(staged.data() + p.offset, values, std::size_t(p.size()) * sizeof(float));
  }
  std::memcpy(model.parameters().data(), staged.data(), staged.size() * sizeof(float));
  model.parameters_changed();
}

/// The tokenizer a GGUF file holds: the ctformer tokenizer it was written
/// with (ctformer.vocabulary), else llama.cpp's BPE ("gpt2") tokens and
/// merges, with its control tokens as the special tokens. Throws io_error
/// naming the file for any other tokenizer model.
template <class Tokenizer>
Tokenizer gguf_tokenizer(const gguf_file& f) {
  if (const gguf_value* v = f.find("ctformer.vocabulary"); v && !v->is_array()) {
    if constexpr (requires { Tokenizer::deserialize(std::string_view{}); })
      return Tokenizer::deserialize(f.string("ctformer.vocabulary"));
  }
  if constexpr (std::same_as<Tokenizer, bpe_tokenizer>) {
    if (f.string("tokenizer.ggml.model") != "gpt2")
      detail::fail(f.path(), "tokenizer.ggml.model is '" + f.string("tokenizer.ggml.model") +
                                 "'; ctformer reads GPT-2 style BPE ('gpt2')");
    nlohmann::json j;
    j["type"] = "gpt2_bpe";
    std::vector<std::string> tokens = f.strings("tokenizer.ggml.tokens");
    std::vector<std::int32_t> specials;
    if (const gguf_value* types = f.find("tokenizer.ggml.token_type"); types && types->is_array()) {
      for (std::size_t i = 0; i < types->items.size() && i < tokens.size(); ++i) {
        const auto* kind = std::get_if<std::int64_t>(&types->items[i]);
        if (kind && *kind == 3) specials.push_back(std::int32_t(i));
      }
    }
    // Unused padding at the end is the model's, not the tokenizer's.
    while (!tokens.empty() && tokens.back().starts_with("[PAD")) tokens.pop_back();
    j["vocab"] = tokens;
    j["merges"] = f.strings("tokenizer.ggml.merges");
    j["special"] = specials;
    try {
      return bpe_tokenizer::deserialize(j.dump());
    } catch (const invalid_input& e) {
      detail::fail(f.path(), std::string("its tokenizer: ") + e.what());
    }
  } else {
    detail::fail(f.path(), "holds no tokenizer of the kind this program was compiled for (ctformer.vocabulary)");
  }
}

}  // namespace ctformer::io
