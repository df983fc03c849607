// GPT-2's byte-level BPE tokenizer against tiktoken's "gpt2" encoding, built
// from the same files by tools/make_bpe_reference.py, and against llama.cpp's
// GPT-2 tokenizer cases; round trips, special tokens, loaders and bad files.
//
// Token ids are integers: a tokenizer either reproduces GPT-2's segmentation
// and merges or it does not, so every comparison here is exact (no tolerance).
#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/io/bpe_tokenizer.hpp"
#include "ctformer/io/tokenizer.hpp"
#include "../../support/test_data.hpp"

using ctformer::io::bpe_tokenizer;
namespace fs = std::filesystem;

namespace {

const fs::path gpt2_dir = fs::path(CTFORMER_DATA_DIR) / "gpt2";

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_bytes(const fs::path& path, std::string_view text) {
  std::ofstream out(path, std::ios::binary);
  out.write(text.data(), std::streamsize(text.size()));
  REQUIRE(out);
}

const bpe_tokenizer& gpt2() {
  static const bpe_tokenizer t = bpe_tokenizer::from_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe");
  return t;
}

// A fresh folder per test program run, removed at exit.
const fs::path& temp_dir() {
  struct dir {
    fs::path path;
    dir() {
      std::random_device rd;
      path = fs::temp_directory_path() / ("ctformer_test_bpe_" + std::to_string(rd()));
      fs::create_directories(path);
    }
    ~dir() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  };
  static const dir d;
  return d.path;
}

std::vector<std::int32_t> ids_of(const nlohmann::json& a) { return a.get<std::vector<std::int32_t>>(); }

// Compares two id sequences and, where they differ, says where and shows the text there.
void check_same_ids(const std::vector<std::int32_t>& got, const std::vector<std::int32_t>& want, const std::string& what) {
  std::size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  if (i == got.size() && i == want.size()) {
    SUCCEED();
    return;
  }
  std::string context;
  for (std::size_t k = i; k < std::min(want.size(), i + 8); ++k) context.append(1, ' ').append(std::to_string(want[k]));
  std::string ours;
  for (std::size_t k = i; k < std::min(got.size(), i + 8); ++k) ours.append(1, ' ').append(std::to_string(got[k]));
  FAIL(what << ": first difference at token " << i << " of " << want.size() << " (ours " << got.size()
            << "): expected" << context << ", got" << ours);
}

// The cases of llama.cpp's test-tokenizer-0: inputs each followed by
// "\n__ggml_vocab_test__\n" (so a case's own newlines are all its own), and one
// line of space-separated ids per case.
std::vector<std::pair<std::string, std::vector<std::int32_t>>> llama_cpp_cases() {
  const std::string inp = read_bytes(gpt2_dir / "tokenizer-cases.inp");
  const std::string out = read_bytes(gpt2_dir / "tokenizer-cases.out");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (std::size_t pos = 0;;) {
    const std::size_t at = inp.find(sep, pos);
    if (at == std::string::npos) break;
    texts.push_back(inp.substr(pos, at - pos));
    pos = at + sep.size();
  }
  std::vector<std::pair<std::string, std::vector<std::int32_t>>> cases;
  std::size_t pos = 0;
  for (const auto& t : texts) {
    const std::size_t eol = out.find('\n', pos);
    REQUIRE(eol != std::string::npos);
    std::vector<std::int32_t> ids;
    std::size_t k = pos;
    while (k < eol) {
      while (k < eol && out[k] == ' ') ++k;
      if (k == eol) break;
      std::size_t used = 0;
      ids.push_back(std::stoi(out.substr(k, eol - k), &used));
      k += used;
    }
    cases.emplace_back(t, std::move(ids));
    pos = eol + 1;
  }
  return cases;
}

// A Hugging Face tokenizer.json holding GPT-2's vocabulary and merges, the merges
// either as "a b" strings or as ["a", "b"] pairs (both forms are in use).
nlohmann::json gpt2_tokenizer_json(bool merges_as_pairs) {
  nlohmann::json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = nlohmann::json::array({{{"id", 50256},
                                              {"content", "<|endoftext|>"},
                                              {"single_word", false},
                                              {"lstrip", false},
                                              {"rstrip", false},
                                              {"normalized", true},
                                              {"special", true}}});
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  j["post_processor"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  nlohmann::json model;
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = nullptr;
  model["continuing_subword_prefix"] = "";
  model["end_of_word_suffix"] = "";
  model["fuse_unk"] = false;
  model["vocab"] = nlohmann::json::parse(read_bytes(gpt2_dir / "encoder.json"));
  nlohmann::json merges = nlohmann::json::array();
  const std::string bpe = read_bytes(gpt2_dir / "vocab.bpe");
  std::size_t pos = bpe.find('\n') + 1;  // after "#version"
  while (pos < bpe.size()) {
    std::size_t eol = bpe.find('\n', pos);
    if (eol == std::string::npos) eol = bpe.size();
    const std::string line = bpe.substr(pos, eol - pos);
    pos = eol + 1;
    if (line.empty()) continue;
    const std::size_t space = line.find(' ');
    if (merges_as_pairs)
      merges.push_back({line.substr(0, space), line.substr(space + 1)});
    else
      merges.push_back(line);
  }
  model["merges"] = std::move(merges);
  j["model"] = std::move(model);
  return j;
}

// Random byte strings biased towards what breaks scanners: invalid and
// truncated UTF-8, lone continuation bytes, NULs, apostrophes and runs of spaces.
std::string random_bytes(std::mt19937& rng) {
  static const std::vector<std::string> fragments = {
      "'s",        "'t",       "'re",        "'ll",        "'",          " ",        "  ",       "\n",     "\t",
      "\r\n",      "\xc2\xa0", "\xe3\x80\x80", "a",         "Hello",      " world",   "123",      "!!",     ".",
      "\xc3\xa9",  "e\xcc\x81", "\xf0\x9f\x98\x80", "\xd0\x9f\xd1\x80", "\x80",     "\xbf",     "\xc0\xaf", "\xe2\x82",
      "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xf5", "\xff", "\xfe", "\xf0\x9f\x98", std::string("\0", 1), "<|endoftext|>"};
  std::uniform_int_distribution<int> length(0, 60), pick(0, int(fragments.size()) - 1), byte(0, 255), kind(0, 3);
  std::string s;
  const int n = length(rng);
  for (int i = 0; i < n; ++i) {
    if (kind(rng) == 0)
      s.push_back(char(byte(rng)));
    else
      s += fragments[std::size_t(pick(rng))];
  }
  return s;
}

template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const ctformer::error& e) {
    return e.what();
  }
  return "(no exception)";
}

}  // namespace

TEST_CASE("bpe_tokenizer: tiny Shakespeare ids equal tiktoken's", "[io][bpe]") {
  const std::string text = read_bytes(fs::path(CTFORMER_DATA_DIR) / "tinyshakespeare.txt");
  const std::string raw = read_bytes(fs::path(CTFORMER_TEST_DATA_DIR) / "gpt2_tinyshakespeare_ids.u16");
  REQUIRE(raw.size() % 2 == 0);
  std::vector<std::int32_t> want(raw.size() / 2);
  for (std::size_t i = 0; i < want.size(); ++i)
    want[i] = std::int32_t(static_cast<unsigned char>(raw[2 * i]) | (static_cast<unsigned char>(raw[2 * i + 1]) << 8));

  const bpe_tokenizer& t = gpt2();
  t.clear_cache();
  check_same_ids(t.encode(text), want, "cold cache");
  check_same_ids(t.encode(text), want, "warm cache");
  CHECK(t.decode(want) == text);
}

TEST_CASE("bpe_tokenizer: llama.cpp's GPT-2 tokenizer cases", "[io][bpe]") {
  const auto cases = llama_cpp_cases();
  REQUIRE(cases.size() == 46);
  for (const auto& [text, ids] : cases) {
    INFO("case " << nlohmann::json(text).dump());
    CHECK(gpt2().encode(text) == ids);
    CHECK(gpt2().decode(ids) == text);
  }
}

TEST_CASE("bpe_tokenizer: extra cases equal tiktoken's", "[io][bpe]") {
  const auto j = nlohmann::json::parse(read_bytes(fs::path(CTFORMER_TEST_DATA_DIR) / "gpt2_extra_cases.json"));
  REQUIRE(j["cases"].size() > 100);
  for (const auto& c : j["cases"]) {
    const std::string text = c["text"].get<std::string>();
    INFO("case " << c["text"].dump());
    CHECK(gpt2().encode(text) == ids_of(c["ids"]));
    CHECK(gpt2().encode_with_special_tokens(text) == ids_of(c["ids_with_special"]));
    CHECK(gpt2().decode(ids_of(c["ids"])) == text);
  }
}

TEST_CASE("bpe_tokenizer: decode(encode(x)) == x for any bytes", "[io][bpe]") {
  const bpe_tokenizer& t = gpt2();
  const bpe_tokenizer uncached = t;  // a copy starts with an empty cache
  std::mt19937 rng(20240611);
  for (int i = 0; i < 3000; ++i) {
    const std::string s = random_bytes(rng);
    INFO("input " << nlohmann::json(s).dump(-1, ' ', true, nlohmann::json::error_handler_t::replace));
    const auto ids = t.encode(s);
    for (std::int32_t id : ids) REQUIRE((id >= 0 && id < t.vocab_size()));
    CHECK(t.decode(ids) == s);
    if (i % 50 == 0) uncached.clear_cache();  // so most pieces are merged afresh, not read back
    CHECK(uncached.encode(s) == ids);
    CHECK(t.decode(t.encode_with_special_tokens(s)) == s);
  }
  // Each invalid byte is a piece of its own: its byte token.
  CHECK(t.encode(std::string("\x80")) == std::vector<std::int32_t>{t.encode(std::string("\x80"))[0]});
  CHECK(t.encode(std::string("\xff\xfe")).size() == 2);
  CHECK(t.encode(std::string()).empty());
}

TEST_CASE("bpe_tokenizer: special tokens", "[io][bpe]") {
  const bpe_tokenizer& t = gpt2();
  CHECK(t.vocab_size() == 50257);
  CHECK(t.token_id("<|endoftext|>") == 50256);
  REQUIRE(t.special_ids().size() == 1);
  CHECK(t.special_ids()[0] == 50256);
  CHECK(t.decode(std::vector<std::int32_t>{50256}) == "<|endoftext|>");
  CHECK(t.token_bytes(50256) == "<|endoftext|>");
  CHECK(t.token_bytes(262) == " the");

  const auto ordinary = t.encode("<|endoftext|>");
  CHECK(std::find(ordinary.begin(), ordinary.end(), 50256) == ordinary.end());

  std::vector<std::int32_t> want = t.encode("Hello ");
  want.push_back(50256);
  for (std::int32_t id : t.encode(" world")) want.push_back(id);
  want.push_back(50256);
  CHECK(t.encode_with_special_tokens("Hello <|endoftext|> world<|endoftext|>") == want);

  const std::string msg = message_of([&] { (void)t.token_id("<|im_start|>"); });
  CHECK_THAT(msg, Catch::Contains("<|im_start|>") && Catch::Contains("not a special token") &&
                      Catch::Contains("<|endoftext|>"));
  CHECK_THROWS_AS(t.token_bytes(50257), ctformer::invalid_input);
}

TEST_CASE("bpe_tokenizer: decode names a bad id and its position", "[io][bpe]") {
  const std::vector<std::int32_t> past_end = {15496, 995, 50257};
  CHECK_THROWS_AS(gpt2().decode(past_end), ctformer::invalid_input);
  CHECK_THAT(message_of([&] { (void)gpt2().decode(past_end); }),
             Catch::Contains("token 50257 at position 2") && Catch::Contains("[0, 50257)"));
  const std::vector<std::int32_t> negative = {-1};
  CHECK_THAT(message_of([&] { (void)gpt2().decode(negative); }), Catch::Contains("token -1 at position 0"));
}

TEST_CASE("bpe_tokenizer: from_tokenizer_json equals from_files", "[io][bpe]") {
  const std::string text = read_bytes(fs::path(CTFORMER_DATA_DIR) / "tinyshakespeare.txt").substr(0, 200000) +
                           " caf\xc3\xa9 \xf0\x9f\x98\x80 <|endoftext|> 12345";
  for (const bool pairs : {false, true}) {
    INFO((pairs ? "merges as pairs" : "merges as strings"));
    const fs::path path = temp_dir() / (pairs ? "tokenizer_pairs.json" : "tokenizer_strings.json");
    write_bytes(path, gpt2_tokenizer_json(pairs).dump(2));
    const bpe_tokenizer hf = bpe_tokenizer::from_tokenizer_json(path);
    CHECK(hf == gpt2());
    CHECK(hf.vocab_size() == 50257);
    CHECK(hf.token_id("<|endoftext|>") == 50256);
    CHECK(hf.encode(text) == gpt2().encode(text));
    CHECK(hf.encode_with_special_tokens(text) == gpt2().encode_with_special_tokens(text));
  }
}

TEST_CASE("bpe_tokenizer: serialize / deserialize round trip", "[io][bpe]") {
  const std::string saved = gpt2().serialize();
  CHECK(nlohmann::json::parse(saved)["type"] == "gpt2_bpe");
  const bpe_tokenizer back = bpe_tokenizer::deserialize(saved);
  CHECK(back == gpt2());
  const std::string text = "First Citizen:\nBefore we proceed any further, hear me speak.<|endoftext|>\xff";
  CHECK(back.encode(text) == gpt2().encode(text));
  CHECK(back.encode_with_special_tokens(text) == gpt2().encode_with_special_tokens(text));
  CHECK(back.serialize() == saved);

  const std::string byte_vocab = ctformer::io::byte_tokenizer{}.serialize();
  CHECK_THROWS_AS(bpe_tokenizer::deserialize(byte_vocab), ctformer::invalid_input);
  CHECK_THAT(message_of([&] { (void)bpe_tokenizer::deserialize(byte_vocab); }),
             Catch::Contains("not a gpt2_bpe tokenizer"));
  CHECK_THROWS_AS(bpe_tokenizer::deserialize("not json"), ctformer::invalid_input);
  CHECK_THROWS_AS(bpe_tokenizer::deserialize(R"({"type":"gpt2_bpe","vocab":[],"merges":[],"special":[]})"),
                  ctformer::invalid_input);
}

TEST_CASE("bpe_tokenizer: concurrent encodes agree", "[io][bpe]") {
  const std::string text = read_bytes(fs::path(CTFORMER_DATA_DIR) / "tinyshakespeare.txt").substr(0, 300000);
  const bpe_tokenizer t = gpt2();
  const auto want = t.encode(text);
  t.clear_cache();
  std::vector<std::vector<std::int32_t>> got(4);
  std::vector<std::thread> threads;
  for (auto& g : got) threads.emplace_back([&t, &text, &g] { g = t.encode(text); });
  for (auto& th : threads) th.join();
  for (const auto& g : got) CHECK(g == want);
}

TEST_CASE("bpe_tokenizer: bad files name the file and the line", "[io][bpe]") {
  const fs::path dir = temp_dir();
  const fs::path encoder = gpt2_dir / "encoder.json";
  // The first merges of GPT-2 followed by one bad line (line 5 of the file).
  auto merges_with = [&](const std::string& name, const std::string& bad_line) {
    const fs::path p = dir / name;
    write_bytes(p, "#version: 0.2\n\xc4\xa0 t\n\xc4\xa0 a\nh e\n" + bad_line + "\ni n\n");
    return p;
  };
  auto from_files_message = [&](const fs::path& enc, const fs::path& bpe) {
    return message_of([&] { (void)bpe_tokenizer::from_files(enc, bpe); });
  };

  SECTION("missing files are io_error naming the file") {
    CHECK_THROWS_AS(bpe_tokenizer::from_files(dir / "nope.json", gpt2_dir / "vocab.bpe"), ctformer::io_error);
    CHECK_THAT(from_files_message(dir / "nope.json", gpt2_dir / "vocab.bpe"), Catch::Contains("nope.json"));
    CHECK_THROWS_AS(bpe_tokenizer::from_files(encoder, dir / "nope.bpe"), ctformer::io_error);
    CHECK_THAT(from_files_message(encoder, dir / "nope.bpe"), Catch::Contains("nope.bpe"));
    CHECK_THROWS_AS(bpe_tokenizer::from_files(encoder, dir), ctformer::io_error);  // a folder
    CHECK_THROWS_AS(bpe_tokenizer::from_tokenizer_json(dir / "nope_tokenizer.json"), ctformer::io_error);
  }
  SECTION("malformed JSON") {
    const fs::path p = dir / "malformed_encoder.json";
    write_bytes(p, "{\n\"a\": 0,\n\"b\": ,\n\"c\": 2\n}\n");
    CHECK_THROWS_AS(bpe_tokenizer::from_files(p, gpt2_dir / "vocab.bpe"), ctformer::invalid_input);
    CHECK_THAT(from_files_message(p, gpt2_dir / "vocab.bpe"),
               Catch::Contains("malformed_encoder.json:3") && Catch::Contains("malformed JSON"));
    const fs::path q = dir / "malformed_tokenizer.json";
    write_bytes(q, "{\n  \"model\": {\n    \"type\": \"BPE\",\n    \"vocab\": {\"a\": 0\n  }\n");
    CHECK_THROWS_AS(bpe_tokenizer::from_tokenizer_json(q), ctformer::invalid_input);
    CHECK_THAT(message_of([&] { (void)bpe_tokenizer::from_tokenizer_json(q); }),
               Catch::Contains("malformed_tokenizer.json:6"));
  }
  SECTION("a merge line that is not two space-separated symbols") {
    for (const std::string line : {"\xc4\xa0t", "a b c", "", "a  b", " a"}) {
      INFO("line " << nlohmann::json(line).dump());
      const fs::path p = merges_with("not_two.bpe", line);
      CHECK_THROWS_AS(bpe_tokenizer::from_files(encoder, p), ctformer::invalid_input);
      CHECK_THAT(from_files_message(encoder, p), Catch::Contains("not_two.bpe:5") && Catch::Contains("two symbols"));
    }
  }
  SECTION("a merge naming a symbol not in the vocabulary") {
    const fs::path p = merges_with("unknown_symbol.bpe", "\xc4\xa0 qqqzzz");
    CHECK_THROWS_AS(bpe_tokenizer::from_files(encoder, p), ctformer::invalid_input);
    CHECK_THAT(from_files_message(encoder, p), Catch::Contains("unknown_symbol.bpe:5") && Catch::Contains("qqqzzz") &&
                                                   Catch::Contains("not in the vocabulary"));
    const fs::path q = merges_with("outside_alphabet.bpe", "\xe2\x82\xac t");  // U+20AC is not a byte symbol
    CHECK_THAT(from_files_message(encoder, q), Catch::Contains("outside_alphabet.bpe:5"));
  }
  SECTION("a merged symbol missing from the vocabulary") {
    const fs::path p = merges_with("missing_merged.bpe", "\xc4\xa0 \xc4\xa0");  // "ĠĠ" is not a GPT-2 token
    CHECK_THROWS_AS(bpe_tokenizer::from_files(encoder, p), ctformer::invalid_input);
    CHECK_THAT(from_files_message(encoder, p), Catch::Contains("missing_merged.bpe:5") &&
                                                   Catch::Contains("makes") && Catch::Contains("not in the vocabulary"));
  }
  SECTION("encoder.json that is not token -> id") {
    const fs::path p = dir / "bad_ids.json";
    write_bytes(p, R"({"a": 0, "b": "one"})");
    CHECK_THAT(from_files_message(p, gpt2_dir / "vocab.bpe"), Catch::Contains("bad_ids.json") && Catch::Contains("\"b\""));
    write_bytes(p, R"({"a": 0, "b": 5})");
    CHECK_THAT(from_files_message(p, gpt2_dir / "vocab.bpe"), Catch::Contains("bad_ids.json") && Catch::Contains("ids 0..1"));
    write_bytes(p, "[1, 2]");
    CHECK_THAT(from_files_message(p, gpt2_dir / "vocab.bpe"), Catch::Contains("bad_ids.json:1"));
  }
  SECTION("tokenizer.json: a bad merge, by line; not BPE; not GPT-2's pre-tokenizer") {
    nlohmann::json j = gpt2_tokenizer_json(false);
    j["model"]["merges"][6] = "\xc4\xa0 qqqzzz";
    const std::string text = j.dump(2);
    const std::size_t line =
        1 + std::size_t(std::count(text.begin(), text.begin() + std::ptrdiff_t(text.find("qqqzzz")), '\n'));
    const fs::path p = dir / "bad_merge_tokenizer.json";
    write_bytes(p, text);
    CHECK_THROWS_AS(bpe_tokenizer::from_tokenizer_json(p), ctformer::invalid_input);
    CHECK_THAT(message_of([&] { (void)bpe_tokenizer::from_tokenizer_json(p); }),
               Catch::Contains("bad_merge_tokenizer.json:" + std::to_string(line)) && Catch::Contains("merges[6]") &&
                   Catch::Contains("qqqzzz"));

    j = gpt2_tokenizer_json(true);
    j["model"]["merges"][3] = nlohmann::json::array({"a", "b", "c"});
    const std::string pairs_text = j.dump(2);
    write_bytes(p, pairs_text);
    CHECK_THAT(message_of([&] { (void)bpe_tokenizer::from_tokenizer_json(p); }),
               Catch::Contains("bad_merge_tokenizer.json:") && Catch::Contains("merges[3]"));

    j = gpt2_tokenizer_json(false);
    j["model"]["type"] = "WordPiece";
    write_bytes(p, j.dump());
    CHECK_THAT(message_of([&] { (void)bpe_tokenizer::from_tokenizer_json(p); }), Catch::Contains("WordPiece"));

    j = gpt2_tokenizer_json(false);
    j["pre_tokenizer"] = {{"type", "Metaspace"}};
    write_bytes(p, j.dump());
    CHECK_THAT(message_of([&] { (void)bpe_tokenizer::from_tokenizer_json(p); }), Catch::Contains("pre_tokenizer"));
  }
}
