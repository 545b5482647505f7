"""The ops torch.ops.flash_gla.* on CPU: the schemas the extension registers, the fake
implementations, the stable-ABI calling convention (flash_gla::_abi_probe, a CPU op), and the
public functions' calls of the ops, with fake CUDA tensors. No GPU needed; the extension must be
built (the ops are defined in C++), else these tests skip.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_gla
from flash_gla import _library
from flash_gla._extension import try_load_extension

pytestmark = pytest.mark.skipif(not try_load_extension(), reason="flash_gla._C is not built: the ops are defined in C++")

# The public decode functions pass kv_scale (the FP8 cache's scales, None otherwise) to the op: an
# extension built before the op took it cannot run them (stale in-place build: rebuild it).
_DECODE_ARGS = ([a.name for a in torch.ops.flash_gla.decode.default._schema.arguments]
                if try_load_extension() else [])
needs_kv_scale = pytest.mark.skipif(
    "kv_scale" not in _DECODE_ARGS,
    reason=f"the loaded flash_gla._C predates the decode op's kv_scale (built from {flash_gla.build_info().get('git_commit')}): "
           "rebuild it",
)


def mutated(op) -> set[str]:
    """Names of the arguments an op's schema declares as written."""
    return {a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def test_ops_are_registered_with_what_they_write():
    assert mutated(torch.ops.flash_gla.decode) == {"out"}
    assert mutated(torch.ops.flash_gla.write_kvcache) == {"kv_cache", "rope_cache", "kv_scale"}
    assert mutated(torch.ops.flash_gla.merge_attention) == {"out", "lse"}
    assert mutated(torch.ops.flash_gla.get_metadata) == set()


@needs_kv_scale
def test_schemas_name_every_argument():
    """The public functions pass the arguments in this order; the fakes take the same names."""
    args = {name: [a.name for a in getattr(torch.ops.flash_gla, name).default._schema.arguments]
            for name in ("get_metadata", "decode", "write_kvcache", "merge_attention")}
    assert args == {
        "get_metadata": ["cache_seqlens", "num_q_tokens_per_head_k", "num_heads_k", "batch_invariant"],
        "decode": ["q", "kv_cache", "rope_cache", "block_table", "cache_seqlens", "head_dim_v",
                   "tile_scheduler_metadata", "num_splits", "softmax_scale", "causal", "out", "attn_sink",
                   "batch_invariant", "kv_scale"],
        "write_kvcache": ["kv_cache", "slot_mapping", "kv", "rope", "rope_cache", "kv_scale"],
        "merge_attention": ["out_a", "lse_a", "out_b", "lse_b", "out", "lse"],
    }


@pytest.mark.parametrize("maybe", [None, torch.zeros(5, 2)], ids=["none", "tensor"])
def test_stable_abi_passes_every_argument_kind(maybe):
    """A written tensor, an optional tensor, int, float and bool in; a new tensor and an int out:
    what the real ops exchange with torch, through the same stable-ABI boxing, on CPU."""
    out = torch.zeros(4, dtype=torch.float64)
    filled, next_i = torch.ops.flash_gla._abi_probe.default(out, maybe, -7, 2.5, True)
    assert out.tolist() == [-7.0, 2.5, 1.0, -1.0 if maybe is None else 10.0]
    assert next_i == -6
    assert filled.dtype == torch.int32 and tuple(filled.shape) == (2, 3) and filled.eq(-7).all()


def test_errors_of_the_extension_reach_python():
    with pytest.raises(RuntimeError, match=r"_abi_probe: out must be a contiguous \(4,\) float64 CPU tensor"):
        torch.ops.flash_gla._abi_probe.default(torch.zeros(3, dtype=torch.float64), None, 0, 0.0, False)


def test_num_sm_parts_runs_without_tensor_arguments():
    """An op without tensors dispatches too (it asks the CUDA runtime, which fails without a GPU)."""
    if torch.cuda.is_available():
        assert torch.ops.flash_gla.num_sm_parts.default(0, 64, 2) >= 1
    else:
        with pytest.raises(RuntimeError, match="flash_gla: reading the SM count"):
            torch.ops.flash_gla.num_sm_parts.default(0, 64, 2)


def fake_decode_inputs(b=3, s_q=2, h_q=16, h_kv=2, dv=256, d_rope=64, num_blocks=8, max_pages=4):
    """Fake CUDA tensors of a GLA-2 decode call (inline RoPE)."""
    cuda = torch.device("cuda", 0)
    return dict(
        q=torch.empty(b, s_q, h_q, dv + d_rope, dtype=torch.bfloat16, device=cuda),
        kv_cache=torch.empty(num_blocks, 64, h_kv, dv + d_rope, dtype=torch.bfloat16, device=cuda),
        block_table=torch.empty(b, max_pages, dtype=torch.int32, device=cuda),
        cache_seqlens=torch.empty(b, dtype=torch.int32, device=cuda),
        head_dim_v=dv,
        tile_scheduler_metadata=torch.empty(5, 8, dtype=torch.int32, device=cuda),
        num_splits=torch.empty(b + 1, dtype=torch.int32, device=cuda),
    )


def test_decode_fake_gives_lse_shape():
    with FakeTensorMode():
        a = fake_decode_inputs()
        out = torch.empty(3, 2, 16, 256, dtype=torch.bfloat16, device="cuda")
        lse = torch.ops.flash_gla.decode(a["q"], a["kv_cache"], None, a["block_table"], a["cache_seqlens"], 256,
                                         a["tile_scheduler_metadata"], a["num_splits"], 0.1, True, out, None, False)
    assert tuple(lse.shape) == (3, 16, 2) and lse.dtype == torch.float32 and lse.device.type == "cuda"


def test_get_metadata_fake_gives_the_devices_part_count(monkeypatch):
    monkeypatch.setattr(_library, "num_sm_parts", lambda device, rows, h_kv: 66 if (rows, h_kv) == (64, 2) else -1)
    with FakeTensorMode():
        seqlens = torch.empty(5, dtype=torch.int32, device="cuda")
        meta, num_splits = torch.ops.flash_gla.get_metadata(seqlens, 64, 2, False)
        invariant_meta, _ = torch.ops.flash_gla.get_metadata(seqlens, 64, 2, True)
    assert tuple(meta.shape) == (66, 8) and tuple(num_splits.shape) == (6,)
    assert tuple(invariant_meta.shape) == (67, 8)  # the batch-invariant plan's header row
    assert meta.dtype == num_splits.dtype == torch.int32


def test_write_kvcache_fake_returns_nothing():
    with FakeTensorMode():
        cache = torch.empty(4, 64, 2, 256, dtype=torch.bfloat16, device="cuda")
        rope_cache = torch.empty(4, 64, 1, 64, dtype=torch.bfloat16, device="cuda")
        result = torch.ops.flash_gla.write_kvcache(
            cache, torch.empty(7, dtype=torch.int64, device="cuda"),
            torch.empty(7, 2, 256, dtype=torch.bfloat16, device="cuda"),
            torch.empty(7, 64, dtype=torch.bfloat16, device="cuda"), rope_cache)
    assert result is None


@pytest.fixture
def compiling(monkeypatch):
    """As if torch.compile were tracing: the public functions take the registered ops."""
    monkeypatch.setattr(_library, "compiling", lambda: True)


@needs_kv_scale
@pytest.mark.usefixtures("compiling")
def test_public_decode_uses_the_op_while_compiling():
    with FakeTensorMode():
        a = fake_decode_inputs()
        out, lse = flash_gla.gla_with_kvcache(**a, causal=True)
    assert tuple(out.shape) == (3, 2, 16, 256) and out.dtype == torch.bfloat16
    assert tuple(lse.shape) == (3, 16, 2) and lse.dtype == torch.float32


@needs_kv_scale
@pytest.mark.usefixtures("compiling")
def test_public_decode_writes_the_given_out_while_compiling():
    with FakeTensorMode():
        a = fake_decode_inputs()
        given = torch.empty(3, 2, 16, 256, dtype=torch.bfloat16, device="cuda")
        out, _ = flash_gla.gla_with_kvcache(**a, out=given, attn_sink=torch.empty(16, device="cuda"))
    assert out is given


@pytest.mark.usefixtures("compiling")
def test_lazy_metadata_is_refused_while_compiling():
    with FakeTensorMode():
        a = fake_decode_inputs()
        a["tile_scheduler_metadata"], a["num_splits"] = flash_gla.get_metadata()
        with pytest.raises(TypeError, match=r"lazy metadata object .* cannot be compiled: .* classic form"):
            flash_gla.gla_with_kvcache(**a)


def test_public_writer_calls_the_op():
    """Under FakeTensorMode the op runs its fake: validation passed and the op was reached."""
    with FakeTensorMode():
        result = flash_gla.write_kvcache(torch.empty(4, 64, 2, 320, dtype=torch.bfloat16, device="cuda"),
                                         torch.empty(7, dtype=torch.int64, device="cuda"),
                                         torch.empty(7, 2, 256, dtype=torch.bfloat16, device="cuda"),
                                         rope=torch.empty(7, 64, dtype=torch.bfloat16, device="cuda"))
    assert result is None


def test_public_fp8_writer_calls_the_op(monkeypatch):
    """An FP8 write (float8_e4m3fn cache, kv_scale) passes validation and reaches the op's fake;
    traced, its addresses are not checked (compiling() as under torch.compile)."""
    monkeypatch.setattr(_library, "compiling", lambda: True)
    with FakeTensorMode():
        result = flash_gla.write_kvcache(torch.empty(4, 64, 2, 256, dtype=torch.float8_e4m3fn, device="cuda"),
                                         torch.empty(7, dtype=torch.int64, device="cuda"),
                                         torch.empty(7, 2, 256, dtype=torch.bfloat16, device="cuda"),
                                         rope=torch.empty(7, 64, dtype=torch.bfloat16, device="cuda"),
                                         rope_cache=torch.empty(4, 64, 1, 64, dtype=torch.bfloat16, device="cuda"),
                                         kv_scale=torch.empty(4, 64, 2, 2, dtype=torch.float32, device="cuda"))
    assert result is None


@needs_kv_scale
@pytest.mark.usefixtures("compiling")
def test_public_fp8_decode_calls_the_op():
    """FP8 decode calls (e4m3 cache, float32 kv_scale, bf16 RoPE cache) pass validation and reach the op's fake."""
    cuda = torch.device("cuda", 0)
    with FakeTensorMode():  # every tensor fake: no GPU needed
        meta = dict(tile_scheduler_metadata=torch.empty(5, 8, dtype=torch.int32, device=cuda),
                    num_splits=torch.empty(4, dtype=torch.int32, device=cuda))
        table = dict(block_table=torch.empty(3, 4, dtype=torch.int32, device=cuda),
                     cache_seqlens=torch.empty(3, dtype=torch.int32, device=cuda))
        gla_out, gla_lse = flash_gla.gla_with_kvcache(
            torch.empty(3, 2, 16, 320, dtype=torch.bfloat16, device=cuda),
            torch.empty(8, 64, 2, 256, dtype=torch.float8_e4m3fn, device=cuda), head_dim_v=256, **table, **meta,
            rope_cache=torch.empty(8, 64, 1, 64, dtype=torch.bfloat16, device=cuda),
            kv_scale=torch.empty(8, 64, 2, 2, dtype=torch.float32, device=cuda), causal=True)
        gta_out, gta_lse = flash_gla.gta_with_kvcache(
            torch.empty(3, 1, 32, 128, dtype=torch.float16, device=cuda),
            torch.empty(8, 64, 8, 128, dtype=torch.float8_e4m3fn, device=cuda),
            torch.empty(8, 64, 1, 64, dtype=torch.float16, device=cuda), **table, **meta,
            kv_scale=torch.empty(8, 64, 8, 1, dtype=torch.float32, device=cuda))
    assert tuple(gla_out.shape) == (3, 2, 16, 256) and gla_out.dtype == torch.bfloat16
    assert tuple(gta_out.shape) == (3, 1, 32, 128) and gta_out.dtype == torch.float16
    assert tuple(gla_lse.shape) == (3, 16, 2) and tuple(gta_lse.shape) == (3, 32, 1)


def test_public_merge_calls_the_op():
    with FakeTensorMode():
        out_a, out_b = (torch.empty(2, 3, 4, 64, device="cuda") for _ in range(2))
        lse_a, lse_b = (torch.empty(2, 4, 3, device="cuda") for _ in range(2))
        out, lse = flash_gla.merge_attention(out_a, lse_a, out_b, lse_b)
    assert tuple(out.shape) == (2, 3, 4, 64) and tuple(lse.shape) == (2, 4, 3)


@needs_kv_scale
@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # the eager alignment check
def test_eager_decode_calls_the_op_with_its_out(monkeypatch):
    """Eagerly too, the public functions call torch.ops.flash_gla.* (there is no other way in)."""
    from flash_gla import _call

    monkeypatch.setattr(_call, "num_sm_parts", lambda device, rows, h_kv: 5)
    with FakeTensorMode():
        a = fake_decode_inputs()
        given = torch.empty(3, 2, 16, 256, dtype=torch.bfloat16, device="cuda")
        out, lse = flash_gla.gla_with_kvcache(**a, out=given)
    assert out is given and tuple(lse.shape) == (3, 16, 2) and lse.dtype == torch.float32
