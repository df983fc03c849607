// CUDA kernels for embedding lookup and its scatter-add backward.
//
// Token ids outside [0, V): the forward skips those rows and records the
// first bad position in a device flag; at the end of the call the host reads
// the flag, which synchronises the stream, and throws invalid_input naming
// the token and position as the CPU does (the other rows have been processed).
// The backward is deterministic, with no atomics: the host reads the token ids
// (one small copy; the call synchronises anyway to report a bad id, and it is
// the last operation of a backward pass), checks them all before touching
// dtable, and groups the positions by token in position order (a counting
// sort, as llm.c does for its encoder). The kernel then adds each token's rows
// in that order, which is the CPU's order too: the two give the same bits.
#pragma once

#include <cstdint>
#include <vector>

#include "ctformer/kernels/cuda/common.cuh"

namespace ctformer::cuda {

namespace detail {

inline constexpr int embedding_block = 256;

// out[n] = table[tokens[n]]: one block per token (grid-strided), threads over channels.
template <class T = float>
__global__ void embedding_forward_kernel(const std::int32_t* tokens, index_t st, const T* table, index_t stable,
                                         T* out, index_t so, index_t n, index_t v, index_t c,
                                         unsigned long long* bad) {
  for (index_t i = blockIdx.x; i < n; i += gridDim.x) {
    const std::int32_t token = tokens[i * st];
    if (token < 0 || token >= v) {
      if (threadIdx.x == 0) report_bad_index(bad, i);
      continue;
    }
    const T* src = table + index_t(token) * stable;
    T* dst = out + i * so;
    for (index_t j = threadIdx.x; j < c; j += blockDim.x) dst[j] = src[j];
  }
}

// dtable[token] += the dout rows of that token, in position order. Segment s
// is positions[starts[s]] .. positions[starts[s + 1] - 1], all of token
// segment_tokens[s]; blockIdx.y picks a chunk of embedding_block channels.
// Different segments write different rows, so no two threads share an element.
template <class T = float>
__global__ void embedding_backward_sorted_kernel(const std::int32_t* positions, const std::int32_t* starts,
                                                 const std::int32_t* segment_tokens, index_t segments, const T* dout,
                                                 index_t sd, T* dtable, index_t stable, index_t c) {
  const index_t j = index_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= c) return;
  for (index_t s = blockIdx.x; s < segments; s += gridDim.x) {
    T* dst = dtable + index_t(segment_tokens[s]) * stable + j;
    T sum = *dst;
    for (index_t k = starts[s]; k < starts[s + 1]; ++k) sum += dout[index_t(positions[k]) * sd + j];
    *dst = sum;
  }
}

/// The host side of the deterministic backward: token ids grouped by token,
/// positions ascending inside each group. Kept per thread and reused, so a
/// training loop allocates nothing once the largest batch has been seen.
struct token_groups {
  std::vector<std::int32_t> tokens;          // (N) the ids, read from the device
  std::vector<std::int32_t> group_of_token;  // (V) group index of a token, -1 when absent
  std::vector<std::int32_t> upload;          // positions (N), starts (G + 1), tokens of groups (G)
  std::vector<std::int32_t> counts;          // (G)
  std::vector<std::int32_t> group_tokens;    // (G) the token of each group
  index_t groups = 0;

  // Groups tokens[0, n) (all in [0, v)) by token, stable in position.
  void build(index_t n, index_t v) {
    if (index_t(group_of_token.size()) < v) group_of_token.assign(std::size_t(v), -1);
    counts.clear();
    group_tokens.clear();
    for (index_t i = 0; i < n; ++i) {
      std::int32_t& group = group_of_token[std::size_t(tokens[std::size_t(i)])];
      if (group < 0) {
        group = std::int32_t(counts.size());
        counts.push_back(0);
        group_tokens.push_back(tokens[std::size_t(i)]);
      }
      ++counts[std::size_t(group)];
    }
    groups = index_t(counts.size());
    upload.resize(std::size_t(n + 2 * groups + 1));
    std::int32_t* positions = upload.data();
    std::int32_t* starts = positions + n;
    std::int32_t* tokens_of_groups = starts + groups + 1;
    starts[0] = 0;
    for (index_t g = 0; g < groups; ++g) {
      starts[g + 1] = starts[g] + counts[std::size_t(g)];
      counts[std::size_t(g)] = starts[g];  // now the next free slot of group g
      tokens_of_groups[g] = group_tokens[std::size_t(g)];
    }
    for (index_t i = 0; i < n; ++i)
      positions[counts[std::size_t(group_of_token[std::size_t(tokens[std::size_t(i)])])]++] = std::int32_t(i);
    for (index_t g = 0; g < groups; ++g) group_of_token[std::size_t(tokens_of_groups[g])] = -1;
  }
};

inline unsigned rows_grid(index_t rows) { return unsigned(rows < 65536 ? rows : 65536); }

}  // namespace detail

// tokens: (N) int32; table: (V, C); out: (N, C)
inline void embedding_forward_impl(const par_t& exec, tensor_view<const std::int32_t, 1> tokens,
                                   tensor_view<const float, 2> table, tensor_view<float, 2> out) {
  detail::require_unit_inner_stride("embedding_forward", "table", table);
  detail::require_unit_inner_stride("embedding_forward", "out", out);
  const index_t n = tokens.extent(0), v = table.extent(0), c = table.extent(1);
  if (n == 0) return;
  detail::bad_index_flag bad(exec.stream);
  detail::embedding_forward_kernel<float><<<detail::rows_grid(n), detail::embedding_block, 0, exec.stream>>>(
      tokens.data(), tokens.stride(0), table.data(), table.stride(0), out.data(), out.stride(0), n, v, c,
      bad.device());
  CTFORMER_CUDA_CHECK_LAUNCH();
  if (const index_t position = bad.first_bad(); position >= 0)
    detail::throw_bad_index("embedding_forward", "token id", tokens, position, v, exec.stream);
}

// tokens: (N) int32; dout: (N, C); dtable: (V, C), accumulated (+=)
inline void embedding_backward_impl(const par_t& exec, tensor_view<const std::int32_t, 1> tokens,
                                    tensor_view<const float, 2> dout, tensor_view<float, 2> dtable) {
  detail::require_unit_inner_stride("embedding_backward", "dout", dout);
  detail::require_unit_inner_stride("embedding_backward", "dtable", dtable);
  const index_t n = tokens.extent(0), v = dtable.extent(0), c = dtable.extent(1);
  if (n == 0) return;
  thread_local detail::token_groups groups;
  groups.tokens.resize(std::size_t(n));
  CTFORMER_CUDA_CHECK(cudaMemcpy2DAsync(groups.tokens.data(), sizeof(std::int32_t), tokens.data(),
                                        std::size_t(tokens.stride(0)) * sizeof(std::int32_t), sizeof(std::int32_t),
                                        std::size_t(n), cudaMemcpyDeviceToHost, exec.stream));
  CTFORMER_CUDA_CHECK(cudaStreamSynchronize(exec.stream));
  for (index_t i = 0; i < n; ++i)
    if (const std::int32_t token = groups.tokens[std::size_t(i)]; token < 0 || token >= v)
      throw detail::bad_index_error("embedding_backward", "token id", token, i, v);
  if (c == 0) return;
  groups.build(n, v);
  // Pageable memory: cudaMemcpyAsync returns once the values are staged, so
  // the per-thread vectors may be reused by the next call at once.
  detail::scratch<std::int32_t> device_groups(groups.upload.size(), exec.stream);
  CTFORMER_CUDA_CHECK(cudaMemcpyAsync(device_groups.data(), groups.upload.data(),
                                      groups.upload.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice,
                                      exec.stream));
  const std::int32_t* positions = device_groups.data();
  const std::int32_t* starts = positions + n;
  const std::int32_t* tokens_of_groups = starts + groups.groups + 1;
  const dim3 grid(unsigned(groups.groups < 65535 ? groups.groups : 65535),
                  unsigned((c + detail::embedding_block - 1) / detail::embedding_block));
  detail::embedding_backward_sorted_kernel<float><<<grid, detail::embedding_block, 0, exec.stream>>>(
      positions, starts, tokens_of_groups, groups.groups, dout.data(), dout.stride(0), dtable.data(),
      dtable.stride(0), c);
  CTFORMER_CUDA_CHECK_LAUNCH();
}

}  // namespace ctformer::cuda
