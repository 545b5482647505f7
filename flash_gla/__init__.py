"""flash_gla: Hopper decode attention for Grouped Latent / Grouped-Tied Attention, FlashMLA's API.

    meta, num_splits = flash_gla.get_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_gla.gla_with_kvcache(q, kv_cache, block_table, cache_seqlens,
                                          head_dim_v, meta, num_splits, causal=True)

``get_mla_metadata`` and ``flash_mla_with_kvcache`` take FlashMLA's arguments unchanged, so
an engine switches by changing the import. ``gta_with_kvcache`` serves GTA (tied KV state
plus one RoPE key shared by all KV heads); ``gla_with_kvcache(..., rope_cache=...)`` serves
GLA with its RoPE key stored once. ``flash_gla.reference`` defines the math.
"""

from flash_gla.ops import (
    SchedulerMetadata,
    flash_mla_with_kvcache,
    get_metadata,
    get_mla_metadata,
    gla_with_kvcache,
    gta_with_kvcache,
)

__all__ = [
    "SchedulerMetadata",
    "flash_mla_with_kvcache",
    "get_metadata",
    "get_mla_metadata",
    "gla_with_kvcache",
    "gta_with_kvcache",
]
