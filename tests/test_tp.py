"""examples/gla_tp_layer.py on CPU: the sharding math of tensor- and context-parallel decode.

Page ownership and local lengths against brute force; each rank's local sequence against the
request's tokens; the dense triangle of the step's newest keys against attention_ref; and whole
sharded layer steps, each rank a thread with thread-backed collectives and flash_gla.reference's
kernels (merge_attention_ref included), against the unsharded layer of
examples/gla_decode_layer.py, in float32: GLA-2 TP-2, MLA TP-2, MLA DCP-2 and -3, GLA with one
latent head over 2 ranks (DCP inside a head), GLA-2 over 4 ranks (TP-2 x DCP-2, and replicated),
GLA-4 over 2 ranks; s_q 1, 2 and 3. The same layers over NCCL on two GPUs: test_tp_gpu.py.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from flash_gla.reference import attention_ref, gather_rows

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.skipif(not (EXAMPLES / "gla_tp_layer.py").is_file(),
                                reason="no examples/ beside the tests (not a source checkout)")


def load(name):
    """examples/<name>.py as a module (examples/ is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def tp():
    load("gla_decode_layer")
    return load("gla_tp_layer")


PAGE = 64


# ------------------------------------------------------------------------------------------
# Ownership and local sequences
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dcp", [1, 2, 3, 4])
def test_local_count_is_the_owned_tokens(tp, dcp):
    n = torch.tensor([0, 1, 63, 64, 65, 127, 128, 129, 200, 64 * 7, 64 * 7 + 5, 1000])
    counts = [tp.local_count(n, dcp, c) for c in range(dcp)]
    for i, length in enumerate(n.tolist()):
        for c in range(dcp):
            brute = sum(1 for t in range(length) if (t // PAGE) % dcp == c)
            assert counts[c][i].item() == brute, (length, dcp, c)
    assert torch.equal(sum(counts), n)


@pytest.mark.parametrize(
    "world, h_kv, cp",
    [(1, 2, True), (2, 2, True), (2, 4, True), (2, 1, True), (2, 1, False), (4, 2, True), (4, 2, False), (8, 2, True),
     (3, 1, True)],
)
def test_shard_heads_partition_the_model(tp, world, h_kv, cp):
    h_q = 24
    shards = [tp.Shard(world, r, h_q, h_kv, cp) for r in range(world)]
    assert sorted(h for s in shards for h in s.proj_heads) == list(range(h_q))
    group_size = h_q // h_kv
    for s in shards:
        assert set(s.proj_heads) <= set(s.attn_heads)
        # every attended query head reads a latent head that the rank holds, in the same local order
        assert {h // group_size for h in s.attn_heads} == set(s.latent_heads)
        assert len(s.attn_heads) % len(s.latent_heads) == 0
        assert s.group == [r for r in range(world) if shards[r].attn_heads == s.attn_heads] or s.dcp == 1
        assert len(s.group) == s.dcp
    dcp = world // h_kv if world > h_kv and cp else 1
    assert all(s.dcp == dcp for s in shards)


def test_shard_rejects_head_counts_it_cannot_split(tp):
    with pytest.raises(ValueError, match=r"world \(3\) must divide h_q \(128\)"):
        tp.Shard(3, 0, 128, 1)
    with pytest.raises(ValueError, match=r"world \(4\) must divide h_kv \(6\) or be a multiple of it"):
        tp.Shard(4, 0, 24, 6)


@pytest.mark.parametrize("dcp", [2, 3])
def test_local_sequences_interleave_to_the_request(tp, dcp):
    """Each rank's first local_count(L) rows (through its own block table, with the other ranks'
    pages poisoned) are the request's tokens on its pages, in order; together they are all of them."""
    gen = torch.Generator().manual_seed(dcp)
    lengths = [1, 64, 65, 300, 64 * 5]
    block_table, num_blocks = load("gla_decode_layer").allocate_pages(lengths, "cpu", seed=dcp)
    block_table = tp.unused_pages_to_minus_one(block_table, lengths)
    cache = tp.LayerCache(torch.randn(num_blocks, PAGE, 1, 8, generator=gen), None)
    for c in range(dcp):
        shard = tp.Shard(dcp, c, dcp, 1, True)
        local = tp.shard_cache(cache, block_table, shard)
        table = tp.shard_block_table(block_table, shard)
        for i, length in enumerate(lengths):
            n = int(tp.local_count(torch.tensor([length]), dcp, c))
            rows = gather_rows(local.kv, table[i], n)
            whole = gather_rows(cache.kv, block_table[i], length)
            mine = [t for t in range(length) if (t // PAGE) % dcp == c]
            assert not torch.isnan(rows).any()
            assert torch.equal(rows, whole[mine])


def test_local_block_table_holds_only_the_ranks_pages(tp):
    lengths = [1, 64, 65, 300, 64 * 5]
    for c in range(3):
        shard = tp.Shard(3, c, 3, 1, True)
        table, num_blocks = tp.local_block_table(lengths, shard, "cpu", seed=c)
        owned = [len(range(c, -(-n // PAGE), 3)) for n in lengths]
        assert num_blocks == max(1, sum(owned))
        used = torch.cat([table[i, :n] for i, n in enumerate(owned)])
        assert sorted(used.tolist()) == list(range(sum(owned)))  # each page of the pool once


def test_triangle_is_attention_over_the_newest_keys(tp):
    gen = torch.Generator().manual_seed(3)
    b, s_q, h, d, dv = 2, 4, 3, 12, 8
    q = torch.randn(b, s_q, h, d, generator=gen)
    keys = torch.randn(b, s_q - 1, d, generator=gen)
    values = torch.randn(b, s_q - 1, dv, generator=gen)
    out, lse = tp.triangle_attention(q, keys, values, 0.5)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0])) and torch.isposinf(lse[:, :, 0]).all()
    for r in range(1, s_q):  # row r sees keys 0 .. r - 1
        for i in range(b):
            ref, ref_lse = attention_ref(q[i, r : r + 1], keys[i, :r, None], values[i, :r, None], False, 0.5)
            assert torch.allclose(out[i, r], ref[0], atol=1e-5)
            assert torch.allclose(lse[i, :, r], ref_lse[:, 0], atol=1e-5)


# ------------------------------------------------------------------------------------------
# Whole sharded layer steps, ranks as threads
# ------------------------------------------------------------------------------------------


class ThreadWorld:
    """Collectives between threads: every rank calls the same collectives in the same order."""

    def __init__(self, world: int):
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = x.clone()
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()
        return everyone


class ThreadComm:
    def __init__(self, world: ThreadWorld, shard):
        self.world, self.shard = world, shard

    def all_gather(self, x):
        everyone = self.world.exchange(self.shard.rank, x)
        return torch.stack([everyone[r] for r in self.shard.group])

    def all_reduce_(self, x):
        everyone = self.world.exchange(self.shard.rank, x)
        return x.copy_(sum(everyone[1:], everyone[0]))


def run_ranks(world: int, fn):
    """fn(rank) in one thread per rank; returns the results in rank order, re-raising a failure."""
    results, errors = [None] * world, []

    def run(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
            threads_world.barrier.abort()

    threads_world = fn.world
    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


LENGTHS = [3, 40, 64, 65, 130, 200, 64 * 5 + 1]  # one request shorter than a page: empty parts under DCP

# id -> (world, h_q, h_kv, d_latent, context_parallel, rope_once)
LAYOUTS = {
    "gla2-tp2": (2, 8, 2, 32, True, True),
    "mla-tp2": (2, 8, 1, 64, False, False),
    "mla-dcp2": (2, 8, 1, 64, True, False),
    "mla-dcp3": (3, 12, 1, 64, True, False),
    "gla1-dcp2": (2, 8, 1, 32, True, True),
    "gla2-tp2xdcp2": (4, 8, 2, 32, True, True),
    "gla2-on4-replicated": (4, 8, 2, 32, False, True),
    "gla4-tp2": (2, 8, 4, 32, True, True),
}


@pytest.mark.parametrize("s_q", [1, 2, 3])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_layer_equals_unsharded_layer(tp, layout, s_q):
    base = load("gla_decode_layer")
    world, h_q, h_kv, d_latent, cp, rope_once = LAYOUTS[layout]
    cfg = base.Config(hidden=64, num_layers=1, h_q=h_q, h_kv=h_kv, d_latent=d_latent, d_rope=16, d_nope=16, d_v=16)
    weights = base.Weights.random(cfg, seed=s_q)
    gen = torch.Generator().manual_seed(7 * s_q)
    block_table, num_blocks = base.allocate_pages(LENGTHS, "cpu", seed=s_q)
    block_table = tp.unused_pages_to_minus_one(block_table, LENGTHS)
    latents = torch.randn(num_blocks, PAGE, h_kv, d_latent, generator=gen)
    ropes = torch.randn(num_blocks, PAGE, 1, cfg.d_rope, generator=gen)
    x = torch.randn(len(LENGTHS), s_q, cfg.hidden, generator=gen)
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32)

    # The unsharded layer of gla_decode_layer.py (RoPE once), flash_gla.reference's kernels.
    positions = seqlens[:, None].long() - s_q + torch.arange(s_q)
    step = base.DecodeStep(block_table, seqlens, positions, base.slot_mapping(block_table, positions), None, None)
    ref_cache = base.LayerCache(latents.clone(), ropes.clone())
    expected = base.GLALayer(cfg, weights, base.REFERENCE).decode(x, step, ref_cache)

    if rope_once:
        full = tp.LayerCache(latents, ropes)
    else:  # FlashMLA's layout: RoPE inline after each latent head's row
        full = tp.LayerCache(torch.cat([latents, ropes.expand(-1, -1, h_kv, -1)], dim=-1), None)
    threads = ThreadWorld(world)

    def rank_step(rank):
        shard = tp.Shard(world, rank, h_q, h_kv, cp)
        layer = tp.ShardedLayer(cfg, weights, shard, tp.REFERENCE, rope_once)
        cache = tp.shard_cache(full, block_table, shard)
        table = tp.shard_block_table(block_table, shard)
        out = layer.decode(x, tp.make_step(shard, tp.REFERENCE, table, seqlens, s_q), cache, ThreadComm(threads, shard))
        return out, cache, shard

    rank_step.world = threads
    results = run_ranks(world, rank_step)
    for rank, (out, cache, shard) in enumerate(results):
        err = (out - expected).abs().max().item()
        assert err < 1e-4 * expected.abs().max().item(), f"{layout} s_q {s_q} rank {rank}: max error {err:.2e}"
        # the step's new tokens landed in the rank's cache, on its pages only
        slots = base.slot_mapping(block_table, positions).flatten()
        pages, rows = slots // PAGE, slots % PAGE
        own = (pages.view(-1, 1) == tp.shard_block_table(block_table, shard).view(1, -1)).any(1)
        for page, row, mine, tok in zip(pages, rows, own, range(len(slots))):
            written = cache.kv[page, row, :, :d_latent]
            want = ref_cache.kv[page, row, shard.latent_heads.start : shard.latent_heads.stop]
            assert torch.allclose(written, want) if mine else torch.isnan(written).all() or shard.dcp == 1, tok
    if world > 1:
        assert sum(len(s.proj_heads) for _, _, s in results) == h_q


def test_world_one_is_the_unsharded_layer(tp):
    """Shard(1, 0, ...) with the inline layout gives gla_decode_layer's layer (RoPE once)."""
    base = load("gla_decode_layer")
    cfg = base.Config(hidden=64, num_layers=1, h_q=8, h_kv=2, d_latent=32, d_rope=16, d_nope=16, d_v=16)
    weights = base.Weights.random(cfg, seed=1)
    block_table, num_blocks = base.allocate_pages(LENGTHS, "cpu", seed=1)
    gen = torch.Generator().manual_seed(1)
    latents, ropes = torch.randn(num_blocks, PAGE, 2, 32, generator=gen), torch.randn(num_blocks, PAGE, 1, 16, generator=gen)
    x, seqlens = torch.randn(len(LENGTHS), 2, 64, generator=gen), torch.tensor(LENGTHS, dtype=torch.int32)
    positions = seqlens[:, None].long() - 2 + torch.arange(2)
    step = base.DecodeStep(block_table, seqlens, positions, base.slot_mapping(block_table, positions), None, None)
    expected = base.GLALayer(cfg, weights, base.REFERENCE).decode(x, step, base.LayerCache(latents.clone(), ropes.clone()))
    shard = tp.Shard(1, 0, 8, 2)
    cache = tp.LayerCache(torch.cat([latents, ropes.expand(-1, -1, 2, -1)], dim=-1), None)
    got = tp.ShardedLayer(cfg, weights, shard, tp.REFERENCE, rope_once=False).decode(
        x, tp.make_step(shard, tp.REFERENCE, block_table, seqlens, 2), cache, tp.SingleComm())
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item())


def test_kv_bytes_per_token(tp):
    base = load("gla_decode_layer")
    gla2, mla = base.Config(), base.Config(h_kv=1, d_latent=512)
    assert tp.kv_bytes_per_token(gla2, tp.Shard(1, 0, 128, 2), True) == (2 * 256 + 64) * 2
    assert tp.kv_bytes_per_token(gla2, tp.Shard(2, 0, 128, 2), True) == (256 + 64) * 2
    assert tp.kv_bytes_per_token(mla, tp.Shard(2, 0, 128, 1, False), False) == 576 * 2
    assert tp.kv_bytes_per_token(mla, tp.Shard(2, 0, 128, 1, True), False) == 576
    assert math.isclose(tp.kv_bytes_per_token(gla2, tp.Shard(8, 3, 128, 2, True), True), 640 / 4)


# ------------------------------------------------------------------------------------------
# The same over torch.distributed (gloo, CPU processes): DistComm and its DCP groups
# ------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(world: int, argv: list[str], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run ``python *argv`` as ranks 0 .. world-1 of one torch.distributed job (env:// on a free
    port, what torchrun sets), with this interpreter's flash_gla importable; waits for all."""
    import flash_gla

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(flash_gla.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


GLOO_RANK = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import gla_decode_layer as base, gla_tp_layer as tp
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
lengths = [3, 40, 64, 65, 130, 200, 321]
for h_q, h_kv, d_latent, cp, rope_once in [(8, 2, 32, True, True), (8, 1, 64, True, False), (8, 1, 64, False, False)]:
    for s_q in (1, 2):
        cfg = base.Config(hidden=64, num_layers=1, h_q=h_q, h_kv=h_kv, d_latent=d_latent, d_rope=16, d_nope=16, d_v=16)
        w = base.Weights.random(cfg, seed=1)
        table, blocks = base.allocate_pages(lengths, "cpu", seed=1)
        table = tp.unused_pages_to_minus_one(table, lengths)
        gen = torch.Generator().manual_seed(3)
        whole = tp.Shard(1, 0, h_q, h_kv)
        full = tp.allocate_cache(cfg, whole, blocks, rope_once, torch.float32, "cpu",
                                 init=lambda *shape, dtype, device: torch.randn(*shape, generator=gen))
        x, seqlens = torch.randn(len(lengths), s_q, 64, generator=gen), torch.tensor(lengths, dtype=torch.int32)
        copy = tp.LayerCache(full.kv.clone(), None if full.rope is None else full.rope.clone())
        ref = tp.ShardedLayer(cfg, w, whole, tp.REFERENCE, rope_once).decode(
            x, tp.make_step(whole, tp.REFERENCE, table, seqlens, s_q), copy, tp.SingleComm())
        shard = tp.Shard(world, rank, h_q, h_kv, cp)
        got = tp.ShardedLayer(cfg, w, shard, tp.REFERENCE, rope_once).decode(
            x, tp.make_step(shard, tp.REFERENCE, tp.shard_block_table(table, shard), seqlens, s_q),
            tp.shard_cache(full, table, shard), tp.DistComm(shard))
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        print(f"rank {rank} h_kv {h_kv} cp {cp} s_q {s_q} dcp {shard.dcp} err {err:.1e}")
        assert err < 1e-5, err
dist.destroy_process_group()
"""


@pytest.mark.parametrize("world", [2, 4])
def test_distcomm_over_gloo_processes(world):
    """The sharded layers in ``world`` CPU processes over gloo (4: two DCP groups of 2 for GLA-2)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    results = launch_ranks(world, ["-c", GLOO_RANK, str(EXAMPLES)])
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} failed:\n{r.stdout[-3000:]}"
        assert r.stdout.count(" err ") == 6, r.stdout
