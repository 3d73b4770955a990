"""Pareto front of (cost, quality) points: pure math, no I/O."""
from __future__ import annotations

from typing import Sequence


def front(points: Sequence[tuple[float, float]], higher_quality_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates (cost no higher, quality no worse, one of
    them strictly better), ordered by cost. Equal points keep the first."""
    sign = 1.0 if higher_quality_better else -1.0
    keyed = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1], i))
    out: list[int] = []
    best_q = float("-inf")
    for i in keyed:
        q = sign * points[i][1]
        if q > best_q:
            out.append(i)
            best_q = q
    return out
