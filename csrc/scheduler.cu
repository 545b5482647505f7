// The scheduler-metadata kernel.
//
// Cost model (as FlashMLA's): a request costs its pages plus kFixedOverheadPages (Q load,
// epilogue). The requests, in order, are cut into num_parts consecutive ranges of about equal
// cost; a request cut between parts is "split", and its pieces are merged by the combine
// kernel. The last part takes whatever is left, so every page is assigned exactly once and
// every request, zero-length ones included, to at least one part.
// flash_gla/scheduler_model.py is the host model of this exact algorithm (tested on CPU).
#include <algorithm>

#include "common/cuda_check.h"
#include "common/params.h"
#include "common/tile_policy.h"
#include "scheduler.h"

namespace flash_gla {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxCachedBatch = 8 * 1024;  // page counts staged in 32 KB of shared memory

__device__ __forceinline__ int pages_of(int seqlen) {
  return (max(seqlen, 0) + kPageSize - 1) / kPageSize;
}

__global__ void scheduler_kernel(const int* __restrict__ cache_seqlens, int batch, int num_parts,
                                 int* __restrict__ sched_meta, int* __restrict__ num_splits) {
  __shared__ int pages[kMaxCachedBatch];
  __shared__ int block_total[kThreads];
  const bool cached = batch <= kMaxCachedBatch;

  int local_total = 0;
  for (int i = threadIdx.x; i < batch; i += kThreads) {
    const int n = pages_of(cache_seqlens[i]);
    if (cached) { pages[i] = n; }
    local_total += n + kFixedOverheadPages;
  }
  block_total[threadIdx.x] = local_total;
  __syncthreads();
  if (threadIdx.x != 0) { return; }

  // The scan is inherently sequential; one thread runs it over lengths in shared memory.
  long long total = 0;
  for (int i = 0; i < kThreads; ++i) { total += block_total[i]; }
  const long long payload = (total + num_parts - 1) / num_parts + kFixedOverheadPages;

  int idx = 0, page = 0, split = 0, cum_splits = 0;
  num_splits[0] = 0;
  for (int part = 0; part < num_parts; ++part) {
    int* meta = sched_meta + part * kMetaFields;
    meta[kMetaBeginBatch] = idx;
    meta[kMetaBeginPage] = page;
    meta[kMetaBeginSplit] = split;
    const bool last = part == num_parts - 1;
    long long remain = payload;
    while (idx < batch) {
      const int n = cached ? pages[idx] : pages_of(cache_seqlens[idx]);
      const int rest = n - page;
      if (last || remain >= rest + kFixedOverheadPages) {  // the request ends in this part
        cum_splits += split + 1;
        num_splits[idx + 1] = cum_splits;
        remain -= rest + kFixedOverheadPages;
        ++idx;
        page = 0;
        split = 0;
      } else {  // take what fits and leave the rest of the request to the next part
        if (remain > kFixedOverheadPages) {
          page += static_cast<int>(remain - kFixedOverheadPages);
          ++split;
        }
        break;
      }
    }
    if (page > 0) {
      meta[kMetaEndBatch] = idx;
      meta[kMetaEndPage] = page;
    } else {  // stopped at a request boundary; end_batch < begin_batch marks an idle part
      meta[kMetaEndBatch] = idx - 1;
      meta[kMetaEndPage] = idx > 0 ? (cached ? pages[idx - 1] : pages_of(cache_seqlens[idx - 1])) : 0;
    }
    for (int f = kMetaBeginSplit + 1; f < kMetaFields; ++f) { meta[f] = 0; }
  }
}

}  // namespace

int num_sm_parts(int num_sms, int num_q_tokens_per_head_k, int num_heads_k) {
  // The metadata does not know the variant, so it must suit every CTA size the tile policy
  // may pick for these rows: with 128-row CTAs (GLA with more than 64 rows) each CTA takes
  // one part, 64-row CTAs (MLA, GTA, small groups) walk several parts each
  // (hopper/decode/launch.cuh). A multiple of the 64-row grid that fits the 128-row grid gives
  // every CTA of either kind the same number of parts.
  auto grid_parts = [&](int row_warpgroups) {
    const int m_blocks = ceil_div(num_q_tokens_per_head_k, row_warpgroups * kRowsPerWarpgroup);
    return std::max(1, num_sms / (num_heads_k * m_blocks));
  };
  const int parts_64 = grid_parts(1);
  const int parts_128 = grid_parts(row_warpgroups_for(num_q_tokens_per_head_k, kMaxRowWarpgroups));
  return parts_64 * std::max(1, parts_128 / parts_64);
}

void run_scheduler(const int* cache_seqlens, int batch, int num_parts, int* sched_meta,
                   int* num_splits, cudaStream_t stream) {
  scheduler_kernel<<<1, kThreads, 0, stream>>>(cache_seqlens, batch, num_parts, sched_meta,
                                                num_splits);
  check_launch("scheduler");
}

}  // namespace flash_gla
