"""``python -m flash_gla``: what a bug report needs, in one block.

flash_gla's version and where it is installed, what its extension was built from (commit, CUDA,
CUTLASS, arch, the torch that built it and the oldest it loads under), whether the extension
loads and its ops are registered, and the running Python, torch, CUDA and GPUs. Runs without a
GPU and without a built extension (and says so). Exit status 0 whenever it could print.
"""

from __future__ import annotations

import platform
import sys


def _lines():
    import torch

    import flash_gla
    from flash_gla._extension import load_extension

    yield "flash_gla", f"{flash_gla.__version__} ({flash_gla.__path__[0]})"
    build = flash_gla.build_info()
    if build:
        for key in ("git_commit", "cuda", "cutlass", "arch", "torch_built_with", "min_torch"):
            yield f"  built {key}", str(build.get(key))
    else:
        yield "  build", "no build record (flash_gla/_build_info.py): a source checkout that was never built"
    try:
        ops = load_extension()
        import flash_gla._C as ext

        names = sorted(name for name in ("get_metadata", "decode", "write_kvcache", "merge_attention")
                       if hasattr(ops, name))
        yield "  extension", f"{ext.__file__}; ops torch.ops.flash_gla.{{{', '.join(names)}}}"
    except ImportError as err:
        yield "  extension", f"not loaded: {err}"
    yield "python", f"{platform.python_version()} ({sys.executable})"
    yield "platform", platform.platform()
    yield "torch", f"{torch.__version__} (CUDA {torch.version.cuda}, {torch.__path__[0]})"
    if not torch.cuda.is_available():
        yield "GPU", "none visible to torch (the kernels need an sm_90 GPU; the reference runs on CPU)"
        return
    yield "CUDA driver", _driver_version()
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        note = "" if (props.major, props.minor) == (9, 0) else " (not sm_90: the kernels will not run)"
        yield f"GPU {index}", (f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                               f"{props.total_memory / 2**30:.0f} GiB{note}")


def _driver_version() -> str:
    """The CUDA driver's version, e.g. '13.0', from libcuda (torch does not report it)."""
    import ctypes

    try:
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        return "unknown"


def main() -> int:
    for key, value in _lines():
        print(f"{key + ':':24s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
