"""flash_gla.write_kvcache on CPU: its input checks and its reference (no GPU, no extension).

* The reference (``flash_gla.reference.write_kvcache_ref``) against a naive per-token loop,
  for every layout, with negative and out-of-range slots skipped and untouched rows (random,
  some NaN) left bitwise unchanged.
* Every bad input gets a Python exception naming the argument, the expected and the actual
  value. The device check runs last, so a valid set of CPU inputs fails only with it.

The problem builder here (layouts, poisoned caches, strided views) also serves
test_cache_writer_gpu.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

import flash_gla
from flash_gla.reference import write_kvcache_ref

PAGE = 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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

    def args(self) -> tuple:
        return self.kv_cache, self.slot_mapping, self.kv, self.rope, self.rope_cache

    def allocations(self) -> list[torch.Tensor]:
        return [x for x in (self.kv_cache_alloc, self.rope_cache_alloc) if x is not None]


def poisoned_cache(shape, padding: Padding, dtype, device, gen, nan_rows: torch.Tensor):
    """(allocation, view): random values, NaN in the slots ``nan_rows`` of every layer."""
    num_blocks, page, heads, dim = shape
    alloc_shape = (padding.layers, num_blocks, page, heads + padding.extra_heads, padding.lead + dim + padding.tail)
    alloc = torch.randn(alloc_shape, generator=gen).to(dtype).to(device)
    flat = alloc.view(padding.layers, num_blocks * page, *alloc_shape[3:])
    flat[:, nan_rows] = float("nan")
    view = alloc[padding.layer, :, :, :heads, padding.lead : padding.lead + dim]
    return alloc, view


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
) -> Problem:
    """A random problem: distinct random slots, a share ``skipped`` of them negative and a share
    ``out_of_range`` at or past the cache's end; caches of random values with NaN in about 5% of
    the slots (written ones and others). ``fused_inputs``: kv and rope are slices of one
    (T, h_kv * d_kv + d_rope) projection output (strided, as vLLM's ``kv_c`` / ``k_pe``).
    Drawn on the CPU from ``seed`` (the same values on every device), views made on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    if num_blocks is None:
        num_blocks = -(-num_tokens * 5 // (4 * PAGE)) + 2  # spare pages that nothing writes
    num_slots = num_blocks * PAGE
    assert num_tokens < num_slots
    nan_rows = torch.randperm(num_slots, generator=gen)[: max(1, num_slots // 20)]
    kv_alloc, kv_cache = poisoned_cache(
        (num_blocks, PAGE, layout.h_kv, layout.cache_dim), padding, dtype, device, gen, nan_rows
    )
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

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    if fused_inputs:
        fused = randn(num_tokens, kv_width + layout.d_rope)
        kv = fused[:, :kv_width].view(num_tokens, layout.h_kv, layout.d_kv)
        rope = fused[:, kv_width:] if layout.d_rope else None
    else:
        kv = randn(num_tokens, layout.h_kv, layout.d_kv)
        rope = randn(num_tokens, layout.d_rope) if layout.d_rope else None
    return Problem(layout, kv_cache, slots.to(device), kv, rope, rope_cache, kv_alloc, rope_alloc)


def copy_problem(problem: Problem) -> Problem:
    """A copy of the problem in new memory, the caches still views into their copied
    allocations at the same place (kv and rope may come out contiguous)."""

    def copy_view(view, alloc):
        if view is None:
            return None, None
        copied = alloc.clone()
        offset = view.storage_offset() - alloc.storage_offset()
        return copied.as_strided(view.shape, view.stride(), copied.storage_offset() + offset), copied

    kv_cache, kv_alloc = copy_view(problem.kv_cache, problem.kv_cache_alloc)
    rope_cache, rope_alloc = copy_view(problem.rope_cache, problem.rope_cache_alloc)
    inputs = (problem.slot_mapping, problem.kv, problem.rope)
    slot_mapping, kv, rope = (None if x is None else x.clone() for x in inputs)
    return Problem(problem.layout, kv_cache, slot_mapping, kv, rope, rope_cache, kv_alloc, rope_alloc)


def expected_allocations(problem: Problem) -> list[torch.Tensor]:
    """The allocations after the reference writes the problem into copies of them."""
    copy = copy_problem(problem)
    write_kvcache_ref(*copy.args())
    return copy.allocations()


def assert_bitwise_equal(got: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    """Same bits (NaN included), else the first differing index and both values."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, (where, got.shape, expected.shape)
    differ = got.view(torch.int16) != expected.view(torch.int16)
    if differ.any():
        first = tuple(int(i) for i in differ.nonzero()[0])
        raise AssertionError(
            f"{where}: {int(differ.sum())} elements differ, first at {first}: got {got[first].item()}, "
            f"expected {expected[first].item()}"
        )


def naive_write(kv_cache, slot_mapping, kv, rope=None, rope_cache=None) -> None:
    """write_kvcache's definition, one token and one head at a time."""
    num_slots = kv_cache.shape[0] * PAGE
    for t, slot in enumerate(slot_mapping.tolist()):
        if not 0 <= slot < num_slots:
            continue
        page, row = divmod(slot, PAGE)
        for j in range(kv.shape[1]):
            inline_rope = rope is not None and rope_cache is None
            kv_cache[page, row, j] = torch.cat([kv[t, j], rope[t]]) if inline_rope else kv[t, j]
        if rope_cache is not None:
            rope_cache[page, row, 0] = rope[t]


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
    args = dict(zip(("kv_cache", "slot_mapping", "kv", "rope", "rope_cache"), problem.args()))
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
    ("kv_cache-fp8", INLINE, dict(kv_cache=INLINE.kv_cache.to(torch.float8_e4m3fn)), TypeError,
     ["kv_cache.dtype must be torch.bfloat16 or torch.float16", "got torch.float8_e4m3fn", "FP8"]),
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
     ["kv_scale must be None", "reserved for FP8", "got a Tensor"]),
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
