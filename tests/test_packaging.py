"""What the package promises around the kernels: its names, its version, its build checks, the
build record, and that the built library depends on nothing of torch but its stable C ABI.

CPU only and fast: nothing here compiles. setup.py is run in a subprocess only where it
stops before torch is imported (a bad CUDA_HOME), and ``import flash_gla`` is run in a
subprocess where a fake torch version or build record must be in place before the import.
"""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flash_gla

ROOT = Path(__file__).resolve().parents[1]
SETUP_PY = ROOT / "setup.py"
# The folder holding the flash_gla these tests import, for subprocesses to import the same one.
PACKAGE_PARENT = str(Path(flash_gla.__file__).resolve().parents[1])


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter that imports the same flash_gla; (rc, stdout, stderr)."""
    environ = dict(os.environ, PYTHONPATH=PACKAGE_PARENT, **env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ, timeout=120
    )
    return proc.returncode, proc.stdout, proc.stderr


# ----------------------------------------------------------------------------------------
# Public names
# ----------------------------------------------------------------------------------------


def test_reference_is_an_attribute_of_the_package():
    assert flash_gla.reference.gla_with_kvcache_ref is not None
    assert flash_gla.reference.gta_with_kvcache_ref is not None
    assert "reference" in flash_gla.__all__


def test_version_comes_from_version_py():
    from flash_gla.version import __version__

    assert flash_gla.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([abc]|rc|\.dev|\.post)?\d*", flash_gla.__version__), flash_gla.__version__


@pytest.mark.skipif(not SETUP_PY.is_file(), reason="no setup.py beside the tests (not a source checkout)")
def test_setup_py_has_no_version_of_its_own():
    text = SETUP_PY.read_text(encoding="utf-8")
    assert re.search(r"""^\s*VERSION\s*=\s*["']""", text, re.M) is None, "setup.py must read flash_gla/version.py"
    assert 'flash_gla" / "version.py"' in text


def test_readme_names_the_wheel_of_this_version():
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md beside the tests (not a source checkout)")
    assert f"dist/flash_gla-{flash_gla.__version__}-cp310-abi3-linux_x86_64.whl" in readme.read_text(encoding="utf-8")


def test_installed_metadata_has_the_package_version():
    try:
        installed = importlib.metadata.version("flash_gla")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("flash_gla is not installed (a plain source checkout)")
    assert installed == flash_gla.__version__


# ----------------------------------------------------------------------------------------
# torch versions, the build record, the stable ABI
# ----------------------------------------------------------------------------------------


def test_import_refuses_a_torch_older_than_the_minimum():
    from flash_gla.version import MIN_TORCH

    rc, out, err = run_python(
        """
        import sys, torch
        torch.__version__ = "2.1.2+cu121"
        try:
            import flash_gla
        except ImportError as e:
            print(e)
            sys.exit(3)
        """
    )
    assert rc == 3, f"import flash_gla did not raise ImportError (rc {rc}):\n{out}\n{err}"
    assert f"flash_gla needs torch >= {MIN_TORCH}" in out and "running torch is 2.1.2+cu121" in out, out


def test_import_accepts_a_torch_other_than_the_build_one():
    """The extension is on torch's stable ABI: any torch >= MIN_TORCH runs it, whichever built it."""
    rc, out, err = run_python(
        """
        import sys, types
        info = types.ModuleType("flash_gla._build_info")
        info.BUILD = {"torch_built_with": "9.9.9+elsewhere", "min_torch": "2.10"}
        sys.modules["flash_gla._build_info"] = info
        import flash_gla
        print(flash_gla.__version__, flash_gla.build_info()["torch_built_with"])
        """
    )
    assert rc == 0, err
    assert out.split() == [flash_gla.__version__, "9.9.9+elsewhere"]


def test_import_works_without_build_info():
    """A source checkout that was never built: the reference still works."""
    rc, out, err = run_python(
        """
        import sys
        sys.modules["flash_gla._build_info"] = None  # as if the file did not exist
        import torch, flash_gla
        from flash_gla.reference import attention_ref
        assert flash_gla.build_info() == {}
        out, lse = attention_ref(torch.ones(1, 2, 4), torch.ones(3, 1, 4), torch.ones(3, 1, 4), False, 0.5)
        print(tuple(out.shape))
        """
    )
    assert rc == 0, err
    assert out.strip() == "(1, 2, 4)"


def built_extension():
    """The flash_gla/_C*.so beside the imported package, or skip (a checkout that was never built)."""
    found = sorted(Path(flash_gla.__file__).parent.glob("_C*.so"))
    if not found:
        pytest.skip("flash_gla._C is not built")
    return found


def test_build_record_says_what_was_built():
    built_extension()
    from flash_gla.version import MIN_TORCH

    info = flash_gla.build_info()
    assert info, "a built extension without its build record (flash_gla/_build_info.py)"
    assert info["version"] == flash_gla.__version__
    assert info["arch"] == "sm_90a" and info["min_torch"] == MIN_TORCH
    assert re.fullmatch(r"\d+\.\d+", info["cuda"]) and re.fullmatch(r"\d+\.\d+\.\d+", info["cutlass"] or ""), info
    assert re.fullmatch(r"\d+\.\d+.*", info["torch_built_with"]), info
    assert info["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", info["git_commit"]), info


def test_extension_is_one_abi3_library():
    """_C.abi3.so only: Python's limited API, and no interpreter-tagged copy that would win the import."""
    assert [p.name for p in built_extension()] == ["_C.abi3.so"]
    import flash_gla._C

    assert Path(flash_gla._C.__file__).name == "_C.abi3.so"


def undefined_symbols(library):
    proc = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split()[-1] for line in proc.stdout.splitlines() if line.strip()]


# Mangled C++ names of torch's unstable API (c10::, at::, torch:: outside the stable headers'
# inline code, caffe2::) and of pybind11: a dependency on any of them ties the build to one torch.
# (_ZN / _ZNK: functions, _ZTI / _ZTV / _ZTS: type info, vtables, type names).
UNSTABLE = re.compile(r"_Z(T[IVS])?N?K?(3c10|2at|5torch|6caffe2|8pybind11)")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump (binutils)")
def test_extension_uses_the_shared_cxx_runtime():
    """The library must use torch's libstdc++.so, not a copy of the C++ runtime linked in: with a copy,
    an exception thrown in an op (a failed check) is caught by the other runtime and the process
    crashes (seen with a compiler that has only a static libstdc++; setup.py links torch's by path)."""
    proc = subprocess.run(["objdump", "-p", str(built_extension()[0])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    needed = re.findall(r"NEEDED\s+(\S+)", proc.stdout)
    assert any(name.startswith("libstdc++.so") for name in needed), f"no libstdc++.so among NEEDED: {needed}"


@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm (binutils)")
def test_extension_needs_only_stable_torch_symbols():
    """What the library takes from torch is the stable C ABI (aoti_torch_*, torch_*: plain C names)."""
    symbols = undefined_symbols(built_extension()[0])
    unstable = [s for s in symbols if UNSTABLE.match(s)]
    assert not unstable, f"{len(unstable)} undefined C++ torch/pybind11 symbols, e.g. {unstable[:5]}"
    assert any(s.startswith("aoti_torch_") for s in symbols), "no stable-ABI symbol at all: is this the right file?"
    python = [s for s in symbols if s.startswith(("Py", "_Py"))]
    assert set(python) <= {"PyModule_Create2", "PyModuleDef_Init"}, f"Python symbols beyond the module init: {python}"


def test_python_m_flash_gla_prints_a_bug_report():
    proc = subprocess.run([sys.executable, "-m", "flash_gla"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=PACKAGE_PARENT))
    assert proc.returncode == 0, proc.stderr
    for label in ("flash_gla:", "python:", "torch:", "GPU"):
        assert label in proc.stdout, proc.stdout
    assert flash_gla.__version__ in proc.stdout and torch.__version__ in proc.stdout


# ----------------------------------------------------------------------------------------
# setup.py: an explicit CUDA_HOME / CUDA_PATH is obeyed or refused
# ----------------------------------------------------------------------------------------


def run_setup_version(tmp_path, **env):
    """``python setup.py --version`` with the given toolkit variables (no others) set."""
    environ = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    environ.update(env)
    proc = subprocess.run(
        [sys.executable, str(SETUP_PY), "--version"], capture_output=True, text=True, env=environ,
        cwd=str(ROOT), timeout=60,
    )
    return proc.returncode, proc.stdout + proc.stderr


def bogus_toolkits(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    wrapper = tmp_path / "wrapper"
    (wrapper / "bin").mkdir(parents=True)
    script = wrapper / "bin" / "nvcc"
    script.write_text('#!/bin/sh\nexec /opt/some-cuda/bin/nvcc "$@"\n')
    script.chmod(0o755)
    return {
        "missing": (tmp_path / "does-not-exist", "that folder does not exist"),
        "empty": (empty, f"there is no {empty}/bin/nvcc"),
        "wrapper": (wrapper, "is a wrapper script that runs /opt/some-cuda/bin/nvcc"),
    }


@pytest.mark.skipif(not SETUP_PY.is_file(), reason="no setup.py beside the tests (not a source checkout)")
@pytest.mark.parametrize("var", ["CUDA_HOME", "CUDA_PATH"])
@pytest.mark.parametrize("kind", ["missing", "empty", "wrapper"])
def test_setup_stops_on_an_explicit_toolkit_without_nvcc(tmp_path, var, kind):
    path, found = bogus_toolkits(tmp_path)[kind]
    rc, output = run_setup_version(tmp_path, **{var: str(path)})
    assert rc != 0, f"setup.py accepted {var}={path}:\n{output}"
    assert f"flash_gla build error: {var}={path} is not a CUDA toolkit root" in output, output
    assert found in output, output
    assert "Traceback" not in output, output


@pytest.mark.skipif(not SETUP_PY.is_file(), reason="no setup.py beside the tests (not a source checkout)")
def test_setup_cuda_home_wins_over_cuda_path(tmp_path):
    path, _ = bogus_toolkits(tmp_path)["missing"]
    rc, output = run_setup_version(tmp_path, CUDA_HOME=str(path), CUDA_PATH="/usr/local/cuda")
    assert rc != 0 and f"CUDA_HOME={path} is not a CUDA toolkit root" in output, output


# ----------------------------------------------------------------------------------------
# make
# ----------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None or not (ROOT / "Makefile").is_file(), reason="no make / Makefile")
def test_bare_make_prints_help_and_installs_nothing():
    proc = subprocess.run(["make", "-s", "-C", str(ROOT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for verb in ("install", "test", "bench", "quickstart", "clean"):
        assert re.search(rf"^\s*make {verb}\b", proc.stdout, re.M), proc.stdout
    assert "pip" not in proc.stdout + proc.stderr
