// ops::gemm and ops::gemm_batched against a double-precision reference loop:
// every transpose combination, odd sizes that leave ragged edge tiles, sizes
// that cross the cache-block boundaries, sub-views with leading dimensions
// larger than the row, alpha / beta (beta == 0 over NaN), bf16 inputs, batches.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../../support/test_support.hpp"

using namespace ctformer;
using ctformer::testing::download;
using ctformer::testing::make_policy;
using ctformer::testing::random_floats;
using ctformer::testing::upload;

namespace {

/// A host matrix stored inside a larger padded array, so that the view the
/// GEMM sees has a leading dimension larger than its row and an offset start:
/// a kernel that ignores the stride, or writes past the edge, is caught.
struct stored_matrix {
  index_t rows = 0, cols = 0;   // logical shape the operation sees
  bool column_major = false;    // stored transposed: the view is storage.transposed()
  index_t offset = 0, ld = 0;   // start and leading dimension inside the padded array
  std::vector<float> values;    // the padded array (logical values + sentinels)

  float at(index_t i, index_t j) const {
    return column_major ? values[offset + j * ld + i] : values[offset + i * ld + j];
  }
};

/// Builds a rows x cols matrix of values (already rounded to T's precision)
/// with `pad` spare elements at the end of every stored line and a few before
/// the first; the spare elements hold `sentinel`.
template <class T>
stored_matrix make_matrix(index_t rows, index_t cols, bool column_major, index_t pad, std::uint32_t seed,
                          float sentinel) {
  stored_matrix s;
  s.rows = rows;
  s.cols = cols;
  s.column_major = column_major;
  const index_t lines = column_major ? cols : rows, line = column_major ? rows : cols;
  s.offset = 5;
  s.ld = line + pad;
  s.values.assign(std::size_t(s.offset + lines * s.ld + pad), sentinel);
  const auto random = random_floats(std::size_t(rows * cols), seed);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) {
      // Round through T so the reference multiplies exactly what the kernel reads.
      const float v = static_cast<float>(number_cast<T>(random[std::size_t(i * cols + j)]));
      (column_major ? s.values[std::size_t(s.offset + j * s.ld + i)] : s.values[std::size_t(s.offset + i * s.ld + j)]) =
          v;
    }
  return s;
}

template <class T>
std::vector<T> as_number_type(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = number_cast<T>(v[i]);
  return out;
}

/// The view of a stored matrix over memory at `base` (device memory for CUDA).
template <class T>
tensor_view<T, 2> view_of(T* base, const stored_matrix& s) {
  if (s.column_major) return tensor_view<T, 2>(base + s.offset, {s.cols, s.rows}, {s.ld, 1}).transposed();
  return tensor_view<T, 2>(base + s.offset, {s.rows, s.cols}, {s.ld, 1});
}

/// Checks every element of c against the double reference with the standard
/// component-wise error bound of a dot product computed in fp32:
///   |c - exact| <= gamma * (|alpha| * sum_p |a_ip| |b_pj| + |beta| |c0_ij|),
/// gamma = 2 * (K + 2) * 2^-24. Summing K products in fp32 (any order, with or
/// without FMA) errs by at most K unit roundoffs times the sum of magnitudes;
/// +2 covers the alpha / beta update and the factor 2 leaves slack for the
/// bf16 kernel's pairwise products. Inputs are exact in T (rounded before the
/// reference sees them), so bf16 needs no extra term: products of two bf16
/// values are exact in fp32. Cells outside the view must keep their sentinel.
void check_gemm(const stored_matrix& a, const stored_matrix& b, const stored_matrix& c0, const std::vector<float>& c,
                float alpha, float beta) {
  const index_t m = a.rows, n = b.cols, k = a.cols;
  const double gamma = 2.0 * double(k + 2) * std::ldexp(1.0, -24);
  index_t failures = 0;
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j) {
      double exact = 0, magnitude = 0;
      for (index_t p = 0; p < k; ++p) {
        exact += double(a.at(i, p)) * double(b.at(p, j));
        magnitude += std::fabs(double(a.at(i, p)) * double(b.at(p, j)));
      }
      exact *= alpha;
      magnitude *= std::fabs(alpha);
      if (beta != 0.0f) {
        exact += double(beta) * double(c0.at(i, j));
        magnitude += std::fabs(double(beta) * double(c0.at(i, j)));
      }
      const double got = c[std::size_t(c0.offset + i * c0.ld + j)];
      const double bound = gamma * magnitude + 1e-30;
      if (!(std::fabs(got - exact) <= bound) && failures++ < 5) {
        INFO("c(" << i << ", " << j << ") = " << got << ", reference " << exact << ", bound " << bound);
        CHECK(std::fabs(got - exact) <= bound);
      }
    }
  CHECK(failures == 0);
  // The padding around the view is never written.
  std::vector<bool> inside(c.size(), false);
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j) inside[std::size_t(c0.offset + i * c0.ld + j)] = true;
  index_t touched = 0;
  for (std::size_t x = 0; x < c.size(); ++x)
    if (!inside[x] && !(c[x] == c0.values[x] || (std::isnan(c[x]) && std::isnan(c0.values[x])))) ++touched;
  CHECK(touched == 0);
}

struct gemm_case {
  index_t m, n, k;
  bool a_column_major, b_column_major;
  float alpha, beta;
  bool nan_c = false;  // fill c (and its padding) with NaN; beta must be 0
};

/// Runs one GEMM on policy P with inputs of type T and checks it.
template <class T, class P>
void run_gemm_case(const P& exec, const gemm_case& g, std::uint32_t seed) {
  INFO("M=" << g.m << " N=" << g.n << " K=" << g.k << " a " << (g.a_column_major ? "col" : "row") << "-major, b "
            << (g.b_column_major ? "col" : "row") << "-major, alpha=" << g.alpha << " beta=" << g.beta);
  const float sentinel = g.nan_c ? std::numeric_limits<float>::quiet_NaN() : 12345.0f;
  const auto a = make_matrix<T>(g.m, g.k, g.a_column_major, 3, seed, -777.0f);
  const auto b = make_matrix<T>(g.k, g.n, g.b_column_major, 7, seed + 1, -777.0f);
  auto c0 = make_matrix<float>(g.m, g.n, false, 4, seed + 2, sentinel);
  if (g.nan_c)
    for (auto& x : c0.values) x = std::numeric_limits<float>::quiet_NaN();

  auto a_device = upload(exec, as_number_type<T>(a.values));
  auto b_device = upload(exec, as_number_type<T>(b.values));
  auto c_device = upload(exec, c0.values);
  ops::gemm(exec, view_of<const T>(a_device.data(), a), view_of<const T>(b_device.data(), b),
            view_of<float>(c_device.data(), c0), g.alpha, g.beta);
  check_gemm(a, b, c0, download(exec, c_device), g.alpha, g.beta);
}

// Edge-tile sizes: 1 and 3 are smaller than any tile, 17 / 33 / 65 one past
// a power of two, 100 and 257 ragged against every mr / nr / kc in use.
const std::vector<std::vector<index_t>> odd_shapes = {
    {1, 1, 1},    {3, 17, 33},  {17, 33, 3},   {33, 65, 100}, {65, 100, 257}, {100, 257, 17}, {257, 3, 65},
    {1, 257, 100}, {100, 1, 257}, {257, 257, 257}, {65, 33, 1}};

// Shapes that cross the cache blocks: k > kc (several depth blocks, beta only
// on the first), m > mc (several A blocks), n > nc (several B blocks).
const std::vector<std::vector<index_t>> blocked_shapes = {{300, 70, 600}, {13, 4100, 9}, {401, 45, 1100}};

}  // namespace

TEMPLATE_LIST_TEST_CASE("gemm matches a double reference for every transpose combination and odd sizes",
                        "[ops][gemm]", ctformer::testing::test_policies) {
  const auto exec = make_policy<TestType>();
  std::uint32_t seed = 1;
  for (const auto& s : odd_shapes)
    for (bool a_col : {false, true})
      for (bool b_col : {false, true}) run_gemm_case<float>(exec, {s[0], s[1], s[2], a_col, b_col, 1.0f, 0.0f}, seed++);
}

TEMPLATE_LIST_TEST_CASE("gemm handles sizes that span several cache blocks", "[ops][gemm]",
                        ctformer::testing::test_policies) {
  const auto exec = make_policy<TestType>();
  std::uint32_t seed = 100;
  for (const auto& s : blocked_shapes)
    for (bool a_col : {false, true})
      for (bool b_col : {false, true})
        run_gemm_case<float>(exec, {s[0], s[1], s[2], a_col, b_col, 0.75f, -0.5f}, seed++);
}

TEMPLATE_LIST_TEST_CASE("gemm applies alpha and beta, and beta == 0 never reads c", "[ops][gemm]",
                        ctformer::testing::test_policies) {
  const auto exec = make_policy<TestType>();
  std::uint32_t seed = 200;
  for (const auto& s : std::vector<std::vector<index_t>>{{3, 17, 33}, {65, 100, 257}, {33, 20, 300}}) {
    run_gemm_case<float>(exec, {s[0], s[1], s[2], false, true, 0.5f, -1.5f}, seed++);
    run_gemm_case<float>(exec, {s[0], s[1], s[2], true, false, -2.0f, 1.0f}, seed++);
    run_gemm_case<float>(exec, {s[0], s[1], s[2], false, false, 1.0f, 0.0f, true}, seed++);
    run_gemm_case<float>(exec, {s[0], s[1], s[2], true, true, 3.0f, 0.0f, true}, seed++);
  }
  // Nothing to multiply (K == 0) or alpha == 0: c = beta * c, as in BLAS.
  run_gemm_case<float>(exec, {17, 9, 0, false, false, 1.0f, 0.5f}, seed++);
  run_gemm_case<float>(exec, {17, 9, 0, false, false, 1.0f, 0.0f, true}, seed++);
  run_gemm_case<float>(exec, {17, 9, 5, false, false, 0.0f, 2.0f}, seed++);
}

TEMPLATE_LIST_TEST_CASE("gemm with a few rows (decode) matches the reference", "[ops][gemm]",
                        ctformer::testing::test_policies) {
  // Up to 4 rows take an unpacked CPU path that streams b where it lies;
  // both of its b layouts, k not a multiple of its 16 lanes, n spanning
  // several 512-column passes and several threads, and beta over NaN.
  const auto exec = make_policy<TestType>();
  std::uint32_t seed = 250;
  for (const auto& s : std::vector<std::vector<index_t>>{{1, 1100, 77}, {2, 37, 300}, {3, 600, 16}, {4, 1030, 129}})
    for (bool a_col : {false, true})
      for (bool b_col : {false, true}) {
        run_gemm_case<float>(exec, {s[0], s[1], s[2], a_col, b_col, 0.5f, -1.5f}, seed++);
        run_gemm_case<float>(exec, {s[0], s[1], s[2], a_col, b_col, 1.0f, 0.0f, true}, seed++);
        run_gemm_case<bf16>(exec, {s[0], s[1], s[2], a_col, b_col, 1.0f, 0.0f}, seed++);
      }
}

TEMPLATE_LIST_TEST_CASE("gemm with bf16 inputs accumulates in fp32", "[ops][gemm][bf16]",
                        ctformer::testing::test_policies) {
  const auto exec = make_policy<TestType>();
  std::uint32_t seed = 300;
  // Odd K exercises the zero padding of the last bf16 pair in the AVX512_BF16 kernel.
  for (const auto& s : std::vector<std::vector<index_t>>{{1, 1, 1}, {3, 17, 33}, {33, 65, 100}, {100, 257, 17},
                                                          {257, 33, 65}, {70, 90, 1111}})
    for (bool a_col : {false, true})
      for (bool b_col : {false, true}) run_gemm_case<bf16>(exec, {s[0], s[1], s[2], a_col, b_col, 1.0f, 0.0f}, seed++);
  run_gemm_case<bf16>(exec, {65, 100, 257, false, true, 0.5f, -1.5f}, seed++);
  run_gemm_case<bf16>(exec, {65, 100, 257, true, false, 1.0f, 0.0f, true}, seed++);
}

TEMPLATE_LIST_TEST_CASE("gemm gives the same answer on one thread and on several", "[ops][gemm]",
                        ctformer::testing::test_policies) {
  if constexpr (std::is_same_v<TestType, cpu::par_t>) {
    // Thread counts that split the product into uneven grids (3 threads: a
    // 3 x 1 or 1 x 3 grid over 2 cores) must still cover every tile once.
    std::uint32_t seed = 400;
    for (int threads : {1, 2, 3, 4})
      for (const auto& s : std::vector<std::vector<index_t>>{{257, 100, 65}, {7, 1000, 300}, {1000, 5, 300}})
        run_gemm_case<float>(cpu::par.with_threads(threads), {s[0], s[1], s[2], false, true, 1.0f, 0.5f}, seed++);
  } else {
    SUCCEED("thread counts are a CPU notion");
  }
}

namespace {

/// Runs one batched GEMM: each of `batch` matrices stored at a batch stride
/// larger than the matrix (padding between them), a and b optionally column-major.
template <class T, class P>
void run_batched_case(const P& exec, index_t batch, index_t m, index_t n, index_t k, bool a_col, bool b_col,
                      float alpha, float beta, std::uint32_t seed) {
  INFO("batch=" << batch << " M=" << m << " N=" << n << " K=" << k << " a_col=" << a_col << " b_col=" << b_col);
  std::vector<stored_matrix> as, bs, cs;
  std::vector<float> a_all, b_all, c_all;
  index_t a_step = 0, b_step = 0, c_step = 0;
  for (index_t i = 0; i < batch; ++i) {
    as.push_back(make_matrix<T>(m, k, a_col, 2, seed + std::uint32_t(3 * i), -777.0f));
    bs.push_back(make_matrix<T>(k, n, b_col, 3, seed + std::uint32_t(3 * i + 1), -777.0f));
    cs.push_back(make_matrix<float>(m, n, false, 1, seed + std::uint32_t(3 * i + 2), 12345.0f));
    a_step = index_t(as.back().values.size());
    b_step = index_t(bs.back().values.size());
    c_step = index_t(cs.back().values.size());
    a_all.insert(a_all.end(), as.back().values.begin(), as.back().values.end());
    b_all.insert(b_all.end(), bs.back().values.begin(), bs.back().values.end());
    c_all.insert(c_all.end(), cs.back().values.begin(), cs.back().values.end());
  }
  auto a_device = upload(exec, as_number_type<T>(a_all));
  auto b_device = upload(exec, as_number_type<T>(b_all));
  auto c_device = upload(exec, c_all);
  auto batched = [&](auto* base, const stored_matrix& s, index_t step) {
    using E = std::remove_pointer_t<decltype(base)>;
    if (s.column_major)
      return tensor_view<E, 3>(base + s.offset, {batch, s.cols, s.rows}, {step, s.ld, 1}).transposed();
    return tensor_view<E, 3>(base + s.offset, {batch, s.rows, s.cols}, {step, s.ld, 1});
  };
  ops::gemm_batched(exec, batched(static_cast<const T*>(a_device.data()), as[0], a_step),
                    batched(static_cast<const T*>(b_device.data()), bs[0], b_step),
                    batched(c_device.data(), cs[0], c_step), alpha, beta);
  const auto c = download(exec, c_device);
  for (index_t i = 0; i < batch; ++i) {
    INFO("batch item " << i);
    check_gemm(as[std::size_t(i)], bs[std::size_t(i)], cs[std::size_t(i)],
               std::vector<float>(c.begin() + i * c_step, c.begin() + (i + 1) * c_step), alpha, beta);
  }
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("gemm_batched multiplies every matrix of a strided batch", "[ops][gemm][batched]",
                        ctformer::testing::test_policies) {
  const auto exec = make_policy<TestType>();
  // Many small products (attention's (B*H, T, T) shape: split across the batch).
  run_batched_case<float>(exec, 12, 17, 33, 16, false, true, 0.125f, 0.0f, 500);
  run_batched_case<float>(exec, 9, 33, 17, 65, true, false, 1.0f, 1.0f, 600);
  // A few large products (each split across the threads).
  run_batched_case<float>(exec, 2, 130, 150, 300, false, false, 1.0f, -1.0f, 700);
  run_batched_case<bf16>(exec, 6, 20, 40, 33, true, true, 1.0f, 0.0f, 800);
  run_batched_case<float>(exec, 1, 1, 1, 1, false, false, 2.0f, 0.0f, 900);
}
