// infer::kv_cache (contiguous and paged; fp32, bf16, int8 elements) and
// ops::cached_attention over it: block bookkeeping, memory that follows live
// tokens, pool exhaustion, and attention against a plain two-pass reference.
#include <array>
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "ctformer/ctformer.hpp"
#include "ctformer/infer/kv_cache.hpp"
#include "../../support/test_support.hpp"

using namespace ctformer;

namespace {

constexpr index_t n_layer = 2, kv_heads = 2, head_dim = 16, heads = 4, max_seq = 80;

// Plain causal attention over fp32 keys and values (T_all, KV, D): softmax
// with std::exp in double, for positions [start, start + T).
std::vector<float> reference_attention(const std::vector<float>& q, const std::vector<float>& k,
                                       const std::vector<float>& v, index_t start, index_t t_len, float scale) {
  std::vector<float> out(std::size_t(t_len * heads * head_dim));
  const index_t group = heads / kv_heads;
  for (index_t t = 0; t < t_len; ++t)
    for (index_t h = 0; h < heads; ++h) {
      const index_t g = h / group, n = start + t + 1;
      std::vector<double> s(static_cast<std::size_t>(n));
      double m = -1e300, z = 0;
      for (index_t j = 0; j < n; ++j) {
        double dot = 0;
        for (index_t i = 0; i < head_dim; ++i)
          dot += double(q[std::size_t((t * heads + h) * head_dim + i)]) * k[std::size_t((j * kv_heads + g) * head_dim + i)];
        s[std::size_t(j)] = dot * scale;
        m = std::max(m, s[std::size_t(j)]);
      }
      for (auto& x : s) z += x = std::exp(x - m);
      for (index_t i = 0; i < head_dim; ++i) {
        double acc = 0;
        for (index_t j = 0; j < n; ++j) acc += s[std::size_t(j)] * v[std::size_t((j * kv_heads + g) * head_dim + i)];
        out[std::size_t((t * heads + h) * head_dim + i)] = float(acc / z);
      }
    }
  return out;
}

// Writes keys/values (n, KV, D) of layer 1 into a fresh sequence in chunks,
// then attends q (T, H, D) at [n - T, n). Returns the output (T, H, D).
template <class Policy>
std::vector<float> attend(infer::kv_cache<Policy>& cache, const std::vector<float>& k, const std::vector<float>& v,
                          const std::vector<float>& q, index_t n, index_t t_len, index_t write_chunk, int threads) {
  const auto seq = cache.open_sequence();
  cache.reserve(seq, n);
  for (index_t s = 0; s < n; s += write_chunk) {
    const index_t m = std::min(write_chunk, n - s);
    tensor_view<const float, 3> kk(k.data() + s * kv_heads * head_dim, {m, kv_heads, head_dim});
    tensor_view<const float, 3> vv(v.data() + s * kv_heads * head_dim, {m, kv_heads, head_dim});
    cache.write(1, seq, s, kk, vv);
  }
  cache.set_length(seq, n);
  std::vector<float> out(q.size());
  ops::cached_attention(cpu::par.with_threads(threads), tensor_view<const float, 3>(q.data(), {t_len, heads, head_dim}),
                        cache.view(1, seq), tensor_view<float, 3>(out.data(), {t_len, heads, head_dim}), n - t_len,
                        0.25f);
  cache.close_sequence(seq);
  return out;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])));
  return worst;
}

}  // namespace

TEST_CASE("contiguous cache: slots, lengths and errors", "[infer][kv_cache]") {
  infer::kv_cache<infer::kv::contiguous<float>> cache(n_layer, kv_heads, head_dim, max_seq, 2);
  // A slot holds max_seq rounded up to whole layout blocks of 64 positions.
  constexpr index_t slot_tokens = (max_seq + 63) / 64 * 64;
  CHECK(cache.bytes() == std::size_t(2 * 2 * n_layer * slot_tokens * kv_heads * head_dim) * sizeof(float));
  const auto a = cache.open_sequence();
  const auto b = cache.open_sequence();
  CHECK(a != b);
  CHECK(cache.reserved(a) == max_seq);
  CHECK_THROWS_AS(cache.open_sequence(), infer::cache_exhausted);
  cache.reserve(a, max_seq);
  CHECK_THROWS_WITH(cache.reserve(a, max_seq + 1),
                    Catch::Contains("sequence " + std::to_string(a)) && Catch::Contains("81 positions") &&
                        Catch::Contains("max_seq of 80"));
  cache.set_length(a, 10);
  CHECK(cache.length(a) == 10);
  CHECK_THROWS_AS(cache.set_length(a, max_seq + 1), invalid_input);
  // A layer outside the cache: a clear error, not a view past the storage.
  CHECK_THROWS_WITH(cache.view(n_layer, a), Catch::Contains("layer " + std::to_string(n_layer)));
  CHECK_THROWS_AS(cache.view(-1, a), invalid_input);
  cache.close_sequence(b);
  CHECK_THROWS_AS(cache.length(b), invalid_input);
  const auto c = cache.open_sequence();  // the freed slot is reused
  CHECK(cache.length(c) == 0);
  CHECK_THROWS_AS((infer::kv_cache<infer::kv::contiguous<float>>(0, 1, 1, 1, 1)), invalid_input);
}

TEST_CASE("paged cache: memory follows live tokens, blocks are reused, exhaustion is a clear error",
          "[infer][kv_cache]") {
  // 64 positions in blocks of 16: 4 blocks.
  infer::kv_cache<infer::kv::paged<16>> cache(n_layer, kv_heads, head_dim, max_seq, 64);
  CHECK(cache.block_count() == 4);
  CHECK(cache.bytes_in_use() == 0);
  const std::size_t block = cache.bytes_per_block();
  CHECK(block == std::size_t(2 * n_layer * 16 * kv_heads * head_dim) * sizeof(float));

  const auto a = cache.open_sequence();
  CHECK(cache.bytes_in_use() == 0);  // no positions yet, no blocks
  cache.reserve(a, 1);
  CHECK(cache.bytes_in_use() == block);
  cache.reserve(a, 16);
  CHECK(cache.bytes_in_use() == block);
  cache.reserve(a, 17);
  CHECK(cache.bytes_in_use() == 2 * block);
  const auto b = cache.open_sequence();
  cache.reserve(b, 32);
  CHECK(cache.free_block_count() == 0);
  CHECK(cache.bytes_in_use() == 4 * block);

  // All or nothing: a failed reserve takes no blocks, and names the sequence, the ask and the pool.
  CHECK_THROWS_AS(cache.reserve(a, 33), infer::cache_exhausted);
  CHECK_THROWS_WITH(cache.reserve(a, 33), Catch::Contains("sequence " + std::to_string(a)) &&
                                               Catch::Contains("33 positions") && Catch::Contains("pool of 64"));
  CHECK(cache.reserved(a) == 32);

  const std::vector<std::int32_t> blocks_of_b = cache.block_table(b);
  cache.close_sequence(b);
  CHECK(cache.bytes_in_use() == 2 * block);
  const auto c = cache.open_sequence();
  cache.reserve(c, 20);
  // c took b's blocks (the pool hands back the most recently freed first).
  for (std::int32_t blk : cache.block_table(c))
    CHECK(std::find(blocks_of_b.begin(), blocks_of_b.end(), blk) != blocks_of_b.end());
  cache.close_sequence(a);
  cache.close_sequence(c);
  CHECK(cache.bytes_in_use() == 0);
  CHECK(cache.free_block_count() == 4);
}

TEST_CASE("write stores rows exactly (fp32), rounded (bf16), quantized per token and head (int8)",
          "[infer][kv_cache]") {
  const auto k = testing::random_floats(std::size_t(5 * kv_heads * head_dim), 1);
  const auto v = testing::random_floats(std::size_t(5 * kv_heads * head_dim), 2);
  tensor_view<const float, 3> kk(k.data(), {5, kv_heads, head_dim}), vv(v.data(), {5, kv_heads, head_dim});
  auto check = [&](auto& cache, double tolerance_rel) {
    const auto s = cache.open_sequence();
    cache.reserve(s, 20);
    cache.write(0, s, 14, kk, vv);  // crosses a block boundary for paged<8>
    double worst = 0;
    for (index_t t = 0; t < 5; ++t)
      for (index_t g = 0; g < kv_heads; ++g)
        for (index_t d = 0; d < head_dim; ++d) {
          worst = std::max(worst, std::fabs(double(cache.key(0, s, 14 + t, g, d)) - kk(t, g, d)));
          worst = std::max(worst, std::fabs(double(cache.value(0, s, 14 + t, g, d)) - vv(t, g, d)));
        }
    CHECK(worst <= tolerance_rel);
    CHECK_THROWS_AS(cache.write(0, s, cache.reserved(s) - 2, kk, vv), invalid_input);  // runs past the reserved positions
  };
  infer::kv_cache<infer::kv::paged<8, float>> f32(1, kv_heads, head_dim, 40, 40);
  check(f32, 0.0);
  // bf16 keeps 8 significand bits: |error| <= 2^-9 |x| <= 2^-9 for |x| < 1.
  infer::kv_cache<infer::kv::paged<8, bf16>> b16(1, kv_heads, head_dim, 40, 40);
  check(b16, 1.0 / 512);
  // int8: |error| <= scale / 2 = max|row| / 254 <= 1 / 254 for |x| < 1.
  infer::kv_cache<infer::kv::contiguous<std::int8_t>> i8(1, kv_heads, head_dim, 40, 2);
  check(i8, 1.0 / 254 + 1e-7);
}

TEST_CASE("cached attention matches a two-pass softmax reference; paged equals contiguous bit for bit",
          "[infer][kv_cache][attention]") {
  const index_t n = 75, t_len = 7;  // crosses the kernel's 64-key tiles and several 16-position blocks
  const auto k = testing::random_floats(std::size_t(n * kv_heads * head_dim), 3, -2.0f, 2.0f);
  const auto v = testing::random_floats(std::size_t(n * kv_heads * head_dim), 4);
  const auto q = testing::random_floats(std::size_t(t_len * heads * head_dim), 5, -2.0f, 2.0f);
  const auto expected = reference_attention(q, k, v, n - t_len, t_len, 0.25f);

  infer::kv_cache<infer::kv::contiguous<float>> contiguous(n_layer, kv_heads, head_dim, max_seq, 1);
  infer::kv_cache<infer::kv::paged<16, float>> paged(n_layer, kv_heads, head_dim, max_seq, 160);
  infer::kv_cache<infer::kv::paged<16, float>> paged_fragmented(n_layer, kv_heads, head_dim, max_seq, 160);
  // Fragment the pool so the block table is not the identity.
  const auto filler = paged_fragmented.open_sequence();
  paged_fragmented.reserve(filler, 40);
  const auto out_c = attend(contiguous, k, v, q, n, t_len, n, 1);
  const auto out_p = attend(paged, k, v, q, n, t_len, 5, 2);
  const auto out_f = attend(paged_fragmented, k, v, q, n, t_len, 75, 2);

  // fp32 online softmax vs double reference: rounding of 75-term dot products
  // and sums of values in [-1, 1], and the 2-ulp vector exp: well under 1e-5.
  CHECK(max_abs_diff(out_c, expected) < 1e-5);
  // Same tiles, same order, same arithmetic whatever the block layout and thread count.
  CHECK(out_c == out_p);
  CHECK(out_c == out_f);

  // bf16 keys and values: each element within 2^-9 relative, so scores shift
  // by at most |q| |k| 2^-9 ~ 0.03 here; outputs (convex combinations of values
  // in [-1, 1]) move by well under 2e-2.
  infer::kv_cache<infer::kv::paged<16, bf16>> b16(n_layer, kv_heads, head_dim, max_seq, 96);
  CHECK(max_abs_diff(attend(b16, k, v, q, n, t_len, 8, 2), expected) < 2e-2);
  // int8: each element within max|row| / 254 (~0.008 for keys in [-2, 2]): a
  // coarser but similar shift, bounded by 3e-2.
  infer::kv_cache<infer::kv::paged<16, std::int8_t>> i8(n_layer, kv_heads, head_dim, max_seq, 96);
  CHECK(max_abs_diff(attend(i8, k, v, q, n, t_len, 8, 2), expected) < 3e-2);
}

TEST_CASE("cached attention of one decode query merges its key parts; results independent of threads and layout",
          "[infer][kv_cache][attention]") {
  // 700 keys: three parts of the decode split (256 positions each), the last
  // one partial, and tiles that straddle 16-position blocks.
  const index_t n = 700, long_seq = 704;
  const auto k = testing::random_floats(std::size_t(n * kv_heads * head_dim), 13, -2.0f, 2.0f);
  const auto v = testing::random_floats(std::size_t(n * kv_heads * head_dim), 14);
  const auto q = testing::random_floats(std::size_t(heads * head_dim), 15, -2.0f, 2.0f);
  const auto expected = reference_attention(q, k, v, n - 1, 1, 0.25f);

  infer::kv_cache<infer::kv::contiguous<float>> contiguous(n_layer, kv_heads, head_dim, long_seq, 1);
  infer::kv_cache<infer::kv::paged<16, float>> paged(n_layer, kv_heads, head_dim, long_seq, 800);
  const auto filler = paged.open_sequence();  // fragment the pool: the block table is not the identity
  paged.reserve(filler, 40);
  const auto one_thread = attend(contiguous, k, v, q, n, 1, n, 1);
  const auto two_threads = attend(contiguous, k, v, q, n, 1, 37, 2);
  const auto out_paged = attend(paged, k, v, q, n, 1, 100, 2);

  // fp32 parts merged with exp(max_p - max) weights: a few more roundings
  // than one pass over 700 keys, still well under 1e-5 for outputs in [-1, 1].
  CHECK(max_abs_diff(one_thread, expected) < 1e-5);
  // The parts are fixed runs of positions, so thread count and block layout
  // change nothing.
  CHECK(one_thread == two_threads);
  CHECK(one_thread == out_paged);

  // bf16 and int8 caches: the same per-element bounds as in the prefill test above.
  infer::kv_cache<infer::kv::paged<16, bf16>> b16(n_layer, kv_heads, head_dim, long_seq, 704);
  CHECK(max_abs_diff(attend(b16, k, v, q, n, 1, 64, 2), expected) < 2e-2);
  infer::kv_cache<infer::kv::contiguous<std::int8_t>> i8(n_layer, kv_heads, head_dim, long_seq, 1);
  CHECK(max_abs_diff(attend(i8, k, v, q, n, 1, 64, 2), expected) < 3e-2);
}

TEST_CASE("cached attention rejects shapes that do not fit the cache", "[infer][kv_cache][attention]") {
  infer::kv_cache<infer::kv::paged<16>> cache(n_layer, kv_heads, head_dim, max_seq, 64);
  const auto s = cache.open_sequence();
  cache.reserve(s, 16);
  std::vector<float> q(std::size_t(2 * heads * head_dim)), out(q.size());
  tensor_view<const float, 3> qv(q.data(), {2, heads, head_dim});
  tensor_view<float, 3> ov(out.data(), {2, heads, head_dim});
  CHECK_THROWS_AS(ops::cached_attention(cpu::par, qv, cache.view(0, s), ov, 15, 1.0f), shape_error);  // past reserved
  std::vector<float> q3(std::size_t(2 * 3 * head_dim)), o3(q3.size());
  CHECK_THROWS_AS(ops::cached_attention(cpu::par, tensor_view<const float, 3>(q3.data(), {2, 3, head_dim}),
                                        cache.view(0, s), tensor_view<float, 3>(o3.data(), {2, 3, head_dim}), 0, 1.0f),
                  shape_error);  // 2 kv heads do not divide 3 query heads
}

TEST_CASE("cached attention takes head dimensions past 512", "[infer][kv_cache][attention]") {
  // The kernel walks a head in chunks of at most 64 elements and sizes its
  // scratch by head_dim, so a wide head (here 640, one kv head, 2 query
  // heads, 3 prompt tokens over 70 keys) needs no special case.
  constexpr index_t d = 640, n = 70, t_len = 3, q_heads = 2;
  const auto k = testing::random_floats(std::size_t(n * d), 31, -0.2f, 0.2f);
  const auto v = testing::random_floats(std::size_t(n * d), 32);
  const auto q = testing::random_floats(std::size_t(t_len * q_heads * d), 33, -0.2f, 0.2f);
  infer::kv_cache<infer::kv::paged<16, float>> cache(1, 1, d, 80, 80);
  const auto s = cache.open_sequence();
  cache.reserve(s, n);
  cache.write(0, s, 0, tensor_view<const float, 3>(k.data(), {n, 1, d}), tensor_view<const float, 3>(v.data(), {n, 1, d}));
  std::vector<float> out(q.size());
  const float scale = 1.0f / std::sqrt(float(d));
  ops::cached_attention(cpu::par.with_threads(2), tensor_view<const float, 3>(q.data(), {t_len, q_heads, d}),
                        cache.view(0, s), tensor_view<float, 3>(out.data(), {t_len, q_heads, d}), n - t_len, scale);
  double worst = 0;
  for (index_t t = 0; t < t_len; ++t)
    for (index_t h = 0; h < q_heads; ++h) {
      const index_t keys = n - t_len + t + 1;  // causal: up to and including its own position
      std::vector<double> p(static_cast<std::size_t>(keys));
      double m = -1e300, z = 0;
      for (index_t j = 0; j < keys; ++j) {
        double dot = 0;
        for (index_t e = 0; e < d; ++e) dot += double(q[std::size_t((t * q_heads + h) * d + e)]) * k[std::size_t(j * d + e)];
        p[std::size_t(j)] = dot * scale;
        m = std::max(m, p[std::size_t(j)]);
      }
      for (auto& x : p) z += (x = std::exp(x - m));
      for (index_t e = 0; e < d; ++e) {
        double acc = 0;
        for (index_t j = 0; j < keys; ++j) acc += p[std::size_t(j)] * v[std::size_t(j * d + e)];
        worst = std::max(worst, std::fabs(acc / z - double(out[std::size_t((t * q_heads + h) * d + e)])));
      }
    }
  // fp32 dots of 640 terms and sums of 70 values in [-1, 1]: well under 1e-5.
  CHECK(worst < 1e-5);
}

namespace {

/// The largest |out - exact| over t_len queries at positions n - t_len ..
/// n - 1 (q_heads heads on kv kv heads, head_dim d), where exact is attention
/// in double over the cache's own stored keys and values of sequence s, with
/// each query element passed through query_value(element) first.
template <class Policy, class QueryValue>
double worst_against_stored_values(const infer::kv_cache<Policy>& cache, infer::sequence_id s,
                                   const std::vector<float>& q, const std::vector<float>& out, index_t n,
                                   index_t t_len, index_t q_heads, index_t kv, index_t d, float scale,
                                   QueryValue query_value) {
  double worst = 0;
  for (index_t t = 0; t < t_len; ++t)
    for (index_t h = 0; h < q_heads; ++h) {
      const float* qh = q.data() + (t * q_heads + h) * d;
      const index_t g = h / (q_heads / kv), keys = n - t_len + t + 1;
      std::vector<double> p(static_cast<std::size_t>(keys));
      double m = -1e300, z = 0;
      for (index_t j = 0; j < keys; ++j) {
        double dot = 0;
        for (index_t e = 0; e < d; ++e) dot += query_value(qh, e) * cache.key(0, s, j, g, e);
        p[std::size_t(j)] = dot * scale;
        m = std::max(m, p[std::size_t(j)]);
      }
      for (auto& x : p) z += (x = std::exp(x - m));
      for (index_t e = 0; e < d; ++e) {
        double acc = 0;
        for (index_t j = 0; j < keys; ++j) acc += p[std::size_t(j)] * cache.value(0, s, j, g, e);
        worst = std::max(worst, std::fabs(acc / z - double(out[std::size_t((t * q_heads + h) * d + e)])));
      }
    }
  return worst;
}

}  // namespace

TEMPLATE_TEST_CASE("a bf16 or int8 cache gives its stored values' exact attention at every head dimension the "
                   "kernel splits differently", "[infer][kv_cache][attention]", bf16, std::int8_t) {
  // bf16 rows with head_dim a multiple of 16 (AVX2; 32 with AVX512_BF16) are
  // read as even/odd pairs (accumulator chunks of 16, 32, 48 and 64
  // elements); an AVX512_VNNI build scores int8 rows with head_dim a
  // multiple of 64 by vpdpbusd and widens their values 16 at a time; other
  // head dims take the 8-wide paths. The reference reads the cache's own
  // values back, with the query rounded where the kernel rounds it
  // (cpu::bf16_cache_rounds_query: to bf16; cpu::int8_cache_rounds_query: to
  // int8 per head, scale max|q| / 127, q * (127 / max|q|) to nearest even),
  // so only the kernel's fp32 arithmetic differs from it. GQA (4 query heads
  // on 2 kv heads), 300 keys: a decode step splits into two 256-key parts,
  // and every tile ends part-full somewhere.
  constexpr bool int8 = std::is_same_v<TestType, std::int8_t>;
  constexpr index_t n = 300, q_heads = 4, kv = 2;
  for (const index_t d : {8, 16, 24, 48, 64, 80, 128, 144, 192}) {
    for (const index_t t_len : {1, 5}) {
      INFO("head_dim " << d << ", " << t_len << " queries");
      const auto k = testing::random_floats(std::size_t(n * kv * d), 41, -0.5f, 0.5f);
      const auto v = testing::random_floats(std::size_t(n * kv * d), 42);
      const auto q = testing::random_floats(std::size_t(t_len * q_heads * d), 43, -0.5f, 0.5f);
      infer::kv_cache<infer::kv::paged<16, TestType>> cache(1, kv, d, n, n);
      const auto s = cache.open_sequence();
      cache.reserve(s, n);
      cache.write(0, s, 0, tensor_view<const float, 3>(k.data(), {n, kv, d}),
                  tensor_view<const float, 3>(v.data(), {n, kv, d}));
      std::vector<float> out(q.size());
      const float scale = 1.0f / std::sqrt(float(d));
      ops::cached_attention(cpu::par.with_threads(2), tensor_view<const float, 3>(q.data(), {t_len, q_heads, d}),
                            cache.view(0, s), tensor_view<float, 3>(out.data(), {t_len, q_heads, d}), n - t_len,
                            scale);
      const bool rounded = int8 ? cpu::int8_cache_rounds_query(d) : cpu::bf16_cache_rounds_query(d);
      const auto as_kernel = [&](const float* qh, index_t e) {
        if (!rounded) return double(qh[e]);
        if constexpr (!int8) return double(float(bf16(qh[e])));
        float largest = 0.0f;  // recomputed per element: a test need not be fast
        for (index_t i = 0; i < d; ++i) largest = std::max(largest, std::fabs(qh[i]));
        return std::nearbyint(qh[e] * (127.0f / largest)) * double(largest / 127.0f);
      };
      // fp32 dots of at most 192 terms of size <= 0.25 (int8: exact integer
      // dots, then fp32 products with two scales) and averages of 300 values
      // in [-1, 1], with the kernel's exp approximation (relative error about
      // 1e-7): well under 1e-5.
      CHECK(worst_against_stored_values(cache, s, q, out, n, t_len, q_heads, kv, d, scale, as_kernel) < 1e-5);
      if constexpr (int8) {
        // Against the unrounded query: each element moves by at most
        // max|q| / 254 <= 0.002, so a score by at most scale * d * 0.002 * 0.5
        // (0.008 at d = 64, 0.014 at 192). The errors' signs are random,
        // which makes the typical shift about sqrt(d) times smaller, and the
        // outputs (averages of values in [-1, 1]) moved by under 1e-4 here.
        // 1e-3 leaves a 10x margin; a wrong sign or scale moves them by 0.1
        // or more.
        const auto unrounded = [](const float* qh, index_t e) { return double(qh[e]); };
        CHECK(worst_against_stored_values(cache, s, q, out, n, t_len, q_heads, kv, d, scale, unrounded) < 1e-3);
      }
    }
  }
}

TEMPLATE_TEST_CASE("a prefill query gets the bits it gets alone, whatever cache element type", "[infer][kv_cache][attention]",
                   float, bf16, std::int8_t) {
  // A prefill chunk's queries run in blocks of up to 8 that walk the cache's
  // 64-key tiles together, each query with the same tiles and operations as
  // a single query; 151 keys keep the single query in one decode part, so no
  // tolerance. 30 queries at positions 121-150: on 2 threads blocks of 8, 8,
  // 8 and 6, the first straddling the tile edge at 128 (its last query
  // reaches into the tile [128, 192), the other seven end at or before its
  // edge and skip it); on 1 thread the same. (Scoring blocks of 4 queries
  // per pass over the keys, widened to fp32 once per block, was tried, and
  // so was packing each tile's rows to fp32 once per block of 8: same bits,
  // no faster on Zen 3.)
  const index_t n = 151, t_len = 30;
  const auto k = testing::random_floats(std::size_t(n * kv_heads * head_dim), 23, -2.0f, 2.0f);
  const auto v = testing::random_floats(std::size_t(n * kv_heads * head_dim), 24);
  const auto q = testing::random_floats(std::size_t(t_len * heads * head_dim), 25, -2.0f, 2.0f);
  infer::kv_cache<infer::kv::paged<16, TestType>> cache(n_layer, kv_heads, head_dim, 160, 160);
  const auto seq = cache.open_sequence();
  cache.reserve(seq, n);
  cache.write(1, seq, 0, tensor_view<const float, 3>(k.data(), {n, kv_heads, head_dim}),
              tensor_view<const float, 3>(v.data(), {n, kv_heads, head_dim}));
  cache.set_length(seq, n);
  for (int threads : {1, 2}) {
    std::vector<float> together(q.size()), alone(q.size());
    ops::cached_attention(cpu::par.with_threads(threads), tensor_view<const float, 3>(q.data(), {t_len, heads, head_dim}),
                          cache.view(1, seq), tensor_view<float, 3>(together.data(), {t_len, heads, head_dim}),
                          n - t_len, 0.25f);
    for (index_t t = 0; t < t_len; ++t)
      ops::cached_attention(cpu::par.with_threads(threads),
                            tensor_view<const float, 3>(q.data() + t * heads * head_dim, {1, heads, head_dim}),
                            cache.view(1, seq),
                            tensor_view<float, 3>(alone.data() + t * heads * head_dim, {1, heads, head_dim}),
                            n - t_len + t, 0.25f);
    INFO("threads " << threads);
    CHECK(together == alone);
  }
  // The same queries as a view into wider rows (each head's d values, then d
  // unused ones) and writing into such a view: the same bits. (The kernel
  // reads head h at q + h * d, so a strided query is packed first; before
  // that, this case read the wrong values.)
  std::vector<float> wide_q(std::size_t(t_len * heads * 2 * head_dim), 1e30f);
  std::vector<float> wide_out(wide_q.size(), -1.0f);
  for (index_t t = 0; t < t_len; ++t)
    for (index_t h = 0; h < heads; ++h)
      for (index_t e = 0; e < head_dim; ++e)
        wide_q[std::size_t((t * heads + h) * 2 * head_dim + e)] = q[std::size_t((t * heads + h) * head_dim + e)];
  const std::array<index_t, 3> wide_strides{heads * 2 * head_dim, 2 * head_dim, 1};
  std::vector<float> packed_out(q.size());
  ops::cached_attention(cpu::par.with_threads(2), tensor_view<const float, 3>(q.data(), {t_len, heads, head_dim}),
                        cache.view(1, seq), tensor_view<float, 3>(packed_out.data(), {t_len, heads, head_dim}),
                        n - t_len, 0.25f);
  ops::cached_attention(cpu::par.with_threads(2),
                        tensor_view<const float, 3>(wide_q.data(), {t_len, heads, head_dim}, wide_strides),
                        cache.view(1, seq), tensor_view<float, 3>(wide_out.data(), {t_len, heads, head_dim}, wide_strides),
                        n - t_len, 0.25f);
  bool same = true;
  for (index_t t = 0; t < t_len; ++t)
    for (index_t h = 0; h < heads; ++h)
      for (index_t e = 0; e < head_dim; ++e)
        same = same && wide_out[std::size_t((t * heads + h) * 2 * head_dim + e)] ==
                           packed_out[std::size_t((t * heads + h) * head_dim + e)] &&
               wide_out[std::size_t((t * heads + h) * 2 * head_dim + head_dim + e)] == -1.0f;
  CHECK(same);
}

namespace {

/// Keys and values (n, kv, d) written into a fresh sequence of `cache` in
/// chunks of 7 positions (so writes cross blocks), then the last t_len
/// queries attended as one prefill chunk and the last one again as a decode
/// step: both outputs, concatenated.
template <class Policy>
std::vector<float> attend_layout(infer::kv_cache<Policy>& cache, infer::sequence_id seq, const std::vector<float>& k,
                                 const std::vector<float>& v, const std::vector<float>& q, index_t n, index_t t_len,
                                 index_t kv, index_t h, index_t d) {
  cache.reserve(seq, n);
  for (index_t s = 0; s < n; s += 7) {
    const index_t m = std::min<index_t>(7, n - s);
    cache.write(0, seq, s, tensor_view<const float, 3>(k.data() + s * kv * d, {m, kv, d}),
                tensor_view<const float, 3>(v.data() + s * kv * d, {m, kv, d}));
  }
  cache.set_length(seq, n);
  std::vector<float> out(std::size_t((t_len + 1) * h * d));
  const auto par = cpu::par.with_threads(2);
  ops::cached_attention(par, tensor_view<const float, 3>(q.data(), {t_len, h, d}), cache.view(0, seq),
                        tensor_view<float, 3>(out.data(), {t_len, h, d}), n - t_len, 0.125f);
  ops::cached_attention(par, tensor_view<const float, 3>(q.data() + (t_len - 1) * h * d, {1, h, d}),
                        cache.view(0, seq), tensor_view<float, 3>(out.data() + t_len * h * d, {1, h, d}), n - 1,
                        0.125f);
  cache.close_sequence(seq);
  return out;
}

/// The same in a fresh sequence.
template <class Policy>
std::vector<float> attend_layout(infer::kv_cache<Policy>& cache, const std::vector<float>& k,
                                 const std::vector<float>& v, const std::vector<float>& q, index_t n, index_t t_len,
                                 index_t kv, index_t h, index_t d) {
  return attend_layout(cache, cache.open_sequence(), k, v, q, n, t_len, kv, h, d);
}

}  // namespace

TEST_CASE("an int8 cache reads each position's scale when a tile spans blocks out of order",
          "[infer][kv_cache][attention]") {
  // Blocks of 5 positions (not a multiple of 8, so a 64-key tile is one
  // segment across 13 blocks) and one kv head. The sequence gets blocks 0,
  // 2, 1, 3, ..., 12: the first tile's first and last scale indices are 63
  // apart, as if its 64 scales lay side by side, but positions 5-14 are in
  // swapped blocks. The kernel must take each position's own scale: the
  // contiguous cache's bits, prefill and decode.
  constexpr index_t kv = 1, h = 2, d = 64, n = 70, t_len = 3;
  const auto k = testing::random_floats(std::size_t(n * kv * d), 61, -2.0f, 2.0f);
  const auto v = testing::random_floats(std::size_t(n * kv * d), 62);
  const auto q = testing::random_floats(std::size_t(t_len * h * d), 63, -2.0f, 2.0f);
  infer::kv_cache<infer::kv::contiguous<std::int8_t>> contiguous(1, kv, d, n, 1);
  infer::kv_cache<infer::kv::paged<5, std::int8_t>> paged(1, kv, d, n, 100);
  const auto seq = paged.open_sequence();
  paged.reserve(seq, 5);   // block 0
  const auto other = paged.open_sequence();
  paged.reserve(other, 5);  // block 1
  paged.reserve(seq, 10);   // block 2
  paged.close_sequence(other);
  paged.reserve(seq, 15);   // block 1 again, then 3, 4, ... below
  CHECK(attend_layout(paged, seq, k, v, q, n, t_len, kv, h, d) == attend_layout(contiguous, k, v, q, n, t_len, kv, h, d));
}

TEMPLATE_TEST_CASE("cached attention gives the same bits for every block size and the contiguous layout",
                   "[infer][kv_cache][attention]", float, bf16, std::int8_t) {
  // Blocks lay out their positions head by head and the kernel reads each
  // block segment of a tile head by head: 5-position blocks (not a multiple
  // of the 8-key scoring groups: tiles stay whole), 24 (segments that do not
  // divide the 64-key tiles), 64 from a fragmented pool, and the contiguous
  // slot (64-position layout blocks, max_seq rounded up) must all give the
  // contiguous cache's bits, prefill and decode (300 keys: two decode parts).
  // d = 64 takes the vector paths (bf16 pairs, fp32 prefetch) of this build.
  constexpr index_t kv = 2, h = 4, d = 64, n = 300, t_len = 20;
  const auto k = testing::random_floats(std::size_t(n * kv * d), 41, -2.0f, 2.0f);
  const auto v = testing::random_floats(std::size_t(n * kv * d), 42);
  const auto q = testing::random_floats(std::size_t(t_len * h * d), 43, -2.0f, 2.0f);
  infer::kv_cache<infer::kv::contiguous<TestType>> contiguous(1, kv, d, n, 1);
  infer::kv_cache<infer::kv::paged<5, TestType>> paged5(1, kv, d, n, n);
  infer::kv_cache<infer::kv::paged<24, TestType>> paged24(1, kv, d, n, n);
  infer::kv_cache<infer::kv::paged<64, TestType>> paged64(1, kv, d, n, 3 * n);
  // A fragmented pool: the sequence gets blocks 0, 2, 3 (not one run).
  const auto first = paged64.open_sequence(), second = paged64.open_sequence();
  paged64.reserve(first, 64);
  paged64.reserve(second, 64);
  paged64.close_sequence(first);
  const auto expected = attend_layout(contiguous, k, v, q, n, t_len, kv, h, d);
  CHECK(attend_layout(paged5, k, v, q, n, t_len, kv, h, d) == expected);
  CHECK(attend_layout(paged24, k, v, q, n, t_len, kv, h, d) == expected);
  CHECK(attend_layout(paged64, k, v, q, n, t_len, kv, h, d) == expected);
  // The decode step's output is the prefill's last row up to the part merge
  // (fp32 rounding of the rescaled partial sums): 1e-5 relative to values in [-1, 1].
  for (index_t e = 0; e < h * d; ++e)
    CHECK(std::fabs(expected[std::size_t(t_len * h * d + e)] - expected[std::size_t((t_len - 1) * h * d + e)]) < 1e-5);
}
