import json
import os

import numpy as np
import pytest
import torch

from conftest import FAST_RECIPE, HANDWRITTEN, write_recipe
from optcc.api import apply
from optcc.export.emit import load_artifact, load_onnx
from optcc.errors import IntakeError, RequirementError


def test_apply_vit_end_to_end(tmp_path, fast_recipe):
    out = tmp_path / "out"
    r = apply(fast_recipe, "builtin:tiny-vit", out)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["graphs", "model.exported.pt2", "model.onnx", "recipe.lock.yaml", "report.json", "report.md", "waterfall.html"]
    assert (out / "graphs" / "01-cleanup.diff").exists()
    on_disk = json.loads((out / "report.json").read_text())
    for key in ("latency", "fidelity", "passes", "artifacts", "environment"):
        assert key in on_disk
    lat = on_disk["latency"]
    assert lat["baseline"]["iters"] >= 2 and set(lat["optimized"]) == {"torch-exported", "onnxruntime"}
    assert lat["speedup"] == max(lat["speedup_by_backend"].values())
    assert on_disk["fidelity"]["cosine_mean"] > 0.9999 and on_disk["fidelity"]["top1_agreement"] == 1.0
    assert [a["format"] for a in on_disk["artifacts"]] == ["onnx", "exported"]
    assert all(len(a["sha256"]) == 64 and a["bytes"] > 0 for a in on_disk["artifacts"])
    assert on_disk["passes"][0]["name"] == "cleanup"
    lock = (out / "recipe.lock.yaml").read_text()
    assert "weights_sha256" in lock and "torch:" in lock
    assert "| onnxruntime |" in (out / "report.md").read_text()
    assert r["model"]["task"] == "image-classification"
    from optcc.ops.quantized import cpu_flags
    assert on_disk["environment"]["cpu"] and set(on_disk["environment"]["cpu_flags"]) <= cpu_flags()
    assert ("avx2" in cpu_flags()) == ("avx2" in on_disk["environment"]["cpu_flags"])
    _valid_report(on_disk)


def _valid_report(report):
    """report.json follows its published schema (docs/report.schema.json, from optcc/report/records.py)."""
    import jsonschema

    from conftest import ROOT
    from optcc.report.records import report_json_schema

    published = json.loads((ROOT / "docs" / "report.schema.json").read_text())
    assert published == report_json_schema(), "regenerate: optcc schema --report > docs/report.schema.json"
    jsonschema.validate(report, published)


def test_artifacts_match_eager_and_keep_dynamic_batch(tmp_path, fast_recipe):
    from optcc.intake.load import load_model

    out = tmp_path / "out"
    apply(fast_recipe, "builtin:tiny-vit", out)
    model = load_model("builtin:tiny-vit").module
    x = {"pixel_values": torch.randn(5, 3, 32, 32)}  # a batch size never seen at export
    with torch.no_grad():
        ref = model(**x).logits
    for runner in (load_artifact(out / "model.exported.pt2"), load_onnx(out / "model.onnx")):
        got = runner(x)[0]
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-4)


def test_llama_onnx_and_pt2(tmp_path, fast_recipe):
    out = tmp_path / "o"
    r = apply(fast_recipe, "builtin:tiny-llama", out)
    assert r["model"]["causal"] is True
    assert r["fidelity"]["by_artifact"]["onnx"]["max_abs_err"] < 1e-4
    assert r["fidelity"]["top1_agreement"] == 1.0
    _valid_report(json.loads((out / "report.json").read_text()))  # a decoder's report too (generation, cache inputs)


def test_handwritten_factory(tmp_path, fast_recipe):
    r = apply(fast_recipe, f"{HANDWRITTEN}:build", tmp_path / "o", task="feature-extraction")
    assert r["fidelity"]["cosine_min"] > 0.9999


def test_failed_run_leaves_earlier_output_untouched(tmp_path, fast_recipe, monkeypatch):
    from optcc import api
    from optcc.errors import ExportError

    out = tmp_path / "out"
    apply(fast_recipe, "builtin:tiny-vit", out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(IntakeError):
        apply(fast_recipe, "builtin:nope", out)

    def half_written(gm, inputs, formats, opset, folder, *a, **k):
        (folder / "model.onnx").write_bytes(b"partial")
        raise ExportError("simulated failure mid-emit")

    monkeypatch.setattr(api, "emit_all", half_written)
    with pytest.raises(ExportError):
        apply(fast_recipe, "builtin:tiny-vit", out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temp folders left


def test_unmet_requirement_still_writes_report(tmp_path):
    rec = write_recipe(tmp_path, FAST_RECIPE + "require: {speedup: '>= 1000', fidelity.cosine_mean: '>= 0.99'}\n")
    out = tmp_path / "out"
    with pytest.raises(RequirementError, match="speedup >= 1000 not met"):
        apply(rec, "builtin:tiny-vit", out)
    report = json.loads((out / "report.json").read_text())
    reqs = {q["metric"]: q for q in report["requirements"]}
    assert reqs["speedup"]["ok"] is False and reqs["fidelity.cosine_mean"]["ok"] is True
    assert reqs["speedup"]["margin"] < 0


def test_output_folder_permissions(tmp_path, fast_recipe):
    out = tmp_path / "out"
    apply(fast_recipe, "builtin:tiny-vit", out)
    assert os.stat(out).st_mode & 0o055  # group/other can read, unlike a raw mkdtemp
