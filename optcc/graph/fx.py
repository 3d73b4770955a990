"""Small fx helpers every stage shares: where a node came from (module path and classes),
the object behind a get_attr, node order, and what counts as a norm."""
from __future__ import annotations

import torch
import torch.fx as fx

from optcc.compat import OP_TYPES

aten = torch.ops.aten
NORM_OPS = {aten.layer_norm.default, aten.rms_norm.default}


def module_path(node: fx.Node) -> str:
    """The innermost module the node was traced in ("" for graph inputs and outputs)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def module_paths(node: fx.Node) -> list[str]:
    """Every module on the node's stack, outermost first."""
    return [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]


def module_classes(node: fx.Node) -> list[str]:
    """The class names of the modules on the node's stack, outermost first."""
    out = []
    for v in (node.meta.get("nn_module_stack") or {}).values():
        cls = v[1]
        out.append(cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls)))
    return out


def attr_at(gm: torch.nn.Module, target: str):
    """The object at a dotted get_attr target (a parameter, buffer or module), None if there is none."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def node_order(g: fx.Graph) -> dict[fx.Node, int]:
    """Each node's position in the graph (a snapshot: rebuild it after inserting nodes)."""
    return {n: i for i, n in enumerate(g.nodes)}


def is_norm(n: fx.Node) -> bool:
    """A norm's output: a layer_norm / rms_norm op, or the last op of a norm written out in
    elementwise ATen (HF's RMSNorm ends in `weight * normalized`). The written-out form has no
    op of its own, so the one signal left is its module: a class whose name contains "norm".
    This is the only place the analysis reads a class name."""
    if n.target in NORM_OPS:
        return True
    classes = module_classes(n)
    return bool(classes) and "norm" in classes[-1].lower()


_SYMBOLIC_MODULES = ("_operator", "operator", "math", "builtins")  # arithmetic on symbolic sizes


def foreign_ops(g: fx.Graph) -> list[fx.Node]:
    """call_function nodes whose target is neither a torch op (ATen, torch.library, higher-order)
    nor Python arithmetic on symbolic sizes (operator.*, math.*, torch.sym_*, torch._check*).
    A Python function as a target runs in the graph but breaks the pass contract: it is not an
    op that export, serialization or another runtime can name."""
    out = []
    for n in g.nodes:
        if n.op != "call_function" or isinstance(n.target, OP_TYPES):
            continue
        module, name = getattr(n.target, "__module__", None), getattr(n.target, "__name__", "")
        if module in _SYMBOLIC_MODULES or (module == "torch" and name.startswith(("sym_", "_check"))):
            continue
        out.append(n)
    return out
