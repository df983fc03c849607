// buffer<T, Space>: owning storage for n elements in a memory space. The host
// space lives here; device spaces come with their execution policy in exec/.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "ctformer/core/tensor_view.hpp"

namespace ctformer {

/// A memory space: allocates and frees raw bytes, and says whether the host
/// may dereference what it hands out.
template <class S>
concept memory_space = requires(std::size_t bytes, void* p) {
  { S::allocate(bytes) } -> std::same_as<void*>;
  S::deallocate(p, bytes);
  { S::host_accessible } -> std::convertible_to<bool>;
};

/// Host memory, 64-byte aligned so that AVX-512 loads of a row start never
/// split a cache line. Large buffers (weights, KV caches, activation arenas)
/// are aligned to 2 MiB and, on Linux, asked to be backed by transparent huge
/// pages: decode streams hundreds of MB per token, and with 4 KiB pages every
/// page is a TLB miss and a restart of the hardware prefetcher's stream
/// (which stops at page boundaries); bench_page_size measures the two
/// (figures in docs/performance.md). The advice is a hint: where huge pages are off (or in "never" mode), the buffer is the
/// same memory with 4 KiB pages. Smaller buffers are not padded to 2 MiB
/// (that would waste up to half their size); a model keeps its weight
/// matrices in one arena for this reason (infer::inference_model).
struct host_space {
  static constexpr bool host_accessible = true;
  static constexpr std::size_t alignment = 64;
  static constexpr std::size_t huge_page = std::size_t(2) << 20;
  /// Buffers from this size up get huge-page alignment and advice.
  static constexpr std::size_t huge_page_threshold = std::size_t(4) << 20;
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const bool huge = bytes >= huge_page_threshold;
    const std::size_t align = huge ? huge_page : alignment;
    const std::size_t rounded = (bytes + align - 1) / align * align;
    void* p = std::aligned_alloc(align, rounded);
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge) ::madvise(p, rounded, MADV_HUGEPAGE);  // a hint; failure leaves 4 KiB pages
#endif
    return p;
  }
  static void deallocate(void* p, std::size_t) { std::free(p); }
};

/// Owning, move-only array of n elements of T in memory space Space.
/// Elements are not initialised (host buffers of arithmetic types are zeroed
/// only when asked, by `zero()` or the value constructor).
/// @tparam T element type; trivially copyable
/// @tparam Space a memory_space (host_space, cuda::device_space)
template <class T, memory_space Space = host_space>
class buffer {
  static_assert(std::is_trivially_copyable_v<T>,
                "ctformer: buffer holds trivially copyable elements only (numbers, quantized blocks)");

 public:
  using value_type = T;
  using space = Space;

  buffer() = default;
  explicit buffer(std::size_t n) : data_(static_cast<T*>(Space::allocate(n * sizeof(T)))), size_(n) {}
  buffer(std::size_t n, const T& value)
    requires(Space::host_accessible)
      : buffer(n) {
    for (std::size_t i = 0; i < n; ++i) data_[i] = value;
  }
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;
  buffer(buffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  buffer& operator=(buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~buffer() { release(); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::size_t bytes() const { return size_ * sizeof(T); }
  bool empty() const { return size_ == 0; }

  T& operator[](std::size_t i)
    requires(Space::host_accessible)
  {
    return data_[i];
  }
  const T& operator[](std::size_t i) const
    requires(Space::host_accessible)
  {
    return data_[i];
  }
  T* begin()
    requires(Space::host_accessible)
  {
    return data_;
  }
  T* end()
    requires(Space::host_accessible)
  {
    return data_ + size_;
  }
  const T* begin() const
    requires(Space::host_accessible)
  {
    return data_;
  }
  const T* end() const
    requires(Space::host_accessible)
  {
    return data_ + size_;
  }

  /// Sets every byte to zero (host only; device buffers use ops::fill).
  void zero()
    requires(Space::host_accessible)
  {
    if (size_) std::memset(data_, 0, bytes());
  }

  /// A row-major view of the whole buffer with the given extents; throws
  /// shape_error when they do not multiply to size().
  template <class... E>
  tensor_view<T, int(sizeof...(E))> view(E... extents) {
    check_extents(index_t(extents)...);
    return tensor_view<T, int(sizeof...(E))>(data_, {index_t(extents)...});
  }
  template <class... E>
  tensor_view<const T, int(sizeof...(E))> view(E... extents) const {
    check_extents(index_t(extents)...);
    return tensor_view<const T, int(sizeof...(E))>(data_, {index_t(extents)...});
  }

 private:
  template <class... E>
  void check_extents(E... extents) const {
    const index_t n = (index_t(1) * ... * extents);
    if (n != index_t(size_)) throw shape_error("ctformer::buffer::view: extents multiply to " + std::to_string(n) +
                                               " but the buffer holds " + std::to_string(size_) + " elements");
  }
  void release() {
    if (data_) Space::deallocate(data_, size_ * sizeof(T));
    data_ = nullptr;
    size_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace ctformer
