"""The torch.library ops on an sm_90 GPU: torch.library.opcheck, and torch.compile of a decode
step (fullgraph, also with CUDA graphs) against the same step run eagerly.
"""

from __future__ import annotations

import pytest
import torch
from helpers import GLA, GLA_ROPE1, GTA, make_inputs, same_bits

import flash_gla

pytestmark = pytest.mark.sm90

LENGTHS = [5, 700, 0, 3000]
NEW = 2  # tokens each request appends per step (s_q)


def problem(variant, h_q=32, h_kv=2, dv=256, d_rope=64, seed=0):
    if variant is GTA:
        h_kv, dv = 8, 128
    inp = make_inputs(len(LENGTHS), NEW, h_q, h_kv, dv, d_rope, [n + NEW for n in LENGTHS], torch.bfloat16, "cuda",
                      seed, shared_rope=variant.shared_rope, q_dim=dv if variant.q_is_v else dv + d_rope)
    # Slots of the step's new tokens: the last NEW positions of every request.
    slots = torch.tensor([int(inp.block_table[i, p // 64]) * 64 + p % 64 for i, n in enumerate(LENGTHS)
                          for p in range(n, n + NEW)], dtype=torch.int64, device="cuda")
    new_kv = torch.randn(len(slots), h_kv, dv, device="cuda").to(torch.bfloat16)
    new_rope = torch.randn(len(slots), d_rope, device="cuda").to(torch.bfloat16)
    return inp, slots, new_kv, new_rope, dict(h_q=h_q, h_kv=h_kv, dv=dv)


def step_fn(variant, dims):
    """One decode step as an engine writes it: metadata, the cache write, the attention."""
    rows = NEW * dims["h_q"] // dims["h_kv"]

    def step(q, kv_cache, rope_cache, block_table, cache_seqlens, slots, new_kv, new_rope):
        meta, num_splits = flash_gla.get_metadata(cache_seqlens, rows, dims["h_kv"])
        flash_gla.write_kvcache(kv_cache, slots, new_kv, rope=new_rope, rope_cache=rope_cache)
        if variant is GTA:
            return flash_gla.gta_with_kvcache(q, kv_cache, rope_cache, block_table, cache_seqlens, meta, num_splits,
                                              causal=True)
        return flash_gla.gla_with_kvcache(q, kv_cache, block_table, cache_seqlens, dims["dv"], meta, num_splits,
                                          causal=True, rope_cache=rope_cache)

    return step


def step_args(inp, slots, new_kv, new_rope):
    rope_cache = None if inp.rope_cache is None else inp.rope_cache.clone()
    return (inp.q, inp.kv_cache.clone(), rope_cache, inp.block_table, inp.cache_seqlens, slots, new_kv, new_rope)


@pytest.mark.parametrize("variant", [GLA, GLA_ROPE1, GTA], ids=lambda v: v.name)
def test_opcheck(variant):
    inp, slots, new_kv, new_rope, dims = problem(variant)
    rows = NEW * dims["h_q"] // dims["h_kv"]
    for invariant in (False, True):
        torch.library.opcheck(torch.ops.flash_gla.get_metadata, (inp.cache_seqlens, rows, dims["h_kv"], invariant))
    meta, num_splits = flash_gla.get_metadata(inp.cache_seqlens, rows, dims["h_kv"])
    out = torch.empty(len(LENGTHS), NEW, dims["h_q"], dims["dv"], dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.flash_gla.decode, (
        inp.q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, dims["dv"], meta, num_splits,
        inp.q.shape[-1] ** -0.5, True, out, None, False))
    rope = new_rope if variant.shared_rope else None
    kv = new_kv if variant.shared_rope else torch.cat([new_kv, new_rope[:, None, :].expand(-1, dims["h_kv"], -1)], -1)
    torch.library.opcheck(torch.ops.flash_gla.write_kvcache,
                          (inp.kv_cache.clone(), slots, kv, rope, None if inp.rope_cache is None else inp.rope_cache.clone()))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("variant", [GLA, GLA_ROPE1, GTA], ids=lambda v: v.name)
def test_compiled_step_matches_eager(variant, mode):
    """Inline RoPE: the writer appends the RoPE key to every head's row; else it goes to rope_cache."""
    inp, slots, new_kv, new_rope, dims = problem(variant, seed=3)
    step = step_fn(variant, dims)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, mode=None if mode == "default" else mode)
    eager_args, compiled_args = step_args(inp, slots, new_kv, new_rope), step_args(inp, slots, new_kv, new_rope)
    want_out, want_lse = step(*eager_args)
    for _ in range(3 if mode == "reduce-overhead" else 1):  # CUDA graphs: recorded, then replayed
        compiled_args = step_args(inp, slots, new_kv, new_rope)
        got_out, got_lse = compiled(*compiled_args)
    torch.cuda.synchronize()
    # Bitwise: the caches hold NaN poison past each length, which torch.equal calls unequal.
    assert same_bits(compiled_args[1], eager_args[1]), f"[{variant.name}-{mode}] the compiled cache write differs"
    assert same_bits(got_out, want_out) and same_bits(got_lse, want_lse), (
        f"[{variant.name}-{mode}] compiled out/lse differ from eager: max |out diff| "
        f"{(got_out.float() - want_out.float()).abs().max().item():.3g}")
