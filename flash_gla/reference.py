"""The semantic definition of flash_gla's decode ops, in plain PyTorch.

Slow, float32 math, runs on CPU or GPU, no extension needed. The kernels are tested
against these functions; where a docstring in ``ops.py`` and this file disagree, this file
is what the kernels must compute.

Conventions shared by every function here:

* ``q``: (b, s_q, h_q, d_qk); query head ``i`` uses KV head ``i // (h_q // h_kv)``.
* Paged caches: (num_blocks, page_size, heads, dim); ``block_table[i, p]`` is the page
  holding tokens ``p * page_size ...`` of request ``i``. Only pages
  ``p < ceil(L_i / page_size)`` are read and only rows ``< L_i``: the rest of the table may
  hold garbage indices and the rest of the cache NaN.
* Causal: query ``r`` (0-based of ``s_q``) of request ``i`` sees keys ``0 .. L_i - s_q + r``.
* A query row that sees no key gets ``out = 0`` and ``lse = +inf``.
* Returns ``out`` (b, s_q, h_q, dv) in q's dtype and ``lse`` (b, h_q, s_q) float32,
  natural log of the sum of ``exp(scores)``.
* FP8 caches (``kv_scale`` given): ``kv_cache`` float8_e4m3fn (num_blocks, page_size, h_kv, d)
  and ``kv_scale`` float32 (num_blocks, page_size, h_kv, ceil(d / 128)); element ``i`` of a row
  is ``kv_cache[..., i] * kv_scale[..., i // 128]`` (:func:`dequantize_kv`), and the math runs
  on those float32 values. The RoPE keys stay in q's dtype, in a ``rope_cache`` (FP8 has no
  inline-RoPE layout). :func:`quantize_kv_ref` defines how ``write_kvcache`` quantises.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

#: Values per FP8 scale along a cache row (the last group of a row may be shorter): the
#: kernels' kScaleGroup (hopper/common/params.h), through the generated table.
from flash_gla._instances import FP8_GROUP

KVBuilder = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]

#: The largest finite float8_e4m3fn: a group's scale maps its largest magnitude onto it.
FP8_E4M3_MAX = 448.0
#: The smallest FP8 scale, float32's smallest normal 2^-126: 1 / scale stays finite.
FP8_MIN_SCALE = 2.0**-126


def gla_with_kvcache_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    rope_cache: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLA (and MLA, ``h_kv == 1``) decode attention over a paged latent cache.

    Args:
        q: (b, s_q, h_q, d_qk).
        kv_cache: (num_blocks, page_size, h_kv, d) latent heads.
        block_table: (b, max_pages) integer page indices.
        cache_seqlens: (b,) integer lengths ``L_i``.
        head_dim_v: ``dv``; V is the first ``dv`` dims of each cached row.
        softmax_scale: defaults to ``1 / sqrt(d_qk)``.
        causal: see the module docstring.
        rope_cache: None for inline RoPE: ``K[t] = kv[t, j, :]`` (d == d_qk, the RoPE dims
            follow V inside the row). Otherwise (num_blocks, page_size, 1, d_rope), one RoPE
            key shared by all KV heads: ``K[t] = concat(kv[t, j, :], rope[t, 0, :])``
            (d + d_rope == d_qk).
        attn_sink: None, or (h_q,) sink logits: see :func:`apply_attn_sink`.
        kv_scale: None, or (num_blocks, page_size, h_kv, ceil(d / 128)) float32 with a
            float8_e4m3fn ``kv_cache`` (see the module docstring); needs ``rope_cache``.

    Returns:
        out (b, s_q, h_q, head_dim_v) in q's dtype, lse (b, h_q, s_q) float32 (float64 for a float64 q:
        the whole computation then runs in float64).
    """
    d = kv_cache.shape[-1]
    if not 0 < head_dim_v <= d:
        raise ValueError(f"head_dim_v must be in 1..kv_cache.shape[3] = {d}, got {head_dim_v}")
    if kv_scale is not None and rope_cache is None:
        raise ValueError("kv_scale (an FP8 cache) needs rope_cache: FP8 has no inline-RoPE layout")
    _check_fp8_cache(kv_cache, kv_scale)

    def build(table_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _gather_kv_rows(kv_cache, kv_scale, table_row, length)  # (L, h_kv, d)
        keys = rows if rope_cache is None else _concat_shared_rope(rows, rope_cache, table_row, length)
        return keys, rows[..., :head_dim_v]

    return _paged_decode_ref(q, kv_cache, block_table, cache_seqlens, build, softmax_scale, causal, head_dim_v,
                             attn_sink)


def gta_with_kvcache_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    rope_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    attn_sink: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GTA decode attention: one tied state per KV head serves as V and (partly) as K.

    Args:
        q: (b, s_q, h_q, d) with ``d == kv_cache.shape[3]``.
        kv_cache: (num_blocks, page_size, h_kv, d) tied states.
        rope_cache: (num_blocks, page_size, 1, d_rope) RoPE key shared by all KV heads.
        block_table, cache_seqlens, softmax_scale, causal, attn_sink, kv_scale: as in
            :func:`gla_with_kvcache_ref`.

    ``K[t] = concat(kv[t, j, :d - d_rope], rope[t, 0, :])`` and ``V[t] = kv[t, j, :]``.

    Returns:
        out (b, s_q, h_q, d) in q's dtype, lse (b, h_q, s_q) float32 (float64 for a float64 q).
    """
    d, d_rope = kv_cache.shape[-1], rope_cache.shape[-1]
    if not 0 < d_rope < d:
        raise ValueError(f"rope_cache.shape[3] (d_rope) must be in 1..{d - 1}, got {d_rope}")
    _check_fp8_cache(kv_cache, kv_scale)

    def build(table_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _gather_kv_rows(kv_cache, kv_scale, table_row, length)
        keys = _concat_shared_rope(rows[..., : d - d_rope], rope_cache, table_row, length)
        return keys, rows

    return _paged_decode_ref(q, kv_cache, block_table, cache_seqlens, build, softmax_scale, causal, d, attn_sink)


def gather_rows(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Rows ``0 .. length-1`` of one request from a paged cache: (length, heads, dim).

    Reads only the first ``ceil(length / page_size)`` entries of ``table_row``.
    """
    page_size = cache.shape[1]
    n_pages = -(-length // page_size)
    pages = table_row[:n_pages].to(device=cache.device, dtype=torch.long)
    rows = cache.index_select(0, pages)  # (n_pages, page_size, heads, dim)
    return rows.reshape(n_pages * page_size, *cache.shape[2:])[:length]


def quantize_kv_ref(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 cache's quantisation (what ``flash_gla.write_kvcache`` writes into an FP8 cache).

    Per row (the last dim, ``d`` values) and group of ``FP8_GROUP`` = 128 values (the last group
    of a row may be shorter): ``scale = amax / 448`` in float32, ``amax`` the group's largest
    ``|value|``, raised to ``FP8_MIN_SCALE`` = 2^-126 if smaller (a group below about 5e-36,
    so that ``1 / scale`` stays finite), and 1 for a group of zeros. Each value becomes
    ``value * (1 / scale)`` (float32, IEEE reciprocal and product, each rounded to nearest even;
    one multiply per value in the kernel, not a division) rounded to nearest even into
    float8_e4m3fn, saturated to +-448. The writer's kernel computes the same, bit for bit.

    Non-finite input: a NaN or an infinity in a group makes its scale NaN or inf, so that the
    whole group dequantises to NaN (the kernel raises nothing; the cache row says it went wrong).

    Args:
        kv: (..., d) float tensor (bf16, fp16 or float32).

    Returns:
        values (..., d) float8_e4m3fn and scales (..., ceil(d / 128)) float32.
    """
    x = kv.float()
    d = x.shape[-1]
    groups = -(-d // FP8_GROUP)
    padded = torch.nn.functional.pad(x, (0, groups * FP8_GROUP - d))  # zeros change no amax
    amax = padded.unflatten(-1, (groups, FP8_GROUP)).abs().amax(dim=-1)  # NaN wins, as in the kernel
    scale = (amax / FP8_E4M3_MAX).clamp(min=FP8_MIN_SCALE)  # clamp keeps NaN
    scale = torch.where(amax == 0, torch.ones_like(amax), scale)
    inv_scale = torch.ones_like(scale) / scale
    scaled = x * inv_scale.repeat_interleave(FP8_GROUP, dim=-1)[..., :d]
    # Clamp first: the saturation (torch's own conversion saturates only from torch 2.11 on).
    values = scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return values, scale


def dequantize_kv(kv_cache: torch.Tensor, kv_scale: torch.Tensor) -> torch.Tensor:
    """An FP8 cache's values in float32: element ``i`` of a row is
    ``kv_cache[..., i] * kv_scale[..., i // 128]``.

    Args:
        kv_cache: (..., d) float8_e4m3fn (a whole cache or gathered rows).
        kv_scale: (..., ceil(d / 128)) float32, the same leading shape.
    """
    d = kv_cache.shape[-1]
    return kv_cache.float() * kv_scale.float().repeat_interleave(FP8_GROUP, dim=-1)[..., :d]


def _check_fp8_cache(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
    """An FP8 cache comes with its scales, in the layout of the module docstring."""
    is_fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if kv_scale is None:
        if is_fp8:
            raise ValueError("a float8_e4m3fn kv_cache needs kv_scale (its per-128-value scales)")
        return
    if not is_fp8:
        raise ValueError(f"kv_scale needs a torch.float8_e4m3fn kv_cache, got {kv_cache.dtype}")
    expected = (*kv_cache.shape[:3], -(-kv_cache.shape[3] // FP8_GROUP))
    if tuple(kv_scale.shape) != expected:
        raise ValueError(
            f"kv_scale.shape must be (num_blocks, page_size, h_kv, ceil(d / 128)) = {expected}, "
            f"got {tuple(kv_scale.shape)}"
        )


def _gather_kv_rows(
    kv_cache: torch.Tensor, kv_scale: torch.Tensor | None, table_row: torch.Tensor, length: int
) -> torch.Tensor:
    """One request's cache rows (length, h_kv, d): as stored, or dequantised (float32) with kv_scale."""
    if kv_scale is None:
        return gather_rows(kv_cache, table_row, length)
    # Gathered as bytes: indexing kernels need not know the FP8 dtype.
    rows = gather_rows(kv_cache.view(torch.uint8), table_row, length).view(kv_cache.dtype)
    return dequantize_kv(rows, gather_rows(kv_scale, table_row, length))


def attention_ref(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention for one request, in float32 (float64 when q is float64).

    Args:
        q: (s_q, h_q, d_qk). keys: (L, h_kv, d_qk). values: (L, h_kv, dv).

    Returns:
        out (s_q, h_q, dv), lse (h_q, s_q), both float32 (float64 for a float64 q).
    """
    s_q, h_q, d_qk = q.shape
    length, h_kv, dv = values.shape
    group = h_q // h_kv
    compute = _compute_dtype(q)
    # Group query heads by their KV head instead of repeating K/V (which would be g x larger).
    qg = q.to(compute).reshape(s_q, h_kv, group, d_qk)
    scores = torch.einsum("sjgd,ljd->jgsl", qg, keys.to(compute)) * scale  # (h_kv, g, s_q, L)
    key_pos = torch.arange(length, device=q.device)
    if causal:
        last_visible = length - s_q + torch.arange(s_q, device=q.device)  # (s_q,)
        visible = key_pos[None, :] <= last_visible[:, None]
    else:
        visible = torch.ones(s_q, length, dtype=torch.bool, device=q.device)
    scores = scores.masked_fill(~visible, -math.inf)
    empty = ~visible.any(dim=-1)  # (s_q,): rows that see no key
    lse = torch.logsumexp(scores, dim=-1)  # -inf on empty rows
    probs = torch.exp(scores - lse.unsqueeze(-1)).masked_fill(empty[:, None], 0.0)
    out = torch.einsum("jgsl,ljd->sjgd", probs, values.to(compute)).reshape(s_q, h_q, dv)
    lse = lse.masked_fill(empty, math.inf).reshape(h_q, s_q)
    return out, lse


def _concat_shared_rope(
    nope: torch.Tensor, rope_cache: torch.Tensor, table_row: torch.Tensor, length: int
) -> torch.Tensor:
    """Keys ``concat(nope[t, j, :], rope[t, 0, :])`` for every KV head j: (L, h_kv, d_k)."""
    rope = gather_rows(rope_cache, table_row, length)  # (L, 1, d_rope)
    return torch.cat([nope, rope.expand(-1, nope.shape[1], -1)], dim=-1)


def _paged_decode_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    build_kv: KVBuilder,
    softmax_scale: float | None,
    causal: bool,
    dv: int,
    attn_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`attention_ref` per request on the K/V that ``build_kv`` gathers."""
    if q.dim() != 4 or kv_cache.dim() != 4:
        raise ValueError(f"q and kv_cache must be 4-D, got {q.dim()}-D and {kv_cache.dim()}-D")
    b, s_q, h_q, d_qk = q.shape
    h_kv = kv_cache.shape[2]
    if h_q % h_kv != 0:
        raise ValueError(f"q.shape[2] (h_q = {h_q}) must be a multiple of kv_cache.shape[2] (h_kv = {h_kv})")
    lengths = [int(n) for n in cache_seqlens.tolist()]
    capacity = block_table.shape[1] * kv_cache.shape[1]
    if len(lengths) != b or block_table.shape[0] != b:
        raise ValueError(f"cache_seqlens and block_table must have {b} rows (q.shape[0])")
    if any(not 0 <= n <= capacity for n in lengths):
        raise ValueError(f"cache_seqlens must lie in [0, {capacity}] (block table capacity), got {lengths}")
    scale = softmax_scale if softmax_scale is not None else d_qk**-0.5

    out = torch.empty(b, s_q, h_q, dv, dtype=_compute_dtype(q), device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=_compute_dtype(q), device=q.device)
    for i, length in enumerate(lengths):
        keys, values = build_kv(block_table[i], length)
        if keys.shape[-1] != d_qk:
            raise ValueError(f"keys have {keys.shape[-1]} dims but q.shape[3] (d_qk) is {d_qk}")
        out[i], lse[i] = attention_ref(q[i], keys, values, causal, scale)
    if attn_sink is not None:
        out = apply_attn_sink(out, lse, attn_sink)
    return out.to(q.dtype), lse


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """float32, or float64 for a float64 q: the reference the accuracy tests hold the kernels to."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def apply_attn_sink(out: torch.Tensor, lse: torch.Tensor, attn_sink: torch.Tensor) -> torch.Tensor:
    """Attention sinks (FlashMLA's ``attn_sink``): query head ``h`` has one more logit,
    ``attn_sink[h]``, that joins the softmax's denominator but has no value, so
    ``out *= exp(lse) / (exp(lse) + exp(attn_sink[h]))``; ``lse`` stays that of the keys, and a
    row that saw no key (``lse = +inf``) keeps ``out = 0``.

    out (b, s_q, h_q, dv), lse (b, h_q, s_q), attn_sink (h_q,): returns the new out (float32).
    """
    keep = torch.sigmoid(lse.float() - attn_sink.float().to(lse.device)[None, :, None])  # = 1 / (1 + e^(sink - lse))
    keep = keep.masked_fill(torch.isinf(lse) & (lse > 0), 0.0)
    return out.float() * keep.permute(0, 2, 1).unsqueeze(-1)


def write_kvcache_ref(
    kv_cache: torch.Tensor, slot_mapping: torch.Tensor, kv: torch.Tensor,
    rope: torch.Tensor | None = None, rope_cache: torch.Tensor | None = None, kv_scale: torch.Tensor | None = None,
) -> None:
    """The paged-cache writer (``flash_gla.write_kvcache``), in place: token ``t`` goes to slot
    ``s = slot_mapping[t]``, row ``s % page_size`` of page ``s // page_size``.

    Slots outside ``[0, num_blocks * page_size)`` (negative: padding) are skipped. Inline RoPE
    (``rope_cache`` None): ``kv_cache[s, j] = concat(kv[t, j], rope[t])`` for every KV head ``j``,
    or ``kv[t, j]`` alone when ``rope`` is None (whole rows). RoPE stored once:
    ``kv_cache[s, j] = kv[t, j]`` and ``rope_cache[s, 0] = rope[t]``. An FP8 cache (RoPE stored
    once only) gets ``kv_cache[s, j], kv_scale[s, j] = quantize_kv_ref(kv[t, j])``.

    Args:
        kv_cache: (num_blocks, page_size, h_kv, d). slot_mapping: (T,) integer.
        kv: (T, h_kv, d_kv). rope: (T, d_rope) or None.
        rope_cache: (num_blocks, page_size, 1, d_rope) or None.
        kv_scale: (num_blocks, page_size, h_kv, ceil(d / 128)) float32 with a float8_e4m3fn
            kv_cache (which needs a rope_cache), else None.
    """
    _check_fp8_cache(kv_cache, kv_scale)
    if kv_scale is not None and rope_cache is None:
        raise ValueError("kv_scale (an FP8 cache) needs rope_cache: FP8 has no inline-RoPE layout")
    num_blocks, page_size = kv_cache.shape[:2]
    slots = slot_mapping.to(device=kv_cache.device, dtype=torch.long)
    tokens = ((slots >= 0) & (slots < num_blocks * page_size)).nonzero().squeeze(1)
    pages, rows = slots[tokens] // page_size, slots[tokens] % page_size
    new_kv = kv[tokens].to(kv_cache.device)
    new_rope = None if rope is None else rope[tokens].to(kv_cache.device)
    if rope_cache is None and new_rope is not None:
        new_kv = torch.cat([new_kv, new_rope[:, None, :].expand(-1, new_kv.shape[1], -1)], dim=-1)
    if kv_scale is None:
        kv_cache[pages, rows] = new_kv.to(kv_cache.dtype)
    else:
        values, scales = quantize_kv_ref(new_kv)
        kv_cache.view(torch.uint8)[pages, rows] = values.view(torch.uint8)  # as bytes, as in _gather_kv_rows
        kv_scale[pages, rows] = scales
    if rope_cache is not None:
        rope_cache[pages, rows, 0] = new_rope.to(rope_cache.dtype)


def merge_attention_ref(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over two disjoint key sets from each set's ``(out, lse)`` (``flash_gla.merge_attention``).

    out_* (b, s_q, h_q, dv), lse_* (b, h_q, s_q), natural log, ``+inf`` for a part without keys.
    Returns ``out`` in out_a's dtype and ``lse`` float32; both parts empty: ``out = 0``, ``lse = +inf``.
    """
    empty_a, empty_b = torch.isposinf(lse_a), torch.isposinf(lse_b)
    a = lse_a.double().masked_fill(empty_a, -math.inf)
    b = lse_b.double().masked_fill(empty_b, -math.inf)
    lse = torch.logaddexp(a, b)  # -inf where both are empty
    both_empty = torch.isneginf(lse)
    safe = lse.masked_fill(both_empty, 0.0)
    wa = torch.exp(a - safe).masked_fill(empty_a, 0.0).permute(0, 2, 1).unsqueeze(-1)
    wb = torch.exp(b - safe).masked_fill(empty_b, 0.0).permute(0, 2, 1).unsqueeze(-1)
    out = torch.where(wa > 0, wa * out_a.double(), 0.0) + torch.where(wb > 0, wb * out_b.double(), 0.0)
    return out.to(out_a.dtype), lse.masked_fill(both_empty, math.inf).float()
