"""Host model of the decode tile scheduler (``get_metadata``), page for page.

The CUDA scheduler kernel (csrc/scheduler.cu) implements exactly :func:`plan`; this module is
the readable definition that the tests check invariants on (test_scheduler_model.py) and compare
the kernel with (test_metadata_gpu.py, test_batch_invariant_gpu.py), and that a reader can step
through. It is a test oracle, not part of the package: nothing in flash_gla/ imports it.

Cost model. Every request costs its KV pages (``PAGE_SIZE`` tokens each) plus
``FIXED_OVERHEAD_PAGES`` for the fixed work of a piece of a request (loading Q, the
epilogue, and for a split request the combine). The total cost is spread over ``num_parts``
scheduler parts (about one persistent CTA per SM per KV head x query tile) with a payload of
``ceil(total / num_parts) + FIXED_OVERHEAD_PAGES`` per part. Parts are filled in request
order; a request that does not fit in what is left of a part is split: the part takes as
many of its pages as fit and the next part continues where it stopped.

Metadata row of part ``p`` (``META_FIELDS`` int32 values)::

    [begin_batch, begin_page, end_batch, end_page, begin_split, 0, 0, 0]

* The part processes requests ``begin_batch .. end_batch`` inclusive.
* In ``begin_batch`` it starts at page ``begin_page``; in ``end_batch`` it stops before
  page ``end_page`` (exclusive); requests strictly in between are processed whole.
  When ``begin_batch == end_batch`` both bounds apply to that one request.
* An empty part (one that has nothing left to do) has ``end_batch < begin_batch``. This
  happens only when all requests were taken by earlier parts; the row is then
  ``[b, 0, b - 1, pages[b - 1], 0, 0, 0, 0]`` (``[0, 0, -1, 0, 0, ...]`` for ``b == 0``).
  A part that starts with work always makes progress (its payload exceeds the fixed
  overhead), so every non-empty row covers at least one page or one zero-length request.
* A zero-length request (0 pages) sits in exactly one part's range, with an empty page
  range; that part writes its output rows (``out = 0``, ``lse = +inf``).
* ``begin_split`` is how many earlier parts already processed a piece of ``begin_batch``.

``num_splits`` (``b + 1`` int32) is the exclusive prefix sum of the number of pieces each
request was cut into: request ``i`` has ``num_splits[i+1] - num_splits[i]`` pieces and is
split iff that is > 1. A part's piece of request ``i`` owns accumulator slot
``num_splits[i] + (begin_split if i == begin_batch else 0)``; split requests write fp32
partial outputs + LSE there and the combine kernel merges slots
``num_splits[i] .. num_splits[i+1] - 1``. ``num_splits[b] <= b + num_parts - 1``.

Balance: every part costs at most ``payload`` (proved in :func:`plan`'s comments and
checked by the tests).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

# The constants the kernels size things by (generated from hopper/common/params.h): tokens per
# page, the cost of a piece beyond its pages, fields per metadata row, and the batch-invariant
# plan's smallest chunk and most chunks per request.
from flash_gla._instances import (  # noqa: F401  (META_FIELDS: the row width, for this model's readers)
    FIXED_OVERHEAD_PAGES,
    INVARIANT_CHUNK_PAGES,
    INVARIANT_MAX_CHUNKS,
    META_FIELDS,
    PAGE_SIZE,
)


def num_pages(seqlen: int) -> int:
    """KV pages of a request of ``seqlen`` tokens."""
    return -(-seqlen // PAGE_SIZE)


def payload_per_part(seqlens: list[int], num_parts: int) -> int:
    """The cost budget of one part: ``ceil(total / num_parts) + FIXED_OVERHEAD_PAGES``."""
    total = sum(num_pages(n) + FIXED_OVERHEAD_PAGES for n in seqlens)
    return -(-total // num_parts) + FIXED_OVERHEAD_PAGES


def plan(seqlens: list[int], num_parts: int) -> tuple[list[list[int]], list[int]]:
    """Assign the KV pages of every request to ``num_parts`` parts.

    Args:
        seqlens: the ``cache_seqlens`` values, one non-negative int per request.
        num_parts: number of scheduler parts (>= 1).

    Returns:
        ``(meta, num_splits)``: ``meta`` is ``num_parts`` rows of ``META_FIELDS`` ints
        (layout in the module docstring), ``num_splits`` has ``len(seqlens) + 1`` ints.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if any(n < 0 for n in seqlens):
        raise ValueError(f"seqlens must be >= 0, got {min(seqlens)}")
    b = len(seqlens)
    pages = [num_pages(n) for n in seqlens]
    payload = payload_per_part(seqlens, num_parts)

    meta = []
    num_splits = [0] * (b + 1)
    idx, page, split, cum = 0, 0, 0, 0  # next to assign: page `page` of request idx
    for p in range(num_parts):
        begin_batch, begin_page, begin_split = idx, page, split
        remain = payload
        last = p == num_parts - 1
        while idx < b:
            rest = pages[idx] - page
            if last or remain >= rest + FIXED_OVERHEAD_PAGES:
                # The rest of request idx fits: finish it in this part.
                cum += split + 1
                num_splits[idx + 1] = cum
                remain -= rest + FIXED_OVERHEAD_PAGES
                idx, page, split = idx + 1, 0, 0
            else:
                # Take what fits (remain - FIXED < rest, so at least one page stays for
                # the next part). On a part's first request remain == payload > FIXED, so
                # a part that starts with work always takes >= 1 page here.
                if remain > FIXED_OVERHEAD_PAGES:
                    page += remain - FIXED_OVERHEAD_PAGES
                    split += 1
                break
        if page > 0:
            end_batch, end_page = idx, page
        else:
            end_batch = idx - 1
            end_page = pages[idx - 1] if idx > 0 else 0
        meta.append([begin_batch, begin_page, end_batch, end_page, begin_split, 0, 0, 0])
    # Balance argument: a part that stops early (the else branch) has consumed at least
    # payload - FIXED of the not-yet-assigned cost (a partial piece consumes its pages, a
    # finished request its remaining pages + FIXED), so after num_parts - 1 parts at most
    # total - (num_parts - 1) * ceil(total / num_parts) <= payload - FIXED is left for the
    # last part, which therefore never exceeds the payload either.
    return meta, num_splits


@dataclass(frozen=True)
class Piece:
    """One part's share of one request: pages ``[page_begin, page_end)``."""

    part: int
    request: int
    page_begin: int
    page_end: int
    slot: int  # accumulator slot (used only when the request is split)
    split: bool  # request has more than one piece

    @property
    def cost(self) -> int:
        return self.page_end - self.page_begin + FIXED_OVERHEAD_PAGES


def pieces(meta: list[list[int]], num_splits: list[int], seqlens: list[int]) -> list[Piece]:
    """Decode metadata the way the decode kernel reads it: every (part, request) piece."""
    pages = [num_pages(n) for n in seqlens]
    out = []
    for p, row in enumerate(meta):
        begin_batch, begin_page, end_batch, end_page, begin_split = row[:5]
        for i in range(begin_batch, end_batch + 1):
            lo = begin_page if i == begin_batch else 0
            hi = end_page if i == end_batch else pages[i]
            slot = num_splits[i] + (begin_split if i == begin_batch else 0)
            out.append(Piece(p, i, lo, hi, slot, num_splits[i + 1] - num_splits[i] > 1))
    return out


def part_costs(meta: list[list[int]], num_splits: list[int], seqlens: list[int]) -> list[int]:
    """Cost (pages + fixed overhead per piece) of every part."""
    costs = [0] * len(meta)
    for piece in pieces(meta, num_splits, seqlens):
        costs[piece.part] += piece.cost
    return costs


# ----------------------------------------------------------------------------------------
# The batch-invariant plan (get_metadata(..., enable_batch_invariant=True))
# ----------------------------------------------------------------------------------------
#
# The plan above cuts a request wherever a part's budget runs out, which depends on the
# requests before it: the same request in another batch is cut elsewhere, and its output,
# merged from other partial sums, differs in the last bits. The batch-invariant plan cuts
# every request by its own length only: into chunks of ``chunk_pages(n)`` pages, at most
# ``INVARIANT_MAX_CHUNKS`` of them, one accumulator slot each. The slots, in request order,
# are then dealt to the parts in contiguous runs, never cut: a part may hold several chunks
# of one request, but computes each as its own piece, so a request's pieces and their merge
# order are the same in every batch.
#
# Metadata: ``num_parts`` rows ``[begin_slot, 0, end_slot, 0, 0, 0, 0, 0]`` (slots
# ``begin_slot .. end_slot`` inclusive; an idle part has ``end_slot < begin_slot``), then one
# header row ``[INVARIANT_MAX_CHUNKS, INVARIANT_CHUNK_PAGES, 0, ...]`` that marks the plan as
# batch-invariant (``num_parts + 1`` rows: a decode call checks the row count against its
# ``enable_batch_invariant``). ``num_splits[i]`` is request ``i``'s first slot, as above.


def chunk_pages(num_pages_of_request: int) -> int:
    """Pages per chunk of a request in the batch-invariant plan (the last chunk may be shorter)."""
    return max(INVARIANT_CHUNK_PAGES, -(-num_pages_of_request // INVARIANT_MAX_CHUNKS))


def num_chunks(num_pages_of_request: int) -> int:
    """Chunks (pieces, slots) of a request in the batch-invariant plan; >= 1 (an empty request has one)."""
    return max(1, -(-num_pages_of_request // chunk_pages(num_pages_of_request)))


def plan_batch_invariant(seqlens: list[int], num_parts: int) -> tuple[list[list[int]], list[int]]:
    """The batch-invariant plan: ``(meta with num_parts + 1 rows, num_splits)``.

    Chunk ``c`` of a request goes to the part in which its cost's midpoint falls when the
    chunks' costs (pages + FIXED_OVERHEAD_PAGES), in slot order, are laid end to end over
    ``num_parts`` equal shares: every part costs at most its share plus one chunk.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    costs, num_splits = [], [0]
    for n in seqlens:
        pages = num_pages(n)
        step = chunk_pages(pages)
        chunks = num_chunks(pages)
        costs += [min(step, pages - c * step) + FIXED_OVERHEAD_PAGES for c in range(chunks)]
        num_splits.append(num_splits[-1] + chunks)
    total = sum(costs)
    begins = [len(costs)] * num_parts
    start, previous = 0, -1
    for slot, cost in enumerate(costs):
        part = min(num_parts - 1, (2 * start + cost) * num_parts // (2 * total))
        for q in range(previous + 1, part + 1):
            begins[q] = slot
        start, previous = start + cost, part
    ends = [begin - 1 for begin in begins[1:]] + [len(costs) - 1]
    meta = [[begin, 0, end, 0, 0, 0, 0, 0] for begin, end in zip(begins, ends)]
    meta.append([INVARIANT_MAX_CHUNKS, INVARIANT_CHUNK_PAGES, 0, 0, 0, 0, 0, 0])
    return meta, num_splits


def invariant_pieces(meta: list[list[int]], num_splits: list[int], seqlens: list[int]) -> list[Piece]:
    """Decode a batch-invariant plan the way the decode kernel reads it."""
    out = []
    for p, row in enumerate(meta[:-1]):
        for slot in range(row[0], row[2] + 1):
            i = bisect.bisect_right(num_splits, slot) - 1  # the request with num_splits[i] <= slot < num_splits[i + 1]
            pages = num_pages(seqlens[i])
            step = chunk_pages(pages)
            c = slot - num_splits[i]
            lo = min(c * step, pages)
            out.append(Piece(p, i, lo, min(lo + step, pages), slot, num_splits[i + 1] - num_splits[i] > 1))
    return out
