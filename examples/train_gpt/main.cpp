// train_gpt: trains a GPT-family model with ctformer on the CPU, then generates.
//
// With no arguments it learns the embedded task (3-digit addition, answers
// written least-significant digit first) and prints held-out exact-match
// accuracy. With --data FILE it trains character-level on any text file
// (the nanoGPT CPU configuration with --preset nanogpt-cpu, the default for
// --data) and prints a sample. The model's shape is a compile-time
// configuration, so --preset picks one of the configurations compiled below.
//
// Built with MPI, it runs data-parallel under mpirun -np N: every rank trains
// its share (--batch-size rows) of each global batch of N x --batch-size,
// and rank 0 alone prints, writes metrics and saves checkpoints.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <limits>
#include <optional>
#include <string>
#include <thread>

#include "../common/presets.hpp"
#include "ctformer/ctformer.hpp"
#include "ctformer/infer/sampler.hpp"
#include "ctformer/io/model_checkpoint.hpp"
#include "ctformer/io/quantized_checkpoint.hpp"
#include "ctformer/io/text_dataset.hpp"
#include "ctformer/io/tokenizer.hpp"
#include "ctformer/nn/nn.hpp"
#include "ctformer/train/addition_task.hpp"
#include "ctformer/train/trainer.hpp"
#if CTFORMER_WITH_MPI
#include "ctformer/train/mpi_communicator.hpp"
#endif

using namespace ctformer;

namespace {

#if CTFORMER_WITH_MPI
// One process on its own when no launcher started this one (mpi_environment).
using communicator_type = train::mpi_communicator;
#else
using communicator_type = train::single_process;
#endif

// The compiled model configurations, shared with quantize, eval_perplexity and generate.
using examples::addition_config;
using examples::bytes_config;
using examples::nanogpt_cpu_config;
using examples::nanogpt_small_config;

struct options {
  std::string data, preset, precision = "fp32", save, resume, init, teacher, metrics, summary_json, prompt = "\n";
  std::vector<std::string> freeze;
  std::int64_t steps = -1, warmup = -1, eval_every = -1, checkpoint_every = 0, stop_after = 0;
  index_t batch_size = -1, sequence_length = -1;
  int accumulation = 1, eval_batches = 20, threads = 0, sample_tokens = 300, digits = 3;
  float distill_alpha = 0.5f, distill_temperature = 2.0f;
  float lr = -1, min_lr = -1, weight_decay = 0.1f, beta2 = 0.99f, clip = 1.0f, temperature = 0.8f;
  std::uint64_t seed = 1337, model_seed = 0;
  double rank_timeout = 600;
  bool quiet = false, zero_1 = false;
  int decay_embeddings = -1;  // -1: the preset decides
};

// Fills the defaults each preset wants for whatever the command line left unset.
void apply_preset_defaults(options& o) {
  auto set = [](auto& field, auto value) {
    if (field < 0) field = value;
  };
  if (o.preset == "addition") {
    // 3-digit addition is learnt in a sudden transition whose step moves
    // with any change of rounding (a thread count, a new exp): 1500 steps at
    // 3e-3 once gave 99% and later 54%, 3000 gave 94-100%, 3000-4000 at 5e-3
    // 7-100%. 4000 steps at 2e-3 reached 100% for every seed and thread
    // count tried (docs/performance.md).
    set(o.steps, 4000);
    set(o.batch_size, 64);
    set(o.lr, 2e-3f);
    set(o.min_lr, 2e-4f);
    set(o.warmup, 100);
    set(o.eval_every, 250);
    set(o.decay_embeddings, 0);
  } else {  // nanogpt-cpu and bytes: nanoGPT's train_shakespeare_char settings for the CPU
    set(o.decay_embeddings, 1);  // nanoGPT decays every 2-D tensor, the (tied) embedding included
    set(o.steps, 2000);
    set(o.batch_size, 12);
    set(o.sequence_length, 64);
    set(o.lr, 1e-3f);
    set(o.min_lr, 1e-4f);
    set(o.warmup, 100);
    set(o.eval_every, 250);
  }
}

// A tokenizer's vocabulary size, whether it is fixed (bytes) or learned from text.
template <class Tokenizer>
int vocab_of(const Tokenizer& tokenizer) {
  if constexpr (requires { tokenizer.vocab_size(); }) return tokenizer.vocab_size();
  else return Tokenizer::vocab_size;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Greedy answers for every held-out problem, in batches: all prompts have the
// same length, so each step extends every row by one token.
template <class Model, class Compute>
double addition_exact_match(Model& model, const train::addition_task& task, bool print_examples) {
  const auto problems = task.heldout_problems();
  const index_t batch = 250, prompt = task.prompt_length(), answer = task.answer_length();
  std::size_t correct = 0;
  std::vector<std::int32_t> tokens;
  for (std::size_t first = 0; first < problems.size(); first += std::size_t(batch)) {
    const index_t rows = std::min<index_t>(batch, index_t(problems.size() - first));
    const index_t width = prompt + answer;
    tokens.assign(std::size_t(rows * width), 0);
    for (index_t r = 0; r < rows; ++r) {
      const auto p = task.prompt(problems[first + r].first, problems[first + r].second);
      std::copy(p.begin(), p.end(), tokens.begin() + r * width);
    }
    for (index_t length = prompt; length < width; ++length) {
      // The rows' first `length` tokens, gathered contiguously.
      std::vector<std::int32_t> input(std::size_t(rows * length));
      for (index_t r = 0; r < rows; ++r)
        std::copy_n(tokens.begin() + r * width, length, input.begin() + r * length);
      auto logits = model.template logits<Compute>(tensor_view<const std::int32_t, 2>(input.data(), {rows, length}));
      for (index_t r = 0; r < rows; ++r) {
        const float* row = &logits(r, length - 1, 0);
        tokens[std::size_t(r * width + length)] =
            infer::greedy(std::span<const float>(row, std::size_t(train::addition_task::vocab_size)));
      }
    }
    for (index_t r = 0; r < rows; ++r) {
      const auto [a, b] = problems[first + r];
      std::span<const std::int32_t> generated(tokens.data() + r * width + prompt, std::size_t(answer));
      if (task.is_correct(a, b, generated)) ++correct;
      if (print_examples && first == 0 && r < 5)
        std::printf("  %s  (%s)\n",
                    train::addition_task::to_text(std::span<const std::int32_t>(tokens.data() + r * width, std::size_t(width))).c_str(),
                    task.is_correct(a, b, generated) ? "right" : "wrong");
    }
  }
  return double(correct) / double(problems.size());
}

// Samples text after a prompt, one token at a time over the whole window.
template <class Model, class Compute, class Tokenizer>
std::string sample_text(Model& model, const Tokenizer& tokenizer, const options& o) {
  std::vector<std::int32_t> tokens = tokenizer.encode(o.prompt);
  infer::sampling_settings settings;
  settings.temperature = o.temperature;
  settings.top_k = 0;
  settings.seed = o.seed;
  infer::sampler sampler(settings);
  const std::size_t prompt_length = tokens.size();
  for (int i = 0; i < o.sample_tokens; ++i) {
    const index_t length = std::min<index_t>(index_t(tokens.size()), Model::max_seq);
    const std::int32_t* window = tokens.data() + (tokens.size() - std::size_t(length));
    auto logits = model.template logits<Compute>(tensor_view<const std::int32_t, 2>(window, {1, length}));
    const float* row = &logits(0, length - 1, 0);
    tokens.push_back(sampler.sample(std::span<const float>(row, std::size_t(vocab_of(tokenizer)))));
  }
  return tokenizer.decode(std::span<const std::int32_t>(tokens.data() + prompt_length, tokens.size() - prompt_length));
}

template <class Config, class Precision, class Tokenizer>
int run(const options& o, const Tokenizer& tokenizer, const std::optional<io::text_dataset>& dataset,
        const train::addition_task* task) {
  using model_type = nn::model<Config, cpu::par_t>;
  using compute = typename Precision::compute_type;
  communicator_type world;
  if constexpr (requires { world.set_timeout(std::chrono::duration<double>(o.rank_timeout)); })
    world.set_timeout(std::chrono::duration<double>(o.rank_timeout));
  const bool root = world.rank() == 0;  // the rank that prints and saves
  int threads = o.threads;
  // N ranks on one machine share its cores unless told otherwise.
  if (threads == 0 && world.size() > 1 && std::getenv("OMP_NUM_THREADS") == nullptr)
    threads = std::max(1, int(std::thread::hardware_concurrency()) / world.size());
  const auto exec = cpu::par.with_threads(threads);
  if (vocab_of(tokenizer) > Config::vocab)
    throw invalid_input("train_gpt: the text has " + std::to_string(vocab_of(tokenizer)) +
                        " distinct characters but preset '" + o.preset + "' holds " + std::to_string(Config::vocab) +
                        "; use --preset bytes");
  model_type model(exec, o.model_seed);
  if (!o.init.empty() && io::load_model_parameters(o.init, model).vocabulary != tokenizer.serialize())
    throw invalid_input("train_gpt: " + o.init + " was trained with another tokenizer than this run's");
  if (!o.freeze.empty()) model.freeze(o.freeze);
  const auto trainable = model.trainable_ranges();
  train::adamw_config adam;
  adam.beta2 = o.beta2;
  adam.weight_decay = o.weight_decay;
  // ZeRO-1: this rank's optimizer holds the state of its shard alone.
  const auto shard = train::shard_of(trainable, world.rank(), world.size());
  train::adamw<cpu::par_t> optimizer(exec, model.parameter_count(), o.zero_1 ? shard.ranges : trainable, adam);
  train::warmup_cosine_schedule schedule{o.lr, o.min_lr, o.warmup, o.steps};
  train::trainer_settings settings;
  settings.batch_size = o.batch_size;
  settings.sequence_length = task ? task->context_length() : o.sequence_length;
  settings.accumulation_steps = o.accumulation;
  settings.clip_norm = o.clip;
  settings.eval_every = o.eval_every;
  settings.eval_batches = o.eval_batches;
  settings.seed = o.seed;
  settings.decay_embeddings = o.decay_embeddings > 0;
  settings.shard_optimizer_state = o.zero_1;
  train::trainer<model_type, train::adamw<cpu::par_t>, Precision, cpu::par_t, train::warmup_cosine_schedule,
                 communicator_type>
      trainer(model, optimizer, schedule, settings, world);
  const bool quiet = o.quiet || !root;
  io::training_state state;
  state.vocabulary = tokenizer.serialize();
  // Every rank calls save (ZeRO-1 gathers the state on rank 0); rank 0 writes.
  // The file holds the whole state, so it resumes on any number of ranks.
  auto save = [&](const std::string& path) {
    trainer.gather_optimizer_state();
    state.optimizer_state = trainer.optimizer_state();
    state.step = trainer.step_count();
    state.optimizer_step = optimizer.step_count();
    state.rng = trainer.rng();
    if (root) io::save_model_checkpoint(path, model, state);  // the replicas are identical
  };
  if (!o.resume.empty()) {
    state.optimizer_state = trainer.optimizer_state();
    io::load_model_checkpoint(o.resume, model, state);
    trainer.scatter_optimizer_state();
    optimizer.set_step_count(state.optimizer_step);
    trainer.rng() = state.rng;
    if (root) std::printf("resumed from %s at step %lld\n", o.resume.c_str(), static_cast<long long>(state.step));
  }

  if (root && world.size() > 1)
    std::printf("data-parallel over %d ranks: each trains %lld of every %lld sequences%s\n", world.size(),
                static_cast<long long>(settings.batch_size), static_cast<long long>(world.size() * settings.batch_size),
                o.zero_1 ? ("; ZeRO-1: optimizer state " + std::to_string(optimizer.state_bytes() / 1000000) +
                            " MB per rank").c_str()
                         : "");
  if (root)
    std::printf("ctformer train_gpt: preset %s, %lld parameters, %s, %d thread(s), %lld steps of %lld x %lld tokens\n",
                o.preset.c_str(), static_cast<long long>(model.parameter_count()),
                std::string(Precision::name).c_str(), exec.thread_count(), static_cast<long long>(o.steps),
                static_cast<long long>(world.size() * settings.batch_size),
                static_cast<long long>(settings.sequence_length));
  if (root && !o.init.empty()) std::printf("fine-tuning from %s with a fresh optimizer and schedule\n", o.init.c_str());
  if (root && !o.freeze.empty()) {
    std::size_t frozen_tensors = 0;
    for (bool f : model.frozen()) frozen_tensors += f;
    std::printf("frozen: %zu of %zu tensors; %lld of %lld parameters train; optimizer state %.1f MB\n",
                frozen_tensors, model.frozen().size(), static_cast<long long>(optimizer.layout().state_size()),
                static_cast<long long>(model.parameter_count()), double(optimizer.state_bytes()) / 1e6);
  }
  std::optional<train::jsonl_writer> metrics;
  if (root && !o.metrics.empty()) metrics.emplace(o.metrics, !o.resume.empty());
  train::progress_bar bar(o.steps, stdout, root ? std::nullopt : std::optional<bool>(false));

  // Held-out batches: fixed windows of the validation split, or fixed problems of the task.
  auto sample = [&](std::mt19937_64& rng, tensor_view<std::int32_t, 2> in, tensor_view<std::int32_t, 2> out) {
    if (task) task->make_batch(rng, in, out);
    else dataset->sample_batch(rng, in, out);
  };
  auto heldout = [&](int i, tensor_view<std::int32_t, 2> in, tensor_view<std::int32_t, 2> out) {
    std::mt19937_64 fixed(0xe7a1u + std::uint64_t(i));  // the same batches at every evaluation
    if (task) {
      // Training problems the model has not necessarily seen: the loss on
      // held-out problems is what exact match measures below.
      task->make_batch(fixed, in, out);
    } else {
      dataset->sample_validation_batch(fixed, in, out);
    }
  };

  // A run that starts from trained weights says where it starts: the held-out
  // loss before the first step, as step 0 (its training loss is null).
  if (trainer.step_count() == 0 && !o.init.empty() && o.eval_batches > 0) {
    train::step_metrics before;
    before.loss = std::numeric_limits<double>::quiet_NaN();
    before.val_loss = trainer.evaluate(heldout);
    if (metrics) metrics->write(before);
    if (!quiet) std::printf("step     0  val_loss %.4f (before fine-tuning)\n", *before.val_loss);
  }

  // Distillation: the teacher (nanogpt-cpu, forward only) gives each
  // micro-batch's logits.
  std::optional<nn::model<nanogpt_cpu_config, cpu::par_t>> teacher;
  if (!o.teacher.empty()) {
    if constexpr (Config::vocab == nanogpt_cpu_config::vocab) {
      teacher.emplace(exec, 0);
      io::load_model_parameters(o.teacher, *teacher);
      if (root)
        std::printf("distilling from %s (alpha %.2f, temperature %.2f)\n", o.teacher.c_str(), o.distill_alpha,
                    o.distill_temperature);
    }
  }
  const nn::distillation_settings distillation{o.distill_alpha, o.distill_temperature};
  auto teach = [&](tensor_view<const std::int32_t, 2> in) { return teacher->template logits<compute>(in); };

  const auto start = std::chrono::steady_clock::now();
  train::step_metrics last;
  double tokens_per_s_sum = 0;
  int timed_steps = 0;
  try {
    const std::int64_t last_step = o.stop_after > 0 ? std::min(o.steps, o.stop_after) : o.steps;
    auto on_metrics = [&](const train::step_metrics& m) {
      last = m;
      if (m.step > 5) {  // the first steps warm caches and grow buffers
        tokens_per_s_sum += m.tokens_per_s;
        ++timed_steps;
      }
      if (metrics) metrics->write(m);
      bar.update(m.step, m.loss, m.tokens_per_s);
      if (m.val_loss && !quiet) {
        bar.finish();
        std::printf("step %5lld  loss %.4f  val_loss %.4f  lr %.2e  grad_norm %.3f  %.0f tokens/s\n",
                    static_cast<long long>(m.step), m.loss, *m.val_loss, m.lr, m.grad_norm, m.tokens_per_s);
        std::fflush(stdout);
      }
      if (o.checkpoint_every > 0 && !o.save.empty() && m.step % o.checkpoint_every == 0) save(o.save);
    };
    if (teacher) trainer.run(last_step, sample, teach, distillation, heldout, on_metrics);
    else trainer.run(last_step, sample, heldout, on_metrics);
  } catch (const train::training_diverged& e) {
    bar.finish();
    std::fprintf(stderr, "%s\n", e.what());
    if (root && !o.save.empty())
      std::fprintf(stderr, "the last good checkpoint (if one was written) is kept at %s\n", o.save.c_str());
    return 2;
  }
  bar.finish();
  const double wall = seconds_since(start);
  if (!o.save.empty()) {
    save(o.save);
    if (root) std::printf("saved %s\n", o.save.c_str());
  }
  // The other ranks hold the same model: the evaluation and sample are rank 0's.
  if (!root) return 0;

  nlohmann::json summary{{"preset", o.preset},
                         {"precision", std::string(Precision::name)},
                         {"steps", trainer.step_count()},
                         {"train_loss", last.loss},
                         {"val_loss", last.val_loss ? nlohmann::json(*last.val_loss) : nlohmann::json(nullptr)},
                         {"tokens_per_s", timed_steps ? tokens_per_s_sum / timed_steps : last.tokens_per_s},
                         {"wall_s", wall},
                         {"parameters", model.parameter_count()},
                         {"ranks", world.size()},
                         {"teacher", o.teacher.empty() ? nlohmann::json(nullptr) : nlohmann::json(o.teacher)}};
  if (task) {
    std::printf("held-out problems (answers least-significant digit first, $ ends):\n");
    const double accuracy = addition_exact_match<model_type, compute>(model, *task, !o.quiet);
    std::printf("held-out exact match: %.2f%% of %zu problems\n", 100.0 * accuracy, task->heldout_size());
    summary["heldout_exact_match"] = accuracy;
  } else {
    summary["heldout_exact_match"] = nullptr;
    if (o.sample_tokens > 0) {
      std::printf("--- sample ---\n%s\n--------------\n", sample_text<model_type, compute>(model, tokenizer, o).c_str());
    }
  }
  std::printf("%lld steps in %.1f s, %.0f tokens/s, train loss %.4f, val loss %s\n",
              static_cast<long long>(trainer.step_count()), wall, summary["tokens_per_s"].get<double>(), last.loss,
              last.val_loss ? std::to_string(*last.val_loss).c_str() : "-");
  if (!o.summary_json.empty()) {
    std::ofstream out(o.summary_json);
    out << summary.dump(2) << "\n";
    if (!out) throw io_error("train_gpt: cannot write " + o.summary_json);
  }
  return 0;
}

template <class Config, class Tokenizer>
int run_with_precision(const options& o, const Tokenizer& tokenizer, const std::optional<io::text_dataset>& dataset,
                       const train::addition_task* task) {
  if (o.precision == "bf16") return run<Config, train::bf16_mixed>(o, tokenizer, dataset, task);
  return run<Config, train::fp32>(o, tokenizer, dataset, task);
}

// The task's own symbols as a tokenizer, so checkpoints record them like any text's.
struct addition_tokenizer {
  io::char_tokenizer chars = io::char_tokenizer::from_symbols(train::addition_task::alphabet);
  int vocab_size() const { return chars.vocab_size(); }  // NOLINT: mirrors char_tokenizer
  std::string serialize() const { return chars.serialize(); }
  std::vector<std::int32_t> encode(std::string_view text) const { return train::addition_task::from_text(text); }
  std::string decode(std::span<const std::int32_t> t) const { return train::addition_task::to_text(t); }
};

// The compiled preset whose configuration a checkpoint holds.
std::string preset_of_checkpoint(const std::string& path, const std::string& config_json) {
  const auto config = nlohmann::json::parse(config_json, nullptr, false);
  if (config == nlohmann::json::parse(nn::config_json<addition_config>())) return "addition";
  if (config == nlohmann::json::parse(nn::config_json<nanogpt_cpu_config>())) return "nanogpt-cpu";
  if (config == nlohmann::json::parse(nn::config_json<bytes_config>())) return "bytes";
  if (config == nlohmann::json::parse(nn::config_json<nanogpt_small_config>())) return "nanogpt-small";
  throw invalid_input("train_gpt: " + path + " holds a model of none of the presets (addition, nanogpt-cpu, "
                      "nanogpt-small, bytes): " +
                      config_json);
}

}  // namespace

int main(int argc, char** argv) {
#if CTFORMER_WITH_MPI
  train::mpi_environment mpi(argc, argv);
#endif
  options o;
  CLI::App app{"Train a GPT-family model with ctformer, then generate"};
  app.add_option("--data", o.data, "Train character-level on this text file instead of the embedded addition task");
  app.add_option("--preset", o.preset, "Model configuration: addition (default without --data), nanogpt-cpu "
                                       "(default with --data), nanogpt-small (a distillation student), bytes")
      ->check(CLI::IsMember({"addition", "nanogpt-cpu", "nanogpt-small", "bytes"}));
  app.add_option("--precision", o.precision, "fp32 or bf16 (bf16 GEMMs, fp32 master weights)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--steps", o.steps, "Optimizer steps (default: 4000 addition, 2000 text)");
  app.add_option("--batch-size", o.batch_size, "Sequences per micro-batch");
  app.add_option("--seq-len", o.sequence_length, "Tokens per sequence (text; at most the preset's context)");
  app.add_option("--accumulation", o.accumulation, "Micro-batches per optimizer step");
  app.add_option("--lr", o.lr, "Peak learning rate");
  app.add_option("--min-lr", o.min_lr, "Final learning rate of the cosine decay");
  app.add_option("--warmup", o.warmup, "Linear warm-up steps");
  app.add_option("--weight-decay", o.weight_decay, "AdamW weight decay (matrices only)");
  app.add_option("--beta2", o.beta2, "AdamW beta2");
  app.add_option("--decay-embeddings", o.decay_embeddings,
                 "1: weight decay on embeddings too (default for text, as nanoGPT), 0: matrices only");
  app.add_option("--clip", o.clip, "Clip the gradient's global norm to this (0: off)");
  app.add_option("--eval-every", o.eval_every, "Held-out loss every N steps");
  app.add_option("--eval-batches", o.eval_batches, "Held-out batches per evaluation");
  app.add_option("--threads", o.threads, "CPU threads (0: all)");
  app.add_option("--seed", o.seed, "Data-sampling seed");
  app.add_option("--model-seed", o.model_seed, "Initialisation seed");
  app.add_option("--digits", o.digits, "Operand digits of the addition task (1-4 fit the addition preset)");
  app.add_option("--save", o.save, "Write the final checkpoint here (atomically)");
  app.add_option("--checkpoint-every", o.checkpoint_every, "Also write --save every N steps");
  app.add_option("--stop-after", o.stop_after, "Stop after this many steps, keeping the schedule of --steps "
                                              "(to resume later)");
  app.add_option("--resume", o.resume, "Continue from this checkpoint (bit-identical to an uninterrupted run)");
  app.add_option("--init", o.init, "Fine-tune: start from this checkpoint's weights (its preset and tokenizer) with a "
                                   "fresh optimizer, schedule and data")
      ->excludes("--resume");
  app.add_option("--freeze", o.freeze, "Parameters that do not train, as name patterns: '*' any text, [a-b] a "
                                       "number in a range; e.g. 'token_embedding.*,blocks.[0-1].*,*norm.*'")
      ->delimiter(',');
  app.add_option("--teacher", o.teacher, "Distil: a nanogpt-cpu checkpoint whose logits teach this run's model "
                                         "(its tokenizer is the run's)");
  app.add_option("--distill-alpha", o.distill_alpha, "Distillation: weight of the labels' cross-entropy (the "
                                                     "teacher's KL gets 1 - alpha)");
  app.add_option("--distill-temperature", o.distill_temperature, "Distillation: softmax temperature T");
  app.add_option("--metrics", o.metrics, "Append per-step metrics here as JSON Lines");
  app.add_option("--summary-json", o.summary_json, "Write the final figures here as one JSON object");
  app.add_option("--sample-tokens", o.sample_tokens, "Characters to generate after training on text");
  app.add_option("--prompt", o.prompt, "Prompt for the text sample");
  app.add_option("--temperature", o.temperature, "Sampling temperature for the text sample");
  app.add_flag("--quiet", o.quiet, "Print only the summary lines");
  app.add_flag("--zero-1", o.zero_1, "Under mpirun: shard the optimizer state across the ranks (ZeRO-1)");
  app.add_option("--rank-timeout", o.rank_timeout,
                 "Under mpirun: seconds a rank waits for the others at a collective before ending the job");
  CLI11_PARSE(app, argc, argv);

  try {
    // A run that continues (--resume) or fine-tunes (--init) a checkpoint takes
    // its preset and tokenizer from the file: new text is tokenized with the
    // vocabulary the weights were trained on.
    std::optional<io::checkpoint_metadata> source;
    if (!o.init.empty() || !o.resume.empty()) {
      const std::string& path = o.init.empty() ? o.resume : o.init;
      source = io::read_checkpoint_metadata(path);
      const std::string preset = preset_of_checkpoint(path, source->config_json);
      if (!o.preset.empty() && o.preset != preset)
        throw invalid_input("train_gpt: " + path + " holds a '" + preset + "' model, not --preset " + o.preset);
      o.preset = preset;
    }
    if (o.preset.empty()) o.preset = o.data.empty() ? "addition" : "nanogpt-cpu";
    if (o.preset == "addition" && !o.data.empty())
      throw invalid_input("train_gpt: --preset addition trains on the embedded task; drop --data or pick nanogpt-cpu");
    if (o.preset != "addition" && o.data.empty())
      throw invalid_input("train_gpt: --preset " + o.preset + " trains on text: give --data FILE");
    apply_preset_defaults(o);
    if (o.preset == "addition") {
      if (!o.teacher.empty()) throw invalid_input("train_gpt: --teacher distils text presets, not the addition task");
      train::addition_task task(o.digits);
      if (task.context_length() > addition_config::max_seq)
        throw invalid_input("train_gpt: " + std::to_string(o.digits) + "-digit problems need a context of " +
                            std::to_string(task.context_length()) + " tokens; the addition preset holds " +
                            std::to_string(addition_config::max_seq));
      return run_with_precision<addition_config>(o, addition_tokenizer{}, std::nullopt, &task);
    }
    if (o.sequence_length > nanogpt_cpu_config::max_seq)
      throw invalid_input("train_gpt: --seq-len " + std::to_string(o.sequence_length) + " exceeds the preset's context " +
                          std::to_string(nanogpt_cpu_config::max_seq));
    if (!o.teacher.empty() && o.preset != "nanogpt-small" && o.preset != "nanogpt-cpu")
      throw invalid_input("train_gpt: --teacher distils into a character-level preset (nanogpt-small or "
                          "nanogpt-cpu), not " + o.preset);
    if (o.preset == "bytes") {
      io::byte_tokenizer tokenizer;
      std::optional<io::text_dataset> dataset(io::text_dataset::from_file(o.data, tokenizer, o.sequence_length));
      return run_with_precision<bytes_config>(o, tokenizer, dataset, nullptr);
    }
    // A distilled student reads the text with its teacher's vocabulary.
    std::optional<io::checkpoint_metadata> teacher;
    if (!o.teacher.empty()) {
      teacher = io::read_checkpoint_metadata(o.teacher);
      if (preset_of_checkpoint(o.teacher, teacher->config_json) != "nanogpt-cpu")
        throw invalid_input("train_gpt: --teacher " + o.teacher + " must hold a nanogpt-cpu model (the students "
                            "share its 65-character vocabulary)");
      if (source && source->vocabulary != teacher->vocabulary)
        throw invalid_input("train_gpt: " + o.teacher + " and the student's checkpoint have other tokenizers");
    }
    const auto tokenizer = source    ? io::char_tokenizer::deserialize(source->vocabulary)
                           : teacher ? io::char_tokenizer::deserialize(teacher->vocabulary)
                                     : io::char_tokenizer::from_text(io::read_text_file(o.data));
    std::optional<io::text_dataset> dataset(io::text_dataset::from_file(o.data, tokenizer, o.sequence_length));
    if (o.preset == "nanogpt-small") return run_with_precision<nanogpt_small_config>(o, tokenizer, dataset, nullptr);
    return run_with_precision<nanogpt_cpu_config>(o, tokenizer, dataset, nullptr);
  } catch (const ctformer::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
#if CTFORMER_WITH_MPI
    // The other ranks may be waiting in a collective: end the whole job.
    if (communicator_type{}.size() > 1) MPI_Abort(MPI_COMM_WORLD, 1);
#endif
    return 1;
  }
}
