// The consumers' hand-over of the Q tile from one request piece to the next: every consumer is
// done with the previous tile before the new one is loaded over it, and the producer starts
// its KV loads once the CTA's first tile is issued (all CTAs start together and their first
// pages fill the memory system, so a Q load queued behind them would arrive late while the
// ring sat full).
#pragma once

#include <cutlass/arch/barrier.h>

#include "common/packed_rows.h"
#include "common/params.h"
#include "decode/roles.cuh"
#include "decode/schedule.cuh"
#include "decode/smem_io.cuh"

namespace flash_gla::hopper {

template <class Traits>
struct QTile {
  static constexpr int kThreads = Traits::kNumConsumerThreads;
  bool producer_released = false;

  // Loads the piece's Q tile and returns the piece once the tile is in shared memory for
  // wgmma. `while_in_flight` runs while the tile's loads are in flight, as do the piece's
  // bounds (a chain of dependent global loads).
  template <class Walk, class WhileInFlight>
  __device__ WorkPiece load(const DecodeParams& p, typename Traits::SharedStorage& smem, Walk const& walk,
                            int request, PackedRows const& rows, int m_block, int consumer_tid,
                            WhileInFlight&& while_in_flight) {
    consumer_sync(kThreads, ConsumerBarrier::kQFree);
    SmemIO<Traits>::load_q(p, smem, request, rows, m_block, consumer_tid);
    if (!producer_released) {
      barrier_arrive(kThreads + 32, ConsumerBarrier::kQIssued);
      producer_released = true;
    }
    while_in_flight();
    const WorkPiece w = walk.piece(p, request);
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    if constexpr (Traits::kFP8) { SmemIO<Traits>::q_latent_to_stage_type(smem, consumer_tid); }
    cutlass::arch::fence_view_async_shared();  // Q written by threads, read by wgmma
    consumer_sync(kThreads, ConsumerBarrier::kQReady);
    return w;
  }

  // A CTA without work still lets the producer past its wait.
  __device__ void finish() const {
    if (!producer_released) { barrier_arrive(kThreads + 32, ConsumerBarrier::kQIssued); }
  }
};

}  // namespace flash_gla::hopper
