// causal_attention_forward / causal_attention_backward (the training form):
// output, saved probabilities and the three gradients against a double
// reference, for MHA, GQA and MQA head layouts; shape errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernel_test_util.hpp"

using namespace ctformer;
using namespace ctformer::testing;

namespace {

struct attention_shape {
  index_t b, t, h, kv, d;
  index_t window = 0;  // 0: every earlier position
};

struct attention_reference {
  std::vector<double> out, probs, dq, dk, dv;
};

// Row-major (B, T, H, D) / (B, T, KV, D) / (B, H, T, T) indexing.
struct indexer {
  attention_shape s;
  std::size_t q(index_t b, index_t t, index_t h, index_t e) const { return std::size_t(((b * s.t + t) * s.h + h) * s.d + e); }
  std::size_t k(index_t b, index_t t, index_t g, index_t e) const { return std::size_t(((b * s.t + t) * s.kv + g) * s.d + e); }
  std::size_t p(index_t b, index_t h, index_t i, index_t j) const { return std::size_t(((b * s.h + h) * s.t + i) * s.t + j); }
};

/// Forward and backward in double: P = softmax(scale q k^T) under the causal
/// mask (and the sliding window: query i sees keys [i - window + 1, i]), out = P v; for dout: dv = P^T dout, dP = dout v^T,
/// dS = P (dP - rowsum(P dP)), dq = scale dS k, dk = scale dS^T q (dk, dv
/// summed over the query heads that share a kv head).
attention_reference reference(const attention_shape& s, const std::vector<float>& q, const std::vector<float>& k,
                              const std::vector<float>& v, const std::vector<float>& dout, float scale) {
  const indexer at{s};
  const index_t group = s.h / s.kv;
  attention_reference r{std::vector<double>(q.size()), std::vector<double>(std::size_t(s.b * s.h * s.t * s.t)),
                        std::vector<double>(q.size()), std::vector<double>(k.size()), std::vector<double>(k.size())};
  for (index_t b = 0; b < s.b; ++b)
    for (index_t h = 0; h < s.h; ++h) {
      const index_t g = h / group;
      for (index_t i = 0; i < s.t; ++i) {
        const index_t first = s.window > 0 ? std::max<index_t>(0, i - s.window + 1) : 0;
        std::vector<double> p(static_cast<std::size_t>(i + 1), 0.0);
        double m = -1e300, z = 0;
        for (index_t j = first; j <= i; ++j) {
          double dot = 0;
          for (index_t e = 0; e < s.d; ++e) dot += double(q[at.q(b, i, h, e)]) * k[at.k(b, j, g, e)];
          p[std::size_t(j)] = dot * scale;
          m = std::max(m, p[std::size_t(j)]);
        }
        for (index_t j = first; j <= i; ++j) z += (p[std::size_t(j)] = std::exp(p[std::size_t(j)] - m));
        for (index_t j = first; j <= i; ++j) p[std::size_t(j)] /= z;
        for (index_t j = 0; j <= i; ++j) r.probs[at.p(b, h, i, j)] = p[std::size_t(j)];
        std::vector<double> dp(static_cast<std::size_t>(i + 1));
        double row = 0;
        for (index_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (index_t e = 0; e < s.d; ++e) {
            r.out[at.q(b, i, h, e)] += p[std::size_t(j)] * v[at.k(b, j, g, e)];
            r.dv[at.k(b, j, g, e)] += p[std::size_t(j)] * dout[at.q(b, i, h, e)];
            dot += double(dout[at.q(b, i, h, e)]) * v[at.k(b, j, g, e)];
          }
          dp[std::size_t(j)] = dot;
          row += p[std::size_t(j)] * dot;
        }
        for (index_t j = 0; j <= i; ++j) {
          const double ds = p[std::size_t(j)] * (dp[std::size_t(j)] - row) * scale;
          for (index_t e = 0; e < s.d; ++e) {
            r.dq[at.q(b, i, h, e)] += ds * k[at.k(b, j, g, e)];
            r.dk[at.k(b, j, g, e)] += ds * q[at.q(b, i, h, e)];
          }
        }
      }
    }
  return r;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("causal attention forward and backward match a double reference", "[ops][attention]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  // MHA with an odd length, GQA (2 query heads per kv head), MQA over 70
  // positions (more than one 64-key tile), and a head dimension that is not
  // a multiple of 8. From 32 positions on the CPU runs blocked products of
  // 64 query rows: 32 (one block, the threshold), 70 (a block of 6 rows),
  // 129 (a last block of one row, which the GEMM serves as a skinny
  // product) and 150 with GQA and an odd head dimension (three blocks, the
  // key pass adding two query heads into each dK and dV).
  for (attention_shape s : {attention_shape{1, 5, 3, 3, 8}, attention_shape{2, 9, 4, 2, 16},
                            attention_shape{1, 70, 2, 1, 64}, attention_shape{1, 12, 2, 2, 20},
                            attention_shape{1, 32, 2, 2, 16}, attention_shape{1, 129, 2, 1, 16},
                            attention_shape{2, 150, 4, 2, 24},
                            // Sliding windows: row by row (3 of 12), blocked (5 of 70; 33 of 150, GQA).
                            attention_shape{1, 12, 2, 2, 20, 3}, attention_shape{1, 70, 2, 1, 64, 5},
                            attention_shape{2, 150, 4, 2, 24, 33}}) {
    CAPTURE(s.b, s.t, s.h, s.kv, s.d, s.window);
    const float scale = 1.0f / std::sqrt(float(s.d));
    const auto q = random_floats(std::size_t(s.b * s.t * s.h * s.d), 41 + unsigned(s.t), -2.0f, 2.0f);
    const auto k = random_floats(std::size_t(s.b * s.t * s.kv * s.d), 42 + unsigned(s.t), -2.0f, 2.0f);
    const auto v = random_floats(std::size_t(s.b * s.t * s.kv * s.d), 43 + unsigned(s.t));
    const auto dout = random_floats(q.size(), 44 + unsigned(s.t));
    const auto ref = reference(s, q, k, v, dout, scale);

    auto qd = upload(exec, q), kd = upload(exec, k), vd = upload(exec, v), dod = upload(exec, dout);
    // Every output starts as NaN: each element must be written (the masked
    // probabilities included), and dq, dk, dv overwritten, not added to.
    const auto nans = [](std::size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); };
    auto out = upload(exec, nans(q.size())), probs = upload(exec, nans(std::size_t(s.b * s.h * s.t * s.t)));
    auto dq = upload(exec, nans(q.size())), dk = upload(exec, nans(k.size())), dv = upload(exec, nans(v.size()));
    ops::causal_attention_forward(exec, as_const(qd.view(s.b, s.t, s.h, s.d)), as_const(kd.view(s.b, s.t, s.kv, s.d)),
                                  as_const(vd.view(s.b, s.t, s.kv, s.d)), out.view(s.b, s.t, s.h, s.d),
                                  probs.view(s.b, s.h, s.t, s.t), scale, s.window);
    ops::causal_attention_backward(exec, as_const(dod.view(s.b, s.t, s.h, s.d)), as_const(qd.view(s.b, s.t, s.h, s.d)),
                                   as_const(kd.view(s.b, s.t, s.kv, s.d)), as_const(vd.view(s.b, s.t, s.kv, s.d)),
                                   as_const(probs.view(s.b, s.h, s.t, s.t)), dq.view(s.b, s.t, s.h, s.d),
                                   dk.view(s.b, s.t, s.kv, s.d), dv.view(s.b, s.t, s.kv, s.d), scale);
    // Probabilities: fp32 dots of up to 64 terms (scores up to ~16 in
    // magnitude) and a 2-ulp exp give about 1e-6 relative; masked entries
    // must be exactly 0 (abs 0 where the reference is 0 still passes 1e-7).
    check_close(download(exec, probs), ref.probs, 1e-7, 2e-5, "probs");
    // Outputs are convex combinations of values in [-1, 1]: 1e-5 absolute.
    check_close(download(exec, out), ref.out, 1e-5, 1e-5, "out");
    // Gradients sum up to T * group terms of size ~|dout| |v|: 1e-4 relative
    // plus 2e-5 absolute for entries that cancel to near 0.
    check_close(download(exec, dq), ref.dq, 2e-5, 1e-4, "dq");
    check_close(download(exec, dk), ref.dk, 2e-5, 1e-4, "dk");
    check_close(download(exec, dv), ref.dv, 2e-5, 1e-4, "dv");
  }
}

TEMPLATE_LIST_TEST_CASE("causal attention rejects head layouts that do not fit", "[ops][attention]", test_policies) {
  auto exec = make_policy<TestType>();
  buffer_for<float, TestType> q(2 * 4 * 3 * 8), k(2 * 4 * 2 * 8), out(2 * 4 * 3 * 8), probs(2 * 3 * 4 * 4);
  // 2 kv heads do not divide 3 query heads.
  CHECK_THROWS_AS(ops::causal_attention_forward(exec, as_const(q.view(2, 4, 3, 8)), as_const(k.view(2, 4, 2, 8)),
                                                as_const(k.view(2, 4, 2, 8)), out.view(2, 4, 3, 8),
                                                probs.view(2, 3, 4, 4), 1.0f),
                  shape_error);
  // probs must be (B, H, T, T).
  buffer_for<float, TestType> k3(2 * 4 * 3 * 8), wrong(2 * 3 * 4 * 5);
  CHECK_THROWS_AS(ops::causal_attention_forward(exec, as_const(q.view(2, 4, 3, 8)), as_const(k3.view(2, 4, 3, 8)),
                                                as_const(k3.view(2, 4, 3, 8)), out.view(2, 4, 3, 8),
                                                wrong.view(2, 3, 4, 5), 1.0f),
                  shape_error);
}
