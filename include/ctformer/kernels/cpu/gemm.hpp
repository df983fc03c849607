// CPU GEMM: c = alpha * a b + beta * c for fp32 and bf16 inputs (fp32
// accumulation), packed and cache-blocked in the GotoBLAS / BLIS way, on the
// threads of a cpu::par_t. The micro-kernels, packing and the path for
// a few rows live in detail/gemm_*.hpp; docs/performance.md has the figures.
#pragma once

#include <algorithm>
#include <type_traits>

#include "ctformer/core/number_types.hpp"
#include "ctformer/kernels/cpu/detail/gemm_microkernel.hpp"
#include "ctformer/kernels/cpu/detail/gemm_pack.hpp"
#include "ctformer/kernels/cpu/detail/gemm_skinny.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

template <class T>
concept gemm_input = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

/// Whether this build multiplies bf16 inputs natively (AVX512_BF16's
/// vdpbf16ps, twice the fp32 rate) rather than widening them to fp32 while
/// packing: only then does rounding fp32 operands to bf16 buy speed. Behind
/// ops::gemm_bf16_native; a pointer, so the question needs no policy object.
constexpr bool gemm_bf16_native_impl(const par_t*) {
  return !std::is_same_v<detail::gemm_kernel_for<bf16>::type, detail::gemm_kernel_f32>;
}

namespace detail {

/// c = beta * c (beta == 0 writes zeros without reading c): the whole GEMM
/// when k == 0 or alpha == 0, as BLAS defines it.
inline void gemm_scale_c(tensor_view<float, 2> c, float beta) {
  for (index_t i = 0; i < c.extent(0); ++i)
    for (index_t j = 0; j < c.extent(1); ++j) c(i, j) = beta == 0.0f ? 0.0f : beta * c(i, j);
}

/// Multiplies a packed mc x kc block of A by a packed kc x nc block of B into
/// c (mc x nc), one mr x nr tile per micro-kernel call. The jr loop is outside
/// the ir loop so one kc x nr micro-panel of B stays in L1 while the micro-panels
/// of A stream from L2. Edge tiles (and a c whose columns are not contiguous)
/// go through a small local tile and are copied out element by element.
template <class Kernel>
void gemm_macro_kernel(index_t mc, index_t nc, index_t k_steps, const typename Kernel::packed_type* a_packed,
                       const typename Kernel::packed_type* b_packed, float* c, index_t c_row_stride,
                       index_t c_col_stride, float alpha, float beta) {
  constexpr index_t mr = Kernel::mr, nr = Kernel::nr;
  const index_t panel_depth = k_steps * Kernel::k_group;
  alignas(64) float tile[mr * nr];
  for (index_t j = 0; j < nc; j += nr) {
    const index_t n = std::min(nr, nc - j);
    const auto* b_panel = b_packed + j * panel_depth;
    for (index_t i = 0; i < mc; i += mr) {
      const index_t m = std::min(mr, mc - i);
      const auto* a_panel = a_packed + i * panel_depth;
      float* c_tile = c + i * c_row_stride + j * c_col_stride;
      if (m == mr && n == nr && c_col_stride == 1) {
        Kernel::run(k_steps, a_panel, b_panel, c_tile, c_row_stride, alpha, beta);
      } else {
        Kernel::run(k_steps, a_panel, b_panel, tile, nr, 1.0f, 0.0f);
        for (index_t r = 0; r < m; ++r)
          gemm_store_row(tile + r * nr, c_tile + r * c_row_stride, c_col_stride, n, alpha, beta);
      }
    }
  }
}

/// The whole blocked GEMM on the calling thread: the three cache loops
/// (jc over nc columns of B, pc over kc of the depth, ic over mc rows of A)
/// around the macro-kernel. Requires m, n, k > 0.
template <class T>
void gemm_blocked(tensor_view<const T, 2> a, tensor_view<const T, 2> b, tensor_view<float, 2> c, float alpha,
                  float beta) {
  using kernel = typename gemm_kernel_for<T>::type;
  using packed = typename kernel::packed_type;
  constexpr index_t mr = kernel::mr, nr = kernel::nr, group = kernel::k_group;
  const index_t m = c.extent(0), n = c.extent(1), k = a.extent(1);

  const index_t kc_max = std::min(kernel::kc, (k + group - 1) / group * group);
  const index_t mc_max = std::min(kernel::mc, (m + mr - 1) / mr * mr);
  const index_t nc_max = std::min(kernel::nc, (n + nr - 1) / nr * nr);
  auto* a_packed = static_cast<packed*>(gemm_scratch_for_a().get(sizeof(packed) * mc_max * kc_max));
  auto* b_packed = static_cast<packed*>(gemm_scratch_for_b().get(sizeof(packed) * kc_max * nc_max));

  for (index_t jc = 0; jc < n; jc += kernel::nc) {
    const index_t nc = std::min(kernel::nc, n - jc);
    for (index_t pc = 0; pc < k; pc += kernel::kc) {
      const index_t kc = std::min(kernel::kc, k - pc);
      const index_t k_steps = (kc + group - 1) / group;
      // Only the first depth block applies the caller's beta; later ones add to it.
      const float beta_block = pc == 0 ? beta : 1.0f;
      gemm_pack<nr, group>(b_packed, &b(pc, jc), nc, kc, b.stride(1), b.stride(0));
      for (index_t ic = 0; ic < m; ic += kernel::mc) {
        const index_t mc = std::min(kernel::mc, m - ic);
        gemm_pack<mr, group>(a_packed, &a(ic, pc), mc, kc, a.stride(0), a.stride(1));
        gemm_macro_kernel<kernel>(mc, nc, k_steps, a_packed, b_packed, &c(ic, jc), c.stride(0), c.stride(1), alpha,
                                  beta_block);
      }
    }
  }
}

/// One-thread GEMM with the edge cases BLAS defines: nothing to do for an
/// empty c, and c = beta * c when there is nothing to multiply.
template <class T>
void gemm_one_thread(tensor_view<const T, 2> a, tensor_view<const T, 2> b, tensor_view<float, 2> c, float alpha,
                     float beta) {
  if (c.extent(0) == 0 || c.extent(1) == 0) return;
  if (a.extent(1) == 0 || alpha == 0.0f) return gemm_scale_c(c, beta);
  if (gemm_skinny_applies(a, b)) return gemm_skinny(par.with_threads(1), a, b, c, alpha, beta);
  gemm_blocked(a, b, c, alpha, beta);
}

/// Rows [begin, end) of a matrix view, or columns [begin, end) with Dim = 1.
template <int Dim, class T>
tensor_view<T, 2> gemm_slice(tensor_view<T, 2> v, index_t begin, index_t end) {
  auto extents = v.extents();
  extents[Dim] = end - begin;
  return tensor_view<T, 2>(v.data() + begin * v.stride(Dim), extents, v.strides());
}

/// How many threads a GEMM of this size is worth: below about 64^3
/// multiply-adds per thread, waking another thread costs more than it saves.
inline int gemm_useful_threads(int threads, index_t m, index_t n, index_t k) {
  constexpr index_t min_work_per_thread = index_t(64) * 64 * 64;
  const index_t work = m * n * k;
  const index_t useful = std::max<index_t>(1, work / min_work_per_thread);
  return int(std::min<index_t>(threads, useful));
}

/// Splits c into a grid of rows x columns pieces, one per thread, each an
/// independent blocked GEMM (its own packed A rows and B columns). Each thread
/// re-packs the panels the others also pack, which costs (m/rows + n/cols) * k
/// copies against m * n * k / threads multiply-adds: under 1% at m = n = 1024.
/// In return the threads never wait for each other. Pick the grid whose
/// largest piece (in whole tiles) is smallest, then the one that packs least.
template <class Kernel>
void gemm_thread_grid(int threads, index_t m, index_t n, index_t k, index_t& grid_rows, index_t& grid_cols) {
  double best = -1;
  for (index_t rows = 1; rows <= threads; ++rows) {
    if (threads % rows) continue;
    const index_t cols = threads / rows;
    const index_t piece_m = ((m + rows - 1) / rows + Kernel::mr - 1) / Kernel::mr * Kernel::mr;
    const index_t piece_n = ((n + cols - 1) / cols + Kernel::nr - 1) / Kernel::nr * Kernel::nr;
    const double cost = double(piece_m) * double(piece_n) * double(k) + 8.0 * double(piece_m + piece_n) * double(k);
    if (best < 0 || cost < best) {
      best = cost;
      grid_rows = rows;
      grid_cols = cols;
    }
  }
}

/// The piece of [0, extent) that part `index` of `parts` owns, in whole tiles.
inline void gemm_split(index_t extent, index_t parts, index_t index, index_t tile, index_t& begin, index_t& end) {
  const index_t tiles = (extent + tile - 1) / tile;
  const index_t per_part = tiles / parts, extra = tiles % parts;
  const index_t first_tile = index * per_part + std::min(index, extra);
  const index_t tile_count = per_part + (index < extra ? 1 : 0);
  begin = std::min(extent, first_tile * tile);
  end = std::min(extent, (first_tile + tile_count) * tile);
}

}  // namespace detail

/// c = alpha * a b + beta * c on the policy's threads.
/// a: (M, K), b: (K, N), each row-major or column-major (or any strides); c:
/// (M, N), any strides (fastest with unit column stride). beta == 0 never reads c.
template <gemm_input T>
void gemm_impl(const par_t& exec, tensor_view<const T, 2> a, tensor_view<const T, 2> b, tensor_view<float, 2> c,
               float alpha, float beta) {
  const index_t m = c.extent(0), n = c.extent(1), k = a.extent(1);
  if (m == 0 || n == 0) return;
  if (k == 0 || alpha == 0.0f) return detail::gemm_scale_c(c, beta);
  if (detail::gemm_skinny_applies(a, b)) return detail::gemm_skinny(exec, a, b, c, alpha, beta);
  const int threads = detail::gemm_useful_threads(exec.thread_count(), m, n, k);
  if (threads > 1) {
    using kernel = typename detail::gemm_kernel_for<T>::type;
    detail::parallel_team(exec, threads, [&](int me, int team) {
      index_t grid_rows = 1, grid_cols = 1;
      detail::gemm_thread_grid<kernel>(team, m, n, k, grid_rows, grid_cols);
      index_t row_begin, row_end, col_begin, col_end;
      detail::gemm_split(m, grid_rows, me / grid_cols, kernel::mr, row_begin, row_end);
      detail::gemm_split(n, grid_cols, me % grid_cols, kernel::nr, col_begin, col_end);
      if (row_begin < row_end && col_begin < col_end) {
        detail::gemm_blocked(detail::gemm_slice<0>(a, row_begin, row_end), detail::gemm_slice<1>(b, col_begin, col_end),
                             detail::gemm_slice<1>(detail::gemm_slice<0>(c, row_begin, row_end), col_begin, col_end),
                             alpha, beta);
      }
    });
    return;
  }
  detail::gemm_blocked(a, b, c, alpha, beta);
}

/// For every i: c[i] = alpha * a[i] b[i] + beta * c[i].
/// a: (batch, M, K), b: (batch, K, N), c: (batch, M, N). Many small products
/// (attention's (B*H, T, T)) run one whole product per thread; a few large
/// ones run one after another, each on all threads.
template <gemm_input T>
void gemm_batched_impl(const par_t& exec, tensor_view<const T, 3> a, tensor_view<const T, 3> b,
                       tensor_view<float, 3> c, float alpha, float beta) {
  const index_t batch = c.extent(0), m = c.extent(1), n = c.extent(2), k = a.extent(2);
  if (batch == 0) return;
  const int threads = exec.thread_count();
  // Across the batch when every thread gets several products (the imbalance
  // of a static split is then small), or when one product is too small to
  // split well; within each product otherwise.
  const bool small_products = detail::gemm_useful_threads(threads, m, n, k) < threads;
  if (threads > 1 && batch >= threads && (batch >= 4 * index_t(threads) || small_products)) {
    detail::parallel_for(
        exec, batch, [&](index_t i) { detail::gemm_one_thread(a[i], b[i], c[i], alpha, beta); }, threads);
    return;
  }
  for (index_t i = 0; i < batch; ++i) gemm_impl(exec, a[i], b[i], c[i], alpha, beta);
}

}  // namespace ctformer::cpu
