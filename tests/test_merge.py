"""merge_attention's definition (flash_gla.reference) and argument checks, on CPU."""

import math

import pytest
import torch

import flash_gla
from flash_gla.reference import attention_ref, merge_attention_ref


def split_attention(seed, b=2, s_q=3, h_q=4, dv=16, n_keys=50, cut=20, causal=False):
    """(out, lse) over all keys, over keys[:cut] and over keys[cut:], in (b, s_q, h_q, dv) / (b, h_q, s_q)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s_q, h_q, dv, generator=gen, dtype=torch.float64)
    k = torch.randn(b, n_keys, h_q, dv, generator=gen, dtype=torch.float64)
    v = torch.randn(b, n_keys, h_q, dv, generator=gen, dtype=torch.float64)
    results = []
    for keys in (slice(None), slice(0, cut), slice(cut, None)):
        outs, lses = zip(*(attention_ref(q[i], k[i, keys], v[i, keys], causal, 0.3) for i in range(b)))
        results.append((torch.stack(outs).double(), torch.stack(lses).double()))
    return results


@pytest.mark.parametrize("cut", [1, 20, 49])
def test_merge_of_two_key_sets_is_attention_over_their_union(cut):
    (whole, whole_lse), (a, lse_a), (b, lse_b) = split_attention(seed=cut, cut=cut)
    out, lse = merge_attention_ref(a, lse_a, b, lse_b)
    # attention_ref computes in float32
    assert torch.allclose(out, whole, atol=1e-5) and torch.allclose(lse.double(), whole_lse, atol=1e-5)


def test_empty_parts():
    (_, _), (a, lse_a), (b, lse_b) = split_attention(seed=5)
    lse_a = lse_a.clone()
    lse_a[0, 1, :] = math.inf  # part A saw no key for these rows ...
    a = a.clone()
    a[0, :, 1, :] = math.nan  # ... and its out there must not leak
    out, lse = merge_attention_ref(a, lse_a, b, lse_b)
    assert torch.equal(out[0, :, 1], b[0, :, 1]) and torch.equal(lse[0, 1], lse_b[0, 1].float())
    both = torch.full_like(lse_a, math.inf)
    out, lse = merge_attention_ref(a.nan_to_num(), both, b, both)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isposinf(lse).all()


def cpu_args(dtype=torch.bfloat16):
    return (torch.zeros(2, 3, 4, 16, dtype=dtype), torch.zeros(2, 4, 3), torch.zeros(2, 3, 4, 16, dtype=dtype),
            torch.zeros(2, 4, 3))


@pytest.mark.parametrize(
    "index, bad, error, match",
    [
        (0, torch.zeros(2, 3, 4, 16, dtype=torch.int32), TypeError, r"out_a.dtype must be torch.bfloat16 or"),
        (2, torch.zeros(2, 3, 4, 16, dtype=torch.float16), TypeError, r"out_b.dtype must be torch.bfloat16 \(out_a's dtype\)"),
        (1, torch.zeros(2, 4, 3, dtype=torch.float64), TypeError, r"lse_a.dtype must be torch.float32"),
        (2, torch.zeros(2, 3, 4, 8, dtype=torch.bfloat16), ValueError, r"out_b.shape must equal out_a.shape \(2, 3, 4, 16\)"),
        (3, torch.zeros(2, 3, 4), ValueError, r"lse_b.shape must be \(b, h_q, s_q\) = \(2, 4, 3\)"),
        (1, torch.zeros(2, 3, 4).transpose(1, 2), ValueError, r"lse_a must be contiguous"),
        (0, [0.0], TypeError, r"out_a must be a torch.Tensor, got list"),
    ],
    ids=["out-dtype", "mixed-dtypes", "lse-dtype", "out-shape", "lse-shape", "lse-strided", "not-a-tensor"],
)
def test_bad_arguments_are_named(index, bad, error, match):
    args = list(cpu_args())
    args[index] = bad
    with pytest.raises(error, match=match):
        flash_gla.merge_attention(*args)


def test_good_cpu_arguments_reach_the_device_check():
    with pytest.raises(ValueError, match=r"out_a must be a CUDA tensor"):
        flash_gla.merge_attention(*cpu_args(), out=torch.zeros(2, 3, 4, 16, dtype=torch.bfloat16))
