// swiglu (LLaMA's gated MLP activation, out = silu(gate) * up): forward
// against a double reference, backward against the analytic double
// derivative and central finite differences of sum(dout * out), the backward
// in place over gate_up, rows with padding, and shape errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <utility>
#include <vector>

#include "kernel_test_util.hpp"

using namespace ctformer;
using namespace ctformer::testing;

namespace {

double sigmoid_ref(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// gate_up: (n, 2f) rows; out: (n, f).
std::vector<double> swiglu_ref(const std::vector<float>& gate_up, index_t n, index_t f) {
  std::vector<double> out(std::size_t(n * f));
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < f; ++j) {
      const double g = gate_up[std::size_t(i * 2 * f + j)], u = gate_up[std::size_t(i * 2 * f + f + j)];
      out[std::size_t(i * f + j)] = g * sigmoid_ref(g) * u;
    }
  return out;
}

// dgate_up (n, 2f) for dout (n, f).
std::vector<double> swiglu_grad_ref(const std::vector<float>& gate_up, const std::vector<float>& dout, index_t n,
                                    index_t f) {
  std::vector<double> grad(std::size_t(n * 2 * f));
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < f; ++j) {
      const double g = gate_up[std::size_t(i * 2 * f + j)], u = gate_up[std::size_t(i * 2 * f + f + j)];
      const double d = dout[std::size_t(i * f + j)], s = sigmoid_ref(g);
      grad[std::size_t(i * 2 * f + j)] = d * u * s * (1.0 + g * (1.0 - s));
      grad[std::size_t(i * 2 * f + f + j)] = d * g * s;
    }
  return grad;
}

template <class P>
std::vector<float> run_forward(const P& exec, const std::vector<float>& gate_up, index_t n, index_t f) {
  auto in = upload(exec, gate_up);
  buffer_for<float, P> out(std::size_t(n * f));
  ops::swiglu_forward(exec, in.view(n, 2 * f), out.view(n, f));
  return download(exec, out);
}

template <class P>
std::vector<float> run_backward(const P& exec, const std::vector<float>& gate_up, const std::vector<float>& dout,
                                index_t n, index_t f) {
  auto in = upload(exec, gate_up);
  auto d = upload(exec, dout);
  buffer_for<float, P> grad(std::size_t(n * 2 * f));
  ops::swiglu_backward(exec, in.view(n, 2 * f), d.view(n, f), grad.view(n, 2 * f));
  return download(exec, grad);
}

// (rows, F): one element, odd widths with vector tails, LLaMA's 2048 over
// enough rows to run on several threads.
const std::pair<index_t, index_t> shapes[] = {{1, 1}, {3, 17}, {5, 771}, {40, 2048}};

}  // namespace

TEMPLATE_LIST_TEST_CASE("swiglu forward matches a double reference", "[ops][swiglu]", test_policies) {
  auto exec = make_policy<TestType>();
  for (auto [n, f] : shapes) {
    CAPTURE(n, f);
    auto gate_up = random_floats(std::size_t(n * 2 * f), 10 + unsigned(f), -8.0f, 8.0f);
    if (f >= 3) gate_up[0] = 0.0f, gate_up[1] = 30.0f, gate_up[2] = -30.0f;  // sigmoid 1/2, ~1, ~1e-13
    // silu's exp is good to ~2 ulp; the product of three rounded factors
    // adds a few ulp: 1e-6 absolute (values near 0 for negative gates, where
    // the sigmoid's error is absolute) plus 1e-5 relative.
    check_close(run_forward(exec, gate_up, n, f), swiglu_ref(gate_up, n, f), 1e-6, 1e-5, "out");
  }
}

TEMPLATE_LIST_TEST_CASE("swiglu backward matches the derivative and finite differences", "[ops][swiglu]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  for (auto [n, f] : shapes) {
    CAPTURE(n, f);
    auto gate_up = random_floats(std::size_t(n * 2 * f), 20 + unsigned(f), -6.0f, 6.0f);
    const auto dout = random_floats(std::size_t(n * f), 30 + unsigned(f));
    const auto grad = run_backward(exec, gate_up, dout, n, f);
    // Values of size up to |u| ~ 6 times a derivative up to 1.1: a few float
    // operations, 1e-5 absolute plus 2e-5 relative.
    check_close(grad, swiglu_grad_ref(gate_up, dout, n, f), 1e-5, 2e-5, "dgate_up vs derivative");
    auto loss = [&] { return dot(dout, run_forward(exec, gate_up, n, f)); };
    // h = 1e-2 on a product whose third derivative is O(|u|) ~ 6: truncation
    // h^2/6 * 6 ~ 1e-4; float noise of one output (~4e-6) over 2h ~ 2e-4:
    // 5e-4 absolute plus 1e-3 relative.
    const auto at = sample_indices(gate_up.size(), 64);
    check_close(pick(grad, at), finite_differences(gate_up, loss, 1e-2f, at), 5e-4, 1e-3,
                "dgate_up vs finite differences");
  }
}

TEMPLATE_LIST_TEST_CASE("swiglu backward in place over gate_up equals the out-of-place result", "[ops][swiglu]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  const index_t n = 4, f = 37;
  const auto gate_up = random_floats(std::size_t(n * 2 * f), 7, -5.0f, 5.0f);
  const auto dout = random_floats(std::size_t(n * f), 8);
  auto in = upload(exec, gate_up);
  auto d = upload(exec, dout);
  ops::swiglu_backward(exec, in.view(n, 2 * f), d.view(n, f), in.view(n, 2 * f));
  CHECK(download(exec, in) == run_backward(exec, gate_up, dout, n, f));
}

TEMPLATE_LIST_TEST_CASE("swiglu on rows with padding leaves the padding alone", "[ops][swiglu]", test_policies) {
  auto exec = make_policy<TestType>();
  // Row strides wider than the rows (as views into a larger activation buffer).
  const index_t n = 3, f = 21, in_stride = 2 * f + 5, out_stride = f + 3;
  const auto storage = random_floats(std::size_t(n * in_stride), 9, -4.0f, 4.0f);
  std::vector<float> packed;  // the same rows without padding, for the reference
  for (index_t i = 0; i < n; ++i)
    packed.insert(packed.end(), storage.begin() + i * in_stride, storage.begin() + i * in_stride + 2 * f);
  auto in = upload(exec, storage);
  auto out = upload(exec, std::vector<float>(std::size_t(n * out_stride), -1.0f));
  ops::swiglu_forward(exec, tensor_view<const float, 2>(in.data(), {n, 2 * f}, {in_stride, 1}),
                      tensor_view<float, 2>(out.data(), {n, f}, {out_stride, 1}));
  const auto got = download(exec, out);
  std::vector<float> rows;
  for (index_t i = 0; i < n; ++i) {
    rows.insert(rows.end(), got.begin() + i * out_stride, got.begin() + i * out_stride + f);
    for (index_t j = f; j < out_stride; ++j) CHECK(got[std::size_t(i * out_stride + j)] == -1.0f);
  }
  check_close(rows, swiglu_ref(packed, n, f), 1e-6, 1e-5, "padded rows");
}

TEMPLATE_LIST_TEST_CASE("swiglu throws shape_error naming the operation", "[ops][swiglu]", test_policies) {
  auto exec = make_policy<TestType>();
  buffer_for<float, TestType> a(2 * 2 * 6), b(2 * 6);
  const tensor_view<float, 2> narrow(b.data(), {2, 5});
  // gate_up must be twice as wide as out, with as many rows.
  CHECK_THROWS_WITH(ops::swiglu_forward(exec, a.view(2, 12), narrow), Catch::Contains("swiglu_forward"));
  CHECK_THROWS_AS(ops::swiglu_forward(exec, a.view(2, 12), tensor_view<float, 2>(b.data(), {1, 6})), shape_error);
  CHECK_THROWS_WITH(ops::swiglu_backward(exec, a.view(2, 12), narrow, a.view(2, 12)),
                    Catch::Contains("swiglu_backward"));
  CHECK_THROWS_AS(ops::swiglu_backward(exec, a.view(2, 12), b.view(2, 6), a.view(4, 6)), shape_error);
}

#if !defined(__CUDACC__)
TEST_CASE("swiglu on views with strided columns (cpu)", "[ops][swiglu]") {
  // Every other column: the kernels' element-by-element path, same formulas.
  const index_t n = 2, f = 13;
  const auto storage = random_floats(std::size_t(n * 4 * f), 11, -5.0f, 5.0f);
  std::vector<float> packed;
  for (std::size_t i = 0; i < storage.size(); i += 2) packed.push_back(storage[i]);
  std::vector<float> out(std::size_t(n * 2 * f), -1.0f);
  ops::swiglu_forward(cpu::par, tensor_view<const float, 2>(storage.data(), {n, 2 * f}, {4 * f, 2}),
                      tensor_view<float, 2>(out.data(), {n, f}, {2 * f, 2}));
  std::vector<float> got;
  for (std::size_t i = 0; i < out.size(); i += 2) {
    got.push_back(out[i]);
    CHECK(out[i + 1] == -1.0f);
  }
  check_close(got, swiglu_ref(packed, n, f), 1e-6, 1e-5, "strided forward");

  const auto dout = random_floats(std::size_t(n * f), 12);
  std::vector<float> grad(std::size_t(n * 4 * f), -1.0f);
  ops::swiglu_backward(cpu::par, tensor_view<const float, 2>(storage.data(), {n, 2 * f}, {4 * f, 2}),
                       tensor_view<const float, 2>(dout.data(), {n, f}), tensor_view<float, 2>(grad.data(), {n, 2 * f}, {4 * f, 2}));
  std::vector<float> grad_got;
  for (std::size_t i = 0; i < grad.size(); i += 2) grad_got.push_back(grad[i]);
  check_close(grad_got, swiglu_grad_ref(packed, dout, n, f), 1e-5, 2e-5, "strided backward");
}
#endif
