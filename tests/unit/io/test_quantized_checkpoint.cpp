// io::save_quantized_checkpoint / load_quantized_checkpoint round trips in
// every format; files of another format, configuration or shape, and
// truncated files, are refused with an io_error naming the file (and tensor);
// io::load_model_parameters reads a training checkpoint without its optimizer state.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "ctformer/compress/post_training_quantization.hpp"
#include "ctformer/ctformer.hpp"
#include "ctformer/io/model_checkpoint.hpp"
#include "ctformer/io/quantized_checkpoint.hpp"

using namespace ctformer;

namespace {
struct tiny_config {
  static constexpr int vocab = 16, d_model = 32, n_layer = 1, n_head = 2, n_kv_head = 2, d_ff = 64, max_seq = 8;
  using norm = nn::layer_norm;
  using activation = nn::gelu;
  using position = nn::learned_position;
};
struct other_config : tiny_config {
  static constexpr int d_ff = 96;
};

std::filesystem::path temp_file(const std::string& name) {
  return std::filesystem::temp_directory_path() / ("ctformer_test_quantized_checkpoint_" + name);
}
std::vector<float> params_of(nn::model<tiny_config>& m) {
  return {m.parameters().data(), m.parameters().data() + m.parameter_count()};
}
const std::string vocabulary = R"({"type":"byte"})";

// Runs f and checks it throws io_error whose message contains every piece.
template <class F>
void check_refused(F&& f, std::initializer_list<std::string> pieces) {
  try {
    f();
    FAIL("expected an io_error");
  } catch (const io_error& e) {
    const std::string what = e.what();
    for (const auto& piece : pieces) {
      INFO(what);
      CHECK(what.find(piece) != std::string::npos);
    }
  }
}
}  // namespace

TEMPLATE_TEST_CASE("a quantized checkpoint round trips packed bytes and dequantized parameters", "[io][compress]",
                   quant::q8_0, quant::q4_0, quant::int8_rowwise, quant::bf16_weights, quant::fp32,
                   quant::sparse_2of4, quant::sparse_half) {
  const auto path = temp_file(std::string(TestType::name) + ".safetensors");
  nn::model<tiny_config> source(cpu::par, 3);
  const auto packed = compress::quantize_weights<TestType>(source);
  io::save_quantized_checkpoint<TestType>(path, source, packed, vocabulary);
  compress::load_dequantized<TestType>(source, packed);  // what the file stands for

  const auto meta = io::read_quantized_checkpoint_metadata(path);
  CHECK(meta.weight_format == TestType::name);
  CHECK(meta.vocabulary == vocabulary);
  CHECK(io::is_quantized_checkpoint(path));

  nn::model<tiny_config> loaded(cpu::par, 99);
  const auto back = io::load_quantized_checkpoint<TestType>(path, loaded);
  CHECK(params_of(loaded) == params_of(source));  // exact: same bytes, same dequantize
  REQUIRE(back.size() == packed.size());
  for (const auto& [name, w] : packed) {
    const auto& b = back.at(name);
    REQUIRE(b.bytes() == w.bytes());
    CHECK(std::equal(w.data(), w.data() + w.bytes(), b.data()));
  }
  // The format is chosen from the file at run time, once.
  const std::string chosen = io::visit_weight_format(meta.weight_format, []<class F>() { return std::string(F::name); });
  CHECK(chosen == TestType::name);
  std::filesystem::remove(path);
}

TEST_CASE("quantized checkpoints of another format, configuration or shape are refused", "[io][compress]") {
  const auto path = temp_file("q4.safetensors");
  nn::model<tiny_config> source(cpu::par, 3);
  io::save_quantized_checkpoint<quant::q4_0>(path, source, compress::quantize_weights<quant::q4_0>(source), vocabulary);

  nn::model<tiny_config> target(cpu::par, 5);
  const auto untouched = params_of(target);
  check_refused([&] { io::load_quantized_checkpoint<quant::q8_0>(path, target); },
                {path.string(), "'q4_0'", "'q8_0'"});
  nn::model<other_config> other(cpu::par, 5);
  check_refused([&] { io::load_quantized_checkpoint<quant::q4_0>(path, other); }, {path.string(), "configuration"});
  CHECK(params_of(target) == untouched);  // refused loads leave the model as it was

  // A training checkpoint is not a quantized one, and vice versa.
  const auto training = temp_file("training.safetensors");
  io::training_state state;
  state.vocabulary = vocabulary;
  io::save_model_checkpoint(training, source, state);
  check_refused([&] { io::load_quantized_checkpoint<quant::q4_0>(training, target); },
                {training.string(), "not a ctformer quantized checkpoint"});
  check_refused([&] { io::load_model_parameters(path, target); }, {path.string(), "not a ctformer checkpoint"});

  // Packed bytes of the wrong shape: the q4_0 tensors relabelled as q8_0.
  const auto relabelled = temp_file("relabelled.safetensors");
  {
    const auto f = io::safetensors_file::read(path);
    std::vector<io::tensor_source> sources;
    for (const auto& [name, info] : f.tensors()) sources.push_back({name, info.type, info.shape, f.bytes(name)});
    auto metadata = f.metadata();
    metadata["weight_format"] = "q8_0";
    io::write_safetensors(relabelled, sources, metadata);
  }
  check_refused([&] { io::load_quantized_checkpoint<quant::q8_0>(relabelled, target); },
                {relabelled.string(), "blocks.0.attention.qkv.weight", "(96, 18)", "(96, 34)"});

  // A truncated file.
  const auto truncated = temp_file("truncated.safetensors");
  {
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(truncated, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size() - 100));
  }
  check_refused([&] { io::load_quantized_checkpoint<quant::q4_0>(truncated, target); }, {truncated.string()});
  CHECK(params_of(target) == untouched);
  for (const auto& p : {path, training, relabelled, truncated}) std::filesystem::remove(p);
}

TEST_CASE("load_model_parameters reads a training checkpoint's parameters only, all or nothing", "[io][compress]") {
  const auto path = temp_file("with_optimizer.safetensors");
  nn::model<tiny_config> source(cpu::par, 3);
  std::vector<float> moments(std::size_t(source.parameter_count()), 0.25f);
  io::training_state state;
  state.vocabulary = vocabulary;
  state.step = 42;
  state.optimizer_state = {{"m", tensor_view<float, 1>(moments.data(), {index_t(moments.size())})}};
  io::save_model_checkpoint(path, source, state);

  nn::model<tiny_config> target(cpu::par, 5);
  const auto meta = io::load_model_parameters(path, target);
  CHECK(meta.step == 42);
  CHECK(meta.vocabulary == vocabulary);
  CHECK(params_of(target) == params_of(source));

  // A parameter missing: refused, naming the tensor, and nothing is copied.
  const auto missing = temp_file("missing.safetensors");
  {
    const auto f = io::safetensors_file::read(path);
    std::vector<io::tensor_source> sources;
    for (const auto& [name, info] : f.tensors())
      if (name != "final_norm.bias") sources.push_back({name, info.type, info.shape, f.bytes(name)});
    io::write_safetensors(missing, sources, f.metadata());
  }
  nn::model<tiny_config> fresh(cpu::par, 5);
  const auto untouched = params_of(fresh);
  check_refused([&] { io::load_model_parameters(missing, fresh); }, {missing.string(), "final_norm.bias"});
  CHECK(params_of(fresh) == untouched);
  nn::model<other_config> other(cpu::par, 5);
  check_refused([&] { io::load_model_parameters(path, other); }, {path.string(), "configuration"});
  std::filesystem::remove(path);
  std::filesystem::remove(missing);
}

TEMPLATE_TEST_CASE("an inference model built straight from a quantized checkpoint equals one built from its "
                   "dequantized fp32 model",
                   "[io][compress][infer]", quant::q8_0, quant::q4_0, quant::int8_rowwise, quant::bf16_weights) {
  const auto path = temp_file(std::string("source_") + TestType::name + ".safetensors");
  nn::model<tiny_config> source(cpu::par, 3);
  io::save_quantized_checkpoint<TestType>(path, source, compress::quantize_weights<TestType>(source), vocabulary);

  // The old route: dequantize into an fp32 model, then pack again.
  nn::model<tiny_config> dequantized(cpu::par, 99);
  io::load_quantized_checkpoint<TestType>(path, dequantized);
  using model_type = infer::inference_model<tiny_config, TestType, infer::kv::paged<4>>;
  model_type repacked(dequantized, 8);
  // The direct route: the packed bytes as stored.
  const io::quantized_checkpoint_source<tiny_config, TestType> file(path);
  CHECK(file.vocabulary() == vocabulary);
  model_type direct(file, 8);
  CHECK(direct.weight_bytes() == repacked.weight_bytes());

  // Requantizing dequantized blocks gives the same blocks back for these
  // formats (each block's scale is its max / the format's range, which the
  // dequantized block still has), so the two models compute the same bits.
  const std::vector<std::int32_t> prompt = {1, 5, 9, 2, 7};
  auto c1 = direct.make_cache(32);
  auto c2 = repacked.make_cache(32);
  const auto s1 = c1.open_sequence(), s2 = c2.open_sequence();
  const auto a = direct.prefill(c1, s1, prompt);
  const std::vector<float> from_file(a.begin(), a.end());
  const auto b = repacked.prefill(c2, s2, prompt);
  CHECK(from_file == std::vector<float>(b.begin(), b.end()));

  // A file of another format or configuration is refused when the source opens.
  check_refused([&] { io::quantized_checkpoint_source<tiny_config, quant::fp32> wrong(path); },
                {path.string(), std::string("'") + TestType::name + "'"});
  check_refused([&] { io::quantized_checkpoint_source<other_config, TestType> wrong(path); },
                {path.string(), "configuration"});
  std::filesystem::remove(path);
}
