import pytest

from conftest import HANDWRITTEN
from optcc.api import inspect_model


@pytest.mark.parametrize("source, task, container, n, kv, rotary, fused, norm, causal", [
    ("builtin:tiny-llama", None, "model.layers", 4, 2, True, False, "pre", True),
    ("builtin:tiny-gpt2", None, "transformer.h", 4, 4, False, True, "pre", True),
    ("builtin:tiny-bert", None, "encoder.layer", 4, 4, False, False, "post", False),
    ("builtin:tiny-vit", None, "vit.layers", 4, 4, False, False, "pre", None),
    (f"{HANDWRITTEN}:build", "feature-extraction", "trunk", 3, 4, False, False, "pre", False),
])
def test_structure(source, task, container, n, kv, rotary, fused, norm, causal):
    lm, s = inspect_model(source, task)
    assert s.container == container
    assert len(s.blocks) == n
    assert s.causal is causal
    for i, b in enumerate(s.blocks):
        assert b.index == i
        a = b.attention
        assert a is not None and a.kind == "sdpa"
        assert a.num_kv_heads == kv and a.rotary is rotary and a.fused_qkv is fused
        assert a.q and a.k and a.v and a.o
        assert b.attn_residual and b.mlp_residual and b.attn_residual != b.mlp_residual
        assert b.mlp is not None and b.mlp.down in b.mlp.linears
        assert b.norm_position == norm
    assert s.head  # an output projection after the blocks


def test_handwritten_names():
    _, s = inspect_model(f"{HANDWRITTEN}:build", "feature-extraction")
    b = s.blocks[1]
    assert (b.attention.q, b.attention.k, b.attention.v, b.attention.o) == (
        "trunk.1.mix.wq", "trunk.1.mix.wk", "trunk.1.mix.wv", "trunk.1.mix.proj")
    assert b.mlp.linears == ["trunk.1.ff.lin_in", "trunk.1.ff.lin_out"]
    assert s.embeddings == ["tok"] and s.head == ["readout"] and s.final_norms == ["out_norm"]


def test_explicit_softmax_attention():
    _, s = inspect_model(f"{HANDWRITTEN}:build_softmax", "feature-extraction")
    a = s.blocks[0].attention
    assert a.kind == "softmax"
    assert (a.q, a.k, a.v, a.o) == ("trunk.0.mix.wq", "trunk.0.mix.wk", "trunk.0.mix.wv", "trunk.0.mix.proj")


def test_llama_gqa_shapes():
    _, s = inspect_model("builtin:tiny-llama")
    a = s.blocks[0].attention
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (4, 2, 16)
    assert s.linear(a.k).out_features == 32


def test_no_blocks_is_reported():
    _, s = inspect_model(f"{HANDWRITTEN}:build_tensor")
    assert s.blocks == [] and s.notes
