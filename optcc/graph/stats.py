"""Graph statistics for PassRecords: nodes, parameters, bytes and FLOPs."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from optcc.graph.probe import placeholder_args
from optcc.graph.fx import attr_at


def used_attrs(gm: fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "get_attr"}


def param_stats(gm: fx.GraphModule) -> tuple[int, int]:
    """(parameter+buffer elements, bytes) of the tensors the graph actually reads."""
    seen: set[int] = set()
    count = nbytes = 0
    for target in used_attrs(gm):
        obj = attr_at(gm, target)
        if isinstance(obj, torch.Tensor) and id(obj) not in seen:
            seen.add(id(obj))
            count += obj.numel()
            nbytes += obj.numel() * obj.element_size()
    return count, nbytes


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """q·kᵀ and p·v: 2·B·H·Tq·Tk·D each (torch's counter has no formula for the CPU kernel)."""
    b, h, tq, d = query_shape
    tk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * tq * tk * d + 2 * b * h * tq * tk * dv


_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def flops(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one call, counted from the ATen ops that actually run."""
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    with torch.no_grad(), counter:
        module(**inputs)
    return int(counter.get_total_flops())


class _PerNode(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter, self.out = counter, {}

    def run_node(self, n: fx.Node):
        before = self.counter.get_total_flops()
        val = super().run_node(n)
        spent = self.counter.get_total_flops() - before
        if spent:
            self.out[n.name] = int(spent)
        return val


def flops_by_node(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """FLOPs of one call per graph node (nodes that spend none are left out)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    runner = _PerNode(gm, counter)
    with torch.no_grad(), counter:
        runner.run(*placeholder_args(gm, inputs))
    return runner.out


def graph_stats(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> dict:
    params, nbytes = param_stats(gm)
    return {
        "nodes": sum(1 for n in gm.graph.nodes if n.op == "call_function"),
        "params": params,
        "param_bytes": nbytes,
        "flops": flops(gm, inputs),
    }


# At inference these have no effect worth keeping a dead value alive for: torch counts
# sdpa and dropout as random ops, and export's metadata asserts pin their inputs.
_PURE_AT_INFERENCE = {torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten.dropout.default,
                      torch.ops.aten._assert_tensor_metadata.default}


def is_impure_at_inference(n: fx.Node) -> bool:
    """DCE's impurity test for eval graphs (see _PURE_AT_INFERENCE)."""
    if n.op == "call_function" and n.target in _PURE_AT_INFERENCE:
        return False
    return n.is_impure(impure_random=False)


def prune_unused(gm: fx.GraphModule) -> None:
    """Dead-code elimination, then drop parameters/buffers no get_attr reads any more
    (so removed layers' weights really leave the artifact)."""
    gm.graph.eliminate_dead_code(is_impure_node=is_impure_at_inference)
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
