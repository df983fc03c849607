// Weight storage formats: the ggml-style blocks (q8_0, q4_0), int8 with one
// scale per output row, bf16 and fp32, each a tag type with its row layout and
// its scalar quantize / dequantize, checked by the quant::weight_format concept.
//
// Layering: this header and quant/packed_matrix.hpp include core/ only, so the
// CPU kernels (kernels/cpu/quantize.hpp, a lower layer) can name the block
// layouts exactly as they name core's fp16 -- one definition of each layout,
// as ggml-common.h is for ggml's backends.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "ctformer/core/error.hpp"
#include "ctformer/core/number_types.hpp"
#include "ctformer/core/tensor_view.hpp"

namespace ctformer::quant {

/// Weights per block of the ggml block formats.
inline constexpr index_t qk = 32;

/// ggml's block_q8_0: 32 weights w[i] = d * qs[i], qs in [-127, 127].
struct block_q8_0 {
  fp16 d;                // scale
  std::int8_t qs[qk];    // quants
};
static_assert(sizeof(block_q8_0) == 34, "q8_0 block must be 2 + 32 bytes, as in ggml");
static_assert(std::is_trivially_copyable_v<block_q8_0>);

/// ggml's block_q4_0: 32 weights w[i] = d * (q[i] - 8), q in [0, 15]. Byte j
/// holds weight j in its low nibble and weight j + 16 in its high nibble.
struct block_q4_0 {
  fp16 d;                    // scale
  std::uint8_t qs[qk / 2];   // nibbles
};
static_assert(sizeof(block_q4_0) == 18, "q4_0 block must be 2 + 16 bytes, as in ggml");
static_assert(std::is_trivially_copyable_v<block_q4_0>);

namespace detail {
inline float abs_max(const float* x, index_t n) {
  float m = 0.0f;
  for (index_t i = 0; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}
// Round half away from zero, as ggml's roundf: the same bits as llama.cpp files.
inline int round_to_int(float v) { return int(std::lround(v)); }

template <class Format>
void require_block_multiple(const char* operation, index_t cols) {
  if (cols % Format::block_size != 0)
    throw shape_error(std::string("ctformer::") + operation + ": format " + Format::name + " stores rows in blocks of " +
                      std::to_string(Format::block_size) + " weights, but the matrix has " + std::to_string(cols) +
                      " columns (not a multiple of " + std::to_string(Format::block_size) + ")");
}
}  // namespace detail

/// q8_0: blocks of 32 int8 with an fp16 scale d = max|w| / 127 (8.5 bits per weight).
/// Quantized as ggml's reference does (quants from the fp32 scale, then the
/// scale rounded to fp16), so a model quantized here has llama-quantize's bytes.
/// Round trip: |w - w'| <= d/2 + 127 |d - fp16(d)| <= 0.57 d per element.
struct q8_0 {
  using block_type = block_q8_0;
  static constexpr index_t block_size = qk;
  static constexpr const char* name = "q8_0";

  static void check_cols(index_t cols) { detail::require_block_multiple<q8_0>("quant::q8_0", cols); }
  static std::size_t row_bytes(index_t cols) { return std::size_t(cols / qk) * sizeof(block_type); }
  static std::size_t bytes_for(index_t rows, index_t cols) { return std::size_t(rows) * row_bytes(cols); }

  /// One block from 32 floats.
  static block_type quantize_block(const float* x) {
    block_type b;
    const float d = detail::abs_max(x, qk) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    b.d = fp16(d);
    for (index_t i = 0; i < qk; ++i) b.qs[i] = std::int8_t(std::clamp(detail::round_to_int(x[i] * id), -127, 127));
    return b;
  }
  /// x: (cols) -> row: row_bytes(cols) bytes.
  static void quantize_row(const float* x, std::byte* row, index_t cols) {
    for (index_t b = 0; b < cols / qk; ++b) {
      const block_type blk = quantize_block(x + b * qk);
      std::memcpy(row + std::size_t(b) * sizeof(block_type), &blk, sizeof blk);
    }
  }
  static void dequantize_row(const std::byte* row, float* x, index_t cols) {
    for (index_t b = 0; b < cols / qk; ++b) {
      block_type blk;
      std::memcpy(&blk, row + std::size_t(b) * sizeof(block_type), sizeof blk);
      const float d = float(blk.d);
      for (index_t i = 0; i < qk; ++i) x[b * qk + i] = d * float(blk.qs[i]);
    }
  }
};

/// q4_0: blocks of 32 4-bit quants with an fp16 scale (4.5 bits per weight).
/// As in ggml, d = m / -8 where m is the element of largest magnitude (sign
/// kept), so the grid spans [-8|d|, 7|d|] on m's side. Round trip, with the
/// scale's fp16 rounding (at most 8 |d| 2^-11): |w - w'| <= 0.504 |d|, except
/// an element of magnitude near |m| and the opposite sign, clamped to
/// q = 15: there |w - w'| <= 1.004 |d|.
struct q4_0 {
  using block_type = block_q4_0;
  static constexpr index_t block_size = qk;
  static constexpr const char* name = "q4_0";

  static void check_cols(index_t cols) { detail::require_block_multiple<q4_0>("quant::q4_0", cols); }
  static std::size_t row_bytes(index_t cols) { return std::size_t(cols / qk) * sizeof(block_type); }
  static std::size_t bytes_for(index_t rows, index_t cols) { return std::size_t(rows) * row_bytes(cols); }

  static block_type quantize_block(const float* x) {
    float amax = 0.0f, m = 0.0f;
    for (index_t i = 0; i < qk; ++i)
      if (std::fabs(x[i]) > amax) {
        amax = std::fabs(x[i]);
        m = x[i];
      }
    // As ggml's reference: quants from the fp32 scale, rounded half up
    // (x / d + 8.5 truncated), then the scale rounded to fp16.
    block_type b;
    const float d = m / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    b.d = fp16(d);
    auto quant = [&](float v) { return std::uint8_t(std::clamp(int(v * id + 8.5f), 0, 15)); };
    for (index_t j = 0; j < qk / 2; ++j) b.qs[j] = std::uint8_t(quant(x[j]) | (quant(x[j + qk / 2]) << 4));
    return b;
  }
  static void quantize_row(const float* x, std::byte* row, index_t cols) {
    for (index_t b = 0; b < cols / qk; ++b) {
      const block_type blk = quantize_block(x + b * qk);
      std::memcpy(row + std::size_t(b) * sizeof(block_type), &blk, sizeof blk);
    }
  }
  static void dequantize_row(const std::byte* row, float* x, index_t cols) {
    for (index_t b = 0; b < cols / qk; ++b) {
      block_type blk;
      std::memcpy(&blk, row + std::size_t(b) * sizeof(block_type), sizeof blk);
      const float d = float(blk.d);
      for (index_t j = 0; j < qk / 2; ++j) {
        x[b * qk + j] = d * float(int(blk.qs[j] & 0x0f) - 8);
        x[b * qk + j + qk / 2] = d * float(int(blk.qs[j] >> 4) - 8);
      }
    }
  }
};

/// int8 with one fp32 scale per output row (per-output-channel): a row is
/// [float s][int8 q[cols]], w = s * q, s = max|w_row| / 127 (8 bits per weight
/// plus 4 bytes per row). Any column count. Round trip: |w - w'| <= s/2.
struct int8_rowwise {
  using block_type = std::int8_t;
  static constexpr index_t block_size = 1;
  static constexpr const char* name = "int8_rowwise";

  static void check_cols(index_t) {}
  static std::size_t row_bytes(index_t cols) { return sizeof(float) + std::size_t(cols); }
  static std::size_t bytes_for(index_t rows, index_t cols) { return std::size_t(rows) * row_bytes(cols); }

  static float row_scale(const std::byte* row) {
    float s;
    std::memcpy(&s, row, sizeof s);
    return s;
  }
  static const std::int8_t* row_quants(const std::byte* row) {
    return reinterpret_cast<const std::int8_t*>(row + sizeof(float));
  }
  static void quantize_row(const float* x, std::byte* row, index_t cols) {
    const float s = detail::abs_max(x, cols) / 127.0f;
    const float is = s != 0.0f ? 1.0f / s : 0.0f;
    std::memcpy(row, &s, sizeof s);
    auto* q = reinterpret_cast<std::int8_t*>(row + sizeof(float));
    for (index_t i = 0; i < cols; ++i) q[i] = std::int8_t(std::clamp(detail::round_to_int(x[i] * is), -127, 127));
  }
  static void dequantize_row(const std::byte* row, float* x, index_t cols) {
    const float s = row_scale(row);
    const std::int8_t* q = row_quants(row);
    for (index_t i = 0; i < cols; ++i) x[i] = s * float(q[i]);
  }
};

/// bf16 weights (core's bf16, round to nearest even): 16 bits per weight.
/// Round trip: |w - w'| <= 2^-8 |w| (half a unit in the last of 7 stored significand bits).
struct bf16_weights {
  using block_type = bf16;
  static constexpr index_t block_size = 1;
  static constexpr const char* name = "bf16";

  static void check_cols(index_t) {}
  static std::size_t row_bytes(index_t cols) { return std::size_t(cols) * sizeof(bf16); }
  static std::size_t bytes_for(index_t rows, index_t cols) { return std::size_t(rows) * row_bytes(cols); }
  static void quantize_row(const float* x, std::byte* row, index_t cols) {
    for (index_t i = 0; i < cols; ++i) {
      const bf16 v(x[i]);
      std::memcpy(row + std::size_t(i) * sizeof(bf16), &v, sizeof v);
    }
  }
  static void dequantize_row(const std::byte* row, float* x, index_t cols) {
    for (index_t i = 0; i < cols; ++i) {
      bf16 v;
      std::memcpy(&v, row + std::size_t(i) * sizeof(bf16), sizeof v);
      x[i] = float(v);
    }
  }
};

/// fp32 passthrough: the unquantized baseline behind the same interface. Exact.
struct fp32 {
  using block_type = float;
  static constexpr index_t block_size = 1;
  static constexpr const char* name = "fp32";

  static void check_cols(index_t) {}
  static std::size_t row_bytes(index_t cols) { return std::size_t(cols) * sizeof(float); }
  static std::size_t bytes_for(index_t rows, index_t cols) { return std::size_t(rows) * row_bytes(cols); }
  static void quantize_row(const float* x, std::byte* row, index_t cols) {
    std::memcpy(row, x, std::size_t(cols) * sizeof(float));
  }
  static void dequantize_row(const std::byte* row, float* x, index_t cols) {
    std::memcpy(x, row, std::size_t(cols) * sizeof(float));
  }
};

/// A weight storage format: a tag type naming its block, its block size, the
/// bytes a row of `cols` weights takes, and scalar row quantize / dequantize.
/// Rows are stored back to back; a row's layout is the format's own.
template <class F>
concept weight_format =
    std::is_trivially_copyable_v<typename F::block_type> &&
    requires(index_t rows, index_t cols, const float* src, float* dst, std::byte* row, const std::byte* crow) {
      { F::block_size } -> std::convertible_to<index_t>;
      { F::name } -> std::convertible_to<const char*>;
      { F::row_bytes(cols) } -> std::same_as<std::size_t>;
      { F::bytes_for(rows, cols) } -> std::same_as<std::size_t>;
      F::check_cols(cols);
      F::quantize_row(src, row, cols);
      F::dequantize_row(crow, dst, cols);
    };

static_assert(weight_format<q8_0> && weight_format<q4_0> && weight_format<int8_rowwise> &&
              weight_format<bf16_weights> && weight_format<fp32>);

/// True for the formats stored in ggml blocks of 32 (cols must be a multiple of 32).
template <class F>
inline constexpr bool is_block_format = F::block_size > 1;

}  // namespace ctformer::quant
