// GEMM packing: copies blocks of A and B into the micro-panel layout the
// micro-kernels read, converting the element type on the way, and the
// per-thread scratch memory the packed blocks live in.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>
#include <type_traits>

#include "ctformer/core/number_types.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/kernels/cpu/detail/gemm_microkernel.hpp"
#include "ctformer/kernels/cpu/isa.hpp"

namespace ctformer::cpu::detail {

/// Memory for packed panels, one per thread and per role (A or B), that grows
/// to the largest request and is then reused: GEMM allocates nothing per call
/// in steady state. 64-byte aligned so aligned vector loads never split a
/// cache line. OpenMP keeps its worker threads alive between parallel regions,
/// so the workers' scratch survives between calls too.
class gemm_scratch {
 public:
  gemm_scratch() = default;
  gemm_scratch(const gemm_scratch&) = delete;
  gemm_scratch& operator=(const gemm_scratch&) = delete;
  ~gemm_scratch() { std::free(data_); }

  /// At least `bytes` bytes, 64-byte aligned; contents are not preserved when it grows.
  void* get(std::size_t bytes) {
    if (bytes > capacity_) {
      std::free(data_);
      data_ = nullptr;
      capacity_ = 0;
      const std::size_t rounded = (bytes + 4095) / 4096 * 4096;  // whole pages: fewer regrowths, no split TLB entries
      data_ = std::aligned_alloc(4096, rounded);
      if (!data_) throw std::bad_alloc();
      capacity_ = rounded;
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  std::size_t capacity_ = 0;
};

inline gemm_scratch& gemm_scratch_for_a() {
  thread_local gemm_scratch scratch;
  return scratch;
}
inline gemm_scratch& gemm_scratch_for_b() {
  thread_local gemm_scratch scratch;
  return scratch;
}

/// Converts one input element to the packed type (fp32, or bf16 kept as is).
template <class Out, class In>
inline Out gemm_pack_convert(In x) {
  if constexpr (std::is_same_v<Out, In>)
    return x;
  else
    return static_cast<Out>(x);  // bf16 -> float: exact
}

#if defined(CTFORMER_CPU_AVX2)
/// Eight consecutive values as fp32 (bf16 widens exactly: shift into the top half).
inline __m256 gemm_load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 gemm_load8(const bf16* p) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

/// Transposes the 8 x 8 block held in r (r[i][j] becomes r[j][i]).
inline void gemm_transpose8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/// Stores the first `count` (1..8) floats of v. Built from 4-, 2- and 1-wide
/// stores rather than a masked store, which is microcoded and slow on AMD.
inline void gemm_store_first(float* dst, __m256 v, int count) {
  if (count == 8) return _mm256_storeu_ps(dst, v);
  __m128 part = _mm256_castps256_ps128(v);
  if (count >= 4) {
    _mm_storeu_ps(dst, part);
    part = _mm256_extractf128_ps(v, 1);
    dst += 4;
    count -= 4;
  }
  if (count >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(dst), part);
    part = _mm_movehl_ps(part, part);
    dst += 2;
    count -= 2;
  }
  if (count == 1) _mm_store_ss(dst, part);
}

/// Packs `count` (1..8) lanes x 8 consecutive k, k contiguous in the source,
/// into dst[k * Panel + lane] through one register transpose: eight vector
/// loads and stores instead of 64 scalar moves. Missing lanes are neither
/// read nor written.
template <index_t Panel, class In>
inline void gemm_pack_8k(float* dst, const In* src, index_t lane_stride, int count) {
  __m256 r[8];
  for (int lane = 0; lane < 8; ++lane) r[lane] = lane < count ? gemm_load8(src + lane * lane_stride) : _mm256_setzero_ps();
  gemm_transpose8(r);
  for (int k = 0; k < 8; ++k) gemm_store_first(dst + k * Panel, r[k], count);
}
#endif  // CTFORMER_CPU_AVX2

/// Packs a block of `lanes` x `depth` values of a strided matrix into panels
/// of Panel lanes: element (lane, k) of the source sits at
/// src[lane * lane_stride + k * k_stride]. Panel number q holds lanes
/// [q*Panel, q*Panel + Panel) and is laid out as
///   dst[q * Panel * depth_padded + ((k / Group) * Panel + lane % Panel) * Group + k % Group],
/// i.e. for each group of Group consecutive k, Panel lanes of Group values.
/// Lanes past `lanes` and k past `depth` (up to depth_padded, the depth
/// rounded up to Group) are zero, so kernels compute full tiles and never
/// read garbage.
/// For A, lanes are rows (lane_stride = A's row stride, k_stride = its column
/// stride); for B, lanes are columns (lane_stride = B's column stride).
template <index_t Panel, index_t Group, class Out, class In>
void gemm_pack(Out* __restrict dst, const In* __restrict src, index_t lanes, index_t depth, index_t lane_stride,
               index_t k_stride) {
  const index_t depth_padded = (depth + Group - 1) / Group * Group;
  for (index_t first = 0; first < lanes; first += Panel) {
    const index_t width = lanes - first < Panel ? lanes - first : Panel;
    const In* panel_src = src + first * lane_stride;
    Out* panel = dst + (first / Panel) * Panel * depth_padded;
    if constexpr (Group == 1) {
      if (width == Panel && lane_stride == 1) {
        // Lanes are contiguous in memory (row-major B, column-major A): each k
        // is one straight copy of Panel values, which the compiler vectorises.
        for (index_t k = 0; k < depth; ++k) {
          const In* from = panel_src + k * k_stride;
          Out* to = panel + k * Panel;
          for (index_t lane = 0; lane < Panel; ++lane) to[lane] = gemm_pack_convert<Out>(from[lane]);
        }
        continue;
      }
      if (width == Panel && k_stride == 1) {
        // k is contiguous (row-major A, column-major B): blocks of 8 lanes x
        // 8 k go through a register transpose where the target has AVX2;
        // otherwise read Panel rows in step, 8 k at a time, so each source
        // row is read a cache line at a time and the writes stay sequential.
        index_t k = 0;
#if defined(CTFORMER_CPU_AVX2)
        if constexpr (std::is_same_v<Out, float>) {
          for (; k + 8 <= depth; k += 8)
            for (index_t lane = 0; lane < Panel; lane += 8)
              gemm_pack_8k<Panel>(panel + k * Panel + lane, panel_src + lane * lane_stride + k, lane_stride,
                                  int(Panel - lane < 8 ? Panel - lane : 8));
        }
#endif
        for (; k + 8 <= depth; k += 8) {
          Out* to = panel + k * Panel;
          for (index_t lane = 0; lane < Panel; ++lane) {
            const In* from = panel_src + lane * lane_stride + k;
CTFORMER_GEMM_UNROLL(8)
            for (index_t kk = 0; kk < 8; ++kk) to[kk * Panel + lane] = gemm_pack_convert<Out>(from[kk]);
          }
        }
        for (; k < depth; ++k)
          for (index_t lane = 0; lane < Panel; ++lane)
            panel[k * Panel + lane] = gemm_pack_convert<Out>(panel_src[lane * lane_stride + k]);
        continue;
      }
    }
    // General strides, the ragged last panel, and grouped (bf16 pair) layouts.
    for (index_t k = 0; k < depth_padded; ++k) {
      Out* to = panel + ((k / Group) * Panel) * Group + k % Group;
      for (index_t lane = 0; lane < Panel; ++lane) {
        to[lane * Group] = (lane < width && k < depth)
                               ? gemm_pack_convert<Out>(panel_src[lane * lane_stride + k * k_stride])
                               : Out{};
      }
    }
  }
}

}  // namespace ctformer::cpu::detail
