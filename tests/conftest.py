"""Shared pytest setup.

``@pytest.mark.sm90`` (or ``pytestmark = pytest.mark.sm90``) marks tests that need an
sm_90 GPU and the built extension; they are skipped, with the reason, where either is
missing. Set ``FLASH_GLA_REQUIRE_GPU=1`` (e.g. on the H100 CI job) to turn that skip into a
collection error, so that a broken build cannot pass as "all skipped".
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# Let `pytest tests` work from a plain checkout. An installed flash_gla is left alone: it
# is the one that carries the compiled extension.
if importlib.util.find_spec("flash_gla") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sm90_unavailable_reason():
    """Why sm_90 tests cannot run here, or None if they can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    capability = torch.cuda.get_device_capability()
    if capability != (9, 0):
        return f"needs an sm_90 (Hopper) GPU, found sm_{capability[0]}{capability[1]}"
    try:
        from flash_gla import ops

        ops._load_extension()
    except ImportError as err:
        return str(err)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "sm90: needs an sm_90 GPU and the built flash_gla._C extension")


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("sm90")]
    if not marked:
        return
    reason = sm90_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("FLASH_GLA_REQUIRE_GPU") == "1":
        raise pytest.UsageError(f"FLASH_GLA_REQUIRE_GPU=1 but the GPU tests cannot run: {reason}")
    skip = pytest.mark.skip(reason=reason)
    for item in marked:
        item.add_marker(skip)
