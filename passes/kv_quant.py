"""kv_quant: store a decoder's KV cache as int8 codes with one fp32 scale per cached vector.

Every floating-point cache slot that grows with the past and whose vectors have more than
one element (the keys and values of each layer, or kv_share's merged directions) becomes two
slots: `<slot>_int8` [B, H, L, D] int8 and `<slot>_scale` [B, H, L, 1] fp32. The graph
dequantizes the past where it first read it (attention sees the past as stored and the
new tokens' own K/V at full precision) and quantizes what it returns. Re-quantizing a
dequantized vector gives the same codes (optcc/algorithms/kvmath.py), so a cache written back at
every decode step does not drift. Slots of one element per vector (kv_share's norms),
integer slots and slots of their own length (kv_share merge's retained tokens, a few per
cent of the tokens) stay as they are: quantizing the latter made torch.export specialise
the past length when the example holds no retained token.

Bytes per cached vector: (D + 4) / 4D of fp32, e.g. 0.27x at head_dim 48. Prefill reads
no past, so its logits (and prefill perplexity) are unchanged; the cost shows in
decoding, which the report's greedy match and streamed perplexity measure.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from optcc.ops import kv_cache
from optcc.graph.cacheio import CacheIO, fake_like, retarget_sizes
from optcc.graph.fx import node_order
from optcc.pipeline.context import PassContext
from optcc.errors import PassError
from optcc.pipeline.registry import PassResult, register
from optcc.config.schema import field


@dataclass(frozen=True)
class Config:
    dtype: Literal["int8"] = field("int8", help="storage of the cached vectors: int8 codes, symmetric, one fp32 scale per token and head")


def _quantizable(ph: fx.Node) -> bool:
    v = ph.meta.get("val")
    return (isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.dim() == 4 and int(v.shape[3]) > 1
            and ph.meta.get("cache_length", "past") == "past")


@register("kv_quant", Config, summary="int8 KV cache: codes + one scale per cached vector, dequantized where read",
          rounds=True, after=("layer_skip", "kv_share"), tasks=("text-generation",))
def run(gm: fx.GraphModule, cfg: Config, ctx: PassContext) -> PassResult:
    io = CacheIO(gm, "kv_quant")
    targets = [name for name, ph in io.past.items() if _quantizable(ph)]
    if not targets:
        kinds = ", ".join(f"{k} {str(ph.meta['val'].dtype).removeprefix('torch.')}" for k, ph in io.past.items())
        raise PassError(f"kv_quant: no floating-point cache slot left to quantize (slots: {kinds})",
                        "run kv_quant once, on a decoder whose cache is fp32")
    g = gm.graph
    before = io.kv_bytes()
    slots: list[tuple[fx.Node, fx.Node]] = []
    anchor = io.plain[-1]
    for name, past in io.past.items():
        if name not in targets:
            slots.append((past, io.present[name]))
            continue
        val = past.meta["val"]
        new = []
        for suffix, v in (("int8", fake_like(val, tuple(val.shape), torch.int8)),
                          ("scale", fake_like(val, (*val.shape[:3], 1)))):
            with g.inserting_after(anchor):
                ph = g.placeholder(f"past_{name}_{suffix}")
            ph.meta["val"] = v
            if "cache_length" in past.meta:
                ph.meta["cache_length"] = past.meta["cache_length"]
            anchor = ph
            new.append(ph)
        stack = io.present[name].meta.get("nn_module_stack")
        first_use = min((u for u in past.users if u.op == "call_function"), key=node_order(g).__getitem__, default=None)
        if first_use is None:
            raise PassError(f"kv_quant: cache input past_{name} is never read", "this is a bug; run with --debug")
        with g.inserting_before(first_use):
            restored = g.call_function(kv_cache.kv_dequantize_int8, tuple(new))
        retarget_sizes(past, new[0])
        past.replace_all_uses_with(restored)
        with g.inserting_before(io.output):
            packed = g.call_function(kv_cache.kv_quantize_int8, (io.present[name],))
            outs = [g.call_function(operator.getitem, (packed, k)) for k in range(2)]
        for node in (restored, packed, *outs):
            if stack:
                node.meta["nn_module_stack"] = stack
        slots.extend(zip(new, outs))
    io.rebuild(slots)
    rebuilt = CacheIO(gm, "kv_quant")
    after = rebuilt.kv_bytes()
    return PassResult(gm, modified=True, stats={
        "dtype": cfg.dtype,
        "quantized_slots": targets,
        "kept_slots": [k for k in io.past if k not in targets],
        # bytes per token (per batch row) of the slots that grow with the past, from the graph's cache inputs
        "kv_bytes_per_token": {"before": before, "after": after, "ratio": round(after / before, 4) if before else None},
        "cache_slots": list(rebuilt.past),
    })
