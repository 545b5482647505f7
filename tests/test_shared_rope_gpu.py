"""GTA and GLA with the RoPE key stored once against the reference on an sm_90 GPU.

The same harness as test_decode_gpu.py (helpers.py: NaN-poisoned rows past each length and
spare pages, garbage block-table entries, NaN-filled outputs), for the two variants whose RoPE
key is stored once per token for all KV heads:

* ``gta``: gta_with_kvcache, tied states of d = 128 (d_rope 64) or d = 64 (d_rope 32);
* ``gla_rope1``: gla_with_kvcache(..., rope_cache=...), 256 latent dims + 64 shared RoPE dims.

Ids read like the configuration: ``gta-d128-h32kv8-bf16-sq2-causal-L4113-b3``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    GLA,
    assert_close,
    case_metadata,
    check_case,
    check_graph_replay,
    check_metadata_reuse,
    distinct,
    gla_rope1_case,
    grid,
    grid_tests,
    gta_case,
)
from helpers import SharedRopeCase as Case

from flash_gla.reference import gather_rows

LENGTHS = [0, 1, 63, 64, 65, 1000, 4113]
# (h_q, h_kv): 1 to 16 KV heads, 1 to 16 query heads per KV head.
GTA_HEADS = [(32, 8), (8, 8), (16, 1), (48, 16), (256, 16), (6, 2)]
GLA_HEADS = [(128, 2), (64, 1), (16, 2), (128, 8)]
VARLEN_BATCHES = ((5, "mix"), (64, "moderate"))  # (b, VARLEN key)


def build_grid() -> list[Case]:
    cases = []
    # 1. GTA-8 (h_q 32, h_kv 8, d 128): every length x s_q x causal (56).
    cases += grid(gta_case, length=LENGTHS, s_q=(1, 2, 4, 8), causal=(False, True))
    # 2. GTA head layouts x both widths, page-edge and long lengths (48).
    cases += grid(gta_case, h_q__h_kv=GTA_HEADS, d=(128, 64), length=(65, 4113), s_q__causal=((1, False), (8, True)))
    # 3. fp16 over the lengths, both widths (14).
    cases += grid(functools.partial(gta_case, dtype="fp16", s_q=2, causal=True), d=(128, 64), length=LENGTHS)
    # 4. GTA varlen batches with empty and long requests (24).
    cases += grid(gta_case, d=(128, 64), h_q__h_kv=((32, 8), (16, 1), (256, 16)), s_q__causal=((1, False), (4, True)),
                  b__length=VARLEN_BATCHES)
    # 5. GLA with shared RoPE: head layouts x lengths x s_q (48), fp16 (8), varlen (16).
    for h_q, h_kv in GLA_HEADS:
        gla = functools.partial(gla_rope1_case, h_q=h_q, h_kv=h_kv)
        cases += grid(gla, length=(1, 65, 4113), s_q=(1, 3), causal=(False, True))
        cases += grid(functools.partial(gla, dtype="fp16", causal=True, length=1000), s_q=(2, 8))
        cases += grid(gla, s_q__causal=((1, False), (4, True)), b__length=VARLEN_BATCHES)
    # 6. One request split over many parts; the 1024-row limit (4).
    cases.append(Case("gta", 128, 32, 8, "bf16", 1, False, 16384, 1))
    cases.append(Case("gta", 64, 16, 1, "bf16", 4, True, 16384, 1))
    cases.append(Case("gla_rope1", 256, 128, 2, "bf16", 2, True, 16384, 1))
    cases.append(Case("gla_rope1", 256, 128, 1, "bf16", 8, True, 4113, 2))
    return distinct(cases)


test_grid_size, test_shared_rope_matches_reference = grid_tests(build_grid(), range(150, 401))


@pytest.mark.sm90
@pytest.mark.parametrize(
    "case",
    [Case("gta", 128, 32, 8, "bf16", 1, False, "mix", 5), Case("gta", 64, 16, 4, "fp16", 4, True, "mix", 5)],
    ids=lambda c: c.id,
)
def test_gta_equals_attention_on_materialised_keys(case):
    """GTA == plain GQA attention (torch SDPA, fp32) on explicitly built K = [kv[:d-d_rope], rope], V = kv."""
    inp = case.variant.make_inputs(case)
    got, lse = case.variant.decode(inp, case.dv, *case_metadata(case, inp), causal=case.causal)
    d, d_rope, g = case.d, case.d_rope, case.h_q // case.h_kv
    for i, length in enumerate(inp.lengths):
        rows = gather_rows(inp.kv_cache, inp.block_table[i], length).float()  # (L, h_kv, d)
        rope = gather_rows(inp.rope_cache, inp.block_table[i], length).float()  # (L, 1, d_rope)
        keys = torch.cat([rows[..., : d - d_rope], rope.expand(-1, case.h_kv, -1)], dim=-1)
        k = keys.permute(1, 0, 2).repeat_interleave(g, dim=0)  # (h_q, L, d)
        v = rows.permute(1, 0, 2).repeat_interleave(g, dim=0)
        qi = inp.q[i].float().permute(1, 0, 2)  # (h_q, s_q, d)
        if length == 0:
            assert torch.all(got[i] == 0), f"[{case.id}] request {i} has no keys: out must be 0"
            assert torch.all(lse[i] == math.inf), f"[{case.id}] request {i} has no keys: lse must be +inf"
            continue
        positions = torch.arange(length, device="cuda")
        last = length - case.s_q + torch.arange(case.s_q, device="cuda") if case.causal else torch.full(
            (case.s_q,), length - 1, device="cuda")
        mask = positions[None, :] <= last[:, None]  # (s_q, L)
        sees = mask.any(dim=-1)  # causal rows before the first key see nothing
        got_i = got[i].float().permute(1, 0, 2)  # (h_q, s_q, d)
        assert torch.all(got_i[:, ~sees] == 0), f"[{case.id}] request {i}: rows that see no key must be 0"
        expected = F.scaled_dot_product_attention(qi[:, sees], k, v, attn_mask=mask[sees], scale=d**-0.5)
        rel = (got_i[:, sees] - expected).norm() / expected.norm()
        assert rel < 1e-2, f"[{case.id}] request {i} (L={length}): relative error {rel:.3g} vs SDPA on materialised keys"


@pytest.mark.sm90
@pytest.mark.parametrize("s_q, pattern", [(1, "mix"), (4, "mix"), (2, 4113)])
def test_gla_shared_rope_equals_rope_copied_per_head(s_q, pattern):
    """gla_with_kvcache(rope_cache=R) == gla_with_kvcache on rows [latent | R] (R copied per head)."""
    case = Case("gla_rope1", 256, 128, 2, "bf16", s_q, s_q > 1, pattern, 5)
    inp = case.variant.make_inputs(case)
    meta = case_metadata(case, inp)
    shared, lse_shared = case.variant.decode(inp, case.dv, *meta, causal=case.causal)
    inline_cache = torch.cat([inp.kv_cache, inp.rope_cache.expand(-1, -1, case.h_kv, -1)], dim=-1).contiguous()
    inline_inp = dataclasses.replace(inp, kv_cache=inline_cache, rope_cache=None)
    inline, lse_inline = GLA.decode(inline_inp, case.dv, *meta, causal=case.causal)
    assert_close(shared, inline, lse_shared, lse_inline, case.id + "-vs-inline")


@pytest.mark.sm90
def test_gta_cuda_graph_capture_and_replay():
    check_graph_replay(Case("gta", 128, 32, 8, "bf16", 2, True, "graph", 4))


@pytest.mark.sm90
def test_gta_lazy_metadata_shared_across_layers():
    """One lazy SchedulerMetadata for several GTA 'layers' of one decode step."""
    check_metadata_reuse(Case("gta", 128, 32, 8, "bf16", 2, True, "mix", 5), lazy=True)


@pytest.mark.sm90
def test_gta_custom_softmax_scale():
    check_case(Case("gta", 64, 16, 4, "bf16", 3, True, "mix", 5), softmax_scale=0.3, given_out=False, tag="-scale0.3")
