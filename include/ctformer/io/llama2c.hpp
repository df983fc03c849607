// llama2.c checkpoints (Karpathy's run.c format: a 7 x int32 header, then
// fp32 tensors), read into an nn::model of a LLaMA-shaped configuration.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include "ctformer/core/core.hpp"
#include "ctformer/nn/config.hpp"
#include "ctformer/nn/model.hpp"

namespace ctformer::io {

/// The header of a llama2.c checkpoint.
struct llama2c_header {
  index_t dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab = 0, seq_len = 0;
  bool shared_classifier = true;  ///< a positive vocab_size: the classifier is the token embedding

  index_t head_size() const { return dim / n_heads; }
  index_t kv_dim() const { return n_kv_heads * head_size(); }
  /// Floats after the header: every tensor, the two legacy RoPE tables, the classifier if separate.
  index_t float_count() const {
    const index_t per_layer = 2 * dim + dim * dim * 2 + 2 * kv_dim() * dim + 3 * hidden_dim * dim;
    return vocab * dim + n_layers * per_layer + dim + seq_len * head_size() + (shared_classifier ? 0 : vocab * dim);
  }
};

namespace detail {
[[noreturn]] inline void bad_llama2c(const std::filesystem::path& file, const std::string& what) {
  throw invalid_input("ctformer::io: '" + file.string() + "': " + what);
}

inline std::vector<char> read_whole_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary | std::ios::ate);
  if (!in) throw io_error("ctformer::io: '" + file.string() + "': cannot open the file for reading");
  const std::streamsize size = in.tellg();
  std::vector<char> bytes(std::size_t(size > 0 ? size : 0));
  in.seekg(0);
  if (size > 0 && !in.read(bytes.data(), size))
    throw io_error("ctformer::io: '" + file.string() + "': cannot read the file");
  return bytes;
}

// The header from the file's first bytes, checked against its size.
inline llama2c_header parse_llama2c_header(std::span<const char> first, std::uint64_t size,
                                           const std::filesystem::path& file) {
  if (size < 7 * sizeof(std::int32_t))
    bad_llama2c(file, "only " + std::to_string(size) + " bytes: shorter than llama2.c's 28-byte header");
  std::int32_t h[7];
  std::memcpy(h, first.data(), sizeof h);
  static constexpr const char* names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                           "seq_len"};
  for (int i = 0; i < 7; ++i)
    if (h[i] == 0 || (i != 5 && h[i] < 0))
      bad_llama2c(file, std::string("header field ") + names[i] + " is " + std::to_string(h[i]) +
                            " (not a llama2.c checkpoint?)");
  llama2c_header c{h[0], h[1], h[2], h[3], h[4], h[5] < 0 ? -index_t(h[5]) : index_t(h[5]), h[6], h[5] > 0};
  if (c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0 || c.head_size() % 2 != 0)
    bad_llama2c(file, "header: dim " + std::to_string(c.dim) + ", n_heads " + std::to_string(c.n_heads) +
                          ", n_kv_heads " + std::to_string(c.n_kv_heads) +
                          " do not make whole, even heads shared by whole groups");
  const std::uint64_t expected = 28 + 4 * std::uint64_t(c.float_count());
  if (size != expected)
    bad_llama2c(file, std::to_string(size) + " bytes where the header's shapes need " + std::to_string(expected) +
                          (size < expected ? ": the file is truncated" : ": trailing bytes"));
  return c;
}
}  // namespace detail

/// Reads and checks a llama2.c checkpoint's header (and that the file's size is what it implies).
/// Reads only the header (and the file's size), so it is cheap on a large file.
inline llama2c_header read_llama2c_header(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw io_error("ctformer::io: '" + file.string() + "': cannot open the file for reading");
  char first[28] = {};
  in.read(first, sizeof first);
  std::error_code ec;
  const auto size = std::filesystem::file_size(file, ec);
  if (ec) throw io_error("ctformer::io: '" + file.string() + "': cannot read its size: " + ec.message());
  return detail::parse_llama2c_header(first, size, file);
}

/// Whether a file looks like a llama2.c checkpoint rather than safetensors
/// (whose 8-byte header length is followed by '{').
inline bool is_llama2c_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  char first[9] = {};
  return in.read(first, sizeof first) && first[8] != '{';
}

/// Where a llama2.c header and the compiled configuration Cfg differ, each
/// "field: the file has X, the configuration Y"; empty when Cfg holds the model.
template <nn::model_config Cfg>
std::vector<std::string> configuration_mismatches(const llama2c_header& c) {
  using t = nn::config_traits<Cfg>;
  std::vector<std::string> out;
  auto check = [&](const char* field, index_t file_value, index_t cfg_value) {
    if (file_value != cfg_value)
      out.push_back(std::string(field) + ": the file has " + std::to_string(file_value) + ", the configuration " +
                    std::to_string(cfg_value));
  };
  if (!std::same_as<typename Cfg::norm, nn::rms_norm> || !std::same_as<typename Cfg::activation, nn::swiglu> ||
      !std::same_as<typename Cfg::position, nn::rope> || t::bias)
    out.push_back("architecture: llama2.c holds a LLaMA (rms_norm, swiglu, rope, no biases); the configuration is not one");
  check("dim", c.dim, t::d_model);
  check("hidden_dim", c.hidden_dim, t::d_ff);
  check("n_layers", c.n_layers, t::n_layer);
  check("n_heads", c.n_heads, t::n_head);
  check("n_kv_heads", c.n_kv_heads, t::n_kv_head);
  check("vocab_size", c.vocab, t::vocab);
  if (c.seq_len < t::max_seq)
    out.push_back("seq_len: the file has " + std::to_string(c.seq_len) + ", fewer than the configuration's max_seq " +
                  std::to_string(t::max_seq));
  if (c.shared_classifier != t::tie_embeddings)
    out.push_back(std::string("classifier: the file's is ") + (c.shared_classifier ? "" : "not ") +
                  "the token embedding, the configuration's " + (t::tie_embeddings ? "is" : "is not"));
  // run.c's fixed constants.
  if (t::norm_eps != 1e-5f) out.push_back("norm_eps: run.c uses 1e-5");
  if (t::rope_base != 10000.0f) out.push_back("rope_base: run.c uses 10000");
  if (t::window != 0) out.push_back("attention: run.c has no sliding-window layers");
  return out;
}

/// Loads a llama2.c checkpoint into model, all or nothing. run.c rotates
/// adjacent pairs (2j, 2j+1) of each head where ctformer's rope rotates
/// halves (j, j + head_size/2): the rows of wq and wk are permuted at load,
/// as Hugging Face's LLaMA converter does, so the attention scores are the same.
template <class Model>
void load_llama2c(const std::filesystem::path& file, Model& model) {
  using Cfg = typename Model::config;
  using t = nn::config_traits<Cfg>;
  static_assert(Model::template storage<float>::space::host_accessible,
                "ctformer: llama2.c weights load into host memory; load on the CPU, then copy to the device");
  const std::vector<char> bytes = detail::read_whole_file(file);
  const llama2c_header c = detail::parse_llama2c_header(bytes, bytes.size(), file);
  if (const auto differences = configuration_mismatches<Cfg>(c); !differences.empty()) {
    std::string text;
    for (const auto& d : differences) text += "\n  " + d;
    throw invalid_input("ctformer::io: '" + file.string() + "' is not the compiled configuration:" + text);
  }
  if constexpr (std::same_as<typename Cfg::position, nn::rope> && std::same_as<typename Cfg::activation, nn::swiglu>) {
    std::vector<float> floats(std::size_t(c.float_count()));
    std::memcpy(floats.data(), bytes.data() + 28, floats.size() * sizeof(float));
    const float* f = floats.data();
    constexpr index_t dim = t::d_model, hidden = t::d_ff, layers = t::n_layer, hs = t::head_dim;
    constexpr index_t kv_dim = index_t(t::n_kv_head) * hs, vocab = t::vocab;
    // The file's tensors in order, each for all layers.
    const float* emb = f;
    const float* rms_att = emb + vocab * dim;
    const float* wq = rms_att + layers * dim;
    const float* wk = wq + layers * dim * dim;
    const float* wv = wk + layers * kv_dim * dim;
    const float* wo = wv + layers * kv_dim * dim;
    const float* rms_ffn = wo + layers * dim * dim;
    const float* w1 = rms_ffn + layers * dim;
    const float* w2 = w1 + layers * hidden * dim;
    const float* w3 = w2 + layers * dim * hidden;
    const float* rms_final = w3 + layers * hidden * dim;
    const float* classifier = rms_final + dim + c.seq_len * hs;  // past the two legacy RoPE tables

    std::vector<float> staged(std::size_t(model.parameters().size()), 0.0f);
    auto place = [&](const std::string& name) {
      for (const nn::parameter_info& p : model.parameter_table())
        if (p.name == name) return staged.data() + p.offset;
      throw invalid_input("ctformer::io: the configuration has no parameter '" + name + "'");
    };
    auto copy = [](float* dst, const float* src, index_t n) { std::memcpy(dst, src, std::size_t(n) * sizeof(float)); };
    // Rows of one projection, pairs to halves within each head.
    auto permuted = [&](float* dst, const float* src, index_t heads) {
      for (index_t h = 0; h < heads; ++h)
        for (index_t j = 0; j < hs / 2; ++j)
          for (index_t e = 0; e < 2; ++e)
            copy(dst + (h * hs + e * (hs / 2) + j) * dim, src + (h * hs + 2 * j + e) * dim, dim);
    };
    copy(place("token_embedding.weight"), emb, vocab * dim);
    for (index_t l = 0; l < layers; ++l) {
      const std::string b = "blocks." + std::to_string(l) + ".";
      copy(place(b + "attention_norm.weight"), rms_att + l * dim, dim);
      float* qkv = place(b + "attention.qkv.weight");
      permuted(qkv, wq + l * dim * dim, t::n_head);
      permuted(qkv + dim * dim, wk + l * kv_dim * dim, t::n_kv_head);
      copy(qkv + (dim + kv_dim) * dim, wv + l * kv_dim * dim, kv_dim * dim);
      copy(place(b + "attention.output.weight"), wo + l * dim * dim, dim * dim);
      copy(place(b + "mlp_norm.weight"), rms_ffn + l * dim, dim);
      float* up = place(b + "mlp.up.weight");  // gate rows, then up rows
      copy(up, w1 + l * hidden * dim, hidden * dim);
      copy(up + hidden * dim, w3 + l * hidden * dim, hidden * dim);
      copy(place(b + "mlp.down.weight"), w2 + l * dim * hidden, dim * hidden);
    }
    copy(place("final_norm.weight"), rms_final, dim);
    if constexpr (!t::tie_embeddings) copy(place("lm_head.weight"), classifier, vocab * dim);
    std::memcpy(model.parameters().data(), staged.data(), staged.size() * sizeof(float));
    model.parameters_changed();
  }
}

}  // namespace ctformer::io
