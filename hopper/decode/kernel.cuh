// Paged decode attention for one traits instance (MLA, GLA, GLA with RoPE stored once, GTA).
//
// Grid: (m-blocks of 64 or 128 packed query rows, or of 8 or 16 for the transposed instances;
// KV heads; up to the scheduler's parts). Each CTA is persistent over the parts blockIdx.z,
// + gridDim.z, ... and the request pieces that hopper/schedule/scheduler.cu assigned to them
// (schedule.cuh); for each piece it computes softmax(Q K^T * scale) V over that piece's KV
// pages. Transposed CTAs run two per SM where half the SM's shared memory holds one.
//
// Roles (warp-specialised):
//   producer (last warpgroup, one thread; producer.cuh): TMA-loads whole KV pages of this KV
//     head (+ their shared RoPE rows) into a ring of kStages shared-memory stages on
//     mbarriers. It starts once the first Q tile's loads are issued.
//   consumers (warpgroups 0..; consumer.cuh): per piece, load the Q tile, then per page
//     S = Q K^T, online softmax, O += P V with wgmma, and release the stage; then the epilogue
//     (epilogue.cuh) writes O and LSE, or fp32 partials that hopper/combine/combine.cu merges.
//     The warpgroups split the tile's rows (128-row tiles), its output columns (MLA), or take
//     its pages in turn (64-row GLA and GTA tiles: page turns, merged by turn_merge.cuh). For
//     KV heads with at most 16 query rows one warpgroup computes S^T = K Q^T and O^T = V^T P^T
//     instead, tokens as the wgmma's M (consumer_transposed.cuh).
//
// Shared memory (traits.h): Q (64 or 128 rows x d_qk, or x d_nope with its RoPE columns in
// registers) + kStages pages (64 x kv_width, GLA's shared RoPE rows right after V),
// 128B-swizzled K-major [+ kStages GTA RoPE pages (64 x d_rope)] + P (64 x 64) and per-row
// statistics when it is shared.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "common/params.h"
#include "decode/consumer.cuh"
#include "decode/consumer_transposed.cuh"
#include "decode/dequant.cuh"
#include "decode/producer.cuh"
#include "decode/roles.cuh"
#include "decode/traits.h"

namespace flash_gla::hopper {

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, Traits::kCtasPerSm)
    decode_kernel(CUTE_GRID_CONSTANT const DecodeParams params,
                  CUTE_GRID_CONSTANT const typename Traits::TmaKV tma_kv,
                  CUTE_GRID_CONSTANT const typename Traits::TmaRope tma_rope) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Pipeline = typename Traits::Pipeline;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  const int m_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const bool is_producer = threadIdx.x >= Traits::kNumConsumerThreads;
  const bool is_producer_leader = threadIdx.x == Traits::kNumConsumerThreads;

  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kStageTmaBytes;
  // FP8: the producer warps (with unscaled stages some of their threads) arrive on an Element
  // stage's full barrier (dequant.cuh).
  pipeline_params.num_producers = Traits::kFP8 ? Traits::kStageFullArrivals : 1;
  pipeline_params.role = is_producer ? Pipeline::ThreadCategory::Producer
                                     : Pipeline::ThreadCategory::Consumer;
  // FP8: the Element stages are written by the producer threads; the leader expects the bytes
  // of the RoPE rows it TMAs into them itself (dequant.cuh). Page turns: the leader arms the
  // page's warpgroup's own barrier (producer.cuh), not the pipeline's.
  pipeline_params.is_leader = is_producer_leader && !Traits::kFP8 && !Traits::kTurnBarriers;
  pipeline_params.num_consumers = Traits::kTurnThreads;  // the threads that release a stage
  Pipeline pipeline(smem.pipeline, pipeline_params, Shape<_1, _1, _1>{});
  if (is_producer_leader) {
    cute::prefetch_tma_descriptor(tma_kv.get_tma_descriptor());
    if constexpr (Traits::kSharedRope) { cute::prefetch_tma_descriptor(tma_rope.get_tma_descriptor()); }
    if constexpr (Traits::kFP8) {
      for (int slot = 0; slot < Traits::kRawStages; ++slot) {
        // The leader's arrival with the TMA bytes, and one per thread that copies scales.
        cutlass::arch::ClusterTransactionBarrier::init(&smem.raw.full[slot], 1 + Traits::kBlockN);
        cutlass::arch::ClusterBarrier::init(&smem.raw.empty[slot], Traits::kNumProducerThreads / 32);
      }
      cutlass::arch::fence_barrier_init();
    }
    if constexpr (Traits::kTurnBarriers) {
      // FP8: the producer warps' arrivals (kStageFullArrivals); 16-bit: the leader's, with the
      // page's TMA bytes.
      for (int wg = 0; wg < Traits::kNumPageWGs; ++wg) {
        for (int stage = 0; stage < Traits::kStages; ++stage) {
          cutlass::arch::ClusterBarrier::init(&smem.turn_full[wg][stage], Traits::kFP8 ? Traits::kStageFullArrivals : 1);
        }
      }
      cutlass::arch::fence_barrier_init();
    }
  }
  __syncthreads();  // barrier initialisation is visible to every role

  if (is_producer) {
    // The producer needs few registers (more when it dequantises); give them to the consumers'
    // accumulators.
    if constexpr (Traits::kReallocRegs) { cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>(); }
    if (threadIdx.x < Traits::kNumConsumerThreads + 32) {  // the producer's first warp
      consumer_sync(Traits::kNumConsumerThreads + 32, ConsumerBarrier::kQIssued);
    }
    if constexpr (Traits::kFP8) {
      DequantProducer<Traits>::run(params, tma_kv, tma_rope, smem, pipeline, kv_head,
                                   threadIdx.x - Traits::kNumConsumerThreads);
    } else if (is_producer_leader) {
      Producer<Traits>::run(params, tma_kv, tma_rope, smem, pipeline, kv_head);
    }
  } else {
    if constexpr (Traits::kReallocRegs) { cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>(); }
    if constexpr (Traits::kTransposed) {
      TransposedConsumer<Traits>::run(params, smem, pipeline, kv_head, m_block, threadIdx.x);
    } else {
      Consumer<Traits>::run(params, smem, pipeline, kv_head, m_block, threadIdx.x);
    }
  }
#endif
}

}  // namespace flash_gla::hopper
