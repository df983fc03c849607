// embedding_forward (row lookup) and embedding_backward (scatter-add):
// against plain loops, repeated tokens summing, += accumulation, finite
// differences, out-of-range tokens and shape errors.
#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <vector>

#include "kernel_test_util.hpp"

using namespace ctformer;
using namespace ctformer::testing;

TEMPLATE_LIST_TEST_CASE("embedding_forward copies the rows of the table", "[ops][embedding]", test_policies) {
  auto exec = make_policy<TestType>();
  for (index_t c : {1, 3, 17, 771}) {
    const index_t v = 11;
    CAPTURE(c);
    const auto table = random_floats(std::size_t(v * c), 1 + unsigned(c));
    const std::vector<std::int32_t> tokens{3, 0, 10, 3, 7, 3};
    const index_t n = index_t(tokens.size());
    auto tabled = upload(exec, table);
    auto tokd = upload(exec, tokens);
    buffer_for<float, TestType> outd(n * c);
    ops::embedding_forward(exec, tokd.view(n), tabled.view(v, c), outd.view(n, c));
    const auto out = download(exec, outd);
    std::vector<float> ref;
    for (auto t : tokens)
      for (index_t j = 0; j < c; ++j) ref.push_back(table[t * c + j]);
    CHECK(out == ref);  // a copy: exact
  }
}

TEMPLATE_LIST_TEST_CASE("embedding_backward scatter-adds, sums repeated tokens and accumulates", "[ops][embedding]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  for (index_t c : {1, 3, 17, 771, 4099}) {
    const index_t v = 9;
    CAPTURE(c);
    // Token 2 appears four times, 5 twice; rows 0, 1, 3, 4, 6, 7 are never used.
    const std::vector<std::int32_t> tokens{2, 5, 2, 8, 2, 5, 2};
    const index_t n = index_t(tokens.size());
    const auto dout = random_floats(std::size_t(n * c), 10 + unsigned(c));
    const auto start = random_floats(std::size_t(v * c), 20 + unsigned(c));  // dtable is accumulated into
    auto tokd = upload(exec, tokens);
    auto doutd = upload(exec, dout);
    auto dtabled = upload(exec, start);
    ops::embedding_backward(exec, tokd.view(n), doutd.view(n, c), dtabled.view(v, c));
    const auto dtable = download(exec, dtabled);
    std::vector<double> ref(start.begin(), start.end());
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < c; ++j) ref[tokens[i] * c + j] += dout[i * c + j];
    // Four float additions of values in [-1, 1]: at most ~4 ulp of 4, 2e-6.
    check_close(dtable, ref, 2e-6, 0.0, "dtable");
    // Unused rows are untouched, bit for bit.
    bool untouched = true;
    for (index_t r : {0, 1, 3, 4, 6, 7})
      for (index_t j = 0; j < c; ++j) untouched &= dtable[r * c + j] == start[r * c + j];
    CHECK(untouched);
  }
}

TEMPLATE_LIST_TEST_CASE("embedding_backward adds each token's rows in position order, the same bits every run",
                        "[ops][embedding][determinism]", test_policies) {
  // Both policies add a token's rows one by one in position order onto the
  // accumulated value (the CPU splits channels over threads, CUDA groups the
  // positions by token on the host): the result equals a float loop in that
  // order exactly, and so does a second run. Tokens read through a stride-2
  // view; 200 positions over 13 tokens, so each repeats about 15 times.
  auto exec = make_policy<TestType>();
  const index_t v = 13, c = 771, n = 200;
  std::vector<std::int32_t> strided_tokens(std::size_t(2 * n), -7);  // the odd slots must not be read
  std::mt19937 rng(3);
  for (index_t i = 0; i < n; ++i) strided_tokens[std::size_t(2 * i)] = std::int32_t(rng() % v);
  const auto dout = random_floats(std::size_t(n * c), 31);
  const auto start = random_floats(std::size_t(v * c), 32);
  auto tokd = upload(exec, strided_tokens);
  const tensor_view<const std::int32_t, 1> tokens(tokd.data(), {n}, {2});
  auto doutd = upload(exec, dout);
  std::vector<float> ref = start;
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < c; ++j) ref[std::size_t(strided_tokens[std::size_t(2 * i)] * c + j)] += dout[std::size_t(i * c + j)];
  for (int run = 0; run < 2; ++run) {
    CAPTURE(run);
    auto dtabled = upload(exec, start);
    ops::embedding_backward(exec, tokens, doutd.view(n, c), dtabled.view(v, c));
    CHECK(download(exec, dtabled) == ref);
  }

  SECTION("a bad id anywhere leaves dtable as it was") {
    strided_tokens[std::size_t(2 * (n - 1))] = std::int32_t(v);
    auto bad_tokd = upload(exec, strided_tokens);
    auto dtabled = upload(exec, start);
    CHECK_THROWS_WITH(ops::embedding_backward(exec, tensor_view<const std::int32_t, 1>(bad_tokd.data(), {n}, {2}),
                                              doutd.view(n, c), dtabled.view(v, c)),
                      Catch::Contains("token id 13 at position 199"));
    CHECK(download(exec, dtabled) == start);
  }
}

TEMPLATE_LIST_TEST_CASE("embedding_backward matches finite differences of sum(dout * out)", "[ops][embedding]",
                        test_policies) {
  auto exec = make_policy<TestType>();
  const index_t v = 5, c = 7;
  const std::vector<std::int32_t> tokens{1, 4, 1, 1, 0};
  const index_t n = index_t(tokens.size());
  auto table = random_floats(std::size_t(v * c), 3);
  const auto dout = random_floats(std::size_t(n * c), 4);
  auto tokd = upload(exec, tokens);
  auto f = [&] {
    auto tabled = upload(exec, table);
    buffer_for<float, TestType> outd(n * c);
    ops::embedding_forward(exec, tokd.view(n), tabled.view(v, c), outd.view(n, c));
    return dot(dout, download(exec, outd));
  };
  auto doutd = upload(exec, dout);
  auto dtabled = upload(exec, std::vector<float>(std::size_t(v * c), 0.0f));
  ops::embedding_backward(exec, tokd.view(n), doutd.view(n, c), dtabled.view(v, c));
  // f is linear in the table: central differences are exact up to float
  // rounding of f (~1e-7) over 2h = 0.2 (h = 0.1): 1e-5.
  check_close(download(exec, dtabled), finite_differences(table, f, 0.1f), 1e-5, 1e-5, "dtable");
}

TEMPLATE_LIST_TEST_CASE("embedding rejects token ids outside the vocabulary", "[ops][embedding]", test_policies) {
  auto exec = make_policy<TestType>();
  const index_t v = 4, c = 3;
  auto table = upload(exec, random_floats(std::size_t(v * c), 1));
  buffer_for<float, TestType> out(3 * c);
  for (std::int32_t bad : {4, -1, 1000000}) {
    CAPTURE(bad);
    auto tokd = upload(exec, std::vector<std::int32_t>{0, bad, 1});
    CHECK_THROWS_AS(ops::embedding_forward(exec, tokd.view(3), table.view(v, c), out.view(3, c)), invalid_input);
    CHECK_THROWS_WITH(ops::embedding_forward(exec, tokd.view(3), table.view(v, c), out.view(3, c)),
                      Catch::Contains("embedding_forward") && Catch::Contains("token id " + std::to_string(bad)) &&
                          Catch::Contains("position 1"));
    CHECK_THROWS_WITH(ops::embedding_backward(exec, tokd.view(3), out.view(3, c), table.view(v, c)),
                      Catch::Contains("embedding_backward") && Catch::Contains("token id " + std::to_string(bad)));
  }
}

TEMPLATE_LIST_TEST_CASE("embedding throws shape_error naming the operation", "[ops][embedding]", test_policies) {
  auto exec = make_policy<TestType>();
  auto tokd = upload(exec, std::vector<std::int32_t>{0, 1, 2});
  buffer_for<float, TestType> table(12), out(12);
  CHECK_THROWS_AS(ops::embedding_forward(exec, tokd.view(3), table.view(4, 3), out.view(4, 3)), shape_error);
  CHECK_THROWS_WITH(ops::embedding_forward(exec, tokd.view(3), table.view(4, 3), out.view(4, 3)),
                    Catch::Contains("embedding_forward") && Catch::Contains("tokens"));
  CHECK_THROWS_WITH(ops::embedding_forward(exec, tokd.view(3), table.view(3, 4), out.view(4, 3).transposed()),
                    Catch::Contains("embedding_forward"));
  CHECK_THROWS_WITH(ops::embedding_backward(exec, tokd.view(3), out.view(3, 4), table.view(6, 2)),
                    Catch::Contains("embedding_backward") && Catch::Contains("dtable"));
}
