// The transposed consumer (Traits::kTransposed): one warpgroup for a KV head with at most
// kQueryCols packed query rows (GTA's 4 to 16 query heads per KV head, small groups under
// tensor parallelism).
//
// A 64-row tile would be mostly padding there (60 of 64 rows for GTA-8 at s_q 1), and every
// padding row costs its share of both wgmmas and of the softmax. Here the page's 64 tokens are
// the wgmma's M and the query rows its N:
//   S^T = K Q^T      A: the page, K-major as the cache stores it; B: the Q tile (N x d_qk)
//   O^T += V^T P^T   A: the same page viewed dims x tokens; B: P (N x tokens), both MN-major
// so the MMA and softmax work per page follows the real rows. A query row's softmax runs over
// the 64 tokens of a column, which the warpgroup's 4 warps hold 16 each: within a warp the 8
// lanes of a column reduce by shuffles; P goes to shared memory (the B operand of O^T) behind
// one barrier per step, which also tells whether any warp's maxima rose (stage_p below).
//
// A softmax step covers Traits::kStepPages pages (two where the stages leave room): one S^T M
// tile per page in one wgmma batch, one reduction of the column maxima and one barrier for all
// of them, so that the fixed costs of the chain are paid per step, not per page.
//
// The producer (with an FP8 cache, the warpgroups that dequantise it into the same 16-bit
// stages), the schedule, the Q tile's load, the rows-past-end zeroing and the split/combine
// contract are the other instances'; only the epilogue reads O^T's (dim, row) layout.
//
// FP8 with unscaled stages (Traits::kUnscaledStages, GTA: one scale group per token): a stage
// holds the e4m3 values as fp16 without their scales, and the page's token scales beside it.
// The scale of token t multiplies row t of S^T's latent part, accumulated apart from the RoPE
// part (whose keys are not scaled), and is folded into P for P V: P'[c][t] = P[c][t] s_t u. The
// unit u, a power of two with u times the largest scale of the piece's pages so far in [1, 2)
// (the producer notes each page's largest), keeps P' below 2 whatever the scales' magnitude and
// spread; where a page lowers it, O^T (in units of u) is multiplied by the ratio, a power of two,
// and O^T is divided by the last u at the end.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "common/packed_rows.h"
#include "common/params.h"
#include "decode/fragment_utils.cuh"
#include "decode/page_loop.cuh"
#include "decode/q_tile.cuh"
#include "decode/roles.cuh"
#include "decode/schedule.cuh"
#include "decode/smem_io.cuh"
#include "decode/softmax.cuh"

namespace flash_gla::hopper {

using namespace cute;

template <class Traits>
struct TransposedConsumer {
  using Element = typename Traits::Element;
  using StageElement = typename Traits::StageElement;  // of the KV stages and P
  static constexpr bool kUnscaled = Traits::kUnscaledStages;
  static_assert(!kUnscaled || Traits::kRopeTile, "unscaled stages: S^T's RoPE part comes from the rope tile");
  static constexpr int kN = Traits::kQueryCols;  // query rows of the tile: the wgmma N
  static constexpr int kBlockN = Traits::kBlockN;  // tokens per page: the wgmma M of S^T
  static constexpr int kStepPages = Traits::kStepPages;  // pages per softmax step
  static constexpr int kStepTokens = Traits::kStepTokens;
  static constexpr int kHeadDimV = Traits::kHeadDimV;
  static constexpr int kThreads = Traits::kNumConsumerThreads;  // one warpgroup
  static constexpr int kChunk = 16 / sizeof(Element);
  static_assert(kThreads == 128, "one consumer warpgroup");

  static __device__ float warp_column_max(float x) {  // over the 8 lanes that share lane % 4
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 4));
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 8));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 16));
  }
  static __device__ float warp_column_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 4);
    x += __shfl_xor_sync(0xffffffff, x, 8);
    return x + __shfl_xor_sync(0xffffffff, x, 16);
  }

  // Per-column sums of every warp (lanes 0-3 of each hold all kN columns) added over the
  // warpgroup through smem.col_exchange.
  template <int kCols, class TensorC>
  static __device__ void sum_across_warps(typename Traits::SharedStorage& smem, float (&value)[kCols],
                                          TensorC const& coord, int warp, int lane) {
    if (lane < 4) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) { smem.col_exchange[warp][get<1>(coord(0, c))] = value[c]; }
    }
    consumer_sync(kThreads, ConsumerBarrier::kRowSums);
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const int col = get<1>(coord(0, c));
      value[c] = smem.col_exchange[0][col] + smem.col_exchange[1][col] + smem.col_exchange[2][col] +
                 smem.col_exchange[3][col];
    }
  }

  // A power of two u with u * scale in [1, 2) (1 for a zero, subnormal or non-finite scale).
  static __device__ float unit_for(float scale) {
    const int exponent = (__float_as_int(scale) >> 23) & 0xff;
    return exponent >= 1 && exponent <= 253 ? __int_as_float((254 - exponent) << 23) : 1.f;
  }

  static __device__ void run(const DecodeParams& p, typename Traits::SharedStorage& smem,
                             typename Traits::Pipeline& pipeline, int kv_head, int m_block, int consumer_tid) {
    const int warp = __shfl_sync(0xffffffff, consumer_tid / 32, 0);
    const int lane = consumer_tid % 32;
    WarpgroupRole wg;
    wg.row_wg = wg.col_wg = wg.page_wg = 0;
    wg.row_base = m_block * kN;
    wg.wg_tid = consumer_tid;

    typename Traits::TiledMmaS mma_s;
    typename Traits::TiledMmaSRope mma_r;  // S^T's RoPE part (q's dtype)
    typename Traits::TiledMmaO mma_o;
    auto thr_s = mma_s.get_thread_slice(consumer_tid);
    auto thr_r = mma_r.get_thread_slice(consumer_tid);
    auto thr_o = mma_o.get_thread_slice(consumer_tid);

    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});    // (N, d_qk)
    // Q's latent columns as they multiply the stages (in place converted to fp16 if unscaled).
    Tensor sQs = make_tensor(make_smem_ptr(reinterpret_cast<StageElement*>(smem.q.data())),
                             typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutK{});   // (tokens, width, stage)
    Tensor sV = make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutV{});   // (width, tokens, stage)
    Tensor sR = make_tensor(make_smem_ptr(smem.rope.data()), typename Traits::SmemLayoutRope{});
    Tensor sP = make_tensor(make_smem_ptr(smem.p.data()), typename Traits::SmemLayoutPT{});   // (N, tokens, slot)
    Tensor sVo = flat_divide(sV, Shape<Int<kHeadDimV>, Int<kBlockN>>{})(_, _, 0, 0, _);     // V: the first dv dims

    Tensor tSrK = thr_s.partition_fragment_A(sK);   // (MMA, 1, width/16, stage) descriptors
    Tensor tSrQ = thr_s.partition_fragment_B(sQs);  // (MMA, 1, d_qk/16)
    // The RoPE k-blocks: (MMA, 1, d_rope/16, stage), and Q for them (unscaled: in q's dtype).
    auto const& thr_rope = conditional_return(bool_constant<kUnscaled>{}, thr_r, thr_s);
    Tensor tSrR = thr_rope.partition_fragment_A(sR);
    Tensor tSrQr = thr_rope.partition_fragment_B(sQ);
    Tensor tOrV = thr_o.partition_fragment_A(sVo);  // (MMA, dv/64, tokens/16, stage)
    Tensor tOrP = thr_o.partition_fragment_B(sP);   // (MMA, 1, step tokens/16, slot)
    // S^T of a step: one M tile per page, (MMA, kStepPages, 1).
    Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kStepTokens>, Int<kN>>{});
    Tensor tSrSr = partition_fragment_C(mma_r, Shape<Int<kStepTokens>, Int<kN>>{});  // unscaled: the RoPE part
    Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kHeadDimV>, Int<kN>>{});
    // (token or dim, query column) views and coordinates: a thread holds 2 tokens of each page
    // of the step in each of its kN / 4 columns, and the same columns of O^T (the accumulator's
    // column map does not depend on M). Token t of the view lies in the step's page t / 2.
    Tensor tSrS_rc = make_tensor(tSrS.data(), accumulator_rowcol(tSrS.layout()));
    Tensor tSrSr_rc = make_tensor(tSrSr.data(), accumulator_rowcol(tSrSr.layout()));
    Tensor tSrS_cr = make_tensor(tSrS.data(), select<1, 0>(accumulator_rowcol(tSrS.layout())));  // (column, token)
    Tensor tOrO_rc = make_tensor(tOrO.data(), accumulator_rowcol(tOrO.layout()));
    Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kStepTokens>, Int<kN>>{}));
    Tensor tScS_rc = make_tensor(tScS.data(), accumulator_rowcol(tScS.layout()));
    Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kHeadDimV>, Int<kN>>{}));
    Tensor tOcO_rc = make_tensor(tOcO.data(), accumulator_rowcol(tOcO.layout()));
    constexpr int kTokens = decltype(size<0>(tSrS_rc))::value;  // 2 per page of the step
    constexpr int kCols = decltype(size<1>(tSrS_rc))::value;    // kN / 4
    static_assert(kTokens == 2 * kStepPages, "two tokens of each page per thread");
    static_assert(kCols == decltype(size<1>(tOrO_rc))::value, "S^T and O^T columns must coincide");

    typename Traits::Pipeline::PipelineState state;
    PageContext<Traits> ctx{p, smem, pipeline, state, wg, consumer_tid};
    const PackedRows rows(p.group_size, kv_head);
    // The shared-memory address of each of the thread's P elements in slot 0: a slot is whole
    // 1 KB swizzle atoms, so slot 1 lies kPSlotBytes further with the same swizzle. Computed
    // once, where each store would otherwise swizzle its 64-bit address anew.
    constexpr uint32_t kPSlotBytes = kN * kStepTokens * sizeof(StageElement);
    static_assert(kPSlotBytes % 1024 == 0, "P's slots must be whole swizzle atoms");
    uint32_t p_address[kTokens][kCols / 2];  // of columns c and c + 1, c even
    CUTLASS_PRAGMA_UNROLL
    for (int t = 0; t < kTokens; ++t) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; c += 2) {
        p_address[t][c / 2] = cast_smem_ptr_to_uint(&sP(get<1>(tScS_rc(t, c)), get<0>(tScS_rc(t, c)), 0));
      }
    }

    QTile<Traits> q_tile;
    PieceWalk</*kReload=*/true> walk;
    for (walk.first_part(); walk.in_parts(p); walk.next_part()) {
      for (walk.first_item(p); walk.in_part(p); walk.next_item()) {
        const int request = walk.request(p);
        const WorkPiece w = q_tile.load(p, smem, walk, request, rows, m_block, consumer_tid, [] {});

        // Causal: query token r of s_q sees keys up to L - s_q + r.
        int col_last_key[kCols];
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kCols; ++c) {
          const int token = rows.group.div(wg.row_base + int(get<1>(tScS_rc(0, c))));
          col_last_key[c] = p.causal ? min(w.seqlen - p.seqlen_q + token, w.seqlen - 1) : w.seqlen - 1;
        }
        const int mask_from = p.causal ? w.seqlen - p.seqlen_q + 1 : w.seqlen;

        // The online softmax of the other instances with its rows as this tile's columns: running
        // maxima over the whole warpgroup, sums thread-partial over its tokens.
        OnlineSoftmax<kCols> softmax;
        softmax.reset();
        clear(tOrO);
        // The stages of the current step's pages and of the previous step's (whose P V is under
        // way); a stage is released by its index alone.
        int stage[kStepPages] = {}, prev_stage[kStepPages] = {};
        using PipelineState = typename Traits::Pipeline::PipelineState;
        // S^T = K Q^T for each of the step's kPages pages (its M tile): the page's latent
        // k-blocks, then its RoPE k-blocks (the next k-blocks of the page inline, the stage's rope
        // tile when shared) against Q's.
        auto issue_scores = [&]<int kPages>() {
          constexpr int kNope = Traits::kNopeBlocks, kRope = Traits::kRopeBlocks;
          warpgroup_arrive();
          for_each(make_int_sequence<kPages>{}, [&](auto page) {
            constexpr int j = decltype(page)::value;
            Tensor s = m_tile<j>(tSrS);
            mma_s.accumulate_ = GMMA::ScaleOut::Zero;
            gemm_k_blocks<0, 0, kNope>(mma_s, tSrK(_, _, _, stage[j]), tSrQ, s);
            if constexpr (kUnscaled) {
              Tensor sr = m_tile<j>(tSrSr);
              mma_r.accumulate_ = GMMA::ScaleOut::Zero;
              gemm_k_blocks<0, kNope, kRope>(mma_r, tSrR(_, _, _, stage[j]), tSrQr, sr);
            } else if constexpr (Traits::kRopeTile) {
              gemm_k_blocks<0, kNope, kRope>(mma_s, tSrR(_, _, _, stage[j]), tSrQ, s);
            } else {
              gemm_k_blocks<kNope, kNope, kRope>(mma_s, tSrK(_, _, _, stage[j]), tSrQ, s);
            }
          });
          warpgroup_commit_batch();
        };
        // O^T += V^T P^T for the previous step's kPages pages: page j's V against its k-blocks of
        // P, from P's slot.
        auto issue_pv = [&]<int kPages>(int slot) {
          constexpr int kPageBlocks = kBlockN / 16;
          warpgroup_arrive();
          for_each(make_int_sequence<kPages>{}, [&](auto page) {
            constexpr int j = decltype(page)::value;
            gemm_k_blocks<0, j * kPageBlocks, kPageBlocks>(mma_o, tOrV(_, _, _, prev_stage[j]), tOrP(_, _, _, slot), tOrO);
          });
          warpgroup_commit_batch();
        };
        // Mask the step's scores, then each column's maximum over the warp's tokens, in log2 units.
        // The scores stay unscaled: P's exponent is one FMA (s * scale_log2 - max). A step of
        // fewer pages than kStepPages (a piece's odd last page) leaves the rest of its tokens at
        // -inf. Unscaled stages: the scales of the thread's tokens, and P's factors.
        float warp_max[kCols], token_scale[kTokens], p_factor[kTokens];
        float unit = 1.f, unit_shift = 1.f;  // unit_shift: O^T's factor into this step's unit
        auto score_step = [&]<int kPages>(int first_page) {
          if constexpr (kUnscaled) {
            float page_unit = unit_for(smem.raw.stage_max_scale[stage[0]]);
            CUTLASS_PRAGMA_UNROLL
            for (int j = 1; j < kPages; ++j) { page_unit = fminf(page_unit, unit_for(smem.raw.stage_max_scale[stage[j]])); }
            const float next = first_page == w.page_begin ? page_unit : fminf(unit, page_unit);
            unit_shift = next / unit;
            unit = next;
            CUTLASS_PRAGMA_UNROLL
            for (int t = 0; t < kTokens; ++t) {
              token_scale[t] = t / 2 < kPages ? smem.raw.stage_scale[stage[t / 2]][get<0>(tScS_rc(t, 0)) - t / 2 * kBlockN] : 0.f;
              p_factor[t] = token_scale[t] * unit;
            }
          }
          // Only a piece's last pages (and a causal tail) mask anything: the other steps skip the
          // per-score comparisons.
          auto reduce = [&]<bool kMasked>() {
            CUTLASS_PRAGMA_UNROLL
            for (int c = 0; c < kCols; ++c) {
              float m = -INFINITY;
              CUTLASS_PRAGMA_UNROLL
              for (int t = 0; t < kTokens; ++t) {
                if (t / 2 >= kPages) {
                  tSrS_rc(t, c) = -INFINITY;
                  continue;
                }
                float s = tSrS_rc(t, c);
                if constexpr (kUnscaled) { s = fmaf(s, token_scale[t], tSrSr_rc(t, c)); }
                if constexpr (kMasked) {
                  const int key = first_page * kBlockN + get<0>(tScS_rc(t, c));
                  s = key > col_last_key[c] ? -INFINITY : s;
                }
                tSrS_rc(t, c) = s;
                m = fmaxf(m, s);
              }
              warp_max[c] = warp_column_max(m) * p.scale_log2;
            }
          };
          if ((first_page + kPages) * kBlockN > mask_from) {
            reduce.template operator()<true>();
          } else {
            reduce.template operator()<false>();
          }
        };
        // P (query row x token) into its slot for the step's P V, once the previous step's P V
        // is done. The slot alternates: the other one may still be read by the previous step's P
        // V in another warp, while this slot's last reader (two steps back) finished in every
        // warp before any passed the previous step's kPReady.
        //
        // The column maxima over the warpgroup are only needed where a step raises one: P is
        // written against the running maxima, which hold unless a warp saw a larger score, and
        // the barrier that publishes P also tells every thread whether any did. Only then are
        // the warps' maxima combined (through smem.col_exchange, written before the barrier),
        // O^T rescaled and P written again behind a second barrier: at the first step and when
        // the scores climb, a few steps of a long sequence. Either way P, O^T and the sums are
        // those of the step-by-step online softmax.
        auto stage_p = [&]<int kPages>(int slot) {
          // Columns c and c + 1 (c even) of a token are adjacent in P: one 32-bit store.
          auto write_p = [&](int t, int c, float prob0, float prob1) {
            if (t / 2 < kPages) {  // a missing page's half of P is never read
              if constexpr (kUnscaled) {
                prob0 *= p_factor[t];
                prob1 *= p_factor[t];
              }
              store_shared_b32(p_address[t][c / 2] + slot * kPSlotBytes, pack_pair<StageElement>(prob0, prob1));
            }
          };
          float prob[kTokens][kCols], page_sum[kCols];
          bool raises = false;
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < kCols; ++c) {
            raises |= warp_max[c] > softmax.row_max[c];
            // A column that has seen no key yet subtracts 0, so that exp2 gives 0, not NaN.
            const float ref = softmax.row_max[c] == -INFINITY ? 0.f : softmax.row_max[c];
            page_sum[c] = 0.f;
            CUTLASS_PRAGMA_UNROLL
            for (int t = 0; t < kTokens; ++t) {
              prob[t][c] = exp2f(fmaf(tSrS_rc(t, c), p.scale_log2, -ref));
              page_sum[c] += prob[t][c];
            }
            if (c % 2 == 1) {
              CUTLASS_PRAGMA_UNROLL
              for (int t = 0; t < kTokens; ++t) { write_p(t, c - 1, prob[t][c - 1], prob[t][c]); }
            }
            if (lane < 4) { smem.col_exchange[warp][get<1>(tScS_rc(0, c))] = warp_max[c]; }
          }
          cutlass::arch::fence_view_async_shared();  // P written by threads, read by wgmma
          if (!consumer_sync_any(kThreads, ConsumerBarrier::kPReady, raises)) {
            CUTLASS_PRAGMA_UNROLL
            for (int c = 0; c < kCols; ++c) { softmax.row_sum[c] += page_sum[c]; }
            return;
          }
          float page_max[kCols], rescale[kCols];
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < kCols; ++c) {
            const int col = get<1>(tScS_rc(0, c));
            page_max[c] = fmaxf(fmaxf(smem.col_exchange[0][col], smem.col_exchange[1][col]),
                                fmaxf(smem.col_exchange[2][col], smem.col_exchange[3][col]));
          }
          softmax.update(tSrS_cr, page_max, p.scale_log2, rescale);
          CUTLASS_PRAGMA_UNROLL
          for (int d = 0; d < size<0>(tOrO_rc); ++d) {
            CUTLASS_PRAGMA_UNROLL
            for (int c = 0; c < kCols; ++c) { tOrO_rc(d, c) *= rescale[c]; }
          }
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < kCols; c += 2) {
            CUTLASS_PRAGMA_UNROLL
            for (int t = 0; t < kTokens; ++t) { write_p(t, c, tSrS_rc(t, c), tSrS_rc(t, c + 1)); }
          }
          cutlass::arch::fence_view_async_shared();
          consumer_sync(kThreads, ConsumerBarrier::kScoresMax);
        };

        // A software pipeline over the steps, as PageLoop::overlapped: step n's S^T and step
        // n-1's P V are issued back to back, and step n's scores are reduced while the tensor
        // cores finish step n-1's P V. Every step is its own instance (kPages pages after a step
        // of kPrev), so that no branch sits between two open wgmma batches.
        auto step = [&]<int kPages, int kPrev>(int first_page, int slot) {
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kPages; ++j) {
            stage[j] = PageLoop<Traits>::wait_page(ctx, w.seqlen, first_page + j);
            ++state;
          }
          warpgroup_fence_operand(tSrS);
          if constexpr (kUnscaled) { warpgroup_fence_operand(tSrSr); }
          warpgroup_fence_operand(tOrO);
          issue_scores.template operator()<kPages>();
          if constexpr (kPrev > 0) { issue_pv.template operator()<kPrev>(slot ^ 1); }
          warpgroup_wait<(kPrev > 0 ? 1 : 0)>();
          warpgroup_fence_operand(tSrS);
          if constexpr (kUnscaled) { warpgroup_fence_operand(tSrSr); }
          score_step.template operator()<kPages>(first_page);
          if constexpr (kPrev > 0) {
            warpgroup_wait<0>();  // step n-1's P V is in O^T; its stages can be refilled
            warpgroup_fence_operand(tOrO);
            CUTLASS_PRAGMA_UNROLL
            for (int j = 0; j < kPrev; ++j) { pipeline.consumer_release(PipelineState(prev_stage[j], 0, 0)); }
            if constexpr (kUnscaled) {
              if (unit_shift != 1.f) {  // the same for the whole warpgroup
                CUTLASS_PRAGMA_UNROLL
                for (int i = 0; i < size(tOrO); ++i) { tOrO(i) *= unit_shift; }
              }
            }
          }
          stage_p.template operator()<kPages>(slot);
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kStepPages; ++j) { prev_stage[j] = stage[j]; }
        };
        // The last step's P V.
        auto finish = [&]<int kPrev>(int slot) {
          warpgroup_fence_operand(tOrO);
          issue_pv.template operator()<kPrev>(slot);
          warpgroup_wait<0>();
          warpgroup_fence_operand(tOrO);
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kPrev; ++j) { pipeline.consumer_release(PipelineState(prev_stage[j], 0, 0)); }
        };
        const int pages = w.page_end - w.page_begin;
        if (pages > 0 && pages < kStepPages) {
          step.template operator()<1, 0>(w.page_begin, 0);
          finish.template operator()<1>(0);
        } else if (pages > 0) {
          step.template operator()<kStepPages, 0>(w.page_begin, 0);
          int first = w.page_begin + kStepPages;
          auto slot_of = [&](int page) { return (page - w.page_begin) / kStepPages & 1; };
          for (; first + kStepPages <= w.page_end; first += kStepPages) {
            step.template operator()<kStepPages, kStepPages>(first, slot_of(first));
          }
          if (kStepPages > 1 && first < w.page_end) {  // an odd last page: a step of its own
            step.template operator()<1, kStepPages>(first, slot_of(first));
            finish.template operator()<1>(slot_of(first));
          } else {
            finish.template operator()<kStepPages>(slot_of(first - kStepPages));
          }
        }

        // Column totals and the epilogue.
        float col_sum[kCols];
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kCols; ++c) { col_sum[c] = warp_column_sum(softmax.row_sum[c]); }
        sum_across_warps(smem, col_sum, tScS_rc, warp, lane);
        store(p, smem, w, tOrO_rc, tOcO_rc, tScS_rc, softmax.row_max, col_sum, 1.f / unit, rows, wg.row_base,
              warp, lane);
      }
    }
    q_tile.finish();
  }

  // Normalised O and LSE of the piece: final rows as 16-bit O through shared memory (the Q
  // tile, which no wgmma reads after the last S^T) in whole 16-byte vectors; a split request's
  // fp32 partials straight from the accumulator.
  template <class TensorO, class TensorCO, class TensorCS, int kCols>
  static __device__ void store(const DecodeParams& p, typename Traits::SharedStorage& smem, const WorkPiece& w,
                               TensorO const& o, TensorCO const& o_coord, TensorCS const& s_coord,
                               float const (&col_max)[kCols], float const (&total)[kCols], float o_unit,
                               PackedRows const& rows, int row_base, int warp, int lane) {
    float scale[kCols];
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const int m = row_base + get<1>(s_coord(0, c));
      int token, head;
      rows.query(m, token, head);
      const bool empty = total[c] == 0.f;
      const float lse = empty ? -INFINITY : (col_max[c] + __log2f(total[c])) * float(M_LN2);
      const float inv_sum = empty ? 0.f : o_unit / total[c];  // o_unit: 1 / the unit P was scaled by
      // A final row takes its sink here; a split request's partials take it in the combine.
      scale[c] = p.attn_sink != nullptr && !w.is_split && m < p.rows_per_kv_head
                     ? inv_sum * sink_factor(lse, p.attn_sink[head])
                     : inv_sum;
      if (warp == 0 && lane < 4 && m < p.rows_per_kv_head) {  // lanes 0-3 of a warp hold every column
        if (w.is_split) {
          p.lse_accum[accum_row(p, w.slot, rows.kv_head, m)] = lse;
        } else {
          // A row that saw no key reports +inf, so that a later merge ignores it.
          p.lse[lse_index(p, w.request, head, token)] = lse == -INFINITY ? INFINITY : lse;
        }
      }
    }
    if (w.is_split) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const int m = row_base + get<1>(s_coord(0, c));
        if (m >= p.rows_per_kv_head) { continue; }  // padding column
        float* dst = p.o_accum + accum_row(p, w.slot, rows.kv_head, m) * kHeadDimV;
        CUTLASS_PRAGMA_UNROLL
        for (int d = 0; d < size<0>(o); ++d) { dst[get<0>(o_coord(d, c))] = o(d, c) * scale[c]; }
      }
      return;
    }
    Tensor sO = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutOStage{});  // (N, dv)
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < kCols; ++c) {
      CUTLASS_PRAGMA_UNROLL
      for (int d = 0; d < size<0>(o); ++d) {
        sO(get<1>(o_coord(d, c)), get<0>(o_coord(d, c))) = Element(o(d, c) * scale[c]);
      }
    }
    consumer_sync(kThreads, ConsumerBarrier::kOutputStaged);
    constexpr int kChunksPerRow = kHeadDimV / kChunk;
    for (int idx = warp * 32 + lane; idx < kN * kChunksPerRow; idx += kThreads) {
      const int r = idx / kChunksPerRow, col = (idx % kChunksPerRow) * kChunk;
      const int m = row_base + r;
      if (m >= p.rows_per_kv_head) { continue; }
      Element* dst = static_cast<Element*>(p.out) + w.request * p.o_batch_stride +
                     rows.offset(m, p.o_seq_stride, p.o_head_stride) + col;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(&sO(r, col));
    }
  }
};

}  // namespace flash_gla::hopper
