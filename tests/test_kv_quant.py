"""kv_quant: int8 KV-cache math, the graph surgery on explicit-cache decoders (alone and after
kv_share merge), artifacts that generate like the optimized graph, bad input."""
import copy
import json

import pytest
import torch

from conftest import HANDWRITTEN, captured_decoder, pass_context, write_recipe
from optcc.algorithms import kvmath
from optcc.pipeline import registry
from optcc.api import apply
from optcc.intake.decoder import CacheSpec, generate, no_guard_module
from optcc.export.emit import load_artifact, load_onnx
from optcc.errors import PassError
from optcc.pipeline.manager import run_passes
from optcc.config.recipe import parse_recipe

# ------------------------------------------------------------------ math


def test_int8_codes_round_trip_within_half_a_step_and_requantize_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 16) * torch.rand(2, 3, 17, 1) * 5
    q, s = kvmath.quantize_int8(x)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 17, 1)
    assert (q.abs().amax(-1) == 127).all()  # the largest element of every vector uses the full range
    back = kvmath.dequantize_int8(q, s)
    assert ((back - x).abs() <= s / 2 + 1e-6).all()
    q2, s2 = kvmath.quantize_int8(back)  # what each decode step does to the stored past
    assert torch.equal(q2, q) and torch.allclose(s2, s, rtol=1e-6)
    e_q, e_s = kvmath.quantize_int8(torch.zeros(1, 2, 0, 16))  # prefill: an empty past
    assert e_q.shape == (1, 2, 0, 16) and e_s.shape == (1, 2, 0, 1)
    zq, zs = kvmath.quantize_int8(torch.zeros(1, 1, 2, 4))  # all-zero vectors stay zero
    assert (zq == 0).all() and (kvmath.dequantize_int8(zq, zs) == 0).all()
    assert kvmath.int8_bytes_ratio(48) == pytest.approx(52 / 192)

# ------------------------------------------------------------------ graphs


def _run(source, task, passes: str):
    prep, gm = captured_decoder(source, task)
    ctx = pass_context(prep)
    with no_guard_module():
        gm, records = run_passes(copy.deepcopy(gm), parse_recipe(f"version: 1\npasses: {passes}\n").passes, ctx)
    return prep, gm, ctx, [r.to_dict() for r in records]  # as report.json has them


@pytest.mark.parametrize("source, task", [("builtin:tiny-llama", None), ("builtin:tiny-gpt2", None),
                                          (f"{HANDWRITTEN}:build_decoder", "text-generation")])
def test_every_layer_cache_becomes_int8_codes_and_scales(source, task):
    prep, gm, ctx, (rec,) = _run(source, task, "[kv_quant]")
    layers, dim = prep.cache.layers, prep.cache.head_dim
    places = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert places == ["input_ids"] + [f"past_{k}_{l}_{s}" for l in range(layers) for k in ("key", "value") for s in ("int8", "scale")]
    dtypes = [s["dtype"] for s in ctx.cache.slot_list()]
    assert dtypes == ["int8", "float32"] * (2 * layers)
    st = rec["stats"]
    assert st["quantized_slots"] == [f"{k}_{l}" for l in range(layers) for k in ("key", "value")] and st["kept_slots"] == []
    assert st["kv_bytes_per_token"]["ratio"] == pytest.approx(kvmath.int8_bytes_ratio(dim), abs=1e-4)
    # prefill reads no past: logits are the fp32 model's exactly
    ids = torch.cat([prep.prefix, prep.inputs["input_ids"]], 1)
    full = prep.lm.module(input_ids=ids, **prep.cache.empty(2))[0]
    with torch.no_grad():
        out = gm(**ctx.cache.fit({"input_ids": ids}))
    assert torch.allclose(out[0], full, atol=1e-5)
    assert all(t.dtype == torch.int8 for t in out[1::2])
    # decoding reads the int8 past: close to fp32, not equal
    assert rec["fidelity"]["cosine_mean"] > 0.999 and rec["fidelity"]["max_abs_err"] > 0


def test_after_minicache_merge_directions_are_int8_norms_and_retained_tokens_stay():
    _, gm, ctx, (merge, rec) = _run("builtin:tiny-llama", None, "[{kv_share: {mode: merge, start: 0.5, retain: 0.25}}, kv_quant]")
    st = rec["stats"]
    assert "key_2_3_dir" in st["quantized_slots"] and "value_0" in st["quantized_slots"]
    assert {"key_2_norm", "value_3_norm", "key_2_3_kept_at", "key_2_3_kept"} <= set(st["kept_slots"])
    slots = {s["name"]: s for s in ctx.cache.slot_list()}
    assert slots["key_2_3_dir_int8"]["length"] == slots["key_2_3_dir_scale"]["length"] == "past"
    assert slots["key_2_3_kept"]["length"] == "retained" and slots["key_2_3_kept"]["dtype"] == "float32"
    assert slots["key_2_3_kept_at"]["dtype"] == "int64" and slots["key_2_norm"]["dtype"] == "float32"
    # vs the merged cache: int8 directions at head_dim 16 are 20/64, the fp32 norms stay
    assert 0.3 < st["kv_bytes_per_token"]["ratio"] < 0.4
    assert rec["fidelity"]["cosine_mean"] > merge["fidelity"]["cosine_mean"] - 0.01  # int8 adds little to the merge's error
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), no_guard_module():
        toks, t = generate(lambda b: list(gm(**b)), ctx.cache, prompt, 5)
    merged = merge["stats"]["kv_bytes_per_token"]["ratio"]
    # the pass counts the fp32 retained tokens at their expected share (retain 0.25); over 11
    # cached tokens the generation holds whole tokens, a few per cent more
    expected = 1024 * merged * st["kv_bytes_per_token"]["ratio"]
    assert toks.shape == (1, 5) and expected <= t["kv_bytes_per_token"] <= 1.15 * expected


def test_running_twice_or_on_an_encoder_is_refused(tmp_path):
    with pytest.raises(PassError, match="no floating-point cache slot left to quantize"):
        _run("builtin:tiny-llama", None, "[kv_quant, kv_quant]")
    rec = write_recipe(tmp_path, "version: 1\nmodel: {inputs: {batch: 2}}\npasses:\n  - kv_quant\nbench: {enabled: false}\n")
    with pytest.raises(PassError, match="does not apply to task 'image-classification'"):
        apply(rec, "builtin:tiny-vit", tmp_path / "o")

# ------------------------------------------------------------------ end to end


def test_apply_artifacts_store_int8_and_generate_like_the_graph(tmp_path):
    out = tmp_path / "o"
    r = apply(write_recipe(tmp_path, """
version: 1
model: {inputs: {batch: 2, seq_len: 12}}
passes:
  - kv_quant
generate: {new_tokens: 4, batch: 1, rounds: 1}
emit: {formats: [onnx, exported]}
bench: {warmup: 1, iters: 1, min_seconds: 0.0}
require: {kv_bytes_ratio: "<= 0.4"}
"""), "builtin:tiny-llama", out)
    spec = CacheSpec(**json.loads((out / "decoder.json").read_text()))
    assert spec.slot_list()[0] == {"name": "key_0_int8", "heads": 2, "dim": 16, "dtype": "int8", "length": "past"}
    g = r["generation"]
    assert g["kv_bytes_ratio"] == pytest.approx(kvmath.int8_bytes_ratio(16)) and r["requirements"][0]["ok"]
    _, gm, _, _ = _run("builtin:tiny-llama", None, "[kv_quant]")
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), no_guard_module():
        ref, t = generate(lambda b: list(gm(**b)), spec, prompt, 6)
        for runner in (load_onnx(out / "model.onnx"), load_artifact(out / "model.exported.pt2")):
            toks, t2 = generate(runner, spec, prompt, 6)
            assert torch.equal(toks, ref) and t2["kv_bytes_per_token"] == t["kv_bytes_per_token"]



def test_after_merge_the_saved_pt2_reloads_and_decodes_like_the_onnx(tmp_path):
    """merge + kv_quant: the .pt2 failed to deserialize outside optcc's export settings."""
    out = tmp_path / "o"
    apply(write_recipe(tmp_path, """
version: 1
model: {inputs: {batch: 2, seq_len: 16}}
passes: [{kv_share: {mode: merge}}, kv_quant]
emit: {formats: [onnx, exported], atol: 0.05}
generate: {new_tokens: 4, batch: 1, rounds: 1}
bench: {enabled: false}
"""), "builtin:tiny-llama", out)
    spec = CacheSpec.read(out / "decoder.json")
    assert any(s["length"] != "past" for s in spec.slot_list())  # merge's own-length slots
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), no_guard_module():
        toks = [generate(run, spec, prompt, 6)[0] for run in (load_onnx(out / "model.onnx"), load_artifact(out / "model.exported.pt2"))]
    assert torch.equal(toks[0], toks[1])

def test_registered_for_decoders_after_the_structural_cache_passes():
    spec = registry.get("kv_quant")
    assert spec.tasks == ("text-generation",) and {"kv_share", "layer_skip"} <= set(spec.after)


def test_artifact_check_allows_int8_codes_to_round_apart_but_not_drift_or_ids_to_change():
    from optcc.export.emit import verify
    from optcc.errors import ExportError
    codes = torch.randint(-127, 128, (2, 3, 8), dtype=torch.int8)
    ids = torch.arange(6).reshape(2, 3)
    nudged = codes.clone()
    nudged[0, 0, 0] = codes[0, 0, 0] + (1 if codes[0, 0, 0] < 127 else -1)   # float noise crossed a .5
    expected = [torch.ones(2, 3), codes, ids]
    for atol in (1e-3, 0.05):  # one code is a rounding boundary whatever the tolerance
        assert verify(lambda _: [torch.ones(2, 3), nudged, ids], {}, expected, 0, "a.onnx", atol)["max_abs_err"] == 0
    drifted = (codes.to(torch.int32) // 2).to(torch.int8)
    with pytest.raises(ExportError, match=r"int8 output differs from the graph's by \d+ codes \(allowed 6.35\)"):
        verify(lambda _: [torch.ones(2, 3), drifted, ids], {}, expected, 0, "a.onnx", 0.05)
    with pytest.raises(ExportError, match="integer output differs"):
        verify(lambda _: [torch.ones(2, 3), codes, ids + 1], {}, expected, 0, "a.onnx", 0.05)
