"""The Python API. Everything the CLI does goes through here:

    report = optcc.apply("recipes/quickstart.yaml", out="out/")
    structure = optcc.inspect_model("builtin:tiny-llama")
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from optcc import registry
from optcc.bench import measure, peak_rss_mb
from optcc.capture import capture, flat_outputs, primary_index, run_graph
from optcc.data import calibration, evaluation
from optcc.evaluate import compare, metric_for, run_metric, strip
from optcc.context import PassContext
from optcc.emit import emit_all
from optcc.environment import environment
from optcc.errors import RecipeError, RequirementError
from optcc.intake import TOKEN_TASKS, LoadedModel, load_model, make_inputs
from optcc.manager import run_passes
from optcc.metrics import fidelity
from optcc.recipe import Recipe, dump_lock, load_recipe
from optcc.gates import check_requirements, regressions
from optcc.diffview import waterfall_html
from optcc.report import to_markdown
from optcc.schema import json_schema
from optcc.stats import graph_stats
from optcc.structure import Structure

Events = Callable[..., None]  # on_event(kind, **data): "stage" (name), "pass" (name, i, n)


def _noop(kind: str, **data: Any) -> None:
    pass


@dataclass
class Prepared:
    lm: LoadedModel
    inputs: dict[str, torch.Tensor]
    reference: list[torch.Tensor]
    primary: int
    causal: Optional[bool]


def prepare(source: str, task: Optional[str], weights: Optional[str], recipe: Recipe) -> Prepared:
    lm = load_model(source, task or recipe.model.task, weights)
    inputs = make_inputs(lm, recipe.model.inputs)
    with torch.no_grad():
        out = lm.module(**inputs)
    return Prepared(lm, inputs, flat_outputs(out), primary_index(out), probe_causal(lm, inputs, out))


def probe_causal(lm: LoadedModel, inputs: dict[str, torch.Tensor], out: Any) -> Optional[bool]:
    """Measure causality: change the last token and see whether earlier positions move."""
    if lm.task not in TOKEN_TASKS or "input_ids" not in inputs or inputs["input_ids"].shape[1] < 2:
        return None
    ids = inputs["input_ids"].clone()
    vocab = int(ids.max()) + 2
    ids[:, -1] = (ids[:, -1] + 1) % max(vocab, 2)
    with torch.no_grad():
        changed = flat_outputs(lm.module(**{**inputs, "input_ids": ids}))[primary_index(out)]
    ref = flat_outputs(out)[primary_index(out)]
    if ref.dim() < 3 or ref.shape[1] != ids.shape[1]:
        return None
    return bool(torch.allclose(ref[:, :-1], changed[:, :-1], atol=1e-5, rtol=1e-4))


def inspect_model(source: str, task: Optional[str] = None, weights: Optional[str] = None,
                  recipe: Optional[Recipe] = None) -> tuple[LoadedModel, Structure]:
    from optcc.recipe import parse_recipe

    recipe = recipe or parse_recipe("version: 1\n")
    prep = prepare(source, task, weights, recipe)
    gm = capture(prep.lm.module, prep.inputs, recipe.model.dynamic).module()
    ctx = PassContext(prep.lm.task, prep.inputs, prep.reference, prep.primary, prep.causal)
    return prep.lm, ctx.structure(gm)


def list_passes() -> list[dict]:
    return [
        {"name": s.name, "summary": s.summary, "lossless": s.lossless, "after": list(s.after),
         "tasks": list(s.tasks) if s.tasks else None, "config": json_schema(s.config)}
        for s in sorted(registry.registry().values(), key=lambda s: s.name)
    ]


def _inputs_hash(inputs: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(inputs):
        h.update(k.encode())
        h.update(inputs[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def apply(recipe_path: str | Path, model: Optional[str] = None, out: str | Path = "out", *,
          task: Optional[str] = None, weights: Optional[str] = None, on_event: Events = _noop,
          baseline: Optional[str | Path] = None, tolerance: Optional[float] = None) -> dict:
    """Run a recipe on a model and write artifacts + report into `out` atomically.

    Returns the report dict. Raises RequirementError (after writing everything) when a
    `require:` gate fails or, given a previous `baseline` report.json, a metric regressed
    beyond `tolerance`; any other OptccError leaves `out` untouched.
    """
    t_start = time.perf_counter()
    recipe = load_recipe(recipe_path)
    previous = _read_report(baseline) if baseline else None
    source = model or recipe.model.source
    if not source:
        raise RecipeError(f"{recipe_path}: no model given", "pass MODEL on the command line or set model.source in the recipe")
    if recipe.bench.threads:
        torch.set_num_threads(recipe.bench.threads)
    out = Path(out)
    on_event("stage", name="load model")
    prep = prepare(source, task, weights, recipe)
    lm = prep.lm
    evalset = evaluation(lm, recipe, prep.inputs)
    base_metric = None
    if evalset is not None:
        on_event("stage", name=f"evaluate baseline ({evalset.source})")
        metric_for(evalset, recipe.evaluate.metric if recipe.evaluate else "auto")
        base_metric = run_metric(evalset, lambda b: flat_outputs(lm.module(**b)), prep.primary)
    on_event("stage", name="capture")
    gm = capture(lm.module, prep.inputs, recipe.model.dynamic).module()
    ctx = PassContext(lm.task, prep.inputs, prep.reference, prep.primary, prep.causal,
                      calibration=_cached(lambda: calibration(lm, recipe, prep.inputs)), progress=_progress(on_event))
    if recipe.bench.enabled:
        ctx.time_graph = lambda g: measure({"g": lambda: g(**prep.inputs)}, warmup=2, iters=5, min_seconds=0.3,
                                           items=1)["g"]["p50_ms"]
    captured = {**graph_stats(gm, prep.inputs), "latency_ms": ctx.time_graph(gm) if ctx.time_graph else None,
                "task_metric": base_metric and strip(compare(base_metric, base_metric))}
    if evalset is not None:
        ctx.evaluate = lambda g: strip(compare(base_metric, run_metric(evalset, lambda b: run_graph(g, b), prep.primary)))
    on_event("stage", name="passes")
    gm, records = run_passes(gm, recipe.passes, ctx, on_pass=lambda n, i, k: on_event("pass", name=n, i=i, n=k))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output folder should look like any other
    try:
        on_event("stage", name="emit")
        threads = torch.get_num_threads()
        artifacts = emit_all(gm, prep.inputs, recipe.emit.formats, recipe.emit.opset, tmp, prep.primary,
                             recipe.emit.atol, recipe.model.dynamic, threads)
        fid_by = {a.format: fidelity(prep.reference[prep.primary], a.runner(prep.inputs)[prep.primary],
                                     logits=lm.task != "feature-extraction")
                  for a in artifacts}
        worst = min(fid_by.values(), key=lambda f: f["cosine_mean"])
        task_metric = None
        if evalset is not None:
            on_event("stage", name="evaluate artifacts")
            by = {a.format: strip(compare(base_metric, run_metric(evalset, a.runner, prep.primary))) for a in artifacts}
            sign = 1.0 if base_metric["metric"] == "perplexity" else -1.0  # which direction is worse
            worst_fmt = max(by, key=lambda k: sign * by[k]["delta"])
            task_metric = {"metric": base_metric["metric"], "source": evalset.source, "samples": evalset.samples,
                           "baseline": base_metric["value"], "optimized": by[worst_fmt]["value"],
                           "delta": by[worst_fmt]["delta"], "by_artifact": by}
        latency = None
        if recipe.bench.enabled:
            on_event("stage", name="bench")
            latency = _bench(lm, prep, artifacts, recipe)
        report = {
            "optcc_report": 1,
            "recipe": {"path": str(recipe_path), "resolved": recipe.to_dict()},
            "model": {"source": source, "name": lm.name, "task": lm.task,
                      "params": sum(p.numel() for p in lm.module.parameters()),
                      "weights_sha256": lm.weights_sha256, "causal": prep.causal},
            "inputs": {k: list(v.shape) for k, v in prep.inputs.items()},
            "latency": latency,
            "fidelity": {**worst, "by_artifact": fid_by},
            "task_metric": task_metric,
            "captured": captured,
            "passes": records,
            "artifacts": [a.to_dict(tmp) for a in artifacts],
            "memory": {"process_peak_rss_mb": round(peak_rss_mb(), 1)},
            "environment": environment(),
            "seconds": None,
        }
        report["requirements"] = check_requirements(report, recipe.require)
        report["regressions"] = regressions(report, previous, tolerance) if previous else []
        report["seconds"] = round(time.perf_counter() - t_start, 2)
        lock = dump_lock(recipe, {"model": {"source": source, "weights_sha256": lm.weights_sha256},
                                  "inputs_sha256": _inputs_hash(prep.inputs),
                                  "artifacts": {a["path"]: a["sha256"] for a in report["artifacts"]},
                                  "versions": {k: v for k, v in report["environment"].items()
                                               if k in ("optcc", "python", "torch", "transformers", "onnx", "onnxruntime", "onnxscript")}})
        graphs = tmp / "graphs"
        graphs.mkdir()
        for rec in records:
            diff = rec.pop("graph_diff")
            rec["graph_diff"] = f"graphs/{rec['step']:02d}-{rec['name']}.diff"
            (graphs / f"{rec['step']:02d}-{rec['name']}.diff").write_text("\n".join(diff) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(to_markdown(report))
        (tmp / "waterfall.html").write_text(waterfall_html(report))
        (tmp / "recipe.lock.yaml").write_text(lock)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for a in report["artifacts"]:
        a["path"] = str(out / a["path"])
    failed = [q for q in report["requirements"] if not q["ok"]]
    if failed:
        q = failed[0]
        raise RequirementError(f"requirement {q['metric']} {q['require']} not met (got {q['value']}); "
                               f"{len(failed)} of {len(report['requirements'])} failed", f"see {out / 'report.md'}") from None
    regressed = [q for q in report["regressions"] if not q["ok"]]
    if regressed:
        q = regressed[0]
        raise RequirementError(f"regression vs {baseline}: {q['metric']} {q['previous']:.4g} → {q['current']:.4g} "
                               f"(tolerance {q['tolerance']:g}{' relative' if q['relative'] else ''}); "
                               f"regressed: {', '.join(r['metric'] for r in regressed)}", f"see {out / 'report.md'}") from None
    return report


def _read_report(path: str | Path) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecipeError(f"--baseline {p}: not a readable report.json ({e})", "pass the report.json of an earlier run") from e
    if not isinstance(data, dict) or data.get("optcc_report") != 1:
        raise RecipeError(f"--baseline {p}: not an optcc report", "pass the report.json of an earlier run")
    return data


def _bench(lm: LoadedModel, prep: Prepared, artifacts, recipe: Recipe) -> dict:
    inputs = prep.inputs
    module = lm.module
    fns: dict[str, Callable[[], object]] = {"baseline": lambda: module(**inputs)}
    by_format = {a.format: a for a in artifacts}
    for backend in recipe.bench.backends:
        fmt = "torch" if backend == "torch" else "onnx"
        if fmt in by_format:
            fns[backend] = (lambda r=by_format[fmt].runner: r(inputs))
    items = next(iter(inputs.values())).shape[0]
    b = recipe.bench
    res = measure(fns, warmup=b.warmup, iters=b.iters, min_seconds=b.min_seconds, items=items)
    base = res.pop("baseline")
    speedups = {k: base["p50_ms"] / v["p50_ms"] for k, v in res.items()}
    best = max(speedups, key=speedups.get) if speedups else None
    return {
        "baseline": {**base, "backend": "torch-eager-fp32"},
        "optimized": res,
        "speedup_by_backend": speedups,
        "speedup": speedups[best] if best else None,
        "best_backend": best,
        "best": res[best] if best else None,
        "threads": torch.get_num_threads(),
    }


def _replace_dir(new: Path, out: Path) -> None:
    """Move `new` to `out`; an existing `out` is swapped away only after `new` is complete."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{out}: exists and is not a folder", "choose another -o/--out")
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{int(time.time() * 1000)}")
        out.rename(backup)
    try:
        new.rename(out)
    except BaseException:
        if backup is not None:
            backup.rename(out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _cached(fn: Callable[[], Any]) -> Callable[[], Any]:
    box: list = []

    def get() -> Any:
        if not box:
            box.append(fn())
        return box[0]

    return get


def _progress(on_event: Events):
    def start(desc: str, total: int) -> Callable[[int], None]:
        on_event("progress_start", desc=desc, total=total)
        return lambda n=1: on_event("progress", desc=desc, advance=n)

    return start
