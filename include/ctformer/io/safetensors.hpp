// Reading and writing Hugging Face safetensors files: an 8-byte little-endian
// header length, a JSON header, then raw little-endian tensor data. Writes are
// atomic (temporary file, fsync, rename); reads validate every field.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/core/error.hpp"
#include "ctformer/core/number_types.hpp"
#include "ctformer/core/tensor_view.hpp"

namespace ctformer::io {

static_assert(std::endian::native == std::endian::little,
              "ctformer: safetensors data is little-endian; this reader and writer copy bytes as they are in memory");

/// The element types ctformer reads and writes (a subset of safetensors').
enum class dtype : std::uint8_t { f32, bf16, f16, i32, u8, i64 };

/// The header spelling: "F32", "BF16", "F16", "I32", "U8", "I64".
constexpr std::string_view dtype_name(dtype t) {
  constexpr std::string_view names[] = {"F32", "BF16", "F16", "I32", "U8", "I64"};
  return names[std::size_t(t)];
}

/// Bytes per element.
constexpr std::size_t dtype_size(dtype t) {
  constexpr std::size_t sizes[] = {4, 2, 2, 4, 1, 8};
  return sizes[std::size_t(t)];
}

/// The dtype a header spells, or nothing when ctformer does not know it.
inline std::optional<dtype> parse_dtype(std::string_view s) {
  for (dtype t : {dtype::f32, dtype::bf16, dtype::f16, dtype::i32, dtype::u8, dtype::i64})
    if (dtype_name(t) == s) return t;
  return std::nullopt;
}

/// The dtype of a C++ element type.
template <class T>
inline constexpr dtype dtype_of = [] {
  static_assert(dependent_false<T>, "ctformer: this element type has no safetensors dtype");
  return dtype::u8;
}();
template <>
inline constexpr dtype dtype_of<float> = dtype::f32;
template <>
inline constexpr dtype dtype_of<bf16> = dtype::bf16;
template <>
inline constexpr dtype dtype_of<fp16> = dtype::f16;
template <>
inline constexpr dtype dtype_of<std::int32_t> = dtype::i32;
template <>
inline constexpr dtype dtype_of<std::uint8_t> = dtype::u8;
template <>
inline constexpr dtype dtype_of<std::int64_t> = dtype::i64;

/// "(2, 3)"
inline std::string shape_text(std::span<const index_t> shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

/// One tensor to write: its name, type, shape and bytes (not owned; must stay
/// alive until write_safetensors returns).
struct tensor_source {
  std::string name;
  dtype type = dtype::f32;
  std::vector<index_t> shape;
  std::span<const std::byte> bytes;
};

/// A tensor_source over contiguous host elements.
template <class T>
tensor_source make_source(std::string name, std::span<const T> data, std::vector<index_t> shape) {
  return {std::move(name), dtype_of<std::remove_cv_t<T>>, std::move(shape), std::as_bytes(data)};
}

/// Where one tensor is in a file that has been read.
struct tensor_info {
  dtype type = dtype::f32;
  std::vector<index_t> shape;
  std::uint64_t begin = 0, end = 0;  ///< data_offsets, relative to the start of the data section

  index_t element_count() const {
    index_t n = 1;
    for (index_t e : shape) n *= e;
    return n;
  }
};

namespace detail {

[[noreturn]] inline void fail(const std::filesystem::path& file, const std::string& what) {
  throw io_error("ctformer::io: '" + file.string() + "': " + what);
}
[[noreturn]] inline void fail_tensor(const std::filesystem::path& file, const std::string& tensor,
                                     const std::string& what) {
  throw io_error("ctformer::io: '" + file.string() + "': tensor '" + tensor + "': " + what);
}

inline std::string errno_text() { return std::strerror(errno); }

// The whole body is written, or an io_error says why (partial writes and EINTR retried).
inline void write_all(int fd, const void* data, std::size_t n, const std::filesystem::path& file) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail(file, "write failed: " + errno_text());
    }
    p += w;
    n -= std::size_t(w);
  }
}

/// Writes a file so that a crash at any moment leaves either the previous
/// file or the complete new one: the bytes go to "<path>.tmp", which is
/// fsync'ed, renamed over path (atomic on POSIX), and the folder fsync'ed so
/// the rename itself survives a power cut. On any failure the temporary file
/// is removed and the target is untouched.
/// write_body(fd) writes the contents (with write_all).
template <class Body>
void atomic_write(const std::filesystem::path& path, Body&& write_body) {
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(tmp, "cannot create the temporary file: " + errno_text());
  try {
    write_body(fd);
    if (::fsync(fd) != 0) fail(tmp, "fsync failed: " + errno_text());
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    const std::string why = errno_text();
    ::unlink(tmp.c_str());
    fail(tmp, "close failed: " + why);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = errno_text();
    ::unlink(tmp.c_str());
    fail(path, "cannot rename '" + tmp.string() + "' over it: " + why);
  }
  const std::filesystem::path folder = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const int dir = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {  // best effort: some file systems refuse fsync on a folder
    ::fsync(dir);
    ::close(dir);
  }
}

// n * size without overflow, or nothing.
inline std::optional<std::uint64_t> byte_count(std::span<const index_t> shape, std::size_t element_size) {
  std::uint64_t n = element_size;
  for (index_t e : shape) {
    if (e < 0) return std::nullopt;
    if (e != 0 && n > std::numeric_limits<std::uint64_t>::max() / std::uint64_t(e)) return std::nullopt;
    n *= std::uint64_t(e);
  }
  return n;
}

}  // namespace detail

/// Writes tensors (in the given order) and string metadata to a safetensors
/// file, atomically (see detail::atomic_write). Names must be unique and not
/// "__metadata__"; each tensor's byte count must be dtype size x shape product.
/// Throws io_error naming the file (and the tensor, for a bad tensor).
inline void write_safetensors(const std::filesystem::path& path, std::span<const tensor_source> tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const tensor_source& t : tensors) {
    if (t.name == "__metadata__") detail::fail_tensor(path, t.name, "this name is reserved for the metadata");
    if (header.contains(t.name)) detail::fail_tensor(path, t.name, "the name appears twice");
    const auto expected = detail::byte_count(t.shape, dtype_size(t.type));
    if (!expected || *expected != t.bytes.size())
      detail::fail_tensor(path, t.name,
                          "shape " + shape_text(t.shape) + " of " + std::string(dtype_name(t.type)) + " needs " +
                              (expected ? std::to_string(*expected) : std::string("an impossible number of")) +
                              " bytes but " + std::to_string(t.bytes.size()) + " were given");
    header[t.name] = {{"dtype", dtype_name(t.type)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // a name or value that is not UTF-8
    detail::fail(path, std::string("cannot encode the header: ") + e.what());
  }
  // Pad with spaces so the data starts 8-byte aligned, as the format recommends.
  text.append((8 - text.size() % 8) % 8, ' ');
  const std::uint64_t header_size = text.size();
  detail::atomic_write(path, [&](int fd) {
    detail::write_all(fd, &header_size, 8, path);
    detail::write_all(fd, text.data(), text.size(), path);
    for (const tensor_source& t : tensors)
      if (!t.bytes.empty()) detail::write_all(fd, t.bytes.data(), t.bytes.size(), path);
  });
}

/// A safetensors file read into memory and validated: header length within
/// the file, valid JSON, "__metadata__" a map of strings, every tensor with a
/// known dtype, a shape of non-negative integers and data_offsets that match
/// dtype size x shape product, lie inside the data section, do not overlap
/// and cover it without gaps. Every failure is an io_error naming the file
/// (and the tensor when one is at fault).
class safetensors_file {
 public:
  /// Reads and validates the whole file.
  static safetensors_file read(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) detail::fail(path, "cannot open the file for reading");
    const std::streamoff size = in.tellg();
    if (size < 0) detail::fail(path, "cannot determine the file size");
    std::vector<std::byte> bytes(static_cast<std::size_t>(size));
    in.seekg(0);
    if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size))
      detail::fail(path, "reading the file failed");
    return parse(std::move(bytes), path);
  }

  /// Validates bytes already in memory; path only names them in messages.
  static safetensors_file parse(std::vector<std::byte> bytes, const std::filesystem::path& path) {
    safetensors_file f;
    f.path_ = path;
    f.bytes_ = std::move(bytes);
    f.validate();
    return f;
  }

  const std::filesystem::path& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Every tensor by name.
  const std::map<std::string, tensor_info>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  /// The tensor's header entry; io_error naming the file and tensor when absent.
  const tensor_info& info(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) detail::fail_tensor(path_, name, "not in the file");
    return it->second;
  }

  /// The tensor's raw bytes.
  std::span<const std::byte> bytes(const std::string& name) const {
    const tensor_info& t = info(name);
    return std::span<const std::byte>(bytes_.data() + data_start_ + t.begin, std::size_t(t.end - t.begin));
  }

  /// The metadata value for key, or nothing.
  std::optional<std::string> metadata_value(const std::string& key) const {
    auto it = metadata_.find(key);
    if (it == metadata_.end()) return std::nullopt;
    return it->second;
  }

  /// Throws io_error naming the file and tensor unless the tensor exists with
  /// dtype type and exactly this shape.
  void require(const std::string& name, dtype type, std::span<const index_t> shape) const {
    const tensor_info& t = info(name);
    if (t.type != type)
      detail::fail_tensor(path_, name,
                          "dtype is " + std::string(dtype_name(t.type)) + ", expected " + std::string(dtype_name(type)));
    if (!std::equal(t.shape.begin(), t.shape.end(), shape.begin(), shape.end()))
      detail::fail_tensor(path_, name, "shape is " + shape_text(t.shape) + ", expected " + shape_text(shape));
  }

  /// Copies the tensor into dst; its dtype must be T's and its element count dst.size().
  template <class T>
  void copy_to(const std::string& name, std::span<T> dst) const {
    const tensor_info& t = info(name);
    if (t.type != dtype_of<T>)
      detail::fail_tensor(path_, name,
                          "dtype is " + std::string(dtype_name(t.type)) + ", expected " +
                              std::string(dtype_name(dtype_of<T>)));
    if (t.element_count() != index_t(dst.size()))
      detail::fail_tensor(path_, name,
                          "holds " + std::to_string(t.element_count()) + " elements, expected " +
                              std::to_string(dst.size()));
    const auto src = bytes(name);
    if (!src.empty()) std::memcpy(dst.data(), src.data(), src.size());
  }

  /// The tensor's elements as a vector of T (dtype must be T's).
  template <class T>
  std::vector<T> to_vector(const std::string& name) const {
    std::vector<T> v(std::size_t(info(name).element_count()));
    copy_to(name, std::span<T>(v));
    return v;
  }

 private:
  void validate() {
    if (bytes_.size() < 8)
      detail::fail(path_, "the file is " + std::to_string(bytes_.size()) +
                              " bytes long, shorter than the 8-byte header length");
    std::uint64_t header_size = 0;
    std::memcpy(&header_size, bytes_.data(), 8);
    if (header_size > bytes_.size() - 8)
      detail::fail(path_, "the header length " + std::to_string(header_size) + " runs past the end of the file (" +
                              std::to_string(bytes_.size()) + " bytes): the file is truncated or not safetensors");
    data_start_ = 8 + std::size_t(header_size);
    const std::uint64_t data_size = bytes_.size() - data_start_;
    const std::string_view text(reinterpret_cast<const char*>(bytes_.data() + 8), std::size_t(header_size));

    nlohmann::json header;
    try {
      header = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      detail::fail(path_, std::string("the header is not valid JSON: ") + e.what());
    }
    if (!header.is_object()) detail::fail(path_, "the header is not a JSON object");

    std::vector<std::pair<std::string, const tensor_info*>> by_offset;
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const nlohmann::json& entry = it.value();
      if (name == "__metadata__") {
        if (!entry.is_object()) detail::fail(path_, "\"__metadata__\" is not a JSON object");
        for (auto m = entry.begin(); m != entry.end(); ++m) {
          if (!m.value().is_string())
            detail::fail(path_, "metadata value '" + m.key() + "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      tensors_[name] = parse_entry(name, entry, data_size);
    }
    for (const auto& [name, t] : tensors_) by_offset.emplace_back(name, &t);
    std::sort(by_offset.begin(), by_offset.end(), [](const auto& a, const auto& b) {
      return a.second->begin != b.second->begin ? a.second->begin < b.second->begin : a.second->end < b.second->end;
    });
    std::uint64_t covered = 0;
    std::string previous;
    for (const auto& [name, t] : by_offset) {
      if (t->begin < covered)
        detail::fail_tensor(path_, name,
                            "data_offsets [" + std::to_string(t->begin) + ", " + std::to_string(t->end) +
                                ") overlap tensor '" + previous + "', which ends at " + std::to_string(covered));
      if (t->begin > covered)
        detail::fail_tensor(path_, name,
                            "data_offsets start at " + std::to_string(t->begin) + ", leaving a gap after byte " +
                                std::to_string(covered) + " of the data section");
      covered = t->end;
      previous = name;
    }
    if (covered != data_size)
      detail::fail(path_, "the data section is " + std::to_string(data_size) + " bytes but the tensors cover " +
                              std::to_string(covered) + ": the file has trailing bytes");
  }

  tensor_info parse_entry(const std::string& name, const nlohmann::json& entry, std::uint64_t data_size) const {
    if (!entry.is_object()) detail::fail_tensor(path_, name, "the header entry is not a JSON object");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!entry.contains(field)) detail::fail_tensor(path_, name, std::string("the field \"") + field + "\" is missing");
    tensor_info t;
    if (!entry["dtype"].is_string()) detail::fail_tensor(path_, name, "\"dtype\" is not a string");
    const auto type = parse_dtype(entry["dtype"].get<std::string>());
    if (!type)
      detail::fail_tensor(path_, name, "unknown dtype \"" + entry["dtype"].get<std::string>() +
                                           "\" (ctformer reads F32, BF16, F16, I32, U8, I64)");
    t.type = *type;
    const nlohmann::json& shape = entry["shape"];
    if (!shape.is_array()) detail::fail_tensor(path_, name, "\"shape\" is not an array");
    for (const auto& e : shape) {
      if (!e.is_number_unsigned() && !(e.is_number_integer() && e.get<std::int64_t>() >= 0))
        detail::fail_tensor(path_, name, "\"shape\" holds " + e.dump() + ", not a non-negative integer");
      const std::uint64_t extent = e.get<std::uint64_t>();
      if (extent > std::uint64_t(std::numeric_limits<index_t>::max()))
        detail::fail_tensor(path_, name, "extent " + std::to_string(extent) + " is too large");
      t.shape.push_back(index_t(extent));
    }
    const nlohmann::json& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned())
      detail::fail_tensor(path_, name, "\"data_offsets\" is " + offsets.dump() + ", not two non-negative integers");
    t.begin = offsets[0].get<std::uint64_t>();
    t.end = offsets[1].get<std::uint64_t>();
    if (t.begin > t.end)
      detail::fail_tensor(path_, name, "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                                           ") end before they begin");
    if (t.end > data_size)
      detail::fail_tensor(path_, name,
                          "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                              ") run past the end of the data section (" + std::to_string(data_size) +
                              " bytes): the file is truncated");
    const auto expected = detail::byte_count(t.shape, dtype_size(t.type));
    if (!expected || *expected != t.end - t.begin)
      detail::fail_tensor(path_, name,
                          "shape " + shape_text(t.shape) + " of " + std::string(dtype_name(t.type)) + " needs " +
                              (expected ? std::to_string(*expected) : std::string("an impossible number of")) +
                              " bytes but data_offsets span " + std::to_string(t.end - t.begin));
    return t;
  }

  std::filesystem::path path_;
  std::vector<std::byte> bytes_;
  std::size_t data_start_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, tensor_info> tensors_;
};

}  // namespace ctformer::io
