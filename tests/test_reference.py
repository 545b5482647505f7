"""The reference against an independent float64 loop over (request, head, query token)."""

import math

import pytest
import torch
from helpers import GARBAGE_PAGE, PAGE, assert_close, make_inputs

from flash_gla.reference import gla_with_kvcache_ref, gta_with_kvcache_ref


def naive_decode(q, key_of, value_of, dv, lengths, h_kv, causal, scale):
    """float64, one query row at a time, straight from the conventions in flash_gla/reference.py's docstring.

    key_of(i, t, j) / value_of(i, t, j): key / value vector of token t, KV head j, request i.
    Returns out (b, s_q, h_q, dv) float64 and lse (b, h_q, s_q) float64.
    """
    b, s_q, h_q, _ = q.shape
    group = h_q // h_kv
    outs, lses = [], []
    for i in range(b):
        length = lengths[i]
        out_i, lse_i = [], []
        for h in range(h_q):
            j = h // group
            out_h, lse_h = [], []
            for r in range(s_q):
                last = length - s_q + r if causal else length - 1
                visible = range(0, min(last, length - 1) + 1)
                if len(visible) == 0:
                    out_h.append(None)
                    lse_h.append(math.inf)
                    continue
                scores = torch.stack([q[i, r, h].double() @ key_of(i, t, j).double() * scale for t in visible])
                m = scores.max()
                lse = m + torch.log(torch.exp(scores - m).sum())
                p = torch.exp(scores - lse)
                out_h.append(sum(p[k] * value_of(i, t, j).double() for k, t in enumerate(visible)))
                lse_h.append(lse.item())
            out_i.append(out_h)
            lse_i.append(lse_h)
        outs.append(out_i)
        lses.append(lse_i)
    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    for i in range(b):
        for h in range(h_q):
            for r in range(s_q):
                if outs[i][h][r] is not None:
                    out[i, r, h] = outs[i][h][r]
    return out, torch.tensor(lses, dtype=torch.float64)


def cache_row(cache, block_table, i, t):
    """Row of token t of request i, by direct page arithmetic: (heads, dim)."""
    return cache[int(block_table[i, t // PAGE]), t % PAGE]


def check_against_naive(out, lse, out64, lse64, config_id):
    # The reference computes in float32 and rounds out to q's dtype; compare in float32.
    assert_close(out.float(), out64.float(), lse, lse64.float(), config_id)


CASES = [
    # (b, s_q, h_q, h_kv, lengths, causal)
    (3, 1, 4, 2, [70, 1, 64], False),
    (3, 2, 4, 2, [70, 1, 64], True),  # L < s_q: one causal row sees nothing
    (2, 3, 4, 1, [0, 130], True),  # zero length: out 0, lse +inf
    (2, 3, 4, 1, [0, 130], False),
    (4, 2, 6, 3, [5, 65, 128, 0], True),
    (1, 4, 2, 2, [3], True),  # s_q > L: some rows see nothing, some see 1..3 keys
]


def case_id(case):
    b, s_q, h_q, h_kv, lengths, causal = case
    return f"b{b}-sq{s_q}-h{h_q}kv{h_kv}-L{'_'.join(map(str, lengths))}-{'causal' if causal else 'full'}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gla_inline_matches_naive(case):
    b, s_q, h_q, h_kv, lengths, causal = case
    dv, d_rope = 8, 4
    inp = make_inputs(b, s_q, h_q, h_kv, dv, d_rope, lengths, torch.float32, seed=1)
    scale = 0.7
    out, lse = gla_with_kvcache_ref(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, dv, scale, causal)
    assert out.shape == (b, s_q, h_q, dv) and out.dtype == torch.float32
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32

    def key(i, t, j):
        return cache_row(inp.kv_cache, inp.block_table, i, t)[j]

    def value(i, t, j):
        return cache_row(inp.kv_cache, inp.block_table, i, t)[j, :dv]

    out64, lse64 = naive_decode(inp.q, key, value, dv, lengths, h_kv, causal, scale)
    check_against_naive(out, lse, out64, lse64, case_id(case))


@pytest.mark.parametrize("case", CASES[:3], ids=case_id)
def test_gla_shared_rope_matches_naive(case):
    b, s_q, h_q, h_kv, lengths, causal = case
    dv, d_rope = 8, 4
    inp = make_inputs(b, s_q, h_q, h_kv, dv, d_rope, lengths, torch.float32, seed=2, shared_rope=True)
    out, lse = gla_with_kvcache_ref(
        inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, dv, causal=causal, rope_cache=inp.rope_cache
    )

    def key(i, t, j):
        kv = cache_row(inp.kv_cache, inp.block_table, i, t)[j]
        return torch.cat([kv, cache_row(inp.rope_cache, inp.block_table, i, t)[0]])

    def value(i, t, j):
        return cache_row(inp.kv_cache, inp.block_table, i, t)[j]

    out64, lse64 = naive_decode(inp.q, key, value, dv, lengths, h_kv, causal, (dv + d_rope) ** -0.5)
    check_against_naive(out, lse, out64, lse64, case_id(case))


@pytest.mark.parametrize("case", CASES[:3], ids=case_id)
def test_gta_matches_naive(case):
    b, s_q, h_q, h_kv, lengths, causal = case
    d, d_rope = 12, 4
    inp = make_inputs(b, s_q, h_q, h_kv, d, d_rope, lengths, torch.float32, seed=3, shared_rope=True, q_dim=d)
    out, lse = gta_with_kvcache_ref(inp.q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, causal=causal)
    assert out.shape == (b, s_q, h_q, d)

    def key(i, t, j):
        kv = cache_row(inp.kv_cache, inp.block_table, i, t)[j]
        return torch.cat([kv[: d - d_rope], cache_row(inp.rope_cache, inp.block_table, i, t)[0]])

    def value(i, t, j):
        return cache_row(inp.kv_cache, inp.block_table, i, t)[j]

    out64, lse64 = naive_decode(inp.q, key, value, d, lengths, h_kv, causal, d**-0.5)
    check_against_naive(out, lse, out64, lse64, case_id(case))


def test_gta_equals_inline_gla_on_explicit_concat():
    """GTA == inline GLA on rows [kv | rope] with q padded by zeros over kv's last d_rope dims."""
    b, s_q, h_q, h_kv, d, d_rope = 3, 2, 4, 2, 12, 4
    inp = make_inputs(b, s_q, h_q, h_kv, d, d_rope, [65, 0, 7], torch.float32, seed=4, shared_rope=True, q_dim=d)
    scale = 0.3
    out, lse = gta_with_kvcache_ref(inp.q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, scale, True)

    inline_cache = torch.cat([inp.kv_cache, inp.rope_cache.expand(-1, -1, h_kv, -1)], dim=-1)  # (.., d + d_rope)
    zeros = torch.zeros(b, s_q, h_q, d_rope)
    q_padded = torch.cat([inp.q[..., : d - d_rope], zeros, inp.q[..., d - d_rope :]], dim=-1)
    out2, lse2 = gla_with_kvcache_ref(q_padded, inline_cache, inp.block_table, inp.cache_seqlens, d, scale, True)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse2, rtol=1e-5, atol=1e-5)


def test_shared_rope_equals_inline_on_explicit_concat():
    b, s_q, h_q, h_kv, dv, d_rope = 2, 3, 6, 3, 8, 4
    inp = make_inputs(b, s_q, h_q, h_kv, dv, d_rope, [100, 3], torch.float32, seed=5, shared_rope=True)
    out, lse = gla_with_kvcache_ref(
        inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, dv, causal=True, rope_cache=inp.rope_cache
    )
    inline_cache = torch.cat([inp.kv_cache, inp.rope_cache.expand(-1, -1, h_kv, -1)], dim=-1)
    out2, lse2 = gla_with_kvcache_ref(inp.q, inline_cache, inp.block_table, inp.cache_seqlens, dv, causal=True)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse2, rtol=1e-5, atol=1e-5)


def test_poison_never_leaks():
    """NaN past each length and in unused pages, garbage table entries: the result is finite
    and does not change when the poison changes."""
    b, s_q, h_q, h_kv, dv, d_rope = 3, 2, 4, 2, 8, 4
    inp = make_inputs(b, s_q, h_q, h_kv, dv, d_rope, [1, 63, 65], torch.bfloat16, seed=6)
    assert torch.isnan(inp.kv_cache).any(), "make_inputs must poison the cache"
    assert (inp.block_table == GARBAGE_PAGE).any(), "make_inputs must leave garbage table entries"
    out, lse = gla_with_kvcache_ref(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, dv, causal=True)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    assert torch.isinf(lse[0, :, 0]).all()  # L = 1, s_q = 2, causal: the first row sees nothing

    other = inp.kv_cache.clone()
    other[torch.isnan(other)] = 1e4
    out2, lse2 = gla_with_kvcache_ref(inp.q, other, inp.block_table, inp.cache_seqlens, dv, causal=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_make_inputs_poisons_exactly_past_lengths():
    inp = make_inputs(2, 1, 2, 1, 8, 4, [65, 0], torch.float32, seed=7)
    assert inp.block_table.shape == (2, 3)  # ceil(65 / 64) = 2 pages, plus a garbage column
    p0, p1 = (int(x) for x in inp.block_table[0, :2])
    assert torch.isfinite(inp.kv_cache[p0]).all()
    assert torch.isfinite(inp.kv_cache[p1, :1]).all() and torch.isnan(inp.kv_cache[p1, 1:]).all()
    assert (inp.block_table[1] == GARBAGE_PAGE).all()
    used = {p0, p1}
    for page in range(inp.kv_cache.shape[0]):
        if page not in used:
            assert torch.isnan(inp.kv_cache[page]).all()
    # Pages are shuffled, not handed out in order.
    big = make_inputs(1, 1, 1, 1, 8, 4, [64 * 40], torch.float32, seed=8)
    assert big.block_table[0, :40].tolist() != sorted(big.block_table[0, :40].tolist())


def test_dtype_and_default_scale():
    inp = make_inputs(2, 2, 4, 2, 8, 4, [30, 70], torch.float16, seed=9)
    out, lse = gla_with_kvcache_ref(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, 8)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    explicit, lse2 = gla_with_kvcache_ref(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, 8, 12**-0.5)
    assert torch.equal(out, explicit) and torch.equal(lse, lse2)


def test_length_beyond_table_capacity_raises():
    inp = make_inputs(1, 1, 2, 1, 8, 4, [64], torch.float32, seed=10)  # table has 2 columns
    too_long = torch.tensor([129], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_seqlens"):
        gla_with_kvcache_ref(inp.q, inp.kv_cache, inp.block_table, too_long, 8)
