"""What a newcomer runs first: examples/quickstart.py, the README's Usage example and `make bench`.

The scripts run in a subprocess, as a user runs them. Without an sm_90 GPU the quickstart
must still pass (reference only, exit 0); on an H100 every kernel result it prints must be
close to the reference.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flash_gla

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.py"
README = ROOT / "README.md"
BENCH = ROOT / "benchmarks" / "bench_decode.py"
# The folder holding the flash_gla these tests import, so the scripts import the same one.
PACKAGE_PARENT = str(Path(flash_gla.__file__).resolve().parents[1])
HAVE_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def run_script(path, *args):
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    return subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600
    )


@pytest.mark.skipif(not QUICKSTART.is_file(), reason="no examples/ beside the tests (not a source checkout)")
def test_quickstart_runs():
    proc = run_script(QUICKSTART)
    assert proc.returncode == 0, f"quickstart failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    if not HAVE_SM90:
        assert "no sm_90 GPU here" in proc.stdout, proc.stdout
        assert len(re.findall(r"reference only: out", proc.stdout)) == 3, proc.stdout
        return
    errors = re.findall(r"^(.+?)\s+max \|out - ref\| \S+ \(relative (\S+)\), max \|lse - ref\| (\S+)$",
                        proc.stdout, re.M)
    assert [name for name, _, _ in errors] == ["gla, RoPE inline", "gla, rope_cache", "gta"], proc.stdout
    for name, rel, lse in errors:
        assert float(rel) < 2e-2, f"{name}: relative error {rel}\n{proc.stdout}"
        assert float(lse) < 1e-2, f"{name}: lse error {lse}\n{proc.stdout}"


def python_block_after(text, heading):
    """The first ```python block under ``heading`` in a Markdown text, as lines."""
    section = text.split(f"\n{heading}\n", 1)[1]
    match = re.search(r"^```python\n(.*?)^```", section, re.M | re.S)
    assert match, f"no python block under {heading}"
    return match.group(1).splitlines()


@pytest.mark.skipif(not (QUICKSTART.is_file() and README.is_file()), reason="not a source checkout")
def test_readme_usage_is_the_quickstart_core():
    """The README's example is the script's code between its README markers, less the part
    marked "script only": what the test above runs is what the README shows."""
    script = QUICKSTART.read_text(encoding="utf-8").splitlines()
    begin = script.index("# ---- README Usage: begin ----")
    end = script.index("# ---- README Usage: end ----")
    core = script[begin + 1:end]
    only_begin = core.index("# ---- script only, not in the README: begin ----")
    only_end = core.index("# ---- script only, not in the README: end ----")
    core = core[:only_begin] + core[only_end + 1:]
    readme = python_block_after(README.read_text(encoding="utf-8"), "## Usage")
    assert readme == core


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the whole benchmark")
@pytest.mark.skipif(not BENCH.is_file(), reason="no benchmarks/ beside the tests (not a source checkout)")
def test_bench_without_a_gpu_says_why_in_one_line():
    proc = run_script(BENCH)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "bench_decode.py: cannot benchmark here: no CUDA GPU (torch.cuda.is_available() is False); "
        "it needs an sm_90 GPU (H100 / H200)"
    ]
