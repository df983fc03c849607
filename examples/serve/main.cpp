// serve: an OpenAI-compatible HTTP server for a ctformer checkpoint
// (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).
// It listens at once and answers /health with 503 until the model is
// loaded. SIGTERM or SIGINT: stop accepting, finish the streams in flight,
// exit 0.
#include <CLI/CLI.hpp>
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>

#include "../common/open_model.hpp"
#include "ctformer/infer/engine.hpp"
#include "ctformer/serve/server.hpp"

using namespace ctformer;

namespace {

struct options {
  std::string checkpoint, host = "127.0.0.1", model_name;
  int port = 8000, threads = 0, queue_capacity = 256, retry_after = 1, default_max_tokens = 256;
  bool prefix_caching = true;
};

// Sequences decoding together, and the KV cache's block size in positions.
using batching = infer::continuous_batching<16>;
using kv_cache = infer::kv::paged<16, float>;

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"OpenAI-compatible server for a ctformer checkpoint"};
  app.add_option("--checkpoint", o.checkpoint,
                 "A train_gpt or quantize checkpoint, a GGUF file, a Hugging Face model folder or a llama2.c file")
      ->required();
  app.add_option("--host", o.host, "Address to listen on");
  app.add_option("--port", o.port, "Port to listen on (0: any free port, printed)");
  app.add_option("--model-name", o.model_name, "The model's name in requests (default: the checkpoint's file stem)");
  app.add_option("--threads", o.threads, "CPU threads of the kernels (0: all)");
  app.add_option("--queue-capacity", o.queue_capacity, "Requests that may wait; one more gets 429");
  app.add_option("--retry-after", o.retry_after, "Retry-After seconds of a 429");
  app.add_option("--default-max-tokens", o.default_max_tokens, "Chat requests without max_tokens");
  app.add_flag("!--no-prefix-caching", o.prefix_caching,
               "Prefill every prompt in full (by default prompts that begin with cached KV blocks reuse them)");
  CLI11_PARSE(app, argc, argv);
  if (o.model_name.empty()) {
    std::string path = o.checkpoint;
    while (path.size() > 1 && path.back() == '/') path.pop_back();  // a folder given as "gpt2/"
    o.model_name = std::filesystem::path(path).stem().string();
  }

  // Signals go to one thread that waits for them; every other thread
  // (started below) inherits the mask and never sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  try {
    return examples::with_inference_model_type<kv_cache>(
        o.checkpoint, cpu::par.with_threads(o.threads), 0, [&]<class Model, class Tokenizer>(auto open) {
          using engine_type = infer::engine<Model, batching>;
          using backend_type = serve::engine_backend<engine_type, Tokenizer>;
          serve::server<backend_type> http({.model_name = o.model_name,
                                            .retry_after_seconds = o.retry_after,
                                            .default_max_tokens = o.default_max_tokens});
          const int port = http.bind(o.host, o.port);
          std::printf("serve: listening on http://%s:%d (loading %s)\n", o.host.c_str(), port, o.checkpoint.c_str());
          std::fflush(stdout);
          std::thread listener([&] { http.run(); });
          std::atomic<bool> exiting = false;
          std::thread signals([&] {
            int signal_number = 0;
            sigwait(&stop_signals, &signal_number);
            if (exiting) return;
            std::printf("serve: %s: finishing the requests in flight\n", signal_number == SIGTERM ? "SIGTERM" : "SIGINT");
            std::fflush(stdout);
            http.stop();
          });
          // However this scope ends (stopped, or the weights failed to
          // load), the listener and the signal thread end before the server.
          struct join_on_exit {
            serve::server<backend_type>& http;
            std::thread &listener, &signals;
            std::atomic<bool>& exiting;
            ~join_on_exit() {
              http.stop();
              if (listener.joinable()) listener.join();
              exiting = true;
              pthread_kill(signals.native_handle(), SIGTERM);  // blocked everywhere: only its sigwait takes it
              signals.join();
            }
          } joiner{http, listener, signals, exiting};

          return open([&](Model& model, const Tokenizer& tokenizer) {
            infer::engine_options engine_options;
            engine_options.queue_capacity = o.queue_capacity;
            engine_options.prefix_caching = o.prefix_caching;
            engine_options.token_text = [&](std::int32_t t) {
              const std::int32_t one[] = {t};
              return tokenizer.decode(one);
            };
            engine_options.sampled_vocabulary =
                std::min(index_t(Model::vocab), examples::tokenizer_vocabulary(tokenizer));
            engine_type engine(model, engine_options);
            backend_type backend(engine, tokenizer, Model::max_seq);
            http.attach(backend);
            std::printf("serve: model '%s' ready (%s weights, context %d)\n", o.model_name.c_str(),
                        std::string(Model::format::name).c_str(), int(Model::max_seq));
            std::fflush(stdout);
            listener.join();  // until a signal stops the server and its streams end
            std::printf("serve: stopped\n");
            return 0;
          });
        });
  } catch (const ctformer::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
