// Byte and character tokenizers (round trips, unknown characters,
// serialisation) and the text dataset (split sizes, windows, too-short input).
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "ctformer/io/text_dataset.hpp"
#include "ctformer/io/tokenizer.hpp"
#include "../../support/test_data.hpp"

using namespace ctformer;
namespace fs = std::filesystem;

namespace {
fs::path write_temp(const std::string& name, const std::string& text) {
  const auto dir = fs::temp_directory_path() / ("ctformer_text_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const auto p = dir / name;
  std::ofstream(p, std::ios::binary) << text;
  return p;
}
struct cleanup {
  ~cleanup() {
    std::error_code ec;
    fs::remove_all(fs::temp_directory_path() / ("ctformer_text_test_" + std::to_string(::getpid())), ec);
  }
};
}  // namespace

TEST_CASE("the byte tokenizer round-trips any bytes", "[io][tokenizer]") {
  const io::byte_tokenizer t;
  std::string text = "héllo\n";
  text.push_back('\0');
  text.push_back(char(0xff));
  const auto ids = t.encode(text);
  CHECK(ids.size() == text.size());
  CHECK(ids.back() == 255);
  CHECK(t.decode(ids) == text);
  CHECK_THROWS_WITH(t.decode(std::vector<std::int32_t>{1, 256}), Catch::Contains("token 256") &&
                                                                     Catch::Contains("position 1"));
  CHECK_NOTHROW(io::byte_tokenizer::deserialize(t.serialize()));
  CHECK_THROWS_AS(io::byte_tokenizer::deserialize(R"({"type":"char"})"), invalid_input);
}

TEST_CASE("the char tokenizer uses the sorted distinct characters of its text", "[io][tokenizer]") {
  const auto t = io::char_tokenizer::from_text("hello world\n");
  CHECK(t.symbols() == "\n dehlorw");
  CHECK(t.vocab_size() == 9);
  const auto ids = t.encode("hold");
  CHECK(ids == std::vector<std::int32_t>{4, 6, 5, 2});
  CHECK(t.decode(ids) == "hold");
  CHECK(t.decode(t.encode("hello world\n")) == "hello world\n");
  CHECK_THROWS_AS(t.encode("help"), invalid_input);
  CHECK_THROWS_WITH(t.encode("help"), Catch::Contains("'p'") && Catch::Contains("position 3"));
  CHECK_THROWS_WITH(t.encode("a\tb"), Catch::Contains("'a'") && Catch::Contains("position 0"));
  CHECK_THROWS_WITH(t.decode(std::vector<std::int32_t>{0, 9}), Catch::Contains("token 9"));
  CHECK_THROWS_WITH(t.decode(std::vector<std::int32_t>{-1}), Catch::Contains("token -1"));
}

TEST_CASE("the char tokenizer serialises for checkpoints, any bytes included", "[io][tokenizer]") {
  std::string text = "abc\n";
  text.push_back(char(0xc3));  // half of a UTF-8 character: not valid UTF-8 on its own
  const auto t = io::char_tokenizer::from_text(text);
  const std::string s = t.serialize();
  CHECK(s == R"({"symbols":[10,97,98,99,195],"type":"char"})");
  const auto back = io::char_tokenizer::deserialize(s);
  CHECK(back == t);
  CHECK(back.decode(back.encode(text)) == text);
  CHECK_THROWS_AS(io::char_tokenizer::deserialize("{"), invalid_input);
  CHECK_THROWS_AS(io::char_tokenizer::deserialize(R"({"type":"byte"})"), invalid_input);
  CHECK_THROWS_AS(io::char_tokenizer::deserialize(R"({"type":"char","symbols":[97,97]})"), invalid_input);
  CHECK_THROWS_AS(io::char_tokenizer::deserialize(R"({"type":"char","symbols":[300]})"), invalid_input);
}

TEST_CASE("the dataset splits 90/10 and samples shifted windows", "[io][dataset]") {
  cleanup c;
  std::string text;
  for (int i = 0; i < 1000; ++i) text.push_back(char('a' + i % 26));
  const auto path = write_temp("alphabet.txt", text);
  const auto tok = io::char_tokenizer::from_text(text);
  const auto ds = io::text_dataset::from_file(path, tok, 8);
  CHECK(ds.train_tokens().size() == 900);
  CHECK(ds.val_tokens().size() == 100);
  CHECK(ds.val_tokens()[0] == tok.encode(text.substr(900, 1))[0]);
  CHECK(ds.source() == path.string());

  std::mt19937_64 rng(5);
  const index_t b = 32, t = 8;
  std::vector<std::int32_t> in(std::size_t(b * t)), tg(std::size_t(b * t));
  ds.sample_batch(rng, view(in.data(), b, t), view(tg.data(), b, t));
  for (index_t r = 0; r < b; ++r)
    for (index_t i = 0; i < t; ++i) {
      // The text is a-z repeated: each target is the next letter of its input.
      REQUIRE(tg[std::size_t(r * t + i)] == (in[std::size_t(r * t + i)] + 1) % 26);
      if (i + 1 < t) REQUIRE(in[std::size_t(r * t + i + 1)] == tg[std::size_t(r * t + i)]);
    }
  // The same seed gives the same batch.
  std::mt19937_64 rng2(5);
  std::vector<std::int32_t> in2(in.size()), tg2(tg.size());
  ds.sample_batch(rng2, view(in2.data(), b, t), view(tg2.data(), b, t));
  CHECK(in == in2);
  CHECK(tg == tg2);
  CHECK_THROWS_AS(ds.sample_batch(rng, view(in.data(), index_t(8), index_t(32)), view(tg.data(), index_t(8), index_t(32))),
                  shape_error);
}

TEST_CASE("validation windows are fixed and cover the split once", "[io][dataset]") {
  std::vector<std::int32_t> tokens(1000);
  for (int i = 0; i < 1000; ++i) tokens[std::size_t(i)] = i;
  const io::text_dataset ds(tokens, 8, 0.9);
  const index_t t = 8, b = 5;
  CHECK(ds.validation_windows(t) == 12);  // (100 - 1) / 8
  std::vector<std::int32_t> in(std::size_t(b * t)), tg(std::size_t(b * t));
  index_t total = 0;
  for (index_t first = 0; first < ds.validation_windows(t); first += b) {
    const index_t filled = ds.validation_batch(first, view(in.data(), b, t), view(tg.data(), b, t));
    for (index_t r = 0; r < b; ++r)
      for (index_t i = 0; i < t; ++i) {
        if (r < filled) {
          REQUIRE(in[std::size_t(r * t + i)] == 900 + (first + r) * t + i);
          REQUIRE(tg[std::size_t(r * t + i)] == 900 + (first + r) * t + i + 1);
        } else {
          REQUIRE(tg[std::size_t(r * t + i)] == -1);
        }
      }
    total += filled;
  }
  CHECK(total == 12);
}

TEST_CASE("an empty or too-short text is refused with the file and the sizes", "[io][dataset]") {
  cleanup c;
  const auto empty = write_temp("empty.txt", "");
  const io::byte_tokenizer bytes;
  CHECK_THROWS_AS(io::text_dataset::from_file(empty, bytes, 8), invalid_input);
  CHECK_THROWS_WITH(io::text_dataset::from_file(empty, bytes, 8),
                    Catch::Contains("empty.txt") && Catch::Contains("empty"));
  // 50 tokens: 45 to train on, 5 to validate, but each part needs 9.
  const auto shortish = write_temp("short.txt", std::string(50, 'x'));
  CHECK_THROWS_WITH(io::text_dataset::from_file(shortish, bytes, 8),
                    Catch::Contains("short.txt") && Catch::Contains("50 tokens") && Catch::Contains("45") &&
                        Catch::Contains("5 for validation") && Catch::Contains("9 tokens"));
  CHECK_NOTHROW(io::text_dataset::from_file(write_temp("enough.txt", std::string(90, 'x')), bytes, 8));
  CHECK_THROWS_WITH(io::text_dataset::from_file(fs::temp_directory_path() / "ctformer_no_such_file.txt", bytes, 8),
                    Catch::Contains("ctformer_no_such_file.txt"));
  CHECK_THROWS_AS(io::text_dataset(std::vector<std::int32_t>(100), 8, 1.0), invalid_input);
}

TEST_CASE("tiny Shakespeare has the 65-character vocabulary and nanoGPT's split", "[io][dataset][data]") {
  const char* env = std::getenv("CTFORMER_DATA");
  const fs::path path = env ? fs::path(env) : fs::path(CTFORMER_DATA_DIR) / "tinyshakespeare.txt";
  // The corpus ships with the repository (data/); its absence is a broken
  // checkout, reported as a failure rather than skipped.
  INFO("tiny Shakespeare expected at " << path << " (set CTFORMER_DATA to point elsewhere)");
  REQUIRE(fs::exists(path));
  const std::string text = io::read_text_file(path);
  const auto tok = io::char_tokenizer::from_text(text);
  CHECK(tok.vocab_size() == 65);
  const auto ds = io::text_dataset(tok.encode(text), 64, 0.9, path.string());
  CHECK(ds.train_tokens().size() == 1003854);  // nanoGPT's prepare.py: train has 1,003,854 tokens
  CHECK(ds.val_tokens().size() == 111540);     // and val 111,540
}
