// The consumer role: for each request piece, one CTA's consumer warpgroups load the packed
// query rows, walk the piece's KV pages through the pipeline and keep the online softmax.
//
// Per page: S = Q K^T (wgmma, both operands in shared memory, or Q's RoPE columns from
// registers), scale + mask + online softmax in registers, O += P V (wgmma, P from registers,
// V = the same page viewed MN-major), then the stage is released. With Traits::kOverlapPV,
// page n's S and page n-1's P V are issued back to back, so that page n's softmax runs while
// the tensor cores finish page n-1's P V. With split scores (dv 512: two column warpgroups)
// each warpgroup scores half of the page's tokens, the row maxima and P meet in shared memory,
// and no QK^T is computed twice.
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
#include "decode/softmax.cuh"

namespace flash_gla::hopper {

using namespace cute;

// Causal bounds of one piece for one thread's rows: keys past row_last_key[i] are masked, and
// pages that end before mask_from need no per-element check.
template <int kRows>
struct PieceMask {
  int mask_from;
  int row_last_key[kRows];
};

template <class Traits>
struct Consumer {
  using Element = typename Traits::Element;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Pipeline::PipelineState;
  using SharedStorage = typename Traits::SharedStorage;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kWGRows = Traits::kWGRows;
  static constexpr int kScoreCols = Traits::kScoreCols;
  static constexpr int kOutCols = Traits::kOutColsPerWG;
  static constexpr int kHeadDimRope = Traits::kHeadDimRope;
  static constexpr bool kSplit = Traits::kSplitScores;
  static constexpr int kConsumerThreads = Traits::kNumConsumerThreads;

  static __device__ void run(const DecodeParams& p, SharedStorage& smem, Pipeline& pipeline,
                             int kv_head, int m_block, int consumer_tid) {
    // Read through a shuffle so that ptxas knows the index is warp-uniform: the shared-memory
    // descriptors derived from it then live in uniform registers instead of 2 general
    // registers per k-block.
    const int warpgroup = __shfl_sync(0xffffffff, consumer_tid / 128, 0);
    WarpgroupRole wg;
    wg.col_wg = Traits::kNumColWGs == 1 ? 0 : warpgroup % Traits::kNumColWGs;
    wg.row_wg = Traits::kNumRowWGs == 1 ? 0 : warpgroup / Traits::kNumColWGs;
    wg.row_base = m_block * kBlockM + wg.row_wg * kWGRows;
    wg.wg_tid = consumer_tid % 128;

    typename Traits::TiledMmaS mma_s;
    typename Traits::TiledMmaSRope mma_r;  // RoPE k-blocks with Q from registers
    typename Traits::TiledMmaO mma_o;
    auto thr_s = mma_s.get_thread_slice(wg.wg_tid);
    auto thr_r = mma_r.get_thread_slice(wg.wg_tid);
    auto thr_o = mma_o.get_thread_slice(wg.wg_tid);

    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutV{});
    Tensor sR = make_tensor(make_smem_ptr(smem.rope.data()), typename Traits::SmemLayoutRope{});
    Tensor sP = make_tensor(make_smem_ptr(smem.p.data()), typename Traits::SmemLayoutP{});
    // This warpgroup's share: (64, d_qk or d_nope) rows of Q; (kScoreCols, kv_width, stage)
    // tokens it scores and (kScoreCols, d_rope, stage) their shared RoPE rows; (kOutCols,
    // tokens, stage) columns of V.
    Tensor sQw = flat_divide(sQ, Shape<Int<kWGRows>, Int<Traits::kQSmemCols>>{})(_, _, wg.row_wg, 0);
    Tensor sKw = flat_divide(sK, Shape<Int<kScoreCols>, Int<Traits::kKVWidth>>{})(_, _, wg.col_wg, 0, _);
    Tensor sRw = flat_divide(sR, Shape<Int<kScoreCols>, Int<kHeadDimRope>>{})(_, _, wg.col_wg, 0, _);
    Tensor sVw = flat_divide(sV, Shape<Int<kOutCols>, Int<kBlockN>>{})(_, _, wg.col_wg, 0, _);

    Tensor tSrQ = thr_s.partition_fragment_A(sQw);  // (MMA, 1, k-blocks) descriptors
    Tensor tSrK = thr_s.partition_fragment_B(sKw);  // (MMA, 1, kv_width/16, stage)
    Tensor tSrR = thr_s.partition_fragment_B(sRw);  // (MMA, 1, d_rope/16, stage)
    Tensor tOrV = thr_o.partition_fragment_B(sVw);  // (MMA, 1, tokens/16, stage)
    // Q's RoPE columns in registers (Traits::kQRopeInRegisters): the RoPE k-blocks of S then
    // run as register-sourced wgmma against the same shared-memory keys.
    Tensor tSrQr = thr_r.partition_fragment_A(make_tensor(
        make_smem_ptr(smem.q.data()), make_layout(Shape<Int<kWGRows>, Int<kHeadDimRope>>{})));
    Tensor tScQr = thr_r.partition_A(make_identity_tensor(Shape<Int<kWGRows>, Int<kHeadDimRope>>{}));
    Tensor tSrKr = thr_r.partition_fragment_B(sKw);
    Tensor tSrRr = thr_r.partition_fragment_B(sRw);
    Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kWGRows>, Int<kScoreCols>>{});
    Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kWGRows>, Int<kOutCols>>{});
    // P of the page whose P V is next, 16-bit in the accumulator's layout (split scores keep
    // P in shared memory instead: this warpgroup's columns of it are tSsP).
    Tensor tOrP = make_tensor<Element>(tSrS.layout());
    Tensor tSsP = thr_s.partition_C(flat_divide(sP, Shape<Int<kWGRows>, Int<kScoreCols>>{})(_, _, 0, wg.col_wg));

    // Row/column views and the (row, col) coordinate of every accumulator element.
    Tensor tSrS_rc = make_tensor(tSrS.data(), accumulator_rowcol(tSrS.layout()));
    Tensor tOrO_rc = make_tensor(tOrO.data(), accumulator_rowcol(tOrO.layout()));
    Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kWGRows>, Int<kScoreCols>>{}));
    Tensor tScS_rc = make_tensor(tScS.data(), accumulator_rowcol(tScS.layout()));
    Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kWGRows>, Int<kOutCols>>{}));
    Tensor tOcO_rc = make_tensor(tOcO.data(), accumulator_rowcol(tOcO.layout()));
    constexpr int kRows = decltype(size<0>(tSrS_rc))::value;  // rows per thread (2)
    static_assert(kRows == decltype(size<0>(tOrO_rc))::value, "S and O rows must coincide");

    OnlineSoftmax<kRows> softmax;
    PipelineState state;  // consumers start at stage 0, phase 0
    // Everything the page steps below work on, by reference: the pipeline, this warpgroup's
    // wgmma operands and accumulators, and its running softmax.
    struct {
      const DecodeParams& params;
      SharedStorage& smem;
      Pipeline& pipeline;
      PipelineState& state;
      WarpgroupRole const& wg;
      int consumer_tid;
      decltype(mma_s)& mma_s;
      decltype(mma_r)& mma_r;
      decltype(mma_o)& mma_o;
      decltype(thr_o) const& thr_o;
      decltype(tSrQ) const& q;
      decltype(tSrQr) const& q_rope;  // Q's RoPE columns in registers
      decltype(tSrK) const& k;
      decltype(tSrKr) const& k_for_rope;  // the inline RoPE k-blocks, for the register-A wgmma
      decltype(tSrR) const& rope;
      decltype(tSrRr) const& rope_for_rope;  // the shared RoPE tile, for the register-A wgmma
      decltype(tOrV) const& v;
      decltype(sP) const& smem_p;
      decltype(tSsP)& p_share;  // this warpgroup's columns of the shared P
      decltype(tSrS)& s;
      decltype(tSrS_rc)& s_rc;
      decltype(tScS_rc) const& s_coord;
      decltype(tOrO)& o;
      decltype(tOrO_rc)& o_rc;
      decltype(tOrP)& p;
      OnlineSoftmax<kRows>& softmax;
    } t{p, smem, pipeline, state, wg, consumer_tid, mma_s, mma_r, mma_o, thr_o, tSrQ, tSrQr,
        tSrK, tSrKr, tSrR, tSrRr, tOrV, sP, tSsP, tSrS, tSrS_rc, tScS_rc, tOrO, tOrO_rc, tOrP,
        softmax};

    const PackedRows rows(p.group_size, kv_head);

    // The producer starts its KV loads only once the first Q tile's loads are issued: all
    // CTAs start together and their first pages fill the memory system, so a Q load queued
    // behind them would arrive late while the ring sat full.
    bool producer_released = false;
    for (int part = blockIdx.z; part < p.num_parts; part += gridDim.z) {
      for (int idx = PartSchedule::load<true>(p, part).begin_batch;
           idx <= PartSchedule::load<true>(p, part).end_batch; ++idx) {
        const int batch = PartSchedule::request_of(p, idx);
        consumer_sync(kConsumerThreads, ConsumerBarrier::kQFree);
        SmemIO<Traits>::load_q(p, smem, batch, rows, m_block, consumer_tid);
        if (!producer_released) {  // the RoPE register loads need not wait
          barrier_arrive(kConsumerThreads + 32, ConsumerBarrier::kQIssued);
          producer_released = true;
        }
        if constexpr (Traits::kQRopeInRegisters) {
          SmemIO<Traits>::load_q_rope(p, batch, rows, wg.row_base, tSrQr, tScQr);
        }
        // The piece's bounds (a chain of dependent global loads) are read while Q is in flight.
        const WorkPiece w = PartSchedule::load<true>(p, part).piece(p, idx, batch);
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        if constexpr (Traits::kQRopeInRegisters) { warpgroup_fence_operand(tSrQr); }
        cutlass::arch::fence_view_async_shared();  // Q written by threads, read by wgmma
        consumer_sync(kConsumerThreads, ConsumerBarrier::kQReady);

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
        if constexpr (Traits::kOverlapPV) {
          pages_overlapped(t, w, mask);
        } else {
          pages_in_series(t, w, mask);
        }

        float row_total[kRows], inv_sum[kRows], lse[kRows];
        softmax.quad_sums(row_total);
        if constexpr (kSplit) {  // each warpgroup summed only its own tokens
          combine_across_warpgroups</*kMax=*/false>(smem.row_sum, row_total, tScS_rc, wg,
                                                     ConsumerBarrier::kRowSums);
        }
        softmax.finalize(row_total, inv_sum, lse);
        Epilogue<Traits>::store(p, smem, w, tOrO, tOrO_rc, tOcO_rc, inv_sum, lse, rows, wg);
      }
    }
    if (!producer_released) {  // a CTA without work
      barrier_arrive(kConsumerThreads + 32, ConsumerBarrier::kQIssued);
    }
  }

  // ------------------------------------------------------------------ the page loop
  // Page by page, one wgmma batch in flight at a time (see Traits::kOverlapPV).
  template <class T, int kRows>
  static __device__ void pages_in_series(T& t, const WorkPiece& w, PieceMask<kRows> const& mask) {
    for (int page = w.page_begin; page < w.page_end; ++page) {
      float rescale[kRows];
      const int stage = wait_page(t, w.seqlen, page);
      warpgroup_fence_operand(t.s);
      issue_scores(t, stage);
      warpgroup_wait<0>();
      warpgroup_fence_operand(t.s);
      softmax_page(t, mask, page, rescale);
      rescale_o_and_stage_p(t, rescale);
      if constexpr (!kSplit) { warpgroup_fence_operand(t.p); }
      warpgroup_fence_operand(t.o);
      issue_pv(t, stage);
      warpgroup_wait<0>();
      warpgroup_fence_operand(t.o);
      t.pipeline.consumer_release(t.state);
      ++t.state;
    }
  }

  // A software pipeline over the pages: page n's S = Q K^T and page n-1's O += P V are issued
  // back to back, and page n's softmax runs while the tensor cores finish page n-1's P V; P
  // waits in registers for the next iteration. The first page has no predecessor and is
  // peeled off, so that no branch sits between two open wgmma batches (ptxas would serialise
  // every wgmma).
  template <class T, int kRows>
  static __device__ void pages_overlapped(T& t, const WorkPiece& w, PieceMask<kRows> const& mask) {
    if (w.page_begin >= w.page_end) { return; }
    float rescale[kRows];
    warpgroup_fence_operand(t.s);
    issue_scores(t, wait_page(t, w.seqlen, w.page_begin));
    warpgroup_wait<0>();
    warpgroup_fence_operand(t.s);
    softmax_page(t, mask, w.page_begin, rescale);
    rescale_o_and_stage_p(t, rescale);
    PipelineState prev_state = t.state;
    ++t.state;
    for (int page = w.page_begin + 1; page < w.page_end; ++page) {
      const int stage = wait_page(t, w.seqlen, page);
      warpgroup_fence_operand(t.s);
      warpgroup_fence_operand(t.p);
      warpgroup_fence_operand(t.o);
      issue_scores(t, stage);
      issue_pv(t, prev_state.index());
      warpgroup_wait<1>();
      warpgroup_fence_operand(t.s);
      softmax_page(t, mask, page, rescale);
      warpgroup_wait<0>();  // page n-1's P V is in O; its stage can be refilled
      warpgroup_fence_operand(t.o);
      warpgroup_fence_operand(t.p);
      t.pipeline.consumer_release(prev_state);
      rescale_o_and_stage_p(t, rescale);
      prev_state = t.state;
      ++t.state;
    }
    warpgroup_fence_operand(t.p);
    warpgroup_fence_operand(t.o);
    issue_pv(t, prev_state.index());
    warpgroup_wait<0>();
    warpgroup_fence_operand(t.o);
    t.pipeline.consumer_release(prev_state);
  }

  // ------------------------------------------------------------------ page steps
  // Waits for a page's stage and zeroes its rows past the sequence end; returns the stage.
  template <class T>
  static __device__ int wait_page(T& t, int seqlen, int page) {
    t.pipeline.consumer_wait(t.state);
    const int stage = t.state.index();
    const int valid_rows = seqlen - page * kBlockN;
    if (valid_rows < kBlockN) {
      SmemIO<Traits>::zero_rows_past_end(t.smem, stage, valid_rows, t.consumer_tid);
      cutlass::arch::fence_view_async_shared();
      consumer_sync(kConsumerThreads, ConsumerBarrier::kPageMasked);
    }
    return stage;
  }

  // Issues S = Q[:, :d_nope] K_nope^T + Q[:, d_nope:] R^T as one wgmma batch; R is the page's
  // next k-blocks (inline) or the stage's rope tile (shared).
  template <class T>
  static __device__ void issue_scores(T& t, int stage) {
    constexpr int kNope = Traits::kNopeBlocks, kRope = Traits::kRopeBlocks;
    constexpr int kRopeB = Traits::kRopeFirstBlockB;
    warpgroup_arrive();
    t.mma_s.accumulate_ = GMMA::ScaleOut::Zero;
    gemm_k_blocks<0, 0, kNope>(t.mma_s, t.q, t.k(_, _, _, stage), t.s);
    if constexpr (Traits::kQRopeInRegisters) {
      t.mma_r.accumulate_ = GMMA::ScaleOut::One;
      if constexpr (Traits::kSharedRope) {
        gemm_k_blocks<0, kRopeB, kRope>(t.mma_r, t.q_rope, t.rope_for_rope(_, _, _, stage), t.s);
      } else {
        gemm_k_blocks<0, kRopeB, kRope>(t.mma_r, t.q_rope, t.k_for_rope(_, _, _, stage), t.s);
      }
    } else if constexpr (Traits::kSharedRope) {
      gemm_k_blocks<kNope, kRopeB, kRope>(t.mma_s, t.q, t.rope(_, _, _, stage), t.s);
    } else {
      gemm_k_blocks<kNope, kRopeB, kRope>(t.mma_s, t.q, t.k(_, _, _, stage), t.s);
    }
    warpgroup_commit_batch();
  }

  // Scales and masks the page's scores, updates the running softmax and turns the scores into
  // probabilities in place; rescale[i] is what O's row i must be multiplied by.
  template <class T, int kRows>
  static __device__ void softmax_page(T& t, PieceMask<kRows> const& mask, int page,
                                      float (&rescale)[kRows]) {
    const int first_key = page * kBlockN + t.wg.col_wg * kScoreCols;  // of this warpgroup's share
    const bool needs_mask = page * kBlockN + kBlockN > mask.mask_from;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(t.s_rc); ++j) {
        const float s = t.s_rc(i, j) * t.params.scale_log2;
        const int key = first_key + get<1>(t.s_coord(i, j));
        const bool masked = needs_mask && key > mask.row_last_key[i];
        t.s_rc(i, j) = masked ? -INFINITY : s;
      }
    }
    float row_page_max[kRows];
    t.softmax.page_max(t.s_rc, row_page_max);
    if constexpr (kSplit) {  // the row maximum over every warpgroup's tokens
      combine_across_warpgroups</*kMax=*/true>(t.smem.row_max, row_page_max, t.s_coord, t.wg,
                                               ConsumerBarrier::kScoresMax);
    }
    t.softmax.update(t.s_rc, row_page_max, rescale);
  }

  // Rescales O and stages the page's P for its P V (issued with the next page's S).
  template <class T, int kRows>
  static __device__ void rescale_o_and_stage_p(T& t, float const (&rescale)[kRows]) {
    // Once the running maxima settle, most pages leave every row's factor at exactly 1: a warp
    // whose rows all kept their maximum skips the multiplies.
    bool changed = false;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) { changed |= rescale[i] != 1.f; }
    if (__any_sync(0xffffffff, changed)) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<1>(t.o_rc); ++j) { t.o_rc(i, j) *= rescale[i]; }
      }
    }
    if constexpr (kSplit) {
      // Every warpgroup writes its tokens' probabilities; all then read the whole P. The
      // shared P is free: both warpgroups finished the previous page's P V before kScoresMax.
      copy(convert_fragment<Element>(t.s), t.p_share);
      cutlass::arch::fence_view_async_shared();  // P written by threads, read by wgmma
      consumer_sync(kConsumerThreads, ConsumerBarrier::kPReady);
    } else {
      copy(convert_fragment<Element>(t.s), t.p);
    }
  }

  // Issues O += P V for one stage as one wgmma batch, not waited for: P from registers, or
  // from shared memory when the scores are split over warpgroups. The caller fences P and O
  // before the batch that precedes this one: an operand fence between two open batches counts
  // as a write to a wgmma input, and ptxas would then serialise every wgmma.
  template <class T>
  static __device__ void issue_pv(T& t, int stage) {
    warpgroup_arrive();
    if constexpr (kSplit) {
      Tensor tOsP = t.thr_o.partition_fragment_A(t.smem_p);
      gemm_k_blocks<0, 0, decltype(size<2>(tOsP))::value>(t.mma_o, tOsP, t.v(_, _, _, stage), t.o);
    } else {
      Tensor tOrP_a = make_tensor(t.p.data(), accumulator_as_operand_a(t.p.layout()));
      gemm_k_blocks<0, 0, decltype(size<2>(tOrP_a))::value>(t.mma_o, tOrP_a, t.v(_, _, _, stage), t.o);
    }
    warpgroup_commit_batch();
  }

  // Split scores: combines a per-row statistic of this thread's rows (max or sum) with the
  // other consumer warpgroups' values for the same rows, through `exchange` in shared memory.
  template <bool kMax, int kRows, class TensorC>
  static __device__ void combine_across_warpgroups(float (&exchange)[Traits::kNumColWGs][kWGRows],
                                                   float (&value)[kRows], TensorC const& coord,
                                                   WarpgroupRole const& wg, ConsumerBarrier id) {
    if (wg.wg_tid % 4 == 0) {  // one lane of each row's quad publishes
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) { exchange[wg.col_wg][get<0>(coord(i, 0))] = value[i]; }
    }
    consumer_sync(kConsumerThreads, id);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int row = get<0>(coord(i, 0));
      float combined = exchange[0][row];
      CUTLASS_PRAGMA_UNROLL
      for (int other = 1; other < Traits::kNumColWGs; ++other) {
        combined = kMax ? fmaxf(combined, exchange[other][row]) : combined + exchange[other][row];
      }
      value[i] = combined;
    }
  }
};

}  // namespace flash_gla::hopper
