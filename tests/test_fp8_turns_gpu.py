"""FP8 page turns under load on an sm_90 GPU (skipped elsewhere, see conftest).

GLA-2 with an e4m3 cache and RoPE stored once, the shape where a warpgroup once took a page
before it landed (test_page_turns_model.py): batch 128 x 32K tokens at s_q 1 keeps every SM's
two consumer warpgroups and its producer busy for ~1 ms a call, and a late TMA then shows as a
hang or as a call whose output differs. A thousand calls in a child process (a hang fails the
test at its timeout instead of stopping the suite), every output bit-identical to the first.
"""

import subprocess
import sys
import textwrap

import pytest

CALLS = 1000
TIMEOUT_S = 180

CHILD = textwrap.dedent(f"""
    import torch, flash_gla
    from flash_gla.reference import quantize_kv_ref
    torch.manual_seed(0)
    b, length, h_q, h_kv, dv, d_rope = 128, 32768, 128, 2, 256, 64
    pages = length // 64
    num_blocks = b * pages
    kv = torch.empty(num_blocks, 64, h_kv, dv, dtype=torch.float8_e4m3fn, device="cuda")
    kv_scale = torch.empty(num_blocks, 64, h_kv, dv // 128, device="cuda")
    for start in range(0, num_blocks, 1024):
        values, scales = quantize_kv_ref(torch.randn(min(1024, num_blocks - start), 64, h_kv, dv, device="cuda"))
        kv[start:start + len(values)].view(torch.uint8).copy_(values.view(torch.uint8))
        kv_scale[start:start + len(values)] = scales
    rope = torch.randn(num_blocks, 64, 1, d_rope, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(b, 1, h_q, dv + d_rope, dtype=torch.bfloat16, device="cuda")
    block_table = torch.randperm(num_blocks, device="cuda").int().view(b, pages)
    seqlens = torch.full((b,), length, dtype=torch.int32, device="cuda")
    meta, splits = flash_gla.get_metadata(seqlens, h_q // h_kv, h_kv)

    def call():
        return flash_gla.gla_with_kvcache(q, kv, block_table, seqlens, dv, meta, splits, rope_cache=rope,
                                          kv_scale=kv_scale)[0]

    first = call().clone()
    assert torch.isfinite(first).all()
    differing = 0
    for i in range(1, {CALLS}):
        out = call()
        if i % 50 == 0:
            differing += int(not torch.equal(out, first))
    torch.cuda.synchronize()
    print("calls", {CALLS}, "differing", differing)
""")


@pytest.mark.sm90
def test_fp8_page_turns_a_thousand_calls_at_32k():
    try:
        done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{CALLS} calls of GLA-2 FP8 32K x 128 did not finish in {TIMEOUT_S} s (a hang)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"calls {CALLS} differing 0" in done.stdout, done.stdout + done.stderr[-2000:]
