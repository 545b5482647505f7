"""examples/gla_decode_layer.py on an sm_90 GPU: the bf16 GLA-2 layers with flash_gla's kernels
against the float32 un-absorbed model, eager and captured in a CUDA graph.

Eight requests of different prompt lengths (5 tokens to over 1,000, some at or near a page
edge so that decode steps cross into a new page) are prefilled with write_kvcache, then run 16
decode steps; each step is one get_metadata and, per layer, write_kvcache + gla_with_kvcache
(GLA-2: h_q 128, 2 latent heads of 256, the RoPE key stored once). Every step's layers' output
(the result minus the step's input) is compared with ReferenceModel per request. The last
steps are also replayed from a CUDA graph of the whole step captured on static inputs: the
same result as the eager step, within bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch
from helpers import capture_graph
from test_engine_layer import EXAMPLE, load_example

pytestmark = [
    pytest.mark.sm90,
    pytest.mark.skipif(not EXAMPLE.is_file(), reason="no examples/ beside the tests (not a source checkout)"),
]

PROMPTS = [5, 63, 64, 127, 300, 511, 777, 1030]
STEPS = 16
GRAPH_STEPS = 4  # the last steps also replay the captured step
HIDDEN, LAYERS = 1024, 3
TOL = 2e-2  # relative error of the bf16 layers' output against the float32 un-absorbed model
GRAPH_TOL = 5e-3  # graph replay against the eager step (same kernels; bf16 rounding at most)


@pytest.mark.parametrize("s_q", [1, 2], ids=["sq1", "sq2-mtp"])
def test_decode_steps_match_unabsorbed_model_eager_and_in_a_cuda_graph(s_q):
    ex = load_example()
    cfg = ex.Config(hidden=HIDDEN, num_layers=LAYERS)
    demo = ex.Demo(cfg, ex.FLASH_GLA, torch.bfloat16, "cuda", PROMPTS, max_new_tokens=STEPS * s_q)
    err = demo.prefill()
    assert err < TOL, f"prefill: relative error {err:.3g}"
    static_x, graph = None, None
    for step in range(STEPS):
        x = demo.next_tokens(s_q)  # cache_seqlens += s_q, in place: the graph's static input
        out = demo.decode(x)
        err = demo.check(x, out)
        assert err < TOL, f"step {step}, lengths {demo.cache_seqlens.tolist()}: relative error {err:.3g}"
        if step < STEPS - GRAPH_STEPS:
            continue
        if graph is None:
            # Capture on static inputs holding this step's tokens: the warm-up run inside
            # capture_graph rewrites this step's cache rows with the same values.
            static_x = x.clone()
            graph, static_out = capture_graph(lambda: demo.decode(static_x))
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(static_out).all(), f"step {step}: graph replay gave non-finite values"
        diff = ((static_out - out).norm() / (out - x.float()).norm()).item()
        assert diff < GRAPH_TOL, f"step {step}: graph replay differs from the eager step by {diff:.3g}"
