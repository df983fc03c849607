// Helpers for the kernel tests of tests/unit/ops: comparing against a double
// reference (one assertion per array, naming the worst element) and central
// finite differences of a scalar function. Host-only code; device data is
// always downloaded first.
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "../../support/test_support.hpp"

namespace ctformer::testing {

/// Checks |got[i] - ref[i]| <= abs_tol + rel_tol * |ref[i]| for every i, as a
/// single assertion that reports the worst element.
inline void check_close(const std::vector<float>& got, const std::vector<double>& ref, double abs_tol, double rel_tol,
                        const std::string& what) {
  REQUIRE(got.size() == ref.size());
  double worst_excess = -1.0;
  std::size_t worst = 0;
  bool all_ok = true;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double allowed = abs_tol + rel_tol * std::fabs(ref[i]);
    const double err = std::fabs(double(got[i]) - ref[i]);
    const bool ok = err <= allowed;  // false for NaN
    if (!ok) all_ok = false;
    const double excess = ok ? err / (allowed > 0 ? allowed : 1.0) : 1e300;
    if (excess > worst_excess) {
      worst_excess = excess;
      worst = i;
    }
  }
  INFO(what << ": worst element " << worst << " of " << got.size() << ": got " << (got.empty() ? 0.0 : got[worst])
            << ", reference " << (ref.empty() ? 0.0 : ref[worst]) << " (abs_tol " << abs_tol << ", rel_tol " << rel_tol
            << ")");
  CHECK(all_ok);
}

inline std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

/// Central finite differences (f(x + h e_i) - f(x - h e_i)) / 2h of a scalar
/// function of x at the given indices (all when indices is empty). f reads x.
inline std::vector<double> finite_differences(std::vector<float>& x, const std::function<double()>& f, float h,
                                              std::vector<std::size_t> indices = {}) {
  if (indices.empty())
    for (std::size_t i = 0; i < x.size(); ++i) indices.push_back(i);
  std::vector<double> g;
  g.reserve(indices.size());
  for (std::size_t i : indices) {
    const float saved = x[i];
    x[i] = saved + h;
    const double plus_x = double(x[i]);
    const double fp = f();
    x[i] = saved - h;
    const double minus_x = double(x[i]);
    const double fm = f();
    x[i] = saved;
    g.push_back((fp - fm) / (plus_x - minus_x));  // the actual (float-rounded) step
  }
  return g;
}

/// Picks values[i] for i in indices (all when indices is empty).
inline std::vector<float> pick(const std::vector<float>& values, const std::vector<std::size_t>& indices) {
  if (indices.empty()) return values;
  std::vector<float> out;
  for (std::size_t i : indices) out.push_back(values[i]);
  return out;
}

/// A few spread-out indices of [0, n): all of them when n <= limit.
inline std::vector<std::size_t> sample_indices(std::size_t n, std::size_t limit = 64) {
  std::vector<std::size_t> out;
  if (n <= limit) {
    for (std::size_t i = 0; i < n; ++i) out.push_back(i);
  } else {
    for (std::size_t k = 0; k < limit; ++k) out.push_back(k * (n - 1) / (limit - 1));
  }
  return out;
}

/// sum(a * b) in double.
inline double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += double(a[i]) * double(b[i]);
  return s;
}

}  // namespace ctformer::testing
