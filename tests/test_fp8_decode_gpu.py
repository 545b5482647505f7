"""FP8 (e4m3) KV-cache decode against the reference on an sm_90 GPU (skipped elsewhere, see conftest).

The FP8 layout: ``kv_cache`` float8_e4m3fn (num_blocks, 64, h_kv, d), ``kv_scale`` float32
(num_blocks, 64, h_kv, ceil(d / 128)), ``rope_cache`` in q's dtype; element ``i`` of a row is
``kv_cache[..., i] * kv_scale[..., i // 128]``. The caches are random bf16 / fp16 rows (each
128-value group scaled by 2^-2 .. 2^1) quantised by ``quantize_kv_ref`` (bit for bit what
``write_kvcache`` writes; one test writes through ``write_kvcache`` itself), poisoned where no
kernel may look: rows past each length and unused pages hold the e4m3 NaN byte 0x7F, NaN scales
and NaN RoPE keys; ``out`` is NaN-filled before the call. The reference
(``gla_with_kvcache_ref`` / ``gta_with_kvcache_ref`` with ``kv_scale=``) computes on the
dequantised cache; the kernel rounds the dequantised values to q's dtype, hence
helpers.FP8_OUT_TOLERANCE (relative error <= 2e-2) and FP8_LSE_TOLERANCE.

Variants: ``gla_rope1`` (GLA with RoPE stored once: 256 latent dims, d_rope 64; GLA-2 is h_q
128, h_kv 2) and ``gta`` (tied state d 128 with d_rope 64, GTA-8 is h_q 32, h_kv 8; d 64 with
d_rope 32). Ids read like the configuration: ``fp8-gta-d128-h32kv8-bf16-sq2-causal-L4113-b3``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random

import pytest
import torch
from helpers import (
    DTYPES,
    PAGE,
    DecodeInputs,
    SharedRopeCase,
    assert_close,
    case_metadata,
    check_graph_replay,
    check_metadata_reuse,
    distinct,
    empty_out,
    gla_rope1_case,
    grid,
    grid_tests,
    gta_case,
    make_inputs,
    raw,
    same_bits,
)

import flash_gla
from flash_gla.reference import write_kvcache_ref

# (h_q, h_kv) for GLA with RoPE once: GLA-2 first, 16 to 128 query heads, 1 or 2 latent heads.
GLA_HEADS = [(64, 1), (16, 2), (128, 1), (16, 1)]


gla2 = functools.partial(gla_rope1_case, fp8=True)
gta8 = functools.partial(gta_case, fp8=True)


def build_grid() -> list[SharedRopeCase]:
    cases = []
    # 1. GLA-2, RoPE once: page-edge and long lengths x every s_q x causal (30).
    cases += grid(gla2, length=(1, 65, 4113), s_q=(1, 2, 3, 4, 8), causal=(False, True))
    # 2. GLA head layouts (16).
    cases += grid(gla2, h_q__h_kv=GLA_HEADS, length=(63, 1000), s_q__causal=((1, False), (4, True)))
    # 3. GTA-8 (d 128): lengths x s_q x causal (18); GTA d 64, two head layouts (12).
    cases += grid(gta8, length=(1, 65, 4113), s_q=(1, 3, 8), causal=(False, True))
    cases += grid(functools.partial(gta8, d=64), h_q__h_kv=((32, 8), (16, 4)), length=(65, 4113),
                  s_q__causal=((1, False), (2, True), (8, True)))
    # 4. Empty batches: every row sees no key (3).
    cases += [gla2(length=0), gla2(s_q=2, causal=True, length=0), gta8(length=0)]
    # 5. fp16 queries (and RoPE cache, out) (10).
    for make in (gla2, gta8):
        cases += grid(functools.partial(make, dtype="fp16"), length=(64, 1000), s_q__causal=((1, False), (4, True)))
    cases += [gta8(d=64, dtype="fp16", s_q=2, causal=True, length=1000), gta8(d=64, dtype="fp16", length=4113)]
    # 6. Varlen batches with empty, page-edge and 16K requests (7).
    for make, extra in ((gla2, {}), (gta8, {}), (gta8, {"d": 64})):
        cases.append(make(**extra, b=5, length="mix"))
        cases.append(make(**extra, b=64, s_q=4, causal=True, length="moderate"))
    cases.append(gla2(dtype="fp16", b=5, s_q=2, causal=True, length="mix"))
    # 7. Long requests: GLA-2 at 32K, GTA-8 at 16K (2).
    cases += [gla2(s_q=2, causal=True, length=32768, b=2), gta8(length=16384, b=1)]
    return distinct(cases)


test_grid_size, test_fp8_matches_reference = grid_tests(build_grid(), range(80, 111))


@pytest.mark.sm90
@pytest.mark.parametrize("lazy", [False, True], ids=["classic", "lazy"])
@pytest.mark.parametrize("case", [gla2(b=5, s_q=2, causal=True, length="mix"), gta8(b=5, length="mix")],
                         ids=lambda c: c.id)
def test_fp8_metadata_forms(case, lazy):
    """The classic tensors or the lazy get_metadata() object, shared by several 'layers'; same bits twice."""
    check_metadata_reuse(case, lazy)


@pytest.mark.sm90
@pytest.mark.parametrize("case", [gla2(b=4, s_q=2, causal=True, length="graph"), gta8(d=64, b=4, length="graph")],
                         ids=lambda c: c.id)
def test_fp8_cuda_graph_replay_equals_eager(case):
    """get_metadata + decode captured once; each of GRAPH_LENGTHS' problems copied into the static
    inputs and replayed into a NaN-filled out: bitwise the eager call's result, and right."""
    check_graph_replay(case, bitwise_vs_eager=True)


# --- batch invariance ------------------------------------------------------------------------

WATCHED = [0, 5, 4096, 4097, 9000]  # empty, one page, one chunk, just past it, three chunks
OTHERS = [1, 63, 700, 3000, 20_000, 64, 129, 0]


def take(inp: DecodeInputs, rows: list[int]) -> DecodeInputs:
    """The batch of the pool's requests ``rows``, in that order (repeats allowed), on the same pages."""
    index = torch.tensor(rows, device="cuda")
    return dataclasses.replace(inp, q=inp.q[index].contiguous(), block_table=inp.block_table[index],
                               cache_seqlens=inp.cache_seqlens[index].contiguous(),
                               lengths=[inp.lengths[r] for r in rows])


@pytest.mark.sm90
@pytest.mark.parametrize("case", [gla2(s_q=2, causal=True, length="pool", b=13), gta8(length="pool", b=13)],
                         ids=lambda c: c.id)
def test_fp8_batch_invariant_bits_do_not_depend_on_the_batch(case):
    """enable_batch_invariant=True: a request's out and lse are bitwise the same in every batch."""
    lengths = WATCHED + OTHERS
    assert case.b == len(lengths)
    pool = case.variant.make_inputs(case, lengths)
    rows_per_head_k = case.s_q * case.h_q // case.h_kv

    def decode(inp):
        meta = flash_gla.get_metadata(inp.cache_seqlens, rows_per_head_k, case.h_kv, enable_batch_invariant=True)
        return case.variant.decode(inp, case.dv, *meta, causal=case.causal, enable_batch_invariant=True)

    full_out, full_lse = decode(pool)
    ref, lse_ref = case.variant.reference(pool, case.dv, causal=case.causal)
    assert_close(full_out, ref, full_lse, lse_ref, f"{case.id}-batch-invariant", kv_fp8=True)
    rng = random.Random(1)
    n = len(lengths)
    batches = [[w] for w in range(len(WATCHED))] + [
        list(reversed(range(n))),
        rng.sample(range(n), 5),
        [rng.randrange(n) for _ in range(40)] + list(range(len(WATCHED))),
    ]
    for rows in batches:
        out, lse = decode(take(pool, rows))
        for k, r in enumerate(rows):
            assert same_bits(out[k], full_out[r]) and same_bits(lse[k], full_lse[r]), (
                f"[{case.id}] request {r} (length {lengths[r]}) at position {k} of a batch of {len(rows)}: bits "
                f"differ from the full batch's")


# --- cache contents and layouts ----------------------------------------------------------------


@pytest.mark.sm90
@pytest.mark.parametrize("case", [gla2(b=3, s_q=2, causal=True, length=1000), gta8(d=64, b=3, length=1000)],
                         ids=lambda c: c.id)
def test_fp8_zero_group_rows(case):
    """Groups of zeros are stored as e4m3 zeros with scale 1 (quantize_kv_ref, write_kvcache): whole
    zero rows and single zero groups among the valid tokens decode right."""
    inp = case.variant.make_inputs(case)
    groups = inp.kv_scale.shape[-1]
    for i, length in enumerate(inp.lengths):
        for t in range(0, length, 7):  # every 7th token: all heads' rows zero (K = [0, rope], V = 0)
            page, row = int(inp.block_table[i, t // PAGE]), t % PAGE
            raw(inp.kv_cache)[page, row] = 0
            inp.kv_scale[page, row] = 1.0
        for t in range(3, length, 11):  # every 11th token: the last group of KV head 0 only
            page, row = int(inp.block_table[i, t // PAGE]), t % PAGE
            raw(inp.kv_cache)[page, row, 0, (groups - 1) * 128:] = 0
            inp.kv_scale[page, row, 0, groups - 1] = 1.0
    out = empty_out(case)
    got, lse = case.variant.decode(inp, case.dv, *case_metadata(case, inp), causal=case.causal, out=out)
    ref, lse_ref = case.variant.reference(inp, case.dv, causal=case.causal)
    assert_close(got, ref, lse, lse_ref, f"{case.id}-zero-groups", kv_fp8=True)


@pytest.mark.sm90
@pytest.mark.parametrize("case", [gla2(b=4, s_q=2, causal=True, length="written"),
                                  gta8(b=4, s_q=2, causal=True, length="written")], ids=lambda c: c.id)
def test_fp8_cache_written_by_write_kvcache(case):
    """An engine step: write_kvcache quantises the step's new tokens into the poisoned FP8 cache
    (bit for bit write_kvcache_ref), then the decode reads them."""
    dtype = DTYPES[case.dtype]
    lengths = [5 + case.s_q, 700 + case.s_q, case.s_q, 3000 + case.s_q]
    inp = case.variant.make_inputs(case, lengths)
    slots = torch.tensor([int(inp.block_table[i, p // PAGE]) * PAGE + p % PAGE for i, n in enumerate(lengths)
                          for p in range(n - case.s_q, n)], dtype=torch.int64, device="cuda")
    new_kv = torch.randn(len(slots), case.h_kv, case.d, device="cuda").to(dtype)
    new_kv[::3, :, :128] = 0  # zero groups among the new tokens
    new_rope = torch.randn(len(slots), case.d_rope, device="cuda").to(dtype)
    # The reference quantises on the CPU: torch's CUDA float -> e4m3 conversion may round twice
    # (seen 1 ulp off on an H100), the writer and the CPU conversion round once.
    want = [x.cpu() for x in (inp.kv_cache, inp.rope_cache, inp.kv_scale)]
    write_kvcache_ref(want[0], slots.cpu(), new_kv.cpu(), new_rope.cpu(), rope_cache=want[1], kv_scale=want[2])
    flash_gla.write_kvcache(inp.kv_cache, slots, new_kv, new_rope, rope_cache=inp.rope_cache, kv_scale=inp.kv_scale)
    for name, got, expected in zip(("kv_cache", "rope_cache", "kv_scale"), (inp.kv_cache.cpu(), inp.rope_cache.cpu(),
                                                                            inp.kv_scale.cpu()), want):
        assert same_bits(got, expected), f"[{case.id}] write_kvcache's {name} differs from write_kvcache_ref's: " + \
            _first_difference(got, expected)
    out = empty_out(case)
    got, lse = case.variant.decode(inp, case.dv, *case_metadata(case, inp), causal=case.causal, out=out)
    ref, lse_ref = case.variant.reference(inp, case.dv, causal=case.causal)
    assert_close(got, ref, lse, lse_ref, f"{case.id}-written", kv_fp8=True)


def _first_difference(got: torch.Tensor, expected: torch.Tensor) -> str:
    """Where two tensors' bits differ: how many elements, and the first one's index and bits."""
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
    differ = (got.view(int_type) != expected.view(int_type)).nonzero()
    if len(differ) == 0:
        return "no difference"
    first = tuple(differ[0].tolist())
    return (f"{len(differ)} elements, first at {first}: got bits {int(got.view(int_type)[first])}, "
            f"expected {int(expected.view(int_type)[first])}")


@pytest.mark.sm90
@pytest.mark.parametrize("case", [gla2(b=5, s_q=2, causal=True, length="mix"), gta8(b=5, length="mix")],
                         ids=lambda c: c.id)
def test_fp8_strided_cache_and_scales(case):
    """A cache inside a larger allocation (strides multiples of 16 elements) and kv_scale with odd
    strides: the same bits as the contiguous tensors."""
    inp = case.variant.make_inputs(case)
    nb, page, h_kv, d = inp.kv_cache.shape
    wide = torch.full((nb, page, h_kv + 1, d + 16), 0x7F, dtype=torch.uint8, device="cuda")
    kv = wide[:, :, 1:, 16:].view(torch.float8_e4m3fn)
    raw(kv).copy_(raw(inp.kv_cache))
    groups = inp.kv_scale.shape[-1]
    scale = torch.full((nb, page + 1, h_kv, groups + 3), math.nan, device="cuda")[:, 1:, :, 1:1 + groups]
    scale.copy_(inp.kv_scale)
    assert not kv.is_contiguous() and not scale.is_contiguous()
    meta = case_metadata(case, inp)
    want_out, want_lse = case.variant.decode(inp, case.dv, *meta, causal=case.causal)
    got_out, got_lse = case.variant.decode(dataclasses.replace(inp, kv_cache=kv, kv_scale=scale), case.dv, *meta,
                                           causal=case.causal)
    assert same_bits(got_out, want_out) and same_bits(got_lse, want_lse), f"[{case.id}] strided layouts differ"
    ref, lse_ref = case.variant.reference(inp, case.dv, causal=case.causal)
    assert_close(got_out, ref, got_lse, lse_ref, f"{case.id}-strided", kv_fp8=True)


@pytest.mark.sm90
@pytest.mark.parametrize("case", [gla2(b=5, s_q=3, causal=True, length="mix"), gta8(d=64, b=5, length="mix")],
                         ids=lambda c: c.id)
def test_fp8_attn_sink_and_softmax_scale(case):
    inp = case.variant.make_inputs(case)
    sink = torch.randn(case.h_q, device="cuda")
    got, lse = case.variant.decode(inp, case.dv, *case_metadata(case, inp), causal=case.causal, softmax_scale=0.07,
                                   attn_sink=sink)
    ref, lse_ref = case.variant.reference(inp, case.dv, causal=case.causal, softmax_scale=0.07, attn_sink=sink)
    assert_close(got, ref, lse, lse_ref, f"{case.id}-sink-scale0.07", kv_fp8=True)


def test_poisoned_fp8_inputs():
    """The harness's FP8 inputs (CPU): NaN bytes and scales exactly past each length and on unused pages."""
    inp = make_inputs(2, 1, 4, 2, 256, 64, [70, 0], torch.bfloat16, seed=5, shared_rope=True, kv_fp8=True)
    page0, page1 = int(inp.block_table[0, 0]), int(inp.block_table[0, 1])
    nan_rows = raw(inp.kv_cache).eq(0x7F).all(dim=-1).all(dim=-1)  # (num_blocks, 64)
    assert nan_rows.equal(inp.kv_scale.isnan().all(dim=-1).all(dim=-1))
    assert nan_rows.equal(inp.rope_cache.isnan().all(dim=-1).all(dim=-1))
    valid = torch.zeros_like(nan_rows)
    valid[page0, :] = True
    valid[page1, :6] = True  # 70 = 64 + 6 tokens
    assert nan_rows.equal(~valid)
    assert torch.isfinite(inp.kv_scale[valid]).all() and (inp.kv_scale[valid] > 0).all()
    assert not raw(inp.kv_cache)[valid].eq(0x7F).any() and not raw(inp.kv_cache)[valid].eq(0xFF).any()
