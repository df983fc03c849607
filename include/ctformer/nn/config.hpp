// Model configurations: the tag types a configuration picks its parts with,
// the model_config concept, and the defaults for optional members.
#pragma once

#include <concepts>
#include <string>
#include <type_traits>

namespace ctformer::nn {

// --- the parts a configuration chooses between -------------------------------
struct layer_norm {};        ///< (x - mean) / std * weight + bias
struct rms_norm {};          ///< x / rms(x) * weight
struct gelu {};              ///< MLP: down(gelu(up(x))), tanh-form GELU as GPT-2
struct swiglu {};            ///< MLP: down(silu(gate(x)) * up(x)), as LLaMA
struct learned_position {};  ///< a (max_seq, d_model) table added to the token embedding
struct rope {};              ///< rotary embeddings on queries and keys (rotate-half form, as HF LLaMA)

template <class T>
concept norm_kind = std::same_as<T, layer_norm> || std::same_as<T, rms_norm>;
template <class T>
concept activation_kind = std::same_as<T, gelu> || std::same_as<T, swiglu>;
template <class T>
concept position_kind = std::same_as<T, learned_position> || std::same_as<T, rope>;

/// A model configuration: a plain struct of static constexpr dimensions and
/// member types naming its parts. Optional members and their defaults:
/// `tie_embeddings` (true), `bias` (false: no biases in linear layers),
/// `norm_eps` (1e-5), `rope_base` (10000).
template <class Cfg>
concept model_config = requires {
  { Cfg::vocab } -> std::convertible_to<int>;
  { Cfg::d_model } -> std::convertible_to<int>;
  { Cfg::n_layer } -> std::convertible_to<int>;
  { Cfg::n_head } -> std::convertible_to<int>;
  { Cfg::n_kv_head } -> std::convertible_to<int>;
  { Cfg::d_ff } -> std::convertible_to<int>;
  { Cfg::max_seq } -> std::convertible_to<int>;
  typename Cfg::norm;
  typename Cfg::activation;
  typename Cfg::position;
  requires norm_kind<typename Cfg::norm>;
  requires activation_kind<typename Cfg::activation>;
  requires position_kind<typename Cfg::position>;
};

/// The configuration with its optional members filled in and derived sizes named.
template <model_config Cfg>
struct config_traits {
  static constexpr int vocab = Cfg::vocab, d_model = Cfg::d_model, n_layer = Cfg::n_layer, n_head = Cfg::n_head,
                       n_kv_head = Cfg::n_kv_head, d_ff = Cfg::d_ff, max_seq = Cfg::max_seq;
  static constexpr int head_dim = d_model / n_head;
  static constexpr int qkv_width = (n_head + 2 * n_kv_head) * head_dim;  // q, k and v side by side
  static constexpr bool gated = std::same_as<typename Cfg::activation, swiglu>;
  static constexpr int up_width = gated ? 2 * d_ff : d_ff;  // gate and up side by side when gated

  static constexpr bool tie_embeddings = [] {
    if constexpr (requires { Cfg::tie_embeddings; }) return bool(Cfg::tie_embeddings); else return true;
  }();
  static constexpr bool bias = [] {
    if constexpr (requires { Cfg::bias; }) return bool(Cfg::bias); else return false;
  }();
  static constexpr float norm_eps = [] {
    if constexpr (requires { Cfg::norm_eps; }) return float(Cfg::norm_eps); else return 1e-5f;
  }();
  static constexpr float rope_base = [] {
    if constexpr (requires { Cfg::rope_base; }) return float(Cfg::rope_base); else return 10000.0f;
  }();
};

/// One static_assert per rule, each a plain sentence: nvcc reports failed
/// concepts poorly, so model<Cfg> calls this first.
template <class Cfg>
consteval bool check_model_config() {
  static_assert(model_config<Cfg>,
                "ctformer: a model configuration needs static constexpr vocab, d_model, n_layer, n_head, n_kv_head, "
                "d_ff, max_seq and member types norm (layer_norm | rms_norm), activation (gelu | swiglu), "
                "position (learned_position | rope)");
  static_assert(Cfg::vocab > 0 && Cfg::d_model > 0 && Cfg::n_layer > 0 && Cfg::n_head > 0 && Cfg::n_kv_head > 0 &&
                    Cfg::d_ff > 0 && Cfg::max_seq > 0,
                "ctformer: every model dimension must be positive");
  static_assert(Cfg::d_model % Cfg::n_head == 0, "ctformer: d_model must be a multiple of n_head");
  static_assert(Cfg::n_head % Cfg::n_kv_head == 0,
                "ctformer: n_kv_head must divide n_head (MHA: equal, GQA: a divisor, MQA: 1)");
  static_assert(!std::same_as<typename Cfg::position, rope> || (Cfg::d_model / Cfg::n_head) % 2 == 0,
                "ctformer: rotary positions need an even head dimension (d_model / n_head)");
  return true;
}

/// The configuration as a JSON object (every member, defaults filled in):
/// what checkpoints store and compare so a file is never loaded into a model
/// of another shape.
template <model_config Cfg>
std::string config_json() {
  using t = config_traits<Cfg>;
  auto name = []<class Part>(Part*) -> std::string {
    if constexpr (std::same_as<Part, layer_norm>) return "layer_norm";
    else if constexpr (std::same_as<Part, rms_norm>) return "rms_norm";
    else if constexpr (std::same_as<Part, gelu>) return "gelu";
    else if constexpr (std::same_as<Part, swiglu>) return "swiglu";
    else if constexpr (std::same_as<Part, learned_position>) return "learned_position";
    else return "rope";
  };
  return "{\"vocab\":" + std::to_string(t::vocab) + ",\"d_model\":" + std::to_string(t::d_model) +
         ",\"n_layer\":" + std::to_string(t::n_layer) + ",\"n_head\":" + std::to_string(t::n_head) +
         ",\"n_kv_head\":" + std::to_string(t::n_kv_head) + ",\"d_ff\":" + std::to_string(t::d_ff) +
         ",\"max_seq\":" + std::to_string(t::max_seq) + ",\"norm\":\"" +
         name(static_cast<typename Cfg::norm*>(nullptr)) + "\",\"activation\":\"" +
         name(static_cast<typename Cfg::activation*>(nullptr)) + "\",\"position\":\"" +
         name(static_cast<typename Cfg::position*>(nullptr)) + "\",\"tie_embeddings\":" +
         (t::tie_embeddings ? "true" : "false") + ",\"bias\":" + (t::bias ? "true" : "false") +
         ",\"norm_eps\":" + std::to_string(t::norm_eps) + ",\"rope_base\":" + std::to_string(t::rope_base) + "}";
}

}  // namespace ctformer::nn
