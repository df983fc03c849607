// The execution policy's own contract: buffers in its memory space, copies
// between host and policy memory (and within it), fill, convert, add, and the
// bad-index errors. Compiled by g++ this runs on cpu::par; compiled by nvcc
// (test_cuda_policy.cu) on cuda::par, plus the CUDA-only cases at the end:
// device_space, streams (par.on), the cuBLASLt handle cache and
// CTFORMER_CUDA_CHECK's messages.
#include <catch2/catch.hpp>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "../../support/test_support.hpp"
#include "ctformer/core/kv_view.hpp"
#include "ctformer/quant/interleaved_matrix.hpp"

using namespace ctformer;
using ctformer::testing::download;
using ctformer::testing::make_policy;
using ctformer::testing::random_floats;
using ctformer::testing::test_policies;
using ctformer::testing::upload;

TEMPLATE_LIST_TEST_CASE("copy round-trips host -> policy -> host exactly", "[ops][policy][copy]", test_policies) {
  const auto exec = make_policy<TestType>();
  for (std::size_t n : {std::size_t(1), std::size_t(7), std::size_t(1000), std::size_t(70001)}) {
    const std::vector<float> host = random_floats(n, 11);
    auto device = upload(exec, host);
    CHECK(device.size() == n);
    CHECK(download(exec, device) == host);
  }
}

TEMPLATE_LIST_TEST_CASE("copy within policy memory, contiguous and strided", "[ops][policy][copy]", test_policies) {
  const auto exec = make_policy<TestType>();
  const std::vector<float> host = random_floats(64, 12);
  auto src = upload(exec, host);
  buffer_for<float, TestType> dst(64);
  ops::copy(exec, src.view(64), dst.view(64));
  CHECK(download(exec, dst) == host);

  // Every other element into a contiguous buffer, and back into odd positions.
  buffer_for<float, TestType> half(32);
  ops::copy(exec, tensor_view<const float, 1>(src.data(), {32}, {2}), half.view(32));
  const std::vector<float> halves = download(exec, half);
  for (std::size_t i = 0; i < 32; ++i) CHECK(halves[i] == host[2 * i]);
  ops::copy(exec, tensor_view<const float, 1>(half.data(), {32}), tensor_view<float, 1>(dst.data() + 1, {32}, {2}));
  const std::vector<float> interleaved = download(exec, dst);
  for (std::size_t i = 0; i < 32; ++i) {
    CHECK(interleaved[2 * i] == host[2 * i]);
    CHECK(interleaved[2 * i + 1] == host[2 * i]);
  }
}

TEMPLATE_LIST_TEST_CASE("copy from policy memory into a strided host view", "[ops][policy][copy]", test_policies) {
  const auto exec = make_policy<TestType>();
  const std::vector<float> host = random_floats(10, 13);
  auto device = upload(exec, host);
  std::vector<float> spread(20, -1.0f);
  ops::copy(exec, tensor_view<const float, 1>(device.data(), {10}), tensor_view<float, 1>(spread.data(), {10}, {2}));
  exec.synchronize();
  for (std::size_t i = 0; i < 10; ++i) {
    CHECK(spread[2 * i] == host[i]);
    CHECK(spread[2 * i + 1] == -1.0f);
  }
}

TEMPLATE_LIST_TEST_CASE("fill sets every element, for every number type", "[ops][policy][fill]", test_policies) {
  const auto exec = make_policy<TestType>();
  buffer_for<float, TestType> f(1001);
  ops::fill(exec, f.view(1001), 3.5f);
  for (float x : download(exec, f)) REQUIRE(x == 3.5f);

  buffer_for<bf16, TestType> b(33);
  ops::fill(exec, b.view(33), bf16(-2.0f));
  for (bf16 x : download(exec, b)) REQUIRE(static_cast<float>(x) == -2.0f);

  buffer_for<std::int32_t, TestType> ids(5);
  ops::fill(exec, ids.view(5), std::int32_t(7));
  CHECK(download(exec, ids) == std::vector<std::int32_t>(5, 7));

  // Strided: every third element only.
  ops::fill(exec, f.view(1001), 0.0f);
  ops::fill(exec, tensor_view<float, 1>(f.data(), {334}, {3}), 1.0f);
  const std::vector<float> thirds = download(exec, f);
  for (std::size_t i = 0; i < thirds.size(); ++i) REQUIRE(thirds[i] == (i % 3 == 0 ? 1.0f : 0.0f));
}

template <class To, class P>
void check_convert_matches_host(const P& exec, const std::vector<float>& host) {
  const index_t n = index_t(host.size());
  auto src = upload(exec, host);
  buffer_for<To, P> narrow(host.size());
  buffer_for<float, P> wide(host.size());
  ops::convert(exec, src.view(n), narrow.view(n));
  ops::convert(exec, narrow.view(n), wide.view(n));
  const std::vector<To> narrow_host = download(exec, narrow);
  const std::vector<float> wide_host = download(exec, wide);
  for (std::size_t i = 0; i < host.size(); ++i) {
    const To expected = number_cast<To>(host[i]);
    REQUIRE(narrow_host[i].bits == expected.bits);
    REQUIRE(wide_host[i] == static_cast<float>(expected));
  }
}

TEMPLATE_LIST_TEST_CASE("convert rounds as the host conversions do", "[ops][policy][convert]", test_policies) {
  const auto exec = make_policy<TestType>();
  std::vector<float> values = random_floats(4096, 14, -600.0f, 600.0f);
  const std::vector<float> small = random_floats(1024, 15, -0.01f, 0.01f);  // subnormals of fp16 / fp8
  values.insert(values.end(), small.begin(), small.end());
  for (float special : {0.0f, -0.0f, 1.0f, 448.0f, 65504.0f, 1e-8f, 3.0e38f}) values.push_back(special);
  check_convert_matches_host<bf16>(exec, values);
  check_convert_matches_host<fp16>(exec, values);
  check_convert_matches_host<fp8_e4m3>(exec, values);
}

TEMPLATE_LIST_TEST_CASE("add and add_scaled", "[ops][policy][add]", test_policies) {
  const auto exec = make_policy<TestType>();
  const std::vector<float> a = random_floats(300, 16), b = random_floats(300, 17);
  auto da = upload(exec, a);
  auto db = upload(exec, b);
  buffer_for<float, TestType> out(300);
  ops::add(exec, da.view(300), db.view(300), out.view(300));
  ops::add_scaled(exec, 0.5f, da.view(300), out.view(300));  // out = 1.5 a + b
  const std::vector<float> result = download(exec, out);
  for (std::size_t i = 0; i < 300; ++i) REQUIRE(result[i] == Approx(1.5f * a[i] + b[i]).margin(1e-6));
}

TEMPLATE_LIST_TEST_CASE("a token outside the vocabulary throws invalid_input naming it", "[ops][policy][errors]",
                        test_policies) {
  const auto exec = make_policy<TestType>();
  auto table = upload(exec, random_floats(4 * 3, 18));
  auto tokens = upload(exec, std::vector<std::int32_t>{0, 3, 9, 1});
  buffer_for<float, TestType> out(4 * 3);
  CHECK_THROWS_AS(ops::embedding_forward(exec, tokens.view(4), table.view(4, 3), out.view(4, 3)), invalid_input);
  CHECK_THROWS_WITH(ops::embedding_forward(exec, tokens.view(4), table.view(4, 3), out.view(4, 3)),
                    Catch::Contains("token id 9 at position 2") && Catch::Contains("[0, 4)"));
  CHECK_THROWS_AS(ops::embedding_backward(exec, tokens.view(4), out.view(4, 3), table.view(4, 3)), invalid_input);

  auto targets = upload(exec, std::vector<std::int32_t>{-1, 2, 1, 5});
  buffer_for<float, TestType> losses(4);
  CHECK_THROWS_WITH(ops::softmax_cross_entropy_forward(exec, out.view(4, 3), targets.view(4), losses.view(4)),
                    Catch::Contains("target 5 at position 3"));

  // The policy is still usable after the error.
  auto good = upload(exec, std::vector<std::int32_t>{0, 3, 2, 1});
  ops::embedding_forward(exec, good.view(4), table.view(4, 3), out.view(4, 3));
  const std::vector<float> rows = download(exec, out), table_host = download(exec, table);
  for (int c = 0; c < 3; ++c) CHECK(rows[3 + c] == table_host[9 + c]);
}

#if defined(__CUDACC__)

TEST_CASE("device_space buffers live in device memory", "[cuda][policy][buffer]") {
  static_assert(!ctformer::cuda::device_space::host_accessible);
  static_assert(std::is_same_v<buffer_for<float, ctformer::cuda::par_t>::space, ctformer::cuda::device_space>);
  buffer_for<float, ctformer::cuda::par_t> b(1000);
  cudaPointerAttributes attributes{};
  CTFORMER_CUDA_CHECK(cudaPointerGetAttributes(&attributes, b.data()));
  CHECK(attributes.type == cudaMemoryTypeDevice);

  buffer_for<float, ctformer::cuda::par_t> moved(std::move(b));
  CHECK(b.data() == nullptr);
  CHECK(moved.size() == 1000);
  buffer_for<float, ctformer::cuda::par_t> empty(0);
  CHECK(empty.data() == nullptr);

  // Many allocations and frees in a row come from the pool; nothing leaks or faults.
  for (int i = 0; i < 100; ++i) buffer_for<float, ctformer::cuda::par_t> scratch(std::size_t(1) << 16);
  ctformer::cuda::par.synchronize();
}

TEST_CASE("par.on(stream) runs operations on that stream", "[cuda][policy][stream]") {
  cudaStream_t stream = nullptr;
  CTFORMER_CUDA_CHECK(cudaStreamCreate(&stream));
  {
    const auto exec = ctformer::cuda::par.on(stream);
    CHECK(exec.stream == stream);
    CHECK(ctformer::cuda::par.stream == nullptr);
    const std::vector<float> host = random_floats(5000, 19);
    auto device = upload(exec, host);
    buffer_for<float, ctformer::cuda::par_t> twice(5000);
    ops::add(exec, device.view(5000), device.view(5000), twice.view(5000));
    const std::vector<float> result = download(exec, twice);
    for (std::size_t i = 0; i < host.size(); ++i) REQUIRE(result[i] == 2.0f * host[i]);
    exec.synchronize();
  }
  CTFORMER_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST_CASE("the cuBLASLt handle and workspaces are cached", "[cuda][policy][cublas]") {
  cudaStream_t stream = nullptr;
  CTFORMER_CUDA_CHECK(cudaStreamCreate(&stream));
  const auto a = ctformer::cuda::par, b = ctformer::cuda::par.on(stream);
  CHECK(a.blas_handle() != nullptr);
  CHECK(a.blas_handle() == a.blas_handle());
  CHECK(a.blas_handle() == b.blas_handle());  // one handle per thread and device
  CHECK(a.blas_workspace().data == a.blas_workspace().data);
  CHECK(a.blas_workspace().data != b.blas_workspace().data);  // one workspace per stream
  CHECK(a.blas_workspace().bytes > 0);
  b.synchronize();
  CTFORMER_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST_CASE("CTFORMER_CUDA_CHECK throws cuda_error with file, line and CUDA's message", "[cuda][policy][errors]") {
  buffer_for<float, ctformer::cuda::par_t> device(4);
  float host[4] = {};
  const int line = __LINE__ + 2;
  const auto bad_copy = [&] {
    CTFORMER_CUDA_CHECK(cudaMemcpy(host, device.data(), sizeof host, static_cast<cudaMemcpyKind>(42)));
  };
  CHECK_THROWS_AS(bad_copy(), cuda_error);
  CHECK_THROWS_WITH(bad_copy(), Catch::Contains("test_cuda_policy.cpp:" + std::to_string(line)) &&
                                    Catch::Contains("cudaMemcpy(host, device.data()") &&
                                    Catch::Contains("cudaErrorInvalidMemcpyDirection"));
  CHECK(cudaGetLastError() == cudaSuccess);  // the error was cleared: later checks do not see it
  CHECK_THROWS_WITH(CTFORMER_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE), Catch::Contains("CUBLAS_STATUS_INVALID_VALUE"));
  ctformer::cuda::par.synchronize();  // the device is still healthy
}

// The quantized inference kernels are CPU-only so far: packed-weight GEMV
// and GEMM, in both matrix layouts, have no cuda::par hook, so the ops stop
// with their one-sentence static_assert. When one gains a CUDA kernel, this
// test fails and is to be replaced by the shared assertions. Attention over
// a KV cache has its CUDA kernel (tests/unit/infer/test_inference_cuda.cu
// checks it against the CPU's).
template <class W>
constexpr bool has_cuda_quantized_gemv = requires(const W& w, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  quantized_gemv_impl(ctformer::cuda::par, w, x, y);
};
template <class W>
constexpr bool has_cuda_quantized_gemm = requires(const W& w, tensor_view<const float, 2> x, tensor_view<float, 2> y) {
  quantized_gemm_impl(ctformer::cuda::par, w, x, y);
};
template <class E>
constexpr bool has_cuda_cached_attention =
    requires(tensor_view<const float, 3> q, std::span<const attention_segment<const E>> segments,
             tensor_view<float, 3> out) { cached_attention_impl(ctformer::cuda::par, q, segments, out, 1.0f); };
// The sampler's scan of a logits row runs on the host by design (the row is
// copied there to be sampled), so it has a CPU kernel only.
template <class T>
constexpr bool has_cuda_scan_logits = requires(tensor_view<const T, 1> x) { scan_logits_impl(ctformer::cuda::par, x); };
TEST_CASE("packed-weight GEMV / GEMM have no CUDA kernel yet; cached attention has", "[cuda][policy][cpu_only]") {
  STATIC_REQUIRE_FALSE(has_cuda_scan_logits<float>);
  STATIC_REQUIRE(requires(tensor_view<const float, 1> x) { scan_logits_impl(cpu::par, x); });
  STATIC_REQUIRE_FALSE(has_cuda_quantized_gemv<quant::packed_matrix<quant::q8_0>>);
  STATIC_REQUIRE_FALSE(has_cuda_quantized_gemv<quant::interleaved_matrix<quant::q4_0>>);
  STATIC_REQUIRE_FALSE(has_cuda_quantized_gemm<quant::packed_matrix<quant::q4_0>>);
  STATIC_REQUIRE_FALSE(has_cuda_quantized_gemm<quant::interleaved_matrix<quant::q8_0>>);
  STATIC_REQUIRE(has_cuda_cached_attention<float>);
  STATIC_REQUIRE(has_cuda_cached_attention<bf16>);
  STATIC_REQUIRE(has_cuda_cached_attention<std::int8_t>);
  // The same checks hold the CPU hooks to be there, so the test cannot pass by misspelling one.
  STATIC_REQUIRE(requires(const quant::interleaved_matrix<quant::q4_0>& w, tensor_view<const float, 1> x,
                          tensor_view<float, 1> y) { quantized_gemv_impl(cpu::par, w, x, y); });
  STATIC_REQUIRE(requires(tensor_view<const float, 3> q, std::span<const attention_segment<const bf16>> segments,
                          tensor_view<float, 3> out) { cached_attention_impl(cpu::par, q, segments, out, 1.0f); });
}

// The compile-time questions a caller asks of a policy (inference_model
// picks its weight layout and prefill GEMM from them) answer false on CUDA:
// bf16-weight prefill keeps widening to fp32 and q8_0 stays row-major there,
// until a CUDA hook says otherwise. The CPU hooks exist (so a misspelt hook
// name cannot make the answers false), and on the host the bf16 cache's
// query rounding follows the build's AVX512_BF16 flag, the int8 cache's its
// AVX512_VNNI flags (head dims that are a multiple of 64 only).
TEST_CASE("the compile-time kernel choices answer false on the CUDA policy", "[cuda][policy][cpu_only]") {
  STATIC_REQUIRE_FALSE(ops::gemm_bf16_native<ctformer::cuda::par_t>);
  STATIC_REQUIRE_FALSE(ops::interleave_q8_0<ctformer::cuda::par_t>);
  STATIC_REQUIRE(requires { cpu::gemm_bf16_native_impl(static_cast<const cpu::par_t*>(nullptr)); });
  STATIC_REQUIRE(requires { cpu::interleave_q8_0_impl(static_cast<const cpu::par_t*>(nullptr)); });
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  CHECK(cpu::bf16_cache_rounds_query(64));
#else
  CHECK_FALSE(cpu::bf16_cache_rounds_query(64));
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512F__)
  CHECK(cpu::int8_cache_rounds_query(64));
  CHECK_FALSE(cpu::int8_cache_rounds_query(48));
#else
  CHECK_FALSE(cpu::int8_cache_rounds_query(64));
#endif
}

#endif
