"""Bad inputs to the FP8 decode (float8_e4m3fn kv_cache + float32 kv_scale + rope_cache in q's dtype).

CPU only, as test_validation.py: valid CPU inputs fail only at the final device check, and each
test breaks exactly one thing. The last tests call the validation itself
(``flash_gla._call.check_decode_call`` on a ``DecodeCall``) on fake CUDA tensors, where valid FP8 arguments
pass every check, and check that the validated-layout cache never lets a bad kv_scale through.
"""

import dataclasses
import re
import warnings

import pytest
import torch
from helpers import make_inputs, raw
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_gla
from flash_gla import _call, _validation
from flash_gla._call import DecodeCall
from flash_gla.reference import quantize_kv_ref

B, S_Q, H_Q, H_KV = 2, 2, 8, 2
FP8 = torch.float8_e4m3fn
DEVICE_ERROR = r"q must be a CUDA tensor"


@pytest.fixture(scope="module")
def gla():
    return make_inputs(B, S_Q, H_Q, H_KV, 256, 64, [70, 5], torch.bfloat16, seed=0, shared_rope=True, kv_fp8=True)


@pytest.fixture(scope="module")
def gta():
    return make_inputs(B, S_Q, H_Q, H_KV, 128, 64, [70, 5], torch.bfloat16, seed=0, shared_rope=True, q_dim=128,
                       kv_fp8=True)


def metadata():
    return torch.zeros(4, 8, dtype=torch.int32), torch.zeros(B + 1, dtype=torch.int32)


def call_gla(inp, **overrides):
    meta, splits = metadata()
    args = dict(q=inp.q, kv_cache=inp.kv_cache, block_table=inp.block_table, cache_seqlens=inp.cache_seqlens,
                head_dim_v=256, tile_scheduler_metadata=meta, num_splits=splits, rope_cache=inp.rope_cache,
                kv_scale=inp.kv_scale)
    args.update(overrides)
    return flash_gla.gla_with_kvcache(**args)


def call_gta(inp, **overrides):
    meta, splits = metadata()
    args = dict(q=inp.q, kv_cache=inp.kv_cache, rope_cache=inp.rope_cache, block_table=inp.block_table,
                cache_seqlens=inp.cache_seqlens, tile_scheduler_metadata=meta, num_splits=splits, kv_scale=inp.kv_scale)
    args.update(overrides)
    return flash_gla.gta_with_kvcache(**args)


CALLS = {"gla": call_gla, "gta": call_gta}


@pytest.fixture(params=["gla", "gta"])
def entry(request, gla, gta):
    """(call, inputs) of each FP8 entry."""
    return CALLS[request.param], {"gla": gla, "gta": gta}[request.param]


def fp8_like(x: torch.Tensor, dtype=FP8) -> torch.Tensor:
    """Zeros of x's shape in another one-byte dtype."""
    return torch.zeros(x.shape, dtype=dtype)


# --- valid FP8 inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_valid_fp8_gla_inputs_reach_device_check(dtype):
    inp = make_inputs(B, S_Q, H_Q, H_KV, 256, 64, [70, 5], dtype, seed=1, shared_rope=True, kv_fp8=True)
    assert inp.kv_cache.dtype == FP8 and inp.kv_scale.shape == (inp.kv_cache.shape[0], 64, H_KV, 2)
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call_gla(inp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d, d_rope", [(128, 64), (64, 32)], ids=["d128", "d64"])
def test_valid_fp8_gta_inputs_reach_device_check(dtype, d, d_rope):
    inp = make_inputs(B, S_Q, H_Q, H_KV, d, d_rope, [70, 5], dtype, seed=2, shared_rope=True, q_dim=d, kv_fp8=True)
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call_gta(inp)


def test_fp8_with_positional_kv_scale_reaches_device_check(gla):
    """kv_scale is gla_with_kvcache's last parameter (after enable_batch_invariant)."""
    meta, splits = metadata()
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        flash_gla.gla_with_kvcache(gla.q, gla.kv_cache, gla.block_table, gla.cache_seqlens, 256, meta, splits, None,
                                   True, None, gla.rope_cache, False, None, None, False, gla.kv_scale)


def test_fp8_with_every_option_reaches_device_check(entry):
    call, inp = entry
    out = torch.empty(B, S_Q, H_Q, inp.q.shape[-1] if call is call_gta else 256, dtype=inp.q.dtype)
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call(inp, out=out, attn_sink=torch.zeros(H_Q), softmax_scale=0.2, causal=True, enable_batch_invariant=True)
    sched, _ = flash_gla.get_metadata()  # the lazy form: the same metadata as for a bf16 cache
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call(inp, tile_scheduler_metadata=sched, num_splits=None)


def test_kv_scale_any_strides(entry):
    """kv_scale is read as scalars: any strides (a transposed copy, a slice, a broadcast)."""
    call, inp = entry
    transposed = inp.kv_scale.transpose(0, 2).contiguous().transpose(0, 2)
    wide = torch.ones(*inp.kv_scale.shape[:-1], inp.kv_scale.shape[-1] + 3)
    sliced = wide[..., 1:1 + inp.kv_scale.shape[-1]]
    broadcast = torch.ones(1, 1, 1, 1).expand(inp.kv_scale.shape)
    for scale in (transposed, sliced, broadcast):
        assert not scale.is_contiguous()
        with pytest.raises(ValueError, match=DEVICE_ERROR):
            call(inp, kv_scale=scale)


def test_fp8_cache_strided_by_16_elements(entry):
    """An FP8 cache inside a larger allocation: strides that are multiples of 16 elements pass."""
    call, inp = entry
    nb, page, h_kv, d = inp.kv_cache.shape
    wide = torch.zeros(nb, page, h_kv, d + 16, dtype=torch.uint8)
    kv = wide[..., :d].view(FP8)
    raw(kv).copy_(raw(inp.kv_cache))
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call(inp, kv_cache=kv)


# --- what an FP8 cache needs -----------------------------------------------------------------


def test_fp8_cache_needs_kv_scale(entry):
    call, inp = entry
    with pytest.raises(TypeError, match=r"kv_scale must be a torch.Tensor \(num_blocks, 64, h_kv, ceil\(d / 128\)\) "
                                        r"float32 \(required with an FP8 kv_cache: its scales\), got NoneType"):
        call(inp, kv_scale=None)


def test_kv_scale_not_a_tensor(entry):
    call, inp = entry
    with pytest.raises(TypeError, match=r"kv_scale must be a torch.Tensor .*, got list"):
        call(inp, kv_scale=[1.0])


def test_inline_rope_fp8_is_refused(gla):
    """FP8 has no inline-RoPE layout: a 320-wide e4m3 row (latents + RoPE) is refused, with what to do."""
    kv = torch.zeros(gla.kv_cache.shape[0], 64, H_KV, 320, dtype=FP8)
    scale = torch.ones(gla.kv_cache.shape[0], 64, H_KV, 3)
    with pytest.raises(ValueError, match=r"an FP8 kv_cache \(torch.float8_e4m3fn\) needs the RoPE key stored once, "
                                         r"unquantised, in a rope_cache .*inline-RoPE FP8 is not supported"):
        call_gla(gla, kv_cache=kv, rope_cache=None, kv_scale=scale)
    with pytest.raises(ValueError, match=r"inline-RoPE FP8 is not supported"):  # also without kv_scale
        call_gla(gla, kv_cache=kv, rope_cache=None, kv_scale=None)


def test_flash_mla_alias_refuses_an_fp8_cache(gla):
    """FlashMLA's entry has no rope_cache: an e4m3 cache through it is inline-RoPE FP8."""
    meta, splits = metadata()
    kv = torch.zeros(gla.kv_cache.shape[0], 64, 1, 576, dtype=FP8)
    with pytest.raises(ValueError, match=r"inline-RoPE FP8 is not supported"):
        flash_gla.flash_mla_with_kvcache(gla.q, kv, gla.block_table, gla.cache_seqlens, 512, meta, splits)


@pytest.mark.parametrize("name", ["gla_with_kvcache", "flash_mla_with_kvcache", "get_metadata"])
def test_is_fp8_kvcache_flag_points_to_kv_scale(gla, name):
    """FlashMLA's is_fp8_kvcache=True (its packed 656-byte MLA row) is refused, saying what to use instead."""
    meta, splits = metadata()
    expected = (r"is_fp8_kvcache must be False \(FlashMLA's packed FP8 MLA cache .* is not supported; for an FP8 "
                r"cache pass a torch.float8_e4m3fn kv_cache with its float32 kv_scale and a rope_cache to "
                r"gla_with_kvcache .*same get_metadata.*\), got True")
    with pytest.raises(ValueError, match=expected):
        if name == "get_metadata":
            flash_gla.get_metadata(gla.cache_seqlens, 8, H_KV, is_fp8_kvcache=True)
        elif name == "gla_with_kvcache":
            call_gla(gla, is_fp8_kvcache=True)
        else:
            flash_gla.flash_mla_with_kvcache(gla.q, gla.kv_cache, gla.block_table, gla.cache_seqlens, 256, meta,
                                             splits, is_fp8_kvcache=True)


@pytest.mark.parametrize("cache", ["inline", "rope1", "gta"])
def test_kv_scale_with_a_bf16_cache(cache):
    """kv_scale belongs to an FP8 cache only."""
    shared = cache != "inline"
    d = 128 if cache == "gta" else 256
    inp = make_inputs(B, S_Q, H_Q, H_KV, d, 64, [70, 5], torch.bfloat16, seed=3, shared_rope=shared,
                      q_dim=d if cache == "gta" else None)
    scale = torch.ones(inp.kv_cache.shape[:3] + (-(-inp.kv_cache.shape[3] // 128),))
    match = r"kv_scale must be None with a torch.bfloat16 kv_cache \(kv_scale holds the scales of an FP8 kv_cache, " \
            r"torch.float8_e4m3fn\), got a Tensor"
    with pytest.raises(ValueError, match=match):
        if cache == "gta":
            call_gta(inp, kv_scale=scale)
        else:
            call_gla(inp, rope_cache=inp.rope_cache, kv_scale=scale)


# --- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"])
def test_other_fp8_dtypes(entry, dtype_name):
    call, inp = entry
    dtype = getattr(torch, dtype_name, None)
    if dtype is None:
        pytest.skip(f"this torch has no torch.{dtype_name}")
    with pytest.raises(TypeError, match=rf"kv_cache.dtype must be torch.float8_e4m3fn for an FP8 cache \(else q's "
                                        rf"dtype\), got torch.{dtype_name}: FP8 caches are e4m3 only"):
        call(inp, kv_cache=fp8_like(inp.kv_cache, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int32])
def test_kv_scale_dtype(entry, dtype):
    call, inp = entry
    with pytest.raises(TypeError, match=rf"kv_scale.dtype must be torch.float32, got {dtype}"):
        call(inp, kv_scale=inp.kv_scale.to(dtype))


def test_rope_cache_in_q_dtype_not_the_caches(entry):
    call, inp = entry
    with pytest.raises(TypeError, match=r"rope_cache.dtype must be torch.bfloat16 \(q's dtype: the RoPE key is not "
                                        r"quantised\), got torch.float8_e4m3fn"):
        call(inp, rope_cache=fp8_like(inp.rope_cache))
    with pytest.raises(TypeError, match=r"rope_cache.dtype must be torch.bfloat16 .*, got torch.float16"):
        call(inp, rope_cache=inp.rope_cache.half())


def test_out_in_q_dtype(entry):
    call, inp = entry
    width = inp.q.shape[-1] if call is call_gta else 256
    for dtype in (FP8, torch.float16, torch.float32):
        with pytest.raises(TypeError, match=rf"out.dtype must be torch.bfloat16 \(q's dtype\), got {dtype}"):
            call(inp, out=torch.zeros(B, S_Q, H_Q, width, dtype=dtype))


def test_q_must_be_bf16_or_fp16(entry):
    call, inp = entry
    with pytest.raises(TypeError, match=r"q.dtype must be torch.bfloat16 or torch.float16, got torch.float8_e4m3fn"):
        call(inp, q=fp8_like(inp.q))


# --- shapes ----------------------------------------------------------------------------------


def test_kv_scale_rank(entry):
    call, inp = entry
    with pytest.raises(ValueError, match=r"kv_scale must be 4-D, got 3-D"):
        call(inp, kv_scale=inp.kv_scale[..., 0])


@pytest.mark.parametrize("dim, delta", [(0, -1), (2, 1), (3, 1)], ids=["num_blocks", "h_kv", "groups"])
def test_kv_scale_shape(entry, dim, delta):
    call, inp = entry
    shape = list(inp.kv_scale.shape)
    shape[dim] += delta
    expected = (f"kv_scale.shape must be (num_blocks, 64, h_kv, ceil(d / 128)) = {tuple(inp.kv_scale.shape)} "
                f"(of kv_cache), got {tuple(shape)}")
    with pytest.raises(ValueError, match=re.escape(expected)):
        call(inp, kv_scale=torch.ones(shape))


def test_kv_scale_groups_follow_d(gla):
    """GLA's 256 latents have 2 groups; one scale per row is refused."""
    with pytest.raises(ValueError, match=r"kv_scale.shape must be .* = \(\d+, 64, 2, 2\) .*, got \(\d+, 64, 2, 1\)"):
        call_gla(gla, kv_scale=gla.kv_scale[..., :1])


def test_fp8_unsupported_head_dims(gla, gta):
    """Shapes come from the FP8 instances; the error names the supported ones."""
    with pytest.raises(ValueError, match=r"head_dim_v must be one of \[256\] with a rope_cache and an FP8 kv_cache "
                                         r"\(the FP8 instances\), got 512"):
        call_gla(gla, head_dim_v=512)
    q = torch.zeros(B, S_Q, H_Q, 96, dtype=torch.bfloat16)
    kv = torch.zeros(gta.kv_cache.shape[0], 64, H_KV, 96, dtype=FP8)
    with pytest.raises(ValueError, match=r"q.shape\[3\] \(d\) must be one of \[64, 128\] with an FP8 kv_cache "
                                         r"\(the FP8 instances\), got 96"):
        call_gta(gta, q=q, kv_cache=kv, kv_scale=torch.ones(kv.shape[:3] + (1,)))


def test_fp8_shapes_come_from_the_fp8_instances(monkeypatch):
    """A shape with a bf16 instance but no FP8 one is refused for FP8 only."""
    monkeypatch.setattr(_validation, "GTA_FP8_DIMS", {128: 64})
    monkeypatch.setattr(_validation, "ROPE1_FP8_DIMS", {})
    gta64 = make_inputs(B, S_Q, H_Q, H_KV, 64, 32, [70, 5], torch.bfloat16, seed=4, shared_rope=True, q_dim=64,
                        kv_fp8=True)
    with pytest.raises(ValueError, match=r"q.shape\[3\] \(d\) must be one of \[128\] with an FP8 kv_cache "
                                         r"\(the FP8 instances\), got 64"):
        call_gta(gta64)
    bf16 = dataclasses.replace(gta64, kv_cache=torch.zeros(gta64.kv_cache.shape, dtype=torch.bfloat16), kv_scale=None)
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        call_gta(bf16)
    gla = make_inputs(B, S_Q, H_Q, H_KV, 256, 64, [70, 5], torch.bfloat16, seed=4, shared_rope=True, kv_fp8=True)
    with pytest.raises(ValueError, match=r"head_dim_v must be one of \[\] with a rope_cache and an FP8 kv_cache"):
        call_gla(gla)


# --- strides and alignment (16 elements for an FP8 cache) ----------------------------------


def test_fp8_cache_stride_multiple_of_16_elements(entry):
    """A row stride of d + 8 elements: enough for bf16 (16 bytes), not for FP8 (8 bytes)."""
    call, inp = entry
    nb, page, h_kv, d = inp.kv_cache.shape
    kv = torch.zeros(nb, page, h_kv, d + 8, dtype=torch.uint8)[..., :d].view(FP8)
    with pytest.raises(ValueError, match=rf"kv_cache.stride\(2\) must be a multiple of 16 elements \(16 bytes, for "
                                         rf"TMA\), got {d + 8}"):
        call(inp, kv_cache=kv)
    bf16 = make_inputs(B, S_Q, H_Q, H_KV, d, inp.rope_cache.shape[-1], [70, 5], torch.bfloat16, seed=0,
                       shared_rope=True, q_dim=inp.q.shape[-1])
    kv16 = torch.zeros(nb, page, h_kv, d + 8, dtype=torch.bfloat16)[..., :d]
    with pytest.raises(ValueError, match=DEVICE_ERROR):  # the same stride in bf16 is fine
        call(bf16, kv_cache=kv16, kv_scale=None)


def test_fp8_cache_last_dim_strided(entry):
    call, inp = entry
    kv = torch.zeros(*inp.kv_cache.shape[:-1], 2 * inp.kv_cache.shape[-1], dtype=torch.uint8)[..., ::2].view(FP8)
    with pytest.raises(ValueError, match=r"kv_cache.stride\(-1\) must be 1 \(last dim contiguous\), got 2"):
        call(inp, kv_cache=kv)


def test_fp8_cache_misaligned(entry):
    call, inp = entry
    flat = torch.zeros(inp.kv_cache.numel() + 8, dtype=torch.uint8)
    kv = flat[8:].view(FP8).view(inp.kv_cache.shape)
    with pytest.raises(ValueError, match=r"kv_cache.data_ptr\(\) must be 16-byte aligned \(for TMA\)"):
        call(inp, kv_cache=kv)


# --- the validation itself, on fake CUDA tensors ----------------------------------------------

PARTS = 4  # the scheduler parts num_sm_parts reports here (the metadata's rows)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Fake CUDA tensors, a device with PARTS scheduler parts, an empty validated-layout cache."""
    monkeypatch.setattr(_call, "num_sm_parts", lambda device, rows, h_kv: PARTS)
    monkeypatch.setattr(_call, "_VALIDATED", {})
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        yield torch.device("cuda", 0)


def fake_args(device, kind="gla", dtype=torch.bfloat16, fp8=True, invariant=False, **overrides):
    """The fields of a valid DecodeCall on ``device``."""
    d, d_rope = (256, 64) if kind == "gla" else (128, 64)
    q_dim = d + d_rope if kind == "gla" else d
    nb = 8
    args = dict(
        variant=_validation.GLA_ROPE1 if kind == "gla" else _validation.GTA,
        q=torch.empty(B, S_Q, H_Q, q_dim, dtype=dtype, device=device),
        kv_cache=torch.empty(nb, 64, H_KV, d, dtype=FP8 if fp8 else dtype, device=device),
        rope_cache=torch.empty(nb, 64, 1, d_rope, dtype=dtype, device=device),
        block_table=torch.empty(B, 4, dtype=torch.int32, device=device),
        cache_seqlens=torch.empty(B, dtype=torch.int32, device=device),
        head_dim_v=256 if kind == "gla" else None,
        tile_scheduler_metadata=torch.empty(PARTS + invariant, 8, dtype=torch.int32, device=device),
        num_splits=torch.empty(B + 1, dtype=torch.int32, device=device),
        softmax_scale=None, causal=True, out=None, attn_sink=None, batch_invariant=invariant,
        kv_scale=torch.empty(nb, 64, H_KV, -(-d // 128), dtype=torch.float32, device=device) if fp8 else None,
    )
    args.update(overrides)
    return args


def validate(args):
    return _call.check_decode_call(DecodeCall(**args), check_lengths=False)


@pytest.mark.parametrize("kind", ["gla", "gta"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("invariant", [False, True], ids=["default", "batch-invariant"])
def test_valid_fp8_arguments_pass_validation(fake_cuda, kind, dtype, invariant):
    """Every check passes, and the call's DecodeConfig (what the metadata depends on) is the bf16 cache's."""
    config = validate(fake_args(fake_cuda, kind, dtype, invariant=invariant))
    assert config == validate(fake_args(fake_cuda, kind, dtype, fp8=False, invariant=invariant))
    assert config.batch_invariant == invariant and config.h_kv == H_KV
    assert config.head_dim_v == (256 if kind == "gla" else 128)


def test_valid_fp8_arguments_with_lazy_metadata(fake_cuda):
    sched, _ = flash_gla.get_metadata()
    config = validate(fake_args(fake_cuda, tile_scheduler_metadata=sched, num_splits=None))
    assert config.s_q == S_Q and not sched.have_initialized  # filled by the call, after the validation


def test_valid_fp8_strided_layouts_pass_validation(fake_cuda):
    kv = torch.empty(8, 64, H_KV + 1, 256 + 16, dtype=FP8, device=fake_cuda)[:, :, :H_KV, :256]
    scale = torch.empty(2, 8, 64, H_KV, dtype=torch.float32, device=fake_cuda).permute(1, 2, 3, 0)
    validate(fake_args(fake_cuda, kv_cache=kv, kv_scale=scale))
    validate(fake_args(fake_cuda, kv_scale=torch.empty(1, 1, 1, 1, device=fake_cuda).expand(8, 64, H_KV, 2)))


def test_kv_scale_on_another_device(fake_cuda):
    with pytest.raises(ValueError, match=r"kv_scale must be on q's device cuda:0 .*, got cpu"):
        validate(fake_args(fake_cuda, kv_scale=torch.empty(8, 64, H_KV, 2)))


def test_batch_invariant_plan_must_match_with_fp8(fake_cuda):
    with pytest.raises(ValueError, match=r"it is the batch-invariant plan .*enable_batch_invariant=False"):
        validate(fake_args(fake_cuda, tile_scheduler_metadata=torch.empty(PARTS + 1, 8, dtype=torch.int32,
                                                                          device=fake_cuda)))


def test_validated_layout_key_reads_every_field():
    """The validated-layout cache's key reads every field of a DecodeCall: a field it missed would
    let a call that differs there skip its checks."""
    empty = DecodeCall._make([None] * len(DecodeCall._fields))
    for field in DecodeCall._fields:
        assert _call._layout_key(empty._replace(**{field: torch.zeros(1)})) != _call._layout_key(empty), field


def test_validated_layouts_remember_kv_scale(fake_cuda):
    """The fast path's cache key holds kv_scale's layout: after a valid FP8 call, the same call
    with a bad kv_scale (or none, or one beside a bf16 cache) is checked again and refused."""
    good = fake_args(fake_cuda)
    validate(good)
    validate(good)  # from the cache
    assert len(_call._VALIDATED) == 1
    bad = {
        "float16 kv_scale": (TypeError, r"kv_scale.dtype must be torch.float32",
                             dict(kv_scale=torch.empty(8, 64, H_KV, 2, dtype=torch.float16, device=fake_cuda))),
        "one group": (ValueError, r"kv_scale.shape must be",
                      dict(kv_scale=torch.empty(8, 64, H_KV, 1, device=fake_cuda))),
        "other pages": (ValueError, r"kv_scale.shape must be",
                        dict(kv_scale=torch.empty(9, 64, H_KV, 2, device=fake_cuda))),
        "no kv_scale": (TypeError, r"kv_scale must be a torch.Tensor", dict(kv_scale=None)),
        "on the CPU": (ValueError, r"kv_scale must be on q's device", dict(kv_scale=torch.empty(8, 64, H_KV, 2))),
    }
    for name, (error, match, overrides) in bad.items():
        with pytest.raises(error, match=match):
            validate({**good, **overrides})
    # A bf16 call remembered, then the same layouts with a kv_scale beside the bf16 cache.
    plain = fake_args(fake_cuda, fp8=False)
    validate(plain)
    with pytest.raises(ValueError, match=r"kv_scale must be None with a torch.bfloat16 kv_cache"):
        validate({**plain, "kv_scale": good["kv_scale"]})
    # Another valid kv_scale layout is another key (checked once, then remembered).
    strided = torch.empty(8, 64, H_KV, 3, device=fake_cuda)[..., :2]
    validate({**good, "kv_scale": strided})
    assert len(_call._VALIDATED) == 3


def test_quantised_zero_group_is_scale_one():
    """What the GPU tests' zero-group rows hold: e4m3 zeros and a scale of 1 (quantize_kv_ref = write_kvcache)."""
    values, scales = quantize_kv_ref(torch.zeros(2, 256, dtype=torch.bfloat16))
    assert torch.equal(raw(values), torch.zeros(2, 256, dtype=torch.uint8)) and torch.equal(scales, torch.ones(2, 2))
