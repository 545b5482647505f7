// Scheduler metadata: balances requests' KV pages over `num_parts` persistent CTAs.
#pragma once

#include <cuda_runtime.h>

namespace flash_gla {

// Fills sched_meta (num_parts, kMetaFields) and num_splits (batch + 1) on the GPU from
// cache_seqlens (batch,), with no host synchronisation. Throws on launch failure.
// batch_invariant: the plan that cuts each request by its own length only; sched_meta then
// has num_parts + 1 rows (common/params.h: kInvariantChunkPages).
void run_scheduler(const int* cache_seqlens, int batch, int num_parts, int* sched_meta,
                   int* num_splits, cudaStream_t stream, bool batch_invariant = false);

// Parts per (m-block, KV head): about one CTA per SM over the whole grid.
int num_sm_parts(int num_sms, int num_q_tokens_per_head_k, int num_heads_k);

}  // namespace flash_gla
