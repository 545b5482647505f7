"""What engines rely on besides the math, on an sm_90 GPU: attention sinks, and padded CUDA-graph
batches (rows of length 0 with -1 in the block table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from helpers import GLA, GLA_ROPE1, GTA, assert_close, capture_graph, make_inputs

import flash_gla
from flash_gla.reference import apply_attn_sink

pytestmark = pytest.mark.sm90


@dataclass(frozen=True)
class Shape:
    """One decode shape of a variant: which instance of the kernel family it runs."""

    variant: object
    h_q: int
    h_kv: int
    dv: int
    d_rope: int
    s_q: int

    @property
    def id(self) -> str:
        return f"{self.variant.name}-h{self.h_q}kv{self.h_kv}-dv{self.dv}-sq{self.s_q}"

    def inputs(self, lengths, seed, **kw):
        return make_inputs(len(lengths), self.s_q, self.h_q, self.h_kv, self.dv, self.d_rope, lengths,
                           torch.bfloat16, "cuda", seed, shared_rope=self.variant.shared_rope,
                           q_dim=self.dv if self.variant.q_is_v else self.dv + self.d_rope, **kw)

    def rows(self) -> int:
        return self.s_q * self.h_q // self.h_kv

    def decode(self, inp, meta, num_splits, **kw):
        return self.variant.decode(inp, self.dv, meta, num_splits, causal=self.s_q > 1, **kw)

    def reference(self, inp, **kw):
        return self.variant.reference(inp, self.dv, causal=self.s_q > 1, **kw)


SHAPES = [
    Shape(GLA, 128, 2, 256, 64, 1),  # 64 query rows per KV head
    Shape(GLA, 128, 2, 256, 64, 2),  # 128 rows: two row warpgroups
    Shape(GLA, 128, 1, 512, 64, 1),  # MLA: a shared P, two column warpgroups
    Shape(GLA_ROPE1, 128, 2, 256, 64, 2),
    Shape(GTA, 32, 8, 128, 64, 1),  # 4 rows: the transposed consumer
    Shape(GTA, 16, 4, 64, 32, 4),  # 16 rows: the transposed consumer at its capacity, d 64
    Shape(GTA, 32, 8, 128, 64, 8),  # 32 rows: a 64-row tile
]
SHAPE_IDS = [s.id for s in SHAPES]
# Empty, short, page-edge and long requests: with b 6 the long ones are split over parts
# (fp32 partials + combine), the short ones written by the decode kernel itself.
LENGTHS = [0, 5, 64, 129, 20000, 70000]


# ---------------------------------------------------------------------------- attention sinks


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_attn_sink_matches_reference(shape):
    inp = shape.inputs(LENGTHS, seed=11)
    meta, num_splits = flash_gla.get_metadata(inp.cache_seqlens, shape.rows(), shape.h_kv)
    gen = torch.Generator(device="cuda").manual_seed(3)
    sink = torch.randn(shape.h_q, generator=gen, device="cuda") * 4
    sink[0], sink[1] = -math.inf, 30.0  # no sink; a sink that takes almost everything
    out, lse = shape.decode(inp, meta, num_splits, attn_sink=sink)
    plain_out, plain_lse = shape.decode(inp, meta, num_splits)
    ref, lse_ref = shape.reference(inp, attn_sink=sink)
    assert_close(out, ref, lse, lse_ref, shape.id + "-sink")
    assert torch.equal(lse, plain_lse), f"[{shape.id}] attn_sink must leave lse unchanged"
    # The sink only scales each row: out = plain_out * exp(lse) / (exp(lse) + exp(sink)).
    scaled = apply_attn_sink(plain_out.float(), plain_lse, sink).to(out.dtype)
    assert_close(out, scaled, lse, plain_lse, shape.id + "-sink-vs-scaled")


def test_attn_sink_through_flashmla_alias():
    shape = SHAPES[2]
    inp = shape.inputs([300, 9000], seed=5)
    meta, num_splits = flash_gla.get_mla_metadata(inp.cache_seqlens, shape.rows(), 1)
    sink = torch.linspace(-3, 3, shape.h_q, device="cuda")
    out, lse = flash_gla.flash_mla_with_kvcache(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, 512,
                                                meta, num_splits, attn_sink=sink)
    ref, lse_ref = shape.reference(inp, attn_sink=sink)
    assert_close(out, ref, lse, lse_ref, "flash_mla_with_kvcache-sink")


# ---------------------------------------------------------------------------- padded graph batches


def _padded(inp, pad: int):
    """The batch with `pad` padding rows appended (length 0, block-table row -1) and -1 in
    every unused block-table entry of the live rows (vLLM's convention)."""
    b, max_pages = inp.block_table.shape
    table = inp.block_table.clone()
    used = torch.tensor([-(-n // 64) for n in inp.lengths], device="cuda")
    table[torch.arange(max_pages, device="cuda")[None, :] >= used[:, None]] = -1
    table = torch.cat([table, torch.full((pad, max_pages), -1, dtype=torch.int32, device="cuda")])
    q = torch.cat([inp.q, torch.randn(pad, *inp.q.shape[1:], device="cuda").to(inp.q.dtype)])
    seqlens = torch.cat([inp.cache_seqlens, torch.zeros(pad, dtype=torch.int32, device="cuda")])
    return type(inp)(q=q, kv_cache=inp.kv_cache, block_table=table, cache_seqlens=seqlens,
                     lengths=inp.lengths + [0] * pad, rope_cache=inp.rope_cache)


@pytest.mark.parametrize("form", ["classic", "lazy"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4]], ids=[SHAPES[i].id for i in (0, 3, 4)])
def test_padded_batch_rows(shape, form):
    live = shape.inputs([3000, 65, 1, 40000], seed=31)
    padded = _padded(live, pad=4)
    ref, lse_ref = shape.reference(live)
    out_live = torch.full((8, shape.s_q, shape.h_q, shape.dv), math.nan, dtype=torch.bfloat16, device="cuda")

    def step():
        if form == "lazy":
            meta, num_splits = flash_gla.get_metadata()
        else:
            meta, num_splits = flash_gla.get_metadata(padded.cache_seqlens, shape.rows(), shape.h_kv)
        return shape.decode(padded, meta, num_splits, out=out_live)

    for mode in ("eager", "graph"):
        out_live.fill_(math.nan)
        if mode == "eager":
            out, lse = step()
        else:
            graph, (out, lse) = capture_graph(step)
            out_live.fill_(math.nan)
            graph.replay()
            torch.cuda.synchronize()
        where = f"{shape.id}-{form}-{mode}"
        assert_close(out[:4], ref, lse[:4], lse_ref, where + "-live")
        assert torch.equal(out[4:], torch.zeros_like(out[4:])), f"[{where}] padded rows must get out = 0"
        assert torch.isinf(lse[4:]).all() and (lse[4:] > 0).all(), f"[{where}] padded rows must get lse = +inf"


# ----------------------------------------------------------------------------------------
# The validated-layout cache: a repeated call skips the checks of its layout, never a check
# that another argument would fail
# ----------------------------------------------------------------------------------------


def test_repeated_call_still_rejects_bad_arguments():
    shape = SHAPES[3]  # RoPE stored once: every tensor argument is present
    inp = shape.inputs([5, 700, 3000], seed=11)
    meta, num_splits = flash_gla.get_metadata(inp.cache_seqlens, shape.rows(), shape.h_kv)
    call = dict(q=inp.q, kv_cache=inp.kv_cache, block_table=inp.block_table, cache_seqlens=inp.cache_seqlens,
                head_dim_v=shape.dv, tile_scheduler_metadata=meta, num_splits=num_splits, causal=True,
                rope_cache=inp.rope_cache)
    want = flash_gla.gla_with_kvcache(**call)
    got = flash_gla.gla_with_kvcache(**call)  # the same layout again: from the cache
    assert torch.equal(got[1], want[1])
    # Equal as Python values, unequal in type: the cache must not let them through.
    with pytest.raises(TypeError, match="head_dim_v must be an int"):
        flash_gla.gla_with_kvcache(**{**call, "head_dim_v": float(shape.dv)})
    with pytest.raises(TypeError, match="causal must be a bool"):
        flash_gla.gla_with_kvcache(**{**call, "causal": 1})
    # Same shape, strides and dtype at a misaligned address: checked on every call.
    flat = torch.empty(inp.kv_cache.numel() + 8, dtype=inp.kv_cache.dtype, device="cuda")
    shifted = flat[1:1 + inp.kv_cache.numel()].view(inp.kv_cache.shape)
    assert shifted.stride() == inp.kv_cache.stride()
    with pytest.raises(ValueError, match=r"kv_cache.data_ptr\(\) must be 16-byte aligned"):
        flash_gla.gla_with_kvcache(**{**call, "kv_cache": shifted})
    # Another layout (metadata for another row count) is checked in full.
    other_meta, other_splits = flash_gla.get_metadata(inp.cache_seqlens, shape.rows() // 2, shape.h_kv)
    if other_meta.shape[0] != meta.shape[0]:
        with pytest.raises(ValueError, match="tile_scheduler_metadata.shape"):
            flash_gla.gla_with_kvcache(**{**call, "tile_scheduler_metadata": other_meta, "num_splits": other_splits})
    with pytest.raises(TypeError, match="out.dtype"):
        flash_gla.gla_with_kvcache(**call, out=torch.empty_like(want[0], dtype=torch.float16))
