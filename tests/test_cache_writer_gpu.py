"""flash_gla.write_kvcache's kernel against its reference on an sm_90 GPU, bit for bit (a copy).

Every case starts from caches of random values with NaN in about 5% of the slots, random
distinct slots with some negative (padding) and some past the cache's end (skipped), and
compares the whole allocation the caches live in: written rows must hold the new bits, every
other row (NaN ones included, and whatever lies around a strided view) its old bits.

Layouts (test_cache_writer.LAYOUTS): inline GLA-2 (2 x 256 + 64), inline MLA (512 + 64), inline
whole rows (rope None), shared-RoPE GLA-2 (256, rope 64), GTA-8 (d 128, rope 64), GTA d 64
(rope 32); bf16 and fp16.
"""

from __future__ import annotations

import pytest
import torch
from helpers import capture_graph
from test_cache_writer import (
    DTYPES,
    LAYOUTS,
    Padding,
    assert_bitwise_equal,
    expected_allocations,
    make_problem,
    copy_problem,
)

import flash_gla

pytestmark = pytest.mark.sm90

NUM_TOKENS = [1, 2, 63, 300, 5000]


def run_and_check(problem, where: str) -> None:
    expected = expected_allocations(problem)
    flash_gla.write_kvcache(*problem.args())
    torch.cuda.synchronize()
    for got, want in zip(problem.allocations(), expected):
        assert_bitwise_equal(got, want, where)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(layout, dtype, num_tokens):
    problem = make_problem(LAYOUTS[layout], num_tokens, DTYPES[dtype], "cuda", seed=num_tokens)
    run_and_check(problem, f"{layout}-{dtype}-T{num_tokens}")


# Views into larger allocations: one layer of several, fewer heads and dims than allocated,
# and offsets in the last dim that leave the rows 16, 8, 4 or 2 bytes aligned (the kernel's
# vector width follows the alignment).
PADDINGS = {
    "layer-slice": Padding(layers=3, layer=2),
    "heads-and-dims": Padding(extra_heads=1, lead=8, tail=8),
    "align8": Padding(lead=4),
    "align4": Padding(lead=2, tail=1),
    "align2": Padding(lead=1),
}


@pytest.mark.parametrize("fused", [False, True], ids=["separate-inputs", "fused-inputs"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_caches_and_inputs(layout, padding, fused):
    problem = make_problem(
        LAYOUTS[layout], 777, torch.bfloat16, "cuda", seed=11, padding=PADDINGS[padding], fused_inputs=fused
    )
    run_and_check(problem, f"{layout}-{padding}-{'fused' if fused else 'separate'}")


@pytest.mark.parametrize("layout", ["gla2-inline", "gta8-d128"])
def test_nothing_to_write(layout):
    """No token, or every slot skipped: the caches keep their bits."""
    for num_tokens, skipped in ((0, 0.0), (100, 1.0)):
        problem = make_problem(LAYOUTS[layout], num_tokens, torch.float16, "cuda", seed=5, skipped=skipped,
                               out_of_range=0.0)
        before = [x.clone() for x in problem.allocations()]
        flash_gla.write_kvcache(*problem.args())
        torch.cuda.synchronize()
        for got, want in zip(problem.allocations(), before):
            assert_bitwise_equal(got, want, f"{layout}-T{num_tokens}")


def test_all_slots_out_of_range_or_huge():
    """Slots far past the end (up to 2**62) and far below 0 write nothing and fault nothing."""
    problem = make_problem(LAYOUTS["mla-inline"], 64, torch.bfloat16, "cuda", seed=6, skipped=0.0, out_of_range=0.0)
    huge = torch.tensor([2**62, 2**40, -(2**62), -(2**31)], dtype=torch.int64)
    problem.slot_mapping[: len(huge)] = huge.cuda()
    run_and_check(problem, "huge-slots")


def test_current_stream_and_device_guard():
    """The write runs on the caller's current stream."""
    problem = make_problem(LAYOUTS["gla2-rope1"], 4000, torch.bfloat16, "cuda", seed=8)
    expected = expected_allocations(problem)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        flash_gla.write_kvcache(*problem.args())
    stream.synchronize()
    for got, want in zip(problem.allocations(), expected):
        assert_bitwise_equal(got, want, "side stream")


@pytest.mark.parametrize("layout", ["gla2-inline", "gla2-rope1", "gta4-d64"])
def test_graph_replay(layout):
    """One captured write, replayed with new tokens and new slots copied into its static inputs."""
    static = make_problem(LAYOUTS[layout], 1000, torch.bfloat16, "cuda", seed=20, num_blocks=40)
    graph, _ = capture_graph(lambda: flash_gla.write_kvcache(*static.args()))
    for seed in (21, 22, 23):
        new = make_problem(LAYOUTS[layout], 1000, torch.bfloat16, "cuda", seed=seed, num_blocks=40)
        for name in ("slot_mapping", "kv", "rope"):
            if getattr(static, name) is not None:
                getattr(static, name).copy_(getattr(new, name))
        expected = expected_allocations(static)
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(static.allocations(), expected):
            assert_bitwise_equal(got, want, f"{layout}-replay-{seed}")


def test_expected_allocations_sees_the_views():
    """The harness itself: a reference copy keeps the view's place in its allocation."""
    problem = make_problem(LAYOUTS["gta8-d128"], 10, torch.bfloat16, "cuda", seed=1, padding=Padding(layers=2, layer=1))
    copy = copy_problem(problem)
    assert copy.kv_cache.data_ptr() - copy.kv_cache_alloc.data_ptr() == (
        problem.kv_cache.data_ptr() - problem.kv_cache_alloc.data_ptr()
    )
