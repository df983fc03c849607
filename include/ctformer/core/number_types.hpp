// Reduced-precision number types usable on the host and (under nvcc) on the
// device: bf16, fp16 and fp8_e4m3, with round-to-nearest-even conversions.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define CTFORMER_HOST_DEVICE __host__ __device__
#else
#define CTFORMER_HOST_DEVICE
#endif

namespace ctformer {

namespace detail {
CTFORMER_HOST_DEVICE inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
CTFORMER_HOST_DEVICE inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace detail

/// bfloat16: the top 16 bits of an IEEE float. Conversion from float rounds to
/// nearest, ties to even; NaN stays NaN (quiet), infinities stay infinite.
struct bf16 {
  std::uint16_t bits = 0;

  bf16() = default;
  CTFORMER_HOST_DEVICE explicit bf16(float f) : bits(from_float(f)) {}
  CTFORMER_HOST_DEVICE explicit operator float() const { return detail::bits_float(std::uint32_t(bits) << 16); }
  CTFORMER_HOST_DEVICE static bf16 from_bits(std::uint16_t b) {
    bf16 r;
    r.bits = b;
    return r;
  }
  CTFORMER_HOST_DEVICE static std::uint16_t from_float(float f) {
    std::uint32_t u = detail::float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x0040u);  // quiet NaN, sign kept
    const std::uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;  // ties to even; overflow carries into the exponent, giving Inf
    return std::uint16_t(u >> 16);
  }
  friend CTFORMER_HOST_DEVICE bool operator==(bf16 a, bf16 b) { return a.bits == b.bits; }
};
static_assert(sizeof(bf16) == 2 && std::is_trivially_copyable_v<bf16>);

/// IEEE 754 binary16. Conversion from float rounds to nearest, ties to even,
/// produces subnormals below 2^-14 and Inf from 65520 up; NaN stays NaN and
/// becomes quiet in both directions.
struct fp16 {
  std::uint16_t bits = 0;

  fp16() = default;
  CTFORMER_HOST_DEVICE explicit fp16(float f) : bits(from_float(f)) {}
  CTFORMER_HOST_DEVICE explicit operator float() const { return to_float(bits); }
  CTFORMER_HOST_DEVICE static fp16 from_bits(std::uint16_t b) {
    fp16 r;
    r.bits = b;
    return r;
  }
  CTFORMER_HOST_DEVICE static std::uint16_t from_float(float f) {
    const std::uint32_t u = detail::float_bits(f);
    const std::uint32_t sign = (u >> 16) & 0x8000u;
    const std::uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return std::uint16_t(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));  // NaN, payload kept, quiet
    if (abs >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // rounds to >= 65520: Inf
    if (abs < 0x38800000u) {  // below 2^-14: subnormal half (or zero)
      // Add 0.5 (as a float) so the FPU-free integer shift below rounds to nearest even.
      const std::uint32_t exponent = abs >> 23;
      if (exponent < 102) return std::uint16_t(sign);  // below half the smallest subnormal
      const std::uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
      const std::uint32_t shift = 126 - exponent;  // 14 + (127-1-exponent) ... produces 10-bit subnormal
      const std::uint32_t value = mantissa >> shift;
      const std::uint32_t remainder = mantissa & ((1u << shift) - 1u);
      const std::uint32_t halfway = 1u << (shift - 1);
      std::uint32_t rounded = value;
      if (remainder > halfway || (remainder == halfway && (value & 1u))) ++rounded;
      return std::uint16_t(sign | rounded);
    }
    // Normal range: rebias exponent (127 -> 15) and round the 13 dropped bits.
    std::uint32_t h = ((abs - 0x38000000u) >> 13);
    const std::uint32_t remainder = abs & 0x1fffu;
    if (remainder > 0x1000u || (remainder == 0x1000u && (h & 1u))) ++h;
    return std::uint16_t(sign | h);
  }
  CTFORMER_HOST_DEVICE static float to_float(std::uint16_t h) {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    const std::uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1f) {
      if (mantissa == 0) return detail::bits_float(sign | 0x7f800000u);  // +-Inf
      // NaN: payload kept, made quiet (as F16C vcvtph2ps does).
      return detail::bits_float(sign | 0x7fc00000u | (mantissa << 13));
    }
    if (exponent == 0) {
      if (mantissa == 0) return detail::bits_float(sign);
      // Subnormal: value = mantissa * 2^-24, exact in float.
      const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
      return sign ? -magnitude : magnitude;
    }
    return detail::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
  friend CTFORMER_HOST_DEVICE bool operator==(fp16 a, fp16 b) { return a.bits == b.bits; }
};
static_assert(sizeof(fp16) == 2 && std::is_trivially_copyable_v<fp16>);

/// OCP fp8 E4M3 (the "fn" variant: no infinities, one NaN pattern 0x7f/0xff,
/// largest finite 448). Out-of-range values saturate to +-448, as training
/// and inference frameworks do for E4M3.
struct fp8_e4m3 {
  std::uint8_t bits = 0;

  fp8_e4m3() = default;
  CTFORMER_HOST_DEVICE explicit fp8_e4m3(float f) : bits(from_float(f)) {}
  CTFORMER_HOST_DEVICE explicit operator float() const { return to_float(bits); }
  CTFORMER_HOST_DEVICE static fp8_e4m3 from_bits(std::uint8_t b) {
    fp8_e4m3 r;
    r.bits = b;
    return r;
  }
  CTFORMER_HOST_DEVICE static std::uint8_t from_float(float f) {
    const std::uint32_t u = detail::float_bits(f);
    const std::uint8_t sign = std::uint8_t((u >> 24) & 0x80u);
    const std::uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return std::uint8_t(sign | 0x7fu);
    if (abs >= 0x43e00000u) return std::uint8_t(sign | 0x7eu);  // >= 448 (and Inf): saturate
    if (abs < 0x3c800000u) {  // below 2^-6: subnormal, step 2^-9
      const float magnitude = detail::bits_float(abs) * 512.0f;  // in units of the subnormal step
      // Round half to even on the integer grid.
      std::uint32_t q = std::uint32_t(magnitude);
      const float fraction = magnitude - float(q);
      if (fraction > 0.5f || (fraction == 0.5f && (q & 1u))) ++q;
      return std::uint8_t(sign | q);  // q == 8 is exactly the smallest normal's encoding
    }
    std::uint32_t e = ((abs >> 23) - 120u) << 3;  // rebias 127 -> 7
    std::uint32_t m = (abs >> 20) & 0x7u;
    std::uint32_t code = e | m;
    const std::uint32_t remainder = abs & 0xfffffu;
    if (remainder > 0x80000u || (remainder == 0x80000u && (code & 1u))) ++code;
    if (code > 0x7eu) code = 0x7eu;
    return std::uint8_t(sign | code);
  }
  CTFORMER_HOST_DEVICE static float to_float(std::uint8_t b) {
    const std::uint32_t sign = std::uint32_t(b & 0x80u) << 24;
    const std::uint32_t e = (b >> 3) & 0xfu;
    const std::uint32_t m = b & 0x7u;
    if (e == 0xf && m == 0x7) return detail::bits_float(sign | 0x7fc00000u);
    if (e == 0) {
      const float magnitude = float(m) * 0.001953125f;  // m * 2^-9
      return sign ? -magnitude : magnitude;
    }
    return detail::bits_float(sign | ((e + 120u) << 23) | (m << 20));
  }
  friend CTFORMER_HOST_DEVICE bool operator==(fp8_e4m3 a, fp8_e4m3 b) { return a.bits == b.bits; }
};
static_assert(sizeof(fp8_e4m3) == 1 && std::is_trivially_copyable_v<fp8_e4m3>);

/// Converts between any two of float, bf16, fp16, fp8_e4m3.
template <class To, class From>
CTFORMER_HOST_DEVICE inline To number_cast(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (std::is_same_v<To, float>) {
    return static_cast<float>(x);
  } else if constexpr (std::is_same_v<From, float>) {
    return To(x);
  } else {
    return To(static_cast<float>(x));
  }
}

/// The number types ctformer stores tensors in.
template <class T>
concept number_type = std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16> ||
                      std::is_same_v<T, fp8_e4m3>;

}  // namespace ctformer
