"""Generation benchmark: prefill, time to first token, decode tokens/s and KV bytes
per token for eager torch and each artifact, interleaved round by round, plus
whether each artifact's greedy tokens equal eager torch's."""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from optcc.measure.latency import percentile
from optcc.intake.decoder import CacheSpec, Step, generate


Loop = Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]]  # (prompt, new_tokens) -> (tokens, timings)


def bench_generation(steps: dict[str, Step], spec: CacheSpec, prompt: torch.Tensor, new_tokens: int,
                     rounds: int, specs: dict[str, CacheSpec] | None = None, loops: dict[str, Loop] | None = None) -> dict:
    """steps: {"baseline": eager step, backend: artifact step}, each run by optcc's greedy loop
    (decoder.generate). prompt: [B, T]. specs: a step's own cache layout where it differs from
    `spec` (a pass changed the cache). loops: contenders that run their own generation loop
    (another runtime), returning what decoder.generate returns; timed in the same rounds."""
    specs = {k: (specs or {}).get(k, spec) for k in steps}
    runs: dict[str, Loop] = {k: functools.partial(generate, step, specs[k]) for k, step in steps.items()}
    runs.update(loops or {})
    tokens: dict[str, torch.Tensor] = {}
    prefill: dict[str, list[float]] = {k: [] for k in runs}
    decode: dict[str, list[float]] = {k: [] for k in runs}
    graph: dict[str, list[float]] = {k: [] for k in runs}
    kv: dict[str, float] = {}
    with torch.no_grad():
        for name, run in runs.items():  # warm-up round, also the tokens compared for greedy_match
            tokens[name], t = run(prompt, new_tokens)
            kv[name] = t["kv_bytes_per_token"]
        for _ in range(rounds):
            for name, run in runs.items():
                _, t = run(prompt, new_tokens)
                prefill[name].append(t["prefill_s"] * 1e3)
                decode[name].extend(x * 1e3 for x in t["decode_s"])
                graph[name].extend(x * 1e3 for x in t.get("decode_graph_s", ()))
    batch = prompt.shape[0]

    def summary(name: str) -> dict:
        d = decode[name]
        p50 = percentile(d, 50) if d else None
        return {
            "prefill_ms": percentile(prefill[name], 50),
            "ttft_ms": percentile(prefill[name], 50),  # the first token comes out of the prefill call
            "decode_ms_per_token_p50": p50,
            "decode_ms_per_token_p90": percentile(d, 90) if d else None,
            "decode_tokens_per_s": batch * 1e3 / p50 if p50 else None,
            "kv_bytes_per_token": kv[name],
            # of decode time, the share outside the graph, in optcc's loop (None for another runtime's loop)
            "decode_loop_share": 1 - sum(graph[name]) / sum(d) if graph[name] and d else None,
            "rounds": rounds,
        }

    base = summary("baseline")
    optimized = {k: summary(k) for k in runs if k != "baseline"}
    match = {k: bool(torch.equal(tokens[k], tokens["baseline"])) for k in optimized}
    best_kv = min((v["kv_bytes_per_token"] for v in optimized.values()), default=None)
    return {
        "prompt_tokens": int(prompt.shape[1]),
        "new_tokens": new_tokens,
        "batch": batch,
        "baseline": {**base, "backend": "torch-eager-fp32 (HF cache)"},
        "optimized": optimized,
        "decode_speedup_by_backend": {k: (v["decode_tokens_per_s"] / base["decode_tokens_per_s"])
                                      if v["decode_tokens_per_s"] and base["decode_tokens_per_s"] else None
                                      for k, v in optimized.items()},
        "kv_bytes_ratio": best_kv / base["kv_bytes_per_token"] if best_kv and base["kv_bytes_per_token"] else None,
        "greedy_match_by_backend": match,
        "greedy_match": all(match.values()) if match else None,
        "sample": {"baseline": tokens["baseline"][0].tolist()},
    }


def prompt_ids(spec: CacheSpec, text: str | None, length: int, batch: int, seed: int = 0) -> torch.Tensor:
    """A prompt of `length` tokens: real text for byte-level models when given, else random ids. [batch, length]"""
    if text and spec.byte_level:
        from optcc.zoo.data import byte_encode

        ids = byte_encode(text)[:length]
        if ids.numel() == length:
            return ids.unsqueeze(0).repeat(batch, 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (batch, length), generator=g)


def streamed_perplexity(step: Step, spec: CacheSpec, windows: torch.Tensor, chunk: int = 1) -> float:
    """Perplexity per token when each window [N, T+1] is fed `chunk` tokens per call through
    `step`, each call reading the cache the previous call returned: what generation sees, and
    what a prefill-only evaluation misses when a pass changes the stored cache (MiniCache
    merging, an int8 cache)."""
    ids, targets = windows[:, :-1], windows[:, 1:]
    past = spec.empty(ids.shape[0])
    logits = []
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            out = step({"input_ids": ids[:, s:s + chunk], **past})
            logits.append(out[0])
            past = dict(zip(spec.names(), out[1:]))
    lg = torch.cat(logits, 1).float()
    return math.exp(float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1))))
