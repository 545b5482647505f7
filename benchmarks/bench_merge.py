"""merge_attention's bandwidth against a plain device copy (target: >= 80 % of copy bandwidth).

    python benchmarks/bench_merge.py              # b 128, h_q 128, dv 512, s_q 1 and 2, bf16
    python benchmarks/bench_merge.py --out DIR    # also DIR/merge.json

A merge reads out_a, out_b (b, s_q, h_q, dv) and lse_a, lse_b (b, h_q, s_q) and writes out and
lse; its bytes are those six tensors. The copy baseline (``dst.copy_(src)``) reads and writes half
of the merge's bytes each, so that both move the same total. Both are CUDA-graph replays over several copies of the data rotated
inside the graph (more than 4x the L2), median of ``--iters``; reported: µs, GB/s (bytes read +
written / time) and the merge's GB/s as % of the copy's. Without an sm_90 GPU it says so in one
line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import L2_BYTES, time_graphs, unavailable_reason  # noqa: E402


def bench(b, s_q, h_q, dv, dtype, iters):
    import flash_gla

    out_bytes = b * s_q * h_q * dv * torch.finfo(dtype).bits // 8
    lse_bytes = b * h_q * s_q * 4
    merge_bytes = 3 * (out_bytes + lse_bytes)  # read two parts, write one
    copies = max(1, math.ceil(4 * L2_BYTES / merge_bytes))

    def part():
        return (torch.randn(b, s_q, h_q, dv, device="cuda").to(dtype), torch.randn(b, h_q, s_q, device="cuda") * 4)

    parts = [(*part(), *part()) for _ in range(copies)]
    results = [(torch.empty_like(p[0]), torch.empty_like(p[1])) for p in parts]
    # the copy moves as many bytes as the merge: reads half of them, writes the other half
    copy_elems = merge_bytes // 2 // 2
    srcs = [torch.randn(copy_elems, device="cuda").to(torch.bfloat16) for _ in range(copies)]
    dsts = [torch.empty_like(s) for s in srcs]

    def merges():
        for (oa, la, ob, lb), (o, lse) in zip(parts, results):
            flash_gla.merge_attention(oa, la, ob, lb, out=o, lse=lse)

    def copies_():
        for s, d in zip(srcs, dsts):
            d.copy_(s)

    merge_us, copy_us = (t / copies for t in time_graphs([merges, copies_], iters)[0])
    copy_bytes = 2 * copy_elems * 2
    merge_gbps, copy_gbps = merge_bytes / merge_us / 1e3, copy_bytes / copy_us / 1e3
    return dict(b=b, s_q=s_q, h_q=h_q, dv=dv, dtype=str(dtype).replace("torch.", ""), merge_us=merge_us,
                merge_gbps=merge_gbps, copy_us=copy_us, copy_gbps=copy_gbps, pct_of_copy=100 * merge_gbps / copy_gbps,
                bytes=merge_bytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--dv", type=int, default=512)
    ap.add_argument("--sq", default="1,2")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--out", default=None, help="folder for merge.json")
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench_merge.py: cannot benchmark here: {reason}")
        return 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| b | s_q | h_q | dv | dtype | MB | merge µs | merge GB/s | copy GB/s | % of copy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for s_q in [int(s) for s in args.sq.split(",")]:
        r = bench(args.batch, s_q, args.heads, args.dv, torch.bfloat16, args.iters)
        rows.append(r)
        print(f"| {r['b']} | {r['s_q']} | {r['h_q']} | {r['dv']} | {r['dtype']} | {r['bytes'] / 1e6:.1f} | "
              f"{r['merge_us']:.1f} | {r['merge_gbps']:,.0f} | {r['copy_gbps']:,.0f} | {r['pct_of_copy']:.0f}% |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                    commit=os.environ.get("FLASH_GLA_COMMIT", ""), iters=args.iters)
        with open(os.path.join(args.out, "merge.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
