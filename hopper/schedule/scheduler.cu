// The scheduler-metadata kernel.
//
// Cost model (as FlashMLA's): a request costs its pages plus kFixedOverheadPages (Q load,
// epilogue). The requests, in order, are cut into num_parts consecutive ranges of about equal
// cost; a request cut between parts is "split", and its pieces are merged by the combine
// kernel. The last part takes whatever is left, so every page is assigned exactly once and
// every request, zero-length ones included, to at least one part.
// tests/scheduler_model.py is the host model of this exact algorithm (tested on CPU).
#include <algorithm>

#include <cub/block/block_scan.cuh>

#include "common/cuda_check.h"
#include "common/params.h"
#include "common/tile_policy.h"
#include "schedule/run_scheduler.h"

namespace flash_gla {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxCachedBatch = 8 * 1024;  // page counts staged in 32 KB of shared memory

__device__ __forceinline__ int pages_of(int seqlen) {
  return (max(seqlen, 0) + kPageSize - 1) / kPageSize;
}

__global__ void scheduler_kernel(const int* __restrict__ cache_seqlens, int batch, int num_parts,
                                 PartPlan* __restrict__ plans, int* __restrict__ num_splits) {
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
    PartPlan plan{};
    plan.begin_item = idx;
    plan.begin_page = page;
    plan.begin_split = split;
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
      plan.end_item = idx;
      plan.end_page = page;
    } else {  // stopped at a request boundary; end_item < begin_item marks an idle part
      plan.end_item = idx - 1;
      plan.end_page = idx > 0 ? (cached ? pages[idx - 1] : pages_of(cache_seqlens[idx - 1])) : 0;
    }
    plans[part] = plan;
  }
}

// The batch-invariant plan (tests/scheduler_model.py: plan_batch_invariant). Two passes
// over the requests with the whole block: the totals, then a block-wide scan that gives each
// chunk its slot and its cost's start, hence its part (the part in which the chunk's cost
// midpoint falls); the first slot of each part is recorded in shared memory, and the rows
// are written from those.
__device__ __forceinline__ int chunk_cost(int pages, int chunk) {
  const int step = invariant_chunk_pages(pages);
  return min(step, pages - chunk * step) + kFixedOverheadPages;
}

__global__ void invariant_scheduler_kernel(const int* __restrict__ cache_seqlens, int batch,
                                           int num_parts, PartPlan* __restrict__ plans,
                                           int* __restrict__ num_splits) {
  using Scan = cub::BlockScan<long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ long long totals[2];  // slots, cost
  __shared__ int part_begin[kMaxSplitsPerRequest];

  auto request_sums = [&](int i, long long& slots, long long& cost) {
    slots = cost = 0;
    if (i < batch) {
      const int pages = pages_of(cache_seqlens[i]);
      const int chunks = invariant_num_chunks(pages);
      slots = chunks;
      cost = pages + static_cast<long long>(chunks) * kFixedOverheadPages;
    }
  };
  // Pass 1: the totals.
  long long my_slots = 0, my_cost = 0;
  for (int i = threadIdx.x; i < batch; i += kThreads) {
    long long s, c;
    request_sums(i, s, c);
    my_slots += s;
    my_cost += c;
  }
  long long ignored, all_slots, all_cost;  // block aggregates, in every thread
  Scan(scan_storage).ExclusiveSum(my_slots, ignored, all_slots);
  __syncthreads();
  Scan(scan_storage).ExclusiveSum(my_cost, ignored, all_cost);
  if (threadIdx.x == 0) {
    totals[0] = all_slots;
    totals[1] = max(all_cost, 1LL);
    num_splits[0] = 0;
  }
  for (int q = threadIdx.x; q < num_parts; q += kThreads) { part_begin[q] = -1; }
  __syncthreads();
  const long long total_cost = totals[1];
  auto part_of = [&](long long start, int cost) {
    return static_cast<int>(min(static_cast<long long>(num_parts - 1),
                                (2 * start + cost) * num_parts / (2 * total_cost)));
  };

  // Pass 2: tile by tile, each thread one request; carry the sums of earlier tiles.
  long long slot_carry = 0, cost_carry = 0;
  for (int tile = 0; tile < batch; tile += kThreads) {
    const int i = tile + threadIdx.x;
    long long slots, cost, slot0, cost0, tile_slots, tile_cost;
    request_sums(i, slots, cost);
    Scan(scan_storage).ExclusiveSum(slots, slot0, tile_slots);
    __syncthreads();
    Scan(scan_storage).ExclusiveSum(cost, cost0, tile_cost);
    __syncthreads();
    slot0 += slot_carry;
    cost0 += cost_carry;
    if (i < batch) {
      num_splits[i + 1] = static_cast<int>(slot0 + slots);
      const int pages = pages_of(cache_seqlens[i]);
      // The part of the slot before this request's first: the previous request's last chunk.
      int previous = -1;
      if (i > 0) {
        const int prev_pages = pages_of(cache_seqlens[i - 1]);
        const int last = chunk_cost(prev_pages, invariant_num_chunks(prev_pages) - 1);
        previous = part_of(cost0 - last, last);
      }
      long long start = cost0;
      for (int c = 0; c < static_cast<int>(slots); ++c) {
        const int cost_c = chunk_cost(pages, c);
        const int part = part_of(start, cost_c);
        // Parts previous+1 .. part begin at this slot: each is written by one slot only.
        for (int q = previous + 1; q <= part; ++q) { part_begin[q] = static_cast<int>(slot0 + c); }
        previous = part;
        start += cost_c;
      }
    }
    slot_carry += tile_slots;
    cost_carry += tile_cost;
  }
  __syncthreads();
  const int total_slots = static_cast<int>(totals[0]);
  for (int q = threadIdx.x; q <= num_parts; q += kThreads) {
    PartPlan plan{};
    if (q == num_parts) {  // the header row that marks the plan
      int* header = reinterpret_cast<int*>(&plans[q]);
      for (int f = 0; f < kMetaFields; ++f) { header[f] = 0; }
      header[0] = kInvariantMaxChunks;
      header[1] = kInvariantChunkPages;
      continue;
    }
    const int begin = part_begin[q] < 0 ? total_slots : part_begin[q];
    int next = total_slots;  // the first slot of a later part
    if (q + 1 < num_parts && part_begin[q + 1] >= 0) { next = part_begin[q + 1]; }
    plan.begin_item = begin;
    plan.end_item = next - 1;
    plans[q] = plan;
  }
}

}  // namespace

int num_sm_parts(int num_sms, int num_q_tokens_per_head_k, int num_heads_k) {
  // The metadata does not know the variant, so it must suit every CTA size the tile policy
  // may pick for these rows: with 128-row CTAs (GLA with more than 64 rows) each CTA takes
  // one part, 64-row CTAs (MLA, GTA, small groups) walk several parts each
  // (hopper/decode/launch.cuh). A multiple of the 64-row grid that fits the 128-row grid gives
  // every CTA of either kind the same number of parts. Small groups plan one part per CTA of
  // the transposed instances, kSmallGroupCtasPerSm per SM, where that many parts fit a
  // request's splits.
  auto grid_parts = [&](int row_warpgroups) {
    const int m_blocks = ceil_div(num_q_tokens_per_head_k, row_warpgroups * kRowsPerWarpgroup);
    return std::max(1, num_sms / (num_heads_k * m_blocks));
  };
  const int parts_64 = grid_parts(1);
  const int parts_128 = grid_parts(row_warpgroups_for(num_q_tokens_per_head_k, kMaxRowWarpgroups));
  const int parts = parts_64 * std::max(1, parts_128 / parts_64);
  const int small_group_parts = kSmallGroupCtasPerSm * num_sms / num_heads_k;
  return num_q_tokens_per_head_k <= kSmallGroupRows && small_group_parts <= kMaxSplitsPerRequest
             ? std::max(parts, small_group_parts)
             : parts;
}

void run_scheduler(const int* cache_seqlens, int batch, int num_parts, PartPlan* plans,
                   int* num_splits, cudaStream_t stream, bool batch_invariant) {
  if (batch_invariant) {
    invariant_scheduler_kernel<<<1, kThreads, 0, stream>>>(cache_seqlens, batch, num_parts, plans,
                                                            num_splits);
  } else {
    scheduler_kernel<<<1, kThreads, 0, stream>>>(cache_seqlens, batch, num_parts, plans, num_splits);
  }
  check_launch("scheduler");
}

}  // namespace flash_gla
