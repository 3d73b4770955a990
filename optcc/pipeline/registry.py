"""The pass contract and its one explicit registry.

A pass is one file in passes/: a frozen Config dataclass and
`run(gm, cfg, ctx) -> PassResult`, registered with `@register(...)`.
passes/__init__.py imports every pass module by name; nothing is discovered.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch.fx

    from optcc.pipeline.context import PassContext


# How an artifact's outputs are compared with the graph's where a pass makes them differ
# legitimately: (got, expected, output names) -> (got, expected, stats for the artifact check).
Align = Callable[[list, list, list], tuple[list, list, dict]]


@dataclass
class PassResult:
    """What a pass hands back. `stats` is free-form JSON data for the report
    (e.g. removed blocks, tokens per block); passes never print. `align`, when set, is
    applied by the artifact check to every artifact built from this graph or a later one
    (the pass knows its outputs; emit does not)."""

    gm: "torch.fx.GraphModule"
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    align: Align | None = None


@dataclass(frozen=True)
class PassSpec:
    name: str
    config: type
    run: Callable[..., PassResult]
    summary: str
    lossless: bool  # the manager then requires outputs to match the reference
    # The graph rounds values to integer codes (quantization). Its artifacts compute the same
    # codes in another runtime, where float rounding can move a value across a rounding boundary
    # and flip one code, so emit checks them against the graph's own quantization error rather
    # than a fixed tolerance (optcc.export.emit.verify).
    rounds: bool
    after: tuple[str, ...]  # if present in a recipe, these passes must come earlier
    tasks: tuple[str, ...] | None  # tasks the pass accepts (None = any)
    # Replaces the config's `auto` options by what suits this machine: (config, {option: why}).
    # Called once per apply before any pass runs; the resolved config goes into the report and
    # the lock, so applying the lock gives the same artifacts on any machine. None: no `auto`.
    resolve: Callable[[Any], tuple[Any, dict[str, str]]] | None = None


_REGISTRY: dict[str, PassSpec] = {}


def register(
    name: str,
    config: type,
    *,
    summary: str,
    lossless: bool = False,
    rounds: bool = False,
    after: tuple[str, ...] = (),
    tasks: tuple[str, ...] | None = None,
    resolve: Callable[[Any], tuple[Any, dict[str, str]]] | None = None,
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"pass {name}: config must be a dataclass")

    def deco(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        if name in _REGISTRY:
            raise RuntimeError(f"pass '{name}' registered twice")
        _REGISTRY[name] = PassSpec(name, config, fn, summary, lossless, rounds, tuple(after), tasks, resolve)
        return fn

    return deco


def registry() -> dict[str, PassSpec]:
    import optcc.passes  # noqa: F401  (registers the built-in passes)

    return dict(_REGISTRY)


def get(name: str) -> PassSpec:
    return registry()[name]


def resolve(name: str, config: Any) -> tuple[Any, dict[str, str]]:
    """The step's config with its `auto` options chosen for this machine, and why each was chosen."""
    spec = get(name)
    return spec.resolve(config) if spec.resolve is not None else (config, {})
