// The paged-cache writer's kernel (flash_gla.write_kvcache): plain CUDA, no architecture-specific
// instructions, no host synchronisation.
//
// Work is cut into vectors of kVec elements (16 bytes when every address, stride and width
// allows; 8, 4 or 2 bytes otherwise, chosen on the host). Token t owns token_vecs vectors:
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
// The element op (ElementCopy below) says how kVec new elements become kVec cache elements:
// raw bits for a cache of the tokens' own dtype. An FP8 cache is another op of the same kernel
// (bf16/fp16 in, quantised by a scale out, Dst half the width of Src), chosen in
// run_write_kvcache by the cache's dtype.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <type_traits>

#include "cache_writer.h"
#include "common/cuda_check.h"

namespace flash_gla {

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // vectors per thread (measured: 1 and 4 are slower on an H200)
constexpr int kMaxVectorBytes = 16;

// An unsigned type of kBytes (16, 8, 4 or 2) bytes: the unit of one load or store.
template <int kBytes>
using Bits = std::conditional_t<
    kBytes == 16, uint4,
    std::conditional_t<kBytes == 8, uint2, std::conditional_t<kBytes == 4, uint32_t, uint16_t>>>;

// The copy: kVec elements of Elem, moved as raw bits (bf16 and fp16 alike: Elem is their
// 16-bit storage type).
template <class Elem, int kVecElems>
struct ElementCopy {
  static constexpr int kVec = kVecElems;
  using SrcElem = Elem;  // element of kv / rope
  using DstElem = Elem;  // element of the caches
  using Src = Bits<sizeof(SrcElem) * kVec>;
  using Dst = Bits<sizeof(DstElem) * kVec>;
  static_assert(sizeof(Src) == sizeof(SrcElem) * kVec && sizeof(Dst) == sizeof(DstElem) * kVec);
  __device__ __forceinline__ static Dst convert(const Src& v) { return v; }
};

// The vector layout of one launch (see the file comment), in vectors of the op's kVec.
struct VectorLayout {
  int64_t token_begin;  // first token of this launch's chunk
  int num_vectors;      // chunk tokens * token_vecs
  int token_vecs;       // vectors per token
  int row_vecs;         // vectors per kv_cache row
  int kv_vecs;          // of which from kv (the rest from rope: inline RoPE)
  int kv_region;        // h_kv * row_vecs: the vectors of a token before its rope_cache row
};

// Where vector `index` of the chunk comes from (src, which does not depend on the token's slot).
template <class Op>
__device__ __forceinline__ const typename Op::SrcElem* source(const CacheWriteParams& p, const VectorLayout& g,
                                                               int64_t token, int r) {
  using SrcElem = typename Op::SrcElem;
  if (r < g.kv_region) {
    const int head = r / g.row_vecs;
    const int v = r - head * g.row_vecs;
    const int col = v * Op::kVec;
    return v < g.kv_vecs
               ? static_cast<const SrcElem*>(p.kv) + token * p.kv_token_stride + head * p.kv_head_stride + col
               : static_cast<const SrcElem*>(p.rope) + token * p.rope_token_stride + (col - p.kv_dim);
  }
  return static_cast<const SrcElem*>(p.rope) + token * p.rope_token_stride + (r - g.kv_region) * Op::kVec;
}

// Where vector r of a token with slot `slot` (in range) goes.
template <class Op>
__device__ __forceinline__ typename Op::DstElem* destination(const CacheWriteParams& p, const VectorLayout& g,
                                                             int64_t slot, int r) {
  using DstElem = typename Op::DstElem;
  const int64_t page = slot / kPageSize, row = slot % kPageSize;
  if (r < g.kv_region) {
    const int head = r / g.row_vecs;
    const int col = (r - head * g.row_vecs) * Op::kVec;
    return static_cast<DstElem*>(p.kv_cache) + page * p.cache_block_stride + row * p.cache_row_stride +
           head * p.cache_head_stride + col;
  }
  return static_cast<DstElem*>(p.rope_cache) + page * p.rope_cache_block_stride + row * p.rope_cache_row_stride +
         (r - g.kv_region) * Op::kVec;
}

// Thread i of the grid takes vectors i and i + threads (threads = the grid's threads: every
// vector once), so every warp reads and writes 32 neighbouring vectors. A token's slot and its
// source vectors are loaded together (the source does not depend on the slot): one memory
// latency before the stores.
template <class Op>
__global__ void __launch_bounds__(kThreads) write_kvcache_kernel(const CacheWriteParams p, const VectorLayout g) {
  const int threads = gridDim.x * kThreads;
  const int first = blockIdx.x * kThreads + threadIdx.x;
  typename Op::Src values[kUnroll];
  int64_t slots[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int index = first + u * threads;
    slots[u] = -1;
    if (index < g.num_vectors) {
      const int token = index / g.token_vecs;
      const int64_t t = g.token_begin + token;
      slots[u] = p.slot_mapping[t * p.slot_stride];
      values[u] = *reinterpret_cast<const typename Op::Src*>(source<Op>(p, g, t, index - token * g.token_vecs));
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    // A padding token (negative slot) or an out-of-range slot is skipped.
    if (slots[u] >= 0 && slots[u] < p.num_slots) {
      const int index = first + u * threads;
      const int r = index - index / g.token_vecs * g.token_vecs;
      *reinterpret_cast<typename Op::Dst*>(destination<Op>(p, g, slots[u], r)) = Op::convert(values[u]);
    }
  }
}

// The widest access (bytes, a power of two up to kMaxVectorBytes) that every address, every
// stride of a dim longer than 1 and every segment width of the copy is a multiple of.
int vector_bytes(const CacheWriteParams& p, int elem_bytes) {
  uint64_t align = kMaxVectorBytes;
  auto fold = [&](uint64_t bytes) { align = std::gcd(align, bytes); };
  auto fold_stride = [&](int64_t stride, bool dim_longer_than_1) {
    if (dim_longer_than_1) { fold(static_cast<uint64_t>(stride < 0 ? -stride : stride) * elem_bytes); }
  };
  const bool many_tokens = p.num_tokens > 1, many_heads = p.num_heads > 1, many_pages = p.num_slots > kPageSize;
  fold(reinterpret_cast<uintptr_t>(p.kv));
  fold(reinterpret_cast<uintptr_t>(p.kv_cache));
  fold(static_cast<uint64_t>(p.kv_dim) * elem_bytes);
  fold_stride(p.kv_token_stride, many_tokens);
  fold_stride(p.kv_head_stride, many_heads);
  fold_stride(p.cache_block_stride, many_pages);
  fold_stride(p.cache_row_stride, true);
  fold_stride(p.cache_head_stride, many_heads);
  if (p.rope != nullptr) {
    fold(reinterpret_cast<uintptr_t>(p.rope));
    fold(static_cast<uint64_t>(p.rope_dim) * elem_bytes);
    fold_stride(p.rope_token_stride, many_tokens);
  }
  if (p.rope_cache != nullptr) {
    fold(reinterpret_cast<uintptr_t>(p.rope_cache));
    fold_stride(p.rope_cache_block_stride, many_pages);
    fold_stride(p.rope_cache_row_stride, true);
  }
  return static_cast<int>(align & (~align + 1));  // lowest set bit: a power of two
}

template <class Op>
void launch(const CacheWriteParams& p, cudaStream_t stream) {
  const bool shared_rope = p.rope_cache != nullptr;
  const int kv_vecs = p.kv_dim / Op::kVec;
  const int rope_vecs = p.rope_dim / Op::kVec;
  VectorLayout g{};
  g.kv_vecs = kv_vecs;
  g.row_vecs = kv_vecs + (shared_rope ? 0 : rope_vecs);
  g.kv_region = p.num_heads * g.row_vecs;
  g.token_vecs = g.kv_region + (shared_rope ? rope_vecs : 0);
  // Tokens per launch: every vector index a thread forms (< num_vectors + kThreads * kUnroll)
  // fits an int.
  constexpr int64_t kBlockVectors = kThreads * kUnroll;
  const int64_t max_tokens = (INT32_MAX - kBlockVectors) / g.token_vecs;
  for (int64_t begin = 0; begin < p.num_tokens; begin += max_tokens) {
    const int64_t tokens = std::min(max_tokens, p.num_tokens - begin);
    g.token_begin = begin;
    g.num_vectors = static_cast<int>(tokens * g.token_vecs);
    // One pass: kUnroll vectors per thread. (A grid of only the resident blocks looping over
    // the vectors was slower for T >= 4096 on an H200.)
    const auto blocks = static_cast<unsigned>((g.num_vectors + kBlockVectors - 1) / kBlockVectors);
    write_kvcache_kernel<Op><<<blocks, kThreads, 0, stream>>>(p, g);
    check_launch("write_kvcache");
  }
}

// bf16 / fp16 tokens into a cache of the same type: a copy of 16-bit elements, kVec at a time.
void launch_copy_16bit(const CacheWriteParams& p, cudaStream_t stream) {
  switch (vector_bytes(p, sizeof(uint16_t))) {
    case 16: return launch<ElementCopy<uint16_t, 8>>(p, stream);
    case 8: return launch<ElementCopy<uint16_t, 4>>(p, stream);
    case 4: return launch<ElementCopy<uint16_t, 2>>(p, stream);
    default: return launch<ElementCopy<uint16_t, 1>>(p, stream);
  }
}

}  // namespace

void run_write_kvcache(const CacheWriteParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0) { return; }
  switch (params.dtype) {
    case DType::kBF16:
    case DType::kFP16: return launch_copy_16bit(params, stream);
  }
  throw std::invalid_argument("flash_gla: write_kvcache: unsupported dtype");
}

}  // namespace flash_gla
