// infer::kv_cache<Policy, Exec>: the keys and values of every layer for a set
// of sequences, under the policies kv::contiguous (a max_seq slot per
// sequence) and kv::paged<BlockTokens> (blocks from a shared pool, a block
// table per sequence), each with fp32, bf16 or int8 (per token, per kv head
// scale) elements, in the memory of an execution policy (cpu::par, cuda::par).
// A paged cache shares full blocks between sequences: forks share their
// parent's, and a prefix cache finds blocks by the tokens they hold.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "ctformer/core/buffer.hpp"
#include "ctformer/core/error.hpp"
#include "ctformer/core/kv_view.hpp"
#include "ctformer/core/number_types.hpp"
#include "ctformer/core/tensor_view.hpp"
#include "ctformer/exec/exec.hpp"
#include "ctformer/ops/ops.hpp"

namespace ctformer::infer {

namespace kv {

/// One slot of max_seq positions per sequence, a fixed number of slots: the
/// whole cache is allocated up front and a sequence's keys are contiguous.
/// @tparam Element float, bf16 or std::int8_t (int8: one fp32 scale per token per kv head)
template <class Element = float>
struct contiguous {
  using element_type = Element;
};

/// Blocks of BlockTokens positions from one pool shared by every sequence,
/// found through a per-sequence block table; a sequence takes blocks as it
/// grows and gives them back when it closes, so the memory in use follows
/// the live tokens rather than max_seq per sequence.
/// @tparam BlockTokens positions per block (> 0)
/// @tparam Element float, bf16 or std::int8_t
template <index_t BlockTokens, class Element = float>
struct paged {
  static_assert(BlockTokens > 0, "ctformer: kv::paged needs a positive block size");
  using element_type = Element;
  static constexpr index_t block_tokens = BlockTokens;
};

template <class P>
inline constexpr bool is_paged = false;
template <index_t B, class E>
inline constexpr bool is_paged<paged<B, E>> = true;
template <class P>
inline constexpr bool is_contiguous = false;
template <class E>
inline constexpr bool is_contiguous<contiguous<E>> = true;

}  // namespace kv

/// A KV-cache policy: kv::contiguous<E> or kv::paged<B, E> with E one of float, bf16, std::int8_t.
template <class P>
concept kv_policy =
    (kv::is_paged<P> || kv::is_contiguous<P>) &&
    (std::is_same_v<typename P::element_type, float> || std::is_same_v<typename P::element_type, bf16> ||
     std::is_same_v<typename P::element_type, std::int8_t>);

/// The handle of an open sequence in a cache.
using sequence_id = std::int32_t;

/// The cache cannot hold what was asked: its pool (or its sequence slots) is
/// used up, or a sequence would pass max_seq. A batching layer catches this to
/// preempt a sequence; a single generation reports it.
class cache_exhausted : public error {
 public:
  using error::error;
};

/// Keys and values of n_layer layers for the sequences open in it, in the
/// layout Policy picks. Not thread-safe: one caller opens, grows and closes
/// sequences (the kernels that read it run on many threads).
///
/// Storage: for each of k and v, [layer][block][kv head][token in block][head_dim]
/// elements: a block holds its positions head by head, so that a decode step
/// (every head over every position) reads it front to back, which the
/// hardware prefetchers follow; a position-major block would be read as one
/// 128-byte row per position stride, which the prefetchers follow poorly
/// (docs/performance.md has the measurement). A contiguous cache lays each sequence slot out the same way, in
/// blocks of 64 positions, so a slot holds max_seq rounded up to a multiple
/// of 64 positions: whole-slot head runs would make the per-tile reads jump
/// between heads, and 64 is the attention kernels' tile, so each tile of a
/// contiguous cache is one segment of one block.
/// Growing a sequence is reserve() (takes blocks) then write() of the new
/// positions' rows then set_length(); kernels read it through view().
///
/// Shared blocks (paged caches). A block is reference-counted: fork() hands
/// the child its parent's full blocks and copies only the partial last one
/// (which both then write), and no write may touch a block another sequence
/// holds. With every layer global, full blocks are also a prefix cache:
/// register_full_blocks() files a sequence's full blocks under a hash of
/// their tokens and of every token before them, and attach_cached_prefix()
/// gives a new sequence the longest run of filed blocks its tokens begin
/// with, so a repeated prompt skips that part of its prefill. A filed block
/// no sequence holds stays cached and counts as free: the pool takes never
/// used blocks first, then evicts cached ones, least recently released first.
///
/// On a device policy (cuda::par) the keys, values and scales live in device
/// memory and the bookkeeping (block lists, lengths, free lists, ring
/// tables) stays on the host; each sequence slot has a device copy of its
/// block table and ring table, uploaded on the policy's stream whenever
/// open_sequence or reserve changes them, so the views handed to kernels
/// point to device memory only. write() and fork() run on the policy
/// (ops::kv_cache_write, ops::kv_cache_copy), queued on its stream: run the
/// model on the same stream (inference_model::make_cache does).
/// @tparam Policy kv::contiguous<E> or kv::paged<BlockTokens, E>
/// @tparam Exec the execution policy whose memory holds the cache (cpu::par_t)
template <class Policy, execution_policy Exec = cpu::par_t>
class kv_cache {
  static_assert(kv_policy<Policy>,
                "ctformer: kv_cache takes kv::contiguous<E> or kv::paged<BlockTokens, E>, with E float, bf16 or "
                "std::int8_t");

 public:
  using policy = Policy;
  using exec_type = Exec;
  using element_type = typename Policy::element_type;
  static constexpr bool paged = kv::is_paged<Policy>;
  static constexpr bool quantized = std::is_same_v<element_type, std::int8_t>;
  /// Whether the storage is memory the host cannot read (a device's): then
  /// the block tables kernels read are device copies.
  static constexpr bool device_memory = !Exec::memory_space::host_accessible;

  /// @param capacity contiguous: the number of sequence slots; paged: the
  ///   positions in the pool (rounded up to whole blocks).
  /// @param layer_windows each layer's attention window (0: global; empty:
  ///   every layer global). A windowed layer keeps only its sequences' last
  ///   positions, in a ring of ring_positions() = the window rounded up to
  ///   whole blocks, so its memory is bounded by the window, not the context.
  ///   The windowed layers share one width.
  /// @param max_sequences paged caches with windowed layers: the most
  ///   sequences open at once, which sizes the rings' pool (0: as many as
  ///   the pool has blocks).
  /// @param exec the policy whose memory and stream the cache uses
  /// Throws invalid_input for a non-positive dimension or bad windows.
  kv_cache(index_t n_layer, index_t n_kv_head, index_t head_dim, index_t max_seq, index_t capacity,
           std::vector<index_t> layer_windows = {}, index_t max_sequences = 0, Exec exec = Exec{})
      : exec_(exec), n_layer_(n_layer), kv_heads_(n_kv_head), head_dim_(head_dim), max_seq_(max_seq) {
    if (n_layer <= 0 || n_kv_head <= 0 || head_dim <= 0 || max_seq <= 0 || capacity <= 0)
      throw invalid_input("ctformer::infer::kv_cache: n_layer (" + std::to_string(n_layer) + "), n_kv_head (" +
                          std::to_string(n_kv_head) + "), head_dim (" + std::to_string(head_dim) + "), max_seq (" +
                          std::to_string(max_seq) + ") and capacity (" + std::to_string(capacity) +
                          ") must all be positive");
    if constexpr (paged) {
      block_tokens_ = Policy::block_tokens;
      blocks_ = (capacity + block_tokens_ - 1) / block_tokens_;
      layout_tokens_ = block_tokens_;
      slot_layout_blocks_ = 1;
    } else {
      block_tokens_ = max_seq;
      blocks_ = capacity;
      layout_tokens_ = contiguous_layout_tokens;
      slot_layout_blocks_ = (max_seq + layout_tokens_ - 1) / layout_tokens_;
    }
    layout_elements_ = layout_tokens_ * kv_heads_ * head_dim_;
    layer_elements_ = blocks_ * slot_layout_blocks_ * layout_elements_;
    windows_ = layer_windows.empty() ? std::vector<index_t>(std::size_t(n_layer), 0) : std::move(layer_windows);
    if (index_t(windows_.size()) != n_layer)
      throw invalid_input("ctformer::infer::kv_cache: " + std::to_string(windows_.size()) +
                          " layer windows for " + std::to_string(n_layer) + " layers");
    for (index_t w : windows_) {
      if (w < 0 || (w > 0 && window_ > 0 && w != window_))
        throw invalid_input("ctformer::infer::kv_cache: layer windows must be 0 (global) or one positive width");
      if (w > 0) window_ = w;
    }
    // Global layers first, then the windowed layers' rings, in one buffer.
    ring_blocks_ = window_ > 0 ? (window_ + layout_tokens_ - 1) / layout_tokens_ : 0;
    if constexpr (paged)
      ring_pool_blocks_ = max_sequences > 0 ? std::min(blocks_, max_sequences * ring_blocks_) : blocks_;
    else
      ring_pool_blocks_ = blocks_ * ring_blocks_;
    index_t offset = 0;
    layer_offset_.resize(std::size_t(n_layer));
    for (index_t l = 0; l < n_layer; ++l)
      if (windows_[std::size_t(l)] == 0) {
        layer_offset_[std::size_t(l)] = offset;
        offset += layer_elements_;
        ++global_layers_;
      }
    for (index_t l = 0; l < n_layer; ++l)
      if (windows_[std::size_t(l)] > 0) {
        layer_offset_[std::size_t(l)] = offset;
        offset += ring_pool_blocks_ * layout_elements_;
      }
    k_ = buffer_for<element_type, Exec>(std::size_t(offset));
    v_ = buffer_for<element_type, Exec>(std::size_t(offset));
    if constexpr (quantized) {
      k_scale_ = zeroed_floats(offset / head_dim_);
      v_scale_ = zeroed_floats(offset / head_dim_);
    }
    table_entries_ = paged ? (max_seq + block_tokens_ - 1) / block_tokens_ : slot_layout_blocks_;
    ring_entries_ = window_ > 0 ? (max_seq + layout_tokens_ - 1) / layout_tokens_ : 0;
    // Taken from the back: block 0 goes first, which keeps small tests readable.
    free_blocks_.reserve(std::size_t(blocks_));
    for (index_t b = blocks_ - 1; b >= 0; --b) free_blocks_.push_back(std::int32_t(b));
    if constexpr (paged) {
      for (index_t b = ring_pool_blocks_ - 1; b >= 0; --b) free_ring_blocks_.push_back(std::int32_t(b));
      references_.assign(std::size_t(blocks_), 0);
      filed_.assign(std::size_t(blocks_), 0);
      block_key_.assign(std::size_t(blocks_), 0);
      cached_previous_.assign(std::size_t(blocks_), -1);
      cached_next_.assign(std::size_t(blocks_), -1);
      if (window_ == 0) filed_tokens_.assign(std::size_t(blocks_ * block_tokens_), 0);
    }
  }

  kv_cache(const kv_cache&) = delete;
  kv_cache& operator=(const kv_cache&) = delete;
  kv_cache(kv_cache&&) = default;
  kv_cache& operator=(kv_cache&&) = default;

  /// The policy (and, on CUDA, the stream) the cache's copies and writes run on.
  const Exec& exec() const { return exec_; }
  index_t n_layer() const { return n_layer_; }
  index_t n_kv_head() const { return kv_heads_; }
  index_t head_dim() const { return head_dim_; }
  index_t max_seq() const { return max_seq_; }
  /// Positions per block (max_seq for a contiguous cache).
  index_t block_tokens() const { return block_tokens_; }
  /// Blocks in the pool (sequence slots for a contiguous cache).
  index_t block_count() const { return blocks_; }
  /// Blocks a reservation can take: never used ones and cached ones (which
  /// hold a filed prefix no sequence holds, and are evicted when taken).
  index_t free_block_count() const { return index_t(free_blocks_.size()) + cached_count_; }
  /// Blocks no sequence holds that keep a filed prefix (part of free_block_count()).
  index_t cached_block_count() const { return cached_count_; }
  /// Sequences holding a block of the pool (0: free or cached; a paged cache).
  index_t block_references(std::int32_t block) const {
    if (block < 0 || block >= blocks_ || !paged)
      throw invalid_input("ctformer::infer::kv_cache::block_references: block " + std::to_string(block) +
                          " is not a block of this paged cache's pool");
    return references_[std::size_t(block)];
  }
  /// Whether full blocks can be found by their tokens: a paged cache whose
  /// layers are all global (a windowed layer's ring holds its sequence's
  /// latest positions, which no other sequence shares).
  bool prefix_caching() const { return paged && window_ == 0; }
  /// Positions the pool holds in all (contiguous: slots * max_seq).
  index_t pool_tokens() const { return blocks_ * block_tokens_; }

  /// Positions per layout block of a contiguous cache's slot.
  static constexpr index_t contiguous_layout_tokens = 64;

  /// Bytes the cache allocated (keys, values and int8 scales): fixed at
  /// construction. A contiguous slot holds max_seq rounded up to a multiple
  /// of contiguous_layout_tokens positions.
  std::size_t bytes() const { return k_.bytes() + v_.bytes() + k_scale_.bytes() + v_scale_.bytes(); }
  /// Bytes of one block across every layer (keys, values, scales).
  std::size_t bytes_per_block() const { return std::size_t(global_layers_) * block_bytes(slot_layout_blocks_); }
  /// Bytes held by open sequences: what the live tokens cost (whole blocks, rings included).
  std::size_t bytes_in_use() const {
    const index_t rings_used = paged ? ring_pool_blocks_ - index_t(free_ring_blocks_.size())
                                     : (blocks_ - free_block_count()) * ring_blocks_;
    return std::size_t(blocks_ - free_block_count()) * bytes_per_block() +
           std::size_t(rings_used) * std::size_t(n_layer_ - global_layers_) * block_bytes(1);
  }

  /// The windowed layers' width (0: every layer global).
  index_t window() const { return window_; }
  /// Layer l's window (0: global).
  index_t window_of(index_t layer) const { return windows_.at(std::size_t(layer)); }
  /// Positions a windowed layer's ring holds per sequence (0: no windowed layer).
  index_t ring_positions() const { return ring_blocks_ * layout_tokens_; }
  /// Blocks of the windowed layers' ring pool free (paged caches).
  index_t free_ring_block_count() const { return index_t(free_ring_blocks_.size()); }
  /// Positions of the sequence whose keys and values layer l still holds:
  /// its length, or for a windowed layer at most ring_positions().
  index_t positions_held(index_t layer, sequence_id id) const {
    const sequence& s = at(id, "positions_held");
    return windows_.at(std::size_t(layer)) > 0 ? std::min(s.length, ring_positions()) : s.length;
  }
  /// Ring blocks the sequence holds (its windowed layers' memory).
  index_t ring_blocks_held(sequence_id id) const { return index_t(at(id, "ring_blocks_held").ring.size()); }

  /// Opens an empty sequence. A contiguous cache gives it a slot now (throws
  /// cache_exhausted when every slot is taken); a paged one takes blocks as
  /// reserve() asks.
  sequence_id open_sequence() {
    sequence_id id;
    if (!free_ids_.empty()) {
      id = free_ids_.back();
      free_ids_.pop_back();
    } else {
      id = sequence_id(sequences_.size());
      sequences_.emplace_back();
      sequences_.back().blocks.reserve(std::size_t((max_seq_ + block_tokens_ - 1) / block_tokens_));
      // Once per slot, never per step: the slot keeps it when the sequence closes.
      if constexpr (device_memory)
        sequences_.back().device_table = buffer_for<std::int32_t, Exec>(std::size_t(table_entries_ + ring_entries_));
    }
    sequence& s = sequences_[std::size_t(id)];
    s.open = true;
    s.length = 0;
    s.blocks.clear();
    if constexpr (!paged) {
      if (free_blocks_.empty()) {
        s.open = false;
        free_ids_.push_back(id);
        throw cache_exhausted("ctformer::infer::kv_cache: cannot open a sequence: all " + std::to_string(blocks_) +
                              " sequence slots of the contiguous cache are in use");
      }
      s.blocks.push_back(free_blocks_.back());
      free_blocks_.pop_back();
      s.layout.resize(std::size_t(slot_layout_blocks_));
      for (index_t i = 0; i < slot_layout_blocks_; ++i)
        s.layout[std::size_t(i)] = std::int32_t(index_t(s.blocks[0]) * slot_layout_blocks_ + i);
      s.ring.clear();
      for (index_t i = 0; i < ring_blocks_; ++i) s.ring.push_back(std::int32_t(index_t(s.blocks[0]) * ring_blocks_ + i));
      build_ring_table(s);
      upload_tables(s);
    }
    s.reserved = paged ? 0 : max_seq_;
    ++open_count_;
    return id;
  }

  /// Closes a sequence and returns its blocks (or slot) to the pool.
  void close_sequence(sequence_id id) {
    sequence& s = at(id, "close_sequence");
    // Last block first: of a closed sequence's cached blocks, its tail
    // (the least likely to be shared) is evicted first.
    for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it) release_block(*it);
    s.blocks.clear();
    s.chain.clear();
    if constexpr (paged)
      for (auto it = s.ring.rbegin(); it != s.ring.rend(); ++it) free_ring_blocks_.push_back(*it);
    s.ring.clear();
    s.open = false;
    s.length = 0;
    free_ids_.push_back(id);
    --open_count_;
  }

  /// Opens a new sequence holding `from`'s committed positions [0,
  /// length(from)) in every layer: a paged cache shares the full blocks
  /// (reference-counted) and copies the partial last one and the windowed
  /// layers' rings; a contiguous cache copies the slot. Both then grow
  /// independently. Throws cache_exhausted, with nothing changed, when the
  /// pool (or the slots) cannot hold what is copied.
  sequence_id fork(sequence_id from) {
    const index_t length = at(from, "fork").length;
    const index_t shared = paged && global_layers_ > 0 ? length / block_tokens_ : 0;
    const index_t copied = paged ? blocks_needed_for(0, length) - shared : 1;
    if (copied > free_block_count())
      throw cache_exhausted("ctformer::infer::kv_cache::fork: sequence " + std::to_string(from) + " holds " +
                            std::to_string(length) + " positions; its copy needs " + std::to_string(copied) +
                            (paged ? " free blocks of " + std::to_string(block_tokens_) + " positions" : " free slot") +
                            ", and " + std::to_string(free_block_count()) + " are free");
    if (ring_blocks_needed_for(0, length) > free_ring_block_count() && paged)
      throw cache_exhausted("ctformer::infer::kv_cache::fork: the windowed layers' ring pool has too few free "
                            "blocks to copy sequence " + std::to_string(from));
    const sequence_id id = open_sequence();
    if constexpr (paged) {
      sequence& child = sequences_[std::size_t(id)];
      const sequence& parent = sequences_[std::size_t(from)];
      for (index_t i = 0; i < shared; ++i) {
        ++references_[std::size_t(parent.blocks[std::size_t(i)])];
        child.blocks.push_back(parent.blocks[std::size_t(i)]);
      }
      child.chain = parent.chain;  // the filed blocks are full, so all shared
      child.reserved = shared * block_tokens_;
      upload_tables(child);
    }
    reserve(id, length);
    for (index_t layer = 0; layer < n_layer_; ++layer) {
      // A ring holds only the last ring_positions() positions.
      const index_t first = windows_[std::size_t(layer)] > 0 ? std::max<index_t>(0, length - ring_positions())
                                                             : shared * block_tokens_;
      ops::kv_cache_copy(exec_, view_of(layer, sequences_[std::size_t(from)], false),
                         writable_view_of(layer, sequences_[std::size_t(id)]), first, length);
    }
    sequences_[std::size_t(id)].length = length;
    return id;
  }

  /// Gives the empty sequence `id` the longest run of filed full blocks its
  /// tokens begin with (found by the hash of each block's tokens and every
  /// token before it, then compared token by token), and commits that many
  /// positions: the caller computes from there. The last token is always
  /// left to compute, since its logits are what the caller needs next.
  /// Returns the positions attached (a multiple of block_tokens(); 0 where
  /// prefix_caching() is false). Throws invalid_input for a sequence that
  /// holds positions already.
  index_t attach_cached_prefix(sequence_id id, std::span<const std::int32_t> tokens) {
    sequence& s = at(id, "attach_cached_prefix");
    if (s.length != 0 || (paged && !s.blocks.empty()))
      throw invalid_input("ctformer::infer::kv_cache::attach_cached_prefix: sequence " + std::to_string(id) +
                          " holds positions already; a cached prefix goes to an empty sequence");
    if (!prefix_caching() || tokens.empty()) return 0;
    const index_t most = std::min<index_t>(index_t(tokens.size()) - 1, max_seq_) / block_tokens_;
    std::uint64_t key = 0;
    for (index_t i = 0; i < most; ++i) {
      const std::int32_t* block_tokens = tokens.data() + i * block_tokens_;
      key = chain_key(key, block_tokens);
      const auto found = prefix_index_.find(key);
      if (found == prefix_index_.end()) break;
      const std::int32_t b = found->second;
      const auto filed_at = filed_tokens_.begin() + std::ptrdiff_t(index_t(b) * block_tokens_);
      if (!std::equal(block_tokens, block_tokens + block_tokens_, filed_at)) break;  // a hash collision
      if (references_[std::size_t(b)]++ == 0) unlink_cached(b);
      s.blocks.push_back(b);
      s.chain.push_back(key);
    }
    const index_t attached = index_t(s.blocks.size()) * block_tokens_;
    s.reserved = s.length = attached;
    if (attached > 0) upload_tables(s);
    return attached;
  }

  /// Files the sequence's full blocks of committed positions in the prefix
  /// cache, so that later sequences beginning with the same tokens attach
  /// them. `tokens`: the sequence's tokens from position 0, at least
  /// length(id) of them. Blocks filed before are skipped (calling it after
  /// every step costs one hash per newly full block). A block whose tokens
  /// another block is filed under already stays unfiled: it is freed, not
  /// cached, when released. No-op where prefix_caching() is false. Throws
  /// invalid_input for too few tokens, or for tokens that differ from those
  /// a block it shares was filed under by another sequence.
  void register_full_blocks(sequence_id id, std::span<const std::int32_t> tokens) {
    sequence& s = at(id, "register_full_blocks");
    if (!prefix_caching()) return;
    if (index_t(tokens.size()) < s.length)
      throw invalid_input("ctformer::infer::kv_cache::register_full_blocks: " + std::to_string(tokens.size()) +
                          " tokens for sequence " + std::to_string(id) + " of " + std::to_string(s.length) +
                          " positions");
    for (index_t i = index_t(s.chain.size()); i < s.length / block_tokens_; ++i) {
      const std::int32_t* block_tokens = tokens.data() + i * block_tokens_;
      const std::uint64_t key = chain_key(s.chain.empty() ? 0 : s.chain.back(), block_tokens);
      const std::int32_t b = s.blocks[std::size_t(i)];
      if (filed_[std::size_t(b)] && block_key_[std::size_t(b)] != key)
        throw invalid_input("ctformer::infer::kv_cache::register_full_blocks: the tokens of block " +
                            std::to_string(i) + " of sequence " + std::to_string(id) +
                            " differ from those its cached keys and values were computed from");
      s.chain.push_back(key);
      if (filed_[std::size_t(b)] || prefix_index_.contains(key)) continue;
      prefix_index_.emplace(key, b);
      filed_[std::size_t(b)] = 1;
      block_key_[std::size_t(b)] = key;
      std::copy(block_tokens, block_tokens + block_tokens_,
                filed_tokens_.begin() + std::ptrdiff_t(index_t(b) * block_tokens_));
    }
  }

  /// Sequences open now.
  index_t open_sequences() const { return open_count_; }
  /// Whether id names an open sequence.
  bool is_open(sequence_id id) const {
    return id >= 0 && std::size_t(id) < sequences_.size() && sequences_[std::size_t(id)].open;
  }

  /// Blocks reserve(id, new_length) would take from the pool (0 when the
  /// sequence already has room, and always for a contiguous cache).
  index_t blocks_needed(sequence_id id, index_t new_length) const {
    return blocks_needed_for(index_t(at(id, "blocks_needed").blocks.size()), new_length);
  }
  /// Ring blocks reserve(id, new_length) would take from the windowed
  /// layers' pool (paged caches; 0 for a contiguous one).
  index_t ring_blocks_needed(sequence_id id, index_t new_length) const {
    return ring_blocks_needed_for(index_t(at(id, "ring_blocks_needed").ring.size()), new_length);
  }

  /// Gives back the blocks past the sequence's committed length (a paged
  /// cache; what a failed or abandoned reservation took).
  void release_unused(sequence_id id) {
    sequence& s = at(id, "release_unused");
    if constexpr (paged) {
      const index_t keep = (s.length + block_tokens_ - 1) / block_tokens_;
      while (index_t(s.blocks.size()) > keep) {
        release_block(s.blocks.back());
        s.blocks.pop_back();
      }
      while (index_t(s.ring.size()) > std::min(keep, ring_blocks_)) {
        free_ring_blocks_.push_back(s.ring.back());
        s.ring.pop_back();
      }
      s.reserved = std::max(s.length, std::min(s.reserved, keep * block_tokens_));
    }
  }

  /// Positions written and committed by set_length.
  index_t length(sequence_id id) const { return at(id, "length").length; }
  /// Positions the sequence can hold without taking more blocks.
  index_t reserved(sequence_id id) const { return at(id, "reserved").reserved; }
  /// The blocks the sequence holds, in logical order.
  const std::vector<std::int32_t>& block_table(sequence_id id) const { return at(id, "block_table").blocks; }

  /// Makes room for new_length positions (blocks are taken now, all or none).
  /// Throws cache_exhausted naming the sequence, the positions asked for and
  /// the pool when the pool has too few free blocks or new_length > max_seq.
  void reserve(sequence_id id, index_t new_length) {
    sequence& s = at(id, "reserve");
    if (new_length > max_seq_)
      throw cache_exhausted("ctformer::infer::kv_cache: sequence " + std::to_string(id) + " asks for " +
                            std::to_string(new_length) + " positions, more than the cache's max_seq of " +
                            std::to_string(max_seq_));
    if constexpr (paged) {
      const index_t needed = blocks_needed_for(index_t(s.blocks.size()), new_length);
      const index_t ring_needed = ring_blocks_needed_for(index_t(s.ring.size()), new_length);
      if (ring_needed > free_ring_block_count())
        throw cache_exhausted("ctformer::infer::kv_cache: sequence " + std::to_string(id) + " asks for " +
                              std::to_string(new_length) + " positions (" + std::to_string(ring_needed) +
                              " more ring blocks for its windowed layers), but the ring pool of " +
                              std::to_string(ring_pool_blocks_) + " blocks has only " +
                              std::to_string(free_ring_block_count()) + " free");
      if (needed > free_block_count())
        throw cache_exhausted("ctformer::infer::kv_cache: sequence " + std::to_string(id) + " asks for " +
                              std::to_string(new_length) + " positions (" + std::to_string(needed) +
                              " more blocks of " + std::to_string(block_tokens_) + "), but the pool of " +
                              std::to_string(pool_tokens()) + " positions (" + std::to_string(blocks_) +
                              " blocks) has only " + std::to_string(free_block_count()) + " blocks free");
      for (index_t i = 0; i < needed; ++i) s.blocks.push_back(take_block());
      for (index_t i = 0; i < ring_needed; ++i) {
        s.ring.push_back(free_ring_blocks_.back());
        free_ring_blocks_.pop_back();
      }
      if (ring_needed > 0) build_ring_table(s);
      if (needed > 0 || ring_needed > 0) upload_tables(s);
      s.reserved = std::max(s.reserved, global_layers_ > 0 ? index_t(s.blocks.size()) * block_tokens_ : new_length);
    }
  }

  /// Commits the sequence's length (positions [0, n) hold valid keys and values).
  void set_length(sequence_id id, index_t n) {
    sequence& s = at(id, "set_length");
    if (n < 0 || n > s.reserved)
      throw invalid_input("ctformer::infer::kv_cache::set_length: sequence " + std::to_string(id) +
                          " has room for " + std::to_string(s.reserved) + " positions, cannot set its length to " +
                          std::to_string(n));
    s.length = n;
  }

  /// Stores the keys and values of positions [start, start + T) of a sequence
  /// in one layer, converting to the cache's element type (int8: one scale
  /// max|row| / 127 per position per kv head, round to nearest), through
  /// ops::kv_cache_write on the cache's policy.
  /// k, v: (T, KV, D) in the policy's memory, unit stride in D. The positions must be reserved.
  void write(index_t layer, sequence_id id, index_t start, tensor_view<const float, 3> k,
             tensor_view<const float, 3> v) {
    sequence& s = at(id, "write");
    if (layer < 0 || layer >= n_layer_)
      throw invalid_input("ctformer::infer::kv_cache::write: layer " + std::to_string(layer) + " is outside [0, " +
                          std::to_string(n_layer_) + ")");
    require_same_shape("infer::kv_cache::write", "k", k, "v", v);
    if (k.extent(1) != kv_heads_ || k.extent(2) != head_dim_ || (head_dim_ > 1 && (k.stride(2) != 1 || v.stride(2) != 1)))
      throw shape_error("ctformer::infer::kv_cache::write: k has shape " + shape_string(k) + ", expected (T, " +
                        std::to_string(kv_heads_) + ", " + std::to_string(head_dim_) + ") with unit stride in D");
    const index_t room = s.reserved;
    if (start < 0 || start + k.extent(0) > room)
      throw invalid_input("ctformer::infer::kv_cache::write: positions [" + std::to_string(start) + ", " +
                          std::to_string(start + k.extent(0)) + ") of sequence " + std::to_string(id) +
                          " are not reserved (room for " + std::to_string(room) + ")");
    if (windows_[std::size_t(layer)] > 0 && k.extent(0) > ring_positions())
      throw invalid_input("ctformer::infer::kv_cache::write: " + std::to_string(k.extent(0)) +
                          " positions at once overrun windowed layer " + std::to_string(layer) + "'s ring of " +
                          std::to_string(ring_positions()));
    if (windows_[std::size_t(layer)] == 0) claim_for_writing(s, id, start, start + k.extent(0));
    ops::kv_cache_write(exec_, writable_view_of(layer, s), start, k, v);
  }

  /// The layout of one sequence in one layer, for the attention kernels:
  /// readable positions [0, reserved(id)); on a device policy every pointer
  /// in it (the block table too) is device memory. Throws invalid_input for
  /// a layer outside [0, n_layer) or a sequence that is not open.
  kv_view<const element_type> view(index_t layer, sequence_id id) const {
    const sequence& s = at(id, "view");
    if (layer < 0 || layer >= n_layer_)
      throw invalid_input("ctformer::infer::kv_cache::view: layer " + std::to_string(layer) + " is outside [0, " +
                          std::to_string(n_layer_) + ")");
    return view_of(layer, s, false);
  }

  /// Key (or value) element of (layer, sequence, position, kv head, d) as
  /// float, dequantized: for tests and debugging (on a device policy, one
  /// element copied to the host, the stream synchronised).
  float key(index_t layer, sequence_id id, index_t pos, index_t g, index_t d) const { return read(k_, k_scale_, layer, id, pos, g, d); }
  float value(index_t layer, sequence_id id, index_t pos, index_t g, index_t d) const { return read(v_, v_scale_, layer, id, pos, g, d); }

 private:
  struct sequence {
    bool open = false;
    index_t length = 0;
    index_t reserved = 0;                  // positions writable now
    std::vector<std::int32_t> blocks;      // physical block of each logical block (contiguous: the slot)
    std::vector<std::int32_t> layout;      // contiguous only: the slot's layout blocks, in order
    std::vector<std::int32_t> ring;        // the windowed layers' ring blocks, in order
    std::vector<std::int32_t> ring_table;  // logical block i -> ring[i % ring_blocks_]
    std::vector<std::uint64_t> chain;      // prefix-cache key of each leading full block registered or attached
    // Device policies: the table kernels read (blocks or layout), then the ring table.
    buffer_for<std::int32_t, Exec> device_table;
  };

  // A block for a reservation: a never used one, else the cached block
  // released longest ago (evicted: its filed prefix is forgotten).
  std::int32_t take_block() {
    std::int32_t b;
    if (!free_blocks_.empty()) {
      b = free_blocks_.back();
      free_blocks_.pop_back();
    } else {
      b = oldest_cached_;  // callers checked free_block_count()
      unlink_cached(b);
      unfile(b);
    }
    if constexpr (paged) references_[std::size_t(b)] = 1;
    return b;
  }
  // A sequence lets go of a block: the last holder frees it, or caches it
  // when it is filed.
  void release_block(std::int32_t b) {
    if constexpr (paged) {
      if (--references_[std::size_t(b)] > 0) return;
      if (filed_[std::size_t(b)]) {
        cached_previous_[std::size_t(b)] = newest_cached_;
        cached_next_[std::size_t(b)] = -1;
        (newest_cached_ >= 0 ? cached_next_[std::size_t(newest_cached_)] : oldest_cached_) = b;
        newest_cached_ = b;
        ++cached_count_;
        return;
      }
    }
    free_blocks_.push_back(b);
  }
  void unlink_cached(std::int32_t b) {
    const std::int32_t before = cached_previous_[std::size_t(b)], after = cached_next_[std::size_t(b)];
    (before >= 0 ? cached_next_[std::size_t(before)] : oldest_cached_) = after;
    (after >= 0 ? cached_previous_[std::size_t(after)] : newest_cached_) = before;
    --cached_count_;
  }
  void unfile(std::int32_t b) {
    if (!filed_[std::size_t(b)]) return;
    const auto found = prefix_index_.find(block_key_[std::size_t(b)]);
    if (found != prefix_index_.end() && found->second == b) prefix_index_.erase(found);
    filed_[std::size_t(b)] = 0;
  }
  // Positions [first, last) of s are about to be written: none may lie in a
  // block another sequence holds, and a filed block rewritten is unfiled.
  void claim_for_writing(sequence& s, sequence_id id, index_t first, index_t last) {
    if constexpr (paged) {
      if (last <= first) return;
      for (index_t i = first / block_tokens_; i <= (last - 1) / block_tokens_ && i < index_t(s.blocks.size()); ++i) {
        const std::int32_t b = s.blocks[std::size_t(i)];
        if (references_[std::size_t(b)] > 1)
          throw invalid_input("ctformer::infer::kv_cache::write: positions [" + std::to_string(first) + ", " +
                              std::to_string(last) + ") of sequence " + std::to_string(id) + " lie in block " +
                              std::to_string(i) + ", which " + std::to_string(references_[std::size_t(b)] - 1) +
                              " other sequence(s) share; shared positions are never rewritten");
        if (index_t(s.chain.size()) > i) s.chain.resize(std::size_t(i));
        unfile(b);
      }
    } else {
      (void)s, (void)id, (void)first, (void)last;
    }
  }
  // The prefix-cache key of a block of tokens after the block keyed `previous`
  // (0 for the first): a 64-bit mix of the previous key and every token.
  std::uint64_t chain_key(std::uint64_t previous, const std::int32_t* tokens) const {
    const auto mix = [](std::uint64_t x) {
      x ^= x >> 30;
      x *= 0xbf58476d1ce4e5b9ULL;
      x ^= x >> 27;
      x *= 0x94d049bb133111ebULL;
      return x ^ (x >> 31);
    };
    std::uint64_t key = mix(previous + 0x9e3779b97f4a7c15ULL);
    for (index_t i = 0; i < block_tokens_; ++i) key = mix(key ^ std::uint32_t(tokens[i]));
    return key;
  }

  buffer_for<float, Exec> zeroed_floats(index_t n) const {
    if constexpr (device_memory) {
      buffer_for<float, Exec> out{std::size_t(n)};
      ops::fill(exec_, tensor_view<float, 1>(out.data(), {n}), 0.0f);
      return out;
    } else {
      return buffer<float>(std::size_t(n), 0.0f);
    }
  }

  // Mirrors the sequence's host tables to its device copy (stream-ordered:
  // kernels queued before see the old table, kernels after the new one; from
  // pageable memory the copy returns once the host vectors are staged).
  void upload_tables(sequence& s) {
    if constexpr (device_memory) {
      const std::vector<std::int32_t>& table = paged ? s.blocks : s.layout;
      const index_t n = index_t(table.size());
      if (n > 0)
        ops::copy(exec_, tensor_view<const std::int32_t, 1>(table.data(), {n}),
                  tensor_view<std::int32_t, 1>(s.device_table.data(), {n}));
      const index_t r = index_t(s.ring_table.size());
      if (ring_entries_ > 0 && r > 0)
        ops::copy(exec_, tensor_view<const std::int32_t, 1>(s.ring_table.data(), {r}),
                  tensor_view<std::int32_t, 1>(s.device_table.data() + table_entries_, {r}));
    } else {
      (void)s;
    }
  }

  // Every logical block of the context maps onto the ring, cyclically.
  void build_ring_table(sequence& s) const {
    s.ring_table.assign(std::size_t((max_seq_ + layout_tokens_ - 1) / layout_tokens_), 0);
    if (s.ring.empty()) return;
    for (std::size_t i = 0; i < s.ring_table.size(); ++i)
      s.ring_table[i] = s.ring[(i % std::size_t(ring_blocks_)) % s.ring.size()];
  }

  index_t ring_blocks_needed_for(index_t held, index_t new_length) const {
    if constexpr (!paged) return 0;
    const index_t needed = std::min((new_length + layout_tokens_ - 1) / layout_tokens_, ring_blocks_) - held;
    return needed > 0 ? needed : 0;
  }

  // Bytes of `blocks` layout blocks in one layer (keys, values, int8 scales).
  std::size_t block_bytes(index_t blocks) const {
    const std::size_t elements = std::size_t(blocks * layout_elements_);
    return 2 * elements * sizeof(element_type) + (quantized ? 2 * elements / std::size_t(head_dim_) * sizeof(float) : 0);
  }

  index_t blocks_needed_for(index_t held, index_t new_length) const {
    if constexpr (!paged) return 0;
    if (global_layers_ == 0) return 0;  // only rings: the pool's blocks hold nothing
    const index_t needed = (new_length + block_tokens_ - 1) / block_tokens_ - held;
    return needed > 0 ? needed : 0;
  }

  // The layout of one sequence in one layer. host_tables: its block table is
  // the host's vector (for offsets the host computes itself), else the one
  // kernels read (the device copy on a device policy).
  kv_view<const element_type> view_of(index_t layer, const sequence& s, bool host_tables) const {
    kv_view<const element_type> out;
    const index_t offset = layer_offset_[std::size_t(layer)];
    out.k = k_.data() + offset;
    out.v = v_.data() + offset;
    if constexpr (quantized) {
      out.k_scale = k_scale_.data() + offset / head_dim_;
      out.v_scale = v_scale_.data() + offset / head_dim_;
    }
    describe(out, layer, s, host_tables || !device_memory);
    return out;
  }
  // The layout kernels write through (block table as view_of's for kernels).
  kv_view<element_type> writable_view_of(index_t layer, const sequence& s) {
    kv_view<element_type> out;
    const index_t offset = layer_offset_[std::size_t(layer)];
    out.k = k_.data() + offset;
    out.v = v_.data() + offset;
    if constexpr (quantized) {
      out.k_scale = k_scale_.data() + offset / head_dim_;
      out.v_scale = v_scale_.data() + offset / head_dim_;
    }
    describe(out, layer, s, !device_memory);
    return out;
  }
  // Everything of a layout but its element pointers.
  template <class View>
  void describe(View& out, index_t layer, const sequence& s, bool host_tables) const {
    const bool windowed = windows_[std::size_t(layer)] > 0;
    if (host_tables)
      out.block_table = windowed ? s.ring_table.data() : paged ? s.blocks.data() : s.layout.data();
    else
      out.block_table = s.device_table.data() + (windowed ? table_entries_ : 0);
    out.block_tokens = layout_tokens_;
    out.block_stride = layout_elements_;
    out.token_stride = head_dim_;
    out.head_stride = layout_tokens_ * head_dim_;
    out.kv_heads = kv_heads_;
    out.head_dim = head_dim_;
    out.capacity = windowed || !paged ? s.reserved : index_t(s.blocks.size()) * block_tokens_;
  }

  const sequence& at(sequence_id id, const char* what) const {
    if (id < 0 || std::size_t(id) >= sequences_.size() || !sequences_[std::size_t(id)].open)
      throw invalid_input(std::string("ctformer::infer::kv_cache::") + what + ": sequence " + std::to_string(id) +
                          " is not open");
    return sequences_[std::size_t(id)];
  }
  sequence& at(sequence_id id, const char* what) {
    return const_cast<sequence&>(static_cast<const kv_cache&>(*this).at(id, what));
  }

  float read(const buffer_for<element_type, Exec>& data, const buffer_for<float, Exec>& scales, index_t layer,
             sequence_id id, index_t pos, index_t g, index_t d) const {
    view(layer, id);  // checks the layer and the sequence
    const kv_view<const element_type> kv = view_of(layer, sequences_[std::size_t(id)], true);
    if (pos < 0 || pos >= kv.capacity) throw invalid_input("ctformer::infer::kv_cache: position out of range");
    if (g < 0 || g >= kv_heads_ || d < 0 || d >= head_dim_)
      throw invalid_input("ctformer::infer::kv_cache: kv head or channel out of range");
    const index_t offset = layer_offset_[std::size_t(layer)];
    const index_t at = offset + kv.offset(pos, g) + d, at_scale = offset / head_dim_ + kv.scale_offset(pos, g);
    element_type e{};
    float scale = 1.0f;
    if constexpr (device_memory) {
      ops::copy(exec_, tensor_view<const element_type, 1>(data.data() + at, {1}), tensor_view<element_type, 1>(&e, {1}));
      if constexpr (quantized)
        ops::copy(exec_, tensor_view<const float, 1>(scales.data() + at_scale, {1}), tensor_view<float, 1>(&scale, {1}));
      exec_.synchronize();
    } else {
      e = data[std::size_t(at)];
      if constexpr (quantized) scale = scales[std::size_t(at_scale)];
    }
    if constexpr (quantized)
      return float(e) * scale;
    else
      return float(e);
  }

  Exec exec_;
  index_t n_layer_, kv_heads_, head_dim_, max_seq_;
  index_t block_tokens_ = 0, blocks_ = 0, layer_elements_ = 0;
  // The blocks the storage is laid out in: the paged blocks themselves, or
  // slot_layout_blocks_ blocks of layout_tokens_ positions per contiguous slot.
  index_t layout_tokens_ = 0, slot_layout_blocks_ = 0, layout_elements_ = 0;
  // Windowed layers: their width, ring blocks per sequence, the rings' pool.
  std::vector<index_t> windows_, layer_offset_;  // per layer: window (0 global), first element in k_ / v_
  index_t window_ = 0, ring_blocks_ = 0, ring_pool_blocks_ = 0, global_layers_ = 0;
  // Entries of a sequence's device table: its blocks (or slot layout), then its ring table.
  index_t table_entries_ = 0, ring_entries_ = 0;
  buffer_for<element_type, Exec> k_, v_;
  buffer_for<float, Exec> k_scale_, v_scale_;  // int8 only
  std::vector<std::int32_t> free_blocks_, free_ring_blocks_;
  // Paged caches, per block: holders, whether filed in the prefix index and
  // under which key, its place in the list of cached blocks (oldest release
  // first), and the tokens it was filed with.
  std::vector<std::int32_t> references_;
  std::vector<std::uint8_t> filed_;
  std::vector<std::uint64_t> block_key_;
  std::vector<std::int32_t> cached_previous_, cached_next_, filed_tokens_;
  std::int32_t oldest_cached_ = -1, newest_cached_ = -1;
  index_t cached_count_ = 0;
  std::unordered_map<std::uint64_t, std::int32_t> prefix_index_;
  std::vector<sequence> sequences_;
  std::vector<sequence_id> free_ids_;
  index_t open_count_ = 0;
};

}  // namespace ctformer::infer
