"""A decode call as one record, built once by the public entry, checked once, passed on whole.

``gla_with_kvcache`` and ``gta_with_kvcache`` (``flash_mla_with_kvcache`` through the first)
gather their arguments into a :class:`DecodeCall`; :func:`check_decode_call` checks it and
returns the call's ``DecodeConfig`` (what scheduler metadata depends on); the lazy metadata and
the op ``torch.ops.flash_gla.decode`` then read the same record. What depends on more than one
argument (is the cache FP8? is the metadata the lazy object?) is decided in the record, once.

The compiled ``flash_gla._C`` trusts its inputs. The checks run in a fixed order so that the
first error a caller sees is the most basic one, and so that everything but the device can be
checked on a machine without a GPU or the extension:

    Python types (TypeError) -> dtypes (TypeError) -> ranks, shapes, divisibility
    (ValueError) -> strides and alignment (ValueError) -> lengths vs. block-table capacity
    (ValueError, optional: flash_gla.ops.CHECK_LENGTHS) -> device (ValueError) ->
    metadata rows vs. the device's scheduler parts (ValueError; asks the extension).

Every message names the argument, what was expected and what was given. The supported head
dims are those of the compiled instances (``flash_gla._validation``'s tables): those of its FP8
instances for a float8_e4m3fn ``kv_cache``, which also needs its ``kv_scale`` and a
``rope_cache`` (FP8 has no inline-RoPE layout).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from flash_gla import _library
from flash_gla._extension import num_sm_parts
from flash_gla._instances import META_FIELDS
from flash_gla._metadata import DecodeConfig, SchedulerMetadata
from flash_gla._validation import (
    FP8_DTYPE,
    HALF_DTYPES,
    TMA_ALIGN_BYTES,
    Variant,
    check_lengths_fit,
    expect_at_least,
    expect_contiguous,
    expect_dtype,
    expect_int,
    expect_kv_scale,
    expect_kv_scale_shape,
    expect_one_cuda_device,
    expect_paged_cache,
    expect_rank,
    expect_tensor,
    expect_tma_compatible,
    expect_unit_last_stride,
)

MAX_GROUP = 128  # largest h_q / h_kv
MAX_Q_ROWS_PER_HEAD_K = 1024  # largest s_q * h_q / h_kv (packed query rows per KV head)


class DecodeCall(NamedTuple):
    """One decode call: the entry's variant, then its arguments in the op schema's order, as given.

    Nothing is converted before the checks, so that an error names what the caller passed. A
    NamedTuple rather than a frozen dataclass: as immutable, and about a microsecond cheaper to
    build, which an engine pays on every layer's call.
    """

    variant: Variant
    q: torch.Tensor
    kv_cache: torch.Tensor
    rope_cache: torch.Tensor | None
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    head_dim_v: int | None  # None where V is q's width (GTA): the validated value is DecodeConfig's
    tile_scheduler_metadata: torch.Tensor | SchedulerMetadata
    num_splits: torch.Tensor | None
    softmax_scale: float | None
    causal: bool
    out: torch.Tensor | None
    attn_sink: torch.Tensor | None
    batch_invariant: bool  # the entry's enable_batch_invariant
    kv_scale: torch.Tensor | None

    @property
    def is_fp8(self) -> bool:
        """Whether the cache is FP8: a float8_e4m3fn ``kv_cache`` (with its ``kv_scale``). Read
        once ``kv_cache`` is known to be a tensor."""
        return self.kv_cache.dtype == FP8_DTYPE

    @property
    def lazy(self) -> bool:
        """Whether the metadata is the lazy object of ``get_metadata()``, filled by a first call."""
        return isinstance(self.tile_scheduler_metadata, SchedulerMetadata)

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, value) of every tensor argument, in the schema's order (q first)."""
        return [(name, x) for name, x in zip(self._fields, self) if isinstance(x, torch.Tensor)]


#: Layouts that passed every check: a call's :func:`_layout_key` -> DecodeConfig. An engine
#: calls decode with the same shapes, strides, dtypes and devices in every layer and step; a
#: call whose key is here skips the checks that depend only on it (all but the base-address
#: alignment, which is checked on every call). Bounded: cleared when full.
_VALIDATED: dict[tuple, DecodeConfig] = {}
_VALIDATED_MAX = 256


def _layout(x):
    return None if x is None else (type(x), x.shape, x.stride(), x.dtype, x.device)


def _layout_key(c: DecodeCall) -> tuple:
    """All that the checks read of a call but the tensors' addresses; AttributeError where a tensor
    is not one. Types are part of it: 256.0 == 256 and 1 == True, but only the ints and bools pass.
    Every field, each spelled out (built on every call, so unpacked once: a test holds it to the
    record's fields)."""
    (variant, q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v, meta, num_splits, softmax_scale,
     causal, out, attn_sink, batch_invariant, kv_scale) = c
    scalars = (head_dim_v, softmax_scale, causal, batch_invariant)
    return (variant, scalars, tuple(map(type, scalars)), _layout(q), _layout(kv_cache), _layout(rope_cache),
            _layout(block_table), _layout(cache_seqlens), _layout(meta), _layout(num_splits), _layout(out),
            _layout(attn_sink), _layout(kv_scale))


def check_decode_call(call: DecodeCall, *, check_lengths: bool) -> DecodeConfig:
    """Every check of a decode call, in the order of the module docstring; the call's DecodeConfig.

    ``check_lengths`` is flash_gla.ops.CHECK_LENGTHS, read by the caller at call time.
    """
    key = None
    # The fast path: eager calls with tensor metadata (not the lazy object, whose state is checked).
    # An engine pays it on every layer's call, so it reads the record's fields directly.
    if not check_lengths and not isinstance(call.tile_scheduler_metadata, SchedulerMetadata) \
            and not _library.compiling():
        try:
            key = _layout_key(call)
            config = _VALIDATED.get(key)
        except (AttributeError, TypeError):  # not a tensor, or an unhashable scalar: the checks name it
            key = config = None
        if config is not None:
            q, kv_cache, rope_cache, out = call.q, call.kv_cache, call.rope_cache, call.out
            if (q.data_ptr() | kv_cache.data_ptr() | (0 if rope_cache is None else rope_cache.data_ptr())
                    | (0 if out is None else out.data_ptr())) % TMA_ALIGN_BYTES:
                _check_addresses(call)
            return config
    config = _check_call(call, check_lengths)
    if key is not None:
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED[key] = config
    return config


def _check_addresses(call) -> None:
    """Names the misaligned base address of a call whose layout is known good (raises)."""
    for name in ("q", "kv_cache", "rope_cache", "out"):
        x = getattr(call, name)
        if x is not None:
            expect_tma_compatible(name, x)


def _check_call(call, check_lengths: bool) -> DecodeConfig:
    if not isinstance(call.batch_invariant, bool):
        raise TypeError(f"enable_batch_invariant must be a bool, got {type(call.batch_invariant).__name__}")
    lazy = call.lazy
    _check_types(call, lazy)
    _check_kv_format(call)
    _check_sink_type(call.attn_sink)
    _check_dtypes(call, lazy)
    tensors = call.tensors()
    config = _check_shapes(call, lazy, tensors)
    if call.attn_sink is not None and tuple(call.attn_sink.shape) != (config.h_q,):
        raise ValueError(f"attn_sink.shape must be (h_q,) = ({config.h_q},), got {tuple(call.attn_sink.shape)}")
    if call.softmax_scale is not None and not math.isfinite(call.softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {call.softmax_scale}")
    if call.softmax_scale is not None and call.softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be positive, got {call.softmax_scale}")
    if lazy:
        call.tile_scheduler_metadata.check_config(config)
    _check_strides(call, lazy)
    seqlens = call.cache_seqlens
    if check_lengths and not (seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        check_lengths_fit(seqlens, call.block_table.shape[1])  # host sync; skipped in capture
    expect_one_cuda_device(tensors)  # q's: last but one, so that all above runs without a GPU
    if not lazy and not _library.compiling():  # asks the extension: not traceable
        _check_metadata_rows(call, config)
    return config


def _check_metadata_rows(call, config: DecodeConfig) -> None:
    """The metadata's rows against the scheduler parts get_metadata plans for this call's shape."""
    parts = num_sm_parts(call.q.device.index, config.num_q_tokens_per_head_k, config.h_kv)
    rows, planned = call.tile_scheduler_metadata.shape[0], call.batch_invariant
    if rows != parts + planned and rows in (parts, parts + 1):  # the other plan
        other = rows == parts + 1
        raise ValueError(
            f"tile_scheduler_metadata has {rows} rows: it is the "
            f"{'batch-invariant' if other else 'default'} plan (get_metadata(..., enable_batch_invariant="
            f"{other})), but the call has enable_batch_invariant={planned}: pass the same value to both"
        )
    if rows != parts + planned:
        raise ValueError(
            f"tile_scheduler_metadata.shape[0] must be {parts + planned} (scheduler parts for "
            f"num_q_tokens_per_head_k={config.num_q_tokens_per_head_k}, num_heads_k={config.h_kv} on "
            f"{call.q.device}), got {rows}: the metadata was computed for a "
            "different num_q_tokens_per_head_k / num_heads_k"
        )


def _check_types(call, lazy: bool):
    for name in ("q", "kv_cache", "block_table", "cache_seqlens"):
        expect_tensor(name, getattr(call, name))
    if call.variant.takes_rope_cache:
        expect_tensor("rope_cache", call.rope_cache, hint="(num_blocks, 64, 1, d_rope)")
    if call.out is not None:
        expect_tensor("out", call.out)
    if not call.variant.v_is_q_width:
        expect_int("head_dim_v", call.head_dim_v)
    if not isinstance(call.causal, bool):
        raise TypeError(f"causal must be a bool, got {type(call.causal).__name__}")
    scale = call.softmax_scale
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(scale).__name__}")
    if lazy:
        if call.num_splits is not None:
            raise TypeError(
                "num_splits must be None when tile_scheduler_metadata is a SchedulerMetadata "
                f"(lazy form), got {type(call.num_splits).__name__}"
            )
        return
    if isinstance(call.tile_scheduler_metadata, tuple):
        raise TypeError(
            "tile_scheduler_metadata must be a torch.Tensor or a SchedulerMetadata, got a "
            "tuple: get_metadata() returns (SchedulerMetadata, None) like FlashMLA; unpack it"
        )
    expect_tensor("tile_scheduler_metadata", call.tile_scheduler_metadata, hint="or a SchedulerMetadata")
    expect_tensor("num_splits", call.num_splits, hint="(or pass a SchedulerMetadata as tile_scheduler_metadata)")


def _check_kv_format(call) -> None:
    """The cache format: a one-byte float kv_cache is e4m3; the arguments an FP8 cache needs (a
    rope_cache, its kv_scale) and a bf16 / fp16 one refuses (kv_scale)."""
    kv_cache, fp8 = call.kv_cache, call.is_fp8
    if not fp8 and kv_cache.dtype.is_floating_point and kv_cache.dtype.itemsize == 1:
        raise TypeError(
            f"kv_cache.dtype must be {FP8_DTYPE} for an FP8 cache (else q's dtype), got {kv_cache.dtype}: "
            "FP8 caches are e4m3 only"
        )
    if fp8 and call.rope_cache is None:
        raise ValueError(
            f"an FP8 kv_cache ({FP8_DTYPE}) needs the RoPE key stored once, unquantised, in a rope_cache "
            "(num_blocks, 64, 1, d_rope) of q's dtype, kv_cache holding only the latents: inline-RoPE FP8 is not "
            "supported (write_kvcache(..., rope_cache=, kv_scale=) writes that layout; then call "
            "gla_with_kvcache(..., rope_cache=, kv_scale=))"
        )
    expect_kv_scale(call.kv_scale, kv_cache, fp8)


def _check_sink_type(attn_sink):
    if attn_sink is None:
        return
    expect_tensor("attn_sink", attn_sink, hint="(h_q,) float32 or None")
    expect_dtype("attn_sink", attn_sink, torch.float32)
    expect_rank("attn_sink", attn_sink, 1)
    expect_contiguous("attn_sink", attn_sink)


def _check_dtypes(call, lazy: bool):
    q, fp8 = call.q, call.is_fp8
    expect_dtype("q", q, HALF_DTYPES)
    if fp8:
        expect_dtype("kv_scale", call.kv_scale, torch.float32)
    else:
        expect_dtype("kv_cache", call.kv_cache, q.dtype, what="q's dtype")
    if call.rope_cache is not None:
        expect_dtype("rope_cache", call.rope_cache, q.dtype,
                     what="q's dtype: the RoPE key is not quantised" if fp8 else "q's dtype")
    for name in ("block_table", "cache_seqlens") + (() if lazy else ("tile_scheduler_metadata", "num_splits")):
        expect_dtype(name, getattr(call, name), torch.int32)
    if call.out is not None:
        expect_dtype("out", call.out, q.dtype, what="q's dtype")


#: The rank of each tensor argument but attn_sink (checked with its type).
_RANKS = {"q": 4, "kv_cache": 4, "rope_cache": 4, "block_table": 2, "cache_seqlens": 1, "tile_scheduler_metadata": 2,
         "num_splits": 1, "out": 4, "kv_scale": 4}


def _check_shapes(call, lazy: bool, tensors) -> DecodeConfig:
    """Ranks, shapes, divisibility; returns the call's DecodeConfig. tensors: call.tensors()."""
    for name, x in tensors:
        if name in _RANKS:
            expect_rank(name, x, _RANKS[name])
    q, kv_cache, rope_cache = call.q, call.kv_cache, call.rope_cache
    batch, s_q, h_q, d_qk = q.shape
    num_blocks, page_size, h_kv, kv_dim = kv_cache.shape
    expect_at_least("q.shape[0] (batch)", batch, 1)
    expect_at_least("q.shape[1] (s_q)", s_q, 1)
    expect_at_least("q.shape[2] (h_q)", h_q, 1)
    expect_paged_cache(kv_cache)
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
    head_dim_v = d_qk if call.variant.v_is_q_width else call.head_dim_v
    fp8 = call.is_fp8
    call.variant.check_head_dims(d_qk, kv_dim, rope_dim, head_dim_v, fp8)
    if fp8:
        expect_kv_scale_shape(call.kv_scale, kv_cache)
    for name, x in (("block_table", call.block_table), ("cache_seqlens", call.cache_seqlens)):
        if x.shape[0] != batch:
            raise ValueError(f"{name}.shape[0] must equal q.shape[0] (batch) = {batch}, got {x.shape[0]}")
    if not lazy:
        meta, num_splits = call.tile_scheduler_metadata, call.num_splits
        if meta.shape[1] != META_FIELDS:
            raise ValueError(f"tile_scheduler_metadata.shape[1] must be {META_FIELDS}, got {meta.shape[1]}")
        if meta.shape[0] < 1:
            raise ValueError("tile_scheduler_metadata.shape[0] (scheduler parts) must be >= 1, got 0")
        if num_splits.shape[0] != batch + 1:
            raise ValueError(
                f"num_splits.shape[0] must be batch + 1 = {batch + 1}, got {num_splits.shape[0]} "
                "(metadata from a different batch size?)"
            )
    if call.out is not None and tuple(call.out.shape) != (batch, s_q, h_q, head_dim_v):
        raise ValueError(
            f"out.shape must be (b, s_q, h_q, head_dim_v) = {(batch, s_q, h_q, head_dim_v)}, got {tuple(call.out.shape)}"
        )
    return DecodeConfig(batch, s_q, h_q, h_kv, page_size, call.causal, head_dim_v, q.device, call.batch_invariant)


def _check_strides(call, lazy: bool):
    for name, x in (("q", call.q), ("kv_cache", call.kv_cache), ("rope_cache", call.rope_cache)):
        if x is not None:
            # Q rows are read as 16-byte vectors, the caches by TMA (FP8: 16 elements). kv_scale: any strides.
            expect_tma_compatible(name, x)
    expect_unit_last_stride("block_table", call.block_table)
    for name in ("cache_seqlens",) + (() if lazy else ("tile_scheduler_metadata", "num_splits")):
        expect_contiguous(name, getattr(call, name))
    if call.out is not None:
        expect_contiguous("out", call.out)
        expect_tma_compatible("out", call.out)  # written as 8-byte vectors by the combine kernel
