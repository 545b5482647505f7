"""A host model of the page-turn pipeline's full barriers (hopper/decode/page_loop.cuh, turns).

CPU only. It checks the protocol, not the CUDA code: a producer fills stage ``i % stages`` with
page ``i`` of a CTA's walk once the page ``stages`` back in that stage is released, and the page
lands (its barrier's phase completes) at any later time; the two consumer warpgroups take the
pages of even and of odd request page numbers, each its own in order. An mbarrier wait for
parity P passes while the barrier's current, incomplete phase has the other parity, so a wait
passes early when the barrier is still one phase behind the awaited page. Random schedules over
the scheduler's real piece patterns (scheduler_model.py) look for such an early pass and for a
deadlock.

* One full barrier per stage, shared (the pipeline's): safe within a piece for an even stage
  count, not across piece boundaries, and with three stages (FP8 GLA) a page can pass early.
* One full barrier per warpgroup and stage (Traits::kTurnBarriers): no early pass, no deadlock.
"""

import random

from scheduler_model import num_pages, pieces, plan


class Barrier:
    """An mbarrier's phases: ``completed`` counts the completed ones."""

    def __init__(self):
        self.completed = 0

    def passes(self, parity: int) -> bool:
        return (self.completed & 1) != parity


def walk_pages(part_pieces) -> list[int]:
    """The request page numbers of a CTA's walk, piece after piece."""
    return [page for piece in part_pieces for page in range(piece.page_begin, piece.page_end)]


def run_schedule(pages: list[int], stages: int, own_barriers: bool, rng: random.Random) -> str:
    """One random interleaving; returns "ok", "early" (a wait passed before its page landed) or
    "deadlock"."""
    n = len(pages)
    owner = [page & 1 for page in pages]
    released = [False] * n
    landed = [False] * n
    barriers = {}

    def barrier(i):
        key = (owner[i], i % stages) if own_barriers else i % stages
        return barriers.setdefault(key, Barrier())

    issued = 0
    in_flight = []  # issued, not landed
    todo = [[i for i in range(n) if owner[i] == wg] for wg in (0, 1)]
    phases = [[0] * stages for _ in (0, 1)]  # own_barriers: each warpgroup's phase bit per stage
    while any(todo):
        actions = []
        if issued < n and (issued < stages or released[issued - stages]):
            actions.append(("issue", None))
        actions += [("land", i) for i in in_flight]
        for wg in (0, 1):
            if todo[wg]:
                i = todo[wg][0]
                parity = phases[wg][i % stages] if own_barriers else (i // stages) & 1
                if barrier(i).passes(parity):
                    actions.append(("take", wg))
        if not actions:
            return "deadlock"
        kind, arg = rng.choice(actions)
        if kind == "issue":
            in_flight.append(issued)
            issued += 1
        elif kind == "land":
            in_flight.remove(arg)
            landed[arg] = True
            barrier(arg).completed += 1
        else:
            i = todo[arg].pop(0)
            if not landed[i]:
                return "early"
            phases[arg][i % stages] ^= 1
            released[i] = True
    return "ok"


def random_walks(rng: random.Random, count: int):
    """CTA walks of random batches as the scheduler cuts them (lengths from 0 to ~40 pages)."""
    for _ in range(count):
        seqlens = [rng.choice([0, 1, 63, 64, 65, 200, 700, 2600]) + rng.randrange(64) for _ in range(rng.randint(1, 12))]
        num_parts = rng.randint(1, 8)
        meta, num_splits = plan(seqlens, num_parts)
        by_part = {}
        for piece in pieces(meta, num_splits, seqlens):
            by_part.setdefault(piece.part, []).append(piece)
        for part_pieces in by_part.values():
            pages = walk_pages(part_pieces)
            if pages:
                yield pages


def test_own_barriers_never_pass_early_nor_deadlock():
    rng = random.Random(5)
    walks = 0
    for stages in (2, 3, 4):
        for pages in random_walks(rng, 60):
            walks += 1
            for _ in range(20):
                assert run_schedule(pages, stages, True, rng) == "ok", (stages, pages)
    assert walks > 100


def test_shared_barriers_with_an_even_stage_count_are_safe_within_a_piece():
    rng = random.Random(6)
    for stages in (2, 4, 8):
        for begin, count in [(0, 9), (1, 9), (3, 40), (0, 1), (5, 2)]:
            pages = list(range(begin, begin + count))
            for _ in range(200):
                assert run_schedule(pages, stages, False, rng) == "ok", (stages, begin, count)


def test_shared_barriers_with_three_stages_pass_early():
    """What kTurnBarriers removes: with three stages a page can be taken before it lands."""
    rng = random.Random(7)
    pages = list(range(num_pages(64 * 12)))
    outcomes = {run_schedule(pages, 3, False, rng) for _ in range(400)}
    assert "early" in outcomes


def test_shared_barriers_pass_early_across_pieces():
    """... and with an even stage count, where a piece ends on the warpgroup that takes the next
    piece's first page (pages 40 | 0, 1, 0)."""
    rng = random.Random(8)
    pages = [38, 39, 40, 0, 1, 0, 1, 2, 3]
    outcomes = {run_schedule(pages, 4, False, rng) for _ in range(2000)}
    assert "early" in outcomes
