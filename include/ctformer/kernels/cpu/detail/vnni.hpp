// vpdpbusd (AVX512_VNNI): s + the sums of four unsigned-by-signed byte
// products per int32 lane, on 256- and 512-bit registers. Not API: kernels/cpu/detail.
//
// Why not the intrinsic under GCC: vpdpbusd overwrites its accumulator, and
// GCC 12 copied the intrinsic's accumulator into a spare register before each
// multiply-add and back after it, which spilled the int8 GEMM tile's sums to
// the stack (docs/performance.md, "The int8 GEMM's accumulators under GCC").
// The asm names the accumulator as read-and-written, so it stays in one
// register. Clang allocates the intrinsic well and keeps it.
#pragma once

#include "ctformer/kernels/cpu/isa.hpp"

#if defined(CTFORMER_CPU_AVX512_VNNI)
namespace ctformer::cpu::detail {

inline __m256i multiply_add_unsigned_signed(__m256i s, __m256i u, __m256i x) {
#if defined(__GNUC__) && !defined(__clang__)
  asm("vpdpbusd %2, %1, %0" : "+v"(s) : "v"(u), "v"(x));
  return s;
#else
  return _mm256_dpbusd_epi32(s, u, x);
#endif
}

inline __m512i multiply_add_unsigned_signed(__m512i s, __m512i u, __m512i x) {
#if defined(__GNUC__) && !defined(__clang__)
  asm("vpdpbusd %2, %1, %0" : "+v"(s) : "v"(u), "v"(x));
  return s;
#else
  return _mm512_dpbusd_epi32(s, u, x);
#endif
}

}  // namespace ctformer::cpu::detail
#endif
