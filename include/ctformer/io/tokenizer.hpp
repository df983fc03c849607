// Tokenizers: byte-level (256 ids, any input), character-level (the
// distinct bytes of a training text), and token ids written as text (for a
// model that comes without its tokenizer); all serialisable for checkpoints.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/core/error.hpp"

namespace ctformer::io {

namespace detail {
// A byte as a person reads it in a message: 'a', '\n', or \xNN.
inline std::string printable_byte(unsigned char c) {
  if (c == '\n') return "'\\n'";
  if (c == '\t') return "'\\t'";
  if (c == '\r') return "'\\r'";
  if (c >= 0x20 && c < 0x7f) return std::string("'") + char(c) + "'";
  static constexpr char hex[] = "0123456789abcdef";
  return std::string("'\\x") + hex[c >> 4] + hex[c & 15] + "'";
}

[[noreturn]] inline void bad_token(const char* who, std::int32_t id, std::size_t position, int vocab) {
  throw invalid_input(std::string("ctformer::io::") + who + "::decode: token " + std::to_string(id) +
                      " at position " + std::to_string(position) + " is outside the vocabulary [0, " +
                      std::to_string(vocab) + ")");
}
}  // namespace detail

/// Every byte is its own token: vocabulary 256, never an unknown input.
class byte_tokenizer {
 public:
  static constexpr int vocab_size = 256;

  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<std::int32_t> out(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) out[i] = std::int32_t(static_cast<unsigned char>(text[i]));
    return out;
  }

  /// Throws invalid_input naming an id outside [0, 256) and its position.
  std::string decode(std::span<const std::int32_t> tokens) const {
    std::string out(tokens.size(), '\0');
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] < 0 || tokens[i] >= vocab_size) detail::bad_token("byte_tokenizer", tokens[i], i, vocab_size);
      out[i] = char(static_cast<unsigned char>(tokens[i]));
    }
    return out;
  }

  /// {"type":"byte"}: what a checkpoint's "vocabulary" metadata holds.
  std::string serialize() const { return R"({"type":"byte"})"; }

  /// Throws invalid_input unless text is a serialised byte tokenizer.
  static byte_tokenizer deserialize(std::string_view text) {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object() || j.value("type", "") != "byte")
      throw invalid_input("ctformer::io::byte_tokenizer::deserialize: not a byte tokenizer: " + std::string(text));
    return {};
  }
};

/// One token per distinct byte of a text, ids in byte order (so the
/// vocabulary of tiny Shakespeare is its 65 characters, as in nanoGPT's
/// shakespeare_char). Works on bytes: a multi-byte UTF-8 character becomes
/// several tokens, which round-trips exactly.
class char_tokenizer {
 public:
  char_tokenizer() { id_of_.fill(-1); }

  /// The vocabulary of text: its sorted distinct bytes.
  static char_tokenizer from_text(std::string_view text) {
    std::array<bool, 256> present{};
    for (char c : text) present[static_cast<unsigned char>(c)] = true;
    std::string symbols;
    for (int c = 0; c < 256; ++c)
      if (present[std::size_t(c)]) symbols.push_back(char(c));
    return from_symbols(symbols);
  }

  /// A tokenizer whose token i is symbols[i]; symbols must be distinct.
  static char_tokenizer from_symbols(std::string_view symbols) {
    char_tokenizer t;
    for (std::size_t i = 0; i < symbols.size(); ++i) {
      const auto c = static_cast<unsigned char>(symbols[i]);
      if (t.id_of_[c] >= 0)
        throw invalid_input("ctformer::io::char_tokenizer: symbol " + detail::printable_byte(c) + " appears twice");
      t.id_of_[c] = std::int32_t(i);
    }
    t.symbols_ = std::string(symbols);
    return t;
  }

  int vocab_size() const { return int(symbols_.size()); }
  /// Token i is the byte symbols()[i].
  const std::string& symbols() const { return symbols_; }

  /// Throws invalid_input naming the first character not in the vocabulary and its position.
  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<std::int32_t> out(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) {
      const auto c = static_cast<unsigned char>(text[i]);
      const std::int32_t id = id_of_[c];
      if (id < 0)
        throw invalid_input("ctformer::io::char_tokenizer::encode: character " + detail::printable_byte(c) +
                            " at position " + std::to_string(i) + " is not in the vocabulary of " +
                            std::to_string(symbols_.size()) + " characters");
      out[i] = id;
    }
    return out;
  }

  /// Throws invalid_input naming an id outside the vocabulary and its position.
  std::string decode(std::span<const std::int32_t> tokens) const {
    std::string out(tokens.size(), '\0');
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] < 0 || tokens[i] >= vocab_size()) detail::bad_token("char_tokenizer", tokens[i], i, vocab_size());
      out[i] = symbols_[std::size_t(tokens[i])];
    }
    return out;
  }

  /// {"type":"char","symbols":[10,32,33,...]}: the byte values in id order,
  /// as numbers so that any byte (not only valid UTF-8) survives JSON.
  std::string serialize() const {
    nlohmann::json j;
    j["type"] = "char";
    std::vector<int> codes;
    for (char c : symbols_) codes.push_back(static_cast<unsigned char>(c));
    j["symbols"] = codes;
    return j.dump();
  }

  /// Throws invalid_input unless text is a serialised char tokenizer.
  static char_tokenizer deserialize(std::string_view text) {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    auto bad = [&](const std::string& why) {
      return invalid_input("ctformer::io::char_tokenizer::deserialize: " + why + ": " + std::string(text));
    };
    if (j.is_discarded() || !j.is_object() || j.value("type", "") != "char") throw bad("not a char tokenizer");
    if (!j.contains("symbols") || !j["symbols"].is_array()) throw bad("\"symbols\" is missing");
    std::string symbols;
    for (const auto& code : j["symbols"]) {
      if (!code.is_number_integer() || code.get<int>() < 0 || code.get<int>() > 255)
        throw bad("a symbol is not a byte value 0..255");
      symbols.push_back(char(code.get<int>()));
    }
    return from_symbols(symbols);
  }

  friend bool operator==(const char_tokenizer& a, const char_tokenizer& b) { return a.symbols_ == b.symbols_; }

 private:
  std::string symbols_;
  std::array<std::int32_t, 256> id_of_;
};

/// For a model whose tokenizer is not at hand (a llama2.c file carries
/// none): text is token ids separated by white space, "1 403 407", and each
/// decoded token is " <id>", so what a tool prints reads back as input.
class token_id_tokenizer {
 public:
  explicit token_id_tokenizer(int vocab_size = 0) : vocab_(vocab_size) {}
  int vocab_size() const { return vocab_; }

  /// Throws invalid_input naming the first word that is not an id in [0, vocab) and its byte offset.
  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<std::int32_t> out;
    std::size_t i = 0;
    auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
    while (i < text.size()) {
      if (space(text[i])) {
        ++i;
        continue;
      }
      const std::size_t begin = i;
      while (i < text.size() && !space(text[i])) ++i;
      const std::string_view word = text.substr(begin, i - begin);
      // Stops at the first digit that would pass the vocabulary, so a long
      // run of digits cannot overflow.
      std::int64_t id = 0;
      bool ok = true;
      for (char c : word) {
        ok = c >= '0' && c <= '9' && id < vocab_;
        if (!ok) break;
        id = id * 10 + (c - '0');
      }
      if (!ok || id >= vocab_)
        throw invalid_input("ctformer::io::token_id_tokenizer::encode: '" + std::string(word.substr(0, 40)) +
                            "' at byte " + std::to_string(begin) + " is not a token id in [0, " +
                            std::to_string(vocab_) + "): this model takes its prompt as ids, e.g. \"1 403 407\"");
      out.push_back(std::int32_t(id));
    }
    return out;
  }

  /// Throws invalid_input naming an id outside the vocabulary and its position.
  std::string decode(std::span<const std::int32_t> tokens) const {
    std::string out;
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] < 0 || tokens[i] >= vocab_) detail::bad_token("token_id_tokenizer", tokens[i], i, vocab_);
      out += ' ' + std::to_string(tokens[i]);
    }
    return out;
  }

  /// {"type":"ids","vocab":512}
  std::string serialize() const { return nlohmann::json{{"type", "ids"}, {"vocab", vocab_}}.dump(); }
  static token_id_tokenizer deserialize(std::string_view text) {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object() || j.value("type", "") != "ids" || !j.contains("vocab") ||
        !j["vocab"].is_number_integer() || j["vocab"].get<std::int64_t>() <= 0)
      throw invalid_input("ctformer::io::token_id_tokenizer::deserialize: not a token-id tokenizer: " + std::string(text));
    return token_id_tokenizer(j["vocab"].get<int>());
  }

 private:
  int vocab_;
};

}  // namespace ctformer::io
