"""Build script for flash_gla: one CUDA extension, ``flash_gla._C``, for Hopper (sm_90a).

Install (the README's command; uses the torch already in the environment, installs it if absent):

    pip install torch setuptools wheel ninja nvidia-cutlass && pip install --no-build-isolation ".[test]"

or build a wheel to install elsewhere: ``pip wheel --no-build-isolation --no-deps -w dist .``
gives ``dist/flash_gla-<version>-cp310-abi3-linux_x86_64.whl``. The extension uses only torch's
stable C ABI and Python's limited API: one build loads under every torch from MIN_TORCH
(flash_gla/version.py) on, whatever torch built it, and under every CPython >= 3.10.

Environment knobs:
    CUDA_HOME / CUDA_PATH      CUDA toolkit root (must hold a real bin/nvcc, release >= 12.8);
                               if set but wrong, the build stops. Unset: /usr/local/cuda,
                               else the toolkit of the nvcc on PATH.
    CUTLASS_DIR                CUTLASS checkout root (must hold include/cute/tensor.hpp)
    MAX_JOBS                   parallel compile jobs (default: all CPUs; ~2.3 GB of RAM each)
    FLASH_GLA_PTXAS_VERBOSE=1  print ptxas register / smem / spill reports per kernel

Everything that can go wrong (no torch, no CUDA toolkit, old nvcc, no CUTLASS headers,
no ninja) is checked before anything is compiled, with a message that says what to do.
The build records what it was built from (version, git commit, CUDA, CUTLASS, arch, torch) in
flash_gla/_build_info.py (git-ignored); ``python -m flash_gla`` prints it.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_version_py(name):
    """A string constant of flash_gla/version.py, read as text: importing the package needs torch."""
    text = (ROOT / "flash_gla" / "version.py").read_text(encoding="utf-8")
    match = re.search(rf'^{name} = "([^"]+)"$', text, re.M)
    if not match:
        sys.exit(f'flash_gla build error: flash_gla/version.py has no line {name} = "..."')
    return match.group(1)


VERSION = read_version_py("__version__")
# The oldest torch the extension loads under: the stable-ABI release the headers are told to target.
MIN_TORCH = tuple(int(x) for x in read_version_py("MIN_TORCH").split("."))
MIN_NVCC = (12, 8)
ARCH = "sm_90a"


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


def _explicit_toolkit(var, value):
    """The toolkit root named by CUDA_HOME / CUDA_PATH, or a build error saying what is there.

    A variable the user set is obeyed or refused, never skipped: building with another
    toolkit than the one asked for would surprise later (a different nvcc, a different CUDA).
    """
    nvcc = Path(value) / "bin" / "nvcc"
    if _is_toolkit(value):
        return str(Path(value).resolve())
    if not Path(value).is_dir():
        found = "that folder does not exist"
    elif not nvcc.is_file():
        found = f"there is no {nvcc}"
    else:
        found = f"{nvcc} is a wrapper script that runs {_wrapper_target(nvcc)}, not a toolkit's own nvcc"
    fail(
        f"{var}={value} is not a CUDA toolkit root: {found}. Set {var} to the folder whose "
        "bin/nvcc is the compiler itself (e.g. /usr/local/cuda-13.0), or unset it to let the "
        "build find one (/usr/local/cuda, else the toolkit of the nvcc on PATH)."
    )


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            return _explicit_toolkit(var, value)
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
TORCH_RELEASE = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
if TORCH_RELEASE < MIN_TORCH:
    fail(
        f"torch {torch.__version__} is too old to build flash_gla: its stable C ABI headers must cover "
        f"torch {MIN_TORCH[0]}.{MIN_TORCH[1]} (TORCH_TARGET_VERSION). Install torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}."
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
        + [str(p.relative_to(ROOT)) for p in (ROOT / "hopper").glob("**/*.cu")]
    )
    if not found:
        fail("no sources found: expected csrc/*.cpp (the torch boundary) and hopper/**/*.cu (the kernels)")
    return found


include_dirs = [ROOT, ROOT / "csrc", ROOT / "hopper", CUTLASS_ROOT / "include"]
if (CUTLASS_ROOT / "tools" / "util" / "include").is_dir():
    include_dirs.append(CUTLASS_ROOT / "tools" / "util" / "include")

# C++20: CUTLASS 4 and nvcc >= 12.8 accept it, and one standard for every torch keeps every
# build compiling the same code.
CXX_STD = "-std=c++20"
# The host code (csrc/*.cpp) sees only torch's stable C ABI, restricted to what MIN_TORCH has
# (torch/csrc/stable/version.h: 0xMMmm000000000000); USE_CUDA declares its CUDA stream calls.
STABLE_ABI_FLAGS = ["-DTORCH_TARGET_VERSION=0x%02x%02x000000000000" % MIN_TORCH, "-DUSE_CUDA"]
cxx_flags = ["-O3", CXX_STD, *STABLE_ABI_FLAGS]
nvcc_flags = [
    *STABLE_ABI_FLAGS,
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



def cutlass_version():
    """CUTLASS's version from include/cutlass/version.h, e.g. '4.2.0' (None if unreadable)."""
    try:
        text = (CUTLASS_ROOT / "include" / "cutlass" / "version.h").read_text(encoding="utf-8")
    except OSError:
        return None
    parts = [re.search(rf"#define CUTLASS_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None


def git_commit():
    """The checkout's commit, with '+dirty' when tracked files differ from it (None outside git)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


BUILD = {
    "version": VERSION,
    "git_commit": git_commit(),
    "cuda": "%d.%d" % NVCC_RELEASE,
    "cutlass": cutlass_version(),
    "arch": ARCH,
    "torch_built_with": torch.__version__,
    "min_torch": "%d.%d" % MIN_TORCH,
}

note(
    f"CUDA {BUILD['cuda']} at {CUDA_HOME}; torch {torch.__version__} (stable ABI, loads under torch >= "
    f"{BUILD['min_torch']}); CUTLASS {BUILD['cutlass']} from {CUTLASS_ORIGIN} ({CUTLASS_ROOT / 'include'}); "
    f"commit {BUILD['git_commit']}; MAX_JOBS={os.environ['MAX_JOBS']}"
)


BUILD_INFO = """\
# Written by setup.py when it built flash_gla._C, beside it; git-ignored. What the build was made
# from, for bug reports: `python -m flash_gla` prints it (flash_gla.build_info() returns it).
BUILD = {build!r}
"""


def torch_libstdcxx():
    """The shared libstdc++ that this process (torch) runs with, as a link input: [path] or [].

    A compiler whose own libstdc++ is a static archive only (e.g. a custom GCC that Python was
    built with) would otherwise copy the C++ runtime into _C. An exception thrown in an op (a
    failed check) is then raised by that copy and caught by torch's runtime, and the process
    crashes. Naming torch's libstdc++.so on the link line makes _C use torch's runtime."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    for line in maps.splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if re.search(r"/libstdc\+\+\.so(\.\d+)*$", path):
            return [path]
    return []


def write_build_info(package_dir):
    (Path(package_dir) / "_build_info.py").write_text(BUILD_INFO.format(build=BUILD), encoding="utf-8")


class build_ext(BuildExtension):
    """torch's BuildExtension (ninja), plus the build info and a copy of _C in the source tree.

    The build info goes wherever _C goes (the build folder that becomes the installed
    package, or the sources for an in-place build), so the two always come from one build.

    `python -m pytest tests` run from the checkout imports ./flash_gla (the current
    directory comes first on sys.path), not the installed copy; with _C placed beside
    the sources that import works after `pip install .` too.
    """

    def run(self):
        super().run()
        built = Path(self.get_ext_fullpath("flash_gla._C"))
        write_build_info(built.parent)
        remove_stale_extensions(built.parent, keep=built.name)
        if not self.inplace:
            try:
                self.copy_extensions_to_source()
                write_build_info(ROOT / "flash_gla")
                remove_stale_extensions(ROOT / "flash_gla", keep=built.name)
            except OSError as e:  # read-only source tree: the installed copy still works
                note(f"could not copy the extension into the source tree ({e})")


def remove_stale_extensions(package_dir, keep):
    """Delete any other flash_gla/_C*.so (e.g. a _C.cpython-311-*.so of a build before the stable ABI):
    Python prefers the interpreter-tagged name to _C.abi3.so, so a stale one would be imported instead."""
    for stale in Path(package_dir).glob("_C*.so"):
        if stale.name != keep:
            note(f"removing {stale} (an earlier build's extension)")
            stale.unlink()


# PEP 639: setuptools >= 77 takes an SPDX expression and deprecates the license classifier;
# older ones (>= 64 builds this) know only the free-text field and the classifier.
if tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:1]) >= (77,):
    LICENSE = dict(license_expression="MIT")
    LICENSE_CLASSIFIERS = []
else:
    LICENSE = dict(license="MIT")
    LICENSE_CLASSIFIERS = ["License :: OSI Approved :: MIT License"]

setup(
    name="flash_gla",
    version=VERSION,
    description="GLA / GTA decode attention kernels for Hopper GPUs with a FlashMLA-style API",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").is_file() else "",
    long_description_content_type="text/markdown",
    author="the flash_gla authors",
    **LICENSE,
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Environment :: GPU :: NVIDIA CUDA :: 12",
        "Environment :: GPU :: NVIDIA CUDA :: 13",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        *LICENSE_CLASSIFIERS,
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    install_requires=["torch>=%d.%d" % MIN_TORCH],
    # `pip install ".[test]"`: what `python -m pytest tests` needs besides the package.
    extras_require={"test": ["pytest"]},
    packages=find_packages(include=["flash_gla", "flash_gla.*"]),
    ext_modules=[
        CUDAExtension(
            name="flash_gla._C",
            sources=sources(),
            include_dirs=[str(d) for d in include_dirs],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=torch_libstdcxx(),
            # _C.abi3.so: Python's limited API (torch adds -DPy_LIMITED_API=0x030A0000, i.e. 3.10)
            # and no link to libtorch_python, whose C++ symbols change with every torch.
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
    # The wheel's tag says so: flash_gla-<version>-cp310-abi3-linux_x86_64.whl.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    zip_safe=False,
)
