// Paged decode attention for one traits instance (MLA, GLA, ...): the whole kernel.
//
// Grid: (m-blocks of 64 or 128 packed query rows, KV heads, up to the scheduler's parts).
// Each CTA is persistent over the parts blockIdx.z, + gridDim.z, ... and the requests that
// csrc/scheduler.cu assigned to them; for each request piece it computes
// softmax(Q K^T * scale) V over that piece's pages.
//
// Roles (warp-specialised):
//   last warpgroup (1 thread) producer: TMA-loads whole KV pages (64 tokens x kv_width) of this
//                              KV head into a ring of kStages shared-memory stages, each
//                              completing on an mbarrier, page addresses from block_table;
//                              with a shared rope cache, the page's RoPE rows (64 x d_rope)
//                              join the same stage. It starts once the first Q tile's loads
//                              are issued, so that they reach HBM before ~20 MB of pages.
//   warpgroups 0..            consumers: load the piece's Q tile (128-row CTAs keep its RoPE
//                              columns in registers: a fourth stage fits), then per page
//                              S = Q K^T (wgmma, smem x smem), online softmax in registers,
//                              O += P V (wgmma, P from registers, V = the same page viewed
//                              MN-major), and release the stage; page n's softmax runs while
//                              page n-1's P V is on the tensor cores (Traits::kOverlapPV).
//                              Each consumer warpgroup owns up to 256 output columns and 64
//                              query rows. With dv = 512 the two warpgroups score half of the
//                              page's tokens each, exchange row maxima and write P to shared
//                              memory, so that no QK^T is computed twice.
// Epilogue: a request handled by one piece writes bf16/fp16 O (staged in the Q tile's shared
// memory, stored as 16-byte vectors) and LSE; a request split over several pieces writes fp32
// partials that csrc/combine.cu merges.
//
// Shared memory: Q (64 or 128 rows x d_qk, or x d_nope with the RoPE columns in registers) +
// kStages pages (64 x kv_width), 128B-swizzled K-major, [+ kStages shared RoPE pages
// (64 x d_rope)] + P (64 x 64) and per-row statistics when the scores are split.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/fast_math.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "params.h"
#include "decode/fragment_utils.cuh"
#include "decode/softmax.cuh"
#include "decode/traits.h"

namespace flash_gla::hopper {

using namespace cute;

// Named barriers among the consumer threads (id 0 is __syncthreads); kQIssued also holds the
// producer's first warp.
enum class ConsumerBarrier : int {
  kQFree = 1,      // every consumer is done reading the previous piece's Q tile
  kQReady = 2,     // the new Q tile is in shared memory
  kPageMasked = 3,  // rows past the sequence end of a page are zeroed
  kScoresMax = 4,   // split scores: each warpgroup's page row maxima are in shared memory
  kPReady = 5,      // split scores: the page's probabilities are in shared memory
  kRowSums = 6,     // split scores: each warpgroup's final row sums are in shared memory
  kOutputStage = 7,  // every consumer is done with the piece's Q tile: O may be staged there
  kOutputStaged = 8,  // the piece's O tiles are in shared memory
  kQIssued = 9        // the first Q tile's loads are issued (consumers arrive, producer waits)
};

__device__ __forceinline__ void consumer_sync(int num_threads, ConsumerBarrier id) {
  cutlass::arch::NamedBarrier::sync(num_threads, static_cast<int>(id));
}

// One request's share of one scheduler part.
struct WorkPiece {
  int batch;
  int seqlen;      // cache_seqlens[batch], clamped to what the block table can address
  int num_pages;   // pages holding the request's keys
  int page_begin;  // this piece's pages: [page_begin, page_end)
  int page_end;
  int slot;        // accumulator slot for a split request
  bool is_split;   // the request is spread over several pieces (needs the combine kernel)
};

struct PartSchedule {
  int begin_batch, begin_page, end_batch, end_page, begin_split;

  // kReload: read every field from global memory (an L1 hit) each time, instead of letting
  // the compiler keep five values live across a consumer's page loop, where registers are
  // at the setmaxnreg limit (they were spilled otherwise).
  template <bool kReload = false>
  __device__ static PartSchedule load(const DecodeParams& p, int part) {
    const int* m = p.sched_meta + part * kMetaFields;
    auto field = [&](int f) {
      if constexpr (kReload) {
        int v;
        asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(v) : "l"(m + f));
        return v;
      } else {
        return m[f];
      }
    };
    return {field(kMetaBeginBatch), field(kMetaBeginPage), field(kMetaEndBatch),
            field(kMetaEndPage), field(kMetaBeginSplit)};
  }

  __device__ WorkPiece piece(const DecodeParams& p, int batch) const {
    WorkPiece w;
    w.batch = batch;
    const int capacity = p.max_pages_per_seq * kPageSize;
    w.seqlen = max(0, min(p.cache_seqlens[batch], capacity));
    w.num_pages = (w.seqlen + kPageSize - 1) / kPageSize;
    w.page_end = min(batch == end_batch ? end_page : w.num_pages, w.num_pages);
    w.page_begin = min(batch == begin_batch ? begin_page : 0, w.page_end);
    const int first_slot = p.num_splits[batch];
    w.is_split = p.num_splits[batch + 1] - first_slot > 1;
    w.slot = first_slot + (batch == begin_batch ? begin_split : 0);
    return w;
  }
};

// Packed query row m of a KV head is query token m / group of query head
// kv_head * group + m % group. The division uses a precomputed multiply-high and shift: an
// integer division by a runtime value is ~20 dependent instructions, and it ran for every
// 16-byte vector of the Q load and the output store, with one warp per scheduler to issue them.
struct PackedRows {
  cutlass::FastDivmod group;
  int kv_head;

  __device__ PackedRows(int group_size, int kv_head_) : group(group_size), kv_head(kv_head_) {}

  __device__ void query(int m, int& token, int& head) const {
    int h;
    group(token, h, m);
    head = kv_head * group.divisor + h;
  }
  // Element offset of row m in a (token, head, dim) tensor with the given strides.
  __device__ int64_t offset(int m, int64_t token_stride, int64_t head_stride) const {
    int token, head;
    query(m, token, head);
    return token * token_stride + head * head_stride;
  }
};

template <class Traits>
struct DecodeKernel {
  using Element = typename Traits::Element;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Pipeline::PipelineState;
  using SharedStorage = typename Traits::SharedStorage;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDimQK = Traits::kHeadDimQK;
  static constexpr int kHeadDimV = Traits::kHeadDimV;
  static constexpr int kKVWidth = Traits::kKVWidth;
  static constexpr int kHeadDimRope = Traits::kHeadDimRope;
  static constexpr bool kSharedRope = Traits::kSharedRope;
  static constexpr int kOutCols = Traits::kOutColsPerWG;
  static constexpr int kConsumerThreads = Traits::kNumConsumerThreads;
  static constexpr int kChunk = 16 / sizeof(Element);  // elements per 16-byte vector

  // ------------------------------------------------------------------ producer
  static __device__ void produce(const DecodeParams& p, const typename Traits::TmaKV& tma_kv,
                                 const typename Traits::TmaRope& tma_rope, SharedStorage& smem,
                                 Pipeline& pipeline, int kv_head) {
    Tensor mKV = tma_kv.get_tma_tensor(
        make_shape(Int<kBlockN>{}, Int<kKVWidth>{}, p.num_heads_kv, p.num_pages));
    Tensor gKV = mKV(_, _, kv_head, _);  // (token, dim, page)
    Tensor sK = make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutK{});
    auto [tKgK, tKsK] = tma_partition(tma_kv, Int<0>{}, Layout<_1>{},
                                      group_modes<0, 2>(sK), group_modes<0, 2>(gKV));
    Tensor mR = tma_rope.get_tma_tensor(make_shape(Int<kBlockN>{}, Int<kHeadDimRope>{}, p.num_pages));
    Tensor sR = make_tensor(make_smem_ptr(smem.rope.data()), typename Traits::SmemLayoutRope{});
    auto [tRgR, tRsR] = tma_partition(tma_rope, Int<0>{}, Layout<_1>{},
                                      group_modes<0, 2>(sR), group_modes<0, 2>(mR));
    PipelineState state = cutlass::make_producer_start_state<Pipeline>();
    for (int part = blockIdx.z; part < p.num_parts; part += gridDim.z) {
      const PartSchedule sched = PartSchedule::load(p, part);
      for (int batch = sched.begin_batch; batch <= sched.end_batch; ++batch) {
        const WorkPiece w = sched.piece(p, batch);
        const int* pages = p.block_table + batch * p.block_table_batch_stride;
        for (int page = w.page_begin; page < w.page_end; ++page) {
          const int physical_page = pages[page];
          pipeline.producer_acquire(state);
          auto* full_barrier = pipeline.producer_get_barrier(state);
          copy(tma_kv.with(*full_barrier), tKgK(_, physical_page), tKsK(_, state.index()));
          if constexpr (kSharedRope) {
            copy(tma_rope.with(*full_barrier), tRgR(_, physical_page), tRsR(_, state.index()));
          }
          ++state;
        }
      }
    }
  }

  // ------------------------------------------------------------------ consumers
  // Starts copying the piece's packed query rows into shared memory (zeros for padding rows)
  // with cp.async: every 16-byte load of the tile is in flight at once, instead of one
  // load-to-store round trip per vector (which cost ~10 us per piece at short context). The
  // caller waits with cp.async.wait_group 0.
  static __device__ void load_q(const DecodeParams& p, SharedStorage& smem, int batch,
                                PackedRows const& rows, int m_block, int consumer_tid) {
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    const Element* q = static_cast<const Element*>(p.q) + batch * p.q_batch_stride;
    constexpr int kChunksPerRow = Traits::kQSmemCols / kChunk;
    for (int idx = consumer_tid; idx < kBlockM * kChunksPerRow; idx += kConsumerThreads) {
      const int row = idx / kChunksPerRow;
      const int col = (idx % kChunksPerRow) * kChunk;
      const int m = m_block * kBlockM + row;
      const bool valid = m < p.rows_per_kv_head;
      const Element* src = q;  // any valid address: a padding row reads 0 bytes
      if (valid) { src = q + rows.offset(m, p.q_seq_stride, p.q_head_stride) + col; }
      const uint32_t dst = cute::cast_smem_ptr_to_uint(&sQ(row, col));
      // src-size 0 zero-fills the 16 bytes.
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                   "r"(valid ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }

  // Loads this thread's elements of its warpgroup's Q RoPE columns (64 rows x d_rope) into
  // the A-operand registers of the RoPE wgmma (Traits::kQRopeInRegisters); padding rows are 0.
  // The fragment's first mode is a pair of adjacent columns: one 32-bit load per pair.
  template <class TensorQ, class TensorC>
  static __device__ void load_q_rope(const DecodeParams& p, int batch, PackedRows const& rows,
                                     int row_base,
                                     TensorQ& tQr, TensorC const& coord) {
    const Element* q = static_cast<const Element*>(p.q) + batch * p.q_batch_stride +
                       Traits::kHeadDimNope;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tQr); i += 2) {
      const int m = row_base + get<0>(coord(i));
      cutlass::Array<Element, 2> pair;
      pair.clear();
      if (m < p.rows_per_kv_head) {
        pair = *reinterpret_cast<const cutlass::Array<Element, 2>*>(
            q + rows.offset(m, p.q_seq_stride, p.q_head_stride) + get<1>(coord(i)));
      }
      tQr(i) = pair[0];
      tQr(i + 1) = pair[1];
    }
  }

  // Rows past the sequence end may hold anything (NaN included); 0 * NaN would poison P V,
  // so they are zeroed in shared memory (the page, and its shared RoPE rows) before either
  // GEMM reads the page.
  static __device__ void zero_rows_past_end(SharedStorage& smem, int stage, int first_row,
                                            int consumer_tid) {
    zero_rows<kKVWidth>(make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutK{}),
                        stage, first_row, consumer_tid);
    if constexpr (kSharedRope) {
      zero_rows<kHeadDimRope>(
          make_tensor(make_smem_ptr(smem.rope.data()), typename Traits::SmemLayoutRope{}), stage,
          first_row, consumer_tid);
    }
  }

  // Zeroes rows [first_row, 64) of one stage of a (tokens, kCols, stage) tile, 16 bytes a store.
  template <int kCols, class TensorS>
  static __device__ void zero_rows(TensorS&& tile, int stage, int first_row, int consumer_tid) {
    constexpr int kChunksPerRow = kCols / kChunk;
    const int count = (kBlockN - first_row) * kChunksPerRow;
    for (int idx = consumer_tid; idx < count; idx += kConsumerThreads) {
      const int row = first_row + idx / kChunksPerRow;
      const int col = (idx % kChunksPerRow) * kChunk;
      *reinterpret_cast<uint4*>(&tile(row, col, stage)) = make_uint4(0, 0, 0, 0);
    }
  }

  // Split scores: combines a per-row statistic of this thread's rows (max or sum) with the
  // other consumer warpgroups' values for the same rows, through `exchange` in shared memory.
  template <bool kMax, int kRows, class TensorC>
  static __device__ void combine_across_warpgroups(float (&exchange)[Traits::kNumColWGs][Traits::kWGRows],
                                                   float (&value)[kRows], TensorC const& coord,
                                                   int wg, int wg_tid, ConsumerBarrier id) {
    if (wg_tid % 4 == 0) {  // one lane of each row's quad publishes
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) { exchange[wg][get<0>(coord(i, 0))] = value[i]; }
    }
    consumer_sync(kConsumerThreads, id);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int row = get<0>(coord(i, 0));
      float combined = exchange[0][row];
      CUTLASS_PRAGMA_UNROLL
      for (int w = 1; w < Traits::kNumColWGs; ++w) {
        combined = kMax ? fmaxf(combined, exchange[w][row]) : combined + exchange[w][row];
      }
      value[i] = combined;
    }
  }

  // Issues O += P V for one page as one wgmma batch, not waited for: P from registers, or
  // from shared memory when the scores are split over warpgroups. The caller fences P and O
  // before the batch that precedes this one: an operand fence between two open batches
  // counts as a write to a wgmma input, and ptxas would then serialise every wgmma.
  template <class ThrMmaO, class TensorSP, class TensorP, class TensorV, class TensorO>
  static __device__ void issue_pv(typename Traits::TiledMmaO& mma_o, ThrMmaO const& thr_o,
                                  TensorSP const& sP, TensorP& tOrP, TensorV const& tOrV,
                                  TensorO& tOrO) {
    warpgroup_arrive();
    if constexpr (Traits::kSplitScores) {
      Tensor tOsP = thr_o.partition_fragment_A(sP);
      gemm_k_blocks<0, 0, decltype(size<2>(tOsP))::value>(mma_o, tOsP, tOrV, tOrO);
    } else {
      Tensor tOrP_a = make_tensor(tOrP.data(), accumulator_as_operand_a(tOrP.layout()));
      gemm_k_blocks<0, 0, decltype(size<2>(tOrP_a))::value>(mma_o, tOrP_a, tOrV, tOrO);
    }
    warpgroup_commit_batch();
  }

  static __device__ void consume(const DecodeParams& p, SharedStorage& smem, Pipeline& pipeline,
                                 int kv_head, int m_block, int consumer_tid) {
    constexpr bool kSplit = Traits::kSplitScores;
    constexpr int kScoreCols = Traits::kScoreCols;
    // Which slice of O (and of the page's tokens) and which 64 of the CTA's query rows this
    // warpgroup owns; compile-time 0 where there is only one.
    constexpr int kColWGs = Traits::kNumColWGs, kRowWGs = Traits::kNumRowWGs;
    // Read through a shuffle so that ptxas knows the index is warp-uniform: the shared-memory
    // descriptors derived from it then live in uniform registers instead of 2 general
    // registers per k-block (32 of them for Q alone with two row warpgroups).
    const int warpgroup = __shfl_sync(0xffffffff, consumer_tid / 128, 0);
    const int col_wg = kColWGs == 1 ? 0 : warpgroup % kColWGs;
    const int row_wg = kRowWGs == 1 ? 0 : warpgroup / kColWGs;
    const int row_base = m_block * kBlockM + row_wg * Traits::kWGRows;  // its first packed row
    const int wg_tid = consumer_tid % 128;

    typename Traits::TiledMmaS mma_s;
    typename Traits::TiledMmaO mma_o;
    auto thr_s = mma_s.get_thread_slice(wg_tid);
    auto thr_o = mma_o.get_thread_slice(wg_tid);

    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutV{});
    // (kOutCols, tokens, stage): this warpgroup's columns of V.
    Tensor sVw = flat_divide(sV, Shape<Int<kOutCols>, Int<kBlockN>>{})(_, _, col_wg, 0, _);

    // (kScoreCols, kv_width, stage): the tokens this warpgroup scores; (kScoreCols, d_rope,
    // stage): their shared RoPE rows.
    Tensor sKw = flat_divide(sK, Shape<Int<kScoreCols>, Int<kKVWidth>>{})(_, _, col_wg, 0, _);
    Tensor sR = make_tensor(make_smem_ptr(smem.rope.data()), typename Traits::SmemLayoutRope{});
    Tensor sRw = flat_divide(sR, Shape<Int<kScoreCols>, Int<kHeadDimRope>>{})(_, _, col_wg, 0, _);
    // (64, d_qk or d_nope): this warpgroup's rows of the Q tile in shared memory.
    Tensor sQw = flat_divide(sQ, Shape<Int<Traits::kWGRows>, Int<Traits::kQSmemCols>>{})(_, _, row_wg, 0);
    Tensor sP = make_tensor(make_smem_ptr(smem.p.data()), typename Traits::SmemLayoutP{});

    Tensor tSrQ = thr_s.partition_fragment_A(sQw);  // (MMA, 1, k-blocks) descriptors
    Tensor tSrK = thr_s.partition_fragment_B(sKw);  // (MMA, 1, kv_width/16, stage)
    Tensor tSrR = thr_s.partition_fragment_B(sRw);  // (MMA, 1, d_rope/16, stage)
    Tensor tOrV = thr_o.partition_fragment_B(sVw);  // (MMA, 1, tokens/16, stage)
    // Q's RoPE columns in registers (used only with Traits::kQRopeInRegisters): the RoPE
    // k-blocks of S then run as register-sourced wgmma against the same shared-memory keys.
    typename Traits::TiledMmaSRope mma_r;
    auto thr_r = mma_r.get_thread_slice(wg_tid);
    Tensor tSrQr = thr_r.partition_fragment_A(make_tensor(
        make_smem_ptr(smem.q.data()), make_layout(Shape<Int<Traits::kWGRows>, Int<kHeadDimRope>>{})));
    Tensor tScQr = thr_r.partition_A(
        make_identity_tensor(Shape<Int<Traits::kWGRows>, Int<kHeadDimRope>>{}));
    Tensor tSrKr = thr_r.partition_fragment_B(sKw);
    Tensor tSrRr = thr_r.partition_fragment_B(sRw);
    Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<Traits::kWGRows>, Int<kScoreCols>>{});
    Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<Traits::kWGRows>, Int<kOutCols>>{});

    // Row/column views and the (row, col) coordinate of every accumulator element.
    Tensor tSrS_rc = make_tensor(tSrS.data(), accumulator_rowcol(tSrS.layout()));
    Tensor tOrO_rc = make_tensor(tOrO.data(), accumulator_rowcol(tOrO.layout()));
    Tensor tScS_rc = [&] {
      Tensor c = thr_s.partition_C(make_identity_tensor(Shape<Int<Traits::kWGRows>, Int<kScoreCols>>{}));
      return make_tensor(c.data(), accumulator_rowcol(c.layout()));
    }();
    Tensor tOcO_rc = [&] {
      Tensor c = thr_o.partition_C(make_identity_tensor(Shape<Int<Traits::kWGRows>, Int<kOutCols>>{}));
      return make_tensor(c.data(), accumulator_rowcol(c.layout()));
    }();
    constexpr int kRows = decltype(size<0>(tSrS_rc))::value;  // rows per thread (2)
    static_assert(kRows == decltype(size<0>(tOrO_rc))::value, "S and O rows must coincide");
    // Row i of this thread's accumulators within the 64-row tile.
    auto row_of = [&](int i) { return int(get<0>(tScS_rc(i, 0))); };
    const int first_score_col = col_wg * kScoreCols;  // this warpgroup's first token of a page
    // This warpgroup's columns of P, partitioned like its score accumulator.
    Tensor tSsP = thr_s.partition_C(
        flat_divide(sP, Shape<Int<Traits::kWGRows>, Int<kScoreCols>>{})(_, _, 0, col_wg));

    // P of the page whose P V is next, as 16-bit values in the accumulator's layout (unused
    // when the scores are split: P then lives in shared memory).
    Tensor tOrP = make_tensor<Element>(tSrS.layout());

    OnlineSoftmax<kRows> softmax;
    PipelineState state;  // consumers start at stage 0, phase 0
    const PackedRows rows(p.group_size, kv_head);

    // The producer starts its KV loads only once the first Q tile's loads are issued: all
    // CTAs start together and their first pages alone are ~20 MB, so a Q load queued behind
    // them arrived ~10 us into the kernel (per-CTA trace, gla2 at 1K) while the ring sat full.
    bool producer_released = false;
    auto release_producer = [&] {
      cutlass::arch::NamedBarrier::arrive(kConsumerThreads + 32,
                                          static_cast<int>(ConsumerBarrier::kQIssued));
      producer_released = true;
    };

    for (int part = blockIdx.z; part < p.num_parts; part += gridDim.z) {
      for (int batch = PartSchedule::load<true>(p, part).begin_batch;
           batch <= PartSchedule::load<true>(p, part).end_batch; ++batch) {
        consumer_sync(kConsumerThreads, ConsumerBarrier::kQFree);
        load_q(p, smem, batch, rows, m_block, consumer_tid);
        if (!producer_released) { release_producer(); }  // the RoPE register loads need not wait
        if constexpr (Traits::kQRopeInRegisters) {
          load_q_rope(p, batch, rows, row_base, tSrQr, tScQr);
        }
        // The piece's bounds (a chain of dependent global loads) are read while Q is in flight.
        const WorkPiece w = PartSchedule::load<true>(p, part).piece(p, batch);
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        if constexpr (Traits::kQRopeInRegisters) { warpgroup_fence_operand(tSrQr); }
        cutlass::arch::fence_view_async_shared();  // Q written by threads, read by wgmma
        consumer_sync(kConsumerThreads, ConsumerBarrier::kQReady);

        // Last key each of this thread's rows may see (causal: query token r of s_q sees
        // keys up to L - s_q + r); keys from mask_from on need a per-element check.
        int row_last_key[kRows];
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kRows; ++i) {
          const int token = rows.group.div(row_base + row_of(i));
          row_last_key[i] = p.causal ? min(w.seqlen - p.seqlen_q + token, w.seqlen - 1)
                                     : w.seqlen - 1;
        }
        const int mask_from = p.causal ? w.seqlen - p.seqlen_q + 1 : w.seqlen;

        clear(tOrO);
        softmax.reset();

        // Waits for a page's stage and zeroes its rows past the sequence end; returns the stage.
        auto wait_page = [&](int page) {
          pipeline.consumer_wait(state);
          const int stage = state.index();
          const int valid_rows = w.seqlen - page * kBlockN;
          if (valid_rows < kBlockN) {
            zero_rows_past_end(smem, stage, valid_rows, consumer_tid);
            cutlass::arch::fence_view_async_shared();
            consumer_sync(kConsumerThreads, ConsumerBarrier::kPageMasked);
          }
          return stage;
        };
        // Issues S = Q[:, :d_nope] K_nope^T + Q[:, d_nope:] R^T as one wgmma batch; R is the
        // page's next k-blocks (inline) or the stage's rope tile (shared).
        auto issue_scores = [&](int stage) {
          constexpr int kNope = Traits::kNopeBlocks, kRope = Traits::kRopeBlocks;
          constexpr int kRopeB = Traits::kRopeFirstBlockB;
          warpgroup_arrive();
          mma_s.accumulate_ = GMMA::ScaleOut::Zero;
          gemm_k_blocks<0, 0, kNope>(mma_s, tSrQ, tSrK(_, _, _, stage), tSrS);
          if constexpr (Traits::kQRopeInRegisters) {
            mma_r.accumulate_ = GMMA::ScaleOut::One;
            if constexpr (kSharedRope) {
              gemm_k_blocks<0, kRopeB, kRope>(mma_r, tSrQr, tSrRr(_, _, _, stage), tSrS);
            } else {
              gemm_k_blocks<0, kRopeB, kRope>(mma_r, tSrQr, tSrKr(_, _, _, stage), tSrS);
            }
          } else if constexpr (kSharedRope) {
            gemm_k_blocks<kNope, kRopeB, kRope>(mma_s, tSrQ, tSrR(_, _, _, stage), tSrS);
          } else {
            gemm_k_blocks<kNope, kRopeB, kRope>(mma_s, tSrQ, tSrK(_, _, _, stage), tSrS);
          }
          warpgroup_commit_batch();
        };
        // Scales and masks the page's scores, updates the running softmax and turns the scores
        // into probabilities in place; rescale[i] is what O's row i must be multiplied by.
        auto softmax_page = [&](int page, float (&rescale)[kRows]) {
          const int page_first_key = page * kBlockN;
          const bool needs_mask = page_first_key + kBlockN > mask_from;
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < kRows; ++i) {
            CUTLASS_PRAGMA_UNROLL
            for (int j = 0; j < size<1>(tSrS_rc); ++j) {
              const float s = tSrS_rc(i, j) * p.scale_log2;
              const int key = page_first_key + first_score_col + get<1>(tScS_rc(i, j));
              const bool masked = needs_mask && key > row_last_key[i];
              tSrS_rc(i, j) = masked ? -INFINITY : s;
            }
          }
          float row_page_max[kRows];
          softmax.page_max(tSrS_rc, row_page_max);
          if constexpr (kSplit) {  // the row maximum over every warpgroup's tokens
            combine_across_warpgroups</*kMax=*/true>(smem.row_max, row_page_max, tScS_rc, col_wg,
                                                     wg_tid, ConsumerBarrier::kScoresMax);
          }
          softmax.update(tSrS_rc, row_page_max, rescale);
        };
        // Rescales O and stages the page's P for its P V (issued with the next page's S).
        auto stage_p = [&](float const (&rescale)[kRows]) {
          // Once the running maxima settle, most pages leave every row's factor at exactly 1:
          // a warp whose rows all kept their maximum skips the 128 multiplies.
          bool changed = false;
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < kRows; ++i) { changed |= rescale[i] != 1.f; }
          if (__any_sync(0xffffffff, changed)) {
            CUTLASS_PRAGMA_UNROLL
            for (int i = 0; i < kRows; ++i) {
              CUTLASS_PRAGMA_UNROLL
              for (int j = 0; j < size<1>(tOrO_rc); ++j) { tOrO_rc(i, j) *= rescale[i]; }
            }
          }
          if constexpr (kSplit) {
            // Every warpgroup writes its tokens' probabilities; all then read the whole P.
            // sP is free: both warpgroups finished the previous page's P V before kScoresMax.
            copy(convert_fragment<Element>(tSrS), tSsP);
            cutlass::arch::fence_view_async_shared();  // P written by threads, read by wgmma
            consumer_sync(kConsumerThreads, ConsumerBarrier::kPReady);
          } else {
            copy(convert_fragment<Element>(tSrS), tOrP);
          }
        };

        if constexpr (!Traits::kOverlapPV) {
          // Page by page, one wgmma batch in flight at a time (see Traits::kOverlapPV).
          for (int page = w.page_begin; page < w.page_end; ++page) {
            float rescale[kRows];
            const int stage = wait_page(page);
            warpgroup_fence_operand(tSrS);
            issue_scores(stage);
            warpgroup_wait<0>();
            warpgroup_fence_operand(tSrS);
            softmax_page(page, rescale);
            stage_p(rescale);
            if constexpr (!kSplit) { warpgroup_fence_operand(tOrP); }
            warpgroup_fence_operand(tOrO);
            issue_pv(mma_o, thr_o, sP, tOrP, tOrV(_, _, _, stage), tOrO);
            warpgroup_wait<0>();
            warpgroup_fence_operand(tOrO);
            pipeline.consumer_release(state);
            ++state;
          }
        } else if (w.page_begin < w.page_end) {
          // Software pipeline over the pages: page n's S = Q K^T and page n-1's O += P V are
          // issued back to back, and page n's softmax runs while the tensor cores finish
          // page n-1's P V; P waits in registers for the next iteration. The first page has
          // no predecessor and is peeled off, so that no branch sits between two open wgmma
          // batches (ptxas would serialise every wgmma).
          float rescale[kRows];
          warpgroup_fence_operand(tSrS);
          issue_scores(wait_page(w.page_begin));
          warpgroup_wait<0>();
          warpgroup_fence_operand(tSrS);
          softmax_page(w.page_begin, rescale);
          stage_p(rescale);
          PipelineState prev_state = state;
          ++state;
          for (int page = w.page_begin + 1; page < w.page_end; ++page) {
            const int stage = wait_page(page);
            warpgroup_fence_operand(tSrS);
            warpgroup_fence_operand(tOrP);
            warpgroup_fence_operand(tOrO);
            issue_scores(stage);
            issue_pv(mma_o, thr_o, sP, tOrP, tOrV(_, _, _, prev_state.index()), tOrO);
            warpgroup_wait<1>();
            warpgroup_fence_operand(tSrS);
            softmax_page(page, rescale);
            warpgroup_wait<0>();  // page n-1's P V is in O; its stage can be refilled
            warpgroup_fence_operand(tOrO);
            warpgroup_fence_operand(tOrP);
            pipeline.consumer_release(prev_state);
            stage_p(rescale);
            prev_state = state;
            ++state;
          }
          warpgroup_fence_operand(tOrP);
          warpgroup_fence_operand(tOrO);
          issue_pv(mma_o, thr_o, sP, tOrP, tOrV(_, _, _, prev_state.index()), tOrO);
          warpgroup_wait<0>();
          warpgroup_fence_operand(tOrO);
          pipeline.consumer_release(prev_state);
        }

        float row_total[kRows], inv_sum[kRows], lse[kRows];
        softmax.quad_sums(row_total);
        if constexpr (kSplit) {  // each warpgroup summed only its own tokens
          combine_across_warpgroups</*kMax=*/false>(smem.row_sum, row_total, tScS_rc, col_wg,
                                                     wg_tid, ConsumerBarrier::kRowSums);
        }
        softmax.finalize(row_total, inv_sum, lse);
        store_output(p, smem, w, thr_o, tOrO, tOrO_rc, tOcO_rc, inv_sum, lse, rows, row_base,
                     row_wg, col_wg, consumer_tid);
      }
    }
    if (!producer_released) { release_producer(); }  // a CTA without work
  }

  // Writes the piece's normalised O rows (bf16/fp16 into out, or fp32 partials of a split
  // request) and LSE.
  //
  // In the accumulator layout a lane holds 2 adjacent columns of every 8-column group, so
  // storing straight from registers takes 4-byte stores that touch 8 rows per warp
  // instruction: ~1,000 store instructions per warp for a 64 x 256 tile, 3-6 us per piece (a
  // per-CTA trace at 64-token contexts). The 16-bit output is therefore staged in shared
  // memory, in the Q tile, which no wgmma reads once the piece's last S is done, and written
  // out as whole 16-byte vectors, a warp covering 512 contiguous bytes of a row. Split
  // requests' fp32 partials (at most two pieces per part) are stored directly.
  template <class ThrMmaO, class TensorO, class TensorOrc, class TensorC, int kRows>
  static __device__ void store_output(const DecodeParams& p, SharedStorage& smem,
                                      const WorkPiece& w, ThrMmaO const& thr_o, TensorO& tOrO,
                                      TensorOrc& o, TensorC const& coord,
                                      float const (&inv_sum)[kRows], float const (&lse)[kRows],
                                      PackedRows const& rows, int row_base, int row_wg,
                                      int col_wg, int consumer_tid) {
    const int kv_head = rows.kv_head;
    const int wg_tid = consumer_tid % 128;
    const bool lse_lane = col_wg == 0 && wg_tid % 4 == 0;  // one lane of the row's quad
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(o); ++j) { o(i, j) *= inv_sum[i]; }
      const int m = row_base + get<0>(coord(i, 0));
      if (m >= p.rows_per_kv_head || !lse_lane) { continue; }
      int token, head;
      rows.query(m, token, head);
      if (w.is_split) {
        p.lse_accum[(int64_t(w.slot) * p.num_heads_kv + kv_head) * p.rows_per_kv_head + m] = lse[i];
      } else {
        // A row that saw no key reports +inf, so that a later merge ignores it.
        p.lse[(int64_t(w.batch) * p.num_heads_q + head) * p.seqlen_q + token] =
            lse[i] == -INFINITY ? INFINITY : lse[i];
      }
    }

    if (w.is_split) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        const int m = row_base + get<0>(coord(i, 0));
        if (m >= p.rows_per_kv_head) { continue; }  // padding row of the last m-block
        const int64_t row = (int64_t(w.slot) * p.num_heads_kv + kv_head) * p.rows_per_kv_head + m;
        float* dst = p.o_accum + row * kHeadDimV + col_wg * kOutCols;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<1>(o); j += 2) {
          *reinterpret_cast<float2*>(dst + get<1>(coord(i, j))) = make_float2(o(i, j), o(i, j + 1));
        }
      }
      return;
    }

    // Every consumer warpgroup has finished its last S of the piece (the staging tiles of
    // different warpgroups overlap other warpgroups' Q rows).
    consumer_sync(kConsumerThreads, ConsumerBarrier::kOutputStage);
    // The staging addresses depend only on the thread; computed here, not hoisted to the
    // kernel's start, where keeping 16 of them live across the page loop spilled (the empty
    // asm hides that the values are loop-invariant).
    int stage_offset = (row_wg * Traits::kNumColWGs + col_wg) * Traits::kOutStageElems;
    int stage_tid = wg_tid;
    asm volatile("" : "+r"(stage_offset), "+r"(stage_tid));
    Tensor sO = make_tensor(make_smem_ptr(smem.q.data() + stage_offset),
                            typename Traits::SmemLayoutOStage{});
    {  // stmatrix: four 8x8 16-bit tiles of the accumulator per instruction
      auto stage_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{},
                                          typename Traits::TiledMmaO{});
      auto thr_copy = stage_copy.get_thread_slice(stage_tid);
      Tensor tOrO_16 = convert_fragment<Element>(tOrO);
      copy(stage_copy, thr_copy.retile_S(tOrO_16), thr_copy.partition_D(sO));
    }
    consumer_sync(kConsumerThreads, ConsumerBarrier::kOutputStaged);
    constexpr int kChunksPerRow = kOutCols / kChunk;
    CUTLASS_PRAGMA_UNROLL
    for (int idx = stage_tid; idx < Traits::kWGRows * kChunksPerRow; idx += 128) {
      const int r = idx / kChunksPerRow, col = (idx % kChunksPerRow) * kChunk;
      const int m = row_base + r;
      if (m >= p.rows_per_kv_head) { continue; }
      Element* dst = static_cast<Element*>(p.out) + w.batch * p.o_batch_stride +
                     rows.offset(m, p.o_seq_stride, p.o_head_stride) + col_wg * kOutCols + col;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(&sO(r, col));
    }
  }
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    decode_kernel(CUTE_GRID_CONSTANT const DecodeParams params,
                  CUTE_GRID_CONSTANT const typename Traits::TmaKV tma_kv,
                  CUTE_GRID_CONSTANT const typename Traits::TmaRope tma_rope) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Kernel = DecodeKernel<Traits>;
  using Pipeline = typename Traits::Pipeline;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  const int m_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const bool is_producer = threadIdx.x >= Traits::kNumConsumerThreads;
  const bool is_producer_leader = threadIdx.x == Traits::kNumConsumerThreads;

  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kStageBytes;
  pipeline_params.role = is_producer ? Pipeline::ThreadCategory::Producer
                                     : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = is_producer_leader;
  pipeline_params.num_consumers = Traits::kNumConsumerThreads;
  Pipeline pipeline(smem.pipeline, pipeline_params, Shape<_1, _1, _1>{});
  if (is_producer_leader) {
    cute::prefetch_tma_descriptor(tma_kv.get_tma_descriptor());
    if constexpr (Traits::kSharedRope) { cute::prefetch_tma_descriptor(tma_rope.get_tma_descriptor()); }
  }
  __syncthreads();  // barrier initialisation is visible to every role

  if (is_producer) {
    // The producer needs few registers; give them to the consumers' accumulators
    // (2 x 128 x 240 + 128 x 24 = 64,512 of the 65,536).
    if constexpr (Traits::kNumConsumerWGs > 1) { cutlass::arch::warpgroup_reg_dealloc<24>(); }
    if (threadIdx.x < Traits::kNumConsumerThreads + 32) {  // the producer's first warp
      cutlass::arch::NamedBarrier::sync(Traits::kNumConsumerThreads + 32,
                                        static_cast<int>(ConsumerBarrier::kQIssued));
    }
    if (is_producer_leader) { Kernel::produce(params, tma_kv, tma_rope, smem, pipeline, kv_head); }
  } else {
    if constexpr (Traits::kNumConsumerWGs > 1) { cutlass::arch::warpgroup_reg_alloc<240>(); }
    Kernel::consume(params, smem, pipeline, kv_head, m_block, threadIdx.x);
  }
#endif
}

}  // namespace flash_gla::hopper
