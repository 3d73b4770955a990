"""Read intermediate values of a captured graph on real inputs (for calibrating
passes: influence scores, activation statistics). Read-only; no surgery."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str], sink: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__(gm)
        self.names, self.sink = names, sink

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor):
            self.sink(n.name, out)
        return out


def placeholder_args(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> list:
    """Inputs ordered as the graph's placeholders (matched by name)."""
    args = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        key = n.target if n.target in inputs else n.name
        if key not in inputs:
            raise KeyError(f"graph input '{n.target}' missing from the provided inputs {sorted(inputs)}")
        args.append(inputs[key])
    return args


def record(gm: fx.GraphModule, batches: Iterable[dict[str, torch.Tensor]], names: Iterable[str],
           reduce: Optional[Callable[[str, torch.Tensor], object]] = None) -> dict[str, list]:
    """Run `gm` on each batch and collect the values of the named nodes.

    Returns {node name: [value per batch]}; with `reduce`, each value is replaced
    by reduce(name, value) as it is produced (keeps memory flat for statistics).
    """
    names = set(names)
    found: dict[str, list] = {n: [] for n in names}

    def sink(name: str, t: torch.Tensor) -> None:
        found[name].append(reduce(name, t) if reduce else t.detach().clone())

    with torch.no_grad():
        for batch in batches:
            _Recorder(gm, names, sink).run(*placeholder_args(gm, batch))
    return found
