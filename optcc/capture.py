"""Capture: nn.Module + example inputs → torch.export ExportedProgram → editable fx.GraphModule.

Also owns how outputs are flattened so the reference, the graph and each
artifact are compared leaf by leaf.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from optcc.errors import ExportError

_SEQ_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def dynamic_shapes(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, Any]]:
    """Batch is dynamic for every input; sequence length too for token inputs.
    Dim.AUTO lets export keep a dimension static where the model needs it."""
    auto = torch.export.Dim.AUTO
    out = {}
    for name, t in inputs.items():
        dims = {0: auto} if t.dim() >= 1 else {}
        if name in _SEQ_INPUTS and t.dim() >= 2:
            dims[1] = auto
        out[name] = dims
    return out


def capture(module: torch.nn.Module, inputs: dict[str, torch.Tensor], dynamic: bool = True,
            shapes: dict | None = None) -> torch.export.ExportedProgram:
    """torch.export (non-strict) of `module(**inputs)`; falls back to static shapes if
    dynamic export fails. `shapes` overrides the default dynamic dimensions."""
    errors = []
    for dyn in ([shapes or dynamic_shapes(inputs)] if dynamic else []) + [None]:
        try:
            with torch.no_grad():
                return torch.export.export(module, (), dict(inputs), dynamic_shapes=dyn, strict=False)
        except Exception as e:  # export raises many types; report the first line
            errors.append(e)
    e = errors[-1]
    raise ExportError(f"torch.export could not capture the model: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                      "the model must be traceable by torch.export (no data-dependent Python control flow); see docs/models.md") from e


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """Tensor leaves of a model output (tensor, tuple, dict or HF ModelOutput), in order."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def output_names(out: Any) -> list[str]:
    if hasattr(out, "keys") and hasattr(out, "to_tuple"):
        return [k for k, v in out.items() if isinstance(v, torch.Tensor)]
    return [f"output_{i}" for i in range(len(flat_outputs(out)))]


def primary_index(out: Any) -> int:
    """Which output leaf fidelity is measured on: logits, else last_hidden_state, else the first."""
    names = output_names(out)
    for key in ("logits", "last_hidden_state"):
        if key in names:
            return names.index(key)
    return 0


def run_graph(gm: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return flat_outputs(gm(**inputs))


def graph_snapshot(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copy of gm's graph and gm's own weights (shared, not copied):
    what a graph looked like before a pass edits it in place, e.g. to time against."""
    import copy
    import warnings

    with warnings.catch_warnings():  # deep-copying the graph's pytree specs warns about torch's own deprecations
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    return torch.fx.GraphModule(gm, graph)
