// GGUF, llama.cpp's model file: typed metadata key-value pairs and tensors
// of ggml types (F32, F16, BF16, Q8_0, Q4_0 here), read from a memory-mapped
// file with every field checked, and written atomically.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "ctformer/core/error.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/io/safetensors.hpp"

namespace ctformer::io {

/// The ggml tensor types ctformer reads and writes, with ggml's numbers.
enum class gguf_type : std::uint32_t { f32 = 0, f16 = 1, q4_0 = 2, q8_0 = 8, bf16 = 30 };

/// ggml's name of a type: "F32", "F16", "Q4_0", "Q8_0", "BF16".
constexpr std::string_view gguf_type_name(gguf_type t) {
  switch (t) {
    case gguf_type::f32: return "F32";
    case gguf_type::f16: return "F16";
    case gguf_type::q4_0: return "Q4_0";
    case gguf_type::q8_0: return "Q8_0";
    case gguf_type::bf16: return "BF16";
  }
  return "?";
}
/// Elements per block (1 for the float types, 32 for the block formats).
constexpr std::uint64_t gguf_block_size(gguf_type t) { return t == gguf_type::q4_0 || t == gguf_type::q8_0 ? 32 : 1; }
/// Bytes per block.
constexpr std::uint64_t gguf_block_bytes(gguf_type t) {
  switch (t) {
    case gguf_type::f32: return 4;
    case gguf_type::f16: return 2;
    case gguf_type::bf16: return 2;
    case gguf_type::q4_0: return 18;
    case gguf_type::q8_0: return 34;
  }
  return 0;
}
/// The type ggml numbers `code`, or nothing for one ctformer does not know.
constexpr std::optional<gguf_type> gguf_type_from_code(std::uint32_t code) {
  switch (code) {
    case 0: return gguf_type::f32;
    case 1: return gguf_type::f16;
    case 2: return gguf_type::q4_0;
    case 8: return gguf_type::q8_0;
    case 30: return gguf_type::bf16;
    default: return std::nullopt;
  }
}

/// The types of metadata values, with GGUF's numbers.
enum class gguf_value_type : std::uint32_t {
  uint8 = 0, int8 = 1, uint16 = 2, int16 = 3, uint32 = 4, int32 = 5, float32 = 6, boolean = 7,
  string = 8, array = 9, uint64 = 10, int64 = 11, float64 = 12
};

/// One metadata value: a scalar, a string, or an array of one of those. The
/// number is held widened (unsigned, signed, double) with its GGUF type, so
/// a value read is written back with the same bytes.
struct gguf_value {
  using item = std::variant<std::uint64_t, std::int64_t, double, bool, std::string>;
  gguf_value_type type = gguf_value_type::uint32;
  gguf_value_type element_type = gguf_value_type::uint32;  ///< arrays only
  std::vector<item> items;                                 ///< one for a scalar; the elements of an array

  static gguf_value of(gguf_value_type t, item v) { return {t, t, {std::move(v)}}; }
  static gguf_value u32(std::uint32_t v) { return of(gguf_value_type::uint32, std::uint64_t(v)); }
  static gguf_value u64(std::uint64_t v) { return of(gguf_value_type::uint64, v); }
  static gguf_value i32(std::int32_t v) { return of(gguf_value_type::int32, std::int64_t(v)); }
  static gguf_value f32(float v) { return of(gguf_value_type::float32, double(v)); }
  static gguf_value boolean(bool v) { return of(gguf_value_type::boolean, v); }
  static gguf_value string(std::string v) { return of(gguf_value_type::string, std::move(v)); }
  /// An array of elements of type t, each convertible to `item`.
  template <class T>
  static gguf_value array(gguf_value_type t, const std::vector<T>& values) {
    gguf_value a{gguf_value_type::array, t, {}};
    a.items.reserve(values.size());
    for (const T& v : values) {
      if constexpr (std::is_same_v<T, std::string>) a.items.emplace_back(v);
      else if constexpr (std::is_floating_point_v<T>) a.items.emplace_back(double(v));
      else if constexpr (std::is_same_v<T, bool>) a.items.emplace_back(v);
      else if constexpr (std::is_signed_v<T>) a.items.emplace_back(std::int64_t(v));
      else a.items.emplace_back(std::uint64_t(v));
    }
    return a;
  }

  bool is_array() const { return type == gguf_value_type::array; }
  /// The scalar's type (an array's element type).
  gguf_value_type scalar_type() const { return is_array() ? element_type : type; }
};

/// Where one tensor lies in a file that has been read. GGUF lists a shape
/// innermost first (ggml's ne): a matrix of `rows` rows of `cols` elements
/// is {cols, rows}.
struct gguf_tensor_info {
  std::string name;
  gguf_type type = gguf_type::f32;
  std::vector<std::uint64_t> shape;  ///< ne: innermost (contiguous) dimension first
  std::uint64_t offset = 0;          ///< from the start of the data section
  std::uint64_t bytes = 0;

  std::uint64_t element_count() const {
    std::uint64_t n = 1;
    for (std::uint64_t e : shape) n *= e;
    return n;
  }
};

/// The default alignment of the tensor data (general.alignment overrides it).
inline constexpr std::uint64_t gguf_default_alignment = 32;

namespace detail {

// A cursor over a file's bytes that fails, naming the file and what it was
// reading, instead of running past the end.
class gguf_reader {
 public:
  gguf_reader(std::span<const std::byte> bytes, const std::filesystem::path& path) : bytes_(bytes), path_(path) {}
  std::uint64_t position() const { return at_; }
  std::uint64_t left() const { return bytes_.size() - at_; }

  template <class T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, bytes_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return v;
  }
  std::string read_string(const std::string& what) {
    const auto n = read<std::uint64_t>(what.c_str());
    need(n, what.c_str());
    std::string s(reinterpret_cast<const char*>(bytes_.data() + at_), std::size_t(n));
    at_ += n;
    return s;
  }
  void need(std::uint64_t n, const char* what) const {
    if (n > left())
      fail(path_, "truncated: " + std::string(what) + " needs " + std::to_string(n) + " bytes at offset " +
                      std::to_string(at_) + ", but the file has " + std::to_string(left()) + " left");
  }

 private:
  std::span<const std::byte> bytes_;
  const std::filesystem::path& path_;
  std::uint64_t at_ = 0;
};

inline std::uint64_t gguf_scalar_bytes(gguf_value_type t) {
  switch (t) {
    case gguf_value_type::uint8: case gguf_value_type::int8: case gguf_value_type::boolean: return 1;
    case gguf_value_type::uint16: case gguf_value_type::int16: return 2;
    case gguf_value_type::uint32: case gguf_value_type::int32: case gguf_value_type::float32: return 4;
    case gguf_value_type::uint64: case gguf_value_type::int64: case gguf_value_type::float64: return 8;
    case gguf_value_type::string: return 8;  // its length; the bytes follow
    case gguf_value_type::array: return 12;
  }
  return 0;
}

inline bool gguf_known_value_type(std::uint32_t code) { return code <= 12; }

inline gguf_value::item read_gguf_scalar(gguf_reader& in, gguf_value_type t, const std::string& key) {
  const std::string what = "the value of '" + key + "'";
  switch (t) {
    case gguf_value_type::uint8: return std::uint64_t(in.read<std::uint8_t>(what.c_str()));
    case gguf_value_type::int8: return std::int64_t(in.read<std::int8_t>(what.c_str()));
    case gguf_value_type::uint16: return std::uint64_t(in.read<std::uint16_t>(what.c_str()));
    case gguf_value_type::int16: return std::int64_t(in.read<std::int16_t>(what.c_str()));
    case gguf_value_type::uint32: return std::uint64_t(in.read<std::uint32_t>(what.c_str()));
    case gguf_value_type::int32: return std::int64_t(in.read<std::int32_t>(what.c_str()));
    case gguf_value_type::float32: return double(in.read<float>(what.c_str()));
    case gguf_value_type::boolean: return in.read<std::uint8_t>(what.c_str()) != 0;
    case gguf_value_type::string: return in.read_string(what);
    case gguf_value_type::uint64: return in.read<std::uint64_t>(what.c_str());
    case gguf_value_type::int64: return in.read<std::int64_t>(what.c_str());
    case gguf_value_type::float64: return in.read<double>(what.c_str());
    case gguf_value_type::array: break;
  }
  return std::uint64_t(0);
}

template <class T>
void append_pod(std::vector<std::byte>& out, const T& v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}
inline void append_string(std::vector<std::byte>& out, std::string_view s) {
  append_pod(out, std::uint64_t(s.size()));
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), p, p + s.size());
}

inline void append_gguf_scalar(std::vector<std::byte>& out, gguf_value_type t, const gguf_value::item& v,
                               const std::filesystem::path& path, const std::string& key) {
  auto number = [&]<class T>(T) -> T {
    if (const auto* u = std::get_if<std::uint64_t>(&v)) return T(*u);
    if (const auto* i = std::get_if<std::int64_t>(&v)) return T(*i);
    if (const auto* d = std::get_if<double>(&v)) return T(*d);
    if (const auto* b = std::get_if<bool>(&v)) return T(*b ? 1 : 0);
    fail(path, "metadata '" + key + "': a string where its type asks for a number");
  };
  switch (t) {
    case gguf_value_type::uint8: append_pod(out, number(std::uint8_t{})); break;
    case gguf_value_type::int8: append_pod(out, number(std::int8_t{})); break;
    case gguf_value_type::uint16: append_pod(out, number(std::uint16_t{})); break;
    case gguf_value_type::int16: append_pod(out, number(std::int16_t{})); break;
    case gguf_value_type::uint32: append_pod(out, number(std::uint32_t{})); break;
    case gguf_value_type::int32: append_pod(out, number(std::int32_t{})); break;
    case gguf_value_type::float32: append_pod(out, number(float{})); break;
    case gguf_value_type::boolean: append_pod(out, std::uint8_t(number(std::uint8_t{}) != 0)); break;
    case gguf_value_type::uint64: append_pod(out, number(std::uint64_t{})); break;
    case gguf_value_type::int64: append_pod(out, number(std::int64_t{})); break;
    case gguf_value_type::float64: append_pod(out, number(double{})); break;
    case gguf_value_type::string: {
      const auto* s = std::get_if<std::string>(&v);
      if (!s) fail(path, "metadata '" + key + "': a number where its type asks for a string");
      append_string(out, *s);
      break;
    }
    case gguf_value_type::array: fail(path, "metadata '" + key + "': arrays of arrays are not written");
  }
}

// A read-only memory map of a whole file, unmapped when destroyed.
class mapped_file {
 public:
  mapped_file() = default;
  explicit mapped_file(const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(path, "cannot open the file for reading: " + errno_text());
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const std::string why = errno_text();
      ::close(fd);
      fail(path, "cannot determine the file size: " + why);
    }
    size_ = std::size_t(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const std::string why = errno_text();
        ::close(fd);
        fail(path, "cannot map the file: " + why);
      }
      data_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);
  }
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  mapped_file(mapped_file&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  mapped_file& operator=(mapped_file&& o) noexcept {
    if (this != &o) {
      unmap();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~mapped_file() { unmap(); }
  std::span<const std::byte> bytes() const { return {data_, size_}; }

 private:
  void unmap() {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
  }
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace detail

/// A GGUF file (version 2 or 3), memory-mapped and checked when opened: the
/// magic, the version, every metadata key and value (no key twice, strings
/// and arrays within the file, no arrays of arrays), general.alignment a
/// power of two, and every tensor (no name twice, 1 to 4 dimensions of
/// positive extent, a known type whose block divides the innermost
/// dimension, an aligned offset, its bytes inside the file and overlapping
/// no other tensor). Every failure is an io_error naming the file and the
/// problem; nothing is read past the end.
class gguf_file {
 public:
  static gguf_file read(const std::filesystem::path& path) {
    gguf_file f;
    f.path_ = path;
    f.map_ = detail::mapped_file(path);
    f.parse(f.map_.bytes());
    return f;
  }
  /// Checks bytes already in memory (a copy is kept); path only names them in messages.
  static gguf_file parse(std::vector<std::byte> bytes, const std::filesystem::path& path) {
    gguf_file f;
    f.path_ = path;
    f.owned_ = std::move(bytes);
    f.parse(f.owned_);
    return f;
  }

  gguf_file(gguf_file&&) = default;
  gguf_file& operator=(gguf_file&&) = default;

  const std::filesystem::path& path() const { return path_; }
  std::uint32_t version() const { return version_; }
  std::uint64_t alignment() const { return alignment_; }
  const std::map<std::string, gguf_value>& metadata() const { return metadata_; }
  /// The tensors in file order.
  const std::vector<gguf_tensor_info>& tensors() const { return tensors_; }

  bool contains(const std::string& name) const { return by_name_.count(name) != 0; }
  const gguf_tensor_info& info(const std::string& name) const {
    const auto it = by_name_.find(name);
    if (it == by_name_.end()) detail::fail_tensor(path_, name, "not in the file");
    return tensors_[it->second];
  }
  std::span<const std::byte> bytes(const std::string& name) const {
    const gguf_tensor_info& t = info(name);
    return data().subspan(std::size_t(data_start_ + t.offset), std::size_t(t.bytes));
  }

  /// The metadata value of key, or nothing.
  const gguf_value* find(const std::string& key) const {
    const auto it = metadata_.find(key);
    return it == metadata_.end() ? nullptr : &it->second;
  }
  /// Typed reads: io_error naming the file and key when it is missing or of another kind.
  std::string string(const std::string& key) const {
    const gguf_value& v = scalar(key, "a string");
    if (v.type != gguf_value_type::string) wrong_kind(key, "a string");
    return std::get<std::string>(v.items[0]);
  }
  std::uint64_t unsigned_integer(const std::string& key) const {
    const gguf_value& v = scalar(key, "an unsigned integer");
    if (const auto* u = std::get_if<std::uint64_t>(&v.items[0])) return *u;
    if (const auto* i = std::get_if<std::int64_t>(&v.items[0]); i && *i >= 0) return std::uint64_t(*i);
    wrong_kind(key, "an unsigned integer");
  }
  double number(const std::string& key) const {
    const gguf_value& v = scalar(key, "a number");
    if (const auto* d = std::get_if<double>(&v.items[0])) return *d;
    if (const auto* u = std::get_if<std::uint64_t>(&v.items[0])) return double(*u);
    if (const auto* i = std::get_if<std::int64_t>(&v.items[0])) return double(*i);
    wrong_kind(key, "a number");
  }
  /// An array of strings (the tokenizer's tokens and merges).
  std::vector<std::string> strings(const std::string& key) const {
    const gguf_value* v = find(key);
    if (!v) missing(key, "an array of strings");
    if (!v->is_array() || v->element_type != gguf_value_type::string) wrong_kind(key, "an array of strings");
    std::vector<std::string> out;
    out.reserve(v->items.size());
    for (const auto& item : v->items) out.push_back(std::get<std::string>(item));
    return out;
  }

 private:
  gguf_file() = default;

  std::span<const std::byte> data() const { return owned_.empty() ? map_.bytes() : std::span<const std::byte>(owned_); }

  [[noreturn]] void missing(const std::string& key, const char* kind) const {
    detail::fail(path_, "metadata '" + key + "' (" + kind + ") is missing");
  }
  [[noreturn]] void wrong_kind(const std::string& key, const char* kind) const {
    detail::fail(path_, "metadata '" + key + "' is not " + kind);
  }
  const gguf_value& scalar(const std::string& key, const char* kind) const {
    const gguf_value* v = find(key);
    if (!v) missing(key, kind);
    if (v->is_array()) wrong_kind(key, kind);
    return *v;
  }

  void parse(std::span<const std::byte> bytes) {
    detail::gguf_reader in(bytes, path_);
    if (bytes.size() < 4 || std::memcmp(bytes.data(), "GGUF", 4) != 0) {
      std::string start;
      for (std::size_t i = 0; i < std::min<std::size_t>(4, bytes.size()); ++i) {
        static const char* hex = "0123456789abcdef";
        const auto b = static_cast<unsigned char>(bytes[i]);
        start += std::string(i ? " " : "") + hex[b >> 4] + hex[b & 15];
      }
      detail::fail(path_, "not a GGUF file: it starts with '" + start + "', not the magic 'GGUF'");
    }
    in.read<std::uint32_t>("the magic");
    version_ = in.read<std::uint32_t>("the version");
    if (version_ != 2 && version_ != 3)
      detail::fail(path_, "GGUF version " + std::to_string(version_) + " (ctformer reads versions 2 and 3)");
    const auto tensor_count = in.read<std::uint64_t>("the tensor count");
    const auto kv_count = in.read<std::uint64_t>("the metadata count");
    // Each entry takes at least this many bytes: counts beyond what the file
    // can hold are refused before anything is allocated for them.
    if (kv_count > in.left() / 13)
      detail::fail(path_, "the header claims " + std::to_string(kv_count) + " metadata entries, more than the " +
                              std::to_string(in.left()) + " bytes left can hold");
    for (std::uint64_t i = 0; i < kv_count; ++i) {
      std::string key = in.read_string("metadata key " + std::to_string(i));
      const auto code = in.read<std::uint32_t>("a metadata type");
      if (!detail::gguf_known_value_type(code))
        detail::fail(path_, "metadata '" + key + "' has value type " + std::to_string(code) + ", which GGUF does not define");
      gguf_value v;
      v.type = gguf_value_type(code);
      if (v.type == gguf_value_type::array) {
        const auto element = in.read<std::uint32_t>("an array's element type");
        if (!detail::gguf_known_value_type(element))
          detail::fail(path_, "metadata '" + key + "' is an array of type " + std::to_string(element) +
                                  ", which GGUF does not define");
        v.element_type = gguf_value_type(element);
        if (v.element_type == gguf_value_type::array)
          detail::fail(path_, "metadata '" + key + "' is an array of arrays, which ctformer does not read");
        const auto n = in.read<std::uint64_t>("an array's length");
        if (n > in.left() / detail::gguf_scalar_bytes(v.element_type))
          detail::fail(path_, "metadata '" + key + "' claims " + std::to_string(n) +
                                  " elements, more than the rest of the file holds");
        v.items.reserve(std::size_t(n));
        for (std::uint64_t j = 0; j < n; ++j) v.items.push_back(detail::read_gguf_scalar(in, v.element_type, key));
      } else {
        v.element_type = v.type;
        v.items.push_back(detail::read_gguf_scalar(in, v.type, key));
      }
      if (metadata_.count(key)) detail::fail(path_, "metadata '" + key + "' appears twice");
      metadata_.emplace(std::move(key), std::move(v));
    }
    if (const gguf_value* a = find("general.alignment")) {
      const auto* u = std::get_if<std::uint64_t>(&a->items[0]);
      if (a->is_array() || !u || *u == 0 || (*u & (*u - 1)) != 0)
        detail::fail(path_, "general.alignment must be a power of two, as an unsigned integer");
      alignment_ = *u;
    }
    if (tensor_count > in.left() / 24)
      detail::fail(path_, "the header claims " + std::to_string(tensor_count) + " tensors, more than the " +
                              std::to_string(in.left()) + " bytes left can hold");
    tensors_.reserve(std::size_t(tensor_count));
    for (std::uint64_t i = 0; i < tensor_count; ++i) {
      gguf_tensor_info t;
      t.name = in.read_string("the name of tensor " + std::to_string(i));
      const auto dims = in.read<std::uint32_t>("a tensor's dimension count");
      if (dims == 0 || dims > 4)
        detail::fail_tensor(path_, t.name, std::to_string(dims) + " dimensions (ggml tensors have 1 to 4)");
      std::uint64_t elements = 1;
      for (std::uint32_t d = 0; d < dims; ++d) {
        const auto e = in.read<std::uint64_t>("a tensor's extent");
        if (e == 0 || e > (std::uint64_t(1) << 40) || elements > (std::uint64_t(1) << 48) / e)
          detail::fail_tensor(path_, t.name, "extent " + std::to_string(e) + " of dimension " + std::to_string(d) +
                                                 " is zero or beyond any model's size");
        elements *= e;
        t.shape.push_back(e);
      }
      const auto code = in.read<std::uint32_t>("a tensor's type");
      const auto type = gguf_type_from_code(code);
      if (!type)
        detail::fail_tensor(path_, t.name, "ggml type " + std::to_string(code) +
                                               " (ctformer reads F32, F16, BF16, Q8_0 and Q4_0)");
      t.type = *type;
      if (t.shape[0] % gguf_block_size(t.type) != 0)
        detail::fail_tensor(path_, t.name, "innermost extent " + std::to_string(t.shape[0]) + " is not a multiple of " +
                                               std::string(gguf_type_name(t.type)) + "'s block of " +
                                               std::to_string(gguf_block_size(t.type)));
      t.bytes = elements / gguf_block_size(t.type) * gguf_block_bytes(t.type);
      t.offset = in.read<std::uint64_t>("a tensor's offset");
      if (by_name_.count(t.name)) detail::fail_tensor(path_, t.name, "the name appears twice");
      by_name_.emplace(t.name, tensors_.size());
      tensors_.push_back(std::move(t));
    }
    data_start_ = (in.position() + alignment_ - 1) / alignment_ * alignment_;
    const std::uint64_t data_bytes = bytes.size() >= data_start_ ? bytes.size() - data_start_ : 0;
    std::vector<std::pair<std::uint64_t, std::size_t>> order;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const gguf_tensor_info& t = tensors_[i];
      if (t.offset % alignment_ != 0)
        detail::fail_tensor(path_, t.name, "offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                                               std::to_string(alignment_));
      if (t.offset > data_bytes || t.bytes > data_bytes - t.offset)
        detail::fail_tensor(path_, t.name, "bytes [" + std::to_string(t.offset) + ", " +
                                               std::to_string(t.offset + t.bytes) + ") of the data section run past its " +
                                               std::to_string(data_bytes) + " bytes (a truncated file?)");
      order.emplace_back(t.offset, i);
    }
    std::sort(order.begin(), order.end());
    for (std::size_t i = 1; i < order.size(); ++i) {
      const gguf_tensor_info& before = tensors_[order[i - 1].second];
      if (before.offset + before.bytes > order[i].first)
        detail::fail_tensor(path_, tensors_[order[i].second].name, "its bytes overlap those of '" + before.name + "'");
    }
  }

  std::filesystem::path path_;
  detail::mapped_file map_;
  std::vector<std::byte> owned_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = gguf_default_alignment, data_start_ = 0;
  std::map<std::string, gguf_value> metadata_;
  std::vector<gguf_tensor_info> tensors_;
  std::map<std::string, std::size_t> by_name_;
};

/// Builds a GGUF file (version 3): metadata in the order set, tensors in the
/// order added, each at an offset aligned to general.alignment (32 unless
/// set), then write() puts it on disk atomically (detail::atomic_write).
/// Tensor bytes are not copied: they must stay alive until write() returns.
class gguf_writer {
 public:
  explicit gguf_writer(std::filesystem::path path) : path_(std::move(path)) {}

  /// Sets (or replaces) a metadata value.
  void set(const std::string& key, gguf_value value) {
    if (value.is_array() && value.element_type == gguf_value_type::array)
      detail::fail(path_, "metadata '" + key + "': arrays of arrays are not written");
    if (key == "general.alignment") {
      const auto* u = value.items.empty() ? nullptr : std::get_if<std::uint64_t>(&value.items[0]);
      if (value.is_array() || !u || *u == 0 || (*u & (*u - 1)) != 0 || *u > 4096)
        detail::fail(path_, "general.alignment must be a power of two up to 4096");
      alignment_ = *u;
    }
    const auto it = std::find_if(metadata_.begin(), metadata_.end(), [&](const auto& kv) { return kv.first == key; });
    if (it != metadata_.end()) it->second = std::move(value);
    else metadata_.emplace_back(key, std::move(value));
  }

  /// Adds a tensor of `type` with shape ne (innermost first) and its bytes.
  /// Throws io_error naming the tensor for a repeated name, a shape that is
  /// not 1 to 4 positive extents whose innermost one the type's block
  /// divides, or a byte count that does not match.
  void add_tensor(std::string name, gguf_type type, std::vector<std::uint64_t> shape, std::span<const std::byte> bytes) {
    if (std::any_of(tensors_.begin(), tensors_.end(), [&](const auto& t) { return t.info.name == name; }))
      detail::fail_tensor(path_, name, "the name appears twice");
    if (shape.empty() || shape.size() > 4 || std::find(shape.begin(), shape.end(), 0) != shape.end())
      detail::fail_tensor(path_, name, "a ggml tensor has 1 to 4 positive extents");
    if (shape[0] % gguf_block_size(type) != 0)
      detail::fail_tensor(path_, name, "innermost extent " + std::to_string(shape[0]) + " is not a multiple of " +
                                           std::string(gguf_type_name(type)) + "'s block");
    gguf_tensor_info info{std::move(name), type, std::move(shape), 0, 0};
    info.bytes = info.element_count() / gguf_block_size(type) * gguf_block_bytes(type);
    if (info.bytes != bytes.size())
      detail::fail_tensor(path_, info.name, std::string(gguf_type_name(type)) + " of this shape takes " +
                                                std::to_string(info.bytes) + " bytes, but " +
                                                std::to_string(bytes.size()) + " were given");
    tensors_.push_back({std::move(info), bytes});
  }
  /// A (rows, cols) matrix: GGUF shape {cols, rows}.
  void add_matrix(std::string name, gguf_type type, index_t rows, index_t cols, std::span<const std::byte> bytes) {
    add_tensor(std::move(name), type, {std::uint64_t(cols), std::uint64_t(rows)}, bytes);
  }

  /// Writes the file (temporary file, fsync, rename).
  void write() const {
    std::vector<std::byte> head;
    head.insert(head.end(), reinterpret_cast<const std::byte*>("GGUF"), reinterpret_cast<const std::byte*>("GGUF") + 4);
    detail::append_pod(head, std::uint32_t(3));
    detail::append_pod(head, std::uint64_t(tensors_.size()));
    detail::append_pod(head, std::uint64_t(metadata_.size()));
    for (const auto& [key, v] : metadata_) {
      detail::append_string(head, key);
      detail::append_pod(head, std::uint32_t(v.type));
      if (v.is_array()) {
        detail::append_pod(head, std::uint32_t(v.element_type));
        detail::append_pod(head, std::uint64_t(v.items.size()));
        for (const auto& item : v.items) detail::append_gguf_scalar(head, v.element_type, item, path_, key);
      } else {
        if (v.items.size() != 1) detail::fail(path_, "metadata '" + key + "': a scalar holds exactly one value");
        detail::append_gguf_scalar(head, v.type, v.items[0], path_, key);
      }
    }
    std::vector<std::uint64_t> offsets;
    std::uint64_t offset = 0;
    for (const auto& t : tensors_) {
      offsets.push_back(offset);
      detail::append_string(head, t.info.name);
      detail::append_pod(head, std::uint32_t(t.info.shape.size()));
      for (std::uint64_t e : t.info.shape) detail::append_pod(head, e);
      detail::append_pod(head, std::uint32_t(t.info.type));
      detail::append_pod(head, offset);
      offset = (offset + t.info.bytes + alignment_ - 1) / alignment_ * alignment_;
    }
    head.resize((head.size() + alignment_ - 1) / alignment_ * alignment_, std::byte{0});
    detail::atomic_write(path_, [&](int fd) {
      detail::write_all(fd, head.data(), head.size(), path_);
      const std::vector<std::byte> zeros(std::size_t(alignment_), std::byte{0});
      for (std::size_t i = 0; i < tensors_.size(); ++i) {
        const auto& t = tensors_[i];
        if (!t.bytes.empty()) detail::write_all(fd, t.bytes.data(), t.bytes.size(), path_);
        const std::uint64_t end = offsets[i] + t.info.bytes;
        const std::uint64_t padded = i + 1 < tensors_.size() ? offsets[i + 1] : end;
        if (padded > end) detail::write_all(fd, zeros.data(), std::size_t(padded - end), path_);
      }
    });
  }

 private:
  struct tensor_entry {
    gguf_tensor_info info;
    std::span<const std::byte> bytes;
  };
  std::filesystem::path path_;
  std::uint64_t alignment_ = gguf_default_alignment;
  std::vector<std::pair<std::string, gguf_value>> metadata_;
  std::vector<tensor_entry> tensors_;
};

}  // namespace ctformer::io
