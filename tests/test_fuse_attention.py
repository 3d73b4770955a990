"""fuse_attention: grouped-query attention reads the KV heads as stored (no repeat of the cache),
exact, and becomes one ONNX Attention op at opset 23."""
import onnx
import pytest
import torch
import torch.nn.functional as F

from conftest import write_recipe
from optcc.api import apply
from optcc.errors import PassError
from optcc.passes import fuse_attention

RECIPE = """
version: 1
model: {inputs: {batch: 2, seq_len: 12}}
passes: [cleanup, fuse_attention]
emit: {formats: [onnx, exported], opset: 23}
generate: {new_tokens: 6, batch: 1, rounds: 1}
bench: {warmup: 1, iters: 2, min_seconds: 0.0}
"""


def test_llama_attention_reads_its_kv_heads_and_exports_one_attention_op(tmp_path):
    out = tmp_path / "o"
    r = apply(write_recipe(tmp_path, RECIPE), "builtin:tiny-llama", out)
    st = r["passes"][-1]["stats"]
    assert [(f["heads"], f["kv_heads"]) for f in st["fused"]] == [(4, 2)] * 4 and st["left"] == []
    assert r["greedy_match"] is True and r["fidelity"]["by_artifact"]["onnx"]["max_abs_err"] < 1e-4
    graph = onnx.load(out / "model.onnx").graph
    producers = {o: n for n in graph.node for o in n.output}
    attn = [n for n in graph.node if n.op_type == "Attention"]
    assert len(attn) == 4
    for i, n in enumerate(attn):  # K and V: the layer's cache itself (past ++ new), 2 heads, not an expanded copy
        assert list(n.input[1:3]) == [f"present_key_{i}", f"present_value_{i}"]
        assert {producers[n.input[1]].op_type, producers[n.input[2]].op_type} == {"Concat"}


class _Grouped(torch.nn.Module):
    """Attention with 4 query heads over 2 KV heads, the KV heads repeated `layout`-wise:
    interleaved (each KV head for its group of query heads: what enable_gqa computes) or tiled
    (the whole set of KV heads twice over: another pairing, which must not be fused)."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, q, k, v):
        b, kv, t, d = k.shape
        if self.layout == "interleaved":
            k, v = (x[:, :, None].expand(b, kv, 2, t, d).reshape(b, 2 * kv, t, d) for x in (k, v))
        else:
            k, v = (x[:, None].expand(b, 2, kv, t, d).reshape(b, 2 * kv, t, d) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("layout", ["interleaved", "tiled"])
def test_only_the_repeat_enable_gqa_means_is_fused(layout):
    ins = (torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    m = _Grouped(layout)
    gm = torch.export.export(m, ins).module()
    if layout == "tiled":
        with pytest.raises(PassError, match="the repeated axis is not a new axis after the heads"):
            fuse_attention.run(gm, fuse_attention.Config(), None)
        return
    r = fuse_attention.run(gm, fuse_attention.Config(), None)
    sdpa = [n for n in r.gm.graph.nodes if n.target == fuse_attention.SDPA]
    assert len(sdpa) == 1 and sdpa[0].kwargs["enable_gqa"] and sdpa[0].args[1].meta["val"].shape[1] == 2
    assert not any(n.target == torch.ops.aten.expand.default for n in r.gm.graph.nodes)
    assert torch.allclose(r.gm(*ins), m(*ins), atol=1e-6)


def test_multi_head_attention_is_refused_with_the_reason(tmp_path):
    with pytest.raises(PassError, match="no grouped-query attention") as e:
        apply(write_recipe(tmp_path, RECIPE), "builtin:tiny-gpt2", tmp_path / "o")
    assert "drop the pass" in str(e.value.hint) and not (tmp_path / "o" / "model.onnx").exists()
