// eval_perplexity: perplexity of a checkpoint (a train_gpt training checkpoint,
// or a quantize output in any weight format) on a text file's validation or
// training split: exp(mean cross-entropy) over every non-overlapping window of
// the model's context (window k: inputs tokens [kT, kT + T), targets shifted by one).
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include "../common/presets.hpp"
#include "ctformer/compress/post_training_quantization.hpp"
#include "ctformer/ctformer.hpp"
#include "ctformer/io/checkpoint.hpp"
#include "ctformer/io/quantized_checkpoint.hpp"
#include "ctformer/io/text_dataset.hpp"
#include "ctformer/io/tokenizer.hpp"

using namespace ctformer;

namespace {

// Token ids of text under the checkpoint's serialised tokenizer.
std::vector<std::int32_t> encode_with(const std::string& vocabulary, const std::string& text) {
  const auto j = nlohmann::json::parse(vocabulary, nullptr, false);
  const std::string type = j.is_object() ? j.value("type", "") : "";
  if (type == "char") return io::char_tokenizer::deserialize(vocabulary).encode(text);
  if (type == "byte") return io::byte_tokenizer::deserialize(vocabulary).encode(text);
  throw invalid_input("eval_perplexity: the checkpoint's vocabulary is no known tokenizer: " + vocabulary);
}

// Mean cross-entropy (nats per token) over the non-overlapping windows of tokens.
template <class Model>
std::pair<double, index_t> mean_loss(Model& model, std::span<const std::int32_t> tokens) {
  const index_t t = Model::max_seq, windows = (index_t(tokens.size()) - 1) / t, batch = 32;
  if (windows < 1)
    throw invalid_input("eval_perplexity: the split has " + std::to_string(tokens.size()) +
                        " tokens, fewer than one window of " + std::to_string(t + 1));
  std::vector<std::int32_t> in(std::size_t(batch * t)), out(std::size_t(batch * t));
  double sum = 0;
  for (index_t first = 0; first < windows; first += batch) {
    const index_t rows = std::min(batch, windows - first);
    for (index_t r = 0; r < rows; ++r) {
      const std::int32_t* w = tokens.data() + (first + r) * t;
      std::copy_n(w, t, in.begin() + r * t);
      std::copy_n(w + 1, t, out.begin() + r * t);
    }
    const float loss = model.evaluate(tensor_view<const std::int32_t, 2>(in.data(), {rows, t}),
                                      tensor_view<const std::int32_t, 2>(out.data(), {rows, t}));
    sum += double(loss) * double(rows);  // every row has t targets: weight the batch mean by its rows
  }
  return {sum / double(windows), windows};
}

}  // namespace

int main(int argc, char** argv) {
  std::string checkpoint, data, split = "val", summary_json;
  int threads = 0;
  CLI::App app{"Perplexity of a ctformer checkpoint (any weight format) on a text file"};
  app.add_option("--checkpoint", checkpoint, "Training checkpoint (train_gpt) or quantized checkpoint (quantize)")
      ->required();
  app.add_option("--data", data, "Text file; split 90% train / 10% validation as in training")->required();
  app.add_option("--split", split, "val or train")->check(CLI::IsMember({"val", "train"}));
  app.add_option("--summary-json", summary_json, "Write perplexity, bytes and the rest here as one JSON object");
  app.add_option("--threads", threads, "CPU threads (0: all)");
  CLI11_PARSE(app, argc, argv);

  try {
    const bool quantized = io::is_quantized_checkpoint(checkpoint);
    std::string config, vocabulary, format = "fp32";
    if (quantized) {
      const auto meta = io::read_quantized_checkpoint_metadata(checkpoint);
      config = meta.config_json;
      vocabulary = meta.vocabulary;
      format = meta.weight_format;
    } else {
      const auto meta = io::read_checkpoint_metadata(checkpoint);
      config = meta.config_json;
      vocabulary = meta.vocabulary;
    }
    const auto tokens = encode_with(vocabulary, io::read_text_file(data));
    const auto start = std::chrono::steady_clock::now();
    nlohmann::json summary = examples::visit_config(config, [&]<class Cfg>() {
      nn::model<Cfg, cpu::par_t> model(cpu::par.with_threads(threads));
      const std::size_t bytes = io::visit_weight_format(format, [&]<class Format>() {
        if (quantized) io::load_quantized_checkpoint<Format>(checkpoint, model);
        else io::load_model_parameters(checkpoint, model);
        return compress::weight_bytes<Format>(model);
      });
      const io::text_dataset dataset(tokens, Cfg::max_seq, 0.9, data);
      const auto [loss, windows] = mean_loss(model, split == "val" ? dataset.val_tokens() : dataset.train_tokens());
      return nlohmann::json{{"perplexity", std::exp(loss)}, {"mean_loss", loss},       {"bytes", bytes},
                            {"windows", windows},           {"context", Cfg::max_seq}, {"tokens", windows * Cfg::max_seq}};
    });
    summary["weight_format"] = format;
    summary["checkpoint"] = checkpoint;
    summary["split"] = split;
    summary["wall_s"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%s (%s): %s perplexity %.4f (mean loss %.4f over %lld windows of %lld), %zu bytes of weights\n",
                checkpoint.c_str(), format.c_str(), split.c_str(), summary["perplexity"].get<double>(),
                summary["mean_loss"].get<double>(), summary["windows"].get<long long>(),
                summary["context"].get<long long>(), summary["bytes"].get<std::size_t>());
    if (!summary_json.empty()) {
      std::ofstream file(summary_json);
      file << summary.dump(2) << "\n";
      if (!file) throw io_error("eval_perplexity: cannot write " + summary_json);
    }
    return 0;
  } catch (const ctformer::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
