// quantize: a train_gpt checkpoint -> a quantized (or pruned) checkpoint whose
// linear weights are stored packed in the chosen format (io/quantized_checkpoint.hpp).
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "../common/presets.hpp"
#include "ctformer/compress/post_training_quantization.hpp"
#include "ctformer/compress/pruning.hpp"
#include "ctformer/ctformer.hpp"
#include "ctformer/io/checkpoint.hpp"
#include "ctformer/io/quantized_checkpoint.hpp"

using namespace ctformer;

int main(int argc, char** argv) {
  std::string in, out, format, summary_json;
  int threads = 0;
  CLI::App app{"Quantize or prune a trained ctformer checkpoint"};
  app.add_option("--in", in, "Training checkpoint written by train_gpt")->required();
  app.add_option("--out", out, "Quantized checkpoint to write (atomically)")->required();
  app.add_option("--format", format, "Weight format of the linear layers")
      ->required()
      ->check(CLI::IsMember({"q8_0", "q4_0", "int8_rowwise", "bf16", "fp32", "prune50", "prune2of4"}));
  app.add_option("--summary-json", summary_json, "Write the figures here as one JSON object");
  app.add_option("--threads", threads, "CPU threads (0: all)");
  CLI11_PARSE(app, argc, argv);

  try {
    const io::checkpoint_metadata meta = io::read_checkpoint_metadata(in);
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
