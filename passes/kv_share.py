"""kv_share: share or merge the KV cache across layers of a decoder (explicit-cache graph).

share (Cross-Layer Attention): a consumer layer j attends with the post-rotary K/V
of a producer layer i < j, including i's past. In the graph every use of j's
present K/V (the concat of its past and its new K/V) reads i's instead; j's
k/v projections and rotary die (DCE), and j's past inputs and present outputs
leave the signature. Not training-free: `heal` runs a short self-distillation of
the remaining weights against the original model's logits.

merge (MiniCache, training-free): from the `start` depth fraction up, adjacent
layers (i, i+1) store one cache per pair: a SLERP-merged direction, each layer's
per-token norms and the least similar token pairs kept exactly (optcc/algorithms/kvmath.py).
The graph restores both layers' past K/V from those inputs, attends as before
(the new tokens exact), and re-merges the whole sequence into its outputs, so
bytes per token drop. Merging a restored cache again is the identity for merged
tokens, which is what makes re-merging at every decode step sound.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from optcc.algorithms import kvmath
from optcc.ops import kv_cache
from optcc.graph.cacheio import CacheIO, fake_like, retarget_sizes
from optcc.graph.fx import node_order
from optcc.pipeline.context import PassContext
from optcc.errors import PassError
from optcc.graph.probe import record
from optcc.pipeline.registry import PassResult, register
from optcc.config.schema import field
from optcc.graph.fx import module_path
from optcc.graph.structure import LINEAR, Attention

aten = torch.ops.aten
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SPLITS = {aten.split.Tensor}  # split by chunk size: a q-only input gives one chunk


@dataclass(frozen=True)
class Heal:
    """Self-distillation after sharing: KL(original logits || shared logits) on calibration text."""

    steps: int = field(200, help="optimizer steps (cycling over the calibration batches)")
    lr: float = field(1e-4, help="AdamW learning rate")

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"heal.steps must be an integer >= 1, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"heal.lr must be > 0, got {self.lr!r}")


@dataclass(frozen=True)
class Config:
    """mode share: give `factor` (default 2) or `pairs`; mode merge: `start`, `t`, `retain`."""

    mode: Literal["share", "merge"] = field("share", help="share: consumers read a producer's K/V (CLA); merge: MiniCache SLERP merge of adjacent layers")
    factor: Optional[int] = field(None, help="share: keep one cache per `factor` layers (CLA-2 = 2); must divide the layer count")
    pairs: Optional[tuple[tuple[int, int], ...]] = field(None, help="share: explicit [producer, consumer] layer pairs, producer first")
    select: Literal["index", "similarity"] = field("index", help="share with factor: index = groups of adjacent layers; similarity = the most similar K/V on calibration data")
    heal: Optional[Heal] = field(None, help="share: self-distil the remaining weights against the original logits, e.g. {steps: 200, lr: 1e-4}")
    start: Optional[float] = field(None, help="merge: first merged layer as a depth fraction in (0, 1) (default 0.5)")
    t: Optional[float] = field(None, help="merge: SLERP interpolation in [0, 1] (0 = the lower layer's direction; default 0.6)")
    retain: Optional[float] = field(None, help="merge: fraction of least similar token pairs kept unmerged, in [0, 1) (default 0.05)")

    def __post_init__(self) -> None:
        if isinstance(self.pairs, list):
            object.__setattr__(self, "pairs", tuple(tuple(p) for p in self.pairs))
        share_keys = {k: getattr(self, k) for k in ("factor", "pairs", "heal")}
        merge_keys = {k: getattr(self, k) for k in ("start", "t", "retain")}
        if self.mode == "merge":
            wrong = [k for k, v in share_keys.items() if v is not None] + (["select"] if self.select != "index" else [])
            if wrong:
                raise ValueError(f"{wrong[0]} applies to mode share, not merge (merge is training-free and pairs adjacent layers from `start`)")
            defaults = {"start": 0.5, "t": 0.6, "retain": 0.05}
            for k, v in merge_keys.items():
                if v is None:
                    object.__setattr__(self, k, defaults[k])
            if not 0.0 < self.start < 1.0:
                raise ValueError(f"start must be a depth fraction strictly between 0 and 1, got {self.start}")
            if not 0.0 <= self.t <= 1.0:
                raise ValueError(f"t must be in [0, 1], got {self.t}")
            if not 0.0 <= self.retain < 1.0:
                raise ValueError(f"retain must be in [0, 1), got {self.retain}")
            return
        wrong = [k for k, v in merge_keys.items() if v is not None]
        if wrong:
            raise ValueError(f"{wrong[0]} applies to mode merge, not share")
        if self.factor is not None and self.pairs is not None:
            raise ValueError("give factor or pairs, not both")
        if self.pairs is not None:
            if not self.pairs:
                raise ValueError("pairs is empty; give [producer, consumer] pairs such as [[4, 5]]")
            for p in self.pairs:
                if len(p) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in p):
                    raise ValueError(f"each pair must be [producer, consumer] layer indices, got {list(p)}")
                if p[0] >= p[1]:
                    raise ValueError(f"pair {list(p)}: the producer must come before the consumer (it computes the K/V the consumer reads)")
            if self.select != "index":
                raise ValueError("select: similarity picks pairs itself; use it with factor, not pairs")
        elif self.factor is None:
            object.__setattr__(self, "factor", 2)
        if self.factor is not None and (isinstance(self.factor, bool) or self.factor < 2):
            raise ValueError(f"factor must be an integer >= 2, got {self.factor}")


# ---------------------------------------------------------------------------- cache I/O


def _layers(gm: fx.GraphModule, ctx: PassContext) -> dict[int, Attention]:
    s = ctx.structure(gm)
    out = {}
    for b in s.blocks:
        a = b.attention
        if a is not None and a.cache and "key" in a.cache and "value" in a.cache:
            out[int(a.cache["slot"])] = a
    if not out:
        raise PassError("kv_share found no attention reading an explicit KV cache (past_key_i / past_value_i)",
                        "use a decoder with task text-generation; `optcc inspect MODEL` shows the cache slots")
    return dict(sorted(out.items()))


def _to_slots(pairs: list[tuple[int, int]], slots: list[int]) -> list[tuple[int, int]]:
    """Layer positions (0..n-1 among the layers with a cache) -> their cache slot numbers."""
    n = len(slots)
    for i, j in pairs:
        bad = next((x for x in (i, j) if not 0 <= x < n), None)
        if bad is not None:
            raise PassError(f"kv_share pair [{i}, {j}]: layer {bad} is out of range or has no cache (layers 0..{n - 1})",
                            f"use layer indices 0..{n - 1}")
    return [(slots[i], slots[j]) for i, j in pairs]


def _check_pair(attn: dict[int, Attention], io: CacheIO, i: int, j: int) -> None:
    """Slots i and j (see _to_slots) must agree on what a shared or merged cache holds."""
    a, b = attn[i], attn[j]
    ka, kb = (io.present[f"key_{x}"].meta.get("val") for x in (i, j))
    mismatch = [(what, x, y) for what, x, y in (("kv heads", a.num_kv_heads, b.num_kv_heads), ("head dim", a.head_dim, b.head_dim),
                                                  ("rotary", a.rotary, b.rotary),
                                                  ("cache shape", ka is not None and ka.shape[1::2], kb is not None and kb.shape[1::2]))
                if x != y]
    if mismatch:
        what, x, y = mismatch[0]
        raise PassError(f"kv_share pair [{i}, {j}]: layers {i} and {j} differ in {what} ({x} vs {y}), so {j} cannot read {i}'s K/V",
                        "pair layers with the same kv heads, head dim and rotary settings")


def _plan(cfg: Config, attn: dict[int, Attention], sim: Optional[torch.Tensor]) -> list[tuple[int, int]]:
    n = len(attn)
    if cfg.pairs is not None:
        pairs = [tuple(p) for p in cfg.pairs]
    elif n % cfg.factor:
        raise PassError(f"kv_share factor {cfg.factor} does not divide the model's {n} layers",
                        f"use a factor that divides {n}, or explicit pairs")
    elif cfg.select == "index":  # CLA layout: the first layer of each group produces, the others consume
        pairs = [(g, g + k) for g in range(0, n, cfg.factor) for k in range(1, cfg.factor)]
    else:
        pairs = _pick_similar(sim, cfg.factor)
    consumers = [j for _, j in pairs]
    dup = next((j for j in consumers if consumers.count(j) > 1), None)
    if dup is not None:
        raise PassError(f"kv_share: layer {dup} is the consumer of two pairs", "give each consumer one producer")
    chained = next((i for i, _ in pairs if i in consumers), None)
    if chained is not None:
        raise PassError(f"kv_share: layer {chained} is a consumer, so it has no K/V of its own to produce",
                        "point its consumers at the layer it reads from")
    return sorted(pairs, key=lambda p: p[1])


def _pick_similar(sim: torch.Tensor, factor: int) -> list[tuple[int, int]]:
    """Greedy: the most similar (producer < consumer) pairs, each producer serving at most factor-1
    consumers, until only n/factor layers keep a cache."""
    n = sim.shape[0]
    want = n - n // factor
    cands = sorted(((float(sim[i, j]), i, j) for i in range(n) for j in range(i + 1, n)), reverse=True)
    served: dict[int, int] = {}
    consumers: set[int] = set()
    pairs = []
    for _, i, j in cands:
        if len(pairs) == want:
            break
        if j in consumers or j in served or i in consumers or served.get(i, 0) >= factor - 1:
            continue
        pairs.append((i, j))
        consumers.add(j)
        served[i] = served.get(i, 0) + 1
    if len(pairs) < want:
        raise PassError(f"kv_share could not group {n} layers into {n // factor} sharing groups by similarity",
                        "use select: index or explicit pairs")
    return pairs


def _similarity(gm: fx.GraphModule, io: CacheIO, layers: list[int], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean per-token cosine of every layer pair's post-rotary K and V (their present tensors)."""
    names = {f"{kind}_{l}": io.present[f"{kind}_{l}"].name for l in layers for kind in ("key", "value")}
    found = record(gm, batches, set(names.values()))
    return {kind: kvmath.similarity_matrix([torch.cat(found[names[f"{kind}_{l}"]], dim=2) for l in layers])
            for kind in ("key", "value")}


def _share(gm: fx.GraphModule, io: CacheIO, pairs: list[tuple[int, int]], attn: dict[int, Attention]) -> list[str]:
    """Rewire each consumer to its producer's cache; returns fused projections that were shrunk."""
    gone = set()
    for i, j in pairs:
        for kind in ("key", "value"):
            io.present[f"{kind}_{j}"].replace_all_uses_with(io.present[f"{kind}_{i}"])
            retarget_sizes(io.past[f"{kind}_{j}"], io.past[f"{kind}_{i}"])
            gone.add(f"{kind}_{j}")
    io.rebuild([(io.past[k], io.present[k]) for k in io.past if k not in gone])
    shrunk = []
    for _, j in pairs:
        a = attn[j]
        live = {module_path(n): n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR}
        if a.fused_qkv and a.q in live and _shrink_fused(gm, live[a.q], a):
            shrunk.append(a.q)
        elif not a.fused_qkv and (a.k in live or a.v in live):
            raise PassError(f"layer {j}'s {'k' if a.k in live else 'v'} projection is still read after sharing "
                            "(the model uses it for more than its cache)", "leave this layer out of the pairs")
    gm.recompile()
    return shrunk


def _shrink_fused(gm: fx.GraphModule, lin: fx.Node, a: Attention) -> bool:
    """A fused qkv projection (GPT-2's c_attn) whose k/v parts are now unused: keep the q
    columns only. Pattern: linear -> view/reshape* -> split -> getitem 0 (the only live part)."""
    chain, n = [], lin
    while len(n.users) == 1 and next(iter(n.users)).target in RESHAPES:
        n = next(iter(n.users))
        chain.append(n)
    split = next(iter(n.users)) if len(n.users) == 1 else None
    if split is None or split.target not in SPLITS or any(u.args[1] != 0 for u in split.users):
        return False
    addmm = lin.target == aten.addmm.default  # weight stored [in, out] (Conv1D)
    weight, bias = (lin.args[2], lin.args[0]) if addmm else (lin.args[1], lin.args[2] if len(lin.args) > 2 else None)
    params = [(node, 1 if addmm and node is weight else 0) for node in (weight, bias) if node is not None]
    if any(node.op != "get_attr" or len(node.users) != 1 for node, _ in params):
        return False
    q_out = a.num_heads * a.head_dim
    fused_out = None
    for node, dim in params:
        owner, _, attr = node.target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        old = getattr(mod, attr)
        fused_out = fused_out or int(old.shape[dim])
        setattr(mod, attr, torch.nn.Parameter(old.detach().narrow(dim, 0, q_out).clone(), requires_grad=False))
    for r in chain:  # views that spelled out the fused width now see q only
        r.args = (r.args[0], [q_out if s == fused_out else s for s in r.args[1]], *r.args[2:])
    return True


# ---------------------------------------------------------------------------- heal


def _heal(gm: fx.GraphModule, teacher: fx.GraphModule, batches: list[dict], cfg: Heal, ctx: PassContext,
          keep: set[str]) -> dict:
    """AdamW on KL(teacher || student) over next-token distributions; the last eighth of the
    batches is held out to report fidelity before and after."""
    fit = lambda b: {k: v for k, v in b.items() if not k.startswith("past_") or k[len("past_"):] in keep}
    hold = max(1, len(batches) // 8) if len(batches) > 1 else 0
    train, held = batches[:len(batches) - hold] or batches, batches[len(batches) - hold:] or batches
    with torch.no_grad():
        target = {id(b): teacher(**b)[0].float() for b in batches}

    def fidelity() -> dict:
        kl = agree = 0.0
        with torch.no_grad():
            for b in held:
                s, t = gm(**fit(b))[0].float(), target[id(b)]
                kl += float(_kl(t, s))
                agree += float((s.argmax(-1) == t.argmax(-1)).float().mean())
        return {"kl": kl / len(held), "top1_agreement": agree / len(held)}

    before = fidelity()
    params = [p for p in gm.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    tick = ctx.progress("kv_share: healing", cfg.steps)
    losses = []
    try:
        with torch.enable_grad():
            for step in range(cfg.steps):
                b = train[step % len(train)]
                loss = _kl(target[id(b)], gm(**fit(b))[0].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                tick(1)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return {"steps": cfg.steps, "lr": cfg.lr, "train_batches": len(train), "held_out_batches": len(held),
            "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "before": before, "after": fidelity()}


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) from logits [B, T, V]."""
    t = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]), -1)
    s = F.log_softmax(student.reshape(-1, student.shape[-1]), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def _prefill_batches(ctx: PassContext) -> tuple[list[dict], str]:
    batches = ctx.calibration()
    if batches:
        return list(batches), "calibration"
    ids = ctx.inputs["input_ids"] if ctx.prefix is None else torch.cat([ctx.prefix, ctx.inputs["input_ids"]], 1)
    empty = {k: v[:, :, :0] for k, v in ctx.inputs.items() if k.startswith("past_")}
    return [{"input_ids": ids, **empty}], "example inputs (no calibration data)"


# ---------------------------------------------------------------------------- merge


def _merge(gm: fx.GraphModule, io: CacheIO, pairs: list[tuple[int, int]], t: float, retain: float) -> None:
    """Replace each pair's four cache slots per kind by the merged representation (optcc/algorithms/kvmath.py)."""
    g = gm.graph
    first_of = {f"{kind}_{i}": (kind, i, j) for i, j in pairs for kind in ("key", "value")}
    second = {f"{kind}_{j}" for _, j in pairs for kind in ("key", "value")}
    slots: list[tuple[fx.Node, fx.Node]] = []
    anchor = io.plain[-1]
    for name, past in io.past.items():
        if name in second:
            continue
        if name not in first_of:
            slots.append((past, io.present[name]))
            continue
        kind, i, j = first_of[name]
        pi, pj = past, io.past[f"{kind}_{j}"]
        val = pi.meta["val"]
        b, h, p, d = val.shape
        r = _fresh_size(val)
        # [B, H, P, D] direction, two [B, H, P, 1] norms, [B, H, R, 1] kept positions, [B, H, R, D] kept values
        specs = [(f"{kind}_{i}_{j}_dir", val), (f"{kind}_{i}_norm", fake_like(val, (b, h, p, 1))),
                 (f"{kind}_{j}_norm", fake_like(val, (b, h, p, 1))),
                 (f"{kind}_{i}_{j}_kept_at", fake_like(val, (b, h, r, 1), torch.long)), (f"{kind}_{i}_{j}_kept", fake_like(val, (b, h, r, d)))]
        new = []
        for k, (slot, v) in enumerate(specs):
            with g.inserting_after(anchor):
                ph = g.placeholder(f"past_{slot}")
            ph.meta["val"] = v
            if k >= 3:
                ph.meta["cache_length"] = "retained"  # grows as floor(retain * length), not with the past
            anchor = ph
            new.append(ph)
        stack = io.present[name].meta.get("nn_module_stack")
        first_use = min((u for u in list(pi.users) + list(pj.users) if u.op == "call_function"), key=node_order(g).__getitem__, default=None)
        with g.inserting_before(first_use):
            restored = g.call_function(kv_cache.kv_restore, tuple(new))
            xi = g.call_function(operator.getitem, (restored, 0))
            xj = g.call_function(operator.getitem, (restored, 1))
        for old, x in ((pi, xi), (pj, xj)):
            retarget_sizes(old, new[0])
            old.replace_all_uses_with(x)
        with g.inserting_before(io.output):
            merged = g.call_function(kv_cache.kv_merge, (io.present[name], io.present[f"{kind}_{j}"], t, retain))
            outs = [g.call_function(operator.getitem, (merged, k)) for k in range(5)]
        for node in (restored, xi, xj, merged, *outs):
            if stack:
                node.meta["nn_module_stack"] = stack
        slots.extend(zip(new, outs))
    io.rebuild(slots)


def _fresh_size(val: torch.Tensor):
    """A new symbolic size for placeholder metadata (the retained length is its own dimension;
    torch.export's input checks bind it at run time instead of pinning it to an example)."""
    env = getattr(getattr(val, "fake_mode", None), "shape_env", None)
    return env.create_unbacked_symint() if env is not None else 0


# ---------------------------------------------------------------------------- run


def align_retained(got: list[torch.Tensor], expected: list[torch.Tensor], names: list[str]):
    """PassResult.align of merge mode, for the artifact check. The merged cache keeps the least similar token pairs of each (batch, head) unmerged:
    `<pair>_kept_at` [B, H, R, 1] positions, `<pair>_kept` [B, H, R, D] their vectors, and
    `<pair>_dir*` (`_dir`, or `_dir_int8` / `_dir_scale` once the cache is quantized) [B, H, L, *] with a retained
    position holding another vector than a merged one. The choice sorts float cosines, so
    the artifact may swap a near-tied pair at the boundary when its float rounding differs from
    the graph's (int8 linears upstream make that likely on random weights). Such swaps are
    allowed, at most max(1, R // 4) per (batch, head); the vectors at swapped positions are left
    out of the comparison, and the retained vectors are compared where both sides kept them.
    Returns the outputs to compare and {"retained_swaps": total}; ValueError beyond the allowance."""
    index = {n: i for i, n in enumerate(names)}
    pairs = [n[: -len("_kept_at")] for n in names if n.endswith("_kept_at")]
    if not pairs or len(names) != len(expected):
        return got, expected, {}
    got, expected, total = list(got), list(expected), 0
    for pair in pairs:
        i_at, i_kept = index[f"{pair}_kept_at"], index.get(f"{pair}_kept")
        dirs = [i for n, i in index.items() if n.startswith(f"{pair}_dir")]
        if i_kept is None or not dirs:
            continue
        e_at, g_at = expected[i_at], got[i_at]
        length = expected[dirs[0]].shape[2]
        swapped, swaps = kvmath.retention_swaps(e_at, g_at, length)
        allowed = max(1, e_at.shape[2] // 4)
        if swaps.numel() and int(swaps.max()) > allowed:
            raise ValueError(f"{pair}: retains {int(swaps.max())} other token positions than the graph in one "
                             f"(batch, head) (allowed {allowed} near-tie swaps)")
        total += int(swaps.sum())
        hide = swapped.unsqueeze(-1)  # a retained vector on one side, a merged one on the other
        for i in dirs:
            expected[i], got[i] = expected[i].masked_fill(hide, 0), got[i].masked_fill(hide, 0)
        expected[i_kept] = kvmath.kept_by_position(e_at, expected[i_kept], length).masked_fill(hide, 0)
        got[i_kept] = kvmath.kept_by_position(g_at, got[i_kept], length).masked_fill(hide, 0)
        expected[i_at] = got[i_at] = torch.zeros(0, dtype=torch.int64)
    return got, expected, {"retained_swaps": total}


@register("kv_share", Config, summary="share (CLA) or merge (MiniCache) the KV cache across decoder layers",
          after=("layer_skip",), tasks=("text-generation",))
def run(gm: fx.GraphModule, cfg: Config, ctx: PassContext) -> PassResult:
    io = CacheIO(gm, "kv_share")
    attn = _layers(gm, ctx)
    missing = [l for l in attn if f"key_{l}" not in io.past or f"value_{l}" not in io.past]
    if missing:
        raise PassError(f"kv_share: layer {missing[0]}'s cache was already changed by an earlier pass",
                        "run kv_share once, before passes that change the cache")
    before = io.kv_bytes()
    stats: dict = {"mode": cfg.mode, "layers": len(attn)}
    # Layers are counted by position among those left (layer_skip may have removed some); cache
    # slots keep the original numbers (key_3 stays key_3), so positions are mapped to slots here.
    slots = list(attn)
    if cfg.mode == "merge":
        n = len(attn)
        first = math.ceil(cfg.start * n - 1e-9)
        pairs = [(slots[i], slots[i + 1]) for i in range(first, n - 1, 2)]
        if not pairs:
            hint = (f"lower start (at most {(n - 2) / n:.2f} for {n} layers)" if n > 2 else
                    "merge needs 3 or more layers (start > 0 keeps layer 0 apart); use mode: share or remove fewer layers")
            raise PassError(f"kv_share merge: start {cfg.start} leaves fewer than two of the {n} layers to merge", hint)
        for i, j in pairs:
            _check_pair(attn, io, i, j)
        _merge(gm, io, pairs, cfg.t, cfg.retain)
        stats.update({"merged_pairs": [list(p) for p in pairs], "t": cfg.t, "retain": cfg.retain})
        after = CacheIO(gm, "kv_share").kv_bytes(cfg.retain)
    else:
        sim = None
        if cfg.select == "similarity":
            batches, source = _prefill_batches(ctx)
            sims = _similarity(gm, io, list(attn), batches)
            sim = (sims["key"] + sims["value"]) / 2
            stats["similarity"] = {"calibration": source, "batches": len(batches),
                                   **{k: [[round(float(x), 4) for x in row] for row in m] for k, m in sims.items()}}
        planned = _plan(cfg, attn, sim)
        pairs = _to_slots(planned, slots)
        for i, j in pairs:
            _check_pair(attn, io, i, j)
        teacher = copy.deepcopy(gm) if cfg.heal else None
        stats["shrunk_fused_qkv"] = _share(gm, io, pairs, attn)
        stats.update({"pairs": [list(p) for p in pairs], "consumers_without_kv_projections": [attn[j].path for _, j in pairs]})
        if sim is not None:
            stats["pair_similarity"] = [round(float(sim[i, j]), 4) for i, j in planned]
        after = CacheIO(gm, "kv_share").kv_bytes()
        if cfg.heal:
            batches, source = _prefill_batches(ctx)
            stats["heal"] = {"calibration": source, **_heal(gm, teacher, batches, cfg.heal, ctx, set(CacheIO(gm, "kv_share").past))}
    stats["kv_bytes_per_token"] = {"before": before, "after": after, "ratio": round(after / before, 4)}
    stats["cache_slots"] = list(CacheIO(gm, "kv_share").past)
    return PassResult(gm, modified=True, stats=stats, align=align_retained if cfg.mode == "merge" else None)
