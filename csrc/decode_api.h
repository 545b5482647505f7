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

// (out (b, s_q, h_q, dv) in q's dtype, lse (b, h_q, s_q) float32).
std::vector<at::Tensor> decode(const at::Tensor& q, const at::Tensor& kv_cache,
                               const std::optional<at::Tensor>& rope_cache,
                               const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                               int64_t head_dim_v, const at::Tensor& tile_scheduler_metadata,
                               const at::Tensor& num_splits, double softmax_scale, bool causal,
                               const std::optional<at::Tensor>& out,
                               const std::optional<at::Tensor>& attn_sink);

}  // namespace flash_gla
