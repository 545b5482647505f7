"""Sharded decode layers over NCCL on two sm_90 GPUs equal the unsharded single-GPU layer.

Runs examples/gla_tp_layer.py as two processes (ranks 0 and 1, NCCL, a free port): GLA-2 TP-2
(a latent head per GPU), MLA TP-2 (latent replicated, query heads split), MLA DCP-2 (every other
page per GPU, merge_attention of the all-gathered partials) and GLA with one latent head over
2 GPUs (DCP inside a head), each at s_q 1, 2 and 3, bf16, against the same layer unsharded on
one GPU with the same weights and cache contents. Skips without two sm_90 GPUs. The same math
on CPU (threads and gloo processes): test_tp.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_tp import EXAMPLES, launch_ranks

pytestmark = [
    pytest.mark.sm90,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs 2 GPUs (torch.cuda.device_count() < 2)"),
]


def test_sharded_layers_equal_unsharded_layer_on_two_gpus(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        pytest.skip("torch.distributed with NCCL is not available")
    out = tmp_path / "tp_check.json"
    results = launch_ranks(2, [str(EXAMPLES / "gla_tp_layer.py"), "--out", str(out)], timeout=600)
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exited with {r.returncode}:\n{r.stdout[-4000:]}"
    rows = json.loads(out.read_text())
    cases = {(r["case"], r["s_q"]) for r in rows}
    assert len(cases) == 4 * 3 and len(rows) == 2 * len(cases), rows
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(f"{r['case']} s_q {r['s_q']} rank {r['rank']}: relative error {r['rel_err']:.2e}, "
                              f"finite {r['finite']}" for r in bad)
