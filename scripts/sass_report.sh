#!/usr/bin/env bash
# What the compiler made of each kernel in the built extension, one line per kernel:
# registers, static shared memory, stack frame and local memory (cuobjdump -res-usage), and
# from the SASS the number of HGMMA (wgmma) instructions, of wgmma batches (the HGMMA that
# closes a batch carries gsb0) and of LDL / STL (local-memory loads and stores: register
# spills, or arrays the compiler could not keep in registers). A decode kernel should show
# HGMMA > 0, fewer batches than HGMMA, and LDL = STL = 0: where ptxas runs out of registers
# for the wgmmas in flight it serialises them (info C7512), and then every HGMMA is a batch of
# its own, waited for before the next one issues.
#
# usage: scripts/sass_report.sh [path/to/_C*.so]
#   default .so: flash_gla/_C*.so in this checkout, else the installed flash_gla's.
#   KERNELS=REGEX  only kernels whose demangled name matches (default: all)
#   CUOBJDUMP=PATH cuobjdump to use (default: $CUDA_HOME/bin, /usr/local/cuda/bin, PATH,
#                  then the copy in Triton's wheel, triton/backends/nvidia/bin)
#   NAME_WIDTH=N   cut demangled names to N characters (default 100)
# The last line, "sass summary: ...", is what scripts/gpu_check.sh quotes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

so=${1:-}
if [[ -z $so ]]; then
    so=$(ls flash_gla/_C*.so 2>/dev/null | head -n 1 || true)
fi
if [[ -z $so ]]; then  # an installed copy; find it without importing flash_gla (needs torch)
    so=$("$PY" -c 'import glob, os, sys
hits = [h for p in sys.path for h in glob.glob(os.path.join(p or ".", "flash_gla", "_C*.so"))]
print(hits[0] if hits else "")' 2>/dev/null || true)
fi
if [[ -z $so || ! -f $so ]]; then
    echo "sass_report: no built extension found (flash_gla/_C*.so); run 'make develop' or 'make install' first" >&2
    exit 1
fi

find_cuobjdump() {
    local c
    for c in "${CUOBJDUMP:-}" "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" /usr/local/cuda/bin/cuobjdump \
             "$(command -v cuobjdump 2>/dev/null || true)"; do
        [[ -n $c && -x $c ]] && { echo "$c"; return 0; }
    done
    c=$("$PY" -c 'import importlib.util, os
s = importlib.util.find_spec("triton")
print(os.path.join(s.submodule_search_locations[0], "backends", "nvidia", "bin", "cuobjdump") if s else "")' 2>/dev/null || true)
    [[ -n $c && -x $c ]] && { echo "$c"; return 0; }
    return 1
}
if ! CUO=$(find_cuobjdump); then
    echo "sass_report: cuobjdump not found; set CUOBJDUMP, install the CUDA toolkit, or pip install triton" >&2
    exit 1
fi
if command -v c++filt >/dev/null; then DEMANGLE=(c++filt -p); else DEMANGLE=(cat); fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$CUO" -res-usage "$so" >"$work/res"
"$CUO" -sass "$so" >"$work/sass"

echo "sass report: $so"
echo "  cuobjdump: $CUO   (SHARED is static smem only; dynamic smem is set at launch)"
# One row per kernel: REG SHARED STACK LOCAL HGMMA BATCH LDL STL mangled-name. A kernel compiled
# into several units appears several times in the dumps; the last entry wins.
awk '
    FNR == 1 { file++ }
    file == 1 && /^ Function .*:$/ { name = $2; sub(/:$/, "", name); seen[name] = 1; next }
    file == 1 && name != "" && /REG:/ {
        for (i = 1; i <= NF; i++) { split($i, kv, ":"); res[name, kv[1]] = kv[2] }
        name = ""; next
    }
    file == 2 && /Function : / { fn = $NF; seen[fn] = 1; hg[fn] = bt[fn] = ld[fn] = st[fn] = 0; next }
    file == 2 && fn != "" {
        if ($0 ~ /HGMMA/) { hg[fn]++; if ($0 ~ /gsb0/) bt[fn]++ }
        if ($0 ~ /[[:space:]]LDL(\.[A-Z0-9.]+)?[[:space:]]/) ld[fn]++
        if ($0 ~ /[[:space:]]STL(\.[A-Z0-9.]+)?[[:space:]]/) st[fn]++
    }
    END {
        for (f in seen)
            printf "%s %s %s %s %d %d %d %d %s\n", res[f, "REG"] + 0, res[f, "SHARED"] + 0, res[f, "STACK"] + 0,
                res[f, "LOCAL"] + 0, hg[f], bt[f], ld[f], st[f], f
    }
' "$work/res" "$work/sass" | sort -k9 >"$work/rows"

# Demangle the name column (c++filt leaves the numbers alone) and apply KERNELS.
"${DEMANGLE[@]}" <"$work/rows" | grep -E -- "^([0-9]+ ){8}.*(${KERNELS:-.})" >"$work/table" || true

width=${NAME_WIDTH:-100}
printf '  %5s %7s %5s %5s %6s %5s %5s %5s  %s\n' REG SHARED STACK LOCAL HGMMA BATCH LDL STL kernel
awk -v w="$width" '{
    name = $9; for (i = 10; i <= NF; i++) name = name " " $i
    if (length(name) > w) name = substr(name, 1, w - 3) "..."
    printf "  %5d %7d %5d %5d %6d %5d %5d %5d  %s%s\n", $1, $2, $3, $4, $5, $6, $7, $8, name,
           ($5 > 1 && $6 == $5) ? "   <- wgmmas serialised" : ""
}' "$work/table"

awk '{ n++; hg += $5; ld += $7; st += $8; if ($1 > maxreg) maxreg = $1; if ($3 + $4 + $7 + $8 > 0) spill++
       if ($5 > 1 && $6 == $5) serial++ }
     END { printf "sass summary: %d kernels, HGMMA %d, LDL %d, STL %d, max REG %d, %d kernel(s) touching local memory, %d with serialised wgmmas\n",
                  n, hg, ld, st, maxreg, spill, serial + 0 }' "$work/table"
