"""KV-cache math: for kv_share, SLERP merging of two layers' cached K (or V) with per-token
norms and retained token pairs (MiniCache), its reconstruction, and K/V similarity; for
kv_quant, int8 codes with one scale per cached vector.

Shapes: x_i, x_j [B, H, L, D] are the same position's keys (or values) of two layers.
A merged pair is stored as

    direction [B, H, L, D]   unit vectors: SLERP(x_i/|x_i|, x_j/|x_j|, t); retained tokens hold x_i's own direction
    norm_i    [B, H, L, 1]   |x_i| per token
    norm_j    [B, H, L, 1]   |x_j| per token
    kept_at   [B, H, R, 1]   positions of the R retained (least similar) token pairs, int64
    kept      [B, H, R, D]   x_j exactly at those positions

so x_i = norm_i * direction everywhere and x_j = norm_j * direction except at kept_at,
where it is `kept`. R = floor(retain * L) per (batch, head), chosen over the whole
sequence each time the cache is written; re-merging a restored cache is the identity
for merged tokens (both layers share one direction), so the cache can be re-merged at
every decode step. Everything is plain tensor ops (exportable, ONNX-friendly).
"""
from __future__ import annotations

import torch

EPS = 1e-6
_RETAIN_SCALE = 10_000  # retain is applied as an integer ratio so exported graphs keep a symbolic count


def retained_count(length: int, retain: float) -> int:
    """How many of `length` token pairs stay unmerged: floor(retain * length).
    Works on symbolic lengths (torch.export) as well as ints."""
    return (length * int(round(retain * _RETAIN_SCALE))) // _RETAIN_SCALE


def unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (direction [..., D], norm [..., 1])."""
    norm = x.norm(dim=-1, keepdim=True)
    return x / norm.clamp_min(EPS), norm


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of unit vectors a, b [..., D] at t in [0, 1] (0 gives a, 1 gives b).
    Nearly parallel pairs fall back to linear interpolation; the result is renormalised."""
    cos = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    safe = sin > 1e-4
    sin_safe = torch.where(safe, sin, torch.ones_like(sin))
    wa = torch.where(safe, torch.sin((1.0 - t) * omega) / sin_safe, torch.full_like(sin, 1.0 - t))
    wb = torch.where(safe, torch.sin(t * omega) / sin_safe, torch.full_like(sin, t))
    return unit(wa * a + wb * b)[0]


def merge(x_i: torch.Tensor, x_j: torch.Tensor, t: float, retain: float) -> tuple[torch.Tensor, ...]:
    """x_i, x_j [B, H, L, D] -> (direction, norm_i, norm_j, kept_at, kept) as in the module docstring."""
    u_i, n_i = unit(x_i)
    u_j, n_j = unit(x_j)
    direction = slerp(u_i, u_j, t)
    cos = (u_i * u_j).sum(-1)  # [B, H, L]
    k = retained_count(x_i.shape[2], retain)
    # argsort + slice, not topk: the slice needs no proof that k <= L, so the count stays symbolic
    kept_at = cos.argsort(dim=-1)[..., :k].unsqueeze(-1)  # least similar first (ONNX has no stable sort)
    at = kept_at.expand(-1, -1, -1, x_i.shape[-1])
    direction = direction.scatter(2, at, u_i.gather(2, at))
    return direction, n_i, n_j, kept_at, x_j.gather(2, at)


def restore(direction: torch.Tensor, norm_i: torch.Tensor, norm_j: torch.Tensor, kept_at: torch.Tensor,
            kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of merge: -> (x_i, x_j) [B, H, L, D]."""
    x_j = (norm_j * direction).scatter(2, kept_at.expand(-1, -1, -1, direction.shape[-1]), kept)
    return norm_i * direction, x_j


def retention_swaps(expected_at: torch.Tensor, got_at: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compare two choices of retained positions. expected_at, got_at: [B, H, R, 1] int64
    (merge's kept_at) over a cache of `length` positions -> (swapped [B, H, length] bool:
    positions retained by exactly one side, swaps [B, H]: positions the other side dropped).

    The choice is a sort of float cosines, so two runtimes whose float rounding differs
    (an int8 linear upstream moves a code) can swap a near-tied pair at the boundary."""
    shape = (*expected_at.shape[:2], length)
    e = torch.zeros(shape, dtype=torch.bool).scatter(2, expected_at.squeeze(-1).long(), True)
    g = torch.zeros(shape, dtype=torch.bool).scatter(2, got_at.squeeze(-1).long(), True)
    return e ^ g, (e & ~g).sum(-1)


def kept_by_position(kept_at: torch.Tensor, kept: torch.Tensor, length: int) -> torch.Tensor:
    """merge's retained vectors kept [B, H, R, D] placed at their positions kept_at [B, H, R, 1]:
    -> [B, H, length, D], zero where nothing is retained (so two choices compare by position)."""
    out = kept.new_zeros((*kept.shape[:2], length, kept.shape[-1]))
    return out.scatter(2, kept_at.long().expand(-1, -1, -1, kept.shape[-1]), kept)


def merged_bytes_per_token(heads: int, dim: int, retain: float, itemsize: int = 4) -> float:
    """Cache bytes per token of one merged pair of layers (one of K or V), with the
    expected share of retained tokens (index int64 + one exact vector)."""
    return heads * ((dim + 2) * itemsize + retain * (8 + dim * itemsize))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of matching vectors: a, b [..., D] -> scalar."""
    return torch.nn.functional.cosine_similarity(a.flatten(0, -2).float(), b.flatten(0, -2).float(), dim=-1, eps=EPS).mean()


def similarity_matrix(xs: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer tensors xs[l] [B, H, L, D] (same shapes) -> [layers, layers] mean token cosine."""
    n = len(xs)
    out = torch.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = cosine(xs[i], xs[j])
    return out


QMAX = 127


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per cached vector: x [B, H, L, D] -> (codes int8 [B, H, L, D], scale [B, H, L, 1]).
    Idempotent on its own output: the largest code of each vector is +-127, so dequantizing
    and quantizing again gives the same scale and the same codes (a cache re-quantized at
    every decode step does not drift)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(EPS) / QMAX
    return torch.round(x / scale).clamp(-QMAX, QMAX).to(torch.int8), scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale


def int8_bytes_ratio(dim: int, itemsize: int = 4) -> float:
    """Bytes of one cached vector as int8 codes + an fp32 scale, over the vector in `itemsize` floats."""
    return (dim + 4) / (dim * itemsize)
