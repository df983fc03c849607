// Model configurations: the tag types a configuration picks its parts with,
// the model_config concept, and the defaults for optional members.
#pragma once

#include <algorithm>
#include <concepts>

#include <boost/hana.hpp>
#include <string>
#include <type_traits>

#include "ctformer/nn/lora.hpp"

namespace ctformer::nn {

// --- the parts a configuration chooses between -------------------------------
struct layer_norm {};        ///< (x - mean) / std * weight + bias
struct rms_norm {};          ///< x / rms(x) * weight
struct gelu {};              ///< MLP: down(gelu(up(x))), tanh-form GELU as GPT-2
struct swiglu {};            ///< MLP: down(silu(gate(x)) * up(x)), as LLaMA
struct learned_position {};  ///< a (max_seq, d_model) table added to the token embedding
struct rope {};              ///< rotary embeddings on queries and keys (rotate-half form, as HF LLaMA)

/// Attention kinds of a layer: over every earlier position, or over the
/// last W positions only (Mistral's sliding window; Gemma 2/3 interleave
/// the two).
struct global_attention {
  static constexpr int window = 0;
};
template <int W>
struct sliding_window {
  static_assert(W > 0, "ctformer: a sliding window needs a positive width");
  static constexpr int window = W;
};

/// A per-layer pattern of attention kinds, repeated over the stack: layer l
/// has kind Kinds[l % sizeof...(Kinds)] (Gemma 3's five local layers to one
/// global is layer_pattern<w, w, w, w, w, global_attention>). The model's
/// forward folds over it with Boost.Hana.
template <class... Kinds>
struct layer_pattern {
  static_assert(sizeof...(Kinds) > 0, "ctformer: a layer pattern names at least one attention kind");
  static constexpr int period = int(sizeof...(Kinds));
  static constexpr int windows[] = {Kinds::window...};
  static constexpr auto kinds = boost::hana::tuple_t<Kinds...>;
};

template <class T>
inline constexpr bool is_layer_pattern = false;
template <class... K>
inline constexpr bool is_layer_pattern<layer_pattern<K...>> = true;

template <class T>
concept norm_kind = std::same_as<T, layer_norm> || std::same_as<T, rms_norm>;
template <class T>
concept activation_kind = std::same_as<T, gelu> || std::same_as<T, swiglu>;
template <class T>
concept position_kind = std::same_as<T, learned_position> || std::same_as<T, rope>;

/// A model configuration: a plain struct of static constexpr dimensions and
/// member types naming its parts. Optional members and their defaults:
/// `tie_embeddings` (true), `bias` (false: no biases in linear layers),
/// `norm_eps` (1e-5), `rope_base` (10000), `attention_pattern`
/// (layer_pattern<global_attention>: every layer attends to every earlier position).
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

/// Cfg::attention_pattern, or every layer global.
template <class Cfg>
struct pattern_of {
  using type = layer_pattern<global_attention>;
};
template <class Cfg>
  requires requires { typename Cfg::attention_pattern; }
struct pattern_of<Cfg> {
  using type = typename Cfg::attention_pattern;
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

  /// The LoRA adapters (nn::no_lora when Cfg has none).
  using adapter = typename adapter_of<Cfg>::type;
  static constexpr bool has_adapters = adapter::rank > 0;

  using attention_pattern = typename pattern_of<Cfg>::type;
  /// The attention window of layer l (0: global).
  static constexpr int window_of(int l) { return attention_pattern::windows[l % attention_pattern::period]; }
  /// The widest window of the windowed layers (0: none is windowed).
  static constexpr int window = [] {
    int w = 0;
    for (int i = 0; i < attention_pattern::period; ++i) w = std::max(w, attention_pattern::windows[i]);
    return w;
  }();
  /// Every layer has the same attention kind (the stack compiles to one loop).
  static constexpr bool uniform_attention = [] {
    for (int i = 1; i < attention_pattern::period; ++i)
      if (attention_pattern::windows[i] != attention_pattern::windows[0]) return false;
    return true;
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
  if constexpr (requires { typename Cfg::attention_pattern; })
    static_assert(is_layer_pattern<typename Cfg::attention_pattern>,
                  "ctformer: attention_pattern must be an nn::layer_pattern<...> of global_attention and "
                  "sliding_window<W>");
  if constexpr (model_config<Cfg>)
    static_assert([] {
      using pattern = typename config_traits<Cfg>::attention_pattern;
      for (int i = 0; i < pattern::period; ++i)
        if (pattern::windows[i] != 0 && pattern::windows[i] != config_traits<Cfg>::window) return false;
      return true;
    }(), "ctformer: the windowed layers of a pattern share one window width (their KV-cache rings are alike)");
  if constexpr (model_config<Cfg>) {
    using adapter = typename adapter_of<Cfg>::type;
    static_assert(std::same_as<adapter, no_lora> ||
                      requires {
                        adapter::rank;
                        adapter::targets;
                        adapter::scale;
                      },
                  "ctformer: a configuration's adapter must be an nn::lora<Rank, Targets, Alpha>");
    static_assert(!adapter::has(lora_target::gate) || std::same_as<typename Cfg::activation, swiglu>,
                  "ctformer: a LoRA gate target needs a gated (SwiGLU) MLP; a GELU MLP has `up` only");
  }
  return true;
}

namespace detail {
// ,"attention":[w0, w1, ...] (each layer's window, 0 global) for a stack with
// a windowed layer; nothing for an all-global one, so checkpoints written
// before patterns existed still match.
template <class Cfg>
std::string attention_json_of() {
  using t = config_traits<Cfg>;
  if constexpr (t::window == 0) {
    return "";
  } else {
    std::string out = ",\"attention\":[";
    for (int l = 0; l < t::n_layer; ++l) out += (l ? "," : "") + std::to_string(t::window_of(l));
    return out + "]";
  }
}
// ,"lora":{"rank":r,"alpha":a,"targets":["q","v"]} for a configuration with
// adapters; nothing without, so base checkpoints are unchanged.
template <class Cfg>
std::string lora_json_of() {
  using adapter = typename config_traits<Cfg>::adapter;
  if constexpr (!config_traits<Cfg>::has_adapters) {
    return "";
  } else {
    std::string out = ",\"lora\":{\"rank\":" + std::to_string(adapter::rank) +
                      ",\"alpha\":" + std::to_string(adapter::alpha) + ",\"targets\":[";
    bool first = true;
    for (lora_target t : all_lora_targets)
      if (adapter::has(t)) {
        out += std::string(first ? "" : ",") + "\"" + lora_target_name(t) + "\"";
        first = false;
      }
    return out + "]}";
  }
}
}  // namespace detail

/// The configuration as a JSON object (every member, defaults filled in):
/// what checkpoints store and compare so a file is never loaded into a model
/// of another shape.
template <model_config Cfg>
std::string config_json() {
  using t = config_traits<Cfg>;
  const auto attention_json = [] { return detail::attention_json_of<Cfg>(); };
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
         ",\"norm_eps\":" + std::to_string(t::norm_eps) + ",\"rope_base\":" + std::to_string(t::rope_base) +
         attention_json() + detail::lora_json_of<Cfg>() + "}";
}

}  // namespace ctformer::nn
