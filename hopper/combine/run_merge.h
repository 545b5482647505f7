// Merging two partial attentions over disjoint key sets (flash_gla.merge_attention).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flash_gla {

enum class MergeElement { kBF16, kFP16, kFP32 };

// Rows are (b, s_q, h_q) in out's order; all tensors contiguous. lse is (b, h_q, s_q) float32,
// natural log, +inf for a part that saw no key. out and lse may be out_a / lse_a (or _b).
struct MergeParams {
  const void* out_a;   // (b, s_q, h_q, dv)
  const float* lse_a;  // (b, h_q, s_q)
  const void* out_b;
  const float* lse_b;
  void* out;
  float* lse;
  int64_t rows;  // b * s_q * h_q
  int seqlen_q, heads_q, head_dim;
  MergeElement element;
};

// One warp per row; throws on launch failure.
void run_merge_attention(const MergeParams& params, cudaStream_t stream);

}  // namespace flash_gla
