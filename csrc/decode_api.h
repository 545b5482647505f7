// The extension's operations. Inputs are validated by flash_gla/ops.py before they get here;
// these functions only assert what the kernels rely on.
#pragma once

#include <optional>
#include <vector>

#include <torch/extension.h>

namespace flash_gla {

// (tile_scheduler_metadata (num_parts, 8) int32, num_splits (b + 1,) int32).
std::vector<at::Tensor> get_metadata(const at::Tensor& cache_seqlens,
                                     int64_t num_q_tokens_per_head_k, int64_t num_heads_k);

// Scheduler parts the metadata has for this shape on the current device.
int64_t get_num_sm_parts(int64_t num_q_tokens_per_head_k, int64_t num_heads_k);

// Paged decode attention; returns (out (b, s_q, h_q, dv) in q's dtype, lse (b, h_q, s_q) float32).
std::vector<at::Tensor> decode(
    const at::Tensor& q,                           // (b, s_q, h_q, d_qk)
    const at::Tensor& kv_cache,                    // (num_blocks, 64, h_kv, kv_width)
    const std::optional<at::Tensor>& rope_cache,   // (num_blocks, 64, 1, d_rope), or inline RoPE
    const at::Tensor& block_table,                 // (b, max_pages) int32
    const at::Tensor& cache_seqlens,               // (b,) int32
    int64_t head_dim_v,                            // dv: V is row[:dv]
    const at::Tensor& tile_scheduler_metadata,     // (num_parts, kMetaFields) from get_metadata
    const at::Tensor& num_splits,                  // (b + 1,) from get_metadata
    double softmax_scale,                          // scale of q . K
    bool causal,                                   // the s_q queries are the last s_q positions
    const std::optional<at::Tensor>& out,          // (b, s_q, h_q, dv) to write into, or allocated
    const std::optional<at::Tensor>& attn_sink);   // (h_q,) float32 sink logits, or none

}  // namespace flash_gla
