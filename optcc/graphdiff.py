"""Node-level snapshots and diffs of a graph, grouped by block, for PassRecords
and `optcc diff`. Pure functions over fx graphs; no surgery."""
from __future__ import annotations

import difflib
import re
from collections import Counter

import torch.fx as fx

from optcc.structure import module_path

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


def snapshot(gm: fx.GraphModule) -> list[dict]:
    """One entry per node: name, op text and block, in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            text = f"{n.name} = {n.target}({', '.join(_arg(a) for a in n.args)})"
            path = module_path(n)
        elif n.op == "get_attr":
            text, path = f"{n.name} = get_attr {n.target}", n.target
        elif n.op == "call_module":
            text, path = f"{n.name} = call_module {n.target}", ""
        else:
            text, path = f"{n.op} {n.name}", ""
        out.append({"name": n.name, "text": text, "block": block_key(path)})
    return out


def diff_lines(before: list[dict], after: list[dict]) -> list[str]:
    """Unified diff of the graphs' text forms, each line tagged with its block."""
    a = [f"{e['text']}    # {e['block']}" for e in before]
    b = [f"{e['text']}    # {e['block']}" for e in after]
    return list(difflib.unified_diff(a, b, "before", "after", lineterm="", n=1))


def per_block(before: list[dict], after: list[dict]) -> list[dict]:
    """Nodes removed/added per block (by node name)."""
    names_b = {e["name"] for e in before}
    names_a = {e["name"] for e in after}
    removed = Counter(e["block"] for e in before if e["name"] not in names_a)
    added = Counter(e["block"] for e in after if e["name"] not in names_b)
    total_b = Counter(e["block"] for e in before)
    total_a = Counter(e["block"] for e in after)
    blocks = sorted(set(total_b) | set(total_a), key=_block_order)
    return [{"block": k, "nodes_before": total_b[k], "nodes_after": total_a[k], "removed": removed[k], "added": added[k]}
            for k in blocks if removed[k] or added[k]]


def _block_order(key: str):
    m = re.search(r"\.(\d+)$", key)
    return (key == OUTSIDE, key.rsplit(".", 1)[0] if m else key, int(m.group(1)) if m else 0)
