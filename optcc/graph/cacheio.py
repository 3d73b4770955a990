"""The explicit KV cache of a captured decoder graph, for passes that remove or re-route
cache slots (kv_share, layer_skip). Graph surgery only; see optcc/intake/decoder.py for the layout:
inputs are the plain inputs then past_<kind>_<layer>; outputs mirror them (logits, then one
present per past, in the same order)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.fx as fx

from optcc.compat import set_flat_signature
from optcc.errors import PassError
from optcc.graph.stats import is_impure_at_inference

aten = torch.ops.aten


class CacheIO:
    """Past placeholders by slot name (key_3, value_3, ...) and the matching present leaves."""

    def __init__(self, gm: fx.GraphModule, who: str) -> None:
        self.gm, self.who = gm, who
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        leaves = list(self.output.args[0])
        places = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.plain = [n for n in places if not n.name.startswith("past_")]
        pasts = [n for n in places if n.name.startswith("past_")]
        if not pasts or len(leaves) != 1 + len(pasts):
            raise PassError(f"{who} needs a decoder graph whose cache outputs mirror its cache inputs "
                            f"(found {len(pasts)} cache inputs and {len(leaves)} outputs)",
                            "use task text-generation, which captures the explicit-cache form (docs/generation.md)")
        self.head = leaves[0]
        self.past = {n.name[len("past_"):]: n for n in pasts}
        self.present = {name: leaf for name, leaf in zip(self.past, leaves[1:])}

    def rebuild(self, slots: list[tuple[fx.Node, fx.Node]]) -> None:
        """Make (past placeholder, present node) pairs the graph's whole cache, in this order;
        placeholders no longer listed are removed (after their last uses went away)."""
        g = self.gm.graph
        keep = [p for p, _ in slots]
        self.output.args = ((self.head, *[leaf for _, leaf in slots]),)
        g.eliminate_dead_code(is_impure_node=is_impure_at_inference)
        for n in self.past.values():
            if n not in keep:
                if n.users:
                    raise PassError(f"{n.name} is still read by {next(iter(n.users)).name} after {self.who}",
                                    f"this is a bug in {self.who}; run with --debug")
                g.erase_node(n)
        prev = self.plain[-1]
        for p in keep:  # placeholders come first, in signature order
            prev.append(p)
            prev = p
        set_flat_signature(self.gm)

    def drop(self, names: set[str]) -> None:
        """Remove these slots (e.g. key_3, value_3) from the cache; shape reads of a removed
        past (batch, past length) read a kept one instead."""
        kept = [k for k in self.past if k not in names]
        if not kept:
            raise PassError(f"{self.who} would remove every cache slot", "keep at least one attention layer")
        for k in names:
            retarget_sizes(self.past[k], self.past[kept[0]])
        self.rebuild([(self.past[k], self.present[k]) for k in kept])

    def kv_bytes(self, retain: float = 0.0) -> float:
        """Cache bytes per token and batch row, from the graph's cache inputs (retained slots: expected share)."""
        total = 0.0
        for n in self.past.values():
            v = n.meta["val"]
            b = int(v.shape[1]) * int(v.shape[3]) * v.element_size()
            total += b * retain if n.meta.get("cache_length", "past") != "past" else b
        return total


def fake_like(val: torch.Tensor, shape: tuple, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Placeholder metadata for a new cache tensor, in the fake mode of an existing one."""
    mode = getattr(val, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        return torch.empty(shape, dtype=dtype or val.dtype)


def retarget_sizes(node: fx.Node, to: fx.Node) -> None:
    """Shape reads of a removed cache input (batch, past length) read a kept one instead."""
    for u in list(node.users):
        if u.target == aten.sym_size.int and u.args[1] in (0, 2):
            u.replace_input_with(node, to)
