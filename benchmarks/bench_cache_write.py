"""Paged-cache writer benchmark: flash_gla.write_kvcache against the device's copy bandwidth.

Every row: one layout, T new tokens written to T random distinct slots of a cache of at least
1 GiB (far larger than L2). Timed as engines run it: CUDA-graph replay, median of many replays.
When one call's bytes would fit in L2, the graph holds several calls on different tokens and
slots (the bytes of all of them several times L2), so no replay finds its data in L2; the time
of a call is the replay's time over the calls in it.

Rows ``*-fp8`` write an FP8 cache (float8_e4m3fn values, one float32 scale per token, KV head and
128 values, RoPE keys in bf16 in the rope cache): the writer quantises on the way, reading
bf16 and writing about half as many bytes.

Reported: µs per call, GB/s (bytes read + written: kv, rope and slot_mapping read once, cache
rows, scales and RoPE keys written) and % of the copy bandwidth, measured in the same run as a device-to-device
``torch.Tensor.copy_`` of a 1 GiB buffer (read + written bytes / time). Target:
>= 80 % of the copy bandwidth for T >= 4096. For scale, each row also times a ``copy_`` that
reads and writes as many bytes as the call, replayed the same way (its µs, and its time as a
% of the writer's): small calls are bound by launch and memory latency, not bandwidth.

    python benchmarks/bench_cache_write.py                # markdown table on stdout
    python benchmarks/bench_cache_write.py --out DIR      # also DIR/bench_cache_write.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

PAGE = 64
GiB = 2**30
CACHE_BYTES = GiB  # at least this much cache per layout
L2_BYTES = 50 * 2**20  # H100: 50 MB
ROTATE_BYTES = 4 * L2_BYTES  # bytes touched by one graph replay, at least
TARGET_PERCENT = 80.0

# name -> (h_kv, d_kv, d_rope, RoPE stored once in a rope_cache (else inline after kv), FP8 cache)
LAYOUTS = {
    "gla2-inline": (2, 256, 64, False, False),
    "gla2-rope1": (2, 256, 64, True, False),
    "gta8": (8, 128, 64, True, False),
    "mla": (1, 512, 64, False, False),
    "gla2-rope1-fp8": (2, 256, 64, True, True),
    "gta8-fp8": (8, 128, 64, True, True),
}
FP8_GROUP = 128  # values per float32 scale
TOKENS = (256, 4096, 16384, 65536)


def unavailable_reason() -> str | None:
    """Why the writer cannot be timed here, in one line, or None if it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    try:
        from flash_gla._extension import load_extension

        load_extension()
    except ImportError as err:
        return f"flash_gla's extension does not load ({err})"
    return None


def time_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn()``, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_us(step, reps: int) -> float:
    """Median µs of one CUDA-graph replay of what ``step()`` launches."""
    step()  # warm-up outside the capture (lazy loading of the extension)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return time_ms(graph.replay, reps) * 1e3


def same_size_copy_us(nbytes: int, calls: int, reps: int) -> float:
    """µs of a ``copy_`` of ``nbytes`` (as many bytes read and written as one write_kvcache call),
    replayed like the writer: ``calls`` copies on different buffers in one graph."""
    src = torch.empty(calls, nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def step():
        for c in range(calls):
            dst[c].copy_(src[c])

    return graph_us(step, reps) / calls


def copy_gbps(reps: int) -> float:
    """Device-to-device copy bandwidth: (read + written bytes) / time of a 1 GiB ``copy_``."""
    src = torch.empty(GiB, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps)
    del src, dst
    return 2 * GiB / (ms * 1e-3) / 1e9


def bench_layout(name: str, dtype: torch.dtype, reps: int, copy_bw: float, tokens=TOKENS) -> list[dict]:
    import flash_gla

    h_kv, d_kv, d_rope, shared, fp8 = LAYOUTS[name]
    esize = torch.empty(0, dtype=dtype).element_size()
    cache_dim = d_kv if shared else d_kv + d_rope
    groups = -(-cache_dim // FP8_GROUP)
    # Bytes of one slot: cache rows (FP8: 1-byte values and a 4-byte scale per group), RoPE key.
    row_bytes = cache_dim + 4 * groups if fp8 else cache_dim * esize
    slot_bytes = h_kv * row_bytes + (d_rope * esize if shared else 0)
    num_blocks = math.ceil(CACHE_BYTES / (PAGE * slot_bytes))
    num_slots = num_blocks * PAGE
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    kv_cache = torch.empty(num_blocks, PAGE, h_kv, cache_dim, dtype=cache_dtype, device="cuda")
    rope_cache = torch.empty(num_blocks, PAGE, 1, d_rope, dtype=dtype, device="cuda") if shared else None
    kv_scale = torch.empty(num_blocks, PAGE, h_kv, groups, dtype=torch.float32, device="cuda") if fp8 else None
    rows = []
    for num_tokens in tokens:
        read = num_tokens * ((h_kv * d_kv + d_rope) * esize + 8)  # kv, rope, slot_mapping
        written = num_tokens * slot_bytes
        calls = max(1, math.ceil(ROTATE_BYTES / (read + written)))
        calls = min(calls, num_slots // num_tokens)  # every slot of every call distinct
        slots = torch.randperm(num_slots, device="cuda")[: calls * num_tokens].view(calls, num_tokens)
        kv = torch.randn(calls, num_tokens, h_kv, d_kv, device="cuda").to(dtype)
        rope = torch.randn(calls, num_tokens, d_rope, device="cuda").to(dtype)

        def step():
            for c in range(calls):
                flash_gla.write_kvcache(kv_cache, slots[c], kv[c], rope[c], rope_cache, kv_scale)

        us = graph_us(step, reps) / calls
        gbps = (read + written) / (us * 1e-6) / 1e9
        del slots, kv, rope
        copy_us = same_size_copy_us((read + written) // 2, calls, reps)
        rows.append(dict(layout=name, tokens=num_tokens, dtype=str(dtype).removeprefix("torch."),
                         cache_dtype=str(cache_dtype).removeprefix("torch."), calls_per_graph=calls,
                         us=us, gbps=gbps, percent_of_copy=100 * gbps / copy_bw, bytes_read=read,
                         bytes_written=written, same_size_copy_us=copy_us,
                         percent_of_same_size_copy=100 * copy_us / us))
    del kv_cache, rope_cache, kv_scale
    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], copy_bw: float) -> str:
    lines = [
        f"copy bandwidth (1 GiB copy_, read + write): {copy_bw:.0f} GB/s",
        "",
        "| layout | T | µs | GB/s | % of copy | same-size copy_ µs | % of same-size copy_ |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['tokens']} | {r['us']:.2f} | {r['gbps']:.0f} | {r['percent_of_copy']:.1f} "
            f"| {r['same_size_copy_us']:.2f} | {r['percent_of_same_size_copy']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated T values")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--reps", type=int, default=50, help="timed graph replays per row (median)")
    ap.add_argument("--out", default=None, help="folder for bench_cache_write.json")
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench_cache_write.py: nothing to time here: {reason}")
        return 0 if not torch.cuda.is_available() else 1

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tokens = [int(t) for t in args.tokens.split(",")]
    t0 = time.time()
    copy_bw = copy_gbps(args.reps)
    rows = []
    for name in args.layouts.split(","):
        rows += bench_layout(name, dtype, args.reps, copy_bw, tokens)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}")
    print(table(rows, copy_bw))
    below = [r for r in rows if r["tokens"] >= 4096 and r["percent_of_copy"] < TARGET_PERCENT]
    verdict = "met" if not below else f"missed by {len(below)} row(s)"
    print(f"\ntarget >= {TARGET_PERCENT:.0f} % of copy bandwidth for T >= 4096: {verdict} ({time.time() - t0:.0f} s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype,
                    copy_gbps=copy_bw, cache_bytes=CACHE_BYTES, reps=args.reps, date=time.strftime("%Y-%m-%d"),
                    commit=os.environ.get("FLASH_GLA_COMMIT", ""))
        with open(os.path.join(args.out, "bench_cache_write.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
