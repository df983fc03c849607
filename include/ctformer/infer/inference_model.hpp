// infer::inference_model<Cfg, Format, KvPolicy, Exec>: the forward pass of a
// trained nn::model for generation -- weights packed in a quant:: format, no
// activations saved, chunked prefill and one-token decode over a KV cache.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/infer/kv_cache.hpp"
#include "ctformer/nn/config.hpp"
#include "ctformer/nn/model.hpp"
#include "ctformer/nn/parameters.hpp"
#include "ctformer/ops/ops.hpp"
#include "ctformer/quant/interleaved_matrix.hpp"
#include "ctformer/quant/packed_matrix.hpp"

namespace ctformer::infer {

/// The matrix a linear layer's weights are kept in for inference: row-major
/// packed rows, except q4_0, whose rows are interleaved by 8 (the same bytes)
/// so that decode and prefill run integer kernels eight rows at a time: its
/// row-major GEMV was compute-bound (nibble unpacking), the interleaved one
/// reaches the memory bound. q8_0 is interleaved where ops::interleave_q8_0
/// says so (a build with VNNI: its int8 prefill GEMM is 1.5-2x the
/// dequantize-then-fp32 path there); elsewhere it stays row-major, where its
/// decode is as fast and its prefill keeps exact fp32 activations (its int8
/// GEMM needs a widening multiply-add per chunk without VNNI: 92-100 GOP/s
/// against about 86-90 GFLOP/s for the fp32 GEMM on Zen 3).
template <class Format, class Exec>
struct inference_weights {
  using type = quant::packed_matrix<Format>;
};
template <class Exec>
struct inference_weights<quant::q4_0, Exec> {
  using type = quant::interleaved_matrix<quant::q4_0>;
};
template <class Exec>
struct inference_weights<quant::q8_0, Exec> {
  using type = std::conditional_t<ops::interleave_q8_0<Exec>, quant::interleaved_matrix<quant::q8_0>,
                                  quant::packed_matrix<quant::q8_0>>;
};

/// A decoder-only Transformer prepared for generation. Every linear layer
/// (qkv, attention output, MLP up and down, and the LM head, tied or not) is
/// packed in Format (in an inference_weights<Format, Exec> matrix); the token and
/// position embeddings, norms and biases stay fp32. Activations live in
/// scratch sized at construction for max_chunk tokens: prefill and decode
/// allocate nothing.
///
/// The model is stateless between calls apart from that scratch: the
/// sequence state is the KV cache the caller passes in (make_cache builds one
/// of the right shape), so one model serves any number of caches -- but not
/// from two threads at once.
/// @tparam Cfg an nn::model_config
/// @tparam Format the weight format of the linear layers (quant::fp32, bf16_weights, q8_0, q4_0, int8_rowwise)
/// @tparam KvPolicy the cache policy (kv::contiguous<E>, kv::paged<B, E>)
/// @tparam Exec the execution policy (cpu::par_t)
template <class Cfg, quant::weight_format Format = quant::fp32, kv_policy KvPolicy = kv::contiguous<float>,
          execution_policy Exec = cpu::par_t>
class inference_model {
  static_assert(nn::check_model_config<Cfg>());
  static_assert(std::is_same_v<Exec, cpu::par_t>,
                "ctformer: inference_model runs on cpu::par_t (its packed weights live in host memory)");

 public:
  using config = Cfg;
  using traits = nn::config_traits<Cfg>;
  using format = Format;
  using kv_policy_type = KvPolicy;
  using cache_type = kv_cache<KvPolicy>;
  using exec_type = Exec;

  static constexpr index_t vocab = traits::vocab, d_model = traits::d_model, n_layer = traits::n_layer,
                           n_head = traits::n_head, n_kv_head = traits::n_kv_head, head_dim = traits::head_dim,
                           d_ff = traits::d_ff, max_seq = traits::max_seq;
  static constexpr bool learned_positions = std::is_same_v<typename Cfg::position, nn::learned_position>;
  static constexpr bool rotary = std::is_same_v<typename Cfg::position, nn::rope>;
  static constexpr bool layer_norm = std::is_same_v<typename Cfg::norm, nn::layer_norm>;
  /// The matrix type of every linear layer's weights.
  using weight_matrix = typename inference_weights<Format, Exec>::type;
  /// Whether prefill chunks run an integer GEMM rather than dequantizing to fp32.
  static constexpr bool integer_gemm = quant::is_interleaved_matrix<weight_matrix>;

  /// Whether prefill chunks of bf16 weights round their activations to bf16
  /// and run the native bf16 GEMM (AVX512_BF16: twice the fp32 rate), as
  /// PyTorch's bf16 autocast does, rather than widening the weights to fp32.
  /// Decode keeps fp32 activations either way.
  static constexpr bool bf16_gemm = std::is_same_v<Format, quant::bf16_weights> && ops::gemm_bf16_native<Exec>;

  /// Chunks of at least this many tokens dequantize a row-major packed
  /// matrix whole and use the fp32 GEMM (bf16 weights with bf16_gemm: round
  /// the activations and use the bf16 GEMM); shorter ones use the
  /// packed-weight GEMM (interleaved matrices always run their int8 GEMM).
  static constexpr index_t dequantize_min_tokens = 16;

  /// The default (and largest default) prefill chunk.
  static constexpr index_t default_max_chunk = std::min<index_t>(max_seq, 256);

  /// Copies (and packs) the weights of a trained model.
  /// @param max_chunk the most tokens one prefill chunk may hold (sizes the scratch)
  explicit inference_model(const nn::model<Cfg, cpu::par_t>& trained, index_t max_chunk = default_max_chunk,
                           Exec exec = Exec{})
      : inference_model(trained.parameters(), trained.parameter_table(), max_chunk, exec) {}

  /// From a flat parameter buffer in nn::model's layout (parameter_table()):
  /// what a checkpoint loader or a benchmark with random weights passes.
  /// Throws shape_error when a tensor is missing or has another shape.
  inference_model(tensor_view<const float, 1> parameters, const std::vector<nn::parameter_info>& table,
                  index_t max_chunk = default_max_chunk, Exec exec = Exec{})
      : exec_(exec), max_chunk_(max_chunk) {
    if (max_chunk <= 0 || max_chunk > max_seq)
      throw invalid_input("ctformer::infer::inference_model: max_chunk " + std::to_string(max_chunk) +
                          " must be in [1, max_seq = " + std::to_string(max_seq) + "]");
    load(parameters, table);
    allocate_scratch();
    if constexpr (rotary) build_rope_tables();
  }

  inference_model(const inference_model&) = delete;
  inference_model& operator=(const inference_model&) = delete;

  /// nn::model<Cfg>'s parameter layout, without building a model (and its
  /// gradient buffer): for filling a flat buffer from another source.
  static std::vector<nn::parameter_info> parameter_table() {
    nn::model_tensors<Cfg> probe;
    nn::parameter_layout layout;
    probe.visit([&]<int Rank>(const std::string& name, tensor_view<float, Rank>&, std::vector<index_t> shape,
                              nn::parameter_kind kind) { layout.add(name, std::move(shape), kind); });
    return layout.table();
  }
  /// Floats a flat buffer for parameter_table() holds.
  static index_t parameter_count() {
    const auto table = parameter_table();
    return table.empty() ? 0 : table.back().offset + table.back().size();
  }

  const Exec& exec() const { return exec_; }
  /// Changes the threads the model runs on (the packed weights stay).
  void set_exec(Exec exec) { exec_ = exec; }
  index_t max_chunk() const { return max_chunk_; }

  /// A cache of this model's shape (n_layer, n_kv_head, head_dim, max_seq).
  /// @param capacity contiguous: sequence slots; paged: positions in the pool
  cache_type make_cache(index_t capacity) const { return cache_type(n_layer, n_kv_head, head_dim, max_seq, capacity); }

  /// Bytes of the packed linear weights: what one decode step streams from
  /// memory (the embedding row, norms and biases add under 0.1%).
  std::size_t weight_bytes() const {
    std::size_t total = lm_head_.bytes();
    for (const auto& l : layers_) total += l.qkv.bytes() + l.output.bytes() + l.up.bytes() + l.down.bytes();
    return total;
  }
  /// Bytes of the fp32 tensors (embeddings, norms, biases).
  std::size_t dense_bytes() const { return dense_.bytes(); }

  /// Runs the prompt tokens through the model at the sequence's next
  /// positions [length, length + n), in chunks of at most `chunk` tokens
  /// (0: max_chunk()), writing their keys and values into the cache, and
  /// returns the logits (vocab) of the last position, valid until the next call.
  /// Throws invalid_input for an empty prompt, a token outside [0, vocab),
  /// positions past max_seq or a bad chunk; cache_exhausted when the cache
  /// cannot hold them (nothing is written then); shape_error for a cache of
  /// another shape.
  std::span<const float> prefill(cache_type& cache, sequence_id seq, std::span<const std::int32_t> tokens,
                                 index_t chunk = 0) {
    check_cache(cache);
    if (chunk == 0) chunk = max_chunk_;
    if (chunk < 0 || chunk > max_chunk_)
      throw invalid_input("ctformer::infer::inference_model::prefill: chunk " + std::to_string(chunk) +
                          " must be in [1, max_chunk = " + std::to_string(max_chunk_) + "] (or 0 for max_chunk)");
    if (tokens.empty()) throw invalid_input("ctformer::infer::inference_model::prefill: the prompt is empty");
    const index_t start = cache.length(seq);
    check_tokens("prefill", tokens, start);
    cache.reserve(seq, start + index_t(tokens.size()));
    for (index_t done = 0; done < index_t(tokens.size()); done += chunk) {
      const index_t n = std::min<index_t>(chunk, index_t(tokens.size()) - done);
      forward(cache, seq, tokens.subspan(std::size_t(done), std::size_t(n)), start + done,
              done + n == index_t(tokens.size()));
      cache.set_length(seq, start + done + n);
    }
    return {logits_.data(), std::size_t(vocab)};
  }

  /// One token at the sequence's next position: returns its logits (vocab),
  /// valid until the next call. Same errors as prefill.
  std::span<const float> decode(cache_type& cache, sequence_id seq, std::int32_t token) {
    check_cache(cache);
    const index_t start = cache.length(seq);
    check_tokens("decode", std::span<const std::int32_t>(&token, 1), start);
    cache.reserve(seq, start + 1);
    forward(cache, seq, std::span<const std::int32_t>(&token, 1), start, true);
    cache.set_length(seq, start + 1);
    return {logits_.data(), std::size_t(vocab)};
  }

 private:
  struct layer_weights {
    tensor_view<float, 1> attention_norm_weight, attention_norm_bias;  // (C)
    tensor_view<float, 1> mlp_norm_weight, mlp_norm_bias;              // (C)
    tensor_view<float, 1> qkv_bias, output_bias, up_bias, down_bias;   // (qkv_width), (C), (up_width), (C)
    weight_matrix qkv;     // (qkv_width, C)
    weight_matrix output;  // (C, C)
    weight_matrix up;      // (up_width, C): gate rows first when gated
    weight_matrix down;    // (C, F)
  };

  // --- construction -------------------------------------------------------------
  void load(tensor_view<const float, 1> parameters, const std::vector<nn::parameter_info>& table) {
    auto find = [&](const std::string& name, std::vector<index_t> shape) -> const float* {
      for (const auto& p : table)
        if (p.name == name) {
          if (p.shape != shape || p.offset + p.size() > parameters.extent(0))
            throw shape_error("ctformer::infer::inference_model: parameter " + name +
                              " has another shape than the configuration's, or lies outside the buffer");
          return parameters.data() + p.offset;
        }
      throw shape_error("ctformer::infer::inference_model: the parameter table has no " + name);
    };
    // The fp32 tensors go into one buffer: count first, then copy.
    constexpr index_t c = d_model;
    index_t dense_floats = vocab * c + (learned_positions ? max_seq * c : 0) + 2 * c * (layer_norm ? 2 : 1);
    dense_floats += n_layer * (4 * c + traits::qkv_width + 2 * c + traits::up_width);
    dense_ = buffer<float>(std::size_t(dense_floats), 0.0f);
    index_t used = 0;
    auto take = [&](const std::string& name, index_t n) {
      tensor_view<float, 1> v(dense_.data() + used, {n});
      const float* src = find(name, {n});
      std::copy(src, src + n, v.data());
      used += n;
      return v;
    };
    auto take2 = [&](const std::string& name, index_t rows, index_t cols) {
      tensor_view<float, 2> v(dense_.data() + used, {rows, cols});
      const float* src = find(name, {rows, cols});
      std::copy(src, src + rows * cols, v.data());
      used += rows * cols;
      return v;
    };
    // Every linear weight goes into one arena, each matrix aligned as a
    // buffer of its own would be (host_space::alignment): one allocation
    // large enough for huge pages, which one matrix of a few hundred KB is
    // not. Decode streams the arena front to back, a layer's matrices in the
    // order they are used.
    const auto aligned_bytes = [](index_t rows, index_t cols) {
      constexpr std::size_t alignment = host_space::alignment;
      return (Format::bytes_for(rows, cols) + alignment - 1) / alignment * alignment;
    };
    weight_arena_ = buffer<std::byte>(
        std::size_t(n_layer) * (aligned_bytes(traits::qkv_width, c) + aligned_bytes(c, c) +
                                aligned_bytes(traits::up_width, c) + aligned_bytes(c, d_ff)) +
        aligned_bytes(vocab, c));
    std::size_t arena_used = 0;
    auto pack = [&](const std::string& name, index_t rows, index_t cols) {
      std::byte* storage = weight_arena_.data() + arena_used;
      arena_used += aligned_bytes(rows, cols);
      const tensor_view<const float, 2> source(find(name, {rows, cols}), {rows, cols});
      if constexpr (std::is_same_v<weight_matrix, quant::packed_matrix<Format>>) {
        weight_matrix m(rows, cols, storage);
        ops::quantize(exec_, source, m);
        return m;
      } else {
        quant::packed_matrix<Format> m(rows, cols);
        ops::quantize(exec_, source, m);
        return weight_matrix(m, storage);
      }
    };
    auto zeros = [&](index_t n) {
      tensor_view<float, 1> v(dense_.data() + used, {n});
      used += n;
      return v;
    };

    token_embedding_ = take2("token_embedding.weight", vocab, c);
    if constexpr (learned_positions) position_embedding_ = take2("position_embedding.weight", max_seq, c);
    for (index_t l = 0; l < n_layer; ++l) {
      const std::string p = "blocks." + std::to_string(l) + ".";
      layer_weights& w = layers_[std::size_t(l)];
      w.attention_norm_weight = take(p + "attention_norm.weight", c);
      w.attention_norm_bias = layer_norm ? take(p + "attention_norm.bias", c) : zeros(c);
      w.mlp_norm_weight = take(p + "mlp_norm.weight", c);
      w.mlp_norm_bias = layer_norm ? take(p + "mlp_norm.bias", c) : zeros(c);
      w.qkv_bias = traits::bias ? take(p + "attention.qkv.bias", traits::qkv_width) : zeros(traits::qkv_width);
      w.output_bias = traits::bias ? take(p + "attention.output.bias", c) : zeros(c);
      w.up_bias = traits::bias ? take(p + "mlp.up.bias", traits::up_width) : zeros(traits::up_width);
      w.down_bias = traits::bias ? take(p + "mlp.down.bias", c) : zeros(c);
      w.qkv = pack(p + "attention.qkv.weight", traits::qkv_width, c);
      w.output = pack(p + "attention.output.weight", c, c);
      w.up = pack(p + "mlp.up.weight", traits::up_width, c);
      w.down = pack(p + "mlp.down.weight", c, d_ff);
    }
    final_norm_weight_ = take("final_norm.weight", c);
    final_norm_bias_ = layer_norm ? take("final_norm.bias", c) : zeros(c);
    lm_head_ = pack(traits::tie_embeddings ? "token_embedding.weight" : "lm_head.weight", vocab, c);
  }

  void allocate_scratch() {
    const index_t t = max_chunk_;
    const index_t floats = t * (4 * d_model + traits::qkv_width + traits::up_width + d_ff + 2) + vocab;
    scratch_ = buffer<float>(std::size_t(floats), 0.0f);
    float* p = scratch_.data();
    auto carve = [&](index_t n) {
      float* at = p;
      p += n;
      return at;
    };
    x_ = carve(t * d_model);
    normed_ = carve(t * d_model);
    attention_ = carve(t * d_model);
    projection_ = carve(t * d_model);
    qkv_ = carve(t * traits::qkv_width);
    up_ = carve(t * traits::up_width);
    activation_ = carve(t * d_ff);
    mean_ = carve(t);
    rstd_ = carve(t);
    logits_ = tensor_view<float, 1>(carve(vocab), {vocab});
    ids_ = buffer<std::int32_t>(std::size_t(2 * t), 0);
    if constexpr (bf16_gemm) {
      if (t >= dequantize_min_tokens) activation_bf16_ = buffer<bf16>(std::size_t(t * std::max(d_model, d_ff)));
    } else if constexpr (!std::is_same_v<Format, quant::fp32> && !integer_gemm) {
      if (t >= dequantize_min_tokens)
        weight_scratch_ = buffer<float>(std::size_t(std::max({traits::qkv_width * d_model, d_model * d_model,
                                                              traits::up_width * d_model, d_model * d_ff})));
    }
  }

  void build_rope_tables() {
    // The same tables as nn::model (angles in double, then rounded), so the
    // cached path rotates by exactly the training path's cos and sin.
    const index_t half = head_dim / 2;
    rope_ = buffer<float>(std::size_t(2 * max_seq * half));
    for (index_t pos = 0; pos < max_seq; ++pos)
      for (index_t i = 0; i < half; ++i) {
        const double frequency = std::pow(double(traits::rope_base), -2.0 * double(i) / double(head_dim));
        rope_[std::size_t(pos * half + i)] = float(std::cos(double(pos) * frequency));
        rope_[std::size_t(max_seq * half + pos * half + i)] = float(std::sin(double(pos) * frequency));
      }
  }

  // --- checks -------------------------------------------------------------------
  void check_cache(const cache_type& cache) const {
    if (cache.n_layer() != n_layer || cache.n_kv_head() != n_kv_head || cache.head_dim() != head_dim ||
        cache.max_seq() > max_seq)
      throw shape_error("ctformer::infer::inference_model: the cache has (n_layer, n_kv_head, head_dim, max_seq) = (" +
                        std::to_string(cache.n_layer()) + ", " + std::to_string(cache.n_kv_head()) + ", " +
                        std::to_string(cache.head_dim()) + ", " + std::to_string(cache.max_seq()) +
                        "), the model needs (" + std::to_string(n_layer) + ", " + std::to_string(n_kv_head) + ", " +
                        std::to_string(head_dim) + ", <= " + std::to_string(max_seq) + ")");
  }

  static void check_tokens(const char* where, std::span<const std::int32_t> tokens, index_t start) {
    if (start + index_t(tokens.size()) > max_seq)
      throw invalid_input(std::string("ctformer::infer::inference_model::") + where + ": " +
                          std::to_string(tokens.size()) + " tokens after the sequence's " + std::to_string(start) +
                          " do not fit the model's context of max_seq = " + std::to_string(max_seq) + " positions");
    for (std::size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] < 0 || tokens[i] >= vocab)
        throw invalid_input(std::string("ctformer::infer::inference_model::") + where + ": token id " +
                            std::to_string(tokens[i]) + " at position " + std::to_string(i) +
                            " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  }

  // --- forward ------------------------------------------------------------------
  // y (T, O) = x (T, I) W^T + bias: the fused dequantise-and-dot GEMV for one
  // token, the tiled packed GEMM for a chunk.
  void linear(const weight_matrix& w, tensor_view<const float, 2> x, tensor_view<float, 2> y,
              tensor_view<float, 1> bias) {
    if (x.extent(0) == 1) {
      ops::quantized_gemv(exec_, w, x[0], y[0]);
    } else if constexpr (std::is_same_v<Format, quant::fp32>) {
      // fp32 rows are a plain (out, in) matrix: the packed, blocked fp32 GEMM
      // beats the packed-weight GEMM's small 4 x 3 micro-kernel here.
      const tensor_view<const float, 2> weights(reinterpret_cast<const float*>(w.data()), {w.rows(), w.cols()});
      ops::gemm(exec_, x, weights.transposed(), y);
    } else if constexpr (bf16_gemm) {
      if (x.extent(0) >= dequantize_min_tokens) {
        const index_t t = x.extent(0), in = x.extent(1);
        const tensor_view<bf16, 2> rounded(activation_bf16_.data(), {t, in});
        for (index_t i = 0; i < t; ++i) ops::convert(exec_, x[i], rounded[i]);
        const tensor_view<const bf16, 2> weights(reinterpret_cast<const bf16*>(w.data()), {w.rows(), w.cols()});
        ops::gemm(exec_, as_const(rounded), weights.transposed(), y);
      } else {
        ops::quantized_gemm(exec_, w, x, y);
      }
    } else if constexpr (integer_gemm) {
      // Interleaved q4_0: the int8 GEMM (tokens rounded to int8 blocks as at
      // decode) beats dequantizing to fp32 at every chunk length.
      ops::quantized_gemm(exec_, w, x, y);
    } else if (x.extent(0) >= dequantize_min_tokens) {
      // A long chunk: dequantize the whole matrix once into scratch (cheap
      // next to T dot products per weight) and run the blocked fp32 GEMM.
      const tensor_view<float, 2> weights(weight_scratch_.data(), {w.rows(), w.cols()});
      ops::dequantize(exec_, w, weights);
      ops::gemm(exec_, x, as_const(weights).transposed(), y);
    } else {
      ops::quantized_gemm(exec_, w, x, y);
    }
    if constexpr (traits::bias) ops::add_bias(exec_, y, as_const(bias));
  }

  void norm(tensor_view<const float, 2> x, tensor_view<float, 1> weight, tensor_view<float, 1> bias,
            tensor_view<float, 2> y) {
    const index_t t = x.extent(0);
    tensor_view<float, 1> mean(mean_, {t}), rstd(rstd_, {t});
    if constexpr (layer_norm)
      ops::layer_norm_forward(exec_, x, as_const(weight), as_const(bias), y, mean, rstd, traits::norm_eps);
    else
      ops::rms_norm_forward(exec_, x, as_const(weight), y, rstd, traits::norm_eps);
  }

  static tensor_view<float, 1> flat(float* p, index_t n) { return {p, {n}}; }

  // Tokens at positions [start, start + T) of seq; leaves the logits of the
  // last one in logits_ when want_logits.
  void forward(cache_type& cache, sequence_id seq, std::span<const std::int32_t> tokens, index_t start,
               bool want_logits) {
    const index_t t = index_t(tokens.size());
    constexpr index_t c = d_model, w = traits::qkv_width;
    std::int32_t* ids = ids_.data();
    for (index_t i = 0; i < t; ++i) {
      ids[i] = tokens[std::size_t(i)];
      ids[t + i] = std::int32_t(start + i);
    }
    tensor_view<float, 2> x(x_, {t, c});              // x: (T, C) the residual stream
    tensor_view<float, 2> normed(normed_, {t, c});    // (T, C)
    tensor_view<float, 2> projection(projection_, {t, c});
    tensor_view<float, 2> qkv(qkv_, {t, w});          // (T, qkv_width): q, k, v heads side by side
    tensor_view<float, 2> attention(attention_, {t, c});
    tensor_view<float, 2> up(up_, {t, traits::up_width});
    tensor_view<float, 2> activation(activation_, {t, d_ff});

    ops::embedding_forward(exec_, tensor_view<const std::int32_t, 1>(ids, {t}), as_const(token_embedding_), x);
    if constexpr (learned_positions) {
      ops::embedding_forward(exec_, tensor_view<const std::int32_t, 1>(ids + t, {t}), as_const(position_embedding_),
                             projection);
      ops::add(exec_, flat(x_, t * c), flat(projection_, t * c), flat(x_, t * c));
    }

    const float scale = 1.0f / std::sqrt(float(head_dim));
    for (index_t l = 0; l < n_layer; ++l) {
      layer_weights& lw = layers_[std::size_t(l)];
      norm(x, lw.attention_norm_weight, lw.attention_norm_bias, normed);
      linear(lw.qkv, normed, qkv, lw.qkv_bias);
      // q: (T, H, D), k, v: (T, KV, D), strided views into the qkv rows.
      tensor_view<float, 3> q(qkv_, {t, n_head, head_dim}, {w, head_dim, 1});
      tensor_view<float, 3> k(qkv_ + n_head * head_dim, {t, n_kv_head, head_dim}, {w, head_dim, 1});
      tensor_view<float, 3> v(qkv_ + (n_head + n_kv_head) * head_dim, {t, n_kv_head, head_dim}, {w, head_dim, 1});
      if constexpr (rotary) {
        const tensor_view<const float, 2> cos_table(rope_.data(), {max_seq, head_dim / 2});
        const tensor_view<const float, 2> sin_table(rope_.data() + max_seq * (head_dim / 2), {max_seq, head_dim / 2});
        ops::rope_forward(exec_, tensor_view<float, 4>(q.data(), {1, t, n_head, head_dim}, {t * w, w, head_dim, 1}),
                          cos_table, sin_table, start);
        ops::rope_forward(exec_, tensor_view<float, 4>(k.data(), {1, t, n_kv_head, head_dim}, {t * w, w, head_dim, 1}),
                          cos_table, sin_table, start);
      }
      cache.write(l, seq, start, as_const(k), as_const(v));
      ops::cached_attention(exec_, as_const(q), cache.view(l, seq),
                            tensor_view<float, 3>(attention_, {t, n_head, head_dim}), start, scale);
      linear(lw.output, as_const(attention), projection, lw.output_bias);
      ops::add(exec_, flat(x_, t * c), flat(projection_, t * c), flat(x_, t * c));

      norm(x, lw.mlp_norm_weight, lw.mlp_norm_bias, normed);
      linear(lw.up, as_const(normed), up, lw.up_bias);
      if constexpr (traits::gated)
        ops::swiglu_forward(exec_, as_const(up), activation);
      else
        ops::gelu_forward(exec_, flat(up_, t * d_ff), flat(activation_, t * d_ff));
      linear(lw.down, as_const(activation), projection, lw.down_bias);
      ops::add(exec_, flat(x_, t * c), flat(projection_, t * c), flat(x_, t * c));
    }
    if (!want_logits) return;
    // Only the last position's logits are needed: one row through the final
    // norm and the LM head GEMV.
    tensor_view<float, 2> last(x_ + (t - 1) * c, {1, c}), last_normed(normed_, {1, c});
    norm(last, final_norm_weight_, final_norm_bias_, last_normed);
    ops::quantized_gemv(exec_, lm_head_, tensor_view<const float, 1>(normed_, {c}), logits_);
  }

  Exec exec_;
  index_t max_chunk_;
  buffer<float> dense_;  // embeddings, norms, biases (fp32)
  // The linear weights' bytes, which the matrices below live in (declared
  // first: destroyed after them).
  buffer<std::byte> weight_arena_;
  tensor_view<float, 2> token_embedding_, position_embedding_;  // (V, C), (max_seq, C)
  layer_weights layers_[n_layer];
  tensor_view<float, 1> final_norm_weight_, final_norm_bias_;  // (C)
  weight_matrix lm_head_;                                      // (V, C)
  buffer<float> rope_;                                         // cos (max_seq, D/2), then sin

  buffer<float> scratch_;
  float *x_ = nullptr, *normed_ = nullptr, *attention_ = nullptr, *projection_ = nullptr, *qkv_ = nullptr,
        *up_ = nullptr, *activation_ = nullptr, *mean_ = nullptr, *rstd_ = nullptr;
  tensor_view<float, 1> logits_;  // (V)
  buffer<std::int32_t> ids_;      // token ids, then positions: (2 * max_chunk)
  buffer<float> weight_scratch_;  // one block linear dequantized, for long chunks (packed formats only)
  buffer<bf16> activation_bf16_;  // a long chunk's activations rounded to bf16 (bf16_gemm only)
};

}  // namespace ctformer::infer
