"""How much a layer changes the residual stream: pure tensor math for layer_skip.

Block Influence (ShortGPT, Men et al. 2024): BI = 1 - mean over tokens of
cos(h_in, h_out). 0 means the layer leaves every token's direction unchanged
(removable for free); 1 means it turns them orthogonal.

Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the
Deeper Layers"): d(l, n) = arccos(cos(h_in of block l, h_out of block l+n-1)) / pi,
averaged over tokens; the run of n blocks with the smallest d is the most
redundant. (The paper reads only the final token; averaging over all tokens is
steadier with few calibration samples and matches BI's convention.)

Statistics are sums over tokens so they accumulate across calibration batches
without keeping activations: `Running` holds (sum, tokens) per key.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

EPS = 1e-8


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the hidden dimension.

    a, b: [..., hidden] (same shape) -> [...]. Computed in float64 so an identity
    layer scores exactly 0; all-zero tokens count as unchanged (cos 1).
    """
    if a.shape != b.shape:
        raise ValueError(f"token_cosine: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.double(), b.double()
    dot = (a * b).sum(-1)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = dot / (na * nb).clamp_min(EPS)
    both_zero = (na <= EPS) & (nb <= EPS)
    return torch.where(both_zero, torch.ones_like(cos), cos).clamp(-1.0, 1.0)


def _weights(cos: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Token weights [...] for cos [...]: the padding mask when it lines up, else ones."""
    if mask is None or tuple(mask.shape) != tuple(cos.shape):
        return torch.ones_like(cos)
    return mask.to(cos.dtype)


def cosine_sum(h_in: torch.Tensor, h_out: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """(sum of per-token cosines, number of tokens) for one batch.

    h_in, h_out: [batch, tokens, hidden] (any leading dims); mask: [batch, tokens]
    with 1 for real tokens (padding excluded), or None.
    """
    cos = token_cosine(h_in, h_out)
    w = _weights(cos, mask)
    return float((cos * w).sum()), float(w.sum())


def angle_sum(h_in: torch.Tensor, h_out: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """(sum of per-token arccos(cos)/pi, number of tokens) for one batch; shapes as cosine_sum."""
    ang = torch.arccos(token_cosine(h_in, h_out)) / math.pi
    w = _weights(ang, mask)
    return float((ang * w).sum()), float(w.sum())


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """BI = 1 - mean_tokens cos(h_in, h_out). h_in, h_out: [batch, tokens, hidden] -> float in [0, 2]."""
    s, n = cosine_sum(h_in, h_out, mask)
    return 1.0 - s / max(n, 1.0)


def angular_distance(h_in: torch.Tensor, h_out: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """mean_tokens arccos(cos(h_in, h_out)) / pi, in [0, 1]. Shapes as block_influence."""
    s, n = angle_sum(h_in, h_out, mask)
    return s / max(n, 1.0)


class Running:
    """Token-weighted means accumulated over batches: add(key, (sum, tokens)), mean(key)."""

    def __init__(self) -> None:
        self.sums: dict = {}
        self.tokens: dict = {}

    def add(self, key, pair: tuple[float, float]) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + pair[0]
        self.tokens[key] = self.tokens.get(key, 0.0) + pair[1]

    def mean(self, key) -> float:
        return self.sums[key] / max(self.tokens[key], 1.0)


def runs(num_blocks: int, n: int, forbidden: Iterable[int] = ()) -> list[int]:
    """Start indices l of the runs [l, l+n-1] within num_blocks that avoid `forbidden` blocks."""
    bad = set(forbidden)
    return [l for l in range(num_blocks - n + 1) if not bad.intersection(range(l, l + n))]


def best_run(distances: dict[int, float]) -> int:
    """The start with the smallest angular distance (the earliest one on ties)."""
    if not distances:
        raise ValueError("best_run: no candidate runs")
    return min(sorted(distances), key=lambda l: distances[l])


def lowest(scores: Sequence[float], k: int, forbidden: Iterable[int] = ()) -> list[int]:
    """Indices of the k smallest scores, skipping `forbidden`, sorted ascending (ties: earlier index)."""
    bad = set(forbidden)
    order = sorted((i for i in range(len(scores)) if i not in bad), key=lambda i: (scores[i], i))
    if k > len(order):
        raise ValueError(f"lowest: asked for {k} of {len(order)} allowed indices")
    return sorted(order[:k])
