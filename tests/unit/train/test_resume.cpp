// Training resumes bit-identically from a checkpoint, and a run stops cleanly
// on a NaN loss, keeping the last good parameters.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <vector>

#include "ctformer/io/model_checkpoint.hpp"
#include "ctformer/io/tokenizer.hpp"
#include "ctformer/nn/nn.hpp"
#include "ctformer/train/addition_task.hpp"
#include "ctformer/train/trainer.hpp"

using namespace ctformer;

namespace {

struct resume_config {
  static constexpr int vocab = 13, d_model = 32, n_layer = 2, n_head = 4, n_kv_head = 2, d_ff = 64, max_seq = 12;
  using norm = nn::rms_norm;
  using activation = nn::swiglu;
  using position = nn::rope;
};
using model_type = nn::model<resume_config, cpu::par_t>;
using optimizer_type = train::adamw<cpu::par_t>;
using trainer_type = train::trainer<model_type, optimizer_type, train::fp32, cpu::par_t>;

// Everything one process would build for a run.
struct run {
  model_type model{cpu::par.with_threads(2), 42};
  optimizer_type optimizer{cpu::par, model.parameter_count(), [] {
                             train::adamw_config c;
                             c.weight_decay = 0.1f;
                             return c;
                           }()};
  trainer_type trainer{model, optimizer, train::warmup_cosine_schedule{3e-3f, 3e-4f, 5, 20}, [] {
                         train::trainer_settings s;
                         s.batch_size = 8;
                         s.sequence_length = 12;
                         s.eval_every = 0;
                         s.accumulation_steps = 2;
                         return s;
                       }()};
  train::addition_task task{3};
  std::vector<double> losses;

  void steps(int n) {
    for (int i = 0; i < n; ++i)
      losses.push_back(trainer.step([&](std::mt19937_64& rng, tensor_view<std::int32_t, 2> in,
                                        tensor_view<std::int32_t, 2> out) { task.make_batch(rng, in, out); })
                           .loss);
  }
  io::training_state state() {
    io::training_state s;
    s.optimizer_state = optimizer.state_tensors();
    s.step = trainer.step_count();
    s.optimizer_step = optimizer.step_count();
    s.rng = trainer.rng();
    s.vocabulary = io::char_tokenizer::from_symbols(train::addition_task::alphabet).serialize();
    return s;
  }
};

std::filesystem::path temp_file(const char* name) {
  return std::filesystem::temp_directory_path() / (std::string("ctformer_test_resume_") + name);
}

}  // namespace

TEST_CASE("20 steps straight equal 10 steps, save, load into fresh objects, 10 steps", "[train][checkpoint][resume]") {
  run straight;
  straight.steps(20);

  const auto path = temp_file("half.safetensors");
  std::vector<double> first_half;
  {
    run first;
    first.steps(10);
    io::save_model_checkpoint(path, first.model, first.state());
    first_half = first.losses;
  }
  run second;  // fresh model (different random weights until loaded), fresh optimizer and RNG
  auto state = second.state();
  io::load_model_checkpoint(path, second.model, state);
  second.optimizer.set_step_count(state.optimizer_step);
  second.trainer.rng() = state.rng;
  second.steps(10);

  // Bit-identical: exact equality of every loss and every parameter byte.
  for (int i = 0; i < 10; ++i) CHECK(first_half[std::size_t(i)] == straight.losses[std::size_t(i)]);
  for (int i = 0; i < 10; ++i) CHECK(second.losses[std::size_t(i)] == straight.losses[std::size_t(10 + i)]);
  REQUIRE(second.model.parameter_count() == straight.model.parameter_count());
  CHECK(std::memcmp(second.model.parameters().data(), straight.model.parameters().data(),
                    std::size_t(straight.model.parameter_count()) * sizeof(float)) == 0);
  std::filesystem::remove(path);
}

TEST_CASE("a checkpoint of another vocabulary or a corrupted one is refused and nothing is loaded",
          "[train][checkpoint]") {
  const auto path = temp_file("vocab.safetensors");
  run saved;
  saved.steps(2);
  io::save_model_checkpoint(path, saved.model, saved.state());

  run other;
  const std::vector<float> before(other.model.parameters().data(),
                                  other.model.parameters().data() + other.model.parameter_count());
  auto state = other.state();
  state.vocabulary = io::byte_tokenizer{}.serialize();
  CHECK_THROWS_WITH(io::load_model_checkpoint(path, other.model, state),
                    Catch::Contains(path.string()) && Catch::Contains("vocabulary"));
  CHECK(std::memcmp(before.data(), other.model.parameters().data(), before.size() * sizeof(float)) == 0);

  // Truncate the file: refused, naming the file; the live parameters stay as they were.
  const auto size = std::filesystem::file_size(path);
  std::filesystem::resize_file(path, size - 100);
  auto good_state = other.state();
  CHECK_THROWS_AS(io::load_model_checkpoint(path, other.model, good_state), io_error);
  CHECK_THROWS_WITH(io::load_model_checkpoint(path, other.model, good_state), Catch::Contains(path.string()));
  CHECK(std::memcmp(before.data(), other.model.parameters().data(), before.size() * sizeof(float)) == 0);
  std::filesystem::remove(path);
}

TEST_CASE("a NaN loss stops training with the step named and the parameters untouched", "[train][nan]") {
  run r;
  r.steps(3);
  // Poison one weight: the next forward produces a NaN loss.
  r.model.parameters()(r.model.parameter_table()[2].offset) = std::nanf("");
  r.model.parameters_changed();
  const std::vector<float> before(r.model.parameters().data(), r.model.parameters().data() + r.model.parameter_count());
  const auto optimizer_step = r.optimizer.step_count();
  try {
    r.steps(1);
    FAIL("no training_diverged was thrown");
  } catch (const train::training_diverged& e) {
    CHECK(e.step() == 3);
    CHECK_THAT(e.what(), Catch::Contains("step 3"));
  }
  CHECK(r.optimizer.step_count() == optimizer_step);  // the update was not applied
  CHECK(std::memcmp(before.data(), r.model.parameters().data(), before.size() * sizeof(float)) == 0);
}
