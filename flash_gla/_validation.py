"""The decode entries' variants and the head dims they accept; get_metadata's checks; the lengths.

The supported head dims come from ``flash_gla._instances``, the generated list of compiled
kernel instances: those of its FP8 instances (``kv_fp8``) for a float8_e4m3fn ``kv_cache``. A
decode call's checks, in their fixed order, are ``flash_gla._call``'s.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from flash_gla._expect import expect_at_least, expect_contiguous, expect_dtype, expect_int, expect_rank, expect_tensor
from flash_gla._instances import DTYPES, INSTANCES, PAGE_SIZE  # PAGE_SIZE: kv_cache.shape[1]

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
