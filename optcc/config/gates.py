"""CI gates: `require:` expressions and regressions against a previous report.

Metric names are validated at recipe load (before any work) against METRICS.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Callable, Optional

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
EXPR = re.compile(r"^\s*(>=|<=|==|>|<)\s*(-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*$")


def _get(report: dict, path: str) -> Any:
    cur: Any = report
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _task(report: dict, key: str) -> Optional[float]:
    tm = report.get("task_metric")
    if not tm:
        return None
    if key == "accuracy_drop":  # in points
        return (tm["baseline"] - tm["optimized"]) * 100 if tm["metric"] == "accuracy" else None
    if key == "perplexity_increase_pct":
        return (tm["optimized"] / tm["baseline"] - 1) * 100 if tm["metric"] == "perplexity" else None
    if key in ("embedding_cosine_mean", "neighbour_agreement"):  # sentence sets: the worst artifact
        values = [v[key] for v in (tm.get("by_artifact") or {}).values() if v.get(key) is not None]
        return min(values) if values else None
    return tm.get(key)


def _bytes_ratio(report: dict) -> Optional[float]:
    before = report.get("captured", {}).get("param_bytes")
    after = report["passes"][-1]["after"]["param_bytes"] if report.get("passes") else before
    return after / before if before else None


# name -> how to read it from report.json; each documented in docs/ci.md
METRICS: dict[str, Callable[[dict], Any]] = {
    "speedup": lambda r: _get(r, "latency.speedup"),
    "latency.p50_ms": lambda r: _get(r, "latency.best.p50_ms"),
    "latency.p90_ms": lambda r: _get(r, "latency.best.p90_ms"),
    "latency.p99_ms": lambda r: _get(r, "latency.best.p99_ms"),
    "latency.speedup_by_backend.torch": lambda r: _get(r, "latency.speedup_by_backend.torch"),
    "latency.speedup_by_backend.torch-exported": lambda r: _get(r, "latency.speedup_by_backend.torch-exported"),
    "latency.speedup_by_backend.onnxruntime": lambda r: _get(r, "latency.speedup_by_backend.onnxruntime"),
    "fidelity.cosine_mean": lambda r: _get(r, "fidelity.cosine_mean"),
    "fidelity.cosine_min": lambda r: _get(r, "fidelity.cosine_min"),
    "fidelity.max_abs_err": lambda r: _get(r, "fidelity.max_abs_err"),
    "fidelity.top1_agreement": lambda r: _get(r, "fidelity.top1_agreement"),
    "task.baseline": lambda r: _task(r, "baseline"),
    "task.optimized": lambda r: _task(r, "optimized"),
    "task.delta": lambda r: _task(r, "delta"),
    "task.accuracy_drop": lambda r: _task(r, "accuracy_drop"),
    "task.perplexity_increase_pct": lambda r: _task(r, "perplexity_increase_pct"),
    "task.embedding_cosine_mean": lambda r: _task(r, "embedding_cosine_mean"),
    "task.neighbour_agreement": lambda r: _task(r, "neighbour_agreement"),
    "param_bytes_ratio": _bytes_ratio,
    "kv_bytes_ratio": lambda r: _get(r, "generation.kv_bytes_ratio"),
}


def check_requirements(report: dict, require: dict[str, str]) -> list[dict]:
    return check_values({metric: METRICS[metric](report) for metric in require}, require)


def check_values(values: dict[str, Any], require: dict[str, str]) -> list[dict]:
    """check_requirements on metric values already read (a missing one fails as not measured)."""
    out = []
    for metric, expr in require.items():
        op, bound = _parse(expr)
        value = values.get(metric)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _OPS[op](float(value), bound)
        out.append({"metric": metric, "require": expr, "value": value, "ok": bool(ok),
                    "margin": _margin(op, float(value), bound) if isinstance(value, (int, float)) else None,
                    **({} if value is not None else {"note": "not measured in this run"})})
    return out


def _margin(op: str, value: float, bound: float) -> float:
    """How far the value is on the passing side of the bound (negative: by how much it fails)."""
    if op in (">=", ">"):
        return value - bound
    if op in ("<=", "<"):
        return bound - value
    return -abs(value - bound)


def _parse(expr: str) -> tuple[str, float]:
    m = EXPR.match(expr)
    if not m:
        raise ValueError(expr)
    return m.group(1), float(m.group(2))


# Regression check against a previous report: metric -> (direction, default tolerance).
# "higher" metrics fail when they drop by more than the tolerance, "lower" when they rise.
REGRESSION = {
    "speedup": ("higher", 0.10),  # relative
    "fidelity.cosine_mean": ("higher", 0.002),  # absolute
    "task.optimized": (None, 0.01),  # relative; direction from the task metric
}


def regressions(report: dict, previous: dict, tolerance: Optional[float] = None) -> list[dict]:
    """Compare with a previous report.json: list the metrics that regressed beyond tolerance."""
    out = []
    for metric, (direction, default_tol) in REGRESSION.items():
        new, old = METRICS[metric](report), METRICS[metric](previous)
        if not isinstance(new, (int, float)) or not isinstance(old, (int, float)):
            continue
        if direction is None:
            tm = report.get("task_metric") or {}
            direction = "lower" if tm.get("metric") == "perplexity" else "higher"
        tol = default_tol if tolerance is None else tolerance
        relative = metric != "fidelity.cosine_mean"
        allowed = tol * abs(old) if relative else tol
        worse = (old - new) if direction == "higher" else (new - old)
        out.append({"metric": metric, "previous": old, "current": new, "tolerance": tol,
                    "relative": relative, "ok": worse <= allowed})
    return out
