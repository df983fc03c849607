// train::trainer: the training step loop (gradient accumulation, clipping,
// schedule, optimizer, precision, data-parallel gradient averaging), held-out
// evaluation, metrics and the divergence guard.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/nn/model.hpp"
#include "ctformer/train/clipping.hpp"
#include "ctformer/train/communicator.hpp"
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
  index_t batch_size = 12;        ///< sequences per micro-batch on each rank
  index_t sequence_length = 64;   ///< tokens per sequence
  int accumulation_steps = 1;     ///< micro-batches per optimizer step
  double clip_norm = 1.0;         ///< global gradient norm limit; <= 0 disables clipping
  std::int64_t eval_every = 100;  ///< held-out loss every N steps (and at the last); 0 disables
  int eval_batches = 20;          ///< held-out batches per evaluation
  std::uint64_t seed = 1337;      ///< data-sampling RNG seed
  bool decay_embeddings = false;  ///< weight decay on embedding tables too (nanoGPT does; norms and biases never)
  /// ZeRO-1: each rank keeps the optimizer state of its shard_of() the
  /// trainable elements only (the optimizer must be built for that shard),
  /// reduce-scatters the gradients, steps its shard and all-gathers the
  /// parameters. Off: every rank holds and steps the whole state.
  bool shard_optimizer_state = false;
};

/// A function filling one batch: f(rng, inputs (B, T), targets (B, T)).
template <class F>
concept batch_sampler = requires(F& f, std::mt19937_64& rng, tensor_view<std::int32_t, 2> in,
                                 tensor_view<std::int32_t, 2> out) { f(rng, in, out); };
/// A distillation teacher: f(inputs (B, T)) gives its logits (B, T, V) in the
/// student's memory, valid until the next call (a trained nn::model's
/// logits(), or logits read back from a file).
template <class F>
concept teacher_logits = requires(F& f, tensor_view<const std::int32_t, 2> in) {
  { f(in) } -> std::convertible_to<tensor_view<const float, 3>>;
};
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
/// @tparam Communicator single_process, or a data-parallel communicator
///   (mpi_communicator): every rank holds the whole model and optimizer,
///   samples the same global batch of size() x batch_size sequences and runs
///   its own rows of it; the gradients are averaged over the ranks before
///   clipping and the step, so every rank takes the same step, and N ranks
///   with batch b train as one process with batch N x b. With
///   settings.shard_optimizer_state (ZeRO-1) each rank steps only its shard.
template <class Model, class Optimizer, precision_policy Precision, execution_policy Exec,
          lr_schedule Schedule = warmup_cosine_schedule, class Communicator = single_process>
class trainer {
  static_assert(std::same_as<typename Model::exec_type, Exec>,
                "ctformer: the trainer's execution policy must be the one the model runs on");
  static_assert(communicator<Communicator, Exec>,
                "ctformer: the communicator must provide rank(), size(), average(exec, buffer), average(value), "
                "sum(value), broadcast, reduce_scatter_average, all_gather and gather for this execution policy "
                "(train/communicator.hpp)");
  static_assert(optimizer<Optimizer, Exec>,
                "ctformer: the optimizer must provide step(exec, params, grads, ranges, lr, grad_scale), "
                "step_count(), set_step_count() and state_tensors() for this execution policy");

 public:
  using compute_type = typename Precision::compute_type;

  /// Every rank starts from rank 0's parameters (broadcast here).
  trainer(Model& model, Optimizer& optimizer, Schedule schedule, trainer_settings settings,
          Communicator communicator = Communicator{})
      : model_(model), optimizer_(optimizer), schedule_(schedule), settings_(settings),
        communicator_(std::move(communicator)), rng_(settings.seed) {
    if (settings.batch_size <= 0 || settings.sequence_length <= 0 || settings.accumulation_steps <= 0)
      throw invalid_input("ctformer::train::trainer: batch_size, sequence_length and accumulation_steps must be positive");
    if (settings.sequence_length > Model::max_seq)
      throw invalid_input("ctformer::train::trainer: sequence_length " + std::to_string(settings.sequence_length) +
                          " exceeds the model's max_seq " + std::to_string(Model::max_seq));
    const std::size_t global_tokens =
        std::size_t(communicator_.size()) * std::size_t(settings.batch_size * settings.sequence_length);
    inputs_.resize(global_tokens);
    targets_.resize(global_tokens);
    ranges_ = model_.decay_ranges(optimizer_.config().decay_all, settings.decay_embeddings);
    if (settings.shard_optimizer_state) set_up_shard();
    if (communicator_.size() > 1) {
      communicator_.broadcast(model_.exec(), model_.parameters(), 0);
      model_.parameters_changed();
    }
  }

  /// One optimizer step over accumulation_steps micro-batches from `sample`.
  /// Throws training_diverged (and leaves the parameters untouched) when the
  /// loss or the gradient norm is not finite.
  template <batch_sampler Sampler>
  step_metrics step(Sampler&& sample) {
    return step_with(sample, [&](tensor_view<const std::int32_t, 2> in, tensor_view<const std::int32_t, 2> tgt,
                                 float scale) {
      return model_.template forward_backward<compute_type>(in, tgt, scale);
    });
  }

  /// One step of knowledge distillation: the loss mixes the labels'
  /// cross-entropy with the KL divergence from the teacher's logits for the
  /// same micro-batch (nn::model::forward_backward_distilled). The teacher
  /// only runs forward; held-out evaluation stays the labels' cross-entropy.
  template <batch_sampler Sampler, teacher_logits Teacher>
  step_metrics step(Sampler&& sample, Teacher&& teacher, nn::distillation_settings distillation) {
    return step_with(sample, [&](tensor_view<const std::int32_t, 2> in, tensor_view<const std::int32_t, 2> tgt,
                                 float scale) {
      const tensor_view<const float, 3> logits = teacher(in);
      return model_.template forward_backward_distilled<compute_type>(in, tgt, logits, distillation, scale);
    });
  }

 private:
  template <class Sampler, class ForwardBackward>
  step_metrics step_with(Sampler& sample, ForwardBackward&& forward_backward) {
    const auto start = std::chrono::steady_clock::now();
    const std::int64_t step_index = optimizer_.step_count();
    model_.zero_gradients();
    double loss = 0;
    const float micro_scale = 1.0f / float(settings_.accumulation_steps);
    for (int micro = 0; micro < settings_.accumulation_steps; ++micro) {
      // The whole global batch is drawn on every rank (drawing is cheap), so
      // the stream of samples does not depend on the number of ranks.
      sample(rng_, global_view(inputs_), global_view(targets_));
      loss += forward_backward(as_const(rank_view(inputs_)), as_const(rank_view(targets_)), micro_scale);
    }
    loss /= settings_.accumulation_steps;
    if (communicator_.size() > 1) loss = communicator_.average(loss);
    // The gradients this rank steps with: all of them averaged, or (ZeRO-1)
    // the average of its shard alone.
    tensor_view<const float, 1> grads = as_const(model_.gradients());
    double norm = 0;
    if (settings_.shard_optimizer_state) {
      communicator_.reduce_scatter_average(model_.exec(), grads, shard_gradients(), shard_.counts);
      grads = as_const(shard_gradients());
      norm = std::sqrt(communicator_.sum(ops::sum_of_squares(model_.exec(), grads)));
    } else {
      if (communicator_.size() > 1) communicator_.average(model_.exec(), model_.gradients());
      norm = global_norm(model_.exec(), grads);
    }
    if (!std::isfinite(loss)) throw training_diverged(step_index, "the loss is " + std::to_string(loss));
    if (!std::isfinite(norm)) throw training_diverged(step_index, "the gradient norm is " + std::to_string(norm));
    const float clip = settings_.clip_norm > 0 ? clip_coefficient(norm, settings_.clip_norm) : 1.0f;
    const float lr = schedule_(step_index);
    optimizer_.step(model_.exec(), model_.parameters(), grads, ranges_, lr, clip);
    if (settings_.shard_optimizer_state) gather_parameters();
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

 public:

  /// Mean loss over settings.eval_batches held-out batches (no gradients), of
  /// size() x batch_size sequences each, every rank scoring its own rows.
  template <heldout_batches Heldout>
  double evaluate(Heldout&& heldout) {
    double sum = 0;
    // Held-out batches are global batches too: each rank scores its rows.
    for (int i = 0; i < settings_.eval_batches; ++i) {
      heldout(i, global_view(inputs_), global_view(targets_));
      sum += model_.template evaluate<compute_type>(rank_view(inputs_), rank_view(targets_));
    }
    sum /= settings_.eval_batches;
    return communicator_.size() > 1 ? communicator_.average(sum) : sum;
  }

  /// Trains until `total_steps` optimizer steps have been taken (counting any
  /// restored from a checkpoint), evaluating every eval_every steps and at the
  /// end; calls on_metrics(step_metrics) after every step.
  template <batch_sampler Sampler, heldout_batches Heldout, class OnMetrics>
  void run(std::int64_t total_steps, Sampler&& sample, Heldout&& heldout, OnMetrics&& on_metrics) {
    run_with(total_steps, [&] { return step(sample); }, heldout, on_metrics);
  }
  /// run() with distillation steps.
  template <batch_sampler Sampler, teacher_logits Teacher, heldout_batches Heldout, class OnMetrics>
  void run(std::int64_t total_steps, Sampler&& sample, Teacher&& teacher, nn::distillation_settings distillation,
           Heldout&& heldout, OnMetrics&& on_metrics) {
    run_with(total_steps, [&] { return step(sample, teacher, distillation); }, heldout, on_metrics);
  }

 private:
  template <class Step, class Heldout, class OnMetrics>
  void run_with(std::int64_t total_steps, Step&& one_step, Heldout& heldout, OnMetrics& on_metrics) {
    while (optimizer_.step_count() < total_steps) {
      step_metrics m = one_step();
      if ((settings_.eval_every > 0 && m.step % settings_.eval_every == 0) || m.step == total_steps)
        m.val_loss = evaluate(heldout);
      on_metrics(m);
    }
  }

 public:

  /// Tokens of one optimizer step over all ranks.
  index_t tokens_per_step() const {
    return index_t(communicator_.size()) * settings_.batch_size * settings_.sequence_length *
           settings_.accumulation_steps;
  }
  std::int64_t step_count() const { return optimizer_.step_count(); }
  std::mt19937_64& rng() { return rng_; }
  const trainer_settings& settings() const { return settings_; }
  Model& model() { return model_; }
  Optimizer& optimizer() { return optimizer_; }
  const Communicator& communicator() const { return communicator_; }
  /// This rank's part of the trainable elements (ZeRO-1; empty otherwise).
  const optimizer_shard& shard() const { return shard_; }

  /// The optimizer's state as one process holds it (every trainable element,
  /// packed), for checkpoints, which so resume on any number of ranks with
  /// or without ZeRO-1. Replicated: the optimizer's own buffers. Sharded:
  /// full-size copies; gather_optimizer_state() fills them from every rank
  /// (before a checkpoint's save, on rank 0) and scatter_optimizer_state()
  /// hands each rank its shard of them (after a checkpoint's load).
  std::vector<named_tensor> optimizer_state() {
    auto own = optimizer_.state_tensors();
    if (!settings_.shard_optimizer_state) return own;
    if (full_state_.size() != own.size()) {
      full_state_.clear();
      for (std::size_t i = 0; i < own.size(); ++i) full_state_.emplace_back(std::size_t(model_.gradient_count()));
    }
    std::vector<named_tensor> full;
    for (std::size_t i = 0; i < own.size(); ++i)
      full.push_back({own[i].name, tensor_view<float, 1>(full_state_[i].data(), {model_.gradient_count()})});
    return full;
  }
  /// Collective: rank 0's optimizer_state() receives every rank's shard.
  void gather_optimizer_state() {
    if (!settings_.shard_optimizer_state) return;
    const auto full = optimizer_state();
    const auto own = optimizer_.state_tensors();
    for (std::size_t i = 0; i < own.size(); ++i)
      communicator_.gather(model_.exec(), as_const(own[i].data), full[i].data, shard_.counts, 0);
  }
  /// Each rank takes its shard of optimizer_state() into its optimizer.
  void scatter_optimizer_state() {
    if (!settings_.shard_optimizer_state) return;
    const auto full = optimizer_state();
    const auto own = optimizer_.state_tensors();
    for (std::size_t i = 0; i < own.size(); ++i)
      ops::copy(model_.exec(), tensor_view<const float, 1>(full[i].data.data() + shard_.begin, {shard_.size()}),
                own[i].data);
  }

 private:
  void set_up_shard() {
    const auto trainable = model_.trainable_ranges();
    shard_ = shard_of(trainable, communicator_.rank(), communicator_.size());
    const auto& slices = optimizer_.layout().slices();
    bool same = slices.size() == shard_.ranges.size();
    for (std::size_t i = 0; same && i < slices.size(); ++i)
      same = slices[i].offset == shard_.ranges[i].offset && slices[i].size == shard_.ranges[i].size;
    if (!same)
      throw invalid_input("ctformer::train::trainer: with shard_optimizer_state the optimizer must be built for this "
                          "rank's shard: optimizer(exec, parameter_count, train::shard_of(model.trainable_ranges(), "
                          "rank, size).ranges, config); it holds " + std::to_string(optimizer_.layout().state_size()) +
                          " elements of state, the shard " + std::to_string(shard_.size()));
    shard_gradients_ = buffer_for<float, Exec>(std::size_t(shard_.size()));
    // Nothing frozen: the packed elements are the parameters from the first
    // trainable one on, and the all-gather runs in place on them.
    contiguous_ = trainable.size() == 1;
    if (!contiguous_) staging_ = buffer_for<float, Exec>(std::size_t(model_.gradient_count()));
  }
  tensor_view<float, 1> shard_gradients() { return {shard_gradients_.data(), {shard_.size()}}; }

  // After each rank stepped its shard: every rank's updated parameters reach
  // every rank (through a packed copy when frozen tensors sit between them).
  void gather_parameters() {
    const auto& exec = model_.exec();
    const auto params = model_.parameters();
    const auto trainable = model_.trainable_ranges();
    if (contiguous_) {
      communicator_.all_gather(exec, tensor_view<float, 1>(params.data() + trainable[0].offset, {trainable[0].size}),
                               shard_.counts);
      return;
    }
    index_t packed = shard_.begin;
    for (const auto& r : shard_.ranges) {
      ops::copy(exec, tensor_view<const float, 1>(params.data() + r.offset, {r.size}),
                tensor_view<float, 1>(staging_.data() + packed, {r.size}));
      packed += r.size;
    }
    communicator_.all_gather(exec, tensor_view<float, 1>(staging_.data(), {model_.gradient_count()}), shard_.counts);
    packed = 0;
    for (const auto& r : trainable) {
      ops::copy(exec, tensor_view<const float, 1>(staging_.data() + packed, {r.size}),
                tensor_view<float, 1>(params.data() + r.offset, {r.size}));
      packed += r.size;
    }
  }

  // (size() x batch_size, T): the global batch every rank draws.
  tensor_view<std::int32_t, 2> global_view(std::vector<std::int32_t>& tokens) {
    return {tokens.data(), {index_t(communicator_.size()) * settings_.batch_size, settings_.sequence_length}};
  }
  // This rank's rows of the global batch.
  tensor_view<std::int32_t, 2> rank_view(std::vector<std::int32_t>& tokens) {
    const std::size_t first = std::size_t(communicator_.rank()) * std::size_t(settings_.batch_size * settings_.sequence_length);
    return {tokens.data() + first, {settings_.batch_size, settings_.sequence_length}};
  }

  Model& model_;
  Optimizer& optimizer_;
  Schedule schedule_;
  trainer_settings settings_;
  Communicator communicator_;
  optimizer_shard shard_;
  buffer_for<float, Exec> shard_gradients_, staging_;
  std::vector<buffer_for<float, Exec>> full_state_;
  bool contiguous_ = false;
  std::mt19937_64 rng_;
  std::vector<std::int32_t> inputs_, targets_;
  std::vector<parameter_range> ranges_;
};

}  // namespace ctformer::train
