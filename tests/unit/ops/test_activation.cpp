// gelu (tanh form) and silu: forward against double references, backward
// against the analytic double derivative and central finite differences of
// sum(dy * y), in place, strided views, shape errors; and the accuracy of the
// vector exp / tanh approximations the CPU kernels use.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernel_test_util.hpp"

using namespace ctformer;
using namespace ctformer::testing;

namespace {

double gelu_ref(double x) { return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x))); }
double gelu_grad_ref(double x) {
  const double k = std::sqrt(2.0 / M_PI);
  const double t = std::tanh(k * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x);
}
double silu_ref(double x) { return x / (1.0 + std::exp(-x)); }
double silu_grad_ref(double x) {
  const double s = 1.0 / (1.0 + std::exp(-x));
  return s * (1.0 + x * (1.0 - s));
}

enum class act { gelu, silu };

template <class P>
std::vector<float> run_forward(const P& exec, act a, const std::vector<float>& x) {
  const index_t n = index_t(x.size());
  auto xd = upload(exec, x);
  buffer_for<float, P> yd(x.size());
  if (a == act::gelu)
    ops::gelu_forward(exec, xd.view(n), yd.view(n));
  else
    ops::silu_forward(exec, xd.view(n), yd.view(n));
  return download(exec, yd);
}

template <class P>
std::vector<float> run_backward(const P& exec, act a, const std::vector<float>& x, const std::vector<float>& dy) {
  const index_t n = index_t(x.size());
  auto xd = upload(exec, x);
  auto dyd = upload(exec, dy);
  buffer_for<float, P> dxd(x.size());
  if (a == act::gelu)
    ops::gelu_backward(exec, xd.view(n), dyd.view(n), dxd.view(n));
  else
    ops::silu_backward(exec, xd.view(n), dyd.view(n), dxd.view(n));
  return download(exec, dxd);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("gelu and silu forward match double references", "[ops][activation]", test_policies) {
  auto exec = make_policy<TestType>();
  for (act a : {act::gelu, act::silu}) {
    // 100003 spans several chunks (and threads) with an odd tail.
    for (std::size_t n : {1u, 3u, 17u, 771u, 100003u}) {
      CAPTURE(int(a), n);
      auto x = random_floats(n, 100 + unsigned(n), -8.0f, 8.0f);
      if (n >= 3) x[0] = 0.0f, x[1] = 30.0f, x[2] = -30.0f;
      const auto y = run_forward(exec, a, x);
      std::vector<double> ref;
      for (float v : x) ref.push_back(a == act::gelu ? gelu_ref(v) : silu_ref(v));
      // tanh / exp are good to ~2 ulp; for negative x the result is x times
      // a small factor (1 + tanh, or sigmoid) whose error is absolute
      // (~1e-7), so 1e-6 absolute (|x| <= 8) plus 1e-5 relative.
      check_close(y, ref, 1e-6, 1e-5, "y");
    }
  }
}

TEMPLATE_LIST_TEST_CASE("gelu and silu backward match the derivative and finite differences", "[ops][activation]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  for (act a : {act::gelu, act::silu}) {
    for (std::size_t n : {1u, 3u, 17u, 771u}) {
      CAPTURE(int(a), n);
      auto x = random_floats(n, 200 + unsigned(n), -6.0f, 6.0f);
      const auto dy = random_floats(n, 300 + unsigned(n));
      const auto dx = run_backward(exec, a, x, dy);
      std::vector<double> ref;
      for (std::size_t i = 0; i < n; ++i) ref.push_back(dy[i] * (a == act::gelu ? gelu_grad_ref(x[i]) : silu_grad_ref(x[i])));
      // A few float operations on values of size ~1 (derivatives reach 1.13):
      // 2e-6 absolute + 2e-5 relative.
      check_close(dx, ref, 2e-6, 2e-5, "dx vs derivative");
      auto f = [&] { return dot(dy, run_forward(exec, a, x)); };
      // h = 1e-2: truncation h^2/6 |f'''| <= 2e-5; float noise of one y
      // (<= 6e-7) over 2h is ~3e-5: 2e-4 absolute + 1e-3 relative.
      const auto ix = sample_indices(n, 64);
      check_close(pick(dx, ix), finite_differences(x, f, 1e-2f, ix), 2e-4, 1e-3, "dx vs finite differences");
    }
  }
}

TEMPLATE_LIST_TEST_CASE("activations in place: y aliasing x, dx aliasing dy", "[ops][activation]", test_policies) {
  auto exec = make_policy<TestType>();
  const index_t n = 45;
  const auto x = random_floats(n, 1, -4.0f, 4.0f);
  const auto dy = random_floats(n, 2);
  for (act a : {act::gelu, act::silu}) {
    auto xd = upload(exec, x);
    auto dyd = upload(exec, dy);
    if (a == act::gelu) {
      ops::gelu_backward(exec, xd.view(n), dyd.view(n), dyd.view(n));
      ops::gelu_forward(exec, xd.view(n), xd.view(n));
    } else {
      ops::silu_backward(exec, xd.view(n), dyd.view(n), dyd.view(n));
      ops::silu_forward(exec, xd.view(n), xd.view(n));
    }
    CHECK(download(exec, xd) == run_forward(exec, a, x));
    CHECK(download(exec, dyd) == run_backward(exec, a, x, dy));
  }
}

TEMPLATE_LIST_TEST_CASE("activation operations throw shape_error naming the operation", "[ops][activation]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  buffer_for<float, TestType> a(5), b(4);
  CHECK_THROWS_WITH(ops::gelu_forward(exec, a.view(5), b.view(4)), Catch::Contains("gelu_forward"));
  CHECK_THROWS_WITH(ops::silu_forward(exec, a.view(5), b.view(4)), Catch::Contains("silu_forward"));
  CHECK_THROWS_WITH(ops::gelu_backward(exec, a.view(5), a.view(5), b.view(4)), Catch::Contains("gelu_backward"));
  CHECK_THROWS_AS(ops::silu_backward(exec, a.view(5), b.view(4), a.view(5)), shape_error);
}

TEST_CASE("activations on strided views (cpu)", "[ops][activation]") {
  // Every other element of a buffer: the kernels' scalar path.
  const index_t n = 21;
  auto storage = random_floats(2 * n, 9, -5.0f, 5.0f);
  std::vector<float> out(2 * n, 0.0f);
  tensor_view<const float, 1> x(storage.data(), {n}, {2});
  tensor_view<float, 1> y(out.data(), {n}, {2});
  ops::gelu_forward(cpu::par, x, y);
  std::vector<float> got;
  std::vector<double> ref;
  for (index_t i = 0; i < n; ++i) {
    got.push_back(out[2 * i]);
    ref.push_back(gelu_ref(storage[2 * i]));
    CHECK(out[2 * i + 1] == 0.0f);  // the gaps are untouched
  }
  check_close(got, ref, 1e-6, 1e-5, "strided gelu");
}

#if !defined(__CUDACC__)
namespace {
// ulps between a float result and the double truth (subnormal spacing below FLT_MIN).
double ulp_error(float got, double truth) {
  if (std::isnan(truth)) return std::isnan(got) ? 0.0 : 1e30;
  if (truth > double(std::numeric_limits<float>::max())) return std::isinf(got) && got > 0 ? 0.0 : 1e30;
  const float t = float(truth);
  const double spacing = std::fabs(t) < std::numeric_limits<float>::min()
                             ? double(std::numeric_limits<float>::denorm_min())
                             : double(std::nextafter(std::fabs(t), INFINITY)) - double(std::fabs(t));
  return std::fabs(double(got) - truth) / spacing;
}

template <class V>
void check_vector_math() {
  using namespace ctformer::cpu::detail;
  double worst_exp = 0, worst_tanh = 0;
  float at_exp = 0, at_tanh = 0;
  alignas(64) float in[V::width], out[V::width];
  // A geometric sweep over [-104, 89] (about 2 million points) plus the
  // neighbourhood of 0, in lanes of V.
  std::vector<float> xs;
  for (float x = 1e-6f; x < 104.0f; x *= 1.00002f) {
    xs.push_back(x);
    xs.push_back(-x);
  }
  for (std::size_t i = 0; i < xs.size(); i += V::width) {
    for (int l = 0; l < V::width; ++l) in[l] = xs[std::min(i + std::size_t(l), xs.size() - 1)];
    vexp(V::load(in)).store(out);
    for (int l = 0; l < V::width; ++l) {
      if (in[l] > 88.72f) continue;  // overflow checked below
      const double e = ulp_error(out[l], std::exp(double(in[l])));
      if (e > worst_exp) worst_exp = e, at_exp = in[l];
    }
    vtanh(V::load(in)).store(out);
    for (int l = 0; l < V::width; ++l) {
      const double e = ulp_error(out[l], std::tanh(double(in[l])));
      if (e > worst_tanh) worst_tanh = e, at_tanh = in[l];
    }
  }
  INFO("width " << V::width << ": exp worst " << worst_exp << " ulp at " << at_exp << ", tanh worst " << worst_tanh
                << " ulp at " << at_tanh);
  // The bounds documented in detail/vector_math.hpp.
  CHECK(worst_exp <= 2.0);
  CHECK(worst_tanh <= 3.0);
  // Special values.
  const float special[] = {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY, 0.0f, -0.0f, 89.0f, -105.0f,
                           1000.0f};
  for (float s : special) {
    for (int l = 0; l < V::width; ++l) in[l] = s;
    vexp(V::load(in)).store(out);
    const float e = out[0];
    vtanh(V::load(in)).store(out);
    const float t = out[0];
    CAPTURE(s, e, t);
    if (std::isnan(s)) {
      CHECK(std::isnan(e));
      CHECK(std::isnan(t));
    } else if (s == INFINITY || s >= 89.0f) {
      CHECK(e == INFINITY);
      CHECK(t == 1.0f);
    } else if (s == -INFINITY || s <= -105.0f) {
      CHECK(e == 0.0f);
      CHECK(t == -1.0f);
    } else {
      CHECK(e == 1.0f);
      CHECK(t == s);
      CHECK(std::signbit(t) == std::signbit(s));
    }
  }
}
}  // namespace

TEST_CASE("vector exp and tanh stay within their documented ulp bounds", "[ops][activation][vector_math]") {
  check_vector_math<ctformer::cpu::detail::f32x1>();
#if defined(CTFORMER_CPU_AVX2)
  check_vector_math<ctformer::cpu::detail::f32x8>();
#endif
#if defined(CTFORMER_CPU_AVX512)
  check_vector_math<ctformer::cpu::detail::f32x16>();
#endif
}
#endif
