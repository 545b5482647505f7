"""Merging partial attentions: the attention over the union of two disjoint key sets.

A decode split over key sets (split-KV, decode context parallelism where each GPU holds a
slice of every request's tokens, cascade attention over a shared prefix) gives one ``(out,
lse)`` per set; :func:`merge_attention` turns two of them into the attention over both sets,
with the ``lse`` convention of :func:`flash_gla.gla_with_kvcache` (natural log, ``+inf`` for a
part that saw no key). One kernel, no host synchronisation: CUDA-graph safe.
``flash_gla.reference.merge_attention_ref`` defines the result.
"""

from __future__ import annotations

import torch

from flash_gla._extension import load_extension
from flash_gla._validation import expect_contiguous, expect_dtype, expect_rank, expect_tensor

__all__ = ["merge_attention"]

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def merge_attention(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over keys A ∪ B from the attentions over A and over B (disjoint).

    With weights ``w = exp(lse - max(lse_a, lse_b))``: ``out = (w_a out_a + w_b out_b) / (w_a +
    w_b)`` and ``lse = log(exp(lse_a) + exp(lse_b))``. A part with ``lse = +inf`` saw no key and
    weighs nothing (its ``out`` is ignored); when both are empty, ``out = 0`` and ``lse = +inf``.

    Args:
        out_a, out_b: (b, s_q, h_q, dv), bfloat16, float16 or float32, contiguous, one dtype and
            shape, on one CUDA device.
        lse_a, lse_b: (b, h_q, s_q) float32 contiguous (``gla_with_kvcache``'s ``lse``).
        out, lse: optional results to write into (same shapes and dtypes as out_a, lse_a); they
            may be ``out_a`` / ``lse_a`` themselves, merging B into A in place.

    Returns:
        ``(out, lse)``.
    """
    _check_inputs(out_a, lse_a, out_b, lse_b, out, lse)
    out = torch.empty_like(out_a) if out is None else out
    lse = torch.empty_like(lse_a) if lse is None else lse
    # torch.ops.flash_gla.merge_attention, whose schema declares that it writes out and lse.
    load_extension().merge_attention.default(out_a, lse_a, out_b, lse_b, out, lse)
    return out, lse


def _check_inputs(out_a, lse_a, out_b, lse_b, out, lse) -> None:
    """Types, dtypes, shapes, contiguity, device: every error names the argument."""
    tensors = {"out_a": out_a, "lse_a": lse_a, "out_b": out_b, "lse_b": lse_b, "out": out, "lse": lse}
    for name, x in tensors.items():
        if x is not None or name in ("out_a", "lse_a", "out_b", "lse_b"):
            expect_tensor(name, x)
    expect_dtype("out_a", out_a, OUT_DTYPES)
    for name in ("out_b", "out"):
        if tensors[name] is not None:
            expect_dtype(name, tensors[name], out_a.dtype, what="out_a's dtype")
    for name in ("lse_a", "lse_b", "lse"):
        if tensors[name] is not None:
            expect_dtype(name, tensors[name], torch.float32)
    expect_rank("out_a", out_a, 4)
    b, s_q, h_q, _ = out_a.shape
    for name in ("out_b", "out"):
        if tensors[name] is not None and tuple(tensors[name].shape) != tuple(out_a.shape):
            raise ValueError(f"{name}.shape must equal out_a.shape {tuple(out_a.shape)}, got {tuple(tensors[name].shape)}")
    for name in ("lse_a", "lse_b", "lse"):
        if tensors[name] is not None and tuple(tensors[name].shape) != (b, h_q, s_q):
            raise ValueError(
                f"{name}.shape must be (b, h_q, s_q) = {(b, h_q, s_q)} (out_a is (b, s_q, h_q, dv)), "
                f"got {tuple(tensors[name].shape)}"
            )
    for name, x in tensors.items():
        if x is not None:
            expect_contiguous(name, x)
    if not out_a.is_cuda:
        raise ValueError(f"out_a must be a CUDA tensor (all tensors on one CUDA device), got device {out_a.device}")
    for name, x in tensors.items():
        if x is not None and x.device != out_a.device:
            raise ValueError(f"{name} must be on out_a's device {out_a.device}, got {x.device}")
