// generate: loads a checkpoint (a train_gpt checkpoint, or a quantized one from
// `quantize`), streams a continuation of a prompt, and prints prefill and
// decode tokens/s.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "../common/open_model.hpp"
#include "ctformer/infer/generate.hpp"

using namespace ctformer;

namespace {

struct options {
  std::string checkpoint, prompt, summary_json;
  int max_tokens = 200, threads = 0;
  float temperature = 0.8f, top_p = 1.0f, min_p = 0.0f, repetition_penalty = 1.0f;
  int top_k = 0;
  std::uint64_t seed = 0x5eed;
  std::vector<std::string> stop;
};

// Valid UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF);
// throws invalid_input naming the byte offset of the first bad sequence.
void require_utf8(std::string_view text, const char* what) {
  std::size_t i = 0;
  while (i < text.size()) {
    const auto byte = static_cast<unsigned char>(text[i]);
    int length = byte < 0x80 ? 1 : (byte >> 5) == 0x6 ? 2 : (byte >> 4) == 0xe ? 3 : (byte >> 3) == 0x1e ? 4 : 0;
    bool ok = length > 0 && i + std::size_t(length) <= text.size();
    std::uint32_t code = length == 1 ? byte : length == 2 ? byte & 0x1f : length == 3 ? byte & 0x0f : byte & 0x07;
    for (int k = 1; ok && k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + std::size_t(k)]);
      ok = (next & 0xc0) == 0x80;
      code = (code << 6) | (next & 0x3f);
    }
    static constexpr std::uint32_t smallest[] = {0, 0, 0x80, 0x800, 0x10000};
    ok = ok && code >= smallest[length] && code <= 0x10ffff && !(code >= 0xd800 && code <= 0xdfff);
    if (!ok)
      throw invalid_input(std::string("generate: ") + what + " is not valid UTF-8 at byte " + std::to_string(i));
    i += std::size_t(length);
  }
}

template <class Model, class Tokenizer>
int run(const options& o, Model& model, const Tokenizer& tokenizer) {
  using Format = typename Model::format;
  constexpr index_t max_seq = Model::max_seq;
  auto cache = model.make_cache(max_seq);
  const auto prompt = tokenizer.encode(o.prompt);
  if (prompt.empty()) throw invalid_input("generate: the prompt is empty");
  if (index_t(prompt.size()) >= max_seq)
    throw invalid_input("generate: the prompt has " + std::to_string(prompt.size()) +
                        " tokens; the model's context holds " + std::to_string(max_seq) +
                        " and needs room for at least one new token");

  infer::sampling_settings settings;
  settings.temperature = o.temperature;
  settings.top_k = o.top_k;
  settings.top_p = o.top_p;
  settings.min_p = o.min_p;
  settings.repetition_penalty = o.repetition_penalty;
  settings.seed = o.seed;
  infer::stop_criteria stop(o.max_tokens, {}, {}, o.stop);

  std::printf("%s", o.prompt.c_str());
  std::fflush(stdout);
  const auto result = infer::generate(model, cache, prompt, settings, stop, [&](std::int32_t token) {
    const std::int32_t one[] = {token};
    std::printf("%s", tokenizer.decode(one).c_str());
    std::fflush(stdout);
  });
  std::printf("\n-- %zu prompt tokens at %.0f tokens/s, %zu new tokens at %.1f tokens/s (%s weights, %zu bytes)\n",
              prompt.size(), result.prefill_tokens_per_s, result.tokens.size(), result.decode_tokens_per_s,
              std::string(Format::name).c_str(), model.weight_bytes());
  if (!o.summary_json.empty()) {
    const nlohmann::json summary{{"prefill_tokens_per_s", result.prefill_tokens_per_s},
                                 {"decode_tokens_per_s", result.decode_tokens_per_s},
                                 {"prompt_tokens", prompt.size()},
                                 {"new_tokens", result.tokens.size()},
                                 {"weight_format", std::string(Format::name)},
                                 {"weight_bytes", model.weight_bytes()},
                                 {"text", tokenizer.decode(result.tokens)}};
    std::ofstream out(o.summary_json);
    out << summary.dump(2) << "\n";
    if (!out) throw io_error("generate: cannot write " + o.summary_json);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"Generate text from a ctformer checkpoint"};
  app.add_option("--checkpoint", o.checkpoint,
                 "A train_gpt or quantize checkpoint, a GGUF file, a Hugging Face model folder or a llama2.c file")
      ->required();
  app.add_option("--prompt", o.prompt, "Text to continue (valid UTF-8)")->required();
  app.add_option("--max-tokens", o.max_tokens, "Most new tokens");
  app.add_option("--temperature", o.temperature, "0: greedy");
  app.add_option("--top-k", o.top_k, "Keep the k most likely tokens (0: off)");
  app.add_option("--top-p", o.top_p, "Nucleus sampling threshold (1: off)");
  app.add_option("--min-p", o.min_p, "Drop tokens below min-p times the most likely (0: off)");
  app.add_option("--repetition-penalty", o.repetition_penalty, "> 1 discourages repeats (1: off)");
  app.add_option("--seed", o.seed, "Sampling seed: the same seed gives the same text");
  app.add_option("--stop", o.stop, "Stop when this text is generated (repeatable)");
  app.add_option("--threads", o.threads, "CPU threads (0: all)");
  app.add_option("--summary-json", o.summary_json, "Write prefill_tokens_per_s, decode_tokens_per_s, ... here");
  CLI11_PARSE(app, argc, argv);
  try {
    require_utf8(o.prompt, "the prompt");
    return examples::with_inference_model<infer::kv::paged<16, float>>(
        o.checkpoint, cpu::par.with_threads(o.threads), 0,
        [&](auto& model, const auto& tokenizer) { return run(o, model, tokenizer); });
  } catch (const ctformer::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
