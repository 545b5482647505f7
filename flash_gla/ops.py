"""Public decode ops: validate the inputs, plan with the tile scheduler, call the kernel.

Every input is checked in Python before an op of the extension is called (a decode call's by
``flash_gla._call``, in a fixed order: types, dtypes, shapes, strides, lengths, device): the
compiled ops (``torch.ops.flash_gla.*``) trust their inputs. GLA (inline RoPE or RoPE stored once), MLA and
GTA, over bf16 / fp16 or FP8 (e4m3 + ``kv_scale``) caches, go through one path, :func:`_decode`.

``import flash_gla``, the reference and the validation work where the extension is not built;
the first call that needs it raises an ImportError saying how to build it.
"""

from __future__ import annotations

import torch

from flash_gla import _library, _validation
from flash_gla._call import DecodeCall, check_decode_call
from flash_gla._extension import load_extension as _load_extension
from flash_gla._extension import num_sm_parts as _num_sm_parts  # noqa: F401  (tests, tools)
from flash_gla._metadata import DecodeConfig, SchedulerMetadata
from flash_gla._validation import reject_unsupported as _reject_unsupported

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

#: Debug switch, off by default: check, on every call, that ``cache_seqlens`` fits the block
#: table (``0 <= L_i <= block_table.shape[1] * 64``). The check reads the lengths on the host,
#: a GPU synchronisation per call, so no engine path should run with it. Without it the
#: kernels clamp each length to the table's capacity: a bad length gives wrong numbers for
#: that request but no out-of-bounds read. Skipped while a CUDA graph is being captured.
#: Read at every call: ``flash_gla.ops.CHECK_LENGTHS = True`` takes effect at once.
CHECK_LENGTHS = False


# ----------------------------------------------------------------------------------------
# Scheduler metadata
# ----------------------------------------------------------------------------------------


def get_metadata(
    cache_seqlens: torch.Tensor | None = None,
    num_q_tokens_per_head_k: int | None = None,
    num_heads_k: int | None = None,
    *,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
    enable_batch_invariant: bool = False,
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
        is_fp8_kvcache: must be False (FlashMLA compatibility). An FP8 cache (float8_e4m3fn
            ``kv_cache`` with ``kv_scale``) needs no flag: its metadata is the same as a bf16 one's.
        topk: must be None (sparse attention is not supported; FlashMLA compatibility).
        enable_batch_invariant: classic form only: plan so that each request's result is
            bitwise the same whatever else is in the batch (pass the same flag to the decode
            calls). Each request is cut by its own length: into chunks of at least 64 pages
            (4096 tokens), at most 8 of them. Costs speed where a batch has fewer long requests
            than SMs, and up to ``8 * b`` partial-result slots of memory per decode call. In the
            lazy form pass the flag to the decode call instead.

    Returns:
        tile_scheduler_metadata: (num_sm_parts, 8) int32 CUDA; one more row (a header that
            marks the plan) with ``enable_batch_invariant``.
        num_splits: (b + 1,) int32 CUDA.
    """
    _reject_unsupported(is_fp8_kvcache=is_fp8_kvcache, topk=topk)
    given = [x is not None for x in (cache_seqlens, num_q_tokens_per_head_k, num_heads_k)]
    if not isinstance(enable_batch_invariant, bool):
        raise TypeError(f"enable_batch_invariant must be a bool, got {type(enable_batch_invariant).__name__}")
    if not any(given):
        if enable_batch_invariant:
            raise ValueError(
                "enable_batch_invariant=True applies to the classic form; with the lazy form "
                "(get_metadata() with no arguments) pass it to the decode call"
            )
        return SchedulerMetadata(), None
    if not all(given):
        raise TypeError(
            "get_metadata takes either no arguments (lazy form) or all of cache_seqlens, "
            "num_q_tokens_per_head_k and num_heads_k (classic form)"
        )
    _validation.check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    return _load_extension().get_metadata.default(cache_seqlens, num_q_tokens_per_head_k, num_heads_k,
                                                  enable_batch_invariant)


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
    attn_sink: torch.Tensor | None = None,
    enable_batch_invariant: bool = False,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for GLA (``h_kv`` latent heads) and MLA (``h_kv == 1``).

    Inline RoPE (``rope_cache=None``, FlashMLA's layout): for KV head ``j`` and cached token
    ``t``, ``K[t] = kv_cache[page, row, j, :]`` (all d_qk dims, the RoPE dims after V) and
    ``V[t] = kv_cache[page, row, j, :head_dim_v]``. Shared RoPE (``rope_cache`` given): the
    RoPE key is stored once per token for all KV heads, ``kv_cache`` holds only the latents,
    ``K[t] = concat(kv_cache[page, row, j, :], rope_cache[page, row, 0, :])`` and
    ``V[t] = kv_cache[page, row, j, :]``. Query head ``i`` uses KV head ``i // (h_q // h_kv)``.
    ``flash_gla.reference`` defines the result exactly.

    FP8 cache (RoPE stored once only): ``kv_cache`` float8_e4m3fn (num_blocks, 64, h_kv,
    head_dim_v), ``kv_scale`` float32 (num_blocks, 64, h_kv, ceil(head_dim_v / 128)) and
    ``rope_cache`` in q's dtype, unquantised. Element ``i`` of a cached row is
    ``kv_cache[..., i] * kv_scale[..., i // 128]`` (``flash_gla.reference.dequantize_kv``);
    ``flash_gla.write_kvcache`` writes this layout (it quantises when ``kv_cache`` is e4m3). The
    kernel dequantises to q's dtype and computes as for a bf16 / fp16 cache: the metadata, the
    causal rule, ``out`` and ``lse`` are the same. Inline-RoPE FP8 (and FlashMLA's packed FP8
    row, ``is_fp8_kvcache=True``) is not supported.

    Rows past each ``L_i`` and pages the block table does not reach are never read: NaN or inf
    there (values, scales or RoPE keys) never reaches ``out`` or ``lse``.

    Args:
        q: (b, s_q, h_q, d_qk) bfloat16 or float16, last-dim stride 1, other strides
            multiples of 8 elements, data_ptr 16-byte aligned (rows are read as 16-byte vectors).
            ``h_q % h_kv == 0``, ``h_q / h_kv <= 128``, ``s_q * h_q / h_kv <= 1024``.
        kv_cache: (num_blocks, 64, h_kv, d_qk) with inline RoPE, (num_blocks, 64, h_kv,
            head_dim_v) with ``rope_cache``; q's dtype, last-dim stride 1, every other
            stride a multiple of 8 elements, data_ptr 16-byte aligned. Or float8_e4m3fn with
            ``kv_scale`` and ``rope_cache``: every stride but the last a multiple of 16 elements
            (16 bytes), data_ptr 16-byte aligned.
            Supported (head_dim_v, d_qk), those of the compiled instances
            (``flash_gla._instances``): (256, 320), (512, 576) inline; (256, 320) with
            ``rope_cache``; (256, 320) with ``rope_cache`` and an FP8 ``kv_cache``.
        block_table: (b, max_pages) int32, last-dim stride 1. Entries at and past
            ``ceil(L_i / 64)`` are never read.
        cache_seqlens: (b,) int32 contiguous, ``0 <= L_i <= max_pages * 64`` (checked only
            while :data:`CHECK_LENGTHS` is True and no CUDA graph is being captured).
        head_dim_v: V's width, ``d_qk - d_rope`` of a supported pair (256 or 512).
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
            ``d_rope = d_qk - head_dim_v`` (64), q's dtype (also with an FP8 ``kv_cache``), on
            the same pages as ``kv_cache`` (same block table), strides as for a bf16 / fp16
            ``kv_cache``.
        is_fp8_kvcache: must be False (FlashMLA's packed FP8 MLA row is not supported; an FP8
            cache is a float8_e4m3fn ``kv_cache`` with ``kv_scale``).
        indices: must be None (sparse attention is not supported).
        attn_sink: None, or (h_q,) float32 on q's device, contiguous: one sink logit per query
            head (FlashMLA's ``attn_sink``). It joins the softmax's denominator only:
            ``out *= exp(lse) / (exp(lse) + exp(attn_sink[h]))``; ``lse`` is unchanged, and a row
            that sees no key keeps ``out = 0``. Fused into the kernels' epilogues.
        enable_batch_invariant: each request's ``out`` and ``lse`` are bitwise the same
            whatever else is in the batch and whatever the batch size (FlashMLA's name). Needs
            metadata planned for it: ``get_metadata(..., enable_batch_invariant=True)``, or the
            lazy form, which then plans so; a mismatch raises ValueError. Works with FP8 caches too.
        kv_scale: None for a bf16 / fp16 ``kv_cache``; with a float8_e4m3fn one (required),
            (num_blocks, 64, h_kv, ceil(head_dim_v / 128)) float32 on q's device, any strides:
            one scale per token, KV head and 128 values.

    Returns:
        out: (b, s_q, h_q, head_dim_v), q's dtype (``out`` itself when given).
        lse: (b, h_q, s_q) float32, natural-log logsumexp of the scaled scores.
        Query rows that see no key (e.g. ``L_i == 0``) get ``out = 0`` and ``lse = +inf``.
    """
    if is_fp8_kvcache is not False or indices is not None:
        _reject_unsupported(is_fp8_kvcache=is_fp8_kvcache, indices=indices)
    variant = _validation.GLA_INLINE if rope_cache is None else _validation.GLA_ROPE1
    # Positional, in DecodeCall's field order: about a microsecond cheaper than by keyword.
    return _decode(DecodeCall(variant, q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v,
                              tile_scheduler_metadata, num_splits, softmax_scale, causal, out, attn_sink,
                              enable_batch_invariant, kv_scale))


def gta_with_kvcache(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    rope_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tile_scheduler_metadata: torch.Tensor | SchedulerMetadata,
    num_splits: torch.Tensor | None = None,
    softmax_scale: float | None = None, causal: bool = False, out: torch.Tensor | None = None,
    *, attn_sink: torch.Tensor | None = None, enable_batch_invariant: bool = False,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for Grouped-Tied Attention (GTA).

    Each KV head ``j`` caches one tied state of ``d`` dims per token; one RoPE key of
    ``d_rope`` dims per token is shared by all KV heads. For cached token ``t``:
    ``K[t] = concat(kv_cache[page, row, j, :d - d_rope], rope_cache[page, row, 0, :])`` and
    ``V[t] = kv_cache[page, row, j, :]``. Query head ``i`` uses KV head ``i // (h_q // h_kv)``.
    ``flash_gla.reference.gta_with_kvcache_ref`` defines the result exactly.

    FP8 cache: ``kv_cache`` float8_e4m3fn (num_blocks, 64, h_kv, d) with ``kv_scale`` float32
    (num_blocks, 64, h_kv, ceil(d / 128)), element ``i`` of a state
    ``kv_cache[..., i] * kv_scale[..., i // 128]``, and ``rope_cache`` in q's dtype,
    unquantised; dequantised to q's dtype in the kernel, otherwise as for a bf16 / fp16
    cache (same metadata, see :func:`gla_with_kvcache`). NaN or inf in rows past each
    ``L_i`` or in pages the block table does not reach (values, scales or RoPE keys) never
    reaches ``out`` or ``lse``.

    Args:
        q: (b, s_q, h_q, d) bfloat16 or float16, strides as in :func:`gla_with_kvcache`.
            ``h_q % h_kv == 0``, ``h_q / h_kv <= 128``, ``s_q * h_q / h_kv <= 1024``.
        kv_cache: (num_blocks, 64, h_kv, d) tied states, q's dtype, last-dim stride 1,
            every other stride a multiple of 8 elements, data_ptr 16-byte aligned; or
            float8_e4m3fn with ``kv_scale``, every stride but the last a multiple of 16
            elements (16 bytes), data_ptr 16-byte aligned.
        rope_cache: (num_blocks, 64, 1, d_rope), q's dtype, same pages as ``kv_cache``.
            Supported (d, d_rope), those of the compiled instances: (128, 64), (64, 32).
            With an FP8 ``kv_cache``: (128, 64), (64, 32).
        block_table, cache_seqlens, tile_scheduler_metadata, num_splits, causal: as in
            :func:`gla_with_kvcache` (metadata from ``get_metadata(cache_seqlens,
            s_q * h_q // h_kv, h_kv)`` or the lazy form).
        softmax_scale: scale of ``q . K``; default ``1 / sqrt(d)``.
        out: optional (b, s_q, h_q, d) contiguous tensor of q's dtype to write into.
        attn_sink, enable_batch_invariant: as in :func:`gla_with_kvcache`.
        kv_scale: None for a bf16 / fp16 ``kv_cache``; with a float8_e4m3fn one (required),
            (num_blocks, 64, h_kv, ceil(d / 128)) float32 on q's device, any strides.

    Returns:
        out: (b, s_q, h_q, d), q's dtype. lse: (b, h_q, s_q) float32. Rows that see no key
        get ``out = 0`` and ``lse = +inf``.
    """
    return _decode(DecodeCall(_validation.GTA, q, kv_cache, rope_cache, block_table, cache_seqlens, None,
                              tile_scheduler_metadata, num_splits, softmax_scale, causal, out, attn_sink,
                              enable_batch_invariant, kv_scale))


def flash_mla_with_kvcache(
    q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits=None,
    softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None, attn_sink=None,
    extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None,
    out=None, enable_batch_invariant=False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's ``flash_mla_with_kvcache``, same parameter names and order.

    Call sites written for FlashMLA (positional or keyword, e.g. ``k_cache=``) work by
    changing only the import. Arguments (and their types) as in :func:`gla_with_kvcache`
    (``k_cache`` is its ``kv_cache``; ``attn_sink`` and ``enable_batch_invariant`` too);
    FlashMLA's sparse / FP8 arguments (tensors or None) must keep their defaults:
    ``is_fp8_kvcache=True`` (FlashMLA's packed 656-byte FP8 MLA row, RoPE inline) is refused.
    For an FP8 cache, use :func:`gla_with_kvcache` with a float8_e4m3fn ``kv_cache``, its
    ``kv_scale`` and a ``rope_cache``.
    """
    _reject_unsupported(
        extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices_in_kvcache,
        topk_length=topk_length, extra_topk_length=extra_topk_length,
    )
    return gla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale=softmax_scale, causal=causal, out=out, is_fp8_kvcache=is_fp8_kvcache,
        indices=indices, attn_sink=attn_sink, enable_batch_invariant=enable_batch_invariant,
    )


#: FlashMLA's name for :func:`get_metadata`.
get_mla_metadata = get_metadata


def _decode(call: DecodeCall) -> tuple[torch.Tensor, torch.Tensor]:
    """The one path of every decode entry: validate, resolve lazy metadata, launch."""
    config = check_decode_call(call, check_lengths=CHECK_LENGTHS)
    (_, q, kv_cache, rope_cache, block_table, cache_seqlens, _, meta, num_splits, softmax_scale, causal, out,
     attn_sink, batch_invariant, kv_scale) = call
    if isinstance(meta, SchedulerMetadata):  # the lazy object: filled on the first call
        if _library.compiling():
            raise TypeError(
                "the lazy metadata object (get_metadata() with no arguments) is filled in Python on the "
                "first call and cannot be compiled: under torch.compile use the classic form, "
                "get_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)"
            )
        meta, num_splits = meta._resolve(config, cache_seqlens)
    if out is None:
        out = q.new_empty((config.batch, config.s_q, config.h_q, config.head_dim_v))
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    # torch.ops.flash_gla.decode (its schema's order), which writes out and returns lse.
    lse = _load_extension().decode.default(q, kv_cache, rope_cache, block_table, cache_seqlens, config.head_dim_v,
                                           meta, num_splits, float(softmax_scale), causal, out, attn_sink,
                                           batch_invariant, kv_scale)
    return out, lse
