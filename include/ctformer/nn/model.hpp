// nn::model<Cfg, Exec>: a decoder-only Transformer (GPT-2 and LLaMA families)
// for training: the blocks of nn/block.hpp between the embeddings and the
// head, over one flat parameter buffer, one flat gradient buffer and one
// activation arena.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/nn/block.hpp"
#include "ctformer/nn/config.hpp"
#include "ctformer/nn/parameters.hpp"
#include "ctformer/ops/ops.hpp"

namespace ctformer::nn {

/// Hands out consecutive pieces of one float (or int) arena. With a null
/// base it only counts: the walk that sizes an arena is the walk that carves
/// it, so the two cannot disagree.
template <class T>
class arena_carver {
 public:
  explicit arena_carver(T* base) : base_(base) {}
  tensor_view<T, 1> take(index_t count) { return {next(count), {count}}; }
  tensor_view<T, 2> take(index_t rows, index_t cols) { return {next(rows * cols), {rows, cols}}; }
  tensor_view<T, 4> take(index_t a, index_t b, index_t c, index_t d) { return {next(a * b * c * d), {a, b, c, d}}; }
  index_t used() const { return used_; }

 private:
  T* next(index_t count) {
    T* at = base_ ? base_ + used_ : nullptr;
    used_ += count;
    return at;
  }
  T* base_;
  index_t used_ = 0;
};

/// Knowledge distillation's mix: the loss is alpha x cross-entropy on the
/// labels plus (1 - alpha) x T^2 x KL(teacher || student) at temperature T
/// (ops::distillation_loss_forward).
struct distillation_settings {
  float alpha = 0.5f;
  float temperature = 2.0f;
};

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
  using block = decoder_block<Cfg>;
  template <class T>
  using storage = buffer_for<T, Exec>;

  static constexpr index_t vocab = traits::vocab, d_model = traits::d_model, n_layer = traits::n_layer,
                           n_head = traits::n_head, n_kv_head = traits::n_kv_head, head_dim = traits::head_dim,
                           d_ff = traits::d_ff, max_seq = traits::max_seq;

  /// Parameters initialised as GPT-2 does: N(0, 0.02) matrices and embeddings,
  /// residual output projections scaled by 1/sqrt(2 n_layer), norms 1, biases 0.
  explicit model(Exec exec = Exec{}, std::uint64_t seed = 0)
      : exec_(exec), table_(parameter_table_of<Cfg>()), parameter_count_(parameter_count_of<Cfg>()), rope_(exec) {
    parameters_ = storage<float>(std::size_t(parameter_count_));
    bind_weights(params_, parameters_.data());
    frozen_gradient_sink_ = storage<float>(std::size_t(2 * d_model));
    frozen_.assign(table_.size(), false);
    // An adapted model trains its adapters only (as PEFT's get_peft_model):
    // every base tensor starts frozen; unfreeze_all() trains everything.
    if constexpr (traits::has_adapters)
      for (std::size_t i = 0; i < table_.size(); ++i) frozen_[i] = table_[i].name.find(".lora.") == std::string::npos;
    apply_freezing();
    initialise(seed);
  }

  model(const model&) = delete;
  model& operator=(const model&) = delete;

  const Exec& exec() const { return exec_; }
  const std::vector<parameter_info>& parameter_table() const { return table_; }
  index_t parameter_count() const { return parameter_count_; }
  tensor_view<float, 1> parameters() { return {parameters_.data(), {parameter_count_}}; }
  tensor_view<const float, 1> parameters() const { return {parameters_.data(), {parameter_count_}}; }
  /// The gradients of the trainable tensors only, slice after slice of
  /// trainable_ranges() (the whole parameter layout when nothing is frozen):
  /// frozen tensors cost no gradient memory. gradient_offset(i) says where
  /// tensor i's gradient starts.
  tensor_view<float, 1> gradients() { return {gradients_.data(), {gradient_count_}}; }
  index_t gradient_count() const { return gradient_count_; }
  /// Where parameter_table()[i]'s gradient starts in gradients(); -1 when frozen.
  index_t gradient_offset(std::size_t i) const { return gradient_offsets_[i]; }
  /// Parameter tensors as named views (token_embedding, blocks[l].qkv, ...).
  model_weights<Cfg>& weights() { return params_; }
  model_weights<Cfg>& weight_gradients() { return grads_; }
  /// The elements that receive weight decay: matrices, plus embeddings when
  /// decay_embeddings, everything when decay_all.
  std::vector<parameter_range> decay_ranges(bool decay_all = false, bool decay_embeddings = false) const {
    return nn::decay_ranges(table_, decay_all, decay_embeddings);
  }

  void zero_gradients() {
    ops::fill(exec_, gradients(), 0.0f);
    ops::fill(exec_, tensor_view<float, 1>(frozen_gradient_sink_.data(), {2 * d_model}), 0.0f);
  }

  /// Freezes every parameter tensor whose name matches one of `patterns`
  /// (see matches_parameter_pattern: "token_embedding.*", "blocks.[0-3].*",
  /// "*norm.*"). A frozen tensor has no gradient (gradients() shrinks; call
  /// this before training: the gradients restart at zero) and none is
  /// computed where the backward can skip it: its weight-gradient GEMM, and
  /// every layer below the lowest trainable one. Build the optimizer from
  /// trainable_ranges() afterwards so frozen tensors get no state either.
  /// Throws invalid_input naming a pattern that matches no tensor (a typo
  /// would otherwise train everything). Returns the tensors now frozen.
  std::size_t freeze(std::span<const std::string> patterns) {
    for (const auto& pattern : patterns) {
      bool matched = false;
      for (std::size_t i = 0; i < table_.size(); ++i)
        if (matches_parameter_pattern(pattern, table_[i].name)) {
          frozen_[i] = true;
          matched = true;
        }
      if (!matched)
        throw invalid_input("ctformer::model::freeze: the pattern '" + pattern +
                            "' matches no parameter; names look like '" + table_.front().name + "', '" +
                            table_[1].name + "', '" + table_.back().name + "'");
    }
    apply_freezing();
    return std::size_t(std::count(frozen_.begin(), frozen_.end(), true));
  }
  /// Makes every tensor trainable again (the gradients restart at zero).
  void unfreeze_all() {
    frozen_.assign(table_.size(), false);
    apply_freezing();
  }
  /// frozen()[i] says whether parameter_table()[i] is frozen.
  const std::vector<bool>& frozen() const { return frozen_; }
  /// The slices of the parameter buffer that train (the whole buffer when
  /// nothing is frozen): what an optimizer sizes its state by.
  std::vector<parameter_range> trainable_ranges() const {
    if (std::none_of(frozen_.begin(), frozen_.end(), [](bool f) { return f; }))
      return {parameter_range{0, parameter_count_, true}};
    return nn::trainable_ranges(table_, frozen_);
  }

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

  /// forward_backward with the distillation loss against a teacher's logits
  /// for the same batch: returns the mean of alpha x CE + (1 - alpha) x T^2
  /// x KL over the positions whose target is not negative, and adds its
  /// gradient times grad_scale. The teacher runs elsewhere (forward only;
  /// any model of the same vocabulary, or logits saved to a file).
  /// teacher_logits: (B, T, V) float in the policy's memory.
  template <class Compute = float>
  float forward_backward_distilled(tensor_view<const std::int32_t, 2> inputs,
                                   tensor_view<const std::int32_t, 2> targets,
                                   tensor_view<const float, 3> teacher_logits, distillation_settings settings,
                                   float grad_scale = 1.0f) {
    static_assert(ops::has_distillation_loss<Exec>,
                  "ctformer: distillation has no kernel for this execution policy yet (the CPU has one)");
    if (teacher_logits.extent(0) != inputs.extent(0) || teacher_logits.extent(1) != inputs.extent(1) ||
        teacher_logits.extent(2) != vocab)
      throw shape_error("ctformer::model::forward_backward_distilled: teacher_logits has shape " +
                        shape_string(teacher_logits) + ", expected (" + std::to_string(inputs.extent(0)) + ", " +
                        std::to_string(inputs.extent(1)) + ", " + std::to_string(vocab) + ")");
    forward<Compute>(inputs, targets);
    const step_views& s = step_;
    const tensor_view<const float, 2> teacher(teacher_logits.data(), {s.logits.extent(0), vocab});
    ops::distillation_loss_forward(exec_, s.logits, teacher, s.targets, settings.alpha, settings.temperature,
                                   s.losses);
    const float loss = mean_loss();
    teacher_ = teacher;
    distillation_ = settings;
    try {
      backward<Compute>(grad_scale);
    } catch (...) {
      teacher_ = {};
      throw;
    }
    teacher_ = {};
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
    return tensor_view<const float, 3>(step_.logits.data(), {batch_, seq_, vocab});
  }

  /// Call after changing the parameters outside forward/backward (an optimizer
  /// step, a checkpoint load): drops the cached low-precision weight copy.
  void parameters_changed() { compute_weights_valid_ = false; }

  /// Bytes of the activation arena now (it grows to the largest batch seen).
  std::size_t activation_bytes() const {
    return arena_.floats.size() * sizeof(float) + arena_.ints.size() * sizeof(std::int32_t) +
           compute_scratch_.size() * sizeof(bf16);
  }

 private:
  // The arena: every activation the backward pass needs, plus gradient
  // scratch, sized for batch_capacity x seq_capacity and carved per (B, T).
  struct activation_arena {
    storage<float> floats;
    storage<std::int32_t> ints;
    std::vector<float> host_losses;
    std::vector<std::int32_t> host_ints;
    index_t batch_capacity = 0, seq_capacity = 0;
  };

  struct step_views {
    block_activations layers[traits::n_layer];
    tensor_view<float, 4> probs[traits::n_layer];   // (B, H, T, T) per layer
    tensor_view<float, 2> final_in, final_norm_out;  // (N, C)
    tensor_view<float, 1> final_norm_mean, final_norm_rstd;
    tensor_view<float, 2> logits;                     // (N, V); dlogits in place
    tensor_view<float, 1> losses;                     // (N)
    block_gradient_scratch gradient;                  // (N, ...) rows
    tensor_view<std::int32_t, 1> tokens, targets, positions;  // (N)
    tensor_view<bf16, 1> compute_a, compute_b;        // mixed-precision operand scratch
    tensor_view<float, 2> adapter_scratch;            // (N, 2 rank), LoRA only
  };

  // The one walk over the arena's pieces: with null bases it sizes them.
  static step_views carve(float* floats, std::int32_t* ints, index_t b, index_t t, index_t* float_count = nullptr) {
    step_views s;
    const index_t n = b * t;
    arena_carver<float> f(floats);
    for (int l = 0; l < n_layer; ++l) {
      block_activations& a = s.layers[l];
      a.residual_in = l == 0 ? f.take(n, d_model) : s.layers[l - 1].residual_out;
      a.residual_mid = f.take(n, d_model);
      a.residual_out = f.take(n, d_model);
      a.attention_norm_out = f.take(n, d_model);
      a.attention_norm_mean = f.take(n);
      a.attention_norm_rstd = f.take(n);
      a.qkv = f.take(n, traits::qkv_width);
      s.probs[l] = f.take(b, n_head, t, t);
      a.attention_out = f.take(n, d_model);
      a.mlp_norm_out = f.take(n, d_model);
      a.mlp_norm_mean = f.take(n);
      a.mlp_norm_rstd = f.take(n);
      a.up_out = f.take(n, traits::up_width);
      a.activation_out = f.take(n, d_ff);
    }
    s.final_in = s.layers[n_layer - 1].residual_out;
    s.final_norm_out = f.take(n, d_model);
    s.final_norm_mean = f.take(n);
    s.final_norm_rstd = f.take(n);
    s.logits = f.take(n, vocab);
    s.losses = f.take(n);
    s.gradient.d_residual = f.take(n, d_model);
    s.gradient.d_scratch = f.take(n, d_model);
    s.gradient.d_norm = f.take(n, d_model);
    s.gradient.d_attention = f.take(n, d_model);
    s.gradient.d_qkv = f.take(n, traits::qkv_width);
    s.gradient.d_up = f.take(n, traits::up_width);
    s.gradient.d_activation = f.take(n, d_ff);
    if constexpr (traits::has_adapters) s.adapter_scratch = f.take(n, 2 * traits::adapter::rank);
    if (float_count) *float_count = f.used();
    arena_carver<std::int32_t> i(ints);
    s.tokens = i.take(n);
    s.targets = i.take(n);
    s.positions = i.take(n);
    return s;
  }
  static constexpr index_t ints_per_token = 3;  // tokens, targets, positions: what carve takes of ints

  // The widest activation that is a GEMM operand: (N, V) dlogits or an (N, width) activation.
  static index_t widest_operand(index_t n) {
    return n * std::max<index_t>({vocab, traits::qkv_width, traits::up_width, d_model});
  }

  void reserve(index_t b, index_t t) {
    if (b <= arena_.batch_capacity && t <= arena_.seq_capacity) return;
    const index_t cb = std::max(b, arena_.batch_capacity), ct = std::max(t, arena_.seq_capacity);
    index_t floats = 0;
    carve(nullptr, nullptr, cb, ct, &floats);
    arena_.floats = storage<float>(std::size_t(floats));
    arena_.ints = storage<std::int32_t>(std::size_t(ints_per_token * cb * ct));
    arena_.host_losses.assign(std::size_t(cb * ct), 0.0f);
    arena_.host_ints.assign(std::size_t(ints_per_token * cb * ct), 0);
    arena_.batch_capacity = cb;
    arena_.seq_capacity = ct;
  }

  template <class Compute>
  void reserve_compute() {
    if constexpr (std::same_as<Compute, bf16>) {
      const index_t needed = 2 * widest_operand(arena_.batch_capacity * arena_.seq_capacity);
      if (index_t(compute_scratch_.size()) < needed) compute_scratch_ = storage<bf16>(std::size_t(needed));
      if (compute_weights_.size() != std::size_t(parameter_count_))
        compute_weights_ = storage<bf16>(std::size_t(parameter_count_));
      if (!compute_weights_valid_) {
        ops::convert(exec_, as_const(parameters()), tensor_view<bf16, 1>(compute_weights_.data(), {parameter_count_}));
        compute_weights_valid_ = true;
      }
    }
  }

  // What ops::linear multiplies by for a parameter matrix: the fp32 view, or
  // (bf16 compute) the cached bf16 copy at the same offset with the step's
  // operand scratch.
  template <class Compute>
  auto operand_of() {
    if constexpr (std::same_as<Compute, float>) {
      return [](const tensor_view<float, 2>& m) { return as_const(m); };
    } else {
      static_assert(std::same_as<Compute, bf16>, "ctformer: the model computes in float or bf16");
      return [this](const tensor_view<float, 2>& m) {
        const bf16* copy = compute_weights_.data() + (m.data() - parameters_.data());
        return ops::mixed_precision_weight<bf16>{tensor_view<const bf16, 2>(copy, m.extents(), m.strides()),
                                                 step_.compute_a, step_.compute_b};
      };
    }
  }

  // (N, heads, D) rows of a (B, T) batch as the (B, T, heads, D) views the training attention takes.
  template <class T>
  static tensor_view<T, 4> batch_view(tensor_view<T, 3> rows, index_t b, index_t t) {
    return tensor_view<T, 4>(rows.data(), {b, t, rows.extent(1), rows.extent(2)},
                             {t * rows.stride(0), rows.stride(0), rows.stride(1), rows.stride(2)});
  }

  static tensor_view<float, 1> flat(tensor_view<float, 2> v) { return {v.data(), {v.size()}}; }

  void final_norm_forward(const step_views& s) {
    block::norm_forward(exec_, as_const(s.final_in), as_const(params_.final_norm_weight),
                        as_const(params_.final_norm_bias), s.final_norm_out, s.final_norm_mean, s.final_norm_rstd);
  }

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
    batch_ = b;
    seq_ = t;
    step_ = carve(arena_.floats.data(), arena_.ints.data(), b, t);
    reserve_compute<Compute>();
    if constexpr (std::same_as<Compute, bf16>) {
      const index_t half = compute_scratch_.size() / 2;
      step_.compute_a = tensor_view<bf16, 1>(compute_scratch_.data(), {half});
      step_.compute_b = tensor_view<bf16, 1>(compute_scratch_.data() + half, {half});
    }
    const step_views& s = step_;
    const index_t n = b * t;

    // Token ids, targets and positions go to the policy's memory through a host staging copy.
    std::int32_t* host = arena_.host_ints.data();
    for (index_t i = 0; i < b; ++i)
      for (index_t j = 0; j < t; ++j) {
        host[i * t + j] = inputs(i, j);
        host[n + i * t + j] = with_targets ? targets(i, j) : -1;
        host[2 * n + i * t + j] = std::int32_t(j);
      }
    ops::copy(exec_, tensor_view<const std::int32_t, 1>(host, {ints_per_token * n}),
              tensor_view<std::int32_t, 1>(s.tokens.data(), {ints_per_token * n}));

    auto x = s.layers[0].residual_in;
    ops::embedding_forward(exec_, as_const(s.tokens), as_const(params_.token_embedding), x);
    if constexpr (model_weights<Cfg>::learned_positions) {
      ops::embedding_forward(exec_, as_const(s.positions), as_const(params_.position_embedding), s.gradient.d_scratch);
      ops::add(exec_, as_const(flat(x)), as_const(flat(s.gradient.d_scratch)), flat(x));
    }

    const float scale = 1.0f / std::sqrt(float(head_dim));
    const auto operand = operand_of<Compute>();
    for_each_layer<Cfg>([&](index_t l, auto kind) {
      constexpr index_t window = decltype(kind)::window;
      const auto probs = s.probs[l];
      block::forward(exec_, params_.blocks[l], operand, s.layers[l], rope_.view(), as_const(s.positions),
                     [&](tensor_view<const float, 3> q, tensor_view<const float, 3> k, tensor_view<const float, 3> v,
                         tensor_view<float, 3> out) {
                       ops::causal_attention_forward(exec_, batch_view(q, b, t), batch_view(k, b, t),
                                                     batch_view(v, b, t), batch_view(out, b, t), probs, scale,
                                                     window);
                     },
                     adapters_of(l));
    });
    final_norm_forward(s);
    ops::linear(exec_, as_const(s.final_norm_out), operand(params_.lm_head), s.logits);
    if (!with_targets) return 0.0f;

    ops::softmax_cross_entropy_forward(exec_, s.logits, s.targets, s.losses);
    return mean_loss();
  }

  // The mean of step_.losses over the positions with a target (and their count).
  float mean_loss() {
    const index_t n = batch_ * seq_;
    const std::int32_t* host = arena_.host_ints.data();
    ops::copy(exec_, as_const(step_.losses), tensor_view<float, 1>(arena_.host_losses.data(), {n}));
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

  // Layer l's adapters for this step (none without LoRA).
  adapter_pass<Cfg> adapters_of(index_t l) {
    if constexpr (traits::has_adapters)
      return {&params_.adapters[l], &grads_.adapters[l], &frozen_flags_.adapters[l], step_.adapter_scratch};
    else
      return {};
  }

  // --- backward -----------------------------------------------------------------
  tensor_view<float, 1> norm_gradient(tensor_view<float, 1> gradient, bool frozen, int half) {
    return block::gradient_or_sink(gradient, frozen, tensor_view<float, 1>(frozen_gradient_sink_.data(), {2 * d_model}),
                                   half);
  }

  template <class Compute>
  void backward(float grad_scale) {
    const step_views& s = step_;
    const index_t b = batch_, t = seq_;
    if (counted_targets_ == 0) return;  // nothing to learn from this batch
    if (lowest_backward_layer_ > n_layer + 1) return;  // everything is frozen
    const auto operand = operand_of<Compute>();
    const auto& d = s.gradient;
    const auto& frozen = frozen_flags_;
    bool distilled = false;
    if constexpr (ops::has_distillation_loss<Exec>)
      if (teacher_.data() != nullptr) {
        ops::distillation_loss_backward(exec_, s.logits, teacher_, s.targets, distillation_.alpha,
                                        distillation_.temperature, grad_scale / float(counted_targets_), s.logits);
        distilled = true;
      }
    if (!distilled)
      ops::softmax_cross_entropy_backward(exec_, s.logits, s.targets, grad_scale / float(counted_targets_), s.logits);
    // logits = final_norm_out lm_head^T
    if (!frozen.lm_head)
      ops::linear_backward_weight(exec_, as_const(s.logits), as_const(s.final_norm_out), operand(params_.lm_head),
                                  grads_.lm_head);
    if (lowest_backward_layer_ == n_layer + 1) return;  // only the head trains
    ops::linear_backward_input(exec_, as_const(s.logits), operand(params_.lm_head), d.d_norm);
    block::norm_backward(exec_, as_const(d.d_norm), as_const(s.final_in), as_const(params_.final_norm_weight),
                         as_const(s.final_norm_mean), as_const(s.final_norm_rstd), d.d_residual,
                         norm_gradient(grads_.final_norm_weight, frozen.final_norm_weight, 0),
                         norm_gradient(grads_.final_norm_bias, frozen.final_norm_bias, 1));
    const float scale = 1.0f / std::sqrt(float(head_dim));
    for (int l = n_layer - 1; l >= int(lowest_backward_layer_); --l) {
      const auto probs = as_const(s.probs[l]);
      auto& g = grads_.blocks[l];
      const auto& f = frozen.blocks[l];
      block::backward(exec_, params_.blocks[l], operand, g, f, s.layers[l], d, rope_.view(), as_const(s.positions),
                      [&](tensor_view<const float, 3> dout, tensor_view<const float, 3> q,
                          tensor_view<const float, 3> k, tensor_view<const float, 3> v, tensor_view<float, 3> dq,
                          tensor_view<float, 3> dk, tensor_view<float, 3> dv) {
                        ops::causal_attention_backward(exec_, batch_view(dout, b, t), batch_view(q, b, t),
                                                       batch_view(k, b, t), batch_view(v, b, t), probs,
                                                       batch_view(dq, b, t), batch_view(dk, b, t),
                                                       batch_view(dv, b, t), scale);
                      },
                      tensor_view<float, 1>(frozen_gradient_sink_.data(), {2 * d_model}),
                      l > lowest_backward_layer_ || embeddings_train_, adapters_of(l));
    }
    if (!embeddings_train_) return;
    if (!frozen.token_embedding)
      ops::embedding_backward(exec_, as_const(s.tokens), as_const(d.d_residual), grads_.token_embedding);
    if constexpr (model_weights<Cfg>::learned_positions)
      if (!frozen.position_embedding)
        ops::embedding_backward(exec_, as_const(s.positions), as_const(d.d_residual), grads_.position_embedding);
  }

  // After frozen_ changed: the per-member flags, and gradient storage for the
  // trainable tensors only, packed in the order of trainable_ranges().
  void apply_freezing() {
    bind_frozen_flags();
    const auto slices = trainable_ranges();
    gradient_offsets_.assign(table_.size(), -1);
    index_t packed = 0;
    std::size_t tensor = 0;
    for (const auto& slice : slices) {
      for (; tensor < table_.size() && table_[tensor].offset < slice.offset + slice.size; ++tensor)
        if (!frozen_[tensor] && table_[tensor].offset >= slice.offset)
          gradient_offsets_[tensor] = packed + table_[tensor].offset - slice.offset;
      packed += slice.size;
    }
    gradient_count_ = packed;
    gradients_ = storage<float>(std::size_t(std::max<index_t>(packed, 1)));
    std::size_t i = 0;
    grads_.visit([&]<int Rank>(const std::string&, tensor_view<float, Rank>& view, std::vector<index_t> shape,
                               parameter_kind) {
      std::array<index_t, Rank> extents{};
      for (int d = 0; d < Rank; ++d) extents[d] = shape[std::size_t(d)];
      const index_t at = gradient_offsets_[i++];
      view = tensor_view<float, Rank>(at < 0 ? nullptr : gradients_.data() + at, extents);
    });
    if constexpr (traits::tie_embeddings) grads_.lm_head = grads_.token_embedding;
    zero_gradients();
  }

  // Mirrors frozen_ into per-member flags and finds how far down the backward
  // must go: layer l's backward is needed when it, a layer below it or an
  // embedding trains; n_layer means only the final norm (and head) train,
  // n_layer + 1 only the head, n_layer + 2 nothing.
  void bind_frozen_flags() {
    std::size_t i = 0;
    frozen_flags_.visit([&](const std::string&, bool& flag, const std::vector<index_t>&, parameter_kind) {
      flag = frozen_[i++];
    });
    if constexpr (traits::tie_embeddings) frozen_flags_.lm_head = frozen_flags_.token_embedding;
    auto block_trains = [&](const block_weights<Cfg, bool, bool>& f) {
      bool any = false;
      block_weights<Cfg, bool, bool> copy = f;
      copy.visit("", [&](const std::string&, bool& flag, const std::vector<index_t>&, parameter_kind) {
        any = any || !flag;
      });
      return any;
    };
    embeddings_train_ = !frozen_flags_.token_embedding;
    if constexpr (model_weights<Cfg>::learned_positions)
      embeddings_train_ = embeddings_train_ || !frozen_flags_.position_embedding;
    bool final_norm_trains = !frozen_flags_.final_norm_weight;
    if constexpr (model_weights<Cfg>::has_norm_bias)
      final_norm_trains = final_norm_trains || !frozen_flags_.final_norm_bias;
    if (embeddings_train_) {
      lowest_backward_layer_ = 0;
      return;
    }
    auto adapters_train = [&](index_t l) {
      bool any = false;
      if constexpr (traits::has_adapters) {
        lora_weights<Cfg, bool> copy = frozen_flags_.adapters[l];
        copy.visit("", [&](const std::string&, bool& flag, const std::vector<index_t>&, parameter_kind) {
          any = any || !flag;
        });
      }
      return any;
    };
    for (index_t l = 0; l < n_layer; ++l)
      if (block_trains(frozen_flags_.blocks[l]) || adapters_train(l)) {
        lowest_backward_layer_ = l;
        return;
      }
    lowest_backward_layer_ = final_norm_trains ? n_layer : (!frozen_flags_.lm_head ? n_layer + 1 : n_layer + 2);
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
      if (p.name.find(".lora.") != std::string::npos) {
        // PEFT's start: A Kaiming-uniform (a = sqrt 5, i.e. U(+-1/sqrt(in))), B
        // zero, so the adapted model starts as the base model exactly.
        const float bound = 1.0f / std::sqrt(float(p.shape[1]));
        std::uniform_real_distribution<float> uniform(-bound, bound);
        for (index_t i = 0; i < p.size(); ++i) dst[i] = p.name.ends_with(".a") ? uniform(rng) : 0.0f;
        continue;
      }
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

  Exec exec_;
  std::vector<parameter_info> table_;
  index_t parameter_count_ = 0;
  storage<float> parameters_, gradients_;
  index_t gradient_count_ = 0;
  std::vector<index_t> gradient_offsets_;  // per parameter_table() entry; -1 frozen
  model_weights<Cfg> params_, grads_;
  std::vector<bool> frozen_;                          // per parameter_table() entry
  model_weights<Cfg, bool, bool, bool> frozen_flags_{};  // the same, per member
  index_t lowest_backward_layer_ = 0;
  bool embeddings_train_ = true;
  storage<float> frozen_gradient_sink_;               // (2 C): where frozen norms' gradients go
  rope_table_storage<Cfg, Exec> rope_;
  storage<bf16> compute_weights_, compute_scratch_;
  bool compute_weights_valid_ = false;
  activation_arena arena_;
  step_views step_{};
  index_t batch_ = 0, seq_ = 0, counted_targets_ = 0;
  // Set only inside forward_backward_distilled: the teacher's (B x T, V) logits.
  tensor_view<const float, 2> teacher_{};
  distillation_settings distillation_{};
};

/// Folds a LoRA model's adapters into a model of its base configuration:
/// `base` receives tuned's base tensors with W += (alpha / rank) B A on every
/// adapted projection, and is then an ordinary model (quantize it, export
/// it, serve it). The adapted model is left as it was.
template <class Cfg, execution_policy Exec>
  requires config_traits<Cfg>::has_adapters
void merge_lora(model<Cfg, Exec>& tuned, model<typename base_config_of<Cfg>::type, Exec>& base) {
  using adapter = typename config_traits<Cfg>::adapter;
  using geometry = lora_geometry<Cfg>;
  const auto& exec = tuned.exec();
  // The base tensors are a prefix of the adapted layout (model_weights visits
  // the adapters last): one copy moves them all.
  const index_t n = base.parameter_count();
  ops::copy(exec, tensor_view<const float, 1>(tuned.parameters().data(), {n}), base.parameters());
  for (index_t l = 0; l < config_traits<Cfg>::n_layer; ++l) {
    auto& block = base.weights().blocks[l];
    const auto& adapters = tuned.weights().adapters[l];
    for (int i = 0; i < 7; ++i) {
      const lora_target t = all_lora_targets[i];
      if (!adapter::has(t)) continue;
      tensor_view<float, 2> matrix = t == lora_target::o      ? block.output
                                     : t == lora_target::down ? block.down
                                     : (t == lora_target::gate || t == lora_target::up) ? block.up
                                                                                         : block.qkv;
      const index_t in = geometry::in_of(t);
      const tensor_view<float, 2> rows(matrix.data() + geometry::column_of(t) * in, {geometry::out_of(t), in});
      ops::gemm(exec, as_const(adapters.b[i]), as_const(adapters.a[i]), rows, adapter::scale, 1.0f);
    }
  }
  exec.synchronize();
  base.parameters_changed();
}

}  // namespace ctformer::nn
