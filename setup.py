"""Build script for flash_gla: one CUDA extension, ``flash_gla._C``, for Hopper (sm_90a).

Install (uses the torch already in the environment):

    pip install nvidia-cutlass ninja
    pip install --no-build-isolation .

Environment knobs:
    CUDA_HOME / CUDA_PATH      CUDA toolkit root (must hold bin/nvcc, release >= 12.8)
    CUTLASS_DIR                CUTLASS checkout root (must hold include/cute/tensor.hpp)
    MAX_JOBS                   parallel compile jobs (default: all CPUs)
    FLASH_GLA_PTXAS_VERBOSE=1  print ptxas register / smem / spill reports per kernel

Everything that can go wrong (no torch, no CUDA toolkit, old nvcc, no CUTLASS headers,
no ninja) is checked before anything is compiled, with a message that says what to do.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"
MIN_NVCC = (12, 8)


def fail(message):
    sys.exit(f"\nflash_gla build error: {message}\n")


def note(message):
    print(f"flash_gla build: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------
# CUDA toolkit. torch.utils.cpp_extension decides CUDA_HOME when it is first imported
# and, without the variable, guesses the parent of `which nvcc`. Where nvcc on PATH is
# a wrapper script (/usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc) that guess
# is /usr/local, which is not a toolkit. So find the real one first and export it.
# --------------------------------------------------------------------------------------

def _is_toolkit(path):
    """A toolkit root holds bin/nvcc itself, not a wrapper that runs one elsewhere."""
    nvcc = Path(path) / "bin" / "nvcc" if path else None
    return bool(nvcc) and nvcc.is_file() and _wrapper_target(nvcc) is None


def _wrapper_target(script):
    """The nvcc a shell wrapper execs, or None if `script` is not such a wrapper."""
    try:
        with open(script, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None  # a real binary
    match = re.search(rb"exec\s+[\"']?([^\s\"']*nvcc)\b", head)
    return match.group(1).decode() if match else None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_toolkit(value):
                return str(Path(value).resolve())
            note(f"ignoring {var}={value}: no real bin/nvcc there (missing, or a wrapper script)")
    if _is_toolkit("/usr/local/cuda"):
        return str(Path("/usr/local/cuda").resolve())
    nvcc = shutil.which("nvcc")
    seen = set()
    while nvcc and nvcc not in seen:  # follow symlinks and wrapper scripts to a real nvcc
        seen.add(nvcc)
        nvcc = os.path.realpath(nvcc)
        target = _wrapper_target(nvcc)
        if target is None:
            home = Path(nvcc).parent.parent
            if Path(nvcc).parent.name == "bin" and _is_toolkit(home):
                return str(home)
            break
        nvcc = shutil.which(target) if not os.path.isabs(target) else target
    fail(
        "no CUDA toolkit found (need bin/nvcc, release >= %d.%d). Set CUDA_HOME to the "
        "toolkit root, e.g. CUDA_HOME=/usr/local/cuda-13.0, or put its bin/ on PATH." % MIN_NVCC
    )


def nvcc_release(cuda_home):
    nvcc = str(Path(cuda_home) / "bin" / "nvcc")
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        fail(f"could not run `{nvcc} --version`: {e}")
    match = re.search(r"release (\d+)\.(\d+)", text)
    if not match:
        fail(f"could not read the CUDA release from `{nvcc} --version`:\n{text}")
    return int(match.group(1)), int(match.group(2))


CUDA_HOME = find_cuda_home()
os.environ["CUDA_HOME"] = CUDA_HOME
NVCC_RELEASE = nvcc_release(CUDA_HOME)
if NVCC_RELEASE < MIN_NVCC:
    fail(
        "nvcc %d.%d at %s is too old: flash_gla needs CUDA >= %d.%d for sm_90a. "
        "Point CUDA_HOME at a newer toolkit." % (*NVCC_RELEASE, CUDA_HOME, *MIN_NVCC)
    )

# --------------------------------------------------------------------------------------
# torch (imported only now, so that cpp_extension sees the CUDA_HOME set above)
# --------------------------------------------------------------------------------------
try:
    import torch
except ImportError:
    fail(
        "torch is not installed. Install a CUDA build of PyTorch first, then build with "
        "`pip install --no-build-isolation .` so that this torch is the one used."
    )
if torch.version.cuda is None:
    fail(
        f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); "
        "flash_gla needs a CUDA build of PyTorch."
    )
TORCH_CUDA = tuple(int(x) for x in torch.version.cuda.split(".")[:2])
if TORCH_CUDA[0] != NVCC_RELEASE[0]:
    fail(
        "torch %s was built with CUDA %d.%d but nvcc at %s is %d.%d; the major versions "
        "must match. Set CUDA_HOME to a CUDA %d toolkit." % (torch.__version__, *TORCH_CUDA, CUDA_HOME, *NVCC_RELEASE, TORCH_CUDA[0])
    )

from torch.utils.cpp_extension import BuildExtension, CUDAExtension, is_ninja_available  # noqa: E402

if not is_ninja_available():
    fail("ninja is not installed (`pip install ninja`); without it the build is serial and ignores MAX_JOBS.")
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

# --------------------------------------------------------------------------------------
# CUTLASS / CuTe headers (header-only; needed at build time only)
# --------------------------------------------------------------------------------------

def _has_cute(root):
    return (Path(root) / "include" / "cute" / "tensor.hpp").is_file()


def find_cutlass():
    """Root of a CUTLASS tree: the folder holding include/ (and maybe tools/util/include)."""
    env = os.environ.get("CUTLASS_DIR")
    if env:
        if _has_cute(env):
            return Path(env).resolve(), "CUTLASS_DIR"
        fail(f"CUTLASS_DIR={env} has no include/cute/tensor.hpp; point it at a CUTLASS checkout's root.")
    vendored = ROOT / "third_party" / "cutlass"
    if _has_cute(vendored):
        return vendored, "third_party/cutlass"
    spec = importlib.util.find_spec("cutlass_library")  # locate the wheel without importing it
    if spec is not None and spec.submodule_search_locations:
        wheel_root = Path(list(spec.submodule_search_locations)[0]) / "source"
        if _has_cute(wheel_root):
            return wheel_root, "nvidia-cutlass wheel"
    fail(
        "CUTLASS/CuTe headers not found. Provide them in one of three ways:\n"
        "  1. pip install nvidia-cutlass   (headers under cutlass_library/source/include)\n"
        "  2. export CUTLASS_DIR=/path/to/cutlass   (a checkout; include/cute/tensor.hpp must exist)\n"
        "  3. git clone https://github.com/NVIDIA/cutlass third_party/cutlass"
    )


CUTLASS_ROOT, CUTLASS_ORIGIN = find_cutlass()

# --------------------------------------------------------------------------------------
# The extension
# --------------------------------------------------------------------------------------

def sources():
    found = sorted(
        [str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")]
        + [str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu")]
        + [str(p.relative_to(ROOT)) for p in (ROOT / "hopper").glob("**/*.cu")]
    )
    if not found:
        fail("no sources found: expected csrc/*.cpp, csrc/*.cu and hopper/**/*.cu")
    return found


include_dirs = [ROOT, ROOT / "csrc", ROOT / "hopper", CUTLASS_ROOT / "include"]
if (CUTLASS_ROOT / "tools" / "util" / "include").is_dir():
    include_dirs.append(CUTLASS_ROOT / "tools" / "util" / "include")

# C++20: recent torch headers (2.14 here) refuse anything older ("C++20 or later compatible compiler
# is required to use ATen"); CUTLASS 4 and nvcc >= 12.8 accept it, and one standard for
# every torch keeps the CI build and the device build compiling the same code.
CXX_STD = "-std=c++20"
nvcc_flags = [
    "-O3",
    CXX_STD,
    "-gencode=arch=compute_90a,code=sm_90a",  # wgmma / TMA / setmaxnreg need the "a" target
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "-lineinfo",
    "-DNDEBUG",
    # torch adds -D__CUDA_NO_HALF_OPERATORS__ etc.; the kernels want the operators back.
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]
if os.environ.get("FLASH_GLA_PTXAS_VERBOSE") == "1":
    nvcc_flags.append("-Xptxas=-v")

note(
    f"CUDA {NVCC_RELEASE[0]}.{NVCC_RELEASE[1]} at {CUDA_HOME}; torch {torch.__version__}; "
    f"CUTLASS from {CUTLASS_ORIGIN} ({CUTLASS_ROOT / 'include'}); MAX_JOBS={os.environ['MAX_JOBS']}"
)


class build_ext(BuildExtension):
    """torch's BuildExtension (ninja), plus a copy of _C into the source tree.

    `python -m pytest tests` run from the checkout imports ./flash_gla (the current
    directory comes first on sys.path), not the installed copy; with _C placed beside
    the sources that import works after `pip install .` too.
    """

    def run(self):
        super().run()
        if not self.inplace:
            try:
                self.copy_extensions_to_source()
            except OSError as e:  # read-only source tree: the installed copy still works
                note(f"could not copy the extension into the source tree ({e})")


setup(
    name="flash_gla",
    version=VERSION,
    description="GLA / GTA decode attention kernels for Hopper GPUs with a FlashMLA-style API",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    install_requires=["torch"],
    packages=find_packages(include=["flash_gla", "flash_gla.*"]),
    ext_modules=[
        CUDAExtension(
            name="flash_gla._C",
            sources=sources(),
            include_dirs=[str(d) for d in include_dirs],
            extra_compile_args={"cxx": ["-O3", CXX_STD], "nvcc": nvcc_flags},
        )
    ],
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
    zip_safe=False,
)
