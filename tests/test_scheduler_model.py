"""Invariants of the tile scheduler (scheduler_model.py beside this file, which the CUDA kernel mirrors)."""

import math
import random
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from scheduler_model import (
    FIXED_OVERHEAD_PAGES,
    INVARIANT_CHUNK_PAGES,
    INVARIANT_MAX_CHUNKS,
    META_FIELDS,
    PAGE_SIZE,
    invariant_pieces,
    num_pages,
    part_costs,
    payload_per_part,
    pieces,
    plan,
    plan_batch_invariant,
)


def check_plan(seqlens, num_parts):
    """Plan and assert every invariant the decode and combine kernels rely on."""
    where = f"[b={len(seqlens)}, num_parts={num_parts}, seqlens[:8]={seqlens[:8]}]"
    b = len(seqlens)
    meta, num_splits = plan(seqlens, num_parts)
    pages = [num_pages(n) for n in seqlens]

    assert len(meta) == num_parts and all(len(row) == META_FIELDS for row in meta), where
    assert len(num_splits) == b + 1 and num_splits[0] == 0, where
    assert all(x < y for x, y in zip(num_splits, num_splits[1:])), f"{where} num_splits not increasing: {num_splits}"
    assert num_splits[-1] <= b + num_parts - 1, f"{where} num_splits[-1] = {num_splits[-1]}"

    for p, row in enumerate(meta):
        begin_batch, begin_page, end_batch, end_page = row[:4]
        assert row[5:] == [0, 0, 0], f"{where} part {p}: reserved fields {row[5:]}"
        if end_batch < begin_batch:  # empty part: only once every request is taken
            assert begin_batch == b and begin_page == 0 and row[4] == 0, f"{where} part {p} empty row {row}"
        else:
            assert 0 <= begin_batch <= end_batch < b, f"{where} part {p} row {row}"

    all_pieces = pieces(meta, num_splits, seqlens)
    by_request = defaultdict(list)
    for piece in all_pieces:
        by_request[piece.request].append(piece)
    for i in range(b):
        own = sorted(by_request[i], key=lambda x: x.page_begin)
        assert own, f"{where} request {i} (L={seqlens[i]}) is in no part"
        if pages[i] == 0:
            assert len(own) == 1 and own[0].page_begin == own[0].page_end == 0, f"{where} request {i}: {own}"
        else:
            # Every page exactly once: the pieces tile [0, pages) without gaps or overlap.
            assert own[0].page_begin == 0 and own[-1].page_end == pages[i], f"{where} request {i}: {own}"
            for x, y in zip(own, own[1:]):
                assert x.page_end == y.page_begin, f"{where} request {i}: gap/overlap {x} {y}"
            assert all(x.page_end > x.page_begin for x in own), f"{where} request {i}: empty piece {own}"
        # Parts hand a request on in order; the slots are exactly the request's range.
        assert [x.part for x in own] == sorted({x.part for x in own}), f"{where} request {i}: {own}"
        count = num_splits[i + 1] - num_splits[i]
        assert count == len(own), f"{where} request {i}: {len(own)} pieces, num_splits says {count}"
        assert sorted(x.slot for x in own) == list(range(num_splits[i], num_splits[i + 1])), f"{where} request {i}: {own}"
        assert all(x.split == (count > 1) for x in own), where

    slots = [x.slot for x in all_pieces]
    assert len(slots) == len(set(slots)), f"{where} two pieces share an accumulator slot"
    assert all(0 <= s < b + num_parts for s in slots), where

    payload = payload_per_part(seqlens, num_parts)
    costs = part_costs(meta, num_splits, seqlens)
    assert max(costs) <= payload, f"{where} part costs {max(costs)} > payload {payload}"
    return meta, num_splits


def random_lengths(rng, b):
    kind = rng.choice(["zeros", "uniform", "long_tail", "mixed", "page_edges", "one_huge"])
    if kind == "zeros":
        return [0] * b
    if kind == "uniform":
        top = rng.choice([64, 1000, 8192, 65536])
        return [rng.randint(0, top) for _ in range(b)]
    if kind == "long_tail":  # most requests short, a few very long
        return [rng.randint(0, 300) if rng.random() < 0.9 else rng.randint(10_000, 131_072) for _ in range(b)]
    if kind == "mixed":
        return [rng.choice([0, 0, 1, 63, 64, 65, rng.randint(1, 20_000)]) for _ in range(b)]
    if kind == "page_edges":
        return [max(0, 64 * rng.randint(0, 40) + rng.choice([-1, 0, 1])) for _ in range(b)]
    lengths = [rng.randint(0, 100) for _ in range(b)]
    lengths[rng.randrange(b)] = rng.randint(100_000, 500_000)
    return lengths


@pytest.mark.parametrize("seed", range(40))
def test_random_plans(seed):
    rng = random.Random(seed)
    for _ in range(25):
        b = rng.choice([1, 2, 3, rng.randint(1, 64), rng.randint(64, 600)])
        num_parts = rng.choice([1, 2, rng.randint(1, 132), 66, 132])
        check_plan(random_lengths(rng, b), num_parts)


@pytest.mark.parametrize(
    "seqlens, num_parts",
    [
        ([0], 1),
        ([0], 132),  # most parts empty
        ([1], 132),
        ([0] * 600, 1),
        ([0] * 600, 132),
        ([16384], 132),  # one request split over every part
        ([131072], 7),
        ([64, 128, 192], 2),  # exact page multiples
        ([65] * 300, 132),
        ([0, 10_000, 0, 0, 10_000, 0], 16),  # zeros around split requests
    ],
    ids=lambda x: str(x)[:40],
)
def test_edge_plans(seqlens, num_parts):
    check_plan(seqlens, num_parts)


def test_single_long_request_is_split_evenly():
    meta, num_splits = check_plan([64 * 1000], 10)
    costs = part_costs(meta, num_splits, [64 * 1000])
    assert num_splits == [0, 10]
    # Each piece pays the fixed overhead but the payload counts it once per request, so the
    # last part ends up about 2 * FIXED lighter than the others (here 96 vs. 106).
    assert max(costs) - min(costs) <= 2 * FIXED_OVERHEAD_PAGES, costs


def test_known_plan():
    """A hand-checked plan, so that the kernel's port can be compared row by row.

    pages = [2, 0, 10], total = (2+5) + (0+5) + (10+5) = 27, 3 parts: payload = 9 + 5 = 14.
    Part 0: request 0 whole (cost 7, remain 7), request 1 whole (cost 5, remain 2), stop.
    Part 1: request 2 needs 15 > 14: take 14 - 5 = 9 pages.
    Part 2 (last): the remaining page of request 2.
    """
    meta, num_splits = plan([100, 0, 640], 3)
    assert meta == [
        [0, 0, 1, 0, 0, 0, 0, 0],
        [2, 0, 2, 9, 0, 0, 0, 0],
        [2, 9, 2, 10, 1, 0, 0, 0],
    ]
    assert num_splits == [0, 1, 2, 4]


def test_empty_part_encoding():
    meta, num_splits = plan([10, 10], 4)  # total 12, payload 8: parts 2, 3 have nothing left
    assert meta[0] == [0, 0, 0, 1, 0, 0, 0, 0] and meta[1] == [1, 0, 1, 1, 0, 0, 0, 0]
    assert meta[2] == meta[3] == [2, 0, 1, 1, 0, 0, 0, 0]
    assert num_splits == [0, 1, 2]


def test_constants_match_the_cuda_side():
    """The model's constants have the values (and names) of the C++ ones the kernels use."""
    root = Path(__file__).resolve().parents[1]
    headers = "\n".join(p.read_text() for d in ("csrc", "hopper") for p in sorted((root / d).rglob("*.h")))
    for cpp, value in (("kPageSize", PAGE_SIZE), ("kFixedOverheadPages", FIXED_OVERHEAD_PAGES),
                       ("kMetaFields", META_FIELDS), ("kInvariantChunkPages", INVARIANT_CHUNK_PAGES),
                       ("kInvariantMaxChunks", INVARIANT_MAX_CHUNKS)):
        found = re.findall(rf"constexpr int {cpp} = (\d+);", headers)
        assert found == [str(value)], f"C++ {cpp}: {found} in csrc/ and hopper/ headers, Python {value}"


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_parts"):
        plan([1], 0)
    with pytest.raises(ValueError, match="seqlens"):
        plan([1, -1], 2)


# ----------------------------------------------------------------------------------------
# The batch-invariant plan
# ----------------------------------------------------------------------------------------


def request_pieces(lengths, num_parts, request, invariant=True):
    """(page_begin, page_end, slot - first slot) of each piece of one request."""
    meta, num_splits = (plan_batch_invariant if invariant else plan)(lengths, num_parts)
    cut = invariant_pieces if invariant else pieces
    return [(x.page_begin, x.page_end, x.slot - num_splits[request])
            for x in cut(meta, num_splits, lengths) if x.request == request]


@pytest.mark.parametrize("seed", range(40))
def test_invariant_plan_covers_every_page_once_and_balances(seed):
    rng = random.Random(seed)
    b, num_parts = rng.randint(0, 60), rng.choice([1, 2, 7, 66, 132])
    lengths = [rng.choice([0, 1, 64, 65, 4096, 4097, 20_000, 70_000, rng.randint(0, 400_000)]) for _ in range(b)]
    where = f"[seed {seed}, b {b}, parts {num_parts}]"
    meta, num_splits = plan_batch_invariant(lengths, num_parts)
    assert len(meta) == num_parts + 1 and meta[-1] == [INVARIANT_MAX_CHUNKS, INVARIANT_CHUNK_PAGES, 0, 0, 0, 0, 0, 0]
    assert num_splits[0] == 0 and len(num_splits) == b + 1
    assert num_splits[-1] <= b * INVARIANT_MAX_CHUNKS, where  # the decode's slot allocation
    got = invariant_pieces(meta, num_splits, lengths)
    assert [x.slot for x in got] == list(range(num_splits[-1])), f"{where} every slot once, in order"
    for i, n in enumerate(lengths):
        mine = [x for x in got if x.request == i]
        assert 1 <= len(mine) == num_splits[i + 1] - num_splits[i] <= INVARIANT_MAX_CHUNKS, where
        assert mine[0].page_begin == 0 and mine[-1].page_end == num_pages(n), where
        assert all(x.page_end == y.page_begin for x, y in zip(mine, mine[1:])), where
        assert all(x.split == (len(mine) > 1) for x in mine), where
    costs = [0] * num_parts
    for x in got:
        costs[x.part] += x.cost
    if got:  # each part: its share of the total plus at most one chunk
        assert max(costs) <= -(-sum(costs) // num_parts) + max(x.cost for x in got), f"{where} {costs}"


def test_invariant_pieces_depend_on_the_request_only():
    """The default plan cuts a long request where the parts' budgets run out (so it depends on
    the other requests); the batch-invariant plan cuts it the same way in every batch."""
    rng = random.Random(0)
    long_request = 70_000
    alone = request_pieces([long_request], 66, 0)
    assert len(alone) == INVARIANT_MAX_CHUNKS and alone[0] == (0, 137, 0)
    default_cuts = set()
    for trial in range(20):
        others = [rng.randint(0, 50_000) for _ in range(rng.randint(1, 100))]
        at = rng.randint(0, len(others))
        lengths = others[:at] + [long_request] + others[at:]
        assert request_pieces(lengths, 66, at) == alone, f"trial {trial}"
        default_cuts.add(tuple(request_pieces(lengths, 66, at, invariant=False)))
    assert len(default_cuts) > 1, "the default plan should depend on the batch (else this test shows nothing)"


def test_invariant_chunk_sizes():
    meta, num_splits = plan_batch_invariant([0, 64 * 64, 64 * 64 + 1, 64 * 64 * 8, 64 * 64 * 8 + 64, 10**6], 4)
    assert num_splits == [0, 1, 2, 4, 12, 20, 28]


def simulate_split_decode(q, keys, values, lengths, num_parts, causal, scale):
    """Run attention the way the kernels do: per scheduler piece, then combine split requests.

    q (b, s_q, h, d); keys/values: per request (L_i, h, d) float64 (one KV head per query
    head, enough for the scheduling logic). A piece over pages [lo, hi) sees keys
    [64 lo, min(64 hi, L)). Unsplit requests are written directly; split ones write
    (o, lse) partials to their slot, and the combine merges slots num_splits[i] ..
    num_splits[i+1] - 1. A partial row that sees no key has lse = -inf (weight 0); a row
    that sees no key at all ends as out = 0, lse = +inf.
    """
    b, s_q, h, _ = q.shape
    meta, num_splits = plan(lengths, num_parts)
    out = torch.full((b, s_q, h, values[0].shape[-1]), float("nan"), dtype=torch.float64)
    lse = torch.full((b, h, s_q), float("nan"), dtype=torch.float64)
    acc_o, acc_lse = {}, {}
    for piece in pieces(meta, num_splits, lengths):
        i, length = piece.request, lengths[piece.request]
        t0, t1 = piece.page_begin * 64, min(piece.page_end * 64, length)
        pos = torch.arange(t0, t1)
        scores = torch.einsum("shd,lhd->hsl", q[i].double(), keys[i][t0:t1]) * scale
        if causal:
            visible = pos[None, :] <= (length - s_q + torch.arange(s_q))[:, None]
            scores = scores.masked_fill(~visible, -math.inf)
        part_lse = torch.logsumexp(scores, dim=-1)  # (h, s_q); -inf where nothing is visible
        probs = torch.exp(scores - part_lse[..., None]).nan_to_num(0.0)
        part_o = torch.einsum("hsl,lhd->shd", probs, values[i][t0:t1])
        if piece.split:
            assert piece.slot not in acc_o
            acc_o[piece.slot], acc_lse[piece.slot] = part_o, part_lse
        else:
            out[i], lse[i] = part_o, part_lse.masked_fill(torch.isneginf(part_lse), math.inf)
    for i in range(b):  # combine
        slots = range(num_splits[i], num_splits[i + 1])
        if len(slots) < 2:
            continue
        lses = torch.stack([acc_lse[s] for s in slots])  # (n, h, s_q)
        total = torch.logsumexp(lses, dim=0)
        weights = torch.exp(lses - total).nan_to_num(0.0)  # (n, h, s_q)
        out[i] = sum(w.transpose(0, 1)[..., None] * acc_o[s] for w, s in zip(weights, slots))
        lse[i] = total.masked_fill(torch.isneginf(total), math.inf)
    return out, lse


@pytest.mark.parametrize("num_parts", [1, 3, 16, 132])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_split_and_combine_reproduce_reference(num_parts, causal):
    """The metadata's pieces + slots + combine give exactly the unsplit attention."""
    from flash_gla.reference import attention_ref

    rng = random.Random(num_parts)
    lengths = [0, 1, 3, 64, 65, 700, 2000, 0, rng.randint(1, 3000)]
    b, s_q, h, d = len(lengths), 4, 2, 8
    gen = torch.Generator().manual_seed(num_parts)
    q = torch.randn(b, s_q, h, d, generator=gen, dtype=torch.float64)
    keys = [torch.randn(n, h, d, generator=gen, dtype=torch.float64) for n in lengths]
    values = [torch.randn(n, h, d, generator=gen, dtype=torch.float64) for n in lengths]
    out, lse = simulate_split_decode(q, keys, values, lengths, num_parts, causal, 0.5)
    meta, num_splits = plan(lengths, num_parts)
    if num_parts > 3:
        assert num_splits[-1] > b, "the test should exercise split requests"
    for i in range(b):
        ref_o, ref_lse = attention_ref(q[i], keys[i], values[i], causal, 0.5)
        torch.testing.assert_close(out[i], ref_o, rtol=1e-5, atol=1e-5, msg=f"request {i}")
        torch.testing.assert_close(lse[i], ref_lse, rtol=1e-5, atol=1e-5, msg=f"request {i}")
