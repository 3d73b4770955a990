"""Pure fidelity and task metrics. Tensors in, floats out; no graph code here."""
from __future__ import annotations

import math

import torch


def fidelity(ref: torch.Tensor, out: torch.Tensor, logits: bool = False) -> dict[str, float]:
    """Compare one output tensor with its reference.

    ref, out: [batch, ...]. Cosine is per sample over all other dims.
    top1_agreement (logits only): fraction of rows [..., classes] whose argmax agree.
    """
    if ref.shape != out.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference {tuple(ref.shape)}")
    r = ref.detach().float().reshape(ref.shape[0], -1) if ref.dim() else ref.detach().float().reshape(1, 1)
    o = out.detach().float().reshape(r.shape)
    cos = torch.nn.functional.cosine_similarity(r, o, dim=1, eps=1e-12)
    res = {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_err": float((r - o).abs().max()) if r.numel() else 0.0,
        "finite": bool(torch.isfinite(o).all()),
    }
    if logits and ref.dim() >= 2:
        res["top1_agreement"] = top1_agreement(ref, out)
    return res


def top1_agreement(ref_logits: torch.Tensor, out_logits: torch.Tensor) -> float:
    """Fraction of positions where argmax over the last dim agrees. [..., classes]"""
    return float((ref_logits.argmax(-1) == out_logits.argmax(-1)).float().mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy. logits: [N, classes], labels: [N]."""
    return float((logits.argmax(-1) == labels).float().mean())


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy). logits: [B, T, V] predict targets: [B, T]."""
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    return float(math.exp(float(nll)))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens. hidden: [B, T, D], mask: [B, T] → [B, D]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def neighbour_agreement(ref_emb: torch.Tensor, out_emb: torch.Tensor) -> float:
    """How often each sentence's nearest neighbour (cosine, excluding itself) is the
    same under both embeddings. [N, D] each."""
    def nn_index(e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e.float(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)

    return float((nn_index(ref_emb) == nn_index(out_emb)).float().mean())


def paraphrase_retrieval(emb: torch.Tensor, groups: torch.Tensor) -> float:
    """Fraction of sentences whose nearest neighbour shares their paraphrase group. [N, D], [N]."""
    e = torch.nn.functional.normalize(emb.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return float((groups[sim.argmax(-1)] == groups).float().mean())
