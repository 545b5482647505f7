"""flash_gla in one page: GLA and GTA decode over a paged KV cache, checked against the reference.

    python examples/quickstart.py        (after the README's install command)

Builds a small paged cache whose pages lie in random order (a shuffled block table), plans
the decode step with ``get_metadata`` in both forms (classic: tensors shared by calls with
the same KV heads; lazy: ``get_metadata()`` -> ``(SchedulerMetadata, None)``), runs
``gla_with_kvcache`` with the RoPE key inline and stored once (``rope_cache=``) and
``gta_with_kvcache``, and prints each one's largest error against ``flash_gla.reference``.

Without an sm_90 GPU (H100 / H200) it computes the reference results only, says so and
exits 0. The code between the two "README" marker lines, less the part marked "script
only", is the README's Usage example (tests/test_quickstart.py checks that they agree).
"""

import sys

import torch


def sm90_missing():
    """Why the kernels cannot run here, or None if they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"the GPU is sm_{major}{minor}"
    return None


missing = sm90_missing()

# ---- README Usage: begin ----
import torch
import flash_gla
from flash_gla.reference import gla_with_kvcache_ref, gta_with_kvcache_ref

torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"  # the reference runs anywhere, the kernels on sm_90
dtype, page = torch.bfloat16, 64
b, s_q, h_q = 2, 2, 16  # 2 requests, 2 query tokens each (e.g. speculative decoding), 16 query heads
cache_seqlens = torch.tensor([300, 77], dtype=torch.int32, device=dev)  # tokens cached per request
# block_table[i, p]: the cache page holding tokens 64p .. 64p+63 of request i, pages in random order
max_pages = 8
num_blocks = b * max_pages
block_table = torch.randperm(num_blocks, device=dev).to(torch.int32).reshape(b, max_pages)


def randn(*shape):
    return torch.randn(*shape, dtype=dtype, device=dev)


# GLA-2: 2 latent heads of 256 dims; RoPE inline (each cached row: 256 latent + 64 RoPE dims) ...
q = randn(b, s_q, h_q, 256 + 64)
kv_cache = randn(num_blocks, page, 2, 256 + 64)
# ... or the RoPE key stored once per token for both heads (rope_cache)
latent_cache, rope_cache = randn(num_blocks, page, 2, 256), randn(num_blocks, page, 1, 64)
# GTA-4: 4 tied states of 128 dims (all of V, the first 64 dims of K) + the shared RoPE key
q_gta, tied_cache = randn(b, s_q, h_q, 128), randn(num_blocks, page, 4, 128)

expected = {
    "gla, RoPE inline": gla_with_kvcache_ref(q, kv_cache, block_table, cache_seqlens, 256, causal=True),
    "gla, rope_cache": gla_with_kvcache_ref(q, latent_cache, block_table, cache_seqlens, 256, causal=True,
                                            rope_cache=rope_cache),
    "gta": gta_with_kvcache_ref(q_gta, tied_cache, rope_cache, block_table, cache_seqlens, causal=True),
}
# ---- script only, not in the README: begin ----
if missing is not None:
    for name, (ref_out, ref_lse) in expected.items():
        print(f"{name:17s} reference only: out {tuple(ref_out.shape)}, lse {tuple(ref_lse.shape)}")
    print(f"no sm_90 GPU here ({missing}): ran the reference only; the kernels need an H100 or H200")
    sys.exit(0)
# ---- script only, not in the README: end ----

# Classic metadata: once per decode step, reused by every call with the same h_kv (2 here)
meta, num_splits = flash_gla.get_metadata(cache_seqlens, s_q * h_q // 2, 2)
got = {
    "gla, RoPE inline": flash_gla.gla_with_kvcache(q, kv_cache, block_table, cache_seqlens, 256,
                                                   meta, num_splits, causal=True),
    "gla, rope_cache": flash_gla.gla_with_kvcache(q, latent_cache, block_table, cache_seqlens, 256,
                                                  meta, num_splits, causal=True, rope_cache=rope_cache),
}
# Lazy metadata (FlashMLA's current form): the first decode call fills it for its shapes
gta_meta, _ = flash_gla.get_metadata()
got["gta"] = flash_gla.gta_with_kvcache(q_gta, tied_cache, rope_cache, block_table, cache_seqlens,
                                        gta_meta, None, causal=True)
for name, (out, lse) in got.items():
    ref_out, ref_lse = expected[name]
    err = (out.float() - ref_out.float()).abs().max().item()
    rel = err / ref_out.float().abs().max().item()
    print(f"{name:17s} max |out - ref| {err:.1e} (relative {rel:.1e}), "
          f"max |lse - ref| {(lse - ref_lse).abs().max().item():.1e}")
# ---- README Usage: end ----
