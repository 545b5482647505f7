#!/usr/bin/env bash
# Nsight Compute sections for one decode kernel launch per configuration (on the H100, after
# scripts/h100.sh built the extension): speed of light, compute and memory workload, warp
# stalls. usage: scripts/ncu_decode.sh OUT_DIR "gla2:32768:2" ["mla:32768:2" ...]
set -uo pipefail
OUT_DIR=${1:?usage: scripts/ncu_decode.sh OUT_DIR CONFIG:LENGTH:SQ ...}
shift
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
[[ -n $NCU ]] || { echo "ncu not found"; exit 1; }
for spec in "$@"; do
    IFS=: read -r cfg len sq <<<"$spec"
    echo "==== $spec ===="
    timeout 240 "$NCU" -k regex:decode_kernel --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats \
        python benchmarks/profile_kernels.py --configs "$cfg" --lengths "$len" --sq "$sq" --iters 1 --plain 2>&1 \
        | grep -v "^==PROF==" | sed -n '/decode_kernel/,$p'
done >"$OUT_DIR/ncu.txt" 2>&1
tail -n 5 "$OUT_DIR/ncu.txt"
