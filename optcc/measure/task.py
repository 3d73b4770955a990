"""Task metrics on an evaluation Dataset for any runner (eager model, graph, artifact).

images / tensors → top-1 accuracy; text → perplexity (per token; per byte for
byte-level models); sentences → paraphrase retrieval accuracy of mean-pooled
embeddings, plus embedding cosine and nearest-neighbour agreement vs the baseline.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from optcc.intake.data import Dataset
from optcc.errors import RecipeError
from optcc.algorithms.metrics import mean_pool, neighbour_agreement, paraphrase_retrieval

Runner = Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]
METRIC_OF_KIND = {"images": "accuracy", "tensors": "accuracy", "text": "perplexity", "sentences": "embedding"}


def metric_for(ds: Dataset, requested: str = "auto") -> str:
    natural = METRIC_OF_KIND[ds.kind]
    if requested not in ("auto", natural):
        raise RecipeError(f"evaluate.metric: '{requested}' does not fit {ds.source} ({ds.kind})",
                          f"use metric: {natural} or auto")
    return natural


def run_metric(ds: Dataset, run: Runner, primary: int) -> dict:
    """{"metric", "value"} (+ "embeddings" for sentence sets, used by compare())."""
    with torch.no_grad():
        return _run_metric(ds, run, primary)


def _run_metric(ds: Dataset, run: Runner, primary: int) -> dict:
    metric = METRIC_OF_KIND[ds.kind]
    if metric == "accuracy":
        correct = total = 0
        for b, y in zip(ds.batches, ds.labels):
            logits = run(b)[primary]
            correct += int((logits.argmax(-1) == y).sum())
            total += y.numel()
        return {"metric": "accuracy", "value": correct / total}
    if metric == "perplexity":
        nll, count = 0.0, 0
        for b, y in zip(ds.batches, ds.labels):
            logits = run(b)[primary].float()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            count += y.numel()
        return {"metric": "perplexity", "value": math.exp(nll / count)}
    embs = []
    for b in ds.batches:
        hidden = run(b)[primary]
        embs.append(mean_pool(hidden, b["attention_mask"]) if "attention_mask" in b else hidden.mean(1))
    emb = torch.cat(embs)
    return {"metric": "paraphrase_retrieval", "value": paraphrase_retrieval(emb, ds.groups), "embeddings": emb}


def compare(base: dict, other: dict) -> dict:
    """Metric of `other` with its change vs `base`; embedding sets add cosine and NN agreement."""
    out = {"value": other["value"], "delta": other["value"] - base["value"]}
    if "embeddings" in base:
        cos = torch.nn.functional.cosine_similarity(base["embeddings"], other["embeddings"], dim=-1)
        out["embedding_cosine_mean"] = float(cos.mean())
        out["embedding_cosine_min"] = float(cos.min())
        out["neighbour_agreement"] = neighbour_agreement(base["embeddings"], other["embeddings"])
    return out


def strip(result: Optional[dict]) -> Optional[dict]:
    return None if result is None else {k: v for k, v in result.items() if k != "embeddings"}
