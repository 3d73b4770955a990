"""What a pass gets besides the graph: inputs, the reference, structure and calibration."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from optcc.structure import Structure, analyze, mark_causal

ProgressFn = Callable[[str, int], Callable[[int], None]]


def _no_progress(desc: str, total: int) -> Callable[[int], None]:
    return lambda n=1: None


@dataclass
class PassContext:
    task: str
    inputs: dict[str, torch.Tensor]  # example inputs (what fidelity is checked on)
    reference: list[torch.Tensor]  # eager outputs of the original model on `inputs`
    primary: int  # index of the output leaf fidelity is measured on
    causal: Optional[bool] = None  # measured by probing the original model
    calibration: Callable[[], list[dict[str, torch.Tensor]]] = lambda: []  # lazily built batches
    progress: ProgressFn = _no_progress  # passes report progress through this, never print
    history: list[str] = field(default_factory=list)  # names of the passes that already ran
    evaluate: Optional[Callable[[fx.GraphModule], dict]] = None  # task metric of a graph, when data exist
    time_graph: Optional[Callable[[fx.GraphModule], float]] = None  # p50 ms of a graph, when benchmarking

    def structure(self, gm: fx.GraphModule) -> Structure:
        s = analyze(gm)
        mark_causal(s, self.causal)
        return s
