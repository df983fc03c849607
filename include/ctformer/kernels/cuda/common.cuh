// Helpers every CUDA kernel family shares: launch sizes, launch checks, the
// shape checks the CPU kernels also make, stream-ordered scratch memory, and
// the device flag that reports an out-of-range index back to the host.
#pragma once

#include <climits>
#include <cstdint>
#include <string>

#include "ctformer/core/tensor_view.hpp"
#include "ctformer/exec/cuda.hpp"

namespace ctformer::cuda::detail {

/// Threads per block of the one-element-per-thread kernels.
inline constexpr int elementwise_block = 256;

/// Blocks for a grid-stride loop over n elements (capped: the loop covers the rest).
inline unsigned elementwise_grid(index_t n) {
  const index_t blocks = (n + elementwise_block - 1) / elementwise_block;
  return unsigned(blocks < 1 ? 1 : (blocks > 65536 ? 65536 : blocks));
}

/// Throws cuda_error if the launch just made failed (bad configuration, no
/// kernel image for this GPU). Errors inside the kernel surface at synchronize().
#define CTFORMER_CUDA_CHECK_LAUNCH() CTFORMER_CUDA_CHECK(cudaGetLastError())

template <class V>
void require_unit_inner_stride(const char* operation, const char* name, const V& v) {
  if (v.stride(V::rank - 1) != 1 && v.extent(V::rank - 1) > 1)
    throw shape_error(std::string("ctformer::") + operation + ": the last dimension of " + name + " of shape " +
                      shape_string(v) + " must have stride 1");
}

/// Stream-ordered scratch memory from ctformer's pool, freed (stream-ordered)
/// when it goes out of scope: kernels queued before that still see it.
template <class T>
class scratch {
 public:
  scratch(std::size_t n, cudaStream_t stream)
      : data_(static_cast<T*>(allocate_async(n * sizeof(T), stream))), stream_(stream) {}
  scratch(const scratch&) = delete;
  scratch& operator=(const scratch&) = delete;
  ~scratch() { free_async(data_, stream_); }
  T* data() const { return data_; }

 private:
  T* data_;
  cudaStream_t stream_;
};

/// Records the first (lowest) position at which a kernel met a bad index.
/// Device code calls report(position); the host calls first_bad(), which
/// waits for the stream (the one synchronisation an index check costs).
class bad_index_flag {
 public:
  static constexpr unsigned long long none = ULLONG_MAX;

  explicit bad_index_flag(cudaStream_t stream) : flag_(1, stream), stream_(stream) {
    CTFORMER_CUDA_CHECK(cudaMemsetAsync(flag_.data(), 0xff, sizeof(unsigned long long), stream));
  }
  unsigned long long* device() const { return flag_.data(); }

  /// The first bad position, or -1 when every index was in range. Synchronises the stream.
  index_t first_bad() const {
    unsigned long long host = none;
    CTFORMER_CUDA_CHECK(cudaMemcpyAsync(&host, flag_.data(), sizeof host, cudaMemcpyDeviceToHost, stream_));
    CTFORMER_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return host == none ? index_t(-1) : index_t(host);
  }

 private:
  scratch<unsigned long long> flag_;
  cudaStream_t stream_;
};

__device__ inline void report_bad_index(unsigned long long* flag, index_t position) {
  atomicMin(flag, static_cast<unsigned long long>(position));
}

/// Reads one int32 from device memory (error messages only; synchronises).
inline std::int32_t read_device_value(const std::int32_t* p, cudaStream_t stream) {
  std::int32_t host = 0;
  CTFORMER_CUDA_CHECK(cudaMemcpyAsync(&host, p, sizeof host, cudaMemcpyDeviceToHost, stream));
  CTFORMER_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

/// invalid_input for an index outside [0, limit), worded as the CPU kernels word it.
inline invalid_input bad_index_error(const char* operation, const char* what, std::int32_t value, index_t position,
                                     index_t limit) {
  return invalid_input(std::string("ctformer::") + operation + ": " + what + " " + std::to_string(value) +
                       " at position " + std::to_string(position) + " is outside the vocabulary [0, " +
                       std::to_string(limit) + ")");
}

/// Throws bad_index_error for ids[position], read from device memory.
[[noreturn]] inline void throw_bad_index(const char* operation, const char* what, tensor_view<const std::int32_t, 1> ids,
                                         index_t position, index_t limit, cudaStream_t stream) {
  throw bad_index_error(operation, what, read_device_value(ids.data() + position * ids.stride(0), stream), position,
                        limit);
}

}  // namespace ctformer::cuda::detail
