// The instruction sets the CPU kernels compile for, decided once from the
// compiler's target macros (the user's -m flags), as CUTLASS's arch/config.h.
//
// Each CTFORMER_CPU_* macro is defined to 1 or left undefined, and names a set
// the kernels use as a whole, so a kernel tests one macro, never the compiler's
// own. The sets nest: AVX512 implies AVX2; AVX512_BF16 and AVX512_VNNI imply
// AVX512. A build with part of a set (-mavx512f alone, -mavx2 without -mfma)
// takes the next smaller set's paths.
//   CTFORMER_CPU_AVX2         AVX2 + FMA (256-bit float and integer kernels)
//   CTFORMER_CPU_AVX512       AVX-512 F + BW + DQ + VL, on top of CTFORMER_CPU_AVX2
//   CTFORMER_CPU_AVX512_BF16  + AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16)
//   CTFORMER_CPU_AVX512_VNNI  + AVX512_VNNI (vpdpbusd, 256- and 512-bit)
//   CTFORMER_CPU_F16C         F16C (vcvtph2ps / vcvtps2ph), on its own: it does not
//                             depend on the sets above
// Where any is defined, <immintrin.h> is included (detail/intrinsics.hpp).
// No other header under include/ reads the compiler's __AVX*__, __FMA__ or
// __F16C__ macros (tests/unit/ops/test_isa.cpp checks).
#pragma once

#include <string_view>

#if defined(__AVX2__) && defined(__FMA__)
#define CTFORMER_CPU_AVX2 1
#endif

#if defined(CTFORMER_CPU_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
#define CTFORMER_CPU_AVX512 1
#endif

#if defined(CTFORMER_CPU_AVX512) && defined(__AVX512BF16__)
#define CTFORMER_CPU_AVX512_BF16 1
#endif

#if defined(CTFORMER_CPU_AVX512) && defined(__AVX512VNNI__)
#define CTFORMER_CPU_AVX512_VNNI 1
#endif

#if defined(__F16C__)
#define CTFORMER_CPU_F16C 1
#endif

#if defined(CTFORMER_CPU_AVX2) || defined(CTFORMER_CPU_F16C)
#include "ctformer/kernels/cpu/detail/intrinsics.hpp"
#endif

/// The same choices as constants, for `if constexpr` and for tests.
namespace ctformer::cpu::isa {

#if defined(CTFORMER_CPU_AVX2)
inline constexpr bool avx2 = true;
#else
inline constexpr bool avx2 = false;
#endif

#if defined(CTFORMER_CPU_AVX512)
inline constexpr bool avx512 = true;
#else
inline constexpr bool avx512 = false;
#endif

#if defined(CTFORMER_CPU_AVX512_BF16)
inline constexpr bool avx512_bf16 = true;
#else
inline constexpr bool avx512_bf16 = false;
#endif

#if defined(CTFORMER_CPU_AVX512_VNNI)
inline constexpr bool avx512_vnni = true;
#else
inline constexpr bool avx512_vnni = false;
#endif

#if defined(CTFORMER_CPU_F16C)
inline constexpr bool f16c = true;
#else
inline constexpr bool f16c = false;
#endif

/// The build's instruction set in one line, e.g. "AVX-512 (BF16, VNNI)", for
/// benchmark headers and logs.
inline constexpr std::string_view name =
#if defined(CTFORMER_CPU_AVX512_BF16) && defined(CTFORMER_CPU_AVX512_VNNI)
    "AVX-512 (BF16, VNNI)";
#elif defined(CTFORMER_CPU_AVX512_BF16)
    "AVX-512 (BF16)";
#elif defined(CTFORMER_CPU_AVX512_VNNI)
    "AVX-512 (VNNI)";
#elif defined(CTFORMER_CPU_AVX512)
    "AVX-512";
#elif defined(CTFORMER_CPU_AVX2) && defined(CTFORMER_CPU_F16C)
    "AVX2 + FMA + F16C";
#elif defined(CTFORMER_CPU_AVX2)
    "AVX2 + FMA";
#elif defined(CTFORMER_CPU_F16C)
    "portable + F16C";
#else
    "portable";
#endif

static_assert(!avx512 || avx2, "CTFORMER_CPU_AVX512 builds on CTFORMER_CPU_AVX2");
static_assert(!(avx512_bf16 || avx512_vnni) || avx512, "BF16 and VNNI build on CTFORMER_CPU_AVX512");

}  // namespace ctformer::cpu::isa
