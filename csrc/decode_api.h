// The extension's operations. Inputs are validated by flash_gla/ops.py before they get here;
// these functions only assert what the kernels rely on.
#pragma once

#include <optional>
#include <tuple>

#include "torch_stable.h"

namespace flash_gla {

// (tile_scheduler_metadata (num_parts, 8) int32, num_splits (b + 1,) int32); batch_invariant:
// the plan that cuts each request by its own length, with one more (header) row.
std::tuple<Tensor, Tensor> get_metadata(const Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k,
                                        int64_t num_heads_k, bool batch_invariant);

// Scheduler parts (rows of tile_scheduler_metadata) that get_metadata plans on CUDA device `device`.
int64_t get_num_sm_parts(int64_t device, int64_t num_q_tokens_per_head_k, int64_t num_heads_k);

// Paged decode attention: writes out (b, s_q, h_q, dv) in q's dtype, returns lse (b, h_q, s_q) float32.
Tensor decode(
    const Tensor& q,                            // (b, s_q, h_q, d_qk)
    const Tensor& kv_cache,                     // (num_blocks, 64, h_kv, kv_width), q's dtype or e4m3
    const std::optional<Tensor>& rope_cache,    // (num_blocks, 64, 1, d_rope), or inline RoPE
    const Tensor& block_table,                  // (b, max_pages) int32
    const Tensor& cache_seqlens,                // (b,) int32
    int64_t head_dim_v,                         // dv: V is row[:dv]
    const Tensor& tile_scheduler_metadata,      // (num_parts, kMetaFields) from get_metadata
    const Tensor& num_splits,                   // (b + 1,) from get_metadata
    double softmax_scale,                       // scale of q . K
    bool causal,                                // the s_q queries are the last s_q positions
    const Tensor& out,                          // (b, s_q, h_q, dv), q's dtype: written
    const std::optional<Tensor>& attn_sink,     // (h_q,) float32 sink logits, or none
    bool batch_invariant,                       // the metadata is the batch-invariant plan
    const std::optional<Tensor>& kv_scale);     // (num_blocks, 64, h_kv, ceil(kv_width / 128))
                                                // float32 with an e4m3 kv_cache, else none

}  // namespace flash_gla
