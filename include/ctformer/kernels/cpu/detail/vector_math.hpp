// SIMD float vectors for the CPU kernels (f32x16 with AVX-512, f32x8 with
// AVX2+FMA, f32x1 everywhere) and exp / tanh approximations written once over
// them. The widest type the build allows is `vf`; the choice is made by
// kernels/cpu/isa.hpp's macros (CTFORMER_CPU_AVX512, CTFORMER_CPU_AVX2), never
// at run time.
//
// Accuracy (measured by tests/unit/ops/test_activation.cpp "vector exp and
// tanh" against double-precision std::exp / std::tanh, on every type the
// target compiles):
//   vexp:  |error| <= 2 ulp of the float result for x in [-87.3, 88.7]
//          (Cody-Waite reduction by ln 2, degree-7 Cephes polynomial); results
//          below FLT_MIN are gradual subnormals within one subnormal step;
//          x > 88.73 gives +Inf, x < -104 gives +0, NaN gives NaN.
//   vtanh: |error| <= 3 ulp for all finite x (odd polynomial for |x| < 0.625,
//          1 - 2 / (exp(2|x|) + 1) above); +-Inf gives +-1, NaN gives NaN.
// Not API: kernels/cpu/detail.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "ctformer/kernels/cpu/isa.hpp"

namespace ctformer::cpu::detail {

// ---------------------------------------------------------------------------
// f32x1: the portable form, one float per "vector".
struct f32x1 {
  static constexpr int width = 1;
  float v;

  static f32x1 splat(float x) { return {x}; }
  static f32x1 load(const float* p) { return {*p}; }
  // Loads the first n (< width) elements; the rest hold fill.
  static f32x1 load_partial(const float* p, int n, float fill) { return {n > 0 ? *p : fill}; }
  void store(float* p) const { *p = v; }
  void store_partial(float* p, int n) const {
    if (n > 0) *p = v;
  }
  // The first n lanes of this vector, zeros after.
  f32x1 keep_first(int n) const { return {n > 0 ? v : 0.0f}; }
};
inline f32x1 operator+(f32x1 a, f32x1 b) { return {a.v + b.v}; }
inline f32x1 operator-(f32x1 a, f32x1 b) { return {a.v - b.v}; }
inline f32x1 operator*(f32x1 a, f32x1 b) { return {a.v * b.v}; }
inline f32x1 operator/(f32x1 a, f32x1 b) { return {a.v / b.v}; }
inline f32x1 fma(f32x1 a, f32x1 b, f32x1 c) { return {a.v * b.v + c.v}; }  // contracted where the target has FMA
// max/min return a when either is NaN (a is the value being clamped).
inline f32x1 max(f32x1 a, f32x1 b) { return {b.v > a.v ? b.v : a.v}; }
inline f32x1 min(f32x1 a, f32x1 b) { return {b.v < a.v ? b.v : a.v}; }
inline f32x1 abs(f32x1 a) {
  std::uint32_t u;
  std::memcpy(&u, &a.v, 4);
  u &= 0x7fffffffu;
  float r;
  std::memcpy(&r, &u, 4);
  return {r};
}
// mag with the sign bit of sign.
inline f32x1 copysign(f32x1 mag, f32x1 sign) {
  std::uint32_t m, s;
  std::memcpy(&m, &mag.v, 4);
  std::memcpy(&s, &sign.v, 4);
  m = (m & 0x7fffffffu) | (s & 0x80000000u);
  float r;
  std::memcpy(&r, &m, 4);
  return {r};
}
// a < b ? t : f (false for NaN)
inline f32x1 select_lt(f32x1 a, f32x1 b, f32x1 t, f32x1 f) { return {a.v < b.v ? t.v : f.v}; }
// Round to a nearest integer (|a| < 2^30; halves away from zero, which is as
// good as even for range reduction); NaN stays NaN.
inline f32x1 round_nearest(f32x1 a) {
  if (!(a.v == a.v)) return a;
  return {float(std::int32_t(a.v + (a.v >= 0.0f ? 0.5f : -0.5f)))};
}
// y * 2^n for integer-valued n in [-150, 128], via two exact powers of two
// so that 2^128 (overflow) and 2^-150 (gradual underflow) both come out right.
inline f32x1 scale_pow2(f32x1 y, f32x1 n) {
  if (!(n.v == n.v)) return n;
  const std::int32_t k = std::int32_t(n.v);
  const std::int32_t k1 = k >> 1, k2 = k - k1;
  const std::uint32_t b1 = std::uint32_t(k1 + 127) << 23, b2 = std::uint32_t(k2 + 127) << 23;
  float p1, p2;
  std::memcpy(&p1, &b1, 4);
  std::memcpy(&p2, &b2, 4);
  return {y.v * p1 * p2};
}
inline float reduce_add(f32x1 a) { return a.v; }
inline float reduce_max(f32x1 a) { return a.v; }

// ---------------------------------------------------------------------------
#if defined(CTFORMER_CPU_AVX2)
struct f32x8 {
  static constexpr int width = 8;
  __m256 v;

  static f32x8 splat(float x) { return {_mm256_set1_ps(x)}; }
  static f32x8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static __m256i mask(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static f32x8 load_partial(const float* p, int n, float fill) {
    const __m256i m = mask(n);
    return {_mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store_partial(float* p, int n) const { _mm256_maskstore_ps(p, mask(n), v); }
  f32x8 keep_first(int n) const { return {_mm256_and_ps(v, _mm256_castsi256_ps(mask(n)))}; }
};
inline f32x8 operator+(f32x8 a, f32x8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline f32x8 operator-(f32x8 a, f32x8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline f32x8 operator*(f32x8 a, f32x8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline f32x8 operator/(f32x8 a, f32x8 b) { return {_mm256_div_ps(a.v, b.v)}; }
inline f32x8 fma(f32x8 a, f32x8 b, f32x8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
// maxps returns its second operand when either is NaN: a NaN in a survives.
inline f32x8 max(f32x8 a, f32x8 b) { return {_mm256_max_ps(b.v, a.v)}; }
inline f32x8 min(f32x8 a, f32x8 b) { return {_mm256_min_ps(b.v, a.v)}; }
inline f32x8 abs(f32x8 a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
inline f32x8 copysign(f32x8 mag, f32x8 sign) {
  const __m256 s = _mm256_set1_ps(-0.0f);
  return {_mm256_or_ps(_mm256_andnot_ps(s, mag.v), _mm256_and_ps(s, sign.v))};
}
inline f32x8 select_lt(f32x8 a, f32x8 b, f32x8 t, f32x8 f) {
  return {_mm256_blendv_ps(f.v, t.v, _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ))};
}
inline f32x8 round_nearest(f32x8 a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline f32x8 scale_pow2(f32x8 y, f32x8 n) {
  const __m256i k = _mm256_cvtps_epi32(n.v);
  const __m256i k1 = _mm256_srai_epi32(k, 1);
  const __m256i k2 = _mm256_sub_epi32(k, k1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
  return {_mm256_mul_ps(_mm256_mul_ps(y.v, p1), p2)};
}
inline float reduce_add(f32x8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(f32x8 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// ---------------------------------------------------------------------------
#if defined(CTFORMER_CPU_AVX512)
struct f32x16 {
  static constexpr int width = 16;
  __m512 v;

  static f32x16 splat(float x) { return {_mm512_set1_ps(x)}; }
  static f32x16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static __mmask16 mask(int n) { return __mmask16((1u << n) - 1u); }
  static f32x16 load_partial(const float* p, int n, float fill) {
    return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask(n), p)};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, mask(n), v); }
  f32x16 keep_first(int n) const { return {_mm512_maskz_mov_ps(mask(n), v)}; }
};
inline f32x16 operator+(f32x16 a, f32x16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline f32x16 operator-(f32x16 a, f32x16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline f32x16 operator*(f32x16 a, f32x16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline f32x16 operator/(f32x16 a, f32x16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline f32x16 fma(f32x16 a, f32x16 b, f32x16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline f32x16 max(f32x16 a, f32x16 b) { return {_mm512_max_ps(b.v, a.v)}; }
inline f32x16 min(f32x16 a, f32x16 b) { return {_mm512_min_ps(b.v, a.v)}; }
inline f32x16 abs(f32x16 a) {
  return {_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(0x7fffffff)))};
}
inline f32x16 copysign(f32x16 mag, f32x16 sign) {
  const __m512i m = _mm512_set1_epi32(0x7fffffff);
  // (m & mag) | (~m & sign); the compiler fuses it into one vpternlogd.
  return {_mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(m, _mm512_castps_si512(mag.v)),
                                              _mm512_andnot_si512(m, _mm512_castps_si512(sign.v))))};
}
inline f32x16 select_lt(f32x16 a, f32x16 b, f32x16 t, f32x16 f) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ), f.v, t.v)};
}
inline f32x16 round_nearest(f32x16 a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline f32x16 scale_pow2(f32x16 y, f32x16 n) {
  const __m512i k = _mm512_cvtps_epi32(n.v);
  const __m512i k1 = _mm512_srai_epi32(k, 1);
  const __m512i k2 = _mm512_sub_epi32(k, k1);
  const __m512i bias = _mm512_set1_epi32(127);
  const __m512 p1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k1, bias), 23));
  const __m512 p2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k2, bias), 23));
  return {_mm512_mul_ps(_mm512_mul_ps(y.v, p1), p2)};
}
inline float reduce_add(f32x16 a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(f32x16 a) { return _mm512_reduce_max_ps(a.v); }
#endif

// ---------------------------------------------------------------------------
// The widest vector the target compiles.
#if defined(CTFORMER_CPU_AVX512)
using vf = f32x16;
#elif defined(CTFORMER_CPU_AVX2)
using vf = f32x8;
#else
using vf = f32x1;
#endif

/// e^x (see the accuracy note at the top of this file).
template <class V>
inline V vexp(V x) {
  // Clamp: above 89 the result overflows to Inf, below -104 it rounds to +0.
  // max/min keep a NaN in x, which then flows through to the result.
  x = min(max(x, V::splat(-104.0f)), V::splat(89.0f));
  const V n = round_nearest(x * V::splat(1.44269504088896341f));
  // r = x - n ln2 in two steps (Cody-Waite): n * 0.693359375 is exact.
  V r = fma(n, V::splat(-0.693359375f), x);
  r = fma(n, V::splat(2.12194440e-4f), r);
  V p = V::splat(1.9875691500e-4f);
  p = fma(p, r, V::splat(1.3981999507e-3f));
  p = fma(p, r, V::splat(8.3334519073e-3f));
  p = fma(p, r, V::splat(4.1665795894e-2f));
  p = fma(p, r, V::splat(1.6666665459e-1f));
  p = fma(p, r, V::splat(5.0000001201e-1f));
  p = fma(p, r * r, r) + V::splat(1.0f);
  return scale_pow2(p, n);
}

/// tanh(x) (see the accuracy note at the top of this file).
template <class V>
inline V vtanh(V x) {
  const V a = abs(x);
  // |x| < 0.625: a + a^3 P(a^2) (Cephes tanhf).
  const V s = a * a;
  V p = V::splat(-5.70498872745e-3f);
  p = fma(p, s, V::splat(2.06390887954e-2f));
  p = fma(p, s, V::splat(-5.37397155531e-2f));
  p = fma(p, s, V::splat(1.33314422036e-1f));
  p = fma(p, s, V::splat(-3.33332819422e-1f));
  const V small = fma(p * s, a, a);
  // otherwise: 1 - 2 / (e^(2a) + 1); e^(2a) = Inf gives exactly 1.
  const V large = V::splat(1.0f) - V::splat(2.0f) / (vexp(a + a) + V::splat(1.0f));
  return copysign(select_lt(a, V::splat(0.625f), small, large), x);
}

/// 1 / (1 + e^-x).
template <class V>
inline V vsigmoid(V x) {
  return V::splat(1.0f) / (V::splat(1.0f) + vexp(V::splat(0.0f) - x));
}

/// Loads count (<= V::width) floats; lanes past count hold fill.
template <class V = vf>
inline V load_n(const float* p, int count, float fill = 0.0f) {
  return count == V::width ? V::load(p) : V::load_partial(p, count, fill);
}
/// Stores the first count (<= V::width) lanes.
template <class V>
inline void store_n(float* p, V x, int count) {
  if (count == V::width)
    x.store(p);
  else
    x.store_partial(p, count);
}

/// Walks [0, n) one vector at a time: body(j, count, lane) with count ==
/// vf::width except (possibly) for the last call, and lane alternating 0 / 1
/// so that reductions can keep two accumulators (two chains in flight).
template <class Body>
inline void for_vectors(std::int64_t n, Body&& body) {
  constexpr std::int64_t w = vf::width;
  std::int64_t j = 0;
  for (; j + 2 * w <= n; j += 2 * w) {
    body(j, int(w), 0);
    body(j + w, int(w), 1);
  }
  if (j + w <= n) {
    body(j, int(w), 0);
    j += w;
  }
  if (j < n) body(j, int(n - j), 1);
}

/// Scalar forms of the same approximations (for tails and tests).
inline float exp_approx(float x) { return vexp(f32x1{x}).v; }
inline float tanh_approx(float x) { return vtanh(f32x1{x}).v; }

}  // namespace ctformer::cpu::detail
