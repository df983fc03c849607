// GEMM for a handful of rows (decode: one token per sequence), without
// packing: streams B once straight from where it lies, which is what a
// memory-bound product wants, instead of copying all of B into panels and
// computing mostly-empty register tiles.
#pragma once

#include <algorithm>

#include "ctformer/core/number_types.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/exec/cpu.hpp"
#include "ctformer/kernels/cpu/detail/gemm_microkernel.hpp"
#include "ctformer/kernels/cpu/detail/gemm_pack.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu::detail {

/// Products with at most this many rows take the unpacked path.
inline constexpr index_t gemm_skinny_max_rows = 4;

/// Columns of c one pass over k accumulates (Rows x 512 floats: 8 KiB in L1).
inline constexpr index_t gemm_skinny_columns = 512;

/// Row-major b: c[i, j0:j1] accumulates a(i, p) * b(p, j0:j1) over p, one
/// contiguous stretch of a row of b at a time. The inner loop over columns is
/// element-wise, so the compiler vectorises it for the target without
/// reassociating any sum.
template <int Rows, class T>
void gemm_skinny_row_major_b(tensor_view<const T, 2> a, tensor_view<const T, 2> b, tensor_view<float, 2> c,
                             index_t j0, index_t j1, float alpha, float beta) {
  const index_t k = a.extent(1), ldb = b.stride(0);
  alignas(64) float acc[Rows][gemm_skinny_columns];
  for (index_t start = j0; start < j1; start += gemm_skinny_columns) {
    const index_t width = std::min(gemm_skinny_columns, j1 - start);
    for (int i = 0; i < Rows; ++i)
      for (index_t j = 0; j < width; ++j) acc[i][j] = 0.0f;
    const T* b_row = b.data() + start;
    for (index_t p = 0; p < k; ++p, b_row += ldb) {
      float a_column[Rows];
      for (int i = 0; i < Rows; ++i) a_column[i] = static_cast<float>(a(i, p));
      for (index_t j = 0; j < width; ++j) {
        const float bj = static_cast<float>(b_row[j]);
        for (int i = 0; i < Rows; ++i) acc[i][j] += a_column[i] * bj;
      }
    }
    for (int i = 0; i < Rows; ++i) gemm_store_row(acc[i], &c(i, start), c.stride(1), width, alpha, beta);
  }
}

/// Column-major b (a linear layer's weight, stored (N, K), used transposed):
/// c(i, j) is a dot product of row i of a with row j of the stored weight,
/// both contiguous. a is first copied to a contiguous fp32 block (small).
/// Sixteen partial sums per row keep the loop element-wise (vectorisable
/// without reassociation) and hide the add latency.
template <int Rows, class T>
void gemm_skinny_column_major_b(const float* a_rows, index_t k, tensor_view<const T, 2> b, tensor_view<float, 2> c,
                                index_t j0, index_t j1, float alpha, float beta) {
  constexpr index_t lanes = 16;
  const index_t ldb = b.stride(1);
  for (index_t j = j0; j < j1; ++j) {
    const T* w = b.data() + j * ldb;
    float partial[Rows][lanes] = {};
    index_t p = 0;
    for (; p + lanes <= k; p += lanes) {
      float wv[lanes];
      for (index_t l = 0; l < lanes; ++l) wv[l] = static_cast<float>(w[p + l]);
      for (int i = 0; i < Rows; ++i)
        for (index_t l = 0; l < lanes; ++l) partial[i][l] += a_rows[i * k + p + l] * wv[l];
    }
    for (; p < k; ++p) {
      const float wp = static_cast<float>(w[p]);
      for (int i = 0; i < Rows; ++i) partial[i][0] += a_rows[i * k + p] * wp;
    }
    for (int i = 0; i < Rows; ++i) {
      float sum = 0.0f;
      for (index_t l = 0; l < lanes; ++l) sum += partial[i][l];
      float& out = c(i, j);
      out = beta == 0.0f ? alpha * sum : alpha * sum + beta * out;
    }
  }
}

/// True when the unpacked path handles this product: few rows, and b with
/// unit stride along one of its dimensions.
template <class T>
bool gemm_skinny_applies(tensor_view<const T, 2> a, tensor_view<const T, 2> b) {
  return a.extent(0) <= gemm_skinny_max_rows && (b.stride(1) == 1 || b.stride(0) == 1);
}

/// c = alpha * a b + beta * c for m <= gemm_skinny_max_rows, columns split
/// over the policy's threads. Requires gemm_skinny_applies, m, n, k > 0.
template <class T>
void gemm_skinny(const par_t& exec, tensor_view<const T, 2> a, tensor_view<const T, 2> b, tensor_view<float, 2> c,
                 float alpha, float beta) {
  const index_t m = c.extent(0), n = c.extent(1), k = a.extent(1);
  const bool row_major_b = b.stride(1) == 1;
  // The column-major case reads rows of a as contiguous fp32: copy them once.
  const float* a_rows = nullptr;
  if (!row_major_b) {
    auto* copy = static_cast<float*>(gemm_scratch_for_a().get(sizeof(float) * std::size_t(m * k)));
    for (index_t i = 0; i < m; ++i)
      for (index_t p = 0; p < k; ++p) copy[i * k + p] = static_cast<float>(a(i, p));
    a_rows = copy;
  }
  auto columns = [&](index_t j0, index_t j1) {
    auto run = [&]<int Rows>() {
      if (row_major_b)
        gemm_skinny_row_major_b<Rows>(a, b, c, j0, j1, alpha, beta);
      else
        gemm_skinny_column_major_b<Rows>(a_rows, k, b, c, j0, j1, alpha, beta);
    };
    switch (m) {  // the row count is a template constant so the loops unroll
      case 1: run.template operator()<1>(); break;
      case 2: run.template operator()<2>(); break;
      case 3: run.template operator()<3>(); break;
      default: run.template operator()<4>(); break;
    }
  };
  // Split the columns in whole chunks of 64 (a cache line of c per row for
  // any thread count); B is read once in total whichever thread reads it.
  constexpr index_t chunk = 64;
  const index_t chunks = (n + chunk - 1) / chunk;
  const index_t work = m * n * k;
  const int threads = int(std::min<index_t>({index_t(exec.thread_count()), chunks, std::max<index_t>(1, work / (1 << 16))}));
  if (threads <= 1) return columns(0, n);
  parallel_team(exec, threads, [&](int me, int team) {
    const index_t first = chunks * me / team, last = chunks * (me + 1) / team;
    if (first < last) columns(first * chunk, std::min(n, last * chunk));
  });
}

}  // namespace ctformer::cpu::detail
