// batch_infer: offline inference over JSON Lines. Each input line is a record
// {"id": ..., "prompt": ..., sampling fields}; each output line is its result
// (or an error naming the input line). Records run together on one engine
// under continuous batching; results are written as they finish.
//
// Resumable: rerun with the same arguments after the process was killed and
// it skips every record already in the output. A line is written with one
// write() and a cut-off last line (the process died inside it) is removed
// before anything new is appended, so no id is ever written twice or half.
//
// Built with MPI, under mpirun -np N each rank runs the input lines whose
// number is its rank modulo N and writes them to OUTPUT.part-R-of-N (each
// part resumable as above); when every rank is done, rank 0 merges the
// output and the parts into OUTPUT, in input order, atomically, and removes
// the parts.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "../common/open_model.hpp"
#include "ctformer/infer/engine.hpp"
#include "ctformer/io/safetensors.hpp"
#if CTFORMER_WITH_MPI
#include "ctformer/train/mpi_communicator.hpp"
#endif

using namespace ctformer;
using json = nlohmann::json;

namespace {

struct options {
  std::string checkpoint, input = "-", output, summary_json;
  int threads = 0, max_tokens = 128, top_k = 0;
  float temperature = 0.8f, top_p = 1.0f, min_p = 0.0f, repetition_penalty = 1.0f;
  std::uint64_t seed = 0x5eed;
  bool progress = true, prefix_caching = true;
};

using clock_type = std::chrono::steady_clock;

#if CTFORMER_WITH_MPI
// One process on its own when no launcher started this one (mpi_environment).
using communicator_type = train::mpi_communicator;
#else
using communicator_type = train::single_process;
#endif

// The complete result lines of a batch_infer output file (a last line with no
// newline is a write cut short, and not one of them), each with its input
// line and its key: the id's JSON text, or "line N" for an id-less record.
struct result_line {
  std::size_t line;
  std::string key, text;
};
std::vector<result_line> read_results(const std::string& path) {
  std::vector<result_line> results;
  std::ifstream in(path, std::ios::binary);
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::size_t complete = content.rfind('\n') == std::string::npos ? 0 : content.rfind('\n') + 1;
  std::size_t begin = 0, number = 0;
  while (begin < complete) {
    const std::size_t end = content.find('\n', begin);
    ++number;
    std::string text = content.substr(begin, end - begin);
    begin = end + 1;
    if (text.empty()) continue;
    const json record = json::parse(text, nullptr, false);
    if (record.is_discarded() || !record.is_object() || !record.contains("line") || !record["line"].is_number_unsigned())
      throw invalid_input("batch_infer: " + path + " line " + std::to_string(number) +
                          " is not a batch_infer result; refusing to append to it");
    const std::size_t line = record["line"].get<std::size_t>();
    std::string key = record.contains("id") && !record["id"].is_null() ? record["id"].dump() : "line " + std::to_string(line);
    results.push_back({line, std::move(key), std::move(text)});
  }
  return results;
}

// The most sequences decoding together: enough rows per forward call to
// stream each weight matrix once for many tokens.
using batching = infer::continuous_batching<32>;

// An append-only output file of complete JSON lines.
class output_file {
 public:
  // Opens `path`, reads the records it already holds and drops a last line
  // that has no newline (a write cut short by a kill).
  // `also_done`: records an earlier run finished elsewhere (the merged
  // output, for a rank's part), skipped too.
  explicit output_file(const std::string& path, const std::vector<result_line>& also_done = {}) : path_(path) {
    const auto own = read_results(path);
    records_ = own.size();
    for (const auto* results : {&own, &also_done})
      for (const result_line& r : *results) {
        if (r.key.rfind("line ", 0) == 0) done_lines_.insert(r.line);
        else done_ids_.insert(r.key);
      }
    std::uintmax_t complete = 0;
    {
      std::ifstream in(path, std::ios::binary);
      std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      complete = content.rfind('\n') == std::string::npos ? 0 : content.rfind('\n') + 1;
      cut_ = complete < content.size();
    }
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd_ < 0) throw io_error("batch_infer: cannot open " + path + " for writing");
    if (cut_ && ::ftruncate(fd_, off_t(complete)) != 0)
      throw io_error("batch_infer: cannot cut the unfinished last line of " + path);
    if (cut_) std::fprintf(stderr, "batch_infer: dropped an unfinished last line of %s\n", path.c_str());
  }
  output_file(const output_file&) = delete;
  output_file& operator=(const output_file&) = delete;
  ~output_file() {
    if (fd_ >= 0) {
      ::fsync(fd_);
      ::close(fd_);
    }
  }

  // Whether a record with this id (its JSON text), or an id-less error
  // record for this input line, was written by an earlier run.
  bool has_id(const std::string& id_json) const { return done_ids_.contains(id_json); }
  bool has_line(std::size_t line) const { return done_lines_.contains(line); }
  std::size_t records() const { return records_; }

  void write(const json& record) {
    std::string text = record.dump(-1, ' ', false, json::error_handler_t::replace);
    text += '\n';
    io::detail::write_all(fd_, text.data(), text.size(), path_);  // one write() unless the kernel splits it
    ++records_;
    // What a kill cannot lose is in the kernel already; fsync now and then
    // for a machine that loses power.
    if (clock_type::now() - last_sync_ > std::chrono::seconds(2)) {
      ::fsync(fd_);
      last_sync_ = clock_type::now();
    }
  }

 private:
  std::string path_;
  int fd_ = -1;
  std::set<std::string> done_ids_;
  std::set<std::size_t> done_lines_;
  std::size_t records_ = 0;
  bool cut_ = false;
  clock_type::time_point last_sync_ = clock_type::now();
};

std::string part_path(const std::string& output, int rank, int ranks) {
  return output + ".part-" + std::to_string(rank) + "-of-" + std::to_string(ranks);
}

// Rank 0, once every rank is done: OUTPUT becomes its own records and every
// part's, each key once, in input order, written to a new file and renamed
// over OUTPUT; then the parts go. A kill at any point leaves OUTPUT and the
// parts as they were or the merge complete; a rerun merges again.
void merge_parts(const std::string& output, int ranks) {
  std::map<std::string, result_line> by_key;
  auto take = [&](const std::string& path) {
    if (!std::filesystem::exists(path)) return;
    for (auto& r : read_results(path)) by_key.try_emplace(r.key, std::move(r));
  };
  take(output);
  for (int r = 0; r < ranks; ++r) take(part_path(output, r, ranks));
  std::vector<const result_line*> ordered;
  for (const auto& [key, r] : by_key) ordered.push_back(&r);
  std::stable_sort(ordered.begin(), ordered.end(), [](const result_line* a, const result_line* b) { return a->line < b->line; });
  io::detail::atomic_write(output, [&](int fd) {
    for (const result_line* r : ordered) {
      const std::string text = r->text + "\n";
      io::detail::write_all(fd, text.data(), text.size(), output);
    }
  });
  for (int r = 0; r < ranks; ++r) std::filesystem::remove(part_path(output, r, ranks));
}

// The fields a record may have; any other is refused (a typo would otherwise
// run with a default silently).
const std::set<std::string> known_fields = {"id",    "prompt", "max_tokens", "temperature", "top_k",
                                            "top_p", "min_p",  "seed",       "stop",        "n",
                                            "repetition_penalty", "presence_penalty", "frequency_penalty"};

template <class T>
T field(const json& record, const char* name, T fallback) {
  if (!record.contains(name) || record[name].is_null()) return fallback;
  const json& value = record[name];
  if constexpr (std::is_floating_point_v<T>) {
    if (!value.is_number()) throw invalid_input(std::string("\"") + name + "\" must be a number");
  } else if constexpr (std::is_integral_v<T>) {
    if (!value.is_number_integer() || (std::is_unsigned_v<T> && value.get<std::int64_t>() < 0))
      throw invalid_input(std::string("\"") + name + "\" must be " +
                          (std::is_unsigned_v<T> ? "a non-negative integer" : "an integer"));
  }
  return value.get<T>();
}

// Builds the engine request of one record; throws invalid_input naming the problem.
template <class Tokenizer>
infer::request make_request(const json& record, const options& o, const Tokenizer& tokenizer) {
  for (const auto& [key, value] : record.items())
    if (!known_fields.contains(key)) throw invalid_input("unknown field \"" + key + "\"");
  if (!record.contains("prompt") || !record["prompt"].is_string())
    throw invalid_input("\"prompt\" must be a string");
  infer::request r;
  r.prompt = tokenizer.encode(record["prompt"].get<std::string>());
  r.max_tokens = field(record, "max_tokens", o.max_tokens);
  r.n = field(record, "n", 1);
  r.sampling.temperature = field(record, "temperature", o.temperature);
  r.sampling.top_k = field(record, "top_k", o.top_k);
  r.sampling.top_p = field(record, "top_p", o.top_p);
  r.sampling.min_p = field(record, "min_p", o.min_p);
  r.sampling.repetition_penalty = field(record, "repetition_penalty", o.repetition_penalty);
  r.sampling.presence_penalty = field(record, "presence_penalty", 0.0f);
  r.sampling.frequency_penalty = field(record, "frequency_penalty", 0.0f);
  r.sampling.seed = field(record, "seed", o.seed);
  if (record.contains("stop") && !record["stop"].is_null()) {
    const json& stop = record["stop"];
    if (stop.is_string()) r.stop_strings.push_back(stop.get<std::string>());
    else if (stop.is_array() && std::all_of(stop.begin(), stop.end(), [](const json& s) { return s.is_string(); }))
      for (const json& s : stop) r.stop_strings.push_back(s.get<std::string>());
    else throw invalid_input("\"stop\" must be a string or an array of strings");
  }
  return r;
}

json error_record(std::size_t line, const json& id, const std::string& message) {
  return json{{"id", id}, {"line", line}, {"error", message}};
}

// One record in flight.
struct pending {
  std::size_t line;
  json id;
  std::size_t prompt_tokens;
  infer::request_handle handle;
};

// Progress on a terminal: one line redrawn; otherwise a plain line now and then.
class progress_report {
 public:
  progress_report(bool enabled, std::optional<std::size_t> total)
      : enabled_(enabled), terminal_(::isatty(STDERR_FILENO) != 0), total_(total) {}

  void update(std::size_t records, std::size_t tokens, bool last = false) {
    if (!enabled_) return;
    const auto now = clock_type::now();
    if (!last && now - shown_ < (terminal_ ? std::chrono::milliseconds(200) : std::chrono::seconds(10))) return;
    shown_ = now;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const double rate = seconds > 0 ? double(tokens) / seconds : 0;
    std::string line = "records " + std::to_string(records);
    if (total_) line += "/" + std::to_string(*total_);
    char numbers[96];
    std::snprintf(numbers, sizeof numbers, "  %.1f output tokens/s  %.0f s", rate, seconds);
    line += numbers;
    if (total_ && records > 0 && records < *total_) {
      const double eta = seconds / double(records) * double(*total_ - records);
      std::snprintf(numbers, sizeof numbers, "  ETA %d:%02d", int(eta) / 60, int(eta) % 60);
      line += numbers;
    }
    if (terminal_) std::fprintf(stderr, "\r%s\033[K%s", line.c_str(), last ? "\n" : "");
    else std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  }

 private:
  bool enabled_, terminal_;
  std::optional<std::size_t> total_;
  clock_type::time_point start_ = clock_type::now(), shown_{};
};

std::optional<std::size_t> count_lines(const std::string& path) {
  if (path == "-") return std::nullopt;
  std::ifstream in(path, std::ios::binary);
  std::size_t lines = 0;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) ++lines;
  return lines;
}

template <class Model, class Tokenizer>
int run(const options& o, Model& model, const Tokenizer& tokenizer) {
  const communicator_type world;
  const int ranks = world.size(), rank = world.rank();
  if (ranks > 1 && o.input == "-")
    throw invalid_input("batch_infer: under mpirun every rank reads the input: give --input FILE, not stdin");
  std::ifstream file;
  if (o.input != "-") {
    file.open(o.input, std::ios::binary);
    if (!file) throw io_error("batch_infer: cannot read " + o.input);
  }
  std::istream& in = o.input == "-" ? std::cin : file;
  // Sharded: this rank's part file; what a finished earlier run merged into
  // the output is skipped too.
  output_file out(ranks > 1 ? part_path(o.output, rank, ranks) : o.output,
                  ranks > 1 ? read_results(o.output) : std::vector<result_line>{});
  const std::size_t already = out.records();

  infer::engine_options engine_options;
  engine_options.token_text = [&](std::int32_t t) {
    const std::int32_t one[] = {t};
    return tokenizer.decode(one);
  };
  engine_options.sampled_vocabulary = std::min(index_t(Model::vocab), examples::tokenizer_vocabulary(tokenizer));
  engine_options.prefix_caching = o.prefix_caching;
  infer::engine<Model, batching> engine(model, engine_options);
  // Enough records in flight to keep every sequence slot busy while some finish.
  const std::size_t in_flight_limit = 2 * std::size_t(batching::max_requests);

  std::vector<pending> flight;
  std::size_t written = 0, skipped = 0, errors = 0, prompt_tokens = 0, output_tokens = 0;
  progress_report progress(o.progress && rank == 0, ranks > 1 ? std::nullopt : count_lines(o.input));
  const auto start = clock_type::now();

  auto write_finished = [&](bool block) {
    for (;;) {
      bool any = false;
      for (std::size_t i = 0; i < flight.size();) {
        if (!flight[i].handle.finished()) {
          ++i;
          continue;
        }
        pending& p = flight[i];
        const infer::request_result result = p.handle.wait();
        json record{{"id", p.id}, {"line", p.line}, {"prompt_tokens", p.prompt_tokens}};
        std::size_t tokens = 0;
        json choices = json::array();
        std::string failure;
        for (const infer::completion& c : result.completions) {
          tokens += c.tokens.size();
          if (c.reason == infer::finish_reason::error) failure = c.message;
          choices.push_back(json{{"index", c.index},
                                 {"text", c.text},
                                 {"output_tokens", c.tokens.size()},
                                 {"finish_reason", std::string(infer::to_string(c.reason))}});
        }
        if (!failure.empty()) {
          out.write(error_record(p.line, p.id, failure));
          ++errors;
        } else {
          record["text"] = choices[0]["text"];
          record["finish_reason"] = choices[0]["finish_reason"];
          record["output_tokens"] = tokens;
          if (choices.size() > 1) record["choices"] = choices;
          out.write(record);
          prompt_tokens += p.prompt_tokens;
          output_tokens += tokens;
        }
        ++written;
        flight.erase(flight.begin() + std::ptrdiff_t(i));
        any = true;
      }
      progress.update(already + written + skipped, output_tokens);
      if (any || !block || flight.empty()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  };

  std::string text;
  std::size_t line = 0;
  std::set<std::string> seen_ids;  // ids of this input, to refuse a repeated one
  while (std::getline(in, text)) {
    ++line;
    if (!text.empty() && text.back() == '\r') text.pop_back();
    if (text.find_first_not_of(" \t") == std::string::npos) continue;
    const json record = json::parse(text, nullptr, false);
    json id = nullptr;
    std::string problem;
    if (record.is_discarded()) problem = "line " + std::to_string(line) + " is not valid JSON";
    else if (!record.is_object()) problem = "line " + std::to_string(line) + " is not a JSON object";
    else if (record.contains("id") && !record["id"].is_string() && !record["id"].is_number_integer())
      problem = "line " + std::to_string(line) + ": \"id\" must be a string or an integer";
    else id = record.contains("id") ? record["id"] : json(line);
    if (!id.is_null() && !seen_ids.insert(id.dump()).second) {
      problem = "line " + std::to_string(line) + ": id " + id.dump() + " appeared on an earlier line";
      id = nullptr;  // an error record must not write the id a second time
    }
    // Every rank reads every line (so a repeated id is found wherever its
    // first line ran) and runs its own.
    if (ranks > 1 && int(line % std::size_t(ranks)) != rank) continue;
    if (id.is_null() ? out.has_line(line) : out.has_id(id.dump())) {
      ++skipped;
      continue;
    }
    if (!problem.empty()) {
      out.write(error_record(line, nullptr, "batch_infer: " + problem));
      ++written;
      ++errors;
      continue;
    }
    try {
      infer::request r = make_request(record, o, tokenizer);
      r.id = id.is_string() ? id.get<std::string>() : id.dump();
      const std::size_t length = r.prompt.size();
      for (;;) {
        try {
          flight.push_back({line, id, length, engine.submit(r)});
          break;
        } catch (const infer::queue_full&) {
          write_finished(true);
        }
      }
    } catch (const invalid_input& e) {
      out.write(error_record(line, id, "batch_infer: line " + std::to_string(line) + ": " + e.what()));
      ++written;
      ++errors;
    }
    if (flight.size() >= in_flight_limit) write_finished(true);
    else write_finished(false);
  }
  engine.close_input();
  while (!flight.empty()) write_finished(true);
  progress.update(already + written + skipped, output_tokens, true);

  double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  if (ranks > 1) {
    // The job's figures: every rank's records and tokens, over the slowest
    // rank's time (the merge waits for it).
    auto total = [&](std::size_t& n) { n = std::size_t(world.sum(double(n))); };
    total(written), total(errors), total(skipped), total(prompt_tokens), total(output_tokens);
    double slowest = seconds;  // each rank's time in turn, as a sum with one term
    for (int r = 0; r < ranks; ++r) slowest = std::max(slowest, world.sum(r == rank ? seconds : 0.0));
    seconds = slowest;
    if (rank == 0) merge_parts(o.output, ranks);
    world.barrier();
    if (rank != 0) return 0;
  }
  const double per_day = seconds > 0 ? 86400.0 / seconds : 0;
  const double input_tpd = double(prompt_tokens) * per_day, output_tpd = double(output_tokens) * per_day;
  std::fprintf(stderr,
               "-- %zu records written (%zu errors), %zu already done; %zu prompt + %zu output tokens in %.2f s\n"
               "-- input %.3g tokens/day, output %.3g tokens/day (%s weights, %d sequences at most%s)\n",
               written, errors, skipped, prompt_tokens, output_tokens, seconds, input_tpd, output_tpd,
               std::string(Model::format::name).c_str(), int(batching::max_requests),
               ranks > 1 ? (" per rank, " + std::to_string(ranks) + " ranks").c_str() : "");
  if (!o.summary_json.empty()) {
    const auto m = engine.metrics().snapshot();
    const json summary{{"records_written", written},
                       {"error_records", errors},
                       {"records_skipped", skipped},
                       {"prompt_tokens", prompt_tokens},
                       {"output_tokens", output_tokens},
                       {"seconds", seconds},
                       {"input_tokens_per_day", input_tpd},
                       {"output_tokens_per_day", output_tpd},
                       {"preemptions", m.preemptions},
                       {"time_to_first_token_p50_seconds", m.time_to_first_token.p50},
                       {"time_per_output_token_p50_seconds", m.time_per_output_token.p50},
                       {"weight_format", std::string(Model::format::name)},
                       {"ranks", ranks}};
    const std::string text = summary.dump(2) + "\n";
    io::detail::atomic_write(o.summary_json, [&](int fd) { io::detail::write_all(fd, text.data(), text.size(), o.summary_json); });
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
#if CTFORMER_WITH_MPI
  train::mpi_environment mpi(argc, argv);
#endif
  options o;
  CLI::App app{"Offline inference over JSON Lines records, resumable"};
  app.add_option("--checkpoint", o.checkpoint,
                 "A train_gpt or quantize checkpoint, a GGUF file, a Hugging Face model folder or a llama2.c file")
      ->required();
  app.add_option("--input", o.input, "JSON Lines records, or - for stdin");
  app.add_option("--output", o.output, "JSON Lines results: appended to, records already there are skipped")
      ->required();
  app.add_option("--max-tokens", o.max_tokens, "Most new tokens of a record without max_tokens");
  app.add_option("--temperature", o.temperature, "Default temperature (0: greedy)");
  app.add_option("--top-k", o.top_k, "Default top-k (0: off)");
  app.add_option("--top-p", o.top_p, "Default nucleus threshold (1: off)");
  app.add_option("--min-p", o.min_p, "Default min-p (0: off)");
  app.add_option("--repetition-penalty", o.repetition_penalty, "Default repetition penalty (1: off)");
  app.add_option("--seed", o.seed, "Default sampling seed");
  app.add_option("--threads", o.threads, "CPU threads (0: all)");
  app.add_option("--summary-json", o.summary_json, "Write token counts and tokens/day here");
  app.add_flag("!--no-progress", o.progress, "No progress report on stderr");
  app.add_flag("!--no-prefix-caching", o.prefix_caching,
               "Prefill every prompt in full (by default prompts that begin with cached KV blocks reuse them)");
  CLI11_PARSE(app, argc, argv);
  try {
    return examples::with_inference_model<infer::kv::paged<16, float>>(
        o.checkpoint, cpu::par.with_threads(o.threads), 0,
        [&](auto& model, const auto& tokenizer) { return run(o, model, tokenizer); });
  } catch (const ctformer::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
#if CTFORMER_WITH_MPI
    // The other ranks may be waiting for this one: end the whole job.
    if (communicator_type{}.size() > 1) MPI_Abort(MPI_COMM_WORLD, 1);
#endif
    return 1;
  }
}
