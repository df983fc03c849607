// AdamW and SGD against a scalar double-precision reference, weight-decay
// ranges, bias correction, schedules, clipping and the precision policies.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "ctformer/ctformer.hpp"
#include "ctformer/train/clipping.hpp"
#include "ctformer/train/optimizer.hpp"
#include "ctformer/train/precision.hpp"
#include "ctformer/train/schedule.hpp"
#include "../../support/test_support.hpp"

using namespace ctformer;
using ctformer::testing::random_floats;

namespace {

// Not a multiple of the kernels' 16384-element chunk, so chunks end inside ranges.
constexpr index_t n_params = 40000;

// Ranges crossing chunk boundaries, with a gap [30100, 35000) that no range covers.
const std::vector<parameter_range> test_ranges = {
    {0, 100, true}, {100, 20000, false}, {20100, 10000, true}, {35000, 5000, false}};

bool decayed(index_t i, bool decay_all) {
  if (decay_all) return true;
  for (const auto& r : test_ranges)
    if (i >= r.offset && i < r.offset + r.size) return r.decay;
  return false;
}

tensor_view<float, 1> flat(std::vector<float>& v) { return {v.data(), {index_t(v.size())}}; }
tensor_view<const float, 1> cflat(const std::vector<float>& v) { return {v.data(), {index_t(v.size())}}; }

// torch.optim.AdamW's arithmetic, in double.
struct adamw_reference {
  std::vector<double> p, m, v;
  void step(const std::vector<float>& g, const train::adamw_config& c, double lr, std::int64_t t, double gs) {
    const double bc1 = 1 - std::pow(double(c.beta1), double(t)), bc2 = 1 - std::pow(double(c.beta2), double(t));
    for (std::size_t i = 0; i < p.size(); ++i) {
      const double gi = double(g[i]) * gs;
      if (decayed(index_t(i), c.decay_all)) p[i] *= 1 - lr * c.weight_decay;
      m[i] = c.beta1 * m[i] + (1 - c.beta1) * gi;
      v[i] = c.beta2 * v[i] + (1 - c.beta2) * gi * gi;
      p[i] -= lr / bc1 * m[i] / (std::sqrt(v[i]) / std::sqrt(bc2) + c.eps);
    }
  }
};

// torch.optim.SGD's arithmetic (dampening 0), in double.
struct sgd_reference {
  std::vector<double> p, buf;
  void step(const std::vector<float>& g, const train::sgd_config& c, double lr) {
    for (std::size_t i = 0; i < p.size(); ++i) {
      double gi = g[i];
      if (decayed(index_t(i), c.decay_all)) gi += c.weight_decay * p[i];
      buf[i] = c.momentum * buf[i] + gi;
      p[i] -= lr * (c.nesterov ? gi + c.momentum * buf[i] : buf[i]);
    }
  }
};

// max |a - ref| / max |ref|: the error relative to the tensor's scale, which is
// what float rounding bounds (a relative error per element blows up near 0).
double scaled_error(const std::vector<float>& a, const std::vector<double>& ref) {
  double worst = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::fabs(double(a[i]) - ref[i]));
    scale = std::max(scale, std::fabs(ref[i]));
  }
  return worst / scale;
}

}  // namespace

TEST_CASE("AdamW matches a double-precision reference over several steps", "[train][optimizer][adamw]") {
  const bool decay_all = GENERATE(false, true);
  const int threads = GENERATE(1, 2);
  const auto exec = cpu::par.with_threads(threads);
  train::adamw_config config;
  config.beta2 = 0.99f;
  config.weight_decay = 0.1f;
  config.decay_all = decay_all;

  std::vector<float> params = random_floats(n_params, 1);
  adamw_reference ref{{params.begin(), params.end()}, std::vector<double>(n_params), std::vector<double>(n_params)};
  train::adamw<cpu::par_t> opt(exec, n_params, config);
  for (int step = 0; step < 5; ++step) {
    const auto grads = random_floats(n_params, 100 + step, -0.5f, 0.5f);
    const float lr = 1e-2f * float(step + 1);
    const float gs = step == 3 ? 0.5f : 1.0f;  // one step with a fused gradient scale
    opt.step(exec, flat(params), cflat(grads), test_ranges, lr, gs);
    ref.step(grads, config, lr, step + 1, gs);
  }
  CHECK(opt.step_count() == 5);
  // fp32 against double: errors stay at a few float ulps (6e-8) of each tensor's scale.
  CHECK(scaled_error(params, ref.p) < 1e-6);
  auto state = opt.state_tensors();
  REQUIRE(state.size() == 2);
  CHECK(state[0].name == "m");
  CHECK(state[1].name == "v");
  std::vector<float> m(state[0].data.data(), state[0].data.data() + n_params);
  std::vector<float> v(state[1].data.data(), state[1].data.data() + n_params);
  CHECK(scaled_error(m, ref.m) < 1e-6);
  CHECK(scaled_error(v, ref.v) < 1e-6);
}

TEST_CASE("AdamW results do not depend on the thread count", "[train][optimizer][adamw]") {
  train::adamw_config config;
  config.weight_decay = 0.1f;
  std::vector<float> a = random_floats(n_params, 7), b = a;
  train::adamw<cpu::par_t> one(cpu::par.with_threads(1), n_params, config), two(cpu::par.with_threads(2), n_params, config);
  for (int step = 0; step < 3; ++step) {
    const auto grads = random_floats(n_params, 200 + step);
    one.step(cpu::par.with_threads(1), flat(a), cflat(grads), test_ranges, 1e-3f);
    two.step(cpu::par.with_threads(2), flat(b), cflat(grads), test_ranges, 1e-3f);
  }
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

TEST_CASE("AdamW's bias correction makes the first step lr * sign(g)", "[train][optimizer][adamw]") {
  // m-hat = g and v-hat = g^2 after one step, so the update is lr * g / (|g| + eps).
  // Without bias correction it would be lr * 0.1 g / (sqrt(0.001) |g|) = 3.16 lr.
  std::vector<float> params(8, 1.0f);
  std::vector<float> grads = {0.5f, -0.5f, 2.0f, -3.0f, 1e-3f, -1e-3f, 10.0f, -10.0f};
  train::adamw<cpu::par_t> opt(cpu::par, 8);
  opt.step(cpu::par, flat(params), cflat(grads), {}, 0.1f);
  for (std::size_t i = 0; i < params.size(); ++i)
    CHECK(params[i] == Approx(1.0f - 0.1f * (grads[i] > 0 ? 1.0f : -1.0f)).epsilon(1e-5));
}

TEST_CASE("AdamW decays only the ranges marked decay", "[train][optimizer][adamw]") {
  // Zero gradients: the only change is the decoupled decay p *= 1 - lr*wd.
  train::adamw_config config;
  config.weight_decay = 0.5f;
  std::vector<float> params(n_params, 2.0f), grads(n_params, 0.0f);
  train::adamw<cpu::par_t> opt(cpu::par, n_params, config);
  opt.step(cpu::par, flat(params), cflat(grads), test_ranges, 0.1f);
  for (index_t i = 0; i < n_params; ++i) {
    const float expected = decayed(i, false) ? 2.0f * (1.0f - 0.05f) : 2.0f;
    if (params[std::size_t(i)] != expected) {
      FAIL_CHECK("element " << i << " is " << params[std::size_t(i)] << ", expected " << expected);
      break;
    }
  }
}

TEST_CASE("optimizers refuse unsorted or out-of-range parameter ranges", "[train][optimizer]") {
  std::vector<float> params(100, 1.0f), grads(100, 0.1f);
  train::adamw<cpu::par_t> opt(cpu::par, 100);
  const std::vector<parameter_range> outside = {{50, 60, true}};
  const std::vector<parameter_range> overlapping = {{0, 60, true}, {50, 10, false}};
  CHECK_THROWS_WITH(opt.step(cpu::par, flat(params), cflat(grads), outside, 0.1f),
                    Catch::Contains("range 0") && Catch::Contains("outside"));
  CHECK_THROWS_WITH(opt.step(cpu::par, flat(params), cflat(grads), overlapping, 0.1f),
                    Catch::Contains("range 1") && Catch::Contains("sorted and disjoint"));
  CHECK(opt.step_count() == 0);
  CHECK(params == std::vector<float>(100, 1.0f));
  std::vector<float> wrong(99, 0.0f);
  CHECK_THROWS_AS(opt.step(cpu::par, flat(wrong), cflat(wrong), {}, 0.1f), shape_error);
}

TEST_CASE("SGD with momentum matches a double-precision reference", "[train][optimizer][sgd]") {
  const bool nesterov = GENERATE(false, true);
  train::sgd_config config;
  config.momentum = 0.9f;
  config.weight_decay = 0.01f;
  config.nesterov = nesterov;
  std::vector<float> params = random_floats(n_params, 3);
  sgd_reference ref{{params.begin(), params.end()}, std::vector<double>(n_params)};
  train::sgd<cpu::par_t> opt(cpu::par, n_params, config);
  for (int step = 0; step < 5; ++step) {
    const auto grads = random_floats(n_params, 300 + step);
    opt.step(cpu::par, flat(params), cflat(grads), test_ranges, 0.05f);
    ref.step(grads, config, 0.05f);
  }
  CHECK(opt.step_count() == 5);
  CHECK(opt.state_tensors().at(0).name == "momentum");
  CHECK(scaled_error(params, ref.p) < 1e-6);
}

TEST_CASE("plain SGD without momentum is p -= lr * g", "[train][optimizer][sgd]") {
  train::sgd_config config;
  config.momentum = 0.0f;
  std::vector<float> params = {1.0f, 2.0f, 3.0f}, grads = {1.0f, -1.0f, 0.5f};
  train::sgd<cpu::par_t> opt(cpu::par, 3, config);
  opt.step(cpu::par, flat(params), cflat(grads), {}, 0.1f);
  CHECK(params[0] == Approx(0.9f));
  CHECK(params[1] == Approx(2.1f));
  CHECK(params[2] == Approx(2.95f));
}

TEST_CASE("the warmup + cosine schedule follows nanoGPT's formula", "[train][schedule]") {
  const train::warmup_cosine_schedule s{1e-3f, 1e-4f, 100, 2000};
  CHECK(s(0) == Approx(1e-3 / 101));
  CHECK(s(49) == Approx(1e-3 * 50 / 101));
  CHECK(s(99) == Approx(1e-3 * 100 / 101));
  CHECK(s(100) == Approx(1e-3));
  CHECK(s(1050) == Approx(5.5e-4));  // half way: cos(pi/2) = 0
  CHECK(s(2000) == Approx(1e-4));
  CHECK(s(2500) == Approx(1e-4));
  for (int i = 101; i < 2000; ++i) REQUIRE(s(i) <= s(i - 1));
  const train::constant_schedule c{3e-4f};
  CHECK(c(0) == 3e-4f);
  CHECK(c(123456) == 3e-4f);
}

TEST_CASE("clipping by global norm scales only when the norm is too large", "[train][clipping]") {
  std::vector<float> g = {3.0f, 4.0f};
  CHECK(train::clip_by_global_norm(cpu::par, flat(g), 10.0) == Approx(5.0));
  CHECK(g == std::vector<float>{3.0f, 4.0f});
  CHECK(train::clip_by_global_norm(cpu::par, flat(g), 1.0) == Approx(5.0));
  CHECK(g[0] == Approx(0.6f));
  CHECK(g[1] == Approx(0.8f));
  CHECK(train::global_norm(cpu::par, cflat(g)) == Approx(1.0).epsilon(1e-5));
  CHECK(train::clip_coefficient(5.0, 1.0) == Approx(0.2f));
  CHECK(train::clip_coefficient(0.5, 1.0) == 1.0f);
  CHECK(train::clip_coefficient(std::nan(""), 1.0) == 1.0f);
}

TEST_CASE("sum_of_squares is exact enough and independent of the thread count", "[train][clipping]") {
  const auto x = random_floats(200000, 11);
  double expected = 0;
  for (float v : x) expected += double(v) * double(v);
  const double one = ops::sum_of_squares(cpu::par.with_threads(1), cflat(x));
  const double two = ops::sum_of_squares(cpu::par.with_threads(2), cflat(x));
  CHECK(one == Approx(expected).epsilon(1e-12));
  CHECK(std::memcmp(&one, &two, sizeof one) == 0);
  std::vector<float> y = {1.0f, -2.0f, 4.0f};
  ops::scale(cpu::par, 0.5f, flat(y));
  CHECK(y == std::vector<float>{0.5f, -1.0f, 2.0f});
}

TEST_CASE("precision policies keep fp32 master weights", "[train][precision]") {
  STATIC_REQUIRE(train::precision_policy<train::fp32>);
  STATIC_REQUIRE(train::precision_policy<train::bf16_mixed>);
  STATIC_REQUIRE(std::is_same_v<train::bf16_mixed::compute_type, bf16>);
  STATIC_REQUIRE(std::is_same_v<train::bf16_mixed::master_type, float>);
  STATIC_REQUIRE_FALSE(train::precision_policy<int>);
}

TEST_CASE("decay ranges: matrices always, embeddings on request, norms and biases only with decay_all",
          "[train][optimizer]") {
  using nn::parameter_kind;
  const std::vector<nn::parameter_info> table = {{"token_embedding", 0, {4, 4}, parameter_kind::embedding},
                                                 {"ln.weight", 16, {4}, parameter_kind::norm},
                                                 {"qkv_weight", 32, {4, 2}, parameter_kind::matrix},
                                                 {"qkv_bias", 48, {3}, parameter_kind::bias}};
  // Whether element i of each tensor above decays under the ranges.
  auto decays = [](const std::vector<parameter_range>& ranges, index_t i) {
    for (const auto& r : ranges)
      if (i >= r.offset && i < r.offset + r.size) return r.decay;
    return false;
  };
  const index_t embedding = 3, norm = 17, matrix = 35, bias = 49;
  const auto plain = nn::decay_ranges(table);
  CHECK((!decays(plain, embedding) && !decays(plain, norm) && decays(plain, matrix) && !decays(plain, bias)));
  const auto with_embeddings = nn::decay_ranges(table, false, true);
  CHECK((decays(with_embeddings, embedding) && !decays(with_embeddings, norm) && decays(with_embeddings, matrix) &&
         !decays(with_embeddings, bias)));
  const auto everything = nn::decay_ranges(table, true);
  CHECK((decays(everything, embedding) && decays(everything, norm) && decays(everything, matrix) &&
         decays(everything, bias)));
}
