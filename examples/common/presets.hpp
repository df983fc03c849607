// The model configurations the examples compile: train_gpt's presets and
// the shapes of public pretrained models; and the one run-time step that
// turns a checkpoint's config JSON, a Hugging Face config.json or a llama2.c
// header into one of those compile-time types.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>

#include "ctformer/core/error.hpp"
#include "ctformer/io/bpe_tokenizer.hpp"
#include "ctformer/io/gguf_model.hpp"
#include "ctformer/io/hugging_face.hpp"
#include "ctformer/io/llama2c.hpp"
#include "ctformer/io/tokenizer.hpp"
#include "ctformer/nn/config.hpp"

namespace ctformer::examples {

/// The embedded addition task's model: 2 blocks of width 128; 13 symbols padded to 16.
struct addition_config {
  static constexpr int vocab = 16, d_model = 128, n_layer = 2, n_head = 4, n_kv_head = 4, d_ff = 512, max_seq = 16;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};
/// nanoGPT's CPU configuration (4 layers, 4 heads, width 128, context 64) over
/// tiny Shakespeare's 65 characters.
struct nanogpt_cpu_config {
  static constexpr int vocab = 65, d_model = 128, n_layer = 4, n_head = 4, n_kv_head = 4, d_ff = 512, max_seq = 64;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};
/// A smaller student of the same vocabulary (2 layers, width 64): what
/// train_gpt distils the nanoGPT CPU model into (--teacher).
struct nanogpt_small_config : nanogpt_cpu_config {
  static constexpr int d_model = 64, n_layer = 2, n_head = 4, n_kv_head = 4, d_ff = 256;
};
/// The same shape over raw bytes, for text with more than 65 distinct characters.
struct bytes_config : nanogpt_cpu_config {
  static constexpr int vocab = 256;
};

// --- pretrained models: opened from Hugging Face folders or llama2.c files ---
// Each names itself and the tokenizer its files come with. To run another
// model, write one struct like these (its shape as its config.json gives it)
// and add it to visit_pretrained_config below.

/// GPT-2 small (124 M): openai-community/gpt2.
struct gpt2_small_config {
  static constexpr const char* name = "gpt2-small";
  static constexpr int vocab = 50257, d_model = 768, n_layer = 12, n_head = 12, n_kv_head = 12, d_ff = 3072,
                       max_seq = 1024;
  static constexpr bool bias = true;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  using tokenizer = io::bpe_tokenizer;
};
/// The LLaMA-shaped 110 M model of the benchmarks (LLaMA-2's 32000-token vocabulary).
struct llama_110m_config {
  static constexpr const char* name = "llama-110m";
  static constexpr int vocab = 32000, d_model = 768, n_layer = 12, n_head = 12, n_kv_head = 12, d_ff = 2048,
                       max_seq = 2048;
  static constexpr bool tie_embeddings = false;
  static constexpr float norm_eps = 1e-5f;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  using tokenizer = io::token_id_tokenizer;
};
/// SmolLM-135M's shape: 30 layers, GQA 9 / 3 heads, tied head.
struct smollm_135m_config {
  static constexpr const char* name = "smollm-135m";
  static constexpr int vocab = 49152, d_model = 576, n_layer = 30, n_head = 9, n_kv_head = 3, d_ff = 1536,
                       max_seq = 2048;
  static constexpr float norm_eps = 1e-5f;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  using tokenizer = io::bpe_tokenizer;
};
/// stories260K (karpathy/tinyllamas), a llama2.c file without its tokenizer: prompts are token ids.
struct stories260k_config {
  static constexpr const char* name = "stories260K";
  static constexpr int vocab = 512, d_model = 64, n_layer = 5, n_head = 8, n_kv_head = 4, d_ff = 172, max_seq = 512;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  using tokenizer = io::token_id_tokenizer;
};

template <class... Cfgs>
struct config_list {};
/// The registry of pretrained shapes the tools compile.
using pretrained_configs = config_list<gpt2_small_config, llama_110m_config, smollm_135m_config, stories260k_config>;

namespace detail {
template <class F, class Description, class First, class... Rest>
decltype(auto) visit_first_match(config_list<First, Rest...>, const Description& description, const std::string& file,
                                 std::string& report, F& f) {
  const auto differences = io::configuration_mismatches<First>(description);
  if (differences.empty()) return f.template operator()<First>();
  report += std::string("\n  ") + First::name + ":";
  for (const auto& d : differences) report += "\n    " + d;
  if constexpr (sizeof...(Rest) == 0)
    throw invalid_input("'" + file + "' holds a model that none of this program's configurations holds:" + report +
                        "\nTo run it, add a configuration struct of its shape to examples/common/presets.hpp and "
                        "list it in pretrained_configs.");
  else
    return visit_first_match(config_list<Rest...>{}, description, file, report, f);
}
}  // namespace detail

/// Calls f.template operator()<Cfg>() for the registered pretrained
/// configuration that holds the model a Hugging Face config (or a llama2.c
/// header) describes. Throws invalid_input otherwise, quoting for each
/// registered configuration the fields that differ.
template <class Description, class F>
decltype(auto) visit_pretrained_config(const Description& description, const std::string& file, F&& f) {
  std::string report;
  return detail::visit_first_match(pretrained_configs{}, description, file, report, f);
}

namespace detail {
inline bool same_json(const std::string& a, const std::string& b) {
  try {
    return nlohmann::json::parse(a) == nlohmann::json::parse(b);
  } catch (const nlohmann::json::exception&) {
    return a == b;
  }
}
}  // namespace detail

/// Calls f.template operator()<Cfg>() for the compiled configuration whose
/// nn::config_json equals config_json (as JSON: spacing and key order do not
/// matter). Throws invalid_input quoting the configuration otherwise.
template <class F>
decltype(auto) visit_config(const std::string& config_json, F&& f) {
  if (detail::same_json(config_json, nn::config_json<addition_config>())) return f.template operator()<addition_config>();
  if (detail::same_json(config_json, nn::config_json<nanogpt_cpu_config>()))
    return f.template operator()<nanogpt_cpu_config>();
  if (detail::same_json(config_json, nn::config_json<bytes_config>())) return f.template operator()<bytes_config>();
  throw invalid_input("the checkpoint's model configuration " + config_json +
                      " is none of the configurations compiled into this program (addition, nanogpt-cpu, bytes)");
}

}  // namespace ctformer::examples
