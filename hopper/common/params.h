// The contract between the host (csrc/) and the kernels (hopper/): one
// plain-old-data parameter block and the constants both sides size things by. Plain C++ (no
// CuTe, no torch), so that either side can include it.
//
// Strides are in elements of the tensor they describe. Every field is filled by name in
// csrc/decode_api.cpp (never by position), so two strides can't be swapped silently.
#pragma once

#include <cstdint>

namespace flash_gla {

// Element type of q, the caches and out (fp32 accumulation inside).
enum class DType { kBF16, kFP16 };

// FP8 caches: one float32 scale per kScaleGroup values along a KV head's row (the cache writer
// quantises by it, the decode kernels dequantise by it). flash_gla/_instances.py's FP8_GROUP.
constexpr int kScaleGroup = 128;

// Tokens per KV-cache page. FlashMLA's layout; the kernels load one whole page per stage.
constexpr int kPageSize = 64;

// Scheduler metadata: one PartPlan per scheduler part, written by hopper/schedule/scheduler.cu
// and walked by the decode kernels (hopper/decode/schedule.cuh); the tensor that holds them is
// (num_parts, kMetaFields) int32. A part walks items [begin_item, end_item] (inclusive): requests,
// or in the batch-invariant plan accumulator slots (each one chunk of a request). In requests,
// it takes pages [begin_page, ...) of the first, all pages of the ones in between and pages
// [0, end_page) of the last; an empty part has end_item < begin_item.
constexpr int kMetaFields = 8;
struct PartPlan {
  int begin_item;   // first request (or slot)
  int begin_page;   // first page of begin_item
  int end_item;     // last request (or slot), inclusive
  int end_page;     // past the last page of end_item
  int begin_split;  // how many earlier parts already hold a piece of begin_item
  int unused[kMetaFields - 5];  // rows of 32 bytes
};
static_assert(sizeof(PartPlan) == kMetaFields * sizeof(int), "a PartPlan is one metadata row");

// Fixed cost of one (request, part) piece, in pages: the per-request Q load and epilogue.
// tests/scheduler_model.py's FIXED_OVERHEAD_PAGES.
constexpr int kFixedOverheadPages = 5;

// The batch-invariant plan (hopper/schedule/scheduler.cu, tests/scheduler_model.py): a request of n
// pages is cut into chunks of max(kInvariantChunkPages, ceil(n / kInvariantMaxChunks)) pages,
// by its own length only, one accumulator slot each; parts hold runs of whole slots (PartPlan's
// begin_item / end_item, its pages 0), and one header row [kInvariantMaxChunks,
// kInvariantChunkPages, 0, ...] follows the parts' rows.
constexpr int kInvariantChunkPages = 64;
constexpr int kInvariantMaxChunks = 8;
// (constexpr: the kernels call these too, built with --expt-relaxed-constexpr)
constexpr int invariant_chunk_pages(int pages) {
  const int even = (pages + kInvariantMaxChunks - 1) / kInvariantMaxChunks;
  return even > kInvariantChunkPages ? even : kInvariantChunkPages;
}
constexpr int invariant_num_chunks(int pages) {  // >= 1: an empty request has one (empty) chunk
  const int chunks = (pages + invariant_chunk_pages(pages) - 1) / invariant_chunk_pages(pages);
  return chunks > 1 ? chunks : 1;
}

// Most pieces one request can be split into (one per scheduler part): the combine kernel
// keeps one weight per piece in shared memory.
constexpr int kMaxSplitsPerRequest = 256;

// Query rows are packed per KV head: row m of KV head j is query token m / group_size
// of query head j * group_size + m % group_size ("s_q-major" packing, as FlashMLA reshapes).
// rows_per_kv_head = s_q * group_size.

struct DecodeParams {
  // ---- problem shape ----
  int batch;              // b
  int seqlen_q;           // s_q, query tokens per request
  int num_heads_q;        // h_q
  int num_heads_kv;       // h_kv
  int group_size;         // h_q / h_kv
  int rows_per_kv_head;   // s_q * group_size (packed query rows of one KV head)
  int head_dim_qk;        // d_qk = d_nope + d_rope
  int head_dim_v;         // dv
  int head_dim_rope;      // d_rope (inline after V, or in the shared rope cache)
  int num_pages;          // kv_cache.shape[0]
  int max_pages_per_seq;  // block_table.shape[1]
  bool causal;
  float scale_log2;       // softmax_scale * log2(e): the kernels work in base 2

  // ---- inputs ----
  const void* q;          // (b, s_q, h_q, d_qk), last dim contiguous
  int64_t q_batch_stride, q_seq_stride, q_head_stride;
  const void* kv;         // (num_pages, 64, h_kv, kv_width), last dim contiguous
  int64_t kv_page_stride, kv_token_stride, kv_head_stride;
  // e4m3 caches: kv's value i of a row is kv[i] * kv_scale[i / 128] (else kv_scale is null).
  const float* kv_scale;  // (num_pages, 64, h_kv, ceil(kv_width / 128)), any strides
  int64_t kv_scale_page_stride, kv_scale_token_stride, kv_scale_head_stride, kv_scale_group_stride;
  const void* rope;       // (num_pages, 64, 1, d_rope) shared RoPE keys, or null when inline
  int64_t rope_page_stride, rope_token_stride;
  const int* block_table; // (b, max_pages_per_seq)
  int64_t block_table_batch_stride;
  const int* cache_seqlens;  // (b,)
  // (h_q,) attention-sink logits (natural log), or null: a sink adds exp(sink[h]) to the
  // softmax's denominator only, so O is scaled by exp(lse) / (exp(lse) + exp(sink[h])); the
  // reported lse stays that of the keys (FlashMLA's attn_sink).
  const float* attn_sink;

  // ---- outputs ----
  void* out;              // (b, s_q, h_q, dv), last dim contiguous
  int64_t o_batch_stride, o_seq_stride, o_head_stride;
  float* lse;             // (b, h_q, s_q), contiguous

  // ---- split-KV partials: one slot per (request piece); slot count <= b + num_parts, or
  //      b * kInvariantMaxChunks in the batch-invariant plan ----
  float* o_accum;         // (num_slots, h_kv, rows_per_kv_head, dv), contiguous, normalised O
  float* lse_accum;       // (num_slots, h_kv, rows_per_kv_head), contiguous, natural log

  // ---- scheduler ----
  const PartPlan* sched_meta;  // (num_parts,): the rows of tile_scheduler_metadata
  const int* num_splits;  // (b + 1,), prefix sums of pieces per request
  int num_parts;
  bool batch_invariant;   // sched_meta is the batch-invariant plan: parts walk slot ranges
  int num_sms;            // multiprocessors of the device, for sizing the grid
};

}  // namespace flash_gla
