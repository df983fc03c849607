// io::gguf_file and io::gguf_writer: a file written by llama.cpp's own
// Python writer (tools/make_gguf_reference.py) reads back with every
// metadata value and tensor byte, its Q8_0 / Q4_0 blocks are the ones
// ctformer's quantizers produce, files written here read back the same, and
// every kind of damaged file is an io_error that names the problem.
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/io/gguf.hpp"
#include "ctformer/io/gguf_model.hpp"
#include "ctformer/quant/formats.hpp"
#include "../../support/test_data.hpp"

using namespace ctformer;

namespace {

const std::filesystem::path data_dir = CTFORMER_TEST_DATA_DIR;

std::vector<float> floats_of(const nlohmann::json& a) { return a.get<std::vector<float>>(); }

std::vector<std::byte> file_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  const std::vector<char> c{std::istreambuf_iterator<char>(in), {}};
  std::vector<std::byte> b(c.size());
  if (!c.empty()) std::memcpy(b.data(), c.data(), c.size());
  return b;
}

// Decodes a tensor's stored values to floats with ctformer's own formats
// (the row decoder the model loader uses).
std::vector<float> decode(const io::gguf_file& f, const std::string& name) {
  const io::gguf_tensor_info& t = f.info(name);
  const auto bytes = f.bytes(name);
  const index_t cols = index_t(t.shape[0]), rows = index_t(t.element_count()) / cols;
  const std::size_t row_bytes = std::size_t(io::detail::gguf_row_bytes(t.type, cols));
  std::vector<float> out(std::size_t(rows * cols));
  for (index_t r = 0; r < rows; ++r)
    io::detail::gguf_decode_row(bytes.data() + std::size_t(r) * row_bytes, t.type, out.data() + r * cols, cols);
  return out;
}

// A small valid file written here, for the damaged-file cases.
std::filesystem::path write_small(const std::filesystem::path& path) {
  static const std::vector<float> a(64, 0.5f), b(32, -1.0f);
  io::gguf_writer w(path);
  w.set("general.architecture", io::gguf_value::string("llama"));
  w.set("test.tokens", io::gguf_value::array(io::gguf_value_type::string, std::vector<std::string>{"a", "bc"}));
  w.add_matrix("first", io::gguf_type::f32, 1, 64, std::as_bytes(std::span<const float>(a)));
  w.add_matrix("second", io::gguf_type::f32, 1, 32, std::as_bytes(std::span<const float>(b)));
  w.write();
  return path;
}

void write_bytes(const std::filesystem::path& p, const std::vector<std::byte>& bytes, std::size_t n) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(n));
}

template <class T>
void poke(std::vector<std::byte>& bytes, std::size_t at, T value) {
  std::memcpy(bytes.data() + at, &value, sizeof(T));
}

// Where the tensor infos start in write_small's file: after the 24-byte
// header and the two metadata entries.
std::size_t tensor_infos_start() {
  const std::size_t arch = 8 + 20 + 4 + 8 + 5;               // "general.architecture" = "llama"
  const std::size_t tokens = 8 + 11 + 4 + 4 + 8 + 9 + 10;    // "test.tokens" = ["a", "bc"]
  return 24 + arch + tokens;
}

}  // namespace

TEST_CASE("a GGUF file written by the gguf package reads back value for value and byte for byte",
          "[io][gguf]") {
  const auto f = io::gguf_file::read(data_dir / "gguf_reference.gguf");
  std::ifstream json_in(data_dir / "gguf_reference.json");
  const nlohmann::json expected = nlohmann::json::parse(json_in);
  CHECK(f.version() == 3);
  CHECK(f.alignment() == 32);
  CHECK(f.string("general.architecture") == "llama");
  CHECK(f.unsigned_integer("test.u8") == 200);
  CHECK(f.number("test.i8") == -100);
  CHECK(f.unsigned_integer("test.u16") == 60000);
  CHECK(f.number("test.i16") == -30000);
  CHECK(f.unsigned_integer("test.u32") == 4000000000u);
  CHECK(f.number("test.i32") == -2000000000.0);
  CHECK(f.number("test.f32") == 0.15625);
  CHECK(std::get<bool>(f.find("test.bool")->items[0]));
  CHECK(f.string("test.string") == "h\xc3\xa9llo \xe2\x96\x81w\xc3\xb6rld");
  CHECK(f.unsigned_integer("test.u64") == (std::uint64_t(1) << 60) + 3);
  CHECK(std::get<std::int64_t>(f.find("test.i64")->items[0]) == -(std::int64_t(1) << 60) - 3);
  CHECK(f.number("test.f64") == 2.718281828459045);
  CHECK(f.strings("test.strings") == std::vector<std::string>{"a", "", "<|endoftext|>", "\xc4\xa0the"});
  CHECK(f.find("test.i32s")->element_type == io::gguf_value_type::int32);
  CHECK(f.find("test.i32s")->items.size() == 3);
  CHECK(f.find("test.f32s")->element_type == io::gguf_value_type::float32);
  // Typed reads name the key and what is wrong.
  CHECK_THROWS_WITH(f.string("test.u8"), Catch::Contains("'test.u8' is not a string"));
  CHECK_THROWS_WITH(f.number("no.such.key"), Catch::Contains("'no.such.key'") && Catch::Contains("missing"));
  CHECK_THROWS_WITH(f.unsigned_integer("test.i8"), Catch::Contains("not an unsigned integer"));

  REQUIRE(f.tensors().size() == 5);
  for (const auto& [name, t] : expected["tensors"].items()) {
    INFO(name);
    const io::gguf_tensor_info& info = f.info(name);
    CHECK(info.shape == std::vector<std::uint64_t>{t["cols"].get<std::uint64_t>(), t["rows"].get<std::uint64_t>()});
    // Every stored value as the gguf package decodes it, exactly: the block
    // layouts are ggml's, and fp16 / bf16 widen exactly.
    CHECK(decode(f, name) == floats_of(t["stored"]));
    // ctformer's quantizers give the same bytes from the same floats (ggml's
    // rounding: round half away from zero, scales through fp16).
    const auto source = floats_of(t["source"]);
    const index_t cols = t["cols"].get<index_t>(), rows = t["rows"].get<index_t>();
    std::vector<std::byte> ours;
    auto quantize = [&]<class Format>(Format) {
      ours.resize(Format::bytes_for(rows, cols));
      for (index_t r = 0; r < rows; ++r)
        Format::quantize_row(source.data() + r * cols, ours.data() + std::size_t(r) * Format::row_bytes(cols), cols);
    };
    if (info.type == io::gguf_type::q8_0) quantize(quant::q8_0{});
    if (info.type == io::gguf_type::q4_0) quantize(quant::q4_0{});
    if (info.type == io::gguf_type::bf16) quantize(quant::bf16_weights{});
    if (!ours.empty()) {
      const auto theirs = f.bytes(name);
      CHECK(std::vector<std::byte>(theirs.begin(), theirs.end()) == ours);
    }
  }
}

TEST_CASE("a GGUF file written here reads back with its metadata, shapes, alignment and bytes", "[io][gguf]") {
  const auto dir = std::filesystem::temp_directory_path() / "ctformer_test_gguf_roundtrip";
  std::filesystem::create_directories(dir);
  std::vector<float> matrix(3 * 64);
  for (std::size_t i = 0; i < matrix.size(); ++i) matrix[i] = float(i) * 0.25f - 7.0f;
  std::vector<std::byte> q8(quant::q8_0::bytes_for(3, 64));
  for (index_t r = 0; r < 3; ++r) quant::q8_0::quantize_row(matrix.data() + r * 64, q8.data() + r * 68, 64);
  const std::vector<float> odd(5, 1.5f);  // 20 bytes: the next tensor is padded to the alignment

  for (std::uint32_t alignment : {32u, 64u}) {
    INFO("alignment " << alignment);
    const auto path = dir / ("model" + std::to_string(alignment) + ".gguf");
    io::gguf_writer w(path);
    w.set("general.architecture", io::gguf_value::string("llama"));
    if (alignment != 32) w.set("general.alignment", io::gguf_value::u32(alignment));
    w.set("llama.block_count", io::gguf_value::u32(2));
    w.set("llama.rope.freq_base", io::gguf_value::f32(10000.0f));
    w.set("tokenizer.ggml.tokens", io::gguf_value::array(io::gguf_value_type::string,
                                                         std::vector<std::string>{"<s>", "a", "\xe2\x96\x81"}));
    w.set("tokenizer.ggml.scores", io::gguf_value::array(io::gguf_value_type::float32, std::vector<float>{0, -1, -2}));
    w.set("llama.block_count", io::gguf_value::u32(3));  // replaces, keeps its place
    w.add_tensor("odd", io::gguf_type::f32, {5}, std::as_bytes(std::span<const float>(odd)));
    w.add_matrix("blk.0.attn_q.weight", io::gguf_type::q8_0, 3, 64, q8);
    w.add_matrix("token_embd.weight", io::gguf_type::f32, 3, 64, std::as_bytes(std::span<const float>(matrix)));
    w.write();

    const auto f = io::gguf_file::read(path);
    CHECK(f.alignment() == alignment);
    CHECK(f.unsigned_integer("llama.block_count") == 3);
    CHECK(f.number("llama.rope.freq_base") == 10000.0);
    CHECK(f.strings("tokenizer.ggml.tokens") == std::vector<std::string>{"<s>", "a", "\xe2\x96\x81"});
    CHECK(f.metadata().size() == (alignment == 32 ? 5u : 6u));
    REQUIRE(f.tensors().size() == 3);
    CHECK(f.tensors()[0].name == "odd");
    for (const auto& t : f.tensors()) CHECK(t.offset % alignment == 0);
    CHECK(f.info("blk.0.attn_q.weight").type == io::gguf_type::q8_0);
    CHECK(f.info("blk.0.attn_q.weight").shape == std::vector<std::uint64_t>{64, 3});
    const auto stored = f.bytes("blk.0.attn_q.weight");
    CHECK(std::vector<std::byte>(stored.begin(), stored.end()) == q8);
    CHECK(decode(f, "token_embd.weight") == matrix);
    CHECK(decode(f, "odd") == odd);
  }

  // Bad tensors are refused when added, before anything is written.
  io::gguf_writer w(dir / "bad.gguf");
  const std::vector<float> few(10);
  CHECK_THROWS_WITH(w.add_matrix("x", io::gguf_type::f32, 2, 8, std::as_bytes(std::span<const float>(few))),
                    Catch::Contains("'x'") && Catch::Contains("64 bytes, but 40"));
  CHECK_THROWS_WITH(w.add_matrix("y", io::gguf_type::q8_0, 1, 48, q8), Catch::Contains("not a multiple"));
  w.add_tensor("z", io::gguf_type::f32, {10}, std::as_bytes(std::span<const float>(few)));
  CHECK_THROWS_WITH(w.add_tensor("z", io::gguf_type::f32, {10}, std::as_bytes(std::span<const float>(few))),
                    Catch::Contains("appears twice"));
  CHECK_THROWS_AS(w.set("general.alignment", io::gguf_value::u32(48)), io_error);
  std::filesystem::remove_all(dir);
}

TEST_CASE("damaged GGUF files are io_errors that name the file and the problem, never a crash", "[io][gguf]") {
  const auto dir = std::filesystem::temp_directory_path() / "ctformer_test_gguf_damaged";
  std::filesystem::create_directories(dir);
  const auto good_path = write_small(dir / "good.gguf");
  const std::vector<std::byte> good = file_bytes(good_path);
  REQUIRE(io::gguf_file::read(good_path).tensors().size() == 2);
  const auto bad = dir / "bad.gguf";
  auto error_of = [&](const std::vector<std::byte>& bytes, std::size_t n) -> std::string {
    write_bytes(bad, bytes, n);
    try {
      io::gguf_file::read(bad);
    } catch (const io_error& e) {
      return e.what();
    }
    return "";
  };

  // Cut at every length: each is refused with the file named.
  for (std::size_t n = 0; n < good.size(); ++n) {
    INFO("cut at " << n << " of " << good.size() << " bytes");
    CHECK_THAT(error_of(good, n), Catch::Contains("bad.gguf"));
  }
  CHECK_THAT(error_of(good, good.size() - 1), Catch::Contains("'second'") && Catch::Contains("truncated"));

  auto damaged = [&](auto change) {
    auto b = good;
    change(b);
    return error_of(b, b.size());
  };
  CHECK_THAT(damaged([](auto& b) { b[0] = std::byte{'X'}; }), Catch::Contains("magic 'GGUF'"));
  CHECK_THAT(damaged([](auto& b) { poke(b, 4, std::uint32_t(1)); }), Catch::Contains("version 1"));
  CHECK_THAT(damaged([](auto& b) { poke(b, 4, std::uint32_t(4)); }), Catch::Contains("version 4"));
  CHECK_THAT(damaged([](auto& b) { poke(b, 8, std::uint64_t(1) << 40); }), Catch::Contains("claims"));
  CHECK_THAT(damaged([](auto& b) { poke(b, 16, std::uint64_t(1) << 40); }), Catch::Contains("claims"));
  // The first metadata value's type (after the header and the key).
  CHECK_THAT(damaged([](auto& b) { poke(b, 24 + 8 + 20, std::uint32_t(13)); }), Catch::Contains("does not define"));
  // The array's element type becomes "array".
  CHECK_THAT(damaged([](auto& b) { poke(b, 24 + 45 + 8 + 11 + 4, std::uint32_t(9)); }),
             Catch::Contains("array of arrays"));
  // An array length past the end.
  CHECK_THAT(damaged([](auto& b) { poke(b, 24 + 45 + 8 + 11 + 8, std::uint64_t(1) << 50); }),
             Catch::Contains("'test.tokens'") && Catch::Contains("more than the rest"));
  const std::size_t first = tensor_infos_start();  // "first": name, dims, extent, type, offset
  const std::size_t first_dims = first + 8 + 5, first_extent = first_dims + 4, first_type = first_extent + 16,
                    first_offset = first_type + 4;
  CHECK_THAT(damaged([&](auto& b) { poke(b, first_dims, std::uint32_t(7)); }),
             Catch::Contains("'first'") && Catch::Contains("7 dimensions"));
  CHECK_THAT(damaged([&](auto& b) { poke(b, first_extent, std::uint64_t(0)); }), Catch::Contains("zero"));
  CHECK_THAT(damaged([&](auto& b) { poke(b, first_type, std::uint32_t(12)); }),
             Catch::Contains("'first'") && Catch::Contains("ggml type 12"));
  CHECK_THAT(damaged([&](auto& b) { poke(b, first_type, std::uint32_t(8)); poke(b, first_extent, std::uint64_t(48)); }),
             Catch::Contains("not a multiple of Q8_0's block"));
  CHECK_THAT(damaged([&](auto& b) { poke(b, first_offset, std::uint64_t(4)); }),
             Catch::Contains("not a multiple of the alignment 32"));
  CHECK_THAT(damaged([&](auto& b) { poke(b, first_offset, std::uint64_t(1) << 20); }), Catch::Contains("run past"));
  // "second" moved onto "first"'s bytes.
  const std::size_t second_offset = first_offset + 8 + 8 + 6 + 4 + 16 + 4;
  CHECK_THAT(damaged([&](auto& b) { poke(b, second_offset, std::uint64_t(0)); }), Catch::Contains("overlap"));
  // Two tensors of one name: "t2" renamed "t1".
  {
    const std::vector<float> x(32);
    io::gguf_writer w(bad);
    w.add_tensor("t1", io::gguf_type::f32, {32}, std::as_bytes(std::span<const float>(x)));
    w.add_tensor("t2", io::gguf_type::f32, {32}, std::as_bytes(std::span<const float>(x)));
    w.write();
    auto b = file_bytes(bad);
    const std::size_t second_name = 24 + 8 + 2 + 4 + 8 + 4 + 8 + 8;
    REQUIRE(char(b[second_name + 1]) == '2');
    b[second_name + 1] = std::byte{'1'};
    CHECK_THAT(error_of(b, b.size()), Catch::Contains("'t1'") && Catch::Contains("appears twice"));
  }
  // A misaligned general.alignment.
  {
    io::gguf_writer w(bad);
    w.set("general.alignment", io::gguf_value::u32(64));
    w.write();
    auto b = file_bytes(bad);
    poke(b, 24 + 8 + 17 + 4, std::uint32_t(48));
    CHECK_THAT(error_of(b, b.size()), Catch::Contains("power of two"));
  }
  CHECK_THROWS_WITH(io::gguf_file::read(dir / "missing.gguf"), Catch::Contains("missing.gguf"));
  std::filesystem::remove_all(dir);
}
