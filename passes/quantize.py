"""quantize: replace linear layers by integer-kernel ops (optcc.ops.quantized).

Schemes: int8-dynamic (per-token int8 activations × per-channel int8 weights,
torch._int_mm / ONNX MatMulIntegerToFloat), int8-weight-only (DequantizeLinear +
MatMul), int4-weight-only (group-wise RTN, ONNX MatMulNBits) and int4-awq
(activation-aware per-channel scales searched on calibration data). Optional
SmoothQuant folding for int8-dynamic. Scales are folded into the preceding norm
only where that norm feeds nothing but the linears being scaled.
Math in optcc/algorithms/quantizers.py; ops in optcc/ops/quantized.py; docs in docs/quantize.md.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx

from optcc.algorithms import quantizers
from optcc.ops import quantized  # registers the optcc:: linear ops; suggests `auto` choices
from optcc.graph.capture import graph_snapshot
from optcc.pipeline.context import PassContext
from optcc.errors import PassError
from optcc.graph.probe import record
from optcc.pipeline.registry import PassResult, register
from optcc.config.schema import field
from optcc.graph.lineargroups import Group, add_buffer, groups, linear_parts, set_tensor
from optcc.graph.fx import attr_at, module_path
from optcc.graph.structure import Linear

aten = torch.ops.aten
ops = torch.ops.optcc
Scheme = Literal["int8-dynamic", "int8-weight-only", "int4-weight-only", "int4-awq"]
_AWQ_TOKENS = 512  # calibration rows kept per linear group for the AWQ search


@dataclass(frozen=True)
class Smooth:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), folded into the preceding norm."""

    alpha: float = field(0.5, help="migration strength: 0 keeps activations as they are, 1 moves all range into weights")


@dataclass(frozen=True)
class Config:
    scheme: Scheme = field("int8-dynamic", help="int8-dynamic | int8-weight-only | int4-weight-only | int4-awq")
    group_size: int = field(128, help="int4: input channels per scale; must divide every quantized layer's in_features")
    exclude: tuple[str, ...] = field((), help="module path prefixes (or 're:REGEX' matching the whole path) to keep in fp32")
    include_head: bool = field(True, help="also quantize the output head (linears after the last block)")
    smooth: Optional[Smooth] = field(None, help="int8-dynamic: SmoothQuant folding, e.g. {alpha: 0.5}")
    activations: Literal["per-token", "per-tensor"] = field(
        "per-token", help="int8-dynamic: one activation scale per token (closest to fp32) or per tensor "
                          "(ONNX: one fused DynamicQuantizeMatMul per linear, faster)")
    torch_gemm: Literal["auto", "int_mm", "fp32", "fbgemm"] = field(
        "auto", help="int8-dynamic: the torch artifact's integer GEMM. int_mm: torch._int_mm (fast with VNNI/AMX/i8mm); "
                     "fp32: the int8 codes multiplied in fp32 (exact, for CPUs without int8 dot products); fbgemm "
                     "(activations: per-tensor): torch's fbgemm int8 GEMM; auto: chosen for the compiling machine")
    onnx_weights: Literal["auto", "u8s8", "u8s7", "u8u8"] = field(
        "auto", help="int8-dynamic: the ONNX weight layout. u8s8: int8 weights (fastest with VNNI/AMX, saturates on "
                     "x86 without VNNI); u8s7: int8 weights kept to 7 bits (exact and fast on AVX2); u8u8: uint8 "
                     "weights (exact everywhere, slower on x86); auto: chosen for the compiling machine")
    int4_activations: Literal["fp32", "int8"] = field("fp32", help="int4, ONNX only: int8 lets MatMulNBits quantize activations per block (faster on VNNI CPUs; the ONNX artifact then differs from the torch one by that rounding)")
    awq_grid: int = field(20, help="int4-awq: grid points for the scale exponent in [0, 1)")
    awq_clip: bool = field(True, help="int4-awq: also search a per-group clipping range")
    measure: bool = field(True, help="when the recipe benchmarks: time the fp32 and quantized graphs (torch) and note if quantized is slower")

    def __post_init__(self) -> None:
        if self.scheme.startswith("int4"):
            quantizers.check_group_size(self.group_size, self.group_size)  # even and >= 2
        # checked here, not in Smooth: the loader reports errors inside an optional section poorly
        if self.smooth is not None and not 0.0 <= self.smooth.alpha <= 1.0:
            raise ValueError(f"smooth.alpha must be in [0, 1], got {self.smooth.alpha}")
        if self.smooth is not None and self.scheme != "int8-dynamic":
            raise ValueError(f"smooth applies to int8-dynamic (it moves activation outliers into the weights); "
                             f"scheme is {self.scheme}" + ("; int4-awq searches its own scales" if self.scheme == "int4-awq" else ""))
        if self.awq_grid < 1:
            raise ValueError(f"awq_grid must be >= 1, got {self.awq_grid}")
        # an option the scheme does not read is a mistake in the recipe, not something to ignore
        defaults = {f: Config.__dataclass_fields__[f].default
                    for f in ("group_size", "int4_activations", "awq_grid", "awq_clip", "activations", "torch_gemm",
                              "onnx_weights")}
        int4, awq = ("int4-weight-only", "int4-awq"), ("int4-awq",)
        dynamic = ("int8-dynamic",)
        applies = {"group_size": int4, "int4_activations": int4, "awq_grid": awq, "awq_clip": awq,
                   "activations": dynamic, "torch_gemm": dynamic, "onnx_weights": dynamic}
        for name, schemes in applies.items():
            if getattr(self, name) != defaults[name] and self.scheme not in schemes:
                raise ValueError(f"{name} applies only to {' and '.join(schemes)}; scheme is {self.scheme}: drop {name}")
        if self.torch_gemm == "fbgemm" and self.activations != "per-tensor":
            raise ValueError("torch_gemm fbgemm needs activations: per-tensor (fbgemm quantizes activations per tensor); "
                             "use int_mm or fp32")
        for p in self.exclude:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"exclude pattern '{p}' is not a valid regex: {e}") from None


def resolve(cfg: Config) -> tuple[Config, dict[str, str]]:
    """int8-dynamic's `auto` kernel and layout, chosen for this machine (PassSpec.resolve)."""
    if cfg.scheme != "int8-dynamic":
        return cfg, {}
    why = {}
    layout = cfg.onnx_weights
    if layout == "auto":
        layout, why["onnx_weights"] = quantized.suggest_layout()
    gemm = cfg.torch_gemm
    if gemm == "auto":
        gemm, why["torch_gemm"] = quantized.suggest_gemm(cfg.activations == "per-tensor", quantized.weight_qmax(layout))
    return dataclasses.replace(cfg, onnx_weights=layout, torch_gemm=gemm), why


def _matches(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return path == pattern or path.startswith(pattern + ".")


def select(linears: list[Linear], head: list[str], cfg: Config) -> tuple[list[Linear], list[str], list[str]]:
    """(targets, excluded paths, warnings) for the config's exclude/include_head."""
    warnings = []
    for p in cfg.exclude:
        if not any(_matches(p, l.path) for l in linears):
            warnings.append(f"exclude pattern '{p}' matches no linear layer (paths look like '{linears[0].path}')"
                            if linears else f"exclude pattern '{p}' matches nothing: the model has no linear layers")
    excluded = [l.path for l in linears
                if any(_matches(p, l.path) for p in cfg.exclude) or (not cfg.include_head and l.path in head)]
    return [l for l in linears if l.path not in excluded], excluded, warnings


# ---------------------------------------------------------- graph reading ---

# ------------------------------------------------------------ calibration ---

def _calibration(ctx: PassContext) -> tuple[list[dict], str]:
    batches = ctx.calibration()
    if batches:
        return batches, f"{len(batches)} calibration batches"
    return [ctx.inputs], "no calibration data was given: statistics come from the example inputs"


def _stats(gm: fx.GraphModule, grps: list[Group], batches: list[dict], rows: int) -> dict[str, dict]:
    """Per group input node: absmax [in] and (rows > 0) a fixed random sample of rows [n, in]."""
    names = {linear_parts(g.members[0][1])[0].name: g for g in grps}
    gen = torch.Generator().manual_seed(0)
    per_batch = math.ceil(rows / max(len(batches), 1)) if rows else 0

    def reduce(name: str, t: torch.Tensor) -> dict:
        flat = t.detach().float().reshape(-1, t.shape[-1])
        out = {"absmax": flat.abs().amax(dim=0)}
        if per_batch:
            idx = torch.randperm(flat.shape[0], generator=gen)[:per_batch]
            out["rows"] = flat[idx].clone()
        return out

    found = record(gm, batches, names, reduce)
    out = {}
    for name, vals in found.items():
        g = names[name]
        out[g.source.name] = {"absmax": torch.stack([v["absmax"] for v in vals]).amax(dim=0),
                              "rows": torch.cat([v["rows"] for v in vals]) if per_batch else None}
    return out


# ------------------------------------------------------------------ surgery ---

def _weight(gm: fx.GraphModule, li: Linear) -> torch.Tensor:
    """The layer's weight as [out, in] fp32 (GPT-2 Conv1D stores [in, out])."""
    w = attr_at(gm, li.weight).detach().float()
    return w.t() if li.transposed else w


def _fold(gm: fx.GraphModule, g: Group, s: torch.Tensor, scales: dict[str, torch.Tensor]) -> None:
    """x/s goes into the norm (weight and bias), w·s into each linear of the group."""
    for p in (g.norm_weight, g.norm_bias):
        if p is not None:
            old = attr_at(gm, p.target)
            set_tensor(gm, p.target, (old.detach().float() / s).to(old.dtype))
    for li, _ in g.members:
        scales[li.path] = s


def _buffer(gm: fx.GraphModule, path: str, suffix: str, t: torch.Tensor) -> str:
    return add_buffer(gm, "q_" + re.sub(r"\W", "_", path) + "_" + suffix, t)


def _replace(gm: fx.GraphModule, node: fx.Node, li: Linear, op, tensors: dict[str, torch.Tensor], extra: tuple) -> None:
    x, bias = linear_parts(node)
    with gm.graph.inserting_before(node):
        attrs = [gm.graph.get_attr(_buffer(gm, li.path, k, t)) for k, t in tensors.items()]
        new = gm.graph.call_function(op, (x, *attrs, bias, *extra))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _quantize(w: torch.Tensor, li: Linear, cfg: Config, clip: Optional[torch.Tensor]):
    """(op, tensors, extra args, dequantized weight [out, in], bits) for one layer."""
    if cfg.scheme.startswith("int8"):
        dynamic = cfg.scheme == "int8-dynamic"  # its ONNX GEMM may need 7-bit codes (onnx_weights u8s7)
        qmax = quantized.weight_qmax(cfg.onnx_weights) if dynamic else quantizers.QMAX8
        q, sc = quantizers.quantize_per_channel(w, qmax)
        if dynamic:
            op = ops.linear_dq_int8_tensor.default if cfg.activations == "per-tensor" else ops.linear_dq_int8.default
            extra = (cfg.torch_gemm, cfg.onnx_weights)
        else:
            op, extra = ops.linear_w8.default, ()
        return op, {"wq": q.t().contiguous(), "ws": sc}, extra, quantizers.dequantize_per_channel(q, sc), 8 if qmax == quantizers.QMAX8 else 7
    codes, sc, zp = quantizers.quantize_groupwise(w, cfg.group_size, clip=clip)
    groups_ = li.in_features // cfg.group_size
    tensors = {"w4": quantizers.pack_int4(codes).reshape(li.out_features, groups_, cfg.group_size // 2),
               "s4": sc.reshape(-1).contiguous(), "z4": quantizers.pack_zero_points(zp)}
    extra = (li.in_features, cfg.group_size, 4 if cfg.int4_activations == "int8" else 0)
    return ops.linear_w4.default, tensors, extra, quantizers.dequantize_groupwise(codes, sc, zp), 4


_KERNELS = {
    "int8-dynamic": {"torch": "per-token int8 codes x int8 weights: torch._int_mm (int32 accumulate) on CPUs with int8 "
                              "dot-product instructions, else the same codes multiplied in fp32 (see the notes); scales in fp32",
                     "onnx": "per-row QuantizeLinear (uint8, zero point 128) + com.microsoft MatMulIntegerToFloat "
                             "(weights int8 or uint8, see onnx_int8_weights) + scale Mul"},
    "int8-weight-only": {"torch": "int8 weights dequantized to fp32 on every call, fp32 matmul",
                         "onnx": "DequantizeLinear(int8 initializer, axis=1) + MatMul"},
    "int4-weight-only": {"torch": "packed int4 unpacked and dequantized on every call, fp32 matmul (no int4 CPU kernel)",
                         "onnx": "com.microsoft MatMulNBits (bits=4)"},
}
_KERNELS["int4-awq"] = _KERNELS["int4-weight-only"]
_PER_TENSOR = {"torch": "per-tensor uint8 codes (DynamicQuantizeLinear's rule) x int8 weights: torch's fbgemm int8 GEMM where "
                        "it is exact for the weights (torch_int8_gemm fbgemm), else torch._int_mm on CPUs with int8 "
                        "dot-product instructions, else the same codes multiplied in fp32; scales and bias in fp32",
               "onnx": "com.microsoft DynamicQuantizeMatMul (quantize, integer GEMM, scales and bias in one kernel; "
                       "weights int8 or uint8, see onnx_int8_weights)"}


def _kernels(cfg: Config) -> dict:
    if cfg.scheme != "int8-dynamic":
        return dict(_KERNELS[cfg.scheme])
    base = _PER_TENSOR if cfg.activations == "per-tensor" else _KERNELS["int8-dynamic"]
    return {**base, "activations": cfg.activations, "torch_int8_gemm": cfg.torch_gemm, "onnx_int8_weights": cfg.onnx_weights}


def _timing(orig: fx.GraphModule, gm: fx.GraphModule, ctx: PassContext) -> dict:
    res = ctx.time_graphs({"fp32": lambda: orig(**ctx.inputs), "quantized": lambda: gm(**ctx.inputs)})
    fp, q = res["fp32"], res["quantized"]
    return {"fp32_p50_ms": round(fp, 3), "quantized_p50_ms": round(q, 3), "speedup": round(fp / q, 3),
            "threads": torch.get_num_threads()}


def _activation_scales(gm: fx.GraphModule, grps: list[Group], cfg: Config, ctx: PassContext
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """SmoothQuant or AWQ: fold per-channel scales into foldable norms. Returns (input-channel
    scale per linear path, clip ratios per linear path, stats)."""
    batches, calib_note = _calibration(ctx)
    st = _stats(gm, grps, batches, _AWQ_TOKENS if cfg.scheme == "int4-awq" else 0)
    scales, clips, folded, skipped = {}, {}, [], []
    tick = ctx.progress("activation-aware scales", len(grps))
    for g in grps:
        names = [li.path for li, _ in g.members]
        w_all = torch.cat([_weight(gm, li) for li, _ in g.members])
        if not g.foldable:
            skipped.append({"linears": names, "reason": g.why_not})
        elif cfg.smooth is not None:
            sc = quantizers.smooth_scales(st[g.source.name]["absmax"], w_all.abs().amax(dim=0), cfg.smooth.alpha)
            folded.append({"norm": module_path(g.source), "linears": names})
            _fold(gm, g, sc, scales)
        else:
            sc, alpha, errs = quantizers.awq_search(st[g.source.name]["rows"], w_all, cfg.group_size, cfg.awq_grid)
            folded.append({"norm": module_path(g.source), "linears": names, "alpha": alpha,
                           "mse_rtn": errs[0], "mse_best": min(errs)})
            _fold(gm, g, sc, scales)
        if cfg.scheme == "int4-awq" and cfg.awq_clip:
            x = st[g.source.name]["rows"]
            for li, _ in g.members:
                s_li = scales.get(li.path, torch.ones(li.in_features))
                clips[li.path] = quantizers.awq_clip(x / s_li, _weight(gm, li) * s_li, cfg.group_size)
        tick(1)
    params = {"alpha": cfg.smooth.alpha} if cfg.smooth is not None else {"grid": cfg.awq_grid, "clip": cfg.awq_clip}
    return scales, clips, {"calibration": calib_note, **params, "folded": folded, "skipped": skipped}


def _notes(cfg: Config, tied: list[str], skipped: int, timing: Optional[dict]) -> list[str]:
    notes = []
    if skipped:
        notes.append(f"{skipped} linears got no activation-aware scales: their input is not a norm that feeds only them (see skipped)")
    if tied:
        notes.append(f"{', '.join(tied)}: weight is shared with other nodes (tied), so its fp32 copy stays "
                     "next to the quantized one; exclude it to save those bytes")
    if cfg.scheme.startswith("int4"):
        notes.append("torch artifact: no fast int4 CPU kernel is used (dequantize on the fly); it is not expected "
                     "to be faster than fp32 — the ONNX artifact (MatMulNBits) is the fast one")
        if cfg.int4_activations == "int8":
            notes.append("ONNX MatMulNBits runs with int8 activations (accuracy_level 4): the ONNX artifact differs "
                         "from the graph and the torch artifact by that rounding; emit.atol must allow it")
    if cfg.scheme == "int8-weight-only":
        notes.append("weight-only int8 cuts weight bytes; compute stays fp32, so it is not expected to be faster")
    if cfg.scheme == "int8-dynamic":
        if cfg.activations == "per-token":
            notes.append("ONNX activations use the same per-token int8 codes as torch (uint8 + zero point 128), "
                         "not onnxruntime's per-tensor DynamicQuantizeLinear")
        else:
            notes.append("activations: per-tensor: one uint8 scale and zero point per call over the whole activation "
                         "(batch included), as onnxruntime's DynamicQuantizeMatMul computes them; outputs depend a little on "
                         "what else is in the batch, and an outlier token coarsens every token's codes (per-token does not)")
        if cfg.onnx_weights == "u8s8":
            notes.append("ONNX weights are int8 (u8·s8 GEMM, exact and fastest with VNNI/AMX); on an x86 CPU without "
                         "VNNI that GEMM saturates and emit's check fails: use onnx_weights: u8s7 for such a CPU")
        elif cfg.onnx_weights == "u8s7":
            notes.append("weights are int8 kept to 7 bits ([-63, 63]) so that onnxruntime's u8·s8 GEMM, which saturates "
                         "full-range codes on x86 without VNNI, stays exact; ~1.2x faster than the u8·u8 GEMM there "
                         "at one bit less weight precision (onnx_weights: u8u8 keeps 8 bits, u8s8 suits CPUs with VNNI)")
        else:
            notes.append("ONNX weights are uint8 + zero point 128 (u8·u8 GEMM, exact on every onnxruntime kernel)")
        if cfg.torch_gemm == "fp32":
            notes.append("torch artifact: the int8 codes are multiplied in fp32 (torch_gemm: fp32, for CPUs without "
                         "int8 dot-product instructions, where torch._int_mm is many times slower than fp32): smaller "
                         "weights, no speedup on torch — the ONNX artifact runs the integer GEMM")
        elif cfg.torch_gemm == "int_mm":
            notes.append("torch artifact: torch._int_mm (int32 accumulate); fast only on CPUs with VNNI/AMX/i8mm")
        else:
            notes.append("torch artifact: torch's fbgemm int8 GEMM, which quantizes the activations itself by the same "
                         "rule but rounds x·(1/scale): about one code in 150,000 differs by one from onnxruntime's; "
                         "weights whose codes fbgemm cannot multiply exactly on the running CPU take the fp32 path")
    if timing is not None and timing["speedup"] < 1.0:
        notes.append(f"SLOWER: on this machine the quantized torch graph runs at {timing['speedup']:.2f}x "
                     f"the fp32 graph ({timing['quantized_p50_ms']:.2f} ms vs {timing['fp32_p50_ms']:.2f} ms)")
    return notes


@register("quantize", Config, summary="int8 / int4 linear layers with integer kernels (MatMulIntegerToFloat, MatMulNBits, _int_mm)",
          rounds=True, after=("layer_skip", "token_merge", "kv_share", "fuse_linears"), resolve=resolve)
def run(gm: fx.GraphModule, cfg: Config, ctx: PassContext) -> PassResult:
    s = ctx.structure(gm)
    targets, excluded, warnings = select(s.linears, s.head, cfg)
    if not targets:
        raise PassError("no linear layers left to quantize" + (f" (excluded: {', '.join(excluded[:5])})" if excluded else ""),
                        "loosen `exclude`/`include_head`, or drop the quantize step")
    nodes = {n.name: n for n in gm.graph.nodes}
    for li in targets:
        xv = linear_parts(nodes[li.node])[0].meta.get("val")
        if isinstance(xv, torch.Tensor) and xv.dtype != torch.float32:
            raise PassError(f"{li.path}: input is {xv.dtype}; quantize expects an fp32 model", "export the model in fp32")
        if cfg.scheme.startswith("int4") and li.in_features % cfg.group_size:
            ok = [g for g in (16, 32, 64, 128, 256) if li.in_features % g == 0]
            raise PassError(f"group_size {cfg.group_size} does not divide in_features {li.in_features} of {li.path}",
                            f"use a group_size that divides it (e.g. {', '.join(map(str, ok))}) or exclude the layer")
    # the unquantized graph (sharing weights), to time against; only when the recipe benchmarks
    orig = graph_snapshot(gm) if cfg.measure and ctx.time_graphs else None
    grps = groups(gm, targets)
    scales, clips, extra = {}, {}, {}
    if cfg.smooth is not None or cfg.scheme == "int4-awq":
        scales, clips, found = _activation_scales(gm, grps, cfg, ctx)
        extra["smooth" if cfg.smooth is not None else "awq"] = found

    layers, before, after, tied = [], 0, 0, []
    tick = ctx.progress(f"quantize {cfg.scheme}", len(targets))
    for g in grps:
        for li, node in g.members:
            w0 = _weight(gm, li)
            sc = scales.get(li.path)
            op, tensors, args, w_hat, bits = _quantize(w0 * sc if sc is not None else w0, li, cfg, clips.get(li.path))
            w_eff = w_hat / sc if sc is not None else w_hat  # what the layer computes with, vs the original
            layers.append({"name": li.path, "sqnr_db": round(quantizers.sqnr_db(w0, w_eff), 2), "bits": bits})
            orig_w = attr_at(gm, li.weight)
            before += orig_w.numel() * orig_w.element_size()
            after += sum(t.numel() * t.element_size() for t in tensors.values())
            readers = [u for a in gm.graph.nodes if a.op == "get_attr" and a.target == li.weight for u in a.users]
            if len(readers) > 1:  # tied (e.g. lm_head = embedding): the fp32 copy stays for the other readers
                tied.append(li.path)
            _replace(gm, node, li, op, tensors, args)
            tick(1)
    gm.graph.lint()
    gm.recompile()
    timing = _timing(orig, gm, ctx) if orig is not None else None
    skipped = sum(len(k["linears"]) for v in extra.values() for k in v["skipped"])
    return PassResult(gm, modified=True, stats={
        "scheme": cfg.scheme,
        "quantized": len(layers),
        "excluded": excluded,
        "warnings": warnings,
        "kernels": _kernels(cfg),
        "weight_bytes": {"before": before, "after": after, "ratio": round(after / before, 4) if before else None},
        "sqnr_db_min": min(l["sqnr_db"] for l in layers),
        "sqnr_db_mean": round(sum(l["sqnr_db"] for l in layers) / len(layers), 2),
        "layers": layers,
        **extra,
        "torch_graph_timing": timing,
        "notes": _notes(cfg, tied, skipped, timing),
    })
