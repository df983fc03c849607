// quant::interleaved_q4_0_matrix: q4_0 weights (the same blocks, bits and
// bytes as packed_matrix<q4_0>) with rows stored eight at a time, interleaved
// so that a SIMD register holds one weight group of each of eight rows.
// Includes core/ and the quant formats only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "ctformer/core/buffer.hpp"
#include "ctformer/core/error.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/quant/formats.hpp"
#include "ctformer/quant/packed_matrix.hpp"

namespace ctformer::quant {

/// Why a second layout: in ggml's row-major layout a GEMV dots one row at a
/// time, so every block of 32 weights pays for its own horizontal work (a
/// nibble unpack into one register, a widening multiply-add, an fp16 scale
/// broadcast) and every row ends in a horizontal sum. That made the q4_0
/// decode compute-bound on AVX2 at about 55% of the memory bound. Here eight
/// rows' blocks of the same 32 columns sit together, arranged so that one
/// 32-byte load holds four consecutive weights of each of the eight rows (one
/// 32-bit lane per row): the activation's four bytes are broadcast, one
/// multiply-add serves eight rows, and the eight results leave the kernel in
/// one register with their eight scales loaded as one vector.
///
/// Layout, for cols / 32 = nb blocks per row:
/// - rows [0, 8 * groups()) in groups of 8; group g, block b is 144 bytes at
///   (g * nb + b) * 144: the 8 rows' fp16 scales (row order), then 4 chunks of
///   32 bytes. Byte 4 r + j of chunk c holds row r's quant 8 c + j in its low
///   nibble and quant 8 c + 4 + j in its high nibble (j < 4);
/// - the last rows % 8 rows follow as plain ggml q4_0 rows.
/// Same bytes as the row-major matrix: 8 x 18 = 144 per group block.
class interleaved_q4_0_matrix {
 public:
  using format = q4_0;
  static constexpr index_t rows_per_group = 8;
  static constexpr std::size_t group_block_bytes = rows_per_group * sizeof(block_q4_0);  // 144
  static constexpr std::size_t scale_bytes = rows_per_group * sizeof(fp16);               // 16

  interleaved_q4_0_matrix() = default;

  /// Rearranges a row-major q4_0 matrix (the values are the same bits).
  explicit interleaved_q4_0_matrix(const packed_matrix<q4_0>& m)
      : rows_(m.rows()), cols_(m.cols()), data_(m.bytes()) {
    const index_t nb = blocks_per_row();
    for (index_t g = 0; g < groups(); ++g)
      for (index_t b = 0; b < nb; ++b) {
        block_q4_0 blocks[rows_per_group];
        for (index_t r = 0; r < rows_per_group; ++r)
          std::memcpy(&blocks[r], m.row(g * rows_per_group + r) + std::size_t(b) * sizeof(block_q4_0),
                      sizeof(block_q4_0));
        write_group_block(group_block(g, b), blocks);
      }
    for (index_t r = groups() * rows_per_group; r < rows_; ++r)
      std::memcpy(tail_row(r), m.row(r), m.row_bytes());
  }
  /// Quantizes an fp32 (out, in) matrix (cols a multiple of 32).
  explicit interleaved_q4_0_matrix(tensor_view<const float, 2> w)
      : interleaved_q4_0_matrix(packed_matrix<q4_0>(w)) {}

  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  index_t blocks_per_row() const { return cols_ / qk; }
  /// Whole groups of 8 rows; rows past 8 * groups() are tail rows.
  index_t groups() const { return rows_ / rows_per_group; }
  /// Bytes of the whole matrix (what a GEMV reads): the same as packed_matrix<q4_0>.
  std::size_t bytes() const { return data_.bytes(); }
  const std::byte* data() const { return data_.data(); }

  /// Group g's block b: 16 bytes of scales, then 128 bytes of quants.
  const std::byte* group_block(index_t g, index_t b) const {
    return data_.data() + (std::size_t(g) * std::size_t(blocks_per_row()) + std::size_t(b)) * group_block_bytes;
  }
  /// A tail row (r >= 8 * groups()) in the ggml row layout.
  const std::byte* tail_row(index_t r) const {
    return data_.data() + std::size_t(groups()) * std::size_t(blocks_per_row()) * group_block_bytes +
           std::size_t(r - groups() * rows_per_group) * q4_0::row_bytes(cols_);
  }

  /// Row r's block b as a ggml block (the reference the kernels are tested against).
  block_q4_0 block(index_t r, index_t b) const {
    block_q4_0 out;
    if (r >= groups() * rows_per_group) {
      std::memcpy(&out, tail_row(r) + std::size_t(b) * sizeof(block_q4_0), sizeof out);
      return out;
    }
    const std::byte* gb = group_block(r / rows_per_group, b);
    const index_t lane = r % rows_per_group;
    std::memcpy(&out.d, gb + std::size_t(lane) * sizeof(fp16), sizeof(fp16));
    std::uint8_t q[qk];
    for (index_t c = 0; c < 4; ++c)
      for (index_t j = 0; j < 4; ++j) {
        const auto byte = std::to_integer<std::uint8_t>(gb[scale_bytes + std::size_t(32 * c + 4 * lane + j)]);
        q[8 * c + j] = byte & 0x0f;
        q[8 * c + 4 + j] = byte >> 4;
      }
    for (index_t j = 0; j < qk / 2; ++j) out.qs[j] = std::uint8_t(q[j] | (q[j + qk / 2] << 4));
    return out;
  }

  /// The fp32 values (the same as packed_matrix<q4_0>::dequantize of the source).
  /// out: (rows, cols), rows contiguous.
  void dequantize(tensor_view<float, 2> out) const {
    if (out.extent(0) != rows_ || out.extent(1) != cols_ || out.stride(1) != 1)
      throw shape_error("ctformer::quant::interleaved_q4_0_matrix::dequantize: out has shape " + shape_string(out) +
                        ", the matrix is (" + std::to_string(rows_) + ", " + std::to_string(cols_) +
                        ") and rows must be contiguous");
    for (index_t r = 0; r < rows_; ++r)
      for (index_t b = 0; b < blocks_per_row(); ++b) {
        const block_q4_0 blk = block(r, b);
        q4_0::dequantize_row(reinterpret_cast<const std::byte*>(&blk), &out(r, b * qk), qk);
      }
  }

 private:
  std::byte* group_block(index_t g, index_t b) {
    return const_cast<std::byte*>(static_cast<const interleaved_q4_0_matrix&>(*this).group_block(g, b));
  }
  std::byte* tail_row(index_t r) {
    return const_cast<std::byte*>(static_cast<const interleaved_q4_0_matrix&>(*this).tail_row(r));
  }
  static void write_group_block(std::byte* out, const block_q4_0 (&blocks)[rows_per_group]) {
    for (index_t r = 0; r < rows_per_group; ++r)
      std::memcpy(out + std::size_t(r) * sizeof(fp16), &blocks[r].d, sizeof(fp16));
    for (index_t r = 0; r < rows_per_group; ++r) {
      std::uint8_t q[qk];  // row r's quants in element order
      for (index_t j = 0; j < qk / 2; ++j) {
        q[j] = blocks[r].qs[j] & 0x0f;
        q[j + qk / 2] = blocks[r].qs[j] >> 4;
      }
      for (index_t c = 0; c < 4; ++c)
        for (index_t j = 0; j < 4; ++j)
          out[scale_bytes + std::size_t(32 * c + 4 * r + j)] =
              std::byte(std::uint8_t(q[8 * c + j] | (q[8 * c + 4 + j] << 4)));
    }
  }

  index_t rows_ = 0;
  index_t cols_ = 0;
  buffer<std::byte> data_;
};

}  // namespace ctformer::quant
