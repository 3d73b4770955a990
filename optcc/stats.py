"""Graph statistics for PassRecords: nodes, parameters, bytes and FLOPs."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode


def used_attrs(gm: fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "get_attr"}


def param_stats(gm: fx.GraphModule) -> tuple[int, int]:
    """(parameter+buffer elements, bytes) of the tensors the graph actually reads."""
    seen: set[int] = set()
    count = nbytes = 0
    for target in used_attrs(gm):
        obj = gm
        for part in target.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.Tensor) and id(obj) not in seen:
            seen.add(id(obj))
            count += obj.numel()
            nbytes += obj.numel() * obj.element_size()
    return count, nbytes


def flops(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one call, counted from the ATen ops that actually run."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(**inputs)
    return int(counter.get_total_flops())


def graph_stats(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> dict:
    params, nbytes = param_stats(gm)
    return {
        "nodes": sum(1 for n in gm.graph.nodes if n.op == "call_function"),
        "params": params,
        "param_bytes": nbytes,
        "flops": flops(gm, inputs),
    }


def prune_unused(gm: fx.GraphModule) -> None:
    """Dead-code elimination, then drop parameters/buffers no get_attr reads any more
    (so removed layers' weights really leave the artifact)."""
    gm.graph.eliminate_dead_code()
    used = used_attrs(gm)
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
    gm.delete_all_unused_submodules()
    gm.recompile()
