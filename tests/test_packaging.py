"""What the package promises around the kernels: its names, its version, its build checks.

CPU only and fast: nothing here compiles. setup.py is run in a subprocess only where it
stops before torch is imported (a bad CUDA_HOME), and ``import flash_gla`` is run in a
subprocess where a fake build record must be in place before the package is imported.
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


def test_installed_metadata_has_the_package_version():
    try:
        installed = importlib.metadata.version("flash_gla")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("flash_gla is not installed (a plain source checkout)")
    assert installed == flash_gla.__version__


# ----------------------------------------------------------------------------------------
# The torch the extension was built against
# ----------------------------------------------------------------------------------------

FAKE_BUILD_INFO = """
import sys, types
info = types.ModuleType("flash_gla._build_info")
info.TORCH_VERSION = {version!r}
sys.modules["flash_gla._build_info"] = info
"""


def test_import_refuses_a_torch_other_than_the_build_one():
    fake = "0.0.1+built.elsewhere"
    rc, out, err = run_python(
        FAKE_BUILD_INFO.format(version=fake)
        + textwrap.dedent(
            """
            try:
                import flash_gla
            except ImportError as e:
                print(e)
                sys.exit(3)
            """
        )
    )
    assert rc == 3, f"import flash_gla did not raise ImportError (rc {rc}):\n{out}\n{err}"
    assert f"built against torch {fake}" in out
    assert f"the running torch is {torch.__version__}" in out
    assert "pip install --no-build-isolation ." in out  # the fix
    assert f"torch=={fake}" in out  # the other fix


def test_import_accepts_the_build_torch():
    rc, out, err = run_python(
        FAKE_BUILD_INFO.format(version=torch.__version__) + "import flash_gla; print(flash_gla.__version__)"
    )
    assert rc == 0, err
    assert out.strip() == flash_gla.__version__


def test_import_works_without_build_info():
    """A source checkout that was never built: the reference still works."""
    rc, out, err = run_python(
        """
        import sys
        sys.modules["flash_gla._build_info"] = None  # as if the file did not exist
        import torch, flash_gla
        from flash_gla.reference import attention_ref
        out, lse = attention_ref(torch.ones(1, 2, 4), torch.ones(3, 1, 4), torch.ones(3, 1, 4), False, 0.5)
        print(tuple(out.shape))
        """
    )
    assert rc == 0, err
    assert out.strip() == "(1, 2, 4)"


def test_build_info_when_present_matches_the_running_torch():
    path = Path(flash_gla.__file__).with_name("_build_info.py")
    if not path.is_file():
        pytest.skip("no _build_info.py: this flash_gla was not built")
    from flash_gla import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__


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
