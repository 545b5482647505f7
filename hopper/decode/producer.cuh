// The producer role: one thread TMA-loads whole KV pages of its CTA's KV head into the ring
// of shared-memory stages, in the order the consumers walk them (PieceWalk).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "common/params.h"
#include "decode/schedule.cuh"
#include "decode/smem_io.cuh"
#include "decode/traits.h"

namespace flash_gla::hopper {

template <class Traits>
struct Producer {
  using Pipeline = typename Traits::Pipeline;
  static constexpr int kBlockN = Traits::kBlockN;

  // Each stage is one page (64 tokens x kv_width) of this KV head and, with a shared rope
  // cache, the page's RoPE rows (64 x d_rope: after V, or in the rope tile), both completing
  // on the stage's mbarrier. Page addresses come from block_table.
  static __device__ void run(const DecodeParams& p, const typename Traits::TmaKV& tma_kv,
                             const typename Traits::TmaRope& tma_rope,
                             typename Traits::SharedStorage& smem, Pipeline& pipeline, int kv_head) {
    Tensor mKV = tma_kv.get_tma_tensor(
        make_shape(Int<kBlockN>{}, Int<Traits::kKVWidth>{}, p.num_heads_kv, p.num_pages));
    Tensor gKV = mKV(_, _, kv_head, _);  // (token, dim, page)
    Tensor sK = SmemIO<Traits>::page_stages(smem);
    auto [tKgK, tKsK] = tma_partition(tma_kv, Int<0>{}, Layout<_1>{},
                                      group_modes<0, 2>(sK), group_modes<0, 2>(gKV));
    Tensor mR = tma_rope.get_tma_tensor(
        make_shape(Int<kBlockN>{}, Int<Traits::kHeadDimRope>{}, p.num_pages));
    Tensor sR = SmemIO<Traits>::rope_stages(smem);
    auto [tRgR, tRsR] = tma_partition(tma_rope, Int<0>{}, Layout<_1>{},
                                      group_modes<0, 2>(sR), group_modes<0, 2>(mR));
    auto state = cutlass::make_producer_start_state<Pipeline>();
    PieceWalk</*kReload=*/false> walk;
    for (walk.first_part(); walk.in_parts(p); walk.next_part()) {
      for (walk.first_item(p); walk.in_part(p); walk.next_item()) {
        const int request = walk.request(p);
        const WorkPiece w = walk.piece(p, request);
        const int* pages = p.block_table + request * p.block_table_batch_stride;
        for (int page = w.page_begin; page < w.page_end; ++page) {
          const int physical_page = pages[page];
          pipeline.producer_acquire(state);
          auto* full_barrier = pipeline.producer_get_barrier(state);
          if constexpr (Traits::kTurnBarriers) {  // the barrier of the warpgroup that takes the page
            full_barrier = &smem.turn_full[page & 1][state.index()];
            cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full_barrier, Traits::kStageTmaBytes);
          }
          copy(tma_kv.with(*full_barrier), tKgK(_, physical_page), tKsK(_, state.index()));
          if constexpr (Traits::kSharedRope) {
            copy(tma_rope.with(*full_barrier), tRgR(_, physical_page), tRsR(_, state.index()));
          }
          ++state;
        }
      }
    }
  }
};

}  // namespace flash_gla::hopper
