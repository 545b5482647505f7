// What one instance of the decode kernel family is.
//
// MLA, GLA and (later) GTA differ only in these numbers: the value width dv, the RoPE width,
// and the element type. A cached row of one KV head is `kv_width` elements; V is its first dv
// dims and, with RoPE stored inline, K is its first dv + d_rope dims (d_qk = kv_width).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "params.h"
#include "decode/run_decode.h"

namespace flash_gla::hopper {

using namespace cute;

template <DType kDType>
struct ElementOf;
template <>
struct ElementOf<DType::kBF16> { using type = cutlass::bfloat16_t; };
template <>
struct ElementOf<DType::kFP16> { using type = cutlass::half_t; };

// Dynamic shared memory available to one block on sm_90 (227 KB).
constexpr int kSmemBudgetBytes = 232448;

template <DType kDType_, int kHeadDimV_, int kHeadDimRope_, int kRowWGs_ = 1>
struct DecodeTraits {
  using Element = typename ElementOf<kDType_>::type;
  static constexpr DType kDType = kDType_;
  static constexpr int kHeadDimV = kHeadDimV_;
  static constexpr int kHeadDimRope = kHeadDimRope_;
  static constexpr int kHeadDimQK = kHeadDimV + kHeadDimRope;  // RoPE inline, right after V
  static constexpr int kKVWidth = kHeadDimQK;                  // elements per cached row

  static constexpr int kWGRows = 64;          // packed query rows per warpgroup: one wgmma M
  // Warpgroups stacked along the rows: with two, each page loaded serves 128 rows and one
  // warpgroup's softmax runs while the other's wgmma uses the tensor cores.
  static constexpr int kNumRowWGs = kRowWGs_;
  static constexpr int kBlockM = kWGRows * kNumRowWGs;  // packed query rows per CTA
  static constexpr int kBlockN = kPageSize;   // tokens per stage: one whole page
  // wgmma N is at most 256, and a 64x256 fp32 accumulator is 128 registers per thread:
  // wider V is split over several consumer warpgroups, each owning 256 output columns.
  static constexpr int kOutColsPerWG = kHeadDimV < 256 ? kHeadDimV : 256;
  static constexpr int kNumColWGs = kHeadDimV / kOutColsPerWG;
  static constexpr int kNumConsumerWGs = kNumRowWGs * kNumColWGs;
  static constexpr int kNumConsumerThreads = 128 * kNumConsumerWGs;
  // Consumer warpgroups first, then a producer warpgroup (of which one thread works): whole
  // warpgroups so that setmaxnreg can move the producer's registers to the consumers.
  static constexpr int kNumThreads = kNumConsumerThreads + 128;

  // With several consumer warpgroups each computes the scores of its own share of the page's
  // tokens (no QK^T is computed twice); the probabilities meet in shared memory for P V.
  static constexpr bool kSplitScores = kNumColWGs > 1;
  static constexpr int kScoreCols = kBlockN / kNumColWGs;  // tokens scored per warpgroup
  static_assert(kNumRowWGs == 1 || kNumColWGs == 1, "warpgroups split either rows or columns");

  static_assert(kHeadDimV % kOutColsPerWG == 0, "dv must split evenly over consumer warpgroups");
  static_assert(kScoreCols % 8 == 0, "a warpgroup's token share must be whole 8-row swizzle atoms");
  static_assert(kHeadDimQK % 64 == 0, "128-byte swizzle atoms are 64 elements wide");
  static_assert(kOutColsPerWG % 64 == 0, "each consumer's V slice must be whole swizzle atoms");

  // Shared memory. Q and each KV stage use the canonical K-major 128B-swizzled wgmma layout;
  // V is the same bytes viewed MN-major (dims x tokens), so a page is loaded once for both GEMMs.
  using SmemLayoutAtomK = decltype(GMMA::Layout_K_SW128_Atom<Element>{});
  using SmemLayoutAtomV = decltype(GMMA::Layout_MN_SW128_Atom<Element>{});
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtomK{}, Shape<Int<kBlockM>, Int<kHeadDimQK>>{}));
  using SmemLayoutPage = decltype(tile_to_shape(SmemLayoutAtomK{}, Shape<Int<kBlockN>, Int<kKVWidth>>{}));
  // Probabilities of one page (rows x tokens), the A operand of P V when scores are split.
  using SmemLayoutP = decltype(tile_to_shape(SmemLayoutAtomK{}, Shape<Int<kWGRows>, Int<kBlockN>>{}));

  static constexpr int kQBytes = kBlockM * kHeadDimQK * sizeof(Element);
  static constexpr int kPageBytes = kBlockN * kKVWidth * sizeof(Element);
  static constexpr int kPBytes = kSplitScores ? kWGRows * kBlockN * sizeof(Element) : 0;
  static constexpr int kBarrierBytes = 2048;  // pipeline barriers + row-statistics exchange
  // As many pages in flight as fit: 2 for MLA (576-wide rows), 4 for GLA (320-wide; 3 with
  // 128 query rows per CTA).
  static constexpr int kStages = (kSmemBudgetBytes - kQBytes - kPBytes - kBarrierBytes) / kPageBytes;
  static_assert(kStages >= 2, "shared memory must hold Q and at least two KV pages");

  using SmemLayoutK = decltype(tile_to_shape(SmemLayoutAtomK{},
                                             Shape<Int<kBlockN>, Int<kKVWidth>, Int<kStages>>{}));
  // Same offsets as SmemLayoutK with the first two modes swapped: token blocks iterate
  // fastest (Step<_2,_1,_3>), exactly as in the K-major tiling.
  using SmemLayoutV = decltype(tile_to_shape(SmemLayoutAtomV{},
                                             Shape<Int<kKVWidth>, Int<kBlockN>, Int<kStages>>{},
                                             Step<_2, _1, _3>{}));

  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kWGRows>, Int<kScoreCols>, _64>,
                           GMMA::Major::K, GMMA::Major::K>()));
  // P V: P from registers when one warpgroup holds all of it, else from shared memory.
  using OutTileShape = Shape<Int<kWGRows>, Int<kOutColsPerWG>, Int<kBlockN>>;
  using TiledMmaO = std::conditional_t<
      kSplitScores,
      decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, OutTileShape,
                                                   GMMA::Major::K, GMMA::Major::MN>())),
      decltype(make_tiled_mma(GMMA::rs_op_selector<Element, Element, float, OutTileShape,
                                                   GMMA::Major::K, GMMA::Major::MN>()))>;

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;

  // Global view of the paged cache that the TMA descriptor is built from:
  // (token in page, dim, kv head, page) with the dim contiguous.
  using GmemShapeKV = Shape<Int<kBlockN>, Int<kKVWidth>, int32_t, int32_t>;
  using GmemStrideKV = Stride<int64_t, _1, int64_t, int64_t>;
  using GmemLayoutKV = Layout<GmemShapeKV, GmemStrideKV>;
  using TmaKV = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayoutKV{}),
      SmemLayoutPage{}));

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>> kv;
    alignas(1024) cute::array_aligned<Element, kSplitScores ? cute::cosize_v<SmemLayoutP> : 1> p;
    // Per-row statistics exchanged between consumer warpgroups: page maxima, final sums.
    float row_max[kNumColWGs][kWGRows];
    float row_sum[kNumColWGs][kWGRows];
    typename Pipeline::SharedStorage pipeline;
  };
  static_assert(sizeof(SharedStorage) <= kSmemBudgetBytes, "shared memory budget of sm_90");
};

}  // namespace flash_gla::hopper
