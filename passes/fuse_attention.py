"""fuse_attention: grouped-query attention as one op that reads the KV heads as they are.

A GQA/MQA model stores `kv_heads` heads of K and V and repeats each one for the query heads
that share it before attention (Hugging Face's repeat_kv: unsqueeze, expand, reshape). At decode
that repeat copies the whole cache, every layer, every token: in onnxruntime it was the largest
share of a step after the linears (Expand + Transpose, docs/generation.md). This pass finds each
`scaled_dot_product_attention` whose key and value are such a repeat, proves it from the shapes
(the expanded axis is a new one, inserted right after the head axis, of size heads / kv_heads,
and the reshape merges it back into the head axis), and calls attention on the unrepeated K and
V with `enable_gqa=True` instead: exact (the same products), and every backend gets one fused
attention over the cache it already holds:
- ONNX at emit.opset 23: one `Attention` op on 4-D inputs, which reads the query and KV head
  counts from their shapes (at lower opsets the exporter writes attention out as MatMul/Softmax
  and repeats the KV heads itself: the gain there is the torch side's);
- torch: SDPA's grouped-query path (eager and the compiled package).

The mask, scale, causal flag and dropout of each attention are kept as they were, so the
pass needs no proof of what the mask is. Attention whose K/V are not such a repeat (multi-head
attention, another layout) is left as it is and listed with the reason.
Docs: docs/generation.md#fused-attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from optcc.errors import PassError
from optcc.graph.fx import module_path
from optcc.pipeline.context import PassContext
from optcc.pipeline.registry import PassResult, register

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
ONNX_OPSET = 23  # the first opset with a fused Attention op (GQA heads, mask, scale)
_VIEWS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


@dataclass(frozen=True)
class Config:
    pass


def _val(n) -> Optional[torch.Tensor]:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same(a, b) -> bool:
    return statically_known_true(a == b)


def _skip_full_slices(n: fx.Node) -> fx.Node:
    """Past slice(x, dim, start, end, step) nodes that keep all of x (export leaves them around repeat_kv)."""
    while n.op == "call_function" and n.target == aten.slice.Tensor:
        start = n.args[2] if len(n.args) > 2 else 0
        step = n.args[4] if len(n.args) > 4 else 1
        sv, nv = _val(n.args[0]), _val(n)
        if start not in (0, None) or step != 1 or sv is None or nv is None or sv.dim() != nv.dim() or \
                not all(_same(a, b) for a, b in zip(sv.shape, nv.shape)):
            break
        n = n.args[0]
    return n


def unrepeated(n: fx.Node, heads: int) -> tuple[Optional[fx.Node], str]:
    """The [B, kv_heads, T, D] tensor that `n` ([B, heads, T, D]) repeats per query-head group, or
    (None, why not). The repeat is reshape(expand(unsqueeze(x, 2), [B, kv, g, T, D]), [B, kv·g, T, D])
    with full slices anywhere between."""
    if n.op != "call_function" or n.target not in _VIEWS:
        return None, "key/value is not a reshape of repeated heads"
    ex = _skip_full_slices(n.args[0])
    if ex.op != "call_function" or ex.target != aten.expand.default:
        return None, "key/value is not an expand of the KV heads"
    un = _skip_full_slices(ex.args[0])
    if un.op != "call_function" or un.target != aten.unsqueeze.default or un.args[1] != 2:
        return None, "the repeated axis is not a new axis after the heads"
    x = _skip_full_slices(un.args[0])
    xv, ev, nv = _val(x), _val(ex), _val(n)
    if xv is None or ev is None or nv is None or xv.dim() != 4 or ev.dim() != 5 or nv.dim() != 4:
        return None, "shapes unknown"
    b, kv, t, d = xv.shape
    if not (isinstance(kv, int) and heads % kv == 0):
        return None, f"{heads} query heads are not a multiple of {kv} KV heads"
    g = heads // kv
    want5, want4 = (b, kv, g, t, d), (b, heads, t, d)
    if not all(_same(a, w) for a, w in zip(ev.shape, want5)) or not all(_same(a, w) for a, w in zip(nv.shape, want4)):
        return None, "the expand/reshape does not repeat each KV head for its group of query heads"
    return x, ""


@register("fuse_attention", Config, lossless=True,
          summary="grouped-query attention on the KV heads as stored (no repeat of the cache): ONNX Attention at opset 23")
def run(gm: fx.GraphModule, cfg: Config, ctx: PassContext) -> PassResult:
    fused, left = [], []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != SDPA:
            continue
        where = module_path(node) or node.name
        if node.kwargs.get("enable_gqa"):
            left.append({"attention": where, "why": "already grouped-query attention"})
            continue
        q = _val(node.args[0])
        heads = q.shape[1] if q is not None and q.dim() == 4 and isinstance(q.shape[1], int) else None
        if heads is None:
            left.append({"attention": where, "why": "query heads unknown"})
            continue
        (k, why_k), (v, why_v) = unrepeated(node.args[1], heads), unrepeated(node.args[2], heads)
        if k is None or v is None or _val(k).shape[1] != _val(v).shape[1]:
            left.append({"attention": where, "why": why_k or why_v or "key and value have different KV heads"})
            continue
        node.args = (node.args[0], k, v, *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        fused.append({"attention": where, "heads": heads, "kv_heads": int(_val(k).shape[1])})
    if not fused:
        why = "; ".join(sorted({x["why"] for x in left})) or "the graph has no scaled_dot_product_attention"
        raise PassError(f"fuse_attention found no grouped-query attention to fuse ({why})",
                        "it fuses attention whose K/V repeat KV heads for query-head groups (GQA/MQA, e.g. Llama, Qwen2); "
                        "drop the pass for this model")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    notes = [f"{len(left)} attention left as is: see left"] if left else []
    notes.append(f"ONNX: one Attention op per layer at emit.opset {ONNX_OPSET} (at lower opsets the exporter "
                 "writes attention out as MatMul/Softmax and repeats the heads itself)")
    return PassResult(gm, modified=True, stats={"fused": fused, "left": left, "notes": notes})
