"""precision: run the graph in bf16 or fp16, keeping norms, softmax and reductions in fp32.

Which nodes go low follows the weights: parameters become low (except those only kept ops read,
such as norm weights), and a node runs low when one of its float inputs is low. Everything else
keeps its precision until a low value meets it: buffers such as rotary frequencies, masks built
from integer inputs, token sizes, and what a model computes after an explicit fp32 upcast (HF's
RMSNorm and rotary code), as the model's authors intended. The kept ops (`keep`) and ops outside
ATen (optcc's quantized linears, KV-cache ops) read fp32 and return fp32; a cast goes in front of
each op that reads another float dtype than it runs in (one per producer and dtype). The graph's
float outputs are cast back to fp32, so the artifact's interface does not change (a decoder's
cache stays fp32 between steps).

The speed of a format depends on the CPU: without bf16 instructions (avx512_bf16, amx_bf16) eager
bf16 ran 0.14x of fp32 on an AVX2 EPYC. The pass therefore times the graph before and after on
the example inputs and refuses, saying what it measured, when the low graph is slower than
`min_speedup` times fp32 (set 0 to keep it anyway, e.g. to build for another machine).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from optcc.config.schema import field
from optcc.errors import PassError
from optcc.graph.capture import graph_snapshot
from optcc.graph.fx import attr_at
from optcc.measure.latency import measure
from optcc.pipeline.context import PassContext
from optcc.pipeline.registry import PassResult, register

aten = torch.ops.aten

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
KEEP_OPS = {
    "norms": {aten.native_layer_norm.default, aten.layer_norm.default, aten.native_group_norm.default,
              aten.group_norm.default, aten.rms_norm.default, aten._fused_rms_norm.default,
              aten.native_batch_norm.default, aten._native_batch_norm_legit_no_training.default},
    "softmax": {aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int},
    "reductions": {aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default, aten.var.correction,
                   aten.var_mean.correction, aten.std.correction, aten.logsumexp.default, aten.cumsum.default},
}
# ops that set their output dtype themselves: an explicit fp32 upcast in the model stays one
_EXPLICIT_DTYPE = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}


@dataclass(frozen=True)
class Config:
    dtype: Literal["bf16", "fp16"] = field("bf16", help="the low format: bf16 (CPUs with avx512_bf16/amx_bf16, GPUs) or fp16 (GPUs)")
    keep: tuple[Literal["norms", "softmax", "reductions"], ...] = field(
        ("norms", "softmax", "reductions"), help="op kinds that keep fp32 inputs and outputs")
    min_speedup: float = field(1.0, help="refuse when the low graph runs slower than this times fp32 on this machine "
                                         "(measured on the example inputs); 0 keeps it regardless")

    def __post_init__(self) -> None:
        if self.min_speedup < 0:
            raise ValueError(f"min_speedup must be >= 0, got {self.min_speedup}")


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _is_float(node) -> bool:
    v = _val(node)
    return v is not None and v.dtype == torch.float32


def lower_precision(gm: fx.GraphModule, low: torch.dtype, keep: set) -> dict:
    """Rewrite `gm` in place (see the module docstring); returns counts for the report."""
    g = gm.graph
    params = {name for name, _ in gm.named_parameters()}
    dtype: dict[fx.Node, torch.dtype] = {}  # float nodes' dtype after the rewrite
    casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
    stats = {"low_ops": 0, "kept_fp32": 0, "foreign_fp32": 0, "casts": 0, "params_low": 0, "params_fp32": 0}

    def cast(x: fx.Node, to: torch.dtype, before: fx.Node) -> fx.Node:
        if (x, to) not in casts:
            with g.inserting_before(before):
                casts[(x, to)] = g.call_function(aten._to_copy.default, (x,), {"dtype": to})
            stats["casts"] += 1
        return casts[(x, to)]

    def run_as(node: fx.Node, to: torch.dtype) -> None:
        """Cast the node's float inputs of another dtype to `to`."""
        for a in node.all_input_nodes:
            if a in dtype and dtype[a] != to and dtype[a].is_floating_point:
                node.replace_input_with(a, cast(a, to, node))

    # parameters some op other than a kept one reads (a tied weight may have several get_attr nodes)
    read_low = {n.target for n in g.nodes if n.op == "get_attr" and any(u.target not in keep for u in n.users)}
    lowered: set[str] = set()

    multi: dict[fx.Node, torch.dtype] = {}  # tuple-returning nodes (native_layer_norm, max.dim): their float items' dtype
    for node in list(g.nodes):
        if node.op == "placeholder":
            if _is_float(node):
                dtype[node] = torch.float32
        elif node.op == "get_attr":
            t = attr_at(gm, node.target)
            if node.target in lowered:
                dtype[node] = low
            elif not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                continue
            elif node.target in params and node.target in read_low:
                _store(gm, node.target, t.to(low))
                lowered.add(node.target)
                dtype[node] = low
                stats["params_low"] += 1
            else:
                dtype[node] = torch.float32
                stats["params_fp32"] += node.target in params
        elif node.op == "call_function":
            if node.target is aten._assert_tensor_metadata.default and not node.users:
                g.erase_node(node)  # export's dtype checks: the dtypes are this pass's to change
                continue
            if node.target is operator.getitem:
                if _is_float(node):
                    src = node.args[0]
                    dtype[node] = multi.get(src, dtype.get(src, torch.float32))
                continue
            if node.target in keep or not _is_aten(node):
                run_as(node, torch.float32)
                stats["kept_fp32" if node.target in keep else "foreign_fp32"] += 1
                mode = torch.float32
            elif node.target in _EXPLICIT_DTYPE:
                mode = _val(node).dtype if _val(node) is not None else torch.float32
            elif any(dtype.get(a) == low for a in node.all_input_nodes):
                run_as(node, low)
                stats["low_ops"] += 1
                mode = low
            else:
                mode = torch.float32
            if _is_float(node) or _multi_float(node):
                (dtype if _val(node) is not None else multi)[node] = mode
        elif node.op == "output":
            node.args = (fx.node.map_arg(node.args[0], lambda o: cast(o, torch.float32, node)
                                         if dtype.get(o, torch.float32) != torch.float32 else o),)
    g.eliminate_dead_code()
    gm.recompile()
    return stats


def _multi_float(node: fx.Node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in v)


def _is_aten(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.namespace in ("aten", "prims")


def _store(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    path, _, name = target.rpartition(".")
    owner = attr_at(gm, path) if path else gm
    if isinstance(getattr(owner, name), torch.nn.Parameter):
        setattr(owner, name, torch.nn.Parameter(value, requires_grad=False))
    else:
        setattr(owner, name, value)


@register("precision", Config, summary="run the graph in bf16/fp16, norms, softmax and reductions in fp32 (measured, refused where slower)",
          rounds=True, after=("cleanup", "layer_skip", "kv_share", "token_merge", "quantize", "kv_quant"))
def run(gm: fx.GraphModule, cfg: Config, ctx: PassContext) -> PassResult:
    if any(t.dtype == DTYPES[cfg.dtype] for t in gm.state_dict().values()):
        raise PassError(f"precision: the graph already holds {cfg.dtype} weights", "run precision once, on an fp32 model")
    before = graph_snapshot(gm)
    keep = set().union(*(KEEP_OPS[k] for k in cfg.keep)) if cfg.keep else set()
    stats = lower_precision(gm, DTYPES[cfg.dtype], keep)
    if not stats["low_ops"]:
        raise PassError("precision: no op of this graph computes on float activations", "precision needs a float model")
    inputs = ctx.inputs
    with torch.no_grad():
        times = measure({"fp32": lambda: before(**inputs), cfg.dtype: lambda: gm(**inputs)},
                        warmup=2, iters=5, min_seconds=0.5, items=1)
    speedup = times["fp32"]["p50_ms"] / times[cfg.dtype]["p50_ms"]
    stats.update({"dtype": cfg.dtype, "fp32_ms": round(times["fp32"]["p50_ms"], 3),
                  "low_ms": round(times[cfg.dtype]["p50_ms"], 3), "measured_speedup": round(speedup, 3)})
    if speedup < cfg.min_speedup:
        raise PassError(f"precision {cfg.dtype}: the graph ran {speedup:.2f}x as fast as fp32 here ({stats['low_ms']:.1f} vs "
                        f"{stats['fp32_ms']:.1f} ms, eager, example inputs): this machine has no fast {cfg.dtype} kernels",
                        "leave precision out on this machine (quantize int8 instead), or set min_speedup: 0 to build it anyway")
    return PassResult(gm, modified=True, stats=stats)
