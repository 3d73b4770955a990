"""optcc as a CI step: gates, regressions, reproducible artifacts, pass diffs."""
import json

import pytest

from conftest import ROOT, write_recipe
from test_cli import optcc
from optcc.api import apply
from optcc.errors import RecipeError, RequirementError
from optcc.config.recipe import parse_recipe

RECIPE = """
version: 1
model: {source: builtin:tiny-vit, inputs: {batch: 2}}
passes: [cleanup]
emit: {formats: [onnx, exported]}
bench: {warmup: 1, iters: 3, min_seconds: 0.0}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ci")
    out = tmp / "out"
    apply(write_recipe(tmp, RECIPE), None, out)
    return tmp, out


def test_same_inputs_give_byte_identical_artifacts(run, tmp_path):
    tmp, out = run
    apply(write_recipe(tmp_path, RECIPE), None, tmp_path / "again")
    first = {a["format"]: a["sha256"] for a in json.loads((out / "report.json").read_text())["artifacts"]}
    second = {a["format"]: a["sha256"] for a in json.loads((tmp_path / "again" / "report.json").read_text())["artifacts"]}
    assert first == second and len(first) == 2
    assert (out / "model.exported.pt2").read_bytes() == (tmp_path / "again" / "model.exported.pt2").read_bytes()
    lock = (out / "recipe.lock.yaml").read_text()
    assert first["exported"] in lock and first["onnx"] in lock


@pytest.mark.parametrize("require, msg", [
    ({"sppedup": ">= 1"}, "unknown metric (did you mean 'speedup'?)"),
    ({"fidelity.cosine_mean": "at least 0.9"}, "cannot parse 'at least 0.9'"),
])
def test_bad_requirements_fail_before_any_work(require, msg):
    text = "version: 1\nrequire: " + json.dumps(require) + "\n"
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "r.yaml")
    assert msg in str(e.value)


def test_derived_gate_metrics(run, tmp_path):
    from optcc.config.gates import check_requirements

    _, out = run
    report = json.loads((out / "report.json").read_text())
    res = {q["metric"]: q for q in check_requirements(report, {
        "param_bytes_ratio": "<= 1.0", "fidelity.top1_agreement": ">= 1", "task.accuracy_drop": "<= 1",
        "latency.p90_ms": "<= 100000"})}
    assert res["param_bytes_ratio"]["ok"] and res["param_bytes_ratio"]["value"] == 1.0
    assert res["fidelity.top1_agreement"]["ok"]
    assert res["latency.p90_ms"]["ok"]
    assert not res["task.accuracy_drop"]["ok"] and res["task.accuracy_drop"]["note"] == "not measured in this run"


def test_baseline_regression_fails_with_its_own_message(run, tmp_path):
    _, out = run
    previous = json.loads((out / "report.json").read_text())
    previous["fidelity"]["cosine_mean"] = 1.5  # a previous run that was (impossibly) better
    previous["latency"]["speedup"] = 0.0001  # and slower: only fidelity regressed
    prev_path = tmp_path / "prev.json"
    prev_path.write_text(json.dumps(previous))
    with pytest.raises(RequirementError, match="regression vs .*fidelity.cosine_mean"):
        apply(write_recipe(tmp_path, RECIPE), None, tmp_path / "o", baseline=prev_path)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    reg = {r["metric"]: r for r in report["regressions"]}
    assert reg["fidelity.cosine_mean"]["ok"] is False and reg["speedup"]["ok"] is True


def test_baseline_same_run_passes(run, tmp_path):
    _, out = run
    report = json.loads((out / "report.json").read_text())
    report["latency"]["speedup"] = 0.0001  # previous speedup tiny: any new speedup is no regression
    (tmp_path / "prev.json").write_text(json.dumps(report))
    r = apply(write_recipe(tmp_path, RECIPE), None, tmp_path / "o", baseline=tmp_path / "prev.json")
    assert all(q["ok"] for q in r["regressions"])


def test_bad_baseline_file(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(RecipeError, match="not an optcc report"):
        apply(write_recipe(tmp_path, RECIPE), None, tmp_path / "o", baseline=tmp_path / "x.json")


def test_pass_records_and_diff_views(run):
    _, out = run
    report = json.loads((out / "report.json").read_text())
    rec = report["passes"][0]
    assert rec["blocks"] and all(b["removed"] > 0 for b in rec["blocks"])
    assert (out / rec["graph_diff"]).read_text().count("-dropout") > 0
    assert rec["latency_ms"] > 0 and report["captured"]["latency_ms"] > 0
    assert rec["speedup_vs_captured"] > 0  # timed interleaved with the captured graph (no timing claim here)
    assert (out / "waterfall.html").read_text().startswith("<!doctype html>")
    p = optcc("diff", out)
    assert p.returncode == 0 and "pass 1: cleanup" in p.stdout and "vit.layers.0" in p.stdout and "waterfall" in p.stdout
    p = optcc("diff", out, "--graph", "--block", "vit.layers.1")
    assert p.returncode == 0 and "-dropout" in p.stdout and "# vit.layers.0" not in p.stdout
    p = optcc("diff", out, "--json", "--pass", "cleanup")
    assert json.loads(p.stdout)[0]["name"] == "cleanup"
    p = optcc("diff", out, out, out, "--plot", out.parent / "sweep.html")
    assert p.returncode == 0 and "3 runs" in p.stdout, p.stderr
    page = (out.parent / "sweep.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("<circle") == 3 * len(report["latency"]["speedup_by_backend"])
    for args in (("--pass", "quantize"), ("--json", "--pass", "quantize")):
        p = optcc("diff", out, *args)
        assert p.returncode == 2 and "no such pass" in p.stderr
    p = optcc("diff", out, "--plot", out.parent / "x.html")
    assert p.returncode == 2 and "several runs" in p.stderr
    (out.parent / "other.json").write_text("{}")
    p = optcc("diff", out.parent / "other.json")
    assert p.returncode == 2 and "not an optcc report" in p.stderr


def test_embedding_gates_read_the_worst_artifact():
    from optcc.config.gates import check_requirements

    report = {"task_metric": {"metric": "paraphrase_retrieval", "baseline": 0.9, "optimized": 0.9, "delta": 0.0,
                              "by_artifact": {"onnx": {"embedding_cosine_mean": 0.995, "neighbour_agreement": 1.0},
                                              "torch": {"embedding_cosine_mean": 0.985, "neighbour_agreement": 0.97}}}}
    res = {q["metric"]: q for q in check_requirements(report, {"task.embedding_cosine_mean": ">= 0.99",
                                                               "task.neighbour_agreement": ">= 0.95"})}
    assert res["task.embedding_cosine_mean"]["value"] == 0.985 and not res["task.embedding_cosine_mean"]["ok"]
    assert res["task.neighbour_agreement"]["value"] == 0.97 and res["task.neighbour_agreement"]["ok"]


def test_example_workflow_recreates_uploads_and_fails_on_gates():
    import yaml

    wf = yaml.safe_load((ROOT / "docs" / "examples" / "github-actions.yml").read_text())
    steps = wf["jobs"]["optimize"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "optcc apply" in runs and "--baseline" in runs and "|| true" not in runs  # exit 7 fails the job
    upload = next(s for s in steps if "upload-artifact" in s.get("uses", ""))
    assert upload["if"] == "always()" and upload["with"]["path"] == "out/"  # report kept when a gate fails


# auto picks the ONNX int8 weight layout from the CPU; each machine below makes it pick one
MACHINES = {"u8s8": ("x86_64", {"avx2", "avx512_vnni"}), "u8s7": ("x86_64", {"avx2"}), "u8u8": ("aarch64", {"asimd"})}


def _pretend(monkeypatch, layout):
    from optcc.ops import quantized

    arch, flags = MACHINES[layout]
    monkeypatch.setattr(quantized.platform, "machine", lambda: arch)
    monkeypatch.setattr(quantized, "cpu_flags", lambda: frozenset(flags))


@pytest.mark.parametrize("layout", list(MACHINES))
def test_a_lock_rebuilds_byte_identical_artifacts_on_another_machine(tmp_path, monkeypatch, layout):
    """`auto` is resolved once, on the compiling machine, into the report and the lock; applying the
    lock where auto would choose otherwise gives the same bytes, and no environment variable matters."""
    from optcc.ops import quantized

    if layout == "u8s8" and quantized.suggest_layout()[0] != "u8s8":  # emit's check would rightly fail: full-range u8·s8 saturates without VNNI
        pytest.skip("u8·s8 with 8-bit weights is only exact on CPUs with VNNI/AMX")
    recipe = write_recipe(tmp_path, f"""
version: 1
model: {{source: '{ROOT / "tests" / "models" / "handwritten.py"}:build', task: feature-extraction, inputs: {{batch: 2, seq_len: 16}}}}
passes: [{{quantize: {{scheme: int8-dynamic}}}}]
emit: {{formats: [onnx, exported]}}
bench: {{enabled: false}}
""")
    with monkeypatch.context() as m:
        _pretend(m, layout)
        first = apply(recipe, None, tmp_path / "first")
    chosen = {c["option"]: c["value"] for c in first["recipe"]["chosen"]}
    assert chosen["onnx_weights"] == layout and chosen["torch_gemm"] in ("int_mm", "fp32")
    assert first["passes"][0]["stats"]["kernels"]["onnx_int8_weights"] == layout
    lock = tmp_path / "first" / "recipe.lock.yaml"
    assert f"onnx_weights: {layout}" in lock.read_text()

    other = next(l for l in MACHINES if l != layout)  # a machine where auto would choose differently
    with monkeypatch.context() as m:
        _pretend(m, other)
        m.setenv("OPTCC_ONNX_INT8", other)  # the old overrides: ignored
        m.setenv("OPTCC_INT8_GEMM", "fp32" if chosen["torch_gemm"] == "int_mm" else "int_mm")
        second = apply(lock, None, tmp_path / "second")
    assert second["recipe"]["chosen"] == []  # nothing left to choose
    for name in ("model.onnx", "model.exported.pt2"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
