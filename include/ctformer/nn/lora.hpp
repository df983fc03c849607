// LoRA as part of a model configuration: which projections carry low-rank
// adapters, their rank and alpha (nn::lora), and nn::with_lora<Base, Lora>,
// the configuration of Base with those adapters added.
#pragma once

#include <string>

#include "ctformer/core/tensor_view.hpp"

namespace ctformer::nn {

/// The projections an adapter can sit on. q, k and v are row blocks of the
/// fused qkv matrix, gate and up of the fused up matrix of a gated MLP (gate
/// rows first); a GELU MLP has `up` only.
enum class lora_target : unsigned { q = 1, k = 2, v = 4, o = 8, gate = 16, up = 32, down = 64 };
constexpr lora_target operator|(lora_target a, lora_target b) { return lora_target(unsigned(a) | unsigned(b)); }
constexpr bool has_target(lora_target set, lora_target t) { return (unsigned(set) & unsigned(t)) != 0; }

/// The seven targets in layout order, and their names (as PEFT's
/// target_modules call the LLaMA projections, without the "_proj").
inline constexpr lora_target all_lora_targets[] = {lora_target::q,    lora_target::k,  lora_target::v,   lora_target::o,
                                                   lora_target::gate, lora_target::up, lora_target::down};
constexpr const char* lora_target_name(lora_target t) {
  switch (t) {
    case lora_target::q: return "q";
    case lora_target::k: return "k";
    case lora_target::v: return "v";
    case lora_target::o: return "o";
    case lora_target::gate: return "gate";
    case lora_target::up: return "up";
    default: return "down";
  }
}

/// Low-rank adapters: each targeted projection W (out x in) becomes
/// W + (Alpha / Rank) B A with A (Rank x in) and B (out x Rank); A starts
/// Kaiming-uniform and B zero (as PEFT does), so training starts from the
/// base model exactly.
template <index_t Rank, lora_target Targets, float Alpha>
struct lora {
  static_assert(Rank > 0, "ctformer: a LoRA rank must be positive");
  static_assert(unsigned(Targets) != 0, "ctformer: a LoRA configuration needs at least one target projection");
  static constexpr index_t rank = Rank;
  static constexpr lora_target targets = Targets;
  static constexpr float alpha = Alpha;
  static constexpr float scale = Alpha / float(Rank);
  static constexpr bool has(lora_target t) { return has_target(Targets, t); }
};

/// No adapters: what a configuration without an `adapter` member has.
struct no_lora {
  static constexpr index_t rank = 0;
  static constexpr lora_target targets = lora_target(0);
  static constexpr float alpha = 0.0f, scale = 0.0f;
  static constexpr bool has(lora_target) { return false; }
};

/// Base with adapters Lora: the same shape, names and base tensors, plus the
/// adapter tensors. Its checkpoints record the adapters (they are a different
/// model); nn::merge_lora folds them into a model of Base.
template <class Base, class Lora>
struct with_lora : Base {
  using base_config = Base;
  using adapter = Lora;
};

/// Cfg::adapter, or no_lora.
template <class Cfg>
struct adapter_of {
  using type = no_lora;
};
template <class Cfg>
  requires requires { typename Cfg::adapter; }
struct adapter_of<Cfg> {
  using type = typename Cfg::adapter;
};

/// Cfg::base_config (the configuration without adapters), or Cfg itself.
template <class Cfg>
struct base_config_of {
  using type = Cfg;
};
template <class Cfg>
  requires requires { typename Cfg::base_config; }
struct base_config_of<Cfg> {
  using type = typename Cfg::base_config;
};

}  // namespace ctformer::nn
