"""The decode kernel against the reference on an sm_90 GPU (skipped elsewhere, see conftest).

Grid: a base grid for GLA-2 (h_q 128, h_kv 2, dv 256, bf16, b 3) over every length x s_q x
causal, then sweeps that vary one axis at a time from it (heads x dv, dtype, varlen batches,
large batches), so every value of every axis runs and the important pairs meet. Ids read
like the configuration: ``h128kv2-dv256-bf16-sq2-causal-L4113-b3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from helpers import SeededGridCase, assert_close, capture_graph, make_inputs

import flash_gla
from flash_gla.reference import gla_with_kvcache_ref

pytestmark = pytest.mark.sm90

D_ROPE = 64
LENGTHS = [0, 1, 63, 64, 65, 1000, 4113, 16384]
S_QS = [1, 2, 3, 4, 8]
HEADS = [(128, 2), (64, 1), (128, 1), (16, 2), (128, 8)]
DVS = [256, 512]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case(SeededGridCase):
    h_q: int
    h_kv: int
    dv: int
    dtype: str
    s_q: int
    causal: bool
    length: int | str  # one length for every request, or a VARLEN key
    b: int

    @property
    def id(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"h{self.h_q}kv{self.h_kv}-dv{self.dv}-{self.dtype}-sq{self.s_q}-{mask}-L{self.length}-b{self.b}"



def build_grid() -> list[Case]:
    base = dict(h_q=128, h_kv=2, dv=256, dtype="bf16", b=3)
    cases = []
    # 1. Base: every length x s_q x causal (80).
    for length in LENGTHS:
        for s_q in S_QS:
            for causal in (False, True):
                cases.append(Case(**base, s_q=s_q, causal=causal, length=length))
    # 2. Heads x dv: every head layout with both V widths, page-edge and long lengths (120).
    for h_q, h_kv in HEADS:
        for dv in DVS:
            for length in (1, 65, 4113):
                for s_q in (1, 3):
                    for causal in (False, True):
                        cases.append(Case(h_q, h_kv, dv, "bf16", s_q, causal, length, 3))
    # 3. fp16: the base lengths at s_q 1 and 4 (32), and the other head layouts (20).
    for length in LENGTHS:
        for s_q in (1, 4):
            for causal in (False, True):
                cases.append(Case(**{**base, "dtype": "fp16"}, s_q=s_q, causal=causal, length=length))
    for h_q, h_kv in HEADS:
        for dv in DVS:
            for s_q in (2, 8):
                cases.append(Case(h_q, h_kv, dv, "fp16", s_q, True, 1000, 3))
    # 4. Varlen batches mixing empty and long requests, every head layout and dv (80).
    for h_q, h_kv in HEADS:
        for dv in DVS:
            for s_q in (1, 4):
                for b, pattern in ((5, "mix"), (64, "moderate")):
                    cases.append(Case(h_q, h_kv, dv, "bf16", s_q, s_q > 1, pattern, b))
    # 5. Large batches, moderate lengths: many requests per scheduler part (24).
    for h_q, h_kv, dv in ((128, 2, 256), (128, 1, 512), (64, 1, 256), (16, 2, 256)):
        for b in (64, 300):
            for s_q, causal, length in ((1, False, "moderate"), (2, True, "moderate"), (1, True, 1000)):
                cases.append(Case(h_q, h_kv, dv, "bf16", s_q, causal, length, b))
    # 6. One request (split over many parts at long lengths), GLA-2 and MLA (24).
    for length in LENGTHS:
        cases.append(Case(**{**base, "b": 1}, s_q=1, causal=False, length=length))
        cases.append(Case(**{**base, "b": 1}, s_q=4, causal=True, length=length))
        cases.append(Case(128, 1, 512, "bf16", 2, True, length, 1))
    # 7. MLA (h_q 128, h_kv 1, dv 512) over every length at b 3 (16).
    for length in LENGTHS:
        for s_q in (1, 2):
            cases.append(Case(128, 1, 512, "bf16", s_q, True, length, 3))
    # 8. Queries per KV head at the 1024-row limit.
    cases.append(Case(128, 1, 512, "bf16", 8, True, 4113, 3))
    cases.append(Case(128, 1, 256, "fp16", 8, False, "mix", 5))

    unique = {case.id: case for case in cases}  # sweeps may revisit a base case
    return list(unique.values())


CASES = build_grid()


def inputs_for(case: Case, **kwargs):
    return make_inputs(
        case.b, case.s_q, case.h_q, case.h_kv, case.dv, D_ROPE, case.lengths(),
        DTYPES[case.dtype], "cuda", case.seed, **kwargs,
    )


def nan_out(case: Case) -> torch.Tensor:
    return torch.full((case.b, case.s_q, case.h_q, case.dv), math.nan, dtype=DTYPES[case.dtype], device="cuda")


def run_kernel(case: Case, inp, out=None, softmax_scale=None):
    meta, num_splits = flash_gla.get_metadata(inp.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv)
    return flash_gla.gla_with_kvcache(
        inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, case.dv, meta, num_splits,
        softmax_scale=softmax_scale, causal=case.causal, out=out,
    )


def reference(case: Case, inp, softmax_scale=None):
    return gla_with_kvcache_ref(
        inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, case.dv, softmax_scale, case.causal
    )


def test_grid_size():
    assert len(CASES) <= 600, len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decode_matches_reference(case):
    inp = inputs_for(case)
    out = nan_out(case)
    got, lse = run_kernel(case, inp, out=out)
    assert got.data_ptr() == out.data_ptr(), "gla_with_kvcache must write into the given out"
    ref, lse_ref = reference(case, inp)
    assert_close(got, ref, lse, lse_ref, case.id)


def test_custom_softmax_scale_and_allocated_out():
    case = Case(128, 2, 256, "bf16", 2, True, "mix", 5)
    inp = inputs_for(case)
    scale = 0.37 / math.sqrt(320)
    got, lse = run_kernel(case, inp, softmax_scale=scale)
    ref, lse_ref = reference(case, inp, softmax_scale=scale)
    assert_close(got, ref, lse, lse_ref, case.id + "-scale0.37")


def test_metadata_reuse_is_deterministic():
    """One metadata for several calls (as for the layers of one decode step)."""
    case = Case(128, 2, 256, "bf16", 2, True, "mix", 17)
    inp = inputs_for(case)
    meta, num_splits = flash_gla.get_metadata(inp.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv)
    args = (inp.kv_cache, inp.block_table, inp.cache_seqlens, case.dv, meta, num_splits)
    out1, lse1 = flash_gla.gla_with_kvcache(inp.q, *args, causal=True)
    out2, lse2 = flash_gla.gla_with_kvcache(inp.q, *args, causal=True)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2), "same inputs and metadata must give identical bits"
    ref, lse_ref = reference(case, inp)
    assert_close(out1, ref, lse1, lse_ref, case.id)
    # Another "layer": new queries, same metadata.
    q2 = torch.randn_like(inp.q)
    out3, lse3 = flash_gla.gla_with_kvcache(q2, *args, causal=True)
    ref3, lse_ref3 = gla_with_kvcache_ref(q2, inp.kv_cache, inp.block_table, inp.cache_seqlens, case.dv, causal=True)
    assert_close(out3, ref3, lse3, lse_ref3, case.id + "-layer2")


def test_cuda_graph_capture_and_replay():
    """get_metadata + decode captured in a CUDA graph; new data copied into the static inputs."""
    case = Case(128, 2, 256, "bf16", 2, True, "graph", 4)
    shape = dict(max_pages=50, num_blocks=140)  # same buffers for both sets of lengths
    first = [100, 0, 3000, 65]
    second = [2000, 3200, 0, 1]
    make = lambda lengths, seed: make_inputs(  # noqa: E731
        case.b, case.s_q, case.h_q, case.h_kv, case.dv, D_ROPE, lengths, torch.bfloat16, "cuda", seed, **shape
    )
    static = make(first, 1)
    out = torch.empty(case.b, case.s_q, case.h_q, case.dv, dtype=torch.bfloat16, device="cuda")

    def step():
        meta, num_splits = flash_gla.get_metadata(static.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv)
        return flash_gla.gla_with_kvcache(
            static.q, static.kv_cache, static.block_table, static.cache_seqlens, case.dv,
            meta, num_splits, causal=True, out=out,
        )

    graph, (_, lse) = capture_graph(step)

    for lengths, seed in ((first, 1), (second, 2)):
        new = make(lengths, seed)
        for dst, src in ((static.q, new.q), (static.kv_cache, new.kv_cache),
                         (static.block_table, new.block_table), (static.cache_seqlens, new.cache_seqlens)):
            dst.copy_(src)
        out.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        ref, lse_ref = gla_with_kvcache_ref(new.q, new.kv_cache, new.block_table, new.cache_seqlens, case.dv, causal=True)
        assert_close(out, ref, lse, lse_ref, f"{case.id}-replay-L{'_'.join(map(str, lengths))}")


def test_lazy_scheduler_metadata():
    case = Case(128, 2, 256, "bf16", 2, True, "mix", 5)
    inp = inputs_for(case)
    sched, placeholder = flash_gla.get_metadata()
    assert placeholder is None
    args = (inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, case.dv, sched, None)
    out1, lse1 = flash_gla.gla_with_kvcache(*args, causal=True)
    assert sched.have_initialized and sched.tile_scheduler_metadata.dtype == torch.int32
    assert sched.num_splits.shape == (case.b + 1,)
    out2, lse2 = flash_gla.gla_with_kvcache(*args, causal=True)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    ref, lse_ref = reference(case, inp)
    assert_close(out1, ref, lse1, lse_ref, case.id + "-lazy")

    with pytest.raises(ValueError, match=r"causal True -> False"):
        flash_gla.gla_with_kvcache(*args, causal=False)
    bigger = make_inputs(case.b + 1, case.s_q, case.h_q, case.h_kv, case.dv, D_ROPE, 100, torch.bfloat16, "cuda", 3)
    with pytest.raises(ValueError, match=r"batch 5 -> 6"):
        flash_gla.gla_with_kvcache(
            bigger.q, bigger.kv_cache, bigger.block_table, bigger.cache_seqlens, case.dv, sched, None, causal=True
        )


def test_flash_mla_call_convention():
    """A FlashMLA call site (keywords, k_cache=) with only the import changed."""
    case = Case(128, 1, 512, "bf16", 1, True, "mix", 5)
    inp = inputs_for(case)
    meta, num_splits = flash_gla.get_mla_metadata(inp.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv)
    out, lse = flash_gla.flash_mla_with_kvcache(
        q=inp.q, k_cache=inp.kv_cache, block_table=inp.block_table, cache_seqlens=inp.cache_seqlens,
        head_dim_v=case.dv, tile_scheduler_metadata=meta, num_splits=num_splits,
        softmax_scale=576**-0.5, causal=True,
    )
    ref, lse_ref = reference(case, inp)
    assert_close(out, ref, lse, lse_ref, case.id + "-flashmla")


def test_metadata_for_other_shape_is_rejected():
    case = Case(128, 2, 256, "bf16", 1, False, 100, 3)
    inp = inputs_for(case)
    meta, num_splits = flash_gla.get_metadata(inp.cache_seqlens, 64, 2)
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata.shape\[0\] must be"):
        flash_gla.gla_with_kvcache(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, case.dv, meta[1:], num_splits)
    with pytest.raises(ValueError, match=r"num_splits.shape\[0\] must be batch \+ 1 = 4"):
        flash_gla.gla_with_kvcache(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, case.dv, meta, num_splits[1:])


def test_mixed_devices_are_rejected():
    case = Case(128, 2, 256, "bf16", 1, False, 100, 3)
    inp = inputs_for(case)
    meta, num_splits = flash_gla.get_metadata(inp.cache_seqlens, 64, 2)
    with pytest.raises(ValueError, match=r"cache_seqlens must be on q's device"):
        flash_gla.gla_with_kvcache(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens.cpu(), case.dv, meta, num_splits)
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata must be on q's device"):
        flash_gla.gla_with_kvcache(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, case.dv, meta.cpu(), num_splits)


def test_length_beyond_capacity_is_rejected_on_gpu():
    case = Case(128, 2, 256, "bf16", 1, False, 100, 3)
    inp = inputs_for(case)
    too_long = torch.tensor([100, 100, inp.block_table.shape[1] * 64 + 1], dtype=torch.int32, device="cuda")
    meta, num_splits = flash_gla.get_metadata(too_long, 64, 2)
    with pytest.raises(ValueError, match=r"cache_seqlens values must lie in"):
        flash_gla.gla_with_kvcache(inp.q, inp.kv_cache, inp.block_table, too_long, case.dv, meta, num_splits)
