"""Decode benchmark: flash_gla against the bandwidth roofline and FlashMLA, timed as engines run.

Every row: CUDA-graph replay of one decode call with precomputed metadata, median of the
replays of at least 200 ms after warm-up (ours and FlashMLA's replays interleaved: a server
decodes back to back, so this is the sustained figure, clocks as the card's power limit leaves
them), with several copies of the cache rotated inside the graph when one copy would fit in L2,
on fresh random data. Reported: µs, effective GB/s (KV + q + out bytes), TFLOP/s, % of the
bandwidth roofline and of the matrix rate, the burst time (the fastest of a few replays after
the card idled for a moment), and the ratio of FlashMLA's time (same run) to ours.

The roofline is the card's own, measured at start in the same process: its read bandwidth (a
float32-accumulating sum over 4 GiB of bf16; torch's amax and copy_ read slower) and its dense
bf16 matrix rate (an 8192 x 8192 x 8192 product on random data).

    python benchmarks/bench_decode.py                       # default suite
    python benchmarks/bench_decode.py --configs gla2 --lengths 32768 --sq 1
    python benchmarks/bench_decode.py --out DIR             # also DIR/bench.json, DIR/bench.png
    python benchmarks/bench_decode.py --configs gla2-rope1,gla2-rope1-fp8,gta8,gta8-fp8   # bf16 vs FP8 cache
    python benchmarks/bench_decode.py --list                # the configurations

Rows ``*-fp8`` read an FP8 cache: float8_e4m3fn latents / tied states with a float32 scale per
128 values (kv_scale) and the RoPE key once per token in bf16; q and out stay bf16.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

PAGE = 64
L2_BYTES = 50 * 2**20

# Layouts (flash_gla/reference.py defines them): "inline" = RoPE after V in every KV head's row
# (gla_with_kvcache; C++ RopeCache::kInline); "shared" = latents only, one RoPE row per token
# for all heads (gla_with_kvcache with rope_cache: the gla_rope1 variant; RopeCache::kShared);
# "gta" = tied states of dv dims whose last d_rope key dims come from the shared RoPE row
# (gta_with_kvcache); "gqa" = roofline only: separate K and V of dv dims per head. fp8=True: the
# "shared" / "gta" cache as float8_e4m3fn + float32 kv_scale (one per 128 values), RoPE in bf16.
CONFIGS = {
    "gla2": dict(h_q=128, h_kv=2, dv=256, d_rope=64),
    "gla1": dict(h_q=64, h_kv=1, dv=256, d_rope=64),
    "mla": dict(h_q=128, h_kv=1, dv=512, d_rope=64),
    "mla64": dict(h_q=64, h_kv=1, dv=512, d_rope=64),
    "varlen": dict(h_q=128, h_kv=2, dv=256, d_rope=64, varlen=True, batch=96),
    "gla2-rope1": dict(h_q=128, h_kv=2, dv=256, d_rope=64, layout="shared"),
    "gta8": dict(h_q=32, h_kv=8, dv=128, d_rope=64, layout="gta"),
    "gqa8": dict(h_q=32, h_kv=8, dv=128, d_rope=0, layout="gqa"),
    "gla2-rope1-fp8": dict(h_q=128, h_kv=2, dv=256, d_rope=64, layout="shared", fp8=True),
    "gta8-fp8": dict(h_q=32, h_kv=8, dv=128, d_rope=64, layout="gta", fp8=True),
    # Small query groups: GTA with d 64 (4 rows per KV head), and one GPU's share of GLA-8 and
    # of MLA under 8-way tensor parallelism (16 heads).
    "gta4-d64": dict(h_q=16, h_kv=4, dv=64, d_rope=32, layout="gta"),
    "gta4-d64-fp8": dict(h_q=16, h_kv=4, dv=64, d_rope=32, layout="gta", fp8=True),
    "gla1-h16": dict(h_q=16, h_kv=1, dv=256, d_rope=64),
    "mla-h16": dict(h_q=16, h_kv=1, dv=512, d_rope=64),
}
FP8_GROUP = 128  # values per float32 scale of an FP8 cache row
ELEMENT_BYTES = 2  # bf16: q, out, bf16 caches and the FP8 layout's RoPE row
# The FlashMLA configuration each of ours is compared with (MLA at the same number of heads; the
# FP8 rows have none: FlashMLA's dense decode reads no FP8 cache).
FLASHMLA_TWIN = {"gla2": "mla", "gla1": "mla64", "mla": "mla", "mla64": "mla64", "varlen": "mla",
                 "gla2-rope1": "mla", "gla1-h16": "mla-h16", "mla-h16": "mla-h16"}


def head_dims(cfg):
    """(d_qk, KV-cache bytes read per token, out dims) of a configuration.

    bf16 caches: 2 bytes per cached element. FP8 (``fp8``): per KV head the d e4m3 bytes and a
    4-byte scale per 128 of them, plus the bf16 RoPE row once per token."""
    layout, h_kv, dv, d_rope = cfg.get("layout", "inline"), cfg["h_kv"], cfg["dv"], cfg["d_rope"]
    if cfg.get("fp8"):
        if layout not in ("shared", "gta"):
            raise ValueError(f"FP8 needs the RoPE key stored once (layout shared or gta), got {layout}")
        row_bytes = dv + 4 * -(-dv // FP8_GROUP)  # e4m3 values + float32 scales of one KV head's row
        return (dv + d_rope if layout == "shared" else dv), h_kv * row_bytes + d_rope * ELEMENT_BYTES, dv
    if layout == "inline":
        return dv + d_rope, h_kv * (dv + d_rope) * ELEMENT_BYTES, dv
    if layout == "shared":
        return dv + d_rope, (h_kv * dv + d_rope) * ELEMENT_BYTES, dv
    if layout == "gta":
        return dv, (h_kv * dv + d_rope) * ELEMENT_BYTES, dv
    if layout == "gqa":
        return dv, h_kv * 2 * dv * ELEMENT_BYTES, dv
    raise ValueError(layout)


_CEILINGS = {}


def card_ceilings():
    """(read GB/s, dense bf16 TFLOP/s) of the current GPU, measured once per process.

    Read bandwidth: x.sum(dtype=float32) over 4 GiB of random bf16 (a float32 accumulation keeps
    the reduction bandwidth-bound; amax and copy_ reach ~80 % of it on an H200). Matrix rate: an
    8192^3 bf16 product on random data (zeros run faster). Each: median of 10 after 3 warm-ups."""
    if not _CEILINGS:
        x = torch.randn(2 * 2**30, dtype=torch.bfloat16, device="cuda")
        read_s = _median_seconds(lambda: x.sum(dtype=torch.float32), 10)
        del x
        a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        mma_s = _median_seconds(lambda: a @ b, 10)
        del a, b
        torch.cuda.empty_cache()
        _CEILINGS.update(read_gbps=4 * 2**30 / read_s / 1e9, bf16_tflops=2 * 8192**3 / mma_s / 1e12)
    return _CEILINGS["read_gbps"], _CEILINGS["bf16_tflops"]


def _median_seconds(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def load_flashmla():
    for mod in ("flash_mla", "vllm.third_party.flashmla.flash_mla_interface"):
        try:
            m = __import__(mod, fromlist=["get_mla_metadata", "flash_mla_with_kvcache"])
            return m.get_mla_metadata, m.flash_mla_with_kvcache
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            continue
    return None


def decode_call(cfg, q, kv, rope, block_table, seqlens, meta, splits, out, invariant=False, kv_scale=None):
    """One flash_gla decode call for a configuration (causal when s_q > 1); ``kv_scale``: FP8 rows."""
    import flash_gla

    causal = q.shape[1] > 1
    if cfg.get("layout") == "gta":
        return flash_gla.gta_with_kvcache(q, kv, rope, block_table, seqlens, meta, splits, causal=causal, out=out,
                                          enable_batch_invariant=invariant, kv_scale=kv_scale)
    return flash_gla.gla_with_kvcache(q, kv, block_table, seqlens, cfg["dv"], meta, splits, causal=causal,
                                      out=out, rope_cache=rope, enable_batch_invariant=invariant, kv_scale=kv_scale)


def varlen_lengths(batch, mean, gen):
    """Long-tailed lengths averaging about `mean`: some zeros, one 64K request."""
    x = torch.distributions.Pareto(torch.tensor(1.0), torch.tensor(1.6)).sample((batch,))
    lengths = (x / x.mean() * mean).clamp(max=65536).long()
    lengths[torch.randperm(batch, generator=gen)[: max(1, batch // 16)]] = 0
    lengths[0] = 65536
    return lengths.int()


def random_fp8_cache(num_pages, h_kv, dim, dtype, device, chunk_pages=1024):
    """A random FP8 cache as write_kvcache quantises it (flash_gla.reference.quantize_kv_ref),
    chunk by chunk: (kv_cache float8_e4m3fn, kv_scale float32)."""
    from flash_gla.reference import quantize_kv_ref

    kv = torch.empty(num_pages, PAGE, h_kv, dim, dtype=torch.float8_e4m3fn, device=device)
    scale = torch.empty(num_pages, PAGE, h_kv, -(-dim // FP8_GROUP), dtype=torch.float32, device=device)
    for start in range(0, num_pages, chunk_pages):
        stop = min(num_pages, start + chunk_pages)
        values, scales = quantize_kv_ref(torch.randn(stop - start, PAGE, h_kv, dim, dtype=dtype, device=device))
        kv[start:stop].view(torch.uint8).copy_(values.view(torch.uint8))
        scale[start:stop].copy_(scales)
    return kv, scale


def make_case(cfg, batch, lengths, s_q, dtype, copies, gen, device):
    """Per copy (q, kv, rope or None, kv_scale or None: FP8 rows); a shared block table and lengths."""
    h_q, h_kv, dv, d_rope = cfg["h_q"], cfg["h_kv"], cfg["dv"], cfg["d_rope"]
    layout = cfg.get("layout", "inline")
    d_qk = head_dims(cfg)[0]
    kv_dim = dv + d_rope if layout == "inline" else dv
    pages = [(int(length) + PAGE - 1) // PAGE for length in lengths]
    max_pages = max(1, max(pages))
    total_pages = max(1, sum(pages))
    block_table = torch.zeros(batch, max_pages, dtype=torch.int32)
    perm = torch.randperm(total_pages, generator=gen).int()
    start = 0
    for i, n in enumerate(pages):
        block_table[i, :n] = perm[start:start + n]
        start += n
    cases = []
    for _ in range(copies):
        kv_scale = None
        if cfg.get("fp8"):
            kv, kv_scale = random_fp8_cache(total_pages, h_kv, kv_dim, dtype, device)
        else:
            kv = torch.randn(total_pages, PAGE, h_kv, kv_dim, dtype=dtype, device=device)
        q = torch.randn(batch, s_q, h_q, d_qk, dtype=dtype, device=device)
        rope = None if layout == "inline" else torch.randn(total_pages, PAGE, 1, d_rope, dtype=dtype, device=device)
        cases.append((q, kv, rope, kv_scale))
    seqlens = lengths.to(device=device, dtype=torch.int32)
    return cases, block_table.to(device), seqlens


def capture(fn):
    """Warm ``fn`` up outside any graph (lazy initialisation), then capture one call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


SUSTAIN_S = 0.2  # replay each graph for at least this long: the card settles at its power limit


def time_graphs(fns, iters, warmup=10, burst=False):
    """Median µs of one graph replay of each function over at least `iters` replays and
    SUSTAIN_S seconds, replays interleaved (a, b, a, b, ...) so that a drift of the GPU's speed
    affects all alike; with `burst`, also each one's fastest of 3 replays after 0.3 s idle."""
    graphs = [capture(fn) for fn in fns]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def replay_us(graph):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3

    bursts = []
    if burst:
        for graph in graphs:
            graph.replay()
            torch.cuda.synchronize()
            time.sleep(0.3)
            bursts.append(min(replay_us(graph) for _ in range(3)))
    for _ in range(warmup):
        for graph in graphs:
            graph.replay()
    torch.cuda.synchronize()
    times = [[] for _ in graphs]
    t_end = time.perf_counter() + SUSTAIN_S
    while len(times[0]) < iters or time.perf_counter() < t_end:
        for graph, samples in zip(graphs, times):
            samples.append(replay_us(graph))
    return [statistics.median(samples) for samples in times], bursts


def replay_floor_us(kernels, iters=200):
    """Median µs of one replay of a graph of `kernels` dependent one-element kernels, timed as
    every row is: the launch latency that each row's time includes whatever its kernels do
    (a decode call is one or two kernels: the attention, and the combine of split requests)."""
    x = torch.zeros(1, device="cuda")

    def fn():
        for _ in range(kernels):
            x.add_(1)

    return time_graphs([fn], iters)[0][0]


def bench_row(name, cfg, length, s_q, args, flashmla, gen):
    import flash_gla

    device = "cuda"
    dtype = torch.bfloat16
    batch = cfg.get("batch", args.batch)
    if cfg.get("varlen"):
        lengths = varlen_lengths(batch, 8192, gen)
    else:
        lengths = torch.full((batch,), length, dtype=torch.int32)
    h_q, h_kv, dv = cfg["h_q"], cfg["h_kv"], cfg["dv"]
    layout = cfg.get("layout", "inline")
    d_qk, kv_bytes_per_token, d_out = head_dims(cfg)
    tokens = int(lengths.long().sum())
    kv_bytes = tokens * kv_bytes_per_token
    io_bytes = batch * s_q * h_q * (d_qk + d_out) * ELEMENT_BYTES
    flops = 2 * tokens * s_q * h_q * (d_qk + d_out)
    read_gbps, bf16_tflops = card_ceilings()
    row = dict(config=name, length=int(length) if not cfg.get("varlen") else "varlen",
               s_q=s_q, batch=batch, roofline_us=(kv_bytes + io_bytes) / read_gbps / 1e3,
               mma_us=flops / bf16_tflops / 1e6, flashmla_us=None, speedup_vs_flashmla=None)
    if layout == "gqa":  # no kernel: the time a perfect GQA kernel would need, for contrast
        row.update(us=None, gbps=None, tflops=None, pct_roof=None, roofline_only=True)
        return row
    copies = max(1, min(4, math.ceil(4 * L2_BYTES / max(kv_bytes, 1))))
    cases, block_table, seqlens = make_case(cfg, batch, lengths, s_q, dtype, copies, gen, device)
    meta, splits = flash_gla.get_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    outs = [torch.empty(batch, s_q, h_q, d_out, dtype=dtype, device=device) for _ in cases]

    def ours():
        for (q, kv, rope, kv_scale), o in zip(cases, outs):
            decode_call(cfg, q, kv, rope, block_table, seqlens, meta, splits, o, kv_scale=kv_scale)

    fns, twin_cases = [ours], None
    if args.batch_invariant:  # the same calls on the batch-invariant plan
        inv_meta, inv_splits = flash_gla.get_metadata(seqlens, s_q * h_q // h_kv, h_kv, enable_batch_invariant=True)

        def ours_invariant():
            for (q, kv, rope, kv_scale), o in zip(cases, outs):
                decode_call(cfg, q, kv, rope, block_table, seqlens, inv_meta, inv_splits, o, invariant=True,
                            kv_scale=kv_scale)

        fns.append(ours_invariant)
    if flashmla is not None and not args.no_flashmla and name in FLASHMLA_TWIN:
        twin = dict(CONFIGS[FLASHMLA_TWIN[name]])
        twin_cases, twin_table, twin_seqlens = make_case(twin, batch, lengths, s_q, dtype, copies, gen, device)
        get_meta, fmla = flashmla
        metas = [get_meta()[0] for _ in twin_cases]
        for (q, kv, *_), m in zip(twin_cases, metas):  # initialise the lazy schedulers outside the graph
            fmla(q, kv, twin_table, twin_seqlens, 512, m, None, causal=s_q > 1)

        def theirs():
            for (q, kv, *_), m in zip(twin_cases, metas):
                fmla(q, kv, twin_table, twin_seqlens, 512, m, None, causal=s_q > 1)

        fns.append(theirs)
    times, bursts = time_graphs(fns, args.iters, burst=not args.no_burst)
    times = [t / copies for t in times]
    us = times[0]
    row.update(us=us, gbps=(kv_bytes + io_bytes) / us / 1e3, tflops=flops / us / 1e6,
               burst_us=bursts[0] / copies if bursts else None)
    row["pct_roof"] = 100.0 * row["roofline_us"] / us
    row["pct_mma"] = 100.0 * row["mma_us"] / us
    if args.batch_invariant:
        row["invariant_us"] = times.pop(1)
    if len(times) > 1:
        row["flashmla_us"] = times[1]
    del twin_cases
    row["speedup_vs_flashmla"] = row["flashmla_us"] / us if row["flashmla_us"] else None
    del cases, outs
    torch.cuda.empty_cache()
    return row


def fmt(row):
    if row.get("roofline_only"):
        return (f"{row['config']:14s} {str(row['length']):>7s} {row['s_q']:3d} {row['batch']:4d} "
                f"{'(roofline only: a perfect kernel)':>42s} {row['roofline_us']:9.1f}")
    fm = f"{row['flashmla_us']:9.1f}" if row["flashmla_us"] else "        -"
    sp = f"{row['speedup_vs_flashmla']:6.2f}x" if row["speedup_vs_flashmla"] else "      -"
    invariant = ""
    if row.get("invariant_us"):
        invariant = f" {row['invariant_us']:10.1f} {row['invariant_us'] / row['us']:6.2f}x"
    burst = f"{row['burst_us']:9.1f}" if row.get("burst_us") else "        -"
    return (f"{row['config']:14s} {str(row['length']):>7s} {row['s_q']:3d} {row['batch']:4d} "
            f"{row['us']:9.1f} {burst} {row['gbps']:8.0f} {row['tflops']:7.1f} {row['pct_roof']:6.1f}% "
            f"{row['pct_mma']:5.1f}% {row['roofline_us']:9.1f} {fm} {sp}{invariant}")


HEADER = ("config          length s_q    b        us  burst_us     GB/s  TFLOP/s  %roof   %mma   roof_us"
          "  flashmla   ratio")


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        print("matplotlib not available: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    for r in rows:
        if r["length"] == "varlen" or r.get("roofline_only"):
            continue
        series.setdefault((r["config"], r["s_q"]), []).append(r)
    for (name, s_q), rs in sorted(series.items()):
        xs = [r["length"] for r in rs]
        ax1.plot(xs, [r["us"] for r in rs], marker="o", label=f"flash_gla {name} s_q={s_q}")
        ax2.plot(xs, [r["pct_roof"] for r in rs], marker="o", label=f"flash_gla {name} s_q={s_q}")
        if all(r["flashmla_us"] for r in rs):
            ax1.plot(xs, [r["flashmla_us"] for r in rs], ls="--", marker="x",
                     label=f"FlashMLA twin of {name} s_q={s_q}")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache length (tokens)")
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("µs per decode call (CUDA-graph replay)")
    ax2.set_ylabel("% of bandwidth roofline")
    ax1.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def unavailable_reason():
    """Why the benchmark cannot run on this machine, in one line, or None if it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False); it needs an sm_90 GPU (H100 / H200)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"{torch.cuda.get_device_name()} is sm_{major}{minor}; the kernels need sm_90 (H100 / H200)"
    try:
        import flash_gla._C  # noqa: F401
    except ImportError as err:
        return f"flash_gla's extension does not load ({err}); build it with the README's install command"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="gla2,gla1,mla,mla64,varlen,gla2-rope1,gta8,gqa8,gla2-rope1-fp8,gta8-fp8,"
                                        "gta4-d64,gla1-h16,mla-h16",
                    help=f"comma-separated configurations, of: {', '.join(CONFIGS)} (--list describes them)")
    ap.add_argument("--list", action="store_true", help="list the configurations and exit")
    ap.add_argument("--lengths", default="1024,4096,16384,32768")
    ap.add_argument("--sq", default="1,2,4")
    ap.add_argument("--sq8-configs", default="gla2,gla2-rope1,gta8,gla2-rope1-fp8,gta8-fp8",
                    help="configurations that also get s_q 8 rows (multi-token prediction); '' for none")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=100, help="at least this many replays per row (and 0.2 s)")
    ap.add_argument("--no-burst", action="store_true", help="skip the burst time (replays after an idle pause)")
    ap.add_argument("--no-flashmla", action="store_true")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="also time each row on the batch-invariant plan (columns: its µs, its cost vs the default)")
    ap.add_argument("--out", default=None, help="folder for bench.json and bench.png")
    args = ap.parse_args()
    if args.list:
        for name, cfg in CONFIGS.items():
            d_qk, kv_bytes_per_token, _ = head_dims(cfg)
            shape = ", ".join(f"{k}={v}" for k, v in cfg.items())
            print(f"{name:15s} {shape}  (d_qk {d_qk}, {kv_bytes_per_token} KV bytes per token)")
        return 0
    unknown = [name for name in args.configs.split(",") + args.sq8_configs.split(",") if name and name not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    # A machine that cannot run the kernels gets one line saying why, not a traceback.
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench_decode.py: cannot benchmark here: {reason}", file=sys.stderr)
        return 1

    flashmla = load_flashmla()
    if flashmla is None:
        print("FlashMLA not importable (flash_mla or vllm.third_party.flashmla): comparison skipped")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rows = []
    read_gbps, bf16_tflops = card_ceilings()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  measured: reads {read_gbps:,.0f} GB/s, "
          f"bf16 matmul {bf16_tflops:,.0f} TFLOP/s (ridge {bf16_tflops * 1e3 / read_gbps:.0f} FLOP/B)")
    floor_us = {k: replay_floor_us(k) for k in (1, 2)}
    print(f"replay floor (a graph of 1 / 2 one-element kernels, timed like every row): "
          f"{floor_us[1]:.1f} / {floor_us[2]:.1f} us")
    print(HEADER + ("  invariant   cost" if args.batch_invariant else ""))
    t0 = time.time()
    sq8 = {name for name in args.sq8_configs.split(",") if name}
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        lengths = [0] if cfg.get("varlen") else [int(x) for x in args.lengths.split(",")]
        s_qs = [int(x) for x in args.sq.split(",")]
        for s_q in s_qs + ([8] if name in sq8 and 8 not in s_qs else []):
            for length in lengths:
                row = bench_row(name, cfg, length, s_q, args, flashmla, gen)
                rows.append(row)
                print(fmt(row), flush=True)
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, read_gbps=read_gbps,
                    bf16_tflops=bf16_tflops, replay_floor_us=floor_us,
                    date=time.strftime("%Y-%m-%d"), commit=os.environ.get("FLASH_GLA_COMMIT", ""))
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        plot(rows, os.path.join(args.out, "bench.png"))


if __name__ == "__main__":
    sys.exit(main())
