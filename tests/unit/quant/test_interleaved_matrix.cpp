// quant::interleaved_matrix<q4_0 | q8_0>: the repacking keeps every block's
// bits, and its GEMV / GEMM / dequantize kernels agree with the row-major
// values, with each other and with themselves across thread counts, bit for
// bit; q8_0's products agree with the row-major kernels' within the fp32
// summation bound.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "ctformer/exec/cpu.hpp"
#include "ctformer/kernels/cpu/isa.hpp"
#include "ctformer/kernels/cpu/quantize_interleaved.hpp"
#include "ctformer/ops/quantize.hpp"
#include "ctformer/quant/interleaved_matrix.hpp"
#include "../../support/test_support.hpp"

using namespace ctformer;

namespace {

template <class F>
struct interleaved_case {
  index_t rows, cols;
  std::vector<float> w, wd;  // original and dequantized (rows, cols)
  quant::packed_matrix<F> row_major;
  quant::interleaved_matrix<F> m;
  interleaved_case(index_t r, index_t c, std::uint32_t seed)
      : rows(r), cols(c), w(testing::random_floats(std::size_t(r * c), seed)), wd(w.size()),
        row_major(tensor_view<const float, 2>(w.data(), {r, c})), m(row_major) {
    row_major.dequantize(tensor_view<float, 2>(wd.data(), {r, c}));
  }
};

// Shapes: whole groups only, a tail of 5 rows, fewer rows than a group, and
// the model's 768 columns (24 blocks).
const index_t shapes[][2] = {{8, 32}, {21, 96}, {3, 64}, {301, 768}, {64, 256}};

}  // namespace

TEMPLATE_TEST_CASE("interleaving keeps every block and its values exactly", "[quant][interleaved]", quant::q4_0,
                   quant::q8_0) {
  constexpr std::size_t block_bytes = sizeof(typename TestType::block_type);
  for (const auto& s : shapes) {
    interleaved_case<TestType> c(s[0], s[1], std::uint32_t(s[0] + s[1]));
    INFO("shape (" << c.rows << ", " << c.cols << ")");
    CHECK(c.m.bytes() == c.row_major.bytes());
    CHECK(c.m.groups() == c.rows / 8);
    int differing_blocks = 0;
    for (index_t r = 0; r < c.rows; ++r)
      for (index_t b = 0; b < c.cols / 32; ++b) {
        const auto blk = c.m.block(r, b);
        if (std::memcmp(&blk, c.row_major.row(r) + b * block_bytes, block_bytes) != 0) ++differing_blocks;
      }
    CHECK(differing_blocks == 0);
    // Exact: both sides compute d * q (q4_0: d * (q - 8)) in fp32 from the same bits.
    std::vector<float> reference(c.w.size()), kernel(c.w.size(), -1.0f);
    c.m.dequantize(tensor_view<float, 2>(reference.data(), {c.rows, c.cols}));
    CHECK(reference == c.wd);
    for (int threads : {1, 2}) {
      ops::dequantize(cpu::par.with_threads(threads), c.m, tensor_view<float, 2>(kernel.data(), {c.rows, c.cols}));
      CHECK(kernel == c.wd);
    }
  }
}

TEMPLATE_TEST_CASE("matrices in caller-owned storage hold the same bytes and keep them through a move",
                   "[quant][interleaved]", quant::q4_0, quant::q8_0) {
  // A model's weight arena: both matrices of one shape side by side in one
  // buffer, the second 64-byte aligned.
  interleaved_case<TestType> c(21, 96, 7);
  const std::size_t bytes = c.row_major.bytes(), aligned = (bytes + 63) / 64 * 64;
  buffer<std::byte> arena(aligned + bytes);
  quant::packed_matrix<TestType> row_major(c.rows, c.cols, arena.data());
  ops::quantize(cpu::par, tensor_view<const float, 2>(c.w.data(), {c.rows, c.cols}), row_major);
  quant::interleaved_matrix<TestType> interleaved(c.row_major, arena.data() + aligned);
  CHECK(row_major.data() == arena.data());
  CHECK(interleaved.data() == arena.data() + aligned);
  CHECK(row_major.bytes() == bytes);
  CHECK(interleaved.bytes() == bytes);
  CHECK(std::memcmp(row_major.data(), c.row_major.data(), bytes) == 0);
  CHECK(std::memcmp(interleaved.data(), c.m.data(), bytes) == 0);
  // A move hands over the same storage; the moved-from matrix is empty.
  quant::packed_matrix<TestType> moved_row_major(std::move(row_major));
  quant::interleaved_matrix<TestType> moved_interleaved;
  moved_interleaved = std::move(interleaved);
  CHECK(moved_row_major.data() == arena.data());
  CHECK(moved_interleaved.data() == arena.data() + aligned);
  CHECK((row_major.data() == nullptr && row_major.bytes() == 0 && row_major.rows() == 0));
  CHECK((interleaved.data() == nullptr && interleaved.bytes() == 0));
  // An owning matrix moved keeps its heap block too.
  quant::interleaved_matrix<TestType> owning(c.row_major);
  const std::byte* heap = owning.data();
  quant::interleaved_matrix<TestType> moved_owning(std::move(owning));
  CHECK(moved_owning.data() == heap);
  std::vector<float> out(c.w.size());
  moved_owning.dequantize(tensor_view<float, 2>(out.data(), {c.rows, c.cols}));
  CHECK(out == c.wd);
}

TEMPLATE_TEST_CASE("interleaved gemv equals the dequantized product within the activation-rounding bound",
                   "[quant][interleaved][gemv]", quant::q4_0, quant::q8_0) {
  for (const auto& s : shapes) {
    interleaved_case<TestType> c(s[0], s[1], std::uint32_t(7 * s[0] + s[1]));
    auto x = testing::random_floats(std::size_t(c.cols), 99, -2.0f, 2.0f);
    x[0] = 0.0f;
    for (int threads : {1, 2}) {
      std::vector<float> y(std::size_t(c.rows), -1.0f);
      ops::quantized_gemv(cpu::par.with_threads(threads), c.m, tensor_view<const float, 1>(x.data(), {c.cols}),
                          tensor_view<float, 1>(y.data(), {c.rows}));
      for (index_t r = 0; r < c.rows; ++r) {
        // x is rounded to int8 blocks with scale d_b = max|x_b| / 127, so the
        // kernel computes W' x' with |x - x'| <= d_b / 2: bound sum_b d_b / 2
        // * sum_{i in b} |W'[r, i]|, plus 1e-5 of sum |W' x| for fp32 sums.
        double ref = 0, bound = 1e-6;
        for (index_t b = 0; b < c.cols / 32; ++b) {
          double amax = 0, wsum = 0;
          for (index_t i = b * 32; i < b * 32 + 32; ++i) {
            const double wv = c.wd[std::size_t(r * c.cols + i)];
            amax = std::max(amax, std::fabs(double(x[std::size_t(i)])));
            wsum += std::fabs(wv);
            ref += wv * x[std::size_t(i)];
            bound += 1e-5 * std::fabs(wv * x[std::size_t(i)]);
          }
          bound += amax / 127.0 / 2.0 * wsum * (1 + 1e-5);
        }
        INFO("row " << r << " of (" << c.rows << ", " << c.cols << "), threads " << threads);
        REQUIRE(std::fabs(double(y[std::size_t(r)]) - ref) <= bound);
      }
    }
  }
}

TEMPLATE_TEST_CASE("an interleaved row gets the same bits in a group, as a tail row, on any thread count, in the gemm",
                   "[quant][interleaved][gemv]", quant::q4_0, quant::q8_0) {
  // Every path does the same per-row operations in the same order (exact
  // integer block dots, then one fma per block), so no tolerance.
  interleaved_case<TestType> c(301, 768, 5);  // 37 groups + 5 tail rows, past the 64 KiB that splits over threads
  const index_t tokens = 9;         // two passes of 4 tokens and one of 1
  const auto x = testing::random_floats(std::size_t(tokens * c.cols), 6, -3.0f, 3.0f);
  std::vector<float> one(std::size_t(c.rows)), two(std::size_t(c.rows));
  const tensor_view<const float, 1> x0(x.data(), {c.cols});
  ops::quantized_gemv(cpu::par.with_threads(1), c.m, x0, tensor_view<float, 1>(one.data(), {c.rows}));
  ops::quantized_gemv(cpu::par.with_threads(2), c.m, x0, tensor_view<float, 1>(two.data(), {c.rows}));
  CHECK(one == two);

  cpu::detail::q8_activations act;
  cpu::detail::quantize_activations(x.data(), c.cols, act);
  int differing = 0;
  for (index_t r = 0; r < c.rows; ++r) {
    if (cpu::detail::interleaved_row_dot(c.m, r, act) != one[std::size_t(r)]) ++differing;
    // The same row alone is a tail row of a one-row matrix.
    const quant::interleaved_matrix<TestType> single(tensor_view<const float, 2>(c.w.data() + r * c.cols, {1, c.cols}));
    float alone = 0.0f;
    ops::quantized_gemv(cpu::par, single, x0, tensor_view<float, 1>(&alone, {1}));
    if (alone != one[std::size_t(r)]) ++differing;
  }
  CHECK(differing == 0);

  for (int threads : {1, 2}) {
    std::vector<float> y(std::size_t(tokens * c.rows), -1.0f);
    ops::quantized_gemm(cpu::par.with_threads(threads), c.m, tensor_view<const float, 2>(x.data(), {tokens, c.cols}),
                        tensor_view<float, 2>(y.data(), {tokens, c.rows}));
    int differing_tokens = 0;
    for (index_t t = 0; t < tokens; ++t) {
      std::vector<float> row(std::size_t(c.rows));
      ops::quantized_gemv(cpu::par, c.m, tensor_view<const float, 1>(x.data() + t * c.cols, {c.cols}),
                          tensor_view<float, 1>(row.data(), {c.rows}));
      if (!std::equal(row.begin(), row.end(), y.begin() + t * c.rows)) ++differing_tokens;
    }
    INFO("threads " << threads);
    CHECK(differing_tokens == 0);
  }
}

// Where ops::interleave_q8_0 holds (AVX512_VNNI builds, and AVX2 builds
// without AVX-512, whose int8 GEMM uses the sign trick), an inference model
// keeps q8_0 interleaved, so its results move from the row-major kernels' to
// these. Both sides compute every block's integer dot q . x_q exactly (at
// most 32 * 127 * 127 < 2^24, exact in fp32) and multiply it by the same
// fp32 scale d_w * d_x; they differ only in how the fp32 products are summed
// (the row-major AVX2 kernel keeps 8 lanes of partial dots per block in two
// accumulators and sums the lanes at the end; the interleaved one adds one
// product per block in order). Each order's error is within
// gamma_n * sum |terms| for n terms (n <= 8 nb + 8 here), so the two agree
// within 2 gamma_n * sum_b |d_w d_x| sum_i |q_i x_q,i|.
TEST_CASE("interleaved q8_0 gemv and gemm agree with row-major q8_0 within the fp32 summation bound",
          "[quant][interleaved][gemv]") {
  STATIC_REQUIRE(ops::interleave_q8_0<cpu::par_t> == (cpu::isa::avx512_vnni || (cpu::isa::avx2 && !cpu::isa::avx512)));
  for (const auto& s : shapes) {
    interleaved_case<quant::q8_0> c(s[0], s[1], std::uint32_t(3 * s[0] + s[1]));
    const index_t tokens = 6;  // one pass of 4 tokens, one of 2
    const auto x = testing::random_floats(std::size_t(tokens * c.cols), 17, -2.0f, 2.0f);
    std::vector<float> gemm(std::size_t(tokens * c.rows), -1.0f);
    ops::quantized_gemm(cpu::par.with_threads(2), c.m, tensor_view<const float, 2>(x.data(), {tokens, c.cols}),
                        tensor_view<float, 2>(gemm.data(), {tokens, c.rows}));
    const index_t nb = c.cols / 32;
    const double n = double(8 * nb + 8), u = std::ldexp(1.0, -24);
    const double gamma = n * u / (1.0 - n * u);
    for (index_t t = 0; t < tokens; ++t) {
      const tensor_view<const float, 1> xt(x.data() + t * c.cols, {c.cols});
      std::vector<float> interleaved(std::size_t(c.rows), -1.0f), row_major(std::size_t(c.rows), -1.0f);
      ops::quantized_gemv(cpu::par, c.m, xt, tensor_view<float, 1>(interleaved.data(), {c.rows}));
      ops::quantized_gemv(cpu::par, c.row_major, xt, tensor_view<float, 1>(row_major.data(), {c.rows}));
      cpu::detail::q8_activations act;
      cpu::detail::quantize_activations(x.data() + t * c.cols, c.cols, act);
      for (index_t r = 0; r < c.rows; ++r) {
        const auto* blocks = reinterpret_cast<const quant::block_q8_0*>(c.row_major.row(r));
        double terms = 0;
        for (index_t b = 0; b < nb; ++b) {
          double dot = 0;
          for (index_t i = 0; i < 32; ++i) dot += std::fabs(double(blocks[b].qs[i]) * act.q[std::size_t(b * 32 + i)]);
          terms += std::fabs(double(cpu::detail::fp16_to_float(blocks[b].d) * act.d[std::size_t(b)])) * dot;
        }
        INFO("row " << r << " of (" << c.rows << ", " << c.cols << "), token " << t);
        REQUIRE(gemm[std::size_t(t * c.rows + r)] == interleaved[std::size_t(r)]);
        REQUIRE(std::fabs(double(interleaved[std::size_t(r)]) - double(row_major[std::size_t(r)])) <=
                2 * gamma * terms);
      }
    }
  }
}

TEMPLATE_TEST_CASE("interleaved ops report shape mismatches", "[quant][interleaved]", quant::q4_0, quant::q8_0) {
  interleaved_case<TestType> c(16, 64, 3);
  std::vector<float> x(96), y(16);
  CHECK_THROWS_WITH(ops::quantized_gemv(cpu::par, c.m, tensor_view<const float, 1>(x.data(), {96}),
                                        tensor_view<float, 1>(y.data(), {16})),
                    Catch::Contains("quantized_gemv") && Catch::Contains("(16, 64)") && Catch::Contains("(96)"));
  std::vector<float> xt(3 * 64), yt(2 * 16);
  CHECK_THROWS_AS(ops::quantized_gemm(cpu::par, c.m, tensor_view<const float, 2>(xt.data(), {3, 64}),
                                      tensor_view<float, 2>(yt.data(), {2, 16})),
                  shape_error);
  std::vector<float> out(15 * 64);
  CHECK_THROWS_AS(ops::dequantize(cpu::par, c.m, tensor_view<float, 2>(out.data(), {15, 64})), shape_error);
  const std::vector<float> odd(8 * 40, 0.5f);
  CHECK_THROWS_AS(quant::interleaved_matrix<TestType>(tensor_view<const float, 2>(odd.data(), {8, 40})), shape_error);
}
