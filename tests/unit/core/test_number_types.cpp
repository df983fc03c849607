// bf16, fp16, fp8_e4m3: conversions against known bit patterns (1, -2, max
// finite, smallest subnormal, overflow / saturation, NaN stays quiet NaN,
// +-Inf, ties to even on exact halfway floats, fp16 subnormals) and the
// round trip of every bf16 / fp16 pattern through float.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "ctformer/core/number_types.hpp"

using namespace ctformer;

namespace {
float f(std::uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}
std::uint32_t u(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return bits;
}
bool is_quiet_nan(float x) { return std::isnan(x) && (u(x) & 0x00400000u); }
constexpr float inf = std::numeric_limits<float>::infinity();
}  // namespace

TEST_CASE("bf16 known bit patterns", "[core][number_types][bf16]") {
  CHECK(bf16(1.0f).bits == 0x3f80);
  CHECK(bf16(-2.0f).bits == 0xc000);
  CHECK(bf16(0.0f).bits == 0x0000);
  CHECK(bf16(-0.0f).bits == 0x8000);
  CHECK(bf16(inf).bits == 0x7f80);
  CHECK(bf16(-inf).bits == 0xff80);
  // Max finite bf16 = 0x7f7f = (2 - 2^-7) * 2^127.
  CHECK(float(bf16::from_bits(0x7f7f)) == f(0x7f7f0000u));
  CHECK(bf16(f(0x7f7f0000u)).bits == 0x7f7f);
  // FLT_MAX lies above the halfway point between 0x7f7f and 2^128: rounds to Inf.
  CHECK(bf16(std::numeric_limits<float>::max()).bits == 0x7f80);
  CHECK(bf16(f(0x7f7f7fffu)).bits == 0x7f7f);  // just below halfway
  CHECK(bf16(f(0x7f7f8000u)).bits == 0x7f80);  // halfway, odd mantissa: up to Inf
  // Smallest subnormal bf16 = 2^-133.
  CHECK(float(bf16::from_bits(0x0001)) == std::ldexp(1.0f, -133));
  CHECK(bf16(std::ldexp(1.0f, -133)).bits == 0x0001);
  // Ties to even: 1 + 2^-8 is halfway between 1 (even) and 1 + 2^-7 (odd).
  CHECK(bf16(f(0x3f808000u)).bits == 0x3f80);
  CHECK(bf16(f(0x3f818000u)).bits == 0x3f82);  // halfway between 0x3f81 (odd) and 0x3f82 (even)
  CHECK(bf16(f(0x3f808001u)).bits == 0x3f81);  // just above halfway
  CHECK(bf16(f(0xbf808000u)).bits == 0xbf80);  // negative tie to even
  // NaN stays NaN and becomes quiet, sign kept; a signalling NaN whose payload
  // sits only in the dropped bits must not turn into Inf.
  for (std::uint32_t nan : {0x7fc00000u, 0x7f800001u, 0x7fa00000u, 0xff800001u, 0x7fffffffu}) {
    CAPTURE(nan);
    const bf16 b(f(nan));
    CHECK((b.bits & 0x7f80) == 0x7f80);
    CHECK((b.bits & 0x007f) != 0);
    CHECK((b.bits & 0x0040) != 0);  // quiet bit
    CHECK((b.bits & 0x8000) == ((nan >> 16) & 0x8000));
    CHECK(is_quiet_nan(float(b)));
  }
}

TEST_CASE("fp16 known bit patterns", "[core][number_types][fp16]") {
  CHECK(fp16(1.0f).bits == 0x3c00);
  CHECK(fp16(-2.0f).bits == 0xc000);
  CHECK(fp16(-0.0f).bits == 0x8000);
  CHECK(fp16(65504.0f).bits == 0x7bff);  // max finite
  CHECK(float(fp16::from_bits(0x7bff)) == 65504.0f);
  CHECK(fp16(inf).bits == 0x7c00);
  CHECK(fp16(-inf).bits == 0xfc00);
  CHECK(float(fp16::from_bits(0x7c00)) == inf);
  CHECK(float(fp16::from_bits(0xfc00)) == -inf);
  // Overflow: 65520 is halfway between 65504 (odd mantissa) and 65536: ties to even gives Inf.
  CHECK(fp16(65519.996f).bits == 0x7bff);
  CHECK(fp16(65520.0f).bits == 0x7c00);
  CHECK(fp16(-1e6f).bits == 0xfc00);
  CHECK(fp16(std::numeric_limits<float>::max()).bits == 0x7c00);
  // Subnormals: smallest 2^-24, largest 0x03ff = 1023 * 2^-24, smallest normal 2^-14.
  CHECK(fp16(std::ldexp(1.0f, -24)).bits == 0x0001);
  CHECK(float(fp16::from_bits(0x0001)) == std::ldexp(1.0f, -24));
  CHECK(float(fp16::from_bits(0x03ff)) == 1023.0f * std::ldexp(1.0f, -24));
  CHECK(fp16(1023.0f * std::ldexp(1.0f, -24)).bits == 0x03ff);
  CHECK(fp16(std::ldexp(1.0f, -14)).bits == 0x0400);
  CHECK(fp16(-std::ldexp(3.0f, -24)).bits == 0x8003);
  // Underflow: 2^-25 is halfway between 0 (even) and 2^-24: rounds to 0;
  // anything above it rounds to the smallest subnormal.
  CHECK(fp16(std::ldexp(1.0f, -25)).bits == 0x0000);
  CHECK(fp16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)).bits == 0x0001);
  CHECK(fp16(std::ldexp(1.0f, -26)).bits == 0x0000);
  CHECK(fp16(-std::ldexp(1.0f, -30)).bits == 0x8000);
  // Subnormal ties to even: 2.5 * 2^-24 -> 2 * 2^-24; 3.5 * 2^-24 -> 4 * 2^-24.
  CHECK(fp16(2.5f * std::ldexp(1.0f, -24)).bits == 0x0002);
  CHECK(fp16(3.5f * std::ldexp(1.0f, -24)).bits == 0x0004);
  // Largest subnormal + half a step = 1023.5 * 2^-24: ties to even -> 0x0400 (smallest normal).
  CHECK(fp16(1023.5f * std::ldexp(1.0f, -24)).bits == 0x0400);
  // Normal ties to even: 1 + 2^-11 is halfway between 1 (even) and 1 + 2^-10.
  CHECK(fp16(1.0f + std::ldexp(1.0f, -11)).bits == 0x3c00);
  CHECK(fp16(1.0f + 3.0f * std::ldexp(1.0f, -11)).bits == 0x3c02);
  CHECK(fp16(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)).bits == 0x3c01);
  // NaN stays NaN and is quiet in both directions, sign kept.
  for (std::uint32_t nan : {0x7fc00000u, 0x7f800001u, 0x7fa00000u, 0xff800001u}) {
    CAPTURE(nan);
    const fp16 h(f(nan));
    CHECK((h.bits & 0x7c00) == 0x7c00);
    CHECK((h.bits & 0x0200) != 0);  // quiet bit
    CHECK((h.bits & 0x8000) == ((nan >> 16) & 0x8000));
    CHECK(is_quiet_nan(float(h)));
  }
  CHECK(is_quiet_nan(float(fp16::from_bits(0x7c01))));  // signalling half NaN -> quiet float NaN
  CHECK(is_quiet_nan(float(fp16::from_bits(0xfd55))));
  CHECK(std::signbit(float(fp16::from_bits(0xfd55))));
}

TEST_CASE("fp8_e4m3 known bit patterns", "[core][number_types][fp8]") {
  CHECK(fp8_e4m3(1.0f).bits == 0x38);
  CHECK(fp8_e4m3(-2.0f).bits == 0xc0);
  CHECK(fp8_e4m3(448.0f).bits == 0x7e);  // max finite
  CHECK(float(fp8_e4m3::from_bits(0x7e)) == 448.0f);
  CHECK(float(fp8_e4m3::from_bits(0xfe)) == -448.0f);
  // Saturation: out of range (and Inf) clamp to +-448.
  CHECK(fp8_e4m3(449.0f).bits == 0x7e);
  CHECK(fp8_e4m3(1e9f).bits == 0x7e);
  CHECK(fp8_e4m3(inf).bits == 0x7e);
  CHECK(fp8_e4m3(-inf).bits == 0xfe);
  // Smallest subnormal 2^-9, largest subnormal 7 * 2^-9, smallest normal 2^-6.
  CHECK(fp8_e4m3(std::ldexp(1.0f, -9)).bits == 0x01);
  CHECK(float(fp8_e4m3::from_bits(0x01)) == std::ldexp(1.0f, -9));
  CHECK(float(fp8_e4m3::from_bits(0x07)) == 7.0f * std::ldexp(1.0f, -9));
  CHECK(fp8_e4m3(std::ldexp(1.0f, -6)).bits == 0x08);
  CHECK(fp8_e4m3(std::ldexp(1.0f, -10)).bits == 0x00);  // halfway to 2^-9: even (0)
  CHECK(fp8_e4m3(std::ldexp(3.0f, -10)).bits == 0x02);  // 1.5 steps: ties to even -> 2
  CHECK(fp8_e4m3(7.5f * std::ldexp(1.0f, -9)).bits == 0x08);  // rounds into the smallest normal
  // Normal ties to even: 1 + 2^-4 is halfway between 1 (0x38, even) and 1.125 (0x39).
  CHECK(fp8_e4m3(1.0625f).bits == 0x38);
  CHECK(fp8_e4m3(1.1875f).bits == 0x3a);  // halfway between 0x39 (odd) and 0x3a
  CHECK(fp8_e4m3(1.07f).bits == 0x39);
  // 416 (0x7d) .. 448: halfway 432 rounds to even 448 (0x7e).
  CHECK(fp8_e4m3(432.0f).bits == 0x7e);
  CHECK(fp8_e4m3(424.0f).bits == 0x7d);
  // NaN: the one pattern 0x7f / 0xff, which converts back to a quiet NaN.
  CHECK(fp8_e4m3(f(0x7fc00000u)).bits == 0x7f);
  CHECK(fp8_e4m3(f(0xff800001u)).bits == 0xff);
  CHECK(is_quiet_nan(float(fp8_e4m3::from_bits(0x7f))));
  CHECK(is_quiet_nan(float(fp8_e4m3::from_bits(0xff))));
  // Every non-NaN fp8 pattern round-trips through float.
  for (int i = 0; i < 256; ++i) {
    if ((i & 0x7f) == 0x7f) continue;
    CAPTURE(i);
    CHECK(fp8_e4m3(float(fp8_e4m3::from_bits(std::uint8_t(i)))).bits == i);
  }
}

TEST_CASE("every non-NaN bf16 and fp16 pattern round-trips through float", "[core][number_types]") {
  int bf16_failures = 0, fp16_failures = 0, first_bf16 = -1, first_fp16 = -1;
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const auto bits = std::uint16_t(i);
    const bool bf16_nan = (bits & 0x7f80) == 0x7f80 && (bits & 0x007f);
    const bool fp16_nan = (bits & 0x7c00) == 0x7c00 && (bits & 0x03ff);
    if (!bf16_nan && bf16(float(bf16::from_bits(bits))).bits != bits && bf16_failures++ == 0) first_bf16 = int(i);
    if (!fp16_nan && fp16(float(fp16::from_bits(bits))).bits != bits && fp16_failures++ == 0) first_fp16 = int(i);
    // NaN patterns come back as NaN (quiet) with the same sign.
    if (bf16_nan) {
      const bf16 back(float(bf16::from_bits(bits)));
      if (!((back.bits & 0x7f80) == 0x7f80 && (back.bits & 0x0040) && (back.bits & 0x8000) == (bits & 0x8000)) &&
          bf16_failures++ == 0)
        first_bf16 = int(i);
    }
    if (fp16_nan) {
      const fp16 back(float(fp16::from_bits(bits)));
      if (!((back.bits & 0x7c00) == 0x7c00 && (back.bits & 0x0200) && (back.bits & 0x8000) == (bits & 0x8000)) &&
          fp16_failures++ == 0)
        first_fp16 = int(i);
    }
  }
  INFO("first bf16 failure " << first_bf16 << ", first fp16 failure " << first_fp16);
  CHECK(bf16_failures == 0);
  CHECK(fp16_failures == 0);
}

TEST_CASE("number_cast converts between the reduced types through float", "[core][number_types]") {
  CHECK(number_cast<float>(bf16(1.5f)) == 1.5f);
  CHECK(number_cast<fp16>(bf16(-2.0f)).bits == 0xc000);
  CHECK(number_cast<bf16>(fp16(65504.0f)).bits == bf16(65504.0f).bits);
  CHECK(number_cast<fp8_e4m3>(fp16(448.0f)).bits == 0x7e);
  CHECK(number_cast<float>(2.0f) == 2.0f);
}
