"""Decoder artifacts: one explicit-KV-cache graph for prefill and decode, greedy generation
through eager torch, .pt2 and onnxruntime, generation bench and KV bytes."""
import json

import numpy as np
import pytest
import torch

from conftest import HANDWRITTEN, write_recipe
from test_cli import optcc
from optcc.api import apply, prepare, run_artifact
from optcc.intake.decoder import generate, no_guard_module
from optcc.export.emit import load_artifact, load_onnx
from optcc.errors import IntakeError, RecipeError
from optcc.config.recipe import parse_recipe

RECIPE = """
version: 1
model: {inputs: {batch: 2, seq_len: 12}}
passes: [cleanup]
generate: {new_tokens: 6, batch: 1, rounds: 1}
emit: {formats: [onnx, exported]}
bench: {warmup: 1, iters: 2, min_seconds: 0.0}
"""


@pytest.mark.parametrize("source, task", [
    ("builtin:tiny-llama", None), ("builtin:tiny-gpt2", None), (f"{HANDWRITTEN}:build_decoder", "text-generation")])
def test_decoder_artifacts_match_eager_prefill_and_decode(tmp_path, source, task):
    out = tmp_path / "out"
    r = apply(write_recipe(tmp_path, RECIPE), source, out, task=task)
    spec = json.loads((out / "decoder.json").read_text())
    g = r["generation"]
    assert r["greedy_match"] is True and g["greedy_match_by_backend"] == {"torch-exported": True, "onnxruntime": True}
    per_token = spec["layers"] * 2 * spec["kv_heads"] * spec["head_dim"] * 4  # fp32 K and V, every layer
    assert g["baseline"]["kv_bytes_per_token"] == per_token and g["kv_bytes_ratio"] == 1.0
    assert g["baseline"]["ttft_ms"] > 0 and g["optimized"]["onnxruntime"]["decode_tokens_per_s"] > 0
    # the loop's own share of decode: measured around InferenceSession.run, so strictly inside (0, 1)
    assert 0 < g["optimized"]["onnxruntime"]["decode_loop_share"] < 1
    md = (out / "report.md").read_text()
    assert "## Generation" in md and f"| {per_token} | yes |" in md and "Loop share" in md

    prep = prepare(source, task, None, parse_recipe(RECIPE))
    eager = lambda b: list(prep.lm.module(**b))
    prompt = torch.randint(0, spec["vocab_size"], (1, 9))
    from optcc.intake.decoder import CacheSpec

    cs = CacheSpec(**spec)
    with torch.no_grad(), no_guard_module():
        ref, _ = generate(eager, cs, prompt, 5)
        for runner in (load_onnx(out / "model.onnx"), load_artifact(out / "model.exported.pt2")):
            # prefill (empty past) and a decode step equal eager logits
            step0 = runner({"input_ids": prompt, **cs.empty(1)})
            e0 = eager({"input_ids": prompt, **cs.empty(1)})
            assert torch.allclose(step0[0], e0[0], atol=1e-4)
            nxt = {"input_ids": prompt[:, -1:], **dict(zip(cs.names(), e0[1:]))}
            assert torch.allclose(runner(nxt)[0], eager(nxt)[0], atol=1e-4)
            toks, _ = generate(runner, cs, prompt, 5)
            assert torch.equal(toks, ref)


def test_onnx_names_follow_the_decoder_layout(tmp_path):
    import onnx

    apply(write_recipe(tmp_path, RECIPE.replace("[cleanup]", "[]").replace("[onnx, exported]", "[onnx]")), "builtin:tiny-llama", tmp_path / "o")
    m = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert [i.name for i in m.graph.input][:3] == ["input_ids", "past_key_0", "past_value_0"]
    assert [o.name for o in m.graph.output][:3] == ["logits", "present_key_0", "present_value_0"]
    past = m.graph.input[1].type.tensor_type.shape.dim
    assert past[2].dim_param and past[0].dim_param  # dynamic past length and batch


def test_structure_maps_cache_slots_to_attention():
    from optcc.api import inspect_model

    _, s = inspect_model("builtin:tiny-llama")
    assert [b.attention.cache for b in s.blocks] == [
        {"key": f"past_key_{i}", "value": f"past_value_{i}", "slot": i} for i in range(4)]
    assert s.container == "model.layers"  # the cache wrapper keeps the model's own module paths


def test_byte_llama_run_and_perplexity(tmp_path):
    rec = write_recipe(tmp_path, "version: 1\nmodel: {inputs: {batch: 2, seq_len: 32}}\nevaluate: {samples: 8}\n"
                                 "generate: {new_tokens: 8, rounds: 1}\nbench: {enabled: false}\n")
    r = apply(rec, "builtin:byte-llama", tmp_path / "o")
    tm = r["task_metric"]
    assert tm["metric"] == "perplexity" and 1 < tm["baseline"] < 40 and abs(tm["delta"]) < 1e-3
    res = run_artifact(tmp_path / "o", prompt="def ", new_tokens=8)
    assert len(res["tokens"]) == 8 and isinstance(res["text"], str)
    p = optcc("run", tmp_path / "o" / "model.pt2", "--prompt", "import ", "--new-tokens", "5", "--json")
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["tokens"]) == 5


@pytest.mark.parametrize("extra, msg", [
    ("generate: {new_tokens: 0}\n", "new_tokens must be >= 1"),
    ("generate: {new_tokens: 250}\n", "exceeds the model's 256 positions"),
])
def test_bad_generation_settings(tmp_path, extra, msg):
    with pytest.raises(RecipeError, match=msg):
        apply(write_recipe(tmp_path, RECIPE.replace("generate: {new_tokens: 6, batch: 1, rounds: 1}\n", extra)),
              "builtin:tiny-llama", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_non_causal_model_refused_for_generation(tmp_path):
    with pytest.raises(IntakeError, match="needs a causal model"):
        apply(write_recipe(tmp_path, RECIPE), f"{HANDWRITTEN}:build", tmp_path / "o", task="text-generation")


def test_run_errors(tmp_path):
    with pytest.raises(IntakeError, match="no such artifact"):
        run_artifact(tmp_path / "nope.onnx", prompt="x")
    apply(write_recipe(tmp_path, "version: 1\nmodel: {inputs: {batch: 2}}\nbench: {enabled: false}\nemit: {formats: [onnx]}\n"),
          "builtin:tiny-vit", tmp_path / "vit")
    with pytest.raises(IntakeError, match="not a text-generation artifact"):
        run_artifact(tmp_path / "vit", prompt="x")


def test_generate_tells_the_graph_time_from_the_loop():
    """decode_graph_s is what the runner counts in graph_s (time inside the runtime), the rest of a step
    is the loop's: a step whose graph takes 20 ms and whose runner adds 5 ms around it shows both."""
    import time

    from optcc.intake.decoder import CacheSpec

    spec = CacheSpec(layers=1, kv_heads=1, head_dim=2, vocab_size=4, max_positions=None, byte_level=False)

    class Runner:
        graph_s = 0.0

        def __call__(self, batch):
            t = batch["input_ids"].shape[1]
            past = batch["past_key_0"]
            time.sleep(0.005)  # outside the graph: the runner's own feeds and copies
            t0 = time.perf_counter()
            time.sleep(0.02)
            self.graph_s += time.perf_counter() - t0
            present = torch.cat([past, torch.zeros(1, 1, t, 2)], 2)
            return [torch.zeros(1, t, 4), present, present.clone()]

    _, t = generate(Runner(), spec, torch.zeros(1, 3, dtype=torch.long), 4)
    assert len(t["decode_graph_s"]) == len(t["decode_s"]) == 3
    for step, graph in zip(t["decode_s"], t["decode_graph_s"]):
        assert 0.02 <= graph < step and step - graph >= 0.005
