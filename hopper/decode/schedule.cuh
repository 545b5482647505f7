// The persistent schedule: which request pieces (request, page range) a CTA walks.
//
// A CTA takes scheduler parts blockIdx.z, + gridDim.z, ... (csrc/scheduler.cu assigned each
// part a run of requests, the first and last possibly cut); for each request of a part it
// handles one piece. In the batch-invariant plan a part is a run of slots instead, each slot
// one chunk of a request, and each slot is one piece.
#pragma once

#include "common/params.h"

namespace flash_gla::hopper {

// One request's share of one scheduler part.
struct WorkPiece {
  int batch;
  int seqlen;      // cache_seqlens[batch], clamped to what the block table can address
  int num_pages;   // pages holding the request's keys
  int page_begin;  // this piece's pages: [page_begin, page_end)
  int page_end;
  int slot;        // accumulator slot for a split request
  bool is_split;   // the request is spread over several pieces (needs the combine kernel)
};

struct PartSchedule {
  int begin_batch, begin_page, end_batch, end_page, begin_split;

  // kReload: read every field from global memory (an L1 hit) each time, instead of letting
  // the compiler keep five values live across a consumer's page loop, where registers are
  // at the setmaxnreg limit (they were spilled otherwise).
  template <bool kReload = false>
  __device__ static PartSchedule load(const DecodeParams& p, int part) {
    const int* m = p.sched_meta + part * kMetaFields;
    auto field = [&](int f) {
      if constexpr (kReload) {
        int v;
        asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(v) : "l"(m + f));
        return v;
      } else {
        return m[f];
      }
    };
    return {field(kMetaBeginBatch), field(kMetaBeginPage), field(kMetaEndBatch),
            field(kMetaEndPage), field(kMetaBeginSplit)};
  }

  // The request of the part's idx-th item, idx in [begin_batch, end_batch]: idx itself, or
  // in the batch-invariant plan (whose parts walk slots) the request owning slot idx, found by
  // binary search in num_splits (every request has at least one slot, so exactly one
  // request r has num_splits[r] <= idx < num_splits[r + 1]).
  __device__ static int request_of(const DecodeParams& p, int idx) {
    if (!p.batch_invariant) { return idx; }
    int lo = 0, hi = p.batch - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (__ldg(p.num_splits + mid) <= idx) { lo = mid; } else { hi = mid - 1; }
    }
    return lo;
  }

  // The piece of item idx, whose request is `batch` (request_of(p, idx)).
  __device__ WorkPiece piece(const DecodeParams& p, int idx, int batch) const {
    WorkPiece w;
    w.batch = batch;
    const int capacity = p.max_pages_per_seq * kPageSize;
    const int length = p.cache_seqlens[batch];
    w.seqlen = max(0, min(length, capacity));
    w.num_pages = (w.seqlen + kPageSize - 1) / kPageSize;
    const int first_slot = p.num_splits[batch];
    w.is_split = p.num_splits[batch + 1] - first_slot > 1;
    if (p.batch_invariant) {  // chunk idx - first_slot, cut by the request's own length
      const int step = invariant_chunk_pages((max(length, 0) + kPageSize - 1) / kPageSize);
      const int chunk = idx - first_slot;
      w.page_begin = min(chunk * step, w.num_pages);
      w.page_end = min(w.page_begin + step, w.num_pages);
      w.slot = idx;
      return w;
    }
    w.page_end = min(batch == end_batch ? end_page : w.num_pages, w.num_pages);
    w.page_begin = min(batch == begin_batch ? begin_page : 0, w.page_end);
    w.slot = first_slot + (batch == begin_batch ? begin_split : 0);
    return w;
  }
};

// A CTA's pages in the order its consumers walk them (parts blockIdx.z, + gridDim.z, ...; their
// pieces; their pages), for a producer that must run ahead of the consumers across pieces.
struct PageWalk {
  int part, idx, page, page_end;
  const int* pages;   // the block-table row of the current piece's request
  int physical_page;  // pages[page], read as soon as the walk gets there: its latency then
                      // passes while the caller does other work
  bool done;

  __device__ void begin(const DecodeParams& p) {
    part = blockIdx.z;
    idx = -1;
    enter_part(p);
  }
  __device__ void next(const DecodeParams& p) {
    if (++page < page_end) {
      physical_page = pages[page];
      return;
    }
    if (!next_piece(p)) {
      part += gridDim.z;
      enter_part(p);
    }
  }

 private:
  // The first part from `part` on with a non-empty piece.
  __device__ void enter_part(const DecodeParams& p) {
    for (; part < p.num_parts; part += gridDim.z) {
      idx = PartSchedule::load(p, part).begin_batch - 1;
      if (next_piece(p)) {
        done = false;
        return;
      }
    }
    done = true;
  }
  // Moves to the part's next non-empty piece after idx; false past its last.
  __device__ bool next_piece(const DecodeParams& p) {
    const PartSchedule sched = PartSchedule::load(p, part);
    for (++idx; idx <= sched.end_batch; ++idx) {
      const int batch = PartSchedule::request_of(p, idx);
      const WorkPiece w = sched.piece(p, idx, batch);
      if (w.page_begin < w.page_end) {
        page = w.page_begin;
        page_end = w.page_end;
        pages = p.block_table + batch * p.block_table_batch_stride;
        physical_page = pages[page];
        return true;
      }
    }
    return false;
  }
};

}  // namespace flash_gla::hopper
