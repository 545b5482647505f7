"""The lazy scheduler metadata object and the call shape it is tied to.

Public through :mod:`flash_gla.ops` (``SchedulerMetadata``, ``DecodeConfig``).
"""

from __future__ import annotations

import dataclasses

import torch

from flash_gla._extension import load_extension


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
    batch_invariant: bool = False  # the batch-invariant plan (enable_batch_invariant=True)

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
    h_kv, page size, causal, head_dim_v, device and enable_batch_invariant, and the same
    ``cache_seqlens`` values (not checked: create a new object for each decode step). The
    object is eager-only: it is filled in Python on the first call, which ``torch.compile``
    does not trace; compiled code uses the classic form.

    Attributes:
        config: the DecodeConfig of the first call, None before it.
        tile_scheduler_metadata: (num_sm_parts, 8) int32 CUDA (one more row for the
            batch-invariant plan), None before the first call.
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
        """The metadata for a validated call with this ``config``, computed on the first call."""
        self.check_config(config)
        if self.config is None:
            meta, num_splits = load_extension().get_metadata(
                cache_seqlens, config.num_q_tokens_per_head_k, config.h_kv, config.batch_invariant
            )
            self.tile_scheduler_metadata, self.num_splits, self.config = meta, num_splits, config
        return self.tile_scheduler_metadata, self.num_splits
