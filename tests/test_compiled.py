"""The compiled torch artifact: model.pt2 built by AOTInductor. Passes compile into it, the package
holds no Python op (it runs in a process that never imports optcc), int8 linears reach oneDNN's
int8 kernel, decoders keep dynamic cache lengths, and bad input gets one line."""
import json
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import write_recipe
from optcc.api import apply
from optcc.compat import cxx_compiler
from optcc.errors import ExportError
from optcc.export import compiled
from optcc.export.emit import load_artifact

needs_compiler = pytest.mark.skipif(cxx_compiler() is None, reason="AOTInductor needs a C++ compiler (g++)")


def _recipe(passes: str, extra: str = "") -> str:
    return (f"version: 1\nmodel: {{inputs: {{batch: 2, seq_len: 16}}}}\npasses:\n{passes}\n"
            f"emit: {{formats: [torch], atol: 0.05}}\nbench: {{enabled: false}}\n{extra}")


def _wrapper_source(path) -> str:
    with zipfile.ZipFile(path) as z:
        return "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))


@needs_compiler
def test_structural_passes_int8_and_bf16_compile_to_onednn_and_run_without_optcc(tmp_path):
    out = tmp_path / "o"
    r = apply(write_recipe(tmp_path, _recipe("  - layer_skip: {drop: 1}\n  - token_merge: {r: 8}\n"
                                             "  - quantize: {scheme: int8-dynamic, activations: per-tensor}\n"
                                             "  - precision: {min_speedup: 0}")),
              "builtin:tiny-vit", out)
    (art,) = r["artifacts"]
    quantized = r["passes"][2]["stats"]["quantized"]
    assert art["format"] == "torch" and art["path"].endswith("model.pt2") and art["check"]["cosine_mean"] > 0.999
    assert art["build"]["linear_kernels"] == {"onednn-int8": quantized} and art["build"]["compile_s"] > 0
    src = _wrapper_source(out / "model.pt2")
    assert src.count("qlinear_pointwise") >= quantized and "optcc" not in src
    x = torch.randn(3, 3, 32, 32)  # a batch size the capture did not see: the batch stays dynamic
    torch.save({"x": x, "expected": load_artifact(out / "model.pt2")({"pixel_values": x})}, tmp_path / "io.pt")
    code = ("import sys, torch, transformers.modeling_outputs\n"  # the output's pytree type; no optcc
            f"io = torch.load(r'{tmp_path / 'io.pt'}')\n"
            f"m = torch._inductor.aoti_load_package(r'{out / 'model.pt2'}')\n"
            "y = m(pixel_values=io['x'])\n"
            "assert not any(k.startswith('optcc') for k in sys.modules)\n"
            "print(float((y.logits - io['expected'][0]).abs().max()))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip()) < 1e-4


@needs_compiler
def test_a_fused_decoder_with_merged_int8_cache_compiles_with_dynamic_cache_and_generates_like_the_graph(tmp_path):
    from optcc.intake.decoder import CacheSpec, no_guard_module
    from optcc.measure.generation import generate

    out = tmp_path / "o"
    r = apply(write_recipe(tmp_path, _recipe("  - kv_share: {mode: merge}\n  - fuse_attention\n  - kv_quant\n  - fuse_linears\n"
                                             "  - quantize: {scheme: int8-dynamic}").replace("[torch]", "[torch, exported]")),
              "builtin:tiny-llama", out)
    assert r["artifacts"][0]["build"]["linear_kernels"] == {"fp32-codes": r["passes"][-1]["stats"]["quantized"]}
    spec = CacheSpec.read(out / "decoder.json")
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), no_guard_module():  # prefill 9 tokens, then caches of 9..14: other lengths than captured
        toks = [generate(load_artifact(out / n), spec, prompt, 6)[0] for n in ("model.pt2", "model.exported.pt2")]
    assert torch.equal(toks[0], toks[1])


def test_lowering_keeps_int8_where_the_cpu_multiplies_it_exactly():
    from optcc.ops.quantized import linear_dq_int8_tensor  # noqa: F401  (registers the op)

    class Lin(torch.nn.Module):
        def __init__(self, codes):
            super().__init__()
            self.register_buffer("w", codes)
            self.register_buffer("s", torch.full((8,), 0.01))

        def forward(self, x):
            return torch.ops.optcc.linear_dq_int8_tensor.default(x, self.w, self.s, None, "fp32", "u8s8")

    small = torch.randint(-63, 64, (16, 8), dtype=torch.int8)
    full = small.clone()
    full[0, 0] = 127
    x = torch.randn(4, 16)
    for codes, vnni, kernel in ((small, False, "onednn-int8"), (full, False, "fp32-codes"), (full, True, "onednn-int8")):
        gm = torch.fx.symbolic_trace(Lin(codes))
        lowered, kernels = compiled.lower_graph(gm, vnni)
        assert kernels == {kernel: 1}
        assert not any("optcc" in str(n.target) for n in lowered.graph.nodes)
        assert torch.allclose(lowered(x), gm(x), atol=1e-4)


def test_without_a_compiler_the_run_stops_in_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "cxx_compiler", lambda: None)
    with pytest.raises(ExportError, match="needs a C\\+\\+ compiler .* install g\\+\\+") as e:
        apply(write_recipe(tmp_path, _recipe("  - cleanup")), "builtin:tiny-bert", tmp_path / "o")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def _fake_package(path, **meta):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/data/aotinductor/model/x.wrapper_metadata.json", json.dumps({"AOTI_CPU_ISA": "AVX2", **meta}))
    return path


def test_a_package_from_a_newer_torch_or_for_missing_cpu_features_is_refused_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(ExportError, match=r"compiled with torch 99.1; this is torch .* \(install torch>=99.1"):
        load_artifact(_fake_package(tmp_path / "new.pt2", optcc_torch="99.1"))
    monkeypatch.setattr(compiled, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(ExportError, match="compiled for AVX512 and this CPU has no avx512f"):
        load_artifact(_fake_package(tmp_path / "wide.pt2", AOTI_CPU_ISA="AVX512"))
    with pytest.raises(ExportError, match="full-range int8 weights.*no VNNI"):
        load_artifact(_fake_package(tmp_path / "vnni.pt2", optcc_needs="vnni"))


def test_an_exported_program_and_a_package_are_told_apart(tmp_path):
    from optcc.export.compiled import is_package

    ep = torch.export.export(torch.nn.Linear(2, 2), (), {"input": torch.randn(1, 2)})
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    assert not is_package(tmp_path / "m.pt2") and is_package(_fake_package(tmp_path / "p.pt2"))
    assert load_artifact(tmp_path / "m.pt2")({"input": torch.ones(1, 2)})[0].shape == (1, 2)


def test_a_compiled_package_is_not_taken_as_a_model_to_optimize(tmp_path):
    from optcc.errors import IntakeError
    from optcc.intake.load import load_model

    with pytest.raises(IntakeError, match="compiled AOTInductor package holds no graph.*model.exported.pt2"):
        load_model(str(_fake_package(tmp_path / "model.pt2")), "image-classification")
