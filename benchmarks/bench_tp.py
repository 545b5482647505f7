"""Tensor- and context-parallel decode over NCCL: one layer's step per GPU, GLA-2 against MLA.

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py              # default suite (about a minute)
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --quick      # smoke run: b 16, 4K tokens, few replays
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --out DIR    # DIR/tp.json (default bench_out)

One process per GPU, NCCL. The layer is examples/gla_decode_layer.py's (DeepSeek-V2 dims: hidden
5120, h_q 128, absorbed projections, RoPE 64), sharded as examples/gla_tp_layer.py does:

* ``gla2-tp``: GLA-2 (2 latent heads of 256, RoPE stored once), TP-N by latent head: rank r holds
  latent head(s) r·h_kv/N, their 128/N query heads and its slice of W_UV and W_O; one all-reduce of
  the projected output. For N > 2 the N/2 ranks of a latent head split its tokens (DCP inside a head).
* ``mla-tp``: MLA (one 512 latent + RoPE 64 inline, FlashMLA's layout), TP-N as engines run it:
  the latent replicated on every rank, query heads split; one all-reduce.
* ``mla-dcp``: MLA DCP-N: rank c holds pages c, c + N, ... of every request; queries all-gathered
  (each rank projects 128/N heads), attention with all heads over the rank's pages, all-gather of
  (out, lse), ``flash_gla.merge_attention``, projection of the rank's heads, one all-reduce.

Per configuration, lengths set and s_q: µs per layer per step, split into ``attention`` (decode
kernel; under DCP also the merges and the s_q x (s_q - 1) triangle of the step's newest keys),
``projection`` (W_Q·W_UK, W_DKV, W_KR, RoPE, the cache write, W_UV, W_O), ``collective`` (the
NCCL calls, with the queries' reordering after their gather) and ``total`` (the whole layer step).
Each is one CUDA graph (the collectives captured with torch.distributed's NCCL backend; if a
capture fails, that part is timed eagerly and the table says so), replayed ``--iters`` times after
warm-up, all ranks replaying the same graphs in the same order; reported: the slowest rank's
median. ``get_metadata`` runs once per step for all layers and is not counted. Also per rank: KV
bytes per token and layer, the attention's effective bandwidth (cache bytes read / attention time)
and % of the card's measured read bandwidth, and how many 32K-token requests fit in 60 GiB of cache for a 60-layer model.

Lengths: ``balanced`` (every request at --length) and ``imbalanced`` (log-normal, sigma 1, scaled
to mean --length, clipped to 64 .. 8 x --length, fixed seed), b requests (--batch, default 128)
served by every GPU; the lengths count the step's s_q new tokens. FlashMLA (optional, when
importable) is timed on the MLA configurations' attention with the same inputs.

Targets (two GPUs, b 128, 32K): GLA-2 TP-2 attention <= 0.6x MLA TP-2's at s_q 1 and
<= 0.45x at s_q 2; GLA-2 TP-2 total faster than MLA DCP-2's at s_q 1 and 2. Without sm_90 GPUs
the script says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
if importlib.util.find_spec("flash_gla") is None:  # a checkout built in place, not installed
    sys.path.insert(0, os.path.dirname(HERE))
from bench_decode import capture, card_ceilings, load_flashmla, unavailable_reason  # noqa: E402
import gla_tp_layer as tp  # noqa: E402
from gla_decode_layer import Config, Weights  # noqa: E402

# name -> (Config overrides, RoPE stored once, context parallel when N > h_kv, title)
CONFIGS = {
    "gla2-tp": (dict(h_kv=2, d_latent=256), True, True, "GLA-2 TP-{n}"),
    "mla-tp": (dict(h_kv=1, d_latent=512), False, False, "MLA TP-{n} (latent replicated)"),
    "mla-dcp": (dict(h_kv=1, d_latent=512), False, True, "MLA DCP-{n}"),
}
PARTS = ("attention", "projection", "collective", "total")
SIGMA = 1.0
CACHE_GIB = 60  # cache budget per GPU for the "requests that fit" column
MODEL_LAYERS = 60  # DeepSeek-V2
REQUEST_TOKENS = 32768


def lengths_sets(batch: int, length: int, seed: int = 0) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    raw = (SIGMA * torch.randn(batch, generator=gen, dtype=torch.float64)).exp()
    imbalanced = (raw / raw.mean() * length).clamp(64, 8 * length).round().long()
    return {"balanced": [length] * batch, "imbalanced": imbalanced.tolist()}


def log(*args, **kwargs):
    if RANK == 0:
        print(*args, **kwargs, flush=True)


def time_parts(fns: dict, iters: int, eager: bool):
    """Median µs of each function (graph replays, or eager calls where capture is off or fails),
    interleaved; every rank runs the same sequence. Returns ({name: µs}, {name: graphed?})."""
    import torch.distributed as dist

    runners, graphed = {}, {}
    for name, fn in fns.items():
        runners[name], graphed[name] = fn, False
        if not eager:
            try:
                runners[name], graphed[name] = capture(fn).replay, True
            except RuntimeError as err:  # e.g. a collective that this torch / NCCL cannot capture
                log(f"  {name}: CUDA-graph capture failed ({str(err).splitlines()[0][:120]}); timed eagerly")
                torch.cuda.synchronize()
    for _ in range(3):
        for run in runners.values():
            run()
    torch.cuda.synchronize()
    samples = {name: [] for name in fns}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        dist.barrier()  # ranks start each round together: a collective's time is not the other rank's lag
        for name, run in runners.items():
            start.record()
            run()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}, graphed


def slowest_rank(values: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    names = sorted(values)
    t = torch.tensor([values[n] for n in names], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(names, t.tolist()))


def bench_case(name, layer, shard, cfg, rope_once, comm, lengths, s_q, args, flashmla):
    dtype, device = torch.bfloat16, torch.device("cuda")
    table, num_blocks = tp.local_block_table(lengths, shard, device, seed=1)
    cache = tp.allocate_cache(cfg, shard, num_blocks, rope_once, dtype, device,
                              init=lambda *shape, dtype, device: torch.randn(*shape, dtype=dtype, device=device))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    x = torch.randn(len(lengths), s_q, cfg.hidden, dtype=dtype, device=device)
    step = tp.make_step(shard, tp.FLASH, table, seqlens, s_q)

    # One eager step gives every part's static inputs.
    q, c_kv, k_rope = layer.project_in(x, step, cache)
    q_attn = layer.gather_queries(q, comm)
    out, lse, triangle = layer.attend(q_attn, c_kv, k_rope, step, cache)
    outs, lses = layer.gather_partials(out, lse, comm)
    o = layer.combine(outs, lses, triangle)
    y = layer.project_out(o).clone()  # the collective part's all-reduce buffer

    def attention():
        layer.attend(q_attn, c_kv, k_rope, step, cache)
        layer.combine(outs, lses, triangle)

    def projection():
        layer.project_in(x, step, cache)
        layer.project_out(o)

    def collective():
        layer.gather_queries(q, comm)
        layer.gather_partials(out, lse, comm)
        comm.all_reduce_(y)

    fns = dict(attention=attention, projection=projection, collective=collective,
               total=lambda: layer.decode(x, step, cache, comm))
    if flashmla is not None and not rope_once:  # the same attention through FlashMLA (same inputs)
        get_mla_metadata, flash_mla_with_kvcache = flashmla
        try:
            meta, _ = get_mla_metadata()
            flash_mla_with_kvcache(q_attn, cache.kv, table, step.attn_seqlens, cfg.d_latent, meta, None,
                                   softmax_scale=cfg.softmax_scale, causal=step.causal)  # fills the lazy metadata
            fns["attention_flashmla"] = lambda: flash_mla_with_kvcache(
                q_attn, cache.kv, table, step.attn_seqlens, cfg.d_latent, meta, None,
                softmax_scale=cfg.softmax_scale, causal=step.causal)
        except Exception as err:  # noqa: BLE001 - an older FlashMLA API: leave its column empty
            log(f"  FlashMLA call failed ({str(err).splitlines()[0][:120]}); its column stays '-'")
    times, graphed = time_parts(fns, args.iters, args.eager)
    times = slowest_rank(times)
    tokens_read = int(step.attn_seqlens.long().sum())  # the same on every rank up to one page
    bytes_per_token = tp.kv_bytes_per_token(cfg, shard, rope_once) * shard.dcp  # stored per cached token
    kv_bytes_read = tokens_read * bytes_per_token
    bytes_per_token_gpu = tp.kv_bytes_per_token(cfg, shard, rope_once)
    row = dict(config=name, world=shard.world, dcp=shard.dcp, s_q=s_q, batch=len(lengths),
               mean_length=sum(lengths) / len(lengths),
               **{f"{p}_us": times[p] for p in PARTS}, sum_of_parts_us=sum(times[p] for p in PARTS[:3]),
               attention_flashmla_us=times.get("attention_flashmla"),
               attention_gbps=kv_bytes_read / times["attention"] / 1e3,
               attention_pct_roof=100 * kv_bytes_read / card_ceilings()[0] / 1e3 / times["attention"],
               kv_bytes_per_token_gpu=bytes_per_token_gpu,
               requests_32k_per_gpu=math.floor(CACHE_GIB * 2**30 / (REQUEST_TOKENS * bytes_per_token_gpu
                                                                     * MODEL_LAYERS)),
               cuda_graphs={p: graphed[p] for p in fns})
    return row


def print_table(rows, world):
    baseline = {(r["lengths"], r["s_q"]): r for r in rows if r["config"] == "mla-tp"}
    dcp = {(r["lengths"], r["s_q"]): r for r in rows if r["config"] == "mla-dcp"}
    log("| config | lengths | s_q | attention µs | projection µs | collective µs | total µs | attention GB/s (% roof) "
        "| attention / MLA TP | total / MLA DCP | KV B/token/GPU | 32K requests/GPU in 60 GiB | FlashMLA attention µs |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = (r["lengths"], r["s_q"])
        ratio_tp = f"{r['attention_us'] / baseline[key]['attention_us']:.2f}x" if key in baseline else "-"
        ratio_dcp = f"{r['total_us'] / dcp[key]['total_us']:.2f}x" if key in dcp else "-"
        eager = [p for p, g in r["cuda_graphs"].items() if not g]
        note = f" (eager: {', '.join(eager)})" if eager else ""
        fm = f"{r['attention_flashmla_us']:,.0f}" if r["attention_flashmla_us"] else "-"
        log(f"| {CONFIGS[r['config']][3].format(n=world)}{note} | {r['lengths']} | {r['s_q']} | "
            f"{r['attention_us']:,.0f} | {r['projection_us']:,.0f} | {r['collective_us']:,.0f} | {r['total_us']:,.0f} | "
            f"{r['attention_gbps']:,.0f} ({r['attention_pct_roof']:.0f}%) | {ratio_tp} | {ratio_dcp} | "
            f"{r['kv_bytes_per_token_gpu']:,.0f} | {r['requests_32k_per_gpu']} | {fm} |")


def main():
    global RANK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=128, help="requests served by every GPU")
    ap.add_argument("--length", type=int, default=32768, help="balanced length and imbalanced mean")
    ap.add_argument("--sets", default="balanced,imbalanced")
    ap.add_argument("--sq", default="1,2")
    ap.add_argument("--iters", type=int, default=30, help="timed replays of each part")
    ap.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA graphs")
    ap.add_argument("--no-flashmla", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: b 16, 4K tokens, 3 replays")
    ap.add_argument("--out", default="bench_out", help="folder for tp.json")
    args = ap.parse_args()
    RANK = int(os.environ.get("RANK", 0))
    world, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    reason = unavailable_reason()
    if reason is None and torch.cuda.device_count() <= local_rank:
        reason = f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s)"
    if reason is not None:  # one line, status 0: nothing to measure on this machine
        log(f"bench_tp.py: cannot benchmark here: {reason}")
        return 0
    if args.quick:
        args.batch, args.length, args.iters = min(args.batch, 16), min(args.length, 4096), 3

    import torch.distributed as dist

    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    try:
        flashmla = None if args.no_flashmla else load_flashmla()
        sets = {k: v for k, v in lengths_sets(args.batch, args.length).items() if k in args.sets.split(",")}
        log(f"device: {torch.cuda.get_device_name()} x {world}  torch {torch.__version__}  NCCL "
            f"{'.'.join(map(str, torch.cuda.nccl.version()))}  b {args.batch} per GPU, bf16, h_q 128, causal")
        for set_name, lengths in sets.items():
            log(f"{set_name} lengths: mean {sum(lengths) / len(lengths):.0f}, min {min(lengths)}, max {max(lengths)}")
        if flashmla is None:
            log("FlashMLA not importable (flash_mla or vllm.third_party.flashmla): its column stays '-'")
        rows, t0 = [], time.time()
        torch.manual_seed(RANK)
        for name in args.configs.split(","):
            overrides, rope_once, context_parallel, _ = CONFIGS[name]
            cfg = Config(**overrides)
            shard = tp.Shard(world, RANK, cfg.h_q, cfg.h_kv, context_parallel)
            weights = Weights.random(cfg, seed=0, device="cuda").to(torch.bfloat16)  # the same on every rank
            layer = tp.ShardedLayer(cfg, weights, shard, tp.FLASH, rope_once)
            del weights
            comm = tp.DistComm(shard)
            for s_q in [int(s) for s in args.sq.split(",")]:
                for set_name, lengths in sets.items():
                    row = bench_case(name, layer, shard, cfg, rope_once, comm, lengths, s_q, args, flashmla)
                    torch.cuda.empty_cache()  # the case's cache and graphs are gone
                    row["lengths"] = set_name
                    rows.append(row)
                    log(f"  {name} {set_name} s_q {s_q}: " + ", ".join(f"{p} {row[p + '_us']:,.0f} µs" for p in PARTS))
            del layer
            torch.cuda.empty_cache()
        log()
        print_table(rows, world)
        log(f"\n({time.time() - t0:.0f} s; {MODEL_LAYERS}-layer model and {CACHE_GIB} GiB for the requests column)")
        if RANK == 0:
            os.makedirs(args.out, exist_ok=True)
            meta = dict(device=torch.cuda.get_device_name(), gpus=world, torch=torch.__version__,
                        nccl=".".join(map(str, torch.cuda.nccl.version())), date=time.strftime("%Y-%m-%d"),
                        commit=os.environ.get("FLASH_GLA_COMMIT", ""), batch=args.batch, length=args.length,
                        iters=args.iters, flashmla=flashmla is not None, roof_gbps=card_ceilings()[0],
                        lengths={k: list(v) for k, v in sets.items()},
                        env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")})
            with open(os.path.join(args.out, "tp.json"), "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)
            log(f"wrote {os.path.join(args.out, 'tp.json')}")
    finally:
        dist.destroy_process_group()
    return 0


RANK = 0

if __name__ == "__main__":
    sys.exit(main())
