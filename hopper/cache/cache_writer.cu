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

#include "cache/run_cache_writer.h"
#include "common/cuda_check.h"

namespace flash_gla {

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // copy: vectors per thread (measured: 1 and 4 are slower on an H200)
constexpr int kMaxVectorElems = 8;  // 16 bytes of bf16 / fp16
constexpr int kWarp = 32;
constexpr int kLaneValues = 32;  // FP8: values per lane (64 bytes of bf16 / fp16 loads in flight)

// An unsigned type of kBytes (16, 8, 4 or 2) bytes: the unit of one load or store.
template <int kBytes>
using Bits = std::conditional_t<
    kBytes == 16, uint4,
    std::conditional_t<kBytes == 8, uint2, std::conditional_t<kBytes == 4, uint32_t, uint16_t>>>;

// The copy's walk (see the file comment), in vectors of the op's kVec.
struct VectorLayout {
  int64_t token_begin;  // first token of this launch's chunk
  int num_items;        // vectors of the chunk: chunk tokens * token_vecs
  int token_vecs;       // vectors per token
  int row_vecs;         // vectors per kv_cache row
  int kv_vecs;          // of which from kv (the rest from rope: inline RoPE)
  int kv_region;        // h_kv * row_vecs: the vectors of a token before its rope_cache row
};

// The FP8 walk (see the file comment), in lanes: a token's lanes are its kv_groups scale groups
// (KV head by KV head) and then its RoPE key's units, group_lanes lanes each.
struct GroupLayout {
  int64_t token_begin;          // first token of this launch's chunk
  int num_items;                // lanes of the chunk: chunk tokens * token_lanes
  cutlass::FastDivmod token_lanes;     // lanes per token (a multiple of group_lanes)
  cutlass::FastDivmod groups_per_row;  // scale groups per kv_cache row: ceil(kv_dim / kScaleGroup)
  int kv_groups;                // h_kv * groups_per_row
  int group_vecs;               // vectors a group spans (its lanes * kLaneVecs; a power of two)
  int group_lane_bits;          // log2 of a group's lanes: 0, 1 or 2 (groups are aligned lanes of one warp)
  int kv_vecs;                  // vectors of a kv_cache row (past them: padding of its last group)
  int rope_vecs;                // vectors of a RoPE key
};

// The copy: kVec elements of Elem, moved as raw bits (bf16 and fp16 alike: Elem is their
// 16-bit storage type).
template <class Elem, int kVecElems>
struct ElementCopy {
  static constexpr bool kQuantised = false;
  static constexpr int kVec = kVecElems;
  using Layout = VectorLayout;
  using SrcElem = Elem;  // element of kv / rope (and rope_cache)
  using DstElem = Elem;  // element of kv_cache
  using Src = Bits<sizeof(SrcElem) * kVec>;
  using Dst = Bits<sizeof(DstElem) * kVec>;
  static_assert(sizeof(Src) == sizeof(SrcElem) * kVec && sizeof(Dst) == sizeof(DstElem) * kVec);
  __device__ __forceinline__ static Dst convert(const Src& v) { return v; }
};

// IEEE float32 division, reciprocal and product, rounded to nearest even, subnormals kept:
// what torch computes. The build's --use_fast_math would make `a / b` approximate and flush
// subnormals (a bf16 value below 2^-126 times a large 1 / scale is a visible e4m3 value), and
// scales and values must match flash_gla.reference.quantize_kv_ref bit for bit.
__device__ __forceinline__ float div_rn(float a, float b) {
  float q;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(q) : "f"(a), "f"(b));
  return q;
}
__device__ __forceinline__ float rcp_rn(float a) {
  float r;
  asm("rcp.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
__device__ __forceinline__ float mul_rn(float a, float b) {
  float p;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(p) : "f"(a), "f"(b));
  return p;
}

// The FP8 cache: a lane's kLaneVecs vectors of kVec Elem values (__nv_bfloat16 or __half) become
// as many vectors of kVec float8_e4m3fn values, value * (1 / scale) rounded to nearest even and
// saturated to +-448 (NaN stays NaN): one multiply per value (a division per value would cost
// the kernel most of its issue slots).
template <class Elem, int kVecElems>
struct ElementQuantise {
  static constexpr bool kQuantised = true;
  static constexpr int kVec = kVecElems;
  static constexpr int kLaneVecs = kLaneValues / kVec;
  using Layout = GroupLayout;
  using SrcElem = Elem;
  using DstElem = __nv_fp8_storage_t;
  using Src = Bits<sizeof(SrcElem) * kVec>;
  using Dst = Bits<sizeof(DstElem) * kVec>;
  static_assert(sizeof(Src) == sizeof(SrcElem) * kVec && sizeof(Dst) == sizeof(DstElem) * kVec);
  static_assert(kVec % 2 == 0, "values are taken in pairs (one 32-bit word, one cvt ... e4m3x2)");
  static_assert(kScaleGroup / kLaneValues <= kWarp, "a scale group must lie in one warp (shuffles)");

  // max |x| over the lane's values, as the bits of a non-negative float: found on the 16-bit
  // patterns (sign cleared, two per instruction), which order like the values' magnitudes with
  // NaN above inf, and converted exactly at the end; so a NaN anywhere in the group makes its
  // amax (and scale) NaN.
  __device__ __forceinline__ static uint32_t abs_max_bits(const Src (&v)[kLaneVecs]) {
    uint32_t m = 0;
#pragma unroll
    for (int k = 0; k < kLaneVecs; ++k) {
      const auto* words = reinterpret_cast<const uint32_t*>(&v[k]);
#pragma unroll
      for (int i = 0; i < kVec / 2; ++i) { m = __vmaxu2(m, words[i] & 0x7fff7fffu); }
    }
    const auto bits = static_cast<unsigned short>(max(m & 0xffffu, m >> 16));
    if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
      return static_cast<uint32_t>(bits) << 16;
    } else {
      return __float_as_uint(__half2float(__ushort_as_half(bits)));
    }
  }

  // The two values of a 32-bit word (element 2i in its low half), exactly.
  __device__ __forceinline__ static float2 to_float2(uint32_t word) {
    if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {  // a bf16 is a float's top half
      return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
    } else {
      return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(word))),
                         __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16))));
    }
  }

  __device__ __forceinline__ static Dst convert(const Src& v, float inv_scale) {
    const auto* words = reinterpret_cast<const uint32_t*>(&v);
    Dst out;
    auto* pairs = reinterpret_cast<__nv_fp8x2_storage_t*>(&out);
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) {
      const float2 x = to_float2(words[i]);
      const float2 q = make_float2(mul_rn(x.x, inv_scale), mul_rn(x.y, inv_scale));
      pairs[i] = __nv_cvt_float2_to_fp8x2(q, __NV_SATFINITE, __NV_E4M3);
    }
    return out;
  }
};

// The scale of the kScaleGroup values that this lane's group of `group_lanes` neighbouring lanes
// holds (abs_max_bits: the lane's own amax): amax / 448, at least kMinScale (so that 1 / scale is
// finite), 1 for a group of zeros; NaN or inf when the group holds one (a comparison keeps NaN,
// where fmaxf would drop it). Every lane of the warp must call it (shuffles); lanes without data
// hold zeros.
template <int kMaxGroupLanes>
__device__ __forceinline__ float group_scale(uint32_t abs_max_bits, int group_lanes) {
#pragma unroll
  for (int lanes = kMaxGroupLanes / 2; lanes > 0; lanes /= 2) {
    if (lanes < group_lanes) { abs_max_bits = max(abs_max_bits, __shfl_xor_sync(0xffffffffu, abs_max_bits, lanes)); }
  }
  if (abs_max_bits == 0) { return 1.0f; }
  const float scale = div_rn(__uint_as_float(abs_max_bits), kE4M3Max);
  return scale < kMinScale ? kMinScale : scale;
}

// A padding token (negative slot) or an out-of-range slot is skipped (so is an idle lane's -1).
__device__ __forceinline__ bool writable(const CacheWriteParams& p, int64_t slot) {
  return slot >= 0 && slot < p.num_slots;
}

// Where a token's rows come from, and where a slot's rows go.
template <class Elem>
__device__ __forceinline__ const Elem* kv_row(const CacheWriteParams& p, int64_t token, int head) {
  return static_cast<const Elem*>(p.kv) + token * p.kv_token_stride + head * p.kv_head_stride;
}
template <class Elem>
__device__ __forceinline__ const Elem* rope_row(const CacheWriteParams& p, int64_t token) {
  return static_cast<const Elem*>(p.rope) + token * p.rope_token_stride;
}
template <class Elem>
__device__ __forceinline__ Elem* cache_row(const CacheWriteParams& p, int64_t slot, int head) {
  const int64_t page = slot / kPageSize, row = slot % kPageSize;
  return static_cast<Elem*>(p.kv_cache) + page * p.cache_block_stride + row * p.cache_row_stride +
         head * p.cache_head_stride;
}
template <class Elem>
__device__ __forceinline__ Elem* rope_cache_row(const CacheWriteParams& p, int64_t slot) {
  const int64_t page = slot / kPageSize, row = slot % kPageSize;
  return static_cast<Elem*>(p.rope_cache) + page * p.rope_cache_block_stride + row * p.rope_cache_row_stride;
}
__device__ __forceinline__ float* scale_row(const CacheWriteParams& p, int64_t slot, int head) {
  const int64_t page = slot / kPageSize, row = slot % kPageSize;
  return p.kv_scale + page * p.scale_block_stride + row * p.scale_row_stride + head * p.scale_head_stride;
}

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
