"""The fake implementations of flash_gla's ops, ``torch.ops.flash_gla.*``.

The ops themselves are defined in C++ (``csrc/bindings.cpp``, torch's stable ABI), each with a
schema that declares what it writes (``decode`` writes ``out``, ``write_kvcache`` the caches,
``merge_attention`` ``out`` and ``lse``). What ``torch.compile`` (and its CUDA graphs,
``mode="reduce-overhead"``) needs besides is a fake implementation per op, which gives the
shapes of the results without running anything; they are registered here, right after the
extension is loaded (``flash_gla._extension.load_extension``, which imports this module: this
one imports nothing of flash_gla's but the generated constants).

The public functions (``flash_gla.get_metadata``, ``gla_with_kvcache``, ``gta_with_kvcache``,
``write_kvcache``, ``merge_attention``) validate their arguments and call these ops, eagerly and
while being compiled. The ops trust their inputs: call them through the public functions, which
check everything (while compiling, all but the base-address alignment of the tensors and the
metadata's row count, which need values that tracing does not have).
"""

from __future__ import annotations

import functools

import torch

from flash_gla._instances import META_FIELDS

_registered = False


def register_fakes() -> None:
    """Register the fake implementations (once; the ops must exist, i.e. the extension is loaded)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("flash_gla::get_metadata")(_get_metadata_fake)
    torch.library.register_fake("flash_gla::decode")(_decode_fake)
    torch.library.register_fake("flash_gla::write_kvcache")(_returns_nothing)
    torch.library.register_fake("flash_gla::merge_attention")(_returns_nothing)
    _registered = True


@functools.lru_cache(maxsize=None)
def num_sm_parts(device_index: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """Scheduler parts (rows of tile_scheduler_metadata) that get_metadata plans on a device.

    Asks the op ``flash_gla::num_sm_parts``, so the extension must be loaded: the fakes run only
    after it is, and ``flash_gla._extension.num_sm_parts`` loads it first. Cached: a device's SM
    count does not change.
    """
    return torch.ops.flash_gla.num_sm_parts.default(device_index, num_q_tokens_per_head_k, num_heads_k)


def _get_metadata_fake(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, batch_invariant):
    """(tile_scheduler_metadata (num_parts (+ 1: batch-invariant), 8) int32, num_splits (b + 1,) int32)."""
    device = cache_seqlens.device.index if cache_seqlens.device.index is not None else torch.cuda.current_device()
    parts = num_sm_parts(device, num_q_tokens_per_head_k, num_heads_k) + int(batch_invariant)
    return (cache_seqlens.new_empty((parts, META_FIELDS)), cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,)))


def _decode_fake(q, kv_cache, rope_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                 num_splits, softmax_scale, causal, out, attn_sink, batch_invariant, kv_scale=None):
    """Writes ``out`` (b, s_q, h_q, head_dim_v); returns ``lse`` (b, h_q, s_q) float32."""
    batch, s_q, h_q, _ = q.shape
    return q.new_empty((batch, h_q, s_q), dtype=torch.float32)


def _returns_nothing(*args):
    """write_kvcache and merge_attention only write their mutable arguments."""
    return None


def compiling() -> bool:
    """Whether the caller is being traced by torch.compile."""
    return torch.compiler.is_compiling()
