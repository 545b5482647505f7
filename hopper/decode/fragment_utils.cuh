// Small CuTe helpers for wgmma fragments: row/column views of accumulators, reuse of an
// accumulator as the register A operand of the next GEMM, and one warpgroup GEMM call.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

namespace flash_gla::hopper {

using namespace cute;

// A wgmma accumulator fragment has layout ((2, 2, N/8), MMA_M, MMA_N): a pair of adjacent
// columns, the row 8 below, then groups of 8 columns. Viewed as (rows, cols) per thread:
// rows = (2, MMA_M), cols = (2, N/8, MMA_N). Softmax reductions run along the cols mode.
template <class Layout>
__device__ __host__ constexpr auto accumulator_rowcol(Layout acc) {
  static_assert(rank(acc) == 3 && rank<0>(acc) == 3, "expected a wgmma accumulator layout");
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
}

// The 16-bit A operand of an m64nNk16 register-sourced wgmma holds ((2, 2, 2), MMA_M, MMA_K):
// column pair, row + 8, column + 8. Two consecutive 8-column groups of an accumulator are
// one k-block, so the accumulator (converted to 16 bits) is the A operand with its group
// mode split in two.
template <class Layout>
__device__ __host__ constexpr auto accumulator_as_operand_a(Layout acc) {
  auto split = logical_divide(get<0>(acc), Shape<Underscore, Underscore, _2>{});  // (2,2,(2,N/16))
  return make_layout(make_layout(get<0>(split), get<1>(split), get<2, 0>(split)),
                     get<1>(acc),
                     coalesce(make_layout(get<2, 1>(split), get<2>(acc))));
}

// M tile kTile of an accumulator fragment (MMA, MMA_M, MMA_N), as a fragment (MMA, 1, MMA_N) of
// its own: the C operand of a GEMM that fills that tile alone.
template <int kTile, class Engine, class L>
__device__ auto m_tile(Tensor<Engine, L>& frag) {
  static_assert(rank(L{}) == 3 && kTile < decltype(size<1>(L{}))::value, "expected a wgmma accumulator");
  return make_tensor(frag.data() + kTile * stride<1>(frag.layout()),
                     make_layout(layout<0>(frag.layout()), Layout<_1, _0>{}, layout<2>(frag.layout())));
}

// Element-type conversion of a register fragment (fp32 probabilities -> 16-bit operand).
template <class To, class Engine, class Layout>
__device__ auto convert_fragment(Tensor<Engine, Layout> const& src) {
  using From = typename Engine::value_type;
  constexpr int kN = decltype(size(src))::value;
  Tensor dst = make_tensor<To>(src.layout());
  cutlass::NumericArrayConverter<To, From, kN> convert;
  *reinterpret_cast<cutlass::Array<To, kN>*>(dst.data()) =
      convert(*reinterpret_cast<cutlass::Array<From, kN> const*>(src.data()));
  return dst;
}

// A 32-bit store to shared memory at an address computed once (cast_smem_ptr_to_uint): a
// CuTe copy into a swizzled tile recomputes each element's 64-bit generic address instead.
__device__ __forceinline__ void store_shared_b32(uint32_t address, uint32_t value) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(address), "r"(value));
}

// Columns c and c + 1 of an accumulator row as one 32-bit pair of 16-bit values.
template <class To>
__device__ __forceinline__ uint32_t pack_pair(float a, float b) {
  cutlass::NumericArrayConverter<To, float, 2> convert;
  const cutlass::Array<To, 2> pair = convert(cutlass::Array<float, 2>{a, b});
  return reinterpret_cast<uint32_t const&>(pair);
}

// fp32 -> 16-bit conversion of a register fragment into `dst` of the same layout, pair by pair
// of storage: each 32-bit register of dst is one conversion of two adjacent values, which is
// what a register-sourced wgmma reads (ptxas need not re-pair 16-bit halves on the way).
template <class To, class EngineS, class LayoutS, class EngineD, class LayoutD>
__device__ __forceinline__ void pack_fragment(Tensor<EngineS, LayoutS> const& src, Tensor<EngineD, LayoutD>& dst) {
  static_assert(std::is_same_v<typename EngineD::value_type, To> && sizeof(To) == 2);
  static_assert(std::is_same_v<LayoutS, LayoutD>, "same storage order");
  constexpr int kN = decltype(size(src))::value;
  static_assert(kN % 2 == 0);
  uint32_t* out = reinterpret_cast<uint32_t*>(raw_pointer_cast(dst.data()));
  const float* in = raw_pointer_cast(src.data());
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < kN / 2; ++i) { out[i] = pack_pair<To>(in[2 * i], in[2 * i + 1]); }
}

// Issues C += A(:, kABegin + k) * B(:, kBBegin + k) for k < kBlocks, k-block by k-block,
// inside a warpgroup_arrive / commit_batch the caller brackets (several calls share a batch).
template <int kABegin, int kBBegin, int kBlocks, class TiledMma, class TA, class TB, class TC>
__device__ void gemm_k_blocks(TiledMma& mma, TA const& a, TB const& b, TC& c) {
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < kBlocks; ++k) {
    cute::gemm(mma, a(_, _, kABegin + k), b(_, _, kBBegin + k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
}

}  // namespace flash_gla::hopper
