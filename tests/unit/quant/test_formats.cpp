// Weight formats: block sizes, the weight_format concept, round-trip error
// bounds per format, packed_matrix shapes and errors, ops::quantize/dequantize.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "ctformer/exec/cpu.hpp"
#include "ctformer/kernels/cpu/quantize.hpp"
#include "ctformer/ops/quantize.hpp"
#include "ctformer/quant/formats.hpp"
#include "ctformer/quant/packed_matrix.hpp"
#include "../../support/test_support.hpp"

using namespace ctformer;

static_assert(sizeof(quant::block_q8_0) == 34);
static_assert(sizeof(quant::block_q4_0) == 18);
static_assert(quant::weight_format<quant::q8_0>);
static_assert(quant::weight_format<quant::q4_0>);
static_assert(quant::weight_format<quant::int8_rowwise>);
static_assert(quant::weight_format<quant::bf16_weights>);
static_assert(quant::weight_format<quant::fp32>);
static_assert(!quant::weight_format<float>);

namespace {
// Rows with a spread of magnitudes (so blocks have very different scales),
// plus exact zeros and a zero block.
std::vector<float> test_matrix(index_t rows, index_t cols, std::uint32_t seed) {
  auto w = testing::random_floats(std::size_t(rows * cols), seed);
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c) w[std::size_t(r * cols + c)] *= std::pow(10.0f, float((r + c / 32) % 5) - 2.0f);
  if (cols >= 64) {
    for (index_t c = 32; c < 64; ++c) w[std::size_t(c)] = 0.0f;  // row 0, block 1: all zero
    w[std::size_t(cols + 3)] = 0.0f;
  }
  return w;
}
}  // namespace

TEST_CASE("bytes per format match the ggml sizes", "[quant][formats]") {
  CHECK(quant::q8_0::bytes_for(768, 768) == 768u * 24u * 34u);
  CHECK(quant::q4_0::bytes_for(768, 768) == 768u * 24u * 18u);
  CHECK(quant::int8_rowwise::bytes_for(10, 100) == 10u * 104u);
  CHECK(quant::bf16_weights::bytes_for(3, 5) == 30u);
  CHECK(quant::fp32::bytes_for(3, 5) == 60u);
  quant::packed_matrix<quant::q4_0> m(7, 64);
  CHECK(m.bytes() == 7u * 2u * 18u);
  CHECK(m.row_bytes() == 36u);
}

TEST_CASE("block formats refuse a column count that is not a multiple of 32", "[quant][formats]") {
  std::vector<float> w(3 * 48, 1.0f);
  const tensor_view<const float, 2> v(w.data(), {3, 48});
  CHECK_THROWS_AS(quant::packed_matrix<quant::q8_0>(v), shape_error);
  CHECK_THROWS_AS(quant::packed_matrix<quant::q4_0>(v), shape_error);
  CHECK_THROWS_WITH(quant::packed_matrix<quant::q4_0>(3, 48),
                    Catch::Contains("q4_0") && Catch::Contains("48 columns") && Catch::Contains("multiple of 32"));
  CHECK_NOTHROW(quant::packed_matrix<quant::int8_rowwise>(v));
  CHECK_NOTHROW(quant::packed_matrix<quant::bf16_weights>(v));
}

TEST_CASE("q8_0 round trip: |w - w'| <= d/2 plus the scale's fp16 rounding, per element", "[quant][formats]") {
  const index_t rows = 5, cols = 128;
  const auto w = test_matrix(rows, cols, 1);
  const quant::packed_matrix<quant::q8_0> p(tensor_view<const float, 2>(w.data(), {rows, cols}));
  std::vector<float> back(w.size());
  p.dequantize(tensor_view<float, 2>(back.data(), {rows, cols}));
  for (index_t r = 0; r < rows; ++r)
    for (index_t b = 0; b < cols / 32; ++b) {
      quant::block_q8_0 blk;
      std::memcpy(&blk, p.row(r) + b * 34, 34);
      const float d = float(blk.d);
      for (index_t i = 0; i < 32; ++i) {
        const std::size_t k = std::size_t(r * cols + b * 32 + i);
        // d/2 from rounding the quant; the scale's fp16 rounding moves
        // q d by at most 127 |d - fp16(d)| <= 127 2^-11 d (quants come from
        // the fp32 scale, as ggml's); the float products add a few ulp.
        REQUIRE(std::fabs(w[k] - back[k]) <= (0.5f + 127.0f / 2048.0f) * d * (1.0f + 1e-4f) + 1e-30f);
        REQUIRE(std::abs(int(blk.qs[i])) <= 127);
      }
    }
  CHECK(back[32] == 0.0f);  // an all-zero block stays zero (d = 0)
}

TEST_CASE("q4_0 round trip: |w - w'| <= |d|/2, or |d| where clamped at 15, plus the scale's fp16 rounding",
          "[quant][formats]") {
  const index_t rows = 6, cols = 96;
  const auto w = test_matrix(rows, cols, 2);
  const quant::packed_matrix<quant::q4_0> p(tensor_view<const float, 2>(w.data(), {rows, cols}));
  std::vector<float> back(w.size());
  p.dequantize(tensor_view<float, 2>(back.data(), {rows, cols}));
  int clamped = 0;
  for (index_t r = 0; r < rows; ++r)
    for (index_t b = 0; b < cols / 32; ++b) {
      quant::block_q4_0 blk;
      std::memcpy(&blk, p.row(r) + b * 18, 18);
      const float d = std::fabs(float(blk.d));
      for (index_t i = 0; i < 32; ++i) {
        const std::size_t k = std::size_t(r * cols + b * 32 + i);
        const int q = i < 16 ? blk.qs[i] & 0x0f : blk.qs[i - 16] >> 4;
        // |q - 8| <= 8: the scale's fp16 rounding moves (q - 8) d by at most 8 2^-11 |d|.
        const float err = std::fabs(w[k] - back[k]), rounding = 8.0f / 2048.0f;
        if (q == 15 && err > (0.5f + rounding) * d * (1.0f + 1e-4f)) {
          ++clamped;
          REQUIRE(err <= (1.0f + rounding) * d * (1.0f + 1e-4f));
        } else {
          REQUIRE(err <= (0.5f + rounding) * d * (1.0f + 1e-4f) + 1e-30f);
        }
      }
    }
  CHECK(clamped <= rows * cols / 32);  // at most the opposite-sign extreme of a block
}

TEST_CASE("int8_rowwise round trip: |w - w'| <= s/2, any column count", "[quant][formats]") {
  const index_t rows = 3, cols = 45;
  const auto w = test_matrix(rows, cols, 3);
  const quant::packed_matrix<quant::int8_rowwise> p(tensor_view<const float, 2>(w.data(), {rows, cols}));
  std::vector<float> back(w.size());
  p.dequantize(tensor_view<float, 2>(back.data(), {rows, cols}));
  for (index_t r = 0; r < rows; ++r) {
    const float s = quant::int8_rowwise::row_scale(p.row(r));
    for (index_t c = 0; c < cols; ++c) {
      const std::size_t k = std::size_t(r * cols + c);
      REQUIRE(std::fabs(w[k] - back[k]) <= 0.5f * s * (1.0f + 1e-5f));
    }
  }
}

TEST_CASE("bf16 round trip: |w - w'| <= 2^-8 |w|; fp32 is exact", "[quant][formats]") {
  const index_t rows = 4, cols = 33;
  const auto w = test_matrix(rows, cols, 4);
  const quant::packed_matrix<quant::bf16_weights> p(tensor_view<const float, 2>(w.data(), {rows, cols}));
  const quant::packed_matrix<quant::fp32> f(tensor_view<const float, 2>(w.data(), {rows, cols}));
  std::vector<float> back(w.size()), exact(w.size());
  p.dequantize(tensor_view<float, 2>(back.data(), {rows, cols}));
  f.dequantize(tensor_view<float, 2>(exact.data(), {rows, cols}));
  for (std::size_t k = 0; k < w.size(); ++k) {
    REQUIRE(std::fabs(w[k] - back[k]) <= std::ldexp(std::fabs(w[k]), -8));
    REQUIRE(exact[k] == w[k]);
  }
}

TEMPLATE_TEST_CASE("ops::quantize over threads equals the single-threaded packing", "[quant][formats]", quant::q8_0,
                   quant::q4_0, quant::int8_rowwise, quant::bf16_weights, quant::fp32) {
  const index_t rows = 301, cols = 256;  // odd rows; > 64 KiB so threads are used
  const auto w = test_matrix(rows, cols, 5);
  const tensor_view<const float, 2> v(w.data(), {rows, cols});
  const quant::packed_matrix<TestType> serial(v);
  quant::packed_matrix<TestType> threaded(rows, cols);
  ops::quantize(cpu::par.with_threads(2), v, threaded);
  REQUIRE(serial.bytes() == threaded.bytes());
  CHECK(std::memcmp(serial.data(), threaded.data(), serial.bytes()) == 0);
  std::vector<float> a(w.size()), b(w.size());
  serial.dequantize(tensor_view<float, 2>(a.data(), {rows, cols}));
  ops::dequantize(cpu::par.with_threads(2), threaded, tensor_view<float, 2>(b.data(), {rows, cols}));
  CHECK(a == b);
  std::vector<float> wrong(std::size_t(rows * (cols + 32)));
  CHECK_THROWS_AS(ops::dequantize(cpu::par, threaded, tensor_view<float, 2>(wrong.data(), {rows, cols + 32})),
                  shape_error);
}
