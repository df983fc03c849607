// safetensors round trips and every corruption the reader must refuse, and
// checkpoints: all-or-nothing loading and writes that never destroy the old file.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/io/checkpoint.hpp"
#include "ctformer/io/safetensors.hpp"

using namespace ctformer;
namespace fs = std::filesystem;

namespace {

// A fresh folder under the system's temporary directory, removed afterwards.
struct temp_dir {
  fs::path path;
  temp_dir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("ctformer_io_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

std::vector<char> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_bytes(const fs::path& p, const std::vector<char>& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

// Rewrites a file's header through mutate, keeping its data section.
void rewrite_header(const fs::path& p, const std::function<void(nlohmann::json&)>& mutate) {
  const auto bytes = read_bytes(p);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  auto header = nlohmann::json::parse(std::string(bytes.data() + 8, std::size_t(n)));
  mutate(header);
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const std::uint64_t size = text.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &size, 8);
  out += text;
  out.append(bytes.begin() + 8 + std::ptrdiff_t(n), bytes.end());
  write_bytes(p, std::vector<char>(out.begin(), out.end()));
}

// Two float tensors "a" (2, 3) and "b" (4) and one metadata entry.
void write_sample(const fs::path& p) {
  const std::vector<float> a = {1, 2, 3, 4, 5, 6}, b = {7, 8, 9, 10};
  const std::vector<io::tensor_source> tensors = {io::make_source<float>("a", a, {2, 3}),
                                                  io::make_source<float>("b", b, {4})};
  io::write_safetensors(p, tensors, {{"note", "sample"}});
}

}  // namespace

TEST_CASE("safetensors round-trips every dtype, shapes and metadata", "[io][safetensors]") {
  temp_dir dir;
  const auto path = dir / "all.safetensors";
  const std::vector<float> f32 = {1.5f, -2.25f, 3.0f, 0.0f, 5.0f, 6.5f};
  const std::vector<bf16> b16 = {bf16(1.0f), bf16(-0.5f), bf16(3.0f), bf16(1e10f)};
  const std::vector<fp16> h16 = {fp16(0.25f), fp16(-7.0f)};
  const std::vector<std::int32_t> i32 = {1, -2, 3, 2147483647};
  const std::vector<std::uint8_t> u8 = {0, 128, 255};
  const std::vector<std::int64_t> i64 = {-(std::int64_t(1) << 40)};
  const std::vector<float> empty;
  const std::vector<io::tensor_source> tensors = {
      io::make_source<float>("weights.f32", f32, {2, 3}),    io::make_source<bf16>("b", b16, {4}),
      io::make_source<fp16>("h", h16, {1, 2}),               io::make_source<std::int32_t>("i", i32, {2, 2}),
      io::make_source<std::uint8_t>("u", u8, {3}),           io::make_source<std::int64_t>("scalar", i64, {}),
      io::make_source<float>("empty", empty, {0, 5})};
  io::write_safetensors(path, tensors, {{"format", "pt"}, {"who", "ctformer"}});
  CHECK_FALSE(fs::exists(dir / "all.safetensors.tmp"));

  // Layout: 8-byte length, header padded with spaces to a multiple of 8.
  const auto bytes = read_bytes(path);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);
  const std::string header(bytes.data() + 8, std::size_t(n));
  CHECK(header.front() == '{');
  CHECK(nlohmann::json::parse(header)["b"]["dtype"] == "BF16");

  const auto f = io::safetensors_file::read(path);
  CHECK(f.metadata().at("who") == "ctformer");
  CHECK(f.tensors().size() == 7);
  CHECK(f.to_vector<float>("weights.f32") == f32);
  CHECK(f.info("weights.f32").shape == std::vector<index_t>{2, 3});
  CHECK(f.to_vector<bf16>("b") == b16);
  CHECK(f.to_vector<fp16>("h") == h16);
  CHECK(f.to_vector<std::int32_t>("i") == i32);
  CHECK(f.to_vector<std::uint8_t>("u") == u8);
  CHECK(f.to_vector<std::int64_t>("scalar") == i64);
  CHECK(f.info("scalar").shape.empty());
  CHECK(f.info("empty").element_count() == 0);
  CHECK_THROWS_WITH(f.to_vector<float>("b"), Catch::Contains("all.safetensors") && Catch::Contains("'b'") &&
                                                 Catch::Contains("BF16"));
  CHECK_THROWS_WITH(f.info("missing"), Catch::Contains("'missing'") && Catch::Contains("not in the file"));
}

TEST_CASE("writing refuses inconsistent tensors", "[io][safetensors]") {
  temp_dir dir;
  const std::vector<float> data = {1, 2, 3};
  const std::vector<io::tensor_source> wrong_size = {io::make_source<float>("x", data, {2, 2})};
  CHECK_THROWS_WITH(io::write_safetensors(dir / "w.safetensors", wrong_size),
                    Catch::Contains("w.safetensors") && Catch::Contains("'x'") && Catch::Contains("16 bytes"));
  const std::vector<io::tensor_source> twice = {io::make_source<float>("x", data, {3}),
                                                io::make_source<float>("x", data, {3})};
  CHECK_THROWS_WITH(io::write_safetensors(dir / "w.safetensors", twice), Catch::Contains("twice"));
  CHECK_FALSE(fs::exists(dir / "w.safetensors"));
}

TEST_CASE("every truncation of a file is refused with the file name", "[io][safetensors]") {
  temp_dir dir;
  const auto good = dir / "good.safetensors";
  write_sample(good);
  const auto bytes = read_bytes(good);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  const auto cut = dir / "cut.safetensors";
  for (std::size_t length = 0; length < bytes.size(); ++length) {
    write_bytes(cut, std::vector<char>(bytes.begin(), bytes.begin() + std::ptrdiff_t(length)));
    INFO("truncated to " << length << " of " << bytes.size() << " bytes (header ends at " << 8 + n << ")");
    REQUIRE_THROWS_MATCHES(io::safetensors_file::read(cut), io_error,
                           Catch::Matchers::Predicate<io_error>([](const io_error& e) {
                             return std::string(e.what()).find("cut.safetensors") != std::string::npos;
                           }));
  }
  write_bytes(cut, std::vector<char>(bytes.begin(), bytes.begin() + 5));
  CHECK_THROWS_WITH(io::safetensors_file::read(cut), Catch::Contains("shorter than the 8-byte header length"));
  write_bytes(cut, std::vector<char>(bytes.begin(), bytes.begin() + 8 + std::ptrdiff_t(n) / 2));
  CHECK_THROWS_WITH(io::safetensors_file::read(cut), Catch::Contains("runs past the end of the file"));
  write_bytes(cut, std::vector<char>(bytes.begin(), bytes.end() - 3));
  CHECK_THROWS_WITH(io::safetensors_file::read(cut), Catch::Contains("tensor 'b'") && Catch::Contains("truncated"));
  CHECK_THROWS_WITH(io::safetensors_file::read(dir / "absent.safetensors"),
                    Catch::Contains("absent.safetensors") && Catch::Contains("cannot open"));
}

TEST_CASE("flipped header bytes are refused", "[io][safetensors]") {
  temp_dir dir;
  const auto good = dir / "good.safetensors";
  write_sample(good);
  const auto bytes = read_bytes(good);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  const auto bad = dir / "flipped.safetensors";
  // Any header byte with its top bit flipped: not ASCII, so not valid JSON
  // (nor valid UTF-8 inside a string).
  for (std::size_t at = 8; at < 8 + n; ++at) {
    auto copy = bytes;
    copy[at] = char(copy[at] ^ 0x80);
    write_bytes(bad, copy);
    INFO("byte " << at);
    REQUIRE_THROWS_AS(io::safetensors_file::read(bad), io_error);
  }
  // The length field itself: every byte flipped makes it run past the file.
  for (std::size_t at = 0; at < 8; ++at) {
    auto copy = bytes;
    copy[at] = char(copy[at] ^ 0x40);
    write_bytes(bad, copy);
    INFO("length byte " << at);
    CHECK_THROWS_AS(io::safetensors_file::read(bad), io_error);
  }
  auto copy = bytes;
  copy[8] = '[';
  write_bytes(bad, copy);
  CHECK_THROWS_WITH(io::safetensors_file::read(bad), Catch::Contains("flipped.safetensors") &&
                                                         Catch::Contains("not valid JSON"));
}

TEST_CASE("malformed headers are refused, naming the tensor", "[io][safetensors]") {
  temp_dir dir;
  const auto p = dir / "bad.safetensors";
  struct corruption {
    const char* what;
    std::function<void(nlohmann::json&)> mutate;
    const char* message;
  };
  const std::vector<corruption> cases = {
      {"unknown dtype", [](auto& h) { h["a"]["dtype"] = "F64"; }, "unknown dtype \"F64\""},
      {"dtype not a string", [](auto& h) { h["a"]["dtype"] = 3; }, "\"dtype\" is not a string"},
      {"missing shape", [](auto& h) { h["a"].erase("shape"); }, "\"shape\" is missing"},
      {"missing dtype", [](auto& h) { h["b"].erase("dtype"); }, "\"dtype\" is missing"},
      {"missing offsets", [](auto& h) { h["b"].erase("data_offsets"); }, "\"data_offsets\" is missing"},
      {"negative extent", [](auto& h) { h["a"]["shape"] = {-2, 3}; }, "not a non-negative integer"},
      {"shape disagrees with offsets", [](auto& h) { h["a"]["shape"] = {3, 3}; }, "needs 36 bytes"},
      {"offsets out of range", [](auto& h) { h["b"]["data_offsets"] = {24, 48}; }, "run past the end"},
      {"offsets reversed", [](auto& h) { h["b"]["data_offsets"] = {40, 24}; }, "end before they begin"},
      {"offsets not numbers", [](auto& h) { h["b"]["data_offsets"] = {"24", "40"}; }, "not two non-negative"},
      {"overlap",
       [](auto& h) {
         h["b"]["data_offsets"] = {20, 36};
         h["a"]["data_offsets"] = {0, 24};
       },
       "overlap tensor 'a'"},
      {"gap",
       [](auto& h) {
         h["a"]["shape"] = {2, 2};
         h["a"]["data_offsets"] = {0, 16};
       },
       "gap"},
      {"entry not an object", [](auto& h) { h["a"] = 5; }, "not a JSON object"},
      {"metadata not strings", [](auto& h) { h["__metadata__"]["note"] = 1; }, "is not a string"},
      {"header not an object", [](auto& h) { h = nlohmann::json::array({1, 2}); }, "not a JSON object"},
  };
  for (const auto& c : cases) {
    write_sample(p);
    rewrite_header(p, c.mutate);
    INFO(c.what);
    CHECK_THROWS_AS(io::safetensors_file::read(p), io_error);
    CHECK_THROWS_WITH(io::safetensors_file::read(p), Catch::Contains("bad.safetensors") && Catch::Contains(c.message));
  }
  // Tensor errors name the tensor.
  write_sample(p);
  rewrite_header(p, [](auto& h) { h["b"]["dtype"] = "Q4"; });
  CHECK_THROWS_WITH(io::safetensors_file::read(p), Catch::Contains("tensor 'b'"));
  // Bytes after the last tensor.
  write_sample(p);
  auto bytes = read_bytes(p);
  bytes.push_back(0);
  write_bytes(p, bytes);
  CHECK_THROWS_WITH(io::safetensors_file::read(p), Catch::Contains("trailing bytes"));
}

namespace {

// A model-like setup: a flat buffer with three tensors, and AdamW-like state.
struct fake_training {
  std::vector<float> params, m, v;
  std::vector<nn::parameter_info> table = {{"embed", 0, {4, 3}}, {"norm.weight", 12, {3}}, {"head", 15, {3, 2}}};
  io::checkpoint_state state;

  explicit fake_training(std::uint32_t seed) : params(21), m(21), v(21) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> d(-1, 1);
    for (auto* b : {&params, &m, &v})
      for (auto& x : *b) x = d(gen);
    bind();
    state.step = 10;
    state.optimizer_step = 10;
    state.rng.seed(seed);
    state.config_json = R"({"d_model": 3, "n_layer": 1, "vocab": 4})";
    state.vocabulary = R"({"type":"char","symbols":[97,98,99,100]})";
  }
  void bind() {
    state.parameter_table = table;
    state.parameters = tensor_view<float, 1>(params.data(), {21});
    state.optimizer_state = {{"m", tensor_view<float, 1>(m.data(), {21})}, {"v", tensor_view<float, 1>(v.data(), {21})}};
  }
  std::vector<float> all() const {
    std::vector<float> out = params;
    out.insert(out.end(), m.begin(), m.end());
    out.insert(out.end(), v.begin(), v.end());
    return out;
  }
};

}  // namespace

TEST_CASE("a checkpoint round-trips parameters, optimizer state, step, RNG and metadata", "[io][checkpoint]") {
  temp_dir dir;
  const auto path = dir / "ckpt.safetensors";
  fake_training saved(1);
  saved.state.rng.discard(12345);
  io::save_checkpoint(path, saved.state);

  fake_training loaded(2);
  loaded.state.config_json = R"({"vocab":4,"n_layer":1,"d_model":3})";  // same JSON, other spelling
  io::load_checkpoint(path, loaded.state);
  CHECK(loaded.all() == saved.all());
  CHECK(loaded.state.step == 10);
  CHECK(loaded.state.optimizer_step == 10);
  CHECK(loaded.state.rng == saved.state.rng);
  CHECK(loaded.state.rng() == saved.state.rng());  // continues identically

  const auto f = io::safetensors_file::read(path);
  CHECK(f.info("embed").shape == std::vector<index_t>{4, 3});
  CHECK(f.info("optimizer.m").shape == std::vector<index_t>{21});
  const auto meta = io::read_checkpoint_metadata(path);
  CHECK(meta.step == 10);
  CHECK(meta.vocabulary == saved.state.vocabulary);
  CHECK(nlohmann::json::parse(meta.config_json)["d_model"] == 3);
}

TEST_CASE("a mismatching checkpoint is refused and nothing is loaded", "[io][checkpoint]") {
  temp_dir dir;
  const auto path = dir / "ckpt.safetensors";
  fake_training saved(1);
  io::save_checkpoint(path, saved.state);

  fake_training live(2);
  live.state.step = 77;
  const auto before = live.all();
  const auto rng_before = live.state.rng;
  auto untouched = [&] {
    CHECK(live.all() == before);
    CHECK(live.state.step == 77);
    CHECK(live.state.rng == rng_before);
  };

  SECTION("wrong shape") {
    live.table[2].shape = {2, 3};
    live.bind();
    CHECK_THROWS_WITH(io::load_checkpoint(path, live.state),
                      Catch::Contains("ckpt.safetensors") && Catch::Contains("tensor 'head'") &&
                          Catch::Contains("shape is (3, 2), expected (2, 3)"));
    untouched();
  }
  SECTION("missing tensor") {
    live.table.push_back({"extra", 18, {3}});
    live.bind();
    CHECK_THROWS_WITH(io::load_checkpoint(path, live.state), Catch::Contains("tensor 'extra'") &&
                                                                 Catch::Contains("not in the file"));
    untouched();
  }
  SECTION("unexpected tensor") {
    live.table.pop_back();
    live.bind();
    CHECK_THROWS_WITH(io::load_checkpoint(path, live.state), Catch::Contains("tensor 'head'") &&
                                                                 Catch::Contains("not in the model"));
    untouched();
  }
  SECTION("optimizer state of another size") {
    live.state.optimizer_state[1].data = tensor_view<float, 1>(live.v.data(), {20});
    CHECK_THROWS_WITH(io::load_checkpoint(path, live.state), Catch::Contains("tensor 'optimizer.v'"));
    untouched();
  }
  SECTION("different configuration") {
    live.state.config_json = R"({"d_model": 4, "n_layer": 1, "vocab": 4})";
    CHECK_THROWS_WITH(io::load_checkpoint(path, live.state), Catch::Contains("ckpt.safetensors") &&
                                                                 Catch::Contains("configuration differs"));
    untouched();
  }
  SECTION("different vocabulary") {
    live.state.vocabulary = R"({"type":"byte"})";
    CHECK_THROWS_WITH(io::load_checkpoint(path, live.state), Catch::Contains("vocabulary differs"));
    untouched();
  }
  SECTION("a tensor of another dtype") {
    rewrite_header(path, [](auto& h) {
      h["norm.weight"]["dtype"] = "I32";
    });
    CHECK_THROWS_WITH(io::load_checkpoint(path, live.state), Catch::Contains("tensor 'norm.weight'") &&
                                                                 Catch::Contains("dtype is I32, expected F32"));
    untouched();
  }
  SECTION("truncated at any point") {
    const auto bytes = read_bytes(path);
    for (std::size_t length : {std::size_t(0), std::size_t(7), std::size_t(100), bytes.size() / 2, bytes.size() - 1}) {
      write_bytes(path, std::vector<char>(bytes.begin(), bytes.begin() + std::ptrdiff_t(length)));
      INFO("truncated to " << length);
      CHECK_THROWS_WITH(io::load_checkpoint(path, live.state), Catch::Contains("ckpt.safetensors"));
      untouched();
    }
  }
  SECTION("a plain safetensors file") {
    write_sample(path);
    CHECK_THROWS_WITH(io::load_checkpoint(path, live.state), Catch::Contains("not a ctformer checkpoint"));
    untouched();
  }
  SECTION("a corrupt RNG state") {
    rewrite_header(path, [](auto& h) { h["__metadata__"]["rng"] = "not numbers"; });
    CHECK_THROWS_WITH(io::load_checkpoint(path, live.state), Catch::Contains("\"rng\""));
    untouched();
  }
}

TEST_CASE("a failed write keeps the previous checkpoint", "[io][checkpoint]") {
  temp_dir dir;
  const auto path = dir / "ckpt.safetensors";
  fake_training first(1);
  io::save_checkpoint(path, first.state);
  const auto old_bytes = read_bytes(path);

  // A folder where the temporary file must go: creating it fails.
  fs::create_directory(dir / "ckpt.safetensors.tmp");
  fake_training second(2);
  second.state.step = 20;
  CHECK_THROWS_WITH(io::save_checkpoint(path, second.state),
                    Catch::Contains("ckpt.safetensors.tmp") && Catch::Contains("temporary file"));
  CHECK(read_bytes(path) == old_bytes);
  fake_training check(3);
  io::load_checkpoint(path, check.state);
  CHECK(check.all() == first.all());

  // Once the obstacle is gone the new checkpoint replaces the old one.
  fs::remove(dir / "ckpt.safetensors.tmp");
  io::save_checkpoint(path, second.state);
  CHECK_FALSE(fs::exists(dir / "ckpt.safetensors.tmp"));
  CHECK(io::read_checkpoint_metadata(path).step == 20);
}

TEST_CASE("an inconsistent parameter table is refused before any I/O", "[io][checkpoint]") {
  temp_dir dir;
  fake_training t(1);
  t.table[2].offset = 18;  // runs past the 21-element buffer
  t.bind();
  CHECK_THROWS_WITH(io::save_checkpoint(dir / "x.safetensors", t.state),
                    Catch::Contains("'head'") && Catch::Contains("outside the parameter buffer"));
  CHECK_FALSE(fs::exists(dir / "x.safetensors"));
}
