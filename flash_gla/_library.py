"""flash_gla's operations as ``torch.library`` custom ops: ``torch.ops.flash_gla.*``.

What ``torch.compile`` (and its CUDA graphs, ``mode="reduce-overhead"``) sees of flash_gla: each
op has a schema that declares what it writes (``out``, the caches), and a fake implementation
that gives the shapes of its results without running it. The public functions
(``flash_gla.get_metadata``, ``gla_with_kvcache``, ``gta_with_kvcache``, ``write_kvcache``)
validate their arguments and call these ops while being compiled; run eagerly they call the
extension directly, which is the same kernel launch without the dispatcher's host time.

The ops trust their inputs: call them through the public functions, which check everything
(while compiling, all but the base-address alignment of the tensors and the metadata's row
count, which need values that tracing does not have).
"""

from __future__ import annotations

import torch

from flash_gla._extension import load_extension, num_sm_parts
from flash_gla._instances import META_FIELDS


@torch.library.custom_op("flash_gla::get_metadata", mutates_args=())
def get_metadata(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_scheduler_metadata (num_parts, 8) int32, num_splits (b + 1,) int32)."""
    meta, num_splits = load_extension().get_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    return meta, num_splits


@get_metadata.register_fake
def _(cache_seqlens, num_q_tokens_per_head_k, num_heads_k):
    device = cache_seqlens.device.index if cache_seqlens.device.index is not None else torch.cuda.current_device()
    parts = num_sm_parts(device, num_q_tokens_per_head_k, num_heads_k)
    return (cache_seqlens.new_empty((parts, META_FIELDS)), cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,)))


@torch.library.custom_op("flash_gla::decode", mutates_args=("out",))
def decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    rope_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    out: torch.Tensor,
    attn_sink: torch.Tensor | None,
) -> torch.Tensor:
    """Writes ``out`` (b, s_q, h_q, head_dim_v) and returns ``lse`` (b, h_q, s_q) float32."""
    _, lse = load_extension().decode(q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v,
                                     tile_scheduler_metadata, num_splits, softmax_scale, causal, out, attn_sink)
    return lse


@decode.register_fake
def _(q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
      softmax_scale, causal, out, attn_sink):
    batch, s_q, h_q, _ = q.shape
    return q.new_empty((batch, h_q, s_q), dtype=torch.float32)


@torch.library.custom_op("flash_gla::write_kvcache", mutates_args=("kv_cache", "rope_cache"))
def write_kvcache(
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv: torch.Tensor,
    rope: torch.Tensor | None,
    rope_cache: torch.Tensor | None,
) -> None:
    """Writes the new tokens into ``kv_cache`` (and ``rope_cache``) in place."""
    load_extension().write_kvcache(kv_cache, slot_mapping, kv, rope, rope_cache)


@write_kvcache.register_fake
def _(kv_cache, slot_mapping, kv, rope, rope_cache):
    return None


@torch.library.custom_op("flash_gla::merge_attention", mutates_args=("out", "lse"))
def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Writes the attention over both key sets into ``out`` and ``lse``."""
    load_extension().merge_attention(out_a, lse_a, out_b, lse_b, out, lse)


@merge_attention.register_fake
def _(out_a, lse_a, out_b, lse_b, out, lse):
    return None


def compiling() -> bool:
    """Whether the caller is being traced by torch.compile (then the ops above are used)."""
    return torch.compiler.is_compiling()
