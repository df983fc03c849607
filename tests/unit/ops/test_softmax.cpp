// softmax_forward / softmax_backward: forward against a double reference
// (no mask, causal with Tq == Tk and Tq < Tk, scale), backward against central
// finite differences of sum(dy * y), in place, shape errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernel_test_util.hpp"

using namespace ctformer;
using namespace ctformer::testing;

namespace {

std::vector<double> softmax_ref(const std::vector<float>& x, index_t b, index_t tq, index_t tk, float scale,
                                softmax_mask mask) {
  std::vector<double> y(x.size(), 0.0);
  for (index_t r = 0; r < b * tq; ++r) {
    const index_t i = r % tq;
    const index_t visible = mask == softmax_mask::causal ? i + (tk - tq) + 1 : tk;
    double m = -1e300;
    for (index_t j = 0; j < visible; ++j) m = std::max(m, double(scale) * x[r * tk + j]);
    double sum = 0;
    for (index_t j = 0; j < visible; ++j) sum += std::exp(double(scale) * x[r * tk + j] - m);
    for (index_t j = 0; j < visible; ++j) y[r * tk + j] = std::exp(double(scale) * x[r * tk + j] - m) / sum;
  }
  return y;
}

template <class P>
std::vector<float> run_softmax(const P& exec, const std::vector<float>& x, index_t b, index_t tq, index_t tk,
                               float scale, softmax_mask mask) {
  auto xd = upload(exec, x);
  buffer_for<float, P> yd(x.size());
  ops::softmax_forward(exec, xd.view(b, tq, tk), yd.view(b, tq, tk), scale, mask);
  return download(exec, yd);
}

struct shape {
  index_t b, tq, tk;
};

}  // namespace

TEMPLATE_LIST_TEST_CASE("softmax_forward matches a double reference", "[ops][softmax]", test_policies) {
  auto exec = make_policy<TestType>();
  for (shape s : {shape{2, 1, 1}, shape{1, 3, 3}, shape{2, 5, 17}, shape{2, 17, 17}, shape{1, 4, 771},
                  shape{1, 2, 4099}}) {
    for (softmax_mask mask : {softmax_mask::none, softmax_mask::causal}) {
      for (float scale : {1.0f, 0.125f, -0.5f}) {
        CAPTURE(s.b, s.tq, s.tk, int(mask), scale);
        const auto x = random_floats(std::size_t(s.b * s.tq * s.tk), 7 + unsigned(s.tk), -8.0f, 8.0f);
        const auto y = run_softmax(exec, x, s.b, s.tq, s.tk, scale, mask);
        // exp is good to ~2 ulp, the row sum in fp32 adds ~log2(Tk) ulp and
        // the normalisation one more: 1e-5 relative covers Tk = 4099 with a
        // margin; 1e-7 absolute for entries near 0 (masked ones are exactly 0).
        check_close(y, softmax_ref(x, s.b, s.tq, s.tk, scale, mask), 1e-7, 1e-5, "y");
        if (mask == softmax_mask::causal) {
          bool masked_zero = true;
          for (index_t r = 0; r < s.b * s.tq; ++r)
            for (index_t j = r % s.tq + (s.tk - s.tq) + 1; j < s.tk; ++j) masked_zero &= y[r * s.tk + j] == 0.0f;
          CHECK(masked_zero);
        }
      }
    }
  }
}

TEMPLATE_LIST_TEST_CASE("softmax_forward is stable for large logits and works in place", "[ops][softmax]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  const index_t b = 1, tq = 3, tk = 33;
  auto x = random_floats(tq * tk, 3, -1.0f, 1.0f);
  for (auto& v : x) v += 1000.0f;  // naive exp would overflow
  const auto y = run_softmax(exec, x, b, tq, tk, 1.0f, softmax_mask::causal);
  // Inputs near 1000 carry float spacing 6e-5, so the reference sees the same
  // rounded inputs; only the kernel's own error remains.
  check_close(y, softmax_ref(x, b, tq, tk, 1.0f, softmax_mask::causal), 1e-7, 1e-5, "y");
  auto xd = upload(exec, x);
  ops::softmax_forward(exec, xd.view(b, tq, tk), xd.view(b, tq, tk), 1.0f, softmax_mask::causal);
  CHECK(download(exec, xd) == y);  // in place gives the same bits
}

TEMPLATE_LIST_TEST_CASE("softmax_backward matches finite differences of sum(dy * y)", "[ops][softmax]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  for (shape s : {shape{1, 1, 1}, shape{1, 3, 3}, shape{2, 3, 17}, shape{1, 2, 771}}) {
    for (softmax_mask mask : {softmax_mask::none, softmax_mask::causal}) {
      const float scale = 0.7f;
      CAPTURE(s.b, s.tq, s.tk, int(mask));
      const std::size_t count = std::size_t(s.b * s.tq * s.tk);
      auto x = random_floats(count, 17 + unsigned(s.tk), -2.0f, 2.0f);
      const auto dy = random_floats(count, 18);
      const auto y = run_softmax(exec, x, s.b, s.tq, s.tk, scale, mask);
      auto yd = upload(exec, y);
      auto dyd = upload(exec, dy);
      buffer_for<float, TestType> dxd(count);
      ops::softmax_backward(exec, yd.view(s.b, s.tq, s.tk), dyd.view(s.b, s.tq, s.tk), dxd.view(s.b, s.tq, s.tk),
                            scale);
      const auto dx = download(exec, dxd);
      auto f = [&] { return dot(dy, run_softmax(exec, x, s.b, s.tq, s.tk, scale, mask)); };
      // h = 1e-2 on scale * x of size ~1: truncation ~h^2 scale^3 y / 6 < 1e-5;
      // a row of y sums to 1, so float noise in f is ~1e-7 and ~5e-6 after
      // dividing by 2h. Gradients scale with y (~1/Tk), so the absolute
      // floor is small (3e-5, 6x the noise) and the rest relative (2e-3).
      const auto ix = sample_indices(count, 96);
      check_close(pick(dx, ix), finite_differences(x, f, 1e-2f, ix), 3e-5, 2e-3, "dx");
      // Masked positions have y = 0, so dx is exactly 0 there.
      if (mask == softmax_mask::causal) {
        bool masked_zero = true;
        for (index_t r = 0; r < s.b * s.tq; ++r)
          for (index_t j = r % s.tq + (s.tk - s.tq) + 1; j < s.tk; ++j) masked_zero &= dx[r * s.tk + j] == 0.0f;
        CHECK(masked_zero);
      }
    }
  }
}

TEMPLATE_LIST_TEST_CASE("softmax_backward in place (dx aliasing dy)", "[ops][softmax]", test_policies) {
  auto exec = make_policy<TestType>();
  const index_t b = 2, tq = 3, tk = 19;
  const auto y = run_softmax(exec, random_floats(b * tq * tk, 1), b, tq, tk, 1.0f, softmax_mask::none);
  const auto dy = random_floats(b * tq * tk, 2);
  auto yd = upload(exec, y);
  auto dyd = upload(exec, dy);
  buffer_for<float, TestType> dxd(dy.size());
  ops::softmax_backward(exec, yd.view(b, tq, tk), dyd.view(b, tq, tk), dxd.view(b, tq, tk));
  ops::softmax_backward(exec, yd.view(b, tq, tk), dyd.view(b, tq, tk), dyd.view(b, tq, tk));
  CHECK(download(exec, dyd) == download(exec, dxd));
}

TEMPLATE_LIST_TEST_CASE("softmax operations throw shape_error naming the operation", "[ops][softmax]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  buffer_for<float, TestType> x(24), y(24);
  CHECK_THROWS_AS(ops::softmax_forward(exec, x.view(2, 3, 4), y.view(2, 4, 3)), shape_error);
  CHECK_THROWS_WITH(ops::softmax_forward(exec, x.view(2, 3, 4), y.view(2, 4, 3)),
                    Catch::Contains("softmax_forward"));
  // A causal mask needs Tq <= Tk.
  CHECK_THROWS_WITH(ops::softmax_forward(exec, x.view(2, 4, 3), y.view(2, 4, 3), 1.0f, softmax_mask::causal),
                    Catch::Contains("softmax_forward") && Catch::Contains("Tq <= Tk"));
  CHECK_THROWS_WITH(ops::softmax_backward(exec, x.view(2, 3, 4), y.view(2, 3, 4), y.view(3, 2, 4)),
                    Catch::Contains("softmax_backward"));
}
