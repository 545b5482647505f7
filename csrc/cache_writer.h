// The paged-cache writer (flash_gla.write_kvcache): the new tokens' KV rows (and RoPE keys)
// go to the cache slots that slot_mapping names. Plain C++ (no torch): csrc/cache_writer_api.cpp
// fills the parameter block from the tensors, csrc/cache_writer.cu holds the kernel.
//
// Slot s is row s % 64 of page s / 64. A slot outside [0, num_slots) is skipped (negative:
// a padding token; too large: a bad input, which must not write out of bounds). Strides are in
// elements of the tensor they describe; every tensor's last dim but kv_scale's is contiguous.
//
// The FP8 layout (flash_gla/reference.py quantize_kv_ref is its definition): the
// cache holds float8_e4m3fn values and kv_scale one float32 per token, KV head and group of
// kScaleGroup values along d, value i = kv_cache[..., i] * kv_scale[..., i / kScaleGroup]; the
// RoPE keys stay in the tokens' dtype, in a rope_cache (no inline RoPE in FP8).
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "common/params.h"

namespace flash_gla {

// One FP8 scale per kScaleGroup values (common/params.h; the last group of a row may be shorter:
// d need not be a multiple). A group's scale is amax / kE4M3Max (so its largest value becomes e4m3's largest finite, 448),
// at least kMinScale = 2^-126 (float32's smallest normal, so that 1 / scale is finite), and 1
// for a group of zeros.
constexpr float kE4M3Max = 448.0f;
constexpr float kMinScale = FLT_MIN;

// What the caches hold.
enum class CacheElem {
  kTokens,  // the tokens' own dtype (bf16 / fp16): a copy
  kE4M3,    // float8_e4m3fn, quantised per (token, KV head, kScaleGroup values) with kv_scale
};

struct CacheWriteParams {
  // ---- shape ----
  int64_t num_tokens;  // T = slot_mapping.shape[0]
  int64_t num_slots;   // kv_cache.shape[0] * 64: slots at or past it are skipped
  int num_heads;       // h_kv
  int kv_dim;          // d_kv: dims of kv per head (the whole cache row when rope is null)
  int rope_dim;        // d_rope: dims of rope per token; 0 when rope is null

  // ---- the new tokens (read) ----
  const void* kv;               // (T, h_kv, d_kv)
  int64_t kv_token_stride;
  int64_t kv_head_stride;
  const void* rope;             // (T, d_rope), or null: kv holds whole cache rows
  int64_t rope_token_stride;
  const int64_t* slot_mapping;  // (T,)
  int64_t slot_stride;

  // ---- the caches (written) ----
  // kv_cache (num_blocks, 64, h_kv, d) with d = d_kv + d_rope when the RoPE keys are inline
  // (rope_cache null: row j of a slot is concat(kv[t, j], rope[t])), d = d_kv otherwise.
  void* kv_cache;
  int64_t cache_block_stride;
  int64_t cache_row_stride;   // one token (row of a page)
  int64_t cache_head_stride;
  // rope_cache (num_blocks, 64, 1, d_rope): the RoPE key stored once per token (shared-RoPE
  // GLA, GTA), or null for inline RoPE.
  void* rope_cache;
  int64_t rope_cache_block_stride;
  int64_t rope_cache_row_stride;
  // kv_scale (num_blocks, 64, h_kv, ceil(d_kv / kScaleGroup)) float32: an FP8 cache's scales
  // (cache == kE4M3), null otherwise.
  float* kv_scale;
  int64_t scale_block_stride;
  int64_t scale_row_stride;
  int64_t scale_head_stride;
  int64_t scale_group_stride;

  // Element type of kv and rope (and of rope_cache); kv_cache holds the same type or, with
  // kE4M3, FP8 values (another element op of the same kernel: see cache_writer.cu).
  DType dtype;
  CacheElem cache;
};

// Writes every token whose slot is in range; no host synchronisation (CUDA-graph safe).
// Throws on a launch failure, or for an FP8 cache whose rows are not 4-element aligned (every
// address, stride and width; flash_gla/cache_writer.py checks this first).
void run_write_kvcache(const CacheWriteParams& params, cudaStream_t stream);

}  // namespace flash_gla
