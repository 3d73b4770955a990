"""The benchmark suite's smoke mode runs end to end (no speed assertions: timings live in benchmarks/)."""
import json
import subprocess
import sys

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
