// The decoder block, written once: its parameter list (names, shapes, kinds),
// its forward (training saves the activations, inference writes a KV cache:
// the attention is the caller's) and its backward, and the RoPE tables.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/nn/config.hpp"
#include "ctformer/nn/parameters.hpp"
#include "ctformer/ops/ops.hpp"

namespace ctformer::nn {

/// The parameters of one pre-norm decoder block.
/// @tparam Matrix what a linear layer's weights are: tensor_view<float, 2>
///   (training parameters, and their gradients), or a packed inference matrix
/// @tparam Vector norms and biases (tensor_view<float, 1>)
template <model_config Cfg, class Matrix = tensor_view<float, 2>, class Vector = tensor_view<float, 1>>
struct block_weights {
  using traits = config_traits<Cfg>;
  static constexpr bool has_norm_bias = std::same_as<typename Cfg::norm, layer_norm>;

  Vector attention_norm_weight, attention_norm_bias;  // (C)
  Matrix qkv;                                         // (qkv_width, C): q, k, v rows stacked
  Vector qkv_bias;                                    // (qkv_width)
  Matrix output;                                      // (C, C)
  Vector output_bias;                                 // (C)
  Vector mlp_norm_weight, mlp_norm_bias;              // (C)
  Matrix up;                                          // (up_width, C): gate rows first when gated
  Vector up_bias;                                     // (up_width)
  Matrix down;                                        // (C, F)
  Vector down_bias;                                   // (C)

  /// Calls visit(name, member, shape, kind) for every tensor this block has,
  /// in layout order: the one list that the parameter layout, the bindings
  /// of parameters and gradients, checkpoints and the inference loader share.
  template <class Visit>
  void visit(const std::string& prefix, Visit&& visit) {
    constexpr index_t c = traits::d_model;
    visit(prefix + "attention_norm.weight", attention_norm_weight, std::vector<index_t>{c}, parameter_kind::norm);
    if constexpr (has_norm_bias)
      visit(prefix + "attention_norm.bias", attention_norm_bias, std::vector<index_t>{c}, parameter_kind::norm);
    visit(prefix + "attention.qkv.weight", qkv, std::vector<index_t>{traits::qkv_width, c}, parameter_kind::matrix);
    if constexpr (traits::bias)
      visit(prefix + "attention.qkv.bias", qkv_bias, std::vector<index_t>{traits::qkv_width}, parameter_kind::bias);
    visit(prefix + "attention.output.weight", output, std::vector<index_t>{c, c}, parameter_kind::matrix);
    if constexpr (traits::bias)
      visit(prefix + "attention.output.bias", output_bias, std::vector<index_t>{c}, parameter_kind::bias);
    visit(prefix + "mlp_norm.weight", mlp_norm_weight, std::vector<index_t>{c}, parameter_kind::norm);
    if constexpr (has_norm_bias)
      visit(prefix + "mlp_norm.bias", mlp_norm_bias, std::vector<index_t>{c}, parameter_kind::norm);
    visit(prefix + "mlp.up.weight", up, std::vector<index_t>{traits::up_width, c}, parameter_kind::matrix);
    if constexpr (traits::bias)
      visit(prefix + "mlp.up.bias", up_bias, std::vector<index_t>{traits::up_width}, parameter_kind::bias);
    visit(prefix + "mlp.down.weight", down, std::vector<index_t>{c, traits::d_ff}, parameter_kind::matrix);
    if constexpr (traits::bias)
      visit(prefix + "mlp.down.bias", down_bias, std::vector<index_t>{c}, parameter_kind::bias);
  }
};

/// Where each LoRA target sits: the projection's input width, its output rows
/// and the first of them in the fused output (q, k, v in qkv; gate, up in up).
template <model_config Cfg>
struct lora_geometry {
  using traits = config_traits<Cfg>;
  static constexpr index_t q_width = traits::n_head * traits::head_dim, kv_width = traits::n_kv_head * traits::head_dim;
  static constexpr int index_of(lora_target t) {
    for (int i = 0; i < 7; ++i)
      if (all_lora_targets[i] == t) return i;
    return 0;
  }
  static constexpr index_t in_of(lora_target t) { return t == lora_target::down ? traits::d_ff : traits::d_model; }
  static constexpr index_t out_of(lora_target t) {
    switch (t) {
      case lora_target::q: return q_width;
      case lora_target::k:
      case lora_target::v: return kv_width;
      case lora_target::gate:
      case lora_target::up: return traits::d_ff;
      default: return traits::d_model;
    }
  }
  static constexpr index_t column_of(lora_target t) {
    switch (t) {
      case lora_target::k: return q_width;
      case lora_target::v: return q_width + kv_width;
      case lora_target::up: return traits::gated ? traits::d_ff : 0;
      default: return 0;
    }
  }
};

/// One block's LoRA adapters: a[i] (rank, in) and b[i] (out, rank) for the
/// i-th of all_lora_targets, present only for Cfg's targets.
template <model_config Cfg, class Matrix = tensor_view<float, 2>>
struct lora_weights {
  using adapter = typename config_traits<Cfg>::adapter;
  using geometry = lora_geometry<Cfg>;
  Matrix a[7], b[7];

  template <class Visit>
  void visit(const std::string& prefix, Visit&& visit) {
    for (int i = 0; i < 7; ++i) {
      const lora_target t = all_lora_targets[i];
      if (!adapter::has(t)) continue;
      const std::string name = prefix + "lora." + lora_target_name(t);
      visit(name + ".a", a[i], std::vector<index_t>{adapter::rank, geometry::in_of(t)}, parameter_kind::matrix);
      visit(name + ".b", b[i], std::vector<index_t>{geometry::out_of(t), adapter::rank}, parameter_kind::matrix);
    }
  }
};

/// The whole model's parameters: embeddings, the blocks, the final norm and
/// the LM head (the token embedding itself when tied: then it is not visited).
/// @tparam Table the embedding tables' type (tensor_view<float, 2>)
template <model_config Cfg, class Matrix = tensor_view<float, 2>, class Vector = tensor_view<float, 1>,
          class Table = tensor_view<float, 2>>
struct model_weights {
  using config = Cfg;
  using traits = config_traits<Cfg>;
  using block_type = block_weights<Cfg, Matrix, Vector>;
  static constexpr bool has_norm_bias = std::same_as<typename Cfg::norm, layer_norm>;
  static constexpr bool learned_positions = std::same_as<typename Cfg::position, learned_position>;

  Table token_embedding;     // (V, C)
  Table position_embedding;  // (max_seq, C), learned positions only
  block_type blocks[traits::n_layer];
  Vector final_norm_weight, final_norm_bias;  // (C)
  Matrix lm_head;                             // (V, C)
  /// LoRA adapters, after every base tensor in the layout (so a base model's
  /// buffer is a prefix of its adapted model's, and the adapters one slice);
  /// an empty member for a configuration without them.
  struct no_adapters {};
  [[no_unique_address]] std::conditional_t<traits::has_adapters,
                                           std::array<lora_weights<Cfg, Matrix>, std::size_t(traits::n_layer)>,
                                           no_adapters> adapters{};

  template <class Visit>
  void visit(Visit&& visit) {
    constexpr index_t c = traits::d_model;
    visit(std::string("token_embedding.weight"), token_embedding, std::vector<index_t>{traits::vocab, c},
          parameter_kind::embedding);
    if constexpr (learned_positions)
      visit(std::string("position_embedding.weight"), position_embedding, std::vector<index_t>{traits::max_seq, c},
            parameter_kind::embedding);
    for (int l = 0; l < traits::n_layer; ++l) blocks[l].visit("blocks." + std::to_string(l) + ".", visit);
    visit(std::string("final_norm.weight"), final_norm_weight, std::vector<index_t>{c}, parameter_kind::norm);
    if constexpr (has_norm_bias)
      visit(std::string("final_norm.bias"), final_norm_bias, std::vector<index_t>{c}, parameter_kind::norm);
    if constexpr (!traits::tie_embeddings)
      visit(std::string("lm_head.weight"), lm_head, std::vector<index_t>{traits::vocab, c}, parameter_kind::matrix);
    if constexpr (traits::has_adapters)
      for (int l = 0; l < traits::n_layer; ++l) adapters[l].visit("blocks." + std::to_string(l) + ".", visit);
  }
};

/// The parameter table of configuration Cfg (names, offsets in the flat
/// buffer, shapes, kinds), from model_weights' visit.
template <model_config Cfg>
std::vector<parameter_info> parameter_table_of() {
  model_weights<Cfg> probe;
  parameter_layout layout;
  probe.visit([&](const std::string& name, auto&, std::vector<index_t> shape, parameter_kind kind) {
    layout.add(name, std::move(shape), kind);
  });
  return layout.table();
}

/// Floats the flat parameter buffer of Cfg holds (alignment padding included).
template <model_config Cfg>
index_t parameter_count_of() {
  model_weights<Cfg> probe;
  parameter_layout layout;
  probe.visit([&](const std::string& name, auto&, std::vector<index_t> shape, parameter_kind kind) {
    layout.add(name, std::move(shape), kind);
  });
  return layout.total();
}

/// Points every view of a model_weights at its place in a flat buffer laid
/// out by parameter_table_of (the same walk); a tied head views the token
/// embedding.
template <model_config Cfg>
void bind_weights(model_weights<Cfg>& weights, float* base) {
  parameter_layout layout;
  weights.visit([&]<int Rank>(const std::string& name, tensor_view<float, Rank>& view, std::vector<index_t> shape,
                              parameter_kind kind) {
    std::array<index_t, Rank> extents{};
    for (int d = 0; d < Rank; ++d) extents[d] = shape[std::size_t(d)];
    view = tensor_view<float, Rank>(base + layout.add(name, std::move(shape), kind), extents);
  });
  if constexpr (config_traits<Cfg>::tie_embeddings) weights.lm_head = weights.token_embedding;
}

// --- the layer stack -------------------------------------------------------------

/// Calls f(l, kind) for every layer l of Cfg in order, kind the layer's
/// attention kind as a value (global_attention{} or sliding_window<W>{}, so
/// decltype(kind)::window is a constant): a fold over the configuration's
/// layer pattern with Boost.Hana, one pattern period after another. A
/// uniform stack is one plain loop over the layers.
template <model_config Cfg, class F>
void for_each_layer(F&& f) {
  namespace hana = boost::hana;
  using traits = config_traits<Cfg>;
  using pattern = typename traits::attention_pattern;
  if constexpr (traits::uniform_attention) {
    using kind = typename decltype(+hana::front(pattern::kinds))::type;
    for (int l = 0; l < traits::n_layer; ++l) f(index_t(l), kind{});
  } else {
    for (int base = 0; base < traits::n_layer; base += pattern::period)
      hana::for_each(hana::make_range(hana::int_c<0>, hana::int_c<pattern::period>), [&](auto i) {
        using kind = typename decltype(+hana::at(pattern::kinds, i))::type;
        if (base + i < traits::n_layer) f(index_t(base + i), kind{});
      });
  }
}

// --- RoPE ---------------------------------------------------------------------

/// cos and sin of every (position, frequency) of Cfg's rotary embedding, as
/// one host array: cos (max_seq, head_dim / 2), then sin. Angles are computed
/// in double and rounded once, so every model of Cfg rotates by the same bits.
template <model_config Cfg>
std::vector<float> rope_table_values() {
  using traits = config_traits<Cfg>;
  const index_t half = traits::head_dim / 2, positions = traits::max_seq;
  std::vector<float> host(std::size_t(2 * positions * half));
  for (index_t pos = 0; pos < positions; ++pos)
    for (index_t c = 0; c < half; ++c) {
      const double frequency = std::pow(double(traits::rope_base), -2.0 * double(c) / double(traits::head_dim));
      host[std::size_t(pos * half + c)] = float(std::cos(double(pos) * frequency));
      host[std::size_t(positions * half + pos * half + c)] = float(std::sin(double(pos) * frequency));
    }
  return host;
}

/// The RoPE tables in a policy's memory: cos and sin, (max_seq, head_dim / 2) each.
struct rope_tables {
  tensor_view<const float, 2> cos, sin;
};

/// Owns Cfg's RoPE tables in the memory of policy Exec (empty for learned positions).
template <model_config Cfg, execution_policy Exec>
class rope_table_storage {
 public:
  explicit rope_table_storage(const Exec& exec) {
    if constexpr (std::same_as<typename Cfg::position, rope>) {
      const auto host = rope_table_values<Cfg>();
      storage_ = buffer_for<float, Exec>(host.size());
      ops::copy(exec, tensor_view<const float, 1>(host.data(), {index_t(host.size())}),
                tensor_view<float, 1>(storage_.data(), {index_t(host.size())}));
      exec.synchronize();
    }
  }
  rope_tables view() const {
    constexpr index_t half = config_traits<Cfg>::head_dim / 2, positions = config_traits<Cfg>::max_seq;
    return {tensor_view<const float, 2>(storage_.data(), {positions, half}),
            tensor_view<const float, 2>(storage_.data() + positions * half, {positions, half})};
  }

 private:
  buffer_for<float, Exec> storage_;
};

// --- the block's math -----------------------------------------------------------

/// The activations one block forward writes, over N rows (tokens). Training
/// keeps one set per layer for the backward pass (residual_out is the next
/// layer's residual_in); inference reuses one set for every layer and points
/// the three residual views at one buffer (the stream updated in place).
struct block_activations {
  tensor_view<float, 2> residual_in, residual_mid, residual_out;   // (N, C)
  tensor_view<float, 2> attention_norm_out;                         // (N, C)
  tensor_view<float, 1> attention_norm_mean, attention_norm_rstd;   // (N)
  tensor_view<float, 2> qkv;                                        // (N, qkv_width), after RoPE
  tensor_view<float, 2> attention_out;                              // (N, C), before the output projection
  tensor_view<float, 2> mlp_norm_out;                               // (N, C)
  tensor_view<float, 1> mlp_norm_mean, mlp_norm_rstd;               // (N)
  tensor_view<float, 2> up_out;                                     // (N, up_width), before the activation
  tensor_view<float, 2> activation_out;                             // (N, F)
};

/// Gradient scratch of one block backward over N rows.
struct block_gradient_scratch {
  tensor_view<float, 2> d_residual;  // (N, C): in, the gradient of residual_out; out, of residual_in
  tensor_view<float, 2> d_scratch, d_norm, d_attention;  // (N, C)
  tensor_view<float, 2> d_qkv;                            // (N, qkv_width)
  tensor_view<float, 2> d_up;                             // (N, up_width)
  tensor_view<float, 2> d_activation;                     // (N, F)
};

/// A block's LoRA adapters for one pass: their weights, and for training
/// their gradients and frozen flags, with (N, 2 rank) scratch. The default
/// (no weights) is no adapters: what inference and base models pass.
template <model_config Cfg>
struct adapter_pass {
  const lora_weights<Cfg>* weights = nullptr;
  lora_weights<Cfg>* gradients = nullptr;
  const lora_weights<Cfg, bool>* frozen = nullptr;
  tensor_view<float, 2> scratch;  // (N, 2 rank): x A^T, then its gradient
};

/// One pre-norm decoder layer of Cfg:
///   x += attention(norm(x)) W_o (+ b_o);  x += act(norm(x) W_up) W_down (+ b_down)
/// with q, k, v from one fused projection, RoPE at each row's position, and
/// the attention itself left to the caller (training: over the batch's own
/// keys, saving probabilities; inference: over a KV cache).
template <model_config Cfg>
struct decoder_block {
  using traits = config_traits<Cfg>;
  static constexpr index_t d_model = traits::d_model, n_head = traits::n_head, n_kv_head = traits::n_kv_head,
                           head_dim = traits::head_dim, d_ff = traits::d_ff;
  static constexpr bool rotary = std::same_as<typename Cfg::position, rope>;
  static constexpr bool layer_normed = std::same_as<typename Cfg::norm, layer_norm>;

  /// q, k and v of a (N, qkv_width) buffer as (N, heads, D) views.
  template <class T>
  static tensor_view<T, 3> heads_of(T* qkv_rows, index_t n, index_t heads, index_t first_column) {
    return tensor_view<T, 3>(qkv_rows + first_column, {n, heads, head_dim}, {traits::qkv_width, head_dim, 1});
  }
  template <class T>
  static tensor_view<T, 3> queries(T* qkv_rows, index_t n) { return heads_of(qkv_rows, n, n_head, 0); }
  template <class T>
  static tensor_view<T, 3> keys(T* qkv_rows, index_t n) { return heads_of(qkv_rows, n, n_kv_head, n_head * head_dim); }
  template <class T>
  static tensor_view<T, 3> values(T* qkv_rows, index_t n) {
    return heads_of(qkv_rows, n, n_kv_head, (n_head + n_kv_head) * head_dim);
  }

  template <execution_policy Exec>
  static void norm_forward(const Exec& exec, tensor_view<const float, 2> x, tensor_view<const float, 1> weight,
                           tensor_view<const float, 1> bias, tensor_view<float, 2> y, tensor_view<float, 1> mean,
                           tensor_view<float, 1> rstd) {
    if constexpr (layer_normed) ops::layer_norm_forward(exec, x, weight, bias, y, mean, rstd, traits::norm_eps);
    else ops::rms_norm_forward(exec, x, weight, y, rstd, traits::norm_eps);
  }

  template <execution_policy Exec>
  static void norm_backward(const Exec& exec, tensor_view<const float, 2> dy, tensor_view<const float, 2> x,
                            tensor_view<const float, 1> weight, tensor_view<const float, 1> mean,
                            tensor_view<const float, 1> rstd, tensor_view<float, 2> dx, tensor_view<float, 1> dweight,
                            tensor_view<float, 1> dbias) {
    if constexpr (layer_normed) ops::layer_norm_backward(exec, dy, x, weight, mean, rstd, dx, dweight, dbias);
    else ops::rms_norm_backward(exec, dy, x, weight, rstd, dx, dweight);
  }

  // y (+)= x W^T (+ bias)
  template <execution_policy Exec, class W, class Operand, class V>
  static void linear(const Exec& exec, tensor_view<const float, 2> x, const W& weight, Operand&& as_operand,
                     const V& bias, tensor_view<float, 2> y, bool accumulate) {
    ops::linear(exec, x, as_operand(weight), y, accumulate);
    if constexpr (traits::bias) ops::add_bias(exec, y, as_const(bias));
  }

  static tensor_view<float, 1> flat(tensor_view<float, 2> v) { return {v.data(), {v.size()}}; }

  /// A norm's gradient view, or for a frozen norm the given half of `sink`
  /// ((2 C) floats that nothing reads), so the norm kernels need no variant.
  static tensor_view<float, 1> gradient_or_sink(tensor_view<float, 1> gradient, bool frozen,
                                                tensor_view<float, 1> sink, int half) {
    return frozen ? tensor_view<float, 1>(sink.data() + half * d_model, {d_model}) : gradient;
  }

  using adapter = typename traits::adapter;
  using geometry = lora_geometry<Cfg>;

  // The adapter's columns of a projection's (N, out) output.
  template <lora_target T, class V>
  static auto adapter_columns(V y) {
    using view = tensor_view<std::remove_pointer_t<decltype(y.data())>, 2>;
    return view(y.data() + geometry::column_of(T), {y.extent(0), geometry::out_of(T)}, {y.stride(0), 1});
  }

  // y[:, target's columns] += scale * (x A^T) B^T, when T is adapted.
  template <lora_target T, execution_policy Exec>
  static void adapter_forward(const Exec& exec, const adapter_pass<Cfg>& p, tensor_view<const float, 2> x,
                              tensor_view<float, 2> y) {
    if constexpr (adapter::has(T)) {
      if (!p.weights) return;
      constexpr int i = geometry::index_of(T);
      const tensor_view<float, 2> xa(p.scratch.data(), {x.extent(0), adapter::rank}, {p.scratch.stride(0), 1});
      ops::gemm(exec, x, as_const(p.weights->a[i]).transposed(), xa);
      ops::gemm(exec, as_const(xa), as_const(p.weights->b[i]).transposed(), adapter_columns<T>(y), adapter::scale,
                1.0f);
    }
  }

  // The adapter's share of a projection's backward, dy being the gradient of
  // the whole (N, out) output: dB += s dy^T (x A^T), dA += (s dy B)^T x and,
  // with need_dx, dx += (s dy B) A. x A^T is recomputed (rank columns: cheap)
  // rather than kept from the forward.
  template <lora_target T, execution_policy Exec>
  static void adapter_backward(const Exec& exec, const adapter_pass<Cfg>& p, tensor_view<const float, 2> dy,
                               tensor_view<const float, 2> x, tensor_view<float, 2> dx, bool need_dx) {
    if constexpr (adapter::has(T)) {
      if (!p.weights) return;
      constexpr int i = geometry::index_of(T);
      constexpr index_t r = adapter::rank;
      const index_t n = x.extent(0);
      const bool train_a = !p.frozen->a[i], train_b = !p.frozen->b[i];
      if (!train_a && !train_b && !need_dx) return;
      const auto dy_t = adapter_columns<T>(dy);
      const tensor_view<float, 2> xa(p.scratch.data(), {n, r}, {p.scratch.stride(0), 1});
      const tensor_view<float, 2> dxa(p.scratch.data() + r, {n, r}, {p.scratch.stride(0), 1});
      if (train_b) {
        ops::gemm(exec, x, as_const(p.weights->a[i]).transposed(), xa);
        ops::gemm(exec, dy_t.transposed(), as_const(xa), p.gradients->b[i], adapter::scale, 1.0f);
      }
      ops::gemm(exec, dy_t, as_const(p.weights->b[i]), dxa, adapter::scale, 0.0f);
      if (train_a) ops::gemm(exec, as_const(dxa).transposed(), x, p.gradients->a[i], 1.0f, 1.0f);
      if (need_dx) ops::gemm(exec, as_const(dxa), as_const(p.weights->a[i]), dx, 1.0f, 1.0f);
    }
  }

  /// The block's forward over N rows.
  /// @param weights the block's block_weights (any matrix type)
  /// @param as_operand maps a stored matrix to what ops::linear takes (the
  ///   identity; or a training model's mixed-precision operand)
  /// @param positions (N) int32 in the policy's memory: each row's position (RoPE)
  /// @param attend attend(q (N, H, D), k (N, KV, D), v (N, KV, D), out (N, H, D)):
  ///   attention of the rows, q and k already rotated
  /// @param adapters the block's LoRA adapters (none by default)
  template <execution_policy Exec, class Weights, class Operand, class Attend>
  static void forward(const Exec& exec, const Weights& w, Operand&& as_operand, const block_activations& a,
                      const rope_tables& rope, tensor_view<const std::int32_t, 1> positions, Attend&& attend,
                      const adapter_pass<Cfg>& adapters = {}) {
    const index_t n = a.residual_in.extent(0);
    norm_forward(exec, as_const(a.residual_in), as_const(w.attention_norm_weight), as_const(w.attention_norm_bias),
                 a.attention_norm_out, a.attention_norm_mean, a.attention_norm_rstd);
    linear(exec, as_const(a.attention_norm_out), w.qkv, as_operand, w.qkv_bias, a.qkv, false);
    adapter_forward<lora_target::q>(exec, adapters, as_const(a.attention_norm_out), a.qkv);
    adapter_forward<lora_target::k>(exec, adapters, as_const(a.attention_norm_out), a.qkv);
    adapter_forward<lora_target::v>(exec, adapters, as_const(a.attention_norm_out), a.qkv);
    auto q = queries(a.qkv.data(), n);
    auto k = keys(a.qkv.data(), n);
    if constexpr (rotary) {
      ops::rope_rotate_rows(exec, q, rope.cos, rope.sin, positions, 1);
      ops::rope_rotate_rows(exec, k, rope.cos, rope.sin, positions, 1);
    }
    attend(as_const(q), as_const(k), as_const(values(a.qkv.data(), n)),
           tensor_view<float, 3>(a.attention_out.data(), {n, n_head, head_dim}));
    if (a.residual_mid.data() != a.residual_in.data())
      ops::copy(exec, as_const(flat(a.residual_in)), flat(a.residual_mid));
    linear(exec, as_const(a.attention_out), w.output, as_operand, w.output_bias, a.residual_mid, true);
    adapter_forward<lora_target::o>(exec, adapters, as_const(a.attention_out), a.residual_mid);

    norm_forward(exec, as_const(a.residual_mid), as_const(w.mlp_norm_weight), as_const(w.mlp_norm_bias),
                 a.mlp_norm_out, a.mlp_norm_mean, a.mlp_norm_rstd);
    linear(exec, as_const(a.mlp_norm_out), w.up, as_operand, w.up_bias, a.up_out, false);
    adapter_forward<lora_target::gate>(exec, adapters, as_const(a.mlp_norm_out), a.up_out);
    adapter_forward<lora_target::up>(exec, adapters, as_const(a.mlp_norm_out), a.up_out);
    if constexpr (traits::gated) ops::swiglu_forward(exec, as_const(a.up_out), a.activation_out);
    else ops::gelu_forward(exec, as_const(flat(a.up_out)), flat(a.activation_out));
    if (a.residual_out.data() != a.residual_mid.data())
      ops::copy(exec, as_const(flat(a.residual_mid)), flat(a.residual_out));
    linear(exec, as_const(a.activation_out), w.down, as_operand, w.down_bias, a.residual_out, true);
    adapter_forward<lora_target::down>(exec, adapters, as_const(a.activation_out), a.residual_out);
  }

  /// The block's backward over the rows forward saw (training weights only):
  /// reads d.d_residual as the gradient of residual_out and leaves there the
  /// gradient of residual_in; adds the parameter gradients to `grads`, except
  /// for tensors flagged in `frozen`: their weight-gradient GEMMs are skipped
  /// and their norms' gradients go to `sink` (2 C floats nobody reads).
  /// Without input_gradient (nothing below trains) the gradient of
  /// residual_in is not computed where the attention norm is frozen too.
  /// @param frozen block_weights<Cfg, bool, bool>: true for a frozen tensor
  /// @param attend_backward attend_backward(dout (N, H, D), q, k, v, dq, dk, dv)
  template <execution_policy Exec, class Weights, class Operand, class Gradients, class AttendBackward>
  static void backward(const Exec& exec, const Weights& w, Operand&& as_operand, Gradients& g,
                       const block_weights<Cfg, bool, bool>& frozen, const block_activations& a,
                       const block_gradient_scratch& d, const rope_tables& rope,
                       tensor_view<const std::int32_t, 1> positions, AttendBackward&& attend_backward,
                       tensor_view<float, 1> sink, bool input_gradient = true,
                       const adapter_pass<Cfg>& adapters = {}) {
    const index_t n = a.residual_in.extent(0);
    auto linear_backward = [&](tensor_view<const float, 2> dy, tensor_view<const float, 2> x, const auto& weight,
                               auto& dweight, auto& dbias, bool weight_frozen, bool bias_frozen,
                               tensor_view<float, 2> dx, bool need_dx = true) {
      const auto operand = as_operand(weight);
      if (need_dx) ops::linear_backward_input(exec, dy, operand, dx, false);
      if (!weight_frozen) ops::linear_backward_weight(exec, dy, x, operand, dweight);
      if constexpr (traits::bias)
        if (!bias_frozen) ops::bias_backward(exec, dy, dbias);
    };
    auto norm_gradient = [&](tensor_view<float, 1> gradient, bool is_frozen, int half) {
      return gradient_or_sink(gradient, is_frozen, sink, half);
    };
    // residual_out = residual_mid + activation_out W_down^T
    linear_backward(as_const(d.d_residual), as_const(a.activation_out), w.down, g.down, g.down_bias, frozen.down,
                    frozen.down_bias, d.d_activation);
    adapter_backward<lora_target::down>(exec, adapters, as_const(d.d_residual), as_const(a.activation_out),
                                        d.d_activation, true);
    if constexpr (traits::gated) ops::swiglu_backward(exec, as_const(a.up_out), as_const(d.d_activation), d.d_up);
    else ops::gelu_backward(exec, as_const(flat(a.up_out)), as_const(flat(d.d_activation)), flat(d.d_up));
    linear_backward(as_const(d.d_up), as_const(a.mlp_norm_out), w.up, g.up, g.up_bias, frozen.up, frozen.up_bias,
                    d.d_norm);
    adapter_backward<lora_target::gate>(exec, adapters, as_const(d.d_up), as_const(a.mlp_norm_out), d.d_norm, true);
    adapter_backward<lora_target::up>(exec, adapters, as_const(d.d_up), as_const(a.mlp_norm_out), d.d_norm, true);
    norm_backward(exec, as_const(d.d_norm), as_const(a.residual_mid), as_const(w.mlp_norm_weight),
                  as_const(a.mlp_norm_mean), as_const(a.mlp_norm_rstd), d.d_scratch,
                  norm_gradient(g.mlp_norm_weight, frozen.mlp_norm_weight, 0),
                  norm_gradient(g.mlp_norm_bias, frozen.mlp_norm_bias, 1));
    ops::add(exec, as_const(flat(d.d_residual)), as_const(flat(d.d_scratch)), flat(d.d_residual));
    // residual_mid = residual_in + attention_out W_o^T
    linear_backward(as_const(d.d_residual), as_const(a.attention_out), w.output, g.output, g.output_bias,
                    frozen.output, frozen.output_bias, d.d_attention);
    adapter_backward<lora_target::o>(exec, adapters, as_const(d.d_residual), as_const(a.attention_out),
                                     d.d_attention, true);
    auto dq = queries(d.d_qkv.data(), n);
    auto dk = keys(d.d_qkv.data(), n);
    attend_backward(tensor_view<const float, 3>(d.d_attention.data(), {n, n_head, head_dim}),
                    as_const(queries(a.qkv.data(), n)), as_const(keys(a.qkv.data(), n)),
                    as_const(values(a.qkv.data(), n)), dq, dk, values(d.d_qkv.data(), n));
    if constexpr (rotary) {
      ops::rope_rotate_rows(exec, dq, rope.cos, rope.sin, positions, -1);
      ops::rope_rotate_rows(exec, dk, rope.cos, rope.sin, positions, -1);
    }
    bool attention_norm_trains = !frozen.attention_norm_weight;
    if constexpr (layer_normed) attention_norm_trains = attention_norm_trains || !frozen.attention_norm_bias;
    const bool below = input_gradient || attention_norm_trains;
    linear_backward(as_const(d.d_qkv), as_const(a.attention_norm_out), w.qkv, g.qkv, g.qkv_bias, frozen.qkv,
                    frozen.qkv_bias, d.d_norm, below);
    adapter_backward<lora_target::q>(exec, adapters, as_const(d.d_qkv), as_const(a.attention_norm_out), d.d_norm, below);
    adapter_backward<lora_target::k>(exec, adapters, as_const(d.d_qkv), as_const(a.attention_norm_out), d.d_norm, below);
    adapter_backward<lora_target::v>(exec, adapters, as_const(d.d_qkv), as_const(a.attention_norm_out), d.d_norm, below);
    if (!below) return;
    norm_backward(exec, as_const(d.d_norm), as_const(a.residual_in), as_const(w.attention_norm_weight),
                  as_const(a.attention_norm_mean), as_const(a.attention_norm_rstd), d.d_scratch,
                  norm_gradient(g.attention_norm_weight, frozen.attention_norm_weight, 0),
                  norm_gradient(g.attention_norm_bias, frozen.attention_norm_bias, 1));
    ops::add(exec, as_const(flat(d.d_residual)), as_const(flat(d.d_scratch)), flat(d.d_residual));
  }
};

}  // namespace ctformer::nn
