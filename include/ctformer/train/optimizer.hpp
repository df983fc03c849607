// train::adamw and train::sgd: optimizer state (one contiguous buffer per
// moment, in the policy's memory) and the step that calls the fused update.
#pragma once

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
      : config_(config), m_(std::size_t(parameter_count)), v_(std::size_t(parameter_count)) {
    if (parameter_count > 0) {
      ops::fill(exec, m_view(), 0.0f);
      ops::fill(exec, v_view(), 0.0f);
    }
  }

  /// One update: advances the step counter, then params -= AdamW(grads).
  /// grad_scale multiplies every gradient inside the same pass (a clipping
  /// coefficient, 1/loss-scale or 1/micro-batches), saving a pass over grads.
  /// params, grads: (P) float in Exec's memory; ranges: from nn/, host memory.
  void step(const Exec& exec, tensor_view<float, 1> params, tensor_view<const float, 1> grads,
            std::span<const parameter_range> ranges, float lr, float grad_scale = 1.0f) {
    require_size("params", params.extent(0));
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
      ops::adamw_update(exec, params, grads, m_view(), v_view(), ranges, c);
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
  index_t parameter_count() const { return index_t(m_.size()); }

  /// The state buffers by name ("m", "v"), each (P): what a checkpoint saves
  /// (prefixed "optimizer.") and restores in place.
  std::vector<named_tensor> state_tensors() { return {{"m", m_view()}, {"v", v_view()}}; }

  tensor_view<float, 1> m_view() { return tensor_view<float, 1>(m_.data(), {index_t(m_.size())}); }
  tensor_view<float, 1> v_view() { return tensor_view<float, 1>(v_.data(), {index_t(v_.size())}); }

 private:
  void require_size(const char* name, index_t n) const {
    if (n != index_t(m_.size()))
      throw shape_error(std::string("ctformer::train::adamw::step: ") + name + " has " + std::to_string(n) +
                        " elements but the optimizer state was sized for " + std::to_string(m_.size()));
  }

  adamw_config config_{};
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
      : config_(config), momentum_(std::size_t(parameter_count)) {
    if (parameter_count > 0) ops::fill(exec, momentum_view(), 0.0f);
  }

  /// One update: params -= lr * momentum-filtered (grad_scale * grads).
  /// params, grads: (P) float in Exec's memory.
  void step(const Exec& exec, tensor_view<float, 1> params, tensor_view<const float, 1> grads,
            std::span<const parameter_range> ranges, float lr, float grad_scale = 1.0f) {
    if (params.extent(0) != index_t(momentum_.size()))
      throw shape_error("ctformer::train::sgd::step: params has " + std::to_string(params.extent(0)) +
                        " elements but the optimizer state was sized for " + std::to_string(momentum_.size()));
    sgd_coefficients c;
    c.lr = lr;
    c.momentum = config_.momentum;
    c.weight_decay = config_.weight_decay;
    c.nesterov = config_.nesterov;
    c.grad_scale = grad_scale;
    c.decay_all = config_.decay_all;
    ops::sgd_update(exec, params, grads, momentum_view(), ranges, c);
    ++step_;
  }

  std::int64_t step_count() const { return step_; }
  void set_step_count(std::int64_t s) { step_ = s; }
  const sgd_config& config() const { return config_; }
  sgd_config& config() { return config_; }
  index_t parameter_count() const { return index_t(momentum_.size()); }

  /// The state buffers by name ("momentum"), (P).
  std::vector<named_tensor> state_tensors() { return {{"momentum", momentum_view()}}; }

  tensor_view<float, 1> momentum_view() {
    return tensor_view<float, 1>(momentum_.data(), {index_t(momentum_.size())});
  }

 private:
  sgd_config config_{};
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
