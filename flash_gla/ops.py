"""Public decode ops: validate the inputs, plan with the tile scheduler, call the kernel.

Every input is checked here, in Python, before the extension is touched: the compiled
``flash_gla._C`` trusts its inputs. The checks run in a fixed order so that the first error
a caller sees is the most basic one, and so that everything but the device can be checked
on a machine without a GPU:

    Python types (TypeError) -> dtypes (TypeError) -> ranks, shapes, divisibility
    (ValueError) -> strides and alignment (ValueError) -> lengths vs. block-table capacity
    (ValueError, optional, see CHECK_LENGTHS) -> device (ValueError).

The extension is imported lazily, so ``import flash_gla``, the reference and the validation
work where it is not built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable

import torch

__all__ = [
    "CHECK_LENGTHS",
    "SchedulerMetadata",
    "DecodeConfig",
    "get_metadata",
    "gla_with_kvcache",
    "gta_with_kvcache",
    "get_mla_metadata",
    "flash_mla_with_kvcache",
]

#: Check, on every call, that ``cache_seqlens`` fits the block table (``0 <= L_i <=
#: block_table.shape[1] * 64``). This reads the lengths on the host, which synchronises
#: with the GPU: engines that build their inputs correctly should set it to False to avoid
#: the per-call sync. The check is skipped while a CUDA graph is being captured (the sync
#: is illegal there); the kernel clamps lengths to the table's capacity in any case, so an
#: unchecked bad length gives wrong numbers for that request but no out-of-bounds read.
CHECK_LENGTHS = True

PAGE_SIZE = 64  # tokens per KV page (kv_cache.shape[1])
META_FIELDS = 8  # int32 fields per row of tile_scheduler_metadata
MAX_GROUP = 128  # largest h_q / h_kv
MAX_Q_ROWS_PER_HEAD_K = 1024  # largest s_q * h_q / h_kv (packed query rows per KV head)
TMA_ALIGN_BYTES = 16  # TMA: global address and every non-unit stride 16-byte aligned

_HALF_DTYPES = (torch.bfloat16, torch.float16)
#: GLA with inline RoPE: d_qk -> head_dim_v (the 64 RoPE dims follow V in each row).
_GLA_INLINE_DIMS = {320: 256, 576: 512}
#: GLA with a shared rope cache: head_dim_v -> d_rope (d_qk = head_dim_v + d_rope).
_GLA_SHARED_ROPE_DIMS = {256: 64}
#: GTA: tied-state width d -> d_rope (d_qk = d; K = [state[:d - d_rope], rope]).
_GTA_DIMS = {128: 64, 64: 32}

_extension = None


def _load_extension():
    """``flash_gla._C``, imported on first use, or an ImportError that says what is wrong."""
    global _extension
    if _extension is None:
        try:
            from flash_gla import _C
        except ImportError as err:
            raise ImportError(
                "flash_gla's CUDA extension (flash_gla._C) is not built or failed to load "
                f"({err}). Build it on a machine with the CUDA toolkit: "
                "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`)."
            ) from err
        _extension = _C
    return _extension


@functools.lru_cache(maxsize=None)
def _num_sm_parts(device_index: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    with torch.cuda.device(device_index):
        return _load_extension().num_sm_parts(num_q_tokens_per_head_k, num_heads_k)


# ----------------------------------------------------------------------------------------
# Scheduler metadata
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """What scheduler metadata depends on, besides the lengths."""

    batch: int
    s_q: int
    h_q: int
    h_kv: int
    page_size: int
    causal: bool
    head_dim_v: int
    device: torch.device

    @property
    def num_q_tokens_per_head_k(self) -> int:
        return self.s_q * self.h_q // self.h_kv


@dataclasses.dataclass
class SchedulerMetadata:
    """Lazy scheduler metadata (FlashMLA's ``FlashMLASchedMeta`` convention).

    ``get_metadata()`` returns ``(SchedulerMetadata(), None)``; pass the object as
    ``tile_scheduler_metadata`` with ``num_splits=None``. The first decode call computes the
    metadata from its ``cache_seqlens`` and shapes and stores it here; later calls (e.g. the
    other layers of the same decode step) reuse it and must have the same batch, s_q, h_q,
    h_kv, page size, causal, head_dim_v and device, and the same ``cache_seqlens`` values
    (not checked: create a new object for each decode step).

    Attributes:
        config: the DecodeConfig of the first call, None before it.
        tile_scheduler_metadata: (num_sm_parts, 8) int32 CUDA, None before the first call.
        num_splits: (batch + 1,) int32 CUDA, None before the first call.
    """

    config: DecodeConfig | None = None
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None

    @property
    def have_initialized(self) -> bool:
        return self.config is not None

    def check_config(self, config: DecodeConfig) -> None:
        """Raise ValueError naming every field in which ``config`` differs from the stored one."""
        if self.config is None or self.config == config:
            return
        changed = [
            f"{field.name} {getattr(self.config, field.name)} -> {getattr(config, field.name)}"
            for field in dataclasses.fields(DecodeConfig)
            if getattr(self.config, field.name) != getattr(config, field.name)
        ]
        raise ValueError(
            "tile_scheduler_metadata (SchedulerMetadata) was computed for a different call: "
            + ", ".join(changed)
            + ". Use a new get_metadata() object for each decode step and shape."
        )

    def _resolve(self, config: DecodeConfig, cache_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_config(config)
        if self.config is None:
            meta, num_splits = _load_extension().get_metadata(
                cache_seqlens, config.num_q_tokens_per_head_k, config.h_kv
            )
            self.tile_scheduler_metadata, self.num_splits, self.config = meta, num_splits, config
        return self.tile_scheduler_metadata, self.num_splits


def get_metadata(
    cache_seqlens: torch.Tensor | None = None,
    num_q_tokens_per_head_k: int | None = None,
    num_heads_k: int | None = None,
    *,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
):
    """Plan the split of every request's KV pages over the SMs (FlashMLA's get_mla_metadata).

    Two call forms:

    * Classic: ``get_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)`` returns
      ``(tile_scheduler_metadata, num_splits)`` tensors. Compute them once per decode step
      and pass them to every layer's decode call. No host synchronisation (CUDA-graph safe).
    * Lazy: ``get_metadata()`` returns ``(SchedulerMetadata(), None)``, like current FlashMLA;
      the first decode call fills the object (see :class:`SchedulerMetadata`).

    Args:
        cache_seqlens: (b,) int32 CUDA, contiguous: tokens in each request's KV cache.
        num_q_tokens_per_head_k: ``s_q * h_q // h_kv``, query rows packed per KV head.
        num_heads_k: ``h_kv``.
        num_heads_q: accepted for FlashMLA compatibility and ignored.
        is_fp8_kvcache: must be False (FlashMLA compatibility).
        topk: must be None (sparse attention is not supported; FlashMLA compatibility).

    Returns:
        tile_scheduler_metadata: (num_sm_parts, 8) int32 CUDA.
        num_splits: (b + 1,) int32 CUDA.
    """
    _reject_unsupported(is_fp8_kvcache=is_fp8_kvcache, topk=topk)
    given = [x is not None for x in (cache_seqlens, num_q_tokens_per_head_k, num_heads_k)]
    if not any(given):
        return SchedulerMetadata(), None
    if not all(given):
        raise TypeError(
            "get_metadata takes either no arguments (lazy form) or all of cache_seqlens, "
            "num_q_tokens_per_head_k and num_heads_k (classic form)"
        )
    _expect_tensor("cache_seqlens", cache_seqlens)
    _expect_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    _expect_int("num_heads_k", num_heads_k)
    _expect_dtype("cache_seqlens", cache_seqlens, torch.int32)
    _expect_rank("cache_seqlens", cache_seqlens, 1)
    _expect_at_least("num_q_tokens_per_head_k", num_q_tokens_per_head_k, 1)
    _expect_at_least("num_heads_k", num_heads_k, 1)
    _expect_contiguous("cache_seqlens", cache_seqlens)
    if not cache_seqlens.is_cuda:
        raise ValueError(f"cache_seqlens must be a CUDA tensor, got device {cache_seqlens.device}")
    return _load_extension().get_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)


# ----------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------


def gla_with_kvcache(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor | SchedulerMetadata,
    num_splits: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    out: torch.Tensor | None = None,
    rope_cache: torch.Tensor | None = None,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for GLA (``h_kv`` latent heads) and MLA (``h_kv == 1``).

    Inline RoPE (``rope_cache=None``, FlashMLA's layout): for KV head ``j`` and cached token
    ``t``, ``K[t] = kv_cache[page, row, j, :]`` (all d_qk dims, the RoPE dims after V) and
    ``V[t] = kv_cache[page, row, j, :head_dim_v]``. Shared RoPE (``rope_cache`` given): the
    RoPE key is stored once per token for all KV heads, ``kv_cache`` holds only the latents,
    ``K[t] = concat(kv_cache[page, row, j, :], rope_cache[page, row, 0, :])`` and
    ``V[t] = kv_cache[page, row, j, :]``. Query head ``i`` uses KV head ``i // (h_q // h_kv)``.
    ``flash_gla.reference`` defines the result exactly.

    Args:
        q: (b, s_q, h_q, d_qk) bfloat16 or float16, last-dim stride 1, other strides
            multiples of 8 elements, data_ptr 16-byte aligned (rows are read as 16-byte vectors).
            ``h_q % h_kv == 0``, ``h_q / h_kv <= 128``, ``s_q * h_q / h_kv <= 1024``.
        kv_cache: (num_blocks, 64, h_kv, d_qk) with inline RoPE, (num_blocks, 64, h_kv,
            head_dim_v) with ``rope_cache``; q's dtype, last-dim stride 1, every other
            stride a multiple of 8 elements, data_ptr 16-byte aligned.
            Supported (head_dim_v, d_qk): (256, 320), (512, 576) inline; (256, 320) shared.
        block_table: (b, max_pages) int32, last-dim stride 1. Entries at and past
            ``ceil(L_i / 64)`` are never read.
        cache_seqlens: (b,) int32 contiguous, ``0 <= L_i <= max_pages * 64`` (checked only
            while :data:`CHECK_LENGTHS` is True and no CUDA graph is being captured).
        head_dim_v: 256 or 512 (``d_qk - 64``).
        tile_scheduler_metadata: (num_sm_parts, 8) int32 CUDA from
            ``get_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)``, or the lazy
            :class:`SchedulerMetadata` from ``get_metadata()``.
        num_splits: (b + 1,) int32 CUDA from the same ``get_metadata`` call; None with the
            lazy form.
        softmax_scale: scale of ``q . K``; default ``1 / sqrt(d_qk)``.
        causal: the ``s_q`` queries are the last ``s_q`` positions: query ``r`` of request
            ``i`` sees keys ``0 .. L_i - s_q + r``.
        out: optional (b, s_q, h_q, head_dim_v) contiguous tensor of q's dtype to write into.
        rope_cache: None (inline RoPE), or (num_blocks, 64, 1, d_rope) with
            ``d_rope = d_qk - head_dim_v`` (64), q's dtype, on the same pages as ``kv_cache``
            (same block table), strides as for ``kv_cache``.
        is_fp8_kvcache: must be False.
        indices: must be None (sparse attention is not supported).

    Returns:
        out: (b, s_q, h_q, head_dim_v), q's dtype (``out`` itself when given).
        lse: (b, h_q, s_q) float32, natural-log logsumexp of the scaled scores.
        Query rows that see no key (e.g. ``L_i == 0``) get ``out = 0`` and ``lse = +inf``.
    """
    config = _validate_gla_inputs(
        q, kv_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
        num_splits, softmax_scale, causal, out, rope_cache, is_fp8_kvcache, indices,
    )
    return _run_decode(
        config, q, kv_cache, rope_cache, block_table, cache_seqlens,
        tile_scheduler_metadata, num_splits, softmax_scale, out,
    )


def gta_with_kvcache(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    rope_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tile_scheduler_metadata: torch.Tensor | SchedulerMetadata,
    num_splits: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for Grouped-Tied Attention (GTA).

    Each KV head ``j`` caches one tied state of ``d`` dims per token; one RoPE key of
    ``d_rope`` dims per token is shared by all KV heads. For cached token ``t``:
    ``K[t] = concat(kv_cache[page, row, j, :d - d_rope], rope_cache[page, row, 0, :])`` and
    ``V[t] = kv_cache[page, row, j, :]``. Query head ``i`` uses KV head ``i // (h_q // h_kv)``.
    ``flash_gla.reference.gta_with_kvcache_ref`` defines the result exactly.

    Args:
        q: (b, s_q, h_q, d) bfloat16 or float16, strides as in :func:`gla_with_kvcache`.
            ``h_q % h_kv == 0``, ``h_q / h_kv <= 128``, ``s_q * h_q / h_kv <= 1024``.
        kv_cache: (num_blocks, 64, h_kv, d) tied states, q's dtype, last-dim stride 1,
            every other stride a multiple of 8 elements, data_ptr 16-byte aligned.
        rope_cache: (num_blocks, 64, 1, d_rope), q's dtype, same pages as ``kv_cache``.
            Supported (d, d_rope): (128, 64), (64, 32).
        block_table, cache_seqlens, tile_scheduler_metadata, num_splits, causal: as in
            :func:`gla_with_kvcache` (metadata from ``get_metadata(cache_seqlens,
            s_q * h_q // h_kv, h_kv)`` or the lazy form).
        softmax_scale: scale of ``q . K``; default ``1 / sqrt(d)``.
        out: optional (b, s_q, h_q, d) contiguous tensor of q's dtype to write into.

    Returns:
        out: (b, s_q, h_q, d), q's dtype. lse: (b, h_q, s_q) float32. Rows that see no key
        get ``out = 0`` and ``lse = +inf``.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if not isinstance(rope_cache, torch.Tensor):
        raise TypeError(
            f"rope_cache must be a torch.Tensor (num_blocks, 64, 1, d_rope), got {type(rope_cache).__name__}"
        )
    head_dim_v = q.shape[-1] if q.dim() >= 1 else 0  # V is the whole tied state: d
    config = _validate_decode_inputs(
        q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
        num_splits, softmax_scale, causal, out, check_head_dims=_check_gta_dims,
    )
    return _run_decode(
        config, q, kv_cache, rope_cache, block_table, cache_seqlens,
        tile_scheduler_metadata, num_splits, softmax_scale, out,
    )


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor | SchedulerMetadata,
    num_splits: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    enable_batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's ``flash_mla_with_kvcache``, same parameter names and order.

    Call sites written for FlashMLA (positional or keyword, e.g. ``k_cache=``) work by
    changing only the import. Arguments as in :func:`gla_with_kvcache` (``k_cache`` is its
    ``kv_cache``); FlashMLA's sparse / FP8 / attention-sink arguments must keep their
    defaults.
    """
    _reject_unsupported(
        attn_sink=attn_sink, extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices_in_kvcache, topk_length=topk_length,
        extra_topk_length=extra_topk_length,
    )
    if enable_batch_invariant is not False:
        raise ValueError(
            f"enable_batch_invariant must be False (split-KV cannot be disabled), got {enable_batch_invariant!r}"
        )
    return gla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale=softmax_scale, causal=causal, out=out, is_fp8_kvcache=is_fp8_kvcache,
        indices=indices,
    )


#: FlashMLA's name for :func:`get_metadata`.
get_mla_metadata = get_metadata


def _run_decode(
    config: DecodeConfig,
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    rope_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tile_scheduler_metadata: torch.Tensor | SchedulerMetadata,
    num_splits: torch.Tensor | None,
    softmax_scale: float | None,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resolve the metadata and launch; inputs already validated."""
    ext = _load_extension()
    if isinstance(tile_scheduler_metadata, SchedulerMetadata):
        meta, num_splits = tile_scheduler_metadata._resolve(config, cache_seqlens)
    else:
        meta = tile_scheduler_metadata
        parts = _num_sm_parts(q.device.index, config.num_q_tokens_per_head_k, config.h_kv)
        if meta.shape[0] != parts:
            raise ValueError(
                f"tile_scheduler_metadata.shape[0] must be {parts} (scheduler parts for "
                f"num_q_tokens_per_head_k={config.num_q_tokens_per_head_k}, "
                f"num_heads_k={config.h_kv} on {q.device}), got {meta.shape[0]}: the metadata "
                "was computed for a different num_q_tokens_per_head_k / num_heads_k"
            )
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    return ext.decode(
        q, kv_cache, rope_cache, block_table, cache_seqlens, config.head_dim_v,
        meta, num_splits, float(softmax_scale), config.causal, out,
    )


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def _validate_gla_inputs(
    q, kv_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
    num_splits, softmax_scale, causal, out, rope_cache, is_fp8_kvcache, indices,
) -> DecodeConfig:
    """All checks of gla_with_kvcache; returns the call's DecodeConfig."""
    _reject_unsupported(is_fp8_kvcache=is_fp8_kvcache, indices=indices)
    check = _check_gla_inline_dims if rope_cache is None else _check_gla_shared_rope_dims
    return _validate_decode_inputs(
        q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
        num_splits, softmax_scale, causal, out, check_head_dims=check,
    )


def _check_gla_inline_dims(d_qk: int, kv_dim: int, rope_dim: int | None, head_dim_v: int) -> None:
    """GLA / MLA with inline RoPE: kv rows are [V (head_dim_v) | RoPE (64)] = d_qk dims."""
    if d_qk not in _GLA_INLINE_DIMS:
        raise ValueError(f"q.shape[3] (d_qk) must be one of {sorted(_GLA_INLINE_DIMS)}, got {d_qk}")
    if kv_dim != d_qk:
        raise ValueError(f"kv_cache.shape[3] must equal q.shape[3] (d_qk) = {d_qk}, got {kv_dim}")
    expected_dv = _GLA_INLINE_DIMS[d_qk]
    if head_dim_v != expected_dv:
        raise ValueError(f"head_dim_v must be {expected_dv} for d_qk {d_qk}, got {head_dim_v}")


def _check_gla_shared_rope_dims(d_qk: int, kv_dim: int, rope_dim: int | None, head_dim_v: int) -> None:
    """GLA with a shared rope cache: kv rows are the latents (head_dim_v), d_qk = dv + d_rope."""
    if head_dim_v not in _GLA_SHARED_ROPE_DIMS:
        raise ValueError(
            f"head_dim_v must be one of {sorted(_GLA_SHARED_ROPE_DIMS)} with a rope_cache, got {head_dim_v}"
        )
    if kv_dim != head_dim_v:
        raise ValueError(
            f"kv_cache.shape[3] must equal head_dim_v = {head_dim_v} with a rope_cache (the RoPE "
            f"dims live in rope_cache), got {kv_dim}"
        )
    expected_rope = _GLA_SHARED_ROPE_DIMS[head_dim_v]
    if rope_dim != expected_rope:
        raise ValueError(f"rope_cache.shape[3] (d_rope) must be {expected_rope} for head_dim_v {head_dim_v}, got {rope_dim}")
    if d_qk != head_dim_v + rope_dim:
        raise ValueError(
            f"q.shape[3] (d_qk) must be head_dim_v + d_rope = {head_dim_v + rope_dim}, got {d_qk}"
        )


def _check_gta_dims(d_qk: int, kv_dim: int, rope_dim: int | None, head_dim_v: int) -> None:
    """GTA: q, kv rows and out all have the tied-state width d; the RoPE dims are its last d_rope."""
    if d_qk not in _GTA_DIMS:
        raise ValueError(f"q.shape[3] (d) must be one of {sorted(_GTA_DIMS)}, got {d_qk}")
    if kv_dim != d_qk:
        raise ValueError(f"kv_cache.shape[3] must equal q.shape[3] (d) = {d_qk}, got {kv_dim}")
    if rope_dim != _GTA_DIMS[d_qk]:
        raise ValueError(f"rope_cache.shape[3] (d_rope) must be {_GTA_DIMS[d_qk]} for d {d_qk}, got {rope_dim}")


def _validate_decode_inputs(
    q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
    num_splits, softmax_scale, causal, out, *,
    check_head_dims: Callable[[int, int, int | None, int], None],
) -> DecodeConfig:
    """Checks shared by every decode entry (GLA inline / shared RoPE, GTA).

    ``check_head_dims(d_qk, kv_cache.shape[3], rope_cache.shape[3] or None, head_dim_v)``
    holds the variant's rule for head dims and raises ValueError.
    """
    lazy = isinstance(tile_scheduler_metadata, SchedulerMetadata)

    # 1. Python types.
    for name, x in (("q", q), ("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        _expect_tensor(name, x)
    for name, x in (("rope_cache", rope_cache), ("out", out)):
        if x is not None:
            _expect_tensor(name, x)
    _expect_int("head_dim_v", head_dim_v)
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
    else:
        if isinstance(tile_scheduler_metadata, tuple):
            raise TypeError(
                "tile_scheduler_metadata must be a torch.Tensor or a SchedulerMetadata, got a "
                "tuple: get_metadata() returns (SchedulerMetadata, None) like FlashMLA; unpack it"
            )
        _expect_tensor("tile_scheduler_metadata", tile_scheduler_metadata, hint="or a SchedulerMetadata")
        _expect_tensor("num_splits", num_splits, hint="(or pass a SchedulerMetadata as tile_scheduler_metadata)")
    metadata = [] if lazy else [("tile_scheduler_metadata", tile_scheduler_metadata), ("num_splits", num_splits)]

    # 2. dtypes.
    _expect_dtype("q", q, _HALF_DTYPES)
    _expect_dtype("kv_cache", kv_cache, q.dtype, what="q's dtype")
    if rope_cache is not None:
        _expect_dtype("rope_cache", rope_cache, q.dtype, what="q's dtype")
    _expect_dtype("block_table", block_table, torch.int32)
    _expect_dtype("cache_seqlens", cache_seqlens, torch.int32)
    for name, x in metadata:
        _expect_dtype(name, x, torch.int32)
    if out is not None:
        _expect_dtype("out", out, q.dtype, what="q's dtype")

    # 3. Ranks, shapes, divisibility and values.
    ranked = (("q", q, 4), ("kv_cache", kv_cache, 4), ("block_table", block_table, 2), ("cache_seqlens", cache_seqlens, 1))
    for name, x, rank in ranked:
        _expect_rank(name, x, rank)
    if rope_cache is not None:
        _expect_rank("rope_cache", rope_cache, 4)
    for (name, x), rank in zip(metadata, (2, 1)):
        _expect_rank(name, x, rank)
    if out is not None:
        _expect_rank("out", out, 4)

    batch, s_q, h_q, d_qk = q.shape
    num_blocks, page_size, h_kv, kv_dim = kv_cache.shape
    _expect_at_least("q.shape[0] (batch)", batch, 1)
    _expect_at_least("q.shape[1] (s_q)", s_q, 1)
    _expect_at_least("q.shape[2] (h_q)", h_q, 1)
    _expect_at_least("kv_cache.shape[0] (num_blocks)", num_blocks, 1)
    if page_size != PAGE_SIZE:
        raise ValueError(f"kv_cache.shape[1] (page size) must be {PAGE_SIZE}, got {page_size}")
    _expect_at_least("kv_cache.shape[2] (h_kv)", h_kv, 1)
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
    check_head_dims(d_qk, kv_dim, rope_dim, head_dim_v)
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table.shape[0] must equal q.shape[0] (batch) = {batch}, got {block_table.shape[0]}")
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens.shape[0] must equal q.shape[0] (batch) = {batch}, got {cache_seqlens.shape[0]}")
    if not lazy:
        if tile_scheduler_metadata.shape[1] != META_FIELDS:
            raise ValueError(
                f"tile_scheduler_metadata.shape[1] must be {META_FIELDS}, got {tile_scheduler_metadata.shape[1]}"
            )
        if tile_scheduler_metadata.shape[0] < 1:
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
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    config = DecodeConfig(batch, s_q, h_q, h_kv, page_size, causal, head_dim_v, q.device)
    if lazy:
        tile_scheduler_metadata.check_config(config)

    # 4. Strides and alignment.
    _expect_tma_compatible("q", q)  # Q rows are read as 16-byte vectors
    _expect_tma_compatible("kv_cache", kv_cache)
    if rope_cache is not None:
        _expect_tma_compatible("rope_cache", rope_cache)
    _expect_unit_last_stride("block_table", block_table)
    _expect_contiguous("cache_seqlens", cache_seqlens)
    for name, x in metadata:
        _expect_contiguous(name, x)
    if out is not None:
        _expect_contiguous("out", out)
        _expect_tma_compatible("out", out)  # written as 8-byte vectors by the combine kernel

    # 5. Lengths vs. the block table's capacity (host sync; optional).
    if CHECK_LENGTHS and not (cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        check_lengths_fit(cache_seqlens, block_table.shape[1])

    # 6. Device: last, so that everything above can be checked on a machine without a GPU.
    if not q.is_cuda:
        raise ValueError(f"q must be a CUDA tensor (all tensors on one CUDA device), got device {q.device}")
    tensors = [("kv_cache", kv_cache), ("rope_cache", rope_cache), ("block_table", block_table),
               ("cache_seqlens", cache_seqlens), *metadata, ("out", out)]
    for name, x in tensors:
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device} (all tensors on one CUDA device), got {x.device}")
    return config


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


def _reject_unsupported(**kwargs: Any) -> None:
    """ValueError for a FlashMLA feature flash_gla lacks, passed with a non-default value.

    The default is False for ``is_fp8_kvcache`` and None for everything else.
    """
    for name, value in kwargs.items():
        default = False if name == "is_fp8_kvcache" else None
        if value is not default:
            shown = f"a {type(value).__name__}" if isinstance(value, torch.Tensor) else repr(value)
            raise ValueError(f"{name} must be {default} (not supported by flash_gla yet), got {shown}")


def _expect_tensor(name: str, x: Any, hint: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        extra = f" {hint}" if hint else ""
        raise TypeError(f"{name} must be a torch.Tensor{extra}, got {type(x).__name__}")


def _expect_int(name: str, x: Any) -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")


def _expect_dtype(name: str, x: torch.Tensor, expected, what: str | None = None) -> None:
    allowed = expected if isinstance(expected, tuple) else (expected,)
    if x.dtype not in allowed:
        shown = " or ".join(str(d) for d in allowed)
        if what:
            shown = f"{shown} ({what})"
        raise TypeError(f"{name}.dtype must be {shown}, got {x.dtype}")


def _expect_rank(name: str, x: torch.Tensor, rank: int) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D, got {x.dim()}-D with shape {tuple(x.shape)}")


def _expect_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _expect_unit_last_stride(name: str, x: torch.Tensor) -> None:
    if x.stride(-1) != 1:
        raise ValueError(f"{name}.stride(-1) must be 1 (last dim contiguous), got {x.stride(-1)}")


def _expect_contiguous(name: str, x: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(x.stride())} for shape {tuple(x.shape)}")


def _expect_tma_compatible(name: str, x: torch.Tensor) -> None:
    """Last dim contiguous, other strides and the base address 16-byte aligned (TMA)."""
    _expect_unit_last_stride(name, x)
    align = TMA_ALIGN_BYTES // x.element_size()
    for dim in range(x.dim() - 1):
        if x.stride(dim) % align != 0:
            raise ValueError(
                f"{name}.stride({dim}) must be a multiple of {align} elements ({TMA_ALIGN_BYTES} bytes, "
                f"for TMA), got {x.stride(dim)}"
            )
    if x.data_ptr() % TMA_ALIGN_BYTES != 0:
        raise ValueError(
            f"{name}.data_ptr() must be {TMA_ALIGN_BYTES}-byte aligned (for TMA), got address "
            f"{x.data_ptr():#x} (offset {x.data_ptr() % TMA_ALIGN_BYTES})"
        )
