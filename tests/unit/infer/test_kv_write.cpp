// ops::kv_cache_write and ops::kv_cache_copy on cpu::par: rows land where the
// block table puts them, converted as the cache's element (fp32 exact, bf16
// rounded to nearest even, int8 with a per-row scale max|row| / 127), nothing
// else is touched, copies are bit for bit, bad shapes and positions throw
// before anything is written, and kv_cache::write stores what the op stores.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "ctformer/ctformer.hpp"
#include "ctformer/infer/kv_cache.hpp"

using namespace ctformer;

namespace {

constexpr index_t block_tokens = 4, blocks = 3, kv_heads = 2, head_dim = 8;
constexpr index_t block_elements = block_tokens * kv_heads * head_dim;

// A hand-made layout: 3 blocks of 4 positions, head by head inside a block,
// logical blocks 0, 1, 2 in physical blocks 2, 0, 1.
template <class E>
struct layout {
  std::vector<E> k, v;
  std::vector<float> k_scale, v_scale;
  std::int32_t table[blocks] = {2, 0, 1};

  explicit layout(E fill) : k(blocks * block_elements, fill), v(blocks * block_elements, fill),
                            k_scale(blocks * block_elements / head_dim, -1.0f),
                            v_scale(blocks * block_elements / head_dim, -1.0f) {}

  template <class Out>
  Out view(Out out) {
    out.block_table = table;
    out.block_tokens = block_tokens;
    out.block_stride = block_elements;
    out.token_stride = head_dim;
    out.head_stride = block_tokens * head_dim;
    out.kv_heads = kv_heads;
    out.head_dim = head_dim;
    out.capacity = blocks * block_tokens;
    return out;
  }
  kv_view<E> writable() {
    kv_view<E> out;
    out.k = k.data();
    out.v = v.data();
    if constexpr (std::is_same_v<E, std::int8_t>) {
      out.k_scale = k_scale.data();
      out.v_scale = v_scale.data();
    }
    return view(out);
  }
  kv_view<const E> readable() const {
    kv_view<const E> out;
    out.k = k.data();
    out.v = v.data();
    if constexpr (std::is_same_v<E, std::int8_t>) {
      out.k_scale = k_scale.data();
      out.v_scale = v_scale.data();
    }
    return const_cast<layout*>(this)->view(out);
  }
  // Where the layout keeps (pos, g), computed here from the description, not by kv_view.
  static index_t at(const std::int32_t* table, index_t pos, index_t g) {
    return index_t(table[pos / block_tokens]) * block_elements + g * block_tokens * head_dim +
           (pos % block_tokens) * head_dim;
  }
};

std::vector<float> random_rows(index_t rows, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> x(std::size_t(rows * kv_heads * head_dim));
  for (auto& e : x) e = normal(rng);
  return x;
}

template <class E>
bool same_bits(E a, E b) {
  return std::memcmp(&a, &b, sizeof(E)) == 0;
}

}  // namespace

TEMPLATE_TEST_CASE("kv_cache_write stores rows as the cache's element where the block table says", "[infer][kv_write]",
                   float, bf16, std::int8_t) {
  using E = TestType;
  constexpr bool quantized = std::is_same_v<E, std::int8_t>;
  const E sentinel = [] {
    if constexpr (std::is_same_v<E, bf16>) return bf16::from_bits(0x7fc1);
    else if constexpr (quantized) return std::int8_t(99);
    else return 12345.0f;
  }();
  layout<E> cache(sentinel);
  // Positions 3..8 (across the three blocks); key row 1 (position 4, kv head 0) is all zeros.
  constexpr index_t start = 3, rows = 6;
  std::vector<float> k = random_rows(rows, 1), v = random_rows(rows, 2);
  std::fill(k.begin() + 2 * head_dim, k.begin() + 3 * head_dim, 0.0f);
  const tensor_view<const float, 3> kt(k.data(), {rows, kv_heads, head_dim}), vt(v.data(), {rows, kv_heads, head_dim});
  ops::kv_cache_write(cpu::par, cache.writable(), start, kt, vt);

  std::vector<bool> written(cache.k.size(), false);
  for (index_t t = 0; t < rows; ++t)
    for (index_t g = 0; g < kv_heads; ++g) {
      const index_t at = layout<E>::at(cache.table, start + t, g);
      for (int which = 0; which < 2; ++which) {
        const float* x = &(which == 0 ? kt : vt)(t, g, 0);
        const std::vector<E>& stored = which == 0 ? cache.k : cache.v;
        const std::vector<float>& scales = which == 0 ? cache.k_scale : cache.v_scale;
        if constexpr (std::is_same_v<E, float>) {
          for (index_t d = 0; d < head_dim; ++d) CHECK(stored[std::size_t(at + d)] == x[d]);
        } else if constexpr (std::is_same_v<E, bf16>) {
          for (index_t d = 0; d < head_dim; ++d) {
            CHECK(same_bits(stored[std::size_t(at + d)], bf16(x[d])));
            CHECK(std::fabs(float(stored[std::size_t(at + d)]) - x[d]) <= std::fabs(x[d]) * 0x1p-8f);
          }
        } else {
          float amax = 0.0f;
          for (index_t d = 0; d < head_dim; ++d) amax = std::max(amax, std::fabs(x[d]));
          const float scale = scales[std::size_t(at / head_dim)];
          CHECK(scale == amax / 127.0f);
          for (index_t d = 0; d < head_dim; ++d) {
            const int q = stored[std::size_t(at + d)];
            CHECK(q >= -127);
            CHECK(q <= 127);
            // Round to nearest: the stored value is within half a step of x.
            CHECK(std::fabs(float(q) * scale - x[d]) <= 0.5f * scale * (1.0f + 1e-5f) + 1e-30f);
            if (amax == 0.0f) CHECK(q == 0);
          }
          if (amax > 0.0f) {  // the largest element is +-127 exactly
            index_t largest = 0;
            for (index_t d = 0; d < head_dim; ++d)
              if (std::fabs(x[d]) > std::fabs(x[largest])) largest = d;
            CHECK(std::abs(int(stored[std::size_t(at + largest)])) == 127);
          }
        }
      }
      for (index_t d = 0; d < head_dim; ++d) written[std::size_t(at + d)] = true;
    }
  // The zero row: scale 0.
  if constexpr (quantized) CHECK(cache.k_scale[std::size_t(layout<E>::at(cache.table, 4, 0) / head_dim)] == 0.0f);
  // Nothing else was touched.
  for (std::size_t i = 0; i < cache.k.size(); ++i)
    if (!written[i]) {
      CHECK(same_bits(cache.k[i], sentinel));
      CHECK(same_bits(cache.v[i], sentinel));
    }
  if constexpr (quantized)
    for (std::size_t i = 0; i < cache.k_scale.size(); ++i)
      if (!written[i * std::size_t(head_dim)]) CHECK(cache.k_scale[i] == -1.0f);
}

TEMPLATE_TEST_CASE("kv_cache_copy copies positions bit for bit between two layouts", "[infer][kv_write]", float, bf16,
                   std::int8_t) {
  using E = TestType;
  layout<E> from(E{}), to(E{});
  to.table[0] = 1;
  to.table[1] = 2;
  to.table[2] = 0;
  const std::vector<float> k = random_rows(12, 3), v = random_rows(12, 4);
  ops::kv_cache_write(cpu::par, from.writable(), 0, tensor_view<const float, 3>(k.data(), {12, kv_heads, head_dim}),
                      tensor_view<const float, 3>(v.data(), {12, kv_heads, head_dim}));
  ops::kv_cache_copy(cpu::par, from.readable(), to.writable(), 2, 11);
  for (index_t pos = 0; pos < 12; ++pos)
    for (index_t g = 0; g < kv_heads; ++g) {
      const index_t a = layout<E>::at(from.table, pos, g), b = layout<E>::at(to.table, pos, g);
      const bool copied = pos >= 2 && pos < 11;
      for (index_t d = 0; d < head_dim; ++d) {
        CHECK(same_bits(to.k[std::size_t(b + d)], copied ? from.k[std::size_t(a + d)] : E{}));
        CHECK(same_bits(to.v[std::size_t(b + d)], copied ? from.v[std::size_t(a + d)] : E{}));
      }
      if constexpr (std::is_same_v<E, std::int8_t>) {
        CHECK(to.k_scale[std::size_t(b / head_dim)] == (copied ? from.k_scale[std::size_t(a / head_dim)] : -1.0f));
        CHECK(to.v_scale[std::size_t(b / head_dim)] == (copied ? from.v_scale[std::size_t(a / head_dim)] : -1.0f));
      }
    }
}

TEST_CASE("kv_cache_write and kv_cache_copy refuse bad shapes and positions before writing", "[infer][kv_write]") {
  layout<float> cache(7.0f);
  std::vector<float> rows(std::size_t(4 * kv_heads * head_dim), 1.0f);
  const tensor_view<const float, 3> good(rows.data(), {4, kv_heads, head_dim});
  const tensor_view<const float, 3> one_head(rows.data(), {4, 1, head_dim});
  const tensor_view<const float, 3> short_rows(rows.data(), {4, kv_heads, head_dim / 2});
  const tensor_view<const float, 3> fewer(rows.data(), {3, kv_heads, head_dim});
  const tensor_view<const float, 3> strided(rows.data(), {2, kv_heads, head_dim}, {2 * kv_heads * head_dim, head_dim, 2});
  CHECK_THROWS_AS(ops::kv_cache_write(cpu::par, cache.writable(), 0, one_head, one_head), shape_error);
  CHECK_THROWS_AS(ops::kv_cache_write(cpu::par, cache.writable(), 0, short_rows, short_rows), shape_error);
  CHECK_THROWS_AS(ops::kv_cache_write(cpu::par, cache.writable(), 0, good, fewer), shape_error);
  CHECK_THROWS_AS(ops::kv_cache_write(cpu::par, cache.writable(), 0, strided, strided), shape_error);
  CHECK_THROWS_WITH(ops::kv_cache_write(cpu::par, cache.writable(), 9, good, good),
                    Catch::Contains("[9, 13)") && Catch::Contains("[0, 12)"));
  CHECK_THROWS_AS(ops::kv_cache_write(cpu::par, cache.writable(), -1, good, good), invalid_input);
  layout<float> other(0.0f);
  CHECK_THROWS_AS(ops::kv_cache_copy(cpu::par, cache.readable(), other.writable(), 0, 13), invalid_input);
  auto narrow = other.writable();
  narrow.head_stride = head_dim;
  CHECK_THROWS_AS(ops::kv_cache_copy(cpu::par, cache.readable(), narrow, 0, 4), shape_error);
  for (float x : cache.k) CHECK(x == 7.0f);
  for (float x : other.k) CHECK(x == 0.0f);
}

TEMPLATE_TEST_CASE("kv_cache::write stores what kv_cache_write stores, rings included", "[infer][kv_write]", float,
                   bf16, std::int8_t) {
  using E = TestType;
  // Layer 0 global, layer 1 windowed (a ring of 8 positions in blocks of 4).
  infer::kv_cache<infer::kv::paged<block_tokens, E>> cache(2, kv_heads, head_dim, 32, 64, {0, 8}, 2);
  const auto seq = cache.open_sequence();
  cache.reserve(seq, 14);
  const std::vector<float> k = random_rows(14, 5), v = random_rows(14, 6);
  for (index_t layer = 0; layer < 2; ++layer) {
    // The ring takes at most its 8 positions at once: write 6, then the last 8.
    const index_t chunks[2][2] = {{0, 6}, {6, 14}};
    for (const auto& c : chunks) {
      const index_t n = c[1] - c[0];
      const std::size_t at = std::size_t(c[0] * kv_heads * head_dim);
      cache.write(layer, seq, c[0], tensor_view<const float, 3>(k.data() + at, {n, kv_heads, head_dim}),
                  tensor_view<const float, 3>(v.data() + at, {n, kv_heads, head_dim}));
    }
  }
  cache.set_length(seq, 14);
  // The same rows through the op into a layout of the same shape, read back as the cache reads.
  for (index_t layer = 0; layer < 2; ++layer) {
    const index_t first = layer == 1 ? 14 - cache.ring_positions() : 0;  // what the ring still holds
    for (index_t pos = first; pos < 14; ++pos)
      for (index_t g = 0; g < kv_heads; ++g) {
        layout<E> one(E{});
        const std::size_t at = std::size_t((pos * kv_heads) * head_dim);
        std::vector<float> key_row(k.begin() + std::ptrdiff_t(at), k.begin() + std::ptrdiff_t(at + kv_heads * head_dim));
        ops::kv_cache_write(cpu::par, one.writable(), 0, tensor_view<const float, 3>(key_row.data(), {1, kv_heads, head_dim}),
                            tensor_view<const float, 3>(key_row.data(), {1, kv_heads, head_dim}));
        const index_t base = layout<E>::at(one.table, 0, g);
        for (index_t d = 0; d < head_dim; ++d) {
          float expected = float(one.k[std::size_t(base + d)]);
          if constexpr (std::is_same_v<E, std::int8_t>) expected *= one.k_scale[std::size_t(base / head_dim)];
          CHECK(cache.key(layer, seq, pos, g, d) == expected);
        }
      }
  }
  CHECK_THROWS_AS(cache.key(0, seq, 3, kv_heads, 0), invalid_input);
  CHECK_THROWS_AS(cache.key(0, seq, 3, 0, head_dim), invalid_input);
}
