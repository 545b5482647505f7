"""flash_gla.write_kvcache's kernel against its reference on an sm_90 GPU, bit for bit (a copy).

Every case starts from caches of random values with NaN in about 5% of the slots, random
distinct slots with some negative (padding) and some past the cache's end (skipped), and
compares the whole allocation the caches live in: written rows must hold the new bits, every
other row (NaN ones included, and whatever lies around a strided view) its old bits.

Layouts (test_cache_writer.LAYOUTS): inline GLA-2 (2 x 256 + 64), inline MLA (512 + 64), inline
whole rows (rope None), shared-RoPE GLA-2 (256, rope 64), GTA-8 (d 128, rope 64), GTA d 64
(rope 32); bf16 and fp16.

FP8 caches (test_cache_writer.FP8_LAYOUTS: the shared-RoPE layouts, a 320-wide row whose last
scale group is short, a 96-wide one shorter than a group): the kernel quantises bit for bit as
flash_gla.reference.quantize_kv_ref, run on the CPU (e4m3 bytes and float32 scales, zero groups
and groups whose amax / 448 is raised to 2^-126 included: value * (1 / scale), IEEE float32
with subnormals, in both); rows only 4-element aligned take the 4-wide path; non-finite input
raises nothing and turns exactly its own 128-value group into NaN.
"""

from __future__ import annotations

import pytest
import torch
from helpers import capture_graph
from test_cache_writer import (
    DTYPES,
    FP8,
    FP8_LAYOUTS,
    LAYOUTS,
    PAGE,
    Padding,
    assert_bitwise_equal,
    expected_allocations,
    make_problem,
    copy_problem,
)

import flash_gla
from flash_gla.reference import FP8_GROUP, dequantize_kv

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


# ------------------------------------------------------------------------------------------
# FP8 caches: the quantising writer
# ------------------------------------------------------------------------------------------


def run_and_check_on_cpu_reference(problem, where: str) -> None:
    """The kernel's write against the reference's, computed on the CPU (the definition)."""
    expected = expected_allocations(problem, "cpu")
    flash_gla.write_kvcache(*problem.args())
    torch.cuda.synchronize()
    for got, want in zip(problem.allocations(), expected):
        assert_bitwise_equal(got.cpu(), want, where)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", FP8_LAYOUTS)
def test_fp8_matches_reference(layout, dtype, num_tokens):
    problem = make_problem(FP8_LAYOUTS[layout], num_tokens, DTYPES[dtype], "cuda", seed=num_tokens, fp8=True)
    run_and_check_on_cpu_reference(problem, f"fp8-{layout}-{dtype}-T{num_tokens}")


# Views into larger allocations; lead 4 leaves the FP8 rows (and the rope cache's) only 4
# elements aligned: the kernel's 4-wide instance.
FP8_PADDINGS = {
    "layer-slice": Padding(layers=3, layer=2),
    "heads-and-dims": Padding(extra_heads=1, lead=8, tail=8),
    "align4": Padding(lead=4, tail=4),
}


@pytest.mark.parametrize("fused", [False, True], ids=["separate-inputs", "fused-inputs"])
@pytest.mark.parametrize("padding", FP8_PADDINGS)
@pytest.mark.parametrize("layout", ["gla2-rope1", "gta8-d128", "gla1-d320", "gta2-d96"])
def test_fp8_strided_caches_and_inputs(layout, padding, fused):
    problem = make_problem(FP8_LAYOUTS[layout], 777, torch.bfloat16, "cuda", seed=12, padding=FP8_PADDINGS[padding],
                           fused_inputs=fused, fp8=True)
    run_and_check_on_cpu_reference(problem, f"fp8-{layout}-{padding}-{'fused' if fused else 'separate'}")


def test_fp8_every_slot_skipped():
    """Negative and out-of-range slots only: no value, scale or RoPE byte changes."""
    problem = make_problem(FP8_LAYOUTS["gla2-rope1"], 500, torch.bfloat16, "cuda", seed=13, skipped=0.8,
                           out_of_range=0.2, fp8=True)
    problem.slot_mapping[problem.slot_mapping >= 0] = -1
    before = [x.clone() for x in problem.allocations()]
    flash_gla.write_kvcache(*problem.args())
    torch.cuda.synchronize()
    for got, want in zip(problem.allocations(), before):
        assert_bitwise_equal(got, want, "fp8 all skipped")


def written_rows(problem, allocations=None):
    """The FP8 values (as bytes) and scales of the slots the problem's tokens go to, (T, h_kv, d)
    and (T, h_kv, groups), on the CPU; ``allocations`` (the problem's by default) as
    expected_allocations returns them."""
    kv_cache, kv_scale = problem.kv_cache, problem.kv_scale
    if allocations is not None:  # the same views into the other allocations
        kv_alloc, _, scale_alloc = allocations
        kv_cache = kv_alloc.as_strided(kv_cache.shape, kv_cache.stride(), kv_cache.storage_offset())
        kv_scale = scale_alloc.as_strided(kv_scale.shape, kv_scale.stride(), kv_scale.storage_offset())
    slots = problem.slot_mapping.cpu()
    pages, rows = slots // PAGE, slots % PAGE
    return kv_cache.view(torch.uint8).cpu()[pages, rows], kv_scale.cpu()[pages, rows]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_non_finite_input_poisons_only_its_group(dtype):
    """NaN, +inf and -inf in kv: the kernel raises nothing; each such 128-value group reads back
    as NaN everywhere (in the kernel's cache and the reference's), every other group is written
    bit for bit as the reference writes it."""
    problem = make_problem(FP8_LAYOUTS["gla2-rope1"], 300, DTYPES[dtype], "cuda", seed=14, skipped=0.0,
                           out_of_range=0.0, fp8=True)
    poison = {(3, 0, 5): float("nan"), (10, 1, 130): float("inf"), (20, 0, 255): -float("inf"),
              (21, 1, 0): float("nan"), (21, 1, 1): float("inf")}
    for index, value in poison.items():
        problem.kv[index] = value
    bad = torch.zeros(300, 2, 2, dtype=torch.bool)
    for t, j, i in poison:
        bad[t, j, i // FP8_GROUP] = True
    expected = expected_allocations(problem, "cpu")
    flash_gla.write_kvcache(*problem.args())
    torch.cuda.synchronize()
    for name, (values, scales) in {"kernel": written_rows(problem), "reference": written_rows(problem, expected)}.items():
        back = dequantize_kv(values.view(FP8), scales).unflatten(-1, (2, FP8_GROUP))  # (T, h_kv, groups, 128)
        assert bool(back[bad].isnan().all()), f"{name}: a group with a non-finite input is not all NaN"
        assert bool(back[~bad].isfinite().all()), f"{name}: a finite group holds a non-finite value"
    got_values, got_scales = written_rows(problem)
    want_values, want_scales = written_rows(problem, expected)
    finite = ~bad
    assert_bitwise_equal(got_scales[finite], want_scales[finite], "scales of finite groups")
    assert_bitwise_equal(got_values.unflatten(-1, (2, FP8_GROUP))[finite],
                         want_values.unflatten(-1, (2, FP8_GROUP))[finite], "values of finite groups")


@pytest.mark.parametrize("layout", ["gla2-rope1", "gta8-d128"])
def test_fp8_graph_replay(layout):
    """One captured FP8 write, replayed with new tokens and new slots copied into its static inputs."""
    static = make_problem(FP8_LAYOUTS[layout], 1000, torch.bfloat16, "cuda", seed=30, num_blocks=40, fp8=True)
    graph, _ = capture_graph(lambda: flash_gla.write_kvcache(*static.args()))
    for seed in (31, 32, 33):
        new = make_problem(FP8_LAYOUTS[layout], 1000, torch.bfloat16, "cuda", seed=seed, num_blocks=40, fp8=True)
        for name in ("slot_mapping", "kv", "rope"):
            getattr(static, name).copy_(getattr(new, name))
        expected = expected_allocations(static, "cpu")
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(static.allocations(), expected):
            assert_bitwise_equal(got.cpu(), want, f"fp8-{layout}-replay-{seed}")


def test_fp8_round_trip_on_the_gpu():
    """What an engine sees: the cache read back through dequantize_kv is kv within e4m3's precision."""
    problem = make_problem(FP8_LAYOUTS["gla2-rope1"], 2000, torch.bfloat16, "cuda", seed=40, skipped=0.0,
                           out_of_range=0.0, fp8=True)
    flash_gla.write_kvcache(*problem.args())
    torch.cuda.synchronize()
    values, scales = written_rows(problem)
    back = dequantize_kv(values.view(FP8), scales)
    x = problem.kv.float().cpu()
    scale_per_element = scales.repeat_interleave(FP8_GROUP, dim=-1)[..., : x.shape[-1]]
    bound = torch.maximum(2.0**-4 * x.abs(), 2.0**-10 * scale_per_element) * (1 + 2**-20)
    assert bool(((back - x).abs() <= bound).all())
