// Shared by every test program: the execution policies a test runs on, and
// moving data between the host and a policy's memory. The same test source
// compiled by g++ runs on cpu::par; compiled by nvcc (a test_<name>.cu that
// includes test_<name>.cpp) it runs on cuda::par, with the same assertions.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

// Only the layers every test needs (the umbrella ctformer.hpp would make
// each test program parse the whole library).
#include "ctformer/core/core.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/ops/ops.hpp"

namespace ctformer::testing {

#if defined(__CUDACC__)
using test_policies = std::tuple<ctformer::cuda::par_t>;
#else
using test_policies = std::tuple<ctformer::cpu::par_t>;
#endif

/// The policy object a test runs with (cpu::par, or cuda::par on the default stream).
template <class P>
P make_policy() {
  return P{};
}

/// A buffer in P's memory holding a copy of host values.
template <class T, class P>
buffer_for<T, P> upload(const P& exec, const std::vector<T>& host) {
  buffer_for<T, P> device(host.size());
  if (!host.empty())
    ops::copy(exec, tensor_view<const T, 1>(host.data(), {index_t(host.size())}),
              tensor_view<T, 1>(device.data(), {index_t(host.size())}));
  return device;
}

/// The contents of a buffer in P's memory, copied to the host (waits for P).
template <class T, class P, class Space>
std::vector<T> download(const P& exec, const buffer<T, Space>& device) {
  std::vector<T> host(device.size());
  if (!host.empty())
    ops::copy(exec, tensor_view<const T, 1>(device.data(), {index_t(device.size())}),
              tensor_view<T, 1>(host.data(), {index_t(host.size())}));
  exec.synchronize();
  return host;
}

/// n floats uniform in [lo, hi) from a fixed seed: tests are reproducible.
inline std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

/// Largest |a - b| / (abs_floor + |b|) over two equally long ranges.
inline double max_relative_error(const std::vector<float>& a, const std::vector<float>& b, double abs_floor = 1e-6) {
  double worst = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i)
    worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])) / (abs_floor + std::fabs(double(b[i]))));
  return worst;
}

}  // namespace ctformer::testing
