"""Per-kernel GPU times of one decode call (torch.profiler), to see where the time goes.

    python benchmarks/profile_kernels.py                  # a few bench configurations
    python benchmarks/profile_kernels.py --configs gla2 --lengths 1024 --sq 1

Reuses bench_decode's case builder; prints, per configuration, the mean GPU time of each
kernel the call launched (decode, combine) over several calls, next to the call's total.
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import CONFIGS, decode_call, make_case, varlen_lengths  # noqa: E402


def profile_case(name, length, s_q, batch, iters, gen, plain=False):
    import flash_gla

    cfg = CONFIGS[name]
    batch = cfg.get("batch", batch)
    lengths = varlen_lengths(batch, 8192, gen) if cfg.get("varlen") else torch.full((batch,), length, dtype=torch.int32)
    cases, table, seqlens = make_case(cfg, batch, lengths, s_q, torch.bfloat16, 1, gen, "cuda")
    q, kv, rope, kv_scale = cases[0]
    meta, splits = flash_gla.get_metadata(seqlens, s_q * cfg["h_q"] // cfg["h_kv"], cfg["h_kv"])
    out = torch.empty(batch, s_q, cfg["h_q"], cfg["dv"], dtype=q.dtype, device="cuda")
    call = lambda: decode_call(cfg, q, kv, rope, table, seqlens, meta, splits, out, kv_scale=kv_scale)  # noqa: E731
    flash_gla.ops.CHECK_LENGTHS = False  # no host sync inside the profiled region
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    if plain:  # under an external profiler (ncu): just the calls, no torch.profiler (CUPTI)
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
    times = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            key = "decode_kernel" if "decode_kernel" in evt.name else ("combine_kernel" if "combine" in evt.name else evt.name[:40])
            times[key] = times.get(key, 0.0) + evt.device_time / iters
    parts = meta.shape[0]
    n_split = int((splits[1:] - splits[:-1] > 1).sum())
    label = f"{name} L={'varlen' if cfg.get('varlen') else length} s_q={s_q} b={batch}"
    detail = "  ".join(f"{k} {v:8.1f} us" for k, v in sorted(times.items(), key=lambda kv: -kv[1]))
    print(f"{label:32s} parts {parts:3d} split requests {n_split:4d}  {detail}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="gla2,mla,varlen,gta8,gla2-rope1")
    ap.add_argument("--lengths", default="1024,32768")
    ap.add_argument("--sq", default="1,2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--plain", action="store_true", help="only run the calls (for ncu: "
                    "ncu -k regex:decode_kernel --launch-skip 3 --launch-count 1 python ... --plain)")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    for name in args.configs.split(","):
        lengths = [0] if CONFIGS[name].get("varlen") else [int(x) for x in args.lengths.split(",")]
        for s_q in [int(x) for x in args.sq.split(",")]:
            for length in lengths:
                profile_case(name, length, s_q, args.batch, args.iters, gen, args.plain)


if __name__ == "__main__":
    main()
