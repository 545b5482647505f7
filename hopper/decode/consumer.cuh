// The consumer role: for each request piece, one CTA's consumer warpgroups load the packed
// query rows, walk the piece's KV pages through the pipeline (page_loop.cuh) keeping the online
// softmax, and write the piece's output (epilogue.cuh).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "common/packed_rows.h"
#include "common/params.h"
#include "decode/epilogue.cuh"
#include "decode/fragment_utils.cuh"
#include "decode/roles.cuh"
#include "decode/schedule.cuh"
#include "decode/smem_io.cuh"
#include "decode/page_loop.cuh"
#include "decode/q_tile.cuh"
#include "decode/softmax.cuh"
#include "decode/turn_merge.cuh"

namespace flash_gla::hopper {

using namespace cute;

template <class Traits>
struct Consumer {
  static constexpr int kWGRows = Traits::kWGRows;
  static constexpr int kOutCols = Traits::kOutColsPerWG;
  static constexpr int kHeadDimRope = Traits::kHeadDimRope;
  static constexpr int kConsumerThreads = Traits::kNumConsumerThreads;
  using Element = typename Traits::Element;
  using StageElement = typename Traits::StageElement;  // of the KV stages, Q's latent columns and P

  static __device__ void run(const DecodeParams& p, typename Traits::SharedStorage& smem,
                             typename Traits::Pipeline& pipeline,
                             int kv_head, int m_block, int consumer_tid) {
    // Read through a shuffle so that ptxas knows the index is warp-uniform: the shared-memory
    // descriptors derived from it then live in uniform registers instead of 2 general
    // registers per k-block.
    const int warpgroup = __shfl_sync(0xffffffff, consumer_tid / 128, 0);
    WarpgroupRole wg;
    wg.col_wg = Traits::kNumColWGs == 1 ? 0 : warpgroup % Traits::kNumColWGs;
    wg.row_wg = Traits::kNumRowWGs == 1 ? 0 : warpgroup / Traits::kNumColWGs;
    wg.page_wg = Traits::kNumPageWGs == 1 ? 0 : warpgroup;
    wg.row_base = m_block * Traits::kBlockM + wg.row_wg * kWGRows;
    wg.wg_tid = consumer_tid % 128;

    typename Traits::TiledMmaS mma_s;
    typename Traits::TiledMmaSRope mma_r;  // RoPE k-blocks with Q from registers
    typename Traits::TiledMmaO mma_o;
    auto thr_s = mma_s.get_thread_slice(wg.wg_tid);
    auto thr_r = mma_r.get_thread_slice(wg.wg_tid);
    auto thr_o = mma_o.get_thread_slice(wg.wg_tid);

    Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<StageElement*>(smem.q.data())),
                            typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutK{});
    // The stages' RoPE keys (inline or joined) are in q's dtype.
    Tensor sKq = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem.kv.data())),
                             typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutV{});
    Tensor sR = make_tensor(make_smem_ptr(smem.rope.data()), typename Traits::SmemLayoutRope{});
    Tensor sP = make_tensor(make_smem_ptr(smem.p.data()), typename Traits::SmemLayoutP{});
    // This warpgroup's share: (64, d_qk or d_nope) rows of Q and (kOutCols, tokens, stage)
    // columns of V; a scoring warpgroup reads the whole page (and its shared RoPE rows).
    Tensor sQw = flat_divide(sQ, Shape<Int<kWGRows>, Int<Traits::kQSmemCols>>{})(_, _, wg.row_wg, 0);
    Tensor sVw = flat_divide(sV, Shape<Int<kOutCols>, Int<Traits::kBlockN>>{})(_, _, wg.col_wg, 0, _);

    Tensor tSrQ = thr_s.partition_fragment_A(sQw);  // (MMA, 1, k-blocks) descriptors
    Tensor tSrK = thr_s.partition_fragment_B(sK);  // (MMA, 1, kv_width/16, stage)
    // (MMA, 1, d_rope/16, stage); for Q's RoPE columns in shared memory, never beside fp16 stages
    Tensor tSrR = thr_s.partition_fragment_B(make_tensor(
        make_smem_ptr(reinterpret_cast<StageElement*>(smem.rope.data())), typename Traits::SmemLayoutRope{}));
    Tensor tOrV = thr_o.partition_fragment_B(sVw);  // (MMA, 1, tokens/16, stage)
    // Q's RoPE columns in registers (Traits::kQRopeInRegisters): the RoPE k-blocks of S then
    // run as register-sourced wgmma against the same shared-memory keys.
    Tensor tSrQr = thr_r.partition_fragment_A(make_tensor(
        make_smem_ptr(smem.q.data()), make_layout(Shape<Int<kWGRows>, Int<kHeadDimRope>>{})));
    Tensor tScQr = thr_r.partition_A(make_identity_tensor(Shape<Int<kWGRows>, Int<kHeadDimRope>>{}));
    Tensor tSrKr = thr_r.partition_fragment_B(sKq);
    Tensor tSrRr = thr_r.partition_fragment_B(sR);
    Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kWGRows>, Int<Traits::kBlockN>>{});
    Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kWGRows>, Int<kOutCols>>{});
    // P of the page whose P V is next, 16-bit in the accumulator's layout (a shared P lives
    // in shared memory instead).
    Tensor tOrP = make_tensor<StageElement>(tSrS.layout());

    // Row/column views and the (row, col) coordinate of every accumulator element.
    Tensor tSrS_rc = make_tensor(tSrS.data(), accumulator_rowcol(tSrS.layout()));
    Tensor tOrO_rc = make_tensor(tOrO.data(), accumulator_rowcol(tOrO.layout()));
    Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kWGRows>, Int<Traits::kBlockN>>{}));
    Tensor tScS_rc = make_tensor(tScS.data(), accumulator_rowcol(tScS.layout()));
    Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kWGRows>, Int<kOutCols>>{}));
    Tensor tOcO_rc = make_tensor(tOcO.data(), accumulator_rowcol(tOcO.layout()));
    constexpr int kRows = decltype(size<0>(tSrS_rc))::value;  // rows per thread (2)
    static_assert(kRows == decltype(size<0>(tOrO_rc))::value, "S and O rows must coincide");
    // Shared P: the shared-memory address of each pair of adjacent columns (c, c + 1; c
    // even) of this thread's first row of scores in the shared P; its second row lies 8 rows
    // on, one swizzle atom further (Traits::kPRow8Bytes).
    constexpr int kPairs = Traits::kSharedP ? decltype(size<1>(tSrS_rc))::value / 2 : 1;
    uint32_t p_address[kPairs];
    if constexpr (Traits::kSharedP) {
      static_assert(kRows == 2, "a thread's accumulator rows are r and r + 8");
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < 2 * kPairs; c += 2) {
        p_address[c / 2] = cast_smem_ptr_to_uint(&sP(get<0>(tScS_rc(0, c)), get<1>(tScS_rc(0, c))));
      }
    }

    OnlineSoftmax<kRows> softmax;
    typename Traits::Pipeline::PipelineState state;  // consumers start at stage 0, phase 0
    PageContext<Traits> ctx{p, smem, pipeline, state, wg, consumer_tid};
    Gemms gemms{mma_s, mma_r, mma_o, thr_o};
    Operands in{tSrQ, tSrQr, tSrK, tSrKr, tSrR, tSrRr, tOrV, sP, p_address};
    Accumulators acc{tSrS, tSrS_rc, tScS_rc, tOrO, tOrO_rc, tOrP, softmax};

    const PackedRows rows(p.group_size, kv_head);

    QTile<Traits> q_tile;
    int pages_walked = 0;  // page turns: the pages of the CTA's earlier pieces
    PieceWalk</*kReload=*/true> walk;
    for (walk.first_part(); walk.in_parts(p); walk.next_part()) {
      for (walk.first_item(p); walk.in_part(p); walk.next_item()) {
        const int request = walk.request(p);
        // Q's RoPE columns in registers are loaded after the producer's release: it need not
        // wait for them. With a shared P only the scoring warpgroup multiplies them.
        const WorkPiece w = q_tile.load(p, smem, walk, request, rows, m_block, consumer_tid, [&] {
          if constexpr (Traits::kQRopeInRegisters) {
            if (Traits::kSharedP && wg.col_wg != 0) { return; }
            SmemIO<Traits>::load_q_rope(p, request, rows, wg.row_base, tSrQr, tScQr);
          }
        });
        if constexpr (Traits::kQRopeInRegisters) { warpgroup_fence_operand(tSrQr); }

        // Causal: query token r of s_q sees keys up to L - s_q + r.
        PieceMask<kRows> mask;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kRows; ++i) {
          const int token = rows.group.div(wg.row_base + int(get<0>(tScS_rc(i, 0))));
          mask.row_last_key[i] = p.causal ? min(w.seqlen - p.seqlen_q + token, w.seqlen - 1)
                                          : w.seqlen - 1;
        }
        mask.mask_from = p.causal ? w.seqlen - p.seqlen_q + 1 : w.seqlen;

        clear(tOrO);
        softmax.reset();
        ctx.exponent = 0;  // of Q's RoPE registers, loaded as they are
        PageLoop<Traits>::run(ctx, gemms, in, acc, w, mask, pages_walked);
        if constexpr (Traits::kPageExponent) {  // O is at its last page's exponent
          const float unit = exp2_integer(-ctx.exponent);
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(tOrO); ++i) { tOrO(i) *= unit; }
        }

        float row_total[kRows], inv_sum[kRows], lse[kRows];
        softmax.quad_sums(row_total);
        if constexpr (Traits::kSharedP) {  // the scoring warpgroup's statistics, for all
          PageLoop<Traits>::template combine_across_warpgroups</*kMax=*/true>(
              smem.row_max, softmax.row_max, tScS_rc, wg, ConsumerBarrier::kScoresMax);
          PageLoop<Traits>::template combine_across_warpgroups</*kMax=*/false>(
              smem.row_sum, row_total, tScS_rc, wg, ConsumerBarrier::kRowSums);
        }
        if constexpr (Traits::kNumPageWGs > 1) {  // each warpgroup took every other page
          pages_walked += w.page_end - w.page_begin;
          TurnMerge<Traits>::run(smem, softmax, row_total, tOrO, tOrO_rc, tScS_rc, wg);
        }
        softmax.finalize(row_total, inv_sum, lse);
        Epilogue<Traits>::store(p, smem, w, tOrO, tOrO_rc, tOcO_rc, inv_sum, lse, rows, wg);
      }
    }
    q_tile.finish();
  }
};

}  // namespace flash_gla::hopper
