"""The compiled extension ``flash_gla._C`` and the ops it registers, ``torch.ops.flash_gla.*``.

Importing ``flash_gla._C`` loads the library, whose static initialisers register the ops with
torch's dispatcher through torch's stable C ABI (``csrc/bindings.cpp``); the Python module
itself is empty. ``import flash_gla`` tries that once (:func:`try_load_extension`), so that the
ops exist for ``torch.compile`` and for callers of ``torch.ops.flash_gla`` directly, but works
without it: the reference and the input validation need no build. :func:`load_extension`
raises an ImportError that says what is wrong.
"""

from __future__ import annotations

import torch

from flash_gla import _library

_loaded = False  # the extension is loaded and the fakes are registered (a plain bool: torch.compile reads it)


def load_extension():
    """The ops (``torch.ops.flash_gla``), loading the extension on first use, or an ImportError."""
    global _loaded
    if not _loaded:
        try:
            from flash_gla import _C  # noqa: F401  (loading it registers the ops)
        except ImportError as err:
            raise ImportError(
                "flash_gla's CUDA extension (flash_gla._C) is not built or failed to load "
                f"({err}). Build it on a machine with the CUDA toolkit: "
                "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`), "
                "or install a flash_gla wheel built for this platform. `python -m flash_gla` "
                "prints what was built and what is running."
            ) from err
        _library.register_fakes()
        _loaded = True
    return torch.ops.flash_gla


def try_load_extension() -> bool:
    """Load the extension if it is there; False (and nothing raised) where it is not."""
    try:
        load_extension()
    except ImportError:
        return False
    return True


def num_sm_parts(device_index: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """Scheduler parts (rows of tile_scheduler_metadata) that get_metadata plans on a device,
    loading the extension on first use (or an ImportError)."""
    load_extension()
    return _library.num_sm_parts(device_index, num_q_tokens_per_head_k, num_heads_k)
