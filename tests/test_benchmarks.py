"""The benchmark suite's smoke mode runs end to end (no speed assertions: timings live in benchmarks/)."""
import json
import subprocess
import sys

import torch

from conftest import ROOT


def test_quick_benchmark_writes_tables(tmp_path):
    p = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "W2,W3", "--out", str(tmp_path),
                        "--recipes", "W2=recipes/quickstart.yaml,W3=recipes/kv_share.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("*-quick-*.json")).read_text())
    contenders = {r["contender"] for r in data["rows"] if r["workload"] == "W2"}
    assert {"torch eager fp32", "onnxruntime fp32 (plain export)", "onnxruntime quantize_dynamic int8 (plain export)",
            "optcc quickstart (onnxruntime)"} <= contenders
    w3 = [r for r in data["rows"] if r["workload"] == "W3" and "kv_bytes_per_token" in r]
    assert w3 and all(r["kv_bytes_per_token"] > 0 for r in w3)
    plain = next(r for r in w3 if r["contender"] == "plain ONNX export (Optimum cache layout)")
    assert plain["greedy_match"] and plain["kv_bytes_ratio"] == 1
    assert any(r["contender"] == "plain ONNX export + quantize_dynamic int8" for r in w3)
    # an artifact whose cache layout a pass changed runs with its own layout and holds less cache
    base = next(r for r in w3 if r["contender"].startswith("torch eager"))
    shared = [r for r in w3 if r["contender"].startswith("optcc kv_share")]
    assert len(shared) == 2 and all(r["kv_bytes_per_token"] < base["kv_bytes_per_token"] for r in shared)
    # quality on the trained reference LM, streamed through each contender's own cache
    ppl = {r["contender"]: r["perplexity"] for r in data["rows"] if r["workload"] == "W3" and "perplexity" in r}
    assert {"torch eager fp32 (HF cache)", "plain ONNX export + quantize_dynamic int8", "optcc kv_share (onnx)"} <= set(ppl)
    eager = ppl["torch eager fp32 (HF cache)"]
    assert 1 < eager < 256 and abs(ppl["plain ONNX export (Optimum cache layout)"] / eager - 1) < 1e-3
    assert data["gemm_peak_gflops"] > 0
    md = next(tmp_path.glob("*-quick-*.md")).read_text()
    assert "## W2" in md and "speedup_vs_fp32" in md


def test_quantize_floor_graphs_compute_the_int8_linears():
    """The floor benchmark times what it claims: its onnxruntime graphs give each layer's
    int8 product (codes · weight codes · weight scale), pre-quantized and with DynamicQuantizeMatMul."""
    import numpy as np

    from benchmarks.quantize_floor import int8_sessions
    from optcc.algorithms.quantizers import quantize_per_tensor_u8

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((24, 16)).astype(np.float32), rng.standard_normal((16, 24)).astype(np.float32)]
    layout, gemm, dqmm = int8_sessions(weights, threads=1, layout="u8s7")
    assert layout == "u8s7"
    q = [rng.integers(0, 256, (5, w.shape[1]), dtype=np.uint8) for w in weights]
    x = [rng.standard_normal((5, w.shape[1])).astype(np.float32) for w in weights]
    got_g = gemm.run(None, {f"q{i}": v for i, v in enumerate(q)})
    got_d = dqmm.run(None, {f"x{i}": v for i, v in enumerate(x)})
    for w, qi, xi, yg, yd in zip(weights, q, x, got_g, got_d):
        ws = np.abs(w).max(1) / 63
        wq = np.round(w / ws[:, None])
        assert np.abs(wq).max() <= 63
        np.testing.assert_allclose(yg, ((qi.astype(np.float64) - 128) @ wq.T) * ws, rtol=1e-5, atol=1e-4)
        codes, scale, zero = quantize_per_tensor_u8(torch.from_numpy(xi))
        ref = ((codes.double() - zero.double()).numpy() @ wq.T) * ws * float(scale)
        np.testing.assert_allclose(yd, ref, rtol=1e-5, atol=1e-4)


def _documented_scripts() -> list[str]:
    """Every `python benchmarks/NAME.py` that README.md or docs/ tell a user to run."""
    import re

    texts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in (ROOT / "docs").rglob("*.md")]
    return sorted({m for t in texts for m in re.findall(r"python (benchmarks/[a-z_0-9]+\.py)", t)})


def test_no_benchmark_module_shadows_an_installed_package():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path: a file there named like an
    installed top-level package (benchmarks/kernels.py once hid the `kernels` package that
    transformers imports) breaks every script that loads a model."""
    names = [p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("__")]
    code = ("import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
            f"print([n for n in {names!r} if importlib.util.find_spec(n) is not None])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", f"benchmarks/ modules that shadow installed packages: {p.stdout.strip()}"


def test_documented_benchmark_scripts_start_as_scripts():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path, so a file there named like a
    package that torch or transformers import (benchmarks/kernels.py once shadowed `kernels`)
    breaks the script before it parses its flags. Each documented script must get to --help."""
    scripts = _documented_scripts()
    assert "benchmarks/quantize.py" in scripts and "benchmarks/quantize_floor.py" in scripts
    for script in scripts:
        p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "usage" in p.stdout.lower(), f"{script}: {p.stderr[-2000:]}"


def test_tune_benchmark_compares_tune_with_every_hand_written_recipe_at_the_space_terms(tmp_path):
    """benchmarks/tune.py pits tune's winner against recipes/ for the same model, each rebuilt at the
    space's shapes, bench, evaluation set and budget (the timing itself lives in benchmarks/)."""
    import yaml

    from benchmarks.tune import SPACES, as_space_sees_it, hand_written
    from optcc.config.recipe import load_recipe
    from optcc.config.space import load_space

    names = {p.name for p in hand_written("builtin:vit-digits")}
    assert {"quickstart.yaml", "vit-merge-int8.yaml", "token_merge.yaml", "layer_skip.yaml"} <= names
    assert not any(n.startswith("tune-") for n in names)
    assert {p.name for p in hand_written("builtin:minilm")} >= {"minilm-int8-merge.yaml", "quantize-int8-tensor.yaml"}
    space = load_space(SPACES["vit"])
    sections = {**space.sections, "require": dict(space.require)}
    spec = as_space_sees_it(ROOT / "recipes" / "layer_skip.yaml", sections, tmp_path / "r.yaml")
    d = yaml.safe_load(spec.read_text())
    assert d["model"]["inputs"] == {"batch": 64} and d["require"] == {"task.accuracy_drop": "<= 1.0"}
    assert d["emit"]["formats"] == ["onnx"] and d["passes"][0]["layer_skip"]["drop"] == 1
    recipe = load_recipe(spec)  # still a valid recipe
    assert recipe.bench.backends == ("onnxruntime",) or list(recipe.bench.backends) == ["onnxruntime"]
