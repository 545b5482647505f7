"""The source tree's layering, checked on text (no build needed).

hopper/ (every kernel, and the neutral headers in hopper/common/) must not depend on csrc/ (the
torch boundary that includes them), so that the two folders do not depend on each other; csrc/
holds no device code; the modules of the Python package flash_gla/ import each other one way only.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def project_includes(folder: Path):
    """(file, included path) for every quoted include of the sources under `folder`."""
    for path in sorted(folder.rglob("*")):
        if path.suffix in {".h", ".cuh", ".cu", ".cpp"}:
            for name in INCLUDE.findall(path.read_text()):
                yield path, name


def test_scan_sees_the_kernel_sources():
    files = {path.name for path, _ in project_includes(ROOT / "hopper")}
    assert {"kernel.cuh", "consumer.cuh", "launch.cuh"} <= files


@pytest.mark.parametrize("folder", ["hopper", "hopper/common"])
def test_quoted_includes_stay_inside(folder):
    """Every quoted include of hopper/ resolves under hopper/ (hopper/common/: under itself)."""
    base = ROOT / folder
    outside = [
        f"{path.relative_to(ROOT)} includes \"{name}\""
        for path, name in project_includes(base)
        if not (ROOT / "hopper" / name).is_file()
        or not (ROOT / "hopper" / name).resolve().is_relative_to(base.resolve())
    ]
    assert not outside, "\n".join(outside)


ANGLE_INCLUDE = re.compile(r"^\s*#\s*include\s+<([^>]+)>", re.MULTILINE)
UNSTABLE_TORCH_HEADERS = ("torch/extension.h", "torch/torch.h", "torch/library.h", "torch/all.h", "ATen/", "c10/",
                          "pybind11/", "torch/csrc/api/", "torch/csrc/utils/")


def test_host_code_includes_only_torchs_stable_abi():
    """csrc/ and hopper/ see torch only through torch/csrc/stable, torch/headeronly and the C shim
    (csrc/torch_stable.h), so that one build loads under every torch from MIN_TORCH on."""
    found = [
        f"{path.relative_to(ROOT)} includes <{name}>"
        for folder in ("csrc", "hopper")
        for path in sorted((ROOT / folder).rglob("*"))
        if path.suffix in {".h", ".cuh", ".cu", ".cpp"}
        for name in ANGLE_INCLUDE.findall(path.read_text())
        if name.startswith(UNSTABLE_TORCH_HEADERS)
    ]
    assert not found, "\n".join(found)


GLOBAL_KERNEL = re.compile(r"\b__global__\b")


def test_device_code_lives_under_hopper():
    """csrc/ is the torch boundary only (bindings, launch, dispatch): C++ that the host compiler
    builds, no .cu/.cuh file and no kernel. Every kernel is under hopper/."""
    csrc = ROOT / "csrc"
    cuda_files = sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*") if p.suffix in {".cu", ".cuh"})
    assert not cuda_files, f"CUDA sources under csrc/ (they belong under hopper/): {cuda_files}"
    kernels = [
        str(path.relative_to(ROOT))
        for path in sorted(csrc.rglob("*"))
        if path.suffix in {".h", ".cpp"} and GLOBAL_KERNEL.search(path.read_text())
    ]
    assert not kernels, f"__global__ functions under csrc/: {kernels}"
    hopper_kernels = {
        path.parent.name
        for path in (ROOT / "hopper").rglob("*")
        if path.suffix in {".cu", ".cuh"} and GLOBAL_KERNEL.search(path.read_text())
    }
    assert {"decode", "schedule", "combine", "cache"} <= hopper_kernels


def package_imports(package: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, over every import statement of the package's
    sources, those inside functions too (a deferred import is still a dependency). The compiled
    extension ``_C`` counts as a module (it imports none of them)."""
    modules = {path.stem for path in package.glob("*.py")} | {"_C"}
    graph = {}
    for path in sorted(package.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package.name:
                parts = node.module.split(".")
                if len(parts) > 1:
                    deps.add(parts[1])
                else:  # from flash_gla import x: the module x, or a name of __init__
                    deps.update(a.name if a.name in modules else "__init__" for a in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package.name:
                        deps.add(parts[1] if len(parts) > 1 else "__init__")
        graph[path.stem] = deps & modules - {path.stem}
    graph["_C"] = set()
    return graph


def test_python_package_imports_form_no_circle():
    """Every module of flash_gla/ depends one way: no chain of imports leads back to where it began."""
    graph = package_imports(ROOT / "flash_gla")
    assert {"_extension", "_library", "ops"} <= graph.keys() and "_library" in graph["_extension"]
    circles = []

    def visit(module, path):
        for dep in sorted(graph[module]):
            if dep in path:
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            else:
                visit(dep, path + [dep])

    for start in sorted(graph):
        visit(start, [start])
    assert not circles, "\n".join(sorted(set(circles)))
