"""merge_attention's kernel against flash_gla.reference on an sm_90 GPU, and against the
decode over the union of two page sets."""

import math

import pytest
import torch
from helpers import assert_close, capture_graph, make_inputs

import flash_gla
from flash_gla.reference import merge_attention_ref

pytestmark = pytest.mark.sm90


def partials(dtype, b=5, s_q=2, h_q=16, dv=512, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out_a = torch.randn(b, s_q, h_q, dv, generator=gen, device="cuda").to(dtype)
    out_b = torch.randn(b, s_q, h_q, dv, generator=gen, device="cuda").to(dtype)
    lse_a = torch.randn(b, h_q, s_q, generator=gen, device="cuda") * 4
    lse_b = torch.randn(b, h_q, s_q, generator=gen, device="cuda") * 4
    lse_a[0, :3] = math.inf  # A empty on some rows (its out poisoned there) ...
    out_a[0, :, :3] = math.nan
    lse_b[1, 2:5] = math.inf  # ... B on others, both on one
    lse_a[1, 4] = math.inf
    out_a[1, :, 4] = 0
    return out_a, lse_a, out_b, lse_b


@pytest.mark.parametrize("dv", [512, 256, 100])  # 100: not whole 16-byte vectors
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_kernel_matches_reference(dtype, dv):
    out_a, lse_a, out_b, lse_b = partials(dtype, dv=dv)
    out, lse = flash_gla.merge_attention(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = merge_attention_ref(out_a, lse_a, out_b, lse_b)
    assert not torch.isnan(out).any(), "NaN leaked from an empty part"
    assert torch.allclose(out.float(), ref.float(), atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = ~torch.isinf(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)


def test_in_place_and_graph_replay():
    out_a, lse_a, out_b, lse_b = partials(torch.bfloat16, seed=3)
    ref, ref_lse = merge_attention_ref(out_a, lse_a, out_b, lse_b)
    graph, (out, lse) = capture_graph(lambda: flash_gla.merge_attention(out_a, lse_a, out_b, lse_b, out=out_a,
                                                                       lse=lse_a))
    assert out.data_ptr() == out_a.data_ptr() and lse.data_ptr() == lse_a.data_ptr()
    fresh = partials(torch.bfloat16, seed=3)  # the capture's warm-up merged in place already
    out_a.copy_(fresh[0]), lse_a.copy_(fresh[1])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out_a.float(), ref.float(), atol=2e-2, rtol=1e-2)
    finite = ~torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse_a), torch.isinf(ref_lse))
    assert torch.allclose(lse_a[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)


def test_merge_of_two_page_sets_is_decode_over_all_pages():
    """Context parallelism: each part holds every other page of a request (two block tables over
    one cache); merging the two decodes gives the decode over all pages."""
    lengths = [64 * 6, 64 * 9 + 7, 64 * 4]
    inp = make_inputs(3, 1, 128, 1, 512, 64, lengths, torch.bfloat16, "cuda", 7)
    n_pages = [-(-n // 64) for n in lengths]
    results = []
    for parity in (0, 1):  # part `parity` holds pages parity, parity + 2, ...
        table = torch.full_like(inp.block_table, -1)
        seqlens = []
        for i, n in enumerate(lengths):
            own = list(range(parity, n_pages[i], 2))
            table[i, : len(own)] = inp.block_table[i, own]
            # Every page of a part is whole except the request's last page, if the part holds it.
            last = n_pages[i] - 1
            seqlens.append(sum(64 if p != last else n - 64 * last for p in own))
        seqlens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
        meta, splits = flash_gla.get_metadata(seqlens, 128, 1)
        results.append(flash_gla.gla_with_kvcache(inp.q, inp.kv_cache, table, seqlens, 512, meta, splits))
    (out_a, lse_a), (out_b, lse_b) = results
    out, lse = flash_gla.merge_attention(out_a, lse_a, out_b, lse_b)
    meta, splits = flash_gla.get_metadata(inp.cache_seqlens, 128, 1)
    whole, whole_lse = flash_gla.gla_with_kvcache(inp.q, inp.kv_cache, inp.block_table, inp.cache_seqlens, 512, meta,
                                                  splits)
    assert_close(out, whole, lse, whole_lse, "merge of even and odd pages")
