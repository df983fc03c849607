// <immintrin.h> for ctformer's CPU kernels, included with GCC's
// uninitialized-variable warnings off for its own text only.
//
// Why: GCC 12 (Debian 12's compiler) warns "'__Y' may be used uninitialized"
// inside avx512fintrin.h for most AVX-512 intrinsics (_mm512_max_ps,
// _mm512_cvtps_epi32, ...), because the intrinsics start from
// _mm512_undefined_*(): thousands of warnings per -march=native build on an
// AVX-512 CPU, all in the compiler's header, none in user code. A diagnostic
// pragma applies by source location, so covering the header's text silences
// exactly those and leaves the warnings of every other file alone. It works
// when this is the first <immintrin.h> of the translation unit (include
// ctformer before including <immintrin.h> yourself to get the benefit).
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
