// PEFT adapter folders: a LoRA model's adapters saved alone and read back
// exactly, and every malformed or mismatched folder refused with the model
// untouched. With CTFORMER_PEFT_CHECK_DIR set, the GPT-2 and LLaMA cases
// also leave there a base model folder, the adapter and ctformer's logits,
// which tools/check_peft_adapter.py compares with peft + transformers.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/io/hugging_face.hpp"
#include "ctformer/io/peft.hpp"
#include "ctformer/nn/nn.hpp"

using namespace ctformer;
namespace fs = std::filesystem;

namespace {

struct gpt2_shape {
  static constexpr int vocab = 50, d_model = 32, n_layer = 2, n_head = 4, n_kv_head = 4, d_ff = 128, max_seq = 16;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
  static constexpr bool bias = true;
};
struct llama_shape {
  static constexpr int vocab = 50, d_model = 32, n_layer = 2, n_head = 4, n_kv_head = 2, d_ff = 64, max_seq = 16;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
  static constexpr bool tie_embeddings = false;
};
using nn::lora_target;
// GPT-2 with q and v (two blocks of the fused c_attn) and the MLP's up.
using gpt2_adapted = nn::with_lora<gpt2_shape, nn::lora<4, lora_target::q | lora_target::v | lora_target::up, 8.0f>>;
using llama_adapted = nn::with_lora<llama_shape, nn::lora<4, lora_target::q | lora_target::k | lora_target::v |
                                                                 lora_target::o | lora_target::down,
                                                             16.0f>>;

fs::path scratch(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("ctformer_test_peft_" + name);
  fs::remove_all(p);
  return p;
}

// Random base weights and adapters (B is zero at construction: make it not).
template <class Model>
void randomise(Model& m, std::uint64_t seed) {
  std::mt19937 rng{std::uint32_t(seed)};
  std::uniform_real_distribution<float> dist(-0.2f, 0.2f);
  for (index_t i = 0; i < m.parameter_count(); ++i) m.parameters()(i) = dist(rng);
  m.parameters_changed();
}

template <class Model>
std::vector<float> adapter_values(Model& m) {
  std::vector<float> out;
  for (const auto& p : m.parameter_table())
    if (p.name.find(".lora.") != std::string::npos)
      out.insert(out.end(), m.parameters().data() + p.offset, m.parameters().data() + p.offset + p.size());
  return out;
}

template <class Model>
void check_refused(const fs::path& dir, Model& m, const std::string& why) {
  const std::vector<float> before(m.parameters().data(), m.parameters().data() + m.parameter_count());
  try {
    io::load_peft_adapter(dir, m);
    FAIL("accepted an adapter that " << why);
  } catch (const error& e) {
    CHECK_THAT(e.what(), Catch::Contains(why));
  }
  CHECK(std::memcmp(before.data(), m.parameters().data(), sizeof(float) * before.size()) == 0);
}

void rewrite_config(const fs::path& dir, const std::string& key, const nlohmann::json& value) {
  std::ifstream in(dir / "adapter_config.json");
  nlohmann::json j = nlohmann::json::parse(in);
  in.close();
  if (value.is_null()) j.erase(key);
  else j[key] = value;
  std::ofstream(dir / "adapter_config.json") << j.dump(2);
}

}  // namespace

TEMPLATE_TEST_CASE("a PEFT adapter folder round-trips a LoRA model's adapters exactly", "[io][peft][lora]",
                   gpt2_adapted, llama_adapted) {
  using model_type = nn::model<TestType, cpu::par_t>;
  model_type trained(cpu::par, 1);
  randomise(trained, 5);
  const fs::path dir = scratch(std::string(std::same_as<TestType, gpt2_adapted> ? "gpt2" : "llama") + "_roundtrip");
  io::save_peft_adapter(dir, trained);
  REQUIRE(fs::exists(dir / "adapter_config.json"));
  REQUIRE(fs::exists(dir / "adapter_model.safetensors"));
  std::ifstream config_in(dir / "adapter_config.json");
  const nlohmann::json config = nlohmann::json::parse(config_in);
  CHECK(config["peft_type"] == "LORA");
  CHECK(config["r"] == 4);
  if constexpr (std::same_as<TestType, gpt2_adapted>) {
    // q and v share GPT-2's c_attn: one adapter of twice the rank, alpha alike.
    CHECK(config["rank_pattern"]["attn.c_attn"] == 8);
    CHECK(config["alpha_pattern"]["attn.c_attn"] == 16.0);
    CHECK(config["fan_in_fan_out"] == true);
  }

  model_type loaded(cpu::par, 2);
  io::load_peft_adapter(dir, loaded);
  CHECK(adapter_values(loaded) == adapter_values(trained));

  // Optionally leave what tools/check_peft_adapter.py needs.
  if (const char* check = std::getenv("CTFORMER_PEFT_CHECK_DIR")) {
    const fs::path out = fs::path(check) / (std::same_as<TestType, gpt2_adapted> ? "gpt2" : "llama");
    fs::remove_all(out);
    nn::model<typename TestType::base_config, cpu::par_t> base(cpu::par, 3);
    std::memcpy(base.parameters().data(), trained.parameters().data(), sizeof(float) * std::size_t(base.parameter_count()));
    io::save_hugging_face(out / "base", base);
    io::save_peft_adapter(out / "adapter", trained);
    std::vector<std::int32_t> tokens;
    for (int i = 0; i < 2 * 12; ++i) tokens.push_back(std::int32_t((i * 7 + 3) % 50));
    const auto logits = trained.logits(tensor_view<const std::int32_t, 2>(tokens.data(), {2, 12}));
    nlohmann::json j = {{"tokens", tokens}, {"batch", 2}, {"length", 12},
                        {"logits", std::vector<float>(logits.data(), logits.data() + logits.size())}};
    std::ofstream(out / "ctformer_logits.json") << j.dump();
  }
}

TEST_CASE("a GPT-2 c_attn adapter with one A for q, k and v maps onto per-projection adapters", "[io][peft][lora]") {
  // What PEFT itself trains on c_attn: rank r, A shared by the whole fused
  // projection. ctformer represents it exactly as q, k, v adapters of rank r
  // with equal A.
  using shared_config = nn::with_lora<gpt2_shape, nn::lora<4, lora_target::q | lora_target::k | lora_target::v, 8.0f>>;
  nn::model<shared_config, cpu::par_t> m(cpu::par, 1);
  const fs::path dir = scratch("shared");
  fs::create_directories(dir);
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> a(4 * 32), b(96 * 4);
  for (auto& x : a) x = dist(rng);
  for (auto& x : b) x = dist(rng);
  std::vector<io::tensor_source> tensors;
  for (int l = 0; l < 2; ++l) {
    const std::string prefix = "base_model.model.transformer.h." + std::to_string(l) + ".attn.c_attn";
    tensors.push_back(io::make_source<float>(prefix + ".lora_A.weight", a, {4, 32}));
    tensors.push_back(io::make_source<float>(prefix + ".lora_B.weight", b, {96, 4}));
  }
  io::write_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  std::ofstream(dir / "adapter_config.json")
      << nlohmann::json{{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", {"c_attn"}}}.dump();
  io::load_peft_adapter(dir, m);
  for (int i = 0; i < 3; ++i) {  // q, k, v
    const auto& ai = m.weights().adapters[1].a[i];
    const auto& bi = m.weights().adapters[1].b[i];
    CHECK(std::vector<float>(ai.data(), ai.data() + ai.size()) == a);
    CHECK(std::vector<float>(bi.data(), bi.data() + bi.size()) ==
          std::vector<float>(b.begin() + 32 * 4 * i, b.begin() + 32 * 4 * (i + 1)));
  }
}

TEST_CASE("malformed or mismatched PEFT adapters are refused and the model is left as it was", "[io][peft][lora]") {
  using model_type = nn::model<llama_adapted, cpu::par_t>;
  model_type source(cpu::par, 1);
  randomise(source, 7);
  model_type target(cpu::par, 2);
  const fs::path dir = scratch("refusals");
  auto fresh = [&] {
    fs::remove_all(dir);
    io::save_peft_adapter(dir, source);
  };

  fresh();
  rewrite_config(dir, "target_modules", nlohmann::json::array({"q_proj", "v_proj"}));
  check_refused(dir, target, "the adapter covers");

  fresh();
  rewrite_config(dir, "lora_alpha", 8);
  check_refused(dir, target, "scale alpha / r");

  fresh();
  rewrite_config(dir, "use_dora", true);
  check_refused(dir, target, "use_dora");

  fresh();
  rewrite_config(dir, "peft_type", "IA3");
  check_refused(dir, target, "peft_type");

  fresh();
  rewrite_config(dir, "r", nullptr);
  check_refused(dir, target, "\"r\"");

  // Another rank: the tensors' shapes no longer match.
  fresh();
  rewrite_config(dir, "r", 2);
  rewrite_config(dir, "lora_alpha", 8);
  check_refused(dir, target, "rank 2");

  // A truncated weights file.
  fresh();
  fs::resize_file(dir / "adapter_model.safetensors", fs::file_size(dir / "adapter_model.safetensors") / 2);
  check_refused(dir, target, "adapter_model.safetensors");

  // No folder at all.
  check_refused(scratch("missing"), target, "adapter_config.json");

  // A GPT-2 c_attn adapter whose B mixes q and v columns cannot be represented.
  using gpt2_model = nn::model<gpt2_adapted, cpu::par_t>;
  gpt2_model gpt2_source(cpu::par, 1), gpt2_target(cpu::par, 2);
  randomise(gpt2_source, 3);
  const fs::path mixed = scratch("mixed");
  io::save_peft_adapter(mixed, gpt2_source);
  {
    // Rewrite layer 0's c_attn B with no zero block.
    io::safetensors_file f = io::safetensors_file::read(mixed / "adapter_model.safetensors");
    std::vector<std::vector<float>> keep;
    std::vector<io::tensor_source> tensors;
    for (const auto& [name, info] : f.tensors()) {
      const auto bytes = f.bytes(name);
      auto& values = keep.emplace_back(bytes.size() / sizeof(float));
      std::memcpy(values.data(), bytes.data(), bytes.size());
      if (name == "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")
        for (auto& v : values) v = v == 0.0f ? 0.5f : v;
      tensors.push_back(io::make_source<float>(name, values, info.shape));
    }
    io::write_safetensors(mixed / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  }
  check_refused(mixed, gpt2_target, "cannot be represented exactly");
}
