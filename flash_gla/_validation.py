"""Every argument check the public entries share, and the decode variants with the dims they accept.

The decode entries, the cache writer, merge_attention and get_metadata build their checks from
these; the compiled ``flash_gla._C`` trusts its inputs. Each check raises TypeError or
ValueError with a message that names the argument, what was expected and what was given. A
decode call's checks, in their fixed order, are ``flash_gla._call``'s.

The supported head dims come from ``flash_gla._instances``, the generated list of compiled
kernel instances: those of its FP8 instances (``kv_fp8``) for a float8_e4m3fn ``kv_cache``.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import torch

from flash_gla import _library
from flash_gla._instances import DTYPES, FP8_GROUP, INSTANCES, PAGE_SIZE  # PAGE_SIZE: kv_cache.shape[1]

TMA_ALIGN_BYTES = 16  # TMA: global address and every non-unit stride 16-byte aligned
#: The cache dtypes: bf16 / fp16 (q's dtype), or FP8 values with a float32 kv_scale per
#: FP8_GROUP of them (the RoPE key unquantised).
HALF_DTYPES = tuple({"bf16": torch.bfloat16, "fp16": torch.float16}[name] for name in DTYPES)
FP8_DTYPE = torch.float8_e4m3fn
#: Why FlashMLA's FP8 flag is refused, and what to use instead.
FP8_FLAG_HINT = (
    "FlashMLA's packed FP8 MLA cache (656-byte rows with the RoPE key inline) is not supported; for an FP8 "
    "cache pass a torch.float8_e4m3fn kv_cache with its float32 kv_scale and a rope_cache to "
    "gla_with_kvcache (or gta_with_kvcache): no flag, and the same get_metadata as for a bf16 cache"
)


def _shown(value: Any) -> str:
    """A refused value as a message shows it: a tensor by its type, anything else by its repr."""
    return f"a {type(value).__name__}" if isinstance(value, torch.Tensor) else repr(value)


def reject_unsupported(**kwargs: Any) -> None:
    """ValueError for a FlashMLA feature flash_gla lacks, passed with a non-default value.

    The default is False for ``is_fp8_kvcache`` and None for everything else.
    """
    for name, value in kwargs.items():
        default = False if name == "is_fp8_kvcache" else None
        if value is not default:
            why = FP8_FLAG_HINT if name == "is_fp8_kvcache" else "not supported by flash_gla yet"
            raise ValueError(f"{name} must be {default} ({why}), got {_shown(value)}")


def expect_tensor(name: str, x: Any, hint: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        extra = f" {hint}" if hint else ""
        raise TypeError(f"{name} must be a torch.Tensor{extra}, got {type(x).__name__}")


def expect_int(name: str, x: Any) -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")


def expect_dtype(name: str, x: torch.Tensor, expected, what: str | None = None) -> None:
    allowed = expected if isinstance(expected, tuple) else (expected,)
    if x.dtype not in allowed:
        shown = " or ".join(str(d) for d in allowed)
        if what:
            shown = f"{shown} ({what})"
        raise TypeError(f"{name}.dtype must be {shown}, got {x.dtype}")


def expect_rank(name: str, x: torch.Tensor, rank: int) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D, got {x.dim()}-D with shape {tuple(x.shape)}")


def expect_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def expect_unit_last_stride(name: str, x: torch.Tensor) -> None:
    if x.stride(-1) != 1:
        raise ValueError(f"{name}.stride(-1) must be 1 (last dim contiguous), got {x.stride(-1)}")


def expect_contiguous(name: str, x: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(x.stride())} for shape {tuple(x.shape)}")


def expect_tma_compatible(name: str, x: torch.Tensor) -> None:
    """Last dim contiguous, other strides and the base address 16-byte aligned (TMA)."""
    expect_unit_last_stride(name, x)
    align = TMA_ALIGN_BYTES // x.element_size()
    for dim in range(x.dim() - 1):
        if x.stride(dim) % align != 0:
            raise ValueError(
                f"{name}.stride({dim}) must be a multiple of {align} elements ({TMA_ALIGN_BYTES} bytes, "
                f"for TMA), got {x.stride(dim)}"
            )
    if not _library.compiling() and x.data_ptr() % TMA_ALIGN_BYTES != 0:  # no address when traced
        raise ValueError(
            f"{name}.data_ptr() must be {TMA_ALIGN_BYTES}-byte aligned (for TMA), got address "
            f"{x.data_ptr():#x} (offset {x.data_ptr() % TMA_ALIGN_BYTES})"
        )


def expect_paged_cache(kv_cache: torch.Tensor) -> None:
    """A paged cache (num_blocks, page size, h_kv, d): at least one page, of PAGE_SIZE rows, and one head."""
    num_blocks, page_size, h_kv, _ = kv_cache.shape
    expect_at_least("kv_cache.shape[0] (num_blocks)", num_blocks, 1)
    if page_size != PAGE_SIZE:
        raise ValueError(f"kv_cache.shape[1] (page size) must be {PAGE_SIZE}, got {page_size}")
    expect_at_least("kv_cache.shape[2] (h_kv)", h_kv, 1)


def expect_kv_scale(kv_scale: Any, kv_cache: torch.Tensor, fp8: bool) -> None:
    """``kv_scale`` is a tensor with an FP8 ``kv_cache`` (``fp8``: its scales), else None."""
    if fp8:
        expect_tensor("kv_scale", kv_scale, hint="(num_blocks, 64, h_kv, ceil(d / 128)) float32 (required with an "
                      "FP8 kv_cache: its scales)")
    elif kv_scale is not None:
        raise ValueError(f"kv_scale must be None with a {kv_cache.dtype} kv_cache (kv_scale holds the scales of an "
                         f"FP8 kv_cache, {FP8_DTYPE}), got {_shown(kv_scale)}")


def expect_kv_scale_shape(kv_scale: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """An FP8 cache's scales: one per token, KV head and FP8_GROUP values of ``kv_cache``."""
    num_blocks, page_size, h_kv, d = kv_cache.shape
    expected = (num_blocks, page_size, h_kv, -(-d // FP8_GROUP))
    if tuple(kv_scale.shape) != expected:
        raise ValueError(f"kv_scale.shape must be (num_blocks, 64, h_kv, ceil(d / {FP8_GROUP})) = {expected} "
                         f"(of kv_cache), got {tuple(kv_scale.shape)}")


def expect_one_cuda_device(tensors: list[tuple[str, torch.Tensor | None]]) -> None:
    """Every tensor on the first one's device, a CUDA device. Checked last, so that everything
    else can be checked on a machine without a GPU."""
    (first, anchor), *rest = tensors
    if not anchor.is_cuda:
        raise ValueError(f"{first} must be a CUDA tensor (all tensors on one CUDA device), got device {anchor.device}")
    for name, x in rest:
        if x is not None and x.device != anchor.device:
            raise ValueError(f"{name} must be on {first}'s device {anchor.device} (all tensors on one CUDA device), "
                             f"got {x.device}")


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


def _expect_one_of(name: str, value: int, table: dict[int, int], where: str = "") -> None:
    if value not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}{where}, got {value}")


def _expect_dim(name: str, value: int | None, expected: int, rule: str) -> None:
    if value != expected:
        raise ValueError(f"{name} must {rule}, got {value}")


def _check_inline_dims(d_qk: int, kv_dim: int, rope_dim: int | None, head_dim_v: int, fp8: bool = False) -> None:
    """Inline RoPE: kv rows are [V (head_dim_v) | RoPE] = d_qk dims (never FP8: an FP8 cache needs a rope_cache)."""
    _expect_one_of("q.shape[3] (d_qk)", d_qk, INLINE_DIMS)
    _expect_dim("kv_cache.shape[3]", kv_dim, d_qk, f"equal q.shape[3] (d_qk) = {d_qk}")
    _expect_dim("head_dim_v", head_dim_v, INLINE_DIMS[d_qk], f"be {INLINE_DIMS[d_qk]} for d_qk {d_qk}")


def _check_rope1_dims(d_qk: int, kv_dim: int, rope_dim: int | None, head_dim_v: int, fp8: bool = False) -> None:
    """RoPE stored once: kv rows are the latents (head_dim_v), d_qk = head_dim_v + d_rope."""
    table, cache = (ROPE1_FP8_DIMS, " and an FP8 kv_cache (the FP8 instances)") if fp8 else (ROPE1_DIMS, "")
    _expect_one_of("head_dim_v", head_dim_v, table, f" with a rope_cache{cache}")
    _expect_dim("kv_cache.shape[3]", kv_dim, head_dim_v,
                f"equal head_dim_v = {head_dim_v} with a rope_cache (the RoPE dims live in rope_cache)")
    _expect_dim("rope_cache.shape[3] (d_rope)", rope_dim, table[head_dim_v],
                f"be {table[head_dim_v]} for head_dim_v {head_dim_v}")
    _expect_dim("q.shape[3] (d_qk)", d_qk, head_dim_v + rope_dim, f"be head_dim_v + d_rope = {head_dim_v + rope_dim}")


def _check_gta_dims(d_qk: int, kv_dim: int, rope_dim: int | None, head_dim_v: int, fp8: bool = False) -> None:
    """GTA: q, kv rows and out all have the tied-state width d; the key's RoPE part is rope_cache."""
    table, cache = (GTA_FP8_DIMS, " with an FP8 kv_cache (the FP8 instances)") if fp8 else (GTA_DIMS, "")
    _expect_one_of("q.shape[3] (d)", d_qk, table, cache)
    _expect_dim("kv_cache.shape[3]", kv_dim, d_qk, f"equal q.shape[3] (d) = {d_qk}")
    _expect_dim("rope_cache.shape[3] (d_rope)", rope_dim, table[d_qk], f"be {table[d_qk]} for d {d_qk}")


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
