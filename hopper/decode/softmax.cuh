// Online softmax over the key pages of one work piece, kept in registers.
//
// Scores arrive masked to -inf but unscaled: softmax_scale * log2(e) goes into each exponent's
// FFMA, so that every exponential is one FFMA and one exp2. Each accumulator row lives in the 4
// lanes of a quad: maxima are reduced across the quad after every page; sums stay thread-partial
// until the end.
#pragma once

#include <cute/tensor.hpp>
#include <cmath>

namespace flash_gla::hopper {

using namespace cute;

// 2^e as a float, for e in [-126, 127].
__device__ __forceinline__ float exp2_integer(int e) { return __int_as_float((127 + e) << 23); }

__device__ __forceinline__ float quad_allreduce_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

__device__ __forceinline__ float quad_allreduce_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];  // running max, log2 units; -inf while a row has seen no key
  float row_sum[kRows];  // thread-partial running sum of exp2(score - row_max)

  __device__ void reset() {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      row_max[i] = -INFINITY;
      row_sum[i] = 0.f;
    }
  }

  // Maximum of each row over this page's scores `s` (rows x cols view), reduced over the quad.
  template <class TensorS>
  __device__ void page_max(TensorS const& s, float (&row_page_max)[kRows]) const {
    static_assert(decltype(size<0>(s))::value == kRows);
    // Four partial maxima a row, so that the chain of dependent FMNMX before the exponentials is
    // a quarter as long (the maximum is exact in any order).
    constexpr int kCols = decltype(size<1>(s))::value;
    constexpr int kPartial = kCols % 4 == 0 ? 4 : 1;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      float m[kPartial];
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kPartial; ++k) { m[k] = s(i, k); }
      CUTLASS_PRAGMA_UNROLL
      for (int j = kPartial; j < kCols; ++j) { m[j % kPartial] = fmaxf(m[j % kPartial], s(i, j)); }
      CUTLASS_PRAGMA_UNROLL
      for (int k = 1; k < kPartial; ++k) { m[0] = fmaxf(m[0], m[k]); }
      row_page_max[i] = quad_allreduce_max(m[0]);
    }
  }

  // Turns the scores `s` (times `scale` in log2 units: scale > 0) into unnormalised
  // probabilities, given each row's maximum over the whole page in log2 units, and returns in
  // `rescale` the factor for each row's output accumulator.
  template <class TensorS>
  __device__ void update(TensorS& s, float const (&row_page_max)[kRows], float scale, float (&rescale)[kRows]) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const float new_max = fmaxf(row_max[i], row_page_max[i]);
      // A row that has seen no key yet keeps max -inf; subtract 0 then so exp2 gives 0, not NaN.
      const float ref = new_max == -INFINITY ? 0.f : new_max;
      rescale[i] = exp2f(row_max[i] - ref);
      row_max[i] = new_max;
      float page_sum = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        s(i, j) = exp2f(fmaf(s(i, j), scale, -ref));
        page_sum += s(i, j);
      }
      row_sum[i] = row_sum[i] * rescale[i] + page_sum;
    }
  }

  // Sum of each row's probabilities held by this thread's quad (all of the row's keys when
  // one warpgroup scores the whole page; its share of them otherwise).
  __device__ void quad_sums(float (&sum)[kRows]) const {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) { sum[i] = quad_allreduce_sum(row_sum[i]); }
  }

  // Final normaliser per row from the row's total sum: inv_sum (0 for a row that saw no key)
  // and the natural-log LSE (-inf for a row that saw no key; the caller maps that to +inf
  // for final outputs).
  __device__ void finalize(float const (&sum)[kRows], float (&inv_sum)[kRows], float (&lse)[kRows]) const {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const bool empty = sum[i] == 0.f;
      inv_sum[i] = empty ? 0.f : 1.f / sum[i];
      lse[i] = empty ? -INFINITY : (row_max[i] + __log2f(sum[i])) * float(M_LN2);
    }
  }
};

}  // namespace flash_gla::hopper
