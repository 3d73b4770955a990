"""Pass manager: run the recipe's passes in order and verify each one.

After each pass: graph lint, dead-code elimination (weights of removed nodes
leave the module), a numeric check against the reference outputs, and a
PassRecord. A failure names the pass and the passes that ran before it.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.fx as fx

from optcc.pipeline import registry
from optcc.graph.capture import run_graph
from optcc.pipeline.context import PassContext
from optcc.errors import OptccError, PassError
from optcc.graph.fx import foreign_ops
from optcc.graph.snapshot import diff_lines, per_block, snapshot
from optcc.algorithms.metrics import fidelity
from optcc.config.recipe import PassStep
from optcc.config.schema import to_dict
from optcc.report.records import GraphStats, PassRecord
from optcc.graph.stats import graph_stats, prune_unused

LOSSLESS_ATOL = 1e-4


def _where(name: str, step: int, history: list[str]) -> str:
    before = f" after {', '.join(history)}" if history else " (first pass)"
    return f"pass '{name}' (step {step}{before})"


def run_passes(
    gm: fx.GraphModule,
    steps: tuple[PassStep, ...],
    ctx: PassContext,
    on_pass: Optional[Callable[[str, int, int], None]] = None,
) -> tuple[fx.GraphModule, list[PassRecord]]:
    records = []
    stats = graph_stats(gm, ctx.inputs)
    last: Optional[list[torch.Tensor]] = None  # the graph's outputs on ctx.inputs after the latest pass
    for i, step in enumerate(steps, start=1):
        spec = registry.get(step.name)
        where = _where(step.name, i, ctx.history)
        if on_pass:
            on_pass(step.name, i, len(steps))
        if spec.tasks is not None and ctx.task not in spec.tasks:
            raise PassError(f"{where}: does not apply to task '{ctx.task}'",
                            f"it works on {', '.join(spec.tasks)}; remove it from the recipe")
        config, _ = registry.resolve(step.name, step.config)  # `auto` options the caller left (api resolves them first)
        # a lossless pass must give what the graph gave before it (not the original model: an earlier pass may
        # round): the previous pass's outputs on these inputs, or the captured graph's for the first pass
        previous = (last or run_graph(gm, ctx.inputs)) if spec.lossless else None
        snap_before = snapshot(gm)
        names_before = {e["name"] for e in snap_before}
        t0 = time.perf_counter()
        try:
            result = spec.run(gm, config, ctx)
        except OptccError as e:
            raise type(e)(f"{where}: {e.message}", e.hint) from e
        except Exception as e:
            raise PassError(f"{where} crashed: {type(e).__name__}: {e}", "run with --debug and report it") from e
        seconds = time.perf_counter() - t0
        gm = result.gm
        if result.align is not None:
            ctx.aligners.append(result.align)
        foreign = [n for n in foreign_ops(gm.graph) if n.name not in names_before]
        if foreign:
            n = foreign[0]
            raise PassError(f"{where} put {getattr(n.target, '__qualname__', n.target)} (node {n.name}) into the graph, "
                            "which is not a torch op", "passes insert ATen ops or ops registered with torch.library "
                            "(see optcc/ops); this is a bug in the pass")
        try:
            gm.graph.lint()
            prune_unused(gm)
            ctx.follow_cache(gm)  # decoders: a pass may have changed the cache layout
        except Exception as e:
            raise PassError(f"{where} left an invalid graph: {e}", "this is a bug in the pass; run with --debug") from e
        try:
            outputs = run_graph(gm, ctx.inputs)
        except Exception as e:
            raise PassError(f"{where} produced a graph that does not run: {type(e).__name__}: {str(e)[:300]}",
                            "this is a bug in the pass; run with --debug") from e
        fid = _check_outputs(outputs, ctx, where, previous)
        last = outputs
        snap_after = snapshot(gm)
        names_after = {e["name"] for e in snap_after}
        after = graph_stats(gm, ctx.inputs)
        timing = (ctx.time_graphs({"captured": ctx.captured_run, "graph": lambda: gm(**ctx.inputs)})
                  if ctx.time_graphs and ctx.captured_run else None)
        records.append(PassRecord(
            name=step.name, step=i, config=to_dict(config), modified=bool(result.modified),
            nodes_added=len(names_after - names_before), nodes_removed=len(names_before - names_after),
            before=GraphStats(**stats), after=GraphStats(**after), fidelity=fid, seconds=round(seconds, 4),
            stats=result.stats, task_metric=ctx.evaluate(gm) if ctx.evaluate else None,
            latency_ms=timing and timing["graph"],
            # p50 of the captured graph over p50 of this one, timed interleaved in the same run
            speedup_vs_captured=timing and timing["captured"] / timing["graph"],
            blocks=per_block(snap_before, snap_after),
            graph_diff=diff_lines(snap_before, snap_after),  # written to out/graphs/ by apply
        ))
        stats = after
        ctx.history.append(step.name)
    return gm, records


def _check_outputs(outputs: list[torch.Tensor], ctx: PassContext, where: str, previous: Optional[list[torch.Tensor]]) -> dict:
    """Shapes and fidelity against the original model; for a lossless pass (`previous`: the graph's
    outputs before it), equality with the graph it was given."""
    ref = ctx.reference
    if len(outputs) != len(ref):
        raise PassError(f"{where} changed the number of outputs from {len(ref)} to {len(outputs)}",
                        "passes must keep the model's output signature")
    for k, (r, o) in enumerate(zip(ref, outputs)):
        if r.shape != o.shape:
            raise PassError(f"{where} changed output {k}'s shape from {tuple(r.shape)} to {tuple(o.shape)}",
                            "passes must keep the model's output shapes")
    fid = fidelity(ref[ctx.primary], outputs[ctx.primary], logits=ctx.task in ("image-classification", "text-classification", "text-generation"))
    if not fid["finite"]:
        raise PassError(f"{where} produced NaN or infinite outputs", "check the pass parameters; run with --debug")
    if previous is not None:
        worst = max(float((r.float() - o.float()).abs().max()) if r.numel() else 0.0 for r, o in zip(previous, outputs))
        scale = max(float(r.float().abs().max()) if r.numel() else 0.0 for r in previous)
        if worst > LOSSLESS_ATOL * max(1.0, scale):
            raise PassError(f"{where} is declared lossless but changed the outputs (max abs error {worst:.3g})",
                            "this is a bug in the pass; run with --debug")
    return fid
