// Hugging Face model folders: GPT-2 and LLaMA (sharded, GQA, untied) written
// by transformers give transformers' logits here; ctformer's own export reads
// back bit for bit; a config.json with a wrong field, a missing or truncated
// shard, an index naming a tensor its shard lacks, a tensor of the wrong
// shape or dtype, or an unknown tensor each get an error naming the file and
// the problem, and leave the model unchanged.
// tools/make_hf_reference.py writes tests/data/hf/.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <unistd.h>
#include <string>
#include <vector>

#include "ctformer/io/hugging_face.hpp"
#include "ctformer/nn/nn.hpp"
#include "../../support/test_data.hpp"
#include "hugging_face_test_configs.hpp"

using namespace ctformer;
namespace fs = std::filesystem;

namespace {

using testing::hf_gpt2_tiny;
using testing::hf_llama_tiny;
// The same model compiled for a shorter context: the first rows of the
// file's position table.
struct hf_gpt2_tiny_short : hf_gpt2_tiny {
  static constexpr int max_seq = 16;
};
struct hf_gpt2_tiny_bf16 : hf_gpt2_tiny {
  static constexpr const char* folder = "gpt2_tiny_bf16";
};
// Another LLaMA: a folder of hf_llama_tiny does not fit it.
struct other_llama : hf_llama_tiny {
  static constexpr int d_ff = 48, n_kv_head = 4;
};

const fs::path data = fs::path(CTFORMER_TEST_DATA_DIR) / "hf";

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

// Largest |a - b| over the largest |b|: logits near zero make a per-element
// relative error meaningless.
double scaled_error(std::span<const float> a, const std::vector<double>& b) {
  double scale = 1e-12, worst = 0;
  for (double x : b) scale = std::max(scale, std::fabs(x));
  for (std::size_t i = 0; i < b.size(); ++i) worst = std::max(worst, std::fabs(double(a[i]) - b[i]));
  return worst / scale;
}

template <class Cfg>
std::vector<float> logits_of(nn::model<Cfg, cpu::par_t>& m, const std::vector<std::int32_t>& tokens) {
  tensor_view<const std::int32_t, 2> in(tokens.data(), {1, index_t(tokens.size())});
  auto logits = m.logits(in);
  return {logits.data(), logits.data() + tokens.size() * Cfg::vocab};
}

// A scratch copy of a reference folder, removed at the end of the test.
struct scratch_folder {
  fs::path path;
  explicit scratch_folder(const std::string& source) {
    static int counter = 0;
    path = fs::temp_directory_path() / ("ctformer_hf_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
    if (!source.empty())
      for (const auto& e : fs::directory_iterator(data / source)) fs::copy_file(e.path(), path / e.path().filename());
  }
  ~scratch_folder() { fs::remove_all(path); }
};

template <class Cfg>
std::vector<float> parameters_of(nn::model<Cfg, cpu::par_t>& m) {
  return {m.parameters().data(), m.parameters().data() + m.parameters().size()};
}

}  // namespace

TEMPLATE_TEST_CASE("a Hugging Face folder written by transformers gives transformers' logits", "[io][hugging_face]",
                   hf_gpt2_tiny, hf_gpt2_tiny_short, hf_gpt2_tiny_bf16, hf_llama_tiny) {
  nn::model<TestType, cpu::par_t> m(cpu::par.with_threads(1), 5);
  io::load_hugging_face(data / TestType::folder, m);
  const nlohmann::json reference = read_json(data / TestType::folder / "reference.json");
  auto tokens = reference["tokens"].get<std::vector<std::int32_t>>();
  auto expected = reference["logits"].get<std::vector<double>>();
  if (tokens.size() > std::size_t(TestType::max_seq)) tokens.resize(std::size_t(TestType::max_seq));
  expected.resize(tokens.size() * TestType::vocab);
  // fp32 here against transformers' fp32 forward: a few ulp per operation
  // over two blocks; 1e-5 of the logits' scale holds with room (the issue
  // asks 1e-4) and a weight in the wrong place misses it by far.
  CHECK(scaled_error(logits_of(m, tokens), expected) < 1e-5);
}

TEMPLATE_TEST_CASE("save_hugging_face writes a folder that reads back bit for bit", "[io][hugging_face]",
                   hf_gpt2_tiny, hf_llama_tiny) {
  nn::model<TestType, cpu::par_t> original(cpu::par.with_threads(1), 11);
  io::load_hugging_face(data / TestType::folder, original);
  scratch_folder out("");
  io::save_hugging_face(out.path / "export", original);
  const io::hugging_face_config config = io::read_hugging_face_config(out.path / "export");
  CHECK(io::configuration_mismatches<TestType>(config).empty());
  nn::model<TestType, cpu::par_t> copy(cpu::par.with_threads(1), 12);
  io::load_hugging_face(out.path / "export", copy);
  CHECK(parameters_of(copy) == parameters_of(original));  // fp32 both ways: exact
  CHECK_FALSE(fs::exists(out.path / "export" / "model.safetensors.tmp"));
  // tools/check_hf_export.py sets this to load the exports in transformers.
  if (const char* keep = std::getenv("CTFORMER_HF_EXPORT_DIR"))
    io::save_hugging_face(fs::path(keep) / TestType::folder, original);
}

TEST_CASE("a config.json that is not the compiled configuration lists every field that differs",
          "[io][hugging_face]") {
  nn::model<other_llama, cpu::par_t> m(cpu::par.with_threads(1), 3);
  const auto before = parameters_of(m);
  try {
    io::load_hugging_face(data / "llama_tiny", m);
    FAIL("loaded a folder of another configuration");
  } catch (const invalid_input& e) {
    const std::string what = e.what();
    CHECK_THAT(what, Catch::Contains("config.json"));
    CHECK_THAT(what, Catch::Contains("intermediate_size: the file has 64, the configuration 48"));
    CHECK_THAT(what, Catch::Contains("num_key_value_heads: the file has 2, the configuration 4"));
  }
  CHECK(parameters_of(m) == before);
  // GPT-2 weights into a LLaMA configuration: the model type differs.
  CHECK(!io::configuration_mismatches<hf_llama_tiny>(io::read_hugging_face_config(data / "gpt2_tiny")).empty());
}

TEST_CASE("bad config.json fields are errors naming the file and the field", "[io][hugging_face]") {
  scratch_folder folder("gpt2_tiny");
  const fs::path config = folder.path / "config.json";
  const nlohmann::json good = read_json(config);
  auto expect = [&](nlohmann::json j, const std::string& message) {
    std::ofstream(config) << j.dump();
    INFO(message);
    try {
      io::read_hugging_face_config(folder.path);
      FAIL("read a bad config.json");
    } catch (const invalid_input& e) {
      CHECK_THAT(e.what(), Catch::Contains(config.string()) && Catch::Contains(message));
    }
  };
  auto with = [&](const char* key, nlohmann::json value) {
    nlohmann::json j = good;
    j[key] = std::move(value);
    return j;
  };
  expect(with("n_embd", "32"), "field \"n_embd\" is a string, not an integer");
  expect(with("n_layer", 2.5), "field \"n_layer\" is a number, not an integer");
  expect(with("n_head", -4), "field \"n_head\" is -4, not positive");
  expect(with("layer_norm_epsilon", "small"), "field \"layer_norm_epsilon\" is a string, not a number");
  expect(with("tie_word_embeddings", 1), "field \"tie_word_embeddings\" is an integer, not a boolean");
  expect(with("model_type", "bert"), "model_type \"bert\" is not one ctformer reads");
  nlohmann::json missing = good;
  missing.erase("n_embd");
  expect(missing, "field \"n_embd\" is missing");
  std::ofstream(config) << "{\"model_type\": \"gpt2\",";
  CHECK_THROWS_WITH(io::read_hugging_face_config(folder.path), Catch::Contains("not valid JSON"));
  fs::remove(config);
  CHECK_THROWS_AS(io::read_hugging_face_config(folder.path), io_error);
}

TEST_CASE("bad shards are errors naming the file, and the model stays unchanged", "[io][hugging_face]") {
  nn::model<hf_llama_tiny, cpu::par_t> m(cpu::par.with_threads(1), 9);
  const auto before = parameters_of(m);
  auto expect = [&](const scratch_folder& folder, const std::string& message) {
    INFO(message);
    try {
      io::load_hugging_face(folder.path, m);
      FAIL("loaded a bad folder");
    } catch (const ctformer::error& e) {
      CHECK_THAT(e.what(), Catch::Contains(message));
    }
    CHECK(parameters_of(m) == before);
  };
  const nlohmann::json index = read_json(data / "llama_tiny" / "model.safetensors.index.json");
  const std::string some_shard = index["weight_map"]["model.layers.1.mlp.down_proj.weight"];
  {
    scratch_folder folder("llama_tiny");
    fs::remove(folder.path / some_shard);
    expect(folder, "names shard '" + some_shard + "', which is missing");
  }
  {
    scratch_folder folder("llama_tiny");
    fs::resize_file(folder.path / some_shard, fs::file_size(folder.path / some_shard) / 2);
    expect(folder, some_shard);
  }
  {
    scratch_folder folder("llama_tiny");
    nlohmann::json j = index;
    j["weight_map"]["model.layers.7.self_attn.q_proj.weight"] = some_shard;
    std::ofstream(folder.path / "model.safetensors.index.json") << j.dump();
    expect(folder, "puts tensor 'model.layers.7.self_attn.q_proj.weight' in '" + some_shard + "', which does not hold it");
  }
  {
    scratch_folder folder("llama_tiny");
    nlohmann::json j = index;
    j["weight_map"]["model.layers.0.mlp.up_proj.weight"] = 3;
    std::ofstream(folder.path / "model.safetensors.index.json") << j.dump();
    expect(folder, "the shard of tensor 'model.layers.0.mlp.up_proj.weight' is an integer, not a file name");
  }
  {
    scratch_folder folder("");
    fs::copy_file(data / "llama_tiny" / "config.json", folder.path / "config.json");
    expect(folder, "holds neither model.safetensors nor model.safetensors.index.json");
  }
}

TEST_CASE("a tensor of the wrong shape or dtype, or one the layout lacks, is an error naming it", "[io][hugging_face]") {
  // Rewrites gpt2_tiny's model.safetensors with one tensor changed.
  const io::safetensors_file source = io::safetensors_file::read(data / "gpt2_tiny" / "model.safetensors");
  auto rewrite = [&](const scratch_folder& folder, const std::string& changed, io::tensor_source replacement,
                     bool add = false) {
    std::vector<io::tensor_source> tensors;
    for (const auto& [name, info] : source.tensors())
      if (add || name != changed) tensors.push_back({name, info.type, info.shape, source.bytes(name)});
    tensors.push_back(std::move(replacement));
    io::write_safetensors(folder.path / "model.safetensors", tensors);
  };
  nn::model<hf_gpt2_tiny, cpu::par_t> m(cpu::par.with_threads(1), 4);
  const auto before = parameters_of(m);
  auto expect = [&](const scratch_folder& folder, const std::string& message) {
    INFO(message);
    try {
      io::load_hugging_face(folder.path, m);
      FAIL("loaded a bad tensor");
    } catch (const io_error& e) {
      CHECK_THAT(e.what(), Catch::Contains("model.safetensors") && Catch::Contains(message));
    }
    CHECK(parameters_of(m) == before);
  };
  std::vector<float> small(16 * 32, 0.5f);
  std::vector<std::int32_t> integers(32, 1);
  {
    scratch_folder folder("gpt2_tiny");
    rewrite(folder, "transformer.h.1.attn.c_attn.weight",
            io::make_source<float>("transformer.h.1.attn.c_attn.weight", small, {16, 32}));
    expect(folder, "tensor 'transformer.h.1.attn.c_attn.weight' has shape (16, 32), the model expects (32, 96)");
  }
  {
    scratch_folder folder("gpt2_tiny");
    rewrite(folder, "transformer.ln_f.bias", io::make_source<std::int32_t>("transformer.ln_f.bias", integers, {32}));
    expect(folder, "tensor 'transformer.ln_f.bias' is I32; model weights must be F32, BF16 or F16");
  }
  {
    scratch_folder folder("gpt2_tiny");
    rewrite(folder, "", io::make_source<float>("transformer.h.0.attn.rotary.weight", small, {16, 32}), true);
    expect(folder, "tensor 'transformer.h.0.attn.rotary.weight' is not a weight of the gpt2 layout");
  }
}
