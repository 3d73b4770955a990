"""fuse_linears: linear layers that read the same activation become one wider linear.

Attention's q/k/v projections all read the normed residual stream, and a gated MLP's gate and
up projections both read the second norm's output. Run as three (or two) GEMMs, each reads the
activation again and each is a separate kernel call; at decode, where a step is one token and
every kernel call's fixed cost shows, onnxruntime-genai's builder merges q/k/v into one
MatMulNBits for that reason. This pass finds, from the graph alone, every group of `aten.linear`
nodes with the same input node, stacks their weights (and biases) along the output features,
runs one linear, and hands each former layer its slice of the output (`split_with_sizes` on the
last dim). Exact: each output feature is the same dot product as before. Quantization after it
is exact too: int8 scales are per output feature and int4 groups run along the input features,
so each row quantizes as it did in its own layer.

Not merged, with the reason listed: a linear whose weight is read elsewhere too (tied to an
embedding), weights of different dtypes, a bias that is computed rather than stored, and GPT-2's
Conv1D (addmm), which already holds q/k/v in one layer. The merged layer's module path joins
the leaves, e.g. `model.layers.0.self_attn.q_proj+k_proj+v_proj`: `quantize.exclude` patterns
see that path (`re:.*q_proj.*` still matches it).

Passes that need the separate projections (layer_skip, token_merge, kv_share) come before
it; quantize comes after. Docs: docs/passes.md#fuse_linears.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from optcc.errors import PassError
from optcc.graph.fx import attr_at, module_path
from optcc.graph.lineargroups import add_buffer, linear_parts
from optcc.pipeline.context import PassContext
from optcc.pipeline.registry import PassResult, register

aten = torch.ops.aten


@dataclass(frozen=True)
class Config:
    pass


def merged_path(paths: list[str]) -> str:
    """One name for the merged layer: the common parent module plus the leaves joined by '+'."""
    parents = {p.rpartition(".")[0] for p in paths}
    if len(parents) == 1:
        parent = parents.pop()
        return (parent + "." if parent else "") + "+".join(p.rpartition(".")[2] for p in paths)
    return "+".join(paths)


def _why_not(gm: fx.GraphModule, node: fx.Node) -> str:
    """'' if the linear can join a merge, else why not."""
    if node.target != aten.linear.default:
        return "not an aten.linear (GPT-2's Conv1D already holds q/k/v in one layer)"
    w = node.args[1]
    bias = linear_parts(node)[1]
    if not isinstance(w, fx.Node) or w.op != "get_attr" or not isinstance(attr_at(gm, w.target), torch.Tensor):
        return "its weight is not a stored tensor"
    t = attr_at(gm, w.target)
    if len(w.users) > 1 or sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n is not w
                               and isinstance(o := attr_at(gm, n.target), torch.Tensor) and o.data_ptr() == t.data_ptr()):
        return "its weight is read elsewhere too (tied, or the layer runs more than once)"
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
        return "its bias is computed, not stored"
    return ""


def _stack(gm: fx.GraphModule, members: list[fx.Node]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The members' weights (and biases, zeros where one has none) stacked along the output features."""
    ws = [attr_at(gm, m.args[1].target) for m in members]
    biases = [linear_parts(m)[1] for m in members]
    w = torch.cat([x.detach() for x in ws], 0)
    if all(b is None for b in biases):
        return w, None
    b = torch.cat([attr_at(gm, b.target).detach() if b is not None else torch.zeros(x.shape[0], dtype=x.dtype)
                   for b, x in zip(biases, ws)])
    return w, b


def _register(gm: fx.GraphModule, path: str, suffix: str, t: torch.Tensor) -> str:
    return add_buffer(gm, "fused_" + re.sub(r"\W", "_", path) + "_" + suffix, t)


def _merge(gm: fx.GraphModule, x: fx.Node, members: list[fx.Node]) -> dict:
    paths = [module_path(m) or m.name for m in members]
    path = merged_path(paths)
    w, b = _stack(gm, members)
    sizes = [int(attr_at(gm, m.args[1].target).shape[0]) for m in members]
    first = members[0]
    stack = dict(first.meta.get("nn_module_stack") or {})
    if stack:  # the merged layer sits where the first one sat, under its own path
        last_key = list(stack)[-1]
        stack[last_key] = (path, stack[last_key][1])
    with gm.graph.inserting_before(first):
        w_node = gm.graph.get_attr(_register(gm, path, "weight", w))
        b_node = gm.graph.get_attr(_register(gm, path, "bias", b)) if b is not None else None
        y = gm.graph.call_function(aten.linear.default, (x, w_node, b_node) if b_node is not None else (x, w_node))
        parts = gm.graph.call_function(aten.split_with_sizes.default, (y, sizes, -1))
        outs = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    for n in (y, parts, *outs):
        n.meta["nn_module_stack"] = stack
    xv = x.meta.get("val")
    if isinstance(xv, torch.Tensor):  # shapes for later passes (symbolic batch kept), strides as split makes them
        y.meta["val"] = xv.new_empty((*xv.shape[:-1], sum(sizes)), dtype=w.dtype)
        parts.meta["val"] = list(aten.split_with_sizes.default(y.meta["val"], sizes, -1))
        for i, out in enumerate(outs):
            out.meta["val"] = parts.meta["val"][i]
    for m, out in zip(members, outs):
        m.replace_all_uses_with(out)
        gm.graph.erase_node(m)
    return {"layer": path, "from": paths, "out_features": sizes}


@register("fuse_linears", Config, lossless=True, after=("layer_skip", "token_merge", "kv_share"),
          summary="linear layers reading the same activation run as one wider linear (q/k/v, gate/up)")
def run(gm: fx.GraphModule, cfg: Config, ctx: PassContext) -> PassResult:
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.linear.default, aten.addmm.default):
            by_input.setdefault(linear_parts(node)[0], []).append(node)
    merged, left = [], []
    for x, readers in by_input.items():
        if len(readers) < 2:
            continue
        ok = []
        for n in readers:
            why = _why_not(gm, n)
            if why:
                left.append({"linear": module_path(n) or n.name, "why": why})
            else:
                ok.append(n)
        dtypes = {attr_at(gm, n.args[1].target).dtype for n in ok}
        if len(dtypes) > 1:
            left += [{"linear": module_path(n) or n.name, "why": "the linears reading this input have different weight dtypes"}
                     for n in ok]
            continue
        if len(ok) >= 2:
            merged.append(_merge(gm, x, ok))
    if not merged:
        why = "; ".join(sorted({x["why"] for x in left})) or "no two linear layers read the same activation"
        raise PassError(f"fuse_linears found nothing to merge ({why})",
                        "it merges linears that share an input (separate q/k/v or gate/up projections); drop the pass for this model")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, modified=True, stats={
        "merged": merged, "left": left,
        "linears_merged": sum(len(m["from"]) for m in merged), "linears_now": len(merged),
        "notes": [f"{len(left)} linear(s) sharing an input left as they are: see left"] if left else []})
