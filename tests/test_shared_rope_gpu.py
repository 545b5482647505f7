"""GTA and GLA with a shared RoPE cache against the reference on an sm_90 GPU.

Same discipline as test_decode_gpu.py (NaN-poisoned rows past each length and spare pages,
garbage block-table entries, NaN-filled outputs), for the two layouts whose RoPE key is
stored once per token for all KV heads:

* ``gta``: gta_with_kvcache, tied states of d = 128 (d_rope 64) or d = 64 (d_rope 32);
* ``glarope``: gla_with_kvcache(..., rope_cache=...), 256 latent dims + 64 shared RoPE dims.

Ids read like the configuration: ``gta-d128-h32kv8-bf16-sq2-causal-L4113-b3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import SeededGridCase, assert_close, capture_graph, make_inputs

import flash_gla
from flash_gla.reference import gather_rows, gla_with_kvcache_ref, gta_with_kvcache_ref

pytestmark = pytest.mark.sm90

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
D_ROPE = {("gta", 128): 64, ("gta", 64): 32, ("glarope", 256): 64}
LENGTHS = [0, 1, 63, 64, 65, 1000, 4113]
# (h_q, h_kv): 1 to 16 KV heads, 1 to 16 query heads per KV head.
GTA_HEADS = [(32, 8), (8, 8), (16, 1), (48, 16), (256, 16), (6, 2)]
GLA_HEADS = [(128, 2), (64, 1), (16, 2), (128, 8)]


@dataclass(frozen=True)
class Case(SeededGridCase):
    kind: str  # "gta" or "glarope"
    d: int  # gta: tied-state width; glarope: latent width (head_dim_v)
    h_q: int
    h_kv: int
    dtype: str
    s_q: int
    causal: bool
    length: int | str
    b: int

    @property
    def id(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"{self.kind}-d{self.d}-h{self.h_q}kv{self.h_kv}-{self.dtype}-sq{self.s_q}-{mask}-L{self.length}-b{self.b}"

    @property
    def d_rope(self) -> int:
        return D_ROPE[(self.kind, self.d)]



def build_grid() -> list[Case]:
    cases = []
    # 1. GTA-8 (h_q 32, h_kv 8, d 128): every length x s_q x causal (56).
    for length in LENGTHS:
        for s_q in (1, 2, 4, 8):
            for causal in (False, True):
                cases.append(Case("gta", 128, 32, 8, "bf16", s_q, causal, length, 3))
    # 2. GTA head layouts x both widths, page-edge and long lengths (48).
    for h_q, h_kv in GTA_HEADS:
        for d in (128, 64):
            for length in (65, 4113):
                for s_q, causal in ((1, False), (8, True)):
                    cases.append(Case("gta", d, h_q, h_kv, "bf16", s_q, causal, length, 3))
    # 3. fp16 over the lengths, both widths (14).
    for d in (128, 64):
        for length in LENGTHS:
            cases.append(Case("gta", d, 32, 8, "fp16", 2, True, length, 3))
    # 4. GTA varlen batches with empty and long requests (24).
    for d in (128, 64):
        for h_q, h_kv in ((32, 8), (16, 1), (256, 16)):
            for s_q in (1, 4):
                for b, pattern in ((5, "mix"), (64, "moderate")):
                    cases.append(Case("gta", d, h_q, h_kv, "bf16", s_q, s_q > 1, pattern, b))
    # 5. GLA with shared RoPE: head layouts x lengths x s_q (48), fp16 (8), varlen (16).
    for h_q, h_kv in GLA_HEADS:
        for length in (1, 65, 4113):
            for s_q in (1, 3):
                for causal in (False, True):
                    cases.append(Case("glarope", 256, h_q, h_kv, "bf16", s_q, causal, length, 3))
        for s_q in (2, 8):
            cases.append(Case("glarope", 256, h_q, h_kv, "fp16", s_q, True, 1000, 3))
        for s_q in (1, 4):
            for b, pattern in ((5, "mix"), (64, "moderate")):
                cases.append(Case("glarope", 256, h_q, h_kv, "bf16", s_q, s_q > 1, pattern, b))
    # 6. One request split over many parts; the 1024-row limit (4).
    cases.append(Case("gta", 128, 32, 8, "bf16", 1, False, 16384, 1))
    cases.append(Case("gta", 64, 16, 1, "bf16", 4, True, 16384, 1))
    cases.append(Case("glarope", 256, 128, 2, "bf16", 2, True, 16384, 1))
    cases.append(Case("glarope", 256, 128, 1, "bf16", 8, True, 4113, 2))
    unique = {case.id: case for case in cases}
    return list(unique.values())


CASES = build_grid()


def inputs_for(case: Case, seed: int | None = None, **kwargs):
    q_dim = case.d if case.kind == "gta" else None
    return make_inputs(
        case.b, case.s_q, case.h_q, case.h_kv, case.d, case.d_rope, case.lengths(), DTYPES[case.dtype], "cuda",
        case.seed if seed is None else seed, shared_rope=True, q_dim=q_dim, **kwargs,
    )


def run_kernel(case: Case, inp, out=None, meta=None):
    if meta is None:
        meta = flash_gla.get_metadata(inp.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv)
    if case.kind == "gta":
        return flash_gla.gta_with_kvcache(
            inp.q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, *meta,
            causal=case.causal, out=out,
        )
    return flash_gla.gla_with_kvcache(
        inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, case.d, *meta,
        causal=case.causal, out=out, rope_cache=inp.rope_cache,
    )


def reference(case: Case, inp):
    if case.kind == "gta":
        return gta_with_kvcache_ref(
            inp.q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, causal=case.causal
        )
    return gla_with_kvcache_ref(
        inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, case.d, causal=case.causal,
        rope_cache=inp.rope_cache,
    )


def nan_out(case: Case) -> torch.Tensor:
    return torch.full((case.b, case.s_q, case.h_q, case.d), math.nan, dtype=DTYPES[case.dtype], device="cuda")


def test_grid_size():
    assert 150 <= len(CASES) <= 400, len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_shared_rope_matches_reference(case):
    inp = inputs_for(case)
    out = nan_out(case)
    got, lse = run_kernel(case, inp, out=out)
    assert got.data_ptr() == out.data_ptr(), "the op must write into the given out"
    ref, lse_ref = reference(case, inp)
    assert_close(got, ref, lse, lse_ref, case.id)


@pytest.mark.parametrize(
    "case",
    [Case("gta", 128, 32, 8, "bf16", 1, False, "mix", 5), Case("gta", 64, 16, 4, "fp16", 4, True, "mix", 5)],
    ids=lambda c: c.id,
)
def test_gta_equals_attention_on_materialised_keys(case):
    """GTA == plain GQA attention (torch SDPA, fp32) on explicitly built K = [kv[:d-d_rope], rope], V = kv."""
    inp = inputs_for(case)
    got, lse = run_kernel(case, inp)
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


@pytest.mark.parametrize("s_q, pattern", [(1, "mix"), (4, "mix"), (2, 4113)])
def test_gla_shared_rope_equals_rope_copied_per_head(s_q, pattern):
    """gla_with_kvcache(rope_cache=R) == gla_with_kvcache on rows [latent | R] (R copied per head)."""
    case = Case("glarope", 256, 128, 2, "bf16", s_q, s_q > 1, pattern, 5)
    inp = inputs_for(case)
    shared, lse_shared = run_kernel(case, inp)
    inline_cache = torch.cat([inp.kv_cache, inp.rope_cache.expand(-1, -1, case.h_kv, -1)], dim=-1).contiguous()
    meta = flash_gla.get_metadata(inp.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv)
    inline, lse_inline = flash_gla.gla_with_kvcache(
        inp.q, inline_cache, inp.block_table, inp.cache_seqlens, 256, *meta, causal=case.causal
    )
    assert_close(shared, inline, lse_shared, lse_inline, case.id + "-vs-inline")


def test_gta_cuda_graph_capture_and_replay():
    case = Case("gta", 128, 32, 8, "bf16", 2, True, "graph", 4)
    shape = dict(max_pages=50, num_blocks=140)
    first, second = [100, 0, 3000, 65], [2000, 3200, 0, 1]
    make = lambda lengths, seed: make_inputs(  # noqa: E731
        case.b, case.s_q, case.h_q, case.h_kv, case.d, case.d_rope, lengths, torch.bfloat16, "cuda", seed,
        shared_rope=True, q_dim=case.d, **shape,
    )
    static = make(first, 1)
    out = torch.empty(case.b, case.s_q, case.h_q, case.d, dtype=torch.bfloat16, device="cuda")

    def step():
        meta = flash_gla.get_metadata(static.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv)
        return flash_gla.gta_with_kvcache(
            static.q, static.kv_cache, static.rope_cache, static.block_table, static.cache_seqlens, *meta,
            causal=True, out=out,
        )

    graph, (_, lse) = capture_graph(step)

    for lengths, seed in ((first, 1), (second, 2)):
        new = make(lengths, seed)
        for dst, src in ((static.q, new.q), (static.kv_cache, new.kv_cache), (static.rope_cache, new.rope_cache),
                         (static.block_table, new.block_table), (static.cache_seqlens, new.cache_seqlens)):
            dst.copy_(src)
        out.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        ref, lse_ref = gta_with_kvcache_ref(
            new.q, new.kv_cache, new.rope_cache, new.block_table, new.cache_seqlens, causal=True
        )
        assert_close(out, ref, lse, lse_ref, f"{case.id}-replay-L{'_'.join(map(str, lengths))}")


def test_gta_lazy_metadata_shared_across_layers():
    """One lazy SchedulerMetadata for several GTA 'layers' of one decode step."""
    case = Case("gta", 128, 32, 8, "bf16", 2, True, "mix", 5)
    inp = inputs_for(case)
    sched, placeholder = flash_gla.get_metadata()
    assert placeholder is None
    for layer in range(2):
        q = inp.q if layer == 0 else torch.randn_like(inp.q)
        got, lse = flash_gla.gta_with_kvcache(
            q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, sched, None, causal=True
        )
        ref, lse_ref = gta_with_kvcache_ref(q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, causal=True)
        assert_close(got, ref, lse, lse_ref, f"{case.id}-lazy-layer{layer}")
    assert sched.have_initialized


def test_gta_custom_softmax_scale():
    case = Case("gta", 64, 16, 4, "bf16", 3, True, "mix", 5)
    inp = inputs_for(case)
    meta = flash_gla.get_metadata(inp.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv)
    scale = 0.3
    got, lse = flash_gla.gta_with_kvcache(
        inp.q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, *meta, softmax_scale=scale, causal=True
    )
    ref, lse_ref = gta_with_kvcache_ref(
        inp.q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, softmax_scale=scale, causal=True
    )
    assert_close(got, ref, lse, lse_ref, case.id + "-scale0.3")
