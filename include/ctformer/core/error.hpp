// Errors thrown by ctformer, and the compile-time helper that turns a missing
// specialisation into one readable static_assert.
#pragma once

#include <stdexcept>
#include <string>

namespace ctformer {

/// Base of every error ctformer throws; catch this to catch them all.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A run-time shape mismatch; the message names the operation and both shapes.
class shape_error : public error {
 public:
  using error::error;
};

/// Bad user input (a token id out of range, a malformed file, a bad flag).
class invalid_input : public error {
 public:
  using error::error;
};

/// A file could not be read or written, or its contents are not what they claim.
class io_error : public error {
 public:
  using error::error;
};

/// A CUDA runtime, cuBLAS or cuBLASLt call failed; the message has file and line.
class cuda_error : public error {
 public:
  using error::error;
};

/// Always false, but only once T is known: lets a generic fallback hold a
/// static_assert that fires when (and only when) it is instantiated.
template <class... T>
inline constexpr bool dependent_false = false;

namespace detail {
[[noreturn]] inline void throw_shape(const std::string& message) { throw shape_error(message); }
}  // namespace detail

}  // namespace ctformer
