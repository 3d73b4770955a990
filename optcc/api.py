"""The Python API. Everything the CLI does goes through here:

    report = optcc.apply("recipes/quickstart.yaml", out="out/")
    structure = optcc.inspect_model("builtin:tiny-llama")
"""
from __future__ import annotations

import contextlib
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

from optcc.pipeline import registry
from optcc.measure.latency import measure, peak_rss_mb
from optcc.graph.capture import capture, flat_outputs, graph_snapshot, primary_index, run_graph
from optcc.intake.data import calibration, evaluation
from optcc.measure.task import compare, metric_for, run_metric, strip
from optcc.pipeline.context import PassContext
from optcc.export.emit import BACKEND_KEY, RUNTIME, emit_all
from optcc.export.compiled import resolve_emit
from optcc.measure.environment import environment
from optcc.intake.decoder import CacheSpec, example_inputs, export_mode, generate, no_guard_module, wrap
from optcc.intake.decoder import dynamic_shapes as decoder_shapes
from optcc.errors import IntakeError, RecipeError, RequirementError
from optcc.measure.generation import bench_generation, prompt_ids
from optcc.intake.load import TOKEN_TASKS, LoadedModel, load_model, make_inputs
from optcc.pipeline.manager import run_passes
from optcc.algorithms.metrics import fidelity
from optcc.config.recipe import Recipe, dump_lock, load_recipe, resolve_auto
from optcc.config.gates import check_requirements, regressions
from optcc.report.diff import waterfall_html
from optcc.report.markdown import to_markdown
from optcc.report.records import ModelInfo, PassRecord, RecipeInfo, Report
from optcc.config.schema import json_schema
from optcc.graph.stats import graph_stats
from optcc.graph.structure import Structure

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
    cache: Optional[CacheSpec] = None  # set for text-generation: the graph has an explicit KV cache
    prefix: Optional[torch.Tensor] = None  # text-generation: the tokens whose cache `inputs` carry

    def complete(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Data batches carry input_ids only; a decoder graph also takes its (empty) past."""
        if self.cache is None or "past_key_0" in batch:
            return batch
        return {**batch, **self.cache.empty(next(iter(batch.values())).shape[0])}


def prepare(source: str, task: Optional[str], weights: Optional[str], recipe: Recipe) -> Prepared:
    lm = load_model(source, task or recipe.model.task, weights)
    inputs = make_inputs(lm, recipe.model.inputs)
    with torch.no_grad():
        out = lm.module(**inputs)
    causal = measure_causality(lm, inputs, out)
    if lm.task != "text-generation":
        return Prepared(lm, inputs, flat_outputs(out), primary_index(out), causal)
    if causal is False:
        raise IntakeError(f"{source}: task text-generation needs a causal model, but changing the last token "
                          "changed earlier positions' outputs", "use --task feature-extraction for an encoder")
    ids = inputs["input_ids"]
    if ids.shape[1] < 3:
        raise IntakeError(f"model.inputs.seq_len {ids.shape[1]} is too short for a decoder example",
                          "use seq_len >= 3 (part becomes the cache, part the new tokens)")
    limit = (getattr(getattr(lm.module, "config", None), "max_position_embeddings", None) or 1 << 30)
    if ids.shape[1] + recipe.generate.new_tokens > limit:
        raise RecipeError(f"prompt ({ids.shape[1]} tokens) + generate.new_tokens ({recipe.generate.new_tokens}) "
                          f"exceeds the model's {limit} positions", "lower model.inputs.seq_len or generate.new_tokens")
    wrapper, spec = wrap(lm.module, source)
    lm.module = wrapper
    past_len = max(2, ids.shape[1] // 2)
    example = example_inputs(wrapper, spec, ids, past_len)
    with torch.no_grad():
        out = wrapper(**example)
    return Prepared(lm, example, flat_outputs(out), 0, causal, spec, ids[:, :past_len])


def measure_causality(lm: LoadedModel, inputs: dict[str, torch.Tensor], out: Any) -> Optional[bool]:
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
    from optcc.config.recipe import parse_recipe

    recipe = recipe or parse_recipe("version: 1\n")
    prep = prepare(source, task, weights, recipe)
    with no_guard_module() if prep.cache else contextlib.nullcontext():
        shapes = decoder_shapes(prep.cache) if prep.cache else None
        gm = capture(prep.lm.module, prep.inputs, recipe.model.dynamic, shapes).module()
    ctx = PassContext(prep.lm.task, prep.inputs, prep.reference, prep.primary, prep.causal)
    return prep.lm, ctx.structure(gm)


def run_artifact(artifact: str | Path, prompt: Optional[str] = None, tokens: Optional[list[int]] = None,
                 new_tokens: int = 32) -> dict:
    """Greedy generation from a decoder artifact (model.onnx or model.pt2 written by `apply`).
    Byte-level models take a text prompt; others take token ids."""
    from optcc.export.emit import load_artifact

    path = Path(artifact)
    if path.is_dir():
        path = next((path / n for n in ("model.onnx", "model.pt2", "model.exported.pt2") if (path / n).exists()), path / "model.onnx")
    meta = path.parent / "decoder.json"
    if not path.exists():
        raise IntakeError(f"{path}: no such artifact", "pass model.onnx, model.pt2, model.exported.pt2 or the output folder of `optcc apply`")
    if not meta.exists():
        raise IntakeError(f"{path.parent}: no decoder.json, so this is not a text-generation artifact",
                          "run `optcc apply` with a text-generation model first")
    spec = CacheSpec.read(meta)
    if new_tokens < 1:
        raise RecipeError(f"--new-tokens {new_tokens}: must be >= 1", "ask for at least one token")
    if tokens is None:
        if prompt is None:
            raise RecipeError("no prompt given", "pass --prompt TEXT (or --tokens for non-byte-level models)")
        if not spec.byte_level:
            raise RecipeError("this model is not byte-level, so a text prompt needs its tokenizer",
                              "pass --tokens 1,2,3 with ids from the model's tokenizer")
        from optcc.zoo.data import byte_encode

        ids = byte_encode(prompt).unsqueeze(0)
    else:
        ids = torch.tensor([tokens], dtype=torch.long)
    if ids.shape[1] == 0:
        raise RecipeError("the prompt is empty", "give at least one token")
    if spec.max_positions and ids.shape[1] + new_tokens > spec.max_positions:
        raise RecipeError(f"prompt ({ids.shape[1]} tokens) + {new_tokens} new tokens exceeds the model's "
                          f"{spec.max_positions} positions", "shorten the prompt or ask for fewer tokens")
    with no_guard_module():
        step = load_artifact(path)
        out, timing = generate(step, spec, ids, new_tokens)
    result = {"artifact": str(path), "prompt_tokens": int(ids.shape[1]), "tokens": out[0].tolist(),
              "prefill_ms": timing["prefill_s"] * 1e3,
              "decode_ms_per_token": (sum(timing["decode_s"]) / len(timing["decode_s"]) * 1e3) if timing["decode_s"] else None}
    if spec.byte_level:
        from optcc.zoo.data import byte_decode

        result["text"] = byte_decode(out[0])
    return result


def list_passes() -> list[dict]:
    return [
        {"name": s.name, "summary": s.summary, "lossless": s.lossless, "after": list(s.after),
         "tasks": list(s.tasks) if s.tasks else None, "config": json_schema(s.config)}
        for s in sorted(registry.registry().values(), key=lambda s: s.name)
    ]


def inputs_hash(inputs: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(inputs):
        h.update(k.encode())
        h.update(inputs[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def apply(recipe_path: str | Path, model: Optional[str] = None, out: str | Path = "out", *,
          task: Optional[str] = None, weights: Optional[str] = None, on_event: Events = _noop,
          baseline: Optional[str | Path] = None, tolerance: Optional[float] = None) -> dict:
    """Run a recipe on a model and write artifacts + report into `out` atomically.

    Returns the report (report.json's content). Raises RequirementError (after writing
    everything) when a `require:` gate fails or, given a previous `baseline` report.json, a
    metric regressed beyond `tolerance`; any other OptccError leaves `out` untouched.

    The stages, in order: recipe (with `auto` resolved for this machine), intake, baseline
    metric, capture, passes, emit, evaluate, bench, report, gates.
    """
    t_start = time.perf_counter()
    recipe, chosen = resolve_auto(load_recipe(recipe_path))
    recipe, emit_chosen = resolve_emit(recipe)
    chosen += emit_chosen
    previous = _read_report(baseline) if baseline else None
    source = model or recipe.model.source
    if not source:
        raise RecipeError(f"{recipe_path}: no model given", "pass MODEL on the command line or set model.source in the recipe")
    if recipe.bench.threads:
        torch.set_num_threads(recipe.bench.threads)
    out = Path(out)
    on_event("stage", name="load model")
    prep = prepare(source, task, weights, recipe)
    with no_guard_module() if prep.cache else contextlib.nullcontext():
        evalset, base_metric = baseline_metric(prep, recipe, on_event)
        on_event("stage", name="capture")
        gm, ctx, captured = capture_graph(prep, recipe, evalset, base_metric, on_event)
        on_event("stage", name="passes")
        gm, records = run_passes(gm, recipe.passes, ctx, on_pass=lambda n, i, k: on_event("pass", name=n, i=i, n=k))
        with _staging(out) as tmp:
            on_event("stage", name="emit")
            artifacts = emit_checked(gm, ctx, records, recipe, tmp)
            if ctx.cache:  # what `optcc run` needs to drive the decoder artifact
                (tmp / "decoder.json").write_text(json.dumps(ctx.cache.to_dict(), indent=2) + "\n")
            fid, task_metric = _evaluate_artifacts(prep, ctx, artifacts, evalset, base_metric, on_event)
            latency, generation = _bench_artifacts(prep, ctx, artifacts, recipe, on_event)
            report = Report(
                optcc_report=1,
                recipe=RecipeInfo(str(recipe_path), recipe.to_dict(), chosen),
                model=ModelInfo(source, prep.lm.name, prep.lm.task, sum(p.numel() for p in prep.lm.module.parameters()),
                                prep.lm.weights_sha256, prep.causal),
                inputs={k: list(v.shape) for k, v in ctx.inputs.items()},  # the artifacts' inputs (after passes)
                latency=latency, fidelity=fid, task_metric=task_metric, generation=generation,
                greedy_match=generation["greedy_match"] if generation else None,
                captured=captured, passes=records, artifacts=[a.to_dict(tmp) for a in artifacts],
                memory={"process_peak_rss_mb": round(peak_rss_mb(), 1)}, environment=environment(),
                requirements=[], regressions=[], seconds=0.0,
            )
            data = _write_outputs(tmp, report, recipe, chosen, prep, t_start, previous, tolerance)
    for a in data["artifacts"]:
        a["path"] = str(out / a["path"])
    _raise_on_gates(data, out, baseline)
    return data


def baseline_metric(prep: Prepared, recipe: Recipe, on_event: Events):
    """The evaluation set (None without data) and the original model's task metric on it."""
    evalset = evaluation(prep.lm, recipe, _plain_ids(prep))
    if evalset is None:
        return None, None
    evalset.batches = [prep.complete(b) for b in evalset.batches]
    on_event("stage", name=f"evaluate baseline ({evalset.source})")
    metric_for(evalset, recipe.evaluate.metric if recipe.evaluate else "auto")
    return evalset, run_metric(evalset, lambda b: flat_outputs(prep.lm.module(**b)), prep.primary)


def capture_graph(prep: Prepared, recipe: Recipe, evalset, base_metric, on_event: Events):
    """The captured graph, the context its passes get, and its stats for the report."""
    lm = prep.lm
    gm = capture(lm.module, prep.inputs, recipe.model.dynamic, decoder_shapes(prep.cache) if prep.cache else None).module()
    ctx = PassContext(lm.task, prep.inputs, prep.reference, prep.primary, prep.causal,
                      calibration=_cached(lambda: [prep.complete(b) for b in calibration(lm, recipe, _plain_ids(prep))]),
                      progress=_progress(on_event), cache=prep.cache, prefix=prep.prefix)
    if recipe.bench.enabled:
        b = recipe.bench
        ctx.time_graphs = lambda fns: {k: v["p50_ms"] for k, v in measure(
            fns, warmup=b.warmup, iters=b.iters, min_seconds=b.min_seconds, items=1).items()}
        # the captured graph (its nodes copied, weights shared) on its own inputs: each pass's graph is
        # timed interleaved with it, so the waterfall's ratios hold on a noisy machine. ctx.inputs may
        # change later (a pass can change a decoder's cache layout, see PassContext.follow_cache).
        frozen, frozen_inputs = graph_snapshot(gm), dict(ctx.inputs)
        ctx.captured_run = lambda: frozen(**frozen_inputs)
    captured = {**graph_stats(gm, prep.inputs),
                "latency_ms": ctx.time_graphs({"captured": ctx.captured_run})["captured"] if ctx.time_graphs else None,
                "task_metric": base_metric and strip(compare(base_metric, base_metric))}
    if evalset is not None:
        ctx.evaluate = lambda g: strip(compare(base_metric, run_metric(
            evalset, _fitted(lambda b: run_graph(g, b), prep.cache and prep.cache.follow(g)), prep.primary)))
    return gm, ctx, captured


def _evaluate_artifacts(prep: Prepared, ctx: PassContext, artifacts, evalset, base_metric, on_event: Events):
    """(fidelity of the worst artifact with by_artifact, task metric of the worst artifact or None)."""
    logits = prep.lm.task != "feature-extraction"
    fid_by = {a.format: fidelity(prep.reference[prep.primary], a.runner(ctx.inputs)[prep.primary], logits=logits)
              for a in artifacts}
    fid = {**min(fid_by.values(), key=lambda f: f["cosine_mean"]), "by_artifact": fid_by}
    if evalset is None:
        return fid, None
    on_event("stage", name="evaluate artifacts")
    by = {a.format: strip(compare(base_metric, run_metric(evalset, _fitted(a.runner, ctx.cache), prep.primary)))
          for a in artifacts}
    sign = 1.0 if base_metric["metric"] == "perplexity" else -1.0  # which direction is worse
    worst = max(by, key=lambda k: sign * by[k]["delta"])
    return fid, {"metric": base_metric["metric"], "source": evalset.source, "samples": evalset.samples,
                 "baseline": base_metric["value"], "optimized": by[worst]["value"], "delta": by[worst]["delta"],
                 "by_artifact": by}


def _bench_artifacts(prep: Prepared, ctx: PassContext, artifacts, recipe: Recipe, on_event: Events):
    """(latency, generation) when the recipe benchmarks, else (None, None)."""
    if not recipe.bench.enabled:
        return None, None
    on_event("stage", name="bench")
    latency = _bench(prep.lm, prep, artifacts, recipe, ctx.inputs)
    if not prep.cache:
        return latency, None
    on_event("stage", name="bench generation")
    return latency, _bench_generation(prep.lm, prep, artifacts, recipe, ctx.cache)


def _write_outputs(tmp: Path, report: Report, recipe: Recipe, chosen: list[dict], prep: Prepared, t_start: float,
                   previous: Optional[dict], tolerance: Optional[float]) -> dict:
    """report.json, report.md, waterfall.html, recipe.lock.yaml and graphs/ into `tmp`; the report's data."""
    graphs = tmp / "graphs"
    graphs.mkdir()
    for rec in report.passes:
        name = f"{rec.step:02d}-{rec.name}.diff"
        (graphs / name).write_text("\n".join(rec.graph_diff) + "\n")
        rec.graph_diff = f"graphs/{name}"
    data = report.to_dict()
    data["requirements"] = check_requirements(data, recipe.require)
    data["regressions"] = regressions(data, previous, tolerance) if previous else []
    data["seconds"] = round(time.perf_counter() - t_start, 2)
    lock = dump_lock(recipe, {"model": {"source": report.model.source, "weights_sha256": report.model.weights_sha256},
                              "inputs_sha256": inputs_hash(prep.inputs),
                              "chosen": chosen,
                              "artifacts": {a["path"]: a["sha256"] for a in data["artifacts"]},
                              "versions": {k: v for k, v in data["environment"].items()
                                           if k in ("optcc", "python", "torch", "transformers", "onnx", "onnxruntime", "onnxscript")}})
    (tmp / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    (tmp / "report.md").write_text(to_markdown(data))
    (tmp / "waterfall.html").write_text(waterfall_html(data))
    (tmp / "recipe.lock.yaml").write_text(lock)
    return data


@contextlib.contextmanager
def _staging(out: Path):
    """A fresh folder beside `out` to write into; it replaces `out` only when everything was written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output folder should look like any other
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _raise_on_gates(report: dict, out: Path, baseline) -> None:
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


def emit_checked(gm, ctx: PassContext, records: list[PassRecord], recipe: Recipe, out: Path) -> list:
    """Write the recipe's artifact formats of the optimized graph into `out`, each re-loaded and
    checked against the graph on the graph's inputs (decoders: its own cache layout). When a pass
    that ran rounds values (PassSpec.rounds), the check allows the graph's own quantization error."""
    cache = ctx.cache
    rounds = any(r.modified and registry.get(r.name).rounds for r in records)
    with export_mode(cache) if cache else contextlib.nullcontext():
        return emit_all(gm, ctx.inputs, recipe.emit.formats, recipe.emit.opset, out, ctx.primary,
                        recipe.emit.atol, recipe.model.dynamic, torch.get_num_threads(),
                        decoder_shapes(cache) if cache else None, cache.output_names() if cache else None,
                        rounding_reference=ctx.reference if rounds else None, aligners=ctx.aligners, isa=recipe.emit.isa)


def _read_report(path: str | Path) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecipeError(f"--baseline {p}: not a readable report.json ({e})", "pass the report.json of an earlier run") from e
    if not isinstance(data, dict) or data.get("optcc_report") != 1:
        raise RecipeError(f"--baseline {p}: not an optcc report", "pass the report.json of an earlier run")
    return data


def _bench(lm: LoadedModel, prep: Prepared, artifacts, recipe: Recipe, graph_inputs: dict[str, torch.Tensor]) -> dict:
    inputs = prep.inputs
    module = lm.module
    fns: dict[str, Callable[[], object]] = {"baseline": lambda: module(**inputs)}
    for a in timed(artifacts, recipe.bench.backends):
        fns[BACKEND_KEY[a.format]] = (lambda r=a.runner: r(graph_inputs))
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


def timed(artifacts, backends) -> list:
    """The artifacts whose runtime (torch, onnxruntime) the recipe times, in emit order."""
    return [a for a in artifacts if RUNTIME[a.format] in backends]


def _plain_ids(prep: Prepared) -> dict[str, torch.Tensor]:
    """Example inputs without the cache: what data sources shape their batches after."""
    return {k: v for k, v in prep.inputs.items() if not k.startswith("past_")}


def _bench_generation(lm: LoadedModel, prep: Prepared, artifacts, recipe: Recipe, cache: CacheSpec) -> dict:
    spec, g = prep.cache, recipe.generate
    text = None
    if spec.byte_level and lm.zoo:
        from optcc.zoo.data import load_text_split

        text = load_text_split(lm.zoo, "eval")
    prompt = prompt_ids(spec, text, prep.inputs["input_ids"].shape[1] + prep.inputs["past_key_0"].shape[2], g.batch)
    steps = {"baseline": lambda b: flat_outputs(lm.module(**b))}
    for a in timed(artifacts, recipe.bench.backends):
        steps[BACKEND_KEY[a.format]] = a.runner
    return bench_generation(steps, spec, prompt, g.new_tokens, g.rounds,
                            specs={k: cache for k in steps if k != "baseline"})  # artifacts: the graph's cache layout


def _fitted(run: Callable[[dict], list], cache: Optional[CacheSpec]) -> Callable[[dict], list]:
    """A runner for data batches (empty past) on a graph or artifact with cache layout `cache`."""
    return run if cache is None else (lambda b: run(cache.fit(b)))


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


def tune(space_path: str | Path, model: Optional[str] = None, out: str | Path = "out", **kw: Any) -> dict:
    """Search a space (a recipe with lists, ranges and optional passes, and a `tune:` section)
    for the fastest recipe inside its `require:` budget; see optcc.search.run.tune."""
    from optcc.search.run import tune as run

    return run(space_path, model, out, **kw)
