// PEFT's LoRA adapter folders (adapter_config.json, adapter_model.safetensors)
// for the Hugging Face-shaped models: a LoRA model's adapters saved alone, so
// `peft` loads them onto the matching `transformers` model, and read back.
#pragma once

#include <cmath>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/io/hugging_face.hpp"
#include "ctformer/io/safetensors.hpp"
#include "ctformer/nn/model.hpp"

namespace ctformer::io {

namespace detail {

// One Hugging Face module carrying adapters, and the targets of ours inside
// it in row order: GPT-2's fused c_attn holds q, k and v; every other
// module holds one target.
struct peft_module {
  std::string suffix;  // "attn.c_attn", "self_attn.q_proj", ...: what target_modules names
  std::vector<nn::lora_target> targets;
  index_t out_rows = 0, in = 0;
};

// The modules Cfg's adapters sit on (every module an adapter could sit on,
// with `all`).
template <class Cfg>
std::vector<peft_module> peft_modules(bool all = false) {
  using adapter = typename nn::config_traits<Cfg>::adapter;
  using geometry = nn::lora_geometry<Cfg>;
  using t = nn::config_traits<Cfg>;
  constexpr bool gpt2 = std::same_as<typename Cfg::position, nn::learned_position>;
  std::vector<peft_module> out;
  auto add = [&](std::string suffix, std::vector<nn::lora_target> targets, index_t out_rows) {
    std::vector<nn::lora_target> present;
    for (auto target : targets)
      if (all || adapter::has(target)) present.push_back(target);
    if (!present.empty()) out.push_back({std::move(suffix), present, out_rows, geometry::in_of(present.front())});
  };
  using nn::lora_target;
  if constexpr (gpt2) {
    add("attn.c_attn", {lora_target::q, lora_target::k, lora_target::v}, t::qkv_width);
    add("attn.c_proj", {lora_target::o}, t::d_model);
    add("mlp.c_fc", {lora_target::up}, t::d_ff);
    add("mlp.c_proj", {lora_target::down}, t::d_model);
  } else {
    for (auto [target, name] : {std::pair{lora_target::q, "self_attn.q_proj"}, {lora_target::k, "self_attn.k_proj"},
                                {lora_target::v, "self_attn.v_proj"}, {lora_target::o, "self_attn.o_proj"},
                                {lora_target::gate, "mlp.gate_proj"}, {lora_target::up, "mlp.up_proj"},
                                {lora_target::down, "mlp.down_proj"}})
      add(name, {target}, geometry::out_of(target));
  }
  return out;
}

template <class Cfg>
std::string peft_layer_prefix(index_t layer) {
  constexpr bool gpt2 = std::same_as<typename Cfg::position, nn::learned_position>;
  return std::string("base_model.model.") + (gpt2 ? "transformer.h." : "model.layers.") + std::to_string(layer) + ".";
}

// A module's first output row of target t (its place in a fused module).
template <class Cfg>
index_t peft_row_of(const peft_module& m, nn::lora_target t) {
  return m.targets.size() > 1 ? nn::lora_geometry<Cfg>::column_of(t) : 0;
}

// What load_peft_adapter reads of an adapter_config.json.
struct peft_config {
  index_t r = 0;
  double alpha = 0;
  std::vector<std::string> target_modules;
  std::map<std::string, double> rank_pattern, alpha_pattern;
};

inline peft_config read_peft_config(const std::filesystem::path& file) {
  const nlohmann::json j = read_json_file(file);
  auto field = [&](const char* name) -> const nlohmann::json& {
    const auto it = j.find(name);
    if (it == j.end()) bad_config(file, std::string("no \"") + name + "\"");
    return *it;
  };
  if (field("peft_type") != "LORA")
    bad_config(file, "peft_type is " + field("peft_type").dump() + "; ctformer reads LORA adapters");
  for (const char* off : {"use_rslora", "use_dora"})
    if (j.contains(off) && j[off].is_boolean() && j[off].get<bool>())
      bad_config(file, std::string(off) + " is true; ctformer's adapters are plain LoRA");
  if (j.contains("bias") && j["bias"] != "none")
    bad_config(file, "bias is " + j["bias"].dump() + "; ctformer's adapters train no biases");
  if (!field("r").is_number_integer() || !field("lora_alpha").is_number())
    bad_config(file, "r must be an integer and lora_alpha a number");
  peft_config c;
  c.r = field("r").get<index_t>();
  c.alpha = field("lora_alpha").get<double>();
  const nlohmann::json& targets = field("target_modules");
  if (targets.is_string()) c.target_modules.push_back(targets.get<std::string>());
  else if (targets.is_array())
    for (const nlohmann::json& t : targets) c.target_modules.push_back(t.is_string() ? t.get<std::string>() : t.dump());
  else
    bad_config(file, "target_modules must be a list of module names");
  for (auto [name, into] : {std::pair{"rank_pattern", &c.rank_pattern}, {"alpha_pattern", &c.alpha_pattern}})
    if (j.contains(name) && j[name].is_object())
      for (const auto& item : j[name].items())
        if (item.value().is_number()) (*into)[item.key()] = item.value().get<double>();
  return c;
}

}  // namespace detail

/// Writes the adapters of `model` (a nn::with_lora configuration of a GPT-2
/// or LLaMA shape) as a PEFT adapter folder: adapter_model.safetensors (fp32,
/// PEFT's tensor names) and adapter_config.json. GPT-2's q, k and v live in
/// one module (c_attn): their adapters become one adapter of rank
/// (targets x rank) there, A stacked and B block-diagonal, with alpha scaled
/// alike (rank_pattern, alpha_pattern), which is the same update exactly.
/// Files are written atomically, the weights first.
template <class Model>
void save_peft_adapter(const std::filesystem::path& dir, Model& model) {
  using Cfg = typename Model::config;
  using adapter = typename nn::config_traits<Cfg>::adapter;
  static_assert(nn::config_traits<Cfg>::has_adapters, "ctformer: save_peft_adapter saves a LoRA model's adapters");
  static_assert(Model::template storage<float>::space::host_accessible,
                "ctformer: adapters are written from host memory; copy device parameters to the host first");
  constexpr bool gpt2 = std::same_as<typename Cfg::position, nn::learned_position>;
  constexpr index_t r = adapter::rank;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw io_error("ctformer::io: '" + dir.string() + "': cannot create the folder: " + ec.message());
  const auto modules = detail::peft_modules<Cfg>();
  std::vector<std::vector<float>> copies;
  std::vector<tensor_source> tensors;
  copies.reserve(std::size_t(2 * nn::config_traits<Cfg>::n_layer) * modules.size());
  for (index_t l = 0; l < nn::config_traits<Cfg>::n_layer; ++l) {
    const auto& adapters = model.weights().adapters[std::size_t(l)];
    for (const auto& m : modules) {
      const index_t rank = r * index_t(m.targets.size());
      std::vector<float>& a = copies.emplace_back(std::size_t(rank * m.in), 0.0f);
      std::vector<float>& b = copies.emplace_back(std::size_t(m.out_rows * rank), 0.0f);
      for (std::size_t j = 0; j < m.targets.size(); ++j) {
        const int i = nn::lora_geometry<Cfg>::index_of(m.targets[j]);
        const auto& ai = adapters.a[i];
        const auto& bi = adapters.b[i];
        for (index_t row = 0; row < r; ++row)
          for (index_t c = 0; c < m.in; ++c) a[std::size_t((index_t(j) * r + row) * m.in + c)] = ai(row, c);
        const index_t first = detail::peft_row_of<Cfg>(m, m.targets[j]);
        for (index_t row = 0; row < bi.extent(0); ++row)
          for (index_t c = 0; c < r; ++c) b[std::size_t((first + row) * rank + index_t(j) * r + c)] = bi(row, c);
      }
      const std::string prefix = detail::peft_layer_prefix<Cfg>(l) + m.suffix;
      tensors.push_back(make_source<float>(prefix + ".lora_A.weight", a, {rank, m.in}));
      tensors.push_back(make_source<float>(prefix + ".lora_B.weight", b, {m.out_rows, rank}));
    }
  }
  write_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});

  nlohmann::json targets = nlohmann::json::array(), rank_pattern = nlohmann::json::object(),
                 alpha_pattern = nlohmann::json::object();
  for (const auto& m : modules) {
    targets.push_back(m.suffix);
    if (m.targets.size() > 1) {
      rank_pattern[m.suffix] = r * index_t(m.targets.size());
      alpha_pattern[m.suffix] = adapter::alpha * float(m.targets.size());
    }
  }
  const nlohmann::json config = {{"peft_type", "LORA"},
                                 {"task_type", "CAUSAL_LM"},
                                 {"r", r},
                                 {"lora_alpha", adapter::alpha},
                                 {"lora_dropout", 0.0},
                                 {"target_modules", targets},
                                 {"rank_pattern", rank_pattern},
                                 {"alpha_pattern", alpha_pattern},
                                 {"bias", "none"},
                                 {"fan_in_fan_out", gpt2},
                                 {"use_rslora", false},
                                 {"use_dora", false},
                                 {"init_lora_weights", true},
                                 {"inference_mode", true},
                                 {"modules_to_save", nullptr},
                                 {"base_model_name_or_path", nullptr}};
  const std::string text = config.dump(2) + "\n";
  detail::atomic_write(dir / "adapter_config.json",
                       [&](int fd) { detail::write_all(fd, text.data(), text.size(), dir / "adapter_config.json"); });
}

/// Reads a PEFT LoRA adapter folder into the adapters of `model`, all or
/// nothing: adapter_config.json must adapt exactly the modules model's
/// configuration adapts (target_modules matched as PEFT does, by name or
/// dotted suffix), with the same scale alpha / rank and plain LoRA (no
/// rsLoRA, DoRA or bias training); every tensor must be present in its shape
/// (F32, BF16 or F16) and no other. A GPT-2 c_attn adapter of the model's
/// rank (one A shared by q, k, v) or of (targets x rank) with B
/// block-diagonal (what save_peft_adapter writes) both map exactly; another
/// c_attn adapter is refused. Throws invalid_input / io_error naming the file.
template <class Model>
void load_peft_adapter(const std::filesystem::path& dir, Model& model) {
  using Cfg = typename Model::config;
  using adapter = typename nn::config_traits<Cfg>::adapter;
  static_assert(nn::config_traits<Cfg>::has_adapters, "ctformer: load_peft_adapter fills a LoRA model's adapters");
  static_assert(Model::template storage<float>::space::host_accessible,
                "ctformer: adapters are read into host memory; load on the host, then copy to the device");
  constexpr index_t r = adapter::rank;
  const auto config_file = dir / "adapter_config.json";
  const detail::peft_config config = detail::read_peft_config(config_file);
  const std::vector<std::string>& target_modules = config.target_modules;

  const auto modules = detail::peft_modules<Cfg>();
  // The modules the file adapts: PEFT matches a target by the whole name or a dotted suffix.
  auto targeted = [&](const std::string& suffix) {
    for (const auto& t : target_modules)
      if (suffix == t || suffix.ends_with("." + t)) return true;
    return false;
  };
  std::set<std::string> ours, theirs;
  for (const auto& m : modules) ours.insert(m.suffix);
  for (const auto& m : detail::peft_modules<Cfg>(true))
    if (targeted(m.suffix)) theirs.insert(m.suffix);
  if (ours != theirs) {
    std::string a, b;
    for (const auto& s : ours) a += (a.empty() ? "" : ", ") + s;
    for (const auto& s : theirs) b += (b.empty() ? "" : ", ") + s;
    detail::bad_config(config_file, "the adapter covers {" + b + "}; the model's configuration adapts {" + a + "}");
  }
  auto pattern = [&](const std::map<std::string, double>& patterns, const std::string& suffix, double fallback) {
    for (const auto& [key, value] : patterns)
      if (suffix == key || suffix.ends_with("." + key)) return value;
    return fallback;
  };

  hugging_face_weights file = hugging_face_weights::of_file(dir / "adapter_model.safetensors");
  std::set<std::string> expected;
  struct staged {
    float* destination;
    std::vector<float> values;
  };
  std::vector<staged> writes;
  for (index_t l = 0; l < nn::config_traits<Cfg>::n_layer; ++l) {
    auto& adapters = model.weights().adapters[std::size_t(l)];
    for (const auto& m : modules) {
      const index_t rank = index_t(pattern(config.rank_pattern, m.suffix, double(config.r)));
      const double alpha = pattern(config.alpha_pattern, m.suffix, config.alpha);
      if (std::fabs(alpha / double(rank) - double(adapter::scale)) > 1e-6 * double(adapter::scale))
        detail::bad_config(config_file, m.suffix + " has scale alpha / r = " + std::to_string(alpha) + " / " +
                                            std::to_string(rank) + "; the model's is " +
                                            std::to_string(adapter::alpha) + " / " + std::to_string(r));
      const index_t k = index_t(m.targets.size());
      const bool shared = rank == r && k > 1;
      if (rank != r * k && !shared)
        detail::bad_config(config_file, m.suffix + " has rank " + std::to_string(rank) + "; the model's adapters " +
                                            "need " + std::to_string(r * k) +
                                            (k > 1 ? " (or " + std::to_string(r) + ", one A shared)" : ""));
      const std::string prefix = detail::peft_layer_prefix<Cfg>(l) + m.suffix;
      const index_t a_shape[] = {rank, m.in}, b_shape[] = {m.out_rows, rank};
      const std::vector<float> a = file.floats(prefix + ".lora_A.weight", a_shape);
      const std::vector<float> b = file.floats(prefix + ".lora_B.weight", b_shape);
      expected.insert(prefix + ".lora_A.weight");
      expected.insert(prefix + ".lora_B.weight");
      std::vector<bool> used(b.size(), false);
      for (index_t j = 0; j < k; ++j) {
        const int i = nn::lora_geometry<Cfg>::index_of(m.targets[std::size_t(j)]);
        const index_t column = shared ? 0 : j * r, first = detail::peft_row_of<Cfg>(m, m.targets[std::size_t(j)]);
        const index_t rows = adapters.b[i].extent(0);
        staged wa{adapters.a[i].data(), std::vector<float>(std::size_t(r * m.in))};
        for (index_t row = 0; row < r; ++row)
          for (index_t c = 0; c < m.in; ++c)
            wa.values[std::size_t(row * m.in + c)] = a[std::size_t((column + row) * m.in + c)];
        staged wb{adapters.b[i].data(), std::vector<float>(std::size_t(rows * r))};
        for (index_t row = 0; row < rows; ++row)
          for (index_t c = 0; c < r; ++c) {
            const std::size_t at = std::size_t((first + row) * rank + column + c);
            wb.values[std::size_t(row * r + c)] = b[at];
            used[at] = true;
          }
        writes.push_back(std::move(wa));
        writes.push_back(std::move(wb));
      }
      if (!shared)
        for (std::size_t e = 0; e < b.size(); ++e)
          if (!used[e] && b[e] != 0.0f)
            throw io_error("ctformer::io: '" + (dir / "adapter_model.safetensors").string() + "': " + prefix +
                           ".lora_B.weight mixes q, k and v across their blocks; ctformer's adapters are one per "
                           "projection, so this adapter cannot be represented exactly");
    }
  }
  for (const auto& name : file.names())
    if (!expected.count(name))
      throw io_error("ctformer::io: '" + (dir / "adapter_model.safetensors").string() + "': tensor '" + name +
                     "' is not an adapter of the model's configuration");
  for (const auto& w : writes) std::copy(w.values.begin(), w.values.end(), w.destination);
  model.parameters_changed();
}

}  // namespace ctformer::io
