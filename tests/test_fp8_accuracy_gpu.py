"""How close FP8-cache decode comes to exact attention, and a long-context retrieval check, on an
sm_90 GPU (skipped elsewhere, see conftest).

The bound (README, "Limits"; docs/fp8.md): against attention computed in float64 on the same
dequantised cache (``kv_cache[..., i] * kv_scale[..., i // 128]``) and the same q, the output's
relative error ``||out - ref|| / ||ref||`` is at most FP8_REL_BOUND (1e-2 for bf16 q, 2.5e-3
for fp16 q) and every row's LSE is within FP8_LSE_BOUND. The kernels round each dequantised value (or, for
GTA with few rows per KV head, each probability times its token's scale) and each probability to
a 16-bit type before its tensor-core MMAs (docs/fp8.md), and accumulate in float32; the
quantisation to e4m3 itself is the writer's (``write_kvcache``), not part of this error.

Retrieval: at 32K tokens, each query head's query is the key of one token (the needle, placed on
page edges, at both ends and at random) scaled to stand 25 above every other score; the output
must be that token's value. Two requests in the batch, so that each is split over several CTAs
and merged by the combine kernel.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import PAGE, assert_close, make_inputs

import flash_gla
from flash_gla.reference import dequantize_kv, gather_rows, gla_with_kvcache_ref, gta_with_kvcache_ref

pytestmark = pytest.mark.sm90

FP8_REL_BOUND = {torch.bfloat16: 1e-2, torch.float16: 2.5e-3}
FP8_LSE_BOUND = {torch.bfloat16: 2e-2, torch.float16: 5e-3}  # |lse - lse_ref|, natural log


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    h_q: int
    h_kv: int
    d: int  # latent (GLA) or tied-state (GTA) width
    d_rope: int

    @property
    def gta(self) -> bool:
        return self.name.startswith("gta")

    @property
    def q_dim(self) -> int:
        return self.d if self.gta else self.d + self.d_rope


SHAPES = [Shape("gla2", 128, 2, 256, 64), Shape("gta8", 32, 8, 128, 64), Shape("gta-d64", 16, 4, 64, 32)]


def inputs(shape: Shape, lengths: list[int], dtype: torch.dtype, s_q: int = 1, seed: int = 0):
    return make_inputs(len(lengths), s_q, shape.h_q, shape.h_kv, shape.d, shape.d_rope, lengths, dtype, "cuda",
                       seed, shared_rope=True, q_dim=shape.q_dim, kv_fp8=True)


def decode(shape: Shape, inp, causal: bool = False):
    meta, splits = flash_gla.get_metadata(inp.cache_seqlens, inp.q.shape[1] * shape.h_q // shape.h_kv, shape.h_kv)
    if shape.gta:
        return flash_gla.gta_with_kvcache(inp.q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens,
                                          meta, splits, causal=causal, kv_scale=inp.kv_scale)
    return flash_gla.gla_with_kvcache(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, shape.d, meta, splits,
                                      causal=causal, rope_cache=inp.rope_cache, kv_scale=inp.kv_scale)


def reference(shape: Shape, inp, q: torch.Tensor, causal: bool = False):
    if shape.gta:
        return gta_with_kvcache_ref(q, inp.kv_cache, inp.rope_cache, inp.block_table, inp.cache_seqlens,
                                    causal=causal, kv_scale=inp.kv_scale)
    return gla_with_kvcache_ref(q, inp.kv_cache, inp.block_table, inp.cache_seqlens, shape.d, causal=causal,
                                rope_cache=inp.rope_cache, kv_scale=inp.kv_scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("s_q", [1, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_fp8_error_against_float64(shape, s_q, dtype):
    """The documented bound, over lengths from one token to 20K (page edges and a split request)."""
    inp = inputs(shape, [1, 64, 65, 4113, 20_000], dtype, s_q, seed=s_q)
    out, lse = decode(shape, inp, causal=s_q > 1)
    ref, lse_ref = reference(shape, inp, inp.q.double(), causal=s_q > 1)
    assert ref.dtype == torch.float64 and lse_ref.dtype == torch.float64
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    seen = torch.isfinite(lse_ref)  # causal rows of a one-token request see no key: lse +inf, out 0
    assert torch.equal(torch.isfinite(lse), seen), "lse must be +inf exactly on the rows that see no key"
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    lse_err = (lse.double() - lse_ref)[seen].abs().max().item()
    tag = f"fp8-{shape.name}-sq{s_q}-{str(dtype)[6:]}"
    print(f"{tag}: relative error {rel:.2e} (bound {FP8_REL_BOUND[dtype]:.1e}), max |lse error| {lse_err:.2e}")
    assert rel <= FP8_REL_BOUND[dtype], f"[{tag}] relative error {rel:.3g} > {FP8_REL_BOUND[dtype]}"
    assert lse_err <= FP8_LSE_BOUND[dtype], f"[{tag}] max |lse - lse_ref| {lse_err:.3g} > {FP8_LSE_BOUND[dtype]}"


def needle_positions(length: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` key positions: both ends, page edges, then random ones."""
    edges = torch.tensor([0, length - 1, PAGE - 1, PAGE, length // 2, length - PAGE])
    rest = torch.randint(0, length, (max(0, count - len(edges)),), generator=gen)
    return torch.cat([edges, rest])[:count]


def dequantised_rows(inp, request: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (L, h_kv, d), RoPE keys (L, d_rope)) of one request, float32, as the kernel reads them."""
    length = inp.lengths[request]
    table = inp.block_table[request]
    rows = dequantize_kv(gather_rows(inp.kv_cache.view(torch.uint8), table, length).view(inp.kv_cache.dtype),
                         gather_rows(inp.kv_scale, table, length))
    return rows, gather_rows(inp.rope_cache, table, length)[:, 0].float()


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: s.name)
def test_fp8_long_context_retrieval(shape):
    """Each query head finds its one matching key among 32K and returns that key's value."""
    lengths = [32_768, 20_011]
    inp = inputs(shape, lengths, torch.bfloat16, seed=7)
    gen = torch.Generator().manual_seed(3)
    group = shape.h_q // shape.h_kv
    scale = shape.q_dim**-0.5
    gap = 25.0  # the needle's score over the others' typical ~1: e^-25 * 32K leaves it ~1 - 1e-6 of the weight
    q = torch.empty(len(lengths), 1, shape.h_q, shape.q_dim, dtype=torch.float32, device="cuda")
    want = []
    for i, length in enumerate(lengths):
        rows, rope = dequantised_rows(inp, i)
        needles = needle_positions(length, shape.h_q, gen)
        values = []
        for h in range(shape.h_q):
            t, j = int(needles[h]), h // group
            nope = rows[t, j, : shape.d - shape.d_rope] if shape.gta else rows[t, j]
            key = torch.cat([nope, rope[t]])
            q[i, 0, h] = key * (gap / scale / key.dot(key))  # q . key * scale = gap
            values.append(rows[t, j])
        want.append(torch.stack(values))
    inp = dataclasses.replace(inp, q=q.to(torch.bfloat16))
    out, lse = decode(shape, inp)
    ref, lse_ref = reference(shape, inp, inp.q.double())
    assert_close(out, ref.to(out.dtype), lse, lse_ref.float(), f"fp8-{shape.name}-needle", kv_fp8=True)
    for i in range(len(lengths)):
        got, expected = out[i, 0].float(), want[i]
        cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
        worst = int(cosine.argmin())
        rel = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()
        assert cosine[worst] > 0.999 and rel < 2e-2, (
            f"[fp8-{shape.name}-needle] request {i} (L {lengths[i]}): head {worst} returned a value with cosine "
            f"{cosine[worst].item():.4f} to its needle's; worst relative error {rel:.3g}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("magnitude", [2.0**-12, 2.0**-3, 2.0**10, 2.0**14],
                         ids=["scales-2^-12", "scales-2^-3", "scales-2^10", "scales-2^14"])
@pytest.mark.parametrize("shape,s_q", [(SHAPES[0], 1), (SHAPES[0], 4), (SHAPES[1], 1), (SHAPES[1], 2), (SHAPES[1], 4),
                                       (SHAPES[2], 1), (SHAPES[2], 4)],
                         ids=["gla2-sq1", "gla2-sq4", "gta8-sq1", "gta8-sq2", "gta8-sq4", "gta-d64-sq1", "gta-d64-sq4"])
def test_fp8_scales_of_any_magnitude(shape, s_q, magnitude, dtype):
    """The fp16 stages hold what fp16 can: GTA keeps each token's scale out of its stage and folds
    it into the probabilities, GLA gives each page a power of two that brings its values into
    fp16's range. The bound holds with scales far below the usual amax / 448 (products with P that
    fp16 could not hold unnormalised, pages whose values would be subnormal), far above it (values
    beyond fp16's 65,504), and with scales that differ between tokens of one request: by up to
    2^12 for GTA (times their own amax / 448: P times a token's scale must stay within fp16
    whichever token of the piece has the largest), and for GLA by up to 2 between tokens and 2
    between pages, so that the pages' powers of two change along it. (A GLA key's scores are
    rounded relative to the key's size: keys larger than the usual would make scores, and their
    rounding, larger too.) q's latent dims shrink as the cache grows, so that the scores stay as
    usual."""
    if dtype == torch.float16 and magnitude > 1:
        pytest.skip("values beyond 2^16: the output itself is beyond fp16")
    if shape.gta and magnitude > 2.0**10:
        pytest.skip("q's latent dims / 2^14 would fall below fp16's normal range, where GTA's kernels take them")
    inp = inputs(shape, [65, 4113, 20_000], dtype, s_q=s_q, seed=11)
    gen = torch.Generator(device="cuda").manual_seed(5)
    low, high = (-6.0, 6.0) if shape.gta else (-1.0, 0.0)
    spread = torch.exp2(torch.empty_like(inp.kv_scale).uniform_(low, high, generator=gen).round())
    if not shape.gta:
        pages = inp.kv_scale.shape[0]
        spread *= torch.exp2(torch.empty(pages, 1, 1, 1, device="cuda").uniform_(-1.0, 0.0, generator=gen).round())
    inp.kv_scale.mul_(spread * magnitude)
    inp.q[..., : shape.d - shape.d_rope if shape.gta else shape.d].div_(magnitude)
    out, lse = decode(shape, inp, causal=s_q > 1)
    ref, lse_ref = reference(shape, inp, inp.q.double(), causal=s_q > 1)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    lse_err = (lse.double() - lse_ref).abs().max().item()
    tag = f"fp8-{shape.name}-sq{s_q}-scale{magnitude:g}-{str(dtype)[6:]}"
    print(f"{tag}: relative error {rel:.2e} (bound {FP8_REL_BOUND[dtype]:.1e}), max |lse error| {lse_err:.2e}")
    assert rel <= FP8_REL_BOUND[dtype], f"[{tag}] relative error {rel:.3g} > {FP8_REL_BOUND[dtype]}"
    assert lse_err <= FP8_LSE_BOUND[dtype], f"[{tag}] max |lse - lse_ref| {lse_err:.3g} > {FP8_LSE_BOUND[dtype]}"
