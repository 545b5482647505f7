"""The transposed GTA instances against the reference on an sm_90 GPU.

A KV head with at most 16 packed query rows (s_q * h_q / h_kv <= 16) runs on a transposed
instance (the page's tokens as the wgmma's M, the query rows its N: gta_d*_t8 for up to 8
rows, gta_d*_t16 for up to 16, FP8 caches alike; hopper/decode/instances/generate.py);
more rows on the 64-row instances. This grid takes every group size 1-16 at s_q 1 and at the
largest s_q that stays transposed, and where there is one the next s_q, which does not (so
both sides of the 8/9 and 16/17-row boundaries); both widths and dtypes, causal and not, page-edge, long
and varlen lengths with empty requests, FP8 caches, through the harness of test_decode_gpu.py (NaN-poisoned
rows past each length and spare pages, garbage block-table entries, NaN-filled outputs).
Sinks, batch invariance and CUDA graphs of transposed shapes are in test_engine_features_gpu.py,
test_batch_invariant_gpu.py and below.
"""

from __future__ import annotations

import pytest
import torch
from helpers import PAGE, assert_close, case_metadata, check_graph_replay, distinct, empty_out, grid_tests, gta_case

TRANSPOSED_ROWS = 16  # the query columns of the widest transposed instances (*_t16)
LENGTHS = [1, 63, 65, 4113, "mix"]


def build_grid():
    cases = []
    for g in range(1, 17):
        h_kv = (1, 2, 4, 8)[g % 4]
        largest = min(8, TRANSPOSED_ROWS // g)
        s_qs = {1, largest} | ({largest + 1} if largest < 8 else set())
        length = LENGTHS[g % len(LENGTHS)]
        for i, s_q in enumerate(sorted(s_qs)):
            cases.append(gta_case(d=128 if (g + i) % 2 else 64, h_q=g * h_kv, h_kv=h_kv,
                                  dtype="fp16" if (g + i) % 3 == 0 else "bf16", s_q=s_q,
                                  causal=s_q > 1 and (g + i) % 4 != 1, length=length,
                                  b=5 if length == "mix" else 3))
    # An FP8 cache (dequantised into the same stages), both widths, at and below the capacity.
    cases += [gta_case(d=d, fp8=True, s_q=s_q, causal=s_q > 1, length=length, b=b)
              for d, s_q, length, b in ((128, 1, 4113, 3), (128, 4, "mix", 5), (64, 2, 65, 3), (64, 4, "mix", 5))]
    # A request split over many parts at both widths, at the transposed capacity.
    cases.append(gta_case(d=128, h_q=16, h_kv=1, s_q=1, length=16384, b=1))
    cases.append(gta_case(d=64, h_q=32, h_kv=8, s_q=4, causal=True, length=16384, b=1))
    return distinct(cases)


test_grid_size, test_transposed_matches_reference = grid_tests(build_grid(), range(40, 60))


@pytest.mark.sm90
@pytest.mark.parametrize("d", [128, 64])
def test_transposed_cuda_graph_capture_and_replay(d):
    check_graph_replay(gta_case(d=d, h_q=32, h_kv=8, s_q=2, causal=True, length="graph", b=4))


def scale_along_sequence(inp, rising: bool) -> None:
    """Multiply each request's cached key rows (latent and RoPE; an FP8 cache's scales) by 1 to 8,
    growing geometrically with the token's position (or falling): for GTA-8's 4 query heads the
    running maximum of some head's scores then rises on about 2 pages in 3 of a 4K request (on
    about 1 in 20 when falling), so that both ways through a page are taken."""
    for i, n in enumerate(inp.lengths):
        pos = torch.arange(n, device="cuda")
        frac = pos.float() / max(n - 1, 1)
        factor = torch.exp2(3 * (frac if rising else 1 - frac))[:, None, None]
        pages, rows = inp.block_table[i, pos // PAGE].long(), pos % PAGE
        if inp.kv_scale is not None:
            inp.kv_scale[pages, rows] *= factor
        else:
            inp.kv_cache[pages, rows] = (inp.kv_cache[pages, rows].float() * factor).to(inp.kv_cache.dtype)
        inp.rope_cache[pages, rows] = (inp.rope_cache[pages, rows].float() * factor).to(inp.rope_cache.dtype)


SCORE_TREND_CASES = [
    gta_case(length=4113),
    gta_case(d=64, h_q=16, h_kv=4, dtype="fp16", s_q=4, causal=True, length="mix", b=5),
    gta_case(h_q=16, h_kv=1, s_q=1, length=16384, b=1),  # split over parts
    gta_case(fp8=True, length=4113),
    gta_case(fp8=True, s_q=4, causal=True, length="mix", b=5),
]


@pytest.mark.sm90
@pytest.mark.parametrize("rising", [True, False], ids=["rising", "falling"])
@pytest.mark.parametrize("case", SCORE_TREND_CASES, ids=lambda c: c.id)
def test_transposed_scores_rising_or_falling_along_the_sequence(case, rising):
    """The transposed consumer combines its warps' column maxima only on pages that raise one:
    scores that climb along the sequence (most pages do) and scores that fall (few do) match."""
    inp = case.variant.make_inputs(case)
    scale_along_sequence(inp, rising)
    got, lse = case.variant.decode(inp, case.dv, *case_metadata(case, inp), causal=case.causal, out=empty_out(case))
    ref, lse_ref = case.variant.reference(inp, case.dv, causal=case.causal)
    assert_close(got, ref, lse, lse_ref, case.id + ("-rising" if rising else "-falling"), kv_fp8=case.fp8)
