// Thread-level copies between global and shared memory that the consumers do themselves
// (the KV pages come by TMA): the Q tile of a piece, and zeroing a page's rows past the end.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cute/tensor.hpp>

#include "common/packed_rows.h"
#include "common/params.h"

namespace flash_gla::hopper {

using namespace cute;

template <class Traits>
struct SmemIO {
  using Element = typename Traits::Element;
  using SharedStorage = typename Traits::SharedStorage;
  static constexpr int kChunk = 16 / sizeof(Element);  // elements per 16-byte vector

  // Starts copying the piece's packed query rows into shared memory (zeros for padding rows)
  // with cp.async: every 16-byte load of the tile is in flight at once, instead of one
  // load-to-store round trip per vector. The caller waits with cp.async.wait_group 0.
  static __device__ void load_q(const DecodeParams& p, SharedStorage& smem, int request,
                                PackedRows const& rows, int m_block, int consumer_tid) {
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    const Element* q = static_cast<const Element*>(p.q) + request * p.q_batch_stride;
    constexpr int kChunksPerRow = Traits::kQSmemCols / kChunk;
    for (int idx = consumer_tid; idx < Traits::kBlockM * kChunksPerRow; idx += Traits::kNumConsumerThreads) {
      const int row = idx / kChunksPerRow;
      const int col = (idx % kChunksPerRow) * kChunk;
      const int m = m_block * Traits::kBlockM + row;
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

  // FP8 stages (Traits::StageElement) are fp16, and so must be the Q columns that
  // multiply them: once load_q's copies have landed, each thread converts the 16-byte vectors of
  // Q's latent columns that it copied itself, in place. (|q| beyond fp16's 65,504 is out of
  // range there.)
  static __device__ void q_latent_to_stage_type(SharedStorage& smem, int consumer_tid) {
    using StageElement = typename Traits::StageElement;
    if constexpr (!std::is_same_v<Element, StageElement>) {
      Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
      constexpr int kChunksPerRow = Traits::kQSmemCols / kChunk;
#pragma unroll 4
      for (int idx = consumer_tid; idx < Traits::kBlockM * kChunksPerRow; idx += Traits::kNumConsumerThreads) {
        const int row = idx / kChunksPerRow;
        const int col = (idx % kChunksPerRow) * kChunk;
        if (col >= Traits::kHeadDimNope) { continue; }
        static_assert(std::is_same_v<Element, cutlass::bfloat16_t> && std::is_same_v<StageElement, cutlass::half_t>);
        uint4* vector = reinterpret_cast<uint4*>(&sQ(row, col));
        alignas(16) uint32_t pairs[4];
        *reinterpret_cast<uint4*>(pairs) = *vector;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < 4; ++i) {
          const __half2 h = __float22half2_rn(__bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pairs[i])));
          pairs[i] = *reinterpret_cast<const uint32_t*>(&h);
        }
        *vector = *reinterpret_cast<const uint4*>(pairs);
      }
    }
  }

  // Loads this thread's elements of its warpgroup's Q RoPE columns (64 rows x d_rope) into the
  // A-operand registers of the RoPE wgmma (Traits::kQRopeInRegisters); padding rows are 0.
  // The fragment's first mode is a pair of adjacent columns: one 32-bit load per pair.
  template <class TensorQ, class TensorC>
  static __device__ void load_q_rope(const DecodeParams& p, int request, PackedRows const& rows,
                                     int row_base, TensorQ& tQr, TensorC const& coord) {
    const Element* q = static_cast<const Element*>(p.q) + request * p.q_batch_stride +
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

  // The stages as their TMAs fill them, (tokens, cols, stage): the cache page's kv_width
  // columns, and where the shared RoPE rows go, right after V (Traits::kRopeJoinsPage) or the
  // rope tile.
  static __device__ auto page_stages(SharedStorage& smem) {
    return make_tensor(make_smem_ptr(smem.kv.data()),
                       typename Traits::template SmemLayoutStageCols<Traits::kKVWidth>{});
  }
  static __device__ auto rope_stages(SharedStorage& smem) {
    if constexpr (Traits::kRopeJoinsPage) {  // in q's dtype, also where the stages are fp16 (FP8)
      return make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem.kv.data() + Traits::kBlockN * Traits::kKVWidth)),
                         typename Traits::template SmemLayoutStageCols<Traits::kHeadDimRope>{});
    } else {
      return make_tensor(make_smem_ptr(smem.rope.data()), typename Traits::SmemLayoutRope{});
    }
  }

  // Rows past the sequence end may hold anything (NaN included); 0 * NaN would poison P V, so
  // they are zeroed in shared memory (the stage, and a rope tile's rows) before either GEMM
  // reads the page.
  // Every consumer thread takes part (consumer_tid: its index among them).
  static __device__ void zero_rows_past_end(SharedStorage& smem, int stage, int first_row,
                                            int consumer_tid) {
    zero_rows<Traits::kStageCols>(
        make_tensor(make_smem_ptr(smem.kv.data()), typename Traits::SmemLayoutK{}), stage,
        first_row, consumer_tid);
    if constexpr (Traits::kRopeTile) {
      zero_rows<Traits::kHeadDimRope>(
          make_tensor(make_smem_ptr(smem.rope.data()), typename Traits::SmemLayoutRope{}), stage,
          first_row, consumer_tid);
    }
  }

  // Zeroes rows [first_row, 64) of one stage of a (tokens, kCols, stage) tile, 16 bytes a store.
  template <int kCols, class TensorS>
  static __device__ void zero_rows(TensorS&& tile, int stage, int first_row, int consumer_tid) {
    constexpr int kChunksPerRow = kCols / kChunk;
    const int count = (Traits::kBlockN - first_row) * kChunksPerRow;
    for (int idx = consumer_tid; idx < count; idx += Traits::kNumConsumerThreads) {
      const int row = first_row + idx / kChunksPerRow;
      const int col = (idx % kChunksPerRow) * kChunk;
      *reinterpret_cast<uint4*>(&tile(row, col, stage)) = make_uint4(0, 0, 0, 0);
    }
  }
};

}  // namespace flash_gla::hopper
