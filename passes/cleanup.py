"""cleanup: remove graph nodes that do nothing at inference time.

Eval-mode dropout, same-dtype/same-device `to` copies, tensor-metadata asserts,
aliases and contiguous clones are replaced by their input; dead code goes.
Lossless: the manager checks the outputs are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from optcc.pipeline.context import PassContext
from optcc.pipeline.registry import PassResult, register
from optcc.config.schema import field

aten = torch.ops.aten


@dataclass(frozen=True)
class Config:
    dropout: bool = field(True, help="remove eval-mode (train=False) dropout")
    casts: bool = field(True, help="remove `to` calls that keep dtype and device")
    asserts: bool = field(True, help="remove tensor metadata asserts left by export")


def _is_identity(node: fx.Node, cfg: Config) -> bool:
    t = node.target
    if cfg.dropout and t == aten.dropout.default:
        return node.args[2] is False if len(node.args) > 2 else not node.kwargs.get("train", True)
    if t in (aten.alias.default,):
        return True
    if cfg.casts and t in (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.contiguous.default):
        src, dst = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None, node.meta.get("val")
        if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
            return False
        return src.dtype == dst.dtype and src.device == dst.device and src.shape == dst.shape and _same_strides(src, dst)
    return False


def _same_strides(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """A clone or contiguous() of a transposed tensor changes its memory layout, and a later
    view may need that (DeBERTa-v2 and SigLIP do): only a copy with the same strides is a no-op."""
    return all(statically_known_true(a == b) for a, b in zip(src.stride(), dst.stride()))


@register("cleanup", Config, summary="remove inference no-ops (eval dropout, identity casts, export asserts)", lossless=True)
def run(gm: fx.GraphModule, cfg: Config, ctx: PassContext) -> PassResult:
    removed: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if cfg.asserts and node.target == aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)
            removed["assert"] = removed.get("assert", 0) + 1
        elif _is_identity(node, cfg) and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            key = str(node.target).split(".")[1] if "." in str(node.target) else str(node.target)
            removed[key] = removed.get(key, 0) + 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, modified=bool(removed), stats={"removed_by_op": removed})
