"""Perplexity of every quantize scheme on the trained byte-level Llama (the reference LM).

    python benchmarks/quantize_lm.py              # all schemes (a few minutes on 2 cores)
    python benchmarks/quantize_lm.py --json out.json

Every row is one `optcc apply` of the same recipe with a different quantize step on
builtin:byte-llama: held-out perplexity per byte from the recipe's evaluate section (the
model's eval split, windows of 128 bytes), next-token top-1 agreement of the ONNX
artifact with fp32 on the example batch, weight bytes of the quantized linears and
their mean SQNR. Calibration (SmoothQuant, AWQ) reads the calib split, never the eval
split. byte-llama's linears have 192 and 512 input features, so the int4 group sizes
are 64 and 32 (128 does not divide 192).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optcc.api import apply  # noqa: E402

RECIPE = """
version: 1
model: {{source: builtin:byte-llama, inputs: {{batch: 8, seq_len: 128}}}}
calibration: {{samples: 64}}
evaluate: {{samples: {windows}}}
passes: {passes}
emit: {{formats: [onnx], atol: 0.1}}
bench: {{enabled: false}}
"""

SCHEMES = {
    "fp32": "[]",
    "int8-dynamic": "[{quantize: {scheme: int8-dynamic}}]",
    "int8-dynamic + smooth 0.5": "[{quantize: {scheme: int8-dynamic, smooth: {alpha: 0.5}}}]",
    "int8-weight-only": "[{quantize: {scheme: int8-weight-only}}]",
    "int4-weight-only g64": "[{quantize: {scheme: int4-weight-only, group_size: 64}}]",
    "int4-weight-only g32": "[{quantize: {scheme: int4-weight-only, group_size: 32}}]",
    "int4-awq g64": "[{quantize: {scheme: int4-awq, group_size: 64}}]",
    "int4-awq g32": "[{quantize: {scheme: int4-awq, group_size: 32}}]",
}


def run(name: str, passes: str, work: Path, windows: int) -> dict:
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(windows=windows, passes=passes))
    t0 = time.perf_counter()
    report = apply(recipe, None, work / "out")
    q = next((p["stats"] for p in report["passes"] if p["name"] == "quantize"), None)
    onnx = report["fidelity"]["by_artifact"].get("onnx", {})
    return {
        "scheme": name,
        "perplexity": report["task_metric"]["optimized"],
        "perplexity_fp32": report["task_metric"]["baseline"],
        "bytes_evaluated": report["task_metric"]["samples"],
        "top1_agreement": onnx.get("top1_agreement"),
        "weight_bytes_ratio": q["weight_bytes"]["ratio"] if q else 1.0,
        "sqnr_db_mean": q["sqnr_db_mean"] if q else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=64, help="held-out windows of 128 bytes")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, passes in SCHEMES.items():
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(name, passes, Path(tmp), args.windows))
        print(f"done: {name} ({rows[-1]['seconds']} s)", file=sys.stderr)
    base = rows[0]["perplexity"]
    print(f"### byte-llama: quantize schemes (held-out perplexity per byte, {args.windows} windows of 128 bytes)\n")
    print("| scheme | perplexity | Δ vs fp32 | top-1 agreement (ONNX) | weight bytes | SQNR mean dB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        top1 = "—" if r["top1_agreement"] is None else f"{r['top1_agreement']:.4f}"
        sqnr = "—" if r["sqnr_db_mean"] is None else f"{r['sqnr_db_mean']:.1f}"
        print(f"| {r['scheme']} | {r['perplexity']:.4f} | {r['perplexity'] / base - 1:+.2%} | {top1} | "
              f"{r['weight_bytes_ratio']:.3f}x | {sqnr} |")
    print(f"\n_torch {torch.__version__}, {args.threads} threads_")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
