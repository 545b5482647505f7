"""The one list of kernel instances (hopper/decode/instances/generate.py) and what follows from it.

CPU only: the committed generated files are what the list writes today, and the shapes the
Python validation accepts are exactly those of the compiled instances.
"""

import importlib.util
import re
import sys
from pathlib import Path

from flash_gla import _instances, _validation, ops

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "hopper" / "decode" / "instances" / "generate.py"
KNOWN_VARIANTS = {"mla", "gla", "gla_rope1", "gta"}  # the entry points _validation serves


def load_generate():
    name = "flash_gla_instances_generate"
    spec = importlib.util.spec_from_file_location(name, GENERATE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_generated_files_are_up_to_date():
    generate = load_generate()
    outputs = generate.outputs()
    assert outputs, "generate.outputs() wrote nothing"
    stale = [
        str(path.relative_to(ROOT)) for path, text in sorted(outputs.items())
        if not path.is_file() or path.read_text() != text
    ]
    assert not stale, f"out of date with generate.py's INSTANCES: {stale}; run `python {GENERATE.relative_to(ROOT)}`"


def test_no_instance_file_outside_the_list():
    stale = load_generate().stale_instance_files()
    assert not stale, f"instance files the list no longer names: {stale}; run `python {GENERATE.relative_to(ROOT)}`"


def test_every_variant_has_an_entry():
    variants = {inst.variant for inst in _instances.INSTANCES}
    assert variants <= KNOWN_VARIANTS, f"no Python entry validates variants {variants - KNOWN_VARIANTS}"
    assert {"gla", "gla_rope1", "gta"} <= variants


def test_validation_accepts_exactly_the_instances_shapes():
    """The shape rules of _validation hold for every instance, and its tables hold nothing else
    (bf16 / fp16 caches: the instances without kv_fp8; FP8 caches: those with it)."""
    inline, rope1, gta = {False: set(), True: set()}, {False: set(), True: set()}, {False: set(), True: set()}
    for inst in _instances.INSTANCES:
        dv, nope, rope = inst.head_dim_v, inst.head_dim_nope, inst.head_dim_rope
        if inst.variant in ("mla", "gla"):
            assert nope == dv and not inst.shared_rope, f"{inst}: inline rows are [V | RoPE], the key the whole row"
            inline[inst.kv_fp8].add((dv + rope, dv))
        elif inst.variant == "gla_rope1":
            assert nope == dv and inst.shared_rope, f"{inst}: the latents are V and the key's non-RoPE part"
            rope1[inst.kv_fp8].add((dv, rope))
        elif inst.variant == "gta":
            assert nope + rope == dv and inst.shared_rope, f"{inst}: K = [state[:d - d_rope], rope], V = state"
            gta[inst.kv_fp8].add((dv, rope))
    assert set(_validation.INLINE_DIMS.items()) == inline[False]
    assert set(_validation.ROPE1_DIMS.items()) == rope1[False]
    assert set(_validation.GTA_DIMS.items()) == gta[False]
    assert not inline[True], "FP8 has no inline-RoPE layout: _validation refuses it before any table"
    assert set(_validation.ROPE1_FP8_DIMS.items()) == rope1[True]
    assert set(_validation.GTA_FP8_DIMS.items()) == gta[True]


def test_fp8_instances_store_rope_once():
    """FP8 instances read an e4m3 cache whose RoPE key lives, unquantised, in the shared rope cache:
    shared-RoPE variants only; GLA with RoPE once and both GTA widths have one."""
    fp8 = [inst for inst in _instances.INSTANCES if inst.kv_fp8]
    assert fp8, "no FP8 instance"
    for inst in fp8:
        assert inst.shared_rope and inst.variant in ("gla_rope1", "gta"), f"{inst}: FP8 needs RoPE stored once"
    assert {inst.variant for inst in fp8} == {"gla_rope1", "gta"}
    assert set(_validation.GTA_FP8_DIMS) == {128, 64} and set(_validation.ROPE1_FP8_DIMS) == {256}


def test_docstrings_name_every_supported_shape():
    gla_doc = re.sub(r"\s+", " ", ops.gla_with_kvcache.__doc__)
    gta_doc = re.sub(r"\s+", " ", ops.gta_with_kvcache.__doc__)
    inline = ", ".join(f"({dv}, {d_qk})" for d_qk, dv in sorted(_validation.INLINE_DIMS.items()))
    rope1 = ", ".join(f"({dv}, {dv + rope})" for dv, rope in sorted(_validation.ROPE1_DIMS.items()))
    gta = ", ".join(f"({d}, {rope})" for d, rope in sorted(_validation.GTA_DIMS.items(), reverse=True))
    assert f"{inline} inline; {rope1} with ``rope_cache``" in gla_doc, "gla_with_kvcache's supported shapes"
    assert f"the compiled instances: {gta}." in gta_doc, "gta_with_kvcache's supported shapes"
    rope1_fp8 = ", ".join(f"({dv}, {dv + rope})" for dv, rope in sorted(_validation.ROPE1_FP8_DIMS.items()))
    gta_fp8 = ", ".join(f"({d}, {rope})" for d, rope in sorted(_validation.GTA_FP8_DIMS.items(), reverse=True))
    assert f"; {rope1_fp8} with ``rope_cache`` and an FP8 ``kv_cache``." in gla_doc, "gla_with_kvcache's FP8 shapes"
    assert f"With an FP8 ``kv_cache``: {gta_fp8}." in gta_doc, "gta_with_kvcache's FP8 shapes"
