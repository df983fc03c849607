// llama2.c checkpoints: a random one (GQA, untied classifier) and, where
// ../shared/data holds it, the pretrained stories260K give the logits of a
// NumPy port of run.c's forward (tools/make_llama2c_reference.py, which also
// checks that port against transformers); truncated files, trailing bytes,
// bad headers and another configuration are errors naming the file and the
// problem, and leave the model unchanged.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/io/llama2c.hpp"
#include "ctformer/io/tokenizer.hpp"
#include "ctformer/nn/nn.hpp"
#include "../../support/test_data.hpp"

using namespace ctformer;
namespace fs = std::filesystem;

namespace {

// Must equal write_tiny in tools/make_llama2c_reference.py.
struct llama2c_tiny {
  static constexpr int vocab = 64, d_model = 32, n_layer = 2, n_head = 4, n_kv_head = 2, d_ff = 48, max_seq = 16;
  static constexpr bool tie_embeddings = false;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
};
// stories260K's header: dim 64, hidden 172, 5 layers, 8 heads, 4 KV heads, vocab 512, context 512.
struct stories260k {
  static constexpr int vocab = 512, d_model = 64, n_layer = 5, n_head = 8, n_kv_head = 4, d_ff = 172, max_seq = 512;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
};

const fs::path data = CTFORMER_TEST_DATA_DIR;

template <class Cfg>
double logits_error(nn::model<Cfg, cpu::par_t>& m, const fs::path& reference_file) {
  std::ifstream in(reference_file);
  const nlohmann::json reference = nlohmann::json::parse(in);
  const auto tokens = reference["tokens"].get<std::vector<std::int32_t>>();
  const auto expected = reference["logits"].get<std::vector<double>>();
  tensor_view<const std::int32_t, 2> input(tokens.data(), {1, index_t(tokens.size())});
  auto logits = m.logits(input);
  // Largest difference over the largest |logit|.
  double scale = 1e-12, worst = 0;
  for (double x : expected) scale = std::max(scale, std::fabs(x));
  for (std::size_t i = 0; i < expected.size(); ++i)
    worst = std::max(worst, std::fabs(double(logits.data()[i]) - expected[i]));
  return worst / scale;
}

template <class Cfg>
std::vector<float> parameters_of(nn::model<Cfg, cpu::par_t>& m) {
  return {m.parameters().data(), m.parameters().data() + m.parameters().size()};
}

}  // namespace

TEST_CASE("a llama2.c checkpoint gives run.c's logits", "[io][llama2c]") {
  nn::model<llama2c_tiny, cpu::par_t> m(cpu::par.with_threads(1), 1);
  io::load_llama2c(data / "llama2c_tiny.bin", m);
  // fp32 against a float64 reference over two blocks: 1e-5 of the logits'
  // scale holds with room; a q/k row in the wrong place misses it by far.
  CHECK(logits_error(m, data / "llama2c_tiny_reference.json") < 1e-5);
}

TEST_CASE("stories260K, a pretrained llama2.c model, gives run.c's logits", "[io][llama2c]") {
  const fs::path file = fs::path(CTFORMER_SHARED_DATA_DIR) / "stories260K" / "stories260K.bin";
  if (!fs::exists(file)) {
    WARN("skipped: " << file << " is not here (optional shared data)");
    return;
  }
  const io::llama2c_header header = io::read_llama2c_header(file);
  CHECK(io::configuration_mismatches<stories260k>(header).empty());
  nn::model<stories260k, cpu::par_t> m(cpu::par.with_threads(2), 1);
  io::load_llama2c(file, m);
  // Five blocks of trained weights: the same 1e-5 of scale.
  CHECK(logits_error(m, data / "stories260K_reference.json") < 1e-5);
}

TEST_CASE("bad llama2.c files are errors naming the file, and the model stays unchanged", "[io][llama2c]") {
  const fs::path scratch = fs::temp_directory_path() / ("ctformer_llama2c_" + std::to_string(::getpid()));
  fs::create_directories(scratch);
  nn::model<llama2c_tiny, cpu::par_t> m(cpu::par.with_threads(1), 2);
  const auto before = parameters_of(m);
  auto expect = [&](const fs::path& file, const std::string& message) {
    INFO(message);
    try {
      io::load_llama2c(file, m);
      FAIL("loaded a bad file");
    } catch (const ctformer::error& e) {
      CHECK_THAT(e.what(), Catch::Contains(file.string()) && Catch::Contains(message));
    }
    CHECK(parameters_of(m) == before);
  };
  const fs::path good = data / "llama2c_tiny.bin";
  const auto size = fs::file_size(good);
  {
    const fs::path f = scratch / "truncated.bin";
    fs::copy_file(good, f, fs::copy_options::overwrite_existing);
    fs::resize_file(f, size - 100);
    expect(f, std::to_string(size - 100) + " bytes where the header's shapes need " + std::to_string(size) +
                  ": the file is truncated");
  }
  {
    const fs::path f = scratch / "trailing.bin";
    fs::copy_file(good, f, fs::copy_options::overwrite_existing);
    std::ofstream(f, std::ios::app | std::ios::binary) << "extra";
    expect(f, "trailing bytes");
  }
  {
    const fs::path f = scratch / "header.bin";
    std::ofstream(f, std::ios::binary) << "abc";
    expect(f, "shorter than llama2.c's 28-byte header");
  }
  {
    const fs::path f = scratch / "zero.bin";
    const std::int32_t header[7] = {32, 0, 2, 4, 2, 64, 16};
    std::ofstream(f, std::ios::binary).write(reinterpret_cast<const char*>(header), sizeof header);
    expect(f, "header field hidden_dim is 0");
  }
  {
    const fs::path f = scratch / "heads.bin";
    const std::int32_t header[7] = {32, 48, 2, 3, 2, 64, 16};
    std::ofstream(f, std::ios::binary).write(reinterpret_cast<const char*>(header), sizeof header);
    expect(f, "do not make whole, even heads");
  }
  expect(scratch / "missing.bin", "cannot open the file");
  {
    nn::model<stories260k, cpu::par_t> other(cpu::par.with_threads(1), 3);
    try {
      io::load_llama2c(good, other);
      FAIL("loaded another configuration");
    } catch (const invalid_input& e) {
      CHECK_THAT(e.what(), Catch::Contains("dim: the file has 32, the configuration 64") &&
                               Catch::Contains("classifier: the file's is not the token embedding"));
    }
  }
  fs::remove_all(scratch);
}

TEST_CASE("token_id_tokenizer: prompts as ids for a model without its tokenizer", "[io][llama2c][tokenizer]") {
  const io::token_id_tokenizer ids(512);
  CHECK(ids.encode(" 1 403\n407\t0 ") == std::vector<std::int32_t>{1, 403, 407, 0});
  CHECK(ids.encode("").empty());
  const std::int32_t tokens[] = {1, 403, 511};
  CHECK(ids.decode(tokens) == " 1 403 511");
  CHECK(ids.encode(ids.decode(tokens)) == std::vector<std::int32_t>(std::begin(tokens), std::end(tokens)));
  CHECK_THROWS_WITH(ids.encode("1 512"), Catch::Contains("'512' at byte 2 is not a token id in [0, 512)"));
  CHECK_THROWS_WITH(ids.encode("Once upon"), Catch::Contains("'Once' at byte 0"));
  CHECK_THROWS_WITH(ids.encode("-3"), Catch::Contains("'-3'"));
  CHECK_THROWS_WITH(ids.encode("99999999999999999999"), Catch::Contains("is not a token id"));
  const std::int32_t bad[] = {4, 600};
  CHECK_THROWS_WITH(ids.decode(bad), Catch::Contains("token 600 at position 1"));
  CHECK(io::token_id_tokenizer::deserialize(ids.serialize()).vocab_size() == 512);
  CHECK_THROWS_AS(io::token_id_tokenizer::deserialize(R"({"type":"byte"})"), invalid_input);
}
