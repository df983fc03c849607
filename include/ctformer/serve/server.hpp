// serve::server: an OpenAI-compatible HTTP front end over one infer::engine
// (POST /v1/completions, POST /v1/chat/completions with server-sent events,
// GET /v1/models, /health, /metrics), on cpp-httplib. Request threads parse,
// tokenize, submit and stream; they never call kernels.
#pragma once

#include <httplib.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <concepts>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ctformer/core/error.hpp"
#include "ctformer/infer/engine.hpp"
#include "ctformer/serve/openai.hpp"

namespace ctformer::serve {

/// What the server needs of a loaded model and its engine: tokenize, submit,
/// read the metrics. Request-level calls, a few per request; the kernels
/// below them dispatch on nothing.
///   encode(text)         throws invalid_input for text the tokenizer cannot encode;
///   submit(request)      throws invalid_input, infer::queue_full, or error once the engine stopped.
template <class Backend>
concept request_backend = requires(Backend& b, const Backend& c, const std::string& text, std::int32_t token,
                                   infer::request r) {
  { c.encode(text) } -> std::convertible_to<std::vector<std::int32_t>>;
  { c.token_text(token) } -> std::convertible_to<std::string>;
  { c.context_length() } -> std::convertible_to<std::int64_t>;
  { b.submit(std::move(r)) } -> std::same_as<infer::request_handle>;
  { c.metrics() } -> std::same_as<const infer::metrics&>;
};

/// A backend over an engine and the tokenizer its model was trained with.
template <class Engine, class Tokenizer>
class engine_backend {
 public:
  engine_backend(Engine& engine, const Tokenizer& tokenizer, std::int64_t context)
      : engine_(engine), tokenizer_(tokenizer), context_(context) {}
  std::vector<std::int32_t> encode(const std::string& text) const { return tokenizer_.encode(text); }
  std::string token_text(std::int32_t token) const {
    const std::int32_t one[] = {token};
    return tokenizer_.decode(one);
  }
  std::int64_t context_length() const { return context_; }
  infer::request_handle submit(infer::request r) { return engine_.submit(std::move(r)); }
  const infer::metrics& metrics() const { return engine_.metrics(); }

 private:
  Engine& engine_;
  const Tokenizer& tokenizer_;
  std::int64_t context_;
};

struct server_options {
  std::string model_name = "ctformer";  ///< the one model /v1/models lists and requests must name
  int retry_after_seconds = 1;          ///< Retry-After of a 429 (queue full)
  std::int64_t default_max_tokens = 256;  ///< chat requests without max_tokens (capped by the context)
  int http_threads = 64;                ///< connections served at once (each blocks while it streams)
  std::size_t max_body_bytes = 4 << 20;
  /// Silence on a stream longer than this sends an SSE comment, so that a
  /// client that went away is noticed (its sequence cancelled) even while
  /// no token comes.
  std::chrono::milliseconds keep_alive{500};
};

/// Listens from construction; answers 503 until attach() gives it a loaded
/// backend, so a client can wait on /health while the weights load.
template <class Backend>
class server {
  static_assert(request_backend<Backend>,
                "serve::server<Backend>: Backend must provide encode(text), token_text(token), context_length(), "
                "submit(infer::request) returning an infer::request_handle, and metrics() (see request_backend)");

 public:
  explicit server(server_options o = {}) : options_(std::move(o)) {
    ::signal(SIGPIPE, SIG_IGN);  // a client gone mid-write is an error return, not the process's end
    const int threads = options_.http_threads;
    http_.new_task_queue = [threads] { return new httplib::ThreadPool(std::size_t(threads)); };
    http_.set_payload_max_length(options_.max_body_bytes);
    http_.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      if (!ready()) return reply(res, 503, json{{"status", "loading"}});
      reply(res, 200, json{{"status", "ok"}});
    });
    http_.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      Backend* b = ready();
      if (!b) return reply(res, 503, api_error(503, "the model is still loading", {}, "unavailable").body());
      res.set_content(b->metrics().prometheus_text(std::chrono::steady_clock::now()), "text/plain; version=0.0.4");
    });
    http_.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      Backend* b = ready();
      if (!b) return reply(res, 503, api_error(503, "the model is still loading", {}, "unavailable").body());
      reply(res, 200,
            json{{"object", "list"},
                 {"data", json::array({json{{"id", options_.model_name},
                                            {"object", "model"},
                                            {"created", created_},
                                            {"owned_by", "ctformer"},
                                            {"max_model_len", b->context_length()}}})}});
    });
    http_.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      handle(endpoint::completions, req, res);
    });
    http_.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      handle(endpoint::chat_completions, req, res);
    });
    http_.set_error_handler([](const httplib::Request&, httplib::Response& res) {
      if (res.body.empty())
        reply(res, res.status, api_error(res.status, "no route for this method and path", {}, "not_found").body());
    });
  }
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  /// Binds host:port (port 0: any free port); returns the port. Throws io_error.
  int bind(const std::string& host, int port) {
    const int bound = port == 0 ? http_.bind_to_any_port(host) : (http_.bind_to_port(host, port) ? port : -1);
    if (bound <= 0) throw io_error("ctformer::serve::server: cannot listen on " + host + ":" + std::to_string(port));
    return bound;
  }
  /// Serves until stop(); returns once every connection in flight has ended.
  void run() {
    {
      std::lock_guard lock(run_mutex_);
      if (stop_requested_) return;
      run_started_ = true;
    }
    http_.listen_after_bind();
    run_ended_ = true;
  }
  /// The model is loaded: /health answers 200 and requests are taken.
  void attach(Backend& b) { backend_.store(&b); }
  /// Stops accepting connections; run() returns when those in flight end.
  /// Safe from any thread, before run() too (run() then returns at once).
  void stop() {
    {
      std::lock_guard lock(run_mutex_);
      stop_requested_ = true;
      if (!run_started_) return;
    }
    // run() may not be listening yet, and the socket library ignores a stop
    // that comes before it listens.
    while (!http_.is_running() && !run_ended_) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    http_.stop();
  }
  bool running() const { return http_.is_running(); }

 private:
  Backend* ready() const { return backend_.load(); }

  static void reply(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(dump(body), "application/json");
  }

  // A stream's state shared by the content provider and its releaser.
  struct stream_state {
    infer::request_handle handle;
    api_request request;
    response_header header;
    std::vector<bool> started;
    std::vector<std::size_t> offsets;
    bool finished = false;
  };

  void handle(endpoint kind, const httplib::Request& req, httplib::Response& res) {
    Backend* b = ready();
    if (!b) {
      res.set_header("Retry-After", std::to_string(options_.retry_after_seconds));
      return reply(res, 503, api_error(503, "the model is still loading", {}, "unavailable").body());
    }
    try {
      const json body = json::parse(req.body, nullptr, false);
      if (body.is_discarded())
        throw api_error(400, "We could not parse the JSON body of your request: it is not valid JSON");
      api_request r = kind == endpoint::completions ? parse_completion_request(body) : parse_chat_request(body);
      if (r.model != options_.model_name)
        throw api_error(404, "The model '" + r.model + "' does not exist; this server serves '" + options_.model_name + "'",
                        "model", "invalid_request_error", "model_not_found");
      const char* prompt_field = kind == endpoint::completions ? "prompt" : "messages";
      if (!r.prompt_tokens.empty()) {
        r.request.prompt = r.prompt_tokens;
        r.prompt = {};
        for (std::int32_t t : r.request.prompt) r.prompt += b->token_text(t);
      } else {
        try {
          r.request.prompt = b->encode(r.prompt);
        } catch (const invalid_input& e) {
          throw api_error(400, std::string("the prompt cannot be tokenized: ") + e.what(), prompt_field);
        }
      }
      fit_context(r, b->context_length(), options_.default_max_tokens);
      response_header header{(kind == endpoint::completions ? "cmpl-" : "chatcmpl-") + std::to_string(++counter_),
                             seconds_since_epoch(), options_.model_name};
      r.request.id = header.id;
      infer::request_handle handle;
      try {
        handle = b->submit(r.request);
      } catch (const infer::queue_full& e) {
        res.set_header("Retry-After", std::to_string(options_.retry_after_seconds));
        throw api_error(429, e.what(), {}, "rate_limit_exceeded", "queue_full");
      } catch (const api_error&) {
        throw;
      } catch (const invalid_input& e) {
        throw api_error(400, e.what(), prompt_field);
      } catch (const error& e) {
        throw api_error(503, e.what(), {}, "unavailable");
      }
      if (r.stream) stream(res, std::move(handle), std::move(r), std::move(header), *b);
      else whole(res, handle, r, header, *b);
    } catch (const api_error& e) {
      reply(res, e.status(), e.body());
    }
  }

  // A request answered in one response.
  static void whole(httplib::Response& res, infer::request_handle& handle, const api_request& r,
                    const response_header& header, Backend& b) {
    std::vector<std::vector<infer::stream_event>> tokens(std::size_t(r.request.n));
    while (auto e = handle.next())
      if (!e->finished && r.request.logprobs) tokens[std::size_t(e->index)].push_back(std::move(*e));
    const infer::request_result result = handle.wait();
    std::vector<std::string> texts;
    std::vector<json> logprobs;
    for (const infer::completion& c : result.completions) {
      if (c.reason == infer::finish_reason::error)
        return reply(res, 500, api_error(500, c.message, {}, "server_error").body());
      texts.push_back(r.echo ? r.prompt + c.text : c.text);
      const std::size_t offset = r.echo ? r.prompt.size() : 0;
      logprobs.push_back(r.request.logprobs ? logprobs_json(r.kind, tokens[std::size_t(c.index)],
                                                            [&](std::int32_t t) { return b.token_text(t); }, offset)
                                            : json(nullptr));
    }
    reply(res, 200, response_json(r.kind, header, result, texts, logprobs));
  }

  // A request streamed as server-sent events; a client gone cancels it.
  void stream(httplib::Response& res, infer::request_handle handle, api_request r, response_header header,
              Backend& b) {
    auto state = std::make_shared<stream_state>();
    state->handle = std::move(handle);
    state->request = std::move(r);
    state->header = std::move(header);
    state->started.assign(std::size_t(state->request.request.n), false);
    state->offsets.assign(std::size_t(state->request.request.n), 0);
    const auto keep_alive = options_.keep_alive;
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [state, keep_alive, source = &b](std::size_t, httplib::DataSink& sink) {
          Backend& b = *source;
          const api_request& r = state->request;
          auto send = [&](const json& chunk) {
            const std::string event = "data: " + dump(chunk) + "\n\n";
            return sink.write(event.data(), event.size());
          };
          if (r.echo)
            for (int i = 0; i < r.request.n; ++i)
              if (!send(stream_chunk(r.kind, state->header, i, r.prompt, nullptr, nullptr, false))) return false;
          auto last_write = std::chrono::steady_clock::now();
          for (;;) {
            auto e = state->handle.try_next(std::chrono::milliseconds(50));
            if (!e) {
              if (state->handle.done()) break;
              if (std::chrono::steady_clock::now() - last_write > keep_alive) {
                if (!sink.write(": keep-alive\n\n", 14)) return false;  // gone: the releaser cancels
                last_write = std::chrono::steady_clock::now();
              }
              continue;
            }
            const auto index = std::size_t(e->index);
            const bool first = !state->started[index];
            state->started[index] = true;
            json chunk;
            if (!e->finished) {
              if (e->text.empty() && !first && !r.request.logprobs) continue;
              json logprobs = nullptr;
              if (r.request.logprobs) {
                logprobs = logprobs_json(r.kind, {*e}, [&](std::int32_t t) { return b.token_text(t); },
                                         state->offsets[index]);
                state->offsets[index] += b.token_text(e->token).size();
              }
              chunk = stream_chunk(r.kind, state->header, e->index, e->text, nullptr, logprobs, first);
            } else if (e->reason == infer::finish_reason::error) {
              const std::string event = "data: " + dump(api_error(500, e->message, {}, "server_error").body()) + "\n\n";
              if (!sink.write(event.data(), event.size())) return false;
              continue;
            } else {
              chunk = stream_chunk(r.kind, state->header, e->index, e->text, finish_reason_json(e->reason), nullptr,
                                   first);
            }
            if (!send(chunk)) return false;
            last_write = std::chrono::steady_clock::now();
          }
          if (r.include_usage) {
            const infer::request_result result = state->handle.wait();
            if (!send(usage_chunk(r.kind, state->header, result.prompt_tokens, result.output_tokens))) return false;
          }
          static constexpr char done[] = "data: [DONE]\n\n";
          if (!sink.write(done, sizeof done - 1)) return false;
          state->finished = true;
          sink.done();
          return true;
        },
        [state](bool) {
          // Whatever ended the response (a client gone, a failed write, the
          // server stopping), the sequence stops and its blocks go back.
          if (!state->finished) state->handle.cancel();
        });
  }

  static std::int64_t seconds_since_epoch() {
    return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
  }

  server_options options_;
  httplib::Server http_;
  std::atomic<Backend*> backend_{nullptr};
  std::mutex run_mutex_;
  bool stop_requested_ = false, run_started_ = false;
  std::atomic<bool> run_ended_{false};
  std::atomic<std::uint64_t> counter_{0};
  std::int64_t created_ = seconds_since_epoch();
};

}  // namespace ctformer::serve
