// quant::matrix_storage: the bytes of a packed weight matrix, either owned
// (one aligned buffer) or borrowed from the caller (a model's weight arena).
// Includes core/ only.
#pragma once

#include <cstddef>
#include <utility>

#include "ctformer/core/buffer.hpp"

namespace ctformer::quant {

/// Owned or borrowed bytes behind packed_matrix and interleaved_matrix. A
/// model puts all its matrices in one arena so that they share huge pages
/// (host_space): a matrix of a few hundred KB is too small for its own.
class matrix_storage {
 public:
  matrix_storage() = default;
  /// `bytes` bytes: borrowed from `storage` when it is not nullptr (aligned
  /// to host_space::alignment, kept alive and unmoved by the caller for this
  /// object's life), otherwise allocated and owned.
  matrix_storage(std::size_t bytes, std::byte* storage) : bytes_(bytes) {
    if (!storage) {
      owned_ = buffer<std::byte>(bytes);
      storage = owned_.data();
    }
    data_ = storage;
  }
  matrix_storage(const matrix_storage&) = delete;
  matrix_storage& operator=(const matrix_storage&) = delete;
  // A moved buffer keeps its heap block where it is, so data_ stays valid;
  // the moved-from storage is left empty.
  matrix_storage(matrix_storage&& other) noexcept { *this = std::move(other); }
  matrix_storage& operator=(matrix_storage&& other) noexcept {
    owned_ = std::move(other.owned_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    return *this;
  }

  std::byte* data() { return data_; }
  const std::byte* data() const { return data_; }
  std::size_t size() const { return bytes_; }

 private:
  buffer<std::byte> owned_;  // empty when the bytes are borrowed
  std::byte* data_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace ctformer::quant
