// io::save_gguf / load_gguf / gguf_weight_source: models in llama.cpp's GGUF
// layout. An F32 file gives back every parameter exactly; Q8_0 and Q4_0
// files hand their blocks to an inference model as they are and give the
// same logits, bit for bit, as quantizing the model here; F16 and BF16 lose
// only their rounding; llama.cpp's names, metadata and rope row order are
// in the file; tokenizers come back; files of another shape, or with a
// tensor missing or of the wrong shape, are refused by name.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "ctformer/io/gguf_model.hpp"
#include "ctformer/io/hugging_face.hpp"
#include "ctformer/io/tokenizer.hpp"
#include "../infer/inference_test_models.hpp"
#include "../../support/test_data.hpp"
#include "hugging_face_test_configs.hpp"

using namespace ctformer;
using testing::infer_gpt;
using testing::infer_llama;
using testing::hf_llama_tiny;

namespace {

/// GPT-2-shaped without linear biases (nanoGPT's), whose file carries zero biases for llama.cpp.
struct gpt_without_bias : infer_gpt {
  static constexpr bool bias = false;
};

struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(const std::string& name) : path(std::filesystem::temp_directory_path() / name) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~temp_dir() { std::filesystem::remove_all(path); }
};

/// A tiny GPT-2 with a BPE vocabulary padded past its tokenizer's 259 tokens.
struct bpe_config : infer_gpt {
  static constexpr int vocab = 288;
};
/// Shapes the LLaMA test file does not hold, or a block format cannot store.
struct wider_llama : infer_llama {
  static constexpr int d_ff = 128;
};
struct narrow_llama : infer_llama {
  static constexpr int d_ff = 80;
};

template <class Cfg>
std::unique_ptr<nn::model<Cfg, cpu::par_t>> random_model(std::uint32_t seed) {
  auto m = std::make_unique<nn::model<Cfg, cpu::par_t>>(cpu::par.with_threads(1), seed);
  testing::randomise(*m, seed);
  return m;
}

io::char_tokenizer tokenizer_for(int vocab) {
  std::string symbols;
  for (int i = 0; i < vocab; ++i) symbols.push_back(char(32 + i));
  return io::char_tokenizer::from_symbols(symbols);
}

// Rewrites a GGUF file through the writer, dropping or replacing tensors.
void rewrite(const std::filesystem::path& from, const std::filesystem::path& to, const std::string& drop,
             const std::string& shrink = "") {
  const auto f = io::gguf_file::read(from);
  io::gguf_writer w(to);
  for (const auto& [key, value] : f.metadata()) w.set(key, value);
  for (const auto& t : f.tensors()) {
    if (t.name == drop) continue;
    auto bytes = f.bytes(t.name);
    auto shape = t.shape;
    if (t.name == shrink) {  // one row fewer
      bytes = bytes.first(bytes.size() / shape.back() * (shape.back() - 1));
      shape.back() -= 1;
    }
    w.add_tensor(t.name, t.type, shape, bytes);
  }
  w.write();
}

}  // namespace

TEMPLATE_TEST_CASE("an F32 GGUF file gives back every parameter exactly", "[io][gguf]", infer_llama, infer_gpt,
                   gpt_without_bias) {
  temp_dir dir("ctformer_test_gguf_f32");
  const auto owner = random_model<TestType>(3);
  const auto& model = *owner;
  const auto tokenizer = tokenizer_for(TestType::vocab);
  io::save_gguf(dir.path / "m.gguf", model, tokenizer, io::gguf_type::f32, "tiny");
  nn::model<TestType, cpu::par_t> back(cpu::par.with_threads(1), 99);
  io::load_gguf(dir.path / "m.gguf", back);
  const auto a = model.parameters(), b = back.parameters();
  CHECK(std::memcmp(a.data(), b.data(), std::size_t(a.extent(0)) * sizeof(float)) == 0);
  const auto f = io::gguf_file::read(dir.path / "m.gguf");
  CHECK(io::gguf_tokenizer<io::char_tokenizer>(f).symbols() == tokenizer.symbols());
  CHECK(f.string("general.name") == "tiny");
  CHECK(f.unsigned_integer("general.file_type") == 0);
  CHECK(f.string("tokenizer.ggml.model") == "gpt2");
  CHECK(f.strings("tokenizer.ggml.tokens").size() == std::size_t(TestType::vocab));
}

TEST_CASE("a LLaMA GGUF file has llama.cpp's names, metadata and rope row order", "[io][gguf]") {
  using t = nn::config_traits<infer_llama>;
  temp_dir dir("ctformer_test_gguf_layout");
  const auto owner = random_model<infer_llama>(4);
  const auto& model = *owner;
  io::save_gguf(dir.path / "m.gguf", model, tokenizer_for(infer_llama::vocab), io::gguf_type::f32);
  const auto f = io::gguf_file::read(dir.path / "m.gguf");
  CHECK(f.string("general.architecture") == "llama");
  CHECK(f.unsigned_integer("llama.block_count") == 2);
  CHECK(f.unsigned_integer("llama.embedding_length") == 64);
  CHECK(f.unsigned_integer("llama.feed_forward_length") == 96);
  CHECK(f.unsigned_integer("llama.attention.head_count") == 4);
  CHECK(f.unsigned_integer("llama.attention.head_count_kv") == 2);
  CHECK(f.unsigned_integer("llama.context_length") == 48);
  CHECK(f.unsigned_integer("llama.rope.dimension_count") == std::uint64_t(t::head_dim));
  CHECK(f.number("llama.attention.layer_norm_rms_epsilon") == double(t::norm_eps));
  CHECK(f.number("llama.rope.freq_base") == double(t::rope_base));
  for (const char* name : {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_norm.weight",
                           "blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight",
                           "blk.1.attn_output.weight", "blk.1.ffn_norm.weight", "blk.1.ffn_gate.weight",
                           "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"})
    CHECK(f.contains(name));
  CHECK(f.info("blk.0.attn_k.weight").shape == std::vector<std::uint64_t>{64, 2 * std::uint64_t(t::head_dim)});
  CHECK(f.info("blk.0.ffn_down.weight").shape == std::vector<std::uint64_t>{96, 64});
  // File row h*D + 2j + e of attn_q holds the model's row h*D + e*D/2 + j.
  const auto params = model.parameters();
  index_t qkv_offset = -1;
  for (const auto& p : model.parameter_table())
    if (p.name == "blocks.0.attention.qkv.weight") qkv_offset = p.offset;
  REQUIRE(qkv_offset >= 0);
  const auto q = f.bytes("blk.0.attn_q.weight");
  constexpr index_t d = t::head_dim;
  for (index_t h = 0; h < t::n_head; ++h)
    for (index_t j = 0; j < d / 2; ++j)
      for (index_t e = 0; e < 2; ++e) {
        const float* model_row = params.data() + qkv_offset + (h * d + e * (d / 2) + j) * 64;
        CHECK(std::memcmp(q.data() + (h * d + 2 * j + e) * 64 * 4, model_row, 64 * 4) == 0);
      }
}

TEST_CASE("a Hugging Face LLaMA's q and k rows land where llama.cpp's converter puts them", "[io][gguf]") {
  // tools/make_gguf_reference.py applies convert_hf_to_gguf.py's permutation
  // to the folder's q_proj and k_proj with numpy; ctformer's file must hold
  // those exact floats.
  const std::filesystem::path data = CTFORMER_TEST_DATA_DIR;
  temp_dir dir("ctformer_test_gguf_hf_rope");
  nn::model<hf_llama_tiny, cpu::par_t> model(cpu::par.with_threads(1), 1);
  io::load_hugging_face(data / "hf" / "llama_tiny", model);
  io::save_gguf(dir.path / "m.gguf", model, io::byte_tokenizer{}, io::gguf_type::f32);
  std::ifstream in(data / "gguf_reference.json");
  const auto expected = nlohmann::json::parse(in)["llama_tiny_rope"];
  const auto f = io::gguf_file::read(dir.path / "m.gguf");
  REQUIRE(expected.size() == 4);
  for (const auto& [name, values] : expected.items()) {
    INFO(name);
    const auto reference = values.get<std::vector<float>>();
    const auto bytes = f.bytes(name);
    REQUIRE(bytes.size() == reference.size() * sizeof(float));
    CHECK(std::memcmp(bytes.data(), reference.data(), bytes.size()) == 0);
  }
  // And back: the file gives the folder's model.
  nn::model<hf_llama_tiny, cpu::par_t> back(cpu::par.with_threads(1), 2);
  io::load_gguf(dir.path / "m.gguf", back);
  CHECK(std::memcmp(back.parameters().data(), model.parameters().data(),
                    std::size_t(model.parameters().extent(0)) * sizeof(float)) == 0);
}

TEMPLATE_TEST_CASE("Q8_0 and Q4_0 files hand their blocks to an inference model: the same logits bit for bit",
                   "[io][gguf]", quant::q8_0, quant::q4_0) {
  temp_dir dir("ctformer_test_gguf_quantized");
  const auto path = dir.path / "m.gguf";
  const auto type = *io::gguf_type_of_format<TestType>();
  const std::vector<std::int32_t> prompt{5, 17, 3, 40, 22, 9, 61, 2};
  auto check = [&]<class Cfg>(Cfg) {
    const auto owner = random_model<Cfg>(5);
    const auto& model = *owner;
    io::save_gguf(path, model, tokenizer_for(Cfg::vocab), type);
    using inference = infer::inference_model<Cfg, TestType, infer::kv::contiguous<float>>;
    inference here(model, 16, cpu::par.with_threads(1));
    const io::gguf_weight_source<Cfg> source(path);
    inference from_file(source, 16, cpu::par.with_threads(1));
    auto cache_a = here.make_cache(1), cache_b = from_file.make_cache(1);
    const auto sa = cache_a.open_sequence(), sb = cache_b.open_sequence();
    const auto la = here.prefill(cache_a, sa, prompt);
    const std::vector<float> first(la.begin(), la.end());
    const auto lb = from_file.prefill(cache_b, sb, prompt);
    CHECK(std::vector<float>(lb.begin(), lb.end()) == first);
    const auto da = here.decode(cache_a, sa, 7);
    const std::vector<float> next(da.begin(), da.end());
    const auto db = from_file.decode(cache_b, sb, 7);
    CHECK(std::vector<float>(db.begin(), db.end()) == next);
    CHECK(io::gguf_file::read(path).info("blk.0.attn_output.weight").type == type);
  };
  check(infer_llama{});
  check(infer_gpt{});
}

TEST_CASE("F16 and BF16 files lose only their rounding", "[io][gguf]") {
  temp_dir dir("ctformer_test_gguf_half");
  const auto owner = random_model<infer_llama>(6);
  const auto& model = *owner;
  for (auto [type, bits] : {std::pair{io::gguf_type::f16, 11}, std::pair{io::gguf_type::bf16, 8}}) {
    INFO(io::gguf_type_name(type));
    io::save_gguf(dir.path / "m.gguf", model, tokenizer_for(infer_llama::vocab), type);
    nn::model<infer_llama, cpu::par_t> back(cpu::par.with_threads(1), 1);
    io::load_gguf(dir.path / "m.gguf", back);
    // Round to nearest: |error| <= 2^-(significand bits) |w|, plus half of
    // fp16's smallest subnormal step (2^-25) for the few tiny weights there.
    const double floor = type == io::gguf_type::f16 ? std::ldexp(1.0, -25) : 0.0;
    double worst = 0;
    for (const auto& p : model.parameter_table())
      for (index_t i = 0; i < p.size(); ++i) {
        const float a = model.parameters().data()[p.offset + i], b = back.parameters().data()[p.offset + i];
        if (p.kind == nn::parameter_kind::matrix) {
          REQUIRE(std::fabs(double(a) - double(b)) <= std::ldexp(std::fabs(double(a)), -bits) + floor);
          worst = std::max(worst, std::fabs(double(a) - double(b)));
        } else {
          REQUIRE(a == b);  // embeddings and norms stay F32
        }
      }
    CHECK(worst > 0);
  }
}

TEST_CASE("a GPT-2 BPE tokenizer comes back from a GGUF file's tokens and merges", "[io][gguf]") {
  temp_dir dir("ctformer_test_gguf_bpe");
  const std::filesystem::path hf = std::filesystem::path(CTFORMER_TEST_DATA_DIR) / "hf" / "gpt2_tiny";
  // A small BPE: a few merges over the byte alphabet.
  const auto vocab_path = dir.path / "vocab.json", merges_path = dir.path / "merges.txt";
  {
    nlohmann::json vocab = nlohmann::json::object();
    std::string s;
    for (int b = 0; b < 256; ++b) {
      s.clear();
      io::detail::bpe::bytes_to_symbol(std::string(1, char(b)), s);
      vocab[s] = b;
    }
    vocab["th"] = 256;
    vocab["the"] = 257;
    vocab["<|endoftext|>"] = 258;
    std::ofstream(vocab_path) << vocab.dump();
    std::ofstream(merges_path) << "#version: 0.2\nt h\nth e\n";
  }
  const auto tokenizer = io::bpe_tokenizer::from_files(vocab_path, merges_path);
  io::save_gguf(dir.path / "m.gguf", *random_model<bpe_config>(8), tokenizer, io::gguf_type::f32);
  const auto f = io::gguf_file::read(dir.path / "m.gguf");
  CHECK(f.strings("tokenizer.ggml.tokens").size() == 288);
  CHECK(f.strings("tokenizer.ggml.merges") == std::vector<std::string>{"t h", "th e"});
  CHECK(f.unsigned_integer("tokenizer.ggml.eos_token_id") == 258);
  CHECK_FALSE(f.find("ctformer.vocabulary"));
  const auto back = io::gguf_tokenizer<io::bpe_tokenizer>(f);
  CHECK(back == tokenizer);
  CHECK(back.encode("the thin") == tokenizer.encode("the thin"));
  CHECK(back.token_id("<|endoftext|>") == 258);
}

TEST_CASE("GGUF files of another model, or with a tensor missing or misshapen, are refused by name", "[io][gguf]") {
  temp_dir dir("ctformer_test_gguf_refused");
  const auto good = dir.path / "good.gguf", bad = dir.path / "bad.gguf";
  io::save_gguf(good, *random_model<infer_llama>(9), tokenizer_for(infer_llama::vocab), io::gguf_type::q8_0);
  nn::model<infer_gpt, cpu::par_t> gpt(cpu::par.with_threads(1), 1);
  CHECK_THROWS_WITH(io::load_gguf(good, gpt), Catch::Contains("good.gguf") && Catch::Contains("general.architecture"));
  CHECK_THROWS_WITH(io::gguf_weight_source<wider_llama>(good),
                    Catch::Contains("llama.feed_forward_length: the file has 96, the configuration 128"));

  nn::model<infer_llama, cpu::par_t> target(cpu::par.with_threads(1), 1);
  const std::vector<float> before(target.parameters().data(), target.parameters().data() + target.parameters().extent(0));
  rewrite(good, bad, "blk.1.ffn_up.weight");
  CHECK_THROWS_WITH(io::load_gguf(bad, target), Catch::Contains("bad.gguf") && Catch::Contains("'blk.1.ffn_up.weight'") &&
                                                     Catch::Contains("not in the file"));
  rewrite(good, bad, "", "blk.0.attn_k.weight");
  CHECK_THROWS_WITH(io::load_gguf(bad, target), Catch::Contains("'blk.0.attn_k.weight'") && Catch::Contains("shape"));
  rewrite(good, bad, "", "token_embd.weight");
  CHECK_THROWS_WITH(io::load_gguf(bad, target), Catch::Contains("token_embd.weight") && Catch::Contains("vocabulary"));
  rewrite(good, bad, "output.weight");  // now tied: the configuration's head is its own
  CHECK_THROWS_WITH(io::load_gguf(bad, target), Catch::Contains("output.weight"));
  // Nothing was loaded by any of these.
  CHECK(std::memcmp(before.data(), target.parameters().data(), before.size() * sizeof(float)) == 0);
  // A block format needs whole blocks in every row.
  CHECK_THROWS_WITH(io::save_gguf(bad, *random_model<narrow_llama>(2), tokenizer_for(infer_llama::vocab), io::gguf_type::q8_0),
                    Catch::Contains("80 columns"));
}
