"""Test helpers shared by the CPU and GPU tests: poisoned paged inputs, a loud comparison, and
the GPU harness (a Variant per decode entry, the per-case check, graph replay, metadata reuse)
that test_decode_gpu.py, test_shared_rope_gpu.py and test_fp8_decode_gpu.py drive over their
grids, which they build with the grid helpers here (the cases of the entries that store the
RoPE key once, the product of a grid's axes, the grid's two tests)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import zlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import flash_gla
from flash_gla.reference import FP8_GROUP, gla_with_kvcache_ref, gta_with_kvcache_ref, quantize_kv_ref

PAGE = 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GARBAGE_PAGE = 2**30  # block-table entries that must never be read
FP8_NAN_BYTE = 0x7F  # float8_e4m3fn NaN (0x7F and 0xFF are its only NaNs; it has no infinity)

# Named varlen batches for the GPU grids: a seeded mix of empty, page-edge and long requests.
VARLEN = {
    "mix": [0, 0, 1, 63, 64, 65, 1000, 4113, 9000, 16384],  # long context, zeros included
    "moderate": [0, 0, 1, 64, 65, 200, 511, 777, 1024, 1100],  # for large batches
}


def grid_lengths(length: int | str, b: int, seed: int) -> list[int]:
    """``b`` copies of one length, or ``b`` seeded draws from ``VARLEN[length]`` with the first
    request empty and the last the longest of the pattern."""
    if isinstance(length, int):
        return [length] * b
    rng = random.Random(seed)
    choices = VARLEN[length]
    lengths = [rng.choice(choices) for _ in range(b)]
    lengths[0], lengths[-1] = 0, max(choices)
    return lengths


class SeededGridCase:
    """Mixin for a frozen dataclass of one grid case with ``id``, ``length`` (an int or a
    VARLEN key) and ``b``: a seed derived from the id, and the requests' lengths.

    The GPU harness below also reads ``variant`` (a :class:`Variant`), ``dv``, ``d_rope``,
    ``h_q``, ``h_kv``, ``dtype`` (a DTYPES key), ``s_q`` and ``causal``."""

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    def lengths(self) -> list[int]:
        return grid_lengths(self.length, self.b, self.seed)


def distinct(cases: list) -> list:
    """The cases with distinct ids, each where it first came: a sweep may revisit a case."""
    return list({case.id: case for case in cases}.values())


def capture_graph(step: Callable):
    """Warm ``step`` up on a side stream, then capture one call in a CUDA graph.

    Returns (graph, what the captured call returned: static outputs for every replay)."""
    import torch.cuda

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # lazy initialisation outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result


@dataclass
class DecodeInputs:
    """A paged decode problem. Tensors as in ``flash_gla.gla_with_kvcache``."""

    q: torch.Tensor  # (b, s_q, h_q, d_qk)
    kv_cache: torch.Tensor  # (num_blocks, 64, h_kv, kv_dim), NaN past each length
    block_table: torch.Tensor  # (b, max_pages) int32, GARBAGE_PAGE past each length
    cache_seqlens: torch.Tensor  # (b,) int32
    lengths: list[int]
    rope_cache: torch.Tensor | None = None  # (num_blocks, 64, 1, d_rope), shared_rope only
    kv_scale: torch.Tensor | None = None  # (num_blocks, 64, h_kv, ceil(kv_dim / 128)) float32, FP8 kv_cache only

    def copy_(self, src: DecodeInputs) -> None:
        """Copy ``src``'s tensors into these (same shapes), e.g. into a CUDA graph's static inputs."""
        for name in ("q", "kv_cache", "rope_cache", "block_table", "cache_seqlens", "kv_scale"):
            dst = getattr(self, name)
            if dst is not None:
                raw(dst).copy_(raw(getattr(src, name)))
        self.lengths = list(src.lengths)


def raw(x: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor as its bytes (uint8), anything else as it is: copies and indexing of FP8
    tensors then need no FP8 kernels."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def make_inputs(
    b: int,
    s_q: int,
    h_q: int,
    h_kv: int,
    dv: int,
    d_rope: int,
    lengths: int | list[int],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    shared_rope: bool = False,
    q_dim: int | None = None,
    max_pages: int | None = None,
    num_blocks: int | None = None,
    spare_pages: int = 2,
    kv_fp8: bool = False,
) -> DecodeInputs:
    """Random paged inputs, poisoned everywhere a kernel must not look.

    * Pages are assigned in a shuffled order (non-contiguous block table).
    * Cache rows past each request's length, and pages no request uses (at least
      ``spare_pages``), are NaN.
    * Block-table entries past ``ceil(L / 64)`` are ``GARBAGE_PAGE`` (out of range).

    Layouts: inline RoPE (default): kv rows have ``dv + d_rope`` dims and q has
    ``dv + d_rope``. ``shared_rope=True``: kv rows have ``dv`` dims and a separate
    ``rope_cache`` (num_blocks, 64, 1, d_rope) is made; q has ``dv + d_rope`` dims unless
    ``q_dim`` says otherwise (GTA: ``q_dim = dv``).

    ``kv_fp8=True`` (with ``shared_rope``): the cache rows, in ``dtype`` and each 128-value group
    scaled by 2^k (k in -2..1, per token, head and group), are quantised by
    ``flash_gla.reference.quantize_kv_ref`` (what ``write_kvcache`` writes, bit for bit) into a
    float8_e4m3fn ``kv_cache`` and its float32 ``kv_scale``; the poisoned rows hold the e4m3 NaN
    byte (0x7F) and a NaN scale. ``rope_cache`` stays in ``dtype``.
    """
    if isinstance(lengths, int):
        lengths = [lengths] * b
    lengths = [int(n) for n in lengths]
    assert len(lengths) == b, (len(lengths), b)
    pages = [-(-n // PAGE) for n in lengths]
    max_pages = max_pages if max_pages is not None else max(pages, default=0) + 1
    assert max_pages >= max(pages, default=0), "max_pages too small for the lengths"
    num_blocks = num_blocks if num_blocks is not None else sum(pages) + spare_pages
    assert num_blocks >= sum(pages) + 1, "num_blocks must leave at least one never-used page"

    host = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=host)
    block_table = torch.full((b, max_pages), GARBAGE_PAGE, dtype=torch.int32)
    valid_rows = torch.zeros(num_blocks, dtype=torch.long)  # rows < L in each physical page
    used = 0
    for i, (n, p) in enumerate(zip(lengths, pages)):
        physical = perm[used : used + p]
        used += p
        block_table[i, :p] = physical.to(torch.int32)
        full = torch.full((p,), PAGE, dtype=torch.long)
        if p:
            full[-1] = n - (p - 1) * PAGE
        valid_rows[physical] = full

    gen = torch.Generator(device=device).manual_seed(seed)
    kv_dim = dv if shared_rope else dv + d_rope
    q_dim = q_dim if q_dim is not None else dv + d_rope
    q = torch.randn(b, s_q, h_q, q_dim, generator=gen, device=device, dtype=torch.float32).to(dtype)
    kv_cache = torch.randn(num_blocks, PAGE, h_kv, kv_dim, generator=gen, device=device, dtype=torch.float32).to(dtype)
    poison = (torch.arange(PAGE)[None, :] >= valid_rows[:, None]).to(device)  # (num_blocks, 64)
    kv_cache[poison] = math.nan
    rope_cache = kv_scale = None
    if shared_rope:
        rope_cache = torch.randn(num_blocks, PAGE, 1, d_rope, generator=gen, device=device, dtype=torch.float32).to(dtype)
        rope_cache[poison] = math.nan
    if kv_fp8:
        assert shared_rope, "an FP8 cache stores the RoPE key once (shared_rope=True)"
        groups = -(-kv_dim // FP8_GROUP)
        exponent = torch.randint(-2, 2, (num_blocks, PAGE, h_kv, groups), generator=gen, device=device)
        magnitude = torch.pow(2.0, exponent.float()).repeat_interleave(FP8_GROUP, dim=-1)[..., :kv_dim]
        kv_cache, kv_scale = quantize_kv_ref((kv_cache.float() * magnitude).to(dtype))
        raw(kv_cache)[poison] = FP8_NAN_BYTE
        kv_scale[poison] = math.nan
    return DecodeInputs(
        q=q,
        kv_cache=kv_cache,
        block_table=block_table.to(device),
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device=device),
        lengths=lengths,
        rope_cache=rope_cache,
        kv_scale=kv_scale,
    )


# Relative error ||out - ref|| / ||ref|| and elementwise |out - ref| <= atol + rtol |ref|.
OUT_TOLERANCE = {
    torch.bfloat16: dict(rel=1e-2, atol=2e-2, rtol=2e-2),
    torch.float16: dict(rel=1e-2, atol=5e-3, rtol=5e-3),
    torch.float32: dict(rel=1e-5, atol=1e-5, rtol=1e-5),
}
LSE_ATOL = 1e-3
LSE_RTOL = 1e-3
# FP8 caches: the kernel rounds each dequantised value (e4m3 x float32 scale) to q's dtype before
# its MMAs, the reference (on the same dequantised cache) does not: one more rounding of every K
# and V element (emulated on CPU, bf16: relative out error ~4e-3, |lse| error up to ~7e-3 at L = 1;
# fp16 about 8x less). The relative error bound is 2e-2 either way.
FP8_OUT_TOLERANCE = {
    torch.bfloat16: dict(rel=2e-2, atol=3e-2, rtol=3e-2),
    torch.float16: dict(rel=2e-2, atol=1e-2, rtol=1e-2),
}
FP8_LSE_TOLERANCE = {torch.bfloat16: (2e-2, 1e-2), torch.float16: (5e-3, 2e-3)}  # (atol, rtol)


def _index(flat: int, shape) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape)))


def assert_close(
    out: torch.Tensor, ref: torch.Tensor, lse: torch.Tensor, lse_ref: torch.Tensor, config_id: str, *,
    kv_fp8: bool = False,
) -> None:
    """Compare a kernel's (out, lse) with the reference; fail with the worst element.

    out/ref: (b, s_q, h_q, dv); lse/lse_ref: (b, h_q, s_q) float32. NaN never passes;
    +inf in lse must sit exactly where the reference has it, with out == 0 on those rows.
    ``kv_fp8``: the kernel read an FP8 cache (FP8_OUT_TOLERANCE, FP8_LSE_TOLERANCE).
    """
    where = f"[{config_id}]"
    lse_atol, lse_rtol = FP8_LSE_TOLERANCE[ref.dtype] if kv_fp8 else (LSE_ATOL, LSE_RTOL)
    assert out.shape == ref.shape, f"{where} out.shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{where} out.dtype {out.dtype} != reference {ref.dtype}"
    assert lse.shape == lse_ref.shape, f"{where} lse.shape {tuple(lse.shape)} != reference {tuple(lse_ref.shape)}"
    assert lse.dtype == torch.float32, f"{where} lse.dtype must be float32, got {lse.dtype}"
    for name, t in (("out", out), ("reference out", ref), ("lse", lse), ("reference lse", lse_ref)):
        nan = torch.isnan(t)
        if nan.any():
            first = _index(int(nan.flatten().nonzero()[0]), t.shape)
            raise AssertionError(f"{where} {name} has {int(nan.sum())} NaN, first at {first}")

    # lse: +inf exactly where the reference has it (rows that see no key), nowhere -inf.
    inf, inf_ref = torch.isinf(lse), torch.isinf(lse_ref)
    mismatch = (inf != inf_ref) | (inf & (lse < 0))
    if mismatch.any():
        first = _index(int(mismatch.flatten().nonzero()[0]), lse.shape)
        raise AssertionError(
            f"{where} lse infinities differ at (b, h, s) = {first}: got {lse[first].item()}, "
            f"reference {lse_ref[first].item()} ({int(mismatch.sum())} such elements)"
        )
    finite = ~inf_ref
    if finite.any():
        err = torch.where(finite, (lse - lse_ref).abs(), torch.zeros_like(lse))
        bound = lse_atol + lse_rtol * lse_ref.abs().masked_fill(inf_ref, 0)
        worst = int(torch.argmax(err - bound))
        if (err - bound).flatten()[worst] > 0:
            at = _index(worst, lse.shape)
            raise AssertionError(
                f"{where} lse differs most at (b, h, s) = {at}: got {lse[at].item():.6f}, reference "
                f"{lse_ref[at].item():.6f} (|diff| {err[at].item():.3g} > {bound[at].item():.3g})"
            )

    # Rows that see no key must be exactly zero.
    empty_rows = inf_ref.transpose(1, 2)  # (b, s_q, h_q)
    nonzero = empty_rows.unsqueeze(-1) & (out != 0)
    if nonzero.any():
        first = _index(int(nonzero.flatten().nonzero()[0]), out.shape)
        raise AssertionError(f"{where} out must be 0 on rows that see no key, got {out[first].item()} at {first}")

    tol = (FP8_OUT_TOLERANCE if kv_fp8 else OUT_TOLERANCE)[ref.dtype]
    o, r = out.double(), ref.double()
    diff = (o - r).abs()
    ref_norm = r.norm().item()
    rel = diff.norm().item() / ref_norm if ref_norm > 0 else diff.norm().item()
    excess = diff - (tol["atol"] + tol["rtol"] * r.abs())
    worst = int(torch.argmax(excess))
    at = _index(worst, out.shape)
    detail = (
        f"worst element (b, s, h, d) = {at}: got {o[at].item():.6f}, reference {r[at].item():.6f}, "
        f"|diff| {diff[at].item():.3g}; relative error {rel:.3g}"
    )
    assert rel <= tol["rel"], f"{where} relative error {rel:.3g} > {tol['rel']}; {detail}"
    bound = f"atol {tol['atol']}, rtol {tol['rtol']}"
    assert excess.flatten()[worst] <= 0, f"{where} elementwise tolerance ({bound}) exceeded; {detail}"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors of one dtype (NaN poison included, which torch.equal calls unequal)."""
    int_type = {1: torch.int8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(int_type), b.view(int_type))


# ------------------------------------------------------------------------------------------
# GPU harness: one decode entry per Variant, driven the same way by every GPU grid.
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A decode entry point and its cache layout, as the GPU tests call it."""

    name: str  # gla (inline RoPE; MLA at h_kv 1) | gla_rope1 | gta
    shared_rope: bool  # RoPE key in a rope_cache shared by the KV heads, else inline after V
    q_is_v: bool  # q has V's width (GTA's tied state); else dv + d_rope
    kv_fp8: bool = False  # float8_e4m3fn kv_cache + float32 kv_scale (shared RoPE only)

    def make_inputs(self, case, lengths: list[int] | None = None, seed: int | None = None, **shape) -> DecodeInputs:
        """The case's poisoned CUDA inputs (its lengths and seed unless given)."""
        return make_inputs(
            case.b, case.s_q, case.h_q, case.h_kv, case.dv, case.d_rope,
            case.lengths() if lengths is None else lengths, DTYPES[case.dtype], "cuda",
            case.seed if seed is None else seed, shared_rope=self.shared_rope,
            q_dim=case.dv if self.q_is_v else case.dv + case.d_rope, kv_fp8=self.kv_fp8, **shape,
        )

    def decode(self, inp: DecodeInputs, dv: int, meta, num_splits, **kwargs):
        """flash_gla's entry for this variant on ``inp``."""
        if self.kv_fp8:
            kwargs = dict(kwargs, kv_scale=inp.kv_scale)
        if self.name == "gta":
            return flash_gla.gta_with_kvcache(
                inp.q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, meta, num_splits, **kwargs
            )
        return flash_gla.gla_with_kvcache(
            inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, dv, meta, num_splits,
            rope_cache=inp.rope_cache, **kwargs,
        )

    def reference(self, inp: DecodeInputs, dv: int, **kwargs):
        """flash_gla.reference's result for the same call."""
        if self.kv_fp8:
            kwargs = dict(kwargs, kv_scale=inp.kv_scale)
        if self.name == "gta":
            return gta_with_kvcache_ref(inp.q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, **kwargs)
        return gla_with_kvcache_ref(
            inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, dv, rope_cache=inp.rope_cache, **kwargs
        )


GLA = Variant("gla", shared_rope=False, q_is_v=False)
GLA_ROPE1 = Variant("gla_rope1", shared_rope=True, q_is_v=False)
GTA = Variant("gta", shared_rope=True, q_is_v=True)
VARIANTS = {v.name: v for v in (GLA, GLA_ROPE1, GTA)}
GLA_ROPE1_FP8 = Variant("gla_rope1", shared_rope=True, q_is_v=False, kv_fp8=True)
GTA_FP8 = Variant("gta", shared_rope=True, q_is_v=True, kv_fp8=True)
FP8_VARIANTS = {v.name: v for v in (GLA_ROPE1_FP8, GTA_FP8)}
#: d_rope of the layouts that store the RoPE key once, by (kind, d): GTA's tied-state width d,
#: GLA's latent width.
SHARED_ROPE_D_ROPE = {("gta", 128): 64, ("gta", 64): 32, ("gla_rope1", 256): 64}


@dataclass(frozen=True)
class SharedRopeCase(SeededGridCase):
    """One grid case of an entry that stores the RoPE key once (``gta``, ``gla_rope1``), over a
    bf16 / fp16 cache or (``fp8``) an FP8 one. Ids read like the configuration:
    ``gta-d128-h32kv8-bf16-sq2-causal-L4113-b3``, ``fp8-`` in front for an FP8 cache."""

    kind: str  # "gta" or "gla_rope1"
    d: int  # gta: tied-state width; gla_rope1: latent width (head_dim_v)
    h_q: int
    h_kv: int
    dtype: str
    s_q: int
    causal: bool
    length: int | str  # one length for every request, a VARLEN key, or "graph"
    b: int
    fp8: bool = False

    @property
    def id(self) -> str:
        mask = "causal" if self.causal else "full"
        cache = "fp8-" if self.fp8 else ""
        return (f"{cache}{self.kind}-d{self.d}-h{self.h_q}kv{self.h_kv}-{self.dtype}-sq{self.s_q}-{mask}"
                f"-L{self.length}-b{self.b}")

    @property
    def d_rope(self) -> int:
        return SHARED_ROPE_D_ROPE[(self.kind, self.d)]

    @property
    def variant(self) -> Variant:
        return (FP8_VARIANTS if self.fp8 else VARIANTS)[self.kind]

    @property
    def dv(self) -> int:
        return self.d


def gla_rope1_case(**fields) -> SharedRopeCase:
    """GLA-2 with the RoPE key stored once (h_q 128, h_kv 2, 256 latents), bf16, one query, full
    mask, L 65, b 3; ``fields`` changed."""
    return dataclasses.replace(SharedRopeCase("gla_rope1", 256, 128, 2, "bf16", 1, False, 65, 3), **fields)


def gta_case(**fields) -> SharedRopeCase:
    """GTA-8 (h_q 32, h_kv 8, d 128), otherwise as :func:`gla_rope1_case`; ``fields`` changed."""
    return dataclasses.replace(SharedRopeCase("gta", 128, 32, 8, "bf16", 1, False, 65, 3), **fields)


def grid(make: Callable, **axes) -> list:
    """``make(**fields)`` for every combination of the axes, the first outermost (as nested loops).

    Each keyword is an axis: a field and its values, or fields joined by ``__`` and tuples of
    their values, which vary together (``s_q__causal=((1, False), (4, True))``)."""
    cases = []
    for combo in itertools.product(*axes.values()):
        fields = {}
        for key, value in zip(axes, combo):
            names = key.split("__")
            fields.update(zip(names, value) if len(names) > 1 else [(key, value)])
        cases.append(make(**fields))
    return cases


def case_metadata(case, inp: DecodeInputs):
    """``get_metadata`` (classic form) for the case's shape and ``inp``'s lengths."""
    return flash_gla.get_metadata(inp.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv)


def empty_out(case, fill: float = math.nan) -> torch.Tensor:
    return torch.full((case.b, case.s_q, case.h_q, case.dv), fill, dtype=DTYPES[case.dtype], device="cuda")


def check_case(case, *, softmax_scale: float | None = None, given_out: bool = True, tag: str = "") -> None:
    """Make the case's poisoned inputs, run flash_gla, compare with the reference.

    ``given_out``: the op writes into a NaN-filled ``out`` (checked), else allocates it."""
    inp = case.variant.make_inputs(case)
    out = empty_out(case) if given_out else None
    got, lse = case.variant.decode(
        inp, case.dv, *case_metadata(case, inp), softmax_scale=softmax_scale, causal=case.causal, out=out
    )
    if given_out:
        assert got.data_ptr() == out.data_ptr(), f"[{case.id}] {case.variant.name} must write into the given out"
    ref, lse_ref = case.variant.reference(inp, case.dv, softmax_scale=softmax_scale, causal=case.causal)
    assert_close(got, ref, lse, lse_ref, case.id + tag, kv_fp8=case.variant.kv_fp8)


def grid_tests(cases: list, sizes: range) -> tuple[Callable, Callable]:
    """A GPU grid's two tests, for a test module to bind to its own test_* names (pytest collects
    them by those): the grid holds a number of cases in ``sizes`` (its sweeps add what they mean
    to), and each case matches the reference on an sm_90 GPU (:func:`check_case`)."""

    def test_grid_size():
        assert len(cases) in sizes, len(cases)

    @pytest.mark.sm90
    @pytest.mark.parametrize("case", cases, ids=lambda c: c.id)
    def test_matches_reference(case):
        check_case(case)

    return test_grid_size, test_matches_reference


GRAPH_LENGTHS = ([100, 0, 3000, 65], [2000, 3200, 0, 1])  # replayed in turn; case.b must be 4
GRAPH_SHAPE = dict(max_pages=50, num_blocks=140)  # the static buffers fit both sets of lengths


def check_graph_replay(case, bitwise_vs_eager: bool = False) -> None:
    """get_metadata + decode captured in one CUDA graph; each of GRAPH_LENGTHS' problems is
    copied into the static inputs, replayed into a NaN-filled out and compared with the
    reference (and, with ``bitwise_vs_eager``, bit for bit with an eager call on the same data)."""
    make = lambda lengths, seed: case.variant.make_inputs(case, lengths, seed, **GRAPH_SHAPE)  # noqa: E731
    static = make(GRAPH_LENGTHS[0], 1)
    out = empty_out(case)

    def step():
        return case.variant.decode(static, case.dv, *case_metadata(case, static), causal=case.causal, out=out)

    graph, (_, lse) = capture_graph(step)
    for seed, lengths in enumerate(GRAPH_LENGTHS, start=1):
        new = make(lengths, seed)
        static.copy_(new)
        out.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        if bitwise_vs_eager:
            want_out, want_lse = case.variant.decode(new, case.dv, *case_metadata(case, new), causal=case.causal)
            assert same_bits(out, want_out) and same_bits(lse, want_lse), (
                f"[{case.id}] replay with lengths {lengths} differs from the eager call: max |out diff| "
                f"{(out.float() - want_out.float()).abs().max().item():.3g}")
        ref, lse_ref = case.variant.reference(new, case.dv, causal=case.causal)
        assert_close(out, ref, lse, lse_ref, f"{case.id}-replay-L{'_'.join(map(str, lengths))}",
                     kv_fp8=case.variant.kv_fp8)


def check_metadata_reuse(case, lazy: bool):
    """One metadata for several calls, as for the layers of one decode step: the classic
    tensors, or (``lazy``) a get_metadata() object that the first call fills. The same call
    twice gives the same bits; a second "layer" (new queries) is right too.

    Returns ``(meta, num_splits, inp)`` for further calls."""
    inp = case.variant.make_inputs(case)
    if lazy:
        meta, num_splits = flash_gla.get_metadata()
        assert num_splits is None and not meta.have_initialized
    else:
        meta, num_splits = case_metadata(case, inp)
    out1, lse1 = case.variant.decode(inp, case.dv, meta, num_splits, causal=case.causal)
    if lazy:
        assert meta.have_initialized and meta.tile_scheduler_metadata.dtype == torch.int32
        assert meta.num_splits.shape == (case.b + 1,)
    out2, lse2 = case.variant.decode(inp, case.dv, meta, num_splits, causal=case.causal)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2), "same inputs and metadata must give identical bits"
    ref, lse_ref = case.variant.reference(inp, case.dv, causal=case.causal)
    assert_close(out1, ref, lse1, lse_ref, f"{case.id}-layer1", kv_fp8=case.variant.kv_fp8)
    layer2 = dataclasses.replace(inp, q=torch.randn_like(inp.q))
    out3, lse3 = case.variant.decode(layer2, case.dv, meta, num_splits, causal=case.causal)
    ref3, lse_ref3 = case.variant.reference(layer2, case.dv, causal=case.causal)
    assert_close(out3, ref3, lse3, lse_ref3, f"{case.id}-layer2", kv_fp8=case.variant.kv_fp8)
    return meta, num_splits, inp
