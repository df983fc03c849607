// tensor_view and buffer: extents, strides, transposes, and the shape errors.
#include <catch2/catch.hpp>

#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/ops/ops.hpp"

using namespace ctformer;

TEST_CASE("a contiguous view has row-major strides", "[core][tensor_view]") {
  buffer<float> storage(24);
  auto v = storage.view(2, 3, 4);
  CHECK(v.stride(0) == 12);
  CHECK(v.stride(1) == 4);
  CHECK(v.stride(2) == 1);
  CHECK(v.size() == 24);
  CHECK(v.is_contiguous());
  v(1, 2, 3) = 5.0f;
  CHECK(storage[23] == 5.0f);
}

TEST_CASE("transposed swaps the last two dimensions without moving data", "[core][tensor_view]") {
  buffer<float> storage(6);
  for (int i = 0; i < 6; ++i) storage[i] = float(i);
  auto m = storage.view(2, 3);
  auto t = m.transposed();
  REQUIRE(t.extent(0) == 3);
  REQUIRE(t.extent(1) == 2);
  CHECK(t(2, 1) == m(1, 2));
  CHECK_FALSE(t.is_contiguous());
}

TEST_CASE("buffer::view refuses extents that do not match its size", "[core][buffer]") {
  buffer<float> storage(6);
  CHECK_THROWS_AS(storage.view(4, 2), shape_error);
  CHECK_THROWS_WITH(storage.view(4, 2), Catch::Contains("extents multiply to 8") && Catch::Contains("holds 6"));
}

TEST_CASE("host buffers are 64-byte aligned", "[core][buffer]") {
  for (std::size_t n : {1u, 3u, 17u, 1000u}) {
    buffer<float> b(n);
    CHECK(reinterpret_cast<std::uintptr_t>(b.data()) % 64 == 0);
  }
}

TEST_CASE("operations throw shape_error naming the operation and both shapes", "[core][shape_error]") {
  buffer<float> a(6), b(8), c(8);
  auto av = a.view(2, 3);
  auto bv = b.view(4, 2);
  auto cv = c.view(2, 4);
  CHECK_THROWS_AS(ops::gemm(cpu::par, av, bv, cv), shape_error);
  CHECK_THROWS_WITH(ops::gemm(cpu::par, av, bv, cv),
                    "ctformer::gemm: dimension 1 of a must equal dimension 0 of b: a has shape (2, 3), b has shape (4, 2)");
}

TEST_CASE("fixed_view carries its extents at compile time and works with ops", "[core][fixed_view]") {
  float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 0, 0, 1, 1, 1}, c[4] = {};
  fixed_view<float, 2, 3> av(a);
  fixed_view<float, 3, 2> bv(b);
  fixed_view<float, 2, 2> cv(c);
  static_assert(decltype(av)::size == 6 && decltype(av)::extent(1) == 3);
  ops::gemm(cpu::par, av, bv, cv);
  // [1 2 3; 4 5 6] [1 0; 0 1; 1 1] = [4 5; 10 11], exact in float
  CHECK(c[0] == 4.0f);
  CHECK(c[1] == 5.0f);
  CHECK(c[2] == 10.0f);
  CHECK(c[3] == 11.0f);
}
