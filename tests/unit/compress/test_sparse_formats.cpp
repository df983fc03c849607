// quant::sparse_2of4 and quant::sparse_half: exact round trip of pruned
// matrices, storage size, and ops::quantized_gemv / quantized_gemm on the
// packed matrices against dense fp32 products with the pruned matrix.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "ctformer/compress/pruning.hpp"
#include "ctformer/exec/cpu.hpp"
#include "ctformer/kernels/cpu/quantize.hpp"
#include "ctformer/kernels/cpu/sparse_gemv.hpp"
#include "ctformer/ops/quantize.hpp"
#include "ctformer/quant/sparse_formats.hpp"
#include "../../support/test_support.hpp"

using namespace ctformer;

namespace {
// A random (rows, cols) matrix pruned the way Format stores it.
template <class Format>
std::vector<float> pruned_matrix(index_t rows, index_t cols, std::uint32_t seed) {
  auto w = testing::random_floats(std::size_t(rows * cols), seed);
  const tensor_view<float, 2> v(w.data(), {rows, cols});
  if constexpr (std::is_same_v<Format, quant::sparse_2of4>) compress::prune_2of4(v);
  else compress::prune_magnitude(v, 0.5, compress::prune_scope::per_row);
  return w;
}
}  // namespace

TEMPLATE_TEST_CASE("sparse formats hold pruned matrices exactly in 17 bits per weight", "[compress][quant]",
                   quant::sparse_2of4, quant::sparse_half) {
  const index_t rows = 13, cols = 160;
  const auto w = pruned_matrix<TestType>(rows, cols, 21);
  const quant::packed_matrix<TestType> p(tensor_view<const float, 2>(w.data(), {rows, cols}));
  std::vector<float> back(w.size(), -1.0f);
  p.dequantize(tensor_view<float, 2>(back.data(), {rows, cols}));
  CHECK(back == w);  // bit-exact: values are stored as the fp32 they were
  // 16 bits of value + 1 bit of position per weight: 17/32 of fp32.
  CHECK(p.bytes() * 32 == std::size_t(rows * cols) * sizeof(float) * 17);
  // Packing an unpruned matrix prunes it the same way compress:: does.
  const auto dense = testing::random_floats(std::size_t(rows * cols), 21);
  const quant::packed_matrix<TestType> q(tensor_view<const float, 2>(dense.data(), {rows, cols}));
  q.dequantize(tensor_view<float, 2>(back.data(), {rows, cols}));
  CHECK(back == w);
  CHECK_THROWS_AS(quant::packed_matrix<TestType>(2, 48), shape_error);  // not a multiple of 32 columns
}

TEMPLATE_TEST_CASE("sparse GEMV and GEMM equal the dense products with the pruned matrix", "[compress][quant]",
                   quant::sparse_2of4, quant::sparse_half) {
  // 96 columns leave the sparse_half vector loop a scalar tail; 512 x 1024
  // (1 MiB packed) is large enough to split rows over threads.
  for (auto [rows, cols] : {std::pair<index_t, index_t>{7, 96}, {64, 256}, {512, 1024}}) {
    for (int threads : {1, 2}) {
      const auto exec = cpu::par.with_threads(threads);
      const auto w = pruned_matrix<TestType>(rows, cols, 31);
      const quant::packed_matrix<TestType> p(tensor_view<const float, 2>(w.data(), {rows, cols}));
      const index_t tokens = 5;
      const auto x = testing::random_floats(std::size_t(tokens * cols), 32);
      std::vector<float> y(static_cast<std::size_t>(rows)), ym(std::size_t(tokens * rows));
      ops::quantized_gemv(exec, p, tensor_view<const float, 1>(x.data(), {cols}), tensor_view<float, 1>(y.data(), {rows}));
      ops::quantized_gemm(exec, p, tensor_view<const float, 2>(x.data(), {tokens, cols}),
                          tensor_view<float, 2>(ym.data(), {tokens, rows}));
      // Reference in double. The kernels sum the same products in fp32 in
      // another order: error <= ~cols * 2^-24 * sum |w x|; 1e-5 of sum |w x|
      // bounds it for cols <= 1024 with room to spare.
      for (index_t t = 0; t < tokens; ++t)
        for (index_t r = 0; r < rows; ++r) {
          double ref = 0, mag = 0;
          for (index_t c = 0; c < cols; ++c) {
            ref += double(w[std::size_t(r * cols + c)]) * double(x[std::size_t(t * cols + c)]);
            mag += std::fabs(double(w[std::size_t(r * cols + c)]) * double(x[std::size_t(t * cols + c)]));
          }
          if (t == 0) CHECK(std::fabs(double(y[std::size_t(r)]) - ref) <= 1e-5 * mag + 1e-30);
          CHECK(std::fabs(double(ym[std::size_t(t * rows + r)]) - ref) <= 1e-5 * mag + 1e-30);
        }
    }
  }
}
