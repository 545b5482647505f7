// Page turns (Traits::kNumPageWGs == 2): the piece's two warpgroups hold the same 64 query rows,
// each with the online softmax and O of every other page. This folds warpgroup 1's into
// warpgroup 0's, which then writes the piece: the row maxima and sums meet in shared memory,
// each warpgroup rescales its O to the common maximum, and warpgroup 1's O reaches warpgroup 0
// through the Q tile's shared memory (no wgmma reads it once both have computed their last S),
// as many values per thread at a time as the tile holds (Traits::kTurnChunk). Both warpgroups
// hold the same accumulator layout, so thread t of one passes its values to thread t of the
// other, in its own order.
#pragma once

#include <cute/tensor.hpp>

#include "decode/roles.cuh"
#include "decode/softmax.cuh"

namespace flash_gla::hopper {

using namespace cute;

template <class Traits>
struct TurnMerge {
  // softmax / row_total: this warpgroup's running maxima and (quad-summed) row sums, replaced by
  // the merged ones; o (o_rc its rows x cols view, coord its coordinates): its O.
  template <int kRows, class TensorO, class TensorORowCol, class TensorC>
  static __device__ void run(typename Traits::SharedStorage& smem, OnlineSoftmax<kRows>& softmax,
                             float (&row_total)[kRows], TensorO& o, TensorORowCol& o_rc, TensorC const& coord,
                             WarpgroupRole const& wg) {
    constexpr int kThreads = Traits::kNumConsumerThreads;
    if (wg.wg_tid % 4 == 0) {  // one lane of each row's quad publishes
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        const int row = get<0>(coord(i, 0));
        smem.row_max[wg.page_wg][row] = softmax.row_max[i];
        smem.row_sum[wg.page_wg][row] = row_total[i];
      }
    }
    consumer_sync(kThreads, ConsumerBarrier::kRowSums);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int row = get<0>(coord(i, 0));
      const float max0 = smem.row_max[0][row], max1 = smem.row_max[1][row];
      const float max = fmaxf(max0, max1);
      // A warpgroup whose rows saw no key has max -inf and O = 0: weight 0, not exp2(NaN).
      const float weight0 = max0 == -INFINITY ? 0.f : exp2f(max0 - max);
      const float weight1 = max1 == -INFINITY ? 0.f : exp2f(max1 - max);
      row_total[i] = smem.row_sum[0][row] * weight0 + smem.row_sum[1][row] * weight1;
      softmax.row_max[i] = max;
      const float own = wg.page_wg == 0 ? weight0 : weight1;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(o_rc); ++j) { o_rc(i, j) *= own; }
    }
    float* exchange = reinterpret_cast<float*>(smem.q.data());
    constexpr int kChunk = Traits::kTurnChunk;
    constexpr int kRounds = decltype(size(o))::value / kChunk;
    static_assert(kRounds * kChunk == decltype(size(o))::value, "O goes over in whole chunks");
    CUTLASS_PRAGMA_UNROLL
    for (int round = 0; round < kRounds; ++round) {
      if (wg.page_wg == 1) {
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < kChunk; ++k) { exchange[k * 128 + wg.wg_tid] = o(round * kChunk + k); }
      }
      consumer_sync(kThreads, ConsumerBarrier::kTurnChunkWritten);
      if (wg.page_wg == 0) {
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < kChunk; ++k) { o(round * kChunk + k) += exchange[k * 128 + wg.wg_tid]; }
      }
      if (round + 1 < kRounds) { consumer_sync(kThreads, ConsumerBarrier::kTurnChunkRead); }
    }
  }
};

}  // namespace flash_gla::hopper
