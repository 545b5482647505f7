// The persistent schedule: the one order in which a CTA walks its work, which the producer
// (loading pages) and the consumers (computing them) both follow, page for page.
//
// A CTA takes scheduler parts blockIdx.z, + gridDim.z, ... (hopper/schedule/scheduler.cu gave
// each part a PartPlan: a run of requests, the first and last possibly cut); each request of a
// part is one piece. In the batch-invariant plan a part is a run of slots instead, each slot
// one chunk of a request and one piece. PieceWalk visits every piece, empty ones too (a
// consumer still writes their output); PageWalk walks the pages of the non-empty ones.
#pragma once

#include "common/params.h"

namespace flash_gla::hopper {

// One request's share of one scheduler part.
struct WorkPiece {
  int request;     // index into the batch
  int seqlen;      // cache_seqlens[request], clamped to what the block table can address
  int num_pages;   // pages holding the request's keys
  int page_begin;  // this piece's pages: [page_begin, page_end)
  int page_end;
  int slot;        // accumulator slot for a split request
  bool is_split;   // the request is spread over several pieces (needs the combine kernel)
};

// A CTA's pieces, part by part and item by item. The order is set by the six steps below
// (first_part / in_parts / next_part over the CTA's parts, first_item / in_part / next_item
// over a part's items); a caller either nests the two loops or walks flat (begin / done /
// next). The producer and the consumers nest them: with one flat loop, ptxas spills the
// consumers' piece state at the setmaxnreg limit.
//
// kReload: read the part's plan from global memory (an L1 hit) whenever it is needed, instead
// of letting the compiler keep its fields live across a consumer's page loop, where registers
// are at the setmaxnreg limit (they were spilled otherwise). Without it the plan is read once
// per part and kept.
template <bool kReload>
struct PieceWalk {
  int part;  // the scheduler part
  int item;  // its current item: a request, or a slot in the batch-invariant plan
  PartPlan kept;  // without kReload: the part's plan, read once per part

  __device__ void first_part() { part = blockIdx.z; }
  __device__ bool in_parts(const DecodeParams& p) const { return part < p.num_parts; }
  __device__ void next_part() { part += gridDim.z; }
  __device__ void first_item(const DecodeParams& p) {
    if constexpr (!kReload) { kept = p.sched_meta[part]; }
    item = plan(p).begin_item;
  }
  __device__ bool in_part(const DecodeParams& p) const { return item <= plan(p).end_item; }
  __device__ void next_item() { ++item; }

  // The same order as one flat walk over the pieces.
  __device__ void begin(const DecodeParams& p) {
    first_part();
    if (in_parts(p)) { first_item(p); }
    settle(p);
  }
  __device__ bool done(const DecodeParams& p) const { return !in_parts(p); }
  __device__ void next(const DecodeParams& p) {
    next_item();
    settle(p);
  }

  // The request of the current item: the item itself, or in the batch-invariant plan the
  // request owning slot `item`, found by binary search in num_splits (every request has at
  // least one slot, so exactly one request r has num_splits[r] <= item < num_splits[r + 1]).
  __device__ int request(const DecodeParams& p) const {
    if (!p.batch_invariant) { return item; }
    int lo = 0, hi = p.batch - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (__ldg(p.num_splits + mid) <= item) { lo = mid; } else { hi = mid - 1; }
    }
    return lo;
  }

  // The current piece, whose request is `request` (request(p)).
  __device__ WorkPiece piece(const DecodeParams& p, int request) const {
    const PartPlan plan = this->plan(p);
    WorkPiece w;
    w.request = request;
    const int capacity = p.max_pages_per_seq * kPageSize;
    const int length = p.cache_seqlens[request];
    w.seqlen = max(0, min(length, capacity));
    w.num_pages = (w.seqlen + kPageSize - 1) / kPageSize;
    const int first_slot = p.num_splits[request];
    w.is_split = p.num_splits[request + 1] - first_slot > 1;
    if (p.batch_invariant) {  // chunk item - first_slot, cut by the request's own length
      const int step = invariant_chunk_pages((max(length, 0) + kPageSize - 1) / kPageSize);
      const int chunk = item - first_slot;
      w.page_begin = min(chunk * step, w.num_pages);
      w.page_end = min(w.page_begin + step, w.num_pages);
      w.slot = item;
      return w;
    }
    w.page_end = min(request == plan.end_item ? plan.end_page : w.num_pages, w.num_pages);
    w.page_begin = min(request == plan.begin_item ? plan.begin_page : 0, w.page_end);
    w.slot = first_slot + (request == plan.begin_item ? plan.begin_split : 0);
    return w;
  }

 private:
  __device__ PartPlan plan(const DecodeParams& p) const {
    const PartPlan* row = p.sched_meta + part;
    if constexpr (kReload) {
      auto field = [](const int* f) {
        int v;
        asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(v) : "l"(f));
        return v;
      };
      PartPlan v;
      v.begin_item = field(&row->begin_item);
      v.begin_page = field(&row->begin_page);
      v.end_item = field(&row->end_item);
      v.end_page = field(&row->end_page);
      v.begin_split = field(&row->begin_split);
      return v;
    } else {
      return kept;
    }
  }
  // From (part, item) on, the first item that lies inside its part (parts may be empty).
  __device__ void settle(const DecodeParams& p) {
    while (in_parts(p) && !in_part(p)) {
      next_part();
      if (in_parts(p)) { first_item(p); }
    }
  }
};

// A CTA's pages in the order its consumers walk them (the non-empty pieces of PieceWalk, page
// by page), for a producer that loads them, possibly running ahead across pieces.
struct PageWalk {
  PieceWalk<false> pieces;
  int page, page_end;
  const int* pages;   // the block-table row of the current piece's request
  int physical_page;  // pages[page], read as soon as the walk gets there: its latency then
                      // passes while the caller does other work
  int seqlen;         // the current piece's WorkPiece::seqlen
  bool done;

  // Rows of the current page that hold keys (the rest lie past the sequence end).
  __device__ int valid_rows() const { return min(kPageSize, seqlen - page * kPageSize); }

  __device__ void begin(const DecodeParams& p) {
    pieces.begin(p);
    enter_piece(p);
  }
  __device__ void next(const DecodeParams& p) {
    if (++page < page_end) {
      physical_page = pages[page];
      return;
    }
    pieces.next(p);
    enter_piece(p);
  }

 private:
  // The first non-empty piece from the current one on.
  __device__ void enter_piece(const DecodeParams& p) {
    for (; !pieces.done(p); pieces.next(p)) {
      const int request = pieces.request(p);
      const WorkPiece w = pieces.piece(p, request);
      if (w.page_begin < w.page_end) {
        page = w.page_begin;
        page_end = w.page_end;
        pages = p.block_table + request * p.block_table_batch_stride;
        physical_page = pages[page];
        seqlen = w.seqlen;
        done = false;
        return;
      }
    }
    done = true;
  }
};

}  // namespace flash_gla::hopper
