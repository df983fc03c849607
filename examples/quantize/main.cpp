// quantize: a train_gpt checkpoint -> a quantized (or pruned) checkpoint whose
// linear weights are stored packed in the chosen format (io/quantized_checkpoint.hpp),
// or, for an output ending in .gguf, a GGUF file llama.cpp runs (io/gguf_model.hpp).
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "../common/open_model.hpp"
#include "../common/presets.hpp"
#include "ctformer/compress/post_training_quantization.hpp"
#include "ctformer/compress/pruning.hpp"
#include "ctformer/ctformer.hpp"
#include "ctformer/io/checkpoint.hpp"
#include "ctformer/io/gguf_model.hpp"
#include "ctformer/io/quantized_checkpoint.hpp"

using namespace ctformer;

int main(int argc, char** argv) {
  std::string in, out, format, summary_json;
  int threads = 0;
  CLI::App app{"Quantize or prune a trained ctformer checkpoint"};
  app.add_option("--in", in, "Training checkpoint written by train_gpt")->required();
  app.add_option("--out", out, "Quantized checkpoint to write (atomically); a name ending in .gguf writes GGUF")
      ->required();
  app.add_option("--format", format, "Weight format of the linear layers (GGUF: q8_0, q4_0, bf16, f16, fp32)")
      ->required()
      ->check(CLI::IsMember({"q8_0", "q4_0", "int8_rowwise", "bf16", "f16", "fp32", "prune50", "prune2of4"}));
  app.add_option("--summary-json", summary_json, "Write the figures here as one JSON object");
  app.add_option("--threads", threads, "CPU threads (0: all)");
  CLI11_PARSE(app, argc, argv);

  try {
    const io::checkpoint_metadata meta = io::read_checkpoint_metadata(in);
    if (out.ends_with(".gguf")) {
      const std::map<std::string, io::gguf_type> types{{"q8_0", io::gguf_type::q8_0}, {"q4_0", io::gguf_type::q4_0},
                                                        {"bf16", io::gguf_type::bf16}, {"f16", io::gguf_type::f16},
                                                        {"fp32", io::gguf_type::f32}};
      const auto type = types.find(format);
      if (type == types.end())
        throw invalid_input("quantize: GGUF stores linear weights as q8_0, q4_0, bf16, f16 or fp32, not " + format);
      examples::visit_config(meta.config_json, [&]<class Cfg>() {
        nn::model<Cfg, cpu::par_t> model(cpu::par.with_threads(threads));
        io::load_model_parameters(in, model);
        examples::visit_tokenizer(meta.vocabulary, [&]<class Tokenizer>() {
          io::save_gguf(out, model, Tokenizer::deserialize(meta.vocabulary), type->second,
                        std::filesystem::path(in).stem().string());
        });
      });
      std::printf("%s: %s linear weights -> %s (GGUF, %ju bytes)\n", in.c_str(), format.c_str(), out.c_str(),
                  std::uintmax_t(std::filesystem::file_size(out)));
      return 0;
    }
    if (format == "f16") throw invalid_input("quantize: f16 is a GGUF format: give an output ending in .gguf");
    nlohmann::json summary = examples::visit_config(meta.config_json, [&]<class Cfg>() {
      nn::model<Cfg, cpu::par_t> model(cpu::par.with_threads(threads));
      io::load_model_parameters(in, model);
      return io::visit_weight_format(format, [&]<class Format>() {
        const auto packed = compress::quantize_weights<Format>(model);
        io::save_quantized_checkpoint<Format>(out, model, packed, meta.vocabulary);
        // Sparsity actually stored: the zeros of the dequantized linear weights.
        std::size_t zeros = 0, total = 0;
        for (const auto& [name, w] : packed) {
          std::vector<float> row(std::size_t(w.cols()));
          for (index_t r = 0; r < w.rows(); ++r) {
            Format::dequantize_row(w.row(r), row.data(), w.cols());
            for (float v : row) zeros += v == 0.0f;
          }
          total += std::size_t(w.rows() * w.cols());
        }
        return nlohmann::json{{"format", Format::name},
                              {"bytes", compress::weight_bytes<Format>(model)},
                              {"fp32_bytes", compress::weight_bytes<quant::fp32>(model)},
                              {"file_bytes", std::filesystem::file_size(out)},
                              {"linear_weights", total},
                              {"linear_zero_fraction", total ? double(zeros) / double(total) : 0.0}};
      });
    });
    summary["in"] = in;
    summary["out"] = out;
    std::printf("%s: %s linear weights, %zu bytes of weights (fp32: %zu), zero fraction %.4f -> %s\n", in.c_str(),
                format.c_str(), summary["bytes"].get<std::size_t>(), summary["fp32_bytes"].get<std::size_t>(),
                summary["linear_zero_fraction"].get<double>(), out.c_str());
    if (!summary_json.empty()) {
      std::ofstream file(summary_json);
      file << summary.dump(2) << "\n";
      if (!file) throw io_error("quantize: cannot write " + summary_json);
    }
    return 0;
  } catch (const ctformer::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
