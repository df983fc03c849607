// CUDA GEMM through cuBLASLt: c = alpha * a b + beta * c, fp32 inputs or bf16
// inputs, fp32 accumulation (CUBLAS_COMPUTE_32F, no TF32) and fp32 output;
// single and strided-batched.
//
// cuBLASLt is column-major. Each view is described as a column-major matrix
// plus an operation: a column-major view (stride(0) == 1) is used as is, a
// row-major one (stride(1) == 1) is its column-major transpose with op T. A
// row-major c is handled as c^T = b^T a^T, so no data ever moves. A view with
// unit stride in neither of its two dimensions throws shape_error.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "ctformer/core/number_types.hpp"
#include "ctformer/kernels/cuda/common.cuh"

namespace ctformer::cuda {

template <class T>
concept gemm_input = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

namespace detail {

template <class T>
inline constexpr cudaDataType_t cuda_data_type = CUDA_R_32F;
template <>
inline constexpr cudaDataType_t cuda_data_type<bf16> = CUDA_R_16BF;

/// A 2-D view as cuBLASLt sees it: a stored column-major rows x cols matrix
/// with leading dimension ld, and whether the view is its transpose.
struct column_major {
  std::uint64_t rows = 0, cols = 0;
  std::int64_t ld = 1;
  bool transposed = false;
};

/// Describes view v of shape (r, c), strides (s0, s1); false when neither
/// dimension has unit stride (size-1 dimensions count as unit stride).
template <class V>
bool describe(const V& v, column_major& out) {
  const index_t r = v.extent(0), c = v.extent(1), s0 = v.stride(0), s1 = v.stride(1);
  const index_t r1 = r < 1 ? 1 : r, c1 = c < 1 ? 1 : c;
  if ((s0 == 1 || r <= 1) && (c <= 1 || s1 >= r1)) {
    out = {std::uint64_t(r), std::uint64_t(c), c <= 1 ? r1 : s1, false};
    return true;
  }
  if ((s1 == 1 || c <= 1) && (r <= 1 || s0 >= c1)) {
    out = {std::uint64_t(c), std::uint64_t(r), r <= 1 ? c1 : s0, true};
    return true;
  }
  return false;
}

template <class V>
column_major describe_or_throw(const char* operation, const char* name, const V& v) {
  column_major d;
  if (!describe(v, d))
    throw shape_error(std::string("ctformer::") + operation + ": cuda::par needs " + name + " of shape " +
                      shape_string(v) + " to be row-major or column-major (unit stride in one of its last two "
                      "dimensions, the other at least that extent), got strides (" +
                      std::to_string(v.stride(0)) + ", " + std::to_string(v.stride(1)) + ")");
  return d;
}

/// The largest power of two (up to 256) dividing the address and, for
/// batches, the batch stride in bytes: the alignment cuBLASLt may assume.
inline std::uint32_t alignment_bytes(const void* p, index_t batch_stride_bytes, bool batched) {
  std::uint64_t bits = std::uint64_t(reinterpret_cast<std::uintptr_t>(p));
  if (batched) bits |= std::uint64_t(batch_stride_bytes < 0 ? -batch_stride_bytes : batch_stride_bytes);
  std::uint32_t alignment = 256;
  while (alignment > 1 && (bits & (alignment - 1)) != 0) alignment >>= 1;
  return alignment;
}

// RAII owners of the cuBLASLt descriptors of one call (host objects, cheap).
struct matmul_desc {
  cublasLtMatmulDesc_t get = nullptr;
  matmul_desc() { CTFORMER_CUBLAS_CHECK(cublasLtMatmulDescCreate(&get, CUBLAS_COMPUTE_32F, CUDA_R_32F)); }
  ~matmul_desc() { (void)cublasLtMatmulDescDestroy(get); }
  matmul_desc(const matmul_desc&) = delete;
  matmul_desc& operator=(const matmul_desc&) = delete;
};
struct matrix_layout {
  cublasLtMatrixLayout_t get = nullptr;
  matrix_layout(cudaDataType_t type, const column_major& d, index_t batch, index_t batch_stride) {
    CTFORMER_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&get, type, d.rows, d.cols, d.ld));
    if (batch > 1) {
      const std::int32_t count = std::int32_t(batch);
      const std::int64_t stride = batch_stride;
      CTFORMER_CUBLAS_CHECK(
          cublasLtMatrixLayoutSetAttribute(get, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count));
      CTFORMER_CUBLAS_CHECK(
          cublasLtMatrixLayoutSetAttribute(get, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride));
    }
  }
  ~matrix_layout() { (void)cublasLtMatrixLayoutDestroy(get); }
  matrix_layout(const matrix_layout&) = delete;
  matrix_layout& operator=(const matrix_layout&) = delete;
};
struct matmul_preference {
  cublasLtMatmulPreference_t get = nullptr;
  matmul_preference() { CTFORMER_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&get)); }
  ~matmul_preference() { (void)cublasLtMatmulPreferenceDestroy(get); }
  matmul_preference(const matmul_preference&) = delete;
  matmul_preference& operator=(const matmul_preference&) = delete;
  template <class V>
  void set(cublasLtMatmulPreferenceAttributes_t attribute, V value) {
    CTFORMER_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(get, attribute, &value, sizeof value));
  }
};

// c[b](i, j) = beta * c[b](i, j), or 0 when beta == 0 (the k == 0 case).
template <class T = float>
__global__ void scale_matrices_kernel(T* c, index_t batch, index_t rows, index_t cols, index_t s_batch, index_t s0,
                                      index_t s1, T beta) {
  const index_t total = batch * rows * cols;
  for (index_t k = index_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += index_t(gridDim.x) * blockDim.x) {
    const index_t b = k / (rows * cols), i = (k / cols) % rows, j = k % cols;
    T& x = c[b * s_batch + i * s0 + j * s1];
    x = beta == T(0) ? T(0) : beta * x;
  }
}

/// c[i] = alpha * a[i] b[i] + beta * c[i] for i < batch, the matrices i apart
/// by the given strides (in elements). a: (M, K), b: (K, N), c: (M, N).
template <gemm_input T>
void matmul(const par_t& exec, const char* operation, tensor_view<const T, 2> a, tensor_view<const T, 2> b,
            tensor_view<float, 2> c, float alpha, float beta, index_t batch, index_t stride_a, index_t stride_b,
            index_t stride_c) {
  const index_t m = c.extent(0), n = c.extent(1), k = a.extent(1);
  if (m == 0 || n == 0 || batch == 0) return;
  column_major dc = describe_or_throw(operation, "c", c);
  if (dc.transposed) {
    // Row-major c: compute c^T = b^T a^T, whose result is column-major.
    matmul<T>(exec, operation, b.transposed(), a.transposed(), c.transposed(), alpha, beta, batch, stride_b, stride_a,
              stride_c);
    return;
  }
  if (k == 0) {
    scale_matrices_kernel<float><<<elementwise_grid(batch * m * n), elementwise_block, 0, exec.stream>>>(
        c.data(), batch, m, n, stride_c, c.stride(0), c.stride(1), beta);
    CTFORMER_CUDA_CHECK_LAUNCH();
    return;
  }
  const column_major da = describe_or_throw(operation, "a", a);
  const column_major db = describe_or_throw(operation, "b", b);

  matmul_desc op;
  const cublasOperation_t trans_a = da.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t trans_b = db.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  CTFORMER_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op.get, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof trans_a));
  CTFORMER_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op.get, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof trans_b));
  matrix_layout la(cuda_data_type<T>, da, batch, stride_a);
  matrix_layout lb(cuda_data_type<T>, db, batch, stride_b);
  matrix_layout lc(CUDA_R_32F, dc, batch, stride_c);  // c and d: the same matrix, updated in place

  const bool batched = batch > 1;
  const workspace space = exec.blas_workspace();
  matmul_preference preference;
  preference.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, std::uint64_t(space.bytes));
  // cuBLASLt assumes 256-byte aligned pointers unless told otherwise: sub-views are not.
  preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                 alignment_bytes(a.data(), stride_a * index_t(sizeof(T)), batched));
  preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                 alignment_bytes(b.data(), stride_b * index_t(sizeof(T)), batched));
  const std::uint32_t align_c = alignment_bytes(c.data(), stride_c * index_t(sizeof(float)), batched);
  preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c);
  preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c);

  const cublasLtHandle_t handle = exec.blas_handle();
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  CTFORMER_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, op.get, la.get, lb.get, lc.get, lc.get, preference.get,
                                                       1, &heuristic, &found));
  if (found == 0)
    throw cuda_error(std::string("ctformer::") + operation + ": cuBLASLt has no algorithm for m=" + std::to_string(m) +
                     " n=" + std::to_string(n) + " k=" + std::to_string(k) + " batch=" + std::to_string(batch));
  CTFORMER_CUBLAS_CHECK(cublasLtMatmul(handle, op.get, &alpha, a.data(), la.get, b.data(), lb.get, &beta, c.data(),
                                       lc.get, c.data(), lc.get, &heuristic.algo, space.data, space.bytes,
                                       exec.stream));
}

}  // namespace detail

// a: (M, K), b: (K, N), c: (M, N). When beta == 0, c is not read.
template <gemm_input T>
void gemm_impl(const par_t& exec, tensor_view<const T, 2> a, tensor_view<const T, 2> b, tensor_view<float, 2> c,
               float alpha, float beta) {
  detail::matmul<T>(exec, "gemm", a, b, c, alpha, beta, 1, 0, 0, 0);
}

// a: (batch, M, K), b: (batch, K, N), c: (batch, M, N); batch strides are stride(0).
template <gemm_input T>
void gemm_batched_impl(const par_t& exec, tensor_view<const T, 3> a, tensor_view<const T, 3> b,
                       tensor_view<float, 3> c, float alpha, float beta) {
  const index_t batch = a.extent(0);
  if (batch == 0) return;
  detail::matmul<T>(exec, "gemm_batched", a[0], b[0], c[0], alpha, beta, batch, a.stride(0), b.stride(0),
                    c.stride(0));
}

}  // namespace ctformer::cuda
