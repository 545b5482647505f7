"""flash_gla.write_kvcache on CPU: its input checks and its reference (no GPU, no extension).

* The reference (``flash_gla.reference.write_kvcache_ref``) against a naive per-token loop,
  for every layout, with negative and out-of-range slots skipped and untouched rows (random,
  some NaN) left bitwise unchanged.
* Every bad input gets a Python exception naming the argument, the expected and the actual
  value. The device check runs last, so a valid set of CPU inputs fails only with it.
* The FP8 layout: quantize_kv_ref / dequantize_kv round trip within e4m3's
  precision, scales (amax / 448, at least 2^-126, 1 for zero groups, one per 128 values), saturation,
  non-finite groups; the FP8 writer reference against a naive per-group loop; the reference
  decode on an FP8 cache equals the decode on its dequantised values.

The problem builder here (layouts, poisoned caches, strided views, FP8 caches with their
scales) also serves test_cache_writer_gpu.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

import flash_gla
from flash_gla.reference import (
    FP8_E4M3_MAX,
    FP8_GROUP,
    FP8_MIN_SCALE,
    dequantize_kv,
    gla_with_kvcache_ref,
    gta_with_kvcache_ref,
    quantize_kv_ref,
    write_kvcache_ref,
)

PAGE = 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class Layout:
    """A cache layout of the decode ops, as write_kvcache fills it."""

    name: str
    h_kv: int
    d_kv: int  # dims of kv per head
    d_rope: int  # dims of rope per token; 0: rope is None (kv holds whole rows)
    shared_rope: bool  # rope goes to a rope_cache (num_blocks, 64, 1, d_rope), else inline

    @property
    def cache_dim(self) -> int:
        return self.d_kv if self.shared_rope else self.d_kv + self.d_rope


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("gla2-inline", h_kv=2, d_kv=256, d_rope=64, shared_rope=False),
        Layout("mla-inline", h_kv=1, d_kv=512, d_rope=64, shared_rope=False),
        Layout("gla2-rows", h_kv=2, d_kv=320, d_rope=0, shared_rope=False),
        Layout("gla2-rope1", h_kv=2, d_kv=256, d_rope=64, shared_rope=True),
        Layout("gta8-d128", h_kv=8, d_kv=128, d_rope=64, shared_rope=True),
        Layout("gta4-d64", h_kv=4, d_kv=64, d_rope=32, shared_rope=True),
    )
}

# The FP8 cache's layouts (RoPE stored once only): the shared-RoPE ones above, a row whose last
# scale group is short (320 = 128 + 128 + 64) and one shorter than a group, of 12 vectors.
FP8_LAYOUTS = {
    **{name: layout for name, layout in LAYOUTS.items() if layout.shared_rope},
    **{
        layout.name: layout
        for layout in (
            Layout("gla1-d320", h_kv=1, d_kv=320, d_rope=64, shared_rope=True),
            Layout("gta2-d96", h_kv=2, d_kv=96, d_rope=32, shared_rope=True),
        )
    },
}


@dataclass(frozen=True)
class Padding:
    """Where a cache view lies in a larger allocation (all zero: the cache is the allocation).

    The allocation is (layers, num_blocks, 64, h_kv + extra_heads, lead + d + tail); the cache
    is ``[layer, :, :, :h_kv, lead:lead + d]``. The rope cache likewise, with one extra head
    slot in front of its single one when ``extra_heads``."""

    layers: int = 1
    layer: int = 0
    extra_heads: int = 0
    lead: int = 0
    tail: int = 0


@dataclass
class Problem:
    """One write_kvcache call's tensors; the caches are views into ``*_alloc``."""

    layout: Layout
    kv_cache: torch.Tensor
    slot_mapping: torch.Tensor
    kv: torch.Tensor
    rope: torch.Tensor | None
    rope_cache: torch.Tensor | None
    kv_cache_alloc: torch.Tensor
    rope_cache_alloc: torch.Tensor | None
    kv_scale: torch.Tensor | None = None  # an FP8 cache's scales, a view into kv_scale_alloc
    kv_scale_alloc: torch.Tensor | None = None

    def args(self) -> tuple:
        return self.kv_cache, self.slot_mapping, self.kv, self.rope, self.rope_cache, self.kv_scale

    def allocations(self) -> list[torch.Tensor]:
        return [x for x in (self.kv_cache_alloc, self.rope_cache_alloc, self.kv_scale_alloc) if x is not None]


def poisoned_cache(shape, padding: Padding, dtype, device, gen, nan_rows: torch.Tensor):
    """(allocation, view): random values, NaN in the slots ``nan_rows`` of every layer (an FP8
    cache's NaN is its byte 0x7f)."""
    num_blocks, page, heads, dim = shape
    alloc_shape = (padding.layers, num_blocks, page, heads + padding.extra_heads, padding.lead + dim + padding.tail)
    alloc = torch.randn(alloc_shape, generator=gen)
    flat = alloc.view(padding.layers, num_blocks * page, *alloc_shape[3:])
    flat[:, nan_rows] = float("nan")
    alloc = alloc.to(dtype).to(device)
    view = alloc[padding.layer, :, :, :heads, padding.lead : padding.lead + dim]
    return alloc, view


def vary_groups(kv: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """kv (T, h_kv, d) float32 with every 128-value group scaled by its own power of two (FP8
    scales far apart), about 5% of the groups zero and, where the dtype reaches that far
    (bf16), about 5% of bf16 subnormals, whose amax / 448 is raised to the smallest scale 2^-126."""
    t, h, d = kv.shape
    groups = -(-d // FP8_GROUP)
    exponent = torch.randint(-12, 8, (t, h, groups), generator=gen).float()
    fate = torch.rand(t, h, groups, generator=gen)
    factor = torch.exp2(exponent).masked_fill(fate < 0.05, 0.0)
    factor = torch.where((fate >= 0.05) & (fate < 0.1), torch.full_like(factor, 2.0**-130), factor)
    return kv * factor.repeat_interleave(FP8_GROUP, dim=-1)[..., :d]


def make_problem(
    layout: Layout,
    num_tokens: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    seed: int = 0,
    *,
    num_blocks: int | None = None,
    skipped: float = 0.1,
    out_of_range: float = 0.02,
    padding: Padding = Padding(),
    fused_inputs: bool = False,
    fp8: bool = False,
) -> Problem:
    """A random problem: distinct random slots, a share ``skipped`` of them negative and a share
    ``out_of_range`` at or past the cache's end; caches of random values with NaN in about 5% of
    the slots (written ones and others). ``fused_inputs``: kv and rope are slices of one
    (T, h_kv * d_kv + d_rope) projection output (strided, as vLLM's ``kv_c`` / ``k_pe``).
    ``fp8``: kv_cache is float8_e4m3fn with a (poisoned) kv_scale laid out like it, ``dtype`` is
    the tokens' (and rope_cache's), and kv's groups have magnitudes far apart (vary_groups).
    Drawn on the CPU from ``seed`` (the same values on every device), views made on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    if num_blocks is None:
        num_blocks = -(-num_tokens * 5 // (4 * PAGE)) + 2  # spare pages that nothing writes
    num_slots = num_blocks * PAGE
    assert num_tokens < num_slots
    nan_rows = torch.randperm(num_slots, generator=gen)[: max(1, num_slots // 20)]
    kv_alloc, kv_cache = poisoned_cache(
        (num_blocks, PAGE, layout.h_kv, layout.cache_dim), padding, FP8 if fp8 else dtype, device, gen, nan_rows
    )
    scale_alloc = kv_scale = None
    if fp8:
        assert layout.shared_rope, "FP8 caches store the RoPE key once"
        scale_shape = (num_blocks, PAGE, layout.h_kv, -(-layout.cache_dim // FP8_GROUP))
        scale_alloc, kv_scale = poisoned_cache(scale_shape, padding, torch.float32, device, gen, nan_rows)
    rope_alloc = rope_cache = None
    if layout.shared_rope:
        rope_alloc, rope_cache = poisoned_cache(
            (num_blocks, PAGE, 1, layout.d_rope), padding, dtype, device, gen, nan_rows
        )

    slots = torch.randperm(num_slots - 1, generator=gen)[:num_tokens]
    if num_tokens >= 3:
        slots[2] = num_slots - 1  # the last slot (distinct: the permutation left it out)
    fate = torch.rand(num_tokens, generator=gen)
    negative = fate < skipped
    beyond = (fate >= skipped) & (fate < skipped + out_of_range)
    slots[negative] = -1 - torch.randint(0, 1000, (int(negative.sum()),), generator=gen)
    slots[beyond] = num_slots + torch.randint(0, 2**40, (int(beyond.sum()),), generator=gen)
    if num_tokens >= 2 and skipped > 0:
        slots[0] = -1  # vLLM's padding value
    if num_tokens >= 2 and out_of_range > 0:
        slots[1] = num_slots  # the first slot past the end
    kv_width = layout.h_kv * layout.d_kv

    def new_kv(x: torch.Tensor) -> torch.Tensor:  # (T, h_kv * d_kv) float32 -> kv in dtype, on device
        x = x.view(num_tokens, layout.h_kv, layout.d_kv)
        return (vary_groups(x, gen) if fp8 else x).to(dtype).to(device)

    if fused_inputs:
        fused = torch.randn(num_tokens, kv_width + layout.d_rope, generator=gen)
        fused = torch.cat([new_kv(fused[:, :kv_width]).flatten(1).cpu(), fused[:, kv_width:].to(dtype)], dim=1)
        fused = fused.to(dtype).to(device)
        kv = fused[:, :kv_width].view(num_tokens, layout.h_kv, layout.d_kv)
        rope = fused[:, kv_width:] if layout.d_rope else None
    else:
        kv = new_kv(torch.randn(num_tokens, kv_width, generator=gen))
        rope = torch.randn(num_tokens, layout.d_rope, generator=gen).to(dtype).to(device) if layout.d_rope else None
    return Problem(layout, kv_cache, slots.to(device), kv, rope, rope_cache, kv_alloc, rope_alloc, kv_scale,
                   scale_alloc)


def copy_problem(problem: Problem, device: str | None = None) -> Problem:
    """A copy of the problem in new memory (on ``device``, by default the problem's), the caches
    still views into their copied allocations at the same place (kv and rope may come out
    contiguous)."""

    def copy_view(view, alloc):
        if view is None:
            return None, None
        copied = alloc.to(device or alloc.device, copy=True)
        offset = view.storage_offset() - alloc.storage_offset()
        return copied.as_strided(view.shape, view.stride(), copied.storage_offset() + offset), copied

    kv_cache, kv_alloc = copy_view(problem.kv_cache, problem.kv_cache_alloc)
    rope_cache, rope_alloc = copy_view(problem.rope_cache, problem.rope_cache_alloc)
    kv_scale, scale_alloc = copy_view(problem.kv_scale, problem.kv_scale_alloc)
    inputs = (problem.slot_mapping, problem.kv, problem.rope)
    slot_mapping, kv, rope = (None if x is None else x.to(device or x.device, copy=True) for x in inputs)
    return Problem(problem.layout, kv_cache, slot_mapping, kv, rope, rope_cache, kv_alloc, rope_alloc, kv_scale,
                   scale_alloc)


def expected_allocations(problem: Problem, device: str | None = None) -> list[torch.Tensor]:
    """The allocations after the reference writes the problem into copies of them (on
    ``device``, by default the problem's)."""
    copy = copy_problem(problem, device)
    write_kvcache_ref(*copy.args())
    return copy.allocations()


def assert_bitwise_equal(got: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    """Same bits (NaN included), else the first differing index and both values."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, (where, got.shape, expected.shape)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
    differ = got.view(bits) != expected.view(bits)
    if differ.any():
        first = tuple(int(i) for i in differ.nonzero()[0])
        raise AssertionError(
            f"{where}: {int(differ.sum())} elements differ, first at {first}: got {got[first].float().item()}, "
            f"expected {expected[first].float().item()}"
        )


def naive_write(kv_cache, slot_mapping, kv, rope=None, rope_cache=None, kv_scale=None) -> None:
    """write_kvcache's definition, one token and one head (FP8: one 128-value group) at a time."""
    num_slots = kv_cache.shape[0] * PAGE
    for t, slot in enumerate(slot_mapping.tolist()):
        if not 0 <= slot < num_slots:
            continue
        page, row = divmod(slot, PAGE)
        for j in range(kv.shape[1]):
            inline_rope = rope is not None and rope_cache is None
            if kv_scale is not None:
                for g, start in enumerate(range(0, kv.shape[2], FP8_GROUP)):
                    values, scale = naive_quantize(kv[t, j, start : start + FP8_GROUP])
                    kv_cache.view(torch.uint8)[page, row, j, start : start + FP8_GROUP] = values.view(torch.uint8)
                    kv_scale[page, row, j, g] = scale
            else:
                kv_cache[page, row, j] = torch.cat([kv[t, j], rope[t]]) if inline_rope else kv[t, j]
        if rope_cache is not None:
            rope_cache[page, row, 0] = rope[t]


def naive_quantize(group: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One group's e4m3 values and scale, element by element: amax / 448, at least 2^-126 (1 if
    the group is zero), value * (1 / scale) in float32, clamped to +-448, then rounded by
    torch's conversion."""
    x = [torch.tensor(v, dtype=torch.float32) for v in group.float().tolist()]
    amax = max((abs(v) for v in x), key=float)
    scale = torch.tensor(1.0) if float(amax) == 0 else torch.clamp(amax / torch.tensor(FP8_E4M3_MAX),
                                                                   min=FP8_MIN_SCALE)
    inv = torch.tensor(1.0) / scale
    values = torch.stack([torch.clamp(v * inv, -FP8_E4M3_MAX, FP8_E4M3_MAX) for v in x]).to(FP8)
    return values, float(scale)


# ------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_matches_naive_loop(layout, dtype):
    problem = make_problem(LAYOUTS[layout], 150, DTYPES[dtype], seed=3)
    expected = copy_problem(problem)
    naive_write(*expected.args())
    write_kvcache_ref(*problem.args())
    for got, want in zip(problem.allocations(), expected.allocations()):
        assert_bitwise_equal(got, want, f"{layout}-{dtype}")


@pytest.mark.parametrize(
    "padding",
    [Padding(layers=3, layer=1), Padding(extra_heads=1, lead=8, tail=3), Padding(lead=1)],
    ids=["layer-slice", "heads-and-dims", "misaligned"],
)
@pytest.mark.parametrize("layout", ["gla2-inline", "gta8-d128"])
def test_reference_on_strided_cache_and_fused_inputs(layout, padding):
    """Only the view's written rows change; the rest of the allocation keeps its bits."""
    problem = make_problem(LAYOUTS[layout], 100, seed=4, padding=padding, fused_inputs=True)
    assert problem.kv_cache.numel() < problem.kv_cache_alloc.numel() and not problem.kv.is_contiguous()
    expected = copy_problem(problem)
    naive_write(*expected.args())
    write_kvcache_ref(*problem.args())
    for got, want in zip(problem.allocations(), expected.allocations()):
        assert_bitwise_equal(got, want, layout)


def test_reference_writes_exactly_the_valid_slots():
    """Rows of valid slots hold the new values; every other row (NaN ones included) is unchanged;
    negative and out-of-range slots write nothing."""
    layout = LAYOUTS["gla2-inline"]
    problem = make_problem(layout, 200, seed=5, skipped=0.3, out_of_range=0.2)
    before = problem.kv_cache.clone()
    write_kvcache_ref(*problem.args())
    num_slots = problem.kv_cache.shape[0] * PAGE
    slots = problem.slot_mapping
    valid = (slots >= 0) & (slots < num_slots)
    assert 0 < int(valid.sum()) < len(slots) and bool((slots >= num_slots).any()) and bool((slots < 0).any())
    flat, flat_before = problem.kv_cache.reshape(num_slots, layout.h_kv, -1), before.reshape(num_slots, layout.h_kv, -1)
    written = torch.zeros(num_slots, dtype=torch.bool)
    written[slots[valid]] = True
    assert_bitwise_equal(flat[~written], flat_before[~written], "untouched rows")
    new_rows = torch.cat([problem.kv, problem.rope[:, None].expand(-1, layout.h_kv, -1)], dim=-1)[valid]
    assert_bitwise_equal(flat[slots[valid]], new_rows, "written rows")


def test_reference_all_slots_skipped_and_empty():
    problem = make_problem(LAYOUTS["gta8-d128"], 20, seed=6, skipped=1.0, out_of_range=0.0)
    before = [x.clone() for x in problem.allocations()]
    write_kvcache_ref(*problem.args())
    empty = make_problem(LAYOUTS["gta8-d128"], 0, seed=6)
    empty_before = [x.clone() for x in empty.allocations()]
    write_kvcache_ref(*empty.args())
    for got, want in zip(problem.allocations() + empty.allocations(), before + empty_before):
        assert_bitwise_equal(got, want, "nothing written")


def test_exported():
    assert flash_gla.write_kvcache is flash_gla.cache_writer.write_kvcache
    assert "write_kvcache" in flash_gla.__all__
    assert flash_gla.reference.write_kvcache_ref is write_kvcache_ref


# ------------------------------------------------------------------------------------------
# Input checks (CPU tensors: every check but the device one is reachable)
# ------------------------------------------------------------------------------------------

DEVICE_ERROR = "kv_cache must be a CUDA tensor"


def small_problem(layout="gla2-inline", **kwargs) -> Problem:
    return make_problem(LAYOUTS[layout], 8, seed=7, num_blocks=2, **kwargs)


def call(problem: Problem, **overrides):
    args = dict(zip(("kv_cache", "slot_mapping", "kv", "rope", "rope_cache", "kv_scale"), problem.args()))
    args.update(overrides)
    flash_gla.write_kvcache(**args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_valid_cpu_inputs_reach_device_check(layout):
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call(small_problem(layout))


def test_valid_empty_and_strided_inputs_reach_device_check():
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call(make_problem(LAYOUTS["gla2-rope1"], 0, num_blocks=1))
    strided = small_problem("gla2-inline", padding=Padding(layers=2, layer=1, extra_heads=1, lead=8), fused_inputs=True)
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call(strided)


INLINE = small_problem("gla2-inline")
SHARED = small_problem("gta8-d128")
BF16, FP16 = torch.bfloat16, torch.float16

# (id, problem, overrides, exception, every fragment the message must contain)
BAD_INPUTS = [
    ("kv_cache-list", INLINE, dict(kv_cache=[1, 2]), TypeError, ["kv_cache must be a torch.Tensor", "got list"]),
    ("slot_mapping-list", INLINE, dict(slot_mapping=[0, 1]), TypeError,
     ["slot_mapping must be a torch.Tensor", "int64", "got list"]),
    ("kv-none", INLINE, dict(kv=None), TypeError, ["kv must be a torch.Tensor", "got NoneType"]),
    ("rope-list", INLINE, dict(rope=[[0.0]]), TypeError, ["rope must be a torch.Tensor", "got list"]),
    ("rope_cache-tuple", SHARED, dict(rope_cache=(1,)), TypeError, ["rope_cache must be a torch.Tensor", "got tuple"]),
    ("rope_cache-without-rope", SHARED, dict(rope=None), TypeError,
     ["rope must be a torch.Tensor", "required with a rope_cache", "got NoneType"]),
    ("kv_cache-float32", INLINE, dict(kv_cache=INLINE.kv_cache.float()), TypeError,
     ["kv_cache.dtype must be torch.bfloat16 or torch.float16", "got torch.float32"]),
    ("kv_cache-e5m2", SHARED, dict(kv_cache=SHARED.kv_cache.to(torch.float8_e5m2)), TypeError,
     ["kv_cache.dtype must be torch.bfloat16 or torch.float16 or torch.float8_e4m3fn", "got torch.float8_e5m2"]),
    ("slot_mapping-int32", INLINE, dict(slot_mapping=INLINE.slot_mapping.int()), TypeError,
     ["slot_mapping.dtype must be torch.int64", "got torch.int32"]),
    ("kv-fp16", INLINE, dict(kv=INLINE.kv.to(FP16)), TypeError,
     ["kv.dtype must be torch.bfloat16 (kv_cache's dtype)", "got torch.float16"]),
    ("rope-fp16", INLINE, dict(rope=INLINE.rope.to(FP16)), TypeError,
     ["rope.dtype must be torch.bfloat16 (kv_cache's dtype)", "got torch.float16"]),
    ("rope_cache-fp16", SHARED, dict(rope_cache=SHARED.rope_cache.to(FP16)), TypeError,
     ["rope_cache.dtype must be torch.bfloat16 (kv_cache's dtype)", "got torch.float16"]),
    ("kv_cache-3d", INLINE, dict(kv_cache=INLINE.kv_cache[0]), ValueError, ["kv_cache must be 4-D", "got 3-D"]),
    ("slot_mapping-2d", INLINE, dict(slot_mapping=INLINE.slot_mapping[None]), ValueError,
     ["slot_mapping must be 1-D", "got 2-D"]),
    ("kv-2d", INLINE, dict(kv=INLINE.kv[:, 0]), ValueError, ["kv must be 3-D", "got 2-D"]),
    ("rope-3d", INLINE, dict(rope=INLINE.rope[:, None]), ValueError, ["rope must be 2-D", "got 3-D"]),
    ("rope_cache-3d", SHARED, dict(rope_cache=SHARED.rope_cache[:, :, 0]), ValueError,
     ["rope_cache must be 4-D", "got 3-D"]),
    ("page-size-32", INLINE, dict(kv_cache=INLINE.kv_cache[:, :32]), ValueError,
     ["kv_cache.shape[1] (page size) must be 64", "got 32"]),
    ("no-blocks", INLINE, dict(kv_cache=INLINE.kv_cache[:0]), ValueError,
     ["kv_cache.shape[0] (num_blocks) must be >= 1", "got 0"]),
    ("kv-tokens", INLINE, dict(kv=INLINE.kv[:5]), ValueError, ["kv.shape[:2] must be (T, h_kv) = (8, 2)", "got (5, 2)"]),
    ("kv-heads", INLINE, dict(kv=INLINE.kv[:, :1]), ValueError, ["kv.shape[:2] must be (T, h_kv) = (8, 2)", "got (8, 1)"]),
    ("rope-tokens", INLINE, dict(rope=INLINE.rope[:7]), ValueError,
     ["rope.shape[0] must equal slot_mapping.shape[0] (T) = 8", "got 7"]),
    ("inline-width", INLINE, dict(rope=INLINE.rope[:, :32]), ValueError,
     ["kv_cache.shape[3] must equal kv.shape[2] + rope.shape[1]", "= 288", "got 320"]),
    ("whole-rows-width", INLINE, dict(rope=None), ValueError,
     ["kv_cache.shape[3] must equal kv.shape[2] = 256", "rope is None", "got 320"]),
    ("rope_cache-blocks", SHARED, dict(rope_cache=SHARED.rope_cache[:1]), ValueError,
     ["rope_cache.shape must be (num_blocks, 64, 1, d_rope) = (2, 64, 1, 64)", "got (1, 64, 1, 64)"]),
    ("rope_cache-heads", SHARED, dict(rope_cache=SHARED.rope_cache.expand(-1, -1, 2, -1)), ValueError,
     ["rope_cache.shape must be (num_blocks, 64, 1, d_rope) = (2, 64, 1, 64)", "got (2, 64, 2, 64)"]),
    ("rope_cache-d_rope", SHARED, dict(rope=SHARED.rope[:, :32]), ValueError,
     ["rope_cache.shape must be (num_blocks, 64, 1, d_rope) = (2, 64, 1, 32)", "got (2, 64, 1, 64)"]),
    ("shared-kv-width", SHARED, dict(kv=SHARED.kv[..., :64]), ValueError,
     ["kv_cache.shape[3] must equal kv.shape[2] (d_kv) = 64 with a rope_cache", "got 128"]),
    ("kv-empty-rows", INLINE, dict(kv=INLINE.kv[..., :0], rope=torch.zeros(8, 320, dtype=BF16)), ValueError,
     ["kv.shape[2] (d_kv) must be >= 1", "got 0"]),
    ("kv_cache-last-stride", INLINE, dict(kv_cache=INLINE.kv_cache.transpose(2, 3).contiguous().transpose(2, 3)),
     ValueError, ["kv_cache.stride(-1) must be 1", "got 2"]),
    ("kv-last-stride", INLINE, dict(kv=INLINE.kv.transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     ["kv.stride(-1) must be 1", "got 2"]),
    ("rope-last-stride", INLINE, dict(rope=INLINE.rope.t().contiguous().t()), ValueError,
     ["rope.stride(-1) must be 1", "got 8"]),
    ("rope_cache-last-stride", SHARED,
     dict(rope_cache=SHARED.rope_cache.transpose(1, 3).contiguous().transpose(1, 3)), ValueError,
     ["rope_cache.stride(-1) must be 1", "got 64"]),
    ("kv_scale", INLINE, dict(kv_scale=torch.ones(1)), ValueError,
     ["kv_scale must be None with a torch.bfloat16 kv_cache", "scales of an FP8 kv_cache", "got a Tensor"]),
    ("kv_scale-float", INLINE, dict(kv_scale=1.0), ValueError, ["kv_scale must be None", "got 1.0"]),
]


@pytest.mark.parametrize(
    "problem, overrides, error, fragments", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_is_named(problem, overrides, error, fragments):
    with pytest.raises(error) as info:
        call(problem, **overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_fp16_problem_names_fp16():
    problem = make_problem(LAYOUTS["gla2-inline"], 8, FP16, seed=8, num_blocks=2)
    with pytest.raises(TypeError, match=re.escape("kv.dtype must be torch.float16 (kv_cache's dtype), got torch.bfloat16")):
        call(problem, kv=problem.kv.to(BF16))
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call(problem)


# ------------------------------------------------------------------------------------------
# The FP8 layout: quantisation, dequantisation, the writer's reference, the decode reference
# ------------------------------------------------------------------------------------------

E4M3_REL_ERROR = 2.0**-4  # e4m3 keeps 3 mantissa bits: rounding to nearest is off by <= 2^-4 relative
E4M3_SUBNORMAL_ERROR = 2.0**-10  # half the spacing of e4m3's subnormals (2^-9), in units of the scale


def group_amax(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., ceil(d / 128)): each 128-value group's largest |value|, one group at a time."""
    return torch.stack([x[..., g : g + FP8_GROUP].float().abs().amax(dim=-1)
                        for g in range(0, x.shape[-1], FP8_GROUP)], dim=-1)


@pytest.mark.parametrize("d", [64, 96, 128, 256, 320, 576])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_quantize_round_trip_within_e4m3_precision(dtype, d):
    """Every element comes back within e4m3's rounding of value / scale: 2^-4 of itself (normal
    range) or 2^-10 of its group's scale (subnormal range), so within 2^-4 of the group's amax."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(40, 3, d, generator=gen)
    exponents = {"bf16": (-30, 30), "fp16": (-8, 8), "fp32": (-60, 60)}[dtype]
    x = vary_scales(x, gen, exponents)
    x = x.to({"fp32": torch.float32, **DTYPES}[dtype])
    values, scales = quantize_kv_ref(x)
    assert values.dtype == FP8 and tuple(values.shape) == tuple(x.shape)
    assert scales.dtype == torch.float32 and tuple(scales.shape) == (40, 3, -(-d // FP8_GROUP))
    back = dequantize_kv(values, scales)
    assert back.dtype == torch.float32
    error = (back - x.float()).abs()
    scale_per_element = scales.repeat_interleave(FP8_GROUP, dim=-1)[..., :d]
    bound = torch.maximum(E4M3_REL_ERROR * x.float().abs(), E4M3_SUBNORMAL_ERROR * scale_per_element)
    worst = (error - bound * (1 + 2**-20)).argmax()
    assert bool((error <= bound * (1 + 2**-20)).all()), (
        f"{dtype}-d{d}: worst element {tuple(int(i) for i in torch.unravel_index(worst, x.shape))}: value "
        f"{x.flatten()[worst].item()}, back {back.flatten()[worst].item()}, bound {bound.flatten()[worst].item()}"
    )
    amax = group_amax(x).repeat_interleave(FP8_GROUP, dim=-1)[..., :d]
    assert bool((error <= E4M3_REL_ERROR * amax * (1 + 2**-20)).all())


def vary_scales(x: torch.Tensor, gen: torch.Generator, exponents: tuple[int, int]) -> torch.Tensor:
    """x (..., d) with each 128-value group scaled by its own power of two in 2^exponents."""
    groups = -(-x.shape[-1] // FP8_GROUP)
    factor = torch.exp2(torch.randint(*exponents, (*x.shape[:-1], groups), generator=gen).float())
    return x * factor.repeat_interleave(FP8_GROUP, dim=-1)[..., : x.shape[-1]]


def test_scale_layout_one_per_group():
    """kv_scale[..., g] = amax / 448 of values 128 g .. 128 g + 127 (the last group of 320 holds 64)."""
    x = torch.randn(5, 2, 320, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    x[..., :128] *= 1000.0
    x[..., 256:] *= 1e-3
    _, scales = quantize_kv_ref(x.to(torch.bfloat16))
    expected = group_amax(x.to(torch.bfloat16)) / torch.tensor(FP8_E4M3_MAX)
    assert_bitwise_equal(scales, expected, "scales")
    assert bool((scales[..., 0] > 1.0).all()) and bool((scales[..., 2] < 1e-4).all())


def test_group_max_maps_to_448_saturated():
    """A group's largest magnitude becomes +-448 (e4m3's largest finite, bytes 0x7e / 0xfe),
    never NaN, also where value * (1 / scale) rounds above 448 (saturated)."""
    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(2))
    values, scales = quantize_kv_ref(x)
    top = values.float().abs().unflatten(-1, (2, FP8_GROUP)).amax(dim=-1)
    assert bool((top == FP8_E4M3_MAX).all()) and not bool(values.float().isnan().any())
    inv = 1.0 / scales
    above = (x.unflatten(-1, (2, FP8_GROUP)).abs().amax(dim=-1) * inv) > FP8_E4M3_MAX
    assert bool(above.any())  # the draw holds groups that only the saturation keeps at 448


def test_tiny_groups_get_the_smallest_normal_scale():
    """amax / 448 below 2^-126 is raised to 2^-126 (1 / scale stays finite: no inf * 0 = NaN),
    values still scaled by 2^126; bf16 subnormal values are kept, not flushed to zero."""
    x = torch.zeros(3, 128)
    x[0] = 2.0**-133  # bf16's smallest subnormal everywhere: amax / 448 is a float32 subnormal
    x[1, 0], x[1, 1] = 2.0**-120, 2.0**-133  # amax / 448 = 2^-128.8 -> 2^-126; 2^-133 * 2^126 = 2^-7
    x[2, 0], x[2, 1] = 2.0**-130, -(2.0**-131)
    values, scales = quantize_kv_ref(x.to(torch.bfloat16))
    assert scales.flatten().tolist() == [FP8_MIN_SCALE] * 3
    back = dequantize_kv(values, scales)
    assert torch.equal(back, x)  # every value here is a power of two within e4m3's range once scaled


def test_zero_groups_get_scale_one():
    x = torch.zeros(3, 2, 256, dtype=torch.bfloat16)
    x[0, 0, 128:] = torch.randn(128).to(torch.bfloat16)  # one live group beside zero ones
    x[1, 1, :128] = -0.0
    values, scales = quantize_kv_ref(x)
    assert not bool(scales.isnan().any())
    live = torch.zeros_like(scales, dtype=torch.bool)
    live[0, 0, 1] = True
    assert bool((scales[~live] == 1.0).all()) and scales[0, 0, 1].item() != 1.0
    back = dequantize_kv(values, scales)
    assert bool((back[..., :128] == 0).all()) and bool((back[1:] == 0).all())
    assert bool((values.view(torch.uint8)[1, 1, :128] == 0x80).all())  # -0 stays -0


def test_non_finite_groups_dequantise_to_nan():
    """A NaN or an infinity poisons its own group (scale NaN or inf: every value reads back as
    NaN) and no other."""
    x = torch.randn(4, 1, 256, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    x[0, 0, 5] = float("nan")
    x[1, 0, 200] = float("inf")
    x[2, 0, 0] = -float("inf")
    values, scales = quantize_kv_ref(x)
    back = dequantize_kv(values, scales)
    bad = [(0, 0), (1, 1), (2, 0)]  # (token, group)
    for t, g in bad:
        assert bool(back[t, 0, g * 128 : (g + 1) * 128].isnan().all()), (t, g)
    good = torch.ones(4, 2, dtype=torch.bool)
    for t, g in bad:
        good[t, g] = False
    assert bool(back.unflatten(-1, (2, 128))[:, 0][good].isfinite().all())


def test_dequantize_matches_definition():
    """Element i of a row is kv_cache[..., i] * kv_scale[..., i // 128]."""
    gen = torch.Generator().manual_seed(4)
    cache = (torch.randn(2, 64, 2, 320, generator=gen) * 100).to(FP8)
    scale = torch.rand(2, 64, 2, 3, generator=gen) + 0.5
    back = dequantize_kv(cache, scale)
    for i in (0, 127, 128, 255, 256, 319):
        assert torch.equal(back[..., i], cache[..., i].float() * scale[..., i // 128])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["gla2-rope1", "gta8-d128", "gla1-d320", "gta2-d96"])
def test_fp8_reference_matches_naive_loop(layout, dtype):
    """write_kvcache_ref into an FP8 cache against one group at a time; negative and
    out-of-range slots skipped, every other byte and scale (NaN poison included) untouched."""
    problem = make_problem(FP8_LAYOUTS[layout], 60, DTYPES[dtype], seed=9, fp8=True)
    assert problem.kv_cache.dtype == FP8 and problem.kv_scale is not None
    expected = copy_problem(problem)
    naive_write(*expected.args())
    write_kvcache_ref(*problem.args())
    for got, want in zip(problem.allocations(), expected.allocations()):
        assert_bitwise_equal(got, want, f"fp8-{layout}-{dtype}")


def test_fp8_reference_on_strided_cache_and_fused_inputs():
    problem = make_problem(FP8_LAYOUTS["gla2-rope1"], 50, seed=10, padding=Padding(layers=2, layer=1, extra_heads=1,
                           lead=8, tail=8), fused_inputs=True, fp8=True)
    assert not problem.kv_scale.is_contiguous() and not problem.kv.is_contiguous()
    expected = copy_problem(problem)
    naive_write(*expected.args())
    write_kvcache_ref(*problem.args())
    for got, want in zip(problem.allocations(), expected.allocations()):
        assert_bitwise_equal(got, want, "fp8 strided")


def test_fp8_reference_writer_refuses_inline_and_missing_scales():
    problem = make_problem(FP8_LAYOUTS["gta8-d128"], 4, seed=11, num_blocks=1, fp8=True)
    with pytest.raises(ValueError, match="needs kv_scale"):
        write_kvcache_ref(*problem.args()[:5])
    with pytest.raises(ValueError, match="needs rope_cache"):
        write_kvcache_ref(problem.kv_cache, problem.slot_mapping, problem.kv, None, None, problem.kv_scale)
    with pytest.raises(ValueError, match=re.escape("kv_scale.shape must be (num_blocks, page_size, h_kv, ceil(d / 128)) "
                                                   "= (1, 64, 8, 1), got (1, 64, 8, 2)")):
        write_kvcache_ref(*problem.args()[:5], problem.kv_scale.expand(-1, -1, -1, 2))


def fp8_decode_problem(layout: str, seed: int):
    """A paged FP8 cache written by write_kvcache_ref, NaN in its unused pages and rows (values
    and scales), and a decode call's other inputs."""
    gen = torch.Generator().manual_seed(seed)
    h_kv, d, d_rope = {"gla2": (2, 256, 64), "gta4": (4, 128, 64)}[layout]
    lengths, max_pages = [0, 1, 70, 200], 4
    num_blocks = len(lengths) * max_pages + 3
    cache = torch.full((num_blocks, PAGE, h_kv, d), float("nan")).to(FP8)
    scales = torch.full((num_blocks, PAGE, h_kv, -(-d // FP8_GROUP)), float("nan"))
    rope_cache = torch.full((num_blocks, PAGE, 1, d_rope), float("nan"), dtype=torch.bfloat16)
    block_table = torch.randperm(num_blocks, generator=gen)[: len(lengths) * max_pages].view(len(lengths), max_pages)
    block_table = block_table.to(torch.int32)
    slots = torch.cat([block_table[i, torch.arange(n) // PAGE].long() * PAGE + torch.arange(n) % PAGE
                       for i, n in enumerate(lengths)])
    kv = vary_groups(torch.randn(len(slots), h_kv, d, generator=gen), gen).to(torch.bfloat16)
    rope = torch.randn(len(slots), d_rope, generator=gen).to(torch.bfloat16)
    write_kvcache_ref(cache, slots, kv, rope, rope_cache, scales)
    return cache, scales, rope_cache, block_table, torch.tensor(lengths, dtype=torch.int32), gen


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("layout", ["gla2", "gta4"])
def test_fp8_decode_reference_is_the_decode_of_the_dequantised_cache(layout, causal):
    """gla/gta_with_kvcache_ref with kv_scale computes on dequantize_kv's float32 values, and the
    NaN of unused pages and rows (in FP8 values and in scales) does not leak."""
    cache, scales, rope_cache, block_table, lengths, gen = fp8_decode_problem(layout, seed=12)
    h_kv, d = cache.shape[2], cache.shape[3]
    s_q, h_q = 2, 4 * h_kv
    if layout == "gla2":
        q = torch.randn(len(lengths), s_q, h_q, d + rope_cache.shape[3], generator=gen).to(torch.bfloat16)
        run = lambda kv, **kw: gla_with_kvcache_ref(q, kv, block_table, lengths, d, causal=causal,  # noqa: E731
                                                    rope_cache=rope_cache, **kw)
    else:
        q = torch.randn(len(lengths), s_q, h_q, d, generator=gen).to(torch.bfloat16)
        run = lambda kv, **kw: gta_with_kvcache_ref(q, kv, rope_cache, block_table, lengths,  # noqa: E731
                                                    causal=causal, **kw)
    out, lse = run(cache, kv_scale=scales)
    want_out, want_lse = run(dequantize_kv(cache, scales))
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert bool(out.isfinite().all()) and not bool(lse.isnan().any())  # (+inf: a row that sees no key)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


def test_fp8_decode_reference_refuses_bad_layouts():
    cache, scales, rope_cache, block_table, lengths, _ = fp8_decode_problem("gla2", seed=13)
    q = torch.zeros(len(lengths), 1, 8, 320, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs rope_cache"):
        gla_with_kvcache_ref(q, cache, block_table, lengths, 256, kv_scale=scales)
    with pytest.raises(ValueError, match="needs kv_scale"):
        gla_with_kvcache_ref(q, cache, block_table, lengths, 256, rope_cache=rope_cache)
    with pytest.raises(ValueError, match="kv_scale needs a torch.float8_e4m3fn kv_cache, got torch.bfloat16"):
        gla_with_kvcache_ref(q, cache.to(torch.bfloat16), block_table, lengths, 256, rope_cache=rope_cache,
                             kv_scale=scales)


# ------------------------------------------------------------------------------------------
# The FP8 writer's input checks
# ------------------------------------------------------------------------------------------

FP8_SHARED = make_problem(FP8_LAYOUTS["gta8-d128"], 8, seed=14, num_blocks=2, fp8=True)


def misaligned(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x's values in a new contiguous tensor whose address is ``offset`` elements past an aligned one."""
    flat = torch.empty(x.numel() + 16, dtype=x.dtype)
    view = flat[offset : offset + x.numel()].view(x.shape)
    view.view(torch.uint8).copy_(x.contiguous().view(torch.uint8))
    return view


FP8_BAD_INPUTS = [
    ("inline", dict(rope_cache=None), TypeError,
     ["rope_cache must be a torch.Tensor", "required with an FP8 kv_cache", "no inline-RoPE FP8 layout",
      "got NoneType"]),
    ("no-kv_scale", dict(kv_scale=None), TypeError,
     ["kv_scale must be a torch.Tensor (num_blocks, 64, h_kv, ceil(d / 128)) float32", "required with an FP8",
      "got NoneType"]),
    ("kv_scale-float", dict(kv_scale=1.0), TypeError, ["kv_scale must be a torch.Tensor", "got float"]),
    ("kv-float32", dict(kv=FP8_SHARED.kv.float()), TypeError,
     ["kv.dtype must be torch.bfloat16 or torch.float16", "got torch.float32"]),
    ("kv-fp8", dict(kv=FP8_SHARED.kv.to(FP8)), TypeError,
     ["kv.dtype must be torch.bfloat16 or torch.float16", "got torch.float8_e4m3fn"]),
    ("rope-fp16", dict(rope=FP8_SHARED.rope.to(torch.float16)), TypeError,
     ["rope.dtype must be torch.bfloat16 (kv's dtype)", "got torch.float16"]),
    ("rope_cache-fp8", dict(rope_cache=FP8_SHARED.rope_cache.to(FP8)), TypeError,
     ["rope_cache.dtype must be torch.bfloat16 (kv's dtype)", "got torch.float8_e4m3fn"]),
    ("kv_scale-bf16", dict(kv_scale=FP8_SHARED.kv_scale.to(torch.bfloat16)), TypeError,
     ["kv_scale.dtype must be torch.float32", "got torch.bfloat16"]),
    ("kv_scale-3d", dict(kv_scale=FP8_SHARED.kv_scale[..., 0]), ValueError, ["kv_scale must be 4-D", "got 3-D"]),
    ("kv_scale-groups", dict(kv_scale=FP8_SHARED.kv_scale.expand(-1, -1, -1, 2)), ValueError,
     ["kv_scale.shape must be (num_blocks, 64, h_kv, ceil(d / 128)) = (2, 64, 8, 1)", "got (2, 64, 8, 2)"]),
    ("kv_scale-heads", dict(kv_scale=FP8_SHARED.kv_scale[:, :, :4]), ValueError,
     ["kv_scale.shape must be (num_blocks, 64, h_kv, ceil(d / 128)) = (2, 64, 8, 1)", "got (2, 64, 4, 1)"]),
    ("d_kv-not-4", dict(kv_cache=FP8_SHARED.kv_cache[..., :126], kv=FP8_SHARED.kv[..., :126]), ValueError,
     ["kv.shape[2] (d_kv) must be a multiple of 4 with an FP8 kv_cache", "got 126"]),
    ("d_rope-not-4", dict(rope=FP8_SHARED.rope[:, :62], rope_cache=FP8_SHARED.rope_cache[..., :62]), ValueError,
     ["rope.shape[1] (d_rope) must be a multiple of 4 with an FP8 kv_cache", "got 62"]),
    ("kv-stride", dict(kv=torch.zeros(8, 8, 130, dtype=torch.bfloat16)[..., :128]), ValueError,
     ["kv.stride(1) must be a multiple of 4 elements with an FP8 kv_cache", "got 130"]),
    ("rope-stride", dict(rope=torch.zeros(8, 66, dtype=torch.bfloat16)[:, :64]), ValueError,
     ["rope.stride(0) must be a multiple of 4 elements with an FP8 kv_cache", "got 66"]),
    ("kv-address", dict(kv=misaligned(FP8_SHARED.kv, 2)), ValueError,
     ["kv.data_ptr() must be 8-byte aligned (4 elements) with an FP8 kv_cache", "(offset 4)"]),
    ("kv_cache-address", dict(kv_cache=misaligned(FP8_SHARED.kv_cache, 2)), ValueError,
     ["kv_cache.data_ptr() must be 4-byte aligned (4 elements) with an FP8 kv_cache", "(offset 2)"]),
    ("rope_cache-address", dict(rope_cache=misaligned(FP8_SHARED.rope_cache, 1)), ValueError,
     ["rope_cache.data_ptr() must be 8-byte aligned", "(offset 2)"]),
]


@pytest.mark.parametrize("overrides, error, fragments", [case[1:] for case in FP8_BAD_INPUTS],
                         ids=[case[0] for case in FP8_BAD_INPUTS])
def test_fp8_bad_input_is_named(overrides, error, fragments):
    with pytest.raises(error) as info:
        call(FP8_SHARED, **overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", FP8_LAYOUTS)
def test_fp8_valid_cpu_inputs_reach_device_check(layout, dtype):
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call(make_problem(FP8_LAYOUTS[layout], 8, DTYPES[dtype], seed=15, num_blocks=2, fp8=True))


def test_fp8_valid_strided_and_4_aligned_inputs_reach_device_check():
    """Rows only 4-element aligned are fine (the kernel moves 4 values a lane there)."""
    strided = make_problem(FP8_LAYOUTS["gla2-rope1"], 8, seed=16, num_blocks=2, fp8=True,
                           padding=Padding(layers=2, layer=1, extra_heads=1, lead=4, tail=4), fused_inputs=True)
    assert strided.kv_cache.data_ptr() % 8 == 4
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call(strided)
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call(FP8_SHARED, kv=misaligned(FP8_SHARED.kv, 4), kv_cache=misaligned(FP8_SHARED.kv_cache, 4))
