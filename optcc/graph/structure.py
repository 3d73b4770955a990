"""Structure analysis: find blocks, attention, MLPs, norms, embeddings and the head
in a captured graph, from module paths (nn_module_stack) and op patterns — not
from model class names (the one exception, a norm written out in elementwise ops, is
graph/fx.is_norm). Read-only: passes get a Structure and do the surgery.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch
import torch.fx as fx

from optcc.errors import PassError
from optcc.graph.fx import attr_at, is_norm, module_path, module_paths, node_order

aten = torch.ops.aten
SDPA = {aten.scaled_dot_product_attention.default}
SOFTMAX = {aten._softmax.default, aten.softmax.int}
LINEAR = {aten.linear.default, aten.addmm.default}
ADD = {aten.add.Tensor}
_INDEXED = re.compile(r"^(.*)\.(\d+)$")


@dataclass
class Linear:
    path: str  # module path, e.g. model.layers.0.self_attn.q_proj
    node: str  # graph node name
    weight: str  # get_attr target of the weight
    in_features: int
    out_features: int
    transposed: bool  # weight stored [in, out] (GPT-2 Conv1D via addmm)


@dataclass
class Attention:
    path: str
    kind: str  # "sdpa" or "softmax"
    node: str  # the sdpa (or softmax) node
    q: Optional[str] = None  # linear module paths
    k: Optional[str] = None
    v: Optional[str] = None
    o: Optional[str] = None
    fused_qkv: bool = False
    rotary: bool = False
    causal: Optional[bool] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    cache: Optional[dict] = None  # decoder graphs: {"key": past input, "value": past input, "slot": cache index}
    reads_kv: list[str] = field(default_factory=list)  # nodes taking K and V: the sdpa, or q·kᵀ and probs·v


@dataclass
class MLP:
    path: str
    linears: list[str]
    down: Optional[str]
    gated: bool


@dataclass
class Block:
    index: int  # position among the graph's blocks (0..n-1), whatever the module path says
    path: str
    input: str  # node carrying the residual stream into the block
    output: str  # node carrying it out
    attention: Optional[Attention]
    mlp: Optional[MLP]
    attn_residual: Optional[str]  # the add that closes the attention sublayer
    mlp_residual: Optional[str]  # the add that closes the MLP sublayer
    norms: list[str]
    norm_position: str  # "pre" | "post" | "unknown"
    calls: int = 1  # times the block's module runs: > 1 when layers share weights (ALBERT)


@dataclass
class Structure:
    container: str  # e.g. model.layers
    blocks: list[Block]
    embeddings: list[str]
    final_norms: list[str]
    head: list[str]
    linears: list[Linear]
    causal: Optional[bool] = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def linear(self, path: str) -> Optional[Linear]:
        return next((l for l in self.linears if l.path == path), None)

    def block_of(self, path: str) -> Optional[Block]:
        return next((b for b in self.blocks if path == b.path or path.startswith(b.path + ".")), None)

    def refuse_shared_blocks(self, what: str) -> None:
        """Raise PassError when a block module runs more than once with the same weights:
        the analysis sees modules, so the N calls of ALBERT's one layer look like one block."""
        shared = next((b for b in self.blocks if b.calls > 1), None)
        if shared is not None:
            raise PassError(f"{shared.path} runs {shared.calls} times with shared weights (ALBERT-style), and {what} "
                            "needs one module per block", "quantize works on this model; for this pass, use a model "
                            "whose layers are separate modules")


def _val(node: fx.Node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node: fx.Node) -> Optional[tuple]:
    v = _val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def linear_info(gm: fx.GraphModule, node: fx.Node) -> Optional[Linear]:
    """A linear layer node (aten.linear with a parameter weight, or addmm as in GPT-2's Conv1D)."""
    if node.op != "call_function" or node.target not in LINEAR:
        return None
    if node.target == aten.linear.default:
        w = node.args[1]
        transposed = False
    else:
        w = node.args[2]
        transposed = True
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    weight = attr_at(gm, w.target)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    in_f, out_f = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    return Linear(module_path(node), node.name, w.target, int(in_f), int(out_f), transposed)


def _walk(start: Iterable[fx.Node], step, stop) -> list[fx.Node]:
    seen, out, todo = set(), [], list(start)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
        if stop(n):
            continue
        todo.extend(x for x in step(n) if isinstance(x, fx.Node))
    return out


def _producers(n: fx.Node) -> list[fx.Node]:
    return list(n.all_input_nodes)


def _consumers(n: fx.Node) -> list[fx.Node]:
    return list(n.users)


def analyze(gm: fx.GraphModule) -> Structure:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    linears = {n: li for n in nodes if (li := linear_info(gm, n)) is not None}
    container, indices = _find_container(nodes)
    blocks = []
    order = node_order(gm.graph)
    for idx in indices:
        path = f"{container}.{idx}" if container else str(idx)
        members = [n for n in nodes if path in module_paths(n)]
        # Block.index is the position in this graph, not the module's number: after
        # layer_skip, layers.0, layers.2, layers.3 are blocks 0, 1, 2.
        blk = _analyze_block(gm, len(blocks), path, members, linears, order)
        if blk is not None:
            blk.calls = _calls(members, path)
            blocks.append(blk)
    _map_cache(gm, blocks)
    embeddings, final_norms, head = _outside(nodes, blocks, linears, order, gm)
    causal_flags = {b.attention.causal for b in blocks if b.attention and b.attention.causal is not None}
    causal = causal_flags.pop() if len(causal_flags) == 1 else None
    notes = []
    if not blocks:
        notes.append("no repeated blocks found (expected a module list such as layers.0, layers.1, ...)")
    return Structure(container, blocks, embeddings, final_norms, head, list(linears.values()), causal, notes)


def _find_container(nodes: list[fx.Node]) -> tuple[str, list[int]]:
    """The module list holding the transformer blocks: the indexed container whose
    children contain the most attention ops (ties: most linear layers)."""
    score: dict[str, list] = defaultdict(lambda: [set(), 0, 0])
    for n in nodes:
        is_attn = n.target in SDPA or n.target in SOFTMAX
        is_lin = n.target in LINEAR
        for p in set(module_paths(n)):
            m = _INDEXED.match(p)
            if not m:
                continue
            s = score[m.group(1)]
            s[0].add(int(m.group(2)))
            s[1] += is_attn
            s[2] += is_lin
    if not score:
        return "", []
    best = max(score.items(), key=lambda kv: (kv[1][1] > 0, len(kv[1][0]) > 1, kv[1][1], kv[1][2]))
    if best[1][1] == 0 and best[1][2] == 0:
        return "", []
    return best[0], sorted(best[1][0])


def _analyze_block(gm, idx, path, members, linears, order) -> Optional[Block]:
    if not members:
        return None
    member_set = set(members)
    # Residual stream: the block's output is its last node used outside the block;
    # its input is the external tensor of the same shape the block consumes.
    outs = [n for n in members if any(u not in member_set for u in n.users)]
    if not outs:
        return None
    output = max(outs, key=lambda n: order[n])
    out_shape = _shape(output)
    ext_inputs = [a for n in members for a in n.all_input_nodes if a not in member_set and a.op != "get_attr"]
    floats = [a for a in ext_inputs if isinstance(_val(a), torch.Tensor) and _val(a).is_floating_point()]
    cands = [a for a in floats if _shape(a) == out_shape]
    if not cands and out_shape and len(out_shape) == 3:  # a block that merges tokens (token_merge) changes dim 1
        cands = [a for a in floats if _shape(a) and len(_shape(a)) == 3 and _shape(a)[::2] == out_shape[::2]]
    if not cands:
        return None
    inp = max(cands, key=lambda n: order[n])
    blk_linears = [linears[n] for n in members if n in linears]
    attention = _find_attention(gm, members, member_set, linears, order)
    attn_lin = {p for p in (attention.q, attention.k, attention.v, attention.o) if p} if attention else set()
    mlp_lin = [l for l in blk_linears if l.path not in attn_lin]
    attn_res = _first_add_after(gm, _node(gm, attention.o) if attention and attention.o else None, member_set, linears)
    down = None
    if mlp_lin:
        hidden = out_shape[-1] if out_shape else None
        downs = [l for l in mlp_lin if l.out_features == hidden]
        down = max(downs, key=lambda l: order[_node(gm, l.path)]).path if downs else None
    mlp_res = _first_add_after(gm, _node(gm, down) if down else None, member_set, linears)
    mlp = None
    if mlp_lin:
        common = _common_prefix([l.path for l in mlp_lin])
        gated = len(mlp_lin) >= 3
        mlp = MLP(common or path, [l.path for l in mlp_lin], down, gated)
    norms = sorted({module_path(n) for n in members if is_norm(n)},
                   key=lambda p: min(order[n] for n in members if module_path(n) == p))
    norm_position = "unknown"
    if attn_res is not None:
        addn = _by_name(gm, attn_res)
        after = [u for u in addn.users if u in member_set]
        norm_position = "post" if any(is_norm(u) for u in after) and not _is_norm_node_any_before(inp, member_set) else "pre"
    return Block(idx, path, inp.name, output.name, attention, mlp, attn_res, mlp_res, norms, norm_position)


def _calls(members: list[fx.Node], path: str) -> int:
    """How many times the module at `path` runs: export keys each call's stack entry, the
    second and later ones with an @N suffix."""
    keys = {k for n in members for k, v in (n.meta.get("nn_module_stack") or {}).items() if v[0] == path}
    return max(1, len(keys))




def _is_norm_node_any_before(inp: fx.Node, member_set: set) -> bool:
    # pre-norm: the block input feeds a norm directly
    return any(is_norm(u) for u in inp.users if u in member_set)


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        out.append(segs[0])
    common = ".".join(out)
    return common if len(paths) > 1 else paths[0].rsplit(".", 1)[0]


def _node(gm: fx.GraphModule, linear_path: Optional[str]) -> Optional[fx.Node]:
    if linear_path is None:
        return None
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in LINEAR and module_path(n) == linear_path:
            return n
    return None


def _by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def _first_add_after(gm, start: Optional[fx.Node], member_set: set, linears) -> Optional[str]:
    """The residual add a sublayer's last projection flows into."""
    if start is None:
        return None
    frontier = [start]
    seen = set()
    while frontier:
        n = frontier.pop(0)
        for u in n.users:
            if u in seen or u not in member_set or u in linears:
                continue
            seen.add(u)
            if u.target in ADD and all(isinstance(a, fx.Node) for a in u.args[:2]):
                return u.name
            frontier.append(u)
    return None


def _find_attention(gm, members, member_set, linears, order) -> Optional[Attention]:
    sdpa = [n for n in members if n.target in SDPA]
    if sdpa:
        node = sdpa[0]
        q_in, k_in, v_in = node.args[:3]
        kind = "sdpa"
        reads_kv = [node.name]
    else:
        soft = [n for n in members if n.target in SOFTMAX]
        if not soft:
            return None
        node = soft[0]
        # scores = q @ k^T feeds the softmax; probs @ v consumes it
        scores = _walk([node], _producers, lambda n: n.target in (aten.matmul.default, aten.bmm.default, aten.mm.default))
        mm = [n for n in scores if n.target in (aten.matmul.default, aten.bmm.default, aten.mm.default)]
        pv = _walk([node], _consumers, lambda n: n.target in (aten.matmul.default, aten.bmm.default, aten.mm.default))
        pv = [n for n in pv if n.target in (aten.matmul.default, aten.bmm.default, aten.mm.default) and n is not node]
        if not mm or not pv:
            return None
        q_in, k_in = mm[0].args[:2]
        v_in = pv[0].args[1]
        kind = "softmax"
        reads_kv = [mm[0].name, pv[0].name]

    def source_linear(x) -> tuple[Optional[Linear], list[fx.Node]]:
        path = _walk([x], _producers, lambda n: n in linears or n not in member_set)
        found = [linears[n] for n in path if n in linears and n in member_set]
        found.sort(key=lambda l: -order[_by_name(gm, l.node)])
        return (found[0] if found else None), path

    q, _ = source_linear(q_in)
    k, k_path = source_linear(k_in)
    v, _ = source_linear(v_in)
    after = _walk([node], _consumers, lambda n: n in linears or n not in member_set)
    o_cands = sorted((linears[n] for n in after if n in linears and n in member_set), key=lambda l: order[_by_name(gm, l.node)])
    o = o_cands[0] if o_cands else None
    rotary = any(n.target == aten.neg.default for n in k_path if n in member_set)
    fused = q is not None and q is k
    path = _common_prefix([l.path for l in (q, k, v, o) if l is not None]) if any((q, k, v, o)) else module_path(node)
    qv = _val(q_in)
    head_dim = int(qv.shape[-1]) if isinstance(qv, torch.Tensor) else None
    num_heads = int(qv.shape[1]) if isinstance(qv, torch.Tensor) and qv.dim() == 4 else None
    num_kv = num_heads
    if k is not None and head_dim and not fused:
        num_kv = k.out_features // head_dim
    causal = None
    if kind == "sdpa":
        is_causal = node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)
        causal = True if is_causal else None
    return Attention(path, kind, node.name, q and q.path, k and k.path, v and v.path, o and o.path, fused,
                     rotary, causal, num_heads, num_kv, head_dim, reads_kv=reads_kv)


_PAST = re.compile(r"^past_(key|value)_(\d+)$")


def _map_cache(gm: fx.GraphModule, blocks: list[Block]) -> None:
    """Attach explicit KV-cache inputs (past_key_i / past_value_i, see optcc/intake/decoder.py) to
    the attention that reads them; the matching outputs are present_key_i / present_value_i."""
    # An explicit-softmax attention reads V after its softmax (probs·v): stop at the nodes that read K and V.
    by_node = {name: b.attention for b in blocks if b.attention for name in b.attention.reads_kv}
    for ph in gm.graph.nodes:
        m = _PAST.match(ph.name) if ph.op == "placeholder" else None
        if not m:
            continue
        # Follow the cached values, not reads of their length: a model that derives positions
        # from past_key_0's length (p = past.shape[2]) reaches every layer's attention that way.
        values = lambda n: [u for u in n.users if u.target != aten.sym_size.int]
        reach = _walk([ph], values, lambda n: n.name in by_node)
        attn = next((by_node[n.name] for n in reach if n.name in by_node), None)
        if attn is not None:
            attn.cache = {**(attn.cache or {}), m.group(1): ph.name, "slot": int(m.group(2))}


def _outside(nodes, blocks, linears, order, gm):
    if not blocks:
        return [], [], [l.path for l in linears.values()]
    first_in = _by_name(gm, blocks[0].input)
    last_out = _by_name(gm, blocks[-1].output)
    emb = []
    for n in nodes:
        if order[n] <= order[first_in] and (n.target in (aten.embedding.default, aten.convolution.default, aten.conv2d.default)):
            p = module_path(n)
            if p not in emb:
                emb.append(p)
    final_norms, head = [], []
    for n in nodes:
        if order[n] <= order[last_out]:
            continue
        p = module_path(n)
        if is_norm(n) and p not in final_norms:
            final_norms.append(p)
        if n in linears and p not in head:
            head.append(p)
    return emb, final_norms, head


def mark_causal(struct: Structure, causal: Optional[bool]) -> None:
    """Record a model-level causality finding (measured on the original model, see api.measure_causality)."""
    if causal is None:
        return
    struct.causal = causal
    for b in struct.blocks:
        if b.attention is not None:
            b.attention.causal = causal
