// CPU kernels for copy, fill, convert, add and add_scaled, and the helpers
// that run an elementwise function over vectors of floats (activation.hpp).
// Every contiguous path is vectorised; bf16 / fp16 <-> float conversion uses
// AVX-512, or AVX2 (+F16C for fp16), and is bit-identical to the scalar
// conversions of core/number_types.hpp.
#pragma once

#include <cstring>
#include <type_traits>

#include "ctformer/core/number_types.hpp"
#include "ctformer/kernels/cpu/detail/vector_math.hpp"
#include "ctformer/kernels/cpu/isa.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {
// Elementwise loops run in chunks so each thread streams a contiguous range.
inline constexpr index_t elementwise_chunk = 1 << 14;

template <class Body>
void for_chunks(const par_t& exec, index_t n, Body&& body) {
  const index_t chunks = (n + elementwise_chunk - 1) / elementwise_chunk;
  parallel_for(exec, chunks, [&](index_t c) {
    const index_t begin = c * elementwise_chunk;
    const index_t end = begin + elementwise_chunk < n ? begin + elementwise_chunk : n;
    body(begin, end);
  });
}

// y[i] = f(x[i]); f is generic over the vector type (f32x1 on strided views).
// y may alias x.
template <class F>
void map_unary(const par_t& exec, tensor_view<const float, 1> x, tensor_view<float, 1> y, F f) {
  if (x.stride(0) == 1 && y.stride(0) == 1) {
    const float* px = x.data();
    float* py = y.data();
    for_chunks(exec, x.extent(0), [&](index_t lo, index_t hi) {
      for_vectors(hi - lo, [&](index_t j, int k, int) { store_n(py + lo + j, f(load_n(px + lo + j, k)), k); });
    });
  } else {
    for_chunks(exec, x.extent(0), [&](index_t lo, index_t hi) {
      for (index_t i = lo; i < hi; ++i) y(i) = f(f32x1{x(i)}).v;
    });
  }
}

// z[i] = f(x[i], y[i]); z may alias x or y.
template <class F>
void map_binary(const par_t& exec, tensor_view<const float, 1> x, tensor_view<const float, 1> y,
                tensor_view<float, 1> z, F f) {
  if (x.stride(0) == 1 && y.stride(0) == 1 && z.stride(0) == 1) {
    const float* px = x.data();
    const float* py = y.data();
    float* pz = z.data();
    for_chunks(exec, x.extent(0), [&](index_t lo, index_t hi) {
      for_vectors(hi - lo, [&](index_t j, int k, int) {
        store_n(pz + lo + j, f(load_n(px + lo + j, k), load_n(py + lo + j, k)), k);
      });
    });
  } else {
    for_chunks(exec, x.extent(0), [&](index_t lo, index_t hi) {
      for (index_t i = lo; i < hi; ++i) z(i) = f(f32x1{x(i)}, f32x1{y(i)}).v;
    });
  }
}

// --- contiguous conversions ---------------------------------------------------
// Each converts [0, n) and leaves nothing to the caller; vector bodies first,
// the scalar conversion of number_types.hpp for the tail.

inline void float_to_bf16(const float* s, bf16* d, index_t n) {
  index_t i = 0;
#if defined(CTFORMER_CPU_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_loadu_si512(s + i);
    const __m512i abs = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7f800000));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    const __m512i r = _mm512_mask_blend_epi32(nan, rounded, quiet);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtepi32_epi16(r));
  }
#elif defined(CTFORMER_CPU_AVX2)
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    const __m256i nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));  // both non-negative: signed ok
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
    // Values fit 16 bits, so the unsigned saturation of packus never fires.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_castsi256_si128(packed));
  }
#endif
  for (; i < n; ++i) d[i] = bf16(s[i]);
}

inline void bf16_to_float(const bf16* s, float* d, index_t n) {
  index_t i = 0;
#if defined(CTFORMER_CPU_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    _mm512_storeu_si512(d + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
#elif defined(CTFORMER_CPU_AVX2)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
#endif
  for (; i < n; ++i) d[i] = float(s[i]);
}

inline void float_to_fp16(const float* s, fp16* d, index_t n) {
  index_t i = 0;
#if defined(CTFORMER_CPU_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(CTFORMER_CPU_AVX2) && defined(CTFORMER_CPU_F16C)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) d[i] = fp16(s[i]);
}

inline void fp16_to_float(const fp16* s, float* d, index_t n) {
  index_t i = 0;
#if defined(CTFORMER_CPU_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#elif defined(CTFORMER_CPU_AVX2) && defined(CTFORMER_CPU_F16C)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) d[i] = float(s[i]);
}
}  // namespace detail

template <class T>
void copy_impl(const par_t& exec, tensor_view<const T, 1> src, tensor_view<T, 1> dst) {
  if (src.stride(0) == 1 && dst.stride(0) == 1) {
    detail::for_chunks(exec, src.extent(0), [&](index_t b, index_t e) {
      std::memcpy(dst.data() + b, src.data() + b, std::size_t(e - b) * sizeof(T));
    });
  } else {
    detail::for_chunks(exec, src.extent(0), [&](index_t b, index_t e) {
      for (index_t i = b; i < e; ++i) dst(i) = src(i);
    });
  }
}

template <class T>
void fill_impl(const par_t& exec, tensor_view<T, 1> dst, T value) {
  if constexpr (std::is_same_v<T, float>) {
    if (dst.stride(0) == 1) {
      const detail::vf v = detail::vf::splat(value);
      float* d = dst.data();
      detail::for_chunks(exec, dst.extent(0), [&](index_t b, index_t e) {
        detail::for_vectors(e - b, [&](index_t j, int k, int) { detail::store_n(d + b + j, v, k); });
      });
      return;
    }
  }
  detail::for_chunks(exec, dst.extent(0), [&](index_t b, index_t e) {
    for (index_t i = b; i < e; ++i) dst(i) = value;
  });
}

template <number_type From, number_type To>
void convert_impl(const par_t& exec, tensor_view<const From, 1> src, tensor_view<To, 1> dst) {
  const From* s = src.data();
  To* d = dst.data();
  if (src.stride(0) == 1 && dst.stride(0) == 1) {
    detail::for_chunks(exec, src.extent(0), [&](index_t b, index_t e) {
      if constexpr (std::is_same_v<From, float> && std::is_same_v<To, bf16>) {
        detail::float_to_bf16(s + b, d + b, e - b);
      } else if constexpr (std::is_same_v<From, bf16> && std::is_same_v<To, float>) {
        detail::bf16_to_float(s + b, d + b, e - b);
      } else if constexpr (std::is_same_v<From, float> && std::is_same_v<To, fp16>) {
        detail::float_to_fp16(s + b, d + b, e - b);
      } else if constexpr (std::is_same_v<From, fp16> && std::is_same_v<To, float>) {
        detail::fp16_to_float(s + b, d + b, e - b);
      } else if constexpr (std::is_same_v<From, To>) {
        std::memcpy(d + b, s + b, std::size_t(e - b) * sizeof(To));
      } else {
        for (index_t i = b; i < e; ++i) d[i] = number_cast<To>(s[i]);
      }
    });
  } else {
    const index_t ss = src.stride(0), ds = dst.stride(0);
    detail::for_chunks(exec, src.extent(0), [&](index_t b, index_t e) {
      for (index_t i = b; i < e; ++i) d[i * ds] = number_cast<To>(s[i * ss]);
    });
  }
}

inline void add_impl(const par_t& exec, tensor_view<const float, 1> a, tensor_view<const float, 1> b,
                     tensor_view<float, 1> out) {
  detail::map_binary(exec, a, b, out, [](auto x, auto y) { return x + y; });
}

inline void add_scaled_impl(const par_t& exec, float alpha, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  detail::map_binary(exec, x, tensor_view<const float, 1>(y), y, [alpha](auto xv, auto yv) {
    return fma(decltype(xv)::splat(alpha), xv, yv);
  });
}

}  // namespace ctformer::cpu
