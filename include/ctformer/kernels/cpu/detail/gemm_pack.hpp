// GEMM packing: copies blocks of A and B into the micro-panel layout the
// micro-kernels read, converting the element type on the way, and the
// per-thread scratch memory the packed blocks live in.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>
#include <type_traits>

#include "ctformer/core/number_types.hpp"
#include "ctformer/core/tensor_view.hpp"

namespace ctformer::cpu::detail {

/// Memory for packed panels, one per thread and per role (A or B), that grows
/// to the largest request and is then reused: GEMM allocates nothing per call
/// in steady state. 64-byte aligned so aligned vector loads never split a
/// cache line. OpenMP keeps its worker threads alive between parallel regions,
/// so the workers' scratch survives between calls too.
class gemm_scratch {
 public:
  gemm_scratch() = default;
  gemm_scratch(const gemm_scratch&) = delete;
  gemm_scratch& operator=(const gemm_scratch&) = delete;
  ~gemm_scratch() { std::free(data_); }

  /// At least `bytes` bytes, 64-byte aligned; contents are not preserved when it grows.
  void* get(std::size_t bytes) {
    if (bytes > capacity_) {
      std::free(data_);
      data_ = nullptr;
      capacity_ = 0;
      const std::size_t rounded = (bytes + 4095) / 4096 * 4096;  // whole pages: fewer regrowths, no split TLB entries
      data_ = std::aligned_alloc(4096, rounded);
      if (!data_) throw std::bad_alloc();
      capacity_ = rounded;
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  std::size_t capacity_ = 0;
};

inline gemm_scratch& gemm_scratch_for_a() {
  thread_local gemm_scratch scratch;
  return scratch;
}
inline gemm_scratch& gemm_scratch_for_b() {
  thread_local gemm_scratch scratch;
  return scratch;
}

/// Converts one input element to the packed type (fp32, or bf16 kept as is).
template <class Out, class In>
inline Out gemm_pack_convert(In x) {
  if constexpr (std::is_same_v<Out, In>)
    return x;
  else
    return static_cast<Out>(x);  // bf16 -> float: exact
}

/// Packs a block of `lanes` x `depth` values of a strided matrix into panels
/// of Panel lanes: element (lane, k) of the source sits at
/// src[lane * lane_stride + k * k_stride]. Panel number q holds lanes
/// [q*Panel, q*Panel + Panel) and is laid out as
///   dst[q * Panel * depth_padded + ((k / Group) * Panel + lane % Panel) * Group + k % Group],
/// i.e. for each group of Group consecutive k, Panel lanes of Group values.
/// Lanes past `lanes` and k past `depth` (up to depth_padded, the depth
/// rounded up to Group) are zero, so kernels compute full tiles and never
/// read garbage.
/// For A, lanes are rows (lane_stride = A's row stride, k_stride = its column
/// stride); for B, lanes are columns (lane_stride = B's column stride).
template <index_t Panel, index_t Group, class Out, class In>
void gemm_pack(Out* __restrict dst, const In* __restrict src, index_t lanes, index_t depth, index_t lane_stride,
               index_t k_stride) {
  const index_t depth_padded = (depth + Group - 1) / Group * Group;
  for (index_t first = 0; first < lanes; first += Panel) {
    const index_t width = lanes - first < Panel ? lanes - first : Panel;
    const In* panel_src = src + first * lane_stride;
    Out* panel = dst + (first / Panel) * Panel * depth_padded;
    if constexpr (Group == 1) {
      if (width == Panel && lane_stride == 1) {
        // Lanes are contiguous in memory (row-major B, column-major A): each k
        // is one straight copy of Panel values, which the compiler vectorises.
        for (index_t k = 0; k < depth; ++k) {
          const In* from = panel_src + k * k_stride;
          Out* to = panel + k * Panel;
          for (index_t lane = 0; lane < Panel; ++lane) to[lane] = gemm_pack_convert<Out>(from[lane]);
        }
        continue;
      }
      if (width == Panel && k_stride == 1) {
        // k is contiguous (row-major A, column-major B): read Panel rows in
        // step, in blocks of 8 k so that each source row is read a cache line
        // at a time and the writes stay sequential.
        index_t k = 0;
        for (; k + 8 <= depth; k += 8) {
          Out* to = panel + k * Panel;
          for (index_t lane = 0; lane < Panel; ++lane) {
            const In* from = panel_src + lane * lane_stride + k;
#pragma GCC unroll 8
            for (index_t kk = 0; kk < 8; ++kk) to[kk * Panel + lane] = gemm_pack_convert<Out>(from[kk]);
          }
        }
        for (; k < depth; ++k)
          for (index_t lane = 0; lane < Panel; ++lane)
            panel[k * Panel + lane] = gemm_pack_convert<Out>(panel_src[lane * lane_stride + k]);
        continue;
      }
    }
    // General strides, the ragged last panel, and grouped (bf16 pair) layouts.
    for (index_t k = 0; k < depth_padded; ++k) {
      Out* to = panel + ((k / Group) * Panel) * Group + k % Group;
      for (index_t lane = 0; lane < Panel; ++lane) {
        to[lane * Group] = (lane < width && k < depth)
                               ? gemm_pack_convert<Out>(panel_src[lane * lane_stride + k * k_stride])
                               : Out{};
      }
    }
  }
}

}  // namespace ctformer::cpu::detail
