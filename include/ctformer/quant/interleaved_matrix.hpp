// quant::interleaved_matrix<q4_0 | q8_0>: ggml block weights (the same blocks,
// bits and bytes as packed_matrix) with rows stored eight at a time,
// interleaved so that a SIMD register holds four weights of each of eight rows.
// Includes core/ and the quant formats only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include "ctformer/core/buffer.hpp"
#include "ctformer/core/error.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/quant/formats.hpp"
#include "ctformer/quant/matrix_storage.hpp"
#include "ctformer/quant/packed_matrix.hpp"

namespace ctformer::quant {

/// How one format's 32 quants per row sit in an interleaved group block: the
/// quants of 8 rows as chunks of 32 bytes, byte 4 r + j of a chunk belonging
/// to row r. Each specialization maps a row's quants to and from that.
template <class Format>
struct interleaved_layout;

/// q4_0: 4 chunks; byte 4 r + j of chunk c holds row r's quant 8 c + j in its
/// low nibble and quant 8 c + 4 + j in its high nibble (j < 4).
template <>
struct interleaved_layout<q4_0> {
  static constexpr std::size_t quant_bytes = 128;
  /// Puts block b's quants into row `lane`'s bytes of the chunks.
  static void write(std::byte* quants, index_t lane, const block_q4_0& b) {
    std::uint8_t q[qk];
    for (index_t j = 0; j < qk / 2; ++j) {
      q[j] = b.qs[j] & 0x0f;
      q[j + qk / 2] = b.qs[j] >> 4;
    }
    for (index_t c = 0; c < 4; ++c)
      for (index_t j = 0; j < 4; ++j)
        quants[std::size_t(32 * c + 4 * lane + j)] = std::byte(std::uint8_t(q[8 * c + j] | (q[8 * c + 4 + j] << 4)));
  }
  static void read(const std::byte* quants, index_t lane, block_q4_0& b) {
    std::uint8_t q[qk];
    for (index_t c = 0; c < 4; ++c)
      for (index_t j = 0; j < 4; ++j) {
        const auto byte = std::to_integer<std::uint8_t>(quants[std::size_t(32 * c + 4 * lane + j)]);
        q[8 * c + j] = byte & 0x0f;
        q[8 * c + 4 + j] = byte >> 4;
      }
    for (index_t j = 0; j < qk / 2; ++j) b.qs[j] = std::uint8_t(q[j] | (q[j + qk / 2] << 4));
  }
};

/// q8_0: 8 chunks; bytes 4 r .. 4 r + 3 of chunk k are row r's quants 4 k .. 4 k + 3.
template <>
struct interleaved_layout<q8_0> {
  static constexpr std::size_t quant_bytes = 256;
  static void write(std::byte* quants, index_t lane, const block_q8_0& b) {
    for (index_t k = 0; k < 8; ++k) std::memcpy(quants + 32 * k + 4 * lane, b.qs + 4 * k, 4);
  }
  static void read(const std::byte* quants, index_t lane, block_q8_0& b) {
    for (index_t k = 0; k < 8; ++k) std::memcpy(b.qs + 4 * k, quants + 32 * k + 4 * lane, 4);
  }
};

/// Why a second layout: in ggml's row-major layout a GEMV dots one row at a
/// time, so every block of 32 weights pays for its own horizontal work (an
/// fp16 scale broadcast, a widening multiply-add into one register, for q4_0
/// a nibble unpack) and every row ends in a horizontal sum. That left the
/// q4_0 decode compute-bound on AVX2 at about 55% of the memory bound. Here
/// eight rows' blocks of the same 32 columns sit together, one 32-bit lane of
/// a register per row: the activation's four bytes are broadcast, one
/// multiply-add serves eight rows, the eight scales load as one vector, and
/// the eight results leave in one register. A GEMM over a few tokens unpacks
/// each chunk once for all of them.
///
/// Layout, for cols / 32 = nb blocks per row:
/// - rows [0, 8 * groups()) in groups of 8; group g, block b is
///   group_block_bytes at (g * nb + b) * group_block_bytes: the 8 rows' fp16
///   scales (row order), then interleaved_layout<Format>'s quant chunks;
/// - the last rows % 8 rows follow as plain ggml rows.
/// The same bytes as the row-major packed_matrix: 8 blocks per group block.
/// @tparam Format q4_0 or q8_0
template <class Format>
class interleaved_matrix {
  static_assert(std::is_same_v<Format, q4_0> || std::is_same_v<Format, q8_0>,
                "ctformer: interleaved_matrix holds the ggml block formats q4_0 and q8_0 only");

 public:
  using format = Format;
  using block_type = typename Format::block_type;
  using layout = interleaved_layout<Format>;
  static constexpr index_t rows_per_group = 8;
  static constexpr std::size_t scale_bytes = rows_per_group * sizeof(fp16);  // 16
  static constexpr std::size_t group_block_bytes = rows_per_group * sizeof(block_type);
  static_assert(scale_bytes + layout::quant_bytes == group_block_bytes);

  interleaved_matrix() = default;

  /// Rearranges a row-major matrix (the values are the same bits).
  explicit interleaved_matrix(const packed_matrix<Format>& m) : interleaved_matrix(m, nullptr) {}

  /// The same into `storage`: m.bytes() bytes, 64-byte aligned, that the
  /// caller keeps alive and unmoved for the matrix's life (a model's weight
  /// arena; nullptr: the matrix allocates its own).
  interleaved_matrix(const packed_matrix<Format>& m, std::byte* storage)
      : rows_(m.rows()), cols_(m.cols()), storage_(m.bytes(), storage) {
    const index_t nb = blocks_per_row();
    for (index_t g = 0; g < groups(); ++g)
      for (index_t b = 0; b < nb; ++b) {
        std::byte* out = group_block(g, b);
        for (index_t lane = 0; lane < rows_per_group; ++lane) {
          block_type blk;
          std::memcpy(&blk, m.row(g * rows_per_group + lane) + std::size_t(b) * sizeof(block_type), sizeof blk);
          std::memcpy(out + std::size_t(lane) * sizeof(fp16), &blk.d, sizeof(fp16));
          layout::write(out + scale_bytes, lane, blk);
        }
      }
    for (index_t r = groups() * rows_per_group; r < rows_; ++r) std::memcpy(tail_row(r), m.row(r), m.row_bytes());
  }
  /// Quantizes an fp32 (out, in) matrix (cols a multiple of 32).
  explicit interleaved_matrix(tensor_view<const float, 2> w) : interleaved_matrix(packed_matrix<Format>(w)) {}

  interleaved_matrix(const interleaved_matrix&) = delete;
  interleaved_matrix& operator=(const interleaved_matrix&) = delete;
  interleaved_matrix(interleaved_matrix&& other) noexcept { *this = std::move(other); }
  interleaved_matrix& operator=(interleaved_matrix&& other) noexcept {
    rows_ = std::exchange(other.rows_, 0);
    cols_ = std::exchange(other.cols_, 0);
    storage_ = std::move(other.storage_);
    return *this;
  }

  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  index_t blocks_per_row() const { return cols_ / qk; }
  /// Whole groups of 8 rows; rows past 8 * groups() are tail rows.
  index_t groups() const { return rows_ / rows_per_group; }
  /// Bytes of the whole matrix (what a GEMV reads): the same as packed_matrix<Format>.
  std::size_t bytes() const { return storage_.size(); }
  const std::byte* data() const { return storage_.data(); }

  /// Group g's block b: scale_bytes of scales, then the quant chunks.
  const std::byte* group_block(index_t g, index_t b) const {
    return data() + (std::size_t(g) * std::size_t(blocks_per_row()) + std::size_t(b)) * group_block_bytes;
  }
  /// A tail row (r >= 8 * groups()) in the ggml row layout.
  const std::byte* tail_row(index_t r) const {
    return data() + std::size_t(groups()) * std::size_t(blocks_per_row()) * group_block_bytes +
           std::size_t(r - groups() * rows_per_group) * Format::row_bytes(cols_);
  }

  /// Row r's block b as a ggml block (the reference the kernels are tested against).
  block_type block(index_t r, index_t b) const {
    block_type out;
    if (r >= groups() * rows_per_group) {
      std::memcpy(&out, tail_row(r) + std::size_t(b) * sizeof(block_type), sizeof out);
      return out;
    }
    const std::byte* gb = group_block(r / rows_per_group, b);
    const index_t lane = r % rows_per_group;
    std::memcpy(&out.d, gb + std::size_t(lane) * sizeof(fp16), sizeof(fp16));
    layout::read(gb + scale_bytes, lane, out);
    return out;
  }

  /// The fp32 values (the same as packed_matrix<Format>::dequantize of the source).
  /// out: (rows, cols), rows contiguous.
  void dequantize(tensor_view<float, 2> out) const {
    if (out.extent(0) != rows_ || out.extent(1) != cols_ || out.stride(1) != 1)
      throw shape_error("ctformer::quant::interleaved_matrix::dequantize: out has shape " + shape_string(out) +
                        ", the matrix is (" + std::to_string(rows_) + ", " + std::to_string(cols_) +
                        ") and rows must be contiguous");
    for (index_t r = 0; r < rows_; ++r)
      for (index_t b = 0; b < blocks_per_row(); ++b) {
        const block_type blk = block(r, b);
        Format::dequantize_row(reinterpret_cast<const std::byte*>(&blk), &out(r, b * qk), qk);
      }
  }

 private:
  std::byte* group_block(index_t g, index_t b) {
    return const_cast<std::byte*>(static_cast<const interleaved_matrix&>(*this).group_block(g, b));
  }
  std::byte* tail_row(index_t r) { return const_cast<std::byte*>(static_cast<const interleaved_matrix&>(*this).tail_row(r)); }

  index_t rows_ = 0;
  index_t cols_ = 0;
  matrix_storage storage_;
};

/// True for quant::interleaved_matrix<F> (the ops constrain on it).
template <class T>
inline constexpr bool is_interleaved_matrix = false;
template <class F>
inline constexpr bool is_interleaved_matrix<interleaved_matrix<F>> = true;

/// A matrix of weights the packed-weight ops take: a packed_matrix of any
/// format, or an interleaved_matrix.
template <class W>
concept packed_weights = is_packed_matrix<W> || is_interleaved_matrix<W>;

}  // namespace ctformer::quant
