"""examples/gla_decode_layer.py on CPU: the absorbed GLA-2 layer equals the un-absorbed model.

The layer runs with flash_gla.reference's kernels (attention and cache writer) in float32, so
any difference from ``ReferenceModel`` (K = [W_UK c_kv, k_rope] and V = W_UV c_kv per query
head, plain softmax) is a mistake in the absorbed math, the RoPE positions, the slots or the
paging. A second test runs the default (flash_gla) path with the three flash_gla calls
replaced by recording stand-ins, to check what an engine copies: one get_metadata per step,
then per layer one write_kvcache and one gla_with_kvcache with the right arguments.
The same layer on an sm_90 GPU, in bf16 and in a CUDA graph: test_engine_layer_gpu.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flash_gla
from flash_gla import reference

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gla_decode_layer.py"
pytestmark = pytest.mark.skipif(not EXAMPLE.is_file(), reason="no examples/ beside the tests (not a source checkout)")


def load_example():
    """examples/gla_decode_layer.py as a module (examples/ is not a package)."""
    if "gla_decode_layer" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gla_decode_layer", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gla_decode_layer"]


def run_steps(demo, s_q: int, steps: int) -> list[float]:
    """Prefill, then ``steps`` decode steps: every relative error against the reference."""
    errors = [demo.prefill()]
    for _ in range(steps):
        x = demo.next_tokens(s_q)
        out = demo.decode(x)
        assert out.shape == x.shape and out.dtype == torch.float32
        errors.append(demo.check(x, out))
    return errors


# The layers' relative error, float32 against float32 along two formulations (absorbed and
# un-absorbed), divided by the layers' contribution to the residual stream: rounding alone,
# summed in orders that the CPU kernels and their thread count choose. Typically 1e-6; up to
# 5e-5 measured on a 2-core machine. A real mistake (a mask, a scale, a RoPE position, a slot)
# shows as 1e-3 or more.
LAYER_RTOL = 1e-4

# Prompts of 5 to 130 tokens: page-edge lengths (63, 64) and decode steps crossing a page.
CASES = {
    "h16-sq1": (dict(h_q=16), [5, 63, 64, 130], 1),
    "h16-sq2": (dict(h_q=16), [5, 63, 64, 130], 2),
    "h8kv1-sq2": (dict(h_q=8, h_kv=1), [62, 3], 2),  # MLA-like: one latent head
    "gla2-h128-sq2": (dict(), [5, 70], 2),  # the example's head configuration
}


@pytest.mark.parametrize("case", list(CASES))
def test_absorbed_layer_equals_unabsorbed_model(case):
    ex = load_example()
    heads, prompts, s_q = CASES[case]
    cfg = ex.Config(hidden=256, num_layers=2, **heads)
    demo = ex.Demo(cfg, ex.REFERENCE, torch.float32, "cpu", prompts, max_new_tokens=3 * s_q, seed=1)
    errors = run_steps(demo, s_q, steps=3)
    assert max(errors) < LAYER_RTOL, f"[{case}] relative errors (prefill, decode steps): {errors}"
    # Every written row is finite, the rest of the pool still NaN: writes went to the slots.
    written = demo.cache_seqlens.sum().item()
    for cache in demo.caches:
        assert int(torch.isfinite(cache.rope).sum()) == written * cfg.d_rope
        assert int(torch.isfinite(cache.kv).sum()) == written * cfg.h_kv * cfg.d_latent


def test_slot_mapping_follows_the_block_table():
    ex = load_example()
    block_table, num_blocks = ex.allocate_pages([130, 5, 64], "cpu", seed=3)
    pages = torch.cat([block_table[0, :3], block_table[1, :1], block_table[2, :1]]).tolist()
    assert num_blocks == 5 and sorted(pages) == list(range(5))  # disjoint pages of one pool
    positions = torch.tensor([[63, 64], [3, 4], [62, 63]])
    slots = ex.slot_mapping(block_table, positions)
    assert slots.dtype == torch.int64 and slots.shape == (6,)
    expected = [block_table[0, 0] * 64 + 63, block_table[0, 1] * 64 + 0, block_table[1, 0] * 64 + 3,
                block_table[1, 0] * 64 + 4, block_table[2, 0] * 64 + 62, block_table[2, 0] * 64 + 63]
    assert slots.tolist() == [int(s) for s in expected]


class Recorder:
    """Stand-ins for flash_gla's three calls that record their arguments and run the reference."""

    def __init__(self, kernels):
        self.kernels, self.calls, self.meta = kernels, [], (object(), object())

    def get_metadata(self, *args):
        self.calls.append(("get_metadata", args, {}))
        return self.meta

    def write_kvcache(self, *args, **kwargs):
        self.calls.append(("write_kvcache", args, kwargs))
        self.kernels.write_kvcache(*args, **kwargs)

    def gla_with_kvcache(self, q, kv_cache, block_table, cache_seqlens, head_dim_v, meta, num_splits, **kwargs):
        self.calls.append(("gla_with_kvcache", (q, kv_cache, block_table, cache_seqlens, head_dim_v, meta,
                                                num_splits), kwargs))
        return reference.gla_with_kvcache_ref(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                              softmax_scale=kwargs["softmax_scale"], causal=kwargs["causal"],
                                              rope_cache=kwargs["rope_cache"])


@pytest.mark.parametrize("s_q", [1, 2])
def test_decode_step_calls_flash_gla_as_an_engine_should(monkeypatch, s_q):
    ex = load_example()
    rec = Recorder(ex.REFERENCE)
    for name in ("get_metadata", "write_kvcache", "gla_with_kvcache"):
        monkeypatch.setattr(flash_gla, name, getattr(rec, name), raising=False)
    cfg = ex.Config(hidden=128, num_layers=3, h_q=16)
    demo = ex.Demo(cfg, ex.FLASH_GLA, torch.float32, "cpu", [5, 64, 100], max_new_tokens=2 * s_q)
    assert demo.model.kernels is ex.FLASH_GLA  # the example's default
    demo.prefill()
    for _ in range(2):
        rec.calls.clear()
        x = demo.next_tokens(s_q)
        assert demo.check(x, demo.decode(x)) < LAYER_RTOL
        names = [name for name, _, _ in rec.calls]
        assert names == ["get_metadata"] + ["write_kvcache", "gla_with_kvcache"] * cfg.num_layers, names
        _, (seqlens, rows, h_kv), _ = rec.calls[0]
        assert seqlens is demo.cache_seqlens and (rows, h_kv) == (s_q * cfg.h_q // cfg.h_kv, cfg.h_kv)
        positions = demo.cache_seqlens[:, None].long() - s_q + torch.arange(s_q)
        slots = ex.slot_mapping(demo.block_table, positions)
        for layer, cache in enumerate(demo.caches):
            _, (kv_cache, slot_mapping, kv, rope), kwargs = rec.calls[1 + 2 * layer]
            assert kv_cache is cache.kv and list(kwargs) == ["rope_cache"] and kwargs["rope_cache"] is cache.rope
            assert torch.equal(slot_mapping, slots) and slot_mapping.dtype == torch.int64
            assert kv.shape == (len(slots), cfg.h_kv, cfg.d_latent) and rope.shape == (len(slots), cfg.d_rope)
            _, (q, kv_cache, table, seqlens, head_dim_v, meta, num_splits), kwargs = rec.calls[2 + 2 * layer]
            assert q.shape == (3, s_q, cfg.h_q, cfg.d_latent + cfg.d_rope) and q.is_contiguous()
            assert kv_cache is cache.kv and table is demo.block_table and seqlens is demo.cache_seqlens
            assert head_dim_v == cfg.d_latent and (meta, num_splits) == rec.meta
            assert kwargs.pop("rope_cache") is cache.rope
            assert kwargs == dict(softmax_scale=(128 + 64) ** -0.5, causal=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the GPU path (GPU test)")
def test_example_script_runs_without_a_gpu():
    env = dict(os.environ, PYTHONPATH=str(Path(flash_gla.__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no sm_90 GPU here" in proc.stdout, proc.stdout
    errors = [float(e) for e in re.findall(r"\d\.\de[-+]\d+", proc.stdout)]
    assert len(errors) == 8 and max(errors) < LAYER_RTOL, proc.stdout
