// GPT-2's byte-level BPE tokenizer: the pre-tokenizer regex as a hand-written
// UTF-8 scanner, merges by rank on token ids, and a bounded cache of pieces.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/core/error.hpp"
#include "ctformer/io/detail/unicode_tables.hpp"
#include "ctformer/io/tokenizer.hpp"

namespace ctformer::io {

namespace detail::bpe {

using unicode::char_class;

// --- code points -------------------------------------------------------------

inline char_class class_of(std::uint32_t cp) {
  const auto* first = std::begin(unicode::ranges);
  const auto* last = std::end(unicode::ranges);
  const auto* it = std::upper_bound(first, last, cp, [](std::uint32_t c, const unicode::class_range& r) {
    return c < r.first;
  });
  if (it == first) return char_class::other;
  --it;
  return cp <= it->last ? it->cls : char_class::other;
}

struct code_point {
  int length;  // bytes
  char_class cls;
};

// The code point at p (p < end, p[0] >= 0x80). Invalid UTF-8 (a stray continuation byte, a
// truncated or overlong sequence, a surrogate, a value above U+10FFFF) is one
// byte of class "other", so every byte string splits into pieces and
// decode(encode(x)) == x holds for any input.
inline code_point next_multibyte_code_point(const unsigned char* p, const unsigned char* end) {
  const unsigned c = p[0];
  int n;
  std::uint32_t cp;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2, cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3, cp = c & 0x0F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4, cp = c & 0x07;
  } else {
    return {1, char_class::other};
  }
  if (end - p < n) return {1, char_class::other};
  for (int i = 1; i < n; ++i) {
    if ((p[i] & 0xC0) != 0x80) return {1, char_class::other};
    cp = (cp << 6) | (p[i] & 0x3F);
  }
  if (n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) return {1, char_class::other};
  if (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) return {1, char_class::other};
  return {n, class_of(cp)};
}

inline code_point next_code_point(const unsigned char* p, const unsigned char* end) {
  if (p[0] < 0x80) return {1, unicode::ascii_class[p[0]]};
  return next_multibyte_code_point(p, end);
}

// End of the piece starting at p (p < end): what GPT-2's pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// matches there, alternatives tried in order as a backtracking engine does.
inline const unsigned char* piece_end(const unsigned char* p, const unsigned char* end) {
  if (p[0] == '\'' && end - p >= 2) {
    const unsigned char c = p[1];
    if (c == 's' || c == 't' || c == 'm' || c == 'd') return p + 2;
    if (end - p >= 3 && ((c == 'r' && p[2] == 'e') || (c == 'v' && p[2] == 'e') || (c == 'l' && p[2] == 'l')))
      return p + 3;
  }
  const unsigned char* q = p;
  code_point first = next_code_point(p, end);
  // " ?" takes one U+0020 only when a letter, number or other run follows it.
  if (p[0] == ' ' && end - p >= 2) {
    const code_point next = next_code_point(p + 1, end);
    if (next.cls != char_class::space) q = p + 1, first = next;
  }
  q += first.length;
  if (first.cls != char_class::space) {
    const char_class cls = first.cls;
    while (q < end) {
      if (*q < 0x80) {
        if (unicode::ascii_class[*q] != cls) break;
        ++q;
      } else {
        const code_point c = next_multibyte_code_point(q, end);
        if (c.cls != cls) break;
        q += c.length;
      }
    }
    return q;
  }
  const unsigned char* last = p;  // start of the run's last code point
  while (q < end) {
    const code_point c = next_code_point(q, end);
    if (c.cls != char_class::space) break;
    last = q;
    q += c.length;
  }
  // \s+(?!\S) backs off one code point so that the last space can lead the
  // next word (" Hello"); a run of one before a non-space is matched by \s+.
  if (q == end || last == p) return q;
  return last;
}

// --- GPT-2's byte alphabet -----------------------------------------------------

// bytes_to_unicode: each printable Latin-1 byte stands for itself; the other
// 68 bytes stand for U+0100.. in byte order. vocab files spell tokens so.
struct byte_alphabet {
  std::array<std::uint16_t, 256> code_point_of{};
  std::array<std::int16_t, 324> byte_of{};  // -1: not in the alphabet
};

inline constexpr byte_alphabet make_byte_alphabet() {
  byte_alphabet a;
  for (auto& b : a.byte_of) b = -1;
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    const int cp = printable ? b : 256 + extra++;
    a.code_point_of[std::size_t(b)] = std::uint16_t(cp);
    a.byte_of[std::size_t(cp)] = std::int16_t(b);
  }
  return a;
}

inline constexpr byte_alphabet alphabet = make_byte_alphabet();

// Appends the bytes a symbol in the byte alphabet stands for; false if it has
// a character outside the alphabet (or is not UTF-8).
inline bool symbol_to_bytes(std::string_view symbol, std::string& out) {
  const auto* p = reinterpret_cast<const unsigned char*>(symbol.data());
  const auto* end = p + symbol.size();
  while (p < end) {
    std::uint32_t cp;
    if (p[0] < 0x80) {
      cp = p[0], p += 1;
    } else if ((p[0] & 0xE0) == 0xC0 && end - p >= 2 && (p[1] & 0xC0) == 0x80) {
      cp = (std::uint32_t(p[0] & 0x1F) << 6) | (p[1] & 0x3F), p += 2;
    } else {
      return false;  // every character of the alphabet is one or two bytes
    }
    if (cp >= alphabet.byte_of.size() || alphabet.byte_of[cp] < 0) return false;
    out.push_back(char(alphabet.byte_of[cp]));
  }
  return true;
}

inline void bytes_to_symbol(std::string_view bytes, std::string& out) {
  for (char ch : bytes) {
    const std::uint16_t cp = alphabet.code_point_of[static_cast<unsigned char>(ch)];
    if (cp < 0x80) {
      out.push_back(char(cp));
    } else {
      out.push_back(char(0xC0 | (cp >> 6)));
      out.push_back(char(0x80 | (cp & 0x3F)));
    }
  }
}

// --- tables used while encoding -------------------------------------------------

// (left id, right id) -> (rank, merged id), open addressing: one probe for most
// lookups, and no strings touched while encoding.
class pair_map {
 public:
  struct value {
    std::int32_t rank, merged;
  };

  void reserve(std::size_t n) {
    std::size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    slots_.assign(cap, slot{empty, {0, 0}});
    shift_ = 64;
    for (std::size_t c = cap; c > 1; c >>= 1) --shift_;
  }

  // False if the pair is already there (the lower rank, inserted first, wins).
  bool insert(std::int32_t left, std::int32_t right, value v) {
    const std::uint64_t k = key(left, right);
    for (std::size_t i = index(k);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].key == k) return false;
      if (slots_[i].key == empty) {
        slots_[i] = slot{k, v};
        return true;
      }
    }
  }

  const value* find(std::int32_t left, std::int32_t right) const {
    const std::uint64_t k = key(left, right);
    for (std::size_t i = index(k);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].key == k) return &slots_[i].v;
      if (slots_[i].key == empty) return nullptr;
    }
  }

 private:
  static constexpr std::uint64_t empty = ~std::uint64_t{0};
  struct slot {
    std::uint64_t key;
    value v;
  };
  static std::uint64_t key(std::int32_t l, std::int32_t r) {
    return (std::uint64_t(std::uint32_t(l)) << 32) | std::uint32_t(r);
  }
  std::size_t index(std::uint64_t k) const { return std::size_t((k * 0x9E3779B97F4A7C15ull) >> shift_); }

  std::vector<slot> slots_;
  int shift_ = 64;
};

// Pieces (words with their leading space) repeat, so their ids are kept in a
// fixed-size 4-way set-associative table with LRU order in each set: bounded
// memory, one cache line per entry, and no allocation while encoding.
class piece_cache {
 public:
  static constexpr std::size_t ways = 4;
  static constexpr std::size_t set_count = std::size_t{1} << 13;
  static constexpr std::size_t max_bytes = 24;  // longer pieces are not cached
  static constexpr std::size_t max_ids = 9;     // nor pieces of more tokens

  struct alignas(64) entry {
    std::uint64_t key[3];  // the piece, zero-padded
    std::uint8_t length;   // bytes; 0 = empty slot
    std::uint8_t count;
    std::int32_t ids[max_ids];
  };
  static_assert(sizeof(entry) == 64);

  struct key {
    std::uint64_t w[3];
    std::size_t length;
    std::size_t set;  // first entry of its set
  };

  // piece = [p, p + n), 1 < n <= max_bytes, inside a text ending at end.
  static key make_key(const unsigned char* p, std::size_t n, const unsigned char* end) {
    key k{{0, 0, 0}, n, 0};
    if (std::endian::native == std::endian::little && std::size_t(end - p) >= max_bytes) {
      // One fixed-size load, then the bytes past the piece masked off.
      std::memcpy(k.w, p, max_bytes);
      for (std::size_t i = 0; i < 3; ++i) {
        const std::size_t have = n > 8 * i ? n - 8 * i : 0;
        if (have < 8) k.w[i] &= have ? ~std::uint64_t{0} >> (64 - 8 * have) : 0;
      }
    } else {
      std::memcpy(k.w, p, n);
    }
    std::uint64_t h = (k.w[0] ^ 0x243F6A8885A308D3ull) * 0x9E3779B97F4A7C15ull;
    h ^= (k.w[1] + n) * 0xC2B2AE3D27D4EB4Full;
    h = (h << 31) | (h >> 33);
    h ^= k.w[2] * 0x165667B19E3779F9ull;
    h ^= h >> 32;
    h *= 0xD6E8FEB86659FD93ull;
    h ^= h >> 32;
    k.set = std::size_t(h & (set_count - 1)) * ways;
    return k;
  }

  // The entry holding k, moved to the front of its set; nullptr if absent.
  static const entry* find(entry* table, const key& k) {
    entry* set = table + k.set;
    for (std::size_t i = 0; i < ways; ++i) {
      const entry& e = set[i];
      if (e.length == k.length && e.key[0] == k.w[0] && e.key[1] == k.w[1] && e.key[2] == k.w[2]) {
        if (i == 0) return set;
        const entry hit = e;
        for (std::size_t j = i; j > 0; --j) set[j] = set[j - 1];
        set[0] = hit;
        return set;
      }
    }
    return nullptr;
  }

  // Stores ids for k at the front of its set, dropping the least recently used.
  static void insert(entry* table, const key& k, const std::int32_t* ids, std::size_t count) {
    entry* set = table + k.set;
    for (std::size_t j = ways - 1; j > 0; --j) set[j] = set[j - 1];
    entry& e = set[0];
    e.key[0] = k.w[0], e.key[1] = k.w[1], e.key[2] = k.w[2];
    e.length = std::uint8_t(k.length);
    e.count = std::uint8_t(count);
    std::copy(ids, ids + count, e.ids);
  }

  piece_cache() = default;
  // A copy starts empty: the cache is not part of a tokenizer's value, and the
  // assigned-to tokenizer may have another vocabulary.
  piece_cache(const piece_cache&) {}
  piece_cache& operator=(const piece_cache&) {
    clear();
    return *this;
  }

  void clear() {
    std::lock_guard lock(mutex_);
    entries_.reset();
  }

  // Encoding calls this once per call: whoever holds the cache uses it, a
  // concurrent caller encodes without it rather than wait, so encode() stays
  // const and thread-safe without a lock per piece.
  std::unique_lock<std::mutex> try_acquire() { return std::unique_lock<std::mutex>(mutex_, std::try_to_lock); }
  entry* entries() {  // only while acquired
    if (!entries_) entries_.reset(new entry[set_count * ways]());
    return entries_.get();
  }

 private:
  std::mutex mutex_;
  std::unique_ptr<entry[]> entries_;
};

// --- files and messages -----------------------------------------------------------

inline std::string read_file(const std::filesystem::path& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw io_error("ctformer::io::bpe_tokenizer: cannot read " + path.string() + ": it is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    throw io_error("ctformer::io::bpe_tokenizer: cannot open " + path.string() +
                   (err ? std::string(": ") + std::strerror(err) : std::string()));
  }
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw io_error("ctformer::io::bpe_tokenizer: cannot read " + path.string());
  return text;
}

inline std::size_t line_of(std::string_view text, std::size_t offset) {
  offset = std::min(offset, text.size());
  return 1 + std::size_t(std::count(text.begin(), text.begin() + std::ptrdiff_t(offset), '\n'));
}

[[noreturn]] inline void fail(const std::string& where, const std::string& what) {
  throw invalid_input("ctformer::io::bpe_tokenizer: " + where + ": " + what);
}

inline std::string quoted(std::string_view s) {
  return nlohmann::json(std::string(s)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

inline nlohmann::json parse_json(const std::string& text, const std::string& name) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    fail(name + ":" + std::to_string(line_of(text, e.byte ? e.byte - 1 : 0)), std::string("malformed JSON: ") + e.what());
  }
}

// Offset of the start of element `index` of the array under the first key
// "merges" whose value is an array, or npos. Used only to put a line number
// into an error message, so it is a small scanner, not a JSON parser.
inline std::size_t merges_element_offset(std::string_view text, std::size_t index) {
  constexpr std::string_view merges_key = "\"merges\"";
  auto skip_ws = [&](std::size_t i) {
    while (i < text.size() && (text[i] == ' ' || text[i] == '\n' || text[i] == '\r' || text[i] == '\t')) ++i;
    return i;
  };
  auto skip_string = [&](std::size_t i) {  // text[i] == '"'
    for (++i; i < text.size(); ++i) {
      if (text[i] == '\\') ++i;
      else if (text[i] == '"') return i + 1;
    }
    return std::string_view::npos;
  };
  for (std::size_t at = text.find(merges_key); at != std::string_view::npos; at = text.find(merges_key, at + 1)) {
    std::size_t i = skip_ws(at + merges_key.size());
    if (i >= text.size() || text[i] != ':') continue;
    i = skip_ws(i + 1);
    if (i >= text.size() || text[i] != '[') continue;
    i = skip_ws(i + 1);
    for (std::size_t k = 0; i < text.size(); ++k) {
      if (k == index) return i;
      // skip one value: a string, or an array of strings
      if (text[i] == '"') {
        i = skip_string(i);
      } else if (text[i] == '[') {
        for (++i; i != std::string_view::npos && i < text.size() && text[i] != ']';)
          i = text[i] == '"' ? skip_string(i) : i + 1;
        if (i != std::string_view::npos) ++i;
      } else {
        return std::string_view::npos;
      }
      if (i == std::string_view::npos) return i;
      i = skip_ws(i);
      if (i >= text.size() || text[i] != ',') return std::string_view::npos;
      i = skip_ws(i + 1);
    }
    return std::string_view::npos;
  }
  return std::string_view::npos;
}

}  // namespace detail::bpe

/// GPT-2's byte-level BPE tokenizer, ids identical to OpenAI's (tiktoken's
/// "gpt2" encoding). encode() is ordinary text: a special token's string is
/// tokenized like any other; encode_with_special_tokens() recognises them.
/// Any byte string encodes, and decode(encode(x)) == x.
///
/// encode() may be called from several threads at once; a call that finds the
/// piece cache in use by another thread encodes without it.
class bpe_tokenizer {
 public:
  /// GPT-2's encoder.json (token in the byte alphabet -> id) and vocab.bpe
  /// (merges in rank order, after a "#version" line). The special tokens are
  /// the vocabulary's multi-byte tokens no merge produces (<|endoftext|>).
  /// Throws io_error for a file that cannot be read and invalid_input, naming
  /// the file and line, for one that is malformed.
  static bpe_tokenizer from_files(const std::filesystem::path& encoder_json, const std::filesystem::path& vocab_bpe) {
    namespace b = detail::bpe;
    const std::string enc_name = encoder_json.string(), bpe_name = vocab_bpe.string();
    const std::string enc_text = b::read_file(encoder_json);
    const nlohmann::json vocab = b::parse_json(enc_text, enc_name);
    if (!vocab.is_object()) b::fail(enc_name + ":1", "expected an object of token -> id");
    std::vector<std::string> tokens = tokens_from_vocab(vocab, enc_name, "");

    const std::string bpe_text = b::read_file(vocab_bpe);
    std::vector<merge_text> merges;
    std::vector<std::size_t> lines;
    std::size_t line = 0;
    for (std::size_t pos = 0; pos < bpe_text.size();) {
      std::size_t eol = bpe_text.find('\n', pos);
      if (eol == std::string::npos) eol = bpe_text.size();
      std::string_view l(bpe_text.data() + pos, eol - pos);
      pos = eol + 1;
      ++line;
      if (!l.empty() && l.back() == '\r') l.remove_suffix(1);
      if (line == 1 && l.starts_with("#version")) continue;
      const std::size_t space = l.find(' ');
      if (space == 0 || space == std::string_view::npos || space + 1 == l.size() ||
          l.find(' ', space + 1) != std::string_view::npos)
        b::fail(bpe_name + ":" + std::to_string(line), "expected a merge, two symbols separated by one space, not " +
                                                            b::quoted(l));
      merges.push_back({std::string(l.substr(0, space)), std::string(l.substr(space + 1))});
      lines.push_back(line);
    }
    return build(std::move(tokens), merges, [&](std::size_t i) { return bpe_name + ":" + std::to_string(lines[i]); },
                 std::nullopt, enc_name);
  }

  /// A Hugging Face tokenizer.json with a byte-level BPE model (GPT-2's):
  /// model.vocab, model.merges ("a b" strings or ["a", "b"] pairs) and
  /// added_tokens, which become the special tokens. Throws as from_files.
  static bpe_tokenizer from_tokenizer_json(const std::filesystem::path& path) {
    namespace b = detail::bpe;
    const std::string name = path.string();
    const std::string text = b::read_file(path);
    const nlohmann::json j = b::parse_json(text, name);
    if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
      b::fail(name, "no \"model\" object: not a tokenizer.json");
    const nlohmann::json& model = j["model"];
    const std::string type = model.value("type", std::string());
    if (type != "BPE") b::fail(name, "model.type is " + b::quoted(type) + ", not \"BPE\"");
    if (j.contains("normalizer") && !j["normalizer"].is_null())
      b::fail(name, "a normalizer is not supported (GPT-2's tokenizer.json has none)");
    if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null()) {
      const nlohmann::json& pre = j["pre_tokenizer"];
      if (!pre.is_object() || pre.value("type", std::string()) != "ByteLevel" || pre.value("add_prefix_space", false) ||
          !pre.value("use_regex", true))
        b::fail(name, "pre_tokenizer " + pre.dump() + " is not GPT-2's (ByteLevel, no prefix space)");
    }
    if (!model.contains("vocab") || !model["vocab"].is_object()) b::fail(name, "model.vocab is not an object");
    if (!model.contains("merges") || !model["merges"].is_array()) b::fail(name, "model.merges is not an array");

    auto where = [&](std::size_t i) {
      const std::size_t offset = b::merges_element_offset(text, i);
      std::string w = name;
      if (offset != std::string_view::npos) w += ":" + std::to_string(b::line_of(text, offset));
      return w + " (model.merges[" + std::to_string(i) + "])";
    };
    std::vector<std::string> tokens = tokens_from_vocab(model["vocab"], name, "model.vocab ");
    std::vector<merge_text> merges;
    merges.reserve(model["merges"].size());
    for (const auto& m : model["merges"]) {
      if (m.is_string()) {
        const std::string& s = m.get_ref<const std::string&>();
        const std::size_t space = s.find(' ');
        if (space == 0 || space == std::string::npos || space + 1 == s.size() ||
            s.find(' ', space + 1) != std::string::npos)
          b::fail(where(merges.size()), "expected a merge, two symbols separated by one space, not " + b::quoted(s));
        merges.push_back({s.substr(0, space), s.substr(space + 1)});
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string() &&
                 !m[0].get_ref<const std::string&>().empty() && !m[1].get_ref<const std::string&>().empty()) {
        merges.push_back({m[0].get<std::string>(), m[1].get<std::string>()});
      } else {
        b::fail(where(merges.size()), "expected a merge, \"a b\" or [\"a\", \"b\"], not " + m.dump());
      }
    }

    std::vector<std::int32_t> specials;
    if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
      if (!j["added_tokens"].is_array()) b::fail(name, "added_tokens is not an array");
      std::vector<std::pair<std::int64_t, std::string>> added;
      for (const auto& t : j["added_tokens"]) {
        if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() || !t.contains("content") ||
            !t["content"].is_string() || t["content"].get_ref<const std::string&>().empty())
          b::fail(name, "an added token is not {\"id\": integer, \"content\": string}: " + t.dump());
        added.emplace_back(t["id"].get<std::int64_t>(), t["content"].get<std::string>());
      }
      std::stable_sort(added.begin(), added.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
      for (const auto& [id, content] : added) {
        if (id < 0 || id > std::int64_t(tokens.size()))
          b::fail(name, "added token " + b::quoted(content) + " has id " + std::to_string(id) +
                            "; ids must follow the vocabulary's " + std::to_string(tokens.size()) + " without gaps");
        if (id == std::int64_t(tokens.size())) {
          tokens.push_back(content);
        } else if (tokens[std::size_t(id)] != content) {
          b::fail(name, "added token " + b::quoted(content) + " has id " + std::to_string(id) + ", which is " +
                            b::quoted(tokens[std::size_t(id)]) + " in model.vocab");
        }
        if (std::find(specials.begin(), specials.end(), std::int32_t(id)) == specials.end())
          specials.push_back(std::int32_t(id));
      }
    }
    return build(std::move(tokens), merges, where, std::move(specials), name);
  }

  /// Ordinary text: special-token strings are encoded as text, as tiktoken's encode_ordinary.
  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<std::int32_t> out;
    out.reserve(text.size() / 4 + 16);
    auto lock = cache_.try_acquire();
    encode_ordinary_into(text, out, lock.owns_lock() ? cache_.entries() : nullptr);
    return out;
  }

  /// As encode(), but each occurrence of a special token's string becomes its id
  /// (the earliest match first, the longest where two start together).
  std::vector<std::int32_t> encode_with_special_tokens(std::string_view text) const {
    std::vector<std::int32_t> out;
    out.reserve(text.size() / 4 + 16);
    auto lock = cache_.try_acquire();
    auto* cache = lock.owns_lock() ? cache_.entries() : nullptr;
    // next_[k]: where special k next occurs at or after pos (npos: never)
    std::vector<std::size_t> next(specials_.size());
    for (std::size_t k = 0; k < specials_.size(); ++k) next[k] = text.find(token_bytes_unchecked(specials_[k]));
    std::size_t pos = 0;
    while (pos < text.size()) {
      std::size_t best = std::string_view::npos, best_len = 0;
      std::int32_t best_id = -1;
      for (std::size_t k = 0; k < specials_.size(); ++k) {
        const std::string_view s = token_bytes_unchecked(specials_[k]);
        if (next[k] != std::string_view::npos && next[k] < pos) next[k] = text.find(s, pos);
        if (next[k] == std::string_view::npos) continue;
        if (next[k] < best || (next[k] == best && s.size() > best_len)) best = next[k], best_len = s.size(), best_id = specials_[k];
      }
      if (best == std::string_view::npos) break;
      encode_ordinary_into(text.substr(pos, best - pos), out, cache);
      out.push_back(best_id);
      pos = best + best_len;
    }
    if (pos < text.size()) encode_ordinary_into(text.substr(pos), out, cache);
    return out;
  }

  /// Throws invalid_input naming an id outside the vocabulary and its position.
  std::string decode(std::span<const std::int32_t> tokens) const {
    std::size_t n = 0;
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] < 0 || tokens[i] >= vocab_size()) detail::bad_token("bpe_tokenizer", tokens[i], i, vocab_size());
      n += token_bytes_unchecked(tokens[i]).size();
    }
    std::string out;
    out.reserve(n);
    for (std::int32_t t : tokens) out += token_bytes_unchecked(t);
    return out;
  }

  int vocab_size() const { return int(offsets_.size()) - 1; }

  /// The bytes token id stands for (possibly part of a UTF-8 character): what a
  /// streaming decoder appends. Throws invalid_input for an id outside the vocabulary.
  std::string_view token_bytes(std::int32_t id) const {
    if (id < 0 || id >= vocab_size())
      throw invalid_input("ctformer::io::bpe_tokenizer::token_bytes: token " + std::to_string(id) +
                          " is outside the vocabulary [0, " + std::to_string(vocab_size()) + ")");
    return token_bytes_unchecked(id);
  }

  /// The id of a special token ("<|endoftext|>" -> 50256 for GPT-2); throws
  /// invalid_input, listing the special tokens, for any other string.
  std::int32_t token_id(std::string_view special) const {
    for (std::int32_t id : specials_)
      if (token_bytes_unchecked(id) == special) return id;
    std::string known;
    for (std::int32_t id : specials_) known += (known.empty() ? "" : ", ") + detail::bpe::quoted(token_bytes_unchecked(id));
    throw invalid_input("ctformer::io::bpe_tokenizer::token_id: " + detail::bpe::quoted(special) +
                        " is not a special token (the special tokens: " + (known.empty() ? "none" : known) + ")");
  }

  /// The special tokens' ids, in the order they were loaded.
  std::span<const std::int32_t> special_ids() const { return specials_; }

  /// Drops the cached pieces (for measuring a cold start); encoding is unchanged.
  void clear_cache() const { cache_.clear(); }

  /// {"type":"gpt2_bpe","vocab":[token 0, token 1, ...],"merges":["a b", ...],
  /// "special":[ids]}: what a checkpoint's "vocabulary" metadata holds. Tokens
  /// and merges are spelt in GPT-2's byte alphabet, so any bytes survive JSON.
  std::string serialize() const {
    nlohmann::json j;
    j["type"] = "gpt2_bpe";
    nlohmann::json vocab = nlohmann::json::array();
    std::string s;
    for (std::int32_t id = 0; id < vocab_size(); ++id) {
      s.clear();
      detail::bpe::bytes_to_symbol(token_bytes_unchecked(id), s);
      vocab.push_back(s);
    }
    nlohmann::json merges = nlohmann::json::array();
    for (const auto& [l, r] : merges_) {
      s.clear();
      detail::bpe::bytes_to_symbol(token_bytes_unchecked(l), s);
      s.push_back(' ');
      detail::bpe::bytes_to_symbol(token_bytes_unchecked(r), s);
      merges.push_back(s);
    }
    j["vocab"] = std::move(vocab);
    j["merges"] = std::move(merges);
    j["special"] = specials_;
    return j.dump();
  }

  /// Throws invalid_input unless text is a serialised GPT-2 BPE tokenizer.
  static bpe_tokenizer deserialize(std::string_view text) {
    const std::string name = "ctformer::io::bpe_tokenizer::deserialize";
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object() || j.value("type", "") != "gpt2_bpe")
      throw invalid_input(name + ": not a gpt2_bpe tokenizer: " +
                          std::string(text.substr(0, 80)) + (text.size() > 80 ? "..." : ""));
    auto bad = [&](const std::string& why) { return invalid_input(name + ": " + why); };
    if (!j.contains("vocab") || !j["vocab"].is_array()) throw bad("\"vocab\" is not an array");
    if (!j.contains("merges") || !j["merges"].is_array()) throw bad("\"merges\" is not an array");
    if (!j.contains("special") || !j["special"].is_array()) throw bad("\"special\" is not an array");
    std::vector<std::string> tokens;
    tokens.reserve(j["vocab"].size());
    for (const auto& t : j["vocab"]) {
      std::string bytes;
      if (!t.is_string() || !detail::bpe::symbol_to_bytes(t.get_ref<const std::string&>(), bytes))
        throw bad("token " + std::to_string(tokens.size()) + " is not a string in GPT-2's byte alphabet");
      tokens.push_back(std::move(bytes));
    }
    std::vector<merge_text> merges;
    for (const auto& m : j["merges"]) {
      const std::string s = m.is_string() ? m.get<std::string>() : std::string();
      const std::size_t space = s.find(' ');
      if (space == 0 || space == std::string::npos || space + 1 == s.size())
        throw bad("merge " + std::to_string(merges.size()) + " is not \"a b\": " + m.dump());
      merges.push_back({s.substr(0, space), s.substr(space + 1)});
    }
    std::vector<std::int32_t> specials;
    for (const auto& s : j["special"]) {
      if (!s.is_number_integer() || s.get<std::int64_t>() < 0 || s.get<std::int64_t>() >= std::int64_t(tokens.size()))
        throw bad("special id " + s.dump() + " is outside the vocabulary");
      specials.push_back(s.get<std::int32_t>());
    }
    return build(std::move(tokens), merges, [&](std::size_t i) { return name + " (merge " + std::to_string(i) + ")"; },
                 std::move(specials), name);
  }

  friend bool operator==(const bpe_tokenizer& a, const bpe_tokenizer& b) {
    return a.bytes_ == b.bytes_ && a.offsets_ == b.offsets_ && a.merges_ == b.merges_ && a.specials_ == b.specials_;
  }

 private:
  bpe_tokenizer() = default;  // only the loaders make one, so every tokenizer has a vocabulary

  struct merge_text {
    std::string left, right;  // in the byte alphabet, as written
  };

  // model.vocab / encoder.json: token (byte alphabet) -> id, ids 0..n-1 each once.
  static std::vector<std::string> tokens_from_vocab(const nlohmann::json& vocab, const std::string& name,
                                                    const std::string& what) {
    namespace b = detail::bpe;
    std::vector<std::string> tokens(vocab.size());
    std::vector<bool> seen(vocab.size(), false);
    for (const auto& [key, value] : vocab.items()) {
      if (!value.is_number_integer())
        b::fail(name, what + "token " + b::quoted(key) + " has id " + value.dump() + ", not an integer");
      const std::int64_t id = value.get<std::int64_t>();
      if (id < 0 || id >= std::int64_t(tokens.size()))
        b::fail(name, what + "token " + b::quoted(key) + " has id " + std::to_string(id) + "; the " +
                          std::to_string(tokens.size()) + " tokens must have ids 0.." + std::to_string(tokens.size() - 1));
      if (seen[std::size_t(id)])
        b::fail(name, what + "id " + std::to_string(id) + " is given to two tokens, " +
                          b::quoted(tokens[std::size_t(id)]) + " and " + b::quoted(key));
      std::string bytes;
      if (!b::symbol_to_bytes(key, bytes))
        b::fail(name, what + "token " + b::quoted(key) + " has a character outside GPT-2's byte alphabet");
      tokens[std::size_t(id)] = std::move(bytes);
      seen[std::size_t(id)] = true;
    }
    return tokens;
  }

  // The common end of every loader. specials: nullopt = derive them (from_files).
  static bpe_tokenizer build(std::vector<std::string> tokens, const std::vector<merge_text>& merges,
                             const std::function<std::string(std::size_t)>& where,
                             std::optional<std::vector<std::int32_t>> specials, const std::string& name) {
    namespace b = detail::bpe;
    bpe_tokenizer t;
    t.offsets_.reserve(tokens.size() + 1);
    t.offsets_.push_back(0);
    for (const auto& tok : tokens) {
      if (tok.empty()) b::fail(name, "token " + std::to_string(t.offsets_.size() - 1) + " is empty");
      t.bytes_ += tok;
      t.offsets_.push_back(std::uint32_t(t.bytes_.size()));
    }
    std::unordered_map<std::string_view, std::int32_t> id_of;
    id_of.reserve(tokens.size());
    // An added token may repeat a vocabulary token's bytes: merges then
    // produce the first (the vocabulary's) id.
    for (std::int32_t id = 0; id < t.vocab_size(); ++id) id_of.emplace(t.token_bytes_unchecked(id), id);
    t.byte_id_.fill(-1);
    for (int c = 0; c < 256; ++c) {
      const char ch = char(c);
      const auto found = id_of.find(std::string_view(&ch, 1));
      if (found == id_of.end()) {
        std::string symbol;
        b::bytes_to_symbol(std::string_view(&ch, 1), symbol);
        b::fail(name, "the vocabulary has no token for byte " + std::to_string(c) + " (" + b::quoted(symbol) +
                          "), so some text could not be encoded");
      }
      t.byte_id_[std::size_t(c)] = found->second;
    }

    t.pairs_.reserve(merges.size());
    t.merges_.reserve(merges.size());
    std::vector<bool> produced(tokens.size(), false);
    std::string left, right;
    for (std::size_t i = 0; i < merges.size(); ++i) {
      left.clear(), right.clear();
      const bool left_ok = b::symbol_to_bytes(merges[i].left, left);
      const bool right_ok = b::symbol_to_bytes(merges[i].right, right);
      const auto l = left_ok ? id_of.find(left) : id_of.end();
      const auto r = right_ok ? id_of.find(right) : id_of.end();
      const std::string merge = b::quoted(merges[i].left + " " + merges[i].right);
      if (l == id_of.end())
        b::fail(where(i), "merge " + merge + " names " + b::quoted(merges[i].left) + ", which is not in the vocabulary");
      if (r == id_of.end())
        b::fail(where(i), "merge " + merge + " names " + b::quoted(merges[i].right) + ", which is not in the vocabulary");
      const auto m = id_of.find(left + right);
      if (m == id_of.end())
        b::fail(where(i), "merge " + merge + " makes " + b::quoted(merges[i].left + merges[i].right) +
                              ", which is not in the vocabulary");
      if (i >= std::size_t(INT_MAX)) b::fail(where(i), "too many merges");
      if (t.pairs_.insert(l->second, r->second, {std::int32_t(i), m->second})) {
        t.merges_.emplace_back(l->second, r->second);
        produced[std::size_t(m->second)] = true;
      }
    }
    if (specials) {
      t.specials_ = std::move(*specials);
    } else {
      for (std::int32_t id = 0; id < t.vocab_size(); ++id)
        if (!produced[std::size_t(id)] && t.token_bytes_unchecked(id).size() > 1) t.specials_.push_back(id);
    }
    return t;
  }

  std::string_view token_bytes_unchecked(std::int32_t id) const {
    return std::string_view(bytes_.data() + offsets_[std::size_t(id)],
                            offsets_[std::size_t(id) + 1] - offsets_[std::size_t(id)]);
  }

  void encode_ordinary_into(std::string_view text, std::vector<std::int32_t>& out,
                            detail::bpe::piece_cache::entry* cache) const {
    using cache_t = detail::bpe::piece_cache;
    struct piece {
      const unsigned char* p;
      std::size_t n;
      bool cached;  // looked up in the cache (k is set)
      cache_t::key k;
    };
    const auto* p = reinterpret_cast<const unsigned char*>(text.data());
    const auto* end = p + text.size();
    // Scans the piece at p and starts fetching its cache set: the next piece is
    // scanned while the set arrives, which hides most of the table's latency.
    auto scan = [&](const unsigned char* at) {
      piece s{at, std::size_t(detail::bpe::piece_end(at, end) - at), false, {}};
      if (cache && s.n > 1 && s.n <= cache_t::max_bytes) {
        s.cached = true;
        s.k = cache_t::make_key(s.p, s.n, end);
#if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch(cache + s.k.set);
        __builtin_prefetch(cache + s.k.set + 1);
#endif
      }
      return s;
    };
    if (p == end) return;
    piece current = scan(p);
    for (;;) {
      const auto* next_at = current.p + current.n;
      const bool more = next_at < end;
      piece next{};
      if (more) next = scan(next_at);
      if (current.n == 1) {
        out.push_back(byte_id_[*current.p]);
      } else if (current.cached) {
        if (const cache_t::entry* e = cache_t::find(cache, current.k)) {
          if (e->count == 1)
            out.push_back(e->ids[0]);
          else
            out.insert(out.end(), e->ids, e->ids + e->count);
        } else {
          const std::size_t before = out.size();
          merge_piece(current.p, current.n, out);
          const std::size_t count = out.size() - before;
          if (count <= cache_t::max_ids) cache_t::insert(cache, current.k, out.data() + before, count);
        }
      } else {
        merge_piece(current.p, current.n, out);
      }
      if (!more) break;
      current = next;
    }
  }

  // BPE on one piece: repeatedly merge the adjacent pair of lowest rank, the
  // leftmost of equals (GPT-2's and tiktoken's order). Short pieces scan an
  // array; long ones (a page with no spaces) use a heap, so no input is quadratic.
  void merge_piece(const unsigned char* p, std::size_t n, std::vector<std::int32_t>& out) const {
    constexpr std::size_t short_piece = 64;
    if (n > short_piece) return merge_long_piece(p, n, out);
    std::int32_t ids[short_piece], ranks[short_piece], merged[short_piece];
    for (std::size_t i = 0; i < n; ++i) ids[i] = byte_id_[p[i]];
    auto rank_at = [&](std::size_t i) {  // pair (i, i + 1)
      const auto* v = pairs_.find(ids[i], ids[i + 1]);
      ranks[i] = v ? v->rank : INT_MAX;
      merged[i] = v ? v->merged : -1;
    };
    for (std::size_t i = 0; i + 1 < n; ++i) rank_at(i);
    while (n > 1) {
      std::size_t best = 0;
      for (std::size_t i = 1; i + 1 < n; ++i)
        if (ranks[i] < ranks[best]) best = i;
      if (ranks[best] == INT_MAX) break;
      ids[best] = merged[best];
      for (std::size_t i = best + 1; i + 1 < n; ++i) ids[i] = ids[i + 1];
      for (std::size_t i = best + 1; i + 2 < n; ++i) ranks[i] = ranks[i + 1], merged[i] = merged[i + 1];
      --n;
      if (best + 1 < n) rank_at(best);
      if (best > 0) rank_at(best - 1);
    }
    out.insert(out.end(), ids, ids + n);
  }

  void merge_long_piece(const unsigned char* p, std::size_t n, std::vector<std::int32_t>& out) const {
    // A doubly linked list of symbols; heap entries are checked when popped
    // and dropped if either side has changed since they were pushed.
    std::vector<std::int32_t> ids(n), prev(n), next(n);
    for (std::size_t i = 0; i < n; ++i) {
      ids[i] = byte_id_[p[i]];
      prev[i] = std::int32_t(i) - 1;
      next[i] = i + 1 < n ? std::int32_t(i + 1) : -1;
    }
    struct candidate {
      std::int32_t rank, left, left_id, right_id;
      bool operator>(const candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
    };
    std::priority_queue<candidate, std::vector<candidate>, std::greater<candidate>> heap;
    auto push = [&](std::int32_t l) {
      if (l < 0 || next[std::size_t(l)] < 0) return;
      const std::int32_t r = next[std::size_t(l)];
      if (const auto* v = pairs_.find(ids[std::size_t(l)], ids[std::size_t(r)]))
        heap.push({v->rank, l, ids[std::size_t(l)], ids[std::size_t(r)]});
    };
    for (std::size_t i = 0; i + 1 < n; ++i) push(std::int32_t(i));
    while (!heap.empty()) {
      const candidate c = heap.top();
      heap.pop();
      const std::size_t l = std::size_t(c.left);
      const std::int32_t r = next[l];
      if (ids[l] != c.left_id || r < 0 || ids[std::size_t(r)] != c.right_id) continue;  // stale
      ids[l] = pairs_.find(c.left_id, c.right_id)->merged;
      ids[std::size_t(r)] = -1;  // removed
      next[l] = next[std::size_t(r)];
      if (next[l] >= 0) prev[std::size_t(next[l])] = std::int32_t(l);
      push(prev[l]);
      push(std::int32_t(l));
    }
    for (std::int32_t i = 0; i >= 0; i = next[std::size_t(i)]) out.push_back(ids[std::size_t(i)]);
  }

  std::string bytes_;                   // every token's bytes, one after another
  std::vector<std::uint32_t> offsets_;  // token i is bytes_[offsets_[i], offsets_[i + 1])
  std::array<std::int32_t, 256> byte_id_{};
  detail::bpe::pair_map pairs_;
  std::vector<std::pair<std::int32_t, std::int32_t>> merges_;  // in rank order, for serialize()
  std::vector<std::int32_t> specials_;
  mutable detail::bpe::piece_cache cache_;
};

}  // namespace ctformer::io
