"""Search space: a recipe whose pass options may be lists or ranges and whose passes may be
optional, plus a `tune:` section (objective, trials, workers, executor). Its `require:` is the
budget every trial must meet. Validated as strictly as a recipe, with the same line numbers.

    passes:
      - cleanup
      - token_merge: {r: {range: [4, 20], step: 4}}
        optional: true               # the search may leave this pass out
      - quantize: {activations: [per-token, per-tensor]}   # a list: one of these
    tune: {objective: latency, backend: onnxruntime, trials: 24}
    require: {task.accuracy_drop: "<= 1.0"}

A point of the space (an assignment of every dimension) is a normal Recipe (`Space.recipe`).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union, get_args, get_origin

import yaml

from optcc.config.recipe import RECIPE_VERSION, Recipe, parse_recipe, read_yaml_file, recipe_json_schema
from optcc.config.schema import Located, convert, did_you_mean, field, json_schema, parse_yaml, plain, _Ctx
from optcc.errors import RecipeError
from optcc.pipeline import registry as reg

# budget metrics that tune can measure on the graph, before any artifact is built or timed
GRAPH_METRICS = ("fidelity.", "task.", "param_bytes_ratio")


@dataclass(frozen=True)
class Tune:
    """How `optcc tune` searches the space."""

    objective: Literal["latency", "throughput"] = field("latency", help="latency: minimise p50 latency; throughput: maximise items/s (same ranking at fixed shapes)")
    backend: Literal["onnxruntime", "torch"] = field("onnxruntime", help="the runtime whose artifact is timed")
    trials: int = field(24, help="most trials to run; a space with at most this many points is enumerated whole")
    sampler: Literal["auto", "grid", "tpe", "random"] = field("auto", help="auto: grid when the space fits in `trials`, else Optuna TPE")
    workers: int = field(1, help="trials built and evaluated at once (timing stays one at a time per machine)")
    executor: Literal["local", "ray"] = field("local", help="local: worker processes on this machine; ray: Ray tasks on the cluster at ray_address")
    ray_address: Optional[str] = field(None, help="Ray cluster address (host:port or 'auto') when executor is ray")
    seed: int = field(0, help="sampler seed")
    retime: bool = field(True, help="re-time the Pareto front round-robin in one process at the end")

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class Dim:
    """One searched dimension: a pass option (choices or a numeric range) or a pass's presence."""

    name: str  # unique key, e.g. "token_merge.r" or "use.token_merge" (step-qualified if a pass repeats)
    where: str  # the space field, for messages: "passes[1].token_merge.r"
    line: int
    step: int  # index into Space.passes
    option: Optional[str]  # None: the dimension is whether the pass runs
    choices: Optional[tuple] = None
    low: Optional[float] = None
    high: Optional[float] = None
    by: Optional[float] = None  # range step; None: continuous (floats) or 1 (ints)
    log: bool = False
    integer: bool = False

    def grid(self) -> Optional[list]:
        """Every value, or None for a continuous range."""
        if self.choices is not None:
            return list(self.choices)
        if self.integer:
            return list(range(int(self.low), int(self.high) + 1, int(self.by or 1)))
        if self.by is None:
            return None
        n = int(math.floor((self.high - self.low) / self.by + 1e-9)) + 1
        return [round(self.low + i * self.by, 10) for i in range(n)]


@dataclass(frozen=True)
class SpacePass:
    name: str
    fixed: dict  # options that are not searched (plain values)
    line: int
    optional: bool


@dataclass(frozen=True)
class Space:
    path: str
    sections: dict  # the recipe's other sections, plain (model, emit, bench, ...)
    passes: tuple[SpacePass, ...]
    dims: tuple[Dim, ...]
    tune: Tune
    require: dict[str, str]

    def size(self) -> Optional[int]:
        """Distinct points (options of a pass left out do not count), or None when continuous."""
        if any(d.grid() is None for d in self.dims):
            return None
        return sum(1 for _ in self.grid())

    def grid(self, limit: Optional[int] = None) -> Iterator[dict]:
        """Every distinct assignment, in order; empty when a dimension is continuous."""
        grids = [d.grid() for d in self.dims]
        if any(g is None for g in grids):
            return
        seen, k = set(), 0
        for values in itertools.product(*grids):
            point = self.active(dict(zip((d.name for d in self.dims), values)))
            key = tuple(sorted(point.items()))
            if key in seen:
                continue
            seen.add(key)
            yield point
            k += 1
            if limit is not None and k >= limit:
                return

    def active(self, point: dict) -> dict:
        """The point without the options of passes it leaves out."""
        off = {d.step for d in self.dims if d.option is None and point.get(d.name) is False}
        return {d.name: point[d.name] for d in self.dims if d.name in point and (d.option is None or d.step not in off)}

    def recipe_dict(self, point: dict) -> dict:
        """The point as plain recipe data (what best.yaml holds)."""
        passes = []
        for i, sp in enumerate(self.passes):
            use = next((point[d.name] for d in self.dims if d.step == i and d.option is None), True)
            if not use:
                continue
            opts = dict(sp.fixed)
            for d in self.dims:
                if d.step == i and d.option is not None:
                    opts[d.option] = point[d.name]
            passes.append({sp.name: opts} if opts else sp.name)
        head = {k: self.sections[k] for k in ("model",) if k in self.sections}
        rest = {k: v for k, v in self.sections.items() if k not in head}
        return {"version": RECIPE_VERSION, **head, "passes": passes, **rest, "require": dict(self.require)}

    def recipe(self, point: dict) -> Recipe:
        return parse_recipe(yaml.safe_dump(self.recipe_dict(point), sort_keys=False), f"{self.path} (point {point})")

    def first(self) -> dict:
        """Every dimension at its first value (a present pass, the low end of a range)."""
        return self.active({d.name: (d.choices[0] if d.choices is not None else (int(d.low) if d.integer else d.low))
                            for d in self.dims})


def is_space(path: str | Path) -> bool:
    """Whether a YAML file is a search space (it has a top-level `tune:` section); False for
    anything unreadable, which the recipe loader then reports."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "tune" in data


def load_space(path: str | Path) -> Space:
    return parse_space(read_yaml_file(path, "search space", "recipes/tune-vit-digits.yaml"), str(path))


def parse_space(text: str, filename: str = "<space>") -> Space:
    root = parse_yaml(text, filename)
    ctx = _Ctx(filename)
    if not isinstance(root.value, dict):
        raise RecipeError(f"{filename}:{root.line}: a search space is a mapping of sections", "start from recipes/tune-vit-digits.yaml")
    raw = dict(root.value)
    tune = convert(raw.pop("tune", Located({}, 1)), Tune, "tune", filename)
    if tune.executor == "ray" and not tune.ray_address:
        raise ctx.fail("tune.ray_address", root.value["tune"].line, "executor ray needs a cluster address",
                       "set tune.ray_address (host:port, or 'auto' for the cluster this machine belongs to) or pass --ray")
    passes_loc = raw.pop("passes", None)
    if passes_loc is None or not isinstance(passes_loc.value, list) or not passes_loc.value:
        raise RecipeError(f"{filename}: passes: the space is empty (no passes to search)",
                          "list passes with lists or ranges for their options, e.g. token_merge: {r: [8, 16]}")
    passes, dims = _parse_passes(passes_loc, ctx)
    if not dims:
        raise RecipeError(f"{filename}:{passes_loc.line}: passes: the space is empty: no option is a list or a range "
                          "and no pass is optional", "give an option a list of values or a {range: [low, high]}, or "
                          "use `optcc apply` for a fixed recipe")
    names = [d.name for d in dims]
    # the rest is an ordinary recipe: parse one point of it to validate every other section
    sections = {k: plain(v) for k, v in raw.items() if k not in ("version", "require")}
    check = yaml.safe_dump({k: plain(v) for k, v in raw.items() if k != "passes"}, sort_keys=False)
    recipe = parse_recipe(check, filename)  # line numbers differ from the file only for sections it re-wrote
    require = dict(recipe.require)
    if not require:
        raise RecipeError(f"{filename}: require: tune needs a budget", 'add e.g. require: {task.accuracy_drop: "<= 1.0"} '
                          'or require: {fidelity.cosine_mean: ">= 0.99"}')
    for metric in require:
        if not metric.startswith(GRAPH_METRICS):
            line = raw["require"].value[metric].line
            raise ctx.fail(f"require.{metric}", line, "tune's budget is a quality bound measured on the graph; "
                           "latency is the objective", "keep fidelity.*, task.* or param_bytes_ratio in require:")
    if tune.backend == "torch" and "torch" not in recipe.emit.formats or tune.backend == "onnxruntime" and "onnx" not in recipe.emit.formats:
        raise ctx.fail("tune.backend", root.value.get("tune", root).line, f"backend {tune.backend} times an artifact emit.formats does not write",
                       "add its format to emit.formats")
    if len(set(names)) != len(names):
        raise RecipeError(f"{filename}: two searched options share the name {names}", "this is a bug in optcc")
    space = Space(filename, sections, tuple(passes), tuple(dims), tune, require)
    for d in dims:  # every choice must make a valid recipe with the other dimensions at their first value
        for v in (d.grid() or [d.low, d.high])[: 64]:
            try:
                space.recipe(space.active({**space.first(), d.name: v}))
            except RecipeError as e:
                raise ctx.fail(d.where, d.line, f"the value {v!r} makes an invalid recipe: {e.message}", e.hint) from None
    return space


def _parse_passes(loc: Located, ctx: _Ctx) -> tuple[list[SpacePass], list[Dim]]:
    specs = reg.registry()
    passes, dims = [], []
    counts: dict[str, int] = {}
    for i, item in enumerate(loc.value):
        where = f"passes[{i}]"
        optional = False
        if isinstance(item.value, str):
            name, params = item.value, Located({}, item.line)
        elif isinstance(item.value, dict) and 1 <= len(item.value) <= 2:
            entries = dict(item.value)
            if "optional" in entries:
                opt = entries.pop("optional")
                if not isinstance(opt.value, bool):
                    raise ctx.fail(f"{where}.optional", opt.line, f"expected true/false, got {opt.value!r}", "write optional: true")
                optional = opt.value
            if len(entries) != 1:
                raise ctx.fail(where, item.line, "each pass is a one-key mapping, plus `optional: true` if the search may leave it out",
                               "write '- pass_name: {param: value}' and, on the next line, '  optional: true'")
            name, params = next(iter(entries.items()))
        else:
            raise ctx.fail(where, item.line, "each pass is a one-key mapping", "write '- pass_name: {param: value}'")
        if name not in specs:
            hint = did_you_mean(name, specs) or f"available: {', '.join(sorted(specs))} (see `optcc passes`)"
            raise ctx.fail(where, item.line, f"unknown pass '{name}'", hint)
        counts[name] = counts.get(name, 0) + 1
        key = name if counts[name] == 1 else f"{name}#{counts[name]}"
        if params.value is not None and not isinstance(params.value, dict):
            raise ctx.fail(f"{where}.{name}", params.line, "expected a mapping of options", "write '- pass_name: {param: value}'")
        hints = typing.get_type_hints(specs[name].config)
        fields = {f.name for f in dataclasses.fields(specs[name].config) if f.init}
        fixed = {}
        if optional:  # before the pass's options: a sampler decides on the pass first
            dims.append(Dim(f"use.{key}", f"{where}.optional", item.line, len(passes), None, choices=(True, False)))
        for opt, v in (params.value or {}).items():
            path = f"{where}.{name}.{opt}"
            if opt not in fields:
                raise ctx.fail(path, v.line, "unknown key", did_you_mean(opt, fields) or f"allowed keys: {', '.join(sorted(fields))}")
            dim = _dim(f"{key}.{opt}", path, v, len(passes), opt, hints[opt], ctx)
            if dim is None:
                fixed[opt] = plain(v)
            else:
                dims.append(dim)
        passes.append(SpacePass(name, fixed, item.line, optional))
    return passes, dims


def _list_only(tp: Any) -> bool:
    """The option only holds lists (e.g. quantize.exclude): a bare list there is its value. Any
    other option (token_merge.r holds an int or a per-block list) reads a bare list as choices."""
    args = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    return all(get_origin(a) in (list, tuple) or a is type(None) for a in args)


def _numeric(tp: Any) -> Optional[type]:
    """int or float when the option holds a number (float wins when both are allowed), else None."""
    args = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    kinds = {a for a in args if a in (int, float)}
    return float if float in kinds else (int if int in kinds else None)


def _dim(name: str, where: str, v: Located, step: int, option: str, tp: Any, ctx: _Ctx) -> Optional[Dim]:
    """The option's search dimension, or None when its value is fixed."""
    value = v.value
    if isinstance(value, dict) and ("range" in value or "choices" in value):
        if "choices" in value:
            extra = set(value) - {"choices"}
            if extra:
                raise ctx.fail(f"{where}.{sorted(extra)[0]}", v.line, "unknown key beside choices", "write {choices: [a, b]}")
            return _choices(name, where, value["choices"], step, option, tp, ctx)
        extra = set(value) - {"range", "step", "log"}
        if extra:
            raise ctx.fail(f"{where}.{sorted(extra)[0]}", v.line, "unknown key in a range", "allowed: range, step, log")
        kind = _numeric(tp)
        if kind is None:
            raise ctx.fail(where, v.line, f"a range needs a numeric option, and {option} is not one",
                           f"give {option} a list of values instead, e.g. {option}: [a, b]")
        bounds = value["range"]
        if not isinstance(bounds.value, list) or len(bounds.value) != 2:
            raise ctx.fail(f"{where}.range", bounds.line, "expected [low, high]", "write range: [4, 16]")
        lo, hi = (convert(b, kind, f"{where}.range", ctx.filename) for b in bounds.value)
        if lo > hi:
            raise ctx.fail(f"{where}.range", bounds.line, f"the space is empty: low {lo} > high {hi}", "swap them")
        by = convert(value["step"], kind, f"{where}.step", ctx.filename) if "step" in value else None
        if by is not None and by <= 0:
            raise ctx.fail(f"{where}.step", value["step"].line, f"step must be > 0, got {by}", "give a positive step")
        log = convert(value["log"], bool, f"{where}.log", ctx.filename) if "log" in value else False
        if log and (lo <= 0 or by is not None):
            raise ctx.fail(f"{where}.log", value["log"].line, "a log range needs low > 0 and no step", "drop log or step")
        return Dim(name, where, v.line, step, option, low=lo, high=hi, by=by, log=log, integer=kind is int)
    if isinstance(value, list) and not _list_only(tp):
        return _choices(name, where, v, step, option, tp, ctx)
    convert(v, tp, where, ctx.filename)  # a fixed value: validate it here, with its line
    return None


def _choices(name: str, where: str, v: Located, step: int, option: str, tp: Any, ctx: _Ctx) -> Dim:
    if not isinstance(v.value, list):
        raise ctx.fail(where, v.line, "choices must be a list", "write choices: [a, b]")
    if not v.value:
        raise ctx.fail(where, v.line, "the space is empty: no values to choose from", "list at least one value")
    values = tuple(convert(c, tp, f"{where}[{k}]", ctx.filename) for k, c in enumerate(v.value))
    return Dim(name, where, v.line, step, option, choices=tuple(plain(c) if isinstance(c, tuple) else c for c in values))


def space_json_schema() -> dict:
    """JSON Schema of a search space: a recipe whose options may be lists or ranges, plus `tune:`."""
    schema = recipe_json_schema()
    rng = {"type": "object", "required": ["range"], "additionalProperties": False,
           "properties": {"range": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                          "step": {"type": "number", "exclusiveMinimum": 0}, "log": {"type": "boolean"}}}
    choices = {"type": "object", "required": ["choices"], "additionalProperties": False,
               "properties": {"choices": {"type": "array", "minItems": 1}}}
    items = []
    for name, s in sorted(reg.registry().items()):
        props = {}
        for k, sub in json_schema(s.config)["properties"].items():
            props[k] = {"anyOf": [sub, {"type": "array", "items": sub, "minItems": 1}, rng, choices]}
        cfg = {"type": "object", "properties": props, "additionalProperties": False}
        items.append({"type": "object", "properties": {name: {"anyOf": [cfg, {"type": "null"}]}, "optional": {"type": "boolean"}},
                      "required": [name], "additionalProperties": False, "description": s.summary})
    items.append({"enum": sorted(reg.registry())})
    schema["title"] = "optcc search space"
    schema["properties"]["passes"] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    schema["properties"]["tune"] = json_schema(Tune)
    schema["required"] = ["version", "passes", "require"]
    return schema
