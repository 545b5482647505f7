// What the paged-cache writer moves (cache_writer.cu): the unit of one load or store, the two
// walks' layouts, the element ops (a copy, or the FP8 quantisation with its IEEE-exact float32
// arithmetic) and where a token's rows come from and a slot's rows go.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cutlass/fast_math.h>

#include "cache/run_cache_writer.h"

namespace flash_gla::cache {

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

}  // namespace flash_gla::cache
