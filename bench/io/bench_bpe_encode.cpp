// GPT-2 BPE encoding of tiny Shakespeare on one thread: MB/s of text and
// tokens/s, with the piece cache cleared before every pass (cold) and kept
// from the previous pass (warm). tools/bench_tiktoken.py measures tiktoken on
// the same file, for comparison in the same run.
//
// Data: the folder named by the CTFORMER_DATA_DIR environment variable, else
// the repository's data/ (compiled in relative to this program's folder).
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>

#include "ctformer/io/bpe_tokenizer.hpp"

namespace {

std::filesystem::path data_dir() {
  if (const char* dir = std::getenv("CTFORMER_DATA_DIR")) return dir;
  return std::filesystem::read_symlink("/proc/self/exe").parent_path() / CTFORMER_BENCH_DATA_RELATIVE;
}

const std::string& shakespeare() {
  static const std::string text = [] {
    const auto path = data_dir() / "tinyshakespeare.txt";
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("bench_bpe_encode: cannot open " + path.string());
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }();
  return text;
}

const ctformer::io::bpe_tokenizer& gpt2() {
  static const auto t =
      ctformer::io::bpe_tokenizer::from_files(data_dir() / "gpt2" / "encoder.json", data_dir() / "gpt2" / "vocab.bpe");
  return t;
}

void run(benchmark::State& state, bool cold) {
  const std::string& text = shakespeare();
  const auto& t = gpt2();
  if (!cold) (void)t.encode(text);  // fill the cache
  std::size_t tokens = 0;
  for (auto _ : state) {
    if (cold) t.clear_cache();
    const auto ids = t.encode(text);
    benchmark::DoNotOptimize(ids.data());
    tokens = ids.size();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(text.size()));
  state.counters["tokens/s"] =
      benchmark::Counter(double(tokens) * double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["tokens"] = double(tokens);
}

void bm_bpe_encode_cold(benchmark::State& state) { run(state, true); }
void bm_bpe_encode_warm(benchmark::State& state) { run(state, false); }

}  // namespace

BENCHMARK(bm_bpe_encode_cold)->Unit(benchmark::kMillisecond);
BENCHMARK(bm_bpe_encode_warm)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
