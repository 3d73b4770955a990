from dataclasses import dataclass

import pytest
import torch

from optcc.pipeline import registry
from optcc.api import prepare
from optcc.graph.capture import capture
from optcc.pipeline.context import PassContext
from optcc.errors import PassError
from optcc.pipeline.manager import run_passes
from optcc.config.recipe import PassStep, parse_recipe
from optcc.pipeline.registry import PassResult


@dataclass(frozen=True)
class NoConfig:
    pass


@pytest.fixture
def vit():
    recipe = parse_recipe("version: 1\nmodel: {inputs: {batch: 2}}\n")
    prep = prepare("builtin:tiny-vit", None, None, recipe)
    gm = capture(prep.lm.module, prep.inputs).module()
    ctx = PassContext(prep.lm.task, prep.inputs, prep.reference, prep.primary, prep.causal)
    return gm, ctx


@pytest.fixture
def temp_pass():
    names = []

    def add(name, fn, lossless=False):
        registry.register(name, NoConfig, summary="test", lossless=lossless)(fn)
        names.append(name)

    yield add
    for n in names:
        registry._REGISTRY.pop(n, None)


def _step(name):
    return PassStep(name, registry.get(name).config(), 1)


def test_cleanup_is_lossless_and_removes_nodes(vit):
    gm, ctx = vit
    gm, records = run_passes(gm, (_step("cleanup"),), ctx)
    r = records[0].to_dict()
    assert r["modified"] and r["nodes_removed"] > 0 and r["nodes_added"] == 0
    assert r["stats"]["removed_by_op"]["dropout"] > 0
    assert r["after"]["nodes"] < r["before"]["nodes"]
    assert r["after"]["flops"] == r["before"]["flops"] > 0
    assert r["fidelity"]["max_abs_err"] < 1e-6
    assert not any(n.target == torch.ops.aten.dropout.default for n in gm.graph.nodes)


def test_cleanup_keeps_a_contiguous_copy_that_a_later_view_needs():
    """clone() / contiguous() of a transposed tensor changes its strides, and the view after it
    needs them (DeBERTa-v2 and SigLIP do this); a copy of an already contiguous tensor goes."""

    class M(torch.nn.Module):
        def forward(self, x):
            y = x.transpose(1, 2).contiguous().view(x.shape[0], -1)  # needed
            return y + x.clone().view(x.shape[0], -1)  # a copy with the same strides: a no-op

    x = torch.randn(2, 3, 4)
    gm = capture(M(), {"x": x}).module()
    ctx = PassContext("tensor", {"x": x}, [M()(x)], 0)
    gm, records = run_passes(gm, (_step("cleanup"),), ctx)
    assert records[0].stats["removed_by_op"] == {"clone": 1}
    assert torch.equal(gm(x=x), M()(x))


def _scale_output(gm, cfg, ctx):
    """A pass that multiplies the first output by 1.5."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaf = out.args[0][0]
    with gm.graph.inserting_before(out):
        bad = gm.graph.call_function(torch.ops.aten.mul.Tensor, (leaf, 1.5))
    out.replace_input_with(leaf, bad)
    gm.recompile()
    return PassResult(gm, True)


def test_wrong_lossless_pass_is_caught_and_named(vit, temp_pass):
    temp_pass("test_scale", _scale_output, lossless=True)
    gm, ctx = vit
    with pytest.raises(PassError) as e:
        run_passes(gm, (_step("cleanup"), _step("test_scale")), ctx)
    assert "pass 'test_scale' (step 2 after cleanup) is declared lossless but changed the outputs" in e.value.message


def test_a_lossless_pass_after_a_lossy_one_is_checked_against_the_graph_it_was_given(vit, temp_pass):
    temp_pass("test_lossy", _scale_output)  # lossy on purpose: the outputs move away from the original model
    gm, ctx = vit
    gm, records = run_passes(gm, (_step("test_lossy"), _step("cleanup")), ctx)
    assert records[1].modified and records[1].fidelity["cosine_mean"] > 0.99  # fidelity still vs the original


def test_pass_that_crashes_is_named(vit, temp_pass):
    def boom(gm, cfg, ctx):
        raise ValueError("kaput")

    temp_pass("test_boom", boom)
    gm, ctx = vit
    with pytest.raises(PassError, match=r"pass 'test_boom' \(step 1 \(first pass\)\) crashed: ValueError: kaput"):
        run_passes(gm, (_step("test_boom"),), ctx)


def test_pass_that_breaks_shapes_is_named(vit, temp_pass):
    def truncate(gm, cfg, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        leaf = out.args[0][0]
        with gm.graph.inserting_before(out):
            bad = gm.graph.call_function(torch.ops.aten.slice.Tensor, (leaf, 1, 0, 3))
        out.replace_input_with(leaf, bad)
        gm.recompile()
        return PassResult(gm, True)

    temp_pass("test_truncate", truncate)
    gm, ctx = vit
    with pytest.raises(PassError, match="pass 'test_truncate' .* changed output 0's shape"):
        run_passes(gm, (_step("test_truncate"),), ctx)


def test_pass_that_makes_nan_is_named(vit, temp_pass):
    def nan(gm, cfg, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        leaf = out.args[0][0]
        with gm.graph.inserting_before(out):
            bad = gm.graph.call_function(torch.ops.aten.div.Tensor, (leaf, 0.0))
            bad = gm.graph.call_function(torch.ops.aten.mul.Tensor, (bad, 0.0))
        out.replace_input_with(leaf, bad)
        gm.recompile()
        return PassResult(gm, True)

    temp_pass("test_nan", nan)
    gm, ctx = vit
    with pytest.raises(PassError, match="pass 'test_nan' .* NaN"):
        run_passes(gm, (_step("test_nan"),), ctx)


def test_ordering_constraint_checked_at_load(temp_pass):
    registry.register("test_late", NoConfig, summary="t", after=("cleanup",))(lambda gm, c, x: PassResult(gm, False))
    try:
        with pytest.raises(Exception, match="must run after 'cleanup'"):
            parse_recipe("version: 1\npasses:\n  - test_late: {}\n  - cleanup: {}\n", "r.yaml")
        parse_recipe("version: 1\npasses:\n  - cleanup: {}\n  - test_late: {}\n", "r.yaml")
    finally:
        registry._REGISTRY.pop("test_late", None)


def test_per_block_counts_removed_added_rewired_and_bytes():
    from optcc.graph.snapshot import per_block, snapshot

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4, 4))

        def forward(self, x):
            return torch.relu(x @ self.w) + x

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.layers:
                x = b(x)
            return x

    gm = torch.export.export(Net(), (torch.randn(2, 4),)).module()
    before = snapshot(gm)
    relu = next(n for n in gm.graph.nodes if n.op == "call_function" and "relu" in str(n.target)
                and "layers.1" in str(n.meta.get("nn_module_stack", "")))
    relu.replace_all_uses_with(relu.args[0])  # block 1: relu's consumer now reads the matmul (rewired)
    gm.graph.erase_node(relu)
    gm.get_submodule("layers.1").w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.float16))  # half the bytes
    gm.recompile()
    rows = {r["block"]: r for r in per_block(before, snapshot(gm))}
    assert list(rows) == ["layers.1"]
    r = rows["layers.1"]
    assert (r["removed"], r["added"], r["rewired"]) == (1, 0, 1)
    assert (r["bytes_before"], r["bytes_after"]) == (64, 32)


def _halve(x):
    return x * 0.5


def test_a_pass_that_puts_a_python_function_into_the_graph_is_refused(vit, temp_pass):
    """The pass contract: graphs hold ATen ops and torch.library ops, never Python callables."""
    gm, ctx = vit

    def python_target(gm, cfg, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        x = out.args[0][0]
        with gm.graph.inserting_before(out):
            y = gm.graph.call_function(_halve, (x,))
        out.args = ((y, *out.args[0][1:]),)
        gm.recompile()
        return PassResult(gm, modified=True)

    temp_pass("python_target", python_target)
    with pytest.raises(PassError, match="put _halve .* which is not a torch op"):
        run_passes(gm, (_step("python_target"),), ctx)


def test_kv_passes_insert_registered_ops():
    """kv_share merge and kv_quant write their cache through optcc:: ops (optcc/ops/kv_cache.py)."""
    from optcc.graph.fx import foreign_ops

    recipe = parse_recipe("version: 1\nmodel: {inputs: {batch: 1, seq_len: 8}}\n")
    prep = prepare("builtin:tiny-llama", None, None, recipe)
    from optcc.intake.decoder import dynamic_shapes, no_guard_module
    with no_guard_module():
        gm = capture(prep.lm.module, prep.inputs, True, dynamic_shapes(prep.cache)).module()
        ctx = PassContext(prep.lm.task, prep.inputs, prep.reference, prep.primary, prep.causal, cache=prep.cache,
                          prefix=prep.prefix)
        steps = parse_recipe("version: 1\npasses: [{kv_share: {mode: merge}}, kv_quant]\n").passes
        gm, _ = run_passes(gm, steps, ctx)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {torch.ops.optcc.kv_merge.default, torch.ops.optcc.kv_restore.default,
            torch.ops.optcc.kv_quantize_int8.default, torch.ops.optcc.kv_dequantize_int8.default} <= targets
    assert foreign_ops(gm.graph) == []
