"""Speed and quality of token_merge.

    python benchmarks/token_merge.py                          # both parts
    python benchmarks/token_merge.py --only speed --r 0 8 16
    python benchmarks/token_merge.py --only digits

speed: ViT-B/16 at 224 px (transformers ViTConfig defaults, random weights:
197 tokens, 12 blocks), batch 4, 2 threads. Each r goes through the pass
manager and emit like `optcc apply` (torch.export .pt2 and ONNX, both re-loaded
and verified); the re-loaded artifacts are timed interleaved, and each is
compared with the r=0 artifact of the same backend.

digits: builtin:vit-digits (trained, 65 tokens, 6 blocks), held-out top-1 on
its eval split (450 images) vs the speed-up of the merged graph (torch) and of
its ONNX artifact (onnxruntime) over r=0, for ToMe and PiToMe.
Prints Markdown.
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

from optcc.api import prepare  # noqa: E402
from optcc.bench import measure  # noqa: E402
from optcc.capture import capture, flat_outputs  # noqa: E402
from optcc.context import PassContext  # noqa: E402
from optcc.emit import emit_all, emit_onnx, export_program, load_onnx, load_torch  # noqa: E402
from optcc.manager import run_passes  # noqa: E402
from optcc.recipe import parse_recipe  # noqa: E402
from optcc.zoo import data as zoo  # noqa: E402

THREADS = 2


def merged(ep, ctx: PassContext, params: str):
    recipe = parse_recipe(f"version: 1\npasses:\n  - token_merge: {params}\n")
    gm, records = run_passes(ep.module(), recipe.passes, ctx)
    return gm, records[0]


def speed(rs: list[int], iters: int, work: Path) -> None:
    """Artifacts and pass records are kept in `work`, so a rerun on a quieter machine only re-times them."""
    import transformers

    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig()).eval()
    inputs = {"pixel_values": torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))}
    ep, ref, rows, fns = None, None, [], {}
    for r in rs:
        out = work / f"vit-b16-r{r}"
        if not (out / "record.json").exists():
            t0 = time.perf_counter()
            if ep is None:
                with torch.no_grad():
                    ref = flat_outputs(model(**inputs))
                ep = capture(model, inputs)
            gm, rec = merged(ep, PassContext("image-classification", inputs, ref, 0, None), f"{{r: {r}}}")
            out.mkdir(parents=True, exist_ok=True)
            emit_all(gm, inputs, ("torch", "onnx"), 18, out, 0, 1e-3, True, THREADS)
            keep = {"stats": rec["stats"], "flops": [rec["before"]["flops"], rec["after"]["flops"]], "fidelity": rec["fidelity"]}
            (out / "record.json").write_text(json.dumps(keep))
            print(f"r={r}: pass + emit {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows.append((r, json.loads((out / "record.json").read_text())))
        pt2, onnx = load_torch(out / "model.pt2"), load_onnx(out / "model.onnx", THREADS)
        fns[f"torch r={r}"] = (lambda run=pt2: run(inputs))
        fns[f"onnx r={r}"] = (lambda run=onnx: run(inputs))
    res = measure(fns, warmup=2, iters=iters, min_seconds=0.0, items=4, max_seconds=1200)
    print(f"### ViT-B/16 @224, batch 4, {THREADS} threads, random weights ({iters}+ interleaved calls each)\n")
    print("| r | tokens after blocks | GFLOPs | torch .pt2 p50 ms | speed-up | onnxruntime p50 ms | speed-up | cosine vs unmerged |")
    print("|---|---|---|---|---|---|---|---|")
    t0, o0 = res[f"torch r={rs[0]}"]["p50_ms"], res[f"onnx r={rs[0]}"]["p50_ms"]
    for r, rec in rows:
        t, o = res[f"torch r={r}"]["p50_ms"], res[f"onnx r={r}"]["p50_ms"]
        print(f"| {r} | {rec['stats']['tokens_after']} | {rec['flops'][1] / 1e9:.1f} | {t:.0f} | {t0 / t:.2f}x | {o:.0f} | {o0 / o:.2f}x "
              f"| {rec['fidelity']['cosine_mean']:.4f} |")
    print()


def digits(rs: list[int], methods: list[str], iters: int) -> None:
    prep = prepare("builtin:vit-digits", None, None, parse_recipe("version: 1\nmodel: {inputs: {batch: 8}}\n"))
    ep = capture(prep.lm.module, prep.inputs)
    x, y = zoo.load_digits_split("vit-digits", "eval")
    bench_in = {"pixel_values": x[:64]}
    ctx = PassContext(prep.lm.task, prep.inputs, prep.reference, prep.primary, prep.causal)
    tmp = Path(tempfile.mkdtemp(prefix="tm-digits-"))

    def accuracy(run) -> float:
        correct = sum(int((run({"pixel_values": x[i:i + 90]})[prep.primary].argmax(-1) == y[i:i + 90]).sum())
                      for i in range(0, len(y), 90))
        return correct / len(y)

    rows, fns = [], {}
    for method in methods:
        for r in rs:
            if r == 0 and method != methods[0]:
                continue
            gm, rec = merged(ep, ctx, f"{{r: {r}, method: {method}}}")
            out = tmp / f"{method}-{r}"
            out.mkdir()
            onnx = load_onnx(emit_onnx(export_program(gm, prep.inputs, True), prep.inputs, out, 18), THREADS)

            def graph(inputs, g=gm):
                with torch.no_grad():
                    return flat_outputs(g(**inputs))

            key = "base" if r == 0 else f"{method} r={r}"
            fns[f"torch {key}"] = (lambda g=graph: g(bench_in))
            fns[f"onnx {key}"] = (lambda o=onnx: o(bench_in))
            rows.append((key, r, rec, accuracy(graph), accuracy(onnx)))
    res = measure(fns, warmup=3, iters=iters, min_seconds=iters * 0.02, items=64, max_seconds=300)
    base_acc = rows[0][3]
    print(f"### vit-digits: held-out top-1 ({len(y)} images) vs speed-up, batch 64, {THREADS} threads\n")
    print("| merge | r | tokens after blocks | top-1 (graph) | top-1 (onnx) | drop (pt) | torch speed-up | onnxruntime speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r, rec, acc, acc_onnx in rows:
        ts = res["torch base"]["p50_ms"] / res[f"torch {key}"]["p50_ms"]
        os_ = res["onnx base"]["p50_ms"] / res[f"onnx {key}"]["p50_ms"]
        print(f"| {rec['stats']['method'] if r else 'none'} | {r} | {rec['stats']['tokens_after']} | {acc:.4f} | {acc_onnx:.4f} "
              f"| {100 * (base_acc - acc):.1f} | {ts:.2f}x | {os_:.2f}x |")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["speed", "digits"])
    p.add_argument("--r", type=int, nargs="+", help="r values (speed default 0 8 16; digits default 0 2 4 6 8 10)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "optcc-token-merge-bench",
                   help="where the ViT-B artifacts are kept between runs")
    a = p.parse_args()
    torch.set_num_threads(THREADS)
    if a.only in (None, "speed"):
        speed(a.r or [0, 8, 16], a.iters or 10, a.work)
    if a.only in (None, "digits"):
        digits(a.r or [0, 2, 4, 6, 8, 10], ["tome", "pitome"], a.iters or 30)


if __name__ == "__main__":
    main()
