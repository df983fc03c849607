// ops::linear on every weight matrix type: fp32 views, mixed-precision bf16
// operands, packed and interleaved quantized matrices; each batched row
// against the one-row GEMV (the decode path), accumulation, shape errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "kernel_test_util.hpp"

using namespace ctformer;
using namespace ctformer::testing;

namespace {

constexpr index_t in = 96, out = 40;

std::vector<float> gemv_rows(const auto& w, const std::vector<float>& x, index_t rows) {
  std::vector<float> y(std::size_t(rows * out));
  for (index_t r = 0; r < rows; ++r)
    ops::quantized_gemv(cpu::par, w, tensor_view<const float, 1>(x.data() + r * in, {in}),
                        tensor_view<float, 1>(y.data() + r * out, {out}));
  return y;
}

}  // namespace

TEST_CASE("linear over packed fp32 weights: up to 32 rows each row gets the GEMV's bits", "[ops][linear]") {
  const auto w = random_floats(std::size_t(out * in), 1);
  const quant::packed_matrix<quant::fp32> packed(tensor_view<const float, 2>(w.data(), {out, in}));
  for (index_t rows : {1, 2, 3, 5, 16, 32, 33, 48}) {
    CAPTURE(rows);
    const auto x = random_floats(std::size_t(rows * in), 2 + unsigned(rows));
    std::vector<float> y(std::size_t(rows * out), -1.0f);
    ops::linear(cpu::par.with_threads(2), tensor_view<const float, 2>(x.data(), {rows, in}), packed,
                tensor_view<float, 2>(y.data(), {rows, out}));
    const auto expected = gemv_rows(packed, x, rows);
    if (rows <= cpu::linear_gemv_max_rows) {
      CHECK(y == expected);
    } else {
      // The blocked GEMM: the same 96 products summed in another order, each
      // dot of terms in [-1, 1] within a few ulp of 96: 1e-5 absolute.
      check_close(y, std::vector<double>(expected.begin(), expected.end()), 1e-5, 0.0, "y");
    }
    // Accumulating adds the same product to what y held.
    std::vector<float> z(y.size(), 0.5f);
    ops::linear(cpu::par, tensor_view<const float, 2>(x.data(), {rows, in}), packed,
                tensor_view<float, 2>(z.data(), {rows, out}), true);
    for (std::size_t i = 0; i < z.size(); ++i) CHECK(z[i] == Approx(0.5f + y[i]).margin(1e-5));
  }
}

TEST_CASE("linear over interleaved q4_0 and q8_0: every row gets the GEMV's bits", "[ops][linear][quant]") {
  const auto w = random_floats(std::size_t(out * in), 3);
  const tensor_view<const float, 2> wv(w.data(), {out, in});
  const quant::interleaved_matrix<quant::q4_0> q4(wv);
  const quant::interleaved_matrix<quant::q8_0> q8{quant::packed_matrix<quant::q8_0>(wv)};
  for (index_t rows : {1, 4, 7, 20}) {
    CAPTURE(rows);
    const auto x = random_floats(std::size_t(rows * in), 4 + unsigned(rows));
    std::vector<float> y4(std::size_t(rows * out)), y8(std::size_t(rows * out));
    ops::linear(cpu::par.with_threads(2), tensor_view<const float, 2>(x.data(), {rows, in}), q4,
                tensor_view<float, 2>(y4.data(), {rows, out}));
    ops::linear(cpu::par.with_threads(2), tensor_view<const float, 2>(x.data(), {rows, in}), q8,
                tensor_view<float, 2>(y8.data(), {rows, out}));
    CHECK(y4 == gemv_rows(q4, x, rows));
    CHECK(y8 == gemv_rows(q8, x, rows));
  }
}

TEST_CASE("linear over fp32 views and mixed-precision bf16 operands equals the GEMM it stands for", "[ops][linear]") {
  const index_t rows = 9;
  const auto w = random_floats(std::size_t(out * in), 5), x = random_floats(std::size_t(rows * in), 6);
  const tensor_view<const float, 2> wv(w.data(), {out, in}), xv(x.data(), {rows, in});
  std::vector<float> y(std::size_t(rows * out)), reference(y.size());
  ops::linear(cpu::par, xv, wv, tensor_view<float, 2>(y.data(), {rows, out}));
  ops::gemm(cpu::par, xv, wv.transposed(), tensor_view<float, 2>(reference.data(), {rows, out}));
  CHECK(y == reference);  // the same GEMM call

  // bf16: the weight rounded once, the activation rounded into scratch.
  std::vector<bf16> wb(w.size()), xb(x.size()), scratch_a(x.size()), scratch_b(x.size());
  for (std::size_t i = 0; i < w.size(); ++i) wb[i] = bf16(w[i]);
  for (std::size_t i = 0; i < x.size(); ++i) xb[i] = bf16(x[i]);
  const ops::mixed_precision_weight<bf16> mixed{tensor_view<const bf16, 2>(wb.data(), {out, in}),
                                                tensor_view<bf16, 1>(scratch_a.data(), {index_t(scratch_a.size())}),
                                                tensor_view<bf16, 1>(scratch_b.data(), {index_t(scratch_b.size())})};
  ops::linear(cpu::par, xv, mixed, tensor_view<float, 2>(y.data(), {rows, out}));
  ops::gemm(cpu::par, tensor_view<const bf16, 2>(xb.data(), {rows, in}),
            tensor_view<const bf16, 2>(wb.data(), {out, in}).transposed(),
            tensor_view<float, 2>(reference.data(), {rows, out}));
  CHECK(y == reference);

  // A scratch too small for the operand, and shapes that do not fit: clear errors.
  const ops::mixed_precision_weight<bf16> small{mixed.weight, tensor_view<bf16, 1>(scratch_a.data(), {10}),
                                                mixed.scratch_b};
  CHECK_THROWS_WITH(ops::linear(cpu::par, xv, small, tensor_view<float, 2>(y.data(), {rows, out})),
                    Catch::Contains("mixed-precision scratch"));
  CHECK_THROWS_AS(ops::linear(cpu::par, xv, wv, tensor_view<float, 2>(y.data(), {rows, out - 1})), shape_error);
  CHECK_THROWS_AS(ops::linear(cpu::par, tensor_view<const float, 2>(x.data(), {rows, in - 1}), wv,
                              tensor_view<float, 2>(y.data(), {rows, out})),
                  shape_error);
}
