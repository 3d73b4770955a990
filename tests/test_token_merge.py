import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import HANDWRITTEN, write_recipe
from optcc.algorithms import tome as M
from optcc.api import apply, prepare
from optcc.graph.capture import capture, flat_outputs, run_graph
from optcc.pipeline.context import PassContext
from optcc.errors import PassError, RecipeError
from optcc.pipeline.manager import run_passes
from optcc.graph.probe import record
from optcc.config.recipe import parse_recipe
from tests.models.handwritten import Layer


# ---- pure math against straightforward loops ------------------------------------------------

def _groups_tome(metric, r, protected):
    """Loop reference of ToMe matching for one example: {kept token: [tokens merged into it]}."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    t = m.shape[0]
    best = {}
    for a in range(0, t, 2):
        if a in protected:
            continue
        cands = [(float(m[a] @ m[b]), b) for b in range(1, t, 2) if b not in protected]
        best[a] = max(cands)
    chosen = sorted(best, key=lambda a: -best[a][0])[:r]
    groups = {i: [i] for i in range(t)}
    for a in chosen:
        groups[best[a][1]] += groups.pop(a)
    return groups


def _groups_pitome(metric, r, margin, protected):
    m = metric / metric.norm(dim=-1, keepdim=True)
    t = m.shape[0]
    energy = [float(F.elu(m[i] @ m.T - margin).mean()) if i not in protected else -float("inf") for i in range(t)]
    order = sorted(range(t), key=lambda i: -energy[i])[:2 * r]
    a_set, b_set = order[::2], order[1::2]
    groups = {i: [i] for i in range(t)}
    for a in a_set:
        b = max(b_set, key=lambda b: float(m[a] @ m[b]))
        groups[b] += groups.pop(a)
    return groups


def _apply_groups(x, size, groups):
    keys = sorted(groups)
    s = torch.stack([sum(size[i] for i in groups[k]) for k in keys])
    xs = torch.stack([sum(x[i] * size[i] for i in groups[k]) for k in keys]) / s
    return xs, s


@pytest.mark.parametrize("method, protected", [("tome", ()), ("tome", (0,)), ("tome", (0, 1)), ("pitome", (0,))])
def test_merge_matches_loop_reference(method, protected):
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(3, 17, 8, generator=g), torch.randn(3, 17, 5, generator=g)
    size = torch.randint(1, 4, (3, 17, 1), generator=g).float()
    r = 5
    norm = F.normalize(metric, dim=-1)
    m = M.bipartite_soft_matching(norm, r, protected) if method == "tome" else M.pitome_matching(norm, r, 0.5, protected)
    got_x, got_s = M.merge_wavg(x, size, m)
    assert got_x.shape == (3, 12, 8) and got_s.shape == (3, 12, 1)
    for b in range(3):
        groups = _groups_tome(metric[b], r, protected) if method == "tome" else _groups_pitome(metric[b], r, 0.5, protected)
        want_x, want_s = _apply_groups(x[b], size[b], groups)
        torch.testing.assert_close(got_x[b], want_x)
        torch.testing.assert_close(got_s[b], want_s)
        assert m.keep[b].tolist() == sorted(groups)
        for p in protected:  # protected tokens are neither merged away nor merged into
            assert p in m.keep[b].tolist() and p not in m.dst[b].tolist()


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_size_weighted_merge_preserves_token_mass(method):
    g = torch.Generator().manual_seed(1)
    x, size = torch.randn(2, 33, 16, generator=g), torch.rand(2, 33, 1, generator=g) + 0.5
    metric = F.normalize(torch.randn(2, 33, 4, generator=g), dim=-1)
    m = M.bipartite_soft_matching(metric, 16, (0,)) if method == "tome" else M.pitome_matching(metric, 16, 0.3, (0,))
    y, s = M.merge_wavg(x, size, m)
    torch.testing.assert_close((y * s).sum(1), (x * size).sum(1))
    torch.testing.assert_close(s.sum(1), size.sum(1))
    torch.testing.assert_close(y[:, 0], x[:, 0])  # CLS untouched (up to x * size / size rounding)


def test_padding_never_mixes_with_real_tokens():
    g = torch.Generator().manual_seed(2)
    t = 16
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[0, 10:] = False
    x, metric = torch.randn(2, t, 6, generator=g), F.normalize(torch.randn(2, t, 4, generator=g), dim=-1)
    metric[0, 10:] = metric[0, 1]  # padding that looks exactly like a real token
    for m in (M.bipartite_soft_matching(metric, 7, (0,), valid), M.pitome_matching(metric, 7, 0.5, (0,), valid)):
        for b in range(2):
            for s, d, ok in zip(m.src[b].tolist(), m.dst[b].tolist(), m.ok[b].tolist()):
                assert ok == 0.0 or bool(valid[b, s]) == bool(valid[b, d])
        assert M.keep_tokens(valid, m).shape == (2, t - 7)
        bias = M.attention_bias(None, M.keep_tokens(valid, m), torch.float32)
        assert bias.shape == (2, 1, 1, t - 7) and bool(((bias < -1e30) == ~M.keep_tokens(valid, m)[:, None, None]).all())


def test_padding_spends_r_before_real_tokens():
    # 3 padded A tokens (positions 10, 12, 14) of 8: r=3 drops exactly those, no real token merges;
    # r=5 drops them and merges only the two most similar real pairs.
    g = torch.Generator().manual_seed(4)
    valid = torch.ones(1, 16, dtype=torch.bool)
    valid[0, 10:] = False
    metric = F.normalize(torch.randn(1, 16, 4, generator=g), dim=-1)
    m = M.bipartite_soft_matching(metric, 3, (0,), valid)
    assert sorted(m.src[0].tolist()) == [10, 12, 14] and m.ok.sum() == 0
    m5 = M.bipartite_soft_matching(metric, 5, (0,), valid)
    real = [s for s, ok in zip(m5.src[0].tolist(), m5.ok[0].tolist()) if ok]
    assert len(real) == 2 and all(valid[0, s] for s in real)
    # PiToMe: the 6 padded tokens take the first mergeable slots (A: 15, 13, 11 are dropped)
    p3 = M.pitome_matching(metric, 3, 0.5, (0,), valid)
    assert sorted(p3.src[0].tolist()) == [11, 13, 15] and p3.ok.sum() == 0
    p5 = M.pitome_matching(metric, 5, 0.5, (0,), valid)
    real = [s for s, ok in zip(p5.src[0].tolist(), p5.ok[0].tolist()) if ok]
    assert len(real) == 2 and all(valid[0, s] for s in real)


def test_take_rows_is_a_row_gather_per_batch_item():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 9, 4, generator=g)
    idx = torch.randint(0, 9, (3, 5), generator=g)
    want = torch.stack([x[b, idx[b]] for b in range(3)])
    assert torch.equal(M.take_rows(x, idx), want)
    assert torch.equal(M.take_rows(x[:, ::2], idx % 5), torch.stack([x[b, ::2][idx[b] % 5] for b in range(3)]))


def test_unmerge_copies_each_group_back():
    g = torch.Generator().manual_seed(3)
    x, metric = torch.randn(2, 12, 4, generator=g), F.normalize(torch.randn(2, 12, 3, generator=g), dim=-1)
    size = torch.ones(2, 12, 1)
    m1 = M.bipartite_soft_matching(metric, 4, (0,))
    y1, s1 = M.merge_wavg(x, size, m1)
    src = M.source_positions(m1, 12)
    m2 = M.bipartite_soft_matching(F.normalize(y1, dim=-1), 3, (0,))
    y2, s2 = M.merge_wavg(y1, s1, m2)
    src = M.update_source_map(src, m2, 8)
    full = M.unmerge(y2, src)
    assert full.shape == x.shape
    for b in range(2):  # every merged row is the mean of the originals mapped onto it
        for j in range(5):
            members = (src[b] == j).nonzero().flatten()
            assert len(members) == int(s2[b, j])
            torch.testing.assert_close(y2[b, j], x[b, members].mean(0))


@pytest.mark.parametrize("r, blocks, want", [
    (4, 3, [4, 4, 4]),
    ((4, 0), 3, [4, 4, 4]),
    ((4, -1), 5, [8, 6, 4, 2, 0]),
    ((4, 1), 5, [0, 2, 4, 6, 8]),
    ((8, 8, 4, 4, 0, 0), 6, [8, 8, 4, 4, 0, 0]),
    (0, 2, [0, 0]),
])
def test_parse_r(r, blocks, want):
    assert M.parse_r(r, blocks) == want


def test_ratio_and_cap_schedules():
    assert M.ratio_schedule(0.5, 65, 4) == [9, 8, 8, 8]  # 65 -> 32 tokens
    assert M.cap_r([40, 40], 65, 1) == ([32, 16], [65, 33], [33, 17])
    with pytest.raises(ValueError, match="one entry per block"):
        M.parse_r((8, 8, 4), 6)


@pytest.mark.parametrize("params, message", [
    ("{}", "exactly one of r"),
    ("{r: 4, ratio: 0.5}", "exactly one of r"),
    ("{ratio: 1.5}", "ratio must be in"),
    ("{r: -2}", "r must be >= 0"),
    ("{r: [4, 2.5, 1]}", "one non-negative integer per block"),
    ("{r: 4, margin: 0.5}", "margin applies only"),
    ("{r: 4, method: bipartite}", "'bipartite' is not one of"),
    ("{r: 4, protect: [first]}", "protect: expected a list of 'cls' | 'distill'"),
])
def test_bad_config_is_a_recipe_error(params, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(f"version: 1\npasses:\n  - token_merge: {params}\n", "r.yaml")


# ---- graph surgery on tiny models ------------------------------------------------------------

_PREPARED = {}


def _fresh(source, task=None, inputs=None, seq_len=16):
    """A freshly captured graph and context (capture is cached per model)."""
    key = (source, task, seq_len)
    if key not in _PREPARED:
        recipe = parse_recipe(f"version: 1\nmodel: {{inputs: {{batch: 2, seq_len: {seq_len}}}}}\n")
        prep = prepare(source, task, None, recipe)
        _PREPARED[key] = (prep, capture(prep.lm.module, prep.inputs))
    prep, ep = _PREPARED[key]
    inputs = inputs or prep.inputs
    with torch.no_grad():
        ref = flat_outputs(prep.lm.module(**inputs))
    return ep.module(), PassContext(prep.lm.task, inputs, ref, prep.primary, prep.causal), prep


def _merge(gm, ctx, params):
    recipe = parse_recipe(f"version: 1\npasses:\n  - token_merge: {params}\n")
    gm, records = run_passes(gm, recipe.passes, ctx)
    return gm, records[0].to_dict()


def test_r0_is_the_identity():
    gm, ctx, _ = _fresh("builtin:tiny-vit")
    gm, rec = _merge(gm, ctx, "{r: 0}")
    assert not rec["modified"] and rec["stats"]["r"] == [0, 0, 0, 0]
    assert all(torch.equal(a, b) for a, b in zip(run_graph(gm, ctx.inputs), ctx.reference))


def test_vit_tokens_shrink_as_scheduled():
    gm, ctx, prep = _fresh("builtin:tiny-vit")
    fc1 = [ctx.structure(gm).linear(b.mlp.linears[0]).node for b in ctx.structure(gm).blocks]
    gm, rec = _merge(gm, ctx, "{r: [8, -1]}")
    st = rec["stats"]
    assert st["r"] == [16, 11, 5, 0] and st["protected"] == [0]
    assert st["tokens_mlp"] == [49, 38, 33, 33] and st["tokens_attention"] == [65, 49, 38, 33]
    assert rec["after"]["flops"] < 0.75 * rec["before"]["flops"]
    assert rec["fidelity"]["cosine_mean"] > 0.95
    per_block = st["blocks"]  # FLOPs per block, counted from the graph before and after
    assert [b["tokens_mlp"] for b in per_block] == st["tokens_mlp"]
    assert all(b["flops_after"] < b["flops_before"] for b in per_block)
    assert [b["merge_flops"] > 0 for b in per_block] == [True, True, True, False]  # the r=0 block has no merge
    last = per_block[-1]  # 33 tokens instead of 65: linears at 33/65, attention at (33/65)^2
    assert 0.25 < last["flops_after"] / last["flops_before"] < 33 / 65
    assert sum(b["flops_before"] for b in per_block) <= rec["before"]["flops"]
    assert 0 < st["block_flops_saved"] < 1
    from rich.console import Console
    from optcc.report.terminal import _tokens_table
    con = Console(record=True, width=200)
    con.print(_tokens_table({"name": "token_merge", "step": 1, "stats": st}))
    text = con.export_text()  # what `optcc apply` shows per block
    assert "token_merge (pass 1): tokens and FLOPs per block" in text and "65 → 49" in text and "all blocks" in text
    seen = record(gm, [ctx.inputs], fc1)  # the MLP input of each block, measured
    assert [seen[n][0].shape[1] for n in fc1] == st["tokens_mlp"]
    nodes = {n.name: n for n in gm.graph.nodes}
    assert [nodes[n].args[0].meta["val"].shape[1] for n in fc1] == st["tokens_mlp"]  # meta refreshed
    assert len(ctx.structure(gm).blocks) == 4
    x3 = torch.randn(3, 3, 32, 32)  # dynamic batch still works
    assert run_graph(gm, {"pixel_values": x3})[0].shape == (3, 10)


def _padded_bert_inputs(prep):
    mask = torch.ones_like(prep.inputs["input_ids"])
    mask[0, 10:] = 0
    mask[1, 13:] = 0
    return {**prep.inputs, "attention_mask": mask}


def test_bert_padding_stays_masked_and_unmerge_restores_length():
    _, _, prep = _fresh("builtin:tiny-bert")
    inputs = _padded_bert_inputs(prep)
    gm, ctx, _ = _fresh("builtin:tiny-bert", inputs=inputs)
    gm, rec = _merge(gm, ctx, "{r: 2, unmerge: true}")
    assert rec["stats"]["tokens_mlp"] == [14, 12, 10, 8]
    hidden, pooled = run_graph(gm, inputs)
    assert hidden.shape == (2, 16, 64) and pooled.shape == (2, 64)
    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    other["input_ids"][0, 10:] = 7  # different padded content
    other["input_ids"][1, 13:] = 99
    hidden2, pooled2 = run_graph(gm, other)
    torch.testing.assert_close(hidden2[0, :10], hidden[0, :10])
    torch.testing.assert_close(hidden2[1, :13], hidden[1, :13])
    torch.testing.assert_close(pooled2, pooled)


def test_token_level_output_without_unmerge_is_refused():
    gm, ctx, _ = _fresh("builtin:tiny-bert")
    with pytest.raises(PassError, match="set unmerge: true"):
        _merge(gm, ctx, "{r: 2}")


@pytest.mark.parametrize("source", ["builtin:tiny-llama", "builtin:tiny-gpt2"])
def test_causal_models_are_refused(source):
    gm, ctx, _ = _fresh(source)
    with pytest.raises(PassError, match="causal decoders"):
        _merge(gm, ctx, "{r: 2}")


def test_explicit_softmax_attention_is_refused():
    gm, ctx, _ = _fresh(f"{HANDWRITTEN}:build_softmax", "feature-extraction")
    with pytest.raises(PassError, match=r"block trunk.0: attention is an explicit matmul \+ softmax"):
        _merge(gm, ctx, "{r: 2, unmerge: true}")


def test_handwritten_pitome_with_start_and_unmerge():
    gm, ctx, _ = _fresh(f"{HANDWRITTEN}:build", "feature-extraction")
    gm, rec = _merge(gm, ctx, "{r: 4, method: pitome, start: 1, unmerge: true}")
    st = rec["stats"]
    assert st["r"] == [0, 4, 4] and st["protected"] == [] and st["method"] == "pitome"
    assert run_graph(gm, ctx.inputs)[0].shape == ctx.reference[0].shape


class _MeanPooled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(50, 32)
        self.trunk = nn.ModuleList(Layer(32, 4, False) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 5)

    def forward(self, input_ids):
        x = self.tok(input_ids)
        for layer in self.trunk:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


def test_mean_pooling_becomes_size_weighted():
    model = _MeanPooled().eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))}
    ep = capture(model, inputs)
    ref = flat_outputs(model(**inputs))
    outs = {}
    for unmerge in (False, True):
        ctx = PassContext("text-classification", inputs, ref, 0, False)
        gm, rec = _merge(ep.module(), ctx, f"{{r: 5, unmerge: {str(unmerge).lower()}}}")
        outs[unmerge] = run_graph(gm, inputs)[0]
    assert rec["stats"]["tokens_after"] == 10
    # the mean over the unmerged sequence is by construction size-weighted: both must agree
    torch.testing.assert_close(outs[False], outs[True], atol=1e-5, rtol=1e-4)


def test_apply_writes_verified_onnx_and_torch(tmp_path):
    recipe = write_recipe(tmp_path, """
version: 1
model: {source: builtin:tiny-vit, inputs: {batch: 2}}
passes:
  - token_merge: {r: 8}
emit: {formats: [onnx, exported]}
bench: {enabled: false}
""")
    report = apply(recipe, out=tmp_path / "out")
    st = report["passes"][0]["stats"]
    assert st["tokens_mlp"] == [57, 49, 41, 33] and st["r"] == [8, 8, 8, 8]
    assert {a["format"] for a in report["artifacts"]} == {"onnx", "exported"}
    assert all(a["check"]["max_abs_err"] < 1e-4 for a in report["artifacts"])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["passes"][0]["name"] == "token_merge"
