"""Builds of flash_gla on one GPU, row by row: is each faster than the first, and by how much?

Each build is a wheel (`make wheel`, `pip wheel .`) or a folder that holds a built `flash_gla/`
package (an unpacked wheel, or a checkout after `make develop`). Wheels are unpacked into the
work folder, not installed, so the machine's own packages stay as they are; each build is
imported from its folder (first on PYTHONPATH) in its own process.

bench_decode.py runs once per build and round, the builds taking turns (A, B, C, A, B, C, ...),
so that a drift of the card's clocks under its power limit falls on every build alike. A row's
time is the median over the rounds of each build's sustained time (bench_decode's median of
CUDA-graph replays); each later build's ratio is A's time over its own (above 1: it is faster
than A).

    python benchmarks/compare_builds.py A.whl B.whl --configs gla2,gla1 --lengths 4096,32768 --sq 2,4
    python benchmarks/compare_builds.py A.whl B.whl C.whl --rounds 3 --out DIR   # also DIR/compare.json

Arguments this script does not know go to bench_decode.py (which then also gets --no-flashmla
and --no-burst: the comparison is between the two builds only).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))


def unpack(build, work, label):
    """The folder to put first on PYTHONPATH for `build` (a wheel, or a folder with flash_gla/)."""
    if os.path.isdir(build):
        folder = os.path.abspath(build)
    else:
        folder = os.path.join(work, label)
        with zipfile.ZipFile(build) as wheel:
            wheel.extractall(folder)
    if not os.path.isdir(os.path.join(folder, "flash_gla")):
        sys.exit(f"compare_builds.py: {build} holds no flash_gla/ package")
    return folder


def build_env(folder):
    env = dict(os.environ)
    env["PYTHONPATH"] = folder + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def check_import(folder):
    """The flash_gla that the build's process imports must be the build's own."""
    # Run from the build's folder: `python -c` puts the working directory first on sys.path, and
    # in a source checkout that would be the checkout's own flash_gla/.
    out = subprocess.run([sys.executable, "-c", "import flash_gla, flash_gla._C; print(flash_gla.__file__)"],
                         env=build_env(folder), capture_output=True, text=True, cwd=folder)
    path = out.stdout.strip()
    if out.returncode != 0 or not os.path.abspath(path).startswith(folder + os.sep):
        sys.exit(f"compare_builds.py: the build in {folder} does not import from there "
                 f"({path or out.stderr.strip().splitlines()[-1:]})")


def run_bench(folder, bench_args, out_dir, log):
    cmd = [sys.executable, os.path.join(HERE, "bench_decode.py"), *bench_args, "--no-flashmla", "--no-burst",
           "--out", out_dir]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=build_env(folder), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"compare_builds.py: bench_decode.py failed (exit {rc}); see {log}")
    with open(os.path.join(out_dir, "bench.json")) as f:
        return json.load(f)


def row_key(row):
    return (row["config"], row["length"], row["s_q"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="wheels, or folders holding flash_gla/; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=2, help="bench_decode runs per build, taking turns")
    ap.add_argument("--out", default=None, help="folder for compare.json and each run's log")
    args, bench_args = ap.parse_known_args()
    if len(args.builds) < 2:
        ap.error("give at least two builds")
    work = args.out or tempfile.mkdtemp(prefix="compare_builds_")
    os.makedirs(work, exist_ok=True)
    labels = [chr(ord("A") + i) for i in range(len(args.builds))]
    folders = {label: unpack(build, work, f"build_{label.lower()}") for label, build in zip(labels, args.builds)}
    for folder in folders.values():
        check_import(folder)

    times = {label: {} for label in labels}  # key -> [us per round]
    meta = {}
    for r in range(args.rounds):
        for label, folder in folders.items():
            run_dir = os.path.join(work, f"run_{label}{r}")
            result = run_bench(folder, bench_args, run_dir, os.path.join(work, f"run_{label}{r}.log"))
            meta.setdefault(label, result["meta"])
            for row in result["rows"]:
                if row.get("us") is not None:
                    times[label].setdefault(row_key(row), []).append(row["us"])
            print(f"round {r + 1}/{args.rounds}, build {label}: {len(result['rows'])} rows", flush=True)

    print(f"device: {meta['A']['device']}   ({args.rounds} rounds each)")
    for label, build in zip(labels, args.builds):
        print(f"  {label}: {build}")
    others = labels[1:]
    print(f"{'config':16s} {'length':>7s} {'s_q':>3s} {'A us':>9s}" + "".join(f" {x + ' us':>9s} {'A/' + x:>6s}" for x in others))
    rows = []
    for key in times["A"]:
        if any(key not in times[x] for x in others):
            continue
        med = {x: statistics.median(times[x][key]) for x in labels}
        rows.append(dict(config=key[0], length=key[1], s_q=key[2], us={x: med[x] for x in labels},
                         a_over={x: med["A"] / med[x] for x in others}, rounds={x: times[x][key] for x in labels}))
        print(f"{key[0]:16s} {str(key[1]):>7s} {key[2]:3d} {med['A']:9.1f}" +
              "".join(f" {med[x]:9.1f} {med['A'] / med[x]:6.3f}" for x in others))
    if args.out:
        with open(os.path.join(args.out, "compare.json"), "w") as f:
            json.dump(dict(builds=dict(zip(labels, args.builds)), meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
