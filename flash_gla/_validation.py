"""Every check of the decode ops' inputs, in one place, before the extension is touched.

The compiled ``flash_gla._C`` trusts its inputs. The checks run in a fixed order so that the
first error a caller sees is the most basic one, and so that everything but the device can be
checked on a machine without a GPU or the extension:

    Python types (TypeError) -> dtypes (TypeError) -> ranks, shapes, divisibility
    (ValueError) -> strides and alignment (ValueError) -> lengths vs. block-table capacity
    (ValueError, optional: flash_gla.ops.CHECK_LENGTHS) -> device (ValueError) ->
    metadata rows vs. the device's scheduler parts (ValueError; asks the extension).

Every message names the argument, what was expected and what was given. The supported head
dims come from ``flash_gla._instances``, the generated list of compiled kernel instances: those
of its FP8 instances (``kv_fp8``) for a float8_e4m3fn ``kv_cache``, which also needs its
``kv_scale`` and a ``rope_cache`` (FP8 has no inline-RoPE layout).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import torch

from flash_gla import _library
from flash_gla._expect import (
    TMA_ALIGN_BYTES,
    check_kv_format,
    expect_at_least,
    expect_contiguous,
    expect_dtype,
    expect_int,
    expect_rank,
    expect_tensor,
    expect_tma_compatible,
    expect_unit_last_stride,
)
from flash_gla._extension import num_sm_parts
from flash_gla._instances import DTYPES, INSTANCES, META_FIELDS, PAGE_SIZE  # PAGE_SIZE: kv_cache.shape[1]
from flash_gla._metadata import DecodeConfig, SchedulerMetadata
from flash_gla.reference import FP8_GROUP

MAX_GROUP = 128  # largest h_q / h_kv
MAX_Q_ROWS_PER_HEAD_K = 1024  # largest s_q * h_q / h_kv (packed query rows per KV head)

HALF_DTYPES = tuple({"bf16": torch.bfloat16, "fp16": torch.float16}[name] for name in DTYPES)


def _dims_table(variants: tuple[str, ...], key: Callable, value: Callable, fp8: bool = False) -> dict[int, int]:
    """``{key(inst): value(inst)}`` over the compiled instances of ``variants`` (the FP8 ones with ``fp8``)."""
    table: dict[int, int] = {}
    for inst in INSTANCES:
        if inst.variant in variants and inst.kv_fp8 == fp8 and table.setdefault(key(inst), value(inst)) != value(inst):
            raise RuntimeError(f"flash_gla._instances: {inst.name} conflicts with another {variants} instance")
    return table


#: Inline RoPE (``gla_with_kvcache`` without rope_cache; variants mla, gla): d_qk -> head_dim_v.
#: A cached row is [V (head_dim_v) | RoPE], and the whole row is the key.
INLINE_DIMS = _dims_table(("mla", "gla"), lambda i: i.head_dim_nope + i.head_dim_rope, lambda i: i.head_dim_v)
#: RoPE stored once (``gla_with_kvcache`` with rope_cache; variant gla_rope1): head_dim_v -> d_rope.
ROPE1_DIMS = _dims_table(("gla_rope1",), lambda i: i.head_dim_v, lambda i: i.head_dim_rope)
#: GTA (``gta_with_kvcache``): tied-state width d -> d_rope (K = [state[:d - d_rope], rope]).
GTA_DIMS = _dims_table(("gta",), lambda i: i.head_dim_v, lambda i: i.head_dim_rope)
#: The same over an FP8 (float8_e4m3fn) kv_cache: the instances with ``kv_fp8``.
ROPE1_FP8_DIMS = _dims_table(("gla_rope1",), lambda i: i.head_dim_v, lambda i: i.head_dim_rope, fp8=True)
GTA_FP8_DIMS = _dims_table(("gta",), lambda i: i.head_dim_v, lambda i: i.head_dim_rope, fp8=True)


def _check_inline_dims(d_qk: int, kv_dim: int, rope_dim: int | None, head_dim_v: int, fp8: bool = False) -> None:
    """Inline RoPE: kv rows are [V (head_dim_v) | RoPE] = d_qk dims (never FP8: check_kv_format refuses it)."""
    if d_qk not in INLINE_DIMS:
        raise ValueError(f"q.shape[3] (d_qk) must be one of {sorted(INLINE_DIMS)}, got {d_qk}")
    if kv_dim != d_qk:
        raise ValueError(f"kv_cache.shape[3] must equal q.shape[3] (d_qk) = {d_qk}, got {kv_dim}")
    expected_dv = INLINE_DIMS[d_qk]
    if head_dim_v != expected_dv:
        raise ValueError(f"head_dim_v must be {expected_dv} for d_qk {d_qk}, got {head_dim_v}")


def _check_rope1_dims(d_qk: int, kv_dim: int, rope_dim: int | None, head_dim_v: int, fp8: bool = False) -> None:
    """RoPE stored once: kv rows are the latents (head_dim_v), d_qk = head_dim_v + d_rope."""
    table, cache = (ROPE1_FP8_DIMS, " and an FP8 kv_cache (the FP8 instances)") if fp8 else (ROPE1_DIMS, "")
    if head_dim_v not in table:
        raise ValueError(f"head_dim_v must be one of {sorted(table)} with a rope_cache{cache}, got {head_dim_v}")
    if kv_dim != head_dim_v:
        raise ValueError(
            f"kv_cache.shape[3] must equal head_dim_v = {head_dim_v} with a rope_cache (the RoPE "
            f"dims live in rope_cache), got {kv_dim}"
        )
    expected_rope = table[head_dim_v]
    if rope_dim != expected_rope:
        raise ValueError(
            f"rope_cache.shape[3] (d_rope) must be {expected_rope} for head_dim_v {head_dim_v}, got {rope_dim}"
        )
    if d_qk != head_dim_v + rope_dim:
        raise ValueError(f"q.shape[3] (d_qk) must be head_dim_v + d_rope = {head_dim_v + rope_dim}, got {d_qk}")


def _check_gta_dims(d_qk: int, kv_dim: int, rope_dim: int | None, head_dim_v: int, fp8: bool = False) -> None:
    """GTA: q, kv rows and out all have the tied-state width d; the key's RoPE part is rope_cache."""
    table, cache = (GTA_FP8_DIMS, " with an FP8 kv_cache (the FP8 instances)") if fp8 else (GTA_DIMS, "")
    if d_qk not in table:
        raise ValueError(f"q.shape[3] (d) must be one of {sorted(table)}{cache}, got {d_qk}")
    if kv_dim != d_qk:
        raise ValueError(f"kv_cache.shape[3] must equal q.shape[3] (d) = {d_qk}, got {kv_dim}")
    if rope_dim != table[d_qk]:
        raise ValueError(f"rope_cache.shape[3] (d_rope) must be {table[d_qk]} for d {d_qk}, got {rope_dim}")


class Variant(NamedTuple):
    """How a decode entry reads its arguments: one of GLA_INLINE, GLA_ROPE1, GTA."""

    name: str
    takes_rope_cache: bool  # a shared rope cache is required (else rope_cache is None)
    v_is_q_width: bool  # head_dim_v is q.shape[3] (GTA: V is the whole tied state)
    check_head_dims: Callable[[int, int, int | None, int, bool], None]  # (d_qk, kv dim, rope dim, dv, fp8)


GLA_INLINE = Variant("gla", False, False, _check_inline_dims)  # also MLA (h_kv 1)
GLA_ROPE1 = Variant("gla_rope1", True, False, _check_rope1_dims)
GTA = Variant("gta", True, True, _check_gta_dims)


#: Layouts that passed every check: call signature -> DecodeConfig. An engine calls decode with
#: the same shapes, strides, dtypes and devices in every layer and step; a call whose signature
#: is here skips the checks that depend only on it (all but the base-address alignment, which
#: is checked on every call). Bounded: cleared when full.
_VALIDATED: dict[tuple, DecodeConfig] = {}
_VALIDATED_MAX = 256


def _layout(x):
    return None if x is None else (type(x), x.shape, x.stride(), x.dtype, x.device)


def check_decode_inputs(
    variant: Variant, q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v,
    tile_scheduler_metadata, num_splits, softmax_scale, causal, out, attn_sink, batch_invariant=False,
    kv_scale=None, *, check_lengths: bool,
) -> DecodeConfig:
    """Every check of a decode call, in the order of the module docstring; the call's DecodeConfig.

    ``head_dim_v`` is ignored for a variant whose V is q's width. ``batch_invariant`` is the
    call's ``enable_batch_invariant``. ``kv_scale``: an FP8 cache's scales, else None.
    ``check_lengths`` is flash_gla.ops.CHECK_LENGTHS, read by the caller at call time.
    """
    key = None
    # The fast path: eager calls with tensor metadata (not the lazy object); anything that is not
    # a tensor where one is expected has no layout (AttributeError) and takes the checks below.
    if not check_lengths and num_splits is not None and not _library.compiling():
        # Types are part of the key: 256.0 == 256 and 1 == True, but only the ints and bools pass.
        scalars = (head_dim_v, softmax_scale, causal, batch_invariant)
        try:
            key = (variant, scalars, tuple(map(type, scalars)), _layout(q), _layout(kv_cache), _layout(rope_cache),
                   _layout(block_table), _layout(cache_seqlens), _layout(tile_scheduler_metadata),
                   _layout(num_splits), _layout(out), _layout(attn_sink), _layout(kv_scale))
            config = _VALIDATED.get(key)
        except (AttributeError, TypeError):  # not a tensor, or an unhashable scalar: the checks below name it
            key = config = None
        if config is not None:
            # The layout is known good; the addresses are checked on every call (one test for all).
            if (q.data_ptr() | kv_cache.data_ptr() | (0 if rope_cache is None else rope_cache.data_ptr())
                    | (0 if out is None else out.data_ptr())) % TMA_ALIGN_BYTES:
                for name, x in (("q", q), ("kv_cache", kv_cache), ("rope_cache", rope_cache), ("out", out)):
                    if x is not None:
                        expect_tma_compatible(name, x)  # raises, naming the address
            return config
    config = _check_decode_inputs(variant, q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v,
                                  tile_scheduler_metadata, num_splits, softmax_scale, causal, out, attn_sink,
                                  batch_invariant, kv_scale, check_lengths=check_lengths)
    if key is not None:
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED[key] = config
    return config


def _check_decode_inputs(
    variant: Variant, q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v,
    tile_scheduler_metadata, num_splits, softmax_scale, causal, out, attn_sink, batch_invariant, kv_scale, *,
    check_lengths: bool,
) -> DecodeConfig:
    lazy = isinstance(tile_scheduler_metadata, SchedulerMetadata)
    if not isinstance(batch_invariant, bool):
        raise TypeError(f"enable_batch_invariant must be a bool, got {type(batch_invariant).__name__}")
    metadata = () if lazy else (("tile_scheduler_metadata", tile_scheduler_metadata), ("num_splits", num_splits))
    tensors = (("q", q), ("kv_cache", kv_cache), ("rope_cache", rope_cache), ("block_table", block_table),
               ("cache_seqlens", cache_seqlens), *metadata, ("out", out), ("attn_sink", attn_sink),
               ("kv_scale", kv_scale))
    _check_types(variant, q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                 num_splits, softmax_scale, causal, out, lazy)
    check_kv_format(kv_cache, rope_cache, kv_scale)
    _check_sink_type(attn_sink)
    _check_dtypes(q, kv_cache, rope_cache, block_table, cache_seqlens, metadata, out, kv_scale)
    config = _check_shapes(variant, q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v, metadata, out,
                           causal, batch_invariant, kv_scale)
    if attn_sink is not None and tuple(attn_sink.shape) != (config.h_q,):
        raise ValueError(f"attn_sink.shape must be (h_q,) = ({config.h_q},), got {tuple(attn_sink.shape)}")
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if lazy:
        tile_scheduler_metadata.check_config(config)
    _check_strides(q, kv_cache, rope_cache, block_table, cache_seqlens, metadata, out)
    if check_lengths and not (cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        check_lengths_fit(cache_seqlens, block_table.shape[1])  # host sync; skipped in capture
    # Device: last but one, so that everything above can be checked without a GPU.
    if not q.is_cuda:
        raise ValueError(f"q must be a CUDA tensor (all tensors on one CUDA device), got device {q.device}")
    for name, x in tensors:
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device} (all tensors on one CUDA device), got {x.device}")
    if not lazy and not _library.compiling():  # asks the extension: not traceable
        parts = num_sm_parts(q.device.index, config.num_q_tokens_per_head_k, config.h_kv)
        rows = tile_scheduler_metadata.shape[0]
        if rows != parts + batch_invariant and rows in (parts, parts + 1):  # the other plan
            planned = rows == parts + 1
            raise ValueError(
                f"tile_scheduler_metadata has {rows} rows: it is the "
                f"{'batch-invariant' if planned else 'default'} plan (get_metadata(..., enable_batch_invariant="
                f"{planned})), but the call has enable_batch_invariant={batch_invariant}: pass the same value to both"
            )
        if rows != parts + batch_invariant:
            raise ValueError(
                f"tile_scheduler_metadata.shape[0] must be {parts + batch_invariant} (scheduler parts for "
                f"num_q_tokens_per_head_k={config.num_q_tokens_per_head_k}, num_heads_k={config.h_kv} on "
                f"{q.device}), got {tile_scheduler_metadata.shape[0]}: the metadata was computed for a "
                "different num_q_tokens_per_head_k / num_heads_k"
            )
    return config


def _check_types(variant, q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                 num_splits, softmax_scale, causal, out, lazy):
    for name, x in (("q", q), ("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        expect_tensor(name, x)
    if variant.takes_rope_cache:
        expect_tensor("rope_cache", rope_cache, hint="(num_blocks, 64, 1, d_rope)")
    if out is not None:
        expect_tensor("out", out)
    if not variant.v_is_q_width:
        expect_int("head_dim_v", head_dim_v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if lazy:
        if num_splits is not None:
            raise TypeError(
                "num_splits must be None when tile_scheduler_metadata is a SchedulerMetadata "
                f"(lazy form), got {type(num_splits).__name__}"
            )
        return
    if isinstance(tile_scheduler_metadata, tuple):
        raise TypeError(
            "tile_scheduler_metadata must be a torch.Tensor or a SchedulerMetadata, got a "
            "tuple: get_metadata() returns (SchedulerMetadata, None) like FlashMLA; unpack it"
        )
    expect_tensor("tile_scheduler_metadata", tile_scheduler_metadata, hint="or a SchedulerMetadata")
    expect_tensor("num_splits", num_splits, hint="(or pass a SchedulerMetadata as tile_scheduler_metadata)")


def _check_sink_type(attn_sink):
    if attn_sink is None:
        return
    expect_tensor("attn_sink", attn_sink, hint="(h_q,) float32 or None")
    expect_dtype("attn_sink", attn_sink, torch.float32)
    expect_rank("attn_sink", attn_sink, 1)
    expect_contiguous("attn_sink", attn_sink)


def _check_dtypes(q, kv_cache, rope_cache, block_table, cache_seqlens, metadata, out, kv_scale):
    expect_dtype("q", q, HALF_DTYPES)
    if kv_scale is None:  # else kv_cache is FP8 (check_kv_format)
        expect_dtype("kv_cache", kv_cache, q.dtype, what="q's dtype")
    else:
        expect_dtype("kv_scale", kv_scale, torch.float32)
    if rope_cache is not None:
        expect_dtype("rope_cache", rope_cache, q.dtype,
                     what="q's dtype" if kv_scale is None else "q's dtype: the RoPE key is not quantised")
    expect_dtype("block_table", block_table, torch.int32)
    expect_dtype("cache_seqlens", cache_seqlens, torch.int32)
    for name, x in metadata:
        expect_dtype(name, x, torch.int32)
    if out is not None:
        expect_dtype("out", out, q.dtype, what="q's dtype")


def _check_shapes(variant, q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v, metadata, out, causal,
                  batch_invariant=False, kv_scale=None):
    """Ranks, shapes, divisibility; returns the call's DecodeConfig."""
    ranked = (("q", q, 4), ("kv_cache", kv_cache, 4), ("rope_cache", rope_cache, 4), ("block_table", block_table, 2),
              ("cache_seqlens", cache_seqlens, 1), *((name, x, rank) for (name, x), rank in zip(metadata, (2, 1))),
              ("out", out, 4), ("kv_scale", kv_scale, 4))
    for name, x, rank in ranked:
        if x is not None:
            expect_rank(name, x, rank)

    batch, s_q, h_q, d_qk = q.shape
    num_blocks, page_size, h_kv, kv_dim = kv_cache.shape
    expect_at_least("q.shape[0] (batch)", batch, 1)
    expect_at_least("q.shape[1] (s_q)", s_q, 1)
    expect_at_least("q.shape[2] (h_q)", h_q, 1)
    expect_at_least("kv_cache.shape[0] (num_blocks)", num_blocks, 1)
    if page_size != PAGE_SIZE:
        raise ValueError(f"kv_cache.shape[1] (page size) must be {PAGE_SIZE}, got {page_size}")
    expect_at_least("kv_cache.shape[2] (h_kv)", h_kv, 1)
    if h_q % h_kv != 0:
        raise ValueError(f"q.shape[2] (h_q = {h_q}) must be a multiple of kv_cache.shape[2] (h_kv = {h_kv})")
    group = h_q // h_kv
    if group > MAX_GROUP:
        raise ValueError(f"h_q / h_kv (query heads per KV head) must be <= {MAX_GROUP}, got {h_q} / {h_kv} = {group}")
    if s_q * group > MAX_Q_ROWS_PER_HEAD_K:
        raise ValueError(
            f"s_q * h_q / h_kv (query rows per KV head) must be <= {MAX_Q_ROWS_PER_HEAD_K}, "
            f"got {s_q} * {group} = {s_q * group}"
        )
    rope_dim = None
    if rope_cache is not None:
        expected = (num_blocks, page_size, 1)
        if tuple(rope_cache.shape[:3]) != expected:
            raise ValueError(
                f"rope_cache.shape[:3] must be (num_blocks, page size, 1) = {expected}, got {tuple(rope_cache.shape[:3])}"
            )
        rope_dim = rope_cache.shape[3]
    if variant.v_is_q_width:
        head_dim_v = d_qk
    variant.check_head_dims(d_qk, kv_dim, rope_dim, head_dim_v, kv_scale is not None)
    if kv_scale is not None and tuple(kv_scale.shape) != (num_blocks, page_size, h_kv, -(-kv_dim // FP8_GROUP)):
        raise ValueError(
            f"kv_scale.shape must be (num_blocks, 64, h_kv, ceil(d / {FP8_GROUP})) = "
            f"{(num_blocks, page_size, h_kv, -(-kv_dim // FP8_GROUP))} (of kv_cache), got {tuple(kv_scale.shape)}"
        )
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table.shape[0] must equal q.shape[0] (batch) = {batch}, got {block_table.shape[0]}")
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens.shape[0] must equal q.shape[0] (batch) = {batch}, got {cache_seqlens.shape[0]}")
    if metadata:
        (_, meta), (_, num_splits) = metadata
        if meta.shape[1] != META_FIELDS:
            raise ValueError(f"tile_scheduler_metadata.shape[1] must be {META_FIELDS}, got {meta.shape[1]}")
        if meta.shape[0] < 1:
            raise ValueError("tile_scheduler_metadata.shape[0] (scheduler parts) must be >= 1, got 0")
        if num_splits.shape[0] != batch + 1:
            raise ValueError(
                f"num_splits.shape[0] must be batch + 1 = {batch + 1}, got {num_splits.shape[0]} "
                "(metadata from a different batch size?)"
            )
    if out is not None and tuple(out.shape) != (batch, s_q, h_q, head_dim_v):
        raise ValueError(
            f"out.shape must be (b, s_q, h_q, head_dim_v) = {(batch, s_q, h_q, head_dim_v)}, got {tuple(out.shape)}"
        )
    return DecodeConfig(batch, s_q, h_q, h_kv, page_size, causal, head_dim_v, q.device, batch_invariant)


def _check_strides(q, kv_cache, rope_cache, block_table, cache_seqlens, metadata, out):
    for name, x in (("q", q), ("kv_cache", kv_cache), ("rope_cache", rope_cache)):
        if x is not None:
            # Q rows are read as 16-byte vectors, the caches by TMA (FP8: 16 elements). kv_scale: any strides.
            expect_tma_compatible(name, x)
    expect_unit_last_stride("block_table", block_table)
    expect_contiguous("cache_seqlens", cache_seqlens)
    for name, x in metadata:
        expect_contiguous(name, x)
    if out is not None:
        expect_contiguous("out", out)
        expect_tma_compatible("out", out)  # written as 8-byte vectors by the combine kernel


def check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k) -> None:
    """The checks of get_metadata's classic form."""
    expect_tensor("cache_seqlens", cache_seqlens)
    expect_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    expect_int("num_heads_k", num_heads_k)
    expect_dtype("cache_seqlens", cache_seqlens, torch.int32)
    expect_rank("cache_seqlens", cache_seqlens, 1)
    expect_at_least("num_q_tokens_per_head_k", num_q_tokens_per_head_k, 1)
    expect_at_least("num_heads_k", num_heads_k, 1)
    expect_contiguous("cache_seqlens", cache_seqlens)
    if not cache_seqlens.is_cuda:
        raise ValueError(f"cache_seqlens must be a CUDA tensor, got device {cache_seqlens.device}")


def check_lengths_fit(cache_seqlens: torch.Tensor, max_pages: int, page_size: int = PAGE_SIZE) -> None:
    """Raise ValueError unless ``0 <= cache_seqlens[i] <= max_pages * page_size`` for all i.

    Reads the lengths on the host: one device synchronisation for a CUDA tensor.
    """
    if cache_seqlens.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(cache_seqlens)).tolist()
    capacity = max_pages * page_size
    if lo < 0 or hi > capacity:
        raise ValueError(
            f"cache_seqlens values must lie in [0, block_table.shape[1] * {page_size} = {capacity}] "
            f"(the block table's capacity), got min {lo}, max {hi}"
        )
