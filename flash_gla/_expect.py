"""The argument checks every public entry shares (decode, cache writer, merge).

Each raises TypeError or ValueError with a message that names the argument, what was expected
and what was given.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from flash_gla import _library
from flash_gla._instances import FP8_GROUP, PAGE_SIZE

TMA_ALIGN_BYTES = 16  # TMA: global address and every non-unit stride 16-byte aligned
#: The FP8 cache dtype (values; a float32 kv_scale per 128 of them, the RoPE key unquantised).
FP8_DTYPE = torch.float8_e4m3fn
#: Why FlashMLA's FP8 flag is refused, and what to use instead.
FP8_FLAG_HINT = (
    "FlashMLA's packed FP8 MLA cache (656-byte rows with the RoPE key inline) is not supported; for an FP8 "
    "cache pass a torch.float8_e4m3fn kv_cache with its float32 kv_scale and a rope_cache to "
    "gla_with_kvcache (or gta_with_kvcache): no flag, and the same get_metadata as for a bf16 cache"
)


def reject_unsupported(**kwargs: Any) -> None:
    """ValueError for a FlashMLA feature flash_gla lacks, passed with a non-default value.

    The default is False for ``is_fp8_kvcache`` and None for everything else.
    """
    for name, value in kwargs.items():
        default = False if name == "is_fp8_kvcache" else None
        if value is not default:
            shown = f"a {type(value).__name__}" if isinstance(value, torch.Tensor) else repr(value)
            why = FP8_FLAG_HINT if name == "is_fp8_kvcache" else "not supported by flash_gla yet"
            raise ValueError(f"{name} must be {default} ({why}), got {shown}")


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
        shown = f"a {type(kv_scale).__name__}" if isinstance(kv_scale, torch.Tensor) else repr(kv_scale)
        raise ValueError(f"kv_scale must be None with a {kv_cache.dtype} kv_cache (kv_scale holds the scales of an "
                         f"FP8 kv_cache, {FP8_DTYPE}), got {shown}")


def expect_kv_scale_shape(kv_scale: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """An FP8 cache's scales: one per token, KV head and FP8_GROUP values of ``kv_cache``."""
    num_blocks, page_size, h_kv, d = kv_cache.shape
    expected = (num_blocks, page_size, h_kv, -(-d // FP8_GROUP))
    if tuple(kv_scale.shape) != expected:
        raise ValueError(f"kv_scale.shape must be (num_blocks, 64, h_kv, ceil(d / {FP8_GROUP})) = {expected} "
                         f"(of kv_cache), got {tuple(kv_scale.shape)}")
