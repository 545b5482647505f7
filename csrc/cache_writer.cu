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
// scales (one per kScaleGroup values of a row). A scale needs the group's amax, which the
// group's lanes find with warp shuffles: for that op every group is group_vecs neighbouring
// lanes (a power of two <= 32), so rows are padded to whole groups and tokens to a whole group
// (idle lanes load and store nothing). The RoPE keys (rope_cache, never inline in FP8) are
// copied as they are.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "cache_writer.h"
#include "common/cuda_check.h"

namespace flash_gla {

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // vectors per thread (measured: 1 and 4 are slower on an H200)
constexpr int kMaxVectorElems = 8;  // 16 bytes of bf16 / fp16
constexpr int kWarp = 32;

// An unsigned type of kBytes (16, 8, 4 or 2) bytes: the unit of one load or store.
template <int kBytes>
using Bits = std::conditional_t<
    kBytes == 16, uint4,
    std::conditional_t<kBytes == 8, uint2, std::conditional_t<kBytes == 4, uint32_t, uint16_t>>>;

// The copy: kVec elements of Elem, moved as raw bits (bf16 and fp16 alike: Elem is their
// 16-bit storage type).
template <class Elem, int kVecElems>
struct ElementCopy {
  static constexpr bool kQuantised = false;
  static constexpr int kVec = kVecElems;
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

// The FP8 cache: kVec elements of Elem (__nv_bfloat16 or __half) become kVec float8_e4m3fn
// values, value * (1 / scale) rounded to nearest even and saturated to +-448 (NaN stays NaN):
// one multiply per value (a division per value would cost the kernel most of its issue slots).
template <class Elem, int kVecElems>
struct ElementQuantise {
  static constexpr bool kQuantised = true;
  static constexpr int kVec = kVecElems;
  using SrcElem = Elem;
  using DstElem = __nv_fp8_storage_t;
  using Src = Bits<sizeof(SrcElem) * kVec>;
  using Dst = Bits<sizeof(DstElem) * kVec>;
  static_assert(sizeof(Src) == sizeof(SrcElem) * kVec && sizeof(Dst) == sizeof(DstElem) * kVec);
  static_assert(kVec % 2 == 0, "values are converted in pairs (cvt ... e4m3x2)");

  __device__ __forceinline__ static void to_float(const Src& v, float (&x)[kVec]) {
    const auto* elems = reinterpret_cast<const Elem*>(&v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
        x[i] = __bfloat162float(elems[i]);
      } else {
        x[i] = __half2float(elems[i]);
      }
    }
  }

  // max |x_i| as the bits of a non-negative float: as integers these order like the floats,
  // with NaN above inf, so a NaN anywhere in the group makes its amax (and scale) NaN.
  __device__ __forceinline__ static uint32_t abs_max_bits(const float (&x)[kVec]) {
    uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < kVec; ++i) { m = max(m, __float_as_uint(x[i]) & 0x7fffffffu); }
    return m;
  }

  __device__ __forceinline__ static Dst convert(const float (&x)[kVec], float inv_scale) {
    Dst out;
    auto* pairs = reinterpret_cast<__nv_fp8x2_storage_t*>(&out);
#pragma unroll
    for (int i = 0; i < kVec; i += 2) {
      const float2 q = make_float2(mul_rn(x[i], inv_scale), mul_rn(x[i + 1], inv_scale));
      pairs[i / 2] = __nv_cvt_float2_to_fp8x2(q, __NV_SATFINITE, __NV_E4M3);
    }
    return out;
  }
};

// The scale of the kScaleGroup values that this lane's group of `group_vecs` neighbouring lanes
// holds: amax / 448, at least kMinScale (so that 1 / scale is finite), 1 for a group of zeros;
// NaN or inf when the group holds one (a comparison keeps NaN, where fmaxf would drop it).
// Every lane of the warp must call it (shuffles); lanes without data hold zeros.
__device__ __forceinline__ float group_scale(uint32_t abs_max_bits, int group_vecs) {
  for (int lanes = group_vecs / 2; lanes > 0; lanes /= 2) {
    abs_max_bits = max(abs_max_bits, __shfl_xor_sync(0xffffffffu, abs_max_bits, lanes));
  }
  if (abs_max_bits == 0) { return 1.0f; }
  const float scale = div_rn(__uint_as_float(abs_max_bits), kE4M3Max);
  return scale < kMinScale ? kMinScale : scale;
}

// The vector layout of one launch (see the file comment), in vectors of the op's kVec.
struct VectorLayout {
  int64_t token_begin;  // first token of this launch's chunk
  int num_vectors;      // chunk tokens * token_vecs
  int token_vecs;       // vectors per token (FP8: a multiple of group_vecs)
  int row_vecs;         // vectors per kv_cache row (FP8: whole groups)
  int kv_vecs;          // of which from kv (copy: the rest from rope, inline RoPE; FP8: idle)
  int kv_region;        // h_kv * row_vecs: the vectors of a token before its rope_cache row
  int data_vecs;        // vectors of a token that carry data (FP8: the rest pad to a group)
  int group_vecs;       // FP8: vectors of one scale group (a power of two <= 32); copy: 1
};

// Whether vector r of a token carries data (every one does but the FP8 layout's padding).
template <class Op>
__device__ __forceinline__ bool holds_data(const VectorLayout& g, int r) {
  if constexpr (Op::kQuantised) {
    return r < g.kv_region ? r % g.row_vecs < g.kv_vecs : r < g.data_vecs;
  } else {
    return true;
  }
}

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

// Thread i of the grid takes vectors i and i + threads (threads = the grid's threads: every
// vector once), so every warp reads and writes 32 neighbouring vectors. A token's slot and its
// source vectors are loaded together (the source does not depend on the slot): one memory
// latency before the stores. With the FP8 op every lane then joins its group's amax (shuffles:
// no lane leaves before them), and the lanes of valid slots store.
template <class Op>
__global__ void __launch_bounds__(kThreads) write_kvcache_kernel(const CacheWriteParams p, const VectorLayout g) {
  using Src = typename Op::Src;
  using Dst = typename Op::Dst;
  using SrcElem = typename Op::SrcElem;
  using DstElem = typename Op::DstElem;
  const int threads = gridDim.x * kThreads;
  const int first = blockIdx.x * kThreads + threadIdx.x;
  Src values[kUnroll];
  int64_t slots[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int index = first + u * threads;
    slots[u] = -1;
    values[u] = Src{};  // zeros: an idle FP8 lane adds nothing to its group's amax
    if (index < g.num_vectors) {
      const int token = index / g.token_vecs;
      const int r = index - token * g.token_vecs;
      if (holds_data<Op>(g, r)) {
        const int64_t t = g.token_begin + token;
        slots[u] = p.slot_mapping[t * p.slot_stride];
        values[u] = *reinterpret_cast<const Src*>(source<Op>(p, g, t, r));
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    [[maybe_unused]] float x[Op::kVec];
    [[maybe_unused]] float scale;
    if constexpr (Op::kQuantised) {
      Op::to_float(values[u], x);
      scale = group_scale(Op::abs_max_bits(x), g.group_vecs);
    }
    // A padding token (negative slot) or an out-of-range slot is skipped (so is an idle lane).
    if (slots[u] < 0 || slots[u] >= p.num_slots) { continue; }
    const int index = first + u * threads;
    const int r = index - index / g.token_vecs * g.token_vecs;
    const int64_t page = slots[u] / kPageSize, row = slots[u] % kPageSize;
    if (r < g.kv_region) {
      const int head = r / g.row_vecs;
      const int v = r - head * g.row_vecs;
      DstElem* dst = static_cast<DstElem*>(p.kv_cache) + page * p.cache_block_stride + row * p.cache_row_stride +
                     head * p.cache_head_stride + v * Op::kVec;
      if constexpr (Op::kQuantised) {
        *reinterpret_cast<Dst*>(dst) = Op::convert(x, rcp_rn(scale));
        if (v % g.group_vecs == 0) {  // the group's first lane writes its scale
          p.kv_scale[page * p.scale_block_stride + row * p.scale_row_stride + head * p.scale_head_stride +
                     v / g.group_vecs * p.scale_group_stride] = scale;
        }
      } else {
        *reinterpret_cast<Dst*>(dst) = Op::convert(values[u]);
      }
    } else {  // the RoPE key, stored once per token, in the tokens' dtype
      SrcElem* dst = static_cast<SrcElem*>(p.rope_cache) + page * p.rope_cache_block_stride +
                     row * p.rope_cache_row_stride + (r - g.kv_region) * Op::kVec;
      *reinterpret_cast<Src*>(dst) = values[u];
    }
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

template <class Op>
void launch(const CacheWriteParams& p, cudaStream_t stream) {
  const bool shared_rope = p.rope_cache != nullptr;
  const int rope_vecs = p.rope_dim / Op::kVec;
  VectorLayout g{};
  g.kv_vecs = p.kv_dim / Op::kVec;
  if constexpr (Op::kQuantised) {
    // A scale group is kScaleGroup / kVec lanes (a row shorter than one group: its vectors
    // rounded up to a power of two); rows and tokens start on a multiple of it, so every group
    // is whole, aligned lanes of one warp.
    static_assert(kScaleGroup / Op::kVec <= kWarp, "a scale group must lie in one warp (shuffles)");
    g.group_vecs = kScaleGroup / Op::kVec;
    if (p.kv_dim < kScaleGroup) {
      for (g.group_vecs = 1; g.group_vecs < g.kv_vecs; g.group_vecs *= 2) {}
    }
    g.row_vecs = ceil_div(p.kv_dim, kScaleGroup) * g.group_vecs;
    g.kv_region = p.num_heads * g.row_vecs;
    g.data_vecs = g.kv_region + rope_vecs;  // FP8 always has a rope_cache
    g.token_vecs = ceil_div(g.data_vecs, g.group_vecs) * g.group_vecs;
  } else {
    g.group_vecs = 1;
    g.row_vecs = g.kv_vecs + (shared_rope ? 0 : rope_vecs);
    g.kv_region = p.num_heads * g.row_vecs;
    g.data_vecs = g.token_vecs = g.kv_region + (shared_rope ? rope_vecs : 0);
  }
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
