"""The one list of compiled decode instances; writes every file that depends on it.

Run after editing INSTANCES (`python hopper/decode/instances/generate.py`); a CPU test checks
that the committed outputs are up to date. Adding an instance is one line below. It writes:

* ``hopper/decode/instances/decode_<name>_<dtype>.cu``: one small compile unit per instance
  and dtype, so that a build spreads over many cores and an edit recompiles only its files;
* ``csrc/decode_instances.h``: the table that ``csrc/decode_api.cpp`` dispatches from;
* ``flash_gla/_instances.py``: the same table for the Python validation (which shapes exist),
  with the constants that Python shares with the kernels, read from their one C++ home
  (``hopper/common/params.h``, ``hopper/common/tile_policy.h``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple


class Instance(NamedTuple):
    name: str  # file and table name
    variant: str  # mla | gla | gla_rope1 | gta: the entry point and cache layout it serves
    head_dim_v: int  # V: the first head_dim_v dims of a KV head's cached row
    head_dim_nope: int  # the key's latent part: row[:head_dim_nope]
    head_dim_rope: int  # the key's RoPE part
    shared_rope: bool  # RoPE in the rope cache shared by all KV heads, else inline after V
    row_warpgroups: int  # 64-row consumer warpgroups stacked on the packed query rows
    kv_fp8: bool  # the cache is e4m3 with float32 scales per 128 values, dequantised in the kernel
    query_cols: int  # 0, or the transposed consumer for KV heads with up to this many packed query rows
    description: str  # for the instance file's header only


# The fields of flash_gla/_instances.py's Instance: all but the description, with these notes.
PYTHON_FIELD_NOTES = {"variant": "mla | gla | gla_rope1 | gta",
                      "shared_rope": "RoPE in the shared rope cache, else inline after V",
                      "row_warpgroups": "64-row consumer warpgroups per CTA",
                      "kv_fp8": "e4m3 cache + float32 kv_scale per 128 values (RoPE stays in q's dtype)",
                      "query_cols": "0, or a transposed instance for up to this many packed query rows"}


INSTANCES = [
    Instance("mla", "mla", 512, 512, 64, False, 1, False, 0, "MLA: dv 512, 64 RoPE dims inline"),
    Instance("gla", "gla", 256, 256, 64, False, 1, False, 0, "GLA: dv 256, 64 RoPE dims inline"),
    Instance("gla_m128", "gla", 256, 256, 64, False, 2, False, 0, "GLA: dv 256, 64 RoPE dims inline, 128 rows per CTA"),
    Instance("gla_rope1", "gla_rope1", 256, 256, 64, True, 1, False, 0, "GLA: dv 256 latents, 64 RoPE dims stored once"),
    Instance("gla_rope1_m128", "gla_rope1", 256, 256, 64, True, 2, False, 0,
             "GLA: dv 256 latents, 64 RoPE dims stored once, 128 rows per CTA"),
    Instance("gta_d128", "gta", 128, 64, 64, True, 1, False, 0, "GTA: d 128 tied state, K = [state[:64], RoPE 64]"),
    Instance("gta_d64", "gta", 64, 32, 32, True, 1, False, 0, "GTA: d 64 tied state, K = [state[:32], RoPE 32]"),
    # Transposed (tokens as the wgmma's M) for KV heads with at most 8 or 16 packed query rows:
    # the host takes the narrowest that serves the rows (GTA-8 and GTA d 64 at s_q 1: 4 rows;
    # FP8 below).
    Instance("gta_d128_t8", "gta", 128, 64, 64, True, 1, False, 8,
             "GTA: d 128 tied state, RoPE 64, transposed for up to 8 query rows per KV head"),
    Instance("gta_d64_t8", "gta", 64, 32, 32, True, 1, False, 8,
             "GTA: d 64 tied state, RoPE 32, transposed for up to 8 query rows per KV head"),
    Instance("gta_d128_t16", "gta", 128, 64, 64, True, 1, False, 16,
             "GTA: d 128 tied state, RoPE 64, transposed for up to 16 query rows per KV head"),
    Instance("gta_d64_t16", "gta", 64, 32, 32, True, 1, False, 16,
             "GTA: d 64 tied state, RoPE 32, transposed for up to 16 query rows per KV head"),
    # FP8 caches (e4m3 values, a float32 scale per 128 of them; RoPE stored once in q's dtype).
    Instance("gla_rope1_fp8", "gla_rope1", 256, 256, 64, True, 1, True, 0, "GLA: e4m3 dv 256 latents, RoPE stored once"),
    Instance("gla_rope1_m128_fp8", "gla_rope1", 256, 256, 64, True, 2, True, 0,
             "GLA: e4m3 dv 256 latents, RoPE stored once, 128 rows per CTA"),
    Instance("gta_d128_fp8", "gta", 128, 64, 64, True, 1, True, 0, "GTA: e4m3 d 128 tied state, RoPE 64"),
    Instance("gta_d64_fp8", "gta", 64, 32, 32, True, 1, True, 0, "GTA: e4m3 d 64 tied state, RoPE 32"),
    Instance("gta_d128_fp8_t8", "gta", 128, 64, 64, True, 1, True, 8,
             "GTA: e4m3 d 128 tied state, RoPE 64, transposed for up to 8 query rows per KV head"),
    Instance("gta_d64_fp8_t8", "gta", 64, 32, 32, True, 1, True, 8,
             "GTA: e4m3 d 64 tied state, RoPE 32, transposed for up to 8 query rows per KV head"),
    Instance("gta_d128_fp8_t16", "gta", 128, 64, 64, True, 1, True, 16,
             "GTA: e4m3 d 128 tied state, RoPE 64, transposed for up to 16 query rows per KV head"),
    Instance("gta_d64_fp8_t16", "gta", 64, 32, 32, True, 1, True, 16,
             "GTA: e4m3 d 64 tied state, RoPE 32, transposed for up to 16 query rows per KV head"),
]
DTYPES = {"bf16": "kBF16", "fp16": "kFP16"}

ROOT = Path(__file__).resolve().parents[3]
INSTANCE_DIR = ROOT / "hopper" / "decode" / "instances"
DISPATCH_HEADER = ROOT / "csrc" / "decode_instances.h"
PYTHON_TABLE = ROOT / "flash_gla" / "_instances.py"
# Python name -> (C++ header under hopper/common/, constant there).
SHARED_CONSTANTS = {
    "PAGE_SIZE": ("params.h", "kPageSize"),
    "FP8_GROUP": ("params.h", "kScaleGroup"),
    "META_FIELDS": ("params.h", "kMetaFields"),
    "FIXED_OVERHEAD_PAGES": ("params.h", "kFixedOverheadPages"),
    "MAX_SPLITS_PER_REQUEST": ("params.h", "kMaxSplitsPerRequest"),
    "INVARIANT_CHUNK_PAGES": ("params.h", "kInvariantChunkPages"),
    "INVARIANT_MAX_CHUNKS": ("params.h", "kInvariantMaxChunks"),
    "ROWS_PER_WARPGROUP": ("tile_policy.h", "kRowsPerWarpgroup"),
    "MAX_ROW_WARPGROUPS": ("tile_policy.h", "kMaxRowWarpgroups"),
}
BANNER = "Generated by hopper/decode/instances/generate.py from its INSTANCES list: do not edit."


def _template_args(inst: Instance, dtype_enum: str, scope: str = "") -> str:
    rope = f"{scope}RopeCache::kShared" if inst.shared_rope else f"{scope}RopeCache::kInline"
    cache = f"{scope}KVCache::kE4M3" if inst.kv_fp8 else f"{scope}KVCache::kSameAsQ"
    return (f"DType::{dtype_enum}, {inst.head_dim_v}, {inst.head_dim_nope}, {inst.head_dim_rope}, "
            f"{rope}, {inst.row_warpgroups}, {cache}, {inst.query_cols}")


def instance_file(inst: Instance, dtype: str, dtype_enum: str) -> str:
    return f"""\
// {BANNER}
// {inst.description}, {dtype}.
#include "decode/launch.cuh"

namespace flash_gla::hopper {{
template void run_decode<{_template_args(inst, dtype_enum)}>(const DecodeParams&, cudaStream_t);
}}  // namespace flash_gla::hopper
"""


def dispatch_header() -> str:
    rows = []
    for inst in INSTANCES:
        for dtype, dtype_enum in DTYPES.items():
            rows.append(
                f"    {{DType::{dtype_enum}, {inst.head_dim_v}, {inst.head_dim_nope}, {inst.head_dim_rope}, "
                f"{'true' if inst.shared_rope else 'false'}, {inst.row_warpgroups}, "
                f"{'true' if inst.kv_fp8 else 'false'}, {inst.query_cols}, "
                f"&hopper::run_decode<{_template_args(inst, dtype_enum, 'hopper::')}>}},  // {inst.name} {dtype}"
            )
    body = "\n".join(rows)
    return f"""\
// {BANNER}
// Every compiled decode instance, for csrc/decode_api.cpp's dispatch.
#pragma once

#include "decode/run_decode.h"

namespace flash_gla {{

inline constexpr DecodeInstance kDecodeInstances[] = {{
{body}
}};

}}  // namespace flash_gla
"""


def shared_constants() -> dict[str, int]:
    values = {}
    for name, (header, cpp_name) in SHARED_CONSTANTS.items():
        text = (ROOT / "hopper" / "common" / header).read_text()
        match = re.search(rf"constexpr int {cpp_name} = (\d+);", text)
        if match is None:
            raise SystemExit(f"generate.py: no `constexpr int {cpp_name} = N;` in hopper/common/{header}")
        values[name] = int(match.group(1))
    return values


def python_table() -> str:
    rows = "\n".join(
        f"    Instance({inst.name!r}, {inst.variant!r}, {inst.head_dim_v}, {inst.head_dim_nope}, "
        f"{inst.head_dim_rope}, {inst.shared_rope}, {inst.row_warpgroups}, {inst.kv_fp8}, {inst.query_cols}),"
        for inst in INSTANCES
    )
    fields = "\n".join(
        f"    {name}: {type(getattr(INSTANCES[0], name)).__name__}"
        + (f"  # {PYTHON_FIELD_NOTES[name]}" if name in PYTHON_FIELD_NOTES else "")
        for name in Instance._fields if name != "description"
    )
    constants = "\n".join(
        f"{name} = {value}  # {SHARED_CONSTANTS[name][1]} in hopper/common/{SHARED_CONSTANTS[name][0]}"
        for name, value in shared_constants().items()
    )
    return f'''\
"""{BANNER}

The compiled decode instances, from which flash_gla's validation derives the supported
shapes, and the constants that Python shares with the kernels.
"""

from typing import NamedTuple

{constants}


class Instance(NamedTuple):
{fields}


DTYPES = {tuple(DTYPES)!r}

INSTANCES = (
{rows}
)
'''


def outputs() -> dict[Path, str]:
    """Every generated file and its text."""
    files = {DISPATCH_HEADER: dispatch_header(), PYTHON_TABLE: python_table()}
    for inst in INSTANCES:
        for dtype, dtype_enum in DTYPES.items():
            files[INSTANCE_DIR / f"decode_{inst.name}_{dtype}.cu"] = instance_file(inst, dtype, dtype_enum)
    return files


def stale_instance_files() -> list[Path]:
    """Instance files on disk that the list no longer names."""
    wanted = set(outputs())
    return sorted(p for p in INSTANCE_DIR.glob("decode_*.cu") if p not in wanted)


def main() -> None:
    for path in stale_instance_files():
        path.unlink()
    for path, text in outputs().items():
        path.write_text(text)


if __name__ == "__main__":
    main()
