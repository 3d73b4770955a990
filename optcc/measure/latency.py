"""Honest latency measurement: contenders interleaved in short turns on the same
inputs and threads, warm-up discarded, iteration and time floors, percentiles."""
from __future__ import annotations

import math
import resource
import statistics
import time
from typing import Callable

import torch


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(times_s: list[float], items: int) -> dict:
    ms = [t * 1e3 for t in times_s]
    mean = statistics.fmean(ms)
    return {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "mean_ms": mean,
        "std_ms": statistics.pstdev(ms) if len(ms) > 1 else 0.0,
        "iters": len(ms),
        "throughput_per_s": items / (percentile(ms, 50) / 1e3) if ms else 0.0,
    }


SETTLE_S = 0.02  # pause before each contender's turn: see measure
TURN_S = 0.05    # a contender's calls in one turn add up to at least this much


def measure(fns: dict[str, Callable[[], object]], *, warmup: int, iters: int, min_seconds: float, items: int,
            max_seconds: float = 120.0) -> dict[str, dict]:
    """Time each callable, round-robin, until every one has >= iters calls and >= min_seconds
    of timed work (or max_seconds overall passed). Returns summarize() per name.

    Contenders take turns (each turn: calls until TURN_S of work, at least one), so machine
    drift spreads over all of them. Before each turn the machine gets SETTLE_S of quiet:
    onnxruntime's and OpenMP's thread pools spin-wait after a call, and a contender timed
    while the previous one's threads still spin shares the cores with them (MiniLM 8x128,
    2 threads: torch eager 205 ms right after an onnxruntime call, 170 ms 20 ms later)."""
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        start = time.perf_counter()
        while True:
            for name, fn in fns.items():
                time.sleep(SETTLE_S)
                turn = 0.0
                while turn < TURN_S:
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    times[name].append(dt)
                    turn += dt
            done = all(len(t) >= iters and sum(t) >= min_seconds for t in times.values())
            if done or time.perf_counter() - start > max_seconds:
                break
    return {k: summarize(v, items) for k, v in times.items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
