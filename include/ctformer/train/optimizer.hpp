// train::adamw and train::sgd: optimizer state (one contiguous buffer per
// moment, in the policy's memory, covering only the trainable parameters) and
// the step that calls the fused update once per trainable slice.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "ctformer/core/parameter_range.hpp"
#include "ctformer/exec/execution_policy.hpp"
#include "ctformer/ops/ops.hpp"

namespace ctformer::train {

/// AdamW hyper-parameters; the learning rate comes from the schedule each step.
struct adamw_config {
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  /// false: decay only ranges marked decay (nn/ marks norms, biases and
  /// embeddings as no-decay); true: decay every parameter (PyTorch's default).
  bool decay_all = false;
};

/// SGD-with-momentum hyper-parameters (weight decay is L2, as torch.optim.SGD).
struct sgd_config {
  float momentum = 0.9f;
  float weight_decay = 0.0f;
  bool nesterov = false;
  bool decay_all = false;
};

/// Which slices of the flat parameter buffer an optimizer updates, and where
/// each slice's state sits in its compact state buffers: frozen parameters get
/// no state and are never touched.
class trainable_layout {
 public:
  trainable_layout() = default;
  /// Every parameter trains: one slice, state the size of the buffer.
  explicit trainable_layout(index_t parameter_count)
      : parameter_count_(parameter_count), state_size_(parameter_count) {
    if (parameter_count > 0) slices_.push_back({0, parameter_count, true});
  }
  /// Only `trainable` (sorted, disjoint slices inside [0, parameter_count),
  /// as nn::model::trainable_ranges gives) trains.
  trainable_layout(index_t parameter_count, std::span<const parameter_range> trainable)
      : parameter_count_(parameter_count), slices_(trainable.begin(), trainable.end()) {
    index_t end_of_previous = 0;
    for (const auto& r : slices_) {
      if (r.offset < end_of_previous || r.size < 0 || r.offset + r.size > parameter_count)
        throw invalid_input("ctformer::train::trainable_layout: the slice at " + std::to_string(r.offset) + " of " +
                            std::to_string(r.size) + " elements is not sorted, disjoint and inside the " +
                            std::to_string(parameter_count) + " parameters");
      end_of_previous = r.offset + r.size;
      state_size_ += r.size;
    }
  }

  index_t parameter_count() const { return parameter_count_; }
  /// Elements of state per moment: the trainable parameters' count.
  index_t state_size() const { return state_size_; }
  const std::vector<parameter_range>& slices() const { return slices_; }

  /// Calls body(params, grads, state_offset, decay_ranges) per slice: the
  /// slice's parameters, its gradients (grads holds the trainable slices
  /// packed, as state does: nn::model::gradients()), where its state starts,
  /// and the decay ranges clipped to it and counted from its start.
  template <class Body>
  void for_each_slice(tensor_view<float, 1> params, tensor_view<const float, 1> grads,
                      std::span<const parameter_range> decay, Body&& body) const {
    // Checked against the whole buffer before clipping, so a wrong range is
    // refused (and nothing updated) rather than silently cut away.
    ops::detail::check_parameter_ranges("train::optimizer step", decay, parameter_count_);
    index_t state_offset = 0;
    for (const auto& slice : slices_) {
      clipped_.clear();
      for (const auto& r : decay) {
        const index_t lo = std::max(r.offset, slice.offset), hi = std::min(r.offset + r.size, slice.offset + slice.size);
        if (lo < hi) clipped_.push_back({lo - slice.offset, hi - lo, r.decay});
      }
      if (slice.size > 0)
        body(tensor_view<float, 1>(params.data() + slice.offset, {slice.size}),
             tensor_view<const float, 1>(grads.data() + state_offset, {slice.size}), state_offset,
             std::span<const parameter_range>(clipped_));
      state_offset += slice.size;
    }
  }

  void require_sizes(const char* who, index_t params, index_t grads) const {
    if (params != parameter_count_)
      throw shape_error(std::string("ctformer::train::") + who + "::step: params has " + std::to_string(params) +
                        " elements but the optimizer was built for " + std::to_string(parameter_count_));
    if (grads != state_size_)
      throw shape_error(std::string("ctformer::train::") + who + "::step: grads has " + std::to_string(grads) +
                        " elements but the optimizer's trainable slices hold " + std::to_string(state_size_));
  }

 private:
  index_t parameter_count_ = 0, state_size_ = 0;
  std::vector<parameter_range> slices_;
  mutable std::vector<parameter_range> clipped_;  // reused so a step allocates nothing
};

/// AdamW with decoupled weight decay and bias correction (Loshchilov & Hutter;
/// the same arithmetic as torch.optim.AdamW). State: first and second moments
/// m and v, each one contiguous buffer of P floats, zero at construction.
/// @tparam Exec execution policy whose memory holds the state
template <execution_policy Exec = cpu::par_t>
class adamw {
 public:
  using config_type = adamw_config;
  /// The same optimizer for another policy (a trainer rebinds to its own).
  template <execution_policy E>
  using rebind = adamw<E>;

  adamw() = default;
  /// State for parameter_count floats, zeroed through exec (works for device memory).
  adamw(const Exec& exec, index_t parameter_count, adamw_config config = {})
      : adamw(exec, trainable_layout(parameter_count), config) {}
  /// State only for the trainable slices of a parameter_count buffer.
  adamw(const Exec& exec, index_t parameter_count, std::span<const parameter_range> trainable, adamw_config config = {})
      : adamw(exec, trainable_layout(parameter_count, trainable), config) {}
  adamw(const Exec& exec, trainable_layout layout, adamw_config config = {})
      : config_(config), layout_(std::move(layout)), m_(std::size_t(layout_.state_size())),
        v_(std::size_t(layout_.state_size())) {
    if (layout_.state_size() > 0) {
      ops::fill(exec, m_view(), 0.0f);
      ops::fill(exec, v_view(), 0.0f);
    }
  }

  /// One update: advances the step counter, then params -= AdamW(grads).
  /// grads holds the trainable slices packed (all of params when nothing is frozen).
  /// grad_scale multiplies every gradient inside the same pass (a clipping
  /// coefficient, 1/loss-scale or 1/micro-batches), saving a pass over grads.
  /// params, grads: (P) float in Exec's memory; ranges: from nn/, host memory.
  void step(const Exec& exec, tensor_view<float, 1> params, tensor_view<const float, 1> grads,
            std::span<const parameter_range> ranges, float lr, float grad_scale = 1.0f) {
    layout_.require_sizes("adamw", params.extent(0), grads.extent(0));
    ++step_;
    adamw_coefficients c;
    c.lr = lr;
    c.beta1 = config_.beta1;
    c.beta2 = config_.beta2;
    c.eps = config_.eps;
    c.weight_decay = config_.weight_decay;
    c.step = step_;
    c.grad_scale = grad_scale;
    c.decay_all = config_.decay_all;
    try {
      layout_.for_each_slice(params, grads, ranges, [&](auto p, auto g, index_t at, auto decay) {
        const index_t n = p.extent(0);
        ops::adamw_update(exec, p, g, tensor_view<float, 1>(m_.data() + at, {n}),
                          tensor_view<float, 1>(v_.data() + at, {n}), decay, c);
      });
    } catch (...) {
      --step_;  // nothing was updated: the checks run before the kernel
      throw;
    }
  }

  /// Number of updates done so far (the t of bias correction is step_count() + 1 next).
  std::int64_t step_count() const { return step_; }
  /// Restores the counter (checkpoint resume).
  void set_step_count(std::int64_t s) { step_ = s; }
  const adamw_config& config() const { return config_; }
  adamw_config& config() { return config_; }
  index_t parameter_count() const { return layout_.parameter_count(); }
  const trainable_layout& layout() const { return layout_; }
  /// Bytes of optimizer state (both moments), trainable parameters only.
  std::size_t state_bytes() const { return 2 * std::size_t(layout_.state_size()) * sizeof(float); }

  /// The state buffers by name ("m", "v"), each (trainable count): what a checkpoint saves
  /// (prefixed "optimizer.") and restores in place.
  std::vector<named_tensor> state_tensors() { return {{"m", m_view()}, {"v", v_view()}}; }

  tensor_view<float, 1> m_view() { return tensor_view<float, 1>(m_.data(), {index_t(m_.size())}); }
  tensor_view<float, 1> v_view() { return tensor_view<float, 1>(v_.data(), {index_t(v_.size())}); }

 private:
  adamw_config config_{};
  trainable_layout layout_;
  buffer_for<float, Exec> m_;
  buffer_for<float, Exec> v_;
  std::int64_t step_ = 0;
};

/// SGD with momentum (optionally Nesterov), torch.optim.SGD's arithmetic with
/// dampening 0. State: the momentum buffer, P floats, zero at construction.
/// @tparam Exec execution policy whose memory holds the state
template <execution_policy Exec = cpu::par_t>
class sgd {
 public:
  using config_type = sgd_config;
  template <execution_policy E>
  using rebind = sgd<E>;

  sgd() = default;
  sgd(const Exec& exec, index_t parameter_count, sgd_config config = {})
      : sgd(exec, trainable_layout(parameter_count), config) {}
  sgd(const Exec& exec, index_t parameter_count, std::span<const parameter_range> trainable, sgd_config config = {})
      : sgd(exec, trainable_layout(parameter_count, trainable), config) {}
  sgd(const Exec& exec, trainable_layout layout, sgd_config config = {})
      : config_(config), layout_(std::move(layout)), momentum_(std::size_t(layout_.state_size())) {
    if (layout_.state_size() > 0) ops::fill(exec, momentum_view(), 0.0f);
  }

  /// One update: params -= lr * momentum-filtered (grad_scale * grads).
  /// params, grads: (P) float in Exec's memory.
  void step(const Exec& exec, tensor_view<float, 1> params, tensor_view<const float, 1> grads,
            std::span<const parameter_range> ranges, float lr, float grad_scale = 1.0f) {
    layout_.require_sizes("sgd", params.extent(0), grads.extent(0));
    sgd_coefficients c;
    c.lr = lr;
    c.momentum = config_.momentum;
    c.weight_decay = config_.weight_decay;
    c.nesterov = config_.nesterov;
    c.grad_scale = grad_scale;
    c.decay_all = config_.decay_all;
    layout_.for_each_slice(params, grads, ranges, [&](auto p, auto g, index_t at, auto decay) {
      ops::sgd_update(exec, p, g, tensor_view<float, 1>(momentum_.data() + at, {p.extent(0)}), decay, c);
    });
    ++step_;
  }

  std::int64_t step_count() const { return step_; }
  void set_step_count(std::int64_t s) { step_ = s; }
  const sgd_config& config() const { return config_; }
  sgd_config& config() { return config_; }
  index_t parameter_count() const { return layout_.parameter_count(); }
  const trainable_layout& layout() const { return layout_; }
  std::size_t state_bytes() const { return std::size_t(layout_.state_size()) * sizeof(float); }

  /// The state buffers by name ("momentum"), (trainable count).
  std::vector<named_tensor> state_tensors() { return {{"momentum", momentum_view()}}; }

  tensor_view<float, 1> momentum_view() {
    return tensor_view<float, 1>(momentum_.data(), {index_t(momentum_.size())});
  }

 private:
  sgd_config config_{};
  trainable_layout layout_;
  buffer_for<float, Exec> momentum_;
  std::int64_t step_ = 0;
};

/// What a trainer needs of an optimizer.
template <class O, class Exec>
concept optimizer = execution_policy<Exec> &&
                    requires(O& o, const Exec& exec, tensor_view<float, 1> p, tensor_view<const float, 1> g,
                             std::span<const parameter_range> r) {
                      o.step(exec, p, g, r, 1.0f, 1.0f);
                      { o.step_count() } -> std::convertible_to<std::int64_t>;
                      o.set_step_count(std::int64_t{0});
                      { o.state_tensors() } -> std::same_as<std::vector<named_tensor>>;
                    };

static_assert(optimizer<adamw<cpu::par_t>, cpu::par_t>);
static_assert(optimizer<sgd<cpu::par_t>, cpu::par_t>);

}  // namespace ctformer::train
