// Opens a model for inference, as every inference tool does: a train_gpt
// checkpoint (fp32), a quantized one from `quantize` (its packed weights as
// stored), a GGUF file (written by `quantize`, or by llama.cpp for a
// registered shape; Q8_0 / Q4_0 blocks as stored), a Hugging Face folder or
// a llama2.c file of a registered pretrained shape, each with its tokenizer. The metadata (configuration,
// weight format, tokenizer kind) picks the compile-time model type once;
// nothing after that dispatches at run time.
#pragma once

#include <concepts>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "presets.hpp"
#include "ctformer/infer/inference_model.hpp"
#include "ctformer/io/bpe_tokenizer.hpp"
#include "ctformer/io/checkpoint.hpp"
#include "ctformer/io/gguf_model.hpp"
#include "ctformer/io/hugging_face.hpp"
#include "ctformer/io/llama2c.hpp"
#include "ctformer/io/quantized_checkpoint.hpp"
#include "ctformer/io/tokenizer.hpp"
#include "ctformer/nn/nn.hpp"

namespace ctformer::examples {

/// The metadata of a checkpoint of either kind.
struct checkpoint_kind {
  bool quantized = false;
  std::string weight_format = "fp32";
  std::string config_json, vocabulary;
};

inline checkpoint_kind read_checkpoint_kind(const std::string& path) {
  if (io::is_quantized_checkpoint(path)) {
    auto meta = io::read_quantized_checkpoint_metadata(path);
    return {true, std::move(meta.weight_format), std::move(meta.config_json), std::move(meta.vocabulary)};
  }
  auto meta = io::read_checkpoint_metadata(path);
  return {false, "fp32", std::move(meta.config_json), std::move(meta.vocabulary)};
}

/// The configuration JSON stored in a checkpoint of either kind.
inline std::string checkpoint_config(const std::string& path) { return read_checkpoint_kind(path).config_json; }

/// How many tokens a tokenizer has (the model's vocabulary may be padded past it).
template <class Tokenizer>
index_t tokenizer_vocabulary(const Tokenizer& tokenizer) {
  if constexpr (requires { tokenizer.vocab_size(); }) return index_t(tokenizer.vocab_size());
  else return index_t(Tokenizer::vocab_size);
}

/// Calls f.template operator()<Tokenizer>() for the tokenizer a checkpoint's
/// vocabulary was serialized from.
template <class F>
decltype(auto) visit_tokenizer(const std::string& vocabulary, F&& f) {
  if (vocabulary.find("\"byte\"") != std::string::npos) return f.template operator()<io::byte_tokenizer>();
  return f.template operator()<io::char_tokenizer>();
}

/// The tokenizer a Hugging Face folder comes with: tokenizer.json, or
/// GPT-2's vocab.json and merges.txt.
inline io::bpe_tokenizer hugging_face_tokenizer(const std::filesystem::path& folder) {
  if (std::filesystem::exists(folder / "tokenizer.json"))
    return io::bpe_tokenizer::from_tokenizer_json(folder / "tokenizer.json");
  if (std::filesystem::exists(folder / "vocab.json") && std::filesystem::exists(folder / "merges.txt"))
    return io::bpe_tokenizer::from_files(folder / "vocab.json", folder / "merges.txt");
  throw invalid_input("'" + folder.string() + "' has no tokenizer: tokenizer.json, or vocab.json and merges.txt");
}

/// Whether the file starts with GGUF's magic.
inline bool is_gguf_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::memcmp(magic, "GGUF", 4) == 0;
}

namespace detail {
// A GGUF file: the configuration is the one ctformer stored (ctformer.config)
// or the registered pretrained shape its metadata describes. The weight
// format is the file's where the program has that model type compiled in
// already (every format for the presets; Q8_0 for pretrained shapes, whose
// other types load decoded to fp32): each further type would compile the
// whole model, and in `serve` its engine and server, once more.
template <class Kv, class Use>
int with_gguf_model(const std::string& path, cpu::par_t exec, index_t max_chunk, Use& use) {
  const io::gguf_model_description d = io::describe_gguf_model(io::gguf_file::read(path));
  auto with_config = [&]<class Cfg, class Tokenizer, bool AllFormats>(auto make_tokenizer) {
    auto with_format = [&]<class Format>() {
      using model_type = infer::inference_model<Cfg, Format, Kv>;
      const index_t rows = max_chunk > 0 ? max_chunk : model_type::default_max_chunk;
      auto open = [&](auto&& with_model) {
        const io::gguf_weight_source<Cfg> source(path);
        const Tokenizer tokenizer = make_tokenizer(source.file());
        model_type model(source, rows, exec);
        return with_model(model, tokenizer);
      };
      return use.template operator()<model_type, Tokenizer>(open);
    };
    if (d.linear_type == io::gguf_type::q8_0) return with_format.template operator()<quant::q8_0>();
    if constexpr (AllFormats) {
      if (d.linear_type == io::gguf_type::q4_0) return with_format.template operator()<quant::q4_0>();
      if (d.linear_type == io::gguf_type::bf16) return with_format.template operator()<quant::bf16_weights>();
    }
    return with_format.template operator()<quant::fp32>();
  };
  if (!d.ctformer_config.empty())
    return visit_config(d.ctformer_config, [&]<class Cfg>() {
      if constexpr (io::gguf_architecture_of<Cfg>() == nullptr) {
        throw invalid_input("'" + path + "': its configuration has no GGUF layout");
      } else {
        return visit_tokenizer(d.ctformer_vocabulary, [&]<class Tokenizer>() {
          return with_config.template operator()<Cfg, Tokenizer, true>(
              [](const io::gguf_file& f) { return io::gguf_tokenizer<Tokenizer>(f); });
        });
      }
    });
  return visit_pretrained_config(d, path, [&]<class Cfg>() {
    using Tokenizer = typename Cfg::tokenizer;
    return with_config.template operator()<Cfg, Tokenizer, false>([](const io::gguf_file& f) -> Tokenizer {
      if constexpr (std::same_as<Tokenizer, io::bpe_tokenizer>) return io::gguf_tokenizer<Tokenizer>(f);
      else return Tokenizer(Cfg::vocab);
    });
  });
}

// A pretrained model: the configuration Cfg is registered, load(trained)
// reads its weights into an fp32 nn::model.
template <class Cfg, class Kv, class Use, class Load, class MakeTokenizer>
int with_pretrained_model(cpu::par_t exec, index_t max_chunk, Use& use, Load load, MakeTokenizer make_tokenizer) {
  using model_type = infer::inference_model<Cfg, quant::fp32, Kv>;
  using tokenizer_type = typename Cfg::tokenizer;
  const index_t rows = max_chunk > 0 ? max_chunk : model_type::default_max_chunk;
  auto open = [&](auto&& with_model) {
    const tokenizer_type tokenizer = make_tokenizer();
    nn::model<Cfg, cpu::par_t> trained(exec);
    load(trained);
    model_type model(trained, rows, exec);
    return with_model(model, tokenizer);
  };
  return use.template operator()<model_type, tokenizer_type>(open);
}
}  // namespace detail

/// Decides the inference model type of `path` (KV cache policy Kv) from its
/// metadata alone and calls use.template operator()<Model, Tokenizer>(open);
/// open(f) reads the weights, builds the model and calls f(model, tokenizer).
/// A tool can so set up what depends on the type (a server listening,
/// answering "loading") before the slow part. Returns what use returns.
/// @param max_chunk the most rows one forward call holds (0: the model's default)
template <class Kv, class Use>
int with_inference_model_type(const std::string& path, cpu::par_t exec, index_t max_chunk, Use&& use) {
  if (std::filesystem::is_directory(path)) {
    const io::hugging_face_config config = io::read_hugging_face_config(path);
    return visit_pretrained_config(config, path, [&]<class Cfg>() {
      return detail::with_pretrained_model<Cfg, Kv>(
          exec, max_chunk, use, [&](auto& trained) { io::load_hugging_face(path, trained); },
          [&]() -> typename Cfg::tokenizer {
            if constexpr (std::same_as<typename Cfg::tokenizer, io::bpe_tokenizer>) return hugging_face_tokenizer(path);
            else return typename Cfg::tokenizer(Cfg::vocab);
          });
    });
  }
  if (is_gguf_file(path)) return detail::with_gguf_model<Kv>(path, exec, max_chunk, use);
  if (io::is_llama2c_file(path)) {
    const io::llama2c_header header = io::read_llama2c_header(path);
    return visit_pretrained_config(header, path, [&]<class Cfg>() -> int {
      if constexpr (std::same_as<typename Cfg::tokenizer, io::token_id_tokenizer>) {
        return detail::with_pretrained_model<Cfg, Kv>(
            exec, max_chunk, use, [&](auto& trained) { io::load_llama2c(path, trained); },
            [] { return io::token_id_tokenizer(Cfg::vocab); });
      } else {
        throw invalid_input("'" + path + "': a llama2.c file carries no tokenizer, and " + Cfg::name +
                            " needs its own");
      }
    });
  }
  const checkpoint_kind kind = read_checkpoint_kind(path);
  return visit_config(kind.config_json, [&]<class Cfg>() {
    auto with_format = [&]<class Format>() {
      using model_type = infer::inference_model<Cfg, Format, Kv>;
      const index_t rows = max_chunk > 0 ? max_chunk : model_type::default_max_chunk;
      return visit_tokenizer(kind.vocabulary, [&]<class Tokenizer>() {
        auto open = [&](auto&& with_model) {
          const Tokenizer tokenizer = Tokenizer::deserialize(kind.vocabulary);
          if constexpr (std::same_as<Format, quant::fp32>) {
            if (!kind.quantized) {
              nn::model<Cfg, cpu::par_t> trained(exec);
              io::load_model_parameters(path, trained);
              model_type model(trained, rows, exec);
              return with_model(model, tokenizer);
            }
          }
          const io::quantized_checkpoint_source<Cfg, Format> source(path);
          model_type model(source, rows, exec);
          return with_model(model, tokenizer);
        };
        return use.template operator()<model_type, Tokenizer>(open);
      });
    };
    if (kind.quantized) return io::visit_weight_format(kind.weight_format, with_format);
    return with_format.template operator()<quant::fp32>();
  });
}

/// Builds the inference model of `path` (KV cache policy Kv) and calls
/// use(model, tokenizer) with it; returns what use returns.
/// @param max_chunk the most rows one forward call holds (0: the model's default)
template <class Kv, class Use>
int with_inference_model(const std::string& path, cpu::par_t exec, index_t max_chunk, Use&& use) {
  return with_inference_model_type<Kv>(path, exec, max_chunk,
                                       [&]<class Model, class Tokenizer>(auto open) { return open(use); });
}

}  // namespace ctformer::examples
