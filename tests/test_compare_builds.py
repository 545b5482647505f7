"""benchmarks/compare_builds.py without a GPU: it unpacks the builds, lets their runs take turns
and pairs their rows; the benchmark runs themselves are replaced by canned results."""

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_builds.py"
pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="no benchmarks/ beside the tests (not a source checkout)")


def load_script():
    spec = importlib.util.spec_from_file_location("compare_builds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_wheel(path, marker):
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("flash_gla/__init__.py", f"BUILD = {marker!r}\n")
    return path


def test_rows_pair_up_with_medians_over_rounds_taken_in_turn(tmp_path, monkeypatch, capsys):
    cb = load_script()
    wheels = [fake_wheel(tmp_path / f"{x}.whl", x) for x in "abc"]
    # us per (build, round) for two rows; B is 10 % faster on the first, A on the second
    canned = {"build_a": [(100.0, 50.0), (104.0, 52.0), (102.0, 51.0)],
              "build_b": [(90.0, 60.0), (94.0, 62.0), (92.0, 61.0)],
              "build_c": [(51.0, 50.0), (52.0, 52.0), (50.0, 51.0)]}
    order = []

    def run_bench(folder, bench_args, out_dir, log):
        label = Path(folder).name
        assert (Path(folder) / "flash_gla" / "__init__.py").read_text() == f"BUILD = {label[-1]!r}\n"
        assert bench_args == ["--configs", "gla2", "--sq", "2"]
        r = sum(1 for x in order if x == label)
        order.append(label)
        first, second = canned[label][r]
        rows = [dict(config="gla2", length=4096, s_q=2, us=first), dict(config="gla2", length=32768, s_q=2, us=second),
                dict(config="gqa8", length=4096, s_q=2, us=None)]  # roofline only: no time
        return dict(meta=dict(device="test"), rows=rows)

    monkeypatch.setattr(cb, "run_bench", run_bench)
    monkeypatch.setattr(cb, "check_import", lambda folder: None)
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["compare_builds.py", *map(str, wheels), "--rounds", "3", "--out", str(out),
                                     "--configs", "gla2", "--sq", "2"])
    assert cb.main() == 0
    assert order == ["build_a", "build_b", "build_c"] * 3
    result = json.loads((out / "compare.json").read_text())
    by_length = {row["length"]: row for row in result["rows"]}
    assert set(by_length) == {4096, 32768}
    assert by_length[4096]["us"] == {"A": 102.0, "B": 92.0, "C": 51.0}
    assert by_length[4096]["a_over"]["B"] == pytest.approx(102.0 / 92.0)
    assert by_length[4096]["a_over"]["C"] == pytest.approx(2.0)
    assert by_length[32768]["a_over"]["B"] == pytest.approx(51.0 / 61.0)
    assert "1.109" in capsys.readouterr().out


def test_one_build_is_refused(tmp_path, monkeypatch):
    cb = load_script()
    monkeypatch.setattr("sys.argv", ["compare_builds.py", str(fake_wheel(tmp_path / "a.whl", "a"))])
    with pytest.raises(SystemExit):
        cb.main()


def test_a_folder_without_the_package_is_refused(tmp_path):
    cb = load_script()
    with pytest.raises(SystemExit, match="holds no flash_gla"):
        cb.unpack(str(tmp_path), str(tmp_path / "work"), "build_a")
