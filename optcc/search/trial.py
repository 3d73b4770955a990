"""One tune worker: the model prepared and captured once, then trials one after another.

A trial is cheap first: its passes run on the graph (reusing the graph of the longest prefix
of passes it shares with an earlier trial), its fidelity and task metric are measured on the
graph, and only a trial inside the budget gets an artifact, which is re-loaded, checked and
timed while it holds this machine's timing lock (optcc.measure.machine).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch

from optcc import api
from optcc.config.gates import METRICS, check_values
from optcc.config.recipe import PassStep, Recipe, parse_recipe, resolve_auto
from optcc.config.schema import to_dict
from optcc.config.space import GRAPH_METRICS, Space, parse_space
from optcc.errors import OptccError, RecipeError
from optcc.intake.decoder import no_guard_module
from optcc.measure.latency import measure
from optcc.measure.machine import exclusive_timing, shared_work
from optcc.pipeline.manager import run_passes

PREFIXES_KEPT = 6  # graphs of pass prefixes kept in memory per worker (least recently used go first)


def steps_key(model_key: str, steps: tuple[PassStep, ...]) -> str:
    """Hash of the model (source, weights, inputs) and the passes with their resolved settings."""
    data = json.dumps([model_key, [{s.name: to_dict(s.config)} for s in steps]], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:20]


def trial_key(model_key: str, recipe: Recipe) -> str:
    """A trial's result depends on the model, its passes, and how it is emitted and timed."""
    d = recipe.to_dict()
    return steps_key(json.dumps([model_key, d["emit"], d["bench"], d["calibration"], d["evaluate"]], sort_keys=True),
                     recipe.passes)


def graph_metrics(fid: dict, task: Optional[dict], base: Optional[dict], param_bytes: tuple[int, int]) -> dict:
    """The budget metrics of a graph, read with the same code that reads report.json (config.gates)."""
    tm = None
    if task is not None and base is not None:
        tm = {"metric": base["metric"], "baseline": base["value"], "optimized": task["value"], "delta": task["delta"],
              "by_artifact": {"graph": task}}
    report = {"fidelity": fid, "task_metric": tm, "captured": {"param_bytes": param_bytes[0]},
              "passes": [{"after": {"param_bytes": param_bytes[1]}}]}
    out = {}
    for name, read in METRICS.items():
        if name.startswith(GRAPH_METRICS):
            value = read(report)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = float(value)
    return out


class Evaluator:
    """Holds one prepared model and runs trials of one space on it."""

    def __init__(self, space: Space, source: str, task: Optional[str], weights: Optional[str], cache_dir: Path,
                 prep: Optional[api.Prepared] = None) -> None:
        self.space, self.cache_dir = space, Path(cache_dir)
        recipe, _ = resolve_auto(space.recipe(space.first()))
        if recipe.bench.threads:
            torch.set_num_threads(recipe.bench.threads)
        self.prep = prep or api.prepare(source, task, weights, recipe)
        self.model_key = model_key(self.prep)
        self.guard = no_guard_module if self.prep.cache else contextlib.nullcontext
        with self.guard():
            self.evalset, self.base = api.baseline_metric(self.prep, recipe, api._noop)
            quiet = dataclasses.replace(recipe, bench=dataclasses.replace(recipe.bench, enabled=False))
            gm, self.ctx, captured = api.capture_graph(self.prep, quiet, self.evalset, self.base, api._noop)
        if self.evalset is None and any(m.startswith("task.") for m in space.require):
            metric = next(m for m in space.require if m.startswith("task."))
            raise RecipeError(f"{space.path}: require.{metric}: this model has no evaluation data to measure it on",
                              "set evaluate.source in the space, or budget on fidelity.* instead")
        self.param_bytes = captured["param_bytes"]
        self.root = {"gm": gm, "ctx": self.ctx, "records": [], "fid": None, "task": None}  # never evicted
        self.prefixes: OrderedDict[str, dict] = OrderedDict()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, job: dict) -> dict:
        """Evaluate one point of the space; a JSON-able record. Never raises for a bad point.
        `job`: {"point", "key", "recipe"}, the recipe as YAML with `auto` already resolved by the
        coordinator, so that every worker (on any machine) builds the same thing."""
        t0 = time.perf_counter()
        point = job["point"]
        record: dict[str, Any] = {"point": point, "key": job["key"], "worker": self.worker}
        try:
            recipe = parse_recipe(job["recipe"], f"{self.space.path} (trial {point})")
            with self.guard(), shared_work():
                state = self._graph(recipe.passes)
                after = state["records"][-1].after.param_bytes if state["records"] else self.param_bytes
                record["metrics"] = graph_metrics(state["fid"] or self._fidelity(state), state["task"], self.base,
                                                  (self.param_bytes, after))
            record["budget"] = check_values(record["metrics"], self.space.require)
            record["seconds"] = {"evaluate": time.perf_counter() - t0}
            if not all(q["ok"] for q in record["budget"]):
                record["status"] = "pruned"
                return record
            t1 = time.perf_counter()
            with self.guard(), shared_work():
                runner, path = self._build(state, recipe, record["key"])
            record["artifact"] = str(path)
            record["seconds"]["build"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            record["latency"] = self.time(runner, recipe, state["ctx"].inputs)
            record["seconds"]["time"] = time.perf_counter() - t2
            record["status"] = "ok"
        except OptccError as e:
            record.update(status="failed", error=e.one_line())
        except Exception as e:  # a crash in one trial must not end the search
            record.update(status="failed", error=f"{type(e).__name__}: {str(e)[:300]}")
        record["seconds"] = {**record.get("seconds", {}), "total": time.perf_counter() - t0}
        return record

    def time(self, runner, recipe: Recipe, inputs: dict[str, torch.Tensor]) -> dict:
        b = recipe.bench
        items = next(iter(self.prep.inputs.values())).shape[0]
        with exclusive_timing():
            return measure({"trial": lambda: runner(inputs)}, warmup=b.warmup, iters=b.iters,
                           min_seconds=b.min_seconds, items=items)["trial"]

    def _graph(self, steps: tuple[PassStep, ...]) -> dict:
        """The graph after `steps`, from the longest cached prefix."""
        k, state = len(steps), self.root
        while k > 0:
            key = steps_key(self.model_key, steps[:k])
            if key in self.prefixes:
                state = self.prefixes[key]
                self.prefixes.move_to_end(key)
                break
            k -= 1
        for i in range(k, len(steps)):
            ctx = dataclasses.replace(state["ctx"], inputs=dict(state["ctx"].inputs), reference=list(state["ctx"].reference),
                                      history=list(state["ctx"].history), aligners=list(state["ctx"].aligners))
            with warnings.catch_warnings():  # deepcopy of export's pytree specs warns on torch 2.13
                warnings.simplefilter("ignore", FutureWarning)
                gm = copy.deepcopy(state["gm"])
            gm, records = run_passes(gm, (steps[i],), ctx)
            rec = records[-1]
            state = {"gm": gm, "ctx": ctx, "records": [*state["records"], rec], "fid": rec.fidelity, "task": rec.task_metric}
            self.prefixes[steps_key(self.model_key, steps[: i + 1])] = state
            while len(self.prefixes) > PREFIXES_KEPT:
                self.prefixes.popitem(last=False)
        return state

    def _fidelity(self, state: dict) -> dict:
        from optcc.algorithms.metrics import fidelity
        from optcc.graph.capture import run_graph

        ctx = state["ctx"]
        out = run_graph(state["gm"], ctx.inputs)
        return fidelity(ctx.reference[ctx.primary], out[ctx.primary], logits=ctx.task != "feature-extraction")

    def _build(self, state: dict, recipe: Recipe, key: str):
        """The artifact the objective's backend runs, written once into the cache (atomically)."""
        fmt = "torch" if self.space.tune.backend == "torch" else "onnx"
        final = self.cache_dir / "artifacts" / key
        emit = dataclasses.replace(recipe, emit=dataclasses.replace(recipe.emit, formats=(fmt,)))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
        try:
            artifact = api.emit_checked(state["gm"], state["ctx"], state["records"], emit, tmp)[0]
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        from optcc.export.emit import load_artifact

        path = final / artifact.path.name
        runner = load_artifact(path, torch.get_num_threads())
        return runner, path


def model_key(prep: api.Prepared) -> str:
    return json.dumps([prep.lm.source, prep.lm.task, prep.lm.weights_sha256, api.inputs_hash(prep.inputs),
                       torch.__version__], sort_keys=True)


# worker-process state: one Evaluator per process, built by init_worker (pool initializer / Ray task)
_EVALUATOR: Optional[Evaluator] = None
_EVALUATOR_ID: Optional[str] = None


def init_worker(space_text: str, space_path: str, source: str, task: Optional[str], weights: Optional[str],
                cache_dir: str, threads: Optional[int] = None) -> None:
    global _EVALUATOR, _EVALUATOR_ID
    ident = hashlib.sha256(json.dumps([space_text, source, task, weights, cache_dir]).encode()).hexdigest()
    if _EVALUATOR_ID == ident:
        return
    if threads:
        torch.set_num_threads(threads)
    _EVALUATOR = Evaluator(parse_space(space_text, space_path), source, task, weights, Path(cache_dir))
    _EVALUATOR_ID = ident


def run_job(job: dict) -> dict:
    assert _EVALUATOR is not None, "init_worker first"
    return _EVALUATOR.run(job)
