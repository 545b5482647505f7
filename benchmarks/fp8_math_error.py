"""How much accuracy FP8 tensor-core math would cost an FP8 cache: a model on the CPU.

An FP8 MMA multiplies e4m3 by e4m3. The cache is e4m3 already, but Q (for S = Q K^T) and P (for
O = P V, with each token's scale folded into P) would have to be rounded to e4m3 too, which keeps
4 significant bits of a value against bf16's 8 and fp16's 11. This script computes one GLA-2 KV
head's attention (64 query rows, latent 256 in two scale groups, RoPE 64, the test suite's data:
normal values, each 128-value group scaled by 2^k, k in -2..1) in float64 from the same e4m3
cache, with each operand rounded as a kernel would round it, and prints the relative error of the
output against exact attention on the dequantised cache: the quantity that the FP8 bound in the
README limits (1e-2 for bf16 q, 2.5e-3 for fp16 q).

Rounding modelled (sums are exact: the tensor core's own FP8 accumulation, which keeps fewer
bits than float32, is not):
  fp16 stage    today's GLA kernels: each value and each probability rounded to fp16
  Q e4m3        Q's latent dims as one e4m3 value each (a power-of-two scale per row)
  Q e4m3 x2     Q as the sum of two e4m3 values (the second rounds the first one's remainder):
                two FP8 MMAs, the tensor-core time of one 16-bit MMA
  P e4m3        each token's probability times its group's scale, over the page's largest
                scale, as one e4m3 value (per page of 64 tokens and scale group)
  P e4m3 x2     the same as the sum of two e4m3 values

    python benchmarks/fp8_math_error.py [--tokens 64 1024 8192] [--trials 3]
"""

from __future__ import annotations

import argparse
import math

import torch

from flash_gla.reference import quantize_kv_ref

E4M3_MAX = 448.0
PAGE = 64
GROUP = 128


def e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float64)


def e4m3_terms(x: torch.Tensor, terms: int) -> torch.Tensor:
    """x as a sum of `terms` e4m3 values, each with a power-of-two scale per row."""
    total = torch.zeros_like(x)
    for _ in range(terms):
        rest = x - total
        amax = rest.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
        scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))
        total = total + e4m3(rest / scale) * scale
    return total


def fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float64)


def one_head(tokens: int, q_dtype: torch.dtype, gen: torch.Generator, rows: int = 64, d: int = 256,
             d_rope: int = 64) -> dict[str, float]:
    q = torch.randn(rows, d + d_rope, generator=gen).to(q_dtype).to(torch.float64)
    latent = torch.randn(tokens, d, generator=gen).to(q_dtype).float()
    k = torch.randint(-2, 2, (tokens, d // GROUP), generator=gen).float()
    latent = latent * torch.exp2(k).repeat_interleave(GROUP, dim=1)
    values, scales = quantize_kv_ref(latent)
    kv8 = values.to(torch.float64)                     # (tokens, d), e4m3 values
    scales = scales.to(torch.float64)                  # (tokens, 2)
    kv = kv8 * scales.repeat_interleave(GROUP, dim=1)  # dequantised: what the reference reads
    rope = torch.randn(tokens, d_rope, generator=gen).to(q_dtype).to(torch.float64)
    softmax_scale = 1.0 / math.sqrt(d + d_rope)

    def probabilities(q_latent: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        s = (q_latent @ keys.T + q[:, d:] @ rope.T) * softmax_scale
        return torch.exp(s - s.amax(dim=-1, keepdim=True))

    def pv_e4m3(p: torch.Tensor, terms: int) -> torch.Tensor:
        out = torch.zeros(rows, d, dtype=torch.float64)
        for first in range(0, tokens, PAGE):
            for g in range(d // GROUP):
                sc = scales[first:first + PAGE, g]
                largest = sc.max()
                p8 = e4m3_terms(p[:, first:first + PAGE] * (sc / largest), terms)
                out[:, g * GROUP:(g + 1) * GROUP] += largest * (p8 @ kv8[first:first + PAGE, g * GROUP:(g + 1) * GROUP])
        return out

    p_exact = probabilities(q[:, :d], kv)
    ref = (p_exact @ kv) / p_exact.sum(-1, keepdim=True)
    kv16 = fp16(kv8 * fp16(scales).repeat_interleave(GROUP, dim=1))
    p16 = probabilities(fp16(q[:, :d]), kv16)
    p_q1 = probabilities(e4m3_terms(q[:, :d], 1), kv)
    p_q2 = probabilities(e4m3_terms(q[:, :d], 2), kv)
    outputs = {
        "fp16 stage": (fp16(p16) @ kv16) / p16.sum(-1, keepdim=True),
        "Q e4m3": (p_q1 @ kv) / p_q1.sum(-1, keepdim=True),
        "Q e4m3 x2": (p_q2 @ kv) / p_q2.sum(-1, keepdim=True),
        "P e4m3": pv_e4m3(p_exact, 1) / p_exact.sum(-1, keepdim=True),
        "P e4m3 x2": pv_e4m3(p_exact, 2) / p_exact.sum(-1, keepdim=True),
        "Q, P e4m3": pv_e4m3(p_q1, 1) / p_q1.sum(-1, keepdim=True),
        "Q, P e4m3 x2": pv_e4m3(p_q2, 2) / p_q2.sum(-1, keepdim=True),
    }
    return {name: ((out - ref).norm() / ref.norm()).item() for name, out in outputs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 1024, 8192])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    for q_dtype in (torch.bfloat16, torch.float16):
        print(f"q {str(q_dtype).removeprefix('torch.')}: largest relative error of out over {args.trials} heads")
        rows: dict[str, list[float]] = {}
        for tokens in args.tokens:
            worst: dict[str, float] = {}
            for _ in range(args.trials):
                for name, err in one_head(tokens, q_dtype, gen).items():
                    worst[name] = max(worst.get(name, 0.0), err)
            for name, err in worst.items():
                rows.setdefault(name, []).append(err)
        print(f"  {'rounding':<14}" + "".join(f"{t:>10} tok" for t in args.tokens))
        for name, errs in rows.items():
            print(f"  {name:<14}" + "".join(f"{e:>14.1e}" for e in errs))


if __name__ == "__main__":
    main()
