"""Every bad input gets a Python exception naming the argument (CPU: no GPU, no extension).

The device check runs last, so on CPU tensors every other check is reachable: a valid set of
CPU inputs must fail only with the device error (test_valid_cpu_inputs_reach_device_check),
and each test below breaks exactly one thing.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_inputs

import flash_gla
from flash_gla import ops

B, S_Q, H_Q, H_KV, DV, D_ROPE = 2, 1, 4, 2, 256, 64
D_QK = DV + D_ROPE


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(B, S_Q, H_Q, H_KV, DV, D_ROPE, [70, 5], torch.bfloat16, seed=0)


def call_args(inp, **overrides):
    args = dict(
        q=inp.q,
        kv_cache=inp.kv_cache,
        block_table=inp.block_table,
        cache_seqlens=inp.cache_seqlens,
        head_dim_v=DV,
        tile_scheduler_metadata=torch.zeros(4, 8, dtype=torch.int32),
        num_splits=torch.zeros(B + 1, dtype=torch.int32),
    )
    args.update(overrides)
    return args


def check_raises(inp, error, match, **overrides):
    with pytest.raises(error, match=match):
        flash_gla.gla_with_kvcache(**call_args(inp, **overrides))


def strided_last_dim(t):
    """Same values, last-dim stride 2."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def test_valid_cpu_inputs_reach_device_check(inputs):
    check_raises(inputs, ValueError, r"q must be a CUDA tensor")


# --- Python types --------------------------------------------------------------------


def test_q_not_a_tensor(inputs):
    check_raises(inputs, TypeError, r"^q must be a torch.Tensor, got list", q=[1.0])


def test_head_dim_v_not_int(inputs):
    check_raises(inputs, TypeError, r"head_dim_v must be an int, got float", head_dim_v=256.0)


def test_causal_not_bool(inputs):
    check_raises(inputs, TypeError, r"causal must be a bool, got int", causal=1)


def test_softmax_scale_not_number(inputs):
    check_raises(inputs, TypeError, r"softmax_scale must be a float", softmax_scale="0.1")


def test_num_splits_missing_with_tensor_metadata(inputs):
    check_raises(inputs, TypeError, r"num_splits must be a torch.Tensor", num_splits=None)


def test_metadata_tuple_from_lazy_form(inputs):
    check_raises(
        inputs, TypeError, r"tile_scheduler_metadata .*tuple",
        tile_scheduler_metadata=flash_gla.get_metadata(), num_splits=None,
    )


def test_num_splits_given_with_lazy_metadata(inputs):
    sched, _ = flash_gla.get_metadata()
    check_raises(inputs, TypeError, r"num_splits must be None", tile_scheduler_metadata=sched)


# --- unsupported features --------------------------------------------------------------


def test_is_fp8_kvcache(inputs):
    check_raises(inputs, ValueError, r"is_fp8_kvcache must be False", is_fp8_kvcache=True)


def test_indices(inputs):
    check_raises(inputs, ValueError, r"indices must be None", indices=torch.zeros(B, S_Q, 8, dtype=torch.int32))


def test_rope_cache_with_inline_kv_rows(inputs):
    """A rope_cache beside kv rows that still hold the RoPE dims: kv_cache is too wide."""
    rope = torch.randn(inputs.kv_cache.shape[0], 64, 1, D_ROPE).to(torch.bfloat16)
    check_raises(inputs, ValueError, r"kv_cache.shape\[3\] must equal head_dim_v = 256 with a rope_cache .*, got 320",
                 rope_cache=rope)


# --- dtypes ----------------------------------------------------------------------------


def test_q_dtype(inputs):
    check_raises(inputs, TypeError, r"q.dtype must be torch.bfloat16 or torch.float16, got torch.float32", q=inputs.q.float())


def test_kv_cache_dtype_mismatch(inputs):
    check_raises(
        inputs, TypeError, r"kv_cache.dtype must be torch.bfloat16 \(q's dtype\), got torch.float16",
        kv_cache=inputs.kv_cache.half(),
    )


def test_block_table_int64(inputs):
    check_raises(
        inputs, TypeError, r"block_table.dtype must be torch.int32, got torch.int64",
        block_table=inputs.block_table.long(),
    )


def test_cache_seqlens_int64(inputs):
    check_raises(
        inputs, TypeError, r"cache_seqlens.dtype must be torch.int32, got torch.int64",
        cache_seqlens=inputs.cache_seqlens.long(),
    )


def test_metadata_dtype(inputs):
    check_raises(
        inputs, TypeError, r"tile_scheduler_metadata.dtype must be torch.int32",
        tile_scheduler_metadata=torch.zeros(4, 8, dtype=torch.int64),
    )


def test_num_splits_dtype(inputs):
    check_raises(inputs, TypeError, r"num_splits.dtype must be torch.int32", num_splits=torch.zeros(B + 1))


def test_out_dtype(inputs):
    check_raises(inputs, TypeError, r"out.dtype must be torch.bfloat16", out=torch.empty(B, S_Q, H_Q, DV, dtype=torch.float16))


def test_dtype_checked_before_shape(inputs):
    bad = torch.zeros(1, 32, H_KV, D_QK, dtype=torch.float16)  # wrong dtype and page size
    check_raises(inputs, TypeError, r"kv_cache.dtype", kv_cache=bad)


# --- ranks, shapes, divisibility ---------------------------------------------------------


def test_q_rank(inputs):
    check_raises(inputs, ValueError, r"q must be 4-D, got 3-D", q=inputs.q[0])


def test_kv_cache_rank(inputs):
    check_raises(inputs, ValueError, r"kv_cache must be 4-D, got 3-D", kv_cache=inputs.kv_cache[:, :, 0])


def test_block_table_rank(inputs):
    check_raises(inputs, ValueError, r"block_table must be 2-D", block_table=inputs.block_table[0])


def test_page_size_32(inputs):
    kv = torch.zeros(8, 32, H_KV, D_QK, dtype=torch.bfloat16)
    check_raises(inputs, ValueError, r"kv_cache.shape\[1\] \(page size\) must be 64, got 32", kv_cache=kv)


def test_unsupported_d_qk(inputs):
    q = torch.zeros(B, S_Q, H_Q, 128, dtype=torch.bfloat16)
    kv = torch.zeros(8, 64, H_KV, 128, dtype=torch.bfloat16)
    check_raises(inputs, ValueError, r"q.shape\[3\] \(d_qk\) must be one of \[320, 576\], got 128", q=q, kv_cache=kv)


def test_kv_dim_differs_from_q(inputs):
    kv = torch.zeros(8, 64, H_KV, 576, dtype=torch.bfloat16)
    check_raises(inputs, ValueError, r"kv_cache.shape\[3\] must equal q.shape\[3\] \(d_qk\) = 320, got 576", kv_cache=kv)


def test_head_dim_v_wrong(inputs):
    check_raises(inputs, ValueError, r"head_dim_v must be 256 for d_qk 320, got 512", head_dim_v=512)


def test_h_q_not_multiple_of_h_kv(inputs):
    q = torch.zeros(B, S_Q, 3, D_QK, dtype=torch.bfloat16)
    check_raises(inputs, ValueError, r"q.shape\[2\] \(h_q = 3\) must be a multiple of kv_cache.shape\[2\] \(h_kv = 2\)", q=q)


def test_group_too_large(inputs):
    q = torch.zeros(B, S_Q, 512, D_QK, dtype=torch.bfloat16)  # 512 / 2 = 256 heads per KV head
    check_raises(inputs, ValueError, r"h_q / h_kv .* must be <= 128, got 512 / 2 = 256", q=q)


def test_too_many_query_rows(inputs):
    q = torch.zeros(B, 9, 256, D_QK, dtype=torch.bfloat16)  # 9 * 128 = 1152 rows per KV head
    check_raises(inputs, ValueError, r"s_q \* h_q / h_kv .* must be <= 1024, got 9 \* 128 = 1152", q=q)


def test_block_table_wrong_batch(inputs):
    bt = torch.zeros(B + 1, inputs.block_table.shape[1], dtype=torch.int32)
    check_raises(inputs, ValueError, r"block_table.shape\[0\] must equal q.shape\[0\] \(batch\) = 2, got 3", block_table=bt)


def test_cache_seqlens_wrong_batch(inputs):
    check_raises(
        inputs, ValueError, r"cache_seqlens.shape\[0\] must equal .* = 2, got 3",
        cache_seqlens=torch.zeros(3, dtype=torch.int32),
    )


def test_cache_seqlens_rank(inputs):
    check_raises(inputs, ValueError, r"cache_seqlens must be 1-D", cache_seqlens=inputs.cache_seqlens[:, None])


def test_num_splits_from_other_batch_size(inputs):
    check_raises(
        inputs, ValueError, r"num_splits.shape\[0\] must be batch \+ 1 = 3, got 5 \(metadata from a different batch size",
        num_splits=torch.zeros(5, dtype=torch.int32),
    )


def test_metadata_wrong_fields(inputs):
    check_raises(
        inputs, ValueError, r"tile_scheduler_metadata.shape\[1\] must be 8, got 7",
        tile_scheduler_metadata=torch.zeros(4, 7, dtype=torch.int32),
    )


def test_out_wrong_shape(inputs):
    out = torch.empty(B, S_Q, H_Q, 512, dtype=torch.bfloat16)
    check_raises(inputs, ValueError, r"out.shape must be .*\(2, 1, 4, 256\), got \(2, 1, 4, 512\)", out=out)


def test_softmax_scale_nan(inputs):
    check_raises(inputs, ValueError, r"softmax_scale must be finite, got nan", softmax_scale=math.nan)


@pytest.mark.parametrize("scale", [0.0, -0.1])
def test_softmax_scale_not_positive(inputs, scale):
    check_raises(inputs, ValueError, r"softmax_scale must be positive", softmax_scale=scale)


def test_zero_batch(inputs):
    q = torch.zeros(0, S_Q, H_Q, D_QK, dtype=torch.bfloat16)
    check_raises(inputs, ValueError, r"q.shape\[0\] \(batch\) must be >= 1, got 0", q=q)


# --- strides and alignment ---------------------------------------------------------------


def test_q_last_dim_not_contiguous(inputs):
    check_raises(inputs, ValueError, r"q.stride\(-1\) must be 1 .*, got 2", q=strided_last_dim(inputs.q))


def test_kv_cache_last_dim_not_contiguous(inputs):
    check_raises(inputs, ValueError, r"kv_cache.stride\(-1\) must be 1", kv_cache=strided_last_dim(inputs.kv_cache))


def test_kv_cache_stride_not_16_byte_multiple(inputs):
    n, page, h, d = inputs.kv_cache.shape
    padded = torch.zeros(n, page, h, d + 1, dtype=torch.bfloat16)[..., :d]  # strides (.., 642, 321, 1)
    check_raises(
        inputs, ValueError, r"kv_cache.stride\(1\) must be a multiple of 8 elements \(16 bytes, for TMA\), got 642",
        kv_cache=padded,
    )


def test_kv_cache_misaligned_pointer(inputs):
    n, page, h, d = inputs.kv_cache.shape
    flat = torch.zeros(n * page * h * d + 8, dtype=torch.bfloat16)
    shifted = flat[1 : 1 + n * page * h * d].view(n, page, h, d)  # 2 bytes past an aligned base
    check_raises(inputs, ValueError, r"kv_cache.data_ptr\(\) must be 16-byte aligned", kv_cache=shifted)


def test_block_table_last_dim_not_contiguous(inputs):
    check_raises(inputs, ValueError, r"block_table.stride\(-1\) must be 1", block_table=strided_last_dim(inputs.block_table))


def test_cache_seqlens_not_contiguous(inputs):
    seqlens = torch.zeros(2 * B, dtype=torch.int32)[::2]
    check_raises(inputs, ValueError, r"cache_seqlens must be contiguous", cache_seqlens=seqlens)


def test_out_not_contiguous(inputs):
    out = torch.empty(B, S_Q, H_Q, 2 * DV, dtype=torch.bfloat16)[..., :DV]
    check_raises(inputs, ValueError, r"out must be contiguous", out=out)


def test_shape_checked_before_stride(inputs):
    bad = strided_last_dim(torch.zeros(B, S_Q, 3, D_QK, dtype=torch.bfloat16))  # bad h_q and stride
    check_raises(inputs, ValueError, r"h_q = 3", q=bad)


# --- lengths vs. block-table capacity (the opt-in debug check) --------------------------------


@pytest.fixture
def length_check(monkeypatch):
    """flash_gla.ops.CHECK_LENGTHS on: off by default, since it syncs with the GPU."""
    monkeypatch.setattr(ops, "CHECK_LENGTHS", True)


def test_length_check_is_off_by_default():
    assert ops.CHECK_LENGTHS is False


@pytest.mark.usefixtures("length_check")
def test_length_exceeds_table_capacity(inputs):
    capacity = inputs.block_table.shape[1] * 64
    lengths = torch.tensor([70, capacity + 1], dtype=torch.int32)
    check_raises(
        inputs, ValueError, rf"cache_seqlens values must lie in \[0, .* = {capacity}\].*max {capacity + 1}",
        cache_seqlens=lengths,
    )


@pytest.mark.usefixtures("length_check")
def test_negative_length(inputs):
    check_raises(
        inputs, ValueError, r"cache_seqlens values .* got min -1",
        cache_seqlens=torch.tensor([-1, 5], dtype=torch.int32),
    )


@pytest.mark.usefixtures("length_check")
def test_length_at_capacity_is_fine(inputs):
    capacity = inputs.block_table.shape[1] * 64
    lengths = torch.tensor([capacity, 0], dtype=torch.int32)
    check_raises(inputs, ValueError, r"q must be a CUDA tensor", cache_seqlens=lengths)


def test_length_check_can_be_disabled(inputs, monkeypatch):
    monkeypatch.setattr(ops, "CHECK_LENGTHS", False)
    lengths = torch.tensor([70, 10**6], dtype=torch.int32)
    check_raises(inputs, ValueError, r"q must be a CUDA tensor", cache_seqlens=lengths)


# --- lazy scheduler metadata -----------------------------------------------------------------


def test_lazy_form_returns_object_and_none():
    sched, placeholder = flash_gla.get_metadata()
    assert isinstance(sched, flash_gla.SchedulerMetadata) and placeholder is None
    assert not sched.have_initialized


def test_lazy_metadata_reused_with_other_batch(inputs):
    sched, _ = flash_gla.get_metadata()
    sched.config = ops.DecodeConfig(B + 1, S_Q, H_Q, H_KV, 64, False, DV, torch.device("cpu"))
    check_raises(inputs, ValueError, r"batch 3 -> 2", tile_scheduler_metadata=sched, num_splits=None)


def test_lazy_metadata_names_every_change():
    sched = flash_gla.SchedulerMetadata()
    old = ops.DecodeConfig(4, 1, 128, 2, 64, False, 256, torch.device("cpu"))
    sched.config = old
    sched.check_config(old)  # same config: fine
    new = ops.DecodeConfig(4, 2, 128, 2, 64, True, 256, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"s_q 1 -> 2, causal False -> True"):
        sched.check_config(new)


# --- get_metadata ------------------------------------------------------------------------------


def test_get_metadata_partial_arguments():
    with pytest.raises(TypeError, match="either no arguments"):
        flash_gla.get_metadata(torch.zeros(2, dtype=torch.int32))


def test_get_metadata_seqlens_dtype():
    with pytest.raises(TypeError, match=r"cache_seqlens.dtype must be torch.int32, got torch.int64"):
        flash_gla.get_metadata(torch.zeros(2, dtype=torch.int64), 64, 2)


def test_get_metadata_seqlens_rank():
    with pytest.raises(ValueError, match=r"cache_seqlens must be 1-D"):
        flash_gla.get_metadata(torch.zeros(2, 1, dtype=torch.int32), 64, 2)


def test_get_metadata_num_heads_k_positive():
    with pytest.raises(ValueError, match=r"num_heads_k must be >= 1, got 0"):
        flash_gla.get_metadata(torch.zeros(2, dtype=torch.int32), 64, 0)


def test_get_metadata_num_q_tokens_int():
    with pytest.raises(TypeError, match=r"num_q_tokens_per_head_k must be an int, got float"):
        flash_gla.get_metadata(torch.zeros(2, dtype=torch.int32), 64.0, 2)


def test_get_metadata_cpu_tensor():
    with pytest.raises(ValueError, match=r"cache_seqlens must be a CUDA tensor"):
        flash_gla.get_metadata(torch.zeros(2, dtype=torch.int32), 64, 2)


def test_get_metadata_rejects_fp8_and_topk():
    with pytest.raises(ValueError, match="is_fp8_kvcache must be False"):
        flash_gla.get_metadata(torch.zeros(2, dtype=torch.int32), 64, 2, is_fp8_kvcache=True)
    with pytest.raises(ValueError, match="topk must be None"):
        flash_gla.get_metadata(torch.zeros(2, dtype=torch.int32), 64, 2, topk=2048)


# --- FlashMLA spelling ---------------------------------------------------------------------------


def test_flash_mla_names():
    assert flash_gla.get_mla_metadata is flash_gla.get_metadata


def test_flash_mla_keyword_call_reaches_device_check(inputs):
    args = call_args(inputs)
    args["k_cache"] = args.pop("kv_cache")
    with pytest.raises(ValueError, match=r"q must be a CUDA tensor"):
        flash_gla.flash_mla_with_kvcache(**args, softmax_scale=0.1, causal=True, is_fp8_kvcache=False)


def test_flash_mla_positional_call_reaches_device_check(inputs):
    a = call_args(inputs)
    with pytest.raises(ValueError, match=r"q must be a CUDA tensor"):
        flash_gla.flash_mla_with_kvcache(
            a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], DV,
            a["tile_scheduler_metadata"], a["num_splits"], 0.1, True, False, None,
        )


def test_flash_mla_unsupported_arguments(inputs):
    args = call_args(inputs)
    args["k_cache"] = args.pop("kv_cache")
    for name in ("extra_k_cache", "extra_indices_in_kvcache", "topk_length", "extra_topk_length"):
        with pytest.raises(ValueError, match=rf"{name} must be None .*got a Tensor"):
            flash_gla.flash_mla_with_kvcache(**args, **{name: torch.zeros(H_Q)})


# --- attention sinks; batch invariance (refused) -------------------------------------------


@pytest.mark.parametrize(
    "sink, error, match",
    [
        ([0.0] * H_Q, TypeError, r"attn_sink must be a torch.Tensor \(h_q,\) float32 or None, got list"),
        (torch.zeros(H_Q, dtype=torch.bfloat16), TypeError, r"attn_sink.dtype must be torch.float32, got torch.bfloat16"),
        (torch.zeros(1, H_Q), ValueError, r"attn_sink must be 1-D, got 2-D"),
        (torch.zeros(2 * H_Q)[::2], ValueError, r"attn_sink must be contiguous"),
        (torch.zeros(H_Q + 1), ValueError, rf"attn_sink.shape must be \(h_q,\) = \({H_Q},\), got \({H_Q + 1},\)"),
    ],
    ids=["list", "bf16", "2d", "strided", "wrong-length"],
)
def test_attn_sink_is_checked(inputs, sink, error, match):
    for entry in (flash_gla.gla_with_kvcache, flash_gla.flash_mla_with_kvcache):
        args = call_args(inputs)
        if entry is flash_gla.flash_mla_with_kvcache:
            args["k_cache"] = args.pop("kv_cache")
        with pytest.raises(error, match=match):
            entry(**args, attn_sink=sink)


def test_good_attn_sink_reaches_device_check(inputs):
    check_raises(inputs, ValueError, r"q must be a CUDA tensor", attn_sink=torch.zeros(H_Q))


def test_batch_invariance_flag_is_checked(inputs):
    args = call_args(inputs)
    with pytest.raises(TypeError, match=r"enable_batch_invariant must be a bool, got int"):
        flash_gla.gla_with_kvcache(**args, enable_batch_invariant=1)
    args["k_cache"] = args.pop("kv_cache")  # FlashMLA's alias passes it on; CPU tensors stop at the device
    with pytest.raises(ValueError, match=r"q must be a CUDA tensor"):
        flash_gla.flash_mla_with_kvcache(**args, enable_batch_invariant=True)


def test_batch_invariant_lazy_metadata_takes_the_flag_at_the_call():
    with pytest.raises(ValueError, match=r"enable_batch_invariant=True applies to the classic form"):
        flash_gla.get_metadata(enable_batch_invariant=True)
    with pytest.raises(TypeError, match=r"enable_batch_invariant must be a bool"):
        flash_gla.get_metadata(enable_batch_invariant="yes")


def test_flash_mla_out_keyword_is_validated(inputs):
    args = call_args(inputs)
    args["k_cache"] = args.pop("kv_cache")
    bad_out = torch.empty(1, dtype=inputs.q.dtype)
    with pytest.raises(ValueError, match=r"out must be 4-D"):
        flash_gla.flash_mla_with_kvcache(**args, out=bad_out)


WITHOUT_EXTENSION = """
import importlib.abc, sys
sys.path.insert(0, sys.argv[1])


class BlockExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flash_gla._C":
            raise ImportError("flash_gla._C blocked by the test")
        return None


sys.meta_path.insert(0, BlockExtension())
import torch
import flash_gla
from flash_gla import ops

# The reference runs.
q = torch.randn(1, 1, 2, 320).bfloat16()
kv = torch.randn(2, 64, 1, 320).bfloat16()
table = torch.tensor([[1, 0]], dtype=torch.int32)
lengths = torch.tensor([70], dtype=torch.int32)
out, lse = flash_gla.reference.gla_with_kvcache_ref(q, kv, table, lengths, 256)
assert out.shape == (1, 1, 2, 256) and torch.isfinite(lse).all(), (out.shape, lse)

# The validation runs up to the device check.
meta, splits = torch.zeros(4, 8, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
try:
    flash_gla.gla_with_kvcache(q, kv, table, lengths, 256, meta, splits)
except ValueError as err:
    assert "q must be a CUDA tensor" in str(err), err
else:
    raise AssertionError("CPU inputs passed the validation")

# Using the extension says what is missing.
try:
    ops._load_extension()
except ImportError as err:
    assert "flash_gla._C" in str(err) and "Build it" in str(err), err
else:
    raise AssertionError("ops._load_extension() did not raise")
assert "flash_gla._C" not in sys.modules
print("without extension: ok")
"""


def test_import_without_extension_is_fine():
    """import flash_gla, the reference and the validation work where flash_gla._C cannot be
    imported (blocked in a fresh interpreter, so this holds on a machine that has it too)."""
    package_root = str(Path(flash_gla.__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, "-c", WITHOUT_EXTENSION, package_root], capture_output=True, text=True)
    assert run.returncode == 0 and "without extension: ok" in run.stdout, run.stdout + run.stderr
