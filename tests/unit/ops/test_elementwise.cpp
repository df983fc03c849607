// copy, fill, convert, add, add_scaled: odd sizes (vector tails), multiple
// chunks, aliasing, and convert bit-identical to the scalar conversions of
// core/number_types.hpp over every 16-bit pattern and a sweep of float bit
// patterns (round-to-nearest-even ties, overflow, subnormals, NaN).
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_test_util.hpp"

using namespace ctformer;
using namespace ctformer::testing;

namespace {

float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Float bit patterns that exercise every rounding case of a 16- or 8-bit
// target: for every exponent and sign, mantissas with the low 13 / 16 / 20
// bits at 0, just below half, exactly half, just above half, all ones, and
// a few random ones; plus NaNs with payloads and +-Inf.
std::vector<float> interesting_floats() {
  std::vector<std::uint32_t> bits;
  const std::uint32_t lows13[] = {0, 0xfff, 0x1000, 0x1001, 0x1fff, 0x0abc};
  const std::uint32_t lows16[] = {0x7fff, 0x8000, 0x8001, 0xffff};
  const std::uint32_t lows20[] = {0x7ffff, 0x80000, 0x80001};
  for (std::uint32_t sign : {0u, 0x80000000u})
    for (std::uint32_t e = 0; e < 256; ++e)
      for (std::uint32_t top : {0u, 0x1u, 0x155u, 0x3feu, 0x3ffu}) {
        const std::uint32_t base = sign | (e << 23) | (top << 13);
        for (auto l : lows13) bits.push_back(base | l);
        for (auto l : lows16) bits.push_back((base & ~0xffffu) | l);
        for (auto l : lows20) bits.push_back((base & ~0xfffffu) | l);
      }
  std::uint32_t state = 12345;
  for (int i = 0; i < 200000; ++i) {
    state = state * 1664525u + 1013904223u;
    bits.push_back(state);
  }
  for (std::uint32_t nan : {0x7f800001u, 0x7fa00000u, 0x7fc00000u, 0x7fffffffu, 0xff800001u, 0xffc00001u})
    bits.push_back(nan);
  std::vector<float> out;
  for (auto b : bits) out.push_back(bits_to_float(b));
  return out;
}

template <class T>
std::uint32_t bits_of(T v) {
  std::uint32_t u = 0;
  std::memcpy(&u, &v, sizeof v);
  return u;
}

// Converts on P and compares bit for bit with the scalar number_cast.
template <class To, class From, class P>
void check_convert_matches_scalar(const P& exec, const std::vector<From>& src, const char* what) {
  const index_t n = index_t(src.size());
  auto sd = upload(exec, src);
  buffer_for<To, P> dd(src.size());
  ops::convert(exec, sd.view(n), dd.view(n));
  const auto got = download(exec, dd);
  std::size_t mismatches = 0, first = 0;
  for (std::size_t i = 0; i < src.size(); ++i)
    if (bits_of(got[i]) != bits_of(number_cast<To>(src[i]))) {
      if (mismatches++ == 0) first = i;
    }
  INFO(what << ": " << mismatches << " of " << src.size() << " differ from the scalar conversion; first at " << first
            << " (source bits 0x" << std::hex << (src.empty() ? 0 : bits_of(src[first])) << ", got 0x"
            << (got.empty() ? 0 : bits_of(got[first])) << ", scalar 0x"
            << (src.empty() ? 0 : bits_of(number_cast<To>(src[first]))) << ")");
  CHECK(mismatches == 0);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("copy and fill over odd sizes", "[ops][elementwise]", test_policies) {
  auto exec = make_policy<TestType>();
  for (std::size_t n : {1u, 3u, 17u, 771u, 40000u}) {
    CAPTURE(n);
    const auto x = random_floats(n, unsigned(n));
    auto xd = upload(exec, x);
    buffer_for<float, TestType> yd(n);
    ops::copy(exec, xd.view(index_t(n)), yd.view(index_t(n)));
    CHECK(download(exec, yd) == x);
    ops::fill(exec, yd.view(index_t(n)), 2.5f);
    CHECK(download(exec, yd) == std::vector<float>(n, 2.5f));
    buffer_for<std::int32_t, TestType> id(n);
    ops::fill(exec, id.view(index_t(n)), std::int32_t(-7));
    CHECK(download(exec, id) == std::vector<std::int32_t>(n, -7));
    buffer_for<bf16, TestType> hd(n);
    ops::fill(exec, hd.view(index_t(n)), bf16(1.5f));
    CHECK(download(exec, hd) == std::vector<bf16>(n, bf16(1.5f)));
  }
}

TEMPLATE_LIST_TEST_CASE("add and add_scaled match plain loops, in place too", "[ops][elementwise]", test_policies) {
  auto exec = make_policy<TestType>();
  for (std::size_t n : {1u, 3u, 17u, 771u, 40000u}) {
    CAPTURE(n);
    const index_t m = index_t(n);
    const auto a = random_floats(n, 1 + unsigned(n));
    const auto b = random_floats(n, 2 + unsigned(n));
    auto ad = upload(exec, a);
    auto bd = upload(exec, b);
    buffer_for<float, TestType> od(n);
    ops::add(exec, ad.view(m), bd.view(m), od.view(m));
    std::vector<float> sum(n);
    for (std::size_t i = 0; i < n; ++i) sum[i] = a[i] + b[i];
    CHECK(download(exec, od) == sum);  // one correctly rounded add: exact
    ops::add(exec, ad.view(m), bd.view(m), ad.view(m));  // out aliasing a
    CHECK(download(exec, ad) == sum);
    // y += alpha x, possibly with a fused multiply-add: within 1 ulp of the
    // double result (values <= 1.3): 2e-7 absolute.
    const float alpha = -0.37f;
    ops::add_scaled(exec, alpha, bd.view(m), od.view(m));
    std::vector<double> ref(n);
    for (std::size_t i = 0; i < n; ++i) ref[i] = double(sum[i]) + double(alpha) * b[i];
    check_close(download(exec, od), ref, 2e-7, 0.0, "add_scaled");
  }
}

TEMPLATE_LIST_TEST_CASE("elementwise operations throw shape_error naming the operation", "[ops][elementwise]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  buffer_for<float, TestType> a(5), b(4);
  buffer_for<bf16, TestType> h(4);
  CHECK_THROWS_WITH(ops::copy(exec, a.view(5), b.view(4)), Catch::Contains("ctformer::copy"));
  CHECK_THROWS_WITH(ops::convert(exec, a.view(5), h.view(4)), Catch::Contains("ctformer::convert"));
  CHECK_THROWS_WITH(ops::add(exec, a.view(5), b.view(4), a.view(5)), Catch::Contains("ctformer::add"));
  CHECK_THROWS_WITH(ops::add_scaled(exec, 1.0f, a.view(5), b.view(4)), Catch::Contains("ctformer::add_scaled"));
}

TEMPLATE_LIST_TEST_CASE("convert from float is bit-identical to the scalar conversions", "[ops][elementwise][convert]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  const auto src = interesting_floats();
  check_convert_matches_scalar<bf16>(exec, src, "float -> bf16");
  check_convert_matches_scalar<fp16>(exec, src, "float -> fp16");
  check_convert_matches_scalar<fp8_e4m3>(exec, src, "float -> fp8_e4m3");
  // Odd lengths: the vector bodies' tails.
  for (std::size_t n : {1u, 3u, 17u, 33u}) {
    const std::vector<float> part(src.begin() + 1000, src.begin() + 1000 + std::ptrdiff_t(n));
    check_convert_matches_scalar<bf16>(exec, part, "float -> bf16 (short)");
    check_convert_matches_scalar<fp16>(exec, part, "float -> fp16 (short)");
  }
}

TEMPLATE_LIST_TEST_CASE("convert of every 16-bit pattern to float is bit-identical to the scalar conversions",
                        "[ops][elementwise][convert]", test_policies) {
  auto exec = make_policy<TestType>();
  std::vector<bf16> b;
  std::vector<fp16> h;
  std::vector<fp8_e4m3> q;
  for (std::uint32_t i = 0; i < 65536; ++i) {
    b.push_back(bf16::from_bits(std::uint16_t(i)));
    h.push_back(fp16::from_bits(std::uint16_t(i)));
    if (i < 256) q.push_back(fp8_e4m3::from_bits(std::uint8_t(i)));
  }
  check_convert_matches_scalar<float>(exec, b, "bf16 -> float");
  check_convert_matches_scalar<float>(exec, h, "fp16 -> float");
  check_convert_matches_scalar<float>(exec, q, "fp8_e4m3 -> float");
  // Between reduced types (through float).
  check_convert_matches_scalar<fp16>(exec, b, "bf16 -> fp16");
  check_convert_matches_scalar<bf16>(exec, h, "fp16 -> bf16");
  check_convert_matches_scalar<fp8_e4m3>(exec, h, "fp16 -> fp8_e4m3");
}

TEST_CASE("convert on strided views (cpu)", "[ops][elementwise][convert]") {
  std::vector<float> src{1.0f, 9.0f, -2.0f, 9.0f, 0.333f, 9.0f};
  std::vector<bf16> dst(3);
  ops::convert(cpu::par, tensor_view<const float, 1>(src.data(), {3}, {2}), tensor_view<bf16, 1>(dst.data(), {3}));
  CHECK(dst[0] == bf16(1.0f));
  CHECK(dst[1] == bf16(-2.0f));
  CHECK(dst[2] == bf16(0.333f));
}
