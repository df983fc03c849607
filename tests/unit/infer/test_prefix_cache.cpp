// A paged infer::kv_cache's shared blocks: forks share their parent's full
// blocks, filed blocks are found again by their tokens (a prefix cache),
// stay cached after their last holder closes, are evicted least recently
// released first, and are never rewritten while shared. Exact comparisons
// throughout: shared or attached positions are the same bits in memory.
#include <catch2/catch.hpp>

#include <cstdint>
#include <numeric>
#include <vector>

#include "ctformer/infer/kv_cache.hpp"
#include "../../support/test_support.hpp"

using namespace ctformer;

namespace {

constexpr index_t n_layer = 2, kv_heads = 2, head_dim = 8, block = 4, max_seq = 32;

// Writes positions [start, start + n) of every layer with values that name
// (seed, layer, position): what a sequence computed for its tokens.
template <class Cache>
void fill(Cache& cache, infer::sequence_id s, index_t start, index_t n, std::uint32_t seed) {
  cache.reserve(s, start + n);
  for (index_t layer = 0; layer < n_layer; ++layer) {
    const auto k = testing::random_floats(std::size_t(n * kv_heads * head_dim), seed * 31 + std::uint32_t(layer));
    const auto v = testing::random_floats(std::size_t(n * kv_heads * head_dim), seed * 37 + std::uint32_t(layer));
    cache.write(layer, s, start, tensor_view<const float, 3>(k.data(), {n, kv_heads, head_dim}),
                tensor_view<const float, 3>(v.data(), {n, kv_heads, head_dim}));
  }
  cache.set_length(s, start + n);
}

template <class Cache>
bool same_positions(const Cache& cache, infer::sequence_id a, infer::sequence_id b, index_t n) {
  for (index_t layer = 0; layer < n_layer; ++layer)
    for (index_t p = 0; p < n; ++p)
      for (index_t g = 0; g < kv_heads; ++g)
        for (index_t d = 0; d < head_dim; ++d)
          if (cache.key(layer, a, p, g, d) != cache.key(layer, b, p, g, d) ||
              cache.value(layer, a, p, g, d) != cache.value(layer, b, p, g, d))
            return false;
  return true;
}

std::vector<std::int32_t> tokens_from(std::int32_t first, index_t n) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  std::iota(t.begin(), t.end(), first);
  return t;
}

}  // namespace

TEMPLATE_TEST_CASE("filed blocks are found by their tokens, shared, cached after release and evicted oldest first",
                   "[infer][kv_cache][prefix_cache]", float, bf16, std::int8_t) {
  // 8 blocks of 4 positions.
  infer::kv_cache<infer::kv::paged<block, TestType>> cache(n_layer, kv_heads, head_dim, max_seq, 32);
  REQUIRE(cache.prefix_caching());
  const auto prompt = tokens_from(10, 10);  // two full blocks and two positions

  const auto a = cache.open_sequence();
  CHECK(cache.attach_cached_prefix(a, prompt) == 0);  // nothing filed yet
  fill(cache, a, 0, 10, 1);
  cache.register_full_blocks(a, prompt);
  cache.register_full_blocks(a, prompt);  // idempotent

  // b begins with the same ten tokens: it attaches a's two full blocks.
  const auto b = cache.open_sequence();
  CHECK(cache.attach_cached_prefix(b, prompt) == 8);
  CHECK(cache.length(b) == 8);
  CHECK(std::vector<std::int32_t>(cache.block_table(b).begin(), cache.block_table(b).end()) ==
        std::vector<std::int32_t>(cache.block_table(a).begin(), cache.block_table(a).begin() + 2));
  for (std::int32_t blk : cache.block_table(b)) CHECK(cache.block_references(blk) == 2);
  CHECK(same_positions(cache, a, b, 8));
  CHECK(cache.free_block_count() == 5);  // a holds three, b took none
  // Shared positions are never rewritten; b's own positions go to a block of its own.
  CHECK_THROWS_WITH(fill(cache, b, 6, 2, 9), Catch::Contains("share"));
  fill(cache, b, 8, 3, 2);
  CHECK(cache.block_references(cache.block_table(b)[2]) == 1);
  CHECK_THROWS_WITH(cache.attach_cached_prefix(b, prompt), Catch::Contains("holds positions already"));

  // The last token is always left to compute, and a block matches only
  // with every token before it.
  auto probe = [&](const std::vector<std::int32_t>& tokens) {
    const auto s = cache.open_sequence();
    const index_t attached = cache.attach_cached_prefix(s, tokens);
    cache.close_sequence(s);
    return attached;
  };
  CHECK(probe(tokens_from(10, 9)) == 8);
  CHECK(probe(tokens_from(10, 8)) == 4);
  CHECK(probe(tokens_from(10, 4)) == 0);
  auto changed = prompt;
  changed[5] = 99;
  CHECK(probe(changed) == 4);
  changed[1] = 99;
  CHECK(probe(changed) == 0);
  auto second_block_alone = std::vector<std::int32_t>(prompt.begin() + 4, prompt.end());
  CHECK(probe(second_block_alone) == 0);  // the key holds every token before the block

  // Tokens that disagree with those a shared block was filed under are the
  // caller's mistake: a fork of an unfiled sequence, whose parent files first.
  const auto x = cache.open_sequence();
  fill(cache, x, 0, 5, 8);
  const auto y = cache.fork(x);
  cache.register_full_blocks(x, tokens_from(60, 5));
  CHECK_THROWS_WITH(cache.register_full_blocks(y, tokens_from(61, 5)), Catch::Contains("differ"));
  cache.register_full_blocks(y, tokens_from(60, 5));
  cache.close_sequence(y);
  cache.close_sequence(x);
  CHECK(probe(tokens_from(60, 5)) == 4);
  // Forget it again: a sequence that needs every free block evicts the cached ones.
  const auto all = cache.open_sequence();
  cache.reserve(all, 4 * cache.free_block_count());
  cache.close_sequence(all);
  CHECK(probe(tokens_from(60, 5)) == 0);

  // Released by every holder, filed blocks stay cached and count as free.
  cache.close_sequence(a);
  cache.close_sequence(b);
  CHECK(cache.free_block_count() == 8);
  CHECK(cache.cached_block_count() == 2);
  CHECK(cache.bytes_in_use() == 0);
  const auto d = cache.open_sequence();
  CHECK(cache.attach_cached_prefix(d, prompt) == 8);
  CHECK(cache.cached_block_count() == 0);
  // d's values are a's, as a wrote them: compare with a fresh copy of a's writes.
  const auto fresh = cache.open_sequence();
  fill(cache, fresh, 0, 10, 1);
  CHECK(same_positions(cache, d, fresh, 8));
  cache.close_sequence(fresh);
  cache.close_sequence(d);
  CHECK(cache.cached_block_count() == 2);

  // A second prefix released later; then the pool needs one cached block:
  // the one released longest ago goes, the prefix's tail first.
  const auto other = tokens_from(50, 5);
  const auto e = cache.open_sequence();
  fill(cache, e, 0, 5, 3);
  cache.register_full_blocks(e, other);
  cache.close_sequence(e);
  CHECK(cache.cached_block_count() == 3);
  const auto big = cache.open_sequence();
  cache.reserve(big, 4 * (8 - 3 + 1));  // every never used block and one cached
  CHECK(cache.cached_block_count() == 2);
  CHECK(probe(prompt) == 4);  // its second block was evicted, its first kept
  CHECK(probe(tokens_from(50, 5)) == 4);
  cache.reserve(big, max_seq);  // all eight
  CHECK(cache.cached_block_count() == 0);
  CHECK(probe(prompt) == 0);
  CHECK_THROWS_AS(cache.reserve(cache.open_sequence(), 1), infer::cache_exhausted);
}

TEMPLATE_TEST_CASE("a fork shares its parent's full blocks and copies the partial last one",
                   "[infer][kv_cache][prefix_cache]", float, bf16, std::int8_t) {
  infer::kv_cache<infer::kv::paged<block, TestType>> cache(n_layer, kv_heads, head_dim, max_seq, 64);
  const auto parent = cache.open_sequence();
  fill(cache, parent, 0, 10, 4);
  const index_t free_before = cache.free_block_count();
  const auto child = cache.fork(parent);
  CHECK(cache.free_block_count() == free_before - 1);  // only the partial block is copied
  CHECK(cache.length(child) == 10);
  CHECK(cache.block_table(child)[0] == cache.block_table(parent)[0]);
  CHECK(cache.block_table(child)[1] == cache.block_table(parent)[1]);
  CHECK(cache.block_table(child)[2] != cache.block_table(parent)[2]);
  CHECK(same_positions(cache, parent, child, 10));
  // Each grows on its own; the parent closing leaves the child's positions as they were.
  fill(cache, parent, 10, 3, 5);
  fill(cache, child, 10, 6, 6);
  const auto reference = cache.open_sequence();
  fill(cache, reference, 0, 10, 4);
  fill(cache, reference, 10, 6, 6);
  cache.close_sequence(parent);
  CHECK(cache.block_references(cache.block_table(child)[0]) == 1);
  CHECK(same_positions(cache, child, reference, 16));
  // A fork of a sequence of whole blocks takes no block at all.
  const index_t free_now = cache.free_block_count();
  const auto grandchild = cache.fork(child);
  CHECK(cache.free_block_count() == free_now);
  CHECK(same_positions(cache, child, grandchild, 16));
  fill(cache, grandchild, 16, 1, 7);  // position 16 starts a new block
  CHECK(cache.length(child) == 16);
}

TEST_CASE("caches whose blocks cannot be shared by tokens attach nothing", "[infer][kv_cache][prefix_cache]") {
  const auto prompt = tokens_from(1, 12);
  infer::kv_cache<infer::kv::contiguous<float>> contiguous(n_layer, kv_heads, head_dim, max_seq, 2);
  CHECK_FALSE(contiguous.prefix_caching());
  const auto a = contiguous.open_sequence();
  fill(contiguous, a, 0, 12, 1);
  contiguous.register_full_blocks(a, prompt);
  CHECK(contiguous.attach_cached_prefix(contiguous.open_sequence(), prompt) == 0);

  // A windowed layer's ring holds each sequence's latest positions only.
  infer::kv_cache<infer::kv::paged<block, float>> windowed(n_layer, kv_heads, head_dim, max_seq, 32, {0, 8});
  CHECK_FALSE(windowed.prefix_caching());
  const auto w = windowed.open_sequence();
  fill(windowed, w, 0, 6, 1);  // a ring of 8 takes at most 8 positions a write
  fill(windowed, w, 6, 6, 2);
  windowed.register_full_blocks(w, prompt);
  CHECK(windowed.attach_cached_prefix(windowed.open_sequence(), prompt) == 0);
  // Its forks still share the global layer's full blocks.
  const auto child = windowed.fork(w);
  CHECK(windowed.block_table(child)[0] == windowed.block_table(w)[0]);
  CHECK(windowed.length(child) == 12);
}
