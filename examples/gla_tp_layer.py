"""GLA and MLA decode layers sharded over GPUs: tensor parallelism by latent head, and decode
context parallelism (DCP) with ``flash_gla.merge_attention``.

    torchrun --nproc-per-node 2 examples/gla_tp_layer.py     (sharded == unsharded, on 2 GPUs)

The layer is examples/gla_decode_layer.py's (absorbed projections, DeepSeek-V2 dims: h_q 128,
a 512-dim latent as ``h_kv`` latent heads, RoPE 64) with its weights and cache split over
``world`` ranks. :class:`Shard` says what rank ``r`` holds:

* ``world <= h_kv`` (GLA-2 on 2 GPUs): latent heads ``r·h_kv/world ...`` and their query heads.
  Attention is local (the kernel's own causal mask), then each rank applies its slice of W_UV
  and W_O, and one all-reduce sums the projected outputs.
* ``world > h_kv`` with ``context_parallel=False`` (MLA TP-N, what engines run today): the latent
  is replicated, each rank holds ``h_q/world`` query heads and the whole latent head they read.
* ``world > h_kv`` with ``context_parallel=True`` (MLA DCP-N; GLA-2 on 8 GPUs): the
  ``dcp = world/h_kv`` ranks of one latent head split its tokens by page, rank ``c`` of the group
  holding pages ``c, c + dcp, c + 2·dcp, ...`` of every request. Each rank projects its
  ``h_q/world`` query heads, the group all-gathers the queries, each rank attends with all the
  group's heads over its pages, the group all-gathers ``(out, lse)`` and merges them with
  ``merge_attention``, each rank projects its own heads, and one all-reduce sums the outputs.

Causal decode with ``s_q > 1`` under DCP: the kernel's causal mask counts from the end of the
(local) sequence, which is right only on the rank holding the step's newest tokens. So each
rank attends without a mask over its keys at positions ``<= L - s_q`` (visible to every query
row of the step), and the ``s_q - 1`` newest keys (the step's own tokens after the first, whose
latents every rank of the group has just projected) are attended to densely, as a causal
``s_q x (s_q - 1)`` triangle merged in once. That is exact, for any page ownership.

Collectives go through a ``comm`` object (:class:`DistComm` over ``torch.distributed``; the CPU
tests use threads). ``world = 1`` is the unsharded layer. The kernels are swappable as in
gla_decode_layer.py: :data:`FLASH` (flash_gla) or :data:`REFERENCE` (plain PyTorch, CPU).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("flash_gla") is None:  # a checkout built in place, not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gla_decode_layer as base  # noqa: E402
from gla_decode_layer import PAGE, Config, LayerCache, Weights, rope  # noqa: E402

import flash_gla  # noqa: E402
from flash_gla import reference  # noqa: E402

# ------------------------------------------------------------------------------------------
# What each rank holds
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` for a model with ``h_q`` query heads and ``h_kv`` latent heads."""

    world: int
    rank: int
    h_q: int
    h_kv: int
    context_parallel: bool = True  # world > h_kv: split tokens (DCP) or replicate the latent (TP)

    def __post_init__(self):
        w, h_q, h_kv = self.world, self.h_q, self.h_kv
        if not 0 <= self.rank < w:
            raise ValueError(f"rank must be in 0..{w - 1}, got {self.rank}")
        if h_q % w:
            raise ValueError(f"world ({w}) must divide h_q ({h_q})")
        if h_kv % w and w % h_kv:
            raise ValueError(f"world ({w}) must divide h_kv ({h_kv}) or be a multiple of it")

    @property
    def dcp(self) -> int:
        """Ranks that split one latent head's tokens (1: no context parallelism)."""
        return self.world // self.h_kv if self.world > self.h_kv and self.context_parallel else 1

    @property
    def dcp_rank(self) -> int:
        """This rank's place in its DCP group: it holds pages p with p % dcp == dcp_rank."""
        return self.rank % self.dcp

    @property
    def group(self) -> list[int]:
        """The ranks of this rank's DCP group (those that all-gather queries and partials)."""
        first = self.rank - self.dcp_rank
        return list(range(first, first + self.dcp))

    @property
    def proj_heads(self) -> range:
        """Query heads whose projections (W_Q, W_UK, W_UV, W_O) this rank holds."""
        n = self.h_q // self.world
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def attn_heads(self) -> range:
        """Query heads this rank attends with: its own, or under DCP all of its group's."""
        n = self.h_q // self.world * self.dcp
        first = self.proj_heads.start - self.dcp_rank * (self.h_q // self.world)
        return range(first, first + n)

    @property
    def latent_heads(self) -> range:
        """Latent heads this rank caches (all of the tokens, or under DCP its pages' tokens)."""
        if self.world <= self.h_kv:
            n = self.h_kv // self.world
            return range(self.rank * n, (self.rank + 1) * n)
        head = self.rank // (self.world // self.h_kv)
        return range(head, head + 1)


def local_count(n: torch.Tensor, dcp: int, dcp_rank: int) -> torch.Tensor:
    """How many of the tokens at positions ``< n`` lie on pages ``p`` with ``p % dcp == dcp_rank``.

    Tensor ops only (no host synchronisation: CUDA-graph safe). Those tokens are the first ones
    of the rank's local sequence, since its pages are kept in order."""
    n = n.long()
    full, rem = n // PAGE, n % PAGE
    full_local = torch.div(full - dcp_rank + dcp - 1, dcp, rounding_mode="floor").clamp(min=0)
    return full_local * PAGE + torch.where(full % dcp == dcp_rank, rem, torch.zeros_like(rem))


def shard_block_table(block_table: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The rank's block table: entry ``j`` of request ``i`` is the global table's ``j·dcp + c``;
    columns past the global table are -1 (never read)."""
    dcp, c = shard.dcp, shard.dcp_rank
    width = -(-block_table.shape[1] // dcp)
    local = torch.full((block_table.shape[0], width), -1, dtype=block_table.dtype, device=block_table.device)
    own = block_table[:, c::dcp]
    local[:, : own.shape[1]] = own
    return local


def local_block_table(lengths: list[int], shard: Shard, device, seed: int = 0) -> tuple[torch.Tensor, int]:
    """A block table over a pool of only the rank's own pages (the memory a rank really needs):
    request ``i`` of ``lengths[i]`` tokens gets its pages ``c, c + dcp, ...`` in shuffled order.

    Returns (block_table (b, width) int32, num_blocks of the rank's pool)."""
    dcp, c = shard.dcp, shard.dcp_rank
    owned = [len(range(c, -(-n // PAGE), dcp)) for n in lengths]
    num_blocks = max(1, sum(owned))
    pool = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    table = torch.full((len(lengths), max(1, max(owned))), -1, dtype=torch.int32)
    start = 0
    for i, n in enumerate(owned):
        table[i, :n] = pool[start : start + n]
        start += n
    return table.to(device), num_blocks


def unused_pages_to_minus_one(block_table: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """A copy of ``block_table`` with -1 past each request's pages (as padded graph batches have),
    so that an unused entry is never mistaken for an owned page."""
    table = block_table.clone()
    for i, n in enumerate(lengths):
        table[i, -(-n // PAGE) :] = -1
    return table


def shard_cache(cache: LayerCache, block_table: torch.Tensor, shard: Shard, poison: bool = True) -> LayerCache:
    """The rank's copy of a whole-model cache (same page numbering): its latent heads, and under
    DCP the pages of other ranks NaN (``poison``) to prove they are never read."""
    kv = cache.kv[:, :, shard.latent_heads.start : shard.latent_heads.stop].clone()
    rope_cache = None if cache.rope is None else cache.rope.clone()
    if poison and shard.dcp > 1:
        pages = shard_block_table(block_table, shard).flatten().long()
        keep = torch.zeros(kv.shape[0], dtype=torch.bool, device=kv.device)
        keep[pages[(pages >= 0) & (pages < kv.shape[0])]] = True
        kv[~keep] = math.nan
        if rope_cache is not None:
            rope_cache[~keep] = math.nan
    return LayerCache(kv, rope_cache)


def allocate_cache(cfg: Config, shard: Shard, num_blocks: int, rope_once: bool, dtype, device,
                   init: Callable = torch.zeros) -> LayerCache:
    """One layer's cache on a rank: ``rope_once`` (GLA: latents + one RoPE row per token) or
    RoPE inline after each latent head's row (MLA, FlashMLA's layout)."""
    heads = len(shard.latent_heads)
    if rope_once:
        return LayerCache(init(num_blocks, PAGE, heads, cfg.d_latent, dtype=dtype, device=device),
                          init(num_blocks, PAGE, 1, cfg.d_rope, dtype=dtype, device=device))
    return LayerCache(init(num_blocks, PAGE, heads, cfg.d_latent + cfg.d_rope, dtype=dtype, device=device), None)


def kv_bytes_per_token(cfg: Config, shard: Shard, rope_once: bool, element_bytes: int = 2) -> float:
    """Cache bytes one rank stores per token of context and layer (averaged over pages under DCP)."""
    heads = len(shard.latent_heads)
    elements = heads * cfg.d_latent + cfg.d_rope if rope_once else heads * (cfg.d_latent + cfg.d_rope)
    return elements * element_bytes / shard.dcp


# ------------------------------------------------------------------------------------------
# Kernels (swappable) and collectives
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernels:
    get_metadata: Callable  # (seqlens, rows per KV head, h_kv) -> (meta, num_splits)
    write_kvcache: Callable  # (kv_cache, slots, kv, rope, rope_cache=...)
    decode: Callable  # (q, kv_cache, table, seqlens, dv, meta, splits, scale, causal, rope_cache) -> (out, lse)
    merge: Callable  # (out_a, lse_a, out_b, lse_b) -> (out, lse), may write into out_a / lse_a


def _flash_decode(q, kv, table, seqlens, dv, meta, splits, scale, causal, rope_cache):
    return flash_gla.gla_with_kvcache(q, kv, table, seqlens, dv, meta, splits, softmax_scale=scale, causal=causal,
                                      rope_cache=rope_cache)


def _reference_decode(q, kv, table, seqlens, dv, meta, splits, scale, causal, rope_cache):
    return reference.gla_with_kvcache_ref(q, kv, table, seqlens, dv, softmax_scale=scale, causal=causal,
                                          rope_cache=rope_cache)


FLASH = Kernels(
    get_metadata=lambda *args: flash_gla.get_metadata(*args),
    write_kvcache=lambda *args, **kwargs: flash_gla.write_kvcache(*args, **kwargs),
    decode=_flash_decode,
    merge=lambda oa, la, ob, lb: flash_gla.merge_attention(oa, la, ob, lb, out=oa, lse=la),  # in place
)
REFERENCE = Kernels(
    get_metadata=lambda *args: (None, None),
    write_kvcache=lambda *args, **kwargs: reference.write_kvcache_ref(*args, **kwargs),
    decode=_reference_decode,
    merge=reference.merge_attention_ref,
)


class SingleComm:
    """world = 1: no collective."""

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DistComm:
    """Collectives over ``torch.distributed`` (NCCL on GPUs; capturable in CUDA graphs).

    ``all_gather`` runs in the rank's DCP group, ``all_reduce_`` over all ranks. Every rank must
    construct it (``new_group`` is collective)."""

    def __init__(self, shard: Shard):
        import torch.distributed as dist

        self.dist, self.group = dist, None
        if 1 < shard.dcp < shard.world:
            for first in range(0, shard.world, shard.dcp):
                group = dist.new_group(list(range(first, first + shard.dcp)))
                if first == shard.group[0]:
                    self.group = group
        self.gather_size = shard.dcp

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(dcp, *x.shape): the group's tensors, in rank order."""
        x = x.contiguous()
        out = torch.empty((self.gather_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        self.dist.all_gather_into_tensor(out, x, group=self.group)  # concatenated along dim 0
        return out.view(self.gather_size, *x.shape)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        self.dist.all_reduce(x)
        return x


# ------------------------------------------------------------------------------------------
# The step's shared inputs and the sharded layer
# ------------------------------------------------------------------------------------------


@dataclass
class ShardStep:
    """What all layers of one decode step share on one rank (computed once per step)."""

    block_table: torch.Tensor  # (b, local pages) int32: the rank's pages
    cache_seqlens: torch.Tensor  # (b,) int32: whole-request lengths, counting the step's tokens
    positions: torch.Tensor  # (b, s_q) int64: the new tokens' positions
    slots: torch.Tensor  # (b * s_q,) int64: their slots in the rank's cache, -1 where another rank holds them
    attn_seqlens: torch.Tensor  # (b,) int32: keys the kernel reads per request on this rank
    causal: bool  # the kernel's mask (no DCP) or none (DCP: the newest keys go through the triangle)
    meta: torch.Tensor | None
    num_splits: torch.Tensor | None


def make_step(shard: Shard, kernels: Kernels, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
              s_q: int) -> ShardStep:
    """Once per decode step on each rank; tensor ops only (CUDA-graph safe)."""
    device = cache_seqlens.device
    positions = cache_seqlens[:, None].long() - s_q + torch.arange(s_q, device=device)
    dcp, c = shard.dcp, shard.dcp_rank
    page = positions // PAGE
    col = (page // dcp).clamp(max=block_table.shape[1] - 1)
    slots = block_table.gather(1, col).long() * PAGE + positions % PAGE
    slots = torch.where(page % dcp == c, slots, torch.full_like(slots, -1)).flatten()
    if dcp == 1:
        attn_seqlens, causal = cache_seqlens, True
    else:  # keys at positions <= L - s_q: every row of the step sees them
        attn_seqlens, causal = local_count(cache_seqlens - s_q + 1, dcp, c).to(torch.int32), False
    h_kv = len(shard.latent_heads)
    meta, splits = kernels.get_metadata(attn_seqlens, s_q * len(shard.attn_heads) // h_kv, h_kv)
    return ShardStep(block_table, cache_seqlens, positions, slots, attn_seqlens, causal, meta, splits)


def triangle_attention(q: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor, scale: float):
    """The step's newest keys for its query rows: row ``r`` sees new keys ``0 .. r - 1``.

    q (b, s_q, h, d_qk), new_keys (b, s_q - 1, d_qk), new_values (b, s_q - 1, dv) of one latent
    head -> out (b, s_q, h, dv) in q's dtype, lse (b, h, s_q) float32 (+inf for row 0: no key)."""
    s_q, k = q.shape[1], new_keys.shape[1]
    scores = torch.einsum("bshd,btd->bhst", q.float(), new_keys.float()) * scale
    visible = torch.arange(k, device=q.device)[None, :] < torch.arange(s_q, device=q.device)[:, None]
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # (b, h, s_q), -inf on row 0
    probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0).unsqueeze(-1))
    out = torch.einsum("bhst,btd->bshd", probs, new_values.float())
    return out.to(q.dtype).contiguous(), lse.masked_fill(torch.isneginf(lse), math.inf).contiguous()


class ShardedLayer:
    """One layer's slice on one rank. ``weights``: the whole model's layer (sliced here)."""

    def __init__(self, cfg: Config, weights: Weights, shard: Shard, kernels: Kernels = FLASH,
                 rope_once: bool = True):
        if cfg.h_kv != shard.h_kv or cfg.h_q != shard.h_q:
            raise ValueError(f"shard heads ({shard.h_q}, {shard.h_kv}) differ from cfg's ({cfg.h_q}, {cfg.h_kv})")
        self.cfg, self.shard, self.kernels, self.rope_once = cfg, shard, kernels, rope_once
        heads, latents = shard.proj_heads, shard.latent_heads
        hs, ls = slice(heads.start, heads.stop), slice(latents.start, latents.stop)
        w = weights
        self.w_q = w.w_q.unflatten(1, (cfg.h_q, cfg.d_nope + cfg.d_rope))[:, hs].flatten(1).contiguous()
        self.w_uk = w.w_uk[hs].contiguous()
        self.w_uv = w.w_uv[hs].contiguous()
        self.w_o = w.w_o.unflatten(0, (cfg.h_q, cfg.d_v))[hs].flatten(0, 1).contiguous()
        self.w_dkv = w.w_dkv.unflatten(1, (cfg.h_kv, cfg.d_latent))[:, ls].flatten(1).contiguous()
        self.w_kr = w.w_kr.contiguous()

    # -- the layer's pieces, in order ---------------------------------------------------------

    def project_in(self, x: torch.Tensor, step: ShardStep, cache: LayerCache):
        """x (b, s_q, hidden) -> the absorbed queries of the rank's heads (b, s_q, h, d_latent + d_rope);
        writes the step's latents of the rank's heads and pages; returns (q, c_kv, k_rope)."""
        cfg = self.cfg
        q = (x @ self.w_q).unflatten(-1, (len(self.shard.proj_heads), cfg.d_nope + cfg.d_rope))
        q_nope, q_rope = q.split([cfg.d_nope, cfg.d_rope], dim=-1)
        q = torch.cat([torch.einsum("...hn,hnc->...hc", q_nope, self.w_uk), rope(q_rope, step.positions,
                                                                                 cfg.rope_base)], dim=-1)
        c_kv = (x @ self.w_dkv).unflatten(-1, (len(self.shard.latent_heads), cfg.d_latent))
        k_rope = rope((x @ self.w_kr).unsqueeze(-2), step.positions, cfg.rope_base).squeeze(-2)
        self.kernels.write_kvcache(cache.kv, step.slots, c_kv.flatten(0, 1), k_rope.flatten(0, 1),
                                   rope_cache=cache.rope)
        return q, c_kv, k_rope

    def gather_queries(self, q: torch.Tensor, comm) -> torch.Tensor:
        """Under DCP: the group's queries (b, s_q, dcp·h, d), head order = rank order."""
        if self.shard.dcp == 1:
            return q
        gathered = comm.all_gather(q)  # (dcp, b, s_q, h, d)
        return gathered.permute(1, 2, 0, 3, 4).flatten(2, 3).contiguous()

    def attend(self, q: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor, step: ShardStep,
               cache: LayerCache):
        """The rank's partial attention (out (b, s_q, h, d_latent), lse (b, h, s_q)) and, under DCP with
        s_q > 1, the newest keys' triangle (or None)."""
        cfg = self.cfg
        out, lse = self.kernels.decode(q, cache.kv, step.block_table, step.attn_seqlens, cfg.d_latent, step.meta,
                                       step.num_splits, cfg.softmax_scale, step.causal, cache.rope)
        triangle = None
        if self.shard.dcp > 1 and q.shape[1] > 1:
            new_keys = torch.cat([c_kv[:, 1:, 0], k_rope[:, 1:]], dim=-1)
            triangle = triangle_attention(q, new_keys, c_kv[:, 1:, 0], cfg.softmax_scale)
        return out, lse, triangle

    def gather_partials(self, out: torch.Tensor, lse: torch.Tensor, comm):
        """Under DCP: every group rank's (out, lse), stacked in rank order."""
        if self.shard.dcp == 1:
            return out.unsqueeze(0), lse.unsqueeze(0)
        return comm.all_gather(out), comm.all_gather(lse)

    def combine(self, outs: torch.Tensor, lses: torch.Tensor, triangle) -> torch.Tensor:
        """Merge the partials (and the triangle); the rank's own heads (b, s_q, h_proj, d_latent)."""
        out, lse = outs[0], lses[0]
        for k in range(1, outs.shape[0]):
            out, lse = self.kernels.merge(out, lse, outs[k], lses[k])
        if triangle is not None:
            out, lse = self.kernels.merge(out, lse, *triangle)
        n = len(self.shard.proj_heads)
        first = self.shard.dcp_rank * n
        return out[:, :, first : first + n]

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """(b, s_q, h_proj, d_latent) -> the rank's share of the output (b, s_q, hidden)."""
        return torch.einsum("...hc,hcv->...hv", o, self.w_uv).flatten(-2) @ self.w_o

    def decode(self, x: torch.Tensor, step: ShardStep, cache: LayerCache, comm) -> torch.Tensor:
        """x (b, s_q, hidden), the same on every rank -> the layer's output (b, s_q, hidden) on every rank."""
        q, c_kv, k_rope = self.project_in(x, step, cache)
        q = self.gather_queries(q, comm)
        out, lse, triangle = self.attend(q, c_kv, k_rope, step, cache)
        outs, lses = self.gather_partials(out, lse, comm)
        y = self.project_out(self.combine(outs, lses, triangle))
        return comm.all_reduce_(y)


# ------------------------------------------------------------------------------------------
# Check on GPUs: every sharded layer against the unsharded one (torchrun, NCCL)
# ------------------------------------------------------------------------------------------

# name -> (Config overrides, rope_once, context_parallel)
CHECK_CASES = {
    "gla2-tp": (dict(h_kv=2, d_latent=256), True, True),  # GLA-2, one latent head per rank at N = 2
    "mla-tp": (dict(h_kv=1, d_latent=512), False, False),  # MLA, latent replicated, query heads split
    "mla-dcp": (dict(h_kv=1, d_latent=512), False, True),  # MLA, pages split, merge_attention
    "gla1-dcp": (dict(h_kv=1, d_latent=256), True, True),  # GLA with h_kv 1: DCP inside a latent head
}
CHECK_LENGTHS = [40, 64, 65, 130, 700, 1100, 4113, 64 * 9]  # a request shorter than a page: empty parts
CHECK_TOLERANCE = 2e-2  # max |sharded - unsharded| / max |unsharded|, bf16


@functools.lru_cache(maxsize=1)
def check_weights(cfg: Config, seed: int, dtype, device) -> Weights:
    """The whole layer's weights, drawn on the CPU (the same on every rank), on ``device``."""
    weights = Weights.random(cfg, seed, "cpu").to(dtype)
    return Weights(**{k: v.to(device) for k, v in vars(weights).items()})


def check_case(name: str, shard: Shard, comm, s_q: int, device, seed: int = 0) -> dict:
    """One layer step, sharded (this rank) and unsharded (the same weights and cache contents)."""
    overrides, rope_once, context_parallel = CHECK_CASES[name]
    cfg = Config(num_layers=1, **overrides)
    shard = Shard(shard.world, shard.rank, cfg.h_q, cfg.h_kv, context_parallel)
    dtype = torch.bfloat16
    weights = check_weights(cfg, seed, dtype, device)
    block_table, num_blocks = base.allocate_pages(CHECK_LENGTHS, "cpu", seed)
    block_table = unused_pages_to_minus_one(block_table, CHECK_LENGTHS)
    gen = torch.Generator().manual_seed(seed + 1)
    whole = Shard(1, 0, cfg.h_q, cfg.h_kv)
    full = allocate_cache(cfg, whole, num_blocks, rope_once, dtype, "cpu",
                          init=lambda *s, dtype, device: torch.randn(*s, generator=gen).to(dtype))
    full = LayerCache(full.kv.to(device), None if full.rope is None else full.rope.to(device))
    block_table = block_table.to(device)
    seqlens = torch.tensor(CHECK_LENGTHS, dtype=torch.int32, device=device)
    x = torch.randn(len(CHECK_LENGTHS), s_q, cfg.hidden, generator=gen).to(dtype).to(device)

    ref_layer = ShardedLayer(cfg, weights, whole, FLASH, rope_once)
    ref_cache = LayerCache(full.kv.clone(), None if full.rope is None else full.rope.clone())
    expected = ref_layer.decode(x, make_step(whole, FLASH, block_table, seqlens, s_q), ref_cache, SingleComm())

    layer = ShardedLayer(cfg, weights, shard, FLASH, rope_once)
    cache = shard_cache(full, block_table, shard)
    table = shard_block_table(block_table, shard)
    got = layer.decode(x, make_step(shard, FLASH, table, seqlens, s_q), cache, comm)
    torch.cuda.synchronize()
    err = (got.float() - expected.float()).abs().max().item() / expected.float().abs().max().item()
    return dict(case=name, s_q=s_q, world=shard.world, rank=shard.rank, dcp=shard.dcp, rel_err=err,
                finite=bool(torch.isfinite(got).all()), ok=bool(torch.isfinite(got).all()) and err < CHECK_TOLERANCE)


def main() -> int:
    import torch.distributed as dist

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CHECK_CASES))
    ap.add_argument("--out", default=None, help="write rank 0's results as JSON to this file")
    args = ap.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    reason = base.sm90_missing()
    if reason is not None:
        if rank == 0:
            print(f"gla_tp_layer.py: no check here ({reason}); the same math on CPU: pytest tests/test_tp.py")
        return 0
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    results = []
    try:
        for name in args.cases.split(","):
            overrides, _, context_parallel = CHECK_CASES[name]
            cfg = Config(**overrides)
            shard = Shard(world, rank, cfg.h_q, cfg.h_kv, context_parallel)
            comm = DistComm(shard)
            for s_q in (1, 2, 3):
                results.append(check_case(name, shard, comm, s_q, device))
        everyone = [None] * world
        dist.all_gather_object(everyone, results)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        rows = [r for per_rank in everyone for r in per_rank]
        for r in rows:
            print(f"{r['case']:9s} world {r['world']} rank {r['rank']} dcp {r['dcp']} s_q {r['s_q']}: "
                  f"max |sharded - unsharded| / max |unsharded| = {r['rel_err']:.1e} "
                  f"{'ok' if r['ok'] else 'FAIL'}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return 0 if all(r["ok"] for r in rows) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
