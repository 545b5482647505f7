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


def _check_torch_version():
    """Raise ImportError if the running torch is older than the oldest one flash_gla supports.

    The compiled extension uses only torch's stable C ABI and targets MIN_TORCH's
    (flash_gla/version.py): it loads under that torch and every newer one, whichever torch
    built it. An older torch lacks functions it calls, and the Python side relies on
    ``torch.library`` features of the same releases.
    """
    import re

    import torch

    from flash_gla.version import MIN_TORCH

    running = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if running < tuple(int(x) for x in MIN_TORCH.split(".")):
        raise ImportError(
            f"flash_gla needs torch >= {MIN_TORCH}, but the running torch is {torch.__version__}. "
            f"Install a newer torch (`pip install 'torch>={MIN_TORCH}'`)."
        )


def build_info() -> dict:
    """What the compiled extension was built from: version, git_commit, cuda, cutlass, arch,
    torch_built_with, min_torch ({} for a source checkout that was never built)."""
    try:
        from flash_gla._build_info import BUILD
    except ImportError:
        return {}
    return dict(BUILD)


_check_torch_version()

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
from flash_gla._extension import try_load_extension as _try_load_extension  # noqa: E402

# Registers torch.ops.flash_gla.* where the extension is built (torch.compile needs the ops before
# it traces a call); without it the reference and the validation still work, and the first call
# that needs the extension says how to build it.
_try_load_extension()

__all__ = [
    "SchedulerMetadata",
    "__version__",
    "build_info",
    "flash_mla_with_kvcache",
    "get_metadata",
    "get_mla_metadata",
    "gla_with_kvcache",
    "gta_with_kvcache",
    "merge_attention",
    "reference",
    "write_kvcache",
]
