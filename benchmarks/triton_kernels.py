"""Micro-benchmark: each Triton kernel in optcc/ops/kernels against its torch reference, on CUDA.

    python benchmarks/triton_kernels.py                      # every workload, Markdown on stdout
    python benchmarks/triton_kernels.py --only int4 --json   # the same numbers as JSON
    python benchmarks/triton_kernels.py --min-iters 200 --min-seconds 2

Workloads (default shapes):
  int4-decode   x fp16 [1, 4096] · int4 W [4096, 4096], group 128 (one token of a 7B-class linear)
  int4-prefill  x fp16 [512, 4096] · the same W
  tome-match    metric fp32 [64, 197, 64], CLS protected (ViT-B/16 at 224 px, batch 64)
  tome-merge    x fp32 [64, 197, 768], r = 16, sizes from a previous merge
Contenders per workload: the Triton kernel, the torch reference it replaces
(optcc/ops/kernels int4_matmul_reference, match_scores_reference; optcc/algorithms/tome.py
merge_wavg), and for int4 a dense F.linear on the pre-dequantized fp16 weight
as a ceiling. A device-to-device copy of 1 GiB gives the measured bandwidth
ceiling of this GPU.

Timing: CUDA events around one call; before every call a buffer of max(256 MiB,
2 × L2) is zeroed, so operands come from HBM rather than L2 and the GPU is busy
while the call is enqueued (the launch is hidden as long as it takes less than
the flush). Warm-up calls (Triton compiles on the first) are discarded;
contenders are sampled round-robin until each has --min-iters samples and
--min-seconds of wall time passed. Reported: median, p10, p90 in µs.
GB/s = bytes of the call's inputs read once plus its outputs written once,
divided by the median; intermediates a contender writes (the reference's
dequantized weight) are not counted, so for the references it is effective
bandwidth. Each contender's output is compared with the reference before timing.

Needs a CUDA GPU; on a machine without one it prints one line and exits 0.
Results on stdout, progress on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

WORKLOADS = ("int4-decode", "int4-prefill", "tome-match", "tome-merge")


@dataclass
class Contender:
    name: str
    fn: Callable[[], object]
    bytes: int  # inputs read once + outputs written once
    flops: int = 0


@dataclass
class Workload:
    name: str
    shape: str
    contenders: list[Contender]
    reference: str  # name of the contender every other one is checked against


@dataclass
class Row:
    workload: str
    shape: str
    contender: str
    median_us: float
    p10_us: float
    p90_us: float
    samples: int
    gb_per_s: float
    tflop_per_s: Optional[float]
    max_abs_diff: float  # vs the workload's reference contender


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------- workloads ---

def int4_workload(name: str, m: int, n: int, k: int, group: int, dtype: torch.dtype, device: str) -> Workload:
    from optcc.algorithms import quantizers

    im = importlib.import_module("optcc.ops.kernels.int4_matmul")  # optcc.ops.kernels.int4_matmul is the function
    gen = torch.Generator().manual_seed(0)
    codes, scale, zero = quantizers.quantize_groupwise(torch.randn(n, k, generator=gen), group)
    qweight = quantizers.pack_int4(codes).reshape(n, k // group, group // 2).to(device)
    scales, zeros = scale.reshape(-1).to(device), quantizers.pack_zero_points(zero).to(device)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype)
    dense = im.dequantize(qweight, scales, zeros, group).to(dtype)
    y_bytes = m * n * x.element_size()
    q_bytes = _nbytes(x, qweight, scales, zeros, bias) + y_bytes
    flops = 2 * m * n * k
    short = str(dtype).removeprefix("torch.")
    return Workload(name, f"x {short} [{m}, {k}], W int4 [{n}, {k}], group {group}", [
        Contender("triton int4_matmul", lambda: im.int4_matmul_triton(x, qweight, scales, zeros, group, bias),
                  q_bytes, flops),
        Contender("torch reference (unpack, dequantize, fp32 matmul)",
                  lambda: im.int4_matmul_reference(x, qweight, scales, zeros, group, bias), q_bytes, flops),
        Contender(f"torch F.linear, dense {short} weight (ceiling)",
                  lambda: F.linear(x, dense, bias), _nbytes(x, dense, bias) + y_bytes, flops),
    ], reference="torch reference (unpack, dequantize, fp32 matmul)")


def match_workload(b: int, t: int, d: int, device: str) -> Workload:
    tome = importlib.import_module("optcc.ops.kernels.tome_triton")
    gen = torch.Generator().manual_seed(0)
    metric = F.normalize(torch.randn(b, t, d, generator=gen), dim=-1).to(device)
    na, nb = (t + 1) // 2, t // 2
    nbytes = _nbytes(metric) + b * na * (4 + 8)  # metric in; node_max fp32 + node_idx int64 out
    flops = 2 * b * na * nb * d
    return Workload("tome-match", f"metric fp32 [{b}, {t}, {d}], protected (0,)", [
        Contender("triton match_scores (fused A·Bᵀ, row max/argmax)",
                  lambda: tome.match_scores_triton(metric, (0,)), nbytes, flops),
        Contender("torch reference (scores matrix, masked_fill, max)",
                  lambda: tome.match_scores_reference(metric, (0,)), nbytes, flops),
    ], reference="torch reference (scores matrix, masked_fill, max)")


def merge_workload(b: int, t: int, c: int, r: int, device: str) -> Workload:
    from optcc.algorithms import tome as M

    tome = importlib.import_module("optcc.ops.kernels.tome_triton")
    gen = torch.Generator().manual_seed(0)
    metric = F.normalize(torch.randn(b, t, 64, generator=gen), dim=-1)
    match = M.Match(*(f.to(device) for f in M.bipartite_soft_matching(metric, r, (0,))))
    x = torch.randn(b, t, c, generator=gen).to(device)
    size = (1.0 + 2.0 * torch.rand(b, t, 1, generator=gen)).to(device)
    out_rows = b * (t - r)
    nbytes = _nbytes(x, size, *match) + out_rows * (c + 1) * x.element_size()
    return Workload("tome-merge", f"x fp32 [{b}, {t}, {c}], r {r}", [
        Contender("triton merge (size-weighted, one output row per program)",
                  lambda: tome.merge_triton(x, size, match), nbytes),
        Contender("torch reference merge.merge_wavg (gather, r×r matmul, scatter)",
                  lambda: M.merge_wavg(x, size, match), nbytes),
    ], reference="torch reference merge.merge_wavg (gather, r×r matmul, scatter)")


def copy_workload(device: str, gib: float = 1.0) -> Workload:
    n = int(gib * 2 ** 30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return Workload("bandwidth", f"fp32 copy of {gib:g} GiB", [
        Contender("torch copy_ (measured bandwidth ceiling)", lambda: dst.copy_(src), 2 * _nbytes(src)),
    ], reference="torch copy_ (measured bandwidth ceiling)")


def build(names: list[str], device: str) -> list[Workload]:
    made = {
        "int4-decode": lambda: int4_workload("int4-decode", 1, 4096, 4096, 128, torch.float16, device),
        "int4-prefill": lambda: int4_workload("int4-prefill", 512, 4096, 4096, 128, torch.float16, device),
        "tome-match": lambda: match_workload(64, 197, 64, device),
        "tome-merge": lambda: merge_workload(64, 197, 768, 16, device),
    }
    return [made[n]() for n in names] + [copy_workload(device)]


# ------------------------------------------------------------------- timing ---

def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def max_abs_diff(w: Workload) -> dict[str, float]:
    """Every contender's first output against the reference's (fp32, on the device)."""
    want = _first(next(c for c in w.contenders if c.name == w.reference).fn()).float()
    diffs = {}
    for c in w.contenders:
        got = _first(c.fn()).float()
        finite = torch.isfinite(want)  # protected rows of node_max are -inf on both sides
        diffs[c.name] = float((got - want)[finite].abs().max()) if finite.any() else 0.0
    return diffs


def flush_bytes(device: str) -> int:
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return max(256 * 2 ** 20, 2 * l2)


def flush_buffer(device: str) -> torch.Tensor:
    return torch.empty(flush_bytes(device) // 4, dtype=torch.int32, device=device)


def time_round_robin(contenders: list[Contender], flush: torch.Tensor, warmup: int, min_iters: int,
                     min_seconds: float) -> dict[str, list[float]]:
    """µs per call for each contender, sampled one call at a time in turn."""
    for c in contenders:
        for _ in range(warmup):
            c.fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples: dict[str, list[float]] = {c.name: [] for c in contenders}
    t0 = time.perf_counter()
    while min(len(s) for s in samples.values()) < min_iters or time.perf_counter() - t0 < min_seconds:
        for c in contenders:
            flush.zero_()
            start.record()
            c.fn()
            end.record()
            end.synchronize()
            samples[c.name].append(start.elapsed_time(end) * 1e3)  # elapsed_time is in ms
    return samples


def measure(workloads: list[Workload], warmup: int, min_iters: int, min_seconds: float, device: str) -> list[Row]:
    flush = flush_buffer(device)
    rows = []
    for w in workloads:
        print(f"{w.name}: {w.shape}", file=sys.stderr)
        diffs = max_abs_diff(w)
        samples = time_round_robin(w.contenders, flush, warmup, min_iters, min_seconds)
        for c in w.contenders:
            s = samples[c.name]
            deciles = statistics.quantiles(s, n=10)
            med = statistics.median(s)
            rows.append(Row(w.name, w.shape, c.name, med, deciles[0], deciles[-1], len(s),
                            c.bytes / (med * 1e-6) / 1e9, c.flops / (med * 1e-6) / 1e12 if c.flops else None,
                            diffs[c.name]))
    return rows


# ------------------------------------------------------------------ output ---

def settings(args, device: str) -> dict:
    import triton

    props = torch.cuda.get_device_properties(device)
    return {"device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "l2_cache_bytes": getattr(props, "L2_cache_size", None), "flush_bytes": flush_bytes(device),
            "warmup": args.warmup, "min_iters": args.min_iters, "min_seconds": args.min_seconds,
            "timer": "torch.cuda.Event around one call, L2 flushed before each"}


def markdown(rows: list[Row], meta: dict) -> str:
    lines = ["# optcc Triton kernels vs torch references", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines.append("| workload | shape | contender | median µs | p10 µs | p90 µs | samples | GB/s | TFLOP/s | max abs diff vs reference |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tf = f"{r.tflop_per_s:.2f}" if r.tflop_per_s is not None else ""
        lines.append(f"| {r.workload} | {r.shape} | {r.contender} | {r.median_us:.1f} | {r.p10_us:.1f} | {r.p90_us:.1f} "
                     f"| {r.samples} | {r.gb_per_s:.0f} | {tf} | {r.max_abs_diff:.3g} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), help="workloads to run")
    ap.add_argument("--warmup", type=int, default=10, help="discarded calls per contender (the first compiles)")
    ap.add_argument("--min-iters", type=int, default=100, help="samples per contender, at least")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="wall time per workload, at least")
    ap.add_argument("--json", action="store_true", help="print {settings, rows} as JSON instead of Markdown")
    args = ap.parse_args(argv)
    if args.min_iters < 2 or args.warmup < 1:
        ap.error("--min-iters must be >= 2 (percentiles) and --warmup >= 1 (the first call compiles)")
    if not torch.cuda.is_available():
        print("benchmarks/triton_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing timed.",
              file=sys.stderr)
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: the kernels would run in the Python interpreter; unset it to time them.",
              file=sys.stderr)
        return 1
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed: pip install triton (or optcc[test])", file=sys.stderr)
        return 1
    import optcc.ops.kernels  # noqa: F401  registers the ops and their CUDA kernels

    device = "cuda"
    rows = measure(build(args.only, device), args.warmup, args.min_iters, args.min_seconds, device)
    meta = settings(args, device)
    if args.json:
        print(json.dumps({"settings": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
