"""The compiled extension ``flash_gla._C``, imported on first use.

Nothing else in flash_gla imports ``_C`` at module level, so ``import flash_gla``, the
reference and the input validation work where the extension is not built.
"""

from __future__ import annotations

import functools

import torch

_extension = None


def load_extension():
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
def num_sm_parts(device_index: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """Scheduler parts (rows of tile_scheduler_metadata) that get_metadata plans on a device."""
    with torch.cuda.device(device_index):
        return load_extension().num_sm_parts(num_q_tokens_per_head_k, num_heads_k)
