// Checkpoints of an nn::model: its parameter table and flat buffer, plus
// whatever optimizer state and counters the caller adds (io::checkpoint
// underneath, so writes are atomic and loads all-or-nothing).
#pragma once

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "ctformer/io/checkpoint.hpp"
#include "ctformer/nn/model.hpp"

namespace ctformer::io {

/// What a training run saves beside the model.
struct training_state {
  std::vector<named_tensor> optimizer_state;  ///< views of the optimizer's buffers
  std::int64_t step = 0;
  std::int64_t optimizer_step = 0;
  std::mt19937_64 rng;
  std::string vocabulary;  ///< the tokenizer, serialised
};

/// Writes model + training state to path atomically.
template <class Model>
void save_model_checkpoint(const std::filesystem::path& path, Model& model, const training_state& state) {
  static_assert(Model::template storage<float>::space::host_accessible,
                "ctformer: checkpoints are written from host memory; copy device parameters to the host first");
  const auto& table = model.parameter_table();
  checkpoint_state s{table, model.parameters(), state.optimizer_state, state.step, state.optimizer_step, state.rng,
                     nn::config_json<typename Model::config>(), state.vocabulary};
  save_checkpoint(path, s);
}

/// Loads path into model and state, all or nothing: the file must hold this
/// model's configuration, state.vocabulary, and exactly the tensors of the
/// model and of state.optimizer_state. On success the model's cached compute
/// copy is dropped and step, optimizer_step and rng are set.
template <class Model>
void load_model_checkpoint(const std::filesystem::path& path, Model& model, training_state& state) {
  static_assert(Model::template storage<float>::space::host_accessible,
                "ctformer: checkpoints are read into host memory; load on the host, then copy to the device");
  const auto& table = model.parameter_table();
  checkpoint_state s{table, model.parameters(), state.optimizer_state, state.step, state.optimizer_step, state.rng,
                     nn::config_json<typename Model::config>(), state.vocabulary};
  load_checkpoint(path, s);
  state.step = s.step;
  state.optimizer_step = s.optimizer_step;
  state.rng = s.rng;
  model.parameters_changed();
}

}  // namespace ctformer::io
