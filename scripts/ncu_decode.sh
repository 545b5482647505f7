#!/usr/bin/env bash
# Nsight Compute sections for one decode kernel launch per configuration (on a Hopper GPU, after
# scripts/gpu_check.sh built the extension): speed of light, compute and memory workload, warp
# stalls, and the busy share of the pipes that bound a decode kernel (tensor, ALU, FMA, issue
# slots; shared memory is in the memory section's "Mem Busy"). The SM clock is left as the
# benchmark sees it (--clock-control none), so durations compare with bench_decode.py's.
#
# usage: scripts/ncu_decode.sh OUT_DIR CONFIG:LENGTH:SQ [...]     e.g. gla2:32768:2 mla:4096:1
# Writes OUT_DIR/ncu.txt (every section) and OUT_DIR/ncu_summary.txt (a few lines per kernel).
set -uo pipefail
OUT_DIR=${1:?usage: scripts/ncu_decode.sh OUT_DIR CONFIG:LENGTH:SQ ...}
shift
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
[[ -n $NCU ]] || { echo "ncu not found"; exit 1; }
METRICS=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
METRICS+=,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active
METRICS+=,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active
METRICS+=,smsp__issue_active.avg.pct_of_peak_sustained_active
METRICS+=,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum
for spec in "$@"; do
    IFS=: read -r cfg len sq <<<"$spec"
    echo "==== $spec ===="
    profile() {
        timeout "${NCU_TIMEOUT_S:-120}" "$NCU" --clock-control none -k regex:decode_kernel --launch-skip 3 \
            --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
            --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats "$@" \
            python benchmarks/profile_kernels.py --configs "$cfg" --lengths "$len" --sq "$sq" --iters 4 --plain 2>&1 \
            | grep -v "^==PROF==" | sed -n '/decode_kernel/,$p'
    }
    # An Nsight Compute that lacks one of the metrics profiles the sections alone.
    report=$(profile --metrics "$METRICS")
    grep -q Duration <<<"$report" || report=$(profile)
    echo "$report"
done >"$OUT_DIR/ncu.txt" 2>&1
grep -E "^==== |decode_kernel|Duration|DRAM Throughput|Compute \(SM\) Throughput|Mem Busy|L2 Hit Rate|Issue Slots Busy|No Eligible|sm__pipe|smsp__issue|bank_conflicts" \
    "$OUT_DIR/ncu.txt" | sed -E 's/ +/ /g' >"$OUT_DIR/ncu_summary.txt"
cat "$OUT_DIR/ncu_summary.txt"
