"""The torch.library custom ops (torch.ops.flash_gla.*) on CPU: schemas, fake implementations,
and the public functions' compile path, with fake CUDA tensors (no GPU, no extension needed).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_gla
from flash_gla import _library


def mutated(op) -> set[str]:
    """Names of the arguments an op's schema declares as written."""
    return {a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def test_ops_are_registered_with_what_they_write():
    assert mutated(torch.ops.flash_gla.decode) == {"out"}
    assert mutated(torch.ops.flash_gla.write_kvcache) == {"kv_cache", "rope_cache"}
    assert mutated(torch.ops.flash_gla.get_metadata) == set()


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
                                         a["tile_scheduler_metadata"], a["num_splits"], 0.1, True, out, None)
    assert tuple(lse.shape) == (3, 16, 2) and lse.dtype == torch.float32 and lse.device.type == "cuda"


def test_get_metadata_fake_gives_the_devices_part_count(monkeypatch):
    monkeypatch.setattr(_library, "num_sm_parts", lambda device, rows, h_kv: 66 if (rows, h_kv) == (64, 2) else -1)
    with FakeTensorMode():
        seqlens = torch.empty(5, dtype=torch.int32, device="cuda")
        meta, num_splits = torch.ops.flash_gla.get_metadata(seqlens, 64, 2)
    assert tuple(meta.shape) == (66, 8) and tuple(num_splits.shape) == (6,)
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


@pytest.mark.usefixtures("compiling")
def test_public_decode_uses_the_op_while_compiling():
    with FakeTensorMode():
        a = fake_decode_inputs()
        out, lse = flash_gla.gla_with_kvcache(**a, causal=True)
    assert tuple(out.shape) == (3, 2, 16, 256) and out.dtype == torch.bfloat16
    assert tuple(lse.shape) == (3, 16, 2) and lse.dtype == torch.float32


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


@pytest.mark.usefixtures("compiling")
def test_public_writer_uses_the_op_while_compiling(monkeypatch):
    calls = []
    monkeypatch.setattr(_library, "write_kvcache", lambda *args: calls.append(len(args)))
    with FakeTensorMode():
        flash_gla.write_kvcache(torch.empty(4, 64, 2, 320, dtype=torch.bfloat16, device="cuda"),
                                torch.empty(7, dtype=torch.int64, device="cuda"),
                                torch.empty(7, 2, 256, dtype=torch.bfloat16, device="cuda"),
                                rope=torch.empty(7, 64, dtype=torch.bfloat16, device="cuda"))
    assert calls == [5]


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # the eager alignment check
def test_eager_calls_do_not_take_the_op(monkeypatch):
    """Eagerly, the public functions launch through the extension (no dispatcher host time)."""
    from flash_gla import _validation, ops

    launched = []

    class Extension:
        def decode(self, *args):
            launched.append(len(args))
            return args[10], None

    monkeypatch.setattr(_library, "decode", lambda *args: pytest.fail("the op was called eagerly"))
    monkeypatch.setattr(_validation, "num_sm_parts", lambda device, rows, h_kv: 5)
    monkeypatch.setattr(ops, "_load_extension", lambda: Extension())
    with FakeTensorMode():
        a = fake_decode_inputs()
        flash_gla.gla_with_kvcache(**a, out=torch.empty(3, 2, 16, 256, dtype=torch.bfloat16, device="cuda"))
    assert launched == [12]
