// layer_norm and rms_norm: forward against a double reference loop, backward
// against central finite differences of sum(dy * y), parameter gradients
// accumulated (+=), in-place forward, multi-threaded backward, shape errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "kernel_test_util.hpp"

using namespace ctformer;
using namespace ctformer::testing;

namespace {

constexpr float eps = 1e-5f;

struct layer_norm_reference {
  std::vector<double> y, mean, rstd;
};

layer_norm_reference layer_norm_ref(const std::vector<float>& x, const std::vector<float>& w,
                                    const std::vector<float>& b, index_t n, index_t c) {
  layer_norm_reference r{std::vector<double>(x.size()), std::vector<double>(n), std::vector<double>(n)};
  for (index_t i = 0; i < n; ++i) {
    double m = 0, v = 0;
    for (index_t j = 0; j < c; ++j) m += x[i * c + j];
    m /= double(c);
    for (index_t j = 0; j < c; ++j) v += (x[i * c + j] - m) * (x[i * c + j] - m);
    const double s = 1.0 / std::sqrt(v / double(c) + double(eps));
    for (index_t j = 0; j < c; ++j) r.y[i * c + j] = (x[i * c + j] - m) * s * w[j] + b[j];
    r.mean[i] = m;
    r.rstd[i] = s;
  }
  return r;
}

std::vector<double> rms_norm_ref(const std::vector<float>& x, const std::vector<float>& w, index_t n, index_t c,
                                 std::vector<double>* rstd = nullptr) {
  std::vector<double> y(x.size());
  for (index_t i = 0; i < n; ++i) {
    double ss = 0;
    for (index_t j = 0; j < c; ++j) ss += double(x[i * c + j]) * x[i * c + j];
    const double s = 1.0 / std::sqrt(ss / double(c) + double(eps));
    for (index_t j = 0; j < c; ++j) y[i * c + j] = x[i * c + j] * s * w[j];
    if (rstd) rstd->push_back(s);
  }
  return y;
}

// Runs layer_norm_forward on P and returns y, mean, rstd.
template <class P>
void run_layer_norm(const P& exec, const std::vector<float>& x, const std::vector<float>& w,
                    const std::vector<float>& b, index_t n, index_t c, std::vector<float>& y, std::vector<float>& mean,
                    std::vector<float>& rstd) {
  auto xd = upload(exec, x);
  auto wd = upload(exec, w);
  auto bd = upload(exec, b);
  buffer_for<float, P> yd(n * c), md(n), rd(n);
  ops::layer_norm_forward(exec, xd.view(n, c), wd.view(c), bd.view(c), yd.view(n, c), md.view(n), rd.view(n), eps);
  y = download(exec, yd);
  mean = download(exec, md);
  rstd = download(exec, rd);
}

template <class P>
std::vector<float> run_rms_norm(const P& exec, const std::vector<float>& x, const std::vector<float>& w, index_t n,
                                index_t c, std::vector<float>* rstd = nullptr) {
  auto xd = upload(exec, x);
  auto wd = upload(exec, w);
  buffer_for<float, P> yd(n * c), rd(n);
  ops::rms_norm_forward(exec, xd.view(n, c), wd.view(c), yd.view(n, c), rd.view(n), eps);
  if (rstd) *rstd = download(exec, rd);
  return download(exec, yd);
}

std::vector<float> shifted(std::vector<float> v, float by) {
  for (auto& e : v) e += by;
  return v;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("layer_norm_forward matches a double reference", "[ops][norm]", test_policies) {
  auto exec = make_policy<TestType>();
  for (index_t c : {1, 3, 17, 771}) {
    for (index_t n : {1, 4}) {
      CAPTURE(n, c);
      // An offset of 3 makes the mean matter (cancellation in a one-pass variance would show).
      const auto x = shifted(random_floats(n * c, 11 + unsigned(c), -2.0f, 2.0f), 3.0f);
      const auto w = random_floats(c, 12, 0.5f, 1.5f);
      const auto b = random_floats(c, 13);
      std::vector<float> y, mean, rstd;
      run_layer_norm(exec, x, w, b, n, c, y, mean, rstd);
      const auto ref = layer_norm_ref(x, w, b, n, c);
      // fp32 sums over <= 771 elements of size ~5: relative error ~1e-6 in
      // mean and rstd; y = xhat * w + b with |xhat| < 2 gives abs error
      // ~5e-6. (C = 1: var = 0, rstd = 1/sqrt(eps) ~ 316 and y = b exactly.)
      check_close(y, ref.y, 2e-5, 2e-5, "y");
      check_close(mean, ref.mean, 1e-6, 1e-6, "mean");
      check_close(rstd, ref.rstd, 0.0, 2e-5, "rstd");
    }
  }
}

TEMPLATE_LIST_TEST_CASE("layer_norm_forward in place (y aliasing x) equals the out-of-place result", "[ops][norm]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  const index_t n = 3, c = 37;
  const auto x = random_floats(n * c, 5);
  const auto w = random_floats(c, 6);
  const auto b = random_floats(c, 7);
  std::vector<float> y, mean, rstd;
  run_layer_norm(exec, x, w, b, n, c, y, mean, rstd);
  auto xd = upload(exec, x);
  auto wd = upload(exec, w);
  auto bd = upload(exec, b);
  buffer_for<float, TestType> md(n), rd(n);
  ops::layer_norm_forward(exec, xd.view(n, c), wd.view(c), bd.view(c), xd.view(n, c), md.view(n), rd.view(n), eps);
  CHECK(download(exec, xd) == y);  // bit-identical: same arithmetic, same order
  // rms_norm too
  const auto yr = run_rms_norm(exec, x, w, n, c);
  auto xr = upload(exec, x);
  ops::rms_norm_forward(exec, xr.view(n, c), wd.view(c), xr.view(n, c), rd.view(n), eps);
  CHECK(download(exec, xr) == yr);
}

TEMPLATE_LIST_TEST_CASE("layer_norm_backward matches finite differences and accumulates parameter gradients",
                        "[ops][norm]", test_policies) {
  auto exec = make_policy<TestType>();
  for (index_t c : {1, 3, 17, 771}) {
    const index_t n = 2;
    CAPTURE(c);
    auto x = random_floats(n * c, 21 + unsigned(c), -2.0f, 2.0f);
    auto w = random_floats(c, 22, 0.5f, 1.5f);
    auto b = random_floats(c, 23);
    const auto dy = random_floats(n * c, 24);
    // f = sum(dy * y) has gradient dx, dweight, dbias with respect to x, w, b.
    auto f = [&] {
      std::vector<float> y, mean, rstd;
      run_layer_norm(exec, x, w, b, n, c, y, mean, rstd);
      return dot(dy, y);
    };
    std::vector<float> y, mean, rstd;
    run_layer_norm(exec, x, w, b, n, c, y, mean, rstd);
    auto dyd = upload(exec, dy);
    auto xd = upload(exec, x);
    auto wd = upload(exec, w);
    auto md = upload(exec, mean);
    auto rd = upload(exec, rstd);
    buffer_for<float, TestType> dxd(n * c);
    // dweight and dbias start non-zero: the backward must add to them.
    const float start = 0.25f;
    auto dwd = upload(exec, std::vector<float>(c, start));
    auto dbd = upload(exec, std::vector<float>(c, -start));
    ops::layer_norm_backward(exec, dyd.view(n, c), xd.view(n, c), wd.view(c), md.view(n), rd.view(n),
                             dxd.view(n, c), dwd.view(c), dbd.view(c));
    const auto dx = download(exec, dxd);
    auto dw = download(exec, dwd);
    auto db = download(exec, dbd);
    for (auto& v : dw) v -= start;
    for (auto& v : db) v += start;
    // Central differences with h = 1e-2 on inputs of size ~1: truncation
    // h^2/6 f''' ~ 1e-4 (rstd ~ 1 here), float noise in f ~ 1e-6 / 2h ~ 1e-4;
    // 2e-3 absolute + relative is ten times that, while a missing term of the
    // gradient is off by O(0.1).
    const float h = 1e-2f;
    const auto ix = sample_indices(x.size(), 96);
    check_close(pick(dx, ix), finite_differences(x, f, h, ix), 2e-3, 2e-3, "dx");
    check_close(dw, finite_differences(w, f, h), 2e-3, 2e-3, "dweight");
    check_close(db, finite_differences(b, f, h), 2e-3, 2e-3, "dbias");
  }
}

TEMPLATE_LIST_TEST_CASE("rms_norm forward matches a double reference; backward matches finite differences",
                        "[ops][norm]", test_policies) {
  auto exec = make_policy<TestType>();
  for (index_t c : {1, 3, 17, 771}) {
    const index_t n = 3;
    CAPTURE(c);
    auto x = random_floats(n * c, 31 + unsigned(c), -2.0f, 2.0f);
    auto w = random_floats(c, 32, 0.5f, 1.5f);
    const auto dy = random_floats(n * c, 33);
    std::vector<float> rstd;
    const auto y = run_rms_norm(exec, x, w, n, c, &rstd);
    std::vector<double> rstd_ref;
    // fp32 sum of squares over <= 771 terms: relative error ~1e-6.
    check_close(y, rms_norm_ref(x, w, n, c, &rstd_ref), 1e-5, 1e-5, "y");
    check_close(rstd, rstd_ref, 0.0, 1e-5, "rstd");

    auto xd = upload(exec, x);
    auto wd = upload(exec, w);
    auto dyd = upload(exec, dy);
    auto rd = upload(exec, rstd);
    buffer_for<float, TestType> dxd(n * c);
    const float start = 0.5f;
    auto dwd = upload(exec, std::vector<float>(c, start));
    ops::rms_norm_backward(exec, dyd.view(n, c), xd.view(n, c), wd.view(c), rd.view(n), dxd.view(n, c), dwd.view(c));
    const auto dx = download(exec, dxd);
    auto dw = download(exec, dwd);
    for (auto& v : dw) v -= start;
    auto f = [&] { return dot(dy, run_rms_norm(exec, x, w, n, c)); };
    // Same reasoning as layer_norm: h = 1e-2, tolerance 2e-3.
    const auto ix = sample_indices(x.size(), 96);
    check_close(pick(dx, ix), finite_differences(x, f, 1e-2f, ix), 2e-3, 2e-3, "dx");
    check_close(dw, finite_differences(w, f, 1e-2f), 2e-3, 2e-3, "dweight");
  }
}

TEMPLATE_LIST_TEST_CASE("norm backward over many rows (several threads) matches the analytic double gradient",
                        "[ops][norm]", test_policies) {
  auto exec = make_policy<TestType>();
  // Enough rows that the CPU kernel splits them over threads and sums partials.
  const index_t n = 4099, c = 19;
  const auto x = random_floats(n * c, 41, -2.0f, 2.0f);
  const auto w = random_floats(c, 42, 0.5f, 1.5f);
  const auto b = random_floats(c, 43);
  const auto dy = random_floats(n * c, 44);
  std::vector<float> y, mean, rstd;
  run_layer_norm(exec, x, w, b, n, c, y, mean, rstd);
  auto dyd = upload(exec, dy);
  auto xd = upload(exec, x);
  auto wd = upload(exec, w);
  auto md = upload(exec, mean);
  auto rd = upload(exec, rstd);
  buffer_for<float, TestType> dxd(n * c);
  auto dwd = upload(exec, std::vector<float>(c, 0.0f));
  auto dbd = upload(exec, std::vector<float>(c, 0.0f));
  ops::layer_norm_backward(exec, dyd.view(n, c), xd.view(n, c), wd.view(c), md.view(n), rd.view(n), dxd.view(n, c),
                           dwd.view(c), dbd.view(c));
  // Reference: dx = s (dy w - mean(dy w) - xhat mean(dy w xhat)); dw = sum dy xhat; db = sum dy.
  std::vector<double> dx_ref(n * c), dw_ref(c, 0.0), db_ref(c, 0.0);
  for (index_t i = 0; i < n; ++i) {
    double m = 0, v = 0;
    for (index_t j = 0; j < c; ++j) m += x[i * c + j];
    m /= double(c);
    for (index_t j = 0; j < c; ++j) v += (x[i * c + j] - m) * (x[i * c + j] - m);
    const double s = 1.0 / std::sqrt(v / double(c) + double(eps));
    double a = 0, bsum = 0;
    for (index_t j = 0; j < c; ++j) {
      const double xhat = (x[i * c + j] - m) * s;
      a += double(dy[i * c + j]) * w[j];
      bsum += double(dy[i * c + j]) * w[j] * xhat;
      dw_ref[j] += double(dy[i * c + j]) * xhat;
      db_ref[j] += dy[i * c + j];
    }
    for (index_t j = 0; j < c; ++j) {
      const double xhat = (x[i * c + j] - m) * s;
      dx_ref[i * c + j] = s * (double(dy[i * c + j]) * w[j] - a / double(c) - xhat * bsum / double(c));
    }
  }
  // dx: per-row float arithmetic, errors ~1e-6. dweight / dbias: sums of 4099
  // terms of size ~1 in fp32: error ~ sqrt(n) * 1e-7 * 1 plus partial-sum
  // rounding, well inside 1e-4 absolute on values of size ~30.
  check_close(download(exec, dxd), dx_ref, 2e-5, 2e-5, "dx");
  check_close(download(exec, dwd), dw_ref, 1e-4, 1e-5, "dweight");
  check_close(download(exec, dbd), db_ref, 1e-4, 1e-5, "dbias");

  // rms_norm over the same rows
  std::vector<float> rs;
  run_rms_norm(exec, x, w, n, c, &rs);
  auto rsd = upload(exec, rs);
  auto dw2 = upload(exec, std::vector<float>(c, 0.0f));
  ops::rms_norm_backward(exec, dyd.view(n, c), xd.view(n, c), wd.view(c), rsd.view(n), dxd.view(n, c), dw2.view(c));
  std::vector<double> rdx(n * c), rdw(c, 0.0);
  for (index_t i = 0; i < n; ++i) {
    double ss = 0;
    for (index_t j = 0; j < c; ++j) ss += double(x[i * c + j]) * x[i * c + j];
    const double s = 1.0 / std::sqrt(ss / double(c) + double(eps));
    double a = 0;
    for (index_t j = 0; j < c; ++j) {
      a += double(dy[i * c + j]) * w[j] * x[i * c + j] * s;
      rdw[j] += double(dy[i * c + j]) * x[i * c + j] * s;
    }
    for (index_t j = 0; j < c; ++j)
      rdx[i * c + j] = s * (double(dy[i * c + j]) * w[j] - x[i * c + j] * s * a / double(c));
  }
  check_close(download(exec, dxd), rdx, 2e-5, 2e-5, "rms dx");
  check_close(download(exec, dw2), rdw, 1e-4, 1e-5, "rms dweight");
}

TEMPLATE_LIST_TEST_CASE("norm operations throw shape_error naming the operation", "[ops][norm]", test_policies) {
  auto exec = make_policy<TestType>();
  buffer_for<float, TestType> x(12), y(12), w(4), wrong(3), m(3), r(3), dx(12), dw(4), db(4);
  CHECK_THROWS_AS(ops::layer_norm_forward(exec, x.view(3, 4), wrong.view(3), w.view(4), y.view(3, 4), m.view(3),
                                          r.view(3)),
                  shape_error);
  CHECK_THROWS_WITH(ops::layer_norm_forward(exec, x.view(3, 4), wrong.view(3), w.view(4), y.view(3, 4), m.view(3),
                                            r.view(3)),
                    Catch::Contains("layer_norm_forward") && Catch::Contains("weight"));
  CHECK_THROWS_WITH(ops::rms_norm_forward(exec, x.view(3, 4), w.view(4), y.view(4, 3), r.view(3)),
                    Catch::Contains("rms_norm_forward"));
  CHECK_THROWS_WITH(ops::layer_norm_backward(exec, x.view(3, 4), x.view(3, 4), w.view(4), m.view(3), r.view(3),
                                             dx.view(3, 4), dw.view(4), wrong.view(3)),
                    Catch::Contains("layer_norm_backward") && Catch::Contains("dbias"));
  CHECK_THROWS_WITH(ops::rms_norm_backward(exec, x.view(3, 4), x.view(3, 4), w.view(4), dw.view(4), dx.view(3, 4),
                                           dw.view(4)),
                    Catch::Contains("rms_norm_backward") && Catch::Contains("rstd"));
}
