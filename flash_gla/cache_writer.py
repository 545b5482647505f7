"""The paged-cache writer: a step's new tokens into the KV cache that the decode ops read.

:func:`write_kvcache` follows vLLM's convention (its ``concat_and_cache_mla(kv_c, k_pe,
kv_cache, slot_mapping, kv_cache_dtype, scale)``): token ``t`` goes to slot
``slot_mapping[t]``, which is row ``slot % 64`` of page ``slot // 64``. One kernel launch, no
host synchronisation: CUDA-graph safe. ``flash_gla.reference.write_kvcache_ref`` defines the
semantics.

With a float8_e4m3fn cache the writer quantises (``flash_gla.reference.quantize_kv_ref``, bit
for bit): per token, KV head and 128 values, ``scale = amax / 448`` (at least 2^-126, 1 for a
group of zeros) goes to ``kv_scale`` and ``value * (1 / scale)``, rounded to nearest e4m3 and
saturated at +-448, to ``kv_cache``.

Every input is checked here, in the order of the decode checks (``flash_gla._call``: types,
dtypes, ranks and shapes, strides and alignment, device), before the extension is touched;
slot values are not (that would read them on the host): the kernel skips a slot outside
``[0, num_blocks * 64)``.
"""

from __future__ import annotations

import torch

from flash_gla import _library, _validation
from flash_gla._extension import load_extension
from flash_gla._instances import PAGE_SIZE
from flash_gla._validation import FP8_DTYPE, HALF_DTYPES, expect_at_least, expect_dtype, expect_rank, expect_tensor

__all__ = ["write_kvcache"]

#: Values an FP8 write moves per lane at the least (the kernel's 128-value scale groups must lie
#: in one warp): every address, stride and width of its tensors is a multiple of it.
FP8_MIN_VECTOR = 4


def write_kvcache(
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv: torch.Tensor,
    rope: torch.Tensor | None = None,
    rope_cache: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Write ``T`` new tokens into a paged KV cache, in place (vLLM's ``concat_and_cache_mla``).

    Token ``t`` goes to slot ``s = slot_mapping[t]``: row ``s % 64`` of page ``s // 64``. A
    negative slot (a padding token) is skipped, and so is a slot ``>= num_blocks * 64`` (out of
    range: nothing is written out of bounds; the slots are not checked on the host, which would
    synchronise). Slots should be distinct: of two tokens with the same slot, either may land.

    Layouts (the decode ops' caches):

    * Inline RoPE (GLA, MLA; ``rope_cache`` None): ``kv_cache[s, j] = concat(kv[t, j], rope[t])``
      for every KV head ``j``. With ``rope`` None too, ``kv`` holds whole cache rows.
    * RoPE stored once (GLA with a rope cache, GTA): ``kv_cache[s, j] = kv[t, j]`` and
      ``rope_cache[s, 0] = rope[t]``; ``rope`` is required.
    * FP8 (``kv_cache`` float8_e4m3fn, RoPE stored once only): ``kv_cache[s, j]`` and
      ``kv_scale[s, j]`` get ``kv[t, j]`` quantised per 128 values
      (``flash_gla.reference.quantize_kv_ref``, bit for bit), ``rope_cache[s, 0] = rope[t]``
      unquantised. A NaN or infinity in ``kv`` raises nothing: it makes its group's scale NaN or
      inf, so the whole 128-value group reads back as NaN.

    Args:
        kv_cache: (num_blocks, 64, h_kv, d) bfloat16, float16 or float8_e4m3fn, CUDA; last dim
            contiguous, any other strides (e.g. a slice of a larger allocation).
            ``d = d_kv + d_rope`` inline, ``d = d_kv`` with a ``rope_cache``.
        slot_mapping: (T,) int64, same device: the slot of each token.
        kv: (T, h_kv, d_kv) kv_cache's dtype (bfloat16 or float16 with an FP8 cache), last dim
            contiguous: the new latents (GLA, MLA) or tied states (GTA), one row per KV head.
        rope: (T, d_rope) kv's dtype, last dim contiguous, or None: the new RoPE keys, one per
            token (shared by the KV heads).
        rope_cache: (num_blocks, 64, 1, d_rope) kv's dtype, last dim contiguous, or None for
            inline RoPE (required with an FP8 cache).
        kv_scale: (num_blocks, 64, h_kv, ceil(d / 128)) float32, any strides, with a
            float8_e4m3fn kv_cache (required), else None: the scales, one per token, KV head
            and 128 values. An FP8 write also needs every address, every stride of a dim longer
            than 1 and d_kv, d_rope of kv, rope, kv_cache and rope_cache to be multiples of 4
            elements.

    Returns:
        None; ``kv_cache`` (and ``rope_cache``) are written in place.

    Raises:
        TypeError / ValueError naming the argument, what was expected and what was given.
    """
    _check_inputs(kv_cache, slot_mapping, kv, rope, rope_cache, kv_scale)
    # torch.ops.flash_gla.write_kvcache, whose schema declares that it writes the caches (and kv_scale).
    load_extension().write_kvcache.default(kv_cache, slot_mapping, kv, rope, rope_cache, kv_scale)


def _check_inputs(kv_cache, slot_mapping, kv, rope, rope_cache, kv_scale) -> None:
    """Every check of :func:`write_kvcache`'s inputs; the device last, so that the rest runs on CPU."""
    tensors = {"kv_cache": kv_cache, "slot_mapping": slot_mapping, "kv": kv, "rope": rope, "rope_cache": rope_cache,
               "kv_scale": kv_scale}
    # Types.
    expect_tensor("kv_cache", kv_cache, hint="(num_blocks, 64, h_kv, d)")
    expect_tensor("slot_mapping", slot_mapping, hint="(T,) int64")
    expect_tensor("kv", kv, hint="(T, h_kv, d_kv)")
    fp8 = kv_cache.dtype == FP8_DTYPE
    if fp8:
        expect_tensor("rope_cache", rope_cache, hint="(num_blocks, 64, 1, d_rope) (required with an FP8 kv_cache: "
                      "FP8 stores the RoPE key once, unquantised; there is no inline-RoPE FP8 layout)")
    _validation.expect_kv_scale(kv_scale, kv_cache, fp8)
    if rope_cache is not None:
        expect_tensor("rope_cache", rope_cache, hint="(num_blocks, 64, 1, d_rope) or None")
        expect_tensor("rope", rope, hint="(T, d_rope) (required with a rope_cache)")
    elif rope is not None:
        expect_tensor("rope", rope, hint="(T, d_rope) or None")
    # Dtypes: kv, rope and rope_cache share one bf16 / fp16 dtype, which is kv_cache's unless FP8.
    expect_dtype("kv_cache", kv_cache, HALF_DTYPES + (FP8_DTYPE,))
    expect_dtype("slot_mapping", slot_mapping, torch.int64)
    if fp8:
        expect_dtype("kv", kv, HALF_DTYPES)
        expect_dtype("kv_scale", kv_scale, torch.float32)
    for name in ("kv", "rope", "rope_cache"):
        if tensors[name] is not None:
            expect_dtype(name, tensors[name], kv.dtype if fp8 else kv_cache.dtype,
                         what="kv's dtype" if fp8 else "kv_cache's dtype")
    # Ranks and shapes.
    for name, rank in (("kv_cache", 4), ("slot_mapping", 1), ("kv", 3), ("rope", 2), ("rope_cache", 4),
                       ("kv_scale", 4)):
        if tensors[name] is not None:
            expect_rank(name, tensors[name], rank)
    num_blocks, _, h_kv, cache_dim = kv_cache.shape
    _validation.expect_paged_cache(kv_cache)
    num_tokens = slot_mapping.shape[0]
    if tuple(kv.shape[:2]) != (num_tokens, h_kv):
        raise ValueError(
            f"kv.shape[:2] must be (T, h_kv) = ({num_tokens}, {h_kv}) (slot_mapping.shape[0], "
            f"kv_cache.shape[2]), got {tuple(kv.shape[:2])}"
        )
    d_kv = kv.shape[2]
    expect_at_least("kv.shape[2] (d_kv)", d_kv, 1)
    d_rope = 0
    if rope is not None:
        if rope.shape[0] != num_tokens:
            raise ValueError(
                f"rope.shape[0] must equal slot_mapping.shape[0] (T) = {num_tokens}, got {rope.shape[0]}"
            )
        d_rope = rope.shape[1]
        expect_at_least("rope.shape[1] (d_rope)", d_rope, 1)
    if rope_cache is not None:
        expected = (num_blocks, PAGE_SIZE, 1, d_rope)
        if tuple(rope_cache.shape) != expected:
            raise ValueError(
                f"rope_cache.shape must be (num_blocks, 64, 1, d_rope) = {expected} (num_blocks of kv_cache, "
                f"d_rope of rope), got {tuple(rope_cache.shape)}"
            )
        if cache_dim != d_kv:
            raise ValueError(
                f"kv_cache.shape[3] must equal kv.shape[2] (d_kv) = {d_kv} with a rope_cache (the RoPE "
                f"keys go to rope_cache), got {cache_dim}"
            )
    elif rope is not None:
        if cache_dim != d_kv + d_rope:
            raise ValueError(
                f"kv_cache.shape[3] must equal kv.shape[2] + rope.shape[1] (d_kv + d_rope) = {d_kv} + "
                f"{d_rope} = {d_kv + d_rope} (inline RoPE), got {cache_dim}"
            )
    elif cache_dim != d_kv:
        raise ValueError(
            f"kv_cache.shape[3] must equal kv.shape[2] = {d_kv} (rope is None: kv holds whole cache "
            f"rows), got {cache_dim}"
        )
    if fp8:
        _validation.expect_kv_scale_shape(kv_scale, kv_cache)
        for name, width in (("kv.shape[2] (d_kv)", d_kv), ("rope.shape[1] (d_rope)", d_rope)):
            if width % FP8_MIN_VECTOR != 0:
                raise ValueError(
                    f"{name} must be a multiple of {FP8_MIN_VECTOR} with an FP8 kv_cache (written "
                    f"{FP8_MIN_VECTOR} or 8 values at a time), got {width}"
                )
    # Strides (and, for an FP8 write, alignment).
    for name in ("kv_cache", "kv", "rope", "rope_cache"):
        if tensors[name] is not None:
            _validation.expect_unit_last_stride(name, tensors[name])
            if fp8:
                _expect_fp8_aligned(name, tensors[name])
    _validation.expect_one_cuda_device(list(tensors.items()))  # kv_cache's, the device last


def _expect_fp8_aligned(name: str, x: torch.Tensor) -> None:
    """An FP8 write's tensor: every stride of a dim longer than 1 and the base address a multiple
    of FP8_MIN_VECTOR elements (the address is not checked while tracing: it has none)."""
    for dim in range(x.dim() - 1):
        if x.shape[dim] > 1 and x.stride(dim) % FP8_MIN_VECTOR != 0:
            raise ValueError(
                f"{name}.stride({dim}) must be a multiple of {FP8_MIN_VECTOR} elements with an FP8 kv_cache "
                f"(written {FP8_MIN_VECTOR} or 8 values at a time), got {x.stride(dim)}"
            )
    align = FP8_MIN_VECTOR * x.element_size()
    if not _library.compiling() and x.data_ptr() % align != 0:
        raise ValueError(
            f"{name}.data_ptr() must be {align}-byte aligned ({FP8_MIN_VECTOR} elements) with an FP8 kv_cache, "
            f"got address {x.data_ptr():#x} (offset {x.data_ptr() % align})"
        )
