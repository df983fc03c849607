// GEMM micro-kernels: the register-blocked inner loop that multiplies one packed
// micro-panel of A by one of B, one kernel per instruction set, picked at
// compile time from kernels/cpu/isa.hpp (the user's -m flags decide).
#pragma once

#include <cstdint>

#include "ctformer/core/number_types.hpp"
#include "ctformer/core/tensor_view.hpp"

#include "ctformer/kernels/cpu/isa.hpp"

// CTFORMER_GEMM_UNROLL(n): unroll the next loop n times (g++ and clang).
// nvcc's front end, which reads these headers when a .cu file includes
// ctformer.hpp, does not know the pragma, so there it is left out.
#if defined(__GNUC__) && !defined(__CUDACC__)
#define CTFORMER_GEMM_PRAGMA(text) _Pragma(#text)
#define CTFORMER_GEMM_UNROLL(n) CTFORMER_GEMM_PRAGMA(GCC unroll n)
#else
#define CTFORMER_GEMM_UNROLL(n)
#endif

// Vocabulary used in every GEMM file (GotoBLAS / BLIS names, kept because every
// paper and library uses them):
//   mr x nr  the register tile: the micro-kernel keeps an mr-row, nr-column block
//            of C in vector registers for the whole k loop.
//   kc       depth of one packed block (how many k values a micro-kernel call sums):
//            a kc x nr micro-panel of B stays in the L1 cache.
//   mc       rows of A packed at once: the mc x kc block of A stays in L2.
//   nc       columns of B packed at once: the kc x nc block of B stays in L3.
// A packed micro-panel of A holds, for each k, mr consecutive values (one per
// row); a packed micro-panel of B holds, for each k, nr consecutive values (one
// per column). Rows or columns past the matrix edge are packed as zeros, so the
// kernel always computes a full mr x nr tile.
//
// k_group: how many consecutive k values sit next to each other inside a lane.
// It is 1 for fp32; the AVX512_BF16 kernel reads bf16 pairs (k, k+1) because
// vdpbf16ps multiplies pairs and adds both products into one fp32 lane.

namespace ctformer::cpu::detail {

/// Writes c = alpha * acc + beta * c for one row of n values (n <= nr); the
/// scalar tail shared by every kernel's edge tiles. beta == 0 never reads c.
inline void gemm_store_row(const float* acc, float* c, index_t c_col_stride, index_t n, float alpha, float beta) {
  if (beta == 0.0f) {
    for (index_t j = 0; j < n; ++j) c[j * c_col_stride] = alpha * acc[j];
  } else {
    for (index_t j = 0; j < n; ++j) c[j * c_col_stride] = alpha * acc[j] + beta * c[j * c_col_stride];
  }
}

#if defined(CTFORMER_CPU_AVX512)

/// AVX-512F fp32 kernel: a 12 x 32 tile of C in 24 zmm accumulators, two zmm
/// loads of B and twelve broadcasts of A per k, leaving registers for the
/// operands so nothing spills.
struct gemm_kernel_f32_avx512 {
  using packed_type = float;
  static constexpr index_t mr = 12, nr = 32, k_group = 1;
  // Sized for the caches of AVX-512 server cores (48 KiB L1, 2 MiB L2):
  // kc * nr * 4 bytes = 32 KiB of B per micro-panel in L1; mc * kc * 4 =
  // 384 KiB of A in L2; kc * nc * 4 = 4 MiB of B in L3.
  static constexpr index_t mc = 384, kc = 256, nc = 4096;

  /// c (mr x nr, row stride ldc, unit column stride) = alpha * a b + beta * c.
  static void run(index_t k_steps, const float* __restrict a, const float* __restrict b, float* __restrict c,
                  index_t ldc, float alpha, float beta) {
    __m512 acc[mr][2];
CTFORMER_GEMM_UNROLL(12)
    for (int i = 0; i < mr; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (index_t p = 0; p < k_steps; ++p) {
      const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
CTFORMER_GEMM_UNROLL(12)
      for (int i = 0; i < mr; ++i) {
        const __m512 ai = _mm512_set1_ps(a[i]);
        acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
      }
      a += mr;
      b += nr;
    }
    store(acc, c, ldc, alpha, beta);
  }

  static void store(__m512 (&acc)[mr][2], float* c, index_t ldc, float alpha, float beta) {
    const __m512 va = _mm512_set1_ps(alpha);
    if (beta == 0.0f) {
CTFORMER_GEMM_UNROLL(12)
      for (int i = 0; i < mr; ++i) {
        _mm512_storeu_ps(c + i * ldc, _mm512_mul_ps(va, acc[i][0]));
        _mm512_storeu_ps(c + i * ldc + 16, _mm512_mul_ps(va, acc[i][1]));
      }
    } else {
      const __m512 vb = _mm512_set1_ps(beta);
CTFORMER_GEMM_UNROLL(12)
      for (int i = 0; i < mr; ++i) {
        float* row = c + i * ldc;
        _mm512_storeu_ps(row, _mm512_fmadd_ps(va, acc[i][0], _mm512_mul_ps(vb, _mm512_loadu_ps(row))));
        _mm512_storeu_ps(row + 16, _mm512_fmadd_ps(va, acc[i][1], _mm512_mul_ps(vb, _mm512_loadu_ps(row + 16))));
      }
    }
  }
};

#endif  // CTFORMER_CPU_AVX512

#if defined(CTFORMER_CPU_AVX512_BF16)

/// AVX512_BF16 kernel: bf16 inputs, fp32 accumulation with vdpbf16ps. Each
/// packed lane holds the pair (k, k+1); one vdpbf16ps multiplies 16 pairs and
/// adds both products to 16 fp32 accumulators, so a step covers two k values.
/// Same 12 x 32 tile and store as the fp32 AVX-512 kernel.
struct gemm_kernel_bf16_avx512 {
  using packed_type = bf16;
  static constexpr index_t mr = 12, nr = 32, k_group = 2;
  // kc counts k values: a kc x nr bf16 micro-panel of B is 32 KiB, as for fp32.
  static constexpr index_t mc = 384, kc = 512, nc = 4096;

  /// k_steps is the number of k pairs (kc rounded up to even, halved).
  static void run(index_t k_steps, const bf16* __restrict a, const bf16* __restrict b, float* __restrict c,
                  index_t ldc, float alpha, float beta) {
    __m512 acc[mr][2];
CTFORMER_GEMM_UNROLL(12)
    for (int i = 0; i < mr; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (index_t p = 0; p < k_steps; ++p) {
      // 32 columns x 2 k values of B: two zmm of 16 bf16 pairs each.
      const __m512bh b0 = (__m512bh)_mm512_load_si512(reinterpret_cast<const void*>(b));
      const __m512bh b1 = (__m512bh)_mm512_load_si512(reinterpret_cast<const void*>(b + 32));
CTFORMER_GEMM_UNROLL(12)
      for (int i = 0; i < mr; ++i) {
        // The pair a(i, k), a(i, k+1) as one 32-bit value, broadcast to all 16 lanes.
        std::int32_t pair;
        __builtin_memcpy(&pair, a + 2 * i, sizeof pair);
        const __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
      }
      a += 2 * mr;
      b += 2 * nr;
    }
    gemm_kernel_f32_avx512::store(acc, c, ldc, alpha, beta);
  }
};

#endif  // CTFORMER_CPU_AVX512_BF16

#if defined(CTFORMER_CPU_AVX2)

/// AVX2 + FMA fp32 kernel: a 6 x 16 tile of C in
/// 12 ymm accumulators; per k two ymm loads of B and six broadcasts of A feed
/// 12 FMAs, which keeps both FMA pipes busy (16 ymm registers: 12 + 2 + 1).
struct gemm_kernel_f32_avx2 {
  using packed_type = float;
  static constexpr index_t mr = 6, nr = 16, k_group = 1;
  // kc * nr * 4 = 16 KiB of B per micro-panel in a 32 KiB L1; mc * kc * 4 =
  // 240 KiB of A, half a 512 KiB L2; kc * nc * 4 = 4 MiB of B in the shared
  // L3. Speed is flat over a wide range of mc and kc around these
  // (docs/performance.md), so they are not tuned per machine.
  static constexpr index_t mc = 240, kc = 256, nc = 4080;

  static void run(index_t k_steps, const float* __restrict a, const float* __restrict b, float* __restrict c,
                  index_t ldc, float alpha, float beta) {
    __m256 acc[mr][2];
CTFORMER_GEMM_UNROLL(6)
    for (int i = 0; i < mr; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    // C is written once at the end; ask for its lines now so the stores do not wait.
CTFORMER_GEMM_UNROLL(6)
    for (int i = 0; i < mr; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + nr - 1), _MM_HINT_T0);
    }
CTFORMER_GEMM_UNROLL(4)
    for (index_t p = 0; p < k_steps; ++p) {
      const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
CTFORMER_GEMM_UNROLL(6)
      for (int i = 0; i < mr; ++i) {
        const __m256 ai = _mm256_broadcast_ss(a + i);
        acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
      }
      a += mr;
      b += nr;
    }
    const __m256 va = _mm256_set1_ps(alpha);
    if (beta == 0.0f) {
CTFORMER_GEMM_UNROLL(6)
      for (int i = 0; i < mr; ++i) {
        _mm256_storeu_ps(c + i * ldc, _mm256_mul_ps(va, acc[i][0]));
        _mm256_storeu_ps(c + i * ldc + 8, _mm256_mul_ps(va, acc[i][1]));
      }
    } else {
      const __m256 vb = _mm256_set1_ps(beta);
CTFORMER_GEMM_UNROLL(6)
      for (int i = 0; i < mr; ++i) {
        float* row = c + i * ldc;
        _mm256_storeu_ps(row, _mm256_fmadd_ps(va, acc[i][0], _mm256_mul_ps(vb, _mm256_loadu_ps(row))));
        _mm256_storeu_ps(row + 8, _mm256_fmadd_ps(va, acc[i][1], _mm256_mul_ps(vb, _mm256_loadu_ps(row + 8))));
      }
    }
  }
};

#endif  // CTFORMER_CPU_AVX2

/// Portable fp32 kernel: plain C++ the compiler vectorises for whatever target
/// it has (SSE2, NEON, ...). A 4 x 8 tile fits the 16 registers of SSE2 as 8
/// accumulators; wider targets still get full vectors along the 8 columns.
struct gemm_kernel_f32_portable {
  using packed_type = float;
  static constexpr index_t mr = 4, nr = 8, k_group = 1;
  static constexpr index_t mc = 128, kc = 256, nc = 4096;

  static void run(index_t k_steps, const float* __restrict a, const float* __restrict b, float* __restrict c,
                  index_t ldc, float alpha, float beta) {
    float acc[mr][nr] = {};
    for (index_t p = 0; p < k_steps; ++p) {
      for (int i = 0; i < mr; ++i) {
        const float ai = a[i];
        for (int j = 0; j < nr; ++j) acc[i][j] += ai * b[j];
      }
      a += mr;
      b += nr;
    }
    for (int i = 0; i < mr; ++i) gemm_store_row(acc[i], c + i * ldc, 1, nr, alpha, beta);
  }
};

/// The fp32 kernel for the instruction set being compiled for.
#if defined(CTFORMER_CPU_AVX512)
using gemm_kernel_f32 = gemm_kernel_f32_avx512;
#elif defined(CTFORMER_CPU_AVX2)
using gemm_kernel_f32 = gemm_kernel_f32_avx2;
#else
using gemm_kernel_f32 = gemm_kernel_f32_portable;
#endif

/// The kernel for input type T: fp32 inputs use the fp32 kernel; bf16 inputs
/// use vdpbf16ps where the target has AVX512_BF16, and otherwise are widened
/// to fp32 while packing (exact: a bf16 is the top half of a float) and reuse
/// the fp32 kernel.
template <class T>
struct gemm_kernel_for {
  using type = gemm_kernel_f32;
};
#if defined(CTFORMER_CPU_AVX512_BF16)
template <>
struct gemm_kernel_for<bf16> {
  using type = gemm_kernel_bf16_avx512;
};
#endif

}  // namespace ctformer::cpu::detail
