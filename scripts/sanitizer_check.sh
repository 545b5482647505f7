#!/usr/bin/env bash
# compute-sanitizer over scripts/decode_smoke.py (one small call per compiled decode instance,
# bf16 and fp16, checked against the reference): memcheck, racecheck and synccheck, each in its
# own run. Prints each tool's summary line and exits non-zero if any tool reports an error or
# the smoke run itself fails. Needs an sm_90 GPU, the built extension and compute-sanitizer
# (CUDA toolkit; $CUDA_HOME/bin or PATH).
#
# usage: scripts/sanitizer_check.sh [OUT_DIR]      (logs: OUT_DIR/sanitizer_<tool>.log)
#        TOOLS="memcheck racecheck" SMOKE_ARGS="--dtypes bf16" scripts/sanitizer_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench_out/sanitizer}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
[[ -x $SANITIZER ]] || { echo "compute-sanitizer not found (set SANITIZER=...)"; exit 2; }
rc=0
for tool in ${TOOLS:-memcheck racecheck synccheck}; do
    log=$OUT_DIR/sanitizer_$tool.log
    extra=()
    [[ $tool == racecheck ]] && extra=(--racecheck-report hazard)
    "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 99 "$PY" scripts/decode_smoke.py ${SMOKE_ARGS:-} >"$log" 2>&1
    trc=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -n 1)
    smoke=$(grep -c ": ok$" "$log")
    echo "$tool: rc $trc; ${summary:-no summary}; $smoke calls matched the reference"
    if ((trc != 0)); then
        rc=1
        grep -m 20 -E "Error|Hazard|FAILED|Invalid" "$log"
    fi
done
exit $rc
