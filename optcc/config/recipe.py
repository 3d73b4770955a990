"""Recipe: YAML in, a validated, versioned, fully-defaulted Recipe out.

Strict: unknown keys, unknown passes and wrong types fail with the YAML line and a
"did you mean". Pass ordering constraints declared by passes are checked here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from optcc.pipeline import registry as reg
from optcc.errors import RecipeError
from optcc.config.gates import EXPR, METRICS
from optcc.config.schema import Located, convert, did_you_mean, field, json_schema, parse_yaml, to_dict, _Ctx

RECIPE_VERSION = 1
TASKS = ("image-classification", "text-classification", "feature-extraction", "text-generation", "tensor")


@dataclass(frozen=True)
class Inputs:
    """Example input shapes. Token tasks use batch and seq_len; image tasks batch and
    image_size (default: the model config's); `tensors` gives explicit float inputs
    for hand-written models, e.g. {x: [8, 64, 128]}."""

    batch: int = field(2, help="batch size of the example inputs (>= 2 keeps the batch dimension dynamic)")
    seq_len: int = field(32, help="tokens per sequence for token tasks")
    image_size: Optional[int] = field(None, help="image side in pixels (default: from the model config)")
    tensors: Optional[dict[str, tuple[int, ...]]] = field(None, help="explicit float inputs: name -> shape")

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")


@dataclass(frozen=True)
class ModelSection:
    source: Optional[str] = field(None, help="default model when the command line names none, e.g. builtin:vit-digits")
    task: Optional[str] = field(None, help=f"one of {', '.join(TASKS)} (default: inferred from the model)")
    inputs: Inputs = field(default_factory=Inputs, help="example input shapes")
    dynamic: bool = field(True, help="export batch (and sequence) dimensions as dynamic")

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            hint = did_you_mean(self.task, TASKS)
            raise ValueError(f"task '{self.task}' is unknown; {hint or 'use one of ' + ', '.join(TASKS)}")


@dataclass(frozen=True)
class Calibration:
    source: str = field("auto", help="auto (the model's own data or random inputs) | random | builtin:NAME | text-file:PATH | tokens:PATH | jsonl:PATH | safetensors:PATH | images:FOLDER")
    samples: int = field(32, help="number of calibration samples")
    seed: int = field(0, help="seed for random calibration data")

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


@dataclass(frozen=True)
class Evaluate:
    source: str = field("auto", help="auto (the held-out set of a built-in model) | builtin:NAME | text-file:PATH | tokens:PATH | jsonl:PATH | safetensors:PATH | images:FOLDER")
    metric: str = field("auto", help="auto | accuracy | perplexity | embedding")
    samples: int = field(256, help="maximum number of evaluation samples")

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


@dataclass(frozen=True)
class Emit:
    formats: tuple[Literal["onnx", "torch", "exported"], ...] = field(
        ("onnx", "torch"), help="artifacts to write: onnx (model.onnx), torch (model.pt2 compiled by AOTInductor; needs a "
                                "C++ compiler), exported (model.exported.pt2, the uncompiled ExportedProgram)")
    opset: int = field(20, help="ONNX opset (20: GELU exports as one Gelu op, which onnxruntime fuses with its bias)")
    atol: float = field(1e-3, help="max abs difference allowed between a re-loaded artifact and the optimized graph")
    isa: Literal["auto", "avx2", "avx512", "avx512_vnni"] = field(
        "auto", help="CPUs the compiled torch artifact (torch) runs on: avx2 (any x86-64 CPU of the last decade), avx512, "
                     "avx512_vnni (also AMX: int8 GEMMs take full-range weights), or auto (this CPU's; the lock records it)")

    def __post_init__(self) -> None:
        if not self.formats:
            raise ValueError("formats must name at least one of onnx, torch, exported")
        if not 14 <= self.opset <= 23:  # torch.onnx's dynamo exporter targets opset 18+; older ones convert down to 14
            raise ValueError(f"opset must be between 14 and 23, got {self.opset}")
        if self.atol <= 0:
            raise ValueError(f"atol must be > 0, got {self.atol}")


@dataclass(frozen=True)
class Bench:
    backends: tuple[Literal["torch", "onnxruntime"], ...] = field(
        ("torch", "onnxruntime"), help="runtimes to time the artifacts on (torch times model.pt2 and model.exported.pt2)")
    warmup: int = field(3, help="untimed warm-up calls per backend")
    iters: int = field(10, help="minimum timed calls per backend")
    min_seconds: float = field(1.0, help="minimum timed seconds per backend")
    threads: Optional[int] = field(None, help="intra-op threads (default: torch's current setting)")
    enabled: bool = field(True, help="set false to skip timing")

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if self.min_seconds < 0:
            raise ValueError(f"min_seconds must be >= 0, got {self.min_seconds}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or left out for torch's default), got {self.threads}")


@dataclass(frozen=True)
class Generate:
    """Generation benchmark for text-generation models (prefill + greedy decode with the KV cache)."""

    new_tokens: int = field(16, help="tokens generated after the prompt (the prompt is model.inputs.seq_len tokens)")
    batch: int = field(1, help="sequences generated at once")
    rounds: int = field(3, help="timed generations per contender (after one warm-up)")

    def __post_init__(self) -> None:
        if self.new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {self.new_tokens}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")


@dataclass(frozen=True)
class PassStep:
    name: str
    config: Any
    line: int


@dataclass(frozen=True)
class Recipe:
    version: int
    model: ModelSection
    calibration: Calibration
    evaluate: Optional[Evaluate]
    passes: tuple[PassStep, ...]
    emit: Emit
    bench: Bench
    require: dict[str, str]
    generate: Generate = Generate()
    path: str = ""

    def to_dict(self) -> dict:
        d = {
            "version": self.version,
            "model": to_dict(self.model),
            "calibration": to_dict(self.calibration),
            "evaluate": to_dict(self.evaluate) if self.evaluate else None,
            "passes": [{s.name: to_dict(s.config)} for s in self.passes],
            "emit": to_dict(self.emit),
            "bench": to_dict(self.bench),
            "generate": to_dict(self.generate),
            "require": dict(self.require),
        }
        return d


_SECTIONS = {
    "version": None,
    "model": ModelSection,
    "calibration": Calibration,
    "evaluate": Evaluate,
    "passes": None,
    "emit": Emit,
    "bench": Bench,
    "generate": Generate,
    "require": None,
    "lock": None,  # what recipe.lock.yaml records about the run that wrote it; not read back
}


def resolve_auto(recipe: Recipe) -> tuple[Recipe, list[dict]]:
    """The recipe with every pass's `auto` options chosen for this machine (PassSpec.resolve),
    and one {step, pass, option, value, why} per choice. apply writes the resolved recipe to the
    report and the lock, so a lock re-creates the same artifacts on any machine."""
    steps, chosen = [], []
    for i, step in enumerate(recipe.passes, start=1):
        config, why = reg.resolve(step.name, step.config)
        steps.append(dataclasses.replace(step, config=config))
        chosen += [{"step": i, "pass": step.name, "option": k, "value": getattr(config, k), "why": w}
                   for k, w in why.items()]
    return dataclasses.replace(recipe, passes=tuple(steps)), chosen


def read_yaml_file(path: str | Path, what: str, example: str) -> str:
    """The text of a recipe-like YAML file, or one line saying why not (`what`: "recipe")."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such {what} file", f"pass the path of a {what} YAML, e.g. {example}")
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder, not a {what} file", f"pass the path of a {what} YAML")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read: {e}", "pass a UTF-8 YAML file") from e


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_yaml_file(path, "recipe", "recipes/quickstart.yaml"), str(path))


def parse_recipe(text: str, filename: str = "<recipe>") -> Recipe:
    root = parse_yaml(text, filename)
    ctx = _Ctx(filename)
    if not isinstance(root.value, dict):
        kind = "a list" if isinstance(root.value, list) else f"a {type(root.value).__name__}"
        raise RecipeError(f"{filename}:{root.line}: the recipe must be a mapping of sections, got {kind}",
                          "start from recipes/quickstart.yaml (version, model, passes, emit, bench)")
    raw = root.value
    for key, loc in raw.items():
        if key not in _SECTIONS:
            hint = did_you_mean(key, _SECTIONS) or f"sections are: {', '.join(_SECTIONS)}"
            raise ctx.fail(key, loc.line, "unknown section", hint)
    if "version" not in raw:
        raise RecipeError(f"{filename}:1: missing 'version: {RECIPE_VERSION}'", f"add 'version: {RECIPE_VERSION}' at the top")
    version = convert(raw["version"], int, "version", filename)
    if version != RECIPE_VERSION:
        raise ctx.fail("version", raw["version"].line, f"unsupported recipe version {version}",
                       f"this optcc reads version {RECIPE_VERSION}")

    def section(name: str, cls: type) -> Any:
        loc = raw.get(name)
        return convert(loc if loc is not None else Located({}, 1), cls, name, filename)

    evaluate = section("evaluate", Evaluate) if "evaluate" in raw and raw["evaluate"].value is not None else None
    passes = _parse_passes(raw.get("passes"), filename, ctx)
    require = convert(raw["require"], dict[str, str], "require", filename) if "require" in raw else {}
    for metric, expr in require.items():
        line = raw["require"].value[metric].line
        if metric not in METRICS:
            hint = did_you_mean(metric, METRICS) or "see docs/ci.md for the metric names"
            raise ctx.fail(f"require.{metric}", line, "unknown metric", hint)
        if not EXPR.match(expr):
            raise ctx.fail(f"require.{metric}", line, f"cannot parse '{expr}'", "write a comparison like \">= 1.5\" or \"<= 40\"")
    return Recipe(
        version=version,
        model=section("model", ModelSection),
        calibration=section("calibration", Calibration),
        evaluate=evaluate,
        passes=passes,
        emit=section("emit", Emit),
        bench=section("bench", Bench),
        generate=section("generate", Generate),
        require=require,
        path=filename,
    )


def _parse_passes(loc: Optional[Located], filename: str, ctx: _Ctx) -> tuple[PassStep, ...]:
    if loc is None or loc.value is None:
        return ()
    if not isinstance(loc.value, list):
        raise ctx.fail("passes", loc.line, "expected a list of passes", "write each pass as '- name: {params}'")
    specs = reg.registry()
    steps = []
    for i, item in enumerate(loc.value):
        where = f"passes[{i}]"
        if isinstance(item.value, str):  # "- cleanup" shorthand: a pass with its defaults
            name, params = item.value, Located({}, item.line)
        elif isinstance(item.value, dict) and len(item.value) == 1:
            name, params = next(iter(item.value.items()))
        else:
            raise ctx.fail(where, item.line, "each pass is a one-key mapping", "write '- pass_name: {param: value}'")
        if name not in specs:
            hint = did_you_mean(name, specs) or f"available: {', '.join(sorted(specs))} (see `optcc passes`)"
            raise ctx.fail(where, item.line, f"unknown pass '{name}'", hint)
        cfg = convert(params if params.value is not None else Located({}, params.line), specs[name].config,
                      f"passes[{i}].{name}", filename)
        steps.append(PassStep(name, cfg, item.line))
    _check_order(steps, specs, filename)
    return tuple(steps)


def _check_order(steps: list[PassStep], specs: dict[str, reg.PassSpec], filename: str) -> None:
    for step in steps:
        for earlier in specs[step.name].after:
            later_pos = [s for s in steps[steps.index(step) + 1:] if s.name == earlier]
            if later_pos:
                raise RecipeError(
                    f"{filename}:{step.line}: pass '{step.name}' must run after '{earlier}' (line {later_pos[0].line})",
                    f"move '{earlier}' above '{step.name}'",
                )


def recipe_json_schema() -> dict:
    """JSON Schema of the recipe, generated from the same dataclasses that validate it."""
    specs = reg.registry()
    pass_items = [
        {"type": "object", "properties": {name: {"anyOf": [json_schema(s.config), {"type": "null"}]}},
         "required": [name], "additionalProperties": False, "description": s.summary}
        for name, s in sorted(specs.items())
    ] + [{"enum": sorted(specs)}]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "optcc recipe",
        "type": "object",
        "required": ["version"],
        "additionalProperties": False,
        "properties": {
            "version": {"const": RECIPE_VERSION},
            "model": json_schema(ModelSection),
            "calibration": json_schema(Calibration),
            "evaluate": json_schema(Evaluate),
            "passes": {"type": "array", "items": {"anyOf": pass_items}},
            "emit": json_schema(Emit),
            "bench": json_schema(Bench),
            "generate": json_schema(Generate),
            "require": {"type": "object", "propertyNames": {"enum": sorted(METRICS)}, "additionalProperties": {"type": "string", "pattern": EXPR.pattern},
                        "description": "CI gates: metric -> comparison, e.g. speedup: '>= 1.5'"},
            "lock": {"type": "object", "description": "written by optcc into recipe.lock.yaml (model and artifact "
                                                      "hashes, versions); ignored when the lock is applied"},
        },
    }


def dump_lock(recipe: Recipe, record: dict) -> str:
    """recipe.lock.yaml: the resolved recipe (every `auto` chosen), itself a recipe, so that
    `optcc apply recipe.lock.yaml` rebuilds the same artifacts on any machine, plus a `lock:`
    section that records the run (model hash, versions, artifact hashes) and is not read back."""
    head = "# optcc lock: the resolved recipe of one run. `optcc apply` it to rebuild the same artifacts.\n"
    return head + yaml.safe_dump({**recipe.to_dict(), "lock": record}, sort_keys=False)
