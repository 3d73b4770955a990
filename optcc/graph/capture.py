"""Capture: nn.Module + example inputs → torch.export ExportedProgram → editable fx.GraphModule.

Also owns how outputs are flattened so the reference, the graph and each
artifact are compared leaf by leaf.
"""
from __future__ import annotations

from typing import Any

import torch


from optcc.compat import tree_leaves
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
        for attempt in range(2):
            try:
                with torch.no_grad():
                    return torch.export.export(module, (), dict(inputs), dynamic_shapes=dyn, strict=False)
            except Exception as e:  # export raises many types; report the first line
                errors.append(e)
                dyn = _bounded(dyn, e) if attempt == 0 else None
                if dyn is None:
                    break
    e = errors[-1]
    raise ExportError(f"torch.export could not capture the model: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                      "the model must be traceable by torch.export (no data-dependent Python control flow); see docs/models.md") from e


def _bounded(shapes: dict | None, error: Exception) -> dict | None:
    """The same dynamic shapes with the upper bounds export found the model needs, or None.
    A model can bound a dimension itself: Mistral's sliding-window mask takes another branch
    once the cache outgrows the window, so export asks for `past = Dim('past', max=4092)`.
    The graph then holds caches up to that length (the artifact's range_constraints say so)."""
    import re

    bounds = {name: int(hi) for _, name, hi in re.findall(r"(\w+) = Dim\('(\w+)', max=(\d+)\)", str(error))}
    if not shapes or not bounds:
        return None

    def fix(d):
        if isinstance(d, dict):
            return {k: fix(v) for k, v in d.items()}
        name = getattr(d, "__name__", None)
        if name in bounds:
            return torch.export.Dim(name, min=getattr(d, "min", 0), max=bounds[name])
        return d

    return {k: fix(v) for k, v in shapes.items()}


def load_exported(path) -> torch.export.ExportedProgram:
    """torch.export.load, raising ValueError with torch's real reason in one line. torch logs
    the reason with a traceback and then raises a vague error: keep the reason, keep the
    traceback off the terminal."""
    import logging

    log, seen = logging.getLogger("torch.export"), []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(str(r.exc_info[1]) if r.exc_info else r.getMessage())
    handlers, propagate = log.handlers[:], log.propagate
    log.handlers, log.propagate = [handler], False
    try:
        return torch.export.load(str(path))
    except Exception as e:  # torch raises several types here; the logged reason is what matters
        raise ValueError((seen[0] if seen else str(e)).split("  (Could this")[0].splitlines()[0][:200]) from e
    finally:
        log.handlers, log.propagate = handlers, propagate


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """Tensor leaves of a model output (tensor, tuple, dict or HF ModelOutput), in order."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]


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
