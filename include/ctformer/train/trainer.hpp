// train::trainer: the training step loop (gradient accumulation, clipping,
// schedule, optimizer, precision), held-out evaluation, metrics and the
// divergence guard.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/train/clipping.hpp"
#include "ctformer/train/metrics.hpp"
#include "ctformer/train/optimizer.hpp"
#include "ctformer/train/precision.hpp"
#include "ctformer/train/schedule.hpp"

namespace ctformer::train {

/// Thrown when a step's loss or gradient norm is not finite. The step's
/// update is not applied, so the parameters (and any checkpoint written
/// before) are the last good ones.
class training_diverged : public error {
 public:
  training_diverged(std::int64_t step, const std::string& what)
      : error("ctformer::train: training diverged at step " + std::to_string(step) + ": " + what), step_(step) {}
  std::int64_t step() const { return step_; }

 private:
  std::int64_t step_;
};

/// The run-time settings of a trainer (the model's shape is compile-time).
struct trainer_settings {
  index_t batch_size = 12;        ///< sequences per micro-batch
  index_t sequence_length = 64;   ///< tokens per sequence
  int accumulation_steps = 1;     ///< micro-batches per optimizer step
  double clip_norm = 1.0;         ///< global gradient norm limit; <= 0 disables clipping
  std::int64_t eval_every = 100;  ///< held-out loss every N steps (and at the last); 0 disables
  int eval_batches = 20;          ///< held-out batches per evaluation
  std::uint64_t seed = 1337;      ///< data-sampling RNG seed
  bool decay_embeddings = false;  ///< weight decay on embedding tables too (nanoGPT does; norms and biases never)
};

/// A function filling one batch: f(rng, inputs (B, T), targets (B, T)).
template <class F>
concept batch_sampler = requires(F& f, std::mt19937_64& rng, tensor_view<std::int32_t, 2> in,
                                 tensor_view<std::int32_t, 2> out) { f(rng, in, out); };
/// A function filling held-out batch i: f(i, inputs (B, T), targets (B, T)).
template <class F>
concept heldout_batches = requires(F& f, int i, tensor_view<std::int32_t, 2> in, tensor_view<std::int32_t, 2> out) {
  f(i, in, out);
};

/// Runs training steps of Model with Optimizer in Precision on Exec.
/// @tparam Model an nn::model<Cfg, Exec>
/// @tparam Optimizer train::adamw<Exec> or train::sgd<Exec>
/// @tparam Precision train::fp32 or train::bf16_mixed
/// @tparam Exec the execution policy type the model runs on
/// @tparam Schedule a learning-rate schedule (step -> lr)
template <class Model, class Optimizer, precision_policy Precision, execution_policy Exec,
          lr_schedule Schedule = warmup_cosine_schedule>
class trainer {
  static_assert(std::same_as<typename Model::exec_type, Exec>,
                "ctformer: the trainer's execution policy must be the one the model runs on");
  static_assert(optimizer<Optimizer, Exec>,
                "ctformer: the optimizer must provide step(exec, params, grads, ranges, lr, grad_scale), "
                "step_count(), set_step_count() and state_tensors() for this execution policy");

 public:
  using compute_type = typename Precision::compute_type;

  trainer(Model& model, Optimizer& optimizer, Schedule schedule, trainer_settings settings)
      : model_(model), optimizer_(optimizer), schedule_(schedule), settings_(settings), rng_(settings.seed),
        inputs_(std::size_t(settings.batch_size * settings.sequence_length)),
        targets_(std::size_t(settings.batch_size * settings.sequence_length)) {
    if (settings.batch_size <= 0 || settings.sequence_length <= 0 || settings.accumulation_steps <= 0)
      throw invalid_input("ctformer::train::trainer: batch_size, sequence_length and accumulation_steps must be positive");
    if (settings.sequence_length > Model::max_seq)
      throw invalid_input("ctformer::train::trainer: sequence_length " + std::to_string(settings.sequence_length) +
                          " exceeds the model's max_seq " + std::to_string(Model::max_seq));
    ranges_ = model_.decay_ranges(optimizer_.config().decay_all, settings.decay_embeddings);
  }

  /// One optimizer step over accumulation_steps micro-batches from `sample`.
  /// Throws training_diverged (and leaves the parameters untouched) when the
  /// loss or the gradient norm is not finite.
  template <batch_sampler Sampler>
  step_metrics step(Sampler&& sample) {
    const auto start = std::chrono::steady_clock::now();
    const std::int64_t step_index = optimizer_.step_count();
    model_.zero_gradients();
    double loss = 0;
    const float micro_scale = 1.0f / float(settings_.accumulation_steps);
    for (int micro = 0; micro < settings_.accumulation_steps; ++micro) {
      sample(rng_, inputs_view(), targets_view());
      loss += model_.template forward_backward<compute_type>(inputs_view(), targets_view(), micro_scale);
    }
    loss /= settings_.accumulation_steps;
    const double norm = global_norm(model_.exec(), as_const(model_.gradients()));
    if (!std::isfinite(loss)) throw training_diverged(step_index, "the loss is " + std::to_string(loss));
    if (!std::isfinite(norm)) throw training_diverged(step_index, "the gradient norm is " + std::to_string(norm));
    const float clip = settings_.clip_norm > 0 ? clip_coefficient(norm, settings_.clip_norm) : 1.0f;
    const float lr = schedule_(step_index);
    optimizer_.step(model_.exec(), model_.parameters(), as_const(model_.gradients()), ranges_, lr, clip);
    model_.parameters_changed();
    model_.exec().synchronize();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    step_metrics m;
    m.step = step_index + 1;
    m.loss = loss;
    m.lr = lr;
    m.grad_norm = norm;
    m.tokens_per_s = double(tokens_per_step()) / seconds;
    return m;
  }

  /// Mean loss over settings.eval_batches held-out batches (no gradients).
  template <heldout_batches Heldout>
  double evaluate(Heldout&& heldout) {
    double sum = 0;
    for (int i = 0; i < settings_.eval_batches; ++i) {
      heldout(i, inputs_view(), targets_view());
      sum += model_.template evaluate<compute_type>(inputs_view(), targets_view());
    }
    return sum / settings_.eval_batches;
  }

  /// Trains until `total_steps` optimizer steps have been taken (counting any
  /// restored from a checkpoint), evaluating every eval_every steps and at the
  /// end; calls on_metrics(step_metrics) after every step.
  template <batch_sampler Sampler, heldout_batches Heldout, class OnMetrics>
  void run(std::int64_t total_steps, Sampler&& sample, Heldout&& heldout, OnMetrics&& on_metrics) {
    while (optimizer_.step_count() < total_steps) {
      step_metrics m = step(sample);
      if ((settings_.eval_every > 0 && m.step % settings_.eval_every == 0) || m.step == total_steps)
        m.val_loss = evaluate(heldout);
      on_metrics(m);
    }
  }

  index_t tokens_per_step() const {
    return settings_.batch_size * settings_.sequence_length * settings_.accumulation_steps;
  }
  std::int64_t step_count() const { return optimizer_.step_count(); }
  std::mt19937_64& rng() { return rng_; }
  const trainer_settings& settings() const { return settings_; }
  Model& model() { return model_; }
  Optimizer& optimizer() { return optimizer_; }

 private:
  tensor_view<std::int32_t, 2> inputs_view() { return {inputs_.data(), {settings_.batch_size, settings_.sequence_length}}; }
  tensor_view<std::int32_t, 2> targets_view() {
    return {targets_.data(), {settings_.batch_size, settings_.sequence_length}};
  }

  Model& model_;
  Optimizer& optimizer_;
  Schedule schedule_;
  trainer_settings settings_;
  std::mt19937_64 rng_;
  std::vector<std::int32_t> inputs_, targets_;
  std::vector<parameter_range> ranges_;
};

}  // namespace ctformer::train
