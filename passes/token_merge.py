"""token_merge: ToMe / PiToMe token merging inside the encoder blocks.

In each chosen block, right after the attention sublayer (pre-norm: the
attention residual add; post-norm: the LayerNorm that follows it) and before
the MLP, r tokens are folded into their most similar partners (metric: the
block's attention keys averaged over heads). Later attentions get log(size)
as an additive mask (proportional attention) and the merged padding mask.

The merge math is optcc/algorithms/tome.py; here it is traced once per block with
torch.export (batch dynamic, token count static) and its ATen ops are copied
into the graph. Downstream nodes that bake in the old token count (view /
reshape / expand / slice arguments) are rewritten by replaying the graph on
the example inputs; the sequence length is therefore static from the first
merge on (docs/token_merge.md).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from optcc.algorithms import tome as M
from optcc.compat import fake_mode_of
from optcc.graph.capture import flat_outputs
from optcc.pipeline.context import PassContext
from optcc.errors import PassError
from optcc.graph.probe import placeholder_args, record
from optcc.pipeline.registry import PassResult, register
from optcc.config.schema import field
from optcc.graph.stats import flops_by_node
from optcc.graph.fx import NORM_OPS, module_path, node_order
from optcc.graph.structure import Block, Structure

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclass(frozen=True)
class Config:
    r: Optional[Union[int, tuple[float, ...]]] = field(
        None, help="tokens removed per block: N | [N, inflection] (-1 decreasing to 0, 0 constant, +1 increasing) | one N per block")
    ratio: Optional[float] = field(None, help="instead of r: fraction of the tokens left after the last block, e.g. 0.5")
    method: Literal["tome", "pitome"] = field("tome", help="tome: bipartite soft matching; pitome: energy-protected matching (PiToMe)")
    prop_attn: bool = field(True, help="proportional attention: later attentions add log(token size) to their logits")
    protect: Optional[tuple[Literal["cls", "distill"], ...]] = field(
        None, help="tokens that never merge (default: the ones the head reads, e.g. CLS at index 0)")
    start: int = field(0, help="first block that merges (earlier blocks keep every token)")
    unmerge: bool = field(False, help="copy merged tokens back to every original position after the last block (token-level outputs)")
    margin: Optional[float] = field(None, help="pitome only: energy margin (default: 0.9 in the first block falling to 0.1)")

    def __post_init__(self) -> None:
        if (self.r is None) == (self.ratio is None):
            raise ValueError("give exactly one of r (tokens per block) or ratio (fraction of tokens to keep)")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if isinstance(self.r, int) and self.r < 0:
            raise ValueError(f"r must be >= 0, got {self.r}")
        if isinstance(self.r, (tuple, list)):
            if not self.r:
                raise ValueError("r must not be an empty list")
            if not M.is_pair(self.r) and any(v < 0 or int(v) != v for v in self.r):
                raise ValueError(f"r as a list is [r, inflection in -1..1] or one non-negative integer per block, got {list(self.r)}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.margin is not None and self.method != "pitome":
            raise ValueError("margin applies only to method: pitome")
        if self.margin is not None and not -1.0 < self.margin < 1.0:
            raise ValueError(f"margin must be in (-1, 1), got {self.margin}")


class _Step(torch.nn.Module):
    """One merge, traced by torch.export and copied into the graph.
    Inputs: x [B,T,C], keys [B,H,T,D], then size [B,T,1] (not on the first merge),
    valid [B,T] (padding models), source [B,T0] (unmerge, not on the first merge).
    Outputs: x, size, then valid, source, attention bias [B,1,1,T'] when present."""

    def __init__(self, r, tokens, method, margin, protected, *, first, has_valid, track_source, bias):
        super().__init__()
        self.r, self.tokens, self.method, self.margin, self.protected = r, tokens, method, margin, tuple(protected)
        self.first, self.has_valid, self.track_source, self.bias = first, has_valid, track_source, bias

    def forward(self, x, k, *rest):
        it = iter(rest)
        size = torch.ones_like(x[..., :1]) if self.first else next(it)
        valid = next(it) if self.has_valid else None
        source = next(it) if self.track_source and not self.first else None
        metric = M.key_metric(k)
        if self.method == "pitome":
            m = M.pitome_matching(metric, self.r, self.margin, self.protected, valid)
        else:
            m = M.bipartite_soft_matching(metric, self.r, self.protected, valid)
        x, size = M.merge_wavg(x, size, m)
        outs = [x, size]
        if valid is not None:
            valid = M.keep_tokens(valid, m)
            outs.append(valid)
        if self.track_source:
            t = self.tokens
            outs.append(M.source_positions(m, t) if source is None else M.update_source_map(source, m, t))
        if self.bias:
            outs.append(M.attention_bias(size if self.bias == "size" else None, valid, x.dtype))
        return tuple(outs)


class _Unmerge(torch.nn.Module):
    def forward(self, x, source):
        return M.unmerge(x, source)


@register("token_merge", Config, summary="merge similar tokens inside encoder blocks (ToMe / PiToMe): fewer tokens per block",
          after=("layer_skip",))
def run(gm: fx.GraphModule, cfg: Config, ctx: PassContext) -> PassResult:
    s = ctx.structure(gm)
    _refuse(s, ctx)
    blocks = s.blocks
    nodes = {n.name: n for n in gm.graph.nodes}
    masks = {b.index: _sdpa_mask(nodes[b.attention.node]) for b in blocks}
    old_shapes, values = _replay(gm, ctx.inputs, {m.name for m in masks.values() if m is not None})
    tokens = old_shapes[blocks[0].input][1]
    protected = _protected(cfg, blocks, nodes)
    rs, t_in, t_out, requested = _schedule(cfg, tokens, len(blocks), len(protected))
    stats = {"method": cfg.method, "prop_attn": cfg.prop_attn, "protected": protected, "r_requested": requested, "r": rs,
             "tokens_attention": t_in, "tokens_mlp": t_out, "tokens_before": tokens, "tokens_after": t_out[-1],
             "capped_blocks": [b.path for b, q, r in zip(blocks, requested, rs) if r < q], "unmerge": cfg.unmerge}
    if sum(rs) == 0:
        return PassResult(gm, False, {**stats, "note": "r is 0 in every block: graph unchanged"})

    first = next(i for i, r in enumerate(rs) if r > 0)
    flops_before = _block_flops(gm, ctx.inputs, blocks)
    mask = _padding_mask(gm, ctx, blocks[first:], masks, values)
    margins = [cfg.margin] * len(blocks) if cfg.margin is not None else M.pitome_margins(len(blocks))
    state: dict[str, Optional[fx.Node]] = {"size": None, "valid": None, "source": None, "bias": None}
    for b, r, t in zip(blocks[first:], rs[first:], t_in[first:]):
        sdpa = nodes[b.attention.node]
        if state["size"] is not None:  # attention after a merge: proportional attention + merged padding mask
            _set_mask(sdpa, state["bias"])
        if r > 0:
            step = _Step(r, t, cfg.method, margins[b.index], protected, first=state["size"] is None,
                         has_valid=mask is not None, track_source=cfg.unmerge,
                         bias="size" if cfg.prop_attn else ("valid" if mask is not None else None))
            _merge_block(gm, b, step, sdpa, nodes, old_shapes, mask, state)
    last = nodes[blocks[-1].output]
    if cfg.unmerge:
        spec = [((2, t_out[-1], old_shapes[last.name][2]), last.meta["val"].dtype), _meta_spec(state["source"])]
        (full,) = _inline(gm, _Unmerge(), [last, state["source"]], spec, last, blocks[-1])
        last.replace_all_uses_with(full, delete_user_cb=lambda u: u.meta.get("token_merge") is None)
    else:
        stats["mean_pooling_reweighted"] = _reweight_means(gm, last, state["size"], old_shapes)
    gm.graph.lint()
    gm.recompile()
    _fix_shapes(gm, ctx, old_shapes, cfg.unmerge)
    _refresh_meta(gm)
    stats["static_sequence_from_block"] = blocks[first].path
    flops_after = _block_flops(gm, ctx.inputs, blocks)
    stats["blocks"] = [{"block": b.path, "r": r, "tokens_attention": ta, "tokens_mlp": tm,
                        "flops_before": f0, "flops_after": f1, "merge_flops": fm}
                       for b, r, ta, tm, (f0, _), (f1, fm) in zip(blocks, rs, t_in, t_out, flops_before, flops_after)]
    total0 = sum(f for f, _ in flops_before)
    stats["block_flops_saved"] = round(1 - sum(f for f, _ in flops_after) / total0, 4) if total0 else None
    return PassResult(gm, True, stats)


def _block_flops(gm: fx.GraphModule, inputs: dict, blocks: list[Block]) -> list:
    """(FLOPs, of which in inserted merge ops) per block, at the example inputs."""
    nodes = {n.name: n for n in gm.graph.nodes}
    total, merging = [0] * len(blocks), [0] * len(blocks)
    for name, f in flops_by_node(gm, inputs).items():
        path = module_path(nodes[name])
        i = next((i for i, b in enumerate(blocks) if path == b.path or path.startswith(b.path + ".")), None)
        if i is not None:
            total[i] += f
            merging[i] += f if nodes[name].meta.get("token_merge") else 0
    return list(zip(total, merging))


def _schedule(cfg: Config, tokens: int, n: int, protected: int):
    """The recipe's r (or ratio) -> (r, tokens at attention, tokens at the MLP, requested r), one entry per block."""
    if cfg.start >= n:
        raise PassError(f"start: {cfg.start} leaves no block to merge in (the model has {n})", f"use start < {n}")
    tail = n - cfg.start
    if cfg.ratio is not None:
        sched = M.ratio_schedule(cfg.ratio, tokens, tail)
    else:
        try:
            sched = M.parse_r(cfg.r, tail)
        except ValueError as e:
            raise PassError(str(e), f"the model has {tail} blocks from `start` on; give one r per block, a single r or [r, inflection]") from e
    requested = [0] * cfg.start + sched
    return (*M.cap_r(requested, tokens, protected), requested)


def _merge_block(gm, b: Block, step: _Step, sdpa: fx.Node, nodes, old_shapes, mask, state) -> None:
    """Insert one merge after block b's attention and route the rest of the graph through it."""
    anchor = _anchor(b, nodes)
    x_shape, k = old_shapes[anchor.name], sdpa.args[1]
    if len(x_shape) != 3 or x_shape[1] != old_shapes[k.name][2]:
        raise PassError(f"block {b.path}: its residual stream {tuple(x_shape)} is not [batch, tokens, channels] matching the attention",
                        "token merging needs a sequence-first encoder layout")
    if step.first and mask is not None:
        state["valid"] = _valid_from_mask(gm, mask, anchor)
    t = step.tokens
    ins = [anchor, k] + [state[key] for key in ("size", "valid", "source") if state[key] is not None]
    specs = [((2, t, x_shape[2]), anchor.meta["val"].dtype), (_with_tokens(old_shapes[k.name], 2, t), k.meta["val"].dtype)]
    specs += [((2, t), torch.bool) if i is state["valid"] else _meta_spec(i) for i in ins[2:]]
    outs = list(_inline(gm, step, ins, specs, anchor, b))
    x_new, state["size"] = outs.pop(0), outs.pop(0)
    if step.has_valid:
        state["valid"] = outs.pop(0)
    if step.track_source:
        state["source"] = outs.pop(0)
    state["bias"] = outs.pop(0) if step.bias else None
    anchor.replace_all_uses_with(x_new, delete_user_cb=lambda u: u.meta.get("token_merge") is None)


def _with_tokens(shape: tuple, dim: int, tokens: int) -> tuple:
    return shape[:dim] + (tokens,) + shape[dim + 1:]


def _meta_spec(n: fx.Node) -> tuple[tuple, torch.dtype]:
    v = n.meta["val"]
    return tuple(int(d) if not isinstance(d, torch.SymInt) else 2 for d in v.shape), v.dtype


def _refuse(s: Structure, ctx: PassContext) -> None:
    if ctx.causal or s.causal or ctx.task == "text-generation":
        raise PassError("token merging does not apply to causal decoders: merging tokens breaks causality and rotary positions",
                        "use it on encoders (ViT/DeiT, BERT-family); for decoders see kv_share or layer_skip")
    if not s.blocks:
        raise PassError("no transformer blocks found in the graph", "token merging needs a stack of attention blocks")
    s.refuse_shared_blocks("token merging")
    for b in s.blocks:
        a = b.attention
        if a is None or b.mlp is None or b.attn_residual is None:
            what = "attention" if a is None else ("MLP" if b.mlp is None else "attention residual add")
            raise PassError(f"block {b.path}: the analysis cannot see its {what}", "token merging needs attention, residual add and MLP in every block")
        if a.kind != "sdpa":
            raise PassError(f"block {b.path}: attention is an explicit matmul + softmax, not scaled_dot_product_attention "
                            "(token merging passes its size bias and merged padding mask through sdpa's attn_mask)",
                            "use a model class with SDPA attention or write it with F.scaled_dot_product_attention; "
                            "layer_skip and quantize work on this model as it is")
        if a.causal or a.rotary:
            raise PassError(f"block {b.path}: attention is {'causal' if a.causal else 'rotary'}",
                            "token merging works on bidirectional encoders without rotary positions; "
                            "layer_skip and quantize work on this model")


def _sdpa_mask(sdpa: fx.Node) -> Optional[fx.Node]:
    m = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
    return m if isinstance(m, fx.Node) else None


def _set_mask(sdpa: fx.Node, mask: Optional[fx.Node]) -> None:
    if len(sdpa.args) > 3:
        sdpa.args = sdpa.args[:3] + (mask,) + sdpa.args[4:]
    else:
        sdpa.kwargs = {**sdpa.kwargs, "attn_mask": mask}


def _anchor(b: Block, nodes: dict[str, fx.Node]) -> fx.Node:
    """Where the merge goes: after the attention residual (pre-norm) or its LayerNorm (post-norm)."""
    add = nodes[b.attn_residual]
    if b.norm_position != "post":
        return add
    norms = [u for u in add.users if u.target in NORM_OPS]
    if len(norms) != 1:
        raise PassError(f"block {b.path}: post-norm block without a single LayerNorm after the attention residual",
                        "report the model; pre-norm and BERT-style post-norm blocks are supported")
    return norms[0]


def _protected(cfg: Config, blocks: list[Block], nodes) -> list[int]:
    if cfg.protect is not None:
        return sorted({{"cls": 0, "distill": 1}[p] for p in cfg.protect})
    # Auto: tokens the head reads by index after the last block (CLS pooling, DeiT's distillation token).
    found, todo, seen = set(), [nodes[blocks[-1].output]], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            src = u.args[0].meta.get("val") if u.args and isinstance(u.args[0], fx.Node) else None
            if u.target == aten.select.int and u.args[1] == 1 and isinstance(u.args[2], int) and 0 <= u.args[2] < 4 \
                    and isinstance(src, torch.Tensor) and src.dim() == 3:
                found.add(u.args[2])
            elif u.target not in (aten.select.int,):
                todo.append(u)
    return sorted(found)


def _replay(gm, inputs, keep: set[str]) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """One concrete run: every tensor node's shape, and the values of the `keep` nodes."""
    names = [n.name for n in gm.graph.nodes]
    got = record(gm, [inputs], names, reduce=lambda name, t: t.detach() if name in keep else tuple(t.shape))
    shapes = {k: (tuple(v[0].shape) if k in keep else v[0]) for k, v in got.items() if v}
    return shapes, {k: got[k][0] for k in keep if got.get(k)}


def _input_dependent(node: fx.Node) -> bool:
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen or n.target == aten.sym_size.int:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        todo.extend(n.all_input_nodes)
    return False


def _padding_mask(gm, ctx, blocks, masks, values) -> Optional[fx.Node]:
    """The one mask the merged blocks share, if it carries information; it must hide keys only."""
    used = {masks[b.index] for b in blocks}
    if len(used) > 1:
        raise PassError(f"blocks {blocks[0].path}..{blocks[-1].path} use different attention masks",
                        "token merging supports one shared padding mask")
    mask = used.pop()
    if mask is None:
        return None
    if not _input_dependent(mask):
        v = values[mask.name]
        if bool((v if v.dtype == torch.bool else v == 0).all()):
            return None  # attends everywhere (ViT builds an all-true mask); nothing to carry
    probe = dict(ctx.inputs)
    am = probe.get("attention_mask")
    if am is not None and am.dim() == 2 and am.shape[1] > 1:  # pad the tail of row 0 to see the mask's structure
        am = am.clone()
        am[0, -max(1, am.shape[1] // 4):] = 0
        probe["attention_mask"] = am
    v = _replay(gm, probe, {mask.name})[1][mask.name]
    if v.dim() != 4 or not torch.equal(v, v[:, :1, :1, :].expand_as(v)):
        raise PassError(f"block {blocks[0].path}: its attention mask varies across queries or heads, so it is not a padding mask",
                        "token merging needs bidirectional attention whose mask only hides padded keys")
    return mask


def _valid_from_mask(gm, mask: fx.Node, anchor: fx.Node) -> fx.Node:
    """[B, T] bool from a [B|1, 1, Q|1, T] key-padding mask (bool, or additive float)."""
    g = gm.graph
    made = []

    def op(target, *args):
        made.append(g.call_function(target, args))
        return made[-1]

    with g.inserting_before(anchor.next):
        row = op(aten.select.int, op(aten.select.int, mask, 1, 0), 1, 0)
        if mask.meta["val"].dtype != torch.bool:
            row = op(aten.gt.Scalar, row, -1.0)  # additive masks: 0 = attend, a huge negative = padding
        out = op(aten.expand.default, row, [op(aten.sym_size.int, anchor, 0), -1])
    for n in made:
        n.meta.update(token_merge=True, nn_module_stack=dict(anchor.meta.get("nn_module_stack", {})))
    return out


def _inline(gm, module: torch.nn.Module, ins: list[fx.Node], shapes: list[tuple[tuple, torch.dtype]], anchor: fx.Node, b: Block):
    """torch.export `module` on example tensors of `shapes` (batch dynamic) and copy its ops after `anchor`."""
    examples = []
    for shape, dtype in shapes:
        shape = (2,) + tuple(shape[1:])
        examples.append(torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    batch = torch.export.Dim("batch", min=1)
    dyn = [{0: batch} for _ in examples]
    if isinstance(module, _Step) and len(dyn) > 2:  # forward(x, k, *rest): rest is one pytree entry
        dyn = dyn[:2] + [tuple(dyn[2:])]
    with torch.no_grad():
        sub = torch.export.export(module, tuple(examples), dynamic_shapes=tuple(dyn), strict=False).graph_module.graph
    phs = [p for p in sub.nodes if p.op == "placeholder"]
    if len(phs) != len(ins):
        raise PassError("internal: the traced merge step has unexpected inputs", "run with --debug and report it")
    stack = dict(anchor.meta.get("nn_module_stack", {}))
    stack["token_merge"] = (f"{b.path}.token_merge", "TokenMerge")
    order = node_order(gm.graph)
    after = max([anchor] + ins, key=order.__getitem__)  # hand-made inputs (the padding flags) may follow the anchor
    before = set(order)
    with gm.graph.inserting_before(after.next):
        out = gm.graph.graph_copy(sub, dict(zip(phs, ins)))
    for n in gm.graph.nodes:
        if n not in before:
            n.meta["nn_module_stack"] = dict(stack)
            n.meta["token_merge"] = True
    return out


def _reweight_means(gm, last: fx.Node, size: fx.Node, old_shapes) -> int:
    """Mean over the token dim after the last merge -> size-weighted mean (each token stands for `size` inputs)."""
    g, count = gm.graph, 0
    order = node_order(g)
    for n in list(g.nodes):
        if n.target != aten.mean.dim or order[n] < order[last] or n.kwargs.get("dtype") is not None:
            continue
        x, dims = n.args[0], n.args[1]
        keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if list(dims) not in ([1], [-2]) or len(old_shapes.get(x.name, ())) != 3:
            continue
        with g.inserting_before(n):
            w = size
            if x.target == aten.slice.Tensor and x.args[1] == 1:
                w = g.call_function(aten.slice.Tensor, (size,) + tuple(x.args[1:]))
            elif old_shapes[x.name][1] != old_shapes[last.name][1]:
                continue
            num = g.call_function(aten.sum.dim_IntList, (g.call_function(aten.mul.Tensor, (x, w)), [1], keepdim))
            den = g.call_function(aten.sum.dim_IntList, (w, [1], keepdim))
            new = g.call_function(aten.div.Tensor, (num, den))
        for k in (w, num, den, new, *num.args[:1]):
            k.meta.update(token_merge=True, nn_module_stack=dict(n.meta.get("nn_module_stack", {})))
        n.replace_all_uses_with(new)
        g.erase_node(n)
        count += 1
    return count


class _ShapeFixer(fx.Interpreter):
    """Replays the edited graph; before each view/reshape/expand/slice whose input
    lost tokens, rewrites the hard-coded token count in its arguments."""

    def __init__(self, gm, old):
        super().__init__(gm)
        self.old = old

    def run_node(self, n):
        if n.op == "call_function" and n.name in self.old and not n.meta.get("token_merge") and n.args \
                and isinstance(n.args[0], fx.Node) and n.args[0].name in self.old:
            new_in = tuple(self.env[n.args[0]].shape)
            old_in = self.old[n.args[0].name]
            if new_in != old_in:
                if n.target in _VIEWS:
                    n.args = (n.args[0], _view_shape(n, old_in, new_in, self.old[n.name])) + n.args[2:]
                elif n.target == aten.expand.default:
                    off = len(n.args[1]) - len(new_in)
                    sizes = [-1 if i >= off and new_in[i - off] != old_in[i - off] else a for i, a in enumerate(n.args[1])]
                    n.args = (n.args[0], sizes) + n.args[2:]
                elif n.target == aten.slice.Tensor:
                    n.args = _slice_args(n, old_in, new_in, self.env)
        try:
            return super().run_node(n)
        except PassError:
            raise
        except Exception as e:
            raise PassError(f"node {n.name} ({n.target}) cannot run on the merged token count: {str(e).splitlines()[0][:200]}",
                            "it combines merged tokens with a tensor of the original length; set unmerge: true, "
                            "or report the model") from e


def _prefix(shape) -> list[int]:
    out = [1]
    for d in shape:
        out.append(out[-1] * d)
    return out


def _view_shape(n: fx.Node, old_in, new_in, old_out) -> list:
    k = next(i for i, (a, b) in enumerate(zip(old_in, new_in)) if a != b)
    if sum(a != b for a, b in zip(old_in, new_in)) != 1:
        raise PassError(f"node {n.name}: more than one dimension changed", "report the model")
    pi, po = _prefix(old_in), _prefix(old_out)
    for k0 in range(k, -1, -1):  # the output dims covering input dims k0..k1 with k0 <= k <= k1
        js = [j for j in range(len(old_out)) if po[j] == pi[k0]]
        if js and any(po[js[-1] + 1] == pi[k1 + 1] for k1 in range(k, len(old_in))):
            j = js[-1]
            break
    else:
        raise PassError(f"node {n.name}: reshape {old_in} -> {old_out} splits the token dimension", "report the model")
    shape = list(n.args[1])
    if shape[j] == -1:
        return shape
    if k0 == 0:  # the dimension folds in the (dynamic) batch: only -1 keeps it dynamic
        if -1 in shape:
            raise PassError(f"node {n.name}: cannot rewrite reshape {old_out} for the merged token count", "report the model")
        shape[j] = -1
    else:
        shape[j] = old_out[j] // old_in[k] * new_in[k]
    return shape


def _slice_args(n: fx.Node, old_in, new_in, env) -> tuple:
    args = list(n.args) + [None, 0, None, sys.maxsize, 1][len(n.args):]
    dim = args[1] % len(old_in)
    if old_in[dim] == new_in[dim]:
        return n.args
    start = env[args[2]] if isinstance(args[2], fx.Node) else args[2]
    end = env[args[3]] if isinstance(args[3], fx.Node) else args[3]
    if (start or 0) < 0 or (end is not None and old_in[dim] > end):
        raise PassError(f"node {n.name}: slices tokens {start}:{end} of the merged sequence", "set unmerge: true or merge later (start)")
    args[3] = sys.maxsize
    return tuple(args)


def _fix_shapes(gm, ctx: PassContext, old, unmerge: bool) -> None:
    with torch.no_grad():
        out = _ShapeFixer(gm, old).run(*placeholder_args(gm, ctx.inputs))
    gm.recompile()
    for i, (o, r) in enumerate(zip(flat_outputs(out), ctx.reference)):
        if o.shape != r.shape and not unmerge:
            raise PassError(f"output {i} has one row per token ({tuple(r.shape)}), which merging shortens to {tuple(o.shape)}",
                            "set unmerge: true to copy merged tokens back to their positions")


def _refresh_meta(gm) -> None:
    """Re-derive meta['val'] (symbolic batch) so later passes see the merged shapes."""
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = fake_mode_of(vals)
    if mode is None:
        return
    with mode:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)
