"""Host time per eager call: what an engine pays in Python and launches, per layer and step.

Engines run eager decode too (batches larger than their captured graphs), where the host time
of every call adds up over layers. Measured here on a problem so small (one request, one page,
16 query heads) that the GPU never falls behind: the wall time of N calls in a row, divided by
N, is the host time of one call. Every argument is still validated on each call.

    python benchmarks/bench_host_overhead.py [--calls 2000] [--out DIR]

Rows: flash_gla's get_metadata, gla_with_kvcache (classic metadata; RoPE inline and stored
once), the lazy-metadata form, gta_with_kvcache, write_kvcache, and FlashMLA's
get_mla_metadata + flash_mla_with_kvcache in the same process when importable. The length
check that syncs with the host (flash_gla.ops.CHECK_LENGTHS, off by default) is timed too.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import load_flashmla, unavailable_reason  # noqa: E402

PAGE = 64


def per_call_us(fn, calls, repeats=5):
    """Median over `repeats` of the wall time of `calls` back-to-back calls, per call."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def problem(h_q, h_kv, kv_dim, d_qk, d_rope=None, s_q=1, dtype=torch.bfloat16):
    dev = "cuda"
    t = dict(
        q=torch.randn(1, s_q, h_q, d_qk, dtype=dtype, device=dev),
        kv=torch.randn(4, PAGE, h_kv, kv_dim, dtype=dtype, device=dev),
        block_table=torch.arange(4, dtype=torch.int32, device=dev).reshape(1, 4),
        seqlens=torch.tensor([PAGE], dtype=torch.int32, device=dev),
    )
    t["rope"] = None if d_rope is None else torch.randn(4, PAGE, 1, d_rope, dtype=dtype, device=dev)
    return t


def rows(calls):
    import flash_gla
    import flash_gla.ops

    h_q, s_q = 16, 1
    gla = problem(h_q, 2, 320, 320)
    rope1 = problem(h_q, 2, 256, 320, d_rope=64)
    gta = problem(h_q, 8, 128, 128, d_rope=64)
    meta, splits = flash_gla.get_metadata(gla["seqlens"], s_q * h_q // 2, 2)
    gta_meta, gta_splits = flash_gla.get_metadata(gta["seqlens"], s_q * h_q // 8, 8)

    def gla_call(t=gla, rope=None):
        return flash_gla.gla_with_kvcache(t["q"], t["kv"], t["block_table"], t["seqlens"], 256, meta, splits,
                                          causal=True, rope_cache=rope)

    def lazy_call():
        lazy, _ = flash_gla.get_metadata()
        return flash_gla.gla_with_kvcache(gla["q"], gla["kv"], gla["block_table"], gla["seqlens"], 256, lazy,
                                          None, causal=True)

    slots = torch.arange(h_q, dtype=torch.int64, device="cuda")
    new_kv = torch.randn(h_q, 2, 256, dtype=torch.bfloat16, device="cuda")
    new_rope = torch.randn(h_q, 64, dtype=torch.bfloat16, device="cuda")
    measured = {
        "get_metadata": lambda: flash_gla.get_metadata(gla["seqlens"], s_q * h_q // 2, 2),
        "gla_with_kvcache (inline RoPE)": gla_call,
        "gla_with_kvcache (RoPE stored once)": lambda: gla_call(rope1, rope1["rope"]),
        "gla_with_kvcache (lazy metadata, new each call)": lazy_call,
        "gta_with_kvcache": lambda: flash_gla.gta_with_kvcache(gta["q"], gta["kv"], gta["rope"],
                                                               gta["block_table"], gta["seqlens"], gta_meta,
                                                               gta_splits, causal=True),
        "write_kvcache (RoPE stored once)": lambda: flash_gla.write_kvcache(
            rope1["kv"], slots, new_kv, rope=new_rope, rope_cache=rope1["rope"]),
    }
    out = []
    for name, fn in measured.items():
        out.append(dict(name=name, us=per_call_us(fn, calls)))
    flash_gla.ops.CHECK_LENGTHS = True
    try:
        out.append(dict(name="gla_with_kvcache with CHECK_LENGTHS=True (host sync)", us=per_call_us(gla_call, calls)))
    finally:
        flash_gla.ops.CHECK_LENGTHS = False

    flashmla = load_flashmla()
    if flashmla is None:
        print("FlashMLA not importable: its rows are skipped")
    else:
        get_mla_metadata, flash_mla_with_kvcache = flashmla
        mla = problem(h_q, 1, 576, 576)
        fmeta, fsplits = get_mla_metadata(mla["seqlens"], s_q * h_q, 1)
        out.append(dict(name="FlashMLA get_mla_metadata",
                        us=per_call_us(lambda: get_mla_metadata(mla["seqlens"], s_q * h_q, 1), calls)))
        out.append(dict(name="FlashMLA flash_mla_with_kvcache", us=per_call_us(
            lambda: flash_mla_with_kvcache(mla["q"], mla["kv"], mla["block_table"], mla["seqlens"], 512, fmeta,
                                           fsplits, causal=True), calls)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"bench_host_overhead: nothing to measure here: {reason}")
        return
    results = rows(args.calls)
    fmla = {r["name"]: r["us"] for r in results}.get("FlashMLA flash_mla_with_kvcache")
    print(f"\nhost time per eager call ({torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"median of 5 x {args.calls} calls)\n")
    print("| call | µs per call | vs FlashMLA's decode call |")
    print("|---|---|---|")
    for r in results:
        ratio = f"{r['us'] / fmla:.2f}×" if fmla and "FlashMLA" not in r["name"] else "-"
        print(f"| {r['name']} | {r['us']:.1f} | {ratio} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
