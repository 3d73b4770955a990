"""Linear layers grouped by the activation they read, for scales that must be folded somewhere free.

SmoothQuant and AWQ scale a linear's input channels by 1/s and its weight by s; the 1/s
goes into the norm that produces the input, which is only exact when that norm feeds
nothing but the linears being scaled. `groups` finds, for each set of target linears
reading one activation (looking through views, clones, eval-mode dropout and token
slicing), that norm's weight and bias, or says why there is none. Graph analysis only:
the quantize pass (passes/quantize.py) owns what is done with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from optcc.errors import PassError
from optcc.graph.fx import attr_at, is_norm, module_path
from optcc.graph.structure import Linear

aten = torch.ops.aten
# Ops that hand the same values on unchanged (as long as the last dim is kept).
_PASS_THROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
                 aten.alias.default, aten.contiguous.default}


def set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Point `target` at a new tensor; the old one (maybe shared with the user's model) is left untouched."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def add_buffer(gm: fx.GraphModule, base: str, t: torch.Tensor) -> str:
    """Register `t` on the graph module as `base` (or base_1, base_2, ... when taken) -> the get_attr target."""
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    gm.register_buffer(name, t)
    return name


def linear_parts(node: fx.Node) -> tuple[fx.Node, Optional[fx.Node]]:
    """(input x, bias) of a linear (aten.linear) or GPT-2 Conv1D (aten.addmm) node."""
    if node.target == aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            raise PassError(f"{module_path(node)}: addmm with beta/alpha != 1 is not a linear layer", "exclude it")
        return node.args[1], node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], bias


def _pass_through(n: fx.Node, width: int) -> bool:
    """Does `n` hand each channel of its input on unchanged (so a per-channel scale commutes)?"""
    if n.op != "call_function":
        return False
    val, src = n.meta.get("val"), n.args[0].meta.get("val") if n.args and isinstance(n.args[0], fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.shape[-1] != width:
        return False
    if n.target in (aten.slice.Tensor, aten.select.int):  # token slicing, e.g. the last position or CLS
        dim = n.args[1] if len(n.args) > 1 else 0
        return isinstance(src, torch.Tensor) and dim % src.dim() != src.dim() - 1
    if n.target == aten.dropout.default:
        return not (n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True))
    return n.target in _PASS_THROUGH


def _source(x: fx.Node, width: int) -> fx.Node:
    while _pass_through(x, width) and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    return x


def _norm_params(gm: fx.GraphModule, n: fx.Node, width: int) -> tuple[Optional[fx.Node], Optional[fx.Node], str]:
    """(weight, bias) get_attr nodes of a norm whose output is `n`, or (None, None, why not)."""
    if n.op != "call_function":
        return None, None, "input is not computed by a norm"
    if n.target == aten.layer_norm.default:
        w, b = (n.args[2] if len(n.args) > 2 else None), (n.args[3] if len(n.args) > 3 else None)
    elif n.target == aten.rms_norm.default:
        w, b = (n.args[2] if len(n.args) > 2 else None), None
    elif n.target == aten.mul.Tensor and is_norm(n):
        # RMSNorm written out (HF Llama): weight * normalized
        w = next((a for a in n.args if isinstance(a, fx.Node) and a.op == "get_attr"
                  and tuple(attr_at(gm, a.target).shape) == (width,)), None)
        b = None
    else:
        return None, None, "input is not computed by a norm"
    for p in (w, b):
        if p is not None and (not isinstance(p, fx.Node) or p.op != "get_attr" or len(p.users) != 1):
            return None, None, f"norm {module_path(n)} has a weight shared with other nodes"
    if w is None:
        return None, None, f"norm {module_path(n)} has no weight to fold into"
    return w, b, ""


def _consumers(src: fx.Node, width: int) -> set[fx.Node]:
    """Every node that reads `src` once pass-through ops are looked through."""
    out, todo = set(), list(src.users)
    while todo:
        u = todo.pop()
        if _pass_through(u, width):
            todo.extend(u.users)
        else:
            out.add(u)
    return out


@dataclass
class Group:
    """Target linears that read the same activation, and where scales can be folded."""

    source: fx.Node
    members: list[tuple[Linear, fx.Node]]
    norm_weight: Optional[fx.Node] = None
    norm_bias: Optional[fx.Node] = None
    why_not: str = ""

    @property
    def foldable(self) -> bool:
        return self.norm_weight is not None


def groups(gm: fx.GraphModule, targets: list[Linear]) -> list[Group]:
    """The target linears grouped by the activation they read, each group with its foldable norm (or why not)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    by_src: dict[fx.Node, Group] = {}
    for li in targets:
        node = nodes[li.node]
        src = _source(linear_parts(node)[0], li.in_features)
        by_src.setdefault(src, Group(src, [])).members.append((li, node))
    for g in by_src.values():
        width = g.members[0][0].in_features
        w, b, why = _norm_params(gm, g.source, width)
        if w is not None:
            others = _consumers(g.source, width) - {n for _, n in g.members}
            if others:
                why = (f"norm {module_path(g.source)} also feeds "
                       + ", ".join(sorted(module_path(o) or o.name for o in others)[:3]))
                w = b = None
        g.norm_weight, g.norm_bias, g.why_not = w, b, why
    return list(by_src.values())
