// ops::quantized_gemv and ops::quantized_gemm against fp32 products with the
// dequantized weights, on every format, 1 and 2 threads, odd shapes.
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

namespace {

template <class F>
struct packed_case {
  index_t rows, cols;
  std::vector<float> w, wd;  // original and dequantized, (rows, cols)
  quant::packed_matrix<F> p;
  packed_case(index_t r, index_t c, std::uint32_t seed)
      : rows(r), cols(c), w(testing::random_floats(std::size_t(r * c), seed)), wd(w.size()),
        p(tensor_view<const float, 2>(w.data(), {r, c})) {
    p.dequantize(tensor_view<float, 2>(wd.data(), {r, c}));
  }
};

// The int8 path rounds x to blocks of 32 with scale d_b = max|x_b| / 127, so
// it computes dequantized(W) x' with |x - x'| <= d_b / 2 elementwise. Bound
// per row: sum_b d_b/2 * sum_{i in b} |W'[r,i]|, plus fp32 summation error
// (~ 1e-5 of sum |W' x|). Columns past the last block stay fp32 (int8_rowwise).
template <class F>
std::vector<double> gemv_bound(const packed_case<F>& c, const std::vector<float>& x) {
  std::vector<double> bound(std::size_t(c.rows));
  const bool int_path = cpu::detail::uses_q8_activations<F>;
  for (index_t r = 0; r < c.rows; ++r) {
    double b = 0, mag = 0;
    for (index_t blk = 0; blk * 32 < c.cols; ++blk) {
      const index_t end = std::min(c.cols, blk * 32 + 32);
      if (end - blk * 32 < 32) {  // tail: fp32
        for (index_t i = blk * 32; i < end; ++i) mag += std::fabs(double(c.wd[std::size_t(r * c.cols + i)]) * x[std::size_t(i)]);
        continue;
      }
      double amax = 0, wsum = 0;
      for (index_t i = blk * 32; i < end; ++i) {
        amax = std::max(amax, std::fabs(double(x[std::size_t(i)])));
        wsum += std::fabs(double(c.wd[std::size_t(r * c.cols + i)]));
        mag += std::fabs(double(c.wd[std::size_t(r * c.cols + i)]) * x[std::size_t(i)]);
      }
      if (int_path) b += amax / 127.0 / 2.0 * wsum * (1 + 1e-5);
    }
    bound[std::size_t(r)] = b + 1e-5 * mag + 1e-6;
  }
  return bound;
}

template <class F>
void check_gemv(index_t rows, index_t cols, int threads) {
  packed_case<F> c(rows, cols, std::uint32_t(rows * 7 + cols));
  auto x = testing::random_floats(std::size_t(cols), 99, -2.0f, 2.0f);
  x[0] = 0.0f;
  std::vector<float> y(std::size_t(rows), -1.0f);
  ops::quantized_gemv(cpu::par.with_threads(threads), c.p, tensor_view<const float, 1>(x.data(), {cols}),
                      tensor_view<float, 1>(y.data(), {rows}));
  const auto bound = gemv_bound(c, x);
  for (index_t r = 0; r < rows; ++r) {
    double ref = 0;
    for (index_t i = 0; i < cols; ++i) ref += double(c.wd[std::size_t(r * cols + i)]) * x[std::size_t(i)];
    INFO("format " << F::name << " row " << r << " of (" << rows << ", " << cols << "), threads " << threads);
    REQUIRE(std::fabs(double(y[std::size_t(r)]) - ref) <= bound[std::size_t(r)]);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("quantized_gemv equals the dequantized product within the activation-rounding bound",
                   "[quant][gemv]", quant::q8_0, quant::q4_0, quant::int8_rowwise, quant::bf16_weights, quant::fp32) {
  for (int threads : {1, 2}) {
    check_gemv<TestType>(1, 32, threads);
    check_gemv<TestType>(7, 96, threads);      // odd rows, odd block count
    check_gemv<TestType>(301, 256, threads);   // big enough to be split over threads
    check_gemv<TestType>(33, 768, threads);
  }
}

TEMPLATE_TEST_CASE("a row's gemv result does not depend on its neighbours or the thread count", "[quant][gemv]",
                   quant::q8_0, quant::q4_0) {
  // The AVX2 q4_0 kernel takes rows two at a time, and how rows pair up
  // depends on where each thread's range starts; every row must still get
  // the bits it gets alone (same operations in the same order), so no
  // tolerance: exact equality.
  constexpr index_t rows = 301, cols = 768;  // 301 x 768 packed is past the 64 KiB that splits over threads
  packed_case<TestType> c(rows, cols, 21);
  const auto x = testing::random_floats(std::size_t(cols), 22);
  const tensor_view<const float, 1> xv(x.data(), {cols});
  std::vector<float> one_thread(rows), two_threads(rows);
  ops::quantized_gemv(cpu::par.with_threads(1), c.p, xv, tensor_view<float, 1>(one_thread.data(), {rows}));
  ops::quantized_gemv(cpu::par.with_threads(2), c.p, xv, tensor_view<float, 1>(two_threads.data(), {rows}));
  CHECK(one_thread == two_threads);
  int differing = 0;
  for (index_t r = 0; r < rows; ++r) {
    const quant::packed_matrix<TestType> single(tensor_view<const float, 2>(c.w.data() + r * cols, {1, cols}));
    float alone = 0.0f;
    ops::quantized_gemv(cpu::par, single, xv, tensor_view<float, 1>(&alone, {1}));
    if (alone != one_thread[std::size_t(r)]) ++differing;
  }
  CHECK(differing == 0);
}

TEST_CASE("int8_rowwise gemv handles columns past the last block of 32", "[quant][gemv]") {
  for (index_t cols : {1, 31, 45, 100}) check_gemv<quant::int8_rowwise>(9, cols, 2);
  check_gemv<quant::bf16_weights>(9, 45, 1);
  check_gemv<quant::fp32>(9, 45, 1);
}

TEST_CASE("quantized_gemv reads a strided x", "[quant][gemv]") {
  packed_case<quant::q8_0> c(5, 64, 3);
  auto x2 = testing::random_floats(128, 4);
  std::vector<float> x(64), y(5), y_strided(5);
  for (int i = 0; i < 64; ++i) x[std::size_t(i)] = x2[std::size_t(2 * i)];
  ops::quantized_gemv(cpu::par, c.p, tensor_view<const float, 1>(x.data(), {64}), tensor_view<float, 1>(y.data(), {5}));
  ops::quantized_gemv(cpu::par, c.p, tensor_view<const float, 1>(x2.data(), {64}, {2}),
                      tensor_view<float, 1>(y_strided.data(), {5}));
  CHECK(y == y_strided);
}

TEST_CASE("quantized_gemv and gemm report shape mismatches", "[quant][gemv]") {
  packed_case<quant::q4_0> c(5, 64, 5);
  std::vector<float> x(96), y(5);
  CHECK_THROWS_WITH(ops::quantized_gemv(cpu::par, c.p, tensor_view<const float, 1>(x.data(), {96}),
                                        tensor_view<float, 1>(y.data(), {5})),
                    Catch::Contains("quantized_gemv") && Catch::Contains("(5, 64)") && Catch::Contains("(96)"));
  CHECK_THROWS_AS(ops::quantized_gemv(cpu::par, c.p, tensor_view<const float, 1>(x.data(), {64}),
                                      tensor_view<float, 1>(y.data(), {4})),
                  shape_error);
  std::vector<float> xt(3 * 64), yt(2 * 5);
  CHECK_THROWS_AS(ops::quantized_gemm(cpu::par, c.p, tensor_view<const float, 2>(xt.data(), {3, 64}),
                                      tensor_view<float, 2>(yt.data(), {2, 5})),
                  shape_error);
}

TEMPLATE_TEST_CASE("quantized_gemm equals x times the dequantized weights", "[quant][gemm]", quant::q8_0, quant::q4_0,
                   quant::int8_rowwise, quant::bf16_weights, quant::fp32) {
  // Token counts that exercise the 4-token tiles and their tails; row counts
  // that exercise the 48-row weight tiles and the 3-row micro tiles.
  for (auto [tokens, rows, cols] : {std::tuple<index_t, index_t, index_t>{2, 7, 64}, {5, 50, 96}, {13, 101, 256}}) {
    for (int threads : {1, 2}) {
      packed_case<TestType> c(rows, cols, std::uint32_t(tokens + rows));
      const auto x = testing::random_floats(std::size_t(tokens * cols), 7);
      std::vector<float> y(std::size_t(tokens * rows), -1.0f);
      ops::quantized_gemm(cpu::par.with_threads(threads), c.p, tensor_view<const float, 2>(x.data(), {tokens, cols}),
                          tensor_view<float, 2>(y.data(), {tokens, rows}));
      for (index_t t = 0; t < tokens; ++t)
        for (index_t r = 0; r < rows; ++r) {
          double ref = 0, mag = 0;
          for (index_t i = 0; i < cols; ++i) {
            const double p = double(c.wd[std::size_t(r * cols + i)]) * x[std::size_t(t * cols + i)];
            ref += p;
            mag += std::fabs(p);
          }
          // fp32 dots of dequantized weights: only summation order differs.
          INFO(TestType::name << " token " << t << " row " << r);
          REQUIRE(std::fabs(double(y[std::size_t(t * rows + r)]) - ref) <= 1e-5 * mag + 1e-6);
        }
    }
  }
}

TEST_CASE("quantized_gemm with one token is the gemv", "[quant][gemm]") {
  packed_case<quant::q8_0> c(40, 128, 11);
  const auto x = testing::random_floats(128, 12);
  std::vector<float> y1(40), y2(40);
  ops::quantized_gemv(cpu::par, c.p, tensor_view<const float, 1>(x.data(), {128}), tensor_view<float, 1>(y1.data(), {40}));
  ops::quantized_gemm(cpu::par, c.p, tensor_view<const float, 2>(x.data(), {1, 128}),
                      tensor_view<float, 2>(y2.data(), {1, 40}));
  CHECK(y1 == y2);
}
