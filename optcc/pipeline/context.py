"""What a pass gets besides the graph: inputs, the reference, structure and calibration."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from optcc.intake.decoder import CacheSpec, own_inputs
from optcc.graph.structure import Structure, analyze, mark_causal

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
    # when the recipe benchmarks: time callables interleaved with the recipe's bench settings → p50 ms by name
    time_graphs: Optional[Callable[[dict[str, Callable[[], object]]], dict[str, float]]] = None
    captured_run: Optional[Callable[[], object]] = None  # the captured graph on its own inputs, timed beside each pass
    cache: Optional[CacheSpec] = None  # decoder graphs: the cache layout `inputs` and calibration batches follow
    prefix: Optional[torch.Tensor] = None  # decoder graphs: the tokens whose cache `inputs` carry [B, P]
    aligners: list[Callable] = field(default_factory=list)  # PassResult.align of the passes that ran

    def structure(self, gm: fx.GraphModule) -> Structure:
        s = analyze(gm)
        mark_causal(s, self.causal)
        return s

    def follow_cache(self, gm: fx.GraphModule) -> bool:
        """After a pass changed the decoder cache layout (kv_share removes or merges slots):
        `inputs` get the graph's own prefill of `prefix` as their past, calibration batches
        its empty cache, and the reference's cache outputs become the graph's own (logits
        stay the original model's, so fidelity still compares with the original). Raises
        ValueError when the graph's cache outputs do not mirror its cache inputs."""
        if self.cache is None:
            return False
        spec = self.cache.follow(gm)
        if spec == self.cache:
            return False
        self.inputs = own_inputs(gm, spec, self.prefix, self.inputs["input_ids"])
        with torch.no_grad():
            out = list(gm(**self.inputs))
        self.reference = [*self.reference[:1], *out[1:]]
        calibration = self.calibration
        self.calibration = lambda: [spec.fit(b) for b in calibration()]
        self.cache = spec
        return True
