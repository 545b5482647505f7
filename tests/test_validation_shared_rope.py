"""Bad inputs to the shared-RoPE entries (gta_with_kvcache, gla_with_kvcache(rope_cache=)).

CPU only, as test_validation.py: valid CPU inputs fail only at the final device check, and
each test breaks exactly one thing.
"""

import pytest
import torch
from helpers import make_inputs

import flash_gla

B, S_Q, H_Q, H_KV = 2, 2, 8, 2


@pytest.fixture(scope="module")
def gta():
    return make_inputs(B, S_Q, H_Q, H_KV, 128, 64, [70, 5], torch.bfloat16, seed=0, shared_rope=True, q_dim=128)


@pytest.fixture(scope="module")
def gla():
    return make_inputs(B, S_Q, H_Q, H_KV, 256, 64, [70, 5], torch.bfloat16, seed=0, shared_rope=True)


def metadata():
    return torch.zeros(4, 8, dtype=torch.int32), torch.zeros(B + 1, dtype=torch.int32)


def call_gta(inp, **overrides):
    meta, splits = metadata()
    args = dict(q=inp.q, kv_cache=inp.kv_cache, rope_cache=inp.rope_cache, block_table=inp.block_table,
                cache_seqlens=inp.cache_seqlens, tile_scheduler_metadata=meta, num_splits=splits)
    args.update(overrides)
    return flash_gla.gta_with_kvcache(**args)


def call_gla(inp, **overrides):
    meta, splits = metadata()
    args = dict(q=inp.q, kv_cache=inp.kv_cache, block_table=inp.block_table, cache_seqlens=inp.cache_seqlens,
                head_dim_v=256, tile_scheduler_metadata=meta, num_splits=splits, rope_cache=inp.rope_cache)
    args.update(overrides)
    return flash_gla.gla_with_kvcache(**args)


def test_valid_gta_inputs_reach_device_check(gta):
    with pytest.raises(ValueError, match=r"q must be a CUDA tensor"):
        call_gta(gta)


def test_valid_gta_d64_inputs_reach_device_check():
    inp = make_inputs(1, 1, 4, 4, 64, 32, [3], torch.float16, seed=1, shared_rope=True, q_dim=64)
    meta, splits = torch.zeros(4, 8, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q must be a CUDA tensor"):
        flash_gla.gta_with_kvcache(inp.q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens, meta, splits)


def test_valid_gla_shared_rope_inputs_reach_device_check(gla):
    with pytest.raises(ValueError, match=r"q must be a CUDA tensor"):
        call_gla(gla)


def test_gta_rope_cache_missing(gta):
    with pytest.raises(TypeError, match=r"rope_cache must be a torch.Tensor \(num_blocks, 64, 1, d_rope\), got NoneType"):
        call_gta(gta, rope_cache=None)


def test_gta_rope_cache_dtype(gta):
    with pytest.raises(TypeError, match=r"rope_cache.dtype must be torch.bfloat16 \(q's dtype\), got torch.float16"):
        call_gta(gta, rope_cache=gta.rope_cache.half())


def test_gta_rope_cache_rank(gta):
    with pytest.raises(ValueError, match=r"rope_cache must be 4-D, got 3-D"):
        call_gta(gta, rope_cache=gta.rope_cache[:, :, 0])


def test_gta_rope_cache_one_head(gta):
    rope = gta.rope_cache.expand(-1, -1, H_KV, -1).contiguous()
    with pytest.raises(ValueError, match=r"rope_cache.shape\[:3\] must be \(num_blocks, page size, 1\)"):
        call_gta(gta, rope_cache=rope)


def test_gta_rope_cache_other_pages(gta):
    with pytest.raises(ValueError, match=r"rope_cache.shape\[:3\] must be \(num_blocks, page size, 1\)"):
        call_gta(gta, rope_cache=gta.rope_cache[1:])


def test_gta_unsupported_d(gta):
    q = torch.randn(B, S_Q, H_Q, 96).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"q.shape\[3\] \(d\) must be one of \[64, 128\], got 96"):
        call_gta(gta, q=q)


def test_gta_kv_width_differs_from_q(gta):
    kv = gta.kv_cache[..., :64].contiguous()
    with pytest.raises(ValueError, match=r"kv_cache.shape\[3\] must equal q.shape\[3\] \(d\) = 128, got 64"):
        call_gta(gta, kv_cache=kv)


def test_gta_wrong_d_rope(gta):
    rope = torch.cat([gta.rope_cache, gta.rope_cache], dim=-1)
    with pytest.raises(ValueError, match=r"rope_cache.shape\[3\] \(d_rope\) must be 64 for d 128, got 128"):
        call_gta(gta, rope_cache=rope)


def test_gta_rope_cache_strided(gta):
    wide = torch.empty(*gta.rope_cache.shape[:-1], 128, dtype=gta.rope_cache.dtype)
    rope = wide[..., ::2]
    with pytest.raises(ValueError, match=r"rope_cache.stride\(-1\) must be 1"):
        call_gta(gta, rope_cache=rope)


def test_gta_rope_cache_misaligned(gta):
    flat = torch.empty(gta.rope_cache.numel() + 1, dtype=gta.rope_cache.dtype)
    rope = flat[1:].view(gta.rope_cache.shape)
    with pytest.raises(ValueError, match=r"rope_cache.data_ptr\(\) must be 16-byte aligned"):
        call_gta(gta, rope_cache=rope)


def test_gta_out_shape(gta):
    out = torch.empty(B, S_Q, H_Q, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"out.shape must be \(b, s_q, h_q, head_dim_v\) = \(2, 2, 8, 128\)"):
        call_gta(gta, out=out)


def test_gta_group_must_divide(gta):
    q = torch.randn(B, S_Q, 7, 128).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"must be a multiple of kv_cache.shape\[2\]"):
        call_gta(gta, q=q)


def test_gla_shared_rope_kv_too_wide(gla):
    kv = torch.cat([gla.kv_cache, gla.kv_cache[..., :64]], dim=-1)
    with pytest.raises(ValueError, match=r"kv_cache.shape\[3\] must equal head_dim_v = 256 with a rope_cache"):
        call_gla(gla, kv_cache=kv)


def test_gla_shared_rope_wrong_d_rope(gla):
    with pytest.raises(ValueError, match=r"rope_cache.shape\[3\] \(d_rope\) must be 64 for head_dim_v 256, got 32"):
        call_gla(gla, rope_cache=gla.rope_cache[..., :32].contiguous())


def test_gla_shared_rope_q_width(gla):
    with pytest.raises(ValueError, match=r"q.shape\[3\] \(d_qk\) must be head_dim_v \+ d_rope = 320, got 256"):
        call_gla(gla, q=gla.q[..., :256].contiguous())


def test_gla_shared_rope_unsupported_dv(gla):
    with pytest.raises(ValueError, match=r"head_dim_v must be one of \[256\] with a rope_cache, got 512"):
        call_gla(gla, head_dim_v=512)


def test_gla_shared_rope_type(gla):
    with pytest.raises(TypeError, match=r"rope_cache must be a torch.Tensor \(num_blocks, 64, 1, d_rope\), got list"):
        call_gla(gla, rope_cache=[1, 2])
