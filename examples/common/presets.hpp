// The model configurations the examples compile (train_gpt's presets), and
// the one run-time step that turns a checkpoint's config JSON into one of
// those compile-time types.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>

#include "ctformer/core/error.hpp"
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
/// The same shape over raw bytes, for text with more than 65 distinct characters.
struct bytes_config : nanogpt_cpu_config {
  static constexpr int vocab = 256;
};

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
