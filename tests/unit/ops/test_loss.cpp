// softmax_cross_entropy forward / backward: losses against a double
// log-sum-exp, gradient against central finite differences of
// grad_scale * sum(losses), ignored targets (-1), in place (dlogits aliasing
// logits), out-of-range targets and shape errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernel_test_util.hpp"

using namespace ctformer;
using namespace ctformer::testing;

namespace {

std::vector<double> loss_ref(const std::vector<float>& logits, const std::vector<std::int32_t>& targets, index_t v) {
  std::vector<double> out;
  for (std::size_t n = 0; n < targets.size(); ++n) {
    if (targets[n] < 0) {
      out.push_back(0.0);
      continue;
    }
    double m = -1e300, s = 0;
    for (index_t j = 0; j < v; ++j) m = std::max(m, double(logits[n * v + j]));
    for (index_t j = 0; j < v; ++j) s += std::exp(double(logits[n * v + j]) - m);
    out.push_back(m + std::log(s) - logits[n * v + targets[n]]);
  }
  return out;
}

template <class P>
std::vector<float> run_loss(const P& exec, const std::vector<float>& logits, const std::vector<std::int32_t>& targets,
                            index_t v) {
  const index_t n = index_t(targets.size());
  auto ld = upload(exec, logits);
  auto td = upload(exec, targets);
  buffer_for<float, P> losses(n);
  ops::softmax_cross_entropy_forward(exec, ld.view(n, v), td.view(n), losses.view(n));
  return download(exec, losses);
}

std::vector<std::int32_t> some_targets(index_t n, index_t v, bool with_ignored) {
  std::vector<std::int32_t> t;
  for (index_t i = 0; i < n; ++i) t.push_back(std::int32_t((i * 7 + 3) % v));
  if (with_ignored && n > 1) t[1] = -1;
  return t;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("softmax_cross_entropy_forward matches a double log-sum-exp", "[ops][loss]", test_policies) {
  auto exec = make_policy<TestType>();
  for (index_t v : {1, 3, 17, 64, 771, 50257}) {
    const index_t n = v > 1000 ? 2 : 5;
    CAPTURE(v);
    const auto logits = random_floats(std::size_t(n * v), 3 + unsigned(v), -10.0f, 10.0f);
    const auto targets = some_targets(n, v, true);
    const auto losses = run_loss(exec, logits, targets, v);
    // The loss is max + log(sum) - logit: each term carries ~1e-7 relative
    // error of values up to ~20 (exp ~2 ulp, an fp32 sum over V terms), so
    // 1e-5 absolute + 1e-5 relative. V = 1 gives exactly 0.
    check_close(losses, loss_ref(logits, targets, v), 1e-5, 1e-5, "losses");
    CHECK(losses[1] == 0.0f);  // ignored position (-1)
  }
}

TEMPLATE_LIST_TEST_CASE("softmax_cross_entropy_forward is stable for large logits", "[ops][loss]", test_policies) {
  auto exec = make_policy<TestType>();
  const index_t n = 2, v = 37;
  auto logits = random_floats(n * v, 9, -1.0f, 1.0f);
  for (auto& x : logits) x += 5000.0f;
  const auto targets = some_targets(n, v, false);
  const auto losses = run_loss(exec, logits, targets, v);
  // logits near 5000 have spacing 5e-4; the loss is log-sum-exp minus a
  // logit, a difference of two values near 5000: 2 ulp of 5000 = 1e-3.
  check_close(losses, loss_ref(logits, targets, v), 1e-3, 0.0, "losses");
}

TEMPLATE_LIST_TEST_CASE("softmax_cross_entropy_backward matches finite differences", "[ops][loss]", test_policies) {
  auto exec = make_policy<TestType>();
  for (index_t v : {1, 3, 17, 771}) {
    const index_t n = 4;
    CAPTURE(v);
    auto logits = random_floats(std::size_t(n * v), 23 + unsigned(v), -3.0f, 3.0f);
    const auto targets = some_targets(n, v, true);
    const float grad_scale = 1.0f / 3.0f;
    auto ld = upload(exec, logits);
    auto td = upload(exec, targets);
    buffer_for<float, TestType> dld(logits.size());
    ops::softmax_cross_entropy_backward(exec, ld.view(n, v), td.view(n), grad_scale, dld.view(n, v));
    const auto dlogits = download(exec, dld);
    auto f = [&] {
      double sum = 0;
      for (float l : run_loss(exec, logits, targets, v)) sum += l;
      return grad_scale * sum;
    };
    // h = 5e-2: truncation h^2/6 * grad_scale * |p (1-p) (1-2p)| <= 2e-5;
    // a loss (~log V <= 7) carries float error ~5e-7, which becomes ~5e-6
    // after dividing by 2h. Gradients are (softmax - onehot) * grad_scale,
    // down to ~4e-4 for V = 771: 3e-5 absolute + 2e-3 relative.
    const auto ix = sample_indices(logits.size(), 128);
    check_close(pick(dlogits, ix), finite_differences(logits, f, 5e-2f, ix), 3e-5, 2e-3, "dlogits");
    // The ignored row has zero gradient, exactly.
    CHECK(std::all_of(dlogits.begin() + v, dlogits.begin() + 2 * v, [](float g) { return g == 0.0f; }));
  }
}

TEMPLATE_LIST_TEST_CASE("softmax_cross_entropy_backward in place (dlogits aliasing logits)", "[ops][loss]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  const index_t n = 3, v = 50;
  const auto logits = random_floats(n * v, 4, -4.0f, 4.0f);
  const auto targets = some_targets(n, v, true);
  auto ld = upload(exec, logits);
  auto td = upload(exec, targets);
  buffer_for<float, TestType> dld(logits.size());
  ops::softmax_cross_entropy_backward(exec, ld.view(n, v), td.view(n), 0.5f, dld.view(n, v));
  ops::softmax_cross_entropy_backward(exec, ld.view(n, v), td.view(n), 0.5f, ld.view(n, v));
  CHECK(download(exec, ld) == download(exec, dld));
  // Each non-ignored row of (softmax - onehot) * scale sums to 0.
  const auto g = download(exec, dld);
  double row0 = 0;
  for (index_t j = 0; j < v; ++j) row0 += g[j];
  CHECK(std::fabs(row0) < 1e-6);
}

TEMPLATE_LIST_TEST_CASE("softmax_cross_entropy rejects targets outside the vocabulary", "[ops][loss]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  const index_t n = 3, v = 10;
  auto ld = upload(exec, random_floats(n * v, 5));
  auto td = upload(exec, std::vector<std::int32_t>{1, 10, 2});
  buffer_for<float, TestType> losses(n), dld(n * v);
  CHECK_THROWS_AS(ops::softmax_cross_entropy_forward(exec, ld.view(n, v), td.view(n), losses.view(n)),
                  invalid_input);
  CHECK_THROWS_WITH(ops::softmax_cross_entropy_forward(exec, ld.view(n, v), td.view(n), losses.view(n)),
                    Catch::Contains("softmax_cross_entropy_forward") && Catch::Contains("target 10") &&
                        Catch::Contains("position 1"));
  CHECK_THROWS_WITH(ops::softmax_cross_entropy_backward(exec, ld.view(n, v), td.view(n), 1.0f, dld.view(n, v)),
                    Catch::Contains("softmax_cross_entropy_backward") && Catch::Contains("target 10"));
}

TEMPLATE_LIST_TEST_CASE("softmax_cross_entropy throws shape_error naming the operation", "[ops][loss]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  buffer_for<float, TestType> logits(12), losses(4), dl(12);
  auto td = upload(exec, std::vector<std::int32_t>{0, 1, 2});
  CHECK_THROWS_AS(ops::softmax_cross_entropy_forward(exec, logits.view(4, 3), td.view(3), losses.view(4)),
                  shape_error);
  CHECK_THROWS_WITH(ops::softmax_cross_entropy_forward(exec, logits.view(4, 3), td.view(3), losses.view(4)),
                    Catch::Contains("softmax_cross_entropy_forward") && Catch::Contains("targets"));
  CHECK_THROWS_WITH(ops::softmax_cross_entropy_backward(exec, logits.view(3, 4), td.view(3), 1.0f, dl.view(4, 3)),
                    Catch::Contains("softmax_cross_entropy_backward") && Catch::Contains("dlogits"));
}
