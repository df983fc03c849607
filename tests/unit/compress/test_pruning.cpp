// compress::prune_magnitude (per row and per matrix) and compress::prune_2of4:
// exact sparsity, the largest magnitudes kept, the 2:4 pattern in every group.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ctformer/compress/pruning.hpp"
#include "../../support/test_support.hpp"

using namespace ctformer;

namespace {
// Smallest |kept| >= largest |dropped| over a set of (original, pruned) values:
// what "keeps the largest magnitudes" means. Original values are random
// floats, so no weight is exactly 0 before pruning.
bool keeps_largest(const float* original, const float* pruned, index_t n, index_t stride = 1) {
  float min_kept = INFINITY, max_dropped = 0.0f;
  for (index_t i = 0; i < n; ++i) {
    const float a = std::fabs(original[i * stride]);
    if (pruned[i * stride] == 0.0f) max_dropped = std::max(max_dropped, a);
    else min_kept = std::min(min_kept, a);
  }
  return min_kept >= max_dropped;
}
}  // namespace

TEST_CASE("per-row magnitude pruning removes exactly round(s * cols) per row, the smallest", "[compress][pruning]") {
  const index_t rows = 37, cols = 96;
  const auto original = testing::random_floats(std::size_t(rows * cols), 11);
  for (double sparsity : {0.0, 0.25, 0.5, 0.9, 1.0}) {
    auto w = original;
    const index_t zeroed = compress::prune_magnitude(tensor_view<float, 2>(w.data(), {rows, cols}), sparsity,
                                                     compress::prune_scope::per_row);
    const index_t per_row = index_t(std::llround(sparsity * double(cols)));
    CHECK(zeroed == per_row * rows);
    for (index_t r = 0; r < rows; ++r) {
      const auto zeros = std::count(w.begin() + r * cols, w.begin() + (r + 1) * cols, 0.0f);
      CHECK(zeros == per_row);
      CHECK(keeps_largest(original.data() + r * cols, w.data() + r * cols, cols));
      // Survivors are untouched, not rescaled.
      for (index_t c = 0; c < cols; ++c)
        if (w[std::size_t(r * cols + c)] != 0.0f) CHECK(w[std::size_t(r * cols + c)] == original[std::size_t(r * cols + c)]);
    }
  }
}

TEST_CASE("per-matrix magnitude pruning reaches the sparsity exactly over the matrix", "[compress][pruning]") {
  const index_t rows = 20, cols = 33;
  const auto original = testing::random_floats(std::size_t(rows * cols), 12);
  auto w = original;
  compress::prune_magnitude(tensor_view<float, 2>(w.data(), {rows, cols}), 0.5, compress::prune_scope::per_matrix);
  CHECK(std::count(w.begin(), w.end(), 0.0f) == std::llround(0.5 * rows * cols));  // 330 of 660
  CHECK(keeps_largest(original.data(), w.data(), rows * cols));
  CHECK(compress::sparsity_of(tensor_view<const float, 2>(w.data(), {rows, cols})) == Approx(0.5).margin(0));
}

TEST_CASE("magnitude pruning rejects a sparsity outside [0, 1]", "[compress][pruning]") {
  std::vector<float> w(64, 1.0f);
  CHECK_THROWS_AS(compress::prune_magnitude(tensor_view<float, 2>(w.data(), {2, 32}), 1.5), invalid_input);
}

TEST_CASE("2:4 pruning keeps the 2 largest of every group of 4", "[compress][pruning]") {
  const index_t rows = 9, cols = 64;
  const auto original = testing::random_floats(std::size_t(rows * cols), 13);
  auto w = original;
  const tensor_view<float, 2> view(w.data(), {rows, cols});
  CHECK(compress::prune_2of4(view) == rows * cols / 2);
  CHECK(compress::satisfies_2of4(as_const(view)));
  for (index_t r = 0; r < rows; ++r)
    for (index_t g = 0; g < cols; g += 4) {
      const std::size_t at = std::size_t(r * cols + g);
      CHECK(std::count(w.begin() + at, w.begin() + at + 4, 0.0f) == 2);
      CHECK(keeps_largest(original.data() + at, w.data() + at, 4));
    }
  // Ties keep the lower columns; a group already at 2:4 is left as it is.
  std::vector<float> ties{1, -1, 1, -1, 0, 3, 0, 2};
  compress::prune_2of4(tensor_view<float, 2>(ties.data(), {1, 8}));
  CHECK(ties == std::vector<float>{1, -1, 0, 0, 0, 3, 0, 2});
  std::vector<float> odd(6, 1.0f);
  CHECK_THROWS_AS(compress::prune_2of4(tensor_view<float, 2>(odd.data(), {1, 6})), shape_error);
}
