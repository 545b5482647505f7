"""A GLA-2 attention layer and its decode step, written the way an engine runs flash_gla.

    python examples/gla_decode_layer.py        (after the README's install command)

The layer has DeepSeek-V2's dims with MLA's one 512-dim latent split into 2 latent heads of
256 (GLA-2): 128 query heads, each of 128 "nope" dims (through the latent) + 64 RoPE dims.
Query head ``i`` reads latent head ``g = i // 64``. Un-absorbed, it is ordinary attention:

    c_kv = x @ W_DKV  (2 x 256, cached)        k_rope = RoPE(x @ W_KR)  (64, cached once per token)
    K_i = [c_kv[g] @ W_UK[i].T, k_rope]        V_i = c_kv[g] @ W_UV[i]
    out = concat_i softmax(q_i K_i^T / sqrt(128 + 64)) V_i  @ W_O

Absorbed (what runs here), W_UK moves into the query and W_UV after the attention, so the
kernel attends directly over the cached latents (``gla_with_kvcache`` with ``rope_cache``):

    q'_i = [q_nope_i @ W_UK[i], RoPE(q_rope_i)]  (320 dims)   K = [c_kv[g], k_rope]   V = c_kv[g]
    o'_i = softmax(q'_i K^T / sqrt(128 + 64)) V  (256 dims)   out = concat_i (o'_i @ W_UV[i]) @ W_O

The cache of one layer: ``kv_cache`` (num_blocks, 64, 2, 256) latents and ``rope_cache``
(num_blocks, 64, 1, 64), on the pages of one block table shared by all layers. One decode step:

    1. the engine adds the step's s_q new tokens to ``cache_seqlens`` (their pages are in the table),
    2. ``get_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)`` ONCE for the whole step,
    3. every layer: ``write_kvcache`` of the new tokens' latents and RoPE key, then
       ``gla_with_kvcache(..., causal=True, rope_cache=...)`` with that one metadata.

The step has no host synchronisation once ``flash_gla.ops.CHECK_LENGTHS`` is False (a CUDA
graph capture skips that check anyway), so it can be captured in a CUDA graph on static
inputs (x, block_table, cache_seqlens): tests/test_engine_layer_gpu.py does. Prefill writes
the cache with the same ``write_kvcache`` and computes its attention in plain PyTorch (an
engine runs its prefill kernel there). ``ReferenceModel`` at the end is the same model in
float32, un-absorbed: the tests compare the two.

Without an sm_90 GPU (and the built extension) the script runs the layer in float32 with
``flash_gla.reference``'s attention and cache writer (the ``REFERENCE`` kernels), compares
it with ``ReferenceModel`` and says so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

import flash_gla
from flash_gla import reference

PAGE = 64  # tokens per cache page (flash_gla's page size)


@dataclass(frozen=True)
class Config:
    hidden: int = 5120
    num_layers: int = 4
    h_q: int = 128  # query heads
    h_kv: int = 2  # latent heads: query head i reads latent head i // (h_q // h_kv)
    d_latent: int = 256  # per latent head: the cached c_kv, the kernel's head_dim_v
    d_rope: int = 64  # the RoPE key, cached once per token for all heads (rope_cache)
    d_nope: int = 128  # per query head: the q.k dims that go through the latent (W_UK)
    d_v: int = 128  # per query head: V's dims (W_UV)
    rope_base: float = 10000.0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_nope + d_rope), the scale of the un-absorbed q.k. The absorbed query has
        d_latent + d_rope = 320 dims, so the kernel's default scale would be wrong: pass this."""
        return (self.d_nope + self.d_rope) ** -0.5


@dataclass
class Weights:
    """One layer's projections, ``x @ W`` convention."""

    w_q: torch.Tensor  # (hidden, h_q * (d_nope + d_rope))
    w_dkv: torch.Tensor  # (hidden, h_kv * d_latent): down-projection to the cached latents c_kv
    w_kr: torch.Tensor  # (hidden, d_rope): the RoPE key (before rotation)
    w_uk: torch.Tensor  # (h_q, d_nope, d_latent): head i's nope key is c_kv[g] @ W_UK[i].T
    w_uv: torch.Tensor  # (h_q, d_latent, d_v): head i's value is c_kv[g] @ W_UV[i]
    w_o: torch.Tensor  # (h_q * d_v, hidden)

    @staticmethod
    def random(cfg: Config, seed: int, device="cpu") -> Weights:
        """float32 weights with unit-variance outputs (queries 2x, for a sharper softmax)."""
        gen = torch.Generator(device).manual_seed(seed)

        def w(*shape, fan_in, gain=1.0):
            return torch.randn(*shape, generator=gen, device=device) * (gain / math.sqrt(fan_in))

        return Weights(
            w_q=w(cfg.hidden, cfg.h_q * (cfg.d_nope + cfg.d_rope), fan_in=cfg.hidden, gain=2.0),
            w_dkv=w(cfg.hidden, cfg.h_kv * cfg.d_latent, fan_in=cfg.hidden),
            w_kr=w(cfg.hidden, cfg.d_rope, fan_in=cfg.hidden),
            w_uk=w(cfg.h_q, cfg.d_nope, cfg.d_latent, fan_in=cfg.d_latent),
            w_uv=w(cfg.h_q, cfg.d_latent, cfg.d_v, fan_in=cfg.d_latent),
            w_o=w(cfg.h_q * cfg.d_v, cfg.hidden, fan_in=cfg.h_q * cfg.d_v),
        )

    def to(self, dtype: torch.dtype) -> Weights:
        return Weights(**{f.name: getattr(self, f.name).to(dtype) for f in dataclasses.fields(self)})


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding (rotate-half layout) of ``x`` (..., heads, d) at ``positions`` (...)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angle = positions[..., None, None].float() * inv_freq  # (..., 1, d / 2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ------------------------------------------------------------------------------------------
# Paged cache: one block table for all layers, one (kv_cache, rope_cache) pair per layer
# ------------------------------------------------------------------------------------------


@dataclass
class LayerCache:
    kv: torch.Tensor  # (num_blocks, 64, h_kv, d_latent): the latents c_kv
    rope: torch.Tensor  # (num_blocks, 64, 1, d_rope): the rotated RoPE key, once per token


def allocate_caches(cfg: Config, num_blocks: int, dtype: torch.dtype, device, fill: float = 0.0):
    """One LayerCache per layer, filled with ``fill`` (the demo: NaN, as rows never written are never read)."""
    def new(*shape):
        return torch.full(shape, fill, dtype=dtype, device=device)

    return [LayerCache(new(num_blocks, PAGE, cfg.h_kv, cfg.d_latent), new(num_blocks, PAGE, 1, cfg.d_rope))
            for _ in range(cfg.num_layers)]


def allocate_pages(max_lengths: list[int], device, seed: int = 0) -> tuple[torch.Tensor, int]:
    """A block table with pages for up to ``max_lengths[i]`` tokens of request i, taken in a
    shuffled order from one pool (an engine's allocator hands out pages as requests grow).

    Returns (block_table (b, max_pages) int32, num_blocks of the pool)."""
    pages = [-(-n // PAGE) for n in max_lengths]
    num_blocks = sum(pages)
    pool = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    table = torch.zeros(len(pages), max(pages), dtype=torch.int32)
    for i, start in enumerate(torch.tensor([0] + pages).cumsum(0)[:-1].tolist()):
        table[i, : pages[i]] = pool[start : start + pages[i]]
    return table.to(device), num_blocks


def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Cache slots (page * 64 + row) of the tokens at ``positions`` (b, n): (b * n,) int64."""
    pages = block_table.gather(1, positions // PAGE).long()
    return (pages * PAGE + positions % PAGE).flatten()


# ------------------------------------------------------------------------------------------
# The three kernels of a decode step, swappable (REFERENCE: plain PyTorch, runs on CPU)
# ------------------------------------------------------------------------------------------


@dataclass
class DecodeStep:
    """What all layers of one decode step share (computed once per step)."""

    block_table: torch.Tensor  # (b, max_pages) int32
    cache_seqlens: torch.Tensor  # (b,) int32, counting this step's tokens
    positions: torch.Tensor  # (b, s_q) int64: the new tokens' positions
    slots: torch.Tensor  # (b * s_q,) int64: their cache slots
    meta: torch.Tensor | None  # tile_scheduler_metadata from get_metadata
    num_splits: torch.Tensor | None


@dataclass(frozen=True)
class Kernels:
    """The calls a decode step makes: FLASH_GLA (the default) or REFERENCE (plain PyTorch)."""

    get_metadata: Callable  # (cache_seqlens, s_q * h_q // h_kv, h_kv) -> (meta, num_splits)
    write_kvcache: Callable  # (kv_cache, slot_mapping, kv, rope, rope_cache=...), in place
    attention: Callable  # (q, LayerCache, DecodeStep, softmax_scale) -> (b, s_q, h_q, d_latent)


def flash_gla_attention(q, cache: LayerCache, step: DecodeStep, softmax_scale: float) -> torch.Tensor:
    out, _ = flash_gla.gla_with_kvcache(
        q, cache.kv, step.block_table, step.cache_seqlens, cache.kv.shape[-1], step.meta, step.num_splits,
        softmax_scale=softmax_scale, causal=True, rope_cache=cache.rope,
    )
    return out


def reference_attention(q, cache: LayerCache, step: DecodeStep, softmax_scale: float) -> torch.Tensor:
    out, _ = reference.gla_with_kvcache_ref(
        q, cache.kv, step.block_table, step.cache_seqlens, cache.kv.shape[-1],
        softmax_scale=softmax_scale, causal=True, rope_cache=cache.rope,
    )
    return out


FLASH_GLA = Kernels(  # flash_gla's functions looked up at each call, so that a test can stand in for them
    get_metadata=lambda *args: flash_gla.get_metadata(*args),
    write_kvcache=lambda *args, **kwargs: flash_gla.write_kvcache(*args, **kwargs),
    attention=flash_gla_attention,
)
REFERENCE = Kernels(
    get_metadata=lambda *args: (None, None),
    write_kvcache=lambda *args, **kwargs: reference.write_kvcache_ref(*args, **kwargs),
    attention=reference_attention,
)


# ------------------------------------------------------------------------------------------
# The layer (absorbed projections) and a model of a few of them
# ------------------------------------------------------------------------------------------


class GLALayer:
    def __init__(self, cfg: Config, weights: Weights, kernels: Kernels):
        self.cfg, self.w, self.kernels = cfg, weights, kernels

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """x (..., hidden) at positions (...) -> absorbed q (..., h_q, d_latent + d_rope),
        c_kv (..., h_kv, d_latent) and the rotated k_rope (..., d_rope)."""
        cfg, w = self.cfg, self.w
        q = (x @ w.w_q).unflatten(-1, (cfg.h_q, cfg.d_nope + cfg.d_rope))
        q_nope, q_rope = q.split([cfg.d_nope, cfg.d_rope], dim=-1)
        q_latent = torch.einsum("...hn,hnc->...hc", q_nope, w.w_uk)  # W_UK absorbed into the query
        q = torch.cat([q_latent, rope(q_rope, positions, cfg.rope_base)], dim=-1)
        c_kv = (x @ w.w_dkv).unflatten(-1, (cfg.h_kv, cfg.d_latent))
        k_rope = rope((x @ w.w_kr).unsqueeze(-2), positions, cfg.rope_base).squeeze(-2)
        return q, c_kv, k_rope

    def output(self, o_latent: torch.Tensor) -> torch.Tensor:
        """(..., h_q, d_latent) -> (..., hidden): W_UV per head (absorbed: after the attention), W_O."""
        o = torch.einsum("...hc,hcv->...hv", o_latent, self.w.w_uv)
        return o.flatten(-2) @ self.w.w_o

    def decode(self, x: torch.Tensor, step: DecodeStep, cache: LayerCache) -> torch.Tensor:
        """x (b, s_q, hidden) -> (b, s_q, hidden)."""
        q, c_kv, k_rope = self.project(x, step.positions)
        self.kernels.write_kvcache(cache.kv, step.slots, c_kv.flatten(0, 1), k_rope.flatten(0, 1),
                                   rope_cache=cache.rope)
        return self.output(self.kernels.attention(q, cache, step, self.cfg.softmax_scale))

    def prefill(self, x, positions, slots, lengths: list[int], cache: LayerCache) -> torch.Tensor:
        """x (T, hidden): the prompts packed, request after request (``lengths``)."""
        q, c_kv, k_rope = self.project(x, positions)
        self.kernels.write_kvcache(cache.kv, slots, c_kv, k_rope, rope_cache=cache.rope)
        out = []  # each prompt attends to itself (an engine runs its prefill kernel here)
        for q_i, c_i, r_i in zip(q.split(lengths), c_kv.split(lengths), k_rope.split(lengths)):
            keys = torch.cat([c_i, r_i.unsqueeze(1).expand(-1, self.cfg.h_kv, -1)], dim=-1)
            o, _ = reference.attention_ref(q_i, keys, c_i, causal=True, scale=self.cfg.softmax_scale)
            out.append(o.to(x.dtype))
        return self.output(torch.cat(out))


class GLAModel:
    """``num_layers`` blocks of ``x = x + layer(rms_norm(x))`` (an engine's MLPs left out).

    The residual stream stays float32; the layers run in the weights' dtype."""

    def __init__(self, cfg: Config, weights: list[Weights], kernels: Kernels = FLASH_GLA):
        self.cfg, self.kernels = cfg, kernels
        self.layers = [GLALayer(cfg, w, kernels) for w in weights]
        self.dtype = weights[0].w_q.dtype

    def prefill(self, x, lengths: list[int], block_table, caches: list[LayerCache]) -> torch.Tensor:
        """x (sum(lengths), hidden): the prompts packed. Fills the caches; returns (T, hidden) float32."""
        positions = torch.cat([torch.arange(n, device=x.device) for n in lengths])
        slots = torch.cat([slot_mapping(block_table[i : i + 1], torch.arange(n, device=x.device)[None])
                           for i, n in enumerate(lengths)])
        x = x.float()
        for layer, cache in zip(self.layers, caches):
            x = x + layer.prefill(rms_norm(x).to(self.dtype), positions, slots, lengths, cache).float()
        return x

    def decode(self, x, block_table, cache_seqlens, caches: list[LayerCache]) -> torch.Tensor:
        """One decode step. x (b, s_q, hidden): the step's new tokens; ``cache_seqlens`` (b,)
        int32 already counts them. Returns (b, s_q, hidden) float32."""
        cfg, s_q = self.cfg, x.shape[1]
        positions = cache_seqlens[:, None].long() - s_q + torch.arange(s_q, device=x.device)  # the last s_q
        # Once per step, shared by every layer (all layers have the same lengths and heads).
        meta, num_splits = self.kernels.get_metadata(cache_seqlens, s_q * cfg.h_q // cfg.h_kv, cfg.h_kv)
        step = DecodeStep(block_table, cache_seqlens, positions, slot_mapping(block_table, positions),
                          meta, num_splits)
        x = x.float()
        for layer, cache in zip(self.layers, caches):
            x = x + layer.decode(rms_norm(x).to(self.dtype), step, cache).float()
        return x


# ------------------------------------------------------------------------------------------
# The same model in float32, un-absorbed, with dense per-request K/V: the tests' reference
# ------------------------------------------------------------------------------------------


class ReferenceModel:
    """Per query head i (latent head g): K_i = [c_kv[g] @ W_UK[i].T, k_rope], V_i = c_kv[g] @ W_UV[i],
    plain softmax attention. Feed each request's tokens in order, the prompt first."""

    def __init__(self, cfg: Config, weights: list[Weights]):
        self.cfg, self.weights = cfg, [w.to(torch.float32) for w in weights]
        self.kv = {}  # (layer, request) -> (K (L, h_q, d_nope + d_rope), V (L, h_q, d_v))

    def forward(self, request: int, x: torch.Tensor, start: int) -> torch.Tensor:
        """x (n, hidden): request's tokens at positions start .. start + n - 1 -> (n, hidden)."""
        cfg = self.cfg
        positions = torch.arange(start, start + x.shape[0], device=x.device)
        x = x.float()
        for layer, w in enumerate(self.weights):
            h = rms_norm(x)
            q = (h @ w.w_q).unflatten(-1, (cfg.h_q, cfg.d_nope + cfg.d_rope))
            q = torch.cat([q[..., : cfg.d_nope], rope(q[..., cfg.d_nope :], positions, cfg.rope_base)], dim=-1)
            c_kv = (h @ w.w_dkv).unflatten(-1, (cfg.h_kv, cfg.d_latent))
            c_kv = c_kv.repeat_interleave(cfg.h_q // cfg.h_kv, dim=1)  # (n, h_q, d_latent): head i's latent
            k_rope = rope((h @ w.w_kr).unsqueeze(1), positions, cfg.rope_base).expand(-1, cfg.h_q, -1)
            k = torch.cat([torch.einsum("thc,hnc->thn", c_kv, w.w_uk), k_rope], dim=-1)
            v = torch.einsum("thc,hcv->thv", c_kv, w.w_uv)
            past_k, past_v = self.kv.get((layer, request), (k[:0], v[:0]))
            assert past_k.shape[0] == start, "feed each request's tokens in order"
            k, v = torch.cat([past_k, k]), torch.cat([past_v, v])
            self.kv[layer, request] = (k, v)
            scores = torch.einsum("shd,thd->hst", q, k) * cfg.softmax_scale
            visible = torch.arange(k.shape[0], device=x.device)[None, :] <= positions[:, None]
            probs = scores.masked_fill(~visible, -math.inf).softmax(dim=-1)
            x = x + torch.einsum("hst,thv->shv", probs, v).flatten(-2) @ w.w_o
        return x


# ------------------------------------------------------------------------------------------
# Demo: prefill a few requests, then decode steps, each checked against ReferenceModel
# ------------------------------------------------------------------------------------------


def worst_error(outs, ref_outs, xs) -> float:
    """The worst request's relative error of the layers' output (a model's result minus its input)."""
    return max(((o - r).norm() / (r - x.float()).norm()).item() for o, r, x in zip(outs, ref_outs, xs))


class Demo:
    """Requests through GLAModel and, side by side, ReferenceModel (the same weights): ``prefill()``,
    then per decode step ``x = next_tokens(s_q)``, ``out = decode(x)``, ``check(x, out)``."""

    def __init__(self, cfg: Config, kernels: Kernels, dtype, device, prompts: list[int], max_new_tokens: int,
                 seed: int = 0):
        weights = [Weights.random(cfg, seed + i, device).to(dtype) for i in range(cfg.num_layers)]
        self.model, self.ref = GLAModel(cfg, weights, kernels), ReferenceModel(cfg, weights)
        self.prompts, self.dtype, self.device = prompts, dtype, device
        self.block_table, num_blocks = allocate_pages([n + max_new_tokens for n in prompts], device, seed)
        self.caches = allocate_caches(cfg, num_blocks, dtype, device, fill=math.nan)
        self.cache_seqlens = torch.tensor(prompts, dtype=torch.int32, device=device)
        self.gen = torch.Generator(device).manual_seed(seed)

    def tokens(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, self.model.cfg.hidden, generator=self.gen, device=self.device).to(self.dtype)

    def prefill(self) -> float:
        """Prefills the prompts; returns the worst request's relative error against the reference."""
        x = self.tokens(sum(self.prompts))
        out = self.model.prefill(x, self.prompts, self.block_table, self.caches)
        ref_out = [self.ref.forward(i, x_i, 0) for i, x_i in enumerate(x.split(self.prompts))]
        return worst_error(out.split(self.prompts), ref_out, x.split(self.prompts))

    def next_tokens(self, s_q: int) -> torch.Tensor:
        """The next step's new tokens (b, s_q, hidden); counts them in cache_seqlens (in place)."""
        self.cache_seqlens += s_q  # an engine makes room for the step's tokens before the step
        return self.tokens(len(self.prompts), s_q)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.decode(x, self.block_table, self.cache_seqlens, self.caches)

    def check(self, x: torch.Tensor, out: torch.Tensor) -> float:
        """Runs the reference on the step's tokens; returns the worst request's relative error."""
        s_q = x.shape[1]
        ref_out = [self.ref.forward(i, x[i], n - s_q) for i, n in enumerate(self.cache_seqlens.tolist())]
        return worst_error(out, ref_out, x)


def sm90_missing() -> str | None:
    """Why the kernels cannot run here, or None if they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return "the GPU is sm_{}{}".format(*torch.cuda.get_device_capability())
    try:
        flash_gla.ops._load_extension()
    except ImportError as err:
        return f"the extension does not load ({err})"
    return None


def main() -> int:
    reason = sm90_missing()
    if reason is None:
        cfg, kernels, dtype, device = Config(), FLASH_GLA, torch.bfloat16, "cuda"
        prompts, what = [5, 63, 700, 1100], "flash_gla (bf16) vs the float32 un-absorbed reference"
    else:
        cfg, kernels, dtype, device = Config(hidden=512, num_layers=2), REFERENCE, torch.float32, "cpu"
        prompts, what = [5, 63, 130], "flash_gla.reference's kernels (float32) vs the un-absorbed reference"
        print(f"no sm_90 GPU here ({reason}): the layer runs with {what}")
    print(f"GLA-2: hidden {cfg.hidden}, {cfg.num_layers} layers, h_q {cfg.h_q}, {cfg.h_kv} latent heads of "
          f"{cfg.d_latent} + RoPE {cfg.d_rope} stored once; prompts {prompts}")
    for s_q in (1, 2):
        demo = Demo(cfg, kernels, dtype, device, prompts, max_new_tokens=3 * s_q)
        prefill = demo.prefill()
        errors = []
        for _ in range(3):
            x = demo.next_tokens(s_q)
            errors.append(demo.check(x, demo.decode(x)))
        print(f"s_q {s_q}: worst request's relative error of the layers' output: prefill {prefill:.1e}, "
              f"decode steps " + " ".join(f"{e:.1e}" for e in errors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
