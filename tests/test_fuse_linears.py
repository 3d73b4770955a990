"""fuse_linears: linears that read one activation run as one wider linear, exactly, in every
family (Llama q/k/v and gate/up, BERT q/k/v), before quantization, and into the artifacts."""
import onnx
import pytest
import torch

from conftest import write_recipe
from optcc.api import apply
from optcc.errors import PassError, RecipeError
from optcc.passes import fuse_linears

RECIPE = """
version: 1
model: {{inputs: {{batch: 2, seq_len: 12}}}}
passes: {passes}
emit: {{formats: [onnx, exported]}}
bench: {{warmup: 1, iters: 2, min_seconds: 0.0}}
"""


def _linears(model: onnx.ModelProto, op: str) -> int:
    """Nodes of type `op` that multiply by a stored weight (not attention's q·k and p·v)."""
    weights = {i.name for i in model.graph.initializer}
    return sum(n.op_type == op and any(x in weights for x in n.input[1:]) for n in model.graph.node)


def test_llama_qkv_and_gate_up_become_one_linear_each(tmp_path):
    out = tmp_path / "o"
    r = apply(write_recipe(tmp_path, RECIPE.format(passes="[cleanup, fuse_linears]")), "builtin:tiny-llama", out)
    st = r["passes"][-1]["stats"]
    layers = {m["layer"]: m["out_features"] for m in st["merged"]}
    assert layers["model.layers.0.self_attn.q_proj+k_proj+v_proj"] == [64, 32, 32]  # 4 query heads, 2 KV heads of 16
    assert layers["model.layers.3.mlp.gate_proj+up_proj"] == [128, 128]
    assert len(layers) == 8 and st["linears_merged"] == 20 and st["left"] == []
    assert r["fidelity"]["by_artifact"]["onnx"]["max_abs_err"] < 1e-4
    # 4 layers x (qkv, o, gate+up, down) + lm_head, down from 4 x 7 + 1
    assert _linears(onnx.load(out / "model.onnx"), "MatMul") == 17


def test_bert_qkv_merges_and_int4_after_it_quantizes_each_row_as_before(tmp_path):
    """Groups run along the input features, so the merged layer's codes are the separate layers'."""
    quant = "{quantize: {scheme: int4-weight-only, group_size: 16}}"
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    fused = apply(write_recipe(tmp_path / "a", RECIPE.format(passes=f"[cleanup, fuse_linears, {quant}]")),
                  "builtin:tiny-bert", tmp_path / "a" / "o")
    plain = apply(write_recipe(tmp_path / "b", RECIPE.format(passes=f"[cleanup, {quant}]")),
                  "builtin:tiny-bert", tmp_path / "b" / "o")
    assert [m["from"][-1].rpartition(".")[2] for m in fused["passes"][1]["stats"]["merged"]] == ["value"] * 4
    assert fused["passes"][-1]["stats"]["quantized"] == plain["passes"][-1]["stats"]["quantized"] - 8
    fo, po = (r["fidelity"]["by_artifact"]["exported"] for r in (fused, plain))
    assert abs(fo["max_abs_err"] - po["max_abs_err"]) < 1e-5
    assert _linears(onnx.load(tmp_path / "a" / "o" / "model.onnx"), "MatMulNBits") == 4 * 4 + 1  # qkv, output, intermediate, output per layer; the pooler


def test_tied_weights_stay_apart_and_the_reason_is_listed():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(8, 6) for _ in range(3))
            self.c.weight = self.a.weight  # tied: merging a would leave c reading a stale copy

        def forward(self, x):
            return self.a(x) + self.b(x).sum(-1, keepdim=True) + self.c(x)

    x = torch.randn(3, 8)
    m = Two().eval()
    gm = torch.export.export(m, (x,)).module()
    ctx = type("Ctx", (), {})()
    with pytest.raises(PassError, match="tied"):
        fuse_linears.run(gm, fuse_linears.Config(), ctx)


def test_a_model_with_nothing_to_merge_is_refused(tmp_path):
    with pytest.raises(PassError, match="fuse_linears found nothing to merge .no two linear layers read the same activation"):
        apply(write_recipe(tmp_path, RECIPE.format(passes="[fuse_linears]")), "builtin:tiny-gpt2", tmp_path / "o")


def test_quantize_before_it_is_an_ordering_error(tmp_path):
    with pytest.raises(RecipeError, match="fuse_linears"):
        apply(write_recipe(tmp_path, RECIPE.format(passes="[{quantize: {scheme: int8-dynamic}}, fuse_linears]")),
              "builtin:tiny-llama", tmp_path / "o")


def test_merged_path_names_the_parent_once():
    assert fuse_linears.merged_path(["m.l.0.attn.q", "m.l.0.attn.k"]) == "m.l.0.attn.q+k"
    assert fuse_linears.merged_path(["a.q", "b.k"]) == "a.q+b.k"
