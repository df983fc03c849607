// nn::model<Cfg, Exec>: a decoder-only Transformer (GPT-2 and LLaMA families)
// with training forward and backward over one flat parameter buffer, one flat
// gradient buffer and one activation arena.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/nn/config.hpp"
#include "ctformer/nn/parameters.hpp"
#include "ctformer/ops/ops.hpp"

namespace ctformer::nn {

/// The parameter tensors of one pre-norm block, as views into a flat buffer
/// (the same struct is bound once to the parameters and once to the gradients).
template <model_config Cfg>
struct block_tensors {
  using traits = config_traits<Cfg>;
  static constexpr bool has_norm_bias = std::same_as<typename Cfg::norm, layer_norm>;

  tensor_view<float, 1> attention_norm_weight, attention_norm_bias;  // (C)
  tensor_view<float, 2> qkv_weight;                                  // (qkv_width, C): q, k, v rows stacked
  tensor_view<float, 1> qkv_bias;                                    // (qkv_width)
  tensor_view<float, 2> output_weight;                               // (C, C)
  tensor_view<float, 1> output_bias;                                 // (C)
  tensor_view<float, 1> mlp_norm_weight, mlp_norm_bias;              // (C)
  tensor_view<float, 2> up_weight;                                   // (up_width, C): gate rows first when gated
  tensor_view<float, 1> up_bias;                                     // (up_width)
  tensor_view<float, 2> down_weight;                                 // (C, F)
  tensor_view<float, 1> down_bias;                                   // (C)

  /// Calls visit(name, view, shape, kind) for every tensor this block has, in
  /// layout order: the single list that layout, binding and checkpoints share.
  template <class Visit>
  void visit(const std::string& prefix, Visit&& visit) {
    constexpr index_t c = traits::d_model;
    visit(prefix + "attention_norm.weight", attention_norm_weight, {c}, parameter_kind::norm);
    if constexpr (has_norm_bias) visit(prefix + "attention_norm.bias", attention_norm_bias, {c}, parameter_kind::norm);
    visit(prefix + "attention.qkv.weight", qkv_weight, {traits::qkv_width, c}, parameter_kind::matrix);
    if constexpr (traits::bias) visit(prefix + "attention.qkv.bias", qkv_bias, {traits::qkv_width}, parameter_kind::bias);
    visit(prefix + "attention.output.weight", output_weight, {c, c}, parameter_kind::matrix);
    if constexpr (traits::bias) visit(prefix + "attention.output.bias", output_bias, {c}, parameter_kind::bias);
    visit(prefix + "mlp_norm.weight", mlp_norm_weight, {c}, parameter_kind::norm);
    if constexpr (has_norm_bias) visit(prefix + "mlp_norm.bias", mlp_norm_bias, {c}, parameter_kind::norm);
    visit(prefix + "mlp.up.weight", up_weight, {traits::up_width, c}, parameter_kind::matrix);
    if constexpr (traits::bias) visit(prefix + "mlp.up.bias", up_bias, {traits::up_width}, parameter_kind::bias);
    visit(prefix + "mlp.down.weight", down_weight, {c, traits::d_ff}, parameter_kind::matrix);
    if constexpr (traits::bias) visit(prefix + "mlp.down.bias", down_bias, {c}, parameter_kind::bias);
  }
};

/// The model's own tensors around the blocks.
template <model_config Cfg>
struct model_tensors {
  using config = Cfg;
  using traits = config_traits<Cfg>;
  static constexpr bool has_norm_bias = std::same_as<typename Cfg::norm, layer_norm>;
  static constexpr bool learned_positions = std::same_as<typename Cfg::position, learned_position>;

  tensor_view<float, 2> token_embedding;     // (V, C)
  tensor_view<float, 2> position_embedding;  // (max_seq, C), learned positions only
  block_tensors<Cfg> blocks[traits::n_layer];
  tensor_view<float, 1> final_norm_weight, final_norm_bias;  // (C)
  tensor_view<float, 2> lm_head;                             // (V, C); the token embedding when tied

  template <class Visit>
  void visit(Visit&& visit) {
    constexpr index_t c = traits::d_model;
    visit(std::string("token_embedding.weight"), token_embedding, {traits::vocab, c}, parameter_kind::embedding);
    if constexpr (learned_positions)
      visit(std::string("position_embedding.weight"), position_embedding, {traits::max_seq, c},
            parameter_kind::embedding);
    for (int l = 0; l < traits::n_layer; ++l) blocks[l].visit("blocks." + std::to_string(l) + ".", visit);
    visit(std::string("final_norm.weight"), final_norm_weight, {c}, parameter_kind::norm);
    if constexpr (has_norm_bias) visit(std::string("final_norm.bias"), final_norm_bias, {c}, parameter_kind::norm);
    if constexpr (!traits::tie_embeddings)
      visit(std::string("lm_head.weight"), lm_head, {traits::vocab, c}, parameter_kind::matrix);
  }
};

namespace detail {
// Points every view of a model_tensors at its place in a flat buffer, walking
// the tensors in the same order as the layout was built.
template <class Tensors>
void bind(Tensors& tensors, float* base) {
  parameter_layout layout;
  tensors.visit([&]<int Rank>(const std::string& name, tensor_view<float, Rank>& view, std::vector<index_t> shape,
                              parameter_kind kind) {
    std::array<index_t, Rank> extents{};
    for (int d = 0; d < Rank; ++d) extents[d] = shape[std::size_t(d)];
    view = tensor_view<float, Rank>(base + layout.add(name, std::move(shape), kind), extents);
  });
  if constexpr (config_traits<typename Tensors::config>::tie_embeddings) tensors.lm_head = tensors.token_embedding;
}
}  // namespace detail

/// A decoder-only Transformer whose dimensions come from Cfg and whose
/// operations run on Exec. Holds the parameters, their gradients (same
/// layout) and an activation arena sized for the largest (batch, sequence)
/// seen; nothing is allocated inside a step once that size is reached.
/// @tparam Cfg a model_config (see config.hpp)
/// @tparam Exec an execution policy type (cpu::par_t; cuda::par_t under nvcc)
template <class Cfg, execution_policy Exec = cpu::par_t>
class model {
  static_assert(check_model_config<Cfg>());

 public:
  using config = Cfg;
  using traits = config_traits<Cfg>;
  using exec_type = Exec;
  template <class T>
  using storage = buffer_for<T, Exec>;

  static constexpr index_t vocab = traits::vocab, d_model = traits::d_model, n_layer = traits::n_layer,
                           n_head = traits::n_head, n_kv_head = traits::n_kv_head, head_dim = traits::head_dim,
                           d_ff = traits::d_ff, max_seq = traits::max_seq;

  /// Parameters initialised as GPT-2 does: N(0, 0.02) matrices and embeddings,
  /// residual output projections scaled by 1/sqrt(2 n_layer), norms 1, biases 0.
  explicit model(Exec exec = Exec{}, std::uint64_t seed = 0) : exec_(exec) {
    model_tensors<Cfg> probe;
    parameter_layout layout;
    probe.visit([&]<int Rank>(const std::string& name, tensor_view<float, Rank>&, std::vector<index_t> shape,
                              parameter_kind kind) { layout.add(name, std::move(shape), kind); });
    table_ = layout.table();
    parameter_count_ = layout.total();
    parameters_ = storage<float>(std::size_t(parameter_count_));
    gradients_ = storage<float>(std::size_t(parameter_count_));
    detail::bind(params_, parameters_.data());
    detail::bind(grads_, gradients_.data());
    initialise(seed);
    zero_gradients();
    if constexpr (std::same_as<typename Cfg::position, rope>) build_rope_tables();
  }

  model(const model&) = delete;
  model& operator=(const model&) = delete;

  const Exec& exec() const { return exec_; }
  const std::vector<parameter_info>& parameter_table() const { return table_; }
  index_t parameter_count() const { return parameter_count_; }
  tensor_view<float, 1> parameters() { return {parameters_.data(), {parameter_count_}}; }
  tensor_view<float, 1> gradients() { return {gradients_.data(), {parameter_count_}}; }
  tensor_view<const float, 1> parameters() const { return {parameters_.data(), {parameter_count_}}; }
  /// Parameter tensors as named views (token_embedding, blocks[l].qkv_weight, ...).
  model_tensors<Cfg>& weights() { return params_; }
  model_tensors<Cfg>& weight_gradients() { return grads_; }
  /// The elements that receive weight decay: matrices, plus embeddings when
  /// decay_embeddings, everything when decay_all.
  std::vector<parameter_range> decay_ranges(bool decay_all = false, bool decay_embeddings = false) const {
    return nn::decay_ranges(table_, decay_all, decay_embeddings);
  }

  void zero_gradients() { ops::fill(exec_, gradients(), 0.0f); }

  /// Forward and backward over one batch: returns the mean cross-entropy over
  /// the positions whose target is not negative, and ADDS that loss's
  /// gradient, times grad_scale, to the gradient buffer (so micro-batches
  /// accumulate; pass 1/micro_batches to average them).
  /// inputs, targets: (B, T) int32 on the host. Compute is float or bf16
  /// (bf16 GEMM operands, fp32 accumulation and everything else fp32).
  template <class Compute = float>
  float forward_backward(tensor_view<const std::int32_t, 2> inputs, tensor_view<const std::int32_t, 2> targets,
                         float grad_scale = 1.0f) {
    const float loss = forward<Compute>(inputs, targets);
    backward<Compute>(grad_scale);
    return loss;
  }

  /// The mean loss of a batch without touching the gradients.
  template <class Compute = float>
  float evaluate(tensor_view<const std::int32_t, 2> inputs, tensor_view<const std::int32_t, 2> targets) {
    return forward<Compute>(inputs, targets);
  }

  /// Logits of every position of a batch, (B, T, V), valid until the next call.
  template <class Compute = float>
  tensor_view<const float, 3> logits(tensor_view<const std::int32_t, 2> inputs) {
    forward<Compute>(inputs, tensor_view<const std::int32_t, 2>{});
    return tensor_view<const float, 3>(arena_.logits.data(), {batch_, seq_, vocab});
  }

  /// Call after changing the parameters outside forward/backward (an optimizer
  /// step, a checkpoint load): drops the cached low-precision weight copy.
  void parameters_changed() { compute_weights_valid_ = false; }

 private:
  // Every activation the backward pass needs, plus gradient scratch; sized
  // for batch_capacity x seq_capacity and carved for the current (B, T).
  struct activation_arena {
    storage<float> floats;
    storage<std::int32_t> ints;
    std::vector<float> host_losses;
    std::vector<std::int32_t> host_ints;
    index_t batch_capacity = 0, seq_capacity = 0;
    tensor_view<float, 1> logits;  // (N * V)
  };

  // Views into the arena for one (B, T).
  struct layer_activations {
    tensor_view<float, 2> residual_in, residual_mid;  // (N, C) block input; after attention
    tensor_view<float, 2> attention_norm_out;         // (N, C)
    tensor_view<float, 1> attention_norm_mean, attention_norm_rstd;  // (N)
    tensor_view<float, 2> qkv;                         // (N, qkv_width), after RoPE
    tensor_view<float, 4> probs;                       // (B, H, T, T)
    tensor_view<float, 2> attention_out;               // (N, C) before the output projection
    tensor_view<float, 2> mlp_norm_out;                // (N, C)
    tensor_view<float, 1> mlp_norm_mean, mlp_norm_rstd;  // (N)
    tensor_view<float, 2> up_out;                      // (N, up_width) before the activation
    tensor_view<float, 2> activation_out;              // (N, F)
  };

  struct step_views {
    layer_activations layers[traits::n_layer];
    tensor_view<float, 2> final_in, final_norm_out;  // (N, C)
    tensor_view<float, 1> final_norm_mean, final_norm_rstd;
    tensor_view<float, 2> logits;                     // (N, V); dlogits in place
    tensor_view<float, 1> losses;                     // (N)
    tensor_view<float, 2> d_residual, d_scratch, d_norm;  // (N, C)
    tensor_view<float, 2> d_qkv;                      // (N, qkv_width)
    tensor_view<float, 2> d_attention;                // (N, C)
    tensor_view<float, 2> d_up;                       // (N, up_width)
    tensor_view<float, 2> d_activation;               // (N, F)
    tensor_view<std::int32_t, 1> tokens, targets, positions;  // (N)
    tensor_view<bf16, 1> compute_a, compute_b;        // low-precision GEMM operand scratch
  };

  static index_t floats_for(index_t b, index_t t) {
    const index_t n = b * t;
    const index_t per_layer = n * (5 * d_model + 2 * 2 + traits::qkv_width + traits::up_width + d_ff) +
                              b * n_head * t * t;
    const index_t scratch = n * (3 * d_model + traits::qkv_width + d_model + traits::up_width + d_ff);
    return n_layer * per_layer + n * (2 * d_model + 2 + vocab + 1) + scratch;
  }
  static index_t compute_scratch_for(index_t b, index_t t) {
    // The largest GEMM operand that is an activation: (N, V) dlogits or an (N, width) activation.
    const index_t n = b * t;
    index_t widest = std::max<index_t>({vocab, traits::qkv_width, traits::up_width, d_model});
    return n * widest;
  }

  void reserve(index_t b, index_t t) {
    if (b <= arena_.batch_capacity && t <= arena_.seq_capacity) return;
    const index_t cb = std::max(b, arena_.batch_capacity), ct = std::max(t, arena_.seq_capacity);
    arena_.floats = storage<float>(std::size_t(floats_for(cb, ct)));
    arena_.ints = storage<std::int32_t>(std::size_t(3 * cb * ct));
    arena_.host_losses.assign(std::size_t(cb * ct), 0.0f);
    arena_.host_ints.assign(std::size_t(3 * cb * ct), 0);
    arena_.batch_capacity = cb;
    arena_.seq_capacity = ct;
  }

  template <class Compute>
  void reserve_compute(index_t b, index_t t) {
    if constexpr (std::same_as<Compute, bf16>) {
      const index_t needed = 2 * compute_scratch_for(arena_.batch_capacity, arena_.seq_capacity);
      if (index_t(compute_scratch_.size()) < needed) compute_scratch_ = storage<bf16>(std::size_t(needed));
      if (compute_weights_.size() != std::size_t(parameter_count_))
        compute_weights_ = storage<bf16>(std::size_t(parameter_count_));
    }
    (void)b;
    (void)t;
  }

  step_views carve(index_t b, index_t t) {
    step_views s;
    const index_t n = b * t;
    float* p = arena_.floats.data();
    auto take2 = [&](index_t rows, index_t cols) {
      tensor_view<float, 2> v(p, {rows, cols});
      p += rows * cols;
      return v;
    };
    auto take1 = [&](index_t count) {
      tensor_view<float, 1> v(p, {count});
      p += count;
      return v;
    };
    for (auto& l : s.layers) {
      l.residual_in = take2(n, d_model);
      l.residual_mid = take2(n, d_model);
      l.attention_norm_out = take2(n, d_model);
      l.attention_norm_mean = take1(n);
      l.attention_norm_rstd = take1(n);
      l.qkv = take2(n, traits::qkv_width);
      l.probs = tensor_view<float, 4>(p, {b, n_head, t, t});
      p += b * n_head * t * t;
      l.attention_out = take2(n, d_model);
      l.mlp_norm_out = take2(n, d_model);
      l.mlp_norm_mean = take1(n);
      l.mlp_norm_rstd = take1(n);
      l.up_out = take2(n, traits::up_width);
      l.activation_out = take2(n, d_ff);
    }
    s.final_in = take2(n, d_model);
    s.final_norm_out = take2(n, d_model);
    s.final_norm_mean = take1(n);
    s.final_norm_rstd = take1(n);
    s.logits = take2(n, vocab);
    s.losses = take1(n);
    s.d_residual = take2(n, d_model);
    s.d_scratch = take2(n, d_model);
    s.d_norm = take2(n, d_model);
    s.d_qkv = take2(n, traits::qkv_width);
    s.d_attention = take2(n, d_model);
    s.d_up = take2(n, traits::up_width);
    s.d_activation = take2(n, d_ff);
    std::int32_t* ip = arena_.ints.data();
    s.tokens = tensor_view<std::int32_t, 1>(ip, {n});
    s.targets = tensor_view<std::int32_t, 1>(ip + n, {n});
    s.positions = tensor_view<std::int32_t, 1>(ip + 2 * n, {n});
    const index_t half = compute_scratch_.size() / 2;
    s.compute_a = tensor_view<bf16, 1>(compute_scratch_.data(), {half});
    s.compute_b = tensor_view<bf16, 1>(compute_scratch_.data() + half, {half});
    return s;
  }

  // q, k and v of a (N, qkv_width) buffer as (B, T, heads, D) views.
  template <class T>
  static tensor_view<T, 4> head_view(T* base, index_t b, index_t t, index_t heads, index_t first_column) {
    const index_t w = traits::qkv_width;
    return tensor_view<T, 4>(base + first_column, {b, t, heads, head_dim}, {t * w, w, head_dim, 1});
  }

  // --- GEMMs in the compute type ---------------------------------------------
  // Returns a view of the same shape and strides over bf16 data: the cached
  // weight copy when the operand is a parameter, else a conversion into scratch.
  tensor_view<const bf16, 2> to_bf16(tensor_view<const float, 2> v, tensor_view<bf16, 1> scratch) {
    const float* base = parameters_.data();
    const bool row_major = v.stride(1) == 1;
    const index_t span = row_major ? (v.extent(0) - 1) * v.stride(0) + v.extent(1)
                                   : (v.extent(1) - 1) * v.stride(1) + v.extent(0);
    if (v.data() >= base && v.data() < base + parameter_count_)
      return tensor_view<const bf16, 2>(compute_weights_.data() + (v.data() - base), v.extents(), v.strides());
    ops::convert(exec_, tensor_view<const float, 1>(v.data(), {span}), tensor_view<bf16, 1>(scratch.data(), {span}));
    return tensor_view<const bf16, 2>(scratch.data(), v.extents(), v.strides());
  }

  template <class Compute>
  void matmul(step_views& s, tensor_view<const float, 2> a, tensor_view<const float, 2> b, tensor_view<float, 2> c,
              float beta) {
    if constexpr (std::same_as<Compute, float>) {
      ops::gemm(exec_, a, b, c, 1.0f, beta);
    } else {
      static_assert(std::same_as<Compute, bf16>, "ctformer: the model computes in float or bf16");
      ops::gemm(exec_, to_bf16(a, s.compute_a), to_bf16(b, s.compute_b), c, 1.0f, beta);
    }
  }

  // y (N, O) = x (N, I) W^T (+ bias), or += when accumulate.
  template <class Compute>
  void linear_forward(step_views& s, tensor_view<const float, 2> x, tensor_view<float, 2> weight,
                      tensor_view<float, 1> bias, tensor_view<float, 2> y, bool accumulate) {
    matmul<Compute>(s, x, as_const(weight).transposed(), y, accumulate ? 1.0f : 0.0f);
    if constexpr (traits::bias) ops::add_bias(exec_, y, bias);
  }

  // dx = dy W (overwritten, or accumulated); dW += dy^T x; db += sum dy.
  template <class Compute>
  void linear_backward(step_views& s, tensor_view<const float, 2> dy, tensor_view<const float, 2> x,
                       tensor_view<float, 2> weight, tensor_view<float, 2> dweight, tensor_view<float, 1> dbias,
                       tensor_view<float, 2> dx, bool accumulate_dx) {
    matmul<Compute>(s, dy, as_const(weight), dx, accumulate_dx ? 1.0f : 0.0f);
    matmul<Compute>(s, dy.transposed(), x, dweight, 1.0f);
    if constexpr (traits::bias) ops::bias_backward(exec_, dy, dbias);
  }

  template <class Norm>
  void norm_forward(tensor_view<const float, 2> x, tensor_view<float, 1> weight, tensor_view<float, 1> bias,
                    tensor_view<float, 2> y, tensor_view<float, 1> mean, tensor_view<float, 1> rstd) {
    if constexpr (std::same_as<Norm, layer_norm>)
      ops::layer_norm_forward(exec_, x, weight, bias, y, mean, rstd, traits::norm_eps);
    else
      ops::rms_norm_forward(exec_, x, weight, y, rstd, traits::norm_eps);
  }
  template <class Norm>
  void norm_backward(tensor_view<const float, 2> dy, tensor_view<const float, 2> x, tensor_view<float, 1> weight,
                     tensor_view<float, 1> mean, tensor_view<float, 1> rstd, tensor_view<float, 2> dx,
                     tensor_view<float, 1> dweight, tensor_view<float, 1> dbias) {
    if constexpr (std::same_as<Norm, layer_norm>)
      ops::layer_norm_backward(exec_, dy, x, weight, mean, rstd, dx, dweight, dbias);
    else
      ops::rms_norm_backward(exec_, dy, x, weight, rstd, dx, dweight);
  }

  static tensor_view<float, 1> flat(tensor_view<float, 2> v) { return {v.data(), {v.size()}}; }

  // --- forward ------------------------------------------------------------------
  template <class Compute>
  float forward(tensor_view<const std::int32_t, 2> inputs, tensor_view<const std::int32_t, 2> targets) {
    const index_t b = inputs.extent(0), t = inputs.extent(1);
    if (b <= 0 || t <= 0) throw shape_error("ctformer::model: inputs of shape " + shape_string(inputs) + " are empty");
    if (t > max_seq)
      throw shape_error("ctformer::model: sequence length " + std::to_string(t) + " exceeds the model's max_seq " +
                        std::to_string(max_seq));
    const bool with_targets = targets.data() != nullptr;
    if (with_targets) require_same_shape("model::forward", "inputs", inputs, "targets", targets);
    reserve(b, t);
    reserve_compute<Compute>(b, t);
    batch_ = b;
    seq_ = t;
    step_ = carve(b, t);
    step_views& s = step_;
    const index_t n = b * t;

    if constexpr (std::same_as<Compute, bf16>) {
      if (!compute_weights_valid_) {
        ops::convert(exec_, as_const(parameters()), tensor_view<bf16, 1>(compute_weights_.data(), {parameter_count_}));
        compute_weights_valid_ = true;
      }
    }

    // Token ids go to the policy's memory through a host staging copy.
    std::int32_t* host = arena_.host_ints.data();
    for (index_t i = 0; i < b; ++i)
      for (index_t j = 0; j < t; ++j) {
        host[i * t + j] = inputs(i, j);
        host[n + i * t + j] = with_targets ? targets(i, j) : -1;
        host[2 * n + i * t + j] = std::int32_t(j);
      }
    ops::copy(exec_, tensor_view<const std::int32_t, 1>(host, {3 * n}),
              tensor_view<std::int32_t, 1>(s.tokens.data(), {3 * n}));

    auto x = s.layers[0].residual_in;
    ops::embedding_forward(exec_, s.tokens, params_.token_embedding, x);
    if constexpr (model_tensors<Cfg>::learned_positions) {
      ops::embedding_forward(exec_, s.positions, params_.position_embedding, s.d_scratch);
      ops::add(exec_, flat(x), flat(s.d_scratch), flat(x));
    }

    const float scale = 1.0f / std::sqrt(float(head_dim));
    for (int l = 0; l < n_layer; ++l) {
      auto& a = s.layers[l];
      auto& w = params_.blocks[l];
      norm_forward<typename Cfg::norm>(a.residual_in, w.attention_norm_weight, w.attention_norm_bias,
                                       a.attention_norm_out, a.attention_norm_mean, a.attention_norm_rstd);
      linear_forward<Compute>(s, a.attention_norm_out, w.qkv_weight, w.qkv_bias, a.qkv, false);
      auto q = head_view(a.qkv.data(), b, t, n_head, 0);
      auto k = head_view(a.qkv.data(), b, t, n_kv_head, n_head * head_dim);
      auto v = head_view(a.qkv.data(), b, t, n_kv_head, (n_head + n_kv_head) * head_dim);
      if constexpr (std::same_as<typename Cfg::position, rope>) {
        ops::rope_forward(exec_, q, rope_cos_view(), rope_sin_view());
        ops::rope_forward(exec_, k, rope_cos_view(), rope_sin_view());
      }
      auto out = tensor_view<float, 4>(a.attention_out.data(), {b, t, n_head, head_dim});
      ops::causal_attention_forward(exec_, q, k, v, out, a.probs, scale);
      ops::copy(exec_, as_const(flat(a.residual_in)), flat(a.residual_mid));
      linear_forward<Compute>(s, a.attention_out, w.output_weight, w.output_bias, a.residual_mid, true);

      norm_forward<typename Cfg::norm>(a.residual_mid, w.mlp_norm_weight, w.mlp_norm_bias, a.mlp_norm_out,
                                       a.mlp_norm_mean, a.mlp_norm_rstd);
      linear_forward<Compute>(s, a.mlp_norm_out, w.up_weight, w.up_bias, a.up_out, false);
      if constexpr (traits::gated)
        ops::swiglu_forward(exec_, a.up_out, a.activation_out);
      else
        ops::gelu_forward(exec_, flat(a.up_out), flat(a.activation_out));
      auto next = l + 1 < n_layer ? s.layers[l + 1].residual_in : s.final_in;
      ops::copy(exec_, as_const(flat(a.residual_mid)), flat(next));
      linear_forward<Compute>(s, a.activation_out, w.down_weight, w.down_bias, next, true);
    }
    norm_forward<typename Cfg::norm>(s.final_in, params_.final_norm_weight, params_.final_norm_bias,
                                     s.final_norm_out, s.final_norm_mean, s.final_norm_rstd);
    matmul<Compute>(s, s.final_norm_out, as_const(params_.lm_head).transposed(), s.logits, 0.0f);
    arena_.logits = tensor_view<float, 1>(s.logits.data(), {n * vocab});
    if (!with_targets) return 0.0f;

    ops::softmax_cross_entropy_forward(exec_, s.logits, s.targets, s.losses);
    ops::copy(exec_, as_const(s.losses), tensor_view<float, 1>(arena_.host_losses.data(), {n}));
    exec_.synchronize();
    double sum = 0;
    counted_targets_ = 0;
    for (index_t i = 0; i < n; ++i)
      if (host[n + i] >= 0) {
        sum += arena_.host_losses[std::size_t(i)];
        ++counted_targets_;
      }
    return counted_targets_ ? float(sum / double(counted_targets_)) : 0.0f;
  }

  // --- backward -----------------------------------------------------------------
  template <class Compute>
  void backward(float grad_scale) {
    step_views& s = step_;
    const index_t b = batch_, t = seq_;
    if (counted_targets_ == 0) return;  // nothing to learn from this batch
    ops::softmax_cross_entropy_backward(exec_, s.logits, s.targets, grad_scale / float(counted_targets_), s.logits);
    // logits = final_norm_out lm_head^T
    matmul<Compute>(s, s.logits, as_const(params_.lm_head), s.d_norm, 0.0f);
    matmul<Compute>(s, as_const(s.logits).transposed(), s.final_norm_out, grads_.lm_head, 1.0f);
    norm_backward<typename Cfg::norm>(s.d_norm, s.final_in, params_.final_norm_weight, s.final_norm_mean,
                                      s.final_norm_rstd, s.d_residual, grads_.final_norm_weight,
                                      grads_.final_norm_bias);
    const float scale = 1.0f / std::sqrt(float(head_dim));
    for (int l = n_layer - 1; l >= 0; --l) {
      auto& a = s.layers[l];
      auto& w = params_.blocks[l];
      auto& g = grads_.blocks[l];
      // next = residual_mid + activation_out down^T
      linear_backward<Compute>(s, s.d_residual, a.activation_out, w.down_weight, g.down_weight, g.down_bias,
                               s.d_activation, false);
      if constexpr (traits::gated)
        ops::swiglu_backward(exec_, a.up_out, s.d_activation, s.d_up);
      else
        ops::gelu_backward(exec_, flat(a.up_out), flat(s.d_activation), flat(s.d_up));
      linear_backward<Compute>(s, s.d_up, a.mlp_norm_out, w.up_weight, g.up_weight, g.up_bias, s.d_norm, false);
      norm_backward<typename Cfg::norm>(s.d_norm, a.residual_mid, w.mlp_norm_weight, a.mlp_norm_mean,
                                        a.mlp_norm_rstd, s.d_scratch, g.mlp_norm_weight, g.mlp_norm_bias);
      ops::add(exec_, flat(s.d_residual), flat(s.d_scratch), flat(s.d_residual));
      // residual_mid = residual_in + attention_out output^T
      linear_backward<Compute>(s, s.d_residual, a.attention_out, w.output_weight, g.output_weight, g.output_bias,
                               s.d_attention, false);
      auto q = head_view(a.qkv.data(), b, t, n_head, 0);
      auto k = head_view(a.qkv.data(), b, t, n_kv_head, n_head * head_dim);
      auto v = head_view(a.qkv.data(), b, t, n_kv_head, (n_head + n_kv_head) * head_dim);
      auto dq = head_view(s.d_qkv.data(), b, t, n_head, 0);
      auto dk = head_view(s.d_qkv.data(), b, t, n_kv_head, n_head * head_dim);
      auto dv = head_view(s.d_qkv.data(), b, t, n_kv_head, (n_head + n_kv_head) * head_dim);
      auto dout = tensor_view<const float, 4>(s.d_attention.data(), {b, t, n_head, head_dim});
      ops::causal_attention_backward(exec_, dout, q, k, v, a.probs, dq, dk, dv, scale);
      if constexpr (std::same_as<typename Cfg::position, rope>) {
        ops::rope_backward(exec_, dq, rope_cos_view(), rope_sin_view());
        ops::rope_backward(exec_, dk, rope_cos_view(), rope_sin_view());
      }
      linear_backward<Compute>(s, s.d_qkv, a.attention_norm_out, w.qkv_weight, g.qkv_weight, g.qkv_bias, s.d_norm,
                               false);
      norm_backward<typename Cfg::norm>(s.d_norm, a.residual_in, w.attention_norm_weight, a.attention_norm_mean,
                                        a.attention_norm_rstd, s.d_scratch, g.attention_norm_weight,
                                        g.attention_norm_bias);
      ops::add(exec_, flat(s.d_residual), flat(s.d_scratch), flat(s.d_residual));
    }
    ops::embedding_backward(exec_, s.tokens, s.d_residual, grads_.token_embedding);
    if constexpr (model_tensors<Cfg>::learned_positions)
      ops::embedding_backward(exec_, s.positions, s.d_residual, grads_.position_embedding);
  }

  // --- set-up -------------------------------------------------------------------
  void initialise(std::uint64_t seed) {
    std::vector<float> host(std::size_t(parameter_count_), 0.0f);
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    const float residual_std = 0.02f / std::sqrt(2.0f * float(n_layer));
    std::normal_distribution<float> residual_normal(0.0f, residual_std);
    for (const auto& p : table_) {
      float* dst = host.data() + p.offset;
      const bool residual_projection =
          p.name.ends_with("attention.output.weight") || p.name.ends_with("mlp.down.weight");
      for (index_t i = 0; i < p.size(); ++i) {
        switch (p.kind) {
          case parameter_kind::norm: dst[i] = p.name.ends_with(".bias") ? 0.0f : 1.0f; break;
          case parameter_kind::bias: dst[i] = 0.0f; break;
          default: dst[i] = residual_projection ? residual_normal(rng) : normal(rng); break;
        }
      }
    }
    ops::copy(exec_, tensor_view<const float, 1>(host.data(), {parameter_count_}), parameters());
    exec_.synchronize();
    compute_weights_valid_ = false;
  }

  void build_rope_tables() {
    const index_t half = head_dim / 2;
    std::vector<float> host(std::size_t(2 * max_seq * half));
    for (index_t pos = 0; pos < max_seq; ++pos)
      for (index_t c = 0; c < half; ++c) {
        const double frequency = std::pow(double(traits::rope_base), -2.0 * double(c) / double(head_dim));
        host[std::size_t(pos * half + c)] = float(std::cos(double(pos) * frequency));
        host[std::size_t(max_seq * half + pos * half + c)] = float(std::sin(double(pos) * frequency));
      }
    rope_tables_ = storage<float>(host.size());
    ops::copy(exec_, tensor_view<const float, 1>(host.data(), {index_t(host.size())}),
              tensor_view<float, 1>(rope_tables_.data(), {index_t(host.size())}));
    exec_.synchronize();
  }
  tensor_view<const float, 2> rope_cos_view() const { return {rope_tables_.data(), {max_seq, head_dim / 2}}; }
  tensor_view<const float, 2> rope_sin_view() const {
    return {rope_tables_.data() + max_seq * (head_dim / 2), {max_seq, head_dim / 2}};
  }

  Exec exec_;
  std::vector<parameter_info> table_;
  index_t parameter_count_ = 0;
  storage<float> parameters_, gradients_;
  model_tensors<Cfg> params_, grads_;
  storage<float> rope_tables_;
  storage<bf16> compute_weights_, compute_scratch_;
  bool compute_weights_valid_ = false;
  activation_arena arena_;
  step_views step_{};
  index_t batch_ = 0, seq_ = 0, counted_targets_ = 0;
};

}  // namespace ctformer::nn
