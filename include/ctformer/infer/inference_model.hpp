// infer::inference_model<Cfg, Format, KvPolicy, Exec>: the decoder blocks of
// nn/block.hpp run for generation -- weights packed in a quant:: format (on
// CUDA: fp32 or bf16 device matrices), no activations saved, one forward call
// over a ragged batch of many sequences (prefill chunks and decode tokens
// together) reading and writing a KV cache, on cpu::par or cuda::par.
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
#include "ctformer/infer/batch.hpp"
#include "ctformer/infer/kv_cache.hpp"
#include "ctformer/nn/block.hpp"
#include "ctformer/nn/config.hpp"
#include "ctformer/nn/model.hpp"
#include "ctformer/nn/parameters.hpp"
#include "ctformer/ops/ops.hpp"
#include "ctformer/quant/interleaved_matrix.hpp"
#include "ctformer/quant/packed_matrix.hpp"

namespace ctformer::infer {

/// The matrix a linear layer's weights are kept in for inference: row-major
/// packed rows, except q4_0, whose rows are interleaved by 8 (the same bytes)
/// so that decode and prefill run integer kernels eight rows at a time (its
/// row-major GEMV is bound by nibble unpacking, the interleaved one by
/// memory), and q8_0 where ops::interleave_q8_0 says its integer GEMM beats
/// dequantizing to fp32 on this build.
/// On a policy whose memory the host cannot read (cuda::par): fp32 weights
/// are a device (out, in) fp32 matrix (one cuBLAS GEMM per linear layer), and
/// bf16_weights a device (out, in) bf16 matrix, multiplied with the
/// activations rounded to bf16 (ops::mixed_precision_weight, fp32
/// accumulation). Other formats have no device kernels yet.
template <class Format, class Exec, bool Host = Exec::memory_space::host_accessible>
struct inference_weights {
  using type = quant::packed_matrix<Format>;
};
template <class Exec>
struct inference_weights<quant::q4_0, Exec, true> {
  using type = quant::interleaved_matrix<quant::q4_0>;
};
template <class Exec>
struct inference_weights<quant::q8_0, Exec, true> {
  using type = std::conditional_t<ops::interleave_q8_0<Exec>, quant::interleaved_matrix<quant::q8_0>,
                                  quant::packed_matrix<quant::q8_0>>;
};
template <class Exec>
struct inference_weights<quant::fp32, Exec, false> {
  using type = tensor_view<const float, 2>;
};
template <class Exec>
struct inference_weights<quant::bf16_weights, Exec, false> {
  using type = tensor_view<const bf16, 2>;
};

/// Where an inference model's weights come from: fp32 tensors by name, and
/// linear weights packed in a format. This one reads a flat fp32 buffer in
/// nn::model's layout and quantizes the linear weights as they are asked for
/// (a checkpoint reader that holds packed bytes hands them over as they are).
class flat_parameter_source {
 public:
  flat_parameter_source(tensor_view<const float, 1> parameters, const std::vector<nn::parameter_info>& table)
      : parameters_(parameters), table_(table) {}

  /// The fp32 values of tensor `name`; throws shape_error when it is missing
  /// or has another shape.
  const float* dense(const std::string& name, const std::vector<index_t>& shape) const {
    for (const auto& p : table_)
      if (p.name == name) {
        if (p.shape != shape || p.offset + p.size() > parameters_.extent(0))
          throw shape_error("ctformer::infer::inference_model: parameter " + name +
                            " has another shape than the configuration's, or lies outside the buffer");
        return parameters_.data() + p.offset;
      }
    throw shape_error("ctformer::infer::inference_model: the parameter table has no " + name);
  }

  /// Fills `out` ((rows, cols), allocated) with tensor `name` packed in its format.
  template <class Format>
  void packed(const std::string& name, quant::packed_matrix<Format>& out) const {
    const tensor_view<const float, 2> source(dense(name, {out.rows(), out.cols()}), {out.rows(), out.cols()});
    ops::quantize(cpu::par, source, out);
  }

 private:
  tensor_view<const float, 1> parameters_;
  const std::vector<nn::parameter_info>& table_;
};

/// A decoder-only Transformer prepared for generation. Every linear layer
/// (qkv, attention output, MLP up and down, and the LM head, tied or not) is
/// kept in an inference_weights<Format, Exec> matrix; embeddings, norms and
/// biases stay fp32. Activations live in scratch sized at construction for
/// max_chunk rows: a forward call allocates nothing (the logits scratch grows
/// to the most logit rows one call has asked for).
///
/// The model is stateless between calls apart from that scratch: the
/// sequences' state is the KV cache the caller passes in (make_cache builds
/// one of the right shape), so one model serves any number of caches -- but
/// not from two threads at once.
///
/// On cuda::par the weights, the scratch and the cache live in device memory
/// and every kernel runs on the policy's stream; the weights are still read
/// from host sources (a trained nn::model<Cfg, cpu::par_t>, a flat buffer, a
/// quantized checkpoint) and uploaded once. Each forward call uploads the
/// batch's token ids and positions, and copies the logit rows it returns
/// back to a host buffer (the stream synchronised): the returned logits are
/// host memory on every policy, as sampling and generate() need.
/// @tparam Cfg an nn::model_config
/// @tparam Format the weight format of the linear layers (quant::fp32, bf16_weights, q8_0, q4_0,
///   int8_rowwise; fp32 and bf16_weights on cuda::par)
/// @tparam KvPolicy the cache policy (kv::contiguous<E>, kv::paged<B, E>)
/// @tparam Exec the execution policy (cpu::par_t; cuda::par_t under nvcc)
template <class Cfg, quant::weight_format Format = quant::fp32, kv_policy KvPolicy = kv::contiguous<float>,
          execution_policy Exec = cpu::par_t>
class inference_model {
  static_assert(nn::check_model_config<Cfg>());
  static_assert(!nn::config_traits<Cfg>::has_adapters,
                "ctformer: inference runs a configuration without LoRA adapters: fold them into the base model "
                "first (nn::merge_lora), then load, quantize or serve that");
  /// Whether the model's memory is a device's (cuda::par): weights, scratch and cache there.
  static constexpr bool on_device = !Exec::memory_space::host_accessible;
  static_assert(on_device || std::is_same_v<Exec, cpu::par_t>,
                "ctformer: inference_model runs on cpu::par_t or on a device policy (cuda::par_t)");
  static_assert(!on_device || std::is_same_v<Format, quant::fp32> || std::is_same_v<Format, quant::bf16_weights>,
                "ctformer: inference_model on CUDA takes fp32 or bf16_weights weights; quantized formats (q8_0, "
                "q4_0, int8_rowwise, sparse) run on cpu::par only for now");

 public:
  using config = Cfg;
  using traits = nn::config_traits<Cfg>;
  using format = Format;
  using kv_policy_type = KvPolicy;
  using cache_type = kv_cache<KvPolicy, Exec>;
  using exec_type = Exec;
  using block = nn::decoder_block<Cfg>;

  static constexpr index_t vocab = traits::vocab, d_model = traits::d_model, n_layer = traits::n_layer,
                           n_head = traits::n_head, n_kv_head = traits::n_kv_head, head_dim = traits::head_dim,
                           d_ff = traits::d_ff, max_seq = traits::max_seq;
  static constexpr bool learned_positions = std::is_same_v<typename Cfg::position, nn::learned_position>;
  /// The matrix type of every linear layer's weights.
  using weight_matrix = typename inference_weights<Format, Exec>::type;
  /// The model's parameters: nn::model's list of tensors, with packed matrices.
  using weights_type = nn::model_weights<Cfg, weight_matrix>;
  /// Whether prefill chunks run an integer GEMM rather than dequantizing to fp32.
  static constexpr bool integer_gemm = quant::is_interleaved_matrix<weight_matrix>;
  /// Whether the linear layers round their activations to bf16 (bf16 weights on a device).
  static constexpr bool rounds_activations = on_device && std::is_same_v<Format, quant::bf16_weights>;

  /// The default number of rows one forward call holds (a batch of many
  /// sequences may hold more than max_seq: pass a larger max_chunk).
  static constexpr index_t default_max_chunk = std::min<index_t>(max_seq, 256);

  /// Copies (and packs) the weights of a trained model.
  /// @param max_chunk the most rows one forward call may hold: a prefill
  ///   chunk, or a batch's tokens in all (sizes the scratch)
  explicit inference_model(const nn::model<Cfg, cpu::par_t>& trained, index_t max_chunk = default_max_chunk,
                           Exec exec = Exec{})
      : inference_model(trained.parameters(), trained.parameter_table(), max_chunk, exec) {}

  /// From a flat parameter buffer in nn::model's layout (parameter_table()):
  /// what a checkpoint loader or a benchmark with random weights passes.
  /// Throws shape_error when a tensor is missing or has another shape.
  inference_model(tensor_view<const float, 1> parameters, const std::vector<nn::parameter_info>& table,
                  index_t max_chunk = default_max_chunk, Exec exec = Exec{})
      : inference_model(flat_parameter_source(parameters, table), max_chunk, exec) {}

  /// From any weight source (flat_parameter_source's two members): a
  /// quantized checkpoint hands its packed matrices over without a detour
  /// through fp32.
  template <class Source>
    requires requires(const Source& s, const std::string& name, quant::packed_matrix<Format>& m) {
      { s.dense(name, std::vector<index_t>{}) } -> std::convertible_to<const float*>;
      s.packed(name, m);
    }
  inference_model(const Source& source, index_t max_chunk = default_max_chunk, Exec exec = Exec{})
      : exec_(exec), max_chunk_(max_chunk), rope_(exec) {
    if (max_chunk <= 0)
      throw invalid_input("ctformer::infer::inference_model: max_chunk " + std::to_string(max_chunk) +
                          " must be positive");
    load(source);
    allocate_scratch();
  }

  inference_model(const inference_model&) = delete;
  inference_model& operator=(const inference_model&) = delete;

  /// nn::model<Cfg>'s parameter layout, without building a model (and its
  /// gradient buffer): for filling a flat buffer from another source.
  static std::vector<nn::parameter_info> parameter_table() { return nn::parameter_table_of<Cfg>(); }
  /// Floats a flat buffer for parameter_table() holds.
  static index_t parameter_count() { return nn::parameter_count_of<Cfg>(); }

  const Exec& exec() const { return exec_; }
  /// Changes the threads (or the stream) the model runs on; the weights stay.
  /// A CUDA cache runs on the stream it was made with: forward refuses one of another stream.
  void set_exec(Exec exec) { exec_ = exec; }
  /// The most rows one forward call holds.
  index_t max_chunk() const { return max_chunk_; }
  const weights_type& weights() const { return weights_; }

  /// A cache of this model's shape (n_layer, n_kv_head, head_dim, max_seq).
  /// @param capacity contiguous: sequence slots; paged: positions in the pool
  /// Windowed layers (a sliding-window pattern) keep a ring of their window per sequence.
  /// @param max_sequences paged caches with windowed layers: the most sequences open at once (sizes the rings)
  /// The cache lives in the memory of the model's policy and runs on its stream.
  cache_type make_cache(index_t capacity, index_t max_sequences = 0) const {
    std::vector<index_t> windows(static_cast<std::size_t>(n_layer), index_t(0));
    for (index_t l = 0; l < n_layer; ++l) windows[std::size_t(l)] = traits::window_of(int(l));
    return cache_type(n_layer, n_kv_head, head_dim, max_seq, capacity, std::move(windows), max_sequences, exec_);
  }

  /// Bytes of the packed linear weights: what one decode step streams from
  /// memory (the embedding row, norms and biases add under 0.1%).
  std::size_t weight_bytes() const { return weight_bytes_; }
  /// Bytes of the fp32 tensors (embeddings, norms, biases).
  std::size_t dense_bytes() const { return dense_.bytes(); }

  /// One forward call over a ragged batch: every row's token goes through
  /// the model at its position in its sequence, keys and values are written
  /// to the cache, each row attends to its own sequence's positions up to
  /// its own, and the sequences' lengths grow by their rows. Each weight
  /// matrix is streamed once for the whole batch.
  /// Returns the logits of the rows that asked for them, in row order:
  /// (logit_rows, vocab) in host memory (on a device policy copied back, the
  /// stream synchronised), valid until the next call.
  /// Throws, naming the row and leaving the cache unchanged: invalid_input
  /// for an empty batch or one of more than max_chunk() rows, a token
  /// outside [0, vocab), a sequence that is not open, a sequence whose rows
  /// are not consecutive in the batch, a position that is not the next one
  /// of its sequence or passes max_seq; cache_exhausted when the pool cannot
  /// hold the new positions; shape_error for a cache of another shape.
  tensor_view<const float, 2> forward(cache_type& cache, const batch& rows) {
    check_cache(cache);
    plan(cache, rows);
    for (const auto& seg : segments_) cache.reserve(seg.sequence, seg.start + seg.rows);
    try {
      run(cache, rows);
      exec_.synchronize();  // a device kernel's failure is this call's error (nothing to wait for on the CPU)
    } catch (...) {
      for (const auto& seg : segments_) cache.release_unused(seg.sequence);
      throw;
    }
    for (const auto& seg : segments_) cache.set_length(seg.sequence, seg.start + seg.rows);
    return tensor_view<const float, 2>(host_logits(), {logit_rows_, vocab});
  }

  /// Runs the prompt tokens through the model at the sequence's next
  /// positions [length, length + n), in chunks of at most `chunk` tokens
  /// (0: max_chunk()), and returns the logits (vocab) of the last position,
  /// valid until the next call. Errors as forward's; nothing is written for
  /// a chunk that fails.
  std::span<const float> prefill(cache_type& cache, sequence_id seq, std::span<const std::int32_t> tokens,
                                 index_t chunk = 0) {
    if (chunk == 0) chunk = max_chunk_;
    if (chunk < 0 || chunk > max_chunk_)
      throw invalid_input("ctformer::infer::inference_model::prefill: chunk " + std::to_string(chunk) +
                          " must be in [1, max_chunk = " + std::to_string(max_chunk_) + "] (or 0 for max_chunk)");
    if (tokens.empty()) throw invalid_input("ctformer::infer::inference_model::prefill: the prompt is empty");
    check_cache(cache);
    const index_t start = cache.length(seq);
    if (start + index_t(tokens.size()) > max_seq)
      throw invalid_input("ctformer::infer::inference_model::prefill: " + std::to_string(tokens.size()) +
                          " tokens after the sequence's " + std::to_string(start) +
                          " do not fit the model's context of max_seq = " + std::to_string(max_seq) + " positions");
    for (std::size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] < 0 || tokens[i] >= vocab)
        throw invalid_input("ctformer::infer::inference_model::prefill: token id " + std::to_string(tokens[i]) +
                            " at position " + std::to_string(i) + " of the prompt is outside the vocabulary [0, " +
                            std::to_string(vocab) + ")");
    for (index_t done = 0; done < index_t(tokens.size()); done += chunk) {
      const index_t n = std::min<index_t>(chunk, index_t(tokens.size()) - done);
      single_.clear();
      single_.add_tokens(seq, start + done, tokens.subspan(std::size_t(done), std::size_t(n)),
                         done + n == index_t(tokens.size()));
      forward(cache, single_);
    }
    return {host_logits(), std::size_t(vocab)};
  }

  /// One token at the sequence's next position: returns its logits (vocab),
  /// valid until the next call. Errors as forward's.
  std::span<const float> decode(cache_type& cache, sequence_id seq, std::int32_t token) {
    single_.clear();
    single_.add(token, cache.length(seq), seq, true);
    forward(cache, single_);
    return {host_logits(), std::size_t(vocab)};
  }

 private:
  // The rows of one sequence in a batch.
  struct segment {
    sequence_id sequence;
    index_t first_row, rows, start;
  };

  // --- construction -------------------------------------------------------------
  template <class Source>
  void load(const Source& source) {
    // Two walks over the parameter list: the first sizes the fp32 buffer and
    // the weight arena, the second fills them, so the two cannot disagree.
    // Every matrix sits in one arena, aligned as a buffer of its own would be
    // (host_space::alignment): one allocation large enough for huge pages,
    // which one matrix of a few hundred KB is not. Decode streams the arena
    // front to back, a layer's matrices in the order they are used. On a
    // device the matrices start at 256 bytes, the alignment cuBLASLt assumes
    // of a whole allocation, and the host sources are staged and uploaded.
    constexpr std::size_t alignment = on_device ? std::size_t(256) : host_space::alignment;
    const auto aligned_bytes = [](index_t rows, index_t cols) {
      return (Format::bytes_for(rows, cols) + alignment - 1) / alignment * alignment;
    };
    index_t dense_floats = 0;
    std::size_t arena_bytes = 0;
    auto count = [&](const std::string&, auto& member, const std::vector<index_t>& shape, nn::parameter_kind) {
      if constexpr (std::is_same_v<std::remove_cvref_t<decltype(member)>, weight_matrix>)
        arena_bytes += aligned_bytes(shape[0], shape[1]);
      else
        dense_floats += shape.size() == 1 ? shape[0] : shape[0] * shape[1];
    };
    weights_.visit(count);
    if constexpr (traits::tie_embeddings) arena_bytes += aligned_bytes(vocab, d_model);
    // A device model fills a host copy of the fp32 tensors and uploads it once.
    std::vector<float> dense_staging;
    if constexpr (on_device) {
      dense_ = buffer_for<float, Exec>(std::size_t(dense_floats));
      dense_staging.assign(std::size_t(dense_floats), 0.0f);
    } else {
      dense_ = buffer<float>(std::size_t(dense_floats), 0.0f);
    }
    float* dense_target = on_device ? dense_staging.data() : dense_.data();
    weight_arena_ = buffer_for<std::byte, Exec>(arena_bytes);

    index_t dense_used = 0;
    std::size_t arena_used = 0;
    auto pack = [&](const std::string& name, weight_matrix& m, index_t rows, index_t cols) {
      std::byte* storage = weight_arena_.data() + arena_used;
      arena_used += aligned_bytes(rows, cols);
      if constexpr (on_device) {
        // Packed fp32 and bf16 rows are the plain row-major matrix.
        using element = typename Format::block_type;
        quant::packed_matrix<Format> staging(rows, cols);
        source.packed(name, staging);
        element* device = reinterpret_cast<element*>(storage);
        ops::copy(exec_, tensor_view<const element, 1>(reinterpret_cast<const element*>(staging.data()), {rows * cols}),
                  tensor_view<element, 1>(device, {rows * cols}));
        exec_.synchronize();  // the staging matrix is freed on return
        m = weight_matrix(device, {rows, cols});
        weight_bytes_ += staging.bytes();
      } else if constexpr (std::is_same_v<weight_matrix, quant::packed_matrix<Format>>) {
        m = weight_matrix(rows, cols, storage);
        source.packed(name, m);
      } else {
        quant::packed_matrix<Format> rows_major(rows, cols);
        source.packed(name, rows_major);
        m = weight_matrix(rows_major, storage);
      }
      if constexpr (!on_device) weight_bytes_ += m.bytes();
    };
    auto fill = [&]<class Member>(const std::string& name, Member& member, const std::vector<index_t>& shape,
                                  nn::parameter_kind) {
      if constexpr (std::is_same_v<Member, weight_matrix>) {
        pack(name, member, shape[0], shape[1]);
      } else {
        const index_t size = shape.size() == 1 ? shape[0] : shape[0] * shape[1];
        const float* values = source.dense(name, shape);
        std::copy(values, values + size, dense_target + dense_used);
        if constexpr (std::is_same_v<Member, tensor_view<float, 1>>)
          member = tensor_view<float, 1>(dense_.data() + dense_used, {shape[0]});
        else
          member = tensor_view<float, 2>(dense_.data() + dense_used, {shape[0], shape[1]});
        dense_used += size;
      }
    };
    weights_.visit(fill);
    if constexpr (traits::tie_embeddings) pack("token_embedding.weight", weights_.lm_head, vocab, d_model);
    if constexpr (on_device) {
      ops::copy(exec_, tensor_view<const float, 1>(dense_staging.data(), {dense_floats}),
                tensor_view<float, 1>(dense_.data(), {dense_floats}));
      exec_.synchronize();
    }
  }

  // The scratch of one forward call, for `rows` rows: one walk that both
  // sizes (null base) and carves it.
  struct scratch_views {
    nn::block_activations layer;
    tensor_view<float, 2> attention_rows;  // (N, C): the attention's output, packed heads
  };
  static scratch_views carve(float* base, index_t rows, index_t* used = nullptr) {
    nn::arena_carver<float> f(base);
    scratch_views s;
    nn::block_activations& a = s.layer;
    a.residual_in = a.residual_mid = a.residual_out = f.take(rows, d_model);
    a.attention_norm_out = a.mlp_norm_out = f.take(rows, d_model);
    a.attention_norm_mean = a.mlp_norm_mean = f.take(rows);
    a.attention_norm_rstd = a.mlp_norm_rstd = f.take(rows);
    a.qkv = f.take(rows, traits::qkv_width);
    a.attention_out = f.take(rows, d_model);
    a.up_out = f.take(rows, traits::up_width);
    a.activation_out = f.take(rows, d_ff);
    s.attention_rows = a.attention_out;
    if (used) *used = f.used();
    return s;
  }

  void allocate_scratch() {
    index_t floats = 0;
    carve(nullptr, max_chunk_, &floats);
    if constexpr (on_device) {
      scratch_ = buffer_for<float, Exec>(std::size_t(floats));
      ops::fill(exec_, tensor_view<float, 1>(scratch_.data(), {floats}), 0.0f);
      ids_ = buffer_for<std::int32_t, Exec>(std::size_t(2 * max_chunk_));
      host_ids_.assign(std::size_t(2 * max_chunk_), 0);
      if constexpr (rounds_activations) {
        // The widest linear input: (rows, d_ff) into the down projection, (rows, d_model) elsewhere.
        const index_t widest = max_chunk_ * std::max<index_t>(d_model, d_ff);
        operand_scratch_ = buffer_for<bf16, Exec>(std::size_t(widest));
      }
      exec_.synchronize();
    } else {
      scratch_ = buffer<float>(std::size_t(floats), 0.0f);
      ids_ = buffer<std::int32_t>(std::size_t(2 * max_chunk_), 0);
    }
    logit_row_index_.reserve(std::size_t(max_chunk_));
    segments_.reserve(std::size_t(max_chunk_));
    attention_segments_.reserve(std::size_t(max_chunk_));
    single_.reserve(max_chunk_);
  }

  // --- checks -------------------------------------------------------------------
  void check_cache(const cache_type& cache) const {
    if constexpr (requires(const Exec& e) { e.stream; }) {
      if (cache.exec().stream != exec_.stream)
        throw invalid_input("ctformer::infer::inference_model: the cache runs on another stream than the model "
                            "(build it with make_cache, or give both the same policy)");
    }
    bool windows_match = true;
    for (index_t l = 0; l < n_layer && cache.n_layer() == n_layer; ++l)
      windows_match = windows_match && cache.window_of(l) == traits::window_of(int(l));
    if (!windows_match)
      throw shape_error("ctformer::infer::inference_model: the cache's layer windows are not the model's "
                        "attention pattern (build the cache with make_cache)");
    if (cache.n_layer() != n_layer || cache.n_kv_head() != n_kv_head || cache.head_dim() != head_dim ||
        cache.max_seq() > max_seq)
      throw shape_error("ctformer::infer::inference_model: the cache has (n_layer, n_kv_head, head_dim, max_seq) = (" +
                        std::to_string(cache.n_layer()) + ", " + std::to_string(cache.n_kv_head()) + ", " +
                        std::to_string(cache.head_dim()) + ", " + std::to_string(cache.max_seq()) +
                        "), the model needs (" + std::to_string(n_layer) + ", " + std::to_string(n_kv_head) + ", " +
                        std::to_string(head_dim) + ", <= " + std::to_string(max_seq) + ")");
  }

  // Validates the batch against the cache and cuts it into segments, one per
  // sequence; touches nothing.
  void plan(const cache_type& cache, const batch& rows) {
    static const std::string where = "ctformer::infer::inference_model::forward: ";
    const index_t n = rows.size();
    if (n == 0) throw invalid_input(where + "the batch is empty");
    if (n > max_chunk_)
      throw invalid_input(where + "the batch has " + std::to_string(n) + " rows, more than the " +
                          std::to_string(max_chunk_) + " the model's scratch holds (max_chunk); row " +
                          std::to_string(max_chunk_) + " is the first that does not fit");
    const auto tokens = rows.tokens();
    const auto positions = rows.positions();
    const auto sequences = rows.sequences();
    segments_.clear();
    index_t blocks = 0;
    for (index_t i = 0; i < n; ++i) {
      const auto row = [&] { return "row " + std::to_string(i) + ": "; };
      if (tokens[std::size_t(i)] < 0 || tokens[std::size_t(i)] >= vocab)
        throw invalid_input(where + row() + "token id " + std::to_string(tokens[std::size_t(i)]) +
                            " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
      const sequence_id seq = sequences[std::size_t(i)];
      const bool continues = !segments_.empty() && segments_.back().sequence == seq;
      if (!continues) {
        if (!cache.is_open(seq))
          throw invalid_input(where + row() + "sequence " + std::to_string(seq) + " is not open in the cache");
        for (const auto& seg : segments_)
          if (seg.sequence == seq)
            throw invalid_input(where + row() + "sequence " + std::to_string(seq) + " already had rows " +
                                std::to_string(seg.first_row) + ".." + std::to_string(seg.first_row + seg.rows - 1) +
                                "; a sequence's rows must be consecutive in the batch");
        segments_.push_back({seq, i, 0, cache.length(seq)});
      }
      segment& seg = segments_.back();
      const index_t expected = seg.start + seg.rows;
      if (positions[std::size_t(i)] != expected)
        throw invalid_input(where + row() + "position " + std::to_string(positions[std::size_t(i)]) +
                            " of sequence " + std::to_string(seq) + " is not its next position " +
                            std::to_string(expected));
      if (expected >= max_seq || expected >= cache.max_seq())
        throw invalid_input(where + row() + "position " + std::to_string(expected) + " of sequence " +
                            std::to_string(seq) + " is past the context of max_seq = " +
                            std::to_string(std::min<index_t>(max_seq, cache.max_seq())) + " positions");
      ++seg.rows;
    }
    index_t ring_blocks = 0;
    for (const auto& seg : segments_) {
      ring_blocks += cache.ring_blocks_needed(seg.sequence, seg.start + seg.rows);
      if (ring_blocks > cache.free_ring_block_count())
        throw cache_exhausted(where + "sequence " + std::to_string(seg.sequence) + " (rows " +
                              std::to_string(seg.first_row) + ".." + std::to_string(seg.first_row + seg.rows - 1) +
                              ") needs ring blocks for its windowed layers, but their pool has only " +
                              std::to_string(cache.free_ring_block_count()) + " free; nothing was written");
      const index_t needed = cache.blocks_needed(seg.sequence, seg.start + seg.rows);
      blocks += needed;
      if (blocks > cache.free_block_count())
        throw cache_exhausted(where + "sequence " + std::to_string(seg.sequence) + " (rows " +
                              std::to_string(seg.first_row) + ".." + std::to_string(seg.first_row + seg.rows - 1) +
                              ") asks for " + std::to_string(seg.start + seg.rows) + " positions (" +
                              std::to_string(needed) + " more blocks of " + std::to_string(cache.block_tokens()) +
                              "), but the pool of " + std::to_string(cache.pool_tokens()) + " positions has " +
                              std::to_string(cache.free_block_count() - (blocks - needed)) +
                              " blocks free for it; nothing was written");
    }
  }

  // --- forward ------------------------------------------------------------------
  void run(cache_type& cache, const batch& rows) {
    const index_t n = rows.size();
    constexpr index_t c = d_model;
    const scratch_views s = carve(scratch_.data(), n);
    const nn::block_activations& a = s.layer;
    // A device model stages the ids on the host and uploads them (stream-ordered).
    std::int32_t* staged = on_device ? host_ids_.data() : ids_.data();
    std::copy(rows.tokens().begin(), rows.tokens().end(), staged);
    std::copy(rows.positions().begin(), rows.positions().end(), staged + n);
    if constexpr (on_device)
      ops::copy(exec_, tensor_view<const std::int32_t, 1>(staged, {2 * n}),
                tensor_view<std::int32_t, 1>(ids_.data(), {2 * n}));
    const tensor_view<const std::int32_t, 1> token_ids(ids_.data(), {n}), positions(ids_.data() + n, {n});

    const auto x = a.residual_in;  // (N, C): the residual stream, updated in place by every block
    ops::embedding_forward(exec_, token_ids, as_const(weights_.token_embedding), x);
    if constexpr (learned_positions) {
      ops::embedding_forward(exec_, positions, as_const(weights_.position_embedding), a.attention_norm_out);
      ops::add(exec_, as_const(flat(x)), as_const(flat(a.attention_norm_out)), flat(x));
    }

    const float scale = 1.0f / std::sqrt(float(head_dim));
    const auto as_operand = [this](const weight_matrix& m) -> decltype(auto) { return operand(m); };
    nn::for_each_layer<Cfg>([&](index_t l, auto kind) {
      constexpr index_t window = decltype(kind)::window;
      block::forward(exec_, weights_.blocks[l], as_operand, a, rope_.view(), positions,
                     [&](tensor_view<const float, 3> q, tensor_view<const float, 3> k, tensor_view<const float, 3> v,
                         tensor_view<float, 3> out) { attend<window>(cache, l, q, k, v, out, scale); });
    });

    // Only the rows that want logits go through the final norm and the head.
    logit_row_index_.clear();
    const auto wants = rows.wants_logits();
    for (index_t i = 0; i < n; ++i)
      if (wants[std::size_t(i)]) logit_row_index_.push_back(i);
    logit_rows_ = index_t(logit_row_index_.size());
    if (logit_rows_ == 0) return;
    const std::size_t logit_floats = std::size_t(logit_rows_ * vocab);
    if (logits_.size() < logit_floats) {
      logits_ = buffer_for<float, Exec>(logit_floats);
      if constexpr (on_device) host_logits_ = buffer<float>(logit_floats);
    }
    const tensor_view<float, 2> gathered(a.attention_out.data(), {logit_rows_, c});
    if constexpr (on_device) {
      // One device copy per run of consecutive rows (a decode batch: one run).
      for (index_t r = 0; r < logit_rows_;) {
        index_t end = r + 1;
        while (end < logit_rows_ && logit_row_index_[std::size_t(end)] == logit_row_index_[std::size_t(end - 1)] + 1)
          ++end;
        const index_t from = logit_row_index_[std::size_t(r)];
        ops::copy(exec_, tensor_view<const float, 1>(x.data() + from * x.stride(0), {(end - r) * c}),
                  tensor_view<float, 1>(gathered.data() + r * c, {(end - r) * c}));
        r = end;
      }
    } else {
      for (index_t r = 0; r < logit_rows_; ++r)
        std::copy(&x(logit_row_index_[std::size_t(r)], 0), &x(logit_row_index_[std::size_t(r)], 0) + c,
                  &gathered(r, 0));
    }
    const tensor_view<float, 2> normed(a.attention_norm_out.data(), {logit_rows_, c});
    block::norm_forward(exec_, as_const(gathered), as_const(weights_.final_norm_weight),
                        as_const(weights_.final_norm_bias), normed,
                        tensor_view<float, 1>(a.attention_norm_mean.data(), {logit_rows_}),
                        tensor_view<float, 1>(a.attention_norm_rstd.data(), {logit_rows_}));
    ops::linear(exec_, as_const(normed), operand(weights_.lm_head),
                tensor_view<float, 2>(logits_.data(), {logit_rows_, vocab}));
    if constexpr (on_device)
      ops::copy(exec_, tensor_view<const float, 1>(logits_.data(), {logit_rows_ * vocab}),
                tensor_view<float, 1>(host_logits_.data(), {logit_rows_ * vocab}));
  }

  // What ops::linear multiplies by for a stored matrix: the matrix itself,
  // or (bf16 weights on a device) the bf16 matrix with the operand scratch
  // the activations are rounded into.
  decltype(auto) operand(const weight_matrix& m) {
    if constexpr (rounds_activations)
      return ops::mixed_precision_weight<bf16>{
          m, tensor_view<bf16, 1>(operand_scratch_.data(), {index_t(operand_scratch_.size())}), tensor_view<bf16, 1>()};
    else
      return (m);
  }

  // The logits forward returns: the host copy on a device policy.
  const float* host_logits() const {
    if constexpr (on_device) return host_logits_.data();
    else return logits_.data();
  }

  // Writes the batch's keys and values of layer l to the cache and attends
  // every row over its own sequence. A windowed layer's ring holds
  // ring_positions() >= W positions, so rows are written and attended in
  // steps of ring_positions() - W + 1: a step's writes overwrite only
  // positions older than any of its queries' windows.
  template <index_t Window>
  void attend(cache_type& cache, index_t l, tensor_view<const float, 3> q, tensor_view<const float, 3> k,
              tensor_view<const float, 3> v, tensor_view<float, 3> out, float scale) {
    index_t step = 0;
    for (const auto& seg : segments_) step = std::max(step, seg.rows);
    if constexpr (Window > 0) step = std::min(step, cache.ring_positions() - Window + 1);
    index_t longest = 0;
    for (const auto& seg : segments_) longest = std::max(longest, seg.rows);
    for (index_t done = 0; done < longest; done += step) {
      attention_segments_.clear();
      for (const auto& seg : segments_) {
        if (done >= seg.rows) continue;
        const segment part{seg.sequence, seg.first_row + done, std::min(step, seg.rows - done), seg.start + done};
        cache.write(l, part.sequence, part.start, rows_of(k, part), rows_of(v, part));
        attention_segments_.push_back({cache.view(l, part.sequence), part.first_row, part.rows, part.start, Window});
      }
      ops::cached_attention(exec_, q, std::span<const attention_segment_type>(attention_segments_), out, scale);
    }
  }

  // The rows of one segment of an (N, heads, D) view.
  template <class T>
  static tensor_view<T, 3> rows_of(tensor_view<T, 3> v, const segment& seg) {
    return tensor_view<T, 3>(v.data() + seg.first_row * v.stride(0), {seg.rows, v.extent(1), v.extent(2)},
                             {v.stride(0), v.stride(1), v.stride(2)});
  }

  static tensor_view<float, 1> flat(tensor_view<float, 2> v) { return {v.data(), {v.size()}}; }

  Exec exec_;
  index_t max_chunk_;
  buffer_for<float, Exec> dense_;  // embeddings, norms, biases (fp32)
  // The linear weights' bytes, which the matrices in weights_ live in
  // (declared first: destroyed after them).
  buffer_for<std::byte, Exec> weight_arena_;
  weights_type weights_;
  std::size_t weight_bytes_ = 0;
  nn::rope_table_storage<Cfg, Exec> rope_;

  buffer_for<float, Exec> scratch_;
  buffer_for<std::int32_t, Exec> ids_;  // token ids, then positions: (2 * max_chunk)
  buffer_for<float, Exec> logits_;      // (logit rows, V), grown to the most rows asked for
  // Device policies only: the ids staged on the host, the logits copied back,
  // and (bf16 weights) the activations rounded to bf16 for each GEMM.
  std::vector<std::int32_t> host_ids_;
  buffer<float> host_logits_;
  buffer_for<bf16, Exec> operand_scratch_;
  std::vector<index_t> logit_row_index_;
  index_t logit_rows_ = 0;
  std::vector<segment> segments_;
  using attention_segment_type = attention_segment<const typename cache_type::element_type>;
  std::vector<attention_segment_type> attention_segments_;
  batch single_;  // prefill's and decode's one-sequence batch
};

}  // namespace ctformer::infer
