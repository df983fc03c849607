// quant::packed_matrix<Format>: an owning (rows, cols) weight matrix stored in a
// weight_format, row-major with one output row after another (the (out, in)
// layout of a linear layer's weight). Includes core/ only (see formats.hpp).
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "ctformer/core/buffer.hpp"
#include "ctformer/core/error.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/quant/formats.hpp"
#include "ctformer/quant/matrix_storage.hpp"

namespace ctformer::quant {

/// A (rows, cols) matrix of weights packed in Format: rows() rows of
/// row_bytes() bytes each, back to back in one 64-byte aligned buffer, so a
/// checkpoint writes it with one call and a GEMV streams it once.
///
/// The matrix owns its bytes, or (the constructor taking `storage`) lives in
/// bytes its owner keeps (matrix_storage).
/// @tparam Format a weight_format (q8_0, q4_0, int8_rowwise, bf16_weights, fp32)
template <weight_format Format>
class packed_matrix {
 public:
  using format = Format;
  using block_type = typename Format::block_type;

  packed_matrix() = default;

  /// Storage for (rows, cols) weights, contents unspecified: for a loader that
  /// fills bytes() from a file. Throws shape_error when cols does not fit the format.
  packed_matrix(index_t rows, index_t cols) : packed_matrix(rows, cols, nullptr) {}

  /// The same over `storage`: Format::bytes_for(rows, cols) bytes, 64-byte
  /// aligned, that the caller keeps alive and unmoved for the matrix's life
  /// (nullptr: the matrix allocates its own).
  packed_matrix(index_t rows, index_t cols, std::byte* storage) : rows_(rows), cols_(cols) {
    if (rows < 0 || cols < 0)
      throw shape_error("ctformer::quant::packed_matrix: negative shape (" + std::to_string(rows) + ", " +
                        std::to_string(cols) + ")");
    Format::check_cols(cols);
    row_bytes_ = Format::row_bytes(cols);
    storage_ = matrix_storage(Format::bytes_for(rows, cols), storage);
  }

  packed_matrix(const packed_matrix&) = delete;
  packed_matrix& operator=(const packed_matrix&) = delete;
  packed_matrix(packed_matrix&& other) noexcept { *this = std::move(other); }
  packed_matrix& operator=(packed_matrix&& other) noexcept {
    rows_ = std::exchange(other.rows_, 0);
    cols_ = std::exchange(other.cols_, 0);
    row_bytes_ = std::exchange(other.row_bytes_, 0);
    storage_ = std::move(other.storage_);
    return *this;
  }

  /// Quantizes an fp32 (out, in) matrix on the calling thread (ops::quantize
  /// does the same over a policy's threads).
  /// w: (rows, cols), any strides.
  explicit packed_matrix(tensor_view<const float, 2> w) : packed_matrix(w.extent(0), w.extent(1)) {
    std::vector<float> staging(static_cast<std::size_t>(cols_));
    for (index_t r = 0; r < rows_; ++r) {
      const float* src = &w(r, 0);
      if (w.stride(1) != 1) {
        for (index_t c = 0; c < cols_; ++c) staging[std::size_t(c)] = w(r, c);
        src = staging.data();
      }
      Format::quantize_row(src, this->row(r), cols_);
    }
  }
  explicit packed_matrix(tensor_view<float, 2> w) : packed_matrix(tensor_view<const float, 2>(w)) {}

  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  /// Bytes of one packed row.
  std::size_t row_bytes() const { return row_bytes_; }
  /// Bytes of the whole matrix (what a GEMV reads).
  std::size_t bytes() const { return storage_.size(); }

  const std::byte* row(index_t r) const { return data() + std::size_t(r) * row_bytes_; }
  std::byte* row(index_t r) { return data() + std::size_t(r) * row_bytes_; }
  const std::byte* data() const { return storage_.data(); }
  std::byte* data() { return storage_.data(); }

  /// The fp32 values the packed weights stand for (the reference every
  /// quantized kernel is checked against). out: (rows, cols), row-major.
  void dequantize(tensor_view<float, 2> out) const {
    if (out.extent(0) != rows_ || out.extent(1) != cols_ || out.stride(1) != 1)
      throw shape_error("ctformer::quant::packed_matrix::dequantize: out has shape " + shape_string(out) +
                        ", the matrix is (" + std::to_string(rows_) + ", " + std::to_string(cols_) +
                        ") and rows must be contiguous");
    for (index_t r = 0; r < rows_; ++r) Format::dequantize_row(row(r), &out(r, 0), cols_);
  }

 private:
  index_t rows_ = 0;
  index_t cols_ = 0;
  std::size_t row_bytes_ = 0;
  matrix_storage storage_;
};

/// True for quant::packed_matrix<F> of any format (the ops constrain on it).
template <class T>
inline constexpr bool is_packed_matrix = false;
template <class F>
inline constexpr bool is_packed_matrix<packed_matrix<F>> = true;

}  // namespace ctformer::quant
