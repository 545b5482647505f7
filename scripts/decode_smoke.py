"""One small decode call per compiled kernel instance, checked against the reference: the
program scripts/sanitizer_check.sh runs under compute-sanitizer (memcheck, racecheck,
synccheck), so that every instance's kernel, the scheduler and the combine run at least once,
with pages cut short by the sequence end, requests split over several CTAs and empty ones.

    python scripts/decode_smoke.py            # exit 0 if every call matched the reference
    python scripts/decode_smoke.py --list     # the calls it makes
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' input makers and comparison
if importlib.util.find_spec("flash_gla") is None:  # a source checkout: its in-place build
    sys.path.insert(0, str(ROOT))

# (name, variant, h_q, h_kv, d, d_rope, s_q, fp8): together they reach every row of
# hopper/decode/instances/generate.py's list (s_q * h_q / h_kv > 64 selects the 128-row ones,
# at most 8 or 16 the narrowest transposed one where the variant has it).
CALLS = [
    ("mla", "gla", 16, 1, 512, 64, 1, False),
    ("gla", "gla", 64, 1, 256, 64, 1, False),
    ("gla_m128", "gla", 64, 1, 256, 64, 2, False),
    ("gla_rope1", "gla_rope1", 64, 1, 256, 64, 1, False),
    ("gla_rope1_m128", "gla_rope1", 64, 1, 256, 64, 2, False),
    ("gta_d128", "gta", 32, 8, 128, 64, 8, False),
    ("gta_d64", "gta", 16, 4, 64, 32, 8, False),
    ("gta_d128_t8", "gta", 32, 8, 128, 64, 1, False),
    ("gta_d64_t8", "gta", 16, 4, 64, 32, 2, False),
    ("gta_d128_t16", "gta", 32, 8, 128, 64, 3, False),
    ("gta_d64_t16", "gta", 16, 4, 64, 32, 4, False),
    ("gla_rope1_fp8", "gla_rope1", 64, 1, 256, 64, 1, True),
    ("gla_rope1_m128_fp8", "gla_rope1", 64, 1, 256, 64, 2, True),
    ("gta_d128_fp8", "gta", 32, 8, 128, 64, 8, True),
    ("gta_d64_fp8", "gta", 16, 4, 64, 32, 8, True),
    ("gta_d128_fp8_t8", "gta", 32, 8, 128, 64, 1, True),
    ("gta_d64_fp8_t8", "gta", 16, 4, 64, 32, 2, True),
    ("gta_d128_fp8_t16", "gta", 32, 8, 128, 64, 3, True),
    ("gta_d64_fp8_t16", "gta", 16, 4, 64, 32, 4, True),
]
LENGTHS = [0, 100, 700]  # an empty request, a short last page, a request long enough to be split


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--only", default="", help="only the calls whose name contains this (e.g. fp8_t)")
    args = ap.parse_args()
    calls = [call for call in CALLS if args.only in call[0]]
    if args.list:
        for call in calls:
            print(call)
        return 0
    from helpers import DTYPES, VARIANTS, Variant, assert_close, make_inputs

    import flash_gla

    failures = 0
    for name, variant_name, h_q, h_kv, d, d_rope, s_q, fp8 in calls:
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            base = VARIANTS[variant_name]
            variant = Variant(base.name, base.shared_rope, base.q_is_v, kv_fp8=fp8)
            q_dim = d if variant.q_is_v else d + d_rope
            inp = make_inputs(len(LENGTHS), s_q, h_q, h_kv, d, d_rope, LENGTHS, dtype, "cuda", seed=1,
                              shared_rope=variant.shared_rope, q_dim=q_dim, kv_fp8=fp8)
            meta, splits = flash_gla.get_metadata(inp.cache_seqlens, s_q * h_q // h_kv, h_kv)
            out, lse = variant.decode(inp, d, meta, splits, causal=s_q > 1)
            torch.cuda.synchronize()
            ref, lse_ref = variant.reference(inp, d, causal=s_q > 1)
            try:
                assert_close(out, ref, lse, lse_ref, f"{name}-{dtype_name}", kv_fp8=fp8)
                print(f"{name:20s} {dtype_name}: ok")
            except AssertionError as err:
                failures += 1
                print(f"{name:20s} {dtype_name}: FAILED {err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
