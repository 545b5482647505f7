#!/usr/bin/env bash
# Build (or install a wheel), inspect, test and benchmark flash_gla on a Hopper GPU (H100 or H200)
# in one command.
#
# usage: scripts/gpu_check.sh OUT_DIR      (from anywhere; it works in the checkout's root)
#        WHEEL=path/to/flash_gla-...-cp310-abi3-linux_x86_64.whl scripts/gpu_check.sh OUT_DIR
#        make gpu-check                    (OUT_DIR bench_out/gpu-check; WHEEL=... as above)
#
# With WHEEL, nothing is compiled here: the install stage installs that wheel (built elsewhere,
# e.g. `make wheel` on a CPU machine with any torch >= 2.10; pip install --no-deps --no-index, so
# no network is needed and the machine's torch stays), and the sass, test and bench stages run on
# the installed package (PYTHONSAFEPATH=1 keeps the checkout's flash_gla/ off sys.path).
#
# The machine needs a CUDA build of torch, nvcc >= 12.8 and, for the build, the CUTLASS
# headers. It may have no network: bring what it cannot download in the git-ignored folder
# offline/ of the checkout, fetched on a machine that has network (third_party/README.md):
#   offline/whl/nvidia_cutlass-*.whl   `pip download nvidia-cutlass --no-deps -d offline/whl/`;
#                                      unpacked without network, CUTLASS_DIR points into it
#   offline/flashmla/                  FlashMLA, as shipped inside vLLM's wheel, put on
#                                      PYTHONPATH for the benchmark (optional: without it the
#                                      benchmark skips the comparison)
# With network, or with nvidia-cutlass already installed, offline/ is not needed.
#
# Environment:
#   STAGES="build sass test bench"  stages to run, in this order (default: all four; with WHEEL
#                                   "install sass test bench"); a stage left out reuses what an
#                                   earlier call left behind
#   BUDGET_S=570                    time budget of the whole run, in seconds: build, test and
#                                   bench each get what is left (less a 20 s margin) and are
#                                   stopped when it runs out, so the summary always prints within
#                                   BUDGET_S; raise it if a stage is cut short
#   MAX_JOBS=16                     parallel compile jobs (about 2.3 GB of memory each)
#   PYTEST_ARGS="..."               extra pytest arguments (e.g. -k gla2)
#   BENCH_ARGS="..."                extra benchmark arguments (e.g. --configs gta8 --sq 1)
#   BENCH_HOST_OVERHEAD_ARGS, BENCH_CACHE_WRITE_ARGS, BENCH_SERVING_ARGS
#                                   arguments of the engine benchmarks that follow it
#   TEST_TIMEOUT_S=300              per-test limit, where pytest-timeout is installed
#
# Files in OUT_DIR:
#   gpu_check.log  everything printed here: device, stage results, sass report, summary
#   build.log      the compiler's output, with ptxas register / spill reports
#   test.log       pytest's output;  junit.xml  per-test results
#   bench.log      the benchmark's output, plus bench.json and bench.png (its --out OUT_DIR)
set -uo pipefail

OUT_DIR=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEEL=${WHEEL:-}
if [[ -n $WHEEL ]]; then
    [[ -f $WHEEL ]] || { echo "WHEEL=$WHEEL: no such file"; exit 2; }
    WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
    STAGES=${STAGES:-install sass test bench}
    [[ " $STAGES " != *" build "* ]] || { echo "STAGES has build and WHEEL is set: choose one"; exit 2; }
    export PYTHONSAFEPATH=1  # import the installed flash_gla, not ./flash_gla (Python >= 3.11)
    PACKAGE_PATH=""          # for the benchmarks: the installed package, no checkout on PYTHONPATH
else
    STAGES=${STAGES:-build sass test bench}
    PACKAGE_PATH=$PWD:
fi
BUDGET_S=${BUDGET_S:-570}
DEADLINE=$(($(date +%s) + BUDGET_S))
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
export MAX_JOBS=${MAX_JOBS:-16}
# On the GPU a kernel test must run, never skip: a broken build must not pass as "all skipped".
export FLASH_GLA_REQUIRE_GPU=1

want() { [[ " $STAGES " == *" $1 "* ]]; }
left() {  # seconds a stage may still use (at least 1: `timeout 0` would mean no limit)
    local s=$((DEADLINE - $(date +%s) - 20))
    echo $((s > 1 ? s : 1))
}
banner() { printf '\n==== %s (%s) ====\n' "$1" "$(date +%H:%M:%S)"; }

# Make CUTLASS findable by setup.py: an explicit CUTLASS_DIR or third_party/cutlass wins,
# else unpack the wheel in offline/whl/ (once per machine) and point CUTLASS_DIR into it.
setup_cutlass() {
    [[ -n ${CUTLASS_DIR:-} || -f third_party/cutlass/include/cute/tensor.hpp ]] && return 0
    local whl site=/tmp/flash_gla_cutlass
    whl=$(ls offline/whl/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)
    if [[ -n $whl ]]; then
        if [[ ! -f $site/cutlass_library/source/include/cute/tensor.hpp ]]; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$whl" || return 1
        fi
        export CUTLASS_DIR=$site/cutlass_library/source
    elif ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("cutlass_library") is None)'; then
        echo "no CUTLASS headers: install nvidia-cutlass, set CUTLASS_DIR, or put the wheel in offline/whl/"
        echo "  (on a machine with network: pip download nvidia-cutlass --no-deps -d offline/whl/)"
        return 1
    fi
}

main() {
    local build_msg="not run" test_msg="not run" bench_msg="not run" sass_msg="not run" ptxas_msg="" rc=0

    banner device
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader \
        || echo "nvidia-smi failed"
    "$PY" -c 'import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")'
    nvcc --version | tail -n 2 | head -n 1
    echo "stages: $STAGES; budget ${BUDGET_S}s; MAX_JOBS=$MAX_JOBS${WHEEL:+; wheel $WHEEL}"

    if want install; then
        banner install
        if "$PY" -m pip install --no-deps --no-index --force-reinstall "$WHEEL" >"$OUT_DIR/build.log" 2>&1 \
            && (cd / && "$PY" -m flash_gla) | tee -a "$OUT_DIR/build.log" \
            && (cd / && "$PY" -c 'import flash_gla, sys; sys.exit(0 if flash_gla.build_info() else 1)'); then
            build_msg="installed $(basename "$WHEEL") (no compile)"
        else
            build_msg="FAILED: installing $(basename "$WHEEL"), see build.log"
            rc=1
            tail -n 30 "$OUT_DIR/build.log"
        fi
        # Tests and benchmarks must see the installed copy, not a stale build in the checkout.
        local where
        where=$("$PY" -c 'import flash_gla; print(flash_gla.__file__)' 2>&1)
        echo "flash_gla imported from $where"
        if [[ $where == "$PWD"/* ]]; then
            echo "that is the checkout, not the installed wheel (Python < 3.11 ignores PYTHONSAFEPATH)"
            build_msg="$build_msg; WARNING: the checkout's flash_gla shadows the wheel"
            rc=1
        fi
    fi

    if want build; then
        banner build
        if setup_cutlass; then
            echo "CUTLASS_DIR=${CUTLASS_DIR:-<found by setup.py>}"
            local t0=$(date +%s)
            FLASH_GLA_PTXAS_VERBOSE=1 timeout "$(left)" "$PY" setup.py build_ext --inplace >"$OUT_DIR/build.log" 2>&1
            local brc=$? secs=$(($(date +%s) - t0))
            echo "build_time_s=$secs rc=$brc" | tee -a "$OUT_DIR/build.log"
            if ((brc == 0)); then
                build_msg="ok in ${secs}s"
            else
                build_msg="FAILED (rc $brc) after ${secs}s, see build.log"
                rc=1
                grep -n -m 40 -E "error|Error" "$OUT_DIR/build.log"
                tail -n 30 "$OUT_DIR/build.log"
            fi
            # ptxas -v prints "N bytes stack frame, N bytes spill stores, N bytes spill loads".
            local spills stacks
            spills=$(grep -c -E "\b[1-9][0-9]* bytes spill (stores|loads)" "$OUT_DIR/build.log")
            stacks=$(grep -c -E "\b[1-9][0-9]* bytes stack frame" "$OUT_DIR/build.log")
            ptxas_msg="ptxas: $spills function(s) spilling, $stacks with a stack frame"
            grep -q "ptxas info" "$OUT_DIR/build.log" || ptxas_msg="ptxas: no reports (nothing was recompiled)"
            echo "$ptxas_msg"
        else
            build_msg="FAILED: no CUTLASS headers"
            rc=1
        fi
    fi

    if want sass; then
        banner sass
        local report
        report=$(bash scripts/sass_report.sh 2>&1)
        echo "$report"
        sass_msg=$(echo "$report" | grep '^sass summary:' || echo "sass report failed")
    fi

    if want test; then
        banner test
        local timeout_arg=()
        "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_arg=(--timeout="${TEST_TIMEOUT_S:-300}")
        rm -f "$OUT_DIR/junit.xml"
        # SIGINT first: pytest then stops cleanly and still writes its summary and junit.xml.
        timeout --signal=INT --kill-after=15 "$(left)" \
            "$PY" -m pytest tests -q -rfE -p no:cacheprovider --junitxml "$OUT_DIR/junit.xml" \
            "${timeout_arg[@]}" ${PYTEST_ARGS:-} >"$OUT_DIR/test.log" 2>&1
        local trc=$?
        tail -n 40 "$OUT_DIR/test.log"
        test_msg=$("$PY" - "$OUT_DIR/junit.xml" "$trc" <<'EOF'
import sys, xml.etree.ElementTree as ET
path, rc = sys.argv[1], int(sys.argv[2])
try:
    root = ET.parse(path).getroot()
except (OSError, ET.ParseError):
    print(f"no junit.xml (pytest rc {rc}), see test.log")
    sys.exit()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped (pytest rc {rc})")
EOF
)
        ((trc == 0)) || rc=1
    fi

    if want bench; then
        banner bench
        # Clocks, temperature, power and throttle reasons around the run (read only), to tell
        # a slow row from a throttled GPU.
        local gpu_state="clocks.sm,clocks.max.sm,temperature.gpu,power.draw,clocks_throttle_reasons.active"
        echo "gpu before: $(nvidia-smi --query-gpu=$gpu_state --format=csv,noheader 2>&1 | head -n 1)"
        if [[ -f benchmarks/bench_decode.py ]]; then
            PYTHONPATH=$PACKAGE_PATH$PWD/offline/flashmla${PYTHONPATH:+:$PYTHONPATH} \
                timeout --signal=INT --kill-after=15 "$(left)" \
                "$PY" benchmarks/bench_decode.py --out "$OUT_DIR" ${BENCH_ARGS:-} >"$OUT_DIR/bench.log" 2>&1
            local xrc=$?
            echo "gpu after:  $(nvidia-smi --query-gpu=$gpu_state --format=csv,noheader 2>&1 | head -n 1)" \
                | tee -a "$OUT_DIR/bench.log"
            # The engine-facing benchmarks print their tables into the same log.
            local script
            for script in bench_host_overhead bench_cache_write bench_serving; do
                [[ -f benchmarks/$script.py ]] || continue
                local args_var="${script^^}_ARGS"
                printf '\n==== %s ====\n' "$script" >>"$OUT_DIR/bench.log"
                PYTHONPATH=$PACKAGE_PATH$PWD/offline/flashmla${PYTHONPATH:+:$PYTHONPATH} \
                    timeout --signal=INT --kill-after=15 "$(left)" \
                    "$PY" "benchmarks/$script.py" ${!args_var:-} >>"$OUT_DIR/bench.log" 2>&1 || xrc=$?
            done
            tail -n 120 "$OUT_DIR/bench.log"
            if ((xrc == 0)); then bench_msg="ok, see bench.log"; else bench_msg="FAILED (rc $xrc), see bench.log"; rc=1; fi
        else
            bench_msg="skipped: benchmarks/bench_decode.py does not exist yet"
        fi
    fi

    banner summary
    echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
    echo "build:  $build_msg${ptxas_msg:+; $ptxas_msg}"
    echo "sass:   $sass_msg"
    echo "tests:  $test_msg"
    echo "bench:  $bench_msg"
    echo "files:  $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
    return $rc
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
