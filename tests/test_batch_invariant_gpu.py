"""Batch invariance on an sm_90 GPU: with ``enable_batch_invariant=True`` a request's ``out`` and
``lse`` are bitwise the same whatever else is in the batch, and whatever the batch size.

Every batch below is a set of rows of one big poisoned problem (the same cache pages, the same
query rows), so a watched request sees the same bytes in each batch; only its neighbours
change. The plan is scheduler_model.plan_batch_invariant (tests/; its CPU tests check that it
cuts a request by the request's own length only); here the kernels must honour it bit for bit.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import DecodeInputs, GLA, GLA_ROPE1, GTA, assert_close, capture_graph, make_inputs, same_bits

import flash_gla

pytestmark = pytest.mark.sm90

# (variant, h_q, h_kv, dv, d_rope, s_q): each row-tile size and layout of the kernel family.
SHAPES = [
    (GLA, 128, 2, 256, 64, 1),
    (GLA, 128, 2, 256, 64, 2),  # 128-row CTAs
    (GLA, 128, 1, 512, 64, 1),  # MLA
    (GLA_ROPE1, 128, 2, 256, 64, 2),
    (GTA, 32, 8, 128, 64, 1),  # the transposed consumer
    (GTA, 16, 4, 64, 32, 4),  # the transposed consumer at 16 rows, d 64
    (GTA, 32, 8, 128, 64, 8),  # GTA on a 64-row tile
]
SHAPE_IDS = [f"{v.name}-h{hq}kv{hkv}-dv{dv}-sq{sq}" for v, hq, hkv, dv, _, sq in SHAPES]
# Watched: empty, one page, a whole chunk, just past it (two chunks), eight chunks of 137 pages.
WATCHED = [0, 5, 4096, 4097, 70_000]
OTHERS = [1, 63, 700, 3000, 9000, 20_000, 33_000, 64, 129, 0, 50_000, 12_345]


def pool(shape, seed=0, reverse=False):
    """The watched and the other requests (reversed: the same lengths in the other order, same shapes)."""
    variant, h_q, h_kv, dv, d_rope, s_q = shape
    lengths = WATCHED + OTHERS
    return make_inputs(len(lengths), s_q, h_q, h_kv, dv, d_rope, lengths[::-1] if reverse else lengths,
                       torch.bfloat16, "cuda", seed, shared_rope=variant.shared_rope,
                       q_dim=dv if variant.q_is_v else dv + d_rope)


def take(inp: DecodeInputs, rows: list[int]) -> DecodeInputs:
    """The batch of the pool's requests `rows`, in that order (repeats allowed), on the same pages."""
    index = torch.tensor(rows, device="cuda")
    return DecodeInputs(q=inp.q[index].contiguous(), kv_cache=inp.kv_cache, block_table=inp.block_table[index],
                        cache_seqlens=inp.cache_seqlens[index].contiguous(), lengths=[inp.lengths[r] for r in rows],
                        rope_cache=inp.rope_cache)


def decode(shape, inp, invariant=True, lazy=False):
    variant, h_q, h_kv, dv, _, s_q = shape
    if lazy:
        meta, num_splits = flash_gla.get_metadata()
    else:
        meta, num_splits = flash_gla.get_metadata(inp.cache_seqlens, s_q * h_q // h_kv, h_kv,
                                                  enable_batch_invariant=invariant)
    return variant.decode(inp, dv, meta, num_splits, causal=s_q > 1, enable_batch_invariant=invariant)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_request_bits_do_not_depend_on_the_batch(shape):
    inp = pool(shape)
    n = len(inp.lengths)
    rng = random.Random(1)
    full_out, full_lse = decode(shape, inp)
    ref_out, ref_lse = shape[0].reference(inp, shape[3], causal=shape[5] > 1)
    assert_close(full_out, ref_out, full_lse, ref_lse, f"batch-invariant {SHAPE_IDS[SHAPES.index(shape)]}")
    batches = [
        [w] for w in range(len(WATCHED))  # alone
    ] + [
        list(reversed(range(n))),  # the same requests in reverse order
        rng.sample(range(n), 7),  # a few, shuffled
        [rng.randrange(n) for _ in range(96)] + list(range(len(WATCHED))),  # a large batch, repeats
    ]
    for rows in batches:
        out, lse = decode(shape, take(inp, rows))
        for k, r in enumerate(rows):
            assert same_bits(out[k], full_out[r]) and same_bits(lse[k], full_lse[r]), (
                f"request {r} (length {inp.lengths[r]}) at position {k} of a batch of {len(rows)}: bits differ from "
                f"the full batch's (max |out diff| {(out[k].float() - full_out[r].float()).abs().max().item():.3g})")


def test_lazy_metadata_and_flashmla_alias_take_the_flag():
    shape = SHAPES[0]
    inp = pool(shape, seed=2)
    want_out, want_lse = decode(shape, inp)
    lazy_out, lazy_lse = decode(shape, inp, lazy=True)
    assert same_bits(lazy_out, want_out) and same_bits(lazy_lse, want_lse)
    meta, _ = flash_gla.get_mla_metadata()
    alias_out, alias_lse = flash_gla.flash_mla_with_kvcache(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens,
                                                            shape[3], meta, None, enable_batch_invariant=True)
    assert same_bits(alias_out, want_out) and same_bits(alias_lse, want_lse)


def test_plan_and_call_must_agree():
    variant, h_q, h_kv, dv, _, s_q = shape = SHAPES[0]
    inp = pool(shape, seed=3)
    rows = s_q * h_q // h_kv
    invariant = flash_gla.get_metadata(inp.cache_seqlens, rows, h_kv, enable_batch_invariant=True)
    default = flash_gla.get_metadata(inp.cache_seqlens, rows, h_kv)
    with pytest.raises(ValueError, match="enable_batch_invariant=True"):
        variant.decode(inp, dv, *invariant)
    with pytest.raises(ValueError, match="enable_batch_invariant"):
        variant.decode(inp, dv, *default, enable_batch_invariant=True)


def test_graph_replay_with_other_lengths():
    """Captured once, replayed with other lengths: the same bits as an eager call."""
    variant, h_q, h_kv, dv, _, s_q = shape = SHAPES[1]
    first, second = pool(shape, seed=4), pool(shape, seed=5, reverse=True)
    static = pool(shape, seed=4)

    def step():
        return decode(shape, static)

    graph, (out, lse) = capture_graph(step)
    for src in (second, first):
        static.copy_(src)
        graph.replay()
        want_out, want_lse = decode(shape, src)
        assert same_bits(out, want_out) and same_bits(lse, want_lse)
