// The paged-cache writer's kernel (flash_gla.write_kvcache): plain CUDA, no architecture-specific
// instructions but FP8 conversion (sm_89+), no host synchronisation.
//
// Work is cut into vectors of kVec elements (16 bytes of the tokens' dtype when every address,
// stride and width allows; 8, 4 or 2 bytes otherwise, chosen on the host). Token t owns
// token_vecs vectors:
//
//   h_kv cache rows of row_vecs vectors each: the first kv_dim / kVec come from kv[t, j], the
//     rest (inline RoPE) from rope[t];
//   then, with a shared rope cache, rope_dim / kVec vectors of rope[t] -> rope_cache[slot, 0].
//
// One thread moves kUnroll vectors (all loads, then all stores, for more bytes in flight); the
// grid covers every vector once, sized from T on the host (nothing is read back). The flat index
// (token, vector) is 32-bit: the host launches once per chunk of tokens that fits (one launch
// below some 10^7 tokens). Neighbouring threads take neighbouring vectors of one row, so every
// row is one coalesced read and one coalesced write.
//
// The element op says how kVec new elements become kVec cache elements: ElementCopy moves raw
// bits (a cache of the tokens' own dtype); ElementQuantise writes an FP8 e4m3 cache and its
// scales (one per kScaleGroup values of a row), and walks the tokens differently, one scale
// group at a time: a group (kScaleGroup values of one KV head's row, rounded up to a power of
// two of vectors) is group_lanes neighbouring lanes of one warp, and each lane holds kLaneVecs of
// its vectors (lane i: vectors i, i + group_lanes, ...), so that every load and store
// instruction covers whole 32-byte sectors, the group's amax needs log2(group_lanes) shuffles
// (two for 128 values), and a lane's index arithmetic, scale and reciprocal are paid once per
// 32 values. A token is its h_kv * ceil(d / kScaleGroup) groups, then its RoPE key (copied as it
// is, in group-sized units) for the rope_cache (never inline in FP8); padding vectors of short
// groups load and store nothing.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cutlass/fast_math.h>

#include "cache/cache_elements.cuh"
#include "cache/run_cache_writer.h"
#include "common/cuda_check.h"

namespace flash_gla {

namespace {

using namespace cache;

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // copy: vectors per thread (measured: 1 and 4 are slower on an H200)

// The copy. Thread i of the grid takes vectors i and i + threads (threads = the grid's threads:
// every vector once), so every warp reads and writes 32 neighbouring vectors. A token's slot and
// its source vectors are loaded together (the source does not depend on the slot): one memory
// latency before the stores.
template <class Op>
__device__ __forceinline__ void copy_vectors(const CacheWriteParams& p, const VectorLayout& g) {
  using Src = typename Op::Src;
  using Elem = typename Op::SrcElem;
  const int threads = gridDim.x * kThreads;
  const int first = blockIdx.x * kThreads + threadIdx.x;
  Src values[kUnroll];
  int64_t slots[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int index = first + u * threads;
    slots[u] = -1;
    if (index < g.num_items) {
      const int token = index / g.token_vecs;
      const int r = index - token * g.token_vecs;
      const int64_t t = g.token_begin + token;
      const Elem* src;
      if (r < g.kv_region) {
        const int head = r / g.row_vecs;
        const int v = r - head * g.row_vecs;
        const int col = v * Op::kVec;
        src = v < g.kv_vecs ? kv_row<Elem>(p, t, head) + col : rope_row<Elem>(p, t) + (col - p.kv_dim);
      } else {
        src = rope_row<Elem>(p, t) + (r - g.kv_region) * Op::kVec;
      }
      slots[u] = p.slot_mapping[t * p.slot_stride];
      values[u] = *reinterpret_cast<const Src*>(src);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (!writable(p, slots[u])) { continue; }
    const int index = first + u * threads;
    const int r = index - index / g.token_vecs * g.token_vecs;
    if (r < g.kv_region) {
      const int head = r / g.row_vecs;
      const int v = r - head * g.row_vecs;
      *reinterpret_cast<typename Op::Dst*>(cache_row<typename Op::DstElem>(p, slots[u], head) + v * Op::kVec) =
          Op::convert(values[u]);
    } else {  // the RoPE key, stored once per token
      *reinterpret_cast<Src*>(rope_cache_row<Elem>(p, slots[u]) + (r - g.kv_region) * Op::kVec) = values[u];
    }
  }
}

// The FP8 write: one lane, kLaneVecs vectors of one scale group (or of the RoPE key), lane i of
// the group taking vectors i, i + group_lanes, ...: the group's lanes read (and write) whole
// sectors with every instruction. The slot and all the vectors are loaded before anything waits
// for them; every lane of the warp then joins its group's amax (no lane leaves before the
// shuffles), and the lanes of valid slots store.
template <class Op>
__device__ __forceinline__ void quantise_groups(const CacheWriteParams& p, const GroupLayout& g) {
  using Src = typename Op::Src;
  using Elem = typename Op::SrcElem;
  constexpr int kLaneVecs = Op::kLaneVecs;
  const uint32_t n = blockIdx.x * kThreads + threadIdx.x;  // the lane's index in the chunk
  int token, token_lane;
  g.token_lanes(token, token_lane, static_cast<int>(n));
  const int group_lanes = 1 << g.group_lane_bits;
  const int unit = token_lane >> g.group_lane_bits;
  const int lane = static_cast<int>(n) & (group_lanes - 1);
  const bool kv = unit < g.kv_groups;  // else a unit of the RoPE key
  int head, group;
  g.groups_per_row(head, group, unit);
  if (!kv) {
    head = 0;
    group = unit - g.kv_groups;
  }
  const int first = group * g.group_vecs + lane;  // the lane's vectors: first + k * group_lanes
  const int vecs = kv ? g.kv_vecs : g.rope_vecs;   // past them: padding
  const int64_t t = g.token_begin + token;
  const Elem* src = kv ? kv_row<Elem>(p, t, head) : rope_row<Elem>(p, t);
  const bool live = static_cast<int>(n) < g.num_items;
  int64_t slot = -1;
  Src values[kLaneVecs];
  if (live) { slot = p.slot_mapping[t * p.slot_stride]; }
#pragma unroll
  for (int k = 0; k < kLaneVecs; ++k) {
    const int v = first + k * group_lanes;
    values[k] = live && v < vecs ? *reinterpret_cast<const Src*>(src + v * Op::kVec) : Src{};
  }
  const float scale = group_scale<kScaleGroup / kLaneValues>(Op::abs_max_bits(values), group_lanes);
  if (!writable(p, slot)) { return; }
  if (kv) {
    auto* dst = cache_row<typename Op::DstElem>(p, slot, head);
    const float inv_scale = rcp_rn(scale);
#pragma unroll
    for (int k = 0; k < kLaneVecs; ++k) {
      const int v = first + k * group_lanes;
      if (v < vecs) { *reinterpret_cast<typename Op::Dst*>(dst + v * Op::kVec) = Op::convert(values[k], inv_scale); }
    }
    if (lane == 0) { scale_row(p, slot, head)[group * p.scale_group_stride] = scale; }
  } else {  // the RoPE key, stored once per token, in the tokens' dtype
    Elem* dst = rope_cache_row<Elem>(p, slot);
#pragma unroll
    for (int k = 0; k < kLaneVecs; ++k) {
      const int v = first + k * group_lanes;
      if (v < vecs) { *reinterpret_cast<Src*>(dst + v * Op::kVec) = values[k]; }
    }
  }
}

template <class Op>
__global__ void __launch_bounds__(kThreads)
    write_kvcache_kernel(const CacheWriteParams p, const typename Op::Layout g) {
  if constexpr (Op::kQuantised) {
    quantise_groups<Op>(p, g);
  } else {
    copy_vectors<Op>(p, g);
  }
}

// The widest vector (elements, a power of two up to kMaxVectorElems) that every address (in
// elements of its tensor), every stride of a dim longer than 1 and every segment width is a
// multiple of. kv_cache's elements are cache_elem_bytes wide, the other tensors' 2 bytes.
int vector_elems(const CacheWriteParams& p, int cache_elem_bytes) {
  uint64_t align = kMaxVectorElems;
  auto fold = [&](uint64_t elems) { align = std::gcd(align, elems); };
  auto fold_address = [&](const void* ptr, int elem_bytes) {
    const auto address = reinterpret_cast<uintptr_t>(ptr);
    fold(address % elem_bytes == 0 ? address / elem_bytes : 1);
  };
  auto fold_stride = [&](int64_t stride, bool dim_longer_than_1) {
    if (dim_longer_than_1) { fold(static_cast<uint64_t>(stride < 0 ? -stride : stride)); }
  };
  constexpr int kTokenBytes = 2;
  const bool many_tokens = p.num_tokens > 1, many_heads = p.num_heads > 1, many_pages = p.num_slots > kPageSize;
  fold_address(p.kv, kTokenBytes);
  fold_address(p.kv_cache, cache_elem_bytes);
  fold(static_cast<uint64_t>(p.kv_dim));
  fold_stride(p.kv_token_stride, many_tokens);
  fold_stride(p.kv_head_stride, many_heads);
  fold_stride(p.cache_block_stride, many_pages);
  fold_stride(p.cache_row_stride, true);
  fold_stride(p.cache_head_stride, many_heads);
  if (p.rope != nullptr) {
    fold_address(p.rope, kTokenBytes);
    fold(static_cast<uint64_t>(p.rope_dim));
    fold_stride(p.rope_token_stride, many_tokens);
  }
  if (p.rope_cache != nullptr) {
    fold_address(p.rope_cache, kTokenBytes);
    fold_stride(p.rope_cache_block_stride, many_pages);
    fold_stride(p.rope_cache_row_stride, true);
  }
  return static_cast<int>(align & (~align + 1));  // lowest set bit: a power of two
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The copy's walk: a token is its h_kv rows (with inline RoPE) and its RoPE key (rope_cache).
template <class Op>
VectorLayout vector_layout(const CacheWriteParams& p) {
  const bool shared_rope = p.rope_cache != nullptr;
  VectorLayout g{};
  g.kv_vecs = p.kv_dim / Op::kVec;
  g.row_vecs = g.kv_vecs + (shared_rope ? 0 : p.rope_dim / Op::kVec);
  g.kv_region = p.num_heads * g.row_vecs;
  g.token_vecs = g.kv_region + (shared_rope ? p.rope_dim / Op::kVec : 0);
  return g;
}

// The FP8 walk: a group spans kScaleGroup / kVec vectors (a row shorter than one group: its
// vectors rounded up to a power of two), at least one lane's kLaneVecs; the RoPE key (never inline
// in FP8) is cut into units of the same span.
template <class Op>
GroupLayout group_layout(const CacheWriteParams& p) {
  GroupLayout g{};
  g.kv_vecs = p.kv_dim / Op::kVec;
  g.rope_vecs = p.rope_dim / Op::kVec;
  g.group_vecs = kScaleGroup / Op::kVec;
  if (p.kv_dim < kScaleGroup) {
    for (g.group_vecs = 1; g.group_vecs < g.kv_vecs; g.group_vecs *= 2) {}
  }
  g.group_vecs = std::max(g.group_vecs, Op::kLaneVecs);
  while ((Op::kLaneVecs << g.group_lane_bits) < g.group_vecs) { ++g.group_lane_bits; }
  const int groups_per_row = ceil_div(p.kv_dim, kScaleGroup);
  g.groups_per_row = cutlass::FastDivmod(groups_per_row);
  g.kv_groups = p.num_heads * groups_per_row;
  g.token_lanes = cutlass::FastDivmod((g.kv_groups + ceil_div(g.rope_vecs, g.group_vecs)) << g.group_lane_bits);
  return g;
}

// One launch per chunk of tokens whose work items (token_items a token, thread_items a thread:
// vectors or FP8 lanes) keep every index a thread forms an int (one launch below some 10^7
// tokens). The grid covers the chunk's items once, sized on the host (nothing is read back).
// (A grid of only the resident blocks looping over the items was slower for T >= 4096 on an
// H200.)
template <class Op>
void launch(const CacheWriteParams& p, cudaStream_t stream) {
  typename Op::Layout g;
  int64_t token_items, thread_items;
  if constexpr (Op::kQuantised) {
    g = group_layout<Op>(p);
    token_items = g.token_lanes.divisor;
    thread_items = 1;
  } else {
    g = vector_layout<Op>(p);
    token_items = g.token_vecs;
    thread_items = kUnroll;
  }
  const int64_t block_items = kThreads * thread_items;
  const int64_t max_tokens = (INT32_MAX - block_items) / token_items;
  for (int64_t begin = 0; begin < p.num_tokens; begin += max_tokens) {
    const int64_t tokens = std::min(max_tokens, p.num_tokens - begin);
    g.token_begin = begin;
    g.num_items = static_cast<int>(tokens * token_items);
    const auto blocks = static_cast<unsigned>((g.num_items + block_items - 1) / block_items);
    write_kvcache_kernel<Op><<<blocks, kThreads, 0, stream>>>(p, g);
    check_launch("write_kvcache");
  }
}

// bf16 / fp16 tokens into a cache of the same type: a copy of 16-bit elements, kVec at a time.
void launch_copy_16bit(const CacheWriteParams& p, cudaStream_t stream) {
  switch (vector_elems(p, sizeof(uint16_t))) {
    case 8: return launch<ElementCopy<uint16_t, 8>>(p, stream);
    case 4: return launch<ElementCopy<uint16_t, 4>>(p, stream);
    case 2: return launch<ElementCopy<uint16_t, 2>>(p, stream);
    default: return launch<ElementCopy<uint16_t, 1>>(p, stream);
  }
}

// Elem tokens into an FP8 cache: 8 values a lane (16-byte loads), or 4 where the rows are only
// 4-element aligned; fewer would spread a scale group over more than one warp.
template <class Elem>
void launch_quantise(const CacheWriteParams& p, cudaStream_t stream) {
  switch (vector_elems(p, sizeof(__nv_fp8_storage_t))) {
    case 8: return launch<ElementQuantise<Elem, 8>>(p, stream);
    case 4: return launch<ElementQuantise<Elem, 4>>(p, stream);
    default:
      throw std::invalid_argument(
          "flash_gla: write_kvcache: an FP8 cache needs every address, stride and width of kv, rope, kv_cache "
          "and rope_cache to be a multiple of 4 elements");
  }
}

}  // namespace

void run_write_kvcache(const CacheWriteParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0) { return; }
  if (params.cache == CacheElem::kE4M3) {
    switch (params.dtype) {
      case DType::kBF16: return launch_quantise<__nv_bfloat16>(params, stream);
      case DType::kFP16: return launch_quantise<__half>(params, stream);
    }
  } else {
    switch (params.dtype) {
      case DType::kBF16:
      case DType::kFP16: return launch_copy_16bit(params, stream);
    }
  }
  throw std::invalid_argument("flash_gla: write_kvcache: unsupported dtype");
}

}  // namespace flash_gla
