"""Serving benchmark: whole decode steps of a 60-layer model's attention, as a server runs them.

The paper's server test in miniature. 64 concurrent requests, two sets of lengths:
``imbalanced`` (log-normal, median 8K, sigma 1, clipped to 1K-64K, fixed seed) and
``balanced`` (every request at the imbalanced set's mean). One decode step is what an engine
runs per step: ``get_metadata`` once, then for each of the 60 layers the cache write of the
step's new tokens (``flash_gla.write_kvcache``, 64 x s_q tokens) and the decode attention.
The whole step is captured in one CUDA graph; reported: µs per step (median of graph
replays, the configurations' replays interleaved) and decode tokens/s = 64 x s_q / step time,
at s_q 1 and 2 (multi-token prediction; causal=True).

    python benchmarks/bench_serving.py             # about 15 s on an H200 (the first run measured)
    python benchmarks/bench_serving.py --quick     # smoke run: 4 layers, few replays
    python benchmarks/bench_serving.py --out DIR   # DIR/serving.json and DIR/serving.png (default bench_out)

Configurations (bf16, h_q 128; every one's cache written by flash_gla.write_kvcache):

* ``gla2-rope1``: GLA-2, 2 latent heads of 256, the RoPE key (64) stored once per token
  (``gla_with_kvcache(..., rope_cache=...)``).
* ``mla-flashmla``: MLA through FlashMLA (512 + 64 inline; its ``get_mla_metadata`` and
  ``flash_mla_with_kvcache`` from ``vllm.third_party.flashmla.flash_mla_interface``, or a
  ``flash_mla`` build), skipped with a note when not importable (third_party/README.md).
* ``mla``: MLA through flash_gla (``gla_with_kvcache``, h_kv 1, head_dim_v 512, inline).

Memory: both layouts cache 1,152 bytes per token and layer. 60 layers' caches for 64
requests of up to 64K tokens need up to 290 GB (55 GB even for the imbalanced set, mean 12K),
which does not fit in an 80 GB H100 beside a model's weights: the layers share one cache
allocation per configuration, sized for the lengths set (the output says how much). Each
layer still reads its requests' whole cache (about 0.9 GB, far more than the 50 MB L2), so
sharing does not make the reads cheaper.

Targets (for information): GLA-2 >= 1.3x FlashMLA's MLA tokens/s at s_q 1 and
>= 1.9x at s_q 2 on the imbalanced set. Without an sm_90 GPU the script says so in one line
and exits 0.
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
from bench_decode import CONFIGS, load_flashmla, make_case, time_graphs, unavailable_reason  # noqa: E402

PAGE = 64
MIN_LEN, MAX_LEN = 1024, 65536
MEDIAN_LEN, SIGMA = 8192, 1.0
# name -> (bench_decode configuration, which kernel)
SERVING_CONFIGS = {
    "gla2-rope1": ("gla2-rope1", "flash_gla"),
    "mla-flashmla": ("mla", "flashmla"),
    "mla": ("mla", "flash_gla"),
}
TITLES = {"gla2-rope1": "GLA-2, RoPE once (flash_gla)", "mla-flashmla": "MLA (FlashMLA)", "mla": "MLA (flash_gla)"}


def lengths_sets(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The imbalanced set (log-normal, clipped) and the balanced one at its mean."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(batch, generator=gen, dtype=torch.float64)
    imbalanced = (math.log(MEDIAN_LEN) + SIGMA * normal).exp().clamp(MIN_LEN, MAX_LEN).round().int()
    mean = round(imbalanced.double().mean().item())
    return {"imbalanced": imbalanced, "balanced": torch.full((batch,), mean, dtype=torch.int32)}


def decode_step(name, cfg, case, s_q, layers, flashmla):
    """The step to capture: planning once, then per layer the cache write and the attention.

    ``case``: bench_decode.make_case's ([(q, kv_cache, rope_cache or None, kv_scale None)],
    block_table, cache_seqlens); the lengths count the step's new tokens, the last s_q of each request."""
    import flash_gla

    [(q, kv_cache, rope_cache, _)], block_table, seqlens = case
    batch, h_q, h_kv, dv = q.shape[0], cfg["h_q"], cfg["h_kv"], cfg["dv"]
    positions = seqlens[:, None].long() - s_q + torch.arange(s_q, device=q.device)
    slots = (block_table.gather(1, positions // PAGE).long() * PAGE + positions % PAGE).flatten()
    new_kv = torch.randn(batch * s_q, h_kv, dv, dtype=q.dtype, device=q.device)
    new_rope = torch.randn(batch * s_q, cfg["d_rope"], dtype=q.dtype, device=q.device)
    out = torch.empty(batch, s_q, h_q, dv, dtype=q.dtype, device=q.device)

    def write():
        flash_gla.write_kvcache(kv_cache, slots, new_kv, new_rope, rope_cache=rope_cache)

    if SERVING_CONFIGS[name][1] == "flashmla":
        get_mla_metadata, flash_mla_with_kvcache = flashmla

        def step():
            meta, _ = get_mla_metadata()  # lazy: the first layer's call plans the step, the others reuse it
            for _ in range(layers):
                write()
                flash_mla_with_kvcache(q, kv_cache, block_table, seqlens, dv, meta, None, causal=True)
    else:
        def step():
            meta, num_splits = flash_gla.get_metadata(seqlens, s_q * h_q // h_kv, h_kv)
            for _ in range(layers):
                write()
                flash_gla.gla_with_kvcache(q, kv_cache, block_table, seqlens, dv, meta, num_splits, causal=True,
                                           out=out, rope_cache=rope_cache)
    return step


def cache_gb(case) -> float:
    [(_, kv_cache, rope_cache, kv_scale)], _, _ = case
    return sum(t.numel() * t.element_size() for t in (kv_cache, rope_cache, kv_scale) if t is not None) / 1e9


def bench(lengths, s_q, names, args, flashmla, gen):
    """µs per step of each configuration on one lengths set (replays interleaved)."""
    cases, steps = {}, []
    for name in names:
        bench_cfg = SERVING_CONFIGS[name][0]
        if bench_cfg not in cases:  # the two MLA configurations read the same cache
            cases[bench_cfg] = make_case(CONFIGS[bench_cfg], args.batch, lengths, s_q, torch.bfloat16, 1, gen, "cuda")
        steps.append(decode_step(name, CONFIGS[bench_cfg], cases[bench_cfg], s_q, args.layers, flashmla))
    gb = {name: cache_gb(cases[SERVING_CONFIGS[name][0]]) for name in names}
    times, _ = time_graphs(steps, args.iters, warmup=3)
    del cases, steps
    torch.cuda.empty_cache()
    return dict(zip(names, times)), gb


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        print("matplotlib is not importable: no plot (the table and the JSON have every number)")
        return
    groups = sorted({(r["lengths"], r["s_q"]) for r in rows}, key=lambda g: (g[1], g[0] != "imbalanced"))
    names = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = pyplot.subplots(figsize=(9, 4.5))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        by_group = {(r["lengths"], r["s_q"]): r for r in rows if r["config"] == name}
        xs = [g + (k - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ys = [by_group[g]["tokens_per_s"] if g in by_group else 0 for g in groups]
        bars = ax.bar(xs, ys, width, label=TITLES[name])
        for bar, g in zip(bars, groups):
            ratio = by_group.get(g, {}).get("vs_flashmla")
            if ratio and name != "mla-flashmla":
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), [f"{lengths}\ns_q {s_q}" for lengths, s_q in groups])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{rows[0]['batch']} requests, {rows[0]['layers']} layers: get_metadata + per layer "
                 "write_kvcache + attention, one CUDA graph per step", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", help="folder for serving.json and serving.png")
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sq", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iters", type=int, default=30, help="timed replays of each step graph")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 layers, 3 replays")
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason is not None:  # one line, status 0: nothing to measure on this machine
        print(f"bench_serving.py: cannot benchmark here: {reason}")
        return 0
    if args.quick:
        args.layers, args.iters = min(args.layers, 4), 3

    flashmla = load_flashmla()
    names = [n for n in SERVING_CONFIGS if flashmla is not None or SERVING_CONFIGS[n][1] != "flashmla"]
    sets = lengths_sets(args.batch)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  {args.layers} layers, "
          f"batch {args.batch}, bf16, h_q 128, causal")
    for set_name, lengths in sets.items():
        print(f"{set_name} lengths: mean {lengths.double().mean():.0f}, min {int(lengths.min())}, "
              f"max {int(lengths.max())}, {int(lengths.sum())} tokens")
    if flashmla is None:
        print("FlashMLA not importable (flash_mla or vllm.third_party.flashmla): its MLA row and the ratios "
              "are skipped (third_party/README.md says where to get it)")
    rows, t0 = [], time.time()
    for s_q in args.sq:
        for set_name, lengths in sets.items():
            times, gb = bench(lengths, s_q, names, args, flashmla, gen)
            for name in names:
                us = times[name]
                ratio = times["mla-flashmla"] / us if "mla-flashmla" in times else None
                rows.append(dict(config=name, lengths=set_name, s_q=s_q, layers=args.layers, batch=args.batch,
                                 us_per_step=us, tokens_per_s=args.batch * s_q / us * 1e6, vs_flashmla=ratio,
                                 cache_gb_per_layer=gb[name]))
    gb, gpu_gb = max(r["cache_gb_per_layer"] for r in rows), torch.cuda.get_device_properties(0).total_memory / 1e9
    print(f"memory: the {args.layers} layers share one cache allocation per configuration ({gb:.2f} GB here); "
          f"{args.layers} separate caches would need {args.layers * gb:.0f} GB for these lengths and "
          f"{args.layers * args.batch * MAX_LEN * 1152 / 1e9:.0f} GB for {args.batch} requests of 64K tokens "
          f"(GPU: {gpu_gb:.0f} GB)")
    print()
    print("| config | lengths | s_q | µs/step | tokens/s | vs FlashMLA MLA |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_flashmla']:.2f}x" if r["vs_flashmla"] else "-"
        print(f"| {TITLES[r['config']]} | {r['lengths']} | {r['s_q']} | {r['us_per_step']:,.0f} | "
              f"{r['tokens_per_s']:,.0f} | {ratio} |")
    print(f"\n({time.time() - t0:.0f} s)")
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                commit=os.environ.get("FLASH_GLA_COMMIT", ""), layers=args.layers, batch=args.batch,
                iters=args.iters, flashmla=flashmla is not None,
                lengths={k: v.tolist() for k, v in sets.items()})
    with open(os.path.join(args.out, "serving.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(rows, os.path.join(args.out, "serving.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
