"""`optcc tune`: search a space for the fastest recipe inside a quality budget.

The coordinator (this module) picks points (every point of a small space, else Optuna's TPE),
hands them to an executor, keeps every finished trial in the cache (so a run resumes, and a
later run reuses what an earlier one measured), then re-times the Pareto front round-robin in
one process, writes pareto.json / pareto.html / best.yaml, and applies best.yaml into out/best/.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import yaml

from optcc import api
from optcc.algorithms.pareto import front
from optcc.config.gates import check_values
from optcc.config.recipe import resolve_auto
from optcc.config.space import Dim, Space, load_space
from optcc.errors import OptccError, RecipeError, RequirementError
from optcc.measure.environment import environment
from optcc.measure.latency import measure
from optcc.measure.machine import exclusive_timing
from optcc.search import executors, trial

Events = Callable[..., None]  # on_event(kind, **data): "stage" (name), "trial" (record, done, pruned, failed, total, best, eta_s)


def default_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "optcc" / "tune"


def tune(space_path: str | Path, model: Optional[str] = None, out: str | Path = "out", *, task: Optional[str] = None,
         weights: Optional[str] = None, workers: Optional[int] = None, ray: Optional[str] = None,
         trials: Optional[int] = None, cache: Optional[str | Path] = None, on_event: Events = api._noop) -> dict:
    """Run the search; returns pareto.json's content. Raises before writing anything when the
    space is invalid, the Ray cluster does not answer, or no trial meets the budget."""
    t_start = time.perf_counter()
    space = load_space(space_path)
    space = _override(space, workers, ray, trials)
    source = model or space.sections.get("model", {}).get("source")
    if not source:
        raise RecipeError(f"{space_path}: no model given", "pass MODEL on the command line or set model.source in the space")
    if space.tune.executor == "ray":
        executors.check_ray_address(space.tune.ray_address)
    cache_dir = Path(cache) if cache else default_cache()
    out = Path(out)
    on_event("stage", name="load model")
    first, _ = resolve_auto(space.recipe(space.first()))
    if first.bench.threads:
        torch.set_num_threads(first.bench.threads)
    prep = api.prepare(source, task, weights, first)
    if prep.cache is not None:
        raise RecipeError(f"{space_path}: tune searches encoders and classifiers; this is a text-generation model",
                          "tune a decoder's passes by hand with `optcc apply` (decode timing in tune is not supported yet)")
    mkey = trial.model_key(prep)
    store = TrialStore(cache_dir / "trials")
    initargs = (Path(space_path).read_text(), str(space_path), source, task, weights, str(cache_dir), first.bench.threads)
    on_event("stage", name=f"search ({_describe_sampler(space)})")
    runner = executors.make(space.tune.executor, space.tune.workers, space.tune.ray_address, initargs, cache_dir,
                            lambda: trial.Evaluator(space, source, task, weights, cache_dir, prep=prep))
    try:
        records = _search(space, mkey, store, runner, on_event)
    finally:
        runner.close()
    search_s = time.perf_counter() - t_start
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        raise _no_trial_met(space, records)
    quality = next(iter(space.require))
    higher = space.require[quality].strip().startswith(">")
    idx = front([(r["latency"]["p50_ms"], r["metrics"][quality]) for r in ok], higher)
    members = [ok[i] for i in idx]
    baseline = None
    if space.tune.retime:
        on_event("stage", name=f"re-time the front ({len(members)} artifacts, round-robin)")
        baseline = _retime(members, prep, first)
    best = min(members, key=lambda r: r["latency"]["p50_ms"])
    data = {
        "optcc_tune": 1, "space": str(space_path), "model": source,
        "objective": {"kind": space.tune.objective, "backend": space.tune.backend},
        "budget": dict(space.require), "quality": {"metric": quality, "higher_is_better": higher},
        "sampler": _describe_sampler(space), "workers": space.tune.workers, "executor": space.tune.executor,
        "trials": [_summary(r) for r in records], "front": [r["key"] for r in members], "best": best["key"],
        "baseline": baseline, "counts": _counts(records), "time": _time_share(records, search_s),
        "environment": environment(),
    }
    with api._staging(out) as tmp:
        (tmp / "pareto.json").write_text(json.dumps(data, indent=2) + "\n")
        from optcc.report.pareto import pareto_html

        (tmp / "pareto.html").write_text(pareto_html(data))
        (tmp / "best.yaml").write_text(_best_yaml(space, best, data))
        on_event("stage", name="apply best.yaml")
        failed = None
        try:
            report = api.apply(tmp / "best.yaml", source, tmp / "best", task=task, weights=weights)
        except RequirementError as e:  # written, but a gate failed on an artifact: keep it, say so after
            failed, report = e, json.loads((tmp / "best" / "report.json").read_text())
        data["best_report"] = {"speedup": report["latency"]["speedup"] if report.get("latency") else None,
                               "requirements": report["requirements"]}
        data["seconds"] = round(time.perf_counter() - t_start, 1)
        (tmp / "pareto.json").write_text(json.dumps(data, indent=2) + "\n")
    if failed:
        raise RequirementError(f"best.yaml met the budget on the graph but not as an artifact: {failed.message}",
                               f"see {out / 'best' / 'report.md'}")
    return data


def _override(space: Space, workers: Optional[int], ray: Optional[str], trials: Optional[int]) -> Space:
    t = space.tune
    if workers is not None:
        if workers < 1:
            raise RecipeError(f"--workers {workers}: must be >= 1", "give a positive number of workers")
        t = dataclasses.replace(t, workers=workers)
    if trials is not None:
        if trials < 1:
            raise RecipeError(f"--trials {trials}: must be >= 1", "give a positive number of trials")
        t = dataclasses.replace(t, trials=trials)
    if ray:
        t = dataclasses.replace(t, executor="ray", ray_address=ray)
    return dataclasses.replace(space, tune=t)


def _describe_sampler(space: Space) -> str:
    kind = _sampler_kind(space)
    size = space.size()
    return f"grid, {size} points" if kind == "grid" else f"optuna {kind}, {space.tune.trials} trials"


def _sampler_kind(space: Space) -> str:
    t = space.tune
    if t.sampler == "grid":
        if space.size() is None:
            d = next(d for d in space.dims if d.grid() is None)
            raise RecipeError(f"{space.path}:{d.line}: {d.where}: a grid needs every range to have a step",
                              "add step: to the range, or use sampler: tpe")
        return "grid"
    if t.sampler == "auto":
        size = space.size()
        return "grid" if size is not None and size <= t.trials else "tpe"
    return t.sampler


class TrialStore:
    """Finished trials on disk, one JSON file per trial key: resume and reuse across runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> Optional[dict]:
        p = self.root / f"{key}.json"
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, record: dict) -> None:
        p = self.root / f"{record['key']}.json"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(p)


def _reusable(record: Optional[dict], space: Space) -> Optional[dict]:
    """A stored trial, re-judged against this space's budget; None when it must run (again)."""
    if record is None or record.get("status") not in ("ok", "pruned"):
        return None
    budget = check_values(record["metrics"], space.require)
    if not all(q["ok"] for q in budget):
        return {**record, "status": "pruned", "budget": budget, "cached": True}
    if record.get("latency") and record.get("artifact") and Path(record["artifact"]).exists():
        return {**record, "status": "ok", "budget": budget, "cached": True}
    return None  # inside this budget but never built or timed: build and time it now


REPEATS_PER_TRIAL = 5  # proposals of already-measured points tolerated per trial before the search stops


class Sampler:
    """Next points to try: the whole grid, or Optuna (ask/tell) for larger spaces."""

    def __init__(self, space: Space) -> None:
        self.space, self.kind = space, _sampler_kind(space)
        self.asked = self.repeats = 0
        self.limit = space.tune.trials
        if self.kind == "grid":
            self.points: Iterator[dict] = space.grid(limit=self.limit)
        else:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = (optuna.samplers.RandomSampler(seed=space.tune.seed) if self.kind == "random" else
                       optuna.samplers.TPESampler(seed=space.tune.seed, constant_liar=True, n_startup_trials=min(8, self.limit)))
            self.study = optuna.create_study(direction="maximize" if space.tune.objective == "throughput" else "minimize",
                                             sampler=sampler)
            self.optuna = optuna
        self.trials: dict[str, Any] = {}  # job key -> optuna trial

    def repeat(self) -> None:
        """The last point asked for was one already measured: it does not use up a trial, but
        a sampler that keeps proposing measured points (a space nearly exhausted) is stopped."""
        self.asked -= 1
        self.repeats += 1

    def next(self) -> Optional[tuple[dict, Any]]:
        if self.asked >= self.limit or self.repeats >= REPEATS_PER_TRIAL * self.limit:
            return None
        if self.kind == "grid":
            point = next(self.points, None)
            if point is None:
                return None
            self.asked += 1
            return point, None
        t = self.study.ask()
        point: dict = {}
        off: set[int] = set()
        for d in self.space.dims:
            if d.option is not None and d.step in off:
                continue
            point[d.name] = _suggest(t, d)
            if d.option is None and point[d.name] is False:
                off.add(d.step)
        self.asked += 1
        return point, t

    def tell(self, handle: Any, record: dict, objective: str) -> None:
        if handle is None:
            return
        state = self.optuna.trial.TrialState
        if record["status"] == "ok":
            lat = record["latency"]
            self.study.tell(handle, lat["throughput_per_s"] if objective == "throughput" else lat["p50_ms"])
        elif record["status"] == "pruned":
            self.study.tell(handle, state=state.PRUNED)
        else:
            self.study.tell(handle, state=state.FAIL)


def _suggest(t: Any, d: Dim) -> Any:
    if d.choices is not None:
        if all(isinstance(c, (bool, int, float, str)) or c is None for c in d.choices):
            return t.suggest_categorical(d.name, list(d.choices))
        return d.choices[t.suggest_categorical(d.name, list(range(len(d.choices))))]
    if d.integer:
        return t.suggest_int(d.name, int(d.low), int(d.high), step=int(d.by or 1), log=d.log)
    return t.suggest_float(d.name, d.low, d.high, step=d.by, log=d.log)


def _search(space: Space, mkey: str, store: TrialStore, runner, on_event: Events) -> list[dict]:
    sampler = Sampler(space)
    records: list[dict] = []
    seen: dict[str, dict] = {}
    attempts: dict[str, int] = {}
    handles: dict[str, Any] = {}
    retry: list[dict] = []
    inflight = 0
    t0 = time.perf_counter()
    total = min(space.size() or space.tune.trials, space.tune.trials)

    def finish(job: dict, record: dict) -> None:
        sampler.tell(handles.pop(job["key"], None), record, space.tune.objective)
        record["trial"] = len(records)
        records.append(record)
        seen[job["key"]] = record
        if not record.get("cached") and record["status"] in ("ok", "pruned"):
            store.put({k: v for k, v in record.items() if k not in ("cached", "trial")})
        ok = [r for r in records if r["status"] == "ok"]
        done = len(records)
        eta = (time.perf_counter() - t0) / done * max(total - done, 0)
        on_event("trial", record=record, done=done, total=total, pruned=sum(r["status"] == "pruned" for r in records),
                 failed=sum(r["status"] == "failed" for r in records),
                 best=min((r["latency"]["p50_ms"] for r in ok), default=None), eta_s=eta)

    while True:
        while inflight < runner.capacity:
            if retry:
                job = retry.pop(0)
            else:
                nxt = sampler.next()
                if nxt is None:
                    break
                point, handle = nxt
                recipe, chosen = resolve_auto(space.recipe(point))
                key = trial.trial_key(mkey, recipe)
                if key in seen:  # the sampler proposed a point already measured in this run: told, not counted
                    sampler.tell(handle, seen[key], space.tune.objective)
                    sampler.repeat()
                    continue
                job = {"point": point, "key": key, "chosen": chosen,
                       "recipe": yaml.safe_dump(recipe.to_dict(), sort_keys=False)}
                handles[key] = handle
                cached = _reusable(store.get(key), space)
                if cached is not None:
                    finish(job, {**cached, "point": point})
                    continue
            attempts[job["key"]] = attempts.get(job["key"], 0) + 1
            on_event("submit", job=job, attempt=attempts[job["key"]])
            runner.submit(job)
            inflight += 1
        if inflight == 0:
            break
        for job, result in runner.wait():
            inflight -= 1
            if isinstance(result, executors.WorkerDied):
                if attempts[job["key"]] < 2:
                    retry.append(job)
                    continue
                result = {"point": job["point"], "key": job["key"], "status": "failed",
                          "error": f"{result} (twice: tried again once, then gave up)"}
            elif isinstance(result, OptccError):
                raise result  # the worker could not even prepare the model: no trial can run
            elif isinstance(result, BaseException):
                result = {"point": job["point"], "key": job["key"], "status": "failed", "error": f"{type(result).__name__}: {result}"}
            result["chosen"] = job["chosen"]
            finish(job, result)
    return records


def _no_trial_met(space: Space, records: list[dict]) -> OptccError:
    judged = [r for r in records if r.get("budget")]
    if not judged:
        errors = [r.get("error") for r in records if r.get("error")]
        return RequirementError(f"no trial of {space.path} finished: {len(records)} failed"
                                + (f"; the first: {errors[0]}" if errors else ""), "run `optcc apply` on one point with --debug")
    closest = max(judged, key=lambda r: min(q["margin"] if q["margin"] is not None else float("-inf") for q in r["budget"]))
    miss = min(closest["budget"], key=lambda q: q["margin"] if q["margin"] is not None else float("-inf"))
    by = f" by {-miss['margin']:.4g}" if miss["margin"] is not None else " (not measured)"
    return RequirementError(
        f"no trial met the budget: require.{miss['metric']} {miss['require']}; the closest, {_point_str(closest['point'])}, "
        f"got {miss['value']:.4g}, missing{by}" if isinstance(miss["value"], (int, float)) else
        f"no trial met the budget: require.{miss['metric']} {miss['require']} was not measured",
        "loosen the budget in require:, or widen the space toward the cheaper settings")


def _point_str(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "(all defaults)"


def _retime(members: list[dict], prep: api.Prepared, recipe) -> dict:
    """The front's artifacts and eager fp32, round-robin in this process; updates each member's
    latency in place and returns the baseline's."""
    from optcc.export.emit import load_artifact

    inputs = prep.inputs
    module = prep.lm.module
    fns: dict[str, Callable[[], object]] = {"baseline": lambda: module(**inputs)}
    for r in members:
        p = Path(r["artifact"])
        run = load_artifact(p, torch.get_num_threads())
        fns[r["key"]] = (lambda run=run: run(inputs))
    b = recipe.bench
    items = next(iter(inputs.values())).shape[0]
    with exclusive_timing():
        res = measure(fns, warmup=b.warmup, iters=b.iters, min_seconds=b.min_seconds, items=items)
    base = res.pop("baseline")
    for r in members:
        r["search_latency"] = r["latency"]
        r["latency"] = res[r["key"]]
        r["speedup"] = base["p50_ms"] / res[r["key"]]["p50_ms"]
    return {**base, "backend": "torch-eager-fp32"}


def _summary(r: dict) -> dict:
    keep = ("trial", "key", "point", "status", "metrics", "budget", "latency", "search_latency", "speedup",
            "artifact", "seconds", "worker", "error", "cached", "chosen")
    return {k: r[k] for k in keep if k in r}


def _counts(records: list[dict]) -> dict:
    return {s: sum(r["status"] == s for r in records) for s in ("ok", "pruned", "failed")} | {
        "cached": sum(bool(r.get("cached")) for r in records)}


def _time_share(records: list[dict], wall: float) -> dict:
    """Seconds the trials spent evaluating on the graph, building artifacts and timing them."""
    fresh = [r.get("seconds", {}) for r in records if not r.get("cached")]
    return {"search_wall_s": round(wall, 1), **{f"{k}_s": round(sum(s.get(k, 0.0) for s in fresh), 1)
                                                 for k in ("evaluate", "build", "time")}}


def _best_yaml(space: Space, best: dict, data: dict) -> str:
    lat = best["latency"]["p50_ms"]
    speed = f" ({best['speedup']:.2f}x eager fp32)" if best.get("speedup") else ""
    q = data["quality"]["metric"]
    head = (f"# Found by `optcc tune {space.path}`: the fastest point inside the budget.\n"
            f"# {space.tune.backend} p50 {lat:.2f} ms{speed}, {q} = {best['metrics'].get(q, float('nan')):.4g} on the graph;\n"
            f"# {data['counts']['ok']} trials timed, {data['counts']['pruned']} outside the budget (see pareto.json).\n")
    return head + yaml.safe_dump(space.recipe_dict(best["point"]), sort_keys=False)
