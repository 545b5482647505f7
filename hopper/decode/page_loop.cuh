// The consumers' page loop over one request piece, and its steps.
//
// Per page: S = Q K^T (wgmma, both operands in shared memory, or Q's RoPE columns from
// registers), scale + mask + online softmax in registers, O += P V (wgmma, P from registers,
// V = the same page viewed MN-major), then the stage is released. With Traits::kOverlapPV,
// page n's S and page n-1's P V are issued back to back, so that page n's softmax runs while
// the tensor cores finish page n-1's P V. With a shared P (dv 512: two column warpgroups)
// the first warpgroup scores the page and P reaches the other through shared memory
// (shared_p_page).
//
// A step takes the named parts it works on: the PageContext (pipeline position, shared memory,
// who this warpgroup is), the Gemms, their Operands and the Accumulators.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "common/params.h"
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

// Where the consumers stand: the pipeline and its position, shared memory, and this thread's
// warpgroup.
template <class Traits>
struct PageContext {
  using PipelineState = typename Traits::Pipeline::PipelineState;
  const DecodeParams& params;
  typename Traits::SharedStorage& smem;
  typename Traits::Pipeline& pipeline;
  PipelineState& state;
  WarpgroupRole const& wg;
  int consumer_tid;
  // FP8 page exponents (Traits::kPageExponent; follow_page_exponent): the exponent that Q's RoPE
  // registers and O are at, and O's factor into it.
  int exponent = 0;
  float o_shift = 1.f;
  // Traits::kTurnBarriers: bit s, the phase of this warpgroup's full barrier of stage s that it
  // waits for next.
  uint32_t turn_phases = 0;
};

// This warpgroup's GEMMs: S = Q K^T with Q from shared memory, its RoPE k-blocks with Q's RoPE
// columns from registers (Traits::kQRopeInRegisters), and O += P V.
template <class MmaS, class MmaRope, class MmaO, class ThrO>
struct Gemms {
  MmaS& s;
  MmaRope& rope;
  MmaO& o;
  ThrO const& thr_o;
};

// What the GEMMs read: Q (shared-memory descriptors, and its RoPE columns in registers); by
// stage, the page's keys and the RoPE keys (inline: the page's next k-blocks; shared: the
// stage's rope tile), each also as the B operand of the register-A RoPE wgmma; V; and with a
// shared P, P and where the scoring warpgroup's scores go in it (p_share: the address of each
// pair of adjacent columns of its first row).
template <class Q, class QRope, class K, class KForRope, class Rope, class RopeForRope, class V, class SmemP,
          class PShare>
struct Operands {
  Q const& q;
  QRope& q_rope;
  K const& k;
  KForRope const& k_for_rope;
  Rope const& rope;
  RopeForRope const& rope_for_rope;
  V const& v;
  SmemP const& smem_p;
  PShare& p_share;
};

// The page's scores (with row/column views and their coordinates), the piece's running O, the
// 16-bit P of the page whose P V is next, and the running softmax.
template <class S, class SRowCol, class SCoord, class O, class ORowCol, class P, class Softmax>
struct Accumulators {
  S& s;
  SRowCol& s_rc;
  SCoord const& s_coord;
  O& o;
  ORowCol& o_rc;
  P& p;
  Softmax& softmax;
};

template <class Traits>
struct PageLoop {
  using Element = typename Traits::Element;
  using Context = PageContext<Traits>;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kWGRows = Traits::kWGRows;
  static constexpr bool kSharedP = Traits::kSharedP;
  static constexpr int kConsumerThreads = Traits::kNumConsumerThreads;

  // The piece's pages: in turns, overlapped (Traits::kOverlapPV) or in series. first_index:
  // the pages of the CTA's earlier pieces (for page turns).
  template <class G, class In, class Acc, int kRows>
  static __device__ void run(Context& ctx, G& gemms, In& in, Acc& acc, const WorkPiece& w,
                             PieceMask<kRows> const& mask, int first_index) {
    if constexpr (Traits::kNumPageWGs > 1) {
      turns(ctx, gemms, in, acc, w, mask, first_index);
    } else if constexpr (Traits::kOverlapPV) {
      overlapped(ctx, gemms, in, acc, w, mask);
    } else {
      in_series(ctx, gemms, in, acc, w, mask);
    }
  }

  // Page by page, one wgmma batch in flight at a time.
  template <class G, class In, class Acc, int kRows>
  static __device__ void in_series(Context& ctx, G& gemms, In& in, Acc& acc, const WorkPiece& w,
                                   PieceMask<kRows> const& mask) {
    for (int page = w.page_begin; page < w.page_end; ++page) {
      one_page(ctx, gemms, in, acc, w, mask, page);
      ++ctx.state;
    }
  }

  // Page turns (Traits::kNumPageWGs == 2): this warpgroup's pages of the piece, every other
  // one, page by page. Page p of a request is warpgroup p % 2's (by the request's own page
  // numbers, so that which warpgroup sums which keys does not depend on the batch: batch
  // invariance); page i of the CTA's walk (first_index: the pages of its earlier pieces) lies
  // in stage i % kStages.
  //
  // Each warpgroup waits on full barriers of its own, one per stage (Traits::kTurnBarriers),
  // whose phases are its pages alone. On the pipeline's, shared, a warpgroup that skips the
  // other's pages could find a stage's barrier still on the other's page before, whose phase
  // has the other parity, and pass at once, before its page lands (tests/
  // test_page_turns_model.py): with FP8's three stages within a piece, with 16-bit pages across
  // piece boundaries.
  //
  // Only the request's last page can end before the sequence does. Both warpgroups zero its rows
  // past the end: the other warpgroup takes one more step of its walk, to that page, and both
  // meet at one barrier instruction (wait_turn's kPageLanded), which the page's warpgroup reaches
  // once the page landed. compute-sanitizer needs both warpgroups to sync there: synccheck flags
  // a barrier reached from two instructions, and racecheck loses the order of later barriers
  // after one that only a warpgroup syncs on, an arrive included (the hardware keeps it either
  // way).
  template <class G, class In, class Acc, int kRows>
  static __device__ void turns(Context& ctx, G& gemms, In& in, Acc& acc, const WorkPiece& w,
                               PieceMask<kRows> const& mask, int first_index) {
    constexpr int kStages = Traits::kStages;
    const int last = w.page_end - 1;
    // (FP8: the producers zero those rows, and there is no barrier to meet.)
    const bool cut_short = !Traits::kFP8 && w.page_end > w.page_begin && w.page_end * kBlockN > w.seqlen;
    const int end = w.page_end + (cut_short && (last & 1) != ctx.wg.page_wg ? 1 : 0);
    for (int page = w.page_begin + ((ctx.wg.page_wg - w.page_begin) & 1); page < end; page += 2) {
      const int own = min(page, last);  // page > last: the other warpgroup's last page
      const int index = first_index + own - w.page_begin;
      ctx.state = typename Context::PipelineState(index % kStages, (index / kStages) & 1, index);
      const int stage = wait_turn(ctx, w.seqlen, own, own == page, cut_short && own == last);
      if (own != page) { break; }
      page_body(ctx, gemms, in, acc, mask, page, stage);
    }
  }

  // Shared P, one page: the first warpgroup computes S and its softmax and writes P and
  // the rows' rescale factors to shared memory; then every warpgroup rescales its O and adds
  // P V over its columns. Both barriers are passed by every warpgroup at one instruction.
  template <class G, class In, class Acc, int kRows>
  static __device__ void shared_p_page(Context& ctx, G& gemms, In& in, Acc& acc,
                                       PieceMask<kRows> const& mask, int page, int stage) {
    float rescale[kRows];
    const bool scorer = ctx.wg.col_wg == 0;
    if (scorer) {
      warpgroup_fence_operand(acc.s);
      issue_scores(gemms, in, acc, stage);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc.s);
      softmax_page(ctx, acc, mask, page, rescale);
    }
    consumer_sync(kConsumerThreads, ConsumerBarrier::kPFree);  // every P V of the last page is done
    if (scorer) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < size<1>(acc.s_rc); c += 2) {
          store_shared_b32(in.p_share[c / 2] + i * Traits::kPRow8Bytes,
                           pack_pair<Element>(acc.s_rc(i, c), acc.s_rc(i, c + 1)));
        }
        // One lane of the row's quad (consumer threads come first in the CTA).
        if (threadIdx.x % 4 == 0) { ctx.smem.row_rescale[get<0>(acc.s_coord(i, 0))] = rescale[i]; }
      }
      cutlass::arch::fence_view_async_shared();  // P written by threads, read by wgmma
    }
    consumer_sync(kConsumerThreads, ConsumerBarrier::kPReady);
    if (!scorer) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) { rescale[i] = ctx.smem.row_rescale[get<0>(acc.s_coord(i, 0))]; }
    }
    rescale_o(acc, rescale);
    warpgroup_fence_operand(acc.o);
    issue_pv(gemms, in, acc, stage);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc.o);
    ctx.pipeline.consumer_release(ctx.state);
  }

  // One page, on its own: wait for it, S, softmax, P V, release its stage.
  template <class G, class In, class Acc, int kRows>
  static __device__ void one_page(Context& ctx, G& gemms, In& in, Acc& acc, const WorkPiece& w,
                                  PieceMask<kRows> const& mask, int page) {
    if constexpr (kSharedP) {
      shared_p_page(ctx, gemms, in, acc, mask, page, wait_page(ctx, w.seqlen, page));
    } else {
      page_body(ctx, gemms, in, acc, mask, page, wait_page(ctx, w.seqlen, page));
    }
  }

  // A page whose stage is full: S, softmax, P V, release the stage.
  template <class G, class In, class Acc, int kRows>
  static __device__ void page_body(Context& ctx, G& gemms, In& in, Acc& acc,
                                   PieceMask<kRows> const& mask, int page, int stage) {
    float rescale[kRows];
    follow_page_exponent(ctx, in, stage);
    warpgroup_fence_operand(acc.s);
    issue_scores(gemms, in, acc, stage);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc.s);
    softmax_page(ctx, acc, mask, page, rescale);
    rescale_o_and_stage_p(in, acc, rescale);
    warpgroup_fence_operand(acc.p);
    warpgroup_fence_operand(acc.o);
    issue_pv(gemms, in, acc, stage);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc.o);
    ctx.pipeline.consumer_release(ctx.state);
  }

  // A software pipeline over the pages: page n's S = Q K^T and page n-1's O += P V are issued
  // back to back, and page n's softmax runs while the tensor cores finish page n-1's P V; P
  // waits in registers for the next iteration. The first page has no predecessor and is
  // peeled off, so that no branch sits between two open wgmma batches (ptxas would serialise
  // every wgmma).
  //
  // The next page's stage is waited for between the softmax and the wait for the P V: ptxas
  // schedules a wgmma wait early in its basic block, and where it shared one with the softmax
  // it went ahead of the exponentials, which then no longer ran under the P V; the stage's
  // mbarrier wait loop ends the softmax's block. The P V wait stays one instruction that every
  // warp of the warpgroup reaches (wgmma.wait_group is .aligned). Three stages or more: the
  // next page's stage is not page n-1's, whose P V is still in flight.
  template <class G, class In, class Acc, int kRows>
  static __device__ void overlapped(Context& ctx, G& gemms, In& in, Acc& acc, const WorkPiece& w,
                                    PieceMask<kRows> const& mask) {
    static_assert(Traits::kStages >= 3, "overlapped pages hold two stages while waiting for a third");
    if (w.page_begin >= w.page_end) { return; }
    float rescale[kRows];
    warpgroup_fence_operand(acc.s);
    const int first_stage = wait_page(ctx, w.seqlen, w.page_begin);
    follow_page_exponent(ctx, in, first_stage);
    issue_scores(gemms, in, acc, first_stage);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc.s);
    softmax_page(ctx, acc, mask, w.page_begin, rescale);
    rescale_o_and_stage_p(in, acc, rescale);
    int prev_stage = first_stage;
    wait_next_stage(ctx, w.page_begin + 1, w.page_end);
    ++ctx.state;
    for (int page = w.page_begin + 1; page < w.page_end; ++page) {
      const int stage = mask_page(ctx, w.seqlen, page);  // waited for in the previous step
      follow_page_exponent(ctx, in, stage);
      warpgroup_fence_operand(acc.s);
      warpgroup_fence_operand(acc.p);
      warpgroup_fence_operand(acc.o);
      issue_scores(gemms, in, acc, stage);
      issue_pv(gemms, in, acc, prev_stage);
      warpgroup_wait<1>();
      warpgroup_fence_operand(acc.s);
      softmax_page(ctx, acc, mask, page, rescale);
      wait_next_stage(ctx, page + 1, w.page_end);
      warpgroup_wait<0>();  // page n-1's P V is in O; its stage can be refilled
      warpgroup_fence_operand(acc.o);
      warpgroup_fence_operand(acc.p);
      release_stage(ctx, prev_stage);
      rescale_o_and_stage_p(in, acc, rescale);
      prev_stage = stage;
      ++ctx.state;
    }
    warpgroup_fence_operand(acc.p);
    warpgroup_fence_operand(acc.o);
    issue_pv(gemms, in, acc, prev_stage);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc.o);
    release_stage(ctx, prev_stage);
  }

  // Frees a stage for the producer by its index alone (consumer_release reads nothing else of
  // the state), where the loop keeps no whole pipeline state for it.
  static __device__ void release_stage(Context& ctx, int stage) {
    ctx.pipeline.consumer_release(typename Context::PipelineState(stage, 0, 0));
  }

  // ------------------------------------------------------------------ page steps
  // Waits for a page's stage and zeroes its rows past the sequence end; returns the stage. An
  // FP8 stage comes with those rows zeroed by the producers that wrote it (dequant.cuh), so the
  // consumers never write to it; there the branch only re-converges the warp, which keeps ptxas
  // from spilling the 208-register consumers of the 128-row instance.
  static __device__ int wait_page(Context& ctx, int seqlen, int page) {
    ctx.pipeline.consumer_wait(ctx.state);
    return mask_page(ctx, seqlen, page);
  }

  // wait_page in turns: the page's warpgroup (`mine`) waits on its own full barrier of the
  // stage; for the piece's cut-short last page (`cut_short_last`) both then meet at
  // kPageLanded, and both zero the rows past the end.
  static __device__ int wait_turn(Context& ctx, int seqlen, int page, bool mine, bool cut_short_last) {
    static_assert(Traits::kTurnBarriers, "page turns wait on the warpgroups' own full barriers");
    const int stage = ctx.state.index();
    if (mine) {
      cutlass::arch::ClusterBarrier::wait(&ctx.smem.turn_full[ctx.wg.page_wg][stage], (ctx.turn_phases >> stage) & 1);
      ctx.turn_phases ^= 1u << stage;
    }
    // Both warpgroups sync here, at one instruction: the other one passes once the page's
    // warpgroup has seen the page land.
    if (cut_short_last) { consumer_sync(kConsumerThreads, ConsumerBarrier::kPageLanded); }
    return mask_page(ctx, seqlen, page);
  }

  // wait_page past its stage's wait: zeroes the page's rows past the sequence end.
  static __device__ int mask_page(Context& ctx, int seqlen, int page) {
    const int stage = ctx.state.index();
    const int valid_rows = seqlen - page * kBlockN;
    if (valid_rows < kBlockN) {
      if constexpr (Traits::kFP8) {
        __syncwarp();
        return stage;
      }
      // The thread index read anew: the rows' addresses derived from the one in ctx were kept
      // (hoisted) through the page loop, in registers that the 128-row instances then lacked.
      SmemIO<Traits>::zero_rows_past_end(ctx.smem, stage, valid_rows, thread_index());
      cutlass::arch::fence_view_async_shared();
      consumer_sync(kConsumerThreads, ConsumerBarrier::kPageMasked);  // page turns: see turns()
    }
    return stage;
  }

  // Waits for the stage after ctx.state's, where the piece has a next page.
  static __device__ void wait_next_stage(Context& ctx, int next_page, int page_end) {
    if (next_page < page_end) {
      auto next = ctx.state;
      ++next;
      ctx.pipeline.consumer_wait(next);
    }
  }

  // FP8 page exponents (Traits::kPageExponent): the stage holds its page's values times 2^e
  // (dequant.cuh). Before S, Q's RoPE registers are brought to e too, so that all of S is 2^e
  // times the scores: the softmax takes 2^-e out with its scale, and O goes to e with the page's
  // rescale, before its P V adds 2^e-scaled values. Powers of two, exact; e rarely changes, but
  // Q's RoPE registers are multiplied every page (16 multiplies): a branch made the consumer spill.
  template <class In>
  static __device__ void follow_page_exponent(Context& ctx, In& in, int stage) {
    if constexpr (Traits::kPageExponent) {
      const int e = ctx.smem.raw.stage_exponent[stage];
      ctx.o_shift = exp2_integer(e - ctx.exponent);  // a power of two that q's dtype holds (dequant.cuh)
      constexpr int kN = decltype(size(in.q_rope))::value;
      warpgroup_fence_operand(in.q_rope);
      auto& q_rope = *reinterpret_cast<cutlass::Array<Element, kN>*>(in.q_rope.data());
      q_rope = cutlass::multiplies<cutlass::Array<Element, kN>>{}(q_rope, Element(ctx.o_shift));
      warpgroup_fence_operand(in.q_rope);
      ctx.exponent = e;
    }
  }

  // Issues S = Q[:, :d_nope] K_nope^T + Q[:, d_nope:] R^T as one wgmma batch; R is the stage's
  // next k-blocks (inline, or a shared RoPE key joined to the page) or its rope tile.
  template <class G, class In, class Acc>
  static __device__ void issue_scores(G& gemms, In const& in, Acc& acc, int stage) {
    constexpr int kNope = Traits::kNopeBlocks, kRope = Traits::kRopeBlocks;
    constexpr int kRopeB = Traits::kRopeFirstBlockB;
    warpgroup_arrive();
    gemms.s.accumulate_ = GMMA::ScaleOut::Zero;
    gemm_k_blocks<0, 0, kNope>(gemms.s, in.q, in.k(_, _, _, stage), acc.s);
    if constexpr (Traits::kQRopeInRegisters) {
      gemms.rope.accumulate_ = GMMA::ScaleOut::One;
      if constexpr (Traits::kRopeTile) {
        gemm_k_blocks<0, kRopeB, kRope>(gemms.rope, in.q_rope, in.rope_for_rope(_, _, _, stage), acc.s);
      } else {
        gemm_k_blocks<0, kRopeB, kRope>(gemms.rope, in.q_rope, in.k_for_rope(_, _, _, stage), acc.s);
      }
    } else if constexpr (Traits::kRopeTile) {
      gemm_k_blocks<kNope, kRopeB, kRope>(gemms.s, in.q, in.rope(_, _, _, stage), acc.s);
    } else {
      gemm_k_blocks<kNope, kRopeB, kRope>(gemms.s, in.q, in.k(_, _, _, stage), acc.s);
    }
    warpgroup_commit_batch();
  }

  // Masks the page's scores, updates the running softmax and turns the scores into
  // probabilities in place; rescale[i] is what O's row i must be multiplied by. The scores stay
  // unscaled until the exponent (one FFMA each, the scale a positive factor that commutes with
  // the maximum), and only a page that reaches past mask_from compares keys: a branch, so that
  // the other pages run none of the per-score comparisons.
  template <class Acc, int kRows>
  static __device__ void softmax_page(Context& ctx, Acc& acc, PieceMask<kRows> const& mask, int page,
                                      float (&rescale)[kRows]) {
    if (page * kBlockN + kBlockN > mask.mask_from) {
      const int first_key = page * kBlockN;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<1>(acc.s_rc); ++j) {
          const int key = first_key + get<1>(acc.s_coord(i, j));
          if (key > mask.row_last_key[i]) { acc.s_rc(i, j) = -INFINITY; }
        }
      }
    }
    // FP8 page exponents: the scores are 2^e times themselves.
    const float score_scale =
        Traits::kPageExponent ? ctx.params.scale_log2 * exp2_integer(-ctx.exponent) : ctx.params.scale_log2;
    float row_page_max[kRows];
    acc.softmax.page_max(acc.s_rc, row_page_max);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) { row_page_max[i] *= score_scale; }
    acc.softmax.update(acc.s_rc, row_page_max, score_scale, rescale);
    if constexpr (Traits::kPageExponent) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) { rescale[i] *= ctx.o_shift; }
    }
  }

  // Rescales O and stages the page's P for its P V (issued with the next page's S).
  template <class In, class Acc, int kRows>
  static __device__ void rescale_o_and_stage_p(In& in, Acc& acc, float const (&rescale)[kRows]) {
    rescale_o(acc, rescale);
    pack_fragment<typename Traits::StageElement>(acc.s, acc.p);
  }

  template <class Acc, int kRows>
  static __device__ void rescale_o(Acc& acc, float const (&rescale)[kRows]) {
    // Once the running maxima settle, most pages leave every row's factor at exactly 1: a warp
    // whose rows all kept their maximum skips the multiplies.
    bool changed = false;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) { changed |= rescale[i] != 1.f; }
    if (__any_sync(0xffffffff, changed)) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<1>(acc.o_rc); ++j) { acc.o_rc(i, j) *= rescale[i]; }
      }
    }
  }

  // Issues O += P V for one stage as one wgmma batch, not waited for: P from registers, or
  // from shared memory when it is shared by column warpgroups. The caller fences P and O
  // before the batch that precedes this one: an operand fence between two open batches counts
  // as a write to a wgmma input, and ptxas would then serialise every wgmma.
  template <class G, class In, class Acc>
  static __device__ void issue_pv(G& gemms, In const& in, Acc& acc, int stage) {
    warpgroup_arrive();
    if constexpr (kSharedP) {
      Tensor tOsP = gemms.thr_o.partition_fragment_A(in.smem_p);
      gemm_k_blocks<0, 0, decltype(size<2>(tOsP))::value>(gemms.o, tOsP, in.v(_, _, _, stage), acc.o);
    } else {
      Tensor tOrP_a = make_tensor(acc.p.data(), accumulator_as_operand_a(acc.p.layout()));
      gemm_k_blocks<0, 0, decltype(size<2>(tOrP_a))::value>(gemms.o, tOrP_a, in.v(_, _, _, stage), acc.o);
    }
    warpgroup_commit_batch();
  }

  // Shared P: combines a per-row statistic of this thread's rows (max or sum) with the
  // other consumer warpgroups' values for the same rows, through `exchange` in shared memory.
  template <bool kMax, int kRows, class TensorC>
  static __device__ void combine_across_warpgroups(float (&exchange)[Traits::kNumColWGs][kWGRows],
                                                   float (&value)[kRows], TensorC const& coord,
                                                   WarpgroupRole const& wg, ConsumerBarrier id) {
    if (threadIdx.x % 4 == 0) {  // one lane of each row's quad publishes (consumers come first)
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
