// The epilogue of one request piece: normalised O and LSE, final or partial.
//
// A request handled by one piece gets its bf16/fp16 O rows and LSE written here; a request
// split over several pieces gets fp32 partials (O normalised over the piece's keys, and its
// LSE) that hopper/combine/combine.cu merges.
#pragma once

#include <cute/tensor.hpp>

#include "common/packed_rows.h"
#include "common/params.h"
#include "decode/fragment_utils.cuh"
#include "decode/roles.cuh"
#include "decode/schedule.cuh"

namespace flash_gla::hopper {

using namespace cute;

template <class Traits>
struct Epilogue {
  using Element = typename Traits::Element;
  static constexpr int kOutCols = Traits::kOutColsPerWG;
  static constexpr int kChunk = 16 / sizeof(Element);  // elements per 16-byte vector

  // o: the O accumulator as (rows, cols) with coord its (row, col) coordinates; each thread
  // holds kRows rows.
  template <class TensorO, class TensorOrc, class TensorC, int kRows>
  static __device__ void store(const DecodeParams& p, typename Traits::SharedStorage& smem,
                               const WorkPiece& w, TensorO& tOrO, TensorOrc& o, TensorC const& coord,
                               float const (&inv_sum)[kRows], float const (&lse)[kRows],
                               PackedRows const& rows, WarpgroupRole const& wg) {
    // With page turns the merged O is the first warpgroup's: it writes the piece, and the other
    // one only joins store_final's barriers, at the same instructions (see PageLoop::turns).
    const bool writes = wg.page_wg == 0;
    const bool lse_lane = writes && wg.col_wg == 0 && wg.wg_tid % 4 == 0;  // one lane of the row's quad
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int m = wg.row_base + get<0>(coord(i, 0));
      int token, head;
      rows.query(m, token, head);
      // A final row takes its sink here; a split request's partials take it in the combine.
      const float scale = p.attn_sink != nullptr && !w.is_split && m < p.rows_per_kv_head
                              ? inv_sum[i] * sink_factor(lse[i], p.attn_sink[head])
                              : inv_sum[i];
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(o); ++j) { o(i, j) *= scale; }
      if (m >= p.rows_per_kv_head || !lse_lane) { continue; }
      if (w.is_split) {
        p.lse_accum[accum_row(p, w.slot, rows.kv_head, m)] = lse[i];
      } else {
        // A row that saw no key reports +inf, so that a later merge ignores it.
        p.lse[lse_index(p, w.request, head, token)] = lse[i] == -INFINITY ? INFINITY : lse[i];
      }
    }
    if (w.is_split) {
      if (writes) { store_partial(p, w, o, coord, rows, wg); }
    } else {
      store_final(p, smem, w, tOrO, rows, wg, writes);
    }
  }

  // fp32 partials straight from the accumulator: a split request has at most two pieces per
  // part, so these stores are rare.
  template <class TensorOrc, class TensorC>
  static __device__ void store_partial(const DecodeParams& p, const WorkPiece& w, TensorOrc const& o,
                                       TensorC const& coord, PackedRows const& rows,
                                       WarpgroupRole const& wg) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size<0>(o); ++i) {
      const int m = wg.row_base + get<0>(coord(i, 0));
      if (m >= p.rows_per_kv_head) { continue; }  // padding row of the last m-block
      float* dst = p.o_accum + accum_row(p, w.slot, rows.kv_head, m) * Traits::kHeadDimV +
                   wg.col_wg * kOutCols;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(o); j += 2) {
        *reinterpret_cast<float2*>(dst + get<1>(coord(i, j))) = make_float2(o(i, j), o(i, j + 1));
      }
    }
  }

  // 16-bit O, staged in shared memory and stored as whole 16-byte vectors. In the accumulator
  // layout a lane holds 2 adjacent columns of every 8-column group, so stores straight from
  // registers would be 4-byte stores touching 8 rows per warp instruction; staged, a warp
  // writes 512 contiguous bytes of a row. The staging area is the Q tile, which no wgmma reads
  // once the piece's last S is done. writes: false for a warpgroup that only joins the barriers.
  template <class TensorO>
  static __device__ void store_final(const DecodeParams& p, typename Traits::SharedStorage& smem,
                                     const WorkPiece& w, TensorO const& tOrO, PackedRows const& rows,
                                     WarpgroupRole const& wg, bool writes) {
    constexpr int kConsumerThreads = Traits::kNumConsumerThreads;
    // Every consumer warpgroup has finished its last S of the piece (the staging tiles of
    // different warpgroups overlap other warpgroups' Q rows).
    consumer_sync(kConsumerThreads, ConsumerBarrier::kOutputStage);
    // The staging addresses depend only on the thread; computed here, not hoisted to the
    // kernel's start, where keeping them live across the page loop spilled (the empty asm
    // hides that the values are loop-invariant).
    int stage_offset = (wg.row_wg * Traits::kNumColWGs + wg.col_wg) * Traits::kOutStageElems;
    int stage_tid = wg.wg_tid;
    asm volatile("" : "+r"(stage_offset), "+r"(stage_tid));
    Tensor sO = make_tensor(make_smem_ptr(smem.q.data() + stage_offset),
                            typename Traits::SmemLayoutOStage{});
    if (writes) {  // stmatrix: four 8x8 16-bit tiles of the accumulator per instruction
      auto stage_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{},
                                          typename Traits::TiledMmaO{});
      auto thr_copy = stage_copy.get_thread_slice(stage_tid);
      Tensor tOrO_16 = convert_fragment<Element>(tOrO);
      copy(stage_copy, thr_copy.retile_S(tOrO_16), thr_copy.partition_D(sO));
    }
    consumer_sync(kConsumerThreads, ConsumerBarrier::kOutputStaged);
    if (!writes) { return; }
    constexpr int kChunksPerRow = kOutCols / kChunk;
    CUTLASS_PRAGMA_UNROLL
    for (int idx = stage_tid; idx < Traits::kWGRows * kChunksPerRow; idx += 128) {
      const int r = idx / kChunksPerRow, col = (idx % kChunksPerRow) * kChunk;
      const int m = wg.row_base + r;
      if (m >= p.rows_per_kv_head) { continue; }
      Element* dst = static_cast<Element*>(p.out) + w.request * p.o_batch_stride +
                     rows.offset(m, p.o_seq_stride, p.o_head_stride) + wg.col_wg * kOutCols + col;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(&sO(r, col));
    }
  }
};

}  // namespace flash_gla::hopper
