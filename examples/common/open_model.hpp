// Opens a checkpoint for inference, as every inference tool does: a
// train_gpt checkpoint (fp32) or a quantized one from `quantize` (its packed
// weights as stored), with the tokenizer it was trained with. The file's
// configuration and weight format pick the compile-time model type once;
// nothing after that dispatches at run time.
#pragma once

#include <string>

#include "presets.hpp"
#include "ctformer/infer/inference_model.hpp"
#include "ctformer/io/checkpoint.hpp"
#include "ctformer/io/quantized_checkpoint.hpp"
#include "ctformer/io/tokenizer.hpp"
#include "ctformer/nn/nn.hpp"

namespace ctformer::examples {

/// The configuration JSON stored in a checkpoint of either kind.
inline std::string checkpoint_config(const std::string& path) {
  return io::is_quantized_checkpoint(path) ? io::read_quantized_checkpoint_metadata(path).config_json
                                           : io::read_checkpoint_metadata(path).config_json;
}

/// How many tokens a tokenizer has (the model's vocabulary may be padded past it).
template <class Tokenizer>
index_t tokenizer_vocabulary(const Tokenizer& tokenizer) {
  if constexpr (requires { tokenizer.vocab_size(); }) return index_t(tokenizer.vocab_size());
  else return index_t(Tokenizer::vocab_size);
}

/// Builds the inference model of `path` (KV cache policy Kv) and calls
/// use(model, tokenizer) with it; returns what use returns.
/// @param max_chunk the most rows one forward call holds (0: the model's default)
template <class Kv, class Use>
int with_inference_model(const std::string& path, cpu::par_t exec, index_t max_chunk, Use&& use) {
  return visit_config(checkpoint_config(path), [&]<class Cfg>() {
    auto with_tokenizer = [&]<class Format>(infer::inference_model<Cfg, Format, Kv>& model,
                                            const std::string& vocabulary) {
      if (vocabulary.find("\"byte\"") != std::string::npos) return use(model, io::byte_tokenizer::deserialize(vocabulary));
      return use(model, io::char_tokenizer::deserialize(vocabulary));
    };
    auto rows = [&]<class Format>() {
      return max_chunk > 0 ? max_chunk : infer::inference_model<Cfg, Format, Kv>::default_max_chunk;
    };
    if (io::is_quantized_checkpoint(path)) {
      const auto meta = io::read_quantized_checkpoint_metadata(path);
      return io::visit_weight_format(meta.weight_format, [&]<class Format>() {
        const io::quantized_checkpoint_source<Cfg, Format> source(path);
        infer::inference_model<Cfg, Format, Kv> model(source, rows.template operator()<Format>(), exec);
        return with_tokenizer.template operator()<Format>(model, source.vocabulary());
      });
    }
    nn::model<Cfg, cpu::par_t> trained(exec);
    const auto meta = io::load_model_parameters(path, trained);
    infer::inference_model<Cfg, quant::fp32, Kv> model(trained, rows.template operator()<quant::fp32>(), exec);
    return with_tokenizer.template operator()<quant::fp32>(model, meta.vocabulary);
  });
}

}  // namespace ctformer::examples
