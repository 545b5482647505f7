"""flash_gla: Hopper decode attention for Grouped Latent / Grouped-Tied Attention, FlashMLA's API.

    meta, num_splits = flash_gla.get_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_gla.gla_with_kvcache(q, kv_cache, block_table, cache_seqlens,
                                          head_dim_v, meta, num_splits, causal=True)

``get_mla_metadata`` and ``flash_mla_with_kvcache`` take FlashMLA's arguments unchanged, so
an engine switches by changing the import. ``gta_with_kvcache`` serves GTA (tied KV state
plus one RoPE key shared by all KV heads); ``gla_with_kvcache(..., rope_cache=...)`` serves
GLA with its RoPE key stored once. ``flash_gla.reference`` defines the math.
"""

from flash_gla.version import __version__


def _check_torch_matches_build():
    """Raise ImportError if the running torch is not the one the extension was compiled against.

    The build writes ``flash_gla/_build_info.py`` (``TORCH_VERSION``) beside the extension.
    An extension compiled against another torch fails later with an undefined-symbol error
    or, worse, loads and misbehaves; this check turns that into one message with the fix.
    Without the file (a source checkout that was never built) there is nothing to check:
    the reference and the argument checks work without the extension.
    """
    import importlib

    try:
        build_info = importlib.import_module("flash_gla._build_info")
    except ModuleNotFoundError as err:
        if err.name != "flash_gla._build_info":
            raise
        return
    import torch

    built_with, running = build_info.TORCH_VERSION, torch.__version__
    if running != built_with:
        raise ImportError(
            f"flash_gla was built against torch {built_with}, but the running torch is {running}: "
            "its compiled extension (flash_gla._C) works only with the torch it was compiled "
            f"against. Either install torch=={built_with}, or rebuild flash_gla against this "
            "torch from its source folder with `pip install --no-build-isolation .` (without "
            "--no-build-isolation, pip compiles against a torch it downloads into a temporary "
            "environment instead of yours)."
        )


_check_torch_matches_build()

from flash_gla import reference  # noqa: E402  (after the check: reference imports torch)
from flash_gla.cache_writer import write_kvcache  # noqa: E402
from flash_gla.merge import merge_attention  # noqa: E402
from flash_gla.ops import (  # noqa: E402
    SchedulerMetadata,
    flash_mla_with_kvcache,
    get_metadata,
    get_mla_metadata,
    gla_with_kvcache,
    gta_with_kvcache,
)

__all__ = [
    "SchedulerMetadata",
    "__version__",
    "flash_mla_with_kvcache",
    "get_metadata",
    "get_mla_metadata",
    "gla_with_kvcache",
    "gta_with_kvcache",
    "merge_attention",
    "reference",
    "write_kvcache",
]
