"""Quality of layer_skip without retraining, on the trained zoo models.

    python benchmarks/layer_skip.py            # vit-digits, and byte-llama when present
    python benchmarks/layer_skip.py --only vit

vit-digits (6 blocks): held-out top-1 accuracy (450 digits) vs the number of blocks
removed, choosing them by Block Influence, uniformly spaced, the last ones, or the
most redundant run (angular); then vs attention / MLP sublayers removed.
byte-llama (6 layers): held-out perplexity per byte when dropping 25% of the
blocks (and 2 of 6) by influence, the last ones, uniformly spaced, or angular.

Selection calibrates on each model's shipped calib split (never the eval split).
Every graph goes through the same pass manager as `optcc apply`. Prints Markdown.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optcc.pipeline import registry  # noqa: E402
from optcc.api import prepare  # noqa: E402
from optcc.graph.capture import capture, flat_outputs  # noqa: E402
from optcc.pipeline.context import PassContext  # noqa: E402
from optcc.intake.decoder import dynamic_shapes as decoder_shapes, no_guard_module  # noqa: E402
from optcc.pipeline.manager import run_passes  # noqa: E402
from optcc.config.recipe import PassStep, parse_recipe  # noqa: E402
from optcc.zoo import data as zoo  # noqa: E402

Config = registry.get("layer_skip").config


def uniform(n: int, k: int) -> list[int]:
    """k of n block indices spread evenly (the centre of each of k equal slices)."""
    return sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)})


def last(n: int, k: int) -> list[int]:
    return list(range(n - k, n))


def skipped(gm, ctx: PassContext, cfg) -> tuple[torch.fx.GraphModule, dict]:
    gm, records = run_passes(copy.deepcopy(gm), (PassStep("layer_skip", cfg, 1),), ctx)
    return gm, records[0].to_dict()


def selections(gm, ctx: PassContext, n: int, k: int, score, picks) -> tuple[list[str], dict]:
    """Table cells for removing k of n blocks: by influence, by each fixed pick, by angular
    distance; each cell is the score with the indices removed. Returns the influence record too."""
    g, rec = skipped(gm, ctx, Config(drop=k))
    cells = [f"{score(g)} {rec['stats']['removed_indices']}"]
    for pick in picks:
        g, _ = skipped(gm, ctx, Config(select="explicit", layers=pick(n, k)))
        cells.append(f"{score(g)} {pick(n, k)}")
    g, ang = skipped(gm, ctx, Config(drop=k, select="angular"))
    cells.append(f"{score(g)} {ang['stats']['removed_indices']}")
    return cells, rec


def load(source: str, inputs_yaml: str):
    """Prepare and capture as `optcc apply` does (decoders: explicit KV cache, dynamic past length)."""
    prep = prepare(source, None, None, parse_recipe(f"version: 1\nmodel: {{inputs: {inputs_yaml}}}\n"))
    with no_guard_module() if prep.cache else contextlib.nullcontext():
        shapes = decoder_shapes(prep.cache) if prep.cache else None
        gm = capture(prep.lm.module, prep.inputs, True, shapes).module()
    return prep, gm


# ---------------------------------------------------------------------------- vit-digits


def vit_digits(max_k: int) -> None:
    prep, gm = load("builtin:vit-digits", "{batch: 8}")
    calib_x, _ = zoo.load_digits_split("vit-digits", "calib")
    eval_x, eval_y = zoo.load_digits_split("vit-digits", "eval")
    ctx = PassContext(prep.lm.task, prep.inputs, prep.reference, prep.primary, prep.causal,
                      calibration=lambda: [{"pixel_values": calib_x}])

    def accuracy(g) -> float:
        correct = 0
        with torch.no_grad():
            for i in range(0, len(eval_y), 90):
                logits = flat_outputs(g(pixel_values=eval_x[i:i + 90]))[prep.primary]
                correct += int((logits.argmax(-1) == eval_y[i:i + 90]).sum())
        return correct / len(eval_y)

    n = len(ctx.structure(gm).blocks)
    base = accuracy(gm)
    print(f"### vit-digits: held-out top-1 accuracy ({len(eval_y)} images), {n} blocks, baseline {base:.4f}\n")
    print("Blocks removed (indices in brackets):\n")
    print("| removed | influence | uniform | last | angular | params left |")
    print("|---|---|---|---|---|---|")
    for k in range(1, max_k + 1):
        cells, rec = selections(gm, ctx, n, k, lambda g: f"{accuracy(g):.4f}", (uniform, last))
        print(f"| {k} of {n} | " + " | ".join(cells) + f" | {rec['after']['params']:,} |")
    scores = {s["index"]: s["score"] for s in rec["stats"]["scores"]}
    print("\nBlock Influence per block (calib split): " + ", ".join(f"{i}: {v:.3f}" for i, v in scores.items()))

    for gran in ("attention", "mlp"):
        print(f"\n{gran.capitalize()} sublayers removed:\n")
        print("| removed | influence | last | GFLOPs left |")
        print("|---|---|---|---|")
        for k in range(1, max_k + 1):
            g, rec = skipped(gm, ctx, Config(drop=k, granularity=gran))
            g2, _ = skipped(gm, ctx, Config(select="explicit", layers=last(n, k), granularity=gran))
            print(f"| {k} of {n} | {accuracy(g):.4f} {rec['stats']['removed_indices']} | "
                  f"{accuracy(g2):.4f} {last(n, k)} | {rec['after']['flops'] / 1e9:.3f} of {rec['before']['flops'] / 1e9:.3f} |")
        scores = {s["index"]: s["score"] for s in rec["stats"]["scores"]}
        print(f"\n{gran} influence per block: " + ", ".join(f"{i}: {v:.3f}" for i, v in scores.items()))
    print()


# ---------------------------------------------------------------------------- byte-llama


def byte_llama(seq_len: int = 256, calib_windows: int = 16) -> None:
    if not (zoo.zoo_dir() / "byte-llama" / "config.json").exists():
        print("### byte-llama: not in optcc/zoo yet; skipped\n")
        return
    prep, gm = load("builtin:byte-llama", f"{{batch: 2, seq_len: {seq_len}}}")
    keys = list(prep.inputs)

    def batch(windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.stack([w[:-1] for w in windows])
        b = {"input_ids": ids}
        if "attention_mask" in keys:
            b["attention_mask"] = torch.ones_like(ids)
        return prep.complete(b)  # a decoder graph also takes its (empty) KV cache

    calib = [w for w in zoo.lm_windows(zoo.byte_encode(zoo.load_text_split("byte-llama", "calib")), seq_len)
             if w.numel() == seq_len + 1][:calib_windows]
    calib_batches = [batch(calib[i:i + 4]) for i in range(0, len(calib), 4)]
    windows = zoo.lm_windows(zoo.byte_encode(zoo.load_text_split("byte-llama", "eval")), seq_len)
    ctx = PassContext(prep.lm.task, prep.inputs, prep.reference, prep.primary, prep.causal,
                      calibration=lambda: calib_batches)

    def perplexity(g) -> float:
        nll, count = 0.0, 0
        full = [w for w in windows if w.numel() == seq_len + 1]
        groups = [full[i:i + 8] for i in range(0, len(full), 8)] + [[w] for w in windows if w.numel() != seq_len + 1]
        with torch.no_grad():
            for ws in groups:
                logits = flat_outputs(g(**batch(ws)))[prep.primary].float()
                targets = torch.stack([w[1:] for w in ws])
                nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
                count += targets.numel()
        return math.exp(nll / count)

    n = len(ctx.structure(gm).blocks)
    base = perplexity(gm)
    print(f"### byte-llama: held-out perplexity per byte ({sum(w.numel() - 1 for w in windows):,} bytes, "
          f"windows of {seq_len}), {n} blocks, baseline {base:.4f}\n")
    print("| removed | influence | last | uniform | angular |")
    print("|---|---|---|---|---|")
    for k in sorted({max(1, int(0.25 * n)), 2}):
        cells, rec = selections(gm, ctx, n, k, lambda g: f"{perplexity(g):.3f}", (last, uniform))
        label = f"{k} of {n}" + (" (25%)" if k == max(1, int(0.25 * n)) else "")
        print(f"| {label} | " + " | ".join(cells) + " |")
    scores = {s["index"]: s["score"] for s in rec["stats"]["scores"]}
    print("\nBlock Influence per block (calib split): " + ", ".join(f"{i}: {v:.3f}" for i, v in scores.items()))
    for gran in ("attention", "mlp"):
        g, rec = skipped(gm, ctx, Config(drop=2, granularity=gran))
        print(f"\n2 {gran} sublayers by influence {rec['stats']['removed_indices']}: {perplexity(g):.3f}")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("vit", "llama"), help="run one model")
    ap.add_argument("--max-k", type=int, default=5, help="vit-digits: most blocks/sublayers removed")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.only in (None, "vit"):
        vit_digits(args.max_k)
    if args.only in (None, "llama"):
        byte_llama()
    print(f"_{time.perf_counter() - t0:.0f} s, torch {torch.__version__}, {args.threads} threads_")


if __name__ == "__main__":
    main()
