// cuda::par: the CUDA execution policy (one stream, cuBLASLt, a stream-ordered
// memory pool), its memory space, and the error-checking macros.
//
// Memory: cuda::device_space allocates from one stream-ordered pool per device
// (cudaMemPoolCreate, release threshold "keep everything"), with
// cudaMallocFromPoolAsync / cudaFreeAsync on the legacy default stream. A
// freed block goes back to the pool, not to the driver, so re-allocating the
// same sizes (a new activation arena, a scratch buffer) costs a pool lookup,
// not a cudaMalloc. The legacy default stream synchronises with every
// blocking stream (cudaStreamCreate with default flags), so a buffer freed
// while kernels on such a stream still use it is released only after they
// finish. With a cudaStreamNonBlocking stream the caller must synchronize
// that stream before a buffer it uses is destroyed. Our own pool, not the
// device's default pool, so a user's cudaMallocAsync settings are untouched.
//
// cuBLASLt: one handle per (host thread, device), created on first use; one
// GEMM workspace per (host thread, device, stream), so GEMMs on two streams
// never share scratch memory. Neither is created per call.
#pragma once

#if !defined(__CUDACC__)
#error "ctformer/exec/cuda.hpp needs nvcc: compile this translation unit as CUDA (a .cu file), or include ctformer/ctformer.hpp, which adds cuda::par only under nvcc"
#endif

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "ctformer/core/buffer.hpp"
#include "ctformer/core/error.hpp"
#include "ctformer/exec/execution_policy.hpp"

/// Throws ctformer::cuda_error naming file, line, the expression and CUDA's
/// error string unless `expr` (a cudaError_t) is cudaSuccess.
#define CTFORMER_CUDA_CHECK(expr) ::ctformer::cuda::detail::check_cuda((expr), #expr, __FILE__, __LINE__)
/// The same for a cublasStatus_t (cuBLAS and cuBLASLt calls).
#define CTFORMER_CUBLAS_CHECK(expr) ::ctformer::cuda::detail::check_cublas((expr), #expr, __FILE__, __LINE__)

namespace ctformer::cuda {

namespace detail {

inline void check_cuda(cudaError_t status, const char* expression, const char* file, int line) {
  if (status == cudaSuccess) return;
  // Clear the (non-sticky) error so the next cudaGetLastError() does not report it again.
  (void)cudaGetLastError();
  throw cuda_error(std::string(file) + ":" + std::to_string(line) + ": " + expression + " failed: " +
                   cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

inline void check_cublas(cublasStatus_t status, const char* expression, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  const char* name = "CUBLAS_STATUS_UNKNOWN";
  switch (status) {  // error path only: names for the message
    case CUBLAS_STATUS_NOT_INITIALIZED: name = "CUBLAS_STATUS_NOT_INITIALIZED"; break;
    case CUBLAS_STATUS_ALLOC_FAILED: name = "CUBLAS_STATUS_ALLOC_FAILED"; break;
    case CUBLAS_STATUS_INVALID_VALUE: name = "CUBLAS_STATUS_INVALID_VALUE"; break;
    case CUBLAS_STATUS_ARCH_MISMATCH: name = "CUBLAS_STATUS_ARCH_MISMATCH"; break;
    case CUBLAS_STATUS_MAPPING_ERROR: name = "CUBLAS_STATUS_MAPPING_ERROR"; break;
    case CUBLAS_STATUS_EXECUTION_FAILED: name = "CUBLAS_STATUS_EXECUTION_FAILED"; break;
    case CUBLAS_STATUS_INTERNAL_ERROR: name = "CUBLAS_STATUS_INTERNAL_ERROR"; break;
    case CUBLAS_STATUS_NOT_SUPPORTED: name = "CUBLAS_STATUS_NOT_SUPPORTED"; break;
    case CUBLAS_STATUS_LICENSE_ERROR: name = "CUBLAS_STATUS_LICENSE_ERROR"; break;
    default: break;
  }
  throw cuda_error(std::string(file) + ":" + std::to_string(line) + ": " + expression + " failed: " + name + " (" +
                   std::to_string(int(status)) + ")");
}

inline int current_device() {
  int device = 0;
  CTFORMER_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

/// The pool device_space allocates from on `device`: created once per device
/// (thread-safe), never destroyed (it must outlive every static buffer).
inline cudaMemPool_t memory_pool(int device) {
  static std::mutex mutex;
  static std::vector<cudaMemPool_t> pools;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= int(pools.size())) pools.resize(std::size_t(device) + 1, nullptr);
  if (!pools[device]) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    CTFORMER_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
    std::uint64_t keep_everything = UINT64_MAX;  // freed blocks stay in the pool across synchronisations
    CTFORMER_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_everything));
    pools[device] = pool;
  }
  return pools[device];
}

/// Stream-ordered allocation from ctformer's pool on the current device.
inline void* allocate_async(std::size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  CTFORMER_CUDA_CHECK(cudaMallocFromPoolAsync(&p, bytes, memory_pool(current_device()), stream));
  return p;
}

/// Stream-ordered free; never throws (it runs in destructors, possibly while
/// the CUDA runtime is shutting down at exit).
inline void free_async(void* p, cudaStream_t stream) noexcept {
  if (!p) return;
  if (cudaFreeAsync(p, stream) != cudaSuccess) (void)cudaGetLastError();
}

}  // namespace detail

/// Device memory from ctformer's stream-ordered pool (see the top of this file).
struct device_space {
  static constexpr bool host_accessible = false;
  static void* allocate(std::size_t bytes) { return detail::allocate_async(bytes, cudaStreamLegacy); }
  static void deallocate(void* p, std::size_t) noexcept { detail::free_async(p, cudaStreamLegacy); }
};
static_assert(memory_space<device_space>);

/// Scratch memory a cuBLASLt matmul may use.
struct workspace {
  void* data = nullptr;
  std::size_t bytes = 0;
};

namespace detail {

/// 32 MiB: what cuBLAS recommends for Hopper (more than enough for Ampere).
inline constexpr std::size_t gemm_workspace_bytes = std::size_t(32) << 20;

/// A host thread's cuBLASLt handle and per-stream workspaces on one device.
class blas_context {
 public:
  explicit blas_context(int device) : device_(device) { CTFORMER_CUBLAS_CHECK(cublasLtCreate(&handle_)); }
  blas_context(const blas_context&) = delete;
  blas_context& operator=(const blas_context&) = delete;
  ~blas_context() {
    // Thread exit or process exit: errors are ignored (the runtime may be gone).
    for (auto& [stream, space] : workspaces_)
      if (space.data && cudaFree(space.data) != cudaSuccess) (void)cudaGetLastError();
    if (handle_) (void)cublasLtDestroy(handle_);
  }

  int device() const { return device_; }
  cublasLtHandle_t handle() const { return handle_; }

  /// The workspace for GEMMs on `stream` (allocated with cudaMalloc, not from
  /// the stream-ordered pool, so it is valid on every stream at once).
  workspace workspace_for(cudaStream_t stream) {
    for (auto& [s, space] : workspaces_)
      if (s == stream) return space;
    workspace space{nullptr, gemm_workspace_bytes};
    CTFORMER_CUDA_CHECK(cudaMalloc(&space.data, space.bytes));
    workspaces_.emplace_back(stream, space);
    return space;
  }

 private:
  int device_;
  cublasLtHandle_t handle_ = nullptr;
  std::vector<std::pair<cudaStream_t, workspace>> workspaces_;
};

/// This thread's context for the current device, created on first use.
inline blas_context& blas_context_for_current_device() {
  thread_local std::vector<std::unique_ptr<blas_context>> contexts;
  const int device = current_device();
  if (device >= int(contexts.size())) contexts.resize(std::size_t(device) + 1);
  if (!contexts[device]) contexts[device] = std::make_unique<blas_context>(device);
  return *contexts[device];
}

}  // namespace detail

/// Runs operations on a CUDA device, in order on one stream. `cuda::par` uses
/// the default stream; `cuda::par.on(s)` uses stream s. Operations are
/// asynchronous with respect to the host: call synchronize() (or read results
/// back with ops::copy to host memory and then synchronize) before the host
/// looks at results. Kernels read and write device memory only (ops::copy
/// also accepts host memory on either side).
struct par_t {
  using memory_space = device_space;

  cudaStream_t stream = nullptr;  ///< nullptr: the default stream

  /// The same policy on another stream.
  constexpr par_t on(cudaStream_t s) const { return par_t{s}; }

  /// Waits for everything queued on the stream; throws cuda_error when a kernel failed.
  void synchronize() const { CTFORMER_CUDA_CHECK(cudaStreamSynchronize(stream)); }

  /// This host thread's cuBLASLt handle for the current device (created once, cached).
  cublasLtHandle_t blas_handle() const { return detail::blas_context_for_current_device().handle(); }

  /// The cuBLASLt workspace for this stream on the current device (created once, cached).
  workspace blas_workspace() const { return detail::blas_context_for_current_device().workspace_for(stream); }
};

inline constexpr par_t par{};

}  // namespace ctformer::cuda

static_assert(ctformer::execution_policy<ctformer::cuda::par_t>);
