import contextlib
import copy
import importlib.util
import json
import math
from functools import lru_cache

import pytest
import torch

from conftest import HANDWRITTEN, pass_context, write_recipe
from optcc.algorithms import influence
from optcc.pipeline import registry
from optcc.api import apply, prepare
from optcc.graph.capture import capture, flat_outputs
from optcc.pipeline.context import PassContext
from optcc.intake.decoder import dynamic_shapes, no_guard_module
from optcc.errors import PassError, RecipeError
from optcc.pipeline.manager import run_passes
from optcc.config.recipe import PassStep, parse_recipe

Config = registry.get("layer_skip").config


def _handwritten_module():
    spec = importlib.util.spec_from_file_location("handwritten_for_layer_skip", HANDWRITTEN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HW = _handwritten_module()

# ------------------------------------------------------------------ influence math


def test_identity_scores_zero_and_orthogonal_scores_one():
    h = torch.randn(2, 5, 16)
    assert influence.block_influence(h, h.clone()) == pytest.approx(0.0, abs=1e-12)
    assert influence.angular_distance(h, h.clone()) == pytest.approx(0.0, abs=1e-6)
    a = torch.zeros(2, 5, 4)
    b = torch.zeros(2, 5, 4)
    a[..., 0], b[..., 1] = 1.0, 3.0  # orthogonal, different norms
    assert influence.block_influence(a, b) == pytest.approx(1.0)
    assert influence.angular_distance(a, b) == pytest.approx(0.5)
    assert influence.block_influence(h, -2 * h) == pytest.approx(2.0)
    assert influence.block_influence(h, 3 * h) == pytest.approx(0.0, abs=1e-12)  # scale is not change


def test_mask_excludes_padding_and_running_mean_pools_tokens():
    a = torch.zeros(1, 4, 2)
    a[..., 0] = 1.0
    b = a.clone()
    b[0, 2:] = torch.tensor([0.0, 1.0])  # the last two tokens turn orthogonal
    mask = torch.tensor([[1, 1, 0, 0]])
    assert influence.block_influence(a, b) == pytest.approx(0.5)
    assert influence.block_influence(a, b, mask) == pytest.approx(0.0)
    run = influence.Running()
    run.add("x", influence.cosine_sum(a[:, :2], b[:, :2]))  # 2 tokens, cos 1
    run.add("x", influence.cosine_sum(a, b))  # 4 tokens, mean cos 0.5
    assert run.mean("x") == pytest.approx((2 + 2) / 6)


def test_angular_picks_the_known_redundant_run():
    torch.manual_seed(0)
    hs = [torch.randn(2, 6, 32)]
    for l in range(6):  # blocks 2 and 3 barely move the stream, the others rotate it
        step = 0.01 if l in (2, 3) else 1.0
        hs.append(hs[-1] + step * torch.randn(2, 6, 32))
    n = 2
    dist = {l: influence.angular_distance(hs[l], hs[l + n]) for l in influence.runs(6, n)}
    assert influence.best_run(dist) == 2
    assert influence.runs(6, 2, forbidden=[2]) == [0, 3, 4]
    bi = [influence.block_influence(hs[l], hs[l + 1]) for l in range(6)]
    assert influence.lowest(bi, 2) == [2, 3]
    assert influence.lowest(bi, 1, forbidden=[2]) == [3]


# ------------------------------------------------------------------ config


def test_config_forms_are_normalised():
    assert Config().ratio == 0.25 and Config().drop is None
    assert Config(drop=2).ratio is None
    c = Config(select="explicit", layers=[5, 6], keep=[0, -1])
    assert c.layers == (5, 6) and c.keep == (0, -1)
    r = parse_recipe("version: 1\npasses:\n  - layer_skip: {drop: 4, select: angular}\n")
    assert r.passes[0].config == Config(drop=4, select="angular")


@pytest.mark.parametrize("kwargs, message", [
    ({"drop": -1}, "drop must be an integer >= 1, got -1"),
    ({"drop": 0}, "drop must be an integer >= 1, got 0"),
    ({"drop": 2.5}, "drop must be an integer >= 1, got 2.5"),
    ({"ratio": 0.0}, r"ratio must be a number strictly between 0 and 1, got 0.0"),
    ({"ratio": 1.0}, r"ratio must be a number strictly between 0 and 1, got 1.0"),
    ({"ratio": 1.5}, r"ratio must be a number strictly between 0 and 1, got 1.5"),
    ({"drop": 2, "ratio": 0.5}, "give drop or ratio, not both"),
    ({"select": "explicit"}, "select: explicit needs layers"),
    ({"select": "explicit", "layers": [1], "drop": 1}, "takes the count from layers"),
    ({"select": "explicit", "layers": [1, 1]}, "lists an index twice"),
    ({"layers": [1]}, "layers is only read with select: explicit"),
    ({"select": "angular", "granularity": "attention"}, "granularity must be block, got 'attention'"),
    ({"select": "random"}, "select 'random' is unknown"),
    ({"granularity": "head"}, "granularity 'head' is unknown"),
    ({"keep": [0.5]}, "keep must be a list of integers, got 0.5"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config(**kwargs)


def test_bad_config_in_recipe_names_the_line():
    text = "version: 1\npasses:\n  - cleanup: {}\n  - layer_skip: {ratio: 2}\n"
    with pytest.raises(RecipeError, match=r"<recipe>:4: .*ratio must be a number strictly between 0 and 1, got 2"):
        parse_recipe(text)
    with pytest.raises(RecipeError, match=r"<recipe>:3: .*drop: expected an integer"):
        parse_recipe("version: 1\npasses:\n  - layer_skip: {drop: 2.5}\n")


# ------------------------------------------------------------------ graphs


def _ctx(model, inputs, task="feature-extraction", calibration=lambda: [], progress=None):
    with torch.no_grad():
        ref = flat_outputs(model(**inputs))
    gm = capture(model, inputs).module()
    extra = {"progress": progress} if progress else {}
    return gm, PassContext(task, inputs, ref, 0, None, calibration=calibration, **extra)


@lru_cache(maxsize=None)
def _prepared(source, task):
    recipe = parse_recipe("version: 1\nmodel: {inputs: {batch: 2, seq_len: 8}}\n")
    prep = prepare(source, task, None, recipe)
    with no_guard_module() if prep.cache else contextlib.nullcontext():  # as optcc apply captures decoders
        return prep, capture(prep.lm.module, prep.inputs, True, dynamic_shapes(prep.cache) if prep.cache else None).module()


def _model_ctx(source, task=None):
    prep, gm = _prepared(source, task)
    ctx = pass_context(prep)
    return copy.deepcopy(gm), ctx


def _run(gm, ctx, **cfg):
    with no_guard_module() if ctx.cache else contextlib.nullcontext():
        gm, records = run_passes(gm, (PassStep("layer_skip", Config(**cfg), 1),), ctx)
    return gm, records[0].to_dict()


def _tokens(b=2, t=8):
    return {"input_ids": torch.randint(0, 100, (b, t), generator=torch.Generator().manual_seed(1))}


def _manual(net, ids, skip_block=(), skip_attn=(), skip_mlp=()):
    """Eager forward of the handwritten Net with the named parts bypassed."""
    x = net.tok(ids)
    for i, layer in enumerate(net.trunk):
        if i in skip_block:
            continue
        if i not in skip_attn:
            x = x + layer.mix(layer.pre1(x))
        if i not in skip_mlp:
            x = x + layer.ff(layer.pre2(x))
    return net.readout(net.out_norm(x))


@pytest.mark.parametrize("granularity, key", [("block", "skip_block"), ("attention", "skip_attn"), ("mlp", "skip_mlp")])
def test_explicit_removal_equals_eager_bypass(granularity, key):
    net, inputs = HW.build(), _tokens()
    gm, ctx = _ctx(net, inputs)
    gm, rec = _run(gm, ctx, select="explicit", layers=[1], granularity=granularity)
    with torch.no_grad():
        want = _manual(net, inputs["input_ids"], **{key: (1,)})
        got = flat_outputs(gm(**inputs))[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    name = {"block": "trunk.1", "attention": "trunk.1.mix", "mlp": "trunk.1.ff"}[granularity]
    assert rec["stats"]["removed"] == [name]
    assert not [k for k in gm.state_dict() if k.startswith(name + ".")]
    assert rec["after"]["params"] < rec["before"]["params"] and rec["after"]["flops"] < rec["before"]["flops"]


def test_influence_finds_the_identity_block_and_angular_the_identity_run():
    net = HW.Net(depth=5).eval()
    with torch.no_grad():  # blocks 2 and 3 add nothing to the residual stream
        for i in (2, 3):
            for lin in (net.trunk[i].mix.proj, net.trunk[i].ff.lin_out):
                lin.weight.zero_()
                lin.bias.zero_()
    inputs = _tokens()
    calls = []

    def progress(desc, total):
        calls.append(total)
        return lambda n=1: None

    calib = [_tokens(2, 8), {"input_ids": torch.randint(0, 100, (2, 8))}]
    gm, ctx = _ctx(net, inputs, calibration=lambda: calib, progress=progress)
    gm1, rec = _run(copy.deepcopy(gm), ctx, drop=1, keep=[3])
    st = rec["stats"]
    assert st["removed"] == ["trunk.2"] and st["metric"] == "block_influence"
    assert [s["index"] for s in st["scores"]] == [0, 1, 2, 3, 4]
    assert st["scores"][2]["score"] == pytest.approx(0.0, abs=1e-9)
    assert st["calibration"] == {"source": "calibration", "batches": 2, "tokens": 32}
    assert calls == [2]
    assert rec["fidelity"]["max_abs_err"] < 1e-4  # the skipped block was an identity
    gm2, rec = _run(copy.deepcopy(gm), ctx, drop=2, select="angular")
    assert rec["stats"]["removed"] == ["trunk.2", "trunk.3"]
    assert rec["stats"]["scores"][2] == {"index": 2, "name": "trunk.2..trunk.3", "score": pytest.approx(0.0, abs=1e-6)}
    assert len(ctx.structure(gm2).blocks) == 3


MODELS = [("builtin:tiny-llama", None), ("builtin:tiny-gpt2", None), ("builtin:tiny-bert", None),
          ("builtin:tiny-vit", None), (HANDWRITTEN + ":build", "feature-extraction")]


@pytest.mark.parametrize("source, task", MODELS, ids=lambda x: str(x).rsplit("/", 1)[-1])
def test_blocks_leave_the_graph(source, task):
    gm, ctx = _model_ctx(source, task)
    n = len(ctx.structure(gm).blocks)
    gm, rec = _run(gm, ctx, drop=2, keep=[0])
    st = rec["stats"]
    assert len(st["removed"]) == 2 and 0 not in st["removed_indices"]
    assert st["calibration"]["source"] == "example inputs"
    assert len(st["scores"]) == n
    assert len(ctx.structure(gm).blocks) == n - 2 == st["blocks_after"]
    attrs = {x.target for x in gm.graph.nodes if x.op == "get_attr"}
    for path in st["removed"]:
        prefix = path.replace(".", "_") + "_"
        assert not [k for k in gm.state_dict() if k.startswith(path + ".")]
        assert not [a for a in attrs if a.startswith(path + ".") or a.startswith(prefix)]
    assert rec["after"]["params"] < rec["before"]["params"] and rec["after"]["flops"] < rec["before"]["flops"]


@pytest.mark.parametrize("granularity", ["block", "attention"])
def test_decoder_loses_the_removed_layers_cache_slots(granularity):
    gm, ctx = _model_ctx("builtin:tiny-llama")  # text-generation: explicit past_key_i / past_value_i
    n_slots = sum(k.startswith("past_") for k in ctx.inputs)
    assert "past_key_1" in ctx.inputs
    ref_layer0 = ctx.reference[1]
    gm, rec = _run(gm, ctx, select="explicit", layers=[1], granularity=granularity)
    st = rec["stats"]
    assert st["kv_cache_removed"] == ["past_key_1", "past_value_1"]
    kv = st["kv_bytes_per_token"]
    assert kv["after"] == kv["before"] * (n_slots - 2) / n_slots and kv["ratio"] < 1
    places = [x.name for x in gm.graph.nodes if x.op == "placeholder"]
    assert "past_key_1" not in places and "past_value_1" not in places and "past_key_0" in places
    # the manager followed the new layout: inputs and reference cache outputs have one slot pair fewer
    assert "past_key_1" not in ctx.inputs and sum(k.startswith("past_") for k in ctx.inputs) == n_slots - 2
    out = flat_outputs(gm(**ctx.inputs))
    assert len(out) == 1 + n_slots - 2
    torch.testing.assert_close(out[1], ref_layer0)  # layer 0's cache is untouched
    assert not [k for k in gm.state_dict() if ".layers.1.self_attn." in k]


@pytest.mark.parametrize("source, granularity", [
    ("builtin:tiny-llama", "attention"), ("builtin:tiny-gpt2", "mlp"),
    ("builtin:tiny-bert", "attention"), ("builtin:tiny-bert", "mlp"), ("builtin:tiny-vit", "attention"),
])
def test_sublayers_leave_the_graph(source, granularity):
    gm, ctx = _model_ctx(source)
    gm, rec = _run(gm, ctx, drop=1, granularity=granularity)
    st = rec["stats"]
    assert len(st["removed"]) == 1 and st["removed_linears"]
    live = {k.rsplit(".", 1)[0] for k in gm.state_dict()}
    assert not live.intersection(st["removed_linears"])
    blocks = ctx.structure(gm).blocks
    gone = blocks[st["removed_indices"][0]]
    assert (gone.attention if granularity == "attention" else gone.mlp) is None
    assert rec["after"]["flops"] < rec["before"]["flops"]


def test_bert_attention_removal_is_the_documented_post_norm_approximation():
    prep, _ = _prepared("builtin:tiny-bert", None)
    bert = prep.lm.module
    gm, ctx = _model_ctx("builtin:tiny-bert")
    gm, rec = _run(gm, ctx, select="explicit", layers=[1], granularity="attention")
    assert rec["stats"]["removed"] == ["encoder.layer.1.attention"]
    ids = prep.inputs["input_ids"]
    with torch.no_grad():  # every token attends to all (mask of ones), so layers need no mask
        x = bert.embeddings(input_ids=ids, token_type_ids=prep.inputs.get("token_type_ids"))
        for i, layer in enumerate(bert.encoder.layer):
            if i == 1:  # LayerNorm(x + attn(x)) -> x, then the MLP as usual
                x = layer.output(layer.intermediate(x), x)
            else:
                out = layer(x)
                x = out[0] if isinstance(out, tuple) else out
        got = gm(**prep.inputs)
    assert torch.ones_like(ids).equal(prep.inputs.get("attention_mask", torch.ones_like(ids)))
    torch.testing.assert_close(flat_outputs(got)[0], x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"drop": 3}, r"drop 3 would remove all 3 blocks; at most 2 can go"),
    ({"ratio": 0.9, "granularity": "mlp", "keep": [0, 1]}, r"ratio 0.9 \(2 of 3\) asks for 2 mlp sublayers but keep leaves only 1 of 3"),
    ({"select": "explicit", "layers": [5]}, r"layers index 5 is out of range: the model has 3 blocks"),
    ({"drop": 1, "keep": [-4]}, r"keep index -4 is out of range"),
    ({"drop": 2, "keep": [0, 2]}, r"drop 2 asks for 2 blocks but keep leaves only 1 of 3 removable"),
    ({"drop": 2, "select": "angular", "keep": [1]}, r"no run of 2 consecutive blocks avoids keep \[1\]"),
    ({"select": "explicit", "layers": [0, 2], "keep": [-1]}, r"layers \[2\] are also in keep"),
    ({"select": "explicit", "layers": [0, 1, 2]}, r"layers names all 3 blocks"),
])
def test_bad_requests_for_the_model(kwargs, message):
    gm, ctx = _model_ctx(HANDWRITTEN + ":build", "feature-extraction")
    with pytest.raises(PassError, match=message):
        _run(gm, ctx, **kwargs)


def test_model_without_blocks_is_refused():
    model, inputs = HW.build_tensor()
    gm, ctx = _ctx(model, inputs, task="tensor")
    with pytest.raises(PassError, match="found no transformer blocks"):
        _run(gm, ctx, drop=1)


def test_apply_end_to_end_exports(tmp_path):
    # Decoders (removed cache slots) are covered above on the graph; a decoder apply()
    # costs minutes of ONNX export on a shared CPU, so the end-to-end run uses the small model.
    recipe = write_recipe(tmp_path, """
version: 1
model: {inputs: {batch: 2, seq_len: 16}}
calibration: {samples: 4}
passes:
  - layer_skip: {drop: 1, granularity: attention, keep: [0]}
emit: {formats: [onnx, exported]}
bench: {enabled: false}
""")
    out = tmp_path / "out"
    r = apply(recipe, HANDWRITTEN + ":build", out, task="feature-extraction")
    on_disk = json.loads((out / "report.json").read_text())
    rec = on_disk["passes"][0]
    st = rec["stats"]
    assert rec["name"] == "layer_skip" and st["removed"][0] in ("trunk.1.mix", "trunk.2.mix")
    assert st["select"] == "influence" and st["granularity"] == "attention" and len(st["scores"]) == 3
    assert st["calibration"]["batches"] >= 1
    assert {a["format"] for a in on_disk["artifacts"]} == {"onnx", "exported"}
    assert r["fidelity"]["by_artifact"]["onnx"]["finite"] and math.isfinite(r["fidelity"]["cosine_mean"])
    assert rec["after"]["params"] < rec["before"]["params"] and rec["after"]["flops"] < rec["before"]["flops"]
    # the terminal shows every candidate's score, the removed one marked
    from rich.console import Console
    from optcc.report.terminal import report_tables

    con = Console(record=True, width=200)
    for t in report_tables(on_disk):
        con.print(t)
    text = con.export_text()
    assert "layer_skip (pass 1): candidates" in text and "block influence" in text
    row = next(line for line in text.splitlines() if st["removed"][0] in line and "yes" in line)
    assert f"{next(c['score'] for c in st['scores'] if c['name'] == st['removed'][0]):.4f}" in row
