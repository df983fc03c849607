// CPU kernels for copy, fill, convert, add and add_scaled.
#pragma once

#include <cstring>
#include <type_traits>

#include "ctformer/core/number_types.hpp"
#include "ctformer/kernels/cpu/parallel.hpp"

namespace ctformer::cpu {

namespace detail {
// Elementwise loops run in chunks so each thread streams a contiguous range.
inline constexpr index_t elementwise_chunk = 1 << 14;

template <class Body>
void for_chunks(const par_t& exec, index_t n, Body&& body) {
  const index_t chunks = (n + elementwise_chunk - 1) / elementwise_chunk;
  parallel_for(exec, chunks, [&](index_t c) {
    const index_t begin = c * elementwise_chunk;
    const index_t end = begin + elementwise_chunk < n ? begin + elementwise_chunk : n;
    body(begin, end);
  });
}
}  // namespace detail

template <class T>
void copy_impl(const par_t& exec, tensor_view<const T, 1> src, tensor_view<T, 1> dst) {
  if (src.stride(0) == 1 && dst.stride(0) == 1) {
    detail::for_chunks(exec, src.extent(0), [&](index_t b, index_t e) {
      std::memcpy(dst.data() + b, src.data() + b, std::size_t(e - b) * sizeof(T));
    });
  } else {
    for (index_t i = 0; i < src.extent(0); ++i) dst(i) = src(i);
  }
}

template <class T>
void fill_impl(const par_t& exec, tensor_view<T, 1> dst, T value) {
  detail::for_chunks(exec, dst.extent(0), [&](index_t b, index_t e) {
    for (index_t i = b; i < e; ++i) dst(i) = value;
  });
}

template <number_type From, number_type To>
void convert_impl(const par_t& exec, tensor_view<const From, 1> src, tensor_view<To, 1> dst) {
  detail::for_chunks(exec, src.extent(0), [&](index_t b, index_t e) {
    const From* s = src.data();
    To* d = dst.data();
    const index_t ss = src.stride(0), ds = dst.stride(0);
#pragma omp simd
    for (index_t i = b; i < e; ++i) d[i * ds] = number_cast<To>(s[i * ss]);
  });
}

inline void add_impl(const par_t& exec, tensor_view<const float, 1> a, tensor_view<const float, 1> b,
                     tensor_view<float, 1> out) {
  detail::for_chunks(exec, a.extent(0), [&](index_t lo, index_t hi) {
    const float* pa = a.data();
    const float* pb = b.data();
    float* po = out.data();
    if (a.stride(0) == 1 && b.stride(0) == 1 && out.stride(0) == 1) {
#pragma omp simd
      for (index_t i = lo; i < hi; ++i) po[i] = pa[i] + pb[i];
    } else {
      for (index_t i = lo; i < hi; ++i) out(i) = a(i) + b(i);
    }
  });
}

inline void add_scaled_impl(const par_t& exec, float alpha, tensor_view<const float, 1> x, tensor_view<float, 1> y) {
  detail::for_chunks(exec, x.extent(0), [&](index_t lo, index_t hi) {
    if (x.stride(0) == 1 && y.stride(0) == 1) {
      const float* px = x.data();
      float* py = y.data();
#pragma omp simd
      for (index_t i = lo; i < hi; ++i) py[i] += alpha * px[i];
    } else {
      for (index_t i = lo; i < hi; ++i) y(i) += alpha * x(i);
    }
  });
}

}  // namespace ctformer::cpu
