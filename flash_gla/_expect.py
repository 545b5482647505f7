"""The argument checks every public entry shares (decode, cache writer, merge).

Each raises TypeError or ValueError with a message that names the argument, what was expected
and what was given.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from flash_gla import _library

TMA_ALIGN_BYTES = 16  # TMA: global address and every non-unit stride 16-byte aligned


def reject_unsupported(**kwargs: Any) -> None:
    """ValueError for a FlashMLA feature flash_gla lacks, passed with a non-default value.

    The default is False for ``is_fp8_kvcache`` and None for everything else.
    """
    for name, value in kwargs.items():
        default = False if name == "is_fp8_kvcache" else None
        if value is not default:
            shown = f"a {type(value).__name__}" if isinstance(value, torch.Tensor) else repr(value)
            raise ValueError(f"{name} must be {default} (not supported by flash_gla yet), got {shown}")


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
