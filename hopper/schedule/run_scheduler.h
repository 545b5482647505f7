// Scheduler metadata: balances requests' KV pages over `num_parts` persistent CTAs.
#pragma once

#include <cuda_runtime.h>

#include "common/params.h"

namespace flash_gla {

// Fills plans (num_parts) and num_splits (batch + 1) on the GPU from
// cache_seqlens (batch,), with no host synchronisation. Throws on launch failure.
// batch_invariant: the plan that cuts each request by its own length only; plans then has
// num_parts + 1 rows (common/params.h: kInvariantChunkPages).
void run_scheduler(const int* cache_seqlens, int batch, int num_parts, PartPlan* plans,
                   int* num_splits, cudaStream_t stream, bool batch_invariant = false);

// Parts per (m-block, KV head): about one CTA per SM over the whole grid.
int num_sm_parts(int num_sms, int num_q_tokens_per_head_k, int num_heads_k);

}  // namespace flash_gla
