"""The report's types: what `optcc apply` writes to report.json, as typed records.

report.json is the contract for CI and machines; report.md, the terminal table and
`optcc diff` are views of it. Its JSON Schema is generated from these dataclasses
(`optcc schema --report`, published as docs/report.schema.json), so the documentation
cannot drift from what apply writes. Sections whose content depends on the pass or the
backend (a pass's stats, latency per backend) are JSON objects described in docs/report.md.

To add a field: add it here with a `help`, fill it where the record is built (api.py for
the report, pipeline/manager.py for pass records), regenerate the schema.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from optcc.config.schema import field, json_schema

Json = dict[str, Any]


@dataclass
class GraphStats:
    """Size and work of one graph on the example inputs."""

    nodes: int = field(help="call_function nodes")
    params: int = field(help="parameter and buffer elements the graph reads")
    param_bytes: int = field(help="bytes of those tensors")
    flops: Optional[int] = field(help="floating-point (and integer) operations for the example inputs; null if not countable")


@dataclass
class PassRecord:
    """What one pass did: its resolved config, the graph before and after, what it cost in
    fidelity (against the original model) and, when the recipe benchmarks, what it gained."""

    name: str = field(help="pass name")
    step: int = field(help="1-based position in the recipe")
    config: Json = field(help="the pass's config with every option filled in")
    modified: bool = field(help="the pass changed the graph")
    nodes_added: int = field(help="nodes in the graph after and not before")
    nodes_removed: int = field(help="nodes in the graph before and not after")
    before: GraphStats = field(help="the graph the pass got")
    after: GraphStats = field(help="the graph it returned")
    fidelity: Json = field(help="primary output vs the original model on the example inputs: cosine_mean, cosine_min, "
                                "max_abs_err, finite, top1_agreement (classifiers and LMs)")
    seconds: float = field(help="time the pass took")
    stats: Json = field(help="pass-specific data (see the pass's doc)")
    task_metric: Optional[Json] = field(help="task metric of this graph vs the original, when evaluation data exist")
    latency_ms: Optional[float] = field(help="p50 of this graph (torch, op by op), when the recipe benchmarks")
    speedup_vs_captured: Optional[float] = field(help="p50 of the captured graph over p50 of this one, timed interleaved")
    blocks: list[Json] = field(help="per block: nodes added and removed, parameter bytes before and after")
    graph_diff: Any = field(help="in report.json: the path of this pass's node diff (graphs/NN-name.diff)")

    def to_dict(self) -> Json:
        return dataclasses.asdict(self)


@dataclass
class RecipeInfo:
    path: str = field(help="the recipe file given to apply")
    resolved: Json = field(help="the recipe with defaults filled and `auto` resolved")
    chosen: list[Json] = field(help="each `auto` option and why it took its value: step, pass, option, value, why")


@dataclass
class ModelInfo:
    """The model as intake loaded it."""

    source: str = field(help="MODEL as given (builtin:NAME, a folder, a .pt2, a factory)")
    name: str = field(help="model name")
    task: str = field(help="task the model was loaded for")
    params: int = field(help="parameters of the original model")
    weights_sha256: Optional[str] = field(help="hash of the weights read")
    causal: Optional[bool] = field(help="measured: changing the last token leaves earlier outputs unchanged")


@dataclass
class Report:
    """report.json, version 1."""

    optcc_report: int = field(help="report format version (1)")
    recipe: RecipeInfo = field(help="the recipe as run; `resolved` is what recipe.lock.yaml holds, so applying "
                                    "the lock rebuilds the same artifacts on any machine")
    model: ModelInfo = field(help="the model as loaded")
    inputs: dict[str, list[int]] = field(help="the artifacts' input shapes (after passes)")
    latency: Optional[Json] = field(help="baseline (torch eager fp32) and each artifact, timed interleaved: baseline, "
                                         "optimized {backend: timing}, speedup_by_backend, speedup, best_backend, best, threads; "
                                         "null when bench is disabled")
    fidelity: Json = field(help="the worst artifact's primary output vs the original model, and by_artifact")
    task_metric: Optional[Json] = field(help="metric on evaluation data: metric, source, samples, baseline, optimized, "
                                             "delta, by_artifact")
    generation: Optional[Json] = field(help="decoders: prefill, time to first token, decode tokens/s, KV bytes per token")
    greedy_match: Optional[Any] = field(help="decoders: greedy tokens of the artifacts vs the original")
    captured: Json = field(help="the captured graph: GraphStats fields, latency_ms, task_metric")
    passes: list[PassRecord] = field(help="one record per recipe step, in order")
    artifacts: list[Json] = field(help="each artifact: format, path, bytes, sha256, check (re-loaded vs the graph)")
    memory: Json = field(help="process_peak_rss_mb")
    environment: Json = field(help="versions, threads and CPU facts (model, flags) the numbers were taken with")
    requirements: list[Json] = field(help="`require:` gates: metric, require, value, ok")
    regressions: list[Json] = field(help="with --baseline: metric, previous, current, tolerance, relative, ok")
    seconds: float = field(help="wall time of apply")

    def to_dict(self) -> Json:
        return dataclasses.asdict(self)


def report_json_schema() -> Json:
    """JSON Schema of report.json, from the dataclasses above."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "optcc report", **json_schema(Report)}
