"""precision: bf16/fp16 graphs with norms, softmax and reductions in fp32, checked on encoders and
decoders, refused with what was measured where the machine is slow at the format."""
import pytest
import torch

from conftest import captured_decoder, pass_context, write_recipe
from optcc.api import apply
from optcc.config.recipe import parse_recipe
from optcc.errors import ExportError, PassError
from optcc.passes.precision import KEEP_OPS
from optcc.pipeline.manager import run_passes

aten = torch.ops.aten


def _recipe(passes: str, formats: str = "[exported]", extra: str = "") -> str:
    return (f"version: 1\nmodel: {{inputs: {{batch: 2, seq_len: 16}}}}\npasses:\n{passes}\n"
            f"emit: {{formats: {formats}}}\nbench: {{enabled: false}}\n{extra}")


def _dtype_of(node):
    return node.meta["val"].dtype if isinstance(node.meta.get("val"), torch.Tensor) else None


def test_an_encoder_runs_low_with_norms_and_softmax_reading_fp32(tmp_path):
    from optcc.api import prepare
    from optcc.graph.capture import capture
    from optcc.pipeline.context import PassContext

    recipe = parse_recipe(_recipe("  - precision: {min_speedup: 0}"))
    prep = prepare("builtin:tiny-bert", None, None, recipe)
    gm = capture(prep.lm.module, prep.inputs).module()
    ctx = PassContext(prep.lm.task, prep.inputs, prep.reference, prep.primary, prep.causal)
    gm, (rec,) = run_passes(gm, recipe.passes, ctx)
    st = rec.stats
    assert st["low_ops"] > 20 and st["kept_fp32"] >= 9 and st["measured_speedup"] > 0
    weights = {k: v.dtype for k, v in gm.named_parameters()}
    assert weights["embeddings.word_embeddings.weight"] == torch.bfloat16
    assert all(d == torch.float32 for k, d in weights.items() if "LayerNorm" in k)  # read only by kept norms
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(v) for v in prep.inputs.values()])
    kept = [n for n in gm.graph.nodes if n.target in KEEP_OPS["norms"] | KEEP_OPS["softmax"]]
    assert kept and all(_dtype_of(a) == torch.float32 for n in kept for a in n.all_input_nodes if _dtype_of(a) is not None
                        and _dtype_of(a).is_floating_point)
    linears = [n for n in gm.graph.nodes if n.target in (aten.addmm.default, aten.mm.default, aten.linear.default)]
    assert linears and all(_dtype_of(n) == torch.bfloat16 for n in linears)
    from optcc.graph.capture import flat_outputs

    assert all(o.dtype == torch.float32 for o in flat_outputs(gm(**prep.inputs)))
    assert rec.fidelity["cosine_mean"] > 0.99


def test_a_decoder_keeps_its_fp32_cache_interface_and_rotary_angles(tmp_path):
    prep, gm0 = captured_decoder("builtin:tiny-llama")
    import copy

    gm = copy.deepcopy(gm0)
    recipe = parse_recipe(_recipe("  - precision: {min_speedup: 0}"))
    gm, (rec,) = run_passes(gm, recipe.passes, pass_context(prep))
    buffers = dict(gm.named_buffers())
    assert all(v.dtype == torch.float32 for k, v in buffers.items() if "inv_freq" in k)
    from optcc.graph.capture import flat_outputs

    outs = flat_outputs(gm(**prep.inputs))
    assert len(outs) > 4 and all(o.dtype == torch.float32 for o in outs if o.is_floating_point())
    assert rec.fidelity["cosine_mean"] > 0.99


def test_a_machine_slow_at_the_format_is_refused_with_what_was_measured(tmp_path):
    with pytest.raises(PassError, match=r"precision bf16: the graph ran [0-9.]+x as fast as fp32 here .* ms.*min_speedup: 0"):
        apply(write_recipe(tmp_path, _recipe("  - precision: {min_speedup: 1000}")), "builtin:tiny-bert", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_onnxruntime_without_bf16_kernels_gets_one_line(tmp_path):
    with pytest.raises(ExportError, match="onnxruntime's CPU provider cannot run this graph.*emit the torch artifact") as e:
        apply(write_recipe(tmp_path, _recipe("  - precision: {min_speedup: 0}", "[onnx]")), "builtin:tiny-vit", tmp_path / "o")
    assert "\n" not in str(e.value)


def test_composes_after_structural_and_quantize_passes(tmp_path):
    r = apply(write_recipe(tmp_path, _recipe("  - token_merge: {r: 8}\n  - quantize: {scheme: int8-dynamic}\n"
                                             "  - precision: {min_speedup: 0}")), "builtin:tiny-vit", tmp_path / "o")
    st = r["passes"][-1]["stats"]
    assert st["foreign_fp32"] == r["passes"][1]["stats"]["quantized"]  # quantized linears read fp32
    assert r["fidelity"]["cosine_mean"] > 0.98


def test_precision_must_come_last_and_validates_its_options():
    from optcc.errors import RecipeError

    with pytest.raises(RecipeError, match="quantize"):
        parse_recipe(_recipe("  - precision\n  - quantize"))
    with pytest.raises(RecipeError, match="min_speedup must be >= 0"):
        parse_recipe(_recipe("  - precision: {min_speedup: -1}"))
    with pytest.raises(RecipeError, match="'int4' is not one of bf16, fp16"):
        parse_recipe(_recipe("  - precision: {dtype: int4}"))
