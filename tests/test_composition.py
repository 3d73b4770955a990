"""The composition matrix: every ordered combination of the passes that apply to a family,
in the order the registry allows, on one shared capture per model. Every combination runs
through the pass manager with the checks `optcc apply` makes after each pass (lint, the graph
runs, output signature, finite outputs, fidelity). Each family's full stack is then also
exported to both formats, re-loaded and checked against the graph as apply does; artifacts
of the single passes are covered in each pass's own tests. (Emitting all 67 combinations
would take about 20 minutes of a 2-core CI machine; the passes alone take under 3.)"""
import contextlib
import copy
import itertools
from functools import lru_cache

import pytest

from conftest import HANDWRITTEN, captured_decoder, pass_context
from optcc.pipeline import registry
from optcc.api import emit_checked, prepare
from optcc.graph.capture import capture
from optcc.intake.decoder import no_guard_module
from optcc.pipeline.manager import run_passes
from optcc.config.recipe import parse_recipe

# One setting per pass, small enough for tiny models.
ENCODER = {
    "layer_skip": "{drop: 1}",
    "token_merge": "{r: 1}",
    "quantize": "{scheme: int8-dynamic}",
}
DECODER = {
    "layer_skip": "{drop: 1}",
    "kv_share": "{mode: merge, start: 0.25}",
    "quantize": "{scheme: int8-dynamic}",
    "kv_quant": "{}",
}
FAMILIES = {  # source, task, pass settings, extra settings for this model
    "bert": ("builtin:tiny-bert", None, ENCODER, {"token_merge": "{r: 1, unmerge: true}"}),
    "vit": ("builtin:tiny-vit", None, ENCODER, {}),
    "handwritten-encoder": (f"{HANDWRITTEN}:build", "feature-extraction", ENCODER, {"token_merge": "{r: 1, unmerge: true}"}),
    "llama": ("builtin:tiny-llama", None, DECODER, {}),
    "gpt2": ("builtin:tiny-gpt2", None, DECODER, {}),
    "handwritten-decoder": (f"{HANDWRITTEN}:build_decoder_deep", "text-generation", DECODER, {}),
}


def _allowed_order(names: list[str]) -> list[str]:
    """The registry's `after` constraints as one order (a topological sort of the names)."""
    specs = registry.registry()
    out, todo = [], list(names)
    while todo:
        ready = next(n for n in todo if all(a not in todo for a in specs[n].after))
        out.append(ready)
        todo.remove(ready)
    return out


def _combinations(settings: dict) -> list[tuple[str, ...]]:
    names = _allowed_order(list(settings))
    return [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]


CASES = [pytest.param(fam, combo, id=f"{fam}:{'+'.join(combo)}")
         for fam, (_, _, settings, _) in FAMILIES.items() for combo in _combinations(settings)]

RECIPE = "version: 1\nmodel: {inputs: {batch: 2, seq_len: %d}}\nemit: {formats: [onnx, exported]}\n"  # compiled: test_compiled.py


@lru_cache(maxsize=None)
def _captured(fam: str):
    source, task, _, _ = FAMILIES[fam]
    if FAMILIES[fam][2] is DECODER:
        return captured_decoder(source, task)
    prep = prepare(source, task, None, parse_recipe(RECIPE % 16))
    return prep, capture(prep.lm.module, prep.inputs, True).module()


def test_matrix_covers_every_family_and_subset():
    # 3 encoder passes -> 7 subsets, 4 decoder passes -> 15, for 3 families each
    assert len(CASES) == 3 * 7 + 3 * 15
    assert _allowed_order(["quantize", "token_merge", "layer_skip"]) == ["layer_skip", "token_merge", "quantize"]
    assert _allowed_order(["kv_quant", "quantize", "kv_share", "layer_skip"])[:2] == ["layer_skip", "kv_share"]


def _run(fam: str, combo: tuple[str, ...]):
    _, _, settings, extra = FAMILIES[fam]
    prep, gm = _captured(fam)
    steps = "".join(f"  - {name}: {extra.get(name, settings[name])}\n" for name in combo)
    recipe = parse_recipe(RECIPE % 16 + "passes:\n" + steps)  # also checks the order at load
    ctx = pass_context(prep)
    gm, records = run_passes(copy.deepcopy(gm), recipe.passes, ctx)
    assert [r.name for r in records] == list(combo)
    assert all(r.modified for r in records), [r.name for r in records if not r.modified]
    fid = records[-1].fidelity
    assert fid["finite"] and fid["cosine_mean"] > 0.5, fid  # random weights: structure, not quality
    return gm, ctx, records, recipe


@pytest.mark.parametrize("fam,combo", CASES)
def test_composition(fam, combo):
    with no_guard_module() if _captured(fam)[0].cache else contextlib.nullcontext():
        _run(fam, combo)


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_full_stack_artifacts(fam, tmp_path):
    full = _combinations(FAMILIES[fam][2])[-1]
    with no_guard_module() if _captured(fam)[0].cache else contextlib.nullcontext():
        gm, ctx, records, recipe = _run(fam, full)
        artifacts = emit_checked(gm, ctx, records, recipe, tmp_path)
    assert sorted(a.format for a in artifacts) == ["exported", "onnx"]
    assert all(a.check["criterion"] == "quantization-noise" for a in artifacts)  # every full stack quantizes
    for a in artifacts:
        assert a.runner(ctx.inputs)[ctx.primary].shape == ctx.reference[ctx.primary].shape
