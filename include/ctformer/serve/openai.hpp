// The OpenAI completions and chat completions protocol: request bodies
// checked field by field into engine requests, and the response objects and
// stream chunks built from engine results and events. No HTTP here.
#pragma once

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "ctformer/core/error.hpp"
#include "ctformer/infer/engine.hpp"
#include "ctformer/infer/request.hpp"

namespace ctformer::serve {

using json = nlohmann::json;

/// A request the API refuses: its HTTP status and an OpenAI-style error
/// object ({"error": {"message", "type", "param", "code"}}).
class api_error : public invalid_input {
 public:
  api_error(int status, std::string message, std::string param = {}, std::string type = "invalid_request_error",
            std::string code = {})
      : invalid_input(message), status_(status), type_(std::move(type)), param_(std::move(param)),
        code_(std::move(code)) {}
  int status() const { return status_; }
  json body() const {
    return json{{"error",
                 {{"message", what()},
                  {"type", type_},
                  {"param", param_.empty() ? json(nullptr) : json(param_)},
                  {"code", code_.empty() ? json(nullptr) : json(code_)}}}};
  }

 private:
  int status_;
  std::string type_, param_, code_;
};

enum class endpoint { completions, chat_completions };

/// A checked request body: everything but the prompt's tokens, which need
/// the model's tokenizer (and its context length to check).
struct api_request {
  endpoint kind = endpoint::completions;
  std::string model;
  std::string prompt;                 ///< completions: the prompt; chat: the messages after the chat template
  std::vector<std::int32_t> prompt_tokens;  ///< a completions prompt given as token ids
  bool max_tokens_given = false;
  infer::request request;             ///< sampling, n, stop strings, logprobs; prompt empty
  bool stream = false;
  bool include_usage = false;         ///< stream_options.include_usage
  bool echo = false;                  ///< completions: the prompt's text before the completion
  int completion_logprobs = -1;       ///< completions' integer logprobs (-1: none)
};

/// How chat messages become one prompt: the role on a line of its own
/// before each message's text, then the assistant's turn opened. A model
/// trained on another template gets its own policy (any type with this
/// static function).
struct plain_chat_template {
  static std::string apply(const std::vector<std::pair<std::string, std::string>>& messages) {
    std::string prompt;
    for (const auto& [role, content] : messages) prompt += role + ":\n" + content + "\n";
    return prompt + "assistant:\n";
  }
};

namespace detail {

inline const json& member(const json& body, const char* name) {
  static const json null_value;
  const auto it = body.find(name);
  return it == body.end() ? null_value : *it;
}

inline api_error wrong_type(const char* name, const char* expected, const json& value) {
  return api_error(400, std::string("'") + name + "' must be " + expected + ", got " + std::string(value.type_name()),
                   name);
}

inline double number_in(const json& body, const char* name, double fallback, double low, double high) {
  const json& v = member(body, name);
  if (v.is_null()) return fallback;
  if (!v.is_number()) throw wrong_type(name, "a number", v);
  const double x = v.get<double>();
  if (!(x >= low && x <= high))
    throw api_error(400, std::string("'") + name + "' is " + v.dump() + "; it must be in [" + json(low).dump() + ", " +
                             json(high).dump() + "]",
                    name);
  return x;
}

inline std::int64_t integer_in(const json& body, const char* name, std::int64_t fallback, std::int64_t low,
                               std::int64_t high) {
  const json& v = member(body, name);
  if (v.is_null()) return fallback;
  if (!v.is_number_integer()) throw wrong_type(name, "an integer", v);
  if (v.is_number_unsigned() && v.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
    throw api_error(400, std::string("'") + name + "' is too large", name);
  const std::int64_t x = v.get<std::int64_t>();
  if (x < low || x > high)
    throw api_error(400, std::string("'") + name + "' is " + std::to_string(x) + "; it must be in [" +
                             std::to_string(low) + ", " + std::to_string(high) + "]",
                    name);
  return x;
}

inline bool boolean(const json& body, const char* name, bool fallback) {
  const json& v = member(body, name);
  if (v.is_null()) return fallback;
  if (!v.is_boolean()) throw wrong_type(name, "a boolean", v);
  return v.get<bool>();
}

inline void refuse_unknown(const json& body, const std::set<std::string_view>& known) {
  for (const auto& [key, value] : body.items())
    if (!known.contains(key)) throw api_error(400, "Unrecognized request argument supplied: " + key, key);
}

// The fields both endpoints take, and the sampling settings they set.
inline void common_fields(const json& body, api_request& out) {
  const json& model = member(body, "model");
  if (!model.is_string()) throw model.is_null() ? api_error(400, "'model' is required", "model")
                                                : wrong_type("model", "a string", model);
  out.model = model.get<std::string>();
  infer::request& r = out.request;
  r.sampling.temperature = float(number_in(body, "temperature", 1.0, 0.0, 2.0));
  r.sampling.top_p = float(number_in(body, "top_p", 1.0, 0.0, 1.0));
  if (r.sampling.top_p == 0.0f)
    throw api_error(400, "'top_p' is 0; it must be in (0, 1] (use temperature 0 for greedy decoding)", "top_p");
  r.sampling.top_k = int(integer_in(body, "top_k", 0, -1, 1 << 20));
  if (r.sampling.top_k < 0) r.sampling.top_k = 0;  // vLLM's -1: off
  r.sampling.min_p = float(number_in(body, "min_p", 0.0, 0.0, 1.0));
  r.sampling.presence_penalty = float(number_in(body, "presence_penalty", 0.0, -2.0, 2.0));
  r.sampling.frequency_penalty = float(number_in(body, "frequency_penalty", 0.0, -2.0, 2.0));
  r.sampling.repetition_penalty = float(number_in(body, "repetition_penalty", 1.0, 1e-3, 100.0));
  const json& seed = member(body, "seed");
  if (!seed.is_null()) {
    if (!seed.is_number_integer()) throw wrong_type("seed", "an integer", seed);
    r.sampling.seed = seed.is_number_unsigned() ? seed.get<std::uint64_t>() : std::uint64_t(seed.get<std::int64_t>());
  }
  r.n = int(integer_in(body, "n", 1, 1, infer::max_samples_per_request));
  out.stream = boolean(body, "stream", false);
  const json& options = member(body, "stream_options");
  if (!options.is_null()) {
    if (!options.is_object()) throw wrong_type("stream_options", "an object", options);
    if (!out.stream) throw api_error(400, "'stream_options' is only allowed when 'stream' is true", "stream_options");
    refuse_unknown(options, {"include_usage"});
    out.include_usage = boolean(options, "include_usage", false);
  }
  const json& stop = member(body, "stop");
  if (stop.is_string()) {
    r.stop_strings.push_back(stop.get<std::string>());
  } else if (stop.is_array()) {
    if (stop.size() > 4) throw api_error(400, "'stop' holds at most 4 strings", "stop");
    for (const json& s : stop) {
      if (!s.is_string()) throw api_error(400, "'stop' must be a string or an array of strings", "stop");
      r.stop_strings.push_back(s.get<std::string>());
    }
  } else if (!stop.is_null()) {
    throw wrong_type("stop", "a string or an array of strings", stop);
  }
  for (const std::string& s : r.stop_strings)
    if (s.empty()) throw api_error(400, "'stop' holds an empty string", "stop");
  const json& user = member(body, "user");
  if (!user.is_null() && !user.is_string()) throw wrong_type("user", "a string", user);
  const json& bias = member(body, "logit_bias");
  if (!bias.is_null() && !(bias.is_object() && bias.empty()))
    throw api_error(400, "'logit_bias' is not supported by this server", "logit_bias");
}

inline void max_tokens_field(const json& body, const char* name, api_request& out) {
  const json& v = member(body, name);
  if (v.is_null()) return;
  out.request.max_tokens = int(integer_in(body, name, 16, 1, std::numeric_limits<int>::max()));
  out.max_tokens_given = true;
}

}  // namespace detail

/// Checks a /v1/completions body. Throws api_error (400) naming the field.
inline api_request parse_completion_request(const json& body) {
  if (!body.is_object()) throw api_error(400, "the request body must be a JSON object");
  detail::refuse_unknown(body, {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n",
                                "stream", "stream_options", "stop", "presence_penalty", "frequency_penalty",
                                "repetition_penalty", "seed", "user", "logprobs", "echo", "best_of", "logit_bias"});
  api_request out;
  out.kind = endpoint::completions;
  detail::common_fields(body, out);
  out.request.max_tokens = 16;  // OpenAI's default for completions
  detail::max_tokens_field(body, "max_tokens", out);
  const json& prompt = detail::member(body, "prompt");
  auto is_token_list = [](const json& p) {
    return p.is_array() && !p.empty() && std::all_of(p.begin(), p.end(), [](const json& t) { return t.is_number_integer(); });
  };
  if (prompt.is_string()) {
    out.prompt = prompt.get<std::string>();
  } else if (prompt.is_array() && prompt.size() == 1 && prompt[0].is_string()) {
    out.prompt = prompt[0].get<std::string>();
  } else if (is_token_list(prompt)) {
    for (const json& t : prompt) {
      if (!(t.get<std::int64_t>() >= 0 && t.get<std::int64_t>() <= std::numeric_limits<std::int32_t>::max()))
        throw api_error(400, "'prompt' holds a token id out of range: " + t.dump(), "prompt");
      out.prompt_tokens.push_back(std::int32_t(t.get<std::int64_t>()));
    }
  } else if (prompt.is_array() && prompt.size() > 1 && prompt[0].is_string()) {
    throw api_error(400, "'prompt' as a list of several prompts is not supported: send one request per prompt",
                    "prompt");
  } else {
    throw prompt.is_null() ? api_error(400, "'prompt' is required", "prompt")
                           : detail::wrong_type("prompt", "a string or an array of token ids", prompt);
  }
  const json& logprobs = detail::member(body, "logprobs");
  if (!logprobs.is_null()) {
    out.completion_logprobs = int(detail::integer_in(body, "logprobs", 0, 0, 5));
    out.request.logprobs = true;
    out.request.top_logprobs = out.completion_logprobs;
  }
  out.echo = detail::boolean(body, "echo", false);
  const auto best_of = detail::integer_in(body, "best_of", out.request.n, 1, infer::max_samples_per_request);
  if (best_of != out.request.n) throw api_error(400, "'best_of' other than 'n' is not supported", "best_of");
  return out;
}

/// Checks a /v1/chat/completions body; messages go through ChatTemplate.
template <class ChatTemplate = plain_chat_template>
api_request parse_chat_request(const json& body) {
  if (!body.is_object()) throw api_error(400, "the request body must be a JSON object");
  detail::refuse_unknown(body, {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                                "top_k", "min_p", "n", "stream", "stream_options", "stop", "presence_penalty",
                                "frequency_penalty", "repetition_penalty", "seed", "user", "logprobs",
                                "top_logprobs", "logit_bias"});
  api_request out;
  out.kind = endpoint::chat_completions;
  detail::common_fields(body, out);
  detail::max_tokens_field(body, "max_tokens", out);
  detail::max_tokens_field(body, "max_completion_tokens", out);
  const json& messages = detail::member(body, "messages");
  if (messages.is_null()) throw api_error(400, "'messages' is required", "messages");
  if (!messages.is_array() || messages.empty())
    throw api_error(400, "'messages' must be a non-empty array of messages", "messages");
  std::vector<std::pair<std::string, std::string>> turns;
  for (std::size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) throw api_error(400, "'" + where + "' must be an object", where);
    for (const auto& [key, value] : m.items())
      if (key != "role" && key != "content" && key != "name")
        throw api_error(400, "Unrecognized argument in " + where + ": " + key, where + "." + key);
    const json& role = detail::member(m, "role");
    static const std::set<std::string> roles = {"system", "developer", "user", "assistant"};
    if (!role.is_string() || !roles.contains(role.get<std::string>()))
      throw api_error(400, "'" + where + ".role' must be one of system, developer, user, assistant", where + ".role");
    const json& content = detail::member(m, "content");
    std::string text;
    if (content.is_string()) {
      text = content.get<std::string>();
    } else if (content.is_array()) {
      for (const json& part : content) {
        if (!part.is_object() || detail::member(part, "type") != "text" || !detail::member(part, "text").is_string())
          throw api_error(400, "'" + where + ".content' parts must be {\"type\": \"text\", \"text\": ...}",
                          where + ".content");
        text += part["text"].get<std::string>();
      }
    } else {
      throw api_error(400, "'" + where + ".content' must be a string or an array of text parts", where + ".content");
    }
    turns.emplace_back(role.get<std::string>(), std::move(text));
  }
  out.prompt = ChatTemplate::apply(turns);
  out.request.logprobs = detail::boolean(body, "logprobs", false);
  const json& top = detail::member(body, "top_logprobs");
  if (!top.is_null()) {
    if (!out.request.logprobs) throw api_error(400, "'top_logprobs' needs 'logprobs' set to true", "top_logprobs");
    out.request.top_logprobs = int(detail::integer_in(body, "top_logprobs", 0, 0, infer::max_top_logprobs));
  }
  return out;
}

/// Tokens of the prompt checked against the context: the prompt and
/// max_tokens must fit (an absent max_tokens takes what is left, capped by
/// `default_max_tokens` for chat).
inline void fit_context(api_request& r, std::int64_t context, std::int64_t default_max_tokens) {
  const auto prompt = std::int64_t(r.request.prompt.size());
  if (prompt == 0) throw api_error(400, "the prompt is empty", r.kind == endpoint::chat_completions ? "messages" : "prompt");
  if (!r.max_tokens_given && r.kind == endpoint::chat_completions)
    r.request.max_tokens = int(std::max<std::int64_t>(1, std::min(default_max_tokens, context - prompt)));
  if (prompt + r.request.max_tokens > context)
    throw api_error(400,
                    "This model's maximum context length is " + std::to_string(context) + " tokens. However, you requested " +
                        std::to_string(prompt + r.request.max_tokens) + " tokens (" + std::to_string(prompt) +
                        " in the prompt, " + std::to_string(r.request.max_tokens) +
                        " for the completion). Please reduce the prompt or max_tokens.",
                    r.kind == endpoint::chat_completions ? "messages" : "prompt", "invalid_request_error",
                    "context_length_exceeded");
}

/// The finish_reason OpenAI clients expect.
inline json finish_reason_json(infer::finish_reason reason) {
  switch (reason) {
    case infer::finish_reason::stop: return "stop";
    case infer::finish_reason::length: return "length";
    case infer::finish_reason::cancelled: return "cancelled";
    case infer::finish_reason::error: return "error";
  }
  return nullptr;
}

inline json usage_json(std::int64_t prompt, std::int64_t completion) {
  return json{{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
}

/// What a response object names: its id, creation time and model.
struct response_header {
  std::string id;
  std::int64_t created = 0;
  std::string model;
};

/// Log-probabilities of one sample's tokens, in the completions form
/// (tokens, token_logprobs, top_logprobs) or the chat form (content).
template <class TokenText>
json logprobs_json(endpoint kind, const std::vector<infer::stream_event>& tokens, TokenText&& text, std::size_t offset) {
  if (kind == endpoint::completions) {
    json out{{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()},
             {"text_offset", json::array()}};
    for (const infer::stream_event& e : tokens) {
      out["tokens"].push_back(text(e.token));
      out["token_logprobs"].push_back(e.logprob);
      json top = json::object();
      for (const infer::token_logprob& t : e.top) top[text(t.token)] = t.logprob;
      out["top_logprobs"].push_back(top);
      out["text_offset"].push_back(offset);
      offset += text(e.token).size();
    }
    return out;
  }
  json content = json::array();
  auto entry = [&](std::int32_t token, float logprob) {
    const std::string s = text(token);
    json bytes = json::array();
    for (unsigned char c : s) bytes.push_back(int(c));
    return json{{"token", s}, {"logprob", logprob}, {"bytes", bytes}};
  };
  for (const infer::stream_event& e : tokens) {
    json item = entry(e.token, e.logprob);
    item["top_logprobs"] = json::array();
    for (const infer::token_logprob& t : e.top) item["top_logprobs"].push_back(entry(t.token, t.logprob));
    content.push_back(item);
  }
  return json{{"content", content}};
}

/// One stream chunk: sample `index`'s new text (or, with `reason`, its end).
inline json stream_chunk(endpoint kind, const response_header& h, int index, const std::string& text,
                         const json& finish_reason, const json& logprobs, bool first_of_sample) {
  json choice{{"index", index}, {"logprobs", logprobs}, {"finish_reason", finish_reason}};
  if (kind == endpoint::completions) {
    choice["text"] = text;
  } else {
    json delta = json::object();
    if (first_of_sample) delta["role"] = "assistant";
    if (!text.empty() || first_of_sample) delta["content"] = text;
    choice["delta"] = delta;
  }
  return json{{"id", h.id},
              {"object", kind == endpoint::completions ? "text_completion" : "chat.completion.chunk"},
              {"created", h.created},
              {"model", h.model},
              {"choices", json::array({choice})}};
}

/// The last stream chunk when usage was asked for: no choices, the counts.
inline json usage_chunk(endpoint kind, const response_header& h, std::int64_t prompt, std::int64_t completion) {
  return json{{"id", h.id},
              {"object", kind == endpoint::completions ? "text_completion" : "chat.completion.chunk"},
              {"created", h.created},
              {"model", h.model},
              {"choices", json::array()},
              {"usage", usage_json(prompt, completion)}};
}

/// The whole response of a request that did not stream.
/// `texts[i]` is sample i's text (with the prompt first when echoing);
/// `logprobs[i]` its logprobs object or null.
inline json response_json(endpoint kind, const response_header& h, const infer::request_result& result,
                          const std::vector<std::string>& texts, const std::vector<json>& logprobs) {
  json choices = json::array();
  for (std::size_t i = 0; i < result.completions.size(); ++i) {
    const infer::completion& c = result.completions[i];
    json choice{{"index", c.index}, {"logprobs", logprobs[i]}, {"finish_reason", finish_reason_json(c.reason)}};
    if (kind == endpoint::completions) choice["text"] = texts[i];
    else choice["message"] = json{{"role", "assistant"}, {"content", texts[i]}};
    choices.push_back(choice);
  }
  return json{{"id", h.id},
              {"object", kind == endpoint::completions ? "text_completion" : "chat.completion"},
              {"created", h.created},
              {"model", h.model},
              {"choices", choices},
              {"usage", usage_json(result.prompt_tokens, result.output_tokens)}};
}

/// JSON text that is valid UTF-8 whatever the tokens' bytes were (a token
/// that is part of a character, cut at the end, becomes U+FFFD).
inline std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

}  // namespace ctformer::serve
