// What one instance of the decode kernel family is.
//
// MLA, GLA and GTA differ only in these numbers (flash_gla/reference.py defines each):
//   * dv: the value width; V is the first dv dims of a KV head's cached row.
//   * d_nope, d_rope: the key is [row[:d_nope], R] with R the d_rope RoPE dims, so
//     d_qk = d_nope + d_rope is q's last dim.
//   * where R lives: inline, right after V in every head's row (MLA, GLA; d_nope = dv), or in
//     a separate rope cache with one row per token shared by all KV heads (GLA with a shared
//     RoPE key: d_nope = dv; GTA: d_nope = dv - d_rope, the tied state is both V and K_nope).
// The kernel computes S = Q[:, :d_nope] K_nope^T + Q[:, d_nope:] R^T either way: inline, R is
// simply the next k-blocks of the same shared-memory page.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "common/params.h"
#include "common/tile_policy.h"
#include "decode/run_decode.h"

namespace flash_gla::hopper {

using namespace cute;

template <DType kDType>
struct ElementOf;
template <>
struct ElementOf<DType::kBF16> { using type = cutlass::bfloat16_t; };
template <>
struct ElementOf<DType::kFP16> { using type = cutlass::half_t; };

// Dynamic shared memory available to one block on sm_90 (227 KB), and to each of two blocks
// that share an SM (228 KB of the SM, 1 KB of which each block reserves).
constexpr int kSmemBudgetBytes = 232448;
constexpr int kSmemBudgetBytesOfTwo = 233472 / 2 - 1024;

// The widest K-major wgmma swizzle atom whose width divides kCols: 128-byte rows for
// 64-element tiles, 64-byte rows for GTA-64's 32 RoPE dims.
template <class Element, int kCols>
constexpr auto k_major_atom() {
  constexpr int kBytes = kCols * int(sizeof(Element));
  if constexpr (kBytes % 128 == 0) { return GMMA::Layout_K_SW128_Atom<Element>{}; }
  else if constexpr (kBytes % 64 == 0) { return GMMA::Layout_K_SW64_Atom<Element>{}; }
  else { return GMMA::Layout_K_SW32_Atom<Element>{}; }
}

// The widest swizzle atom of a 16-bit MN-major operand with kRows rows (the contiguous mode).
template <class Element, int kRows>
constexpr auto mn_major_atom() {
  constexpr int kBytes = kRows * int(sizeof(Element));
  if constexpr (kBytes % 128 == 0) { return GMMA::Layout_MN_SW128_Atom<Element>{}; }
  else if constexpr (kBytes % 64 == 0) { return GMMA::Layout_MN_SW64_Atom<Element>{}; }
  else if constexpr (kBytes % 32 == 0) { return GMMA::Layout_MN_SW32_Atom<Element>{}; }
  else { return GMMA::Layout_MN_INTER_Atom<Element>{}; }
}

template <DType kDType_, int kHeadDimV_, int kHeadDimNope_, int kHeadDimRope_, RopeCache kRope_,
          int kRowWGs_ = 1, KVCache kCache_ = KVCache::kSameAsQ, int kQueryCols_ = 0>
struct DecodeTraits {
  using Element = typename ElementOf<kDType_>::type;
  // An e4m3 cache is TMA-loaded as is into a ring of raw stages and dequantised by the
  // producer warpgroup into the Element stages the consumers read (dequant.cuh): everything
  // downstream of the Element stages is the same kernel.
  static constexpr bool kFP8 = kCache_ == KVCache::kE4M3;
  using CacheElement = std::conditional_t<kFP8, cutlass::float_e4m3_t, Element>;
  static constexpr DType kDType = kDType_;
  static constexpr int kHeadDimV = kHeadDimV_;
  static constexpr int kHeadDimNope = kHeadDimNope_;
  static constexpr int kHeadDimRope = kHeadDimRope_;
  static constexpr int kHeadDimQK = kHeadDimNope + kHeadDimRope;
  static constexpr bool kSharedRope = kRope_ == RopeCache::kShared;
  // Elements per cached row of one KV head: V, then (inline) the RoPE dims.
  static constexpr int kKVWidth = kSharedRope ? kHeadDimV : kHeadDimV + kHeadDimRope;
  // A shared RoPE key that follows all of V (GLA: d_nope = dv) is loaded into the stage right
  // after the page's V, so that the consumers read the stage exactly as an inline page; one
  // that stands in for V's last dims (GTA) lies in a tile of its own beside the page.
  static constexpr bool kRopeJoinsPage = kSharedRope && kHeadDimNope == kHeadDimV;
  static constexpr bool kRopeTile = kSharedRope && !kRopeJoinsPage;
  static constexpr int kStageCols = kKVWidth + (kRopeJoinsPage ? kHeadDimRope : 0);  // per stage row
  static_assert(kSharedRope || kHeadDimNope == kHeadDimV, "inline RoPE follows all of V");
  static_assert(!kFP8 || kSharedRope, "an FP8 cache keeps its RoPE keys in q's dtype, in the rope cache");
  static_assert(kHeadDimNope <= kHeadDimV, "the key's latent part is a prefix of the row");
  static_assert(kHeadDimNope % 16 == 0 && kHeadDimRope % 16 == 0, "wgmma k-blocks are 16 wide");
  // k-blocks (16 dims) of S = Q K^T: the latent part from the KV page, then the RoPE part,
  // which is the stage's next k-blocks (inline or joined) or the rope tile's.
  static constexpr int kNopeBlocks = kHeadDimNope / 16;
  static constexpr int kRopeBlocks = kHeadDimRope / 16;
  static constexpr int kRopeFirstBlockB = kRopeTile ? 0 : kNopeBlocks;

  // Transposed (kQueryCols > 0; consumer_transposed.cuh): for a KV head with at most kQueryCols
  // packed query rows, the page's tokens are the wgmma's M and the query rows its N, so that
  // the MMA and softmax work per page follows the real rows instead of a 64-row tile.
  static constexpr int kQueryCols = kQueryCols_;
  static constexpr bool kTransposed = kQueryCols > 0;
  static_assert(kQueryCols % 8 == 0 && kQueryCols <= kRowsPerWarpgroup, "wgmma N is a multiple of 8");
  static_assert(!kTransposed || kRowWGs_ == 1, "the transposed consumer is one warpgroup");

  // Packed query rows per warpgroup: one wgmma M, or N of the transposed consumer.
  static constexpr int kWGRows = kTransposed ? kQueryCols : kRowsPerWarpgroup;
  // Warpgroups stacked along the rows: with two, each page loaded serves 128 rows and one
  // warpgroup's softmax runs while the other's wgmma uses the tensor cores.
  static constexpr int kNumRowWGs = kRowWGs_;
  static constexpr int kBlockM = kWGRows * kNumRowWGs;  // packed query rows per CTA
  static constexpr int kBlockN = kPageSize;   // tokens per stage: one whole page
  // wgmma N is at most 256, and a 64x256 fp32 accumulator is 128 registers per thread:
  // wider V is split over several consumer warpgroups, each owning 256 output columns.
  static constexpr int kOutColsPerWG = kHeadDimV < 256 ? kHeadDimV : 256;
  static constexpr int kNumColWGs = kHeadDimV / kOutColsPerWG;
  // Page turns: a 64-row tile whose output one warpgroup holds (GLA, GTA) has two consumer
  // warpgroups that hold the same rows and take the piece's pages in turn, each with its own O
  // and softmax, merged at the piece's end (turn_merge.cuh): one's softmax runs while the
  // other's wgmmas use the tensor cores, where one warpgroup alone leaves them idle during its
  // softmax. FP8 GLA too (page exponents, kPageExponent: its conversion is light enough for one
  // producer warpgroup beside them); GTA's 64-row FP8 tile keeps one consumer and two producer
  // warpgroups for its float32 dequantisation.
  static constexpr int kNumPageWGs =
      (!kFP8 || kRopeJoinsPage) && !kTransposed && kNumRowWGs == 1 && kNumColWGs == 1 ? 2 : 1;
  static constexpr int kNumConsumerWGs = kNumRowWGs * kNumColWGs * kNumPageWGs;
  static constexpr int kNumConsumerThreads = 128 * kNumConsumerWGs;
  // The consumer threads that work on one page: they release its stage and, for the piece's
  // last, write the output (all consumers but with page turns).
  static constexpr int kTurnThreads = kNumConsumerThreads / kNumPageWGs;

  // With several (column) consumer warpgroups the first computes the page's scores and their
  // softmax alone, and the probabilities and each row's rescale factor reach the others
  // through shared memory for P V. (Splitting the page's tokens over the warpgroups instead
  // has each read all of Q from shared memory for half the tokens: 216 KB of operand reads a
  // page for S, against 144 KB.)
  static constexpr bool kSharedP = kNumColWGs > 1;
  static_assert(kNumRowWGs == 1 || kNumColWGs == 1, "warpgroups split either rows or columns");
  static_assert(kNumRowWGs <= kMaxRowWarpgroups, "the tile policy (and the scheduler) plan for this many");
  // With two row warpgroups the 128-row Q tile leaves room for only three KV stages, and the
  // overlapped consumer holds two of them, so a single page load would be in flight. Keeping
  // Q's RoPE columns in registers instead (the A operand of register-sourced wgmma: 16 per
  // thread for d_rope 64) frees the 16 KB that make a fourth stage fit. MLA's scoring
  // warpgroup keeps them in registers too: its RoPE k-blocks then read only the keys from
  // shared memory, whose bandwidth S's operands use up (NOTES v18).
  //
  // FP8 (dequant.cuh): a raw stage holds an e4m3 page and its scales, TMA-loaded kRawStages - 1
  // pages ahead; the consumers' Element stages are written by the producer warpgroup (the RoPE
  // rows come by TMA). The overlapped consumer holds two Element stages, so it needs three; Q's
  // RoPE columns stay in shared memory only if four raw stages (three loads in flight) fit
  // beside them.
  static constexpr int kScaleGroups = ceil_div(kKVWidth, kScaleGroup);
  // FP8 through the transposed consumer with one scale group per token (GTA): the Element
  // stages hold the e4m3 values unscaled as fp16 (exact, one conversion per two values), and
  // the consumer applies each token's scale to its row of S^T's latent part and folds it into P
  // (consumer_transposed.cuh). Those stages, Q's latent columns and P are then fp16 whatever
  // q's dtype; Q's RoPE columns and the RoPE keys stay in q's dtype.
  static constexpr bool kUnscaledStages = kFP8 && kTransposed && kScaleGroups == 1;
  // FP8 GLA (two scale groups a token; the RoPE key joins the page): the producer writes each
  // value times its scale and times 2^e, e one exponent per page (kPageExponent), in fp16: one
  // conversion and one multiply per two values. e keeps the page's largest value within fp16's
  // range and its small ones out of the subnormals, and is 0 unless the page's scales are far
  // from the usual; the consumer brings Q's RoPE columns (in registers) and O to each page's
  // exponent and takes it out of the scores (page_loop.cuh). Q's latent columns and P are fp16
  // there too. (GTA's 64-row FP8 tile, whose Q tile keeps its RoPE columns because it holds the
  // O tile for the epilogue, dequantises to q's dtype in float32 instead.)
  static constexpr bool kPageExponent = kFP8 && kRopeJoinsPage;
  using StageElement = std::conditional_t<kUnscaledStages || kPageExponent, cutlass::half_t, Element>;
  static constexpr int kStageScaleBytes = kUnscaledStages ? 3 * kBlockN * 4 : 0;  // three stages' token scales
  static constexpr int kRopePageBytes = kSharedRope ? kBlockN * kHeadDimRope * sizeof(Element) : 0;
  static constexpr int kStageBytes = kBlockN * kKVWidth * sizeof(Element) + kRopePageBytes;  // one Element stage
  static constexpr int kRawPageBytes = kFP8 ? kBlockN * kKVWidth : 0;  // e4m3
  static constexpr int kRawStageBytes = kFP8 ? kRawPageBytes + kBlockN * kScaleGroups * 4 : 0;
  // The P slot, row statistics and barriers, padded to the 1 KB alignment of the tiles.
  static constexpr int kBarrierBytes = kFP8 ? 1024 + 64 : 2048;
  // CTAs per SM: the transposed consumer's one warpgroup runs its page loop as a serial chain,
  // so two of its CTAs share an SM (kSmallGroupCtasPerSm) where half the SM's shared memory
  // holds one: Q, P's two slots, two KV stages (FP8: three and two raw pages in flight).
  static constexpr int kTwoCtaSmemBytes =
      kBlockM * kHeadDimQK * int(sizeof(Element)) + 2 * kWGRows * kBlockN * int(sizeof(Element)) +
      (kFP8 ? 3 * kStageBytes + 2 * kRawStageBytes : 2 * kStageBytes) + kStageScaleBytes + kBarrierBytes;
  // ... and where 128 registers a thread hold each role: not the FP8 consumer of d 128 with 16
  // columns (O^T's 16 columns beside S^T's two accumulators spill there).
  static constexpr bool kTwoCtaRegistersFit = !(kFP8 && kHeadDimV * kQueryCols > 128 * 8);
  static constexpr int kCtasPerSm =
      kTransposed && kTwoCtaSmemBytes <= kSmemBudgetBytesOfTwo && kTwoCtaRegistersFit ? kSmallGroupCtasPerSm : 1;
  static constexpr int kSmemBudget = kCtasPerSm > 1 ? kSmemBudgetBytesOfTwo : kSmemBudgetBytes;
  // The transposed consumer's softmax step: kStepPages pages of S^T, one reduction of their
  // column maxima and one P for them (consumer_transposed.cuh). Two pages halve the barriers,
  // shuffles and wgmma round trips per token, but the consumer then holds four stages (a step's
  // pages and the previous step's under P V): only where eight stages fit beside a two-page P,
  // so that four stay in flight (GTA d 64 over a 16-bit cache).
  static constexpr int kTwoPageP = 2 * kWGRows * 2 * kBlockN * int(sizeof(Element));
  static constexpr int kStepPages =
      kTransposed && !kFP8 &&
              (kSmemBudget - kBlockM * kHeadDimQK * int(sizeof(Element)) - kTwoPageP - kBarrierBytes) / kStageBytes >= 8
          ? 2
          : 1;
  static constexpr int kStepTokens = kBlockN * kStepPages;

  // Consumer warpgroups first, then a producer warpgroup (of which one thread works): whole
  // warpgroups so that setmaxnreg can move the producer's registers to the consumers.
  // FP8 with one consumer warpgroup: two producer warpgroups share the dequantisation (one
  // warpgroup alone, one warp per scheduler, is latency-bound at ~1.8 us a GLA page), or with
  // two CTAs per SM one each.
  static constexpr int kNumProducerWGs = kFP8 && kNumConsumerWGs == 1 && kCtasPerSm == 1 ? 2 : 1;
  static constexpr int kNumProducerThreads = 128 * kNumProducerWGs;
  static constexpr int kNumThreads = kNumConsumerThreads + kNumProducerThreads;
  // FP8: arrivals on an Element stage's full barrier, one per producer warp, but with unscaled
  // stages one per thread of the kBlockN that write the token scales (dequant.cuh).
  static constexpr int kStageFullArrivals =
      kUnscaledStages ? kBlockN + (kNumProducerThreads - kBlockN) / 32 : kNumProducerThreads / 32;
  static_assert(kCtasPerSm == 1 || kNumThreads * kCtasPerSm <= 512, "128 registers per thread");
  // Registers per thread of each role where there are more than two warpgroups (setmaxnreg).
  // They come out of what the CTA was launched with (384 threads x 168), or setmaxnreg.inc
  // waits forever: 2 x 128 x 240 + 128 x 24 = 64,512 with two consumer warpgroups; FP8 with
  // two consumer warpgroups: 208 and 88, the most the page-by-page consumers give up without
  // spilling, so that the producer can keep a whole scale group's chunks in flight; FP8 with
  // one consumer and two producer warpgroups: 128 x 240 + 256 x 128 = 63,488.
  // With two CTAs per SM (the transposed consumer) a thread is launched with 128 registers; the
  // consumer with two-page steps takes what its TMA producer leaves (two pages of S^T beside
  // O^T): 128 x 232 + 128 x 24 = 256 x 128.
  static constexpr bool kReallocRegs = kNumConsumerWGs + kNumProducerWGs > 2 || kStepPages > 1;
  static constexpr uint32_t kProducerRegs = !kFP8 ? 24 : kNumProducerWGs > 1 ? 128 : 88;
  static constexpr uint32_t kConsumerRegs = kCtasPerSm > 1   ? 256 - kProducerRegs
                                          : kFP8 && kNumConsumerWGs > 1 ? 208
                                                                        : 240;
  static_assert(!kReallocRegs || kNumConsumerThreads * int(kConsumerRegs) + kNumProducerThreads * int(kProducerRegs) <=
                                     kNumThreads * (65536 / kCtasPerSm / kNumThreads / 8 * 8),
                "setmaxnreg can only move the registers the CTA was launched with");
  // Whether page n's softmax overlaps page n-1's P V (S and P V issued back to back). That
  // keeps two wgmma batches and a second P in flight: it fits the registers except with a
  // shared P (MLA: one shared buffer, and with two stages the consumers would hold both, so
  // that no page load is in flight), which runs page by page.
  // The transposed consumer always pipelines its pages (consumer_transposed.cuh).
  static constexpr bool kOverlapPV = kTransposed       ? true
                                   : kNumPageWGs > 1   ? false
                                   : kFP8              ? !kSharedP && kNumRowWGs == 1
                                                       : !kSharedP;
  static_assert(!kRopeTile || kNumRowWGs == 1, "a rope tile beside two row warpgroups' overlapped pages spills");
  // Page exponents (kPageExponent) need Q's RoPE columns in registers, where they follow each
  // page's exponent, apart from the fp16 latent columns.
  static constexpr bool kFP8QRopeFits =
      kBlockM * kHeadDimQK * int(sizeof(Element)) + 3 * kStageBytes + 4 * kRawStageBytes + kBarrierBytes <=
      kSmemBudget;
  static constexpr bool kQRopeInRegisters =
      !kTransposed && (kNumRowWGs > 1 || kSharedP || kPageExponent || (kFP8 && kOverlapPV && !kFP8QRopeFits));
  static constexpr int kQSmemCols = kQRopeInRegisters ? kHeadDimNope : kHeadDimQK;

  static_assert(kHeadDimV % kOutColsPerWG == 0, "dv must split evenly over consumer warpgroups");
  static_assert(kHeadDimQK % 64 == 0 && kKVWidth % 64 == 0 && kStageCols % 64 == 0,
                "128-byte swizzle atoms are 64 elements wide");
  static_assert(kOutColsPerWG % 64 == 0, "each consumer's V slice must be whole swizzle atoms");

  // Shared memory. Q and each KV stage use the canonical K-major 128B-swizzled wgmma layout;
  // V is the same bytes viewed MN-major (dims x tokens), so a page is loaded once for both GEMMs.
  using SmemLayoutAtomK = decltype(GMMA::Layout_K_SW128_Atom<Element>{});
  using SmemLayoutAtomV = decltype(GMMA::Layout_MN_SW128_Atom<Element>{});
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtomK{}, Shape<Int<kBlockM>, Int<kQSmemCols>>{}));
  using SmemLayoutPage = decltype(tile_to_shape(SmemLayoutAtomK{}, Shape<Int<kBlockN>, Int<kKVWidth>>{}));
  // A shared RoPE page (tokens x d_rope): one per stage, beside the KV head's page.
  using SmemLayoutRopePage = decltype(tile_to_shape(k_major_atom<Element, kHeadDimRope>(),
                                                    Shape<Int<kBlockN>, Int<kHeadDimRope>>{}));
  // Probabilities of one page (rows x tokens), the A operand of P V when it is shared.
  using SmemLayoutP = decltype(tile_to_shape(SmemLayoutAtomK{}, Shape<Int<kWGRows>, Int<kBlockN>>{}));
  // Row r + 8 of P lies one 8-row swizzle atom after row r, swizzled alike: a thread's two
  // accumulator rows (r and r + 8) share their column addresses but for this offset.
  static constexpr int kPRow8Bytes = 8 * kBlockN * int(sizeof(Element));
  static_assert(!kSharedP || [] {
    // The layout maps (row, col) to an element offset; its swizzle acts on the byte address.
    constexpr auto swizzle = SmemLayoutP{}.layout_a();
    constexpr auto offset = SmemLayoutP{}.layout_b();
    for (int r = 0; r + 8 < kWGRows; ++r) {
      for (int c = 0; c < kBlockN; ++c) {
        if (swizzle(offset(r + 8, c) * int(sizeof(Element))) !=
            swizzle(offset(r, c) * int(sizeof(Element))) + kPRow8Bytes) {
          return false;
        }
      }
    }
    return true;
  }(), "P's row r + 8 is row r one swizzle atom on");
  // The transposed consumer's P (query rows x the step's tokens), the B operand of O^T, in two
  // slots: one step's P is written while the previous step's P V may still read the other.
  // MN-major (the query rows contiguous), so that a thread's two adjacent columns of S^T are
  // one 32-bit store.
  using SmemLayoutPT = decltype(tile_to_shape(mn_major_atom<StageElement, kWGRows>(),
                                              Shape<Int<kWGRows>, Int<kStepTokens>, _2>{}));

  // The epilogue stages each consumer warpgroup's 16-bit O tile (64 x kOutColsPerWG) in the Q
  // tile's shared memory, one tile after another.
  using SmemLayoutOStage = decltype(tile_to_shape(SmemLayoutAtomK{},
                                                  Shape<Int<kWGRows>, Int<kOutColsPerWG>>{}));
  static constexpr int kOutStageElems = kWGRows * kOutColsPerWG;
  static_assert(kNumConsumerWGs / kNumPageWGs * kOutStageElems <= kBlockM * kQSmemCols,
                "the O tiles must fit in the Q tile's shared memory");
  static constexpr int kQBytes = kBlockM * kQSmemCols * sizeof(Element);
  // Page turns: one warpgroup's O (kOutColsPerWG fp32 values per row, per thread half a row's
  // worth) reaches the other through the Q tile, kTurnChunk values per thread at a time: the
  // largest power of two that both the tile and the O fragment hold.
  static constexpr int kTurnChunk = [] {
    const int values = kWGRows * kOutColsPerWG / 128, fits = kQBytes / 4 / 128;
    int chunk = 1;
    while (chunk * 2 <= values && chunk * 2 <= fits) { chunk *= 2; }
    return chunk;
  }();
  static_assert(kNumPageWGs == 1 || (kNumRowWGs == 1 && kNumColWGs == 1 && kTurnChunk >= 16),
                "page turns: one warpgroup's O reaches the other through the Q tile");
  static constexpr int kPBytes = (kSharedP ? kBlockN : kTransposed ? 2 * kStepTokens : 0) * kWGRows * sizeof(Element);
  // Bytes that one Element stage's TMA brings: the page and its RoPE rows; for FP8, whose
  // pages the producer warpgroup writes, the leader expects its RoPE rows' bytes itself.
  static constexpr int kStageTmaBytes = kFP8 ? 0 : kStageBytes;

  // As many pages in flight as fit: 2 for MLA (576-wide rows), 4 for GLA (320-wide), capped
  // at 8 for the narrow GTA pages. FP8 keeps as many Element stages as the consumers hold at
  // once plus one being written, and gives the rest to raw pages in flight.
  static constexpr int kSmemForStages = kSmemBudget - kQBytes - kPBytes - kBarrierBytes;
  // ... and up to two Element stages more where the raw ring keeps its cap of 8 pages beside
  // them: the producer then fills a stage pages earlier, and the RoPE rows it TMAs in when the
  // stage frees have that much longer to land (GTA with one CTA per SM, GTA d 64).
  static constexpr int kFP8HeldStages = (kOverlapPV || kNumPageWGs > 1 ? 2 : 1) + 1;  // overlapped or turns: 2 held
  static constexpr int kFP8SpareStages =
      kFP8 ? cute::max(0, cute::min(2, (kSmemForStages - 8 * kRawStageBytes - kFP8HeldStages * kStageBytes) / kStageBytes))
           : 0;
  static constexpr int kStages = kFP8 ? kFP8HeldStages + kFP8SpareStages : cute::min(8, kSmemForStages / kStageBytes);
  static constexpr int kRawStages = kFP8 ? cute::min(8, (kSmemForStages - kStages * kStageBytes) / kRawStageBytes) : 1;
  static_assert(kStages >= 2, "shared memory must hold Q and at least two KV pages");
  // Page turns: each page warpgroup waits on full barriers of its own (PageLoop::turns).
  static constexpr bool kTurnBarriers = kNumPageWGs > 1;
  static_assert(!kFP8 || kRawStages >= 4 - kCtasPerSm, "FP8: at least two raw pages in flight per SM besides those converted");

  using SmemLayoutK = decltype(tile_to_shape(SmemLayoutAtomK{},
                                             Shape<Int<kBlockN>, Int<kStageCols>, Int<kStages>>{}));
  // Same offsets as SmemLayoutK with the first two modes swapped: token blocks iterate
  // fastest (Step<_2,_1,_3>), exactly as in the K-major tiling.
  using SmemLayoutV = decltype(tile_to_shape(SmemLayoutAtomV{},
                                             Shape<Int<kStageCols>, Int<kBlockN>, Int<kStages>>{},
                                             Step<_2, _1, _3>{}));
  // kCols columns of every stage, for the TMA that fills them: the cache page's first
  // kKVWidth, and a joined RoPE key's d_rope after them. Column blocks of 64 are whole swizzle
  // atoms, so columns [c, c + kCols) are this view at a pointer c * kBlockN elements on.
  template <int kCols>
  using SmemLayoutStageCols = decltype(composition(
      SmemLayoutK{}, Layout<Shape<Int<kBlockN>, Int<kCols>, Int<kStages>>,
                            Stride<_1, Int<kBlockN>, Int<kBlockN * kStageCols>>>{}));
  using SmemLayoutRope = decltype(tile_to_shape(k_major_atom<Element, kHeadDimRope>(),
                                                Shape<Int<kBlockN>, Int<kHeadDimRope>, Int<kStages>>{}));

  // The transposed consumer's S^T = K Q^T (A: the page, B: the Q tile, both K-major) and
  // O^T = V^T P^T (A: the page viewed dims x tokens, B: P, query rows x tokens; both MN-major).
  // Its MMA shapes stand in for the others' (whose M of 64 rows it does not have).
  using ScoreTileShape = std::conditional_t<kTransposed, Shape<Int<kBlockN>, Int<kWGRows>, _64>,
                                            Shape<Int<kWGRows>, Int<kBlockN>, _64>>;
  using TiledMmaS = decltype(make_tiled_mma(GMMA::ss_op_selector<StageElement, StageElement, float, ScoreTileShape,
                                                                  GMMA::Major::K, GMMA::Major::K>()));
  // The RoPE part of S: with Q's RoPE columns in registers (kQRopeInRegisters); transposed,
  // from shared memory in q's dtype (with unscaled stages, into an accumulator of its own).
  using TiledMmaSRope = std::conditional_t<
      kTransposed,
      decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, ScoreTileShape,
                                                   GMMA::Major::K, GMMA::Major::K>())),
      decltype(make_tiled_mma(GMMA::rs_op_selector<Element, Element, float, ScoreTileShape,
                                                   GMMA::Major::K, GMMA::Major::K>()))>;
  // P V: P from registers when one warpgroup holds all of it, else from shared memory.
  using OutTileShape = std::conditional_t<kTransposed, Shape<Int<kHeadDimV>, Int<kWGRows>, Int<kBlockN>>,
                                          Shape<Int<kWGRows>, Int<kOutColsPerWG>, Int<kBlockN>>>;
  using TiledMmaO = std::conditional_t<
      kTransposed,
      decltype(make_tiled_mma(GMMA::ss_op_selector<StageElement, StageElement, float, OutTileShape,
                                                   GMMA::Major::MN, GMMA::Major::MN>())),
      std::conditional_t<
          kSharedP,
          decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, OutTileShape,
                                                       GMMA::Major::K, GMMA::Major::MN>())),
          decltype(make_tiled_mma(GMMA::rs_op_selector<StageElement, StageElement, float, OutTileShape,
                                                       GMMA::Major::K, GMMA::Major::MN>()))>>;

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;

  // FP8 raw stages: (tokens, kv_width, raw stage) e4m3, K-major and swizzled like the Element
  // tiles, so that a thread's 16-byte reads of 8 tokens hit 8 different bank groups.
  using SmemLayoutRawPage = decltype(tile_to_shape(k_major_atom<CacheElement, kKVWidth>(),
                                                   Shape<Int<kBlockN>, Int<kKVWidth>>{}));
  using SmemLayoutRaw = decltype(tile_to_shape(k_major_atom<CacheElement, kKVWidth>(),
                                               Shape<Int<kBlockN>, Int<kKVWidth>, Int<kRawStages>>{}));
  using SmemLayoutCachePage = std::conditional_t<kFP8, SmemLayoutRawPage, SmemLayoutPage>;

  // Global view of the paged cache that the TMA descriptor is built from:
  // (token in page, dim, kv head, page) with the dim contiguous.
  using GmemShapeKV = Shape<Int<kBlockN>, Int<kKVWidth>, int32_t, int32_t>;
  using GmemStrideKV = Stride<int64_t, _1, int64_t, int64_t>;
  using GmemLayoutKV = Layout<GmemShapeKV, GmemStrideKV>;
  using TmaKV = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<CacheElement const*>(nullptr)), GmemLayoutKV{}),
      SmemLayoutCachePage{}));
  // The rope cache: (token in page, dim, page), one row per token for all KV heads.
  using GmemShapeRope = Shape<Int<kBlockN>, Int<kHeadDimRope>, int32_t>;
  using GmemStrideRope = Stride<int64_t, _1, int64_t>;
  using TmaRope = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                  Layout<GmemShapeRope, GmemStrideRope>{}),
      SmemLayoutRopePage{}));

  // FP8's raw stages (dequant.cuh); other instances hold an empty struct in their place.
  struct RawRing {
    alignas(1024) cute::array_aligned<CacheElement, cute::cosize_v<SmemLayoutRaw>> pages;
    alignas(16) float scale[kRawStages][kBlockN][kScaleGroups];
    // kUnscaledStages: each Element stage's token scales (0 past the sequence end), written by
    // the producer with the stage, read by the consumer.
    alignas(16) float stage_scale[kUnscaledStages ? kStages : 1][kUnscaledStages ? kBlockN : 1];
    // kPageExponent: each Element stage's exponent e (its values are the page's times 2^e),
    // written by the producer leader with the stage, read by the consumers.
    int stage_exponent[kPageExponent ? kStages : 1];
    // kUnscaledStages: each Element stage's largest live token scale (written by the producer's
    // last warp with the stage, read by the consumer).
    float stage_max_scale[kUnscaledStages ? kStages : 1];
    // A raw stage is full once its page's TMA landed and the kBlockN threads that copy its
    // scales arrived (cp.async.mbarrier.arrive.noinc).
    uint64_t full[kRawStages];
    // ... and empty once every producer warp has converted it (one arrival per warp): the
    // threads that refill it wait for this, not for the Element stage, whose barrier also
    // waits for the RoPE rows' TMA.
    uint64_t empty[kRawStages];
    int physical_page[kRawStages];  // of each raw stage's page, for its RoPE rows' TMA (the leader's)
  };
  struct NoRawRing {};

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<StageElement, cute::cosize_v<SmemLayoutK>> kv;
    alignas(1024) cute::array_aligned<Element, kRopeTile ? cute::cosize_v<SmemLayoutRope> : 1> rope;
    alignas(1024) cute::array_aligned<StageElement, kSharedP ? cute::cosize_v<SmemLayoutP>
                                               : kTransposed ? cute::cosize_v<SmemLayoutPT> : 1> p;
    // Per-row statistics exchanged between consumer warpgroups: final maxima and sums; with a
    // shared P each page's rescale factors.
    float row_max[cute::max(kNumColWGs, kNumPageWGs)][kWGRows];
    float row_sum[cute::max(kNumColWGs, kNumPageWGs)][kWGRows];
    float row_rescale[kSharedP ? kWGRows : 1];
    // Transposed: each warp's column maxima (then sums) of a page, for the other warps.
    float col_exchange[kTransposed ? 4 : 1][kTransposed ? kWGRows : 1];
    typename Pipeline::SharedStorage pipeline;
    // kTurnBarriers: per page warpgroup and stage, the full barrier of that warpgroup's pages, in
    // place of the pipeline's (the producer arrives on the one of the page's warpgroup).
    uint64_t turn_full[kTurnBarriers ? kNumPageWGs : 1][kTurnBarriers ? kStages : 1];
    std::conditional_t<kFP8, RawRing, NoRawRing> raw;
  };
  static_assert(sizeof(SharedStorage) <= kSmemBudget, "shared memory budget of sm_90");
};

}  // namespace flash_gla::hopper
