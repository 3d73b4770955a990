"""Node-level snapshots and diffs of a graph, grouped by block, for PassRecords
and `optcc diff`. Pure functions over fx graphs; no surgery."""
from __future__ import annotations

import difflib
import re
from collections import Counter

import torch
import torch.fx as fx

from optcc.graph.fx import attr_at, module_path

_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")
OUTSIDE = "(outside blocks)"


def block_key(path: str) -> str:
    """The first indexed module path (e.g. model.layers.3), or OUTSIDE."""
    m = _BLOCK.match(path or "")
    return m.group(1) if m else OUTSIDE


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    return repr(a)


def _tensor_bytes(gm: fx.GraphModule, target: str) -> int:
    obj = attr_at(gm, target)
    return obj.numel() * obj.element_size() if isinstance(obj, torch.Tensor) else 0


def snapshot(gm: fx.GraphModule) -> list[dict]:
    """One entry per node: name, op text, block and (get_attr) tensor bytes, in graph order."""
    out = []
    for n in gm.graph.nodes:
        nbytes = 0
        if n.op == "call_function":
            text = f"{n.name} = {n.target}({', '.join(_arg(a) for a in n.args)})"
            path = module_path(n)
        elif n.op == "get_attr":
            text, path, nbytes = f"{n.name} = get_attr {n.target}", n.target, _tensor_bytes(gm, n.target)
        elif n.op == "call_module":
            text, path = f"{n.name} = call_module {n.target}", ""
        else:
            text, path = f"{n.op} {n.name}", ""
        out.append({"name": n.name, "text": text, "block": block_key(path), "bytes": nbytes})
    return out


def diff_lines(before: list[dict], after: list[dict]) -> list[str]:
    """Unified diff of the graphs' text forms, each line tagged with its block."""
    a = [f"{e['text']}    # {e['block']}" for e in before]
    b = [f"{e['text']}    # {e['block']}" for e in after]
    return list(difflib.unified_diff(a, b, "before", "after", lineterm="", n=1))


def per_block(before: list[dict], after: list[dict]) -> list[dict]:
    """Per block that changed: nodes removed / added (by name), rewired (same name, other
    inputs or op), and bytes of the tensors its nodes read through get_attr, before and after."""
    text_b = {e["name"]: e["text"] for e in before}
    text_a = {e["name"]: e["text"] for e in after}
    removed = Counter(e["block"] for e in before if e["name"] not in text_a)
    added = Counter(e["block"] for e in after if e["name"] not in text_b)
    rewired = Counter(e["block"] for e in after if e["name"] in text_b and text_b[e["name"]] != e["text"])
    total_b = Counter(e["block"] for e in before)
    total_a = Counter(e["block"] for e in after)
    bytes_b, bytes_a = Counter(), Counter()
    for e in before:
        bytes_b[e["block"]] += e.get("bytes", 0)
    for e in after:
        bytes_a[e["block"]] += e.get("bytes", 0)
    blocks = sorted(set(total_b) | set(total_a), key=_block_order)
    return [{"block": k, "nodes_before": total_b[k], "nodes_after": total_a[k], "removed": removed[k], "added": added[k],
             "rewired": rewired[k], "bytes_before": bytes_b[k], "bytes_after": bytes_a[k]}
            for k in blocks if removed[k] or added[k] or rewired[k]]


def _block_order(key: str):
    m = re.search(r"\.(\d+)$", key)
    return (key == OUTSIDE, key.rsplit(".", 1)[0] if m else key, int(m.group(1)) if m else 0)
