// The producer role of an FP8 (e4m3) cache: the producer warpgroups (two where the consumers are
// one warpgroup, else one) turn each e4m3 page into the fp16 stage that the consumers read.
//
// Two rings in shared memory (traits.h):
//   raw stages   an e4m3 page and its scales, loaded kRawStages - 1 pages ahead of the page
//                being converted: the leader's TMA, plus one thread per token copying the
//                token's scales with cp.async. Only the producers read a raw stage, so it is
//                free again as soon as they have converted it.
//   Element stages  the pipeline of the unquantised kernel; each producer warp arrives on a
//                stage's full barrier once its threads have written their share, so that the
//                warps need not wait for each other page by page. The page's RoPE rows, in q's
//                dtype in the cache, come by the leader's TMA straight into the stage once it
//                is free (its barrier also counts their bytes): copying them through the raw
//                ring would cost each raw stage as many bytes again and fewer pages in flight.
// Per page a thread converts one token's 16-value chunks c = parity, parity + k, ... (k threads
// per token; producer thread t: token t % 64, parity t / 64): each chunk is one 16-byte read
// and two 16-byte writes, and the 8 threads of a quarter-warp touch 8 tokens of one swizzle
// atom, so neither side has bank conflicts. Rows past the sequence end are written as zeros, so
// that the consumers read the stage as it comes and never write to it (their RoPE rows are as
// the cache holds them, NaN included: they reach only scores, which the consumers mask).
//
// Page exponents (Traits::kPageExponent: GLA): each value goes to fp16 (exact, one conversion
// per two) and is multiplied, in fp16, by its scale times 2^e, e the page's exponent
// (page_exponent), which the leader writes beside the stage for the consumers. GTA's 64-row
// tile: each value times its scale in float32, rounded to q's dtype.
// Unscaled stages (Traits::kUnscaledStages: GTA through the transposed consumer, one scale
// group per token): the values go to fp16 as they are, and the token's scale (0 past the end)
// into the stage's scales, which the consumer applies.
#pragma once

#include <cuda_fp8.h>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "common/params.h"
#include "decode/roles.cuh"
#include "decode/schedule.cuh"
#include "decode/smem_io.cuh"
#include "decode/softmax.cuh"
#include "decode/traits.h"

namespace flash_gla::hopper {

using namespace cute;

// Four e4m3 values (one 32-bit word) as two pairs of fp16, exact. Each pair is one conversion
// of a half of the word, read in place (the upper half as a half-register operand, no shift).
__device__ __forceinline__ void widen4(uint32_t word, uint32_t& lo, uint32_t& hi) {
  asm("{\n"
      "  .reg .b16 l, h;\n"
      "  mov.b32 {l, h}, %2;\n"
      "  cvt.rn.f16x2.e4m3x2 %0, l;\n"
      "  cvt.rn.f16x2.e4m3x2 %1, h;\n"
      "}\n" : "=r"(lo), "=r"(hi) : "r"(word));
}

// Four e4m3 values (one 32-bit word) times `scale`, rounded to two pairs of Element.
template <class Element>
__device__ __forceinline__ void dequantise4(uint32_t word, float scale, uint32_t& lo, uint32_t& hi) {
  auto pair = [&](uint32_t h2) -> uint32_t {
    float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h2));
    f.x *= scale;
    f.y *= scale;
    if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
      const __nv_bfloat162 b = __float22bfloat162_rn(f);
      return *reinterpret_cast<const uint32_t*>(&b);
    } else {
      const __half2 b = __float22half2_rn(f);
      return *reinterpret_cast<const uint32_t*>(&b);
    }
  };
  widen4(word, lo, hi);
  lo = pair(lo);
  hi = pair(hi);
}

// Four e4m3 values (one 32-bit word) as two pairs of fp16 times `factor`: exact, then one
// fp16 rounding of the product.
__device__ __forceinline__ void scale4(uint32_t word, __half2 factor, uint32_t& lo, uint32_t& hi) {
  widen4(word, lo, hi);
  const __half2 l = __hmul2(*reinterpret_cast<const __half2*>(&lo), factor);
  const __half2 h = __hmul2(*reinterpret_cast<const __half2*>(&hi), factor);
  lo = *reinterpret_cast<const uint32_t*>(&l);
  hi = *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ void store_shared(uint32_t address, uint32_t const (&v)[4]) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(v[0]), "r"(v[1]), "r"(v[2]),
               "r"(v[3]) : "memory");
}

template <class Traits>
struct DequantProducer {
  using Pipeline = typename Traits::Pipeline;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kRawStages = Traits::kRawStages;
  static constexpr int kThreads = Traits::kNumProducerThreads;
  static constexpr int kGroups = Traits::kScaleGroups;
  static constexpr int kChunksPerRow = Traits::kKVWidth / 16;  // 16 e4m3 values per chunk
  // kThreadsPerToken threads share a token: thread t takes chunks t / 64, + kThreadsPerToken, ...
  static constexpr int kThreadsPerToken = kThreads / kBlockN;
  static_assert(kThreads % kBlockN == 0 && (kScaleGroup / 16) % kThreadsPerToken == 0,
                "a scale group's chunks split evenly");
  static_assert(kChunksPerRow % kThreadsPerToken == 0, "every thread of a token takes as many chunks");

  // The warp that finds an unscaled stage's largest token scale: one whose threads arrive on
  // the stage's barrier as a warp, after that write, and that neither copies scales nor refills.
  static constexpr int kReducingWarp = kThreads / 32 - 1;
  static_assert(kReducingWarp * 32 >= kBlockN, "the reducing warp is not one of the scale copiers");

  // ptid: thread index within the producer warpgroup (0 is the leader, which issues the TMAs).
  static __device__ void run(const DecodeParams& p, const typename Traits::TmaKV& tma_kv,
                             const typename Traits::TmaRope& tma_rope,
                             typename Traits::SharedStorage& smem, Pipeline& pipeline, int kv_head,
                             int ptid) {
    const bool leader = ptid == 0;
    using RawBarrier = cutlass::arch::ClusterTransactionBarrier;
    Tensor mKV = tma_kv.get_tma_tensor(
        make_shape(Int<kBlockN>{}, Int<Traits::kKVWidth>{}, p.num_heads_kv, p.num_pages));
    Tensor sRaw = make_tensor(make_smem_ptr(smem.raw.pages.data()), typename Traits::SmemLayoutRaw{});
    auto [tKgK, tKsK] = tma_partition(tma_kv, Int<0>{}, Layout<_1>{},
                                      group_modes<0, 2>(sRaw), group_modes<0, 2>(mKV(_, _, kv_head, _)));
    Tensor mR = tma_rope.get_tma_tensor(
        make_shape(Int<kBlockN>{}, Int<Traits::kHeadDimRope>{}, p.num_pages));
    Tensor sRope = SmemIO<Traits>::rope_stages(smem);
    auto [tRgR, tRsR] = tma_partition(tma_rope, Int<0>{}, Layout<_1>{},
                                      group_modes<0, 2>(sRope), group_modes<0, 2>(mR));
    Tensor sK = make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutK{});

    const int token = ptid % kBlockN;
    const int parity = ptid / kBlockN;  // which of the token's threads: its first chunk
    const float* scale_row = p.kv_scale + token * p.kv_scale_token_stride + kv_head * p.kv_scale_head_stride;

    // Loads the walk's next page into raw stage `slot`: the leader's TMA of the e4m3 page (and
    // it notes the physical page for the RoPE rows' TMA), and (threads of parity 0) the token's
    // scales, each copying thread arriving on the stage's barrier once its copies have landed.
    // Every thread notes the page's rows before the sequence end in byte `slot` of valid_rows.
    PageWalk walk;
    walk.begin(p);
    uint64_t valid_rows = 0;
    static_assert(kRawStages <= 8 && kBlockN < 256, "a raw stage's row count is one byte of valid_rows");
    // With page turns, bit `slot`: the raw stage's page number is odd (its warpgroup's).
    uint32_t odd_pages = 0;
    auto fetch = [&](int slot) {
      const int physical_page = walk.physical_page;
      const int shift = 8 * slot;
      valid_rows = (valid_rows & ~(uint64_t{0xff} << shift)) | (uint64_t(walk.valid_rows()) << shift);
      if constexpr (Traits::kTurnBarriers) { odd_pages = (odd_pages & ~(1u << slot)) | (uint32_t(walk.page & 1) << slot); }
      uint64_t& full = smem.raw.full[slot];
      if (leader) {
        reinterpret_cast<RawBarrier&>(full).arrive_and_expect_tx(Traits::kRawPageBytes);
        copy(tma_kv.with(full), tKgK(_, physical_page), tKsK(_, slot));
        smem.raw.physical_page[slot] = physical_page;  // read back by this thread only
      }
      if (parity == 0) {  // one thread per token
        const float* src = scale_row + physical_page * p.kv_scale_page_stride;
        CUTLASS_PRAGMA_UNROLL
        for (int g = 0; g < kGroups; ++g) {
          asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
                       ::"r"(cute::cast_smem_ptr_to_uint(&smem.raw.scale[slot][token][g])),
                       "l"(src + g * p.kv_scale_group_stride) : "memory");
        }
        asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n"
                     ::"r"(cute::cast_smem_ptr_to_uint(&full)) : "memory");
      }
      walk.next(p);
    };

    ChunkAddresses at;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < kChunksPerThread; ++c) { chunk_addresses(sRaw, sK, token, parity, c, at.raw[c], at.lo[c]); }
    int fetched = 0;
    for (; fetched < kRawStages && !walk.done; ++fetched) { fetch(fetched); }
    auto state = cutlass::make_producer_start_state<Pipeline>();
    for (int n = 0; n < fetched; ++n) {
      const int slot = n % kRawStages;
      pipeline.producer_acquire(state);  // every thread waits for the Element stage to be free
      auto* stage_full = pipeline.producer_get_barrier(state);
      if constexpr (Traits::kTurnBarriers) { stage_full = &smem.turn_full[(odd_pages >> slot) & 1][state.index()]; }
      if (leader) {
        // The page's RoPE rows are in q's dtype already: TMA'd straight into the Element stage,
        // whose barrier then also waits for their bytes (the leader's warp arrives below).
        RawBarrier::expect_transaction(stage_full, Traits::kRopePageBytes);
        copy(tma_rope.with(*stage_full), tRgR(_, smem.raw.physical_page[slot]), tRsR(_, state.index()));
      }
      reinterpret_cast<RawBarrier&>(smem.raw.full[slot]).wait((n / kRawStages) % 2);
      // The first scale group's 16-byte reads first: in flight under the page's exponent and
      // scales, which the conversion waits for.
      uint32_t raw[kChunksPerGroup][4];
      load_group(at, slot, 0, raw);
      const int rows = int(valid_rows >> (8 * slot)) & 0xff;
      float factor = 1.f;  // 2^e
      if constexpr (Traits::kPageExponent) {
        const int e = page_exponent(largest_scale(smem, slot, rows, ptid % 32));
        factor = exp2_integer(e);
        if (leader) { smem.raw.stage_exponent[state.index()] = e; }  // ordered by its warp's arrival
      } else if constexpr (Traits::kUnscaledStages) {
        // The last warp reduces it (the first two copy the scales and refill, the leader issues
        // the TMAs); the consumer's P unit follows it (consumer_transposed.cuh).
        if (ptid / 32 == kReducingWarp) {
          const float largest = __uint_as_float(largest_scale(smem, slot, rows, ptid % 32));
          if (ptid % 32 == 0) { smem.raw.stage_max_scale[state.index()] = largest; }  // ordered by its warp's arrival
        }
      }
      convert_page(smem, at, raw, slot, state.index(), token, parity, token < rows, factor);
      cutlass::arch::fence_view_async_shared();  // written by threads, read by wgmma
      if (Traits::kUnscaledStages && ptid < kBlockN) {
        // The threads that wrote the stage's token scales (read by the consumer's plain loads,
        // not only by wgmma) arrive each for themselves, their writes ordered by their own arrival.
        cutlass::arch::ClusterBarrier::arrive(stage_full);
      } else {
        __syncwarp();
        if (ptid % 32 == 0) { cutlass::arch::ClusterBarrier::arrive(stage_full); }  // one arrival per warp
      }
      __syncwarp();
      if (ptid % 32 == 0) { cutlass::arch::ClusterBarrier::arrive(&smem.raw.empty[slot]); }  // the warp read it
      if (!walk.done) {
        // Refill raw stage `slot` kRawStages pages ahead. Only the threads that do (the leader
        // and one scale copier per token: warps 0 and 1) wait for every warp to be done with
        // the page; the others go on to the next one.
        if (ptid < kBlockN) { cutlass::arch::ClusterBarrier::wait(&smem.raw.empty[slot], (n / kRawStages) % 2); }
        fetch(slot);
        ++fetched;
      }
      ++state;
    }
  }

  // A thread's chunks of one scale group (kScaleGroup / 16 chunks of 16 values): every
  // kThreadsPerToken-th one.
  static constexpr int kChunksPerGroup = cute::min(kScaleGroup / 16, kChunksPerRow) / kThreadsPerToken;
  static constexpr int kChunksPerThread = kChunksPerRow / kThreadsPerToken;
  static constexpr int kRawStageStride = kBlockN * Traits::kKVWidth;                      // bytes
  static constexpr int kStageStride = kBlockN * Traits::kStageCols * int(sizeof(typename Traits::StageElement));  // bytes
  // A group's reads are issued together with precomputed addresses, which takes registers: with
  // fewer, a producer would convert a chunk at a time, its reads no longer in flight together.
  static_assert(Traits::kProducerRegs >= 88, "the producer keeps a group's chunks and their addresses");

  // Shared-memory addresses of a thread's chunks in raw stage 0 and Element stage 0 (its low 8
  // values; the high 8 are the next 16 bytes of the row before the swizzle, i.e. address ^ 16
  // after it, the swizzle XOR-ing 16-byte indices within 128-byte rows). A stage is a whole
  // number of swizzle atoms, so stage k's addresses are these plus k strides: computed once.
  struct ChunkAddresses {
    uint32_t raw[kChunksPerThread], lo[kChunksPerThread];
  };
  template <class TensorRaw, class TensorK>
  static __device__ void chunk_addresses(TensorRaw& sRaw, TensorK& sK, int token, int parity, int chunk,
                                         uint32_t& raw, uint32_t& lo) {
    const int col = (parity + kThreadsPerToken * chunk) * 16;
    raw = cute::cast_smem_ptr_to_uint(&sRaw(token, col, 0));
    lo = cute::cast_smem_ptr_to_uint(&sK(token, col, 0));
  }

  // The exponent e of a page (Traits::kPageExponent), from the largest scale of its live tokens
  // (largest_scale): with it, s_max, in [2^E, 2^(E+1)), the page's values stay below
  // 448 * 2^(E+1) < 2^(E+10), so e <= 5 - E keeps them below 2^15 in fp16 (which ends at
  // 65,504), and e >= -E - 12 keeps the largest at 2^-4 or more, those that matter clear of
  // fp16's subnormals below 2^-14. e is 0 where both hold (s_max in [2^-12, 2^6)): then Q's RoPE
  // columns and O never change scale. |e| <= kMaxExponent, so that 2^(e - e') of two pages is
  // exact in q's dtype, which Q's RoPE columns are multiplied in: in fp16 (up to 2^15) they then
  // grow at most 2^7-fold. Every warp computes it alike.
  static constexpr int kMaxExponent = std::is_same_v<typename Traits::Element, cutlass::half_t> ? 7 : 60;
  static __device__ int page_exponent(uint32_t largest) {
    const int E = int(largest >> 23) - 127;
    return max(-kMaxExponent, min(kMaxExponent, min(max(0, -E - 12), 5 - E)));
  }

  // The largest |scale| of a page's live tokens, as bits (which order as the values do, NaN and
  // inf last), reduced over the warp (lane: the thread's lane; 32 lanes, two tokens each). A
  // lane's two tokens' scales are adjacent: one vector load, the warp's loads conflict-free.
  static __device__ uint32_t largest_scale(typename Traits::SharedStorage& smem, int slot, int rows, int lane) {
    static_assert(kBlockN == 64 && (kGroups == 1 || kGroups == 2), "two tokens a lane, one vector of scales");
    uint32_t bits[2 * kGroups];
    const float* scales = &smem.raw.scale[slot][2 * lane][0];
    if constexpr (kGroups == 2) {
      const uint4 v = *reinterpret_cast<const uint4*>(scales);
      bits[0] = v.x, bits[1] = v.y, bits[2] = v.z, bits[3] = v.w;
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(scales);
      bits[0] = v.x, bits[1] = v.y;
    }
    uint32_t largest = 0;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < 2 * kGroups; ++i) {
      if (2 * lane + i / kGroups < rows) { largest = max(largest, bits[i] & 0x7fffffffu); }
    }
    return __reduce_max_sync(0xffffffffu, largest);
  }

  // A thread's chunks of scale group g of raw stage `slot`, read together (the volatile
  // accesses keep their program order).
  static __device__ void load_group(ChunkAddresses const& at, int slot, int g, uint32_t (&raw)[kChunksPerGroup][4]) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kChunksPerGroup; ++i) {
      asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(raw[i][0]), "=r"(raw[i][1]), "=r"(raw[i][2]), "=r"(raw[i][3])
                   : "r"(at.raw[g * kChunksPerGroup + i] + slot * kRawStageStride));
    }
  }

  // One thread's share of a page: e4m3 chunks of its token -> fp16, times their scales and the
  // page's factor 2^e (with unscaled stages: as they are, and the token's scale into the stage's
  // scales); zeros for a token past the sequence end (its bytes and scale may be anything, NaN
  // included, and 0 * NaN would poison P V). So the consumers never write a stage that the
  // producers fill. raw: the thread's chunks of the first scale group, already read (load_group).
  static __device__ void convert_page(typename Traits::SharedStorage& smem, ChunkAddresses const& at,
                                      uint32_t (&raw)[kChunksPerGroup][4], int slot, int stage,
                                      int token, int parity, bool live, float factor) {
    const uint32_t out_offset = stage * kStageStride;
    if constexpr (Traits::kUnscaledStages) {
      if (parity == 0) { smem.raw.stage_scale[stage][token] = live ? smem.raw.scale[slot][token][0] : 0.f; }
    }
    if (!live) {
      const uint32_t zero[4] = {0, 0, 0, 0};
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kChunksPerThread; ++c) {
        store_shared(at.lo[c] + out_offset, zero);
        store_shared((at.lo[c] + out_offset) ^ 16u, zero);
      }
      return;
    }
    float scales[kGroups];  // the token's: one load
    if constexpr (kGroups == 2) {
      const float2 v = *reinterpret_cast<const float2*>(&smem.raw.scale[slot][token][0]);
      scales[0] = v.x, scales[1] = v.y;
    } else {
      CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g < kGroups; ++g) { scales[g] = smem.raw.scale[slot][token][g]; }
    }
    CUTLASS_PRAGMA_UNROLL
    for (int g = 0; g < kGroups; ++g) {
      const float s = scales[g];
      const __half2 scale = __float2half2_rn(s * factor);
      if (g > 0) { load_group(at, slot, g, raw); }  // all of a group's reads, then its conversions
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kChunksPerGroup; ++i) {
        const int chunk = g * kChunksPerGroup + i;
        uint32_t lo[4], hi[4];
        if constexpr (Traits::kUnscaledStages) {
          widen4(raw[i][0], lo[0], lo[1]);
          widen4(raw[i][1], lo[2], lo[3]);
          widen4(raw[i][2], hi[0], hi[1]);
          widen4(raw[i][3], hi[2], hi[3]);
        } else {
          if constexpr (Traits::kPageExponent) {
            scale4(raw[i][0], scale, lo[0], lo[1]);
            scale4(raw[i][1], scale, lo[2], lo[3]);
            scale4(raw[i][2], scale, hi[0], hi[1]);
            scale4(raw[i][3], scale, hi[2], hi[3]);
          } else {
            dequantise4<typename Traits::Element>(raw[i][0], s, lo[0], lo[1]);
            dequantise4<typename Traits::Element>(raw[i][1], s, lo[2], lo[3]);
            dequantise4<typename Traits::Element>(raw[i][2], s, hi[0], hi[1]);
            dequantise4<typename Traits::Element>(raw[i][3], s, hi[2], hi[3]);
          }
        }
        store_shared(at.lo[chunk] + out_offset, lo);
        store_shared((at.lo[chunk] + out_offset) ^ 16u, hi);
      }
    }
  }
};

}  // namespace flash_gla::hopper
