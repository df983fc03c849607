// serve::server over a real engine and socket: completions and chat, whole
// and streamed (the stream's text equals the whole response's), usage, stop
// strings that span tokens never streamed, OpenAI-style 400/404/429/503
// errors, a client that disconnects mid-stream cancels its sequence and frees
// its blocks, and stop() lets the streams in flight finish.
#include <catch2/catch.hpp>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "../infer/inference_test_models.hpp"
#include "ctformer/serve/server.hpp"

using namespace ctformer;
using testing::infer_gpt;
using json = nlohmann::json;

namespace {

// Printable ASCII and the newline, one token per character: the test
// model's 96 tokens.
struct ascii_tokenizer {
  static std::int32_t token_of(char c) {
    if (c == '\n') return 95;
    if (c < 32 || c > 126) throw invalid_input("ascii_tokenizer: a character outside printable ASCII");
    return std::int32_t(c - 32);
  }
  static char char_of(std::int32_t t) { return t == 95 ? '\n' : char(32 + t); }
  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<std::int32_t> out;
    for (char c : text) out.push_back(token_of(c));
    return out;
  }
  std::string decode(std::span<const std::int32_t> tokens) const {
    std::string out;
    for (auto t : tokens) out += char_of(t);
    return out;
  }
};

using model_type = infer::inference_model<infer_gpt, quant::fp32, infer::kv::paged<8, float>>;
using engine_type = infer::engine<model_type, infer::continuous_batching<4>>;

// A model, engine and server on a free port of 127.0.0.1. `token_delay`
// slows each token's text, so that a stream lasts long enough to leave it.
struct live_server {
  explicit live_server(std::chrono::milliseconds token_delay = {}, bool attach = true)
      : trained(cpu::par.with_threads(1), 7), model((testing::randomise(trained, 41), trained), 48, cpu::par.with_threads(1)),
        engine(model, {.token_text =
                           [this, token_delay](std::int32_t t) {
                             if (token_delay.count() > 0) std::this_thread::sleep_for(token_delay);
                             const std::int32_t one[] = {t};
                             return tokenizer.decode(one);
                           }}),
        backend(engine, tokenizer, infer_gpt::max_seq), http({.model_name = "tiny", .keep_alive = std::chrono::milliseconds(20)}),
        port(http.bind("127.0.0.1", 0)), thread([this] { http.run(); }) {
    if (attach) http.attach(backend);
  }
  ~live_server() {
    http.stop();
    thread.join();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30, 0);
    return c;
  }
  // The greedy continuation the engine gives this prompt, as text.
  std::string direct(const std::string& prompt, int max_tokens) {
    infer::request r{.prompt = tokenizer.encode(prompt), .sampling = {.temperature = 0}, .max_tokens = max_tokens};
    return engine.submit(r).wait().completions[0].text;
  }

  ascii_tokenizer tokenizer;
  nn::model<infer_gpt, cpu::par_t> trained;
  model_type model;
  engine_type engine;
  serve::engine_backend<engine_type, ascii_tokenizer> backend;
  serve::server<decltype(backend)> http;
  int port;
  std::thread thread;
};

// The JSON of each "data:" event of a server-sent-events body, [DONE] last.
std::vector<std::string> events_of(const std::string& body) {
  std::vector<std::string> events;
  std::size_t at = 0;
  while ((at = body.find("data: ", at)) != std::string::npos) {
    const std::size_t end = body.find("\n\n", at);
    events.push_back(body.substr(at + 6, end - at - 6));
    at = end;
  }
  return events;
}

httplib::Result post(live_server& s, const std::string& path, const json& body) {
  return s.client().Post(path.c_str(), body.dump(), "application/json");
}

}  // namespace

TEST_CASE("health answers 503 until a model is attached, then 200", "[serve]") {
  live_server s({}, false);
  auto c = s.client();
  auto r = c.Get("/health");
  REQUIRE(r);
  CHECK(r->status == 503);
  auto refused = post(s, "/v1/completions", {{"model", "tiny"}, {"prompt", "ab"}});
  REQUIRE(refused);
  CHECK(refused->status == 503);
  CHECK(refused->has_header("Retry-After"));
  s.http.attach(s.backend);
  r = c.Get("/health");
  REQUIRE(r);
  CHECK(r->status == 200);
  const auto models = c.Get("/v1/models");
  REQUIRE(models);
  CHECK(models->status == 200);
  const json list = json::parse(models->body);
  CHECK(list["data"][0]["id"] == "tiny");
  CHECK(list["data"][0]["max_model_len"] == infer_gpt::max_seq);
}

TEST_CASE("a completion equals the engine's own output, whole or streamed, with usage", "[serve]") {
  live_server s;
  const std::string expected = s.direct("Hello", 12);
  const json body{{"model", "tiny"}, {"prompt", "Hello"}, {"max_tokens", 12}, {"temperature", 0}};
  const auto whole = post(s, "/v1/completions", body);
  REQUIRE(whole);
  REQUIRE(whole->status == 200);
  const json response = json::parse(whole->body);
  CHECK(response["object"] == "text_completion");
  CHECK(response["choices"][0]["text"] == expected);
  CHECK(response["choices"][0]["finish_reason"] == "length");
  CHECK(response["usage"]["prompt_tokens"] == 5);
  CHECK(response["usage"]["completion_tokens"] == 12);
  CHECK(response["usage"]["total_tokens"] == 17);

  json streaming = body;
  streaming["stream"] = true;
  streaming["stream_options"] = {{"include_usage", true}};
  const auto streamed = post(s, "/v1/completions", streaming);
  REQUIRE(streamed);
  REQUIRE(streamed->status == 200);
  CHECK(streamed->get_header_value("Content-Type").starts_with("text/event-stream"));
  const auto events = events_of(streamed->body);
  REQUIRE(events.size() >= 3);
  CHECK(events.back() == "[DONE]");
  std::string text;
  json last_choice;
  for (std::size_t i = 0; i + 2 < events.size(); ++i) {
    const json chunk = json::parse(events[i]);
    text += chunk["choices"][0]["text"].get<std::string>();
    last_choice = chunk["choices"][0];
  }
  CHECK(text == expected);
  CHECK(last_choice["finish_reason"] == "length");
  const json usage = json::parse(events[events.size() - 2]);
  CHECK(usage["choices"].empty());
  CHECK(usage["usage"]["completion_tokens"] == 12);
}

TEST_CASE("chat completions stream the assistant's role first, then its text", "[serve]") {
  live_server s;
  const json body{{"model", "tiny"},
                  {"messages", {{{"role", "system"}, {"content", "Be brief."}}, {{"role", "user"}, {"content", "Hi"}}}},
                  {"max_tokens", 6},
                  {"temperature", 0}};
  const std::string expected = s.direct(serve::plain_chat_template::apply({{"system", "Be brief."}, {"user", "Hi"}}), 6);
  const auto whole = post(s, "/v1/chat/completions", body);
  REQUIRE(whole);
  REQUIRE(whole->status == 200);
  const json response = json::parse(whole->body);
  CHECK(response["object"] == "chat.completion");
  CHECK(response["choices"][0]["message"]["role"] == "assistant");
  CHECK(response["choices"][0]["message"]["content"] == expected);

  json streaming = body;
  streaming["stream"] = true;
  const auto streamed = post(s, "/v1/chat/completions", streaming);
  REQUIRE(streamed);
  const auto events = events_of(streamed->body);
  REQUIRE(events.size() >= 2);
  const json first = json::parse(events[0]);
  CHECK(first["object"] == "chat.completion.chunk");
  CHECK(first["choices"][0]["delta"]["role"] == "assistant");
  std::string text;
  for (std::size_t i = 0; i + 1 < events.size(); ++i)
    text += json::parse(events[i])["choices"][0]["delta"].value("content", std::string());
  CHECK(text == expected);
}

TEST_CASE("a stop string spanning tokens never reaches the stream", "[serve]") {
  live_server s;
  const std::string full = s.direct("abc", 20);
  REQUIRE(full.size() == 20);
  const std::string stop = full.substr(8, 3);  // three tokens: it spans token boundaries
  const std::size_t cut = full.find(stop);
  const json body{{"model", "tiny"}, {"prompt", "abc"}, {"max_tokens", 20}, {"temperature", 0}, {"stop", stop}, {"stream", true}};
  const auto streamed = post(s, "/v1/completions", body);
  REQUIRE(streamed);
  std::string text;
  json reason;
  for (const auto& e : events_of(streamed->body)) {
    if (e == "[DONE]") continue;
    const json chunk = json::parse(e);
    text += chunk["choices"][0]["text"].get<std::string>();
    if (!chunk["choices"][0]["finish_reason"].is_null()) reason = chunk["choices"][0]["finish_reason"];
  }
  CHECK(text == full.substr(0, cut));
  CHECK(reason == "stop");
  CHECK(streamed->body.find(stop) == std::string::npos);
}

TEST_CASE("bad requests get 400 with an OpenAI error object naming the field", "[serve]") {
  live_server s;
  auto c = s.client();
  struct bad_case {
    std::string body, param, message_part;
    int status;
  };
  const std::vector<bad_case> cases = {
      {"{\"model\": \"tiny\", \"prompt\": ", "", "not valid JSON", 400},
      {R"({"model": "tiny", "prompt": "ab", "temperature": "hot"})", "temperature", "must be a number", 400},
      {R"({"model": "tiny", "prompt": "ab", "max_tokens": 0})", "max_tokens", "must be in", 400},
      {R"({"model": "tiny", "prompt": "ab", "max_tokens": 1000})", "prompt", "maximum context length is 48", 400},
      {R"({"model": "tiny", "prompt": "ab", "frobnicate": true})", "frobnicate", "Unrecognized request argument", 400},
      {R"({"model": "tiny", "prompt": "caf\u00e9"})", "prompt", "cannot be tokenized", 400},
      {R"({"model": "tiny", "prompt": 12})", "prompt", "must be a string", 400},
      {R"({"model": "tiny", "messages": []})", "messages", "non-empty array", 400},
      {R"({"model": "tiny", "prompt": "ab", "n": 0})", "n", "must be in", 400},
      {R"({"model": "other", "prompt": "ab"})", "model", "does not exist", 404},
      {R"([1, 2])", "", "JSON object", 400},
  };
  for (const auto& k : cases) {
    const bool chat = k.body.find("messages") != std::string::npos;
    const auto r = c.Post(chat ? "/v1/chat/completions" : "/v1/completions", k.body, "application/json");
    REQUIRE(r);
    INFO(k.body << " -> " << r->body);
    CHECK(r->status == k.status);
    const json error = json::parse(r->body)["error"];
    CHECK(error["message"].get<std::string>().find(k.message_part) != std::string::npos);
    if (!k.param.empty()) CHECK(error["param"] == k.param);
    CHECK(error["type"].is_string());
  }
  const auto missing = c.Get("/v1/nothing");
  REQUIRE(missing);
  CHECK(missing->status == 404);
  // Nothing above reached the engine.
  CHECK(s.engine.metrics().snapshot().requests_arrived == 0);
}

namespace {
// A backend whose queue is always full: the server's answer to queue_full.
struct full_backend {
  std::vector<std::int32_t> encode(const std::string& text) const { return ascii_tokenizer{}.encode(text); }
  std::string token_text(std::int32_t t) const { return std::string(1, ascii_tokenizer::char_of(t)); }
  std::int64_t context_length() const { return 48; }
  infer::request_handle submit(infer::request) { throw infer::queue_full("the queue is full, retry later"); }
  const infer::metrics& metrics() const { return m; }
  infer::metrics m;
};
}  // namespace

TEST_CASE("a full queue is answered 429 with Retry-After", "[serve]") {
  full_backend full;
  static_assert(serve::request_backend<full_backend>);
  serve::server<full_backend> http({.model_name = "tiny", .retry_after_seconds = 3});
  const int port = http.bind("127.0.0.1", 0);
  std::thread runner([&] { http.run(); });
  http.attach(full);
  httplib::Client c("127.0.0.1", port);
  const auto r = c.Post("/v1/completions", R"({"model": "tiny", "prompt": "ab"})", "application/json");
  REQUIRE(r);
  CHECK(r->status == 429);
  CHECK(r->get_header_value("Retry-After") == "3");
  CHECK(json::parse(r->body)["error"]["code"] == "queue_full");
  http.stop();
  runner.join();
}

namespace {
// Sends a raw HTTP request and returns the connected socket.
int send_raw(int port, const std::string& path, const std::string& body) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(std::uint16_t(port));
  ::inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  const std::string request = "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" +
                              "Content-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
  REQUIRE(::send(fd, request.data(), request.size(), 0) == ssize_t(request.size()));
  return fd;
}
// Reads until `needle` shows up (or the peer closes); returns what was read.
std::string read_until(int fd, const std::string& needle) {
  std::string got;
  char buffer[4096];
  while (got.find(needle) == std::string::npos) {
    const ssize_t n = ::recv(fd, buffer, sizeof buffer, 0);
    if (n <= 0) break;
    got.append(buffer, std::size_t(n));
  }
  return got;
}
}  // namespace

TEST_CASE("a client that disconnects mid-stream cancels its sequence and frees its blocks", "[serve]") {
  live_server s(std::chrono::milliseconds(10));
  const json body{{"model", "tiny"}, {"prompt", "ab"}, {"max_tokens", 40}, {"stream", true}};
  const int fd = send_raw(s.port, "/v1/completions", body.dump());
  const std::string first = read_until(fd, "\"text\"");
  REQUIRE(first.find("200 OK") != std::string::npos);
  ::close(fd);
  // The next writes fail; the sequence is cancelled long before 40 tokens.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  infer::metrics_snapshot m;
  do {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    m = s.engine.metrics().snapshot();
  } while (m.requests_finished_cancelled == 0 && std::chrono::steady_clock::now() < deadline);
  CHECK(m.requests_finished_cancelled == 1);
  CHECK(m.output_tokens < 40);
  CHECK(m.kv_cache_usage == 0.0);
  CHECK(m.requests_running == 0);
}

TEST_CASE("stop() lets a stream in flight finish, then run() returns", "[serve]") {
  auto s = std::make_unique<live_server>(std::chrono::milliseconds(5));
  const json body{{"model", "tiny"}, {"prompt", "ab"}, {"max_tokens", 30}, {"stream", true}};
  const int fd = send_raw(s->port, "/v1/completions", body.dump());
  std::string got = read_until(fd, "\"text\"");
  REQUIRE(got.find("200 OK") != std::string::npos);
  s->http.stop();  // as SIGTERM does: no new connections
  got += read_until(fd, "[DONE]");
  ::close(fd);
  CHECK(got.find("data: [DONE]") != std::string::npos);
  CHECK(got.find("\"finish_reason\":\"length\"") != std::string::npos);
  s.reset();  // run() returned: the destructor's join does not hang
  CHECK(true);
}

TEST_CASE("metrics are served in Prometheus text with vLLM's names", "[serve]") {
  live_server s;
  REQUIRE(post(s, "/v1/completions", {{"model", "tiny"}, {"prompt", "ab"}, {"max_tokens", 3}}));
  const auto r = s.client().Get("/metrics");
  REQUIRE(r);
  CHECK(r->status == 200);
  for (const char* name : {"ctformer:time_to_first_token_seconds", "ctformer:num_requests_waiting",
                           "ctformer:num_requests_running", "ctformer:kv_cache_usage_perc"})
    CHECK(r->body.find(name) != std::string::npos);
}

TEST_CASE("n samples, echo, token-id prompts and logprobs come back in OpenAI's shapes", "[serve]") {
  live_server s;
  const std::string expected = s.direct("xyz", 4);
  // A prompt given as token ids equals the same prompt as text.
  const auto ids = post(s, "/v1/completions",
                        {{"model", "tiny"}, {"prompt", s.tokenizer.encode("xyz")}, {"max_tokens", 4}, {"temperature", 0},
                         {"echo", true}, {"logprobs", 2}});
  REQUIRE(ids);
  REQUIRE(ids->status == 200);
  const json choice = json::parse(ids->body)["choices"][0];
  CHECK(choice["text"] == "xyz" + expected);
  const json& lp = choice["logprobs"];
  REQUIRE(lp["tokens"].size() == 4);
  CHECK(lp["token_logprobs"].size() == 4);
  CHECK(lp["text_offset"][0] == 3);  // after the echoed prompt
  for (std::size_t i = 0; i < 4; ++i) {
    CHECK(lp["tokens"][i] == expected.substr(i, 1));
    CHECK(lp["token_logprobs"][i].get<double>() <= 0.0);
    // Greedy: the chosen token is the most likely, so it leads the alternatives.
    CHECK(lp["top_logprobs"][i].size() == 2);
    CHECK(lp["top_logprobs"][i].contains(expected.substr(i, 1)));
  }
  const auto samples = post(s, "/v1/completions",
                            {{"model", "tiny"}, {"prompt", "xyz"}, {"max_tokens", 5}, {"n", 3}, {"seed", 11}});
  REQUIRE(samples);
  REQUIRE(samples->status == 200);
  const json many = json::parse(samples->body);
  REQUIRE(many["choices"].size() == 3);
  for (int i = 0; i < 3; ++i) CHECK(many["choices"][i]["index"] == i);
  CHECK(many["usage"]["completion_tokens"] == 15);
  const auto chat = post(s, "/v1/chat/completions",
                         {{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "q"}}}}, {"max_tokens", 3},
                          {"logprobs", true}, {"top_logprobs", 3}});
  REQUIRE(chat);
  REQUIRE(chat->status == 200);
  const json content = json::parse(chat->body)["choices"][0]["logprobs"]["content"];
  REQUIRE(content.size() == 3);
  CHECK(content[0]["top_logprobs"].size() == 3);
  CHECK(content[0]["bytes"].size() == 1);
}
