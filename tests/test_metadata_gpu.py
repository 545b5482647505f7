"""get_metadata's tensors against scheduler_model.plan (tests/), row by row, on an sm_90 GPU.

The scheduler kernel (hopper/schedule/scheduler.cu) must compute exactly the host model that
test_scheduler_model.py checks the invariants of; the number of parts is the extension's
(``num_sm_parts`` for the shape on this device).
"""

from __future__ import annotations

import random

import pytest
import torch
from scheduler_model import META_FIELDS, plan, plan_batch_invariant

import flash_gla
from flash_gla import ops


def _random_lengths(seed: int, b: int, top: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([0, rng.randint(1, 64), rng.randint(1, top)]) for _ in range(b)]


BATCHES = {
    "empty": [0] * 7,  # only zero-length requests: every part but one idle
    "one-long": [300_000],  # one request cut over every part
    "long-among-empty": [0, 0, 200_000, 0, 65],
    "many-equal": [4096] * 128,
    "page-edges": [63, 64, 65, 127, 128, 129, 1, 0] * 8,
    "random": _random_lengths(1, 300, 50_000),
    # More requests than the kernel stages in shared memory (8K): the uncached path.
    "random-9000": _random_lengths(2, 9000, 3000),
}
# (num_q_tokens_per_head_k, h_kv): one or several 64-row tiles, one to many KV heads.
SHAPES = [(1, 1), (128, 1), (64, 2), (256, 2), (32, 8), (1024, 1)]


@pytest.mark.sm90
@pytest.mark.parametrize("invariant", [False, True], ids=["default", "batch-invariant"])
@pytest.mark.parametrize("rows, h_kv", SHAPES, ids=[f"rows{r}-kv{h}" for r, h in SHAPES])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_metadata_equals_host_model(batch, rows, h_kv, invariant):
    where = f"[{batch}, rows {rows}, h_kv {h_kv}, batch-invariant {invariant}]"
    lengths = BATCHES[batch]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    meta, num_splits = flash_gla.get_metadata(seqlens, rows, h_kv, enable_batch_invariant=invariant)
    parts = ops._num_sm_parts(seqlens.device.index, rows, h_kv)
    assert parts >= 1, f"{where} num_sm_parts = {parts}"
    assert meta.dtype == num_splits.dtype == torch.int32, f"{where} dtypes {meta.dtype}, {num_splits.dtype}"
    rows_want = parts + 1 if invariant else parts  # the batch-invariant plan's header row
    assert tuple(meta.shape) == (rows_want, META_FIELDS), f"{where} meta.shape {tuple(meta.shape)}, parts {parts}"
    assert tuple(num_splits.shape) == (len(lengths) + 1,), f"{where} num_splits.shape {tuple(num_splits.shape)}"

    want_meta, want_splits = (plan_batch_invariant if invariant else plan)(lengths, parts)
    got_meta, got_splits = meta.cpu().tolist(), num_splits.cpu().tolist()
    for p, (got, want) in enumerate(zip(got_meta, want_meta)):
        assert got == want, f"{where} part {p} of {parts}: kernel {got}, model {want}"
    bad = [i for i, (g, w) in enumerate(zip(got_splits, want_splits)) if g != w]
    assert not bad, f"{where} num_splits[{bad[0]}]: kernel {got_splits[bad[0]]}, model {want_splits[bad[0]]}"
