"""W1–W3: optcc against what users would pick instead, side by side in one process.

    python -m benchmarks            # full run (manual; tens of minutes on 2 cores)
    python -m benchmarks --quick    # smoke run: tiny shapes, no speed claims (CI runs this)
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
from pathlib import Path
from typing import Optional

import torch

from benchmarks import harness as H
from optcc.measure.environment import environment

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# optcc's contenders: each recipe runs on the workload's model and shapes (model.inputs overridden)
DEFAULT_RECIPES = ",".join([
    "W1=recipes/quantize-int8.yaml", "W1=recipes/quantize-int8-tensor.yaml", "W1=recipes/minilm-int8-merge.yaml",
    "W2=recipes/token_merge.yaml", "W2=recipes/vit-merge-int8.yaml",
    "W3=recipes/generate.yaml", "W3=recipes/llama-int8-kv.yaml", "W3=recipes/llama-int4.yaml"])


def _sentence_batches(lm, batch: int, seq: int, limit: int):
    from optcc.intake.data import SENTENCES, _sentence_batches

    ex = {"input_ids": torch.zeros(batch, seq, dtype=torch.long), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if "token_type_ids" in lm.param_names:
        ex["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return _sentence_batches("builtin:sentences", SENTENCES, lm, ex, batch, limit)


def _embed(run, ds) -> torch.Tensor:
    from optcc.algorithms.metrics import mean_pool

    return torch.cat([mean_pool(run(b)[0].float(), b["attention_mask"]) for b in ds.batches])


def w1(quick: bool, threads: int, work: Path, recipes: list[Path]) -> list[dict]:
    """Sentence embeddings with the real all-MiniLM-L6-v2."""
    from optcc.intake.load import load_model
    from optcc.algorithms.metrics import neighbour_agreement

    try:
        lm = load_model("builtin:minilm")
    except Exception as e:
        return [{"workload": "W1", "skipped": str(e)}]
    rows = []
    for batch, seq in ([(2, 16)] if quick else [(8, 128), (1, 32)]):
        ds = _sentence_batches(lm, batch, seq, 16 if quick else 312)
        inputs = ds.batches[0]
        folder = work / f"w1-{batch}x{seq}"
        folder.mkdir()
        cs = _standard_contenders(lm.module, inputs, folder, threads, quick, ds.batches[1:17])
        for rec in recipes:
            cs += _optcc_contenders(rec, "builtin:minilm", {"batch": batch, "seq_len": seq}, folder, threads)
        ref = _embed(cs[0].run, ds)
        for c in cs:
            emb = _embed(c.run, ds)
            cos = torch.nn.functional.cosine_similarity(ref, emb, dim=-1)
            c.quality = {"embedding_cosine_mean": float(cos.mean()), "nn_agreement": neighbour_agreement(ref, emb)}
        rows += _table("W1", f"MiniLM-L6 batch {batch} x {seq}", cs, inputs, lm.module, quick, batch)
    return rows


def w2(quick: bool, threads: int, work: Path, recipes: list[Path]) -> list[dict]:
    """Image classification: ViT-B/16 @224 (random weights, speed) and the reference ViT (accuracy)."""
    from optcc.intake.load import load_model, make_inputs
    from optcc.config.recipe import Inputs

    rows = []
    for source, batch, label in ([("builtin:tiny-vit", 2, "tiny ViT (quick)")] if quick else
                                 [("builtin:vit-b16", 4, "ViT-B/16 @224 batch 4 (random weights)"),
                                  ("builtin:vit-digits", 64, "reference ViT (digits) batch 64")]):
        lm = load_model(source)
        inputs = make_inputs(lm, Inputs(batch=batch))
        folder = work / f"w2-{lm.name}"
        folder.mkdir()
        calibration = None
        if lm.zoo:  # NNCF calibrates on held-apart images (the zoo's calibration split), as its docs do
            from optcc.zoo.data import load_digits_split

            train = load_digits_split(lm.zoo, "calib")[0]
            calibration = [{"pixel_values": train[i:i + batch]} for i in range(0, min(len(train), 8 * batch), batch)]
        cs = _standard_contenders(lm.module, inputs, folder, threads, quick, calibration)
        for rec in recipes:
            cs += _optcc_contenders(rec, source, {"batch": batch}, folder, threads)
        if lm.zoo:
            from optcc.zoo.data import load_digits_split

            pixels, labels = load_digits_split(lm.zoo, "eval")
            n = (len(labels) // batch) * batch
            for c in cs:
                correct = sum(int((c.run({"pixel_values": pixels[i:i + batch]})[0].argmax(-1) == labels[i:i + batch]).sum())
                              for i in range(0, n, batch))
                c.quality = {"top1_accuracy": correct / n}
        rows += _table("W2", label, cs, inputs, lm.module, quick, batch)
    return rows


def _plain_decoder(source: str, folder: Path, threads: int):
    """A decoder without optcc: captured with its cache explicit (Optimum's layout), exported to
    ONNX, and that export through onnxruntime's quantize_dynamic. -> (prep, {name: step})."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from optcc.api import prepare
    from optcc.graph.capture import capture, flat_outputs
    from optcc.intake.decoder import dynamic_shapes
    from optcc.export.emit import emit_all, load_onnx
    from optcc.config.recipe import parse_recipe

    # batch 2: export specializes a batch dimension of 1 (the quality windows are a batch)
    prep = prepare(source, None, None, parse_recipe("version: 1\nmodel: {inputs: {batch: 2, seq_len: 16}}\n"))
    folder.mkdir()
    gm = capture(prep.lm.module, prep.inputs, True, dynamic_shapes(prep.cache)).module()
    plain = emit_all(gm, prep.inputs, ("onnx",), 18, folder, 0, 1e-3, True, threads,
                     dynamic_shapes(prep.cache), prep.cache.output_names())[0]
    qpath = folder / "plain.int8.onnx"
    quantize_dynamic(str(plain.path), str(qpath), weight_type=QuantType.QInt8)
    return prep, {"torch eager fp32 (HF cache)": lambda b: flat_outputs(prep.lm.module(**b)),
                  "plain ONNX export (Optimum cache layout)": plain.runner,
                  "plain ONNX export + quantize_dynamic int8": load_onnx(qpath, threads)}


def _eager_bf16_step(prep):
    """The decoder in bf16 (`model.to(torch.bfloat16)`, what a user tries first), fed its own bf16
    cache; logits returned as fp32 like every contender's."""
    from optcc.graph.capture import flat_outputs

    module = H._cast(prep.lm.module, torch.bfloat16)
    names = set(prep.cache.names())

    def step(batch: dict) -> list[torch.Tensor]:
        out = flat_outputs(module(**{k: v.to(torch.bfloat16) if k in names else v for k, v in batch.items()}))
        return [out[0].float(), *out[1:]]

    return step


def _optcc_steps(recipes: list[Path], source: str, folder: Path, threads: int, steps: dict) -> dict:
    """Add every recipe's artifacts (built at batch 4 x 64 on `source`) to `steps`; -> their own
    cache layouts (kv_share / kv_quant change it). A recipe that fails on this model is left
    out with its reason: it must not take the workload down."""
    specs = {}
    for rec in recipes:
        try:
            art = H.optcc_artifacts(rec, source, folder, threads, {"batch": 4, "seq_len": 64})
        except Exception as e:
            print(f"  optcc {rec.name} on {source}: {e}")
            continue
        for fmt, run in art["runners"].items():
            steps[f"optcc {rec.stem} ({fmt})"], specs[f"optcc {rec.stem} ({fmt})"] = run, art["cache"]
    return specs


def w3(quick: bool, threads: int, work: Path, recipes: list[Path]) -> list[dict]:
    """Generation. Speed: Llama-style ~100M config (random weights), prompt 512, 128 new
    tokens. Quality: the reference LM (trained byte-llama), perplexity per byte with the
    held-out text fed one byte per call through each contender's own cache."""
    from optcc.intake.decoder import no_guard_module
    from optcc.measure.generation import bench_generation, prompt_ids, streamed_perplexity

    source = "builtin:tiny-llama" if quick else "builtin:llama-100m"
    prompt_len, new = (8, 4) if quick else (512, 128)
    rows = []
    with no_guard_module():
        prep, plain = _plain_decoder(source, work / "w3", threads)
        steps = {"baseline": plain.pop("torch eager fp32 (HF cache)"), **plain}
        specs = _optcc_steps(recipes, source, work / "w3", threads, steps)
        steps["torch eager bf16 (HF cache)"] = _eager_bf16_step(prep)
        loops = {}
        for precision in ("int4", "fp32"):
            try:
                run = H.genai_decoder(prep.lm.module._lm, work / "w3", precision, threads)  # the HF model inside the cache wrapper
            except Exception as e:  # the peer's builder refusing this model must not take the workload down
                print(f"  onnxruntime-genai {precision} on {source}: {e}")
                continue
            if run is None:
                print("  onnxruntime-genai not installed (pip install '.[bench]'): its contenders are left out")
                break
            loops[f"onnxruntime-genai {precision} (model builder)"] = run
        prompt = prompt_ids(prep.cache, None, prompt_len, 1)
        res = bench_generation(steps, prep.cache, prompt, new, 1 if quick else 2, specs=specs, loops=loops)
        params = sum(p.numel() for p in prep.lm.module.parameters())
        case = f"{source} ({params / 1e6:.1f}M params) prompt {prompt_len}, {new} new tokens"
        base = res["baseline"]["decode_tokens_per_s"]
        plain_int8 = res["optimized"]["plain ONNX export + quantize_dynamic int8"]
        for name, v in [("torch eager fp32 (HF cache)", res["baseline"])] + list(res["optimized"].items()):
            rows.append({"workload": "W3", "case": case, "contender": name, "ttft_ms": v["ttft_ms"],
                         "decode_tokens_per_s": v["decode_tokens_per_s"],
                         "decode_vs_fp32": v["decode_tokens_per_s"] / base,
                         "decode_loop_share": v["decode_loop_share"],
                         "decode_vs_plain_int8": v["decode_tokens_per_s"] / plain_int8["decode_tokens_per_s"],
                         "kv_bytes_per_token": v["kv_bytes_per_token"],
                         "kv_bytes_ratio": v["kv_bytes_per_token"] / res["baseline"]["kv_bytes_per_token"],
                         "greedy_match": res["greedy_match_by_backend"].get(name, True)})

        # quality on the reference LM: the same contenders built from the trained checkpoint
        n, seq = (2, 16) if quick else (32, 128)
        windows = H.held_out_windows(seq, n)
        ref, steps = _plain_decoder("builtin:byte-llama", work / "w3-ref", threads)
        specs = {name: ref.cache for name in steps}
        specs.update(_optcc_steps(recipes, "builtin:byte-llama", work / "w3-ref", threads, steps))
        ppl = {name: streamed_perplexity(step, specs[name], windows) for name, step in steps.items()}
        first = next(iter(ppl.values()))
        for name, p in ppl.items():
            rows.append({"workload": "W3", "case": f"reference LM (byte-llama): held-out perplexity per byte, "
                                                   f"{n} windows of {seq} bytes fed one byte per call",
                         "contender": name, "perplexity": p, "perplexity_change": p / first - 1})
    return rows


def _standard_contenders(model, inputs, folder: Path, threads: int, quick: bool,
                         calibration: Optional[list[dict]] = None) -> list[H.Contender]:
    cs = [H.Contender("torch eager fp32", H.eager(model)), H.Contender("torch eager bf16", H.eager(model, torch.bfloat16))]
    if not quick:
        for name, dtype in (("torch.compile fp32", torch.float32), ("torch.compile bf16 (freezing)", torch.bfloat16)):
            comp = H.compiled(model, inputs, dtype, freezing=dtype == torch.bfloat16)
            if comp:
                cs.append(H.Contender(name, comp))
    for precision in ("f32", "bf16", "int8"):
        ov = H.openvino(model, inputs, threads, precision, calibration)
        if ov is None:
            break
        cs.append(H.Contender(f"OpenVINO {precision}{' (NNCF)' if precision == 'int8' else ''}", ov))
    q = H.torch_dynamic_int8(model)
    if q:
        cs.append(H.Contender("torch.ao dynamic int8", q))
    cs.append(H.Contender("onnxruntime fp32 (plain export)", H.plain_onnx(model, inputs, folder, False, threads)))
    cs.append(H.Contender("onnxruntime quantize_dynamic int8 (plain export)", H.plain_onnx(model, inputs, folder, True, threads)))
    return cs


def _optcc_contenders(recipe: Path, source: str, shape: dict, folder: Path, threads: int) -> list[H.Contender]:
    try:
        art = H.optcc_artifacts(recipe, source, folder, threads, shape)
    except Exception as e:
        print(f"  optcc {recipe.name} on {source}: {e}")
        return []
    names = {"onnx": "onnxruntime", "torch": "torch compiled .pt2", "exported": "torch exported .pt2"}
    return [H.Contender(f"optcc {recipe.stem} ({names[f]})", run) for f, run in art["runners"].items()]


def _table(workload: str, case: str, cs: list[H.Contender], inputs: dict, model, quick: bool, items: int) -> list[dict]:
    timing = H.time_all(cs, inputs, quick, items)
    fl = H.count_flops(model, inputs)
    base = timing[cs[0].name]["p50_ms"]
    rows = []
    for c in cs:
        t = timing[c.name]
        rows.append({"workload": workload, "case": case, "contender": c.name, "p50_ms": t["p50_ms"], "p90_ms": t["p90_ms"],
                     "iters": t["iters"], "speedup_vs_fp32": base / t["p50_ms"],
                     "gflops_per_s": fl / (t["p50_ms"] / 1e3) / 1e9, **c.quality})
    return rows


def render(rows: list[dict], env: dict, peak: float, quick: bool) -> str:
    lines = [f"# optcc benchmarks {'(quick smoke run: shapes are tiny, numbers mean nothing)' if quick else ''}", "",
             f"- date: {env['date']}, machine: {env['machine']}, CPU: {env['cpu']}, threads: {env['threads']}",
             f"- CPU flags that decide kernel speed: {', '.join(env.get('cpu_flags') or []) or 'none of them'}",
             f"- torch {env['torch']}, onnxruntime {env['onnxruntime']}, transformers {env['transformers']}, optcc {env['optcc']}",
             f"- measured fp32 GEMM peak on this machine/threads: {peak:.1f} GFLOP/s (1024³ matmul)",
             "- method: every contender of a case is timed round-robin in one process on the same inputs and threads "
             "(warm-up discarded, ≥10 calls and ≥3 s each); p50 and p90 in ms; speedup on p50 vs torch eager fp32.", ""]
    cases: dict[str, list[dict]] = {}
    for r in rows:
        cases.setdefault(f"{r['workload']}: {r.get('case', '')}", []).append(r)
    for case, rs in cases.items():
        lines += [f"## {case}", ""]
        if "skipped" in rs[0]:
            lines += [f"skipped: {rs[0]['skipped']}", ""]
            continue
        keys = [k for k in rs[0] if k not in ("workload", "case")]
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for r in rs:
            lines.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def _write(out: Path, stem: str, rows: list[dict], env: dict, peak: float, quick: bool) -> str:
    for r in rows:
        if "gflops_per_s" in r:
            r["fraction_of_gemm_peak"] = r["gflops_per_s"] / peak
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "gemm_peak_gflops": peak, "rows": rows}, indent=2))
    md = render(rows, env, peak, quick)
    (out / f"{stem}.md").write_text(md)
    return md


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--quick", action="store_true", help="smoke run with tiny shapes")
    ap.add_argument("--only", default="W1,W2,W3", help="comma-separated workloads")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", default=DEFAULT_RECIPES,
                    help="comma-separated optcc recipes per workload, e.g. W1=recipes/quantize-int8.yaml (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    per_workload: dict[str, list[Path]] = {"W1": [], "W2": [], "W3": []}
    for item in filter(None, args.recipes.split(",")):
        w, _, path = item.partition("=")
        per_workload[w.strip()].append(ROOT / path.strip())
    work = H.workdir()
    env = {**environment(), "date": datetime.date.today().isoformat(), "machine": socket.gethostname() or platform.node(),
           "threads": args.threads}
    peak = H.matmul_peak_gflops(args.threads, 256 if args.quick else 1024, 0.2 if args.quick else 1.0)
    rows, md = [], ""
    stem = f"{env['date']}-{'quick' if args.quick else 'full'}-{env['machine'][:24]}"
    args.out.mkdir(parents=True, exist_ok=True)
    for name, fn in (("W1", w1), ("W2", w2), ("W3", w3)):
        if name in args.only.split(","):
            print(f"{name} ...", flush=True)
            rows += fn(args.quick, args.threads, work, per_workload[name])
            md = _write(args.out, stem, rows, env, peak, args.quick)  # after each workload: a crash keeps the rest
    print(md)
