"""KV bytes per token and quality of kv_share on the trained byte-level Llama.

    python benchmarks/kv_share.py                 # all variants (several minutes on 2 cores)
    python benchmarks/kv_share.py --only share    # or merge, kv_quant (repeatable)
    python benchmarks/kv_share.py --json out.json

Every variant is one `optcc apply` (same recipe apart from the pass) on builtin:byte-llama;
its report gives KV bytes per token measured by the generation bench from the cache tensors
the artifacts return, and held-out perplexity per byte from the recipe's evaluate section
(prefill windows: every window starts with an empty cache). Prefill windows never read a
merged cache (MiniCache merges what is stored, the tokens of one call attend unmerged), so
the script also measures **streamed perplexity**: the same windows fed one byte per call
through the ONNX artifact, each call reading the cache the previous call wrote, which is
what generation sees. Targets: share factor 2 <= 0.55x KV bytes; merge on the upper half
<= 0.7x KV bytes with <= 3% perplexity increase; with the int8 cache (kv_quant) <= 0.3x.
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

from benchmarks.harness import held_out_windows  # noqa: E402
from optcc.api import apply  # noqa: E402
from optcc.intake.decoder import CacheSpec, no_guard_module  # noqa: E402
from optcc.export.emit import load_onnx  # noqa: E402
from optcc.measure.generation import streamed_perplexity  # noqa: E402

SEQ = 128  # bytes per evaluation window
WINDOWS = 32  # evaluation windows (4,096 predicted bytes)

RECIPE = """
version: 1
model: {{source: builtin:byte-llama, inputs: {{batch: 8, seq_len: {seq}}}}}
calibration: {{samples: 128}}
evaluate: {{samples: {windows}}}
passes: {passes}
emit: {{formats: [onnx, torch]}}
generate: {{new_tokens: 32, batch: 1, rounds: 1}}
bench: {{backends: [onnxruntime], warmup: 1, iters: 3, min_seconds: 0.0}}
"""

VARIANTS = {
    "baseline": "[]",
    "share f2 (index)": "[{kv_share: {factor: 2}}]",
    "share f2 (similarity)": "[{kv_share: {factor: 2, select: similarity}}]",
    "share f2 (similarity) + heal 200 @1e-4": "[{kv_share: {factor: 2, select: similarity, heal: {steps: 200, lr: 1.0e-4}}}]",
    "share f2 (similarity) + heal 200 @1e-3": "[{kv_share: {factor: 2, select: similarity, heal: {steps: 200, lr: 1.0e-3}}}]",
    "merge start 0.5 (upper half)": "[{kv_share: {mode: merge, start: 0.5}}]",
    "merge start 0.5, retain 0.2": "[{kv_share: {mode: merge, start: 0.5, retain: 0.2}}]",
    "merge start 0.33": "[{kv_share: {mode: merge, start: 0.33}}]",
    "kv_quant (int8 cache)": "[kv_quant]",
    "kv_quant after merge start 0.5": "[{kv_share: {mode: merge, start: 0.5}}, kv_quant]",
}


def run_variant(name: str, passes: str, work: Path, windows: torch.Tensor) -> dict:
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(seq=SEQ, windows=WINDOWS, passes=passes))
    out = work / "out"
    t0 = time.perf_counter()
    report = apply(recipe, None, out)
    seconds = time.perf_counter() - t0
    spec = CacheSpec.read(out / "decoder.json")
    with no_guard_module():
        streamed = streamed_perplexity(load_onnx(out / "model.onnx"), spec, windows)
    stats = report["passes"][0]["stats"] if report["passes"] else {}
    gen = report["generation"]
    return {
        "variant": name,
        "kv_bytes_per_token": gen["optimized"]["onnxruntime"]["kv_bytes_per_token"],
        "kv_bytes_baseline": gen["baseline"]["kv_bytes_per_token"],
        "kv_bytes_ratio": gen["kv_bytes_ratio"],
        "ppl_prefill": report["task_metric"]["optimized"],
        "ppl_prefill_baseline": report["task_metric"]["baseline"],
        "ppl_streamed": streamed,
        "pairs": stats.get("pairs") or stats.get("merged_pairs"),
        "heal": {k: stats["heal"][k] for k in ("before", "after", "loss_first", "loss_last")} if "heal" in stats else None,
        "similarity": stats.get("similarity"),
        "fidelity_cosine": report["fidelity"]["cosine_mean"],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("share", "merge", "kv_quant"), action="append",
                    help="variants whose name starts with this (repeatable); the baseline always runs")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    windows = held_out_windows(SEQ, WINDOWS)
    names = [n for n in VARIANTS if n == "baseline" or args.only is None or n.startswith(tuple(args.only))]
    rows = []
    t0 = time.perf_counter()
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run_variant(name, VARIANTS[name], Path(tmp), windows))
        print(f"done: {name} ({rows[-1]['seconds']} s)", file=sys.stderr)
    base = rows[0]
    print(f"### byte-llama: kv_share ({WINDOWS} held-out windows of {SEQ} bytes, per-byte perplexity)\n")
    print("| variant | layers (pairs) | KV bytes/token | ratio | ppl prefill | Δ | ppl streamed | Δ |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dp = r["ppl_prefill"] / base["ppl_prefill"] - 1
        ds = r["ppl_streamed"] / base["ppl_streamed"] - 1
        print(f"| {r['variant']} | {r['pairs'] or '—'} | {r['kv_bytes_per_token']:.0f} | {r['kv_bytes_ratio']:.3f} | "
              f"{r['ppl_prefill']:.3f} | {dp:+.1%} | {r['ppl_streamed']:.3f} | {ds:+.1%} |")
    for r in rows:
        if r["heal"]:
            h = r["heal"]
            print(f"\n{r['variant']}: held-out calibration KL {h['before']['kl']:.4f} -> {h['after']['kl']:.4f}, "
                  f"top-1 agreement {h['before']['top1_agreement']:.3f} -> {h['after']['top1_agreement']:.3f}")
    sim = next((r["similarity"] for r in rows if r["similarity"]), None)
    if sim:
        print("\nPost-rotary K / V cosine between layers (calibration split):\n")
        for kind in ("key", "value"):
            print(f"{kind}: " + "; ".join(" ".join(f"{x:.2f}" for x in row) for row in sim[kind]))
    print(f"\n_{time.perf_counter() - t0:.0f} s, torch {torch.__version__}, {args.threads} threads_")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
