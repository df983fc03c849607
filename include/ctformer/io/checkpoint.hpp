// Training checkpoints as safetensors files: named parameter tensors cut from
// the flat parameter buffer, optimizer state, step, RNG state, the model
// configuration and the tokenizer's vocabulary. Loading is all-or-nothing.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/core/parameter_range.hpp"
#include "ctformer/io/safetensors.hpp"
#include "ctformer/nn/parameters.hpp"

namespace ctformer::io {

/// The value of the "format" metadata key; a file without it is not a ctformer checkpoint.
inline constexpr std::string_view checkpoint_format = "ctformer.checkpoint.v1";

/// Everything a training checkpoint holds. The views point at the live
/// buffers (host memory, contiguous): save reads them, load overwrites them.
/// step, optimizer_step and rng are values: save writes them, load sets them.
/// config_json and vocabulary are what load expects to find.
struct checkpoint_state {
  std::span<const nn::parameter_info> parameter_table;  ///< every parameter tensor, by name
  tensor_view<float, 1> parameters;                     // (P) the flat fp32 master weights
  std::vector<named_tensor> optimizer_state;            ///< saved as "optimizer.<name>", each (n)
  std::int64_t step = 0;                                ///< training steps done
  std::int64_t optimizer_step = 0;                      ///< the optimizer's own counter (bias correction)
  std::mt19937_64 rng;                                  ///< the data sampler's generator
  std::string config_json;  ///< the model configuration; compared as JSON (spacing and key order do not matter)
  std::string vocabulary;   ///< the tokenizer serialised (io::*_tokenizer::serialize); compared byte for byte
};

/// The metadata of a checkpoint, readable before any model exists (to build
/// the model and tokenizer a checkpoint needs).
struct checkpoint_metadata {
  std::int64_t step = 0;
  std::int64_t optimizer_step = 0;
  std::string config_json;
  std::string vocabulary;
};

namespace detail {

inline void check_table(const char* operation, const checkpoint_state& s) {
  const index_t p = s.parameters.extent(0);
  std::set<std::string> names;
  for (const nn::parameter_info& e : s.parameter_table) {
    if (e.offset < 0 || e.size() < 0 || e.offset + e.size() > p)
      throw invalid_input(std::string("ctformer::io::") + operation + ": parameter '" + e.name + "' [" +
                          std::to_string(e.offset) + ", " + std::to_string(e.offset + e.size()) +
                          ") lies outside the parameter buffer of " + std::to_string(p) + " elements");
    if (!names.insert(e.name).second)
      throw invalid_input(std::string("ctformer::io::") + operation + ": parameter name '" + e.name +
                          "' appears twice in the table");
  }
  for (const named_tensor& t : s.optimizer_state)
    if (!names.insert("optimizer." + t.name).second)
      throw invalid_input(std::string("ctformer::io::") + operation + ": optimizer state '" + t.name +
                          "' appears twice");
  require_contiguous(operation, "parameters", s.parameters);
  for (const named_tensor& t : s.optimizer_state) require_contiguous(operation, t.name.c_str(), t.data);
}

inline std::int64_t parse_int(const safetensors_file& f, const std::string& key) {
  const auto v = f.metadata_value(key);
  if (!v) fail(f.path(), "metadata \"" + key + "\" is missing");
  try {
    std::size_t used = 0;
    const long long x = std::stoll(*v, &used);
    if (used != v->size()) throw std::invalid_argument(*v);
    return x;
  } catch (const std::exception&) {
    fail(f.path(), "metadata \"" + key + "\" is \"" + *v + "\", not an integer");
  }
}

inline std::string required_metadata(const safetensors_file& f, const std::string& key) {
  const auto v = f.metadata_value(key);
  if (!v) fail(f.path(), "metadata \"" + key + "\" is missing");
  return *v;
}

inline void check_format(const safetensors_file& f) {
  const auto format = f.metadata_value("format");
  if (!format || *format != checkpoint_format)
    fail(f.path(), "not a ctformer checkpoint (metadata \"format\" is " +
                       (format ? "\"" + *format + "\"" : std::string("missing")) + ", expected \"" +
                       std::string(checkpoint_format) + "\")");
}

// Equal as JSON values when both parse, else as text.
inline bool same_config(const std::string& a, const std::string& b) {
  try {
    return nlohmann::json::parse(a) == nlohmann::json::parse(b);
  } catch (const nlohmann::json::exception&) {
    return a == b;
  }
}

}  // namespace detail

/// Writes a checkpoint atomically (temporary file, fsync, rename): the
/// previous file at path survives any failure or crash.
/// Throws invalid_input for an inconsistent table, io_error for I/O failures.
inline void save_checkpoint(const std::filesystem::path& path, const checkpoint_state& s) {
  detail::check_table("save_checkpoint", s);
  std::vector<tensor_source> sources;
  sources.reserve(s.parameter_table.size() + s.optimizer_state.size());
  for (const nn::parameter_info& e : s.parameter_table)
    sources.push_back(make_source<float>(
        e.name, std::span<const float>(s.parameters.data() + e.offset, std::size_t(e.size())), e.shape));
  for (const named_tensor& t : s.optimizer_state)
    sources.push_back(make_source<float>("optimizer." + t.name,
                                         std::span<const float>(t.data.data(), std::size_t(t.data.extent(0))),
                                         {t.data.extent(0)}));
  std::ostringstream rng;
  rng << s.rng;
  const std::map<std::string, std::string> metadata{{"format", std::string(checkpoint_format)},
                                                    {"step", std::to_string(s.step)},
                                                    {"optimizer_step", std::to_string(s.optimizer_step)},
                                                    {"rng", rng.str()},
                                                    {"config", s.config_json},
                                                    {"vocabulary", s.vocabulary}};
  write_safetensors(path, sources, metadata);
}

/// Reads a checkpoint's metadata (validating the whole file).
inline checkpoint_metadata read_checkpoint_metadata(const std::filesystem::path& path) {
  const safetensors_file f = safetensors_file::read(path);
  detail::check_format(f);
  return {detail::parse_int(f, "step"), detail::parse_int(f, "optimizer_step"),
          detail::required_metadata(f, "config"), detail::required_metadata(f, "vocabulary")};
}

/// Restores a checkpoint into s, all or nothing. First everything is read and
/// checked: the file's format, the configuration (equal to s.config_json), the
/// vocabulary (equal to s.vocabulary), the RNG state, and every expected
/// tensor present as F32 with the expected shape, with no unexpected tensor.
/// Only then are the parameters and optimizer state copied into the live
/// buffers and step, optimizer_step and rng set. Any mismatch throws io_error
/// naming the file (and the tensor) and leaves s untouched.
inline void load_checkpoint(const std::filesystem::path& path, checkpoint_state& s) {
  detail::check_table("load_checkpoint", s);
  const safetensors_file f = safetensors_file::read(path);
  detail::check_format(f);
  const std::int64_t step = detail::parse_int(f, "step");
  const std::int64_t optimizer_step = detail::parse_int(f, "optimizer_step");
  const std::string config = detail::required_metadata(f, "config");
  if (!detail::same_config(config, s.config_json))
    detail::fail(path, "the model configuration differs: the file has " + config + ", the model is " + s.config_json);
  const std::string vocabulary = detail::required_metadata(f, "vocabulary");
  if (vocabulary != s.vocabulary)
    detail::fail(path, "the tokenizer vocabulary differs: the file has " + vocabulary + ", the run uses " +
                           s.vocabulary);
  std::mt19937_64 rng;
  {
    std::istringstream in(detail::required_metadata(f, "rng"));
    in >> rng;
    if (in.fail()) detail::fail(path, "metadata \"rng\" is not a std::mt19937_64 state");
  }

  std::set<std::string> expected;
  for (const nn::parameter_info& e : s.parameter_table) {
    f.require(e.name, dtype::f32, e.shape);
    expected.insert(e.name);
  }
  for (const named_tensor& t : s.optimizer_state) {
    const std::string name = "optimizer." + t.name;
    const index_t shape[] = {t.data.extent(0)};
    f.require(name, dtype::f32, shape);
    expected.insert(name);
  }
  for (const auto& [name, info] : f.tensors())
    if (!expected.count(name))
      detail::fail_tensor(path, name, "is in the file but not in the model or optimizer (a different model?)");

  // Everything checked: from here on nothing can fail.
  for (const nn::parameter_info& e : s.parameter_table) {
    const auto bytes = f.bytes(e.name);
    if (!bytes.empty()) std::memcpy(s.parameters.data() + e.offset, bytes.data(), bytes.size());
  }
  for (const named_tensor& t : s.optimizer_state) {
    const auto bytes = f.bytes("optimizer." + t.name);
    if (!bytes.empty()) std::memcpy(t.data.data(), bytes.data(), bytes.size());
  }
  s.step = step;
  s.optimizer_step = optimizer_step;
  s.rng = rng;
}

}  // namespace ctformer::io
