"""layer_skip: remove whole blocks, or their attention or MLP sublayers, without retraining.

Each candidate is a cut in the residual stream: a node whose uses are handed to
an earlier node (`replacement`), after which dead-code elimination takes the
skipped layer and its weights away.

- block: uses of the block's output outside the block read its input instead.
- attention / mlp, pre-norm: the sublayer's residual add is replaced by its stream
  operand (the operand that does not come from the sublayer's last projection).
- attention / mlp, post-norm (BERT): the norm after the residual add is replaced by
  the stream operand. This also drops that norm; since the stream is the previous
  norm's output it is already normalised, which is the approximation made.

Which cuts: `influence` scores each candidate by Block Influence (1 - mean cos of
the replacement vs the replaced value on calibration data) and drops the lowest;
`angular` drops the run of consecutive blocks whose input and output are closest in
angle; `explicit` drops the listed indices (still scored, for the report). Math
lives in optcc/algorithms/influence.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch.fx as fx

from optcc.algorithms import influence
from optcc.graph.cacheio import CacheIO
from optcc.pipeline.context import PassContext
from optcc.errors import PassError
from optcc.graph.probe import record
from optcc.pipeline.registry import PassResult, register
from optcc.config.schema import field
from optcc.graph.stats import is_impure_at_inference
from optcc.graph.fx import is_norm, module_path, module_paths, node_order
from optcc.graph.structure import LINEAR, Block, Structure

SELECTS = ("influence", "angular", "explicit")
GRANULARITIES = ("block", "attention", "mlp")
DEFAULT_RATIO = 0.25  # ShortGPT's operating point: ~25% of Llama-2 layers at ~92% of benchmark quality


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Config:
    """Give `drop` or `ratio` (neither: ratio 0.25), or `select: explicit` with `layers`.
    Indices count blocks from 0; negative ones count from the end."""

    drop: Optional[int] = field(None, help="how many candidates to remove (>= 1)")
    ratio: Optional[float] = field(None, help="fraction of candidates to remove, in (0, 1), rounded down, at least 1 (default 0.25 when drop is not given)")
    select: Literal["influence", "angular", "explicit"] = field(
        "influence", help="influence: lowest Block Influence; angular: most redundant run of consecutive blocks; explicit: `layers`")
    granularity: Literal["block", "attention", "mlp"] = field("block", help="remove whole blocks, or only their attention or MLP sublayer")
    layers: Optional[tuple[int, ...]] = field(None, help="block indices to remove with select: explicit")
    keep: tuple[int, ...] = field((), help="block indices never removed, e.g. [0, -1]")

    def __post_init__(self) -> None:
        # Python callers may pass lists; the frozen config always holds tuples.
        for name in ("layers", "keep"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        if self.select not in SELECTS:
            raise ValueError(f"select '{self.select}' is unknown; use one of {', '.join(SELECTS)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity '{self.granularity}' is unknown; use one of {', '.join(GRANULARITIES)}")
        if self.drop is not None and (not _is_int(self.drop) or self.drop < 1):
            raise ValueError(f"drop must be an integer >= 1, got {self.drop!r}")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
                raise ValueError(f"ratio must be a number strictly between 0 and 1, got {self.ratio!r}")
        if self.drop is not None and self.ratio is not None:
            raise ValueError(f"give drop or ratio, not both (got drop {self.drop} and ratio {self.ratio})")
        for name in ("layers", "keep"):
            v = getattr(self, name) or ()
            bad = [x for x in v if not _is_int(x)]
            if bad:
                raise ValueError(f"{name} must be a list of integers, got {bad[0]!r}")
        if self.select == "explicit":
            if not self.layers:
                raise ValueError("select: explicit needs layers, e.g. layers: [5, 6]")
            if self.drop is not None or self.ratio is not None:
                raise ValueError("select: explicit takes the count from layers; remove drop/ratio")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers lists an index twice: {list(self.layers)}")
        elif self.layers is not None:
            raise ValueError(f"layers is only read with select: explicit (select is '{self.select}')")
        if self.select == "angular" and self.granularity != "block":
            raise ValueError(f"select: angular removes runs of whole blocks; granularity must be block, got '{self.granularity}'")
        if self.select != "explicit" and self.drop is None and self.ratio is None:
            object.__setattr__(self, "ratio", DEFAULT_RATIO)


@dataclass
class Cut:
    """One removable candidate: uses of `replaced` go to `replacement`."""

    index: int  # block index
    name: str  # module path of what goes away (block, attention or MLP)
    replaced: fx.Node
    replacement: fx.Node
    inside: frozenset  # nodes whose uses of `replaced` stay (a block's own members)
    linears: tuple[str, ...]  # module paths of the linear layers that must disappear
    cache: Optional[dict] = None  # decoder graphs: the attention's past K/V inputs (Attention.cache)


# ---------------------------------------------------------------------------- candidates


def _nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _members(gm: fx.GraphModule, path: str) -> set[fx.Node]:
    return {n for n in gm.graph.nodes if n.op == "call_function" and path in module_paths(n)}


def _descendants(start: fx.Node, limit: fx.Node, order: dict) -> set[fx.Node]:
    """Nodes reachable from `start` that come no later than `limit` in graph order."""
    seen, todo = {start}, [start]
    while todo:
        for u in todo.pop().users:
            if u not in seen and order[u] <= order[limit]:
                seen.add(u)
                todo.append(u)
    return seen


def _norm_output(gm: fx.GraphModule, first: fx.Node) -> fx.Node:
    """The node that carries a norm module's result out of it (a norm may be several ops)."""
    path = module_path(first)
    inside = [n for n in gm.graph.nodes if n.op == "call_function" and module_path(n) == path]
    outs = [n for n in inside if any(module_path(u) != path for u in n.users)]
    return outs[-1] if outs else first


def _sublayer_cut(gm, s: Structure, b: Block, kind: str, order: dict) -> Optional[Cut]:
    nodes = _nodes(gm)
    if kind == "attention":
        a = b.attention
        proj, add_name = (a.o if a else None), b.attn_residual
        name, linears = (a.path if a else ""), tuple(p for p in (a.q, a.k, a.v, a.o) if p) if a else ()
    else:
        proj, add_name = (b.mlp.down if b.mlp else None), b.mlp_residual
        name, linears = (b.mlp.path if b.mlp else ""), tuple(b.mlp.linears) if b.mlp else ()
    if name == b.path:  # the sublayer is no single module (BERT's intermediate + output)
        name = f"{b.path}[{kind}]"
    lin = s.linear(proj) if proj else None
    if lin is None or add_name is None:
        return None
    add, proj_node = nodes[add_name], nodes[lin.node]
    branch = _descendants(proj_node, add, order)
    stream = [a for a in add.args[:2] if isinstance(a, fx.Node) and a not in branch]
    if len(stream) != 1:
        return None
    replaced = add
    if b.norm_position == "post":
        norms = [u for u in add.users if is_norm(u)]
        if len(norms) != 1:
            return None
        replaced = _norm_output(gm, norms[0])
    cache = b.attention.cache if kind == "attention" and b.attention else None
    return Cut(b.index, name, replaced, stream[0], frozenset(), tuple(sorted(set(linears))), cache)


def candidates(gm: fx.GraphModule, s: Structure, granularity: str) -> list[Cut]:
    order = node_order(gm.graph)
    nodes = _nodes(gm)
    out = []
    for b in s.blocks:
        if granularity == "block":
            inside = _members(gm, b.path)
            linears = tuple(sorted({module_path(n) for n in inside if n.target in LINEAR}))
            cache = b.attention.cache if b.attention else None
            out.append(Cut(b.index, b.path, nodes[b.output], nodes[b.input], frozenset(inside), linears, cache))
        else:
            cut = _sublayer_cut(gm, s, b, granularity, order)
            if cut is not None:
                out.append(cut)
    return out


# ---------------------------------------------------------------------------- selection


def _resolve(indices, n_blocks: int, what: str) -> list[int]:
    out = []
    for i in indices:
        if not -n_blocks <= i < n_blocks:
            raise PassError(f"{what} index {i} is out of range: the model has {n_blocks} blocks "
                            f"(indices 0..{n_blocks - 1}, or -{n_blocks}..-1 from the end)",
                            f"use indices below {n_blocks}")
        out.append(i % n_blocks)
    return out


def _count(cfg: Config, n: int, allowed: int, unit: str) -> int:
    k = cfg.drop if cfg.drop is not None else max(1, int(cfg.ratio * n))
    what = f"drop {cfg.drop}" if cfg.drop is not None else f"ratio {cfg.ratio} ({k} of {n})"
    if k >= n:
        raise PassError(f"{what} would remove all {n} {unit}s; at most {n - 1} can go",
                        f"use drop <= {n - 1} or a smaller ratio")
    if k > allowed:
        raise PassError(f"{what} asks for {k} {unit}s but keep leaves only {allowed} of {n} removable",
                        "shorten keep or drop fewer")
    return k


def _batches(ctx: PassContext) -> tuple[list[dict], str]:
    batches = ctx.calibration()
    return (list(batches), "calibration") if batches else ([ctx.inputs], "example inputs")


def _calibrate(gm, ctx: PassContext, pairs: dict, angle: bool) -> tuple[dict, dict]:
    """Mean over calibration tokens of BI (or angular distance) for each key of
    pairs = {key: (h_in node, h_out node)}; one batch's activations at a time."""
    batches, source = _batches(ctx)
    names = {n.name for pair in pairs.values() for n in pair}
    acc = influence.Running()
    step = ctx.progress("layer_skip: scoring layers", len(batches))
    for batch in batches:
        vals = record(gm, [batch], names)
        mask = batch.get("attention_mask")
        for key, (h_in, h_out) in pairs.items():
            a, b = vals[h_in.name][0], vals[h_out.name][0]
            acc.add(key, influence.angle_sum(a, b, mask) if angle else influence.cosine_sum(a, b, mask))
        step(1)
    tokens = next(iter(acc.tokens.values()), 0.0)
    means = {k: (acc.mean(k) if angle else 1.0 - acc.mean(k)) for k in pairs}
    return means, {"source": source, "batches": len(batches), "tokens": int(tokens)}


def _select_angular(gm, ctx, s: Structure, cfg: Config, keep: set[int]) -> tuple[list[int], list[dict], dict]:
    blocks = {b.index: b for b in s.blocks}
    n = len(s.blocks)
    k = _count(cfg, n, n - len(keep), "block")
    starts = [l for l in influence.runs(n, k, keep) if all(i in blocks for i in range(l, l + k))]
    if not starts:
        raise PassError(f"no run of {k} consecutive blocks avoids keep {sorted(keep)} in a model of {n} blocks",
                        "shorten keep, drop fewer, or use select: influence")
    nodes = _nodes(gm)
    pairs = {l: (nodes[blocks[l].input], nodes[blocks[l + k - 1].output]) for l in starts}
    dist, calib = _calibrate(gm, ctx, pairs, angle=True)
    best = influence.best_run(dist)
    scores = [{"index": l, "name": f"{blocks[l].path}..{blocks[l + k - 1].path}", "score": round(dist[l], 6)} for l in starts]
    return list(range(best, best + k)), scores, calib


def _explicit(cfg: Config, s: Structure, cuts: list[Cut], keep: set[int], unit: str) -> list[int]:
    chosen = _resolve(cfg.layers, len(s.blocks), "layers")
    have = {c.index for c in cuts}
    missing = [i for i in chosen if i not in have]
    if missing:
        raise PassError(f"block {missing[0]} has no removable {unit} (found in blocks {sorted(have)})",
                        "pick other layers or another granularity")
    clash = sorted(set(chosen) & keep)
    if clash:
        raise PassError(f"layers {clash} are also in keep", "remove them from one of the two lists")
    if len(chosen) >= len(cuts):
        raise PassError(f"layers names all {len(cuts)} {unit}s; at most {len(cuts) - 1} can go", "keep at least one")
    return sorted(chosen)


def _select(gm, ctx, s: Structure, cfg: Config, cuts: list[Cut], keep: set[int]) -> tuple[list[int], list[dict], dict]:
    unit = "block" if cfg.granularity == "block" else f"{cfg.granularity} sublayer"
    # Validate the request before spending time on calibration.
    if cfg.select == "explicit":
        chosen = _explicit(cfg, s, cuts, keep, unit)
    else:
        k = _count(cfg, len(cuts), sum(c.index not in keep for c in cuts), unit)
    bi, calib = _calibrate(gm, ctx, {c.index: (c.replacement, c.replaced) for c in cuts}, angle=False)
    scores = [{"index": c.index, "name": c.name, "score": round(bi[c.index], 6)} for c in cuts]
    if cfg.select != "explicit":
        order = [c.index for c in cuts]
        picked = influence.lowest([bi[i] for i in order], k, [p for p, i in enumerate(order) if i in keep])
        chosen = sorted(order[p] for p in picked)
    return chosen, scores, calib


# ---------------------------------------------------------------------------- surgery


def _cut(gm: fx.GraphModule, cuts: list[Cut]) -> dict:
    """Rewire the residual stream around each cut; decoders lose the removed attentions'
    cache slots. Returns the removed cache inputs and KV bytes per token (decoders)."""
    order = node_order(gm.graph)
    # Latest first: a later cut may hand its uses to a node an earlier cut then replaces.
    for c in sorted(cuts, key=lambda c: order[c.replaced], reverse=True):
        c.replaced.replace_all_uses_with(c.replacement, delete_user_cb=lambda u, inside=c.inside: u not in inside)
    # A removed attention's present K/V still read its projections: take its slots out of the
    # cache (inputs and outputs), so they die with it and the cache shrinks. The pass manager
    # then follows the new layout (PassContext.follow_cache), as for kv_share.
    gone = [c.cache[k] for c in cuts if c.cache for k in ("key", "value") if c.cache.get(k)]
    cache = {}
    if gone:
        io = CacheIO(gm, "layer_skip")
        before = io.kv_bytes()
        io.drop({name[len("past_"):] for name in gone})
        after = CacheIO(gm, "layer_skip").kv_bytes()
        cache = {"kv_cache_removed": gone,
                 "kv_bytes_per_token": {"before": before, "after": after, "ratio": round(after / before, 4)}}
    # Default DCE keeps unused sdpa/dropout and export's metadata asserts; in an eval graph
    # they go with the values they read (else an assert would keep a skipped layer alive).
    gm.graph.eliminate_dead_code(is_impure_node=is_impure_at_inference)
    gm.recompile()
    return cache


def _still_read(gm: fx.GraphModule, linears: tuple[str, ...]) -> list[str]:
    live = {module_path(n) for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR}
    return sorted(live.intersection(linears))


@register("layer_skip", Config, summary="remove the least useful blocks, attention or MLP sublayers (ShortGPT influence, angular distance)")
def run(gm: fx.GraphModule, cfg: Config, ctx: PassContext) -> PassResult:
    s = ctx.structure(gm)
    if not s.blocks:
        raise PassError("layer_skip found no transformer blocks in this model" + (f" ({s.notes[0]})" if s.notes else ""),
                        "it needs a module list of repeated blocks (e.g. layers.0, layers.1, ...); see `optcc inspect`")
    s.refuse_shared_blocks("layer_skip")
    n_blocks = len(s.blocks)
    keep = set(_resolve(cfg.keep, n_blocks, "keep"))
    cuts = candidates(gm, s, cfg.granularity)
    if not cuts:
        raise PassError(f"no block has a {cfg.granularity} sublayer closed by a residual add that can be cut",
                        "use granularity: block")
    if cfg.select == "angular":
        chosen, scores, calib = _select_angular(gm, ctx, s, cfg, keep)
    else:
        chosen, scores, calib = _select(gm, ctx, s, cfg, cuts, keep)
    picked = [c for c in cuts if c.index in chosen]
    cache = _cut(gm, picked)
    for c in picked:
        left = _still_read(gm, c.linears)
        if left:
            raise PassError(f"{c.name} is still needed after the cut: the model reads {left[0]} elsewhere "
                            "(e.g. it outputs attention weights or a cache computed inside the layer)",
                            "export the model without extra outputs, or keep this layer")
    stats = {
        "select": cfg.select,
        "granularity": cfg.granularity,
        "metric": "angular_distance" if cfg.select == "angular" else "block_influence",
        "candidates": len(cuts),
        "removed": [c.name for c in picked],
        "removed_indices": [c.index for c in picked],
        "removed_linears": [p for c in picked for p in c.linears],
        "blocks_before": n_blocks,
        "blocks_after": n_blocks - len(picked) if cfg.granularity == "block" else n_blocks,
        "scores": scores,
        "calibration": calib,
    }
    stats.update(cache)  # decoders: the cache slots that went and KV bytes per token
    return PassResult(gm, modified=True, stats=stats)
