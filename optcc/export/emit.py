"""Emit: the optimized GraphModule → model.pt2 (compiled by AOTInductor, see compiled.py),
model.exported.pt2 (the uncompiled ExportedProgram) and/or model.onnx, each re-loaded and
compared with the optimized graph's outputs before it counts."""
from __future__ import annotations

import functools
import hashlib
import io
import math
import logging
import time
import warnings
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.fx as fx

from optcc.compat import pin_serialization_id
from optcc.ops import ONNX_TRANSLATIONS  # filled by the op modules on `import optcc`
from optcc.export.compiled import compile_package, load_package
from optcc.graph.capture import capture, flat_outputs, load_exported, run_graph
from optcc.errors import ExportError
from optcc.algorithms.metrics import fidelity


FILES = {"torch": "model.pt2", "exported": "model.exported.pt2", "onnx": "model.onnx"}
RUNTIME = {"torch": "torch", "exported": "torch", "onnx": "onnxruntime"}  # what runs each format
BACKEND_KEY = {"torch": "torch", "exported": "torch-exported", "onnx": "onnxruntime"}  # its name in timings


@dataclass
class Artifact:
    format: str  # "torch" (compiled) | "exported" | "onnx"
    path: Path
    runner: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]
    check: dict  # fidelity of the re-loaded artifact vs the optimized graph
    build: dict | None = None  # how it was built (compiled: compile_s, compiled_for, compiler)

    def to_dict(self, root: Path) -> dict:
        return {
            "format": self.format,
            "path": str(self.path.relative_to(root)),
            "bytes": artifact_bytes(self.path),
            "sha256": sha256(self.path),
            "check": self.check,
            **({"build": self.build} if self.build else {}),
        }


def artifact_bytes(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet():
    """torch.onnx and onnxscript print progress to stdout; keep stdout for results."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)



def export_program(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], dynamic: bool,
                   shapes: dict | None = None) -> torch.export.ExportedProgram:
    """Re-export the edited graph so it can be saved."""
    return capture(gm, inputs, dynamic, shapes)


def emit_exported(ep: torch.export.ExportedProgram, out: Path) -> Path:
    path = out / FILES["exported"]
    # Same recipe, model and versions must give the same bytes: drop the
    # provenance metadata that records Python object ids, then pin the archive's
    # random serialization id.
    for node in ep.graph.nodes:
        node.meta.pop("from_node", None)
    try:
        with _quiet():
            torch.export.save(ep, str(path))
    except Exception as e:
        raise ExportError(f"saving {path.name} failed: {type(e).__name__}: {e}", "run with --debug") from e
    pin_serialization_id(path)
    return path


def load_exported_runner(path: Path) -> Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]:
    try:
        module = load_exported(path).module()
    except ValueError as e:
        raise ExportError(f"{path.name} was saved, but torch.export.load cannot read it back ({e})",
                          "a torch limitation for this graph; use emit.formats: [onnx]") from e
    return functools.partial(run_graph, module)


def _consts_finite(graph) -> bool:
    """Every float constant of the graph (initializers of any size, Constant nodes) is finite."""
    import numpy as np

    tensors = [v.const_value for v in graph.initializers.values() if v.const_value is not None]
    tensors += [a.value for n in graph if n.op_type == "Constant" for a in n.attributes.values()
                if a.name in ("value", "value_float", "value_floats")]
    for t in tensors:
        arr = np.asarray(t.numpy() if hasattr(t, "numpy") else t)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return False
    return True


def boolean_mask_fill_to_inf(graph) -> int:
    """Give boolean attention masks torch's meaning for a fully masked row: zeros.

    torch.onnx translates sdpa's boolean mask as Where(mask, 0, finfo.min) added to the logits,
    so a row whose keys are all masked gets a uniform softmax (the mean of V), where torch's sdpa
    returns 0. With -inf as the fill the row's softmax is NaN, and the exporter's own guard
    Where(IsNaN(softmax), 0, softmax) turns it into the zeros torch gives. Rewrites the fill of
    each such Where that feeds (through one Add) a guarded Softmax; returns how many."""
    import numpy as np
    import onnx_ir as ir

    lowest = float(np.finfo(np.float32).min)
    rewritten = 0
    for where in [n for n in graph if n.op_type == "Where" and len(n.inputs) == 3]:
        fill = where.inputs[2]
        if fill is None or fill.const_value is None or fill.const_value.numpy().size != 1 \
                or float(fill.const_value.numpy().reshape(())) != lowest:
            continue
        adds = [u.node for u in where.outputs[0].uses() if u.node.op_type == "Add"]
        softmaxes = [u.node for a in adds for u in a.outputs[0].uses() if u.node.op_type == "Softmax"]
        if not softmaxes or not all(any(u.node.op_type == "IsNaN" for u in sm.outputs[0].uses()) for sm in softmaxes):
            continue
        ninf = ir.node("Constant", [], {"value": ir.tensor(np.array(-np.inf, dtype=np.float32))})
        graph.insert_before(where, ninf)
        where.replace_input_with(2, ninf.outputs[0])
        rewritten += 1
    return rewritten


def drop_softmax_nan_guards(graph) -> int:
    """Remove the exporter's Where(IsNaN(softmax), 0, softmax) after each attention softmax.

    torch.onnx writes it for scaled_dot_product_attention so that a fully masked row
    (every logit -inf) gives 0 like torch, not NaN. Softmax over finite logits never
    gives NaN, so where every float constant of the graph (mask fill values: HF models
    use finfo.min) is finite the guard only costs two passes over the [batch, heads,
    q, k] probabilities per layer (~15% of MiniLM's int8 latency). Graphs with an -inf
    constant of any size (a boolean mask's fill, see boolean_mask_fill_to_inf, or a
    causal mask buffer) keep it. Returns the number of guards removed."""
    if not _consts_finite(graph):
        return 0
    removed = 0
    for where in [n for n in graph if n.op_type == "Where" and len(n.inputs) == 3]:
        cond, zero, probs = where.inputs
        isnan = cond.producer() if cond is not None else None
        if (isnan is None or isnan.op_type != "IsNaN" or isnan.inputs[0] is not probs or probs.producer() is None
                or probs.producer().op_type != "Softmax" or zero is None or zero.const_value is None
                or zero.const_value.numpy().size != 1 or float(zero.const_value.numpy().reshape(())) != 0.0
                or where.outputs[0].is_graph_output() or len(cond.uses()) != 1):
            continue
        where.outputs[0].replace_all_uses_with(probs)
        graph.remove([where, isnan], safe=True)
        removed += 1
    return removed


def flatten_residual_layernorms(graph) -> int:
    """Run each LayerNormalization that follows a 3-D residual Add on a 2-D [tokens, hidden] view.

    onnxruntime's SkipLayerNormFusion turns Add (+ bias Add) + LayerNormalization over 3-D
    tensors into com.microsoft SkipLayerNormalization, whose CPU kernel is a scalar loop with a
    division per element, one row per task: 3-4x slower than the Add and LayerNormalization it
    replaces (1.0 vs 0.3 ms for 8x128x384, 2 threads; ~13 ms of MiniLM's 8x128 int8 latency;
    benchmarks/ort_layernorm.py). The fusion needs the LayerNormalization's input to come from
    the Add itself, so a Reshape to [-1, hidden] in between (an alias, no copy) keeps the two fast
    ops. The result is the same LayerNormalization over the same rows. Returns the number rewritten."""
    import numpy as np
    import onnx_ir as ir

    rewritten = 0
    for ln in [n for n in graph if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx")]:
        x, y = ln.inputs[0], ln.outputs[0]
        add = x.producer() if x is not None else None
        shape = x.shape if x is not None else None
        axis = ln.attributes["axis"].value if "axis" in ln.attributes else -1
        if (add is None or add.op_type != "Add" or shape is None or len(shape) != 3 or axis not in (-1, 2)
                or not isinstance(shape[2], int) or any(o.uses() or o.is_graph_output() for o in ln.outputs[1:])):
            continue
        to_2d = ir.node("Constant", [], {"value": ir.tensor(np.array([-1, shape[2]], dtype=np.int64))})
        flat = ir.node("Reshape", [x, to_2d.outputs[0]])
        shape_of = ir.node("Shape", [x])
        norm = ir.node("LayerNormalization", [flat.outputs[0], *ln.inputs[1:]], dict(ln.attributes.items()))
        back = ir.node("Reshape", [norm.outputs[0], shape_of.outputs[0]])
        back.outputs[0].shape, back.outputs[0].type = y.shape, y.type
        graph.insert_before(ln, [to_2d, flat, shape_of, norm, back])
        if y.is_graph_output():  # the model's last norm: the Reshape's output takes its place and name
            name, y.name = y.name, None
            back.outputs[0].name = name
        y.replace_all_uses_with(back.outputs[0], replace_graph_outputs=True)
        graph.remove(ln, safe=True)
        rewritten += 1
    return rewritten


def emit_onnx(ep: torch.export.ExportedProgram, inputs: dict[str, torch.Tensor], out: Path, opset: int,
              output_names: list[str] | None = None) -> Path:
    path = out / "model.onnx"
    large = sum(p.numel() * p.element_size() for p in ep.state_dict.values()) > 1_500_000_000
    try:
        with _quiet():
            prog = torch.onnx.export(ep, (), kwargs=dict(inputs), dynamo=True, opset_version=opset,
                                     external_data=large, optimize=True, verbose=False,
                                     custom_translation_table=dict(ONNX_TRANSLATIONS) or None)
            boolean_mask_fill_to_inf(prog.model.graph)
            drop_softmax_nan_guards(prog.model.graph)
            flatten_residual_layernorms(prog.model.graph)
            for value, name in zip(prog.model.graph.outputs, output_names or []):
                value.name = name  # e.g. logits, present_key_0, ... for decoders
            prog.save(str(path), external_data=large)
    except Exception as e:
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                          "drop onnx from emit.formats, or run with --debug to see the failing op") from e
    return path


def ort_session(model: Path | bytes, threads: int | None = None, **options):
    """An onnxruntime CPU session of a model file or serialized model: `threads` intra-op threads and
    one inter-op thread when given, warnings not logged; other SessionOptions fields by keyword
    (enable_profiling=True, graph_optimization_level=...)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    for name, value in options.items():
        setattr(so, name, value)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=["CPUExecutionProvider"])


def load_onnx(path: Path, threads: int | None = None) -> Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]:
    try:
        sess = ort_session(path, threads)
    except Exception as e:  # onnxruntime raises its own exception types when a graph has no kernel here
        first = str(e).splitlines()[0][:300]
        low = "bfloat16" in first or "float16" in first
        raise ExportError(f"{path.name}: onnxruntime's CPU provider cannot run this graph: {first}",
                          "its CPU kernels are fp32/int8: emit the torch artifact for a bf16/fp16 graph" if low
                          else "run with --debug, or drop onnx from emit.formats") from e
    return OrtRunner(sess)


class OrtRunner:
    """An onnxruntime session as a runner: {name: tensor} -> outputs. graph_s adds up the seconds spent
    inside InferenceSession.run, so a caller can tell the graph's time from its own (generation's
    loop overhead)."""

    def __init__(self, sess) -> None:
        self.sess, self.names, self.graph_s = sess, [i.name for i in sess.get_inputs()], 0.0

    def __call__(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        feed = {n: inputs[n].numpy() for n in self.names}
        t0 = time.perf_counter()
        out = self.sess.run(None, feed)
        self.graph_s += time.perf_counter() - t0
        return [torch.from_numpy(x) for x in out]


def load_artifact(path: Path, threads: int | None = None) -> Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """A runner for any artifact emit writes: model.onnx, a compiled model.pt2 package, or an
    ExportedProgram .pt2 (told apart by their contents)."""
    from optcc.export.compiled import is_package

    path = Path(path)
    if path.suffix == ".onnx":
        return load_onnx(path, threads)
    return load_package(path) if is_package(path) else load_exported_runner(path)


NOISE_FACTOR = 2.0  # an artifact of a rounding graph may differ from it by this many times the graph's own error


def quantization_noise(expected: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float | None]:
    """Per output: the optimized graph's max abs error against the original model on the same
    inputs (None where an output is not a float tensor of the reference's shape)."""
    return [float((e.float() - r.float()).abs().max()) if e.is_floating_point() and r.shape == e.shape and e.numel()
            else None for e, r in zip(expected, reference)]


def verify(runner, inputs: dict[str, torch.Tensor], expected: list[torch.Tensor], primary: int, what: str, atol: float,
           names: list[str] | None = None, noise: list[float | None] | None = None,
           aligners: Sequence[Callable] = ()) -> dict:
    """Run a re-loaded artifact and compare it with the optimized graph's outputs.

    Float outputs may differ by `atol` relative to the largest output magnitude. A graph that
    rounds (quantization; `noise` given, see quantization_noise) may also differ by up to twice
    its own error against the original model: the artifact computes the same codes in another
    runtime, one code flipped at a rounding boundary moves later values by up to a quantization
    step, and two roundings that are each within the graph's error of the original can sit on
    opposite sides of it (seen: MiniLM with token merging from block 1 and per-tensor int8, 1.27x
    the graph's error, on an AVX2 EPYC). A wrong kernel, scale or layout gives errors well beyond. `aligners` (the passes' PassResult.align) first adjust outputs that a
    pass lets differ legitimately, and add their stats to the check."""
    try:
        got = runner(inputs)
    except Exception as e:
        raise ExportError(f"{what} does not run after re-loading: {type(e).__name__}: {str(e)[:300]}", "run with --debug") from e
    if len(got) != len(expected):
        raise ExportError(f"{what} returns {len(got)} outputs, expected {len(expected)}", "run with --debug")
    for g, e in zip(got, expected):
        if tuple(g.shape) != tuple(e.shape):
            raise ExportError(f"{what} output shape {tuple(g.shape)} differs from {tuple(e.shape)}", "run with --debug")
    aligned = {}
    for align in aligners:
        try:
            got, expected, found = align(list(got), list(expected), list(names or []))
        except ValueError as e:
            raise ExportError(f"{what}: {e}", "run with --debug") from e
        aligned.update(found)
    scale = max(1.0, max((float(e.float().abs().max()) for e in expected if e.numel() and e.is_floating_point()), default=1.0))
    worst, allowed_worst = 0.0, atol * scale
    # the graph's quantization error relative to each float output's range: codes stored by the
    # graph (an int8 KV cache, 127 = a vector's max) may move by that share of their range
    relative = max((NOISE_FACTOR * n / float(e.float().abs().max()) for n, e in zip(noise or [], expected)
                    if n is not None and e.numel() and float(e.float().abs().max()) > 0), default=0.0)
    code_check = None
    for i, (g, e) in enumerate(zip(got, expected)):
        if e.is_floating_point():
            err = float((g.float() - e.float()).abs().max()) if e.numel() else 0.0
            allowed = max(atol * scale, NOISE_FACTOR * (noise[i] or 0.0) if noise else 0.0)
            if err > allowed:
                why = " (the graph's own quantization error)" if allowed > atol * scale else ""
                raise ExportError(f"{what} output {i} differs from the optimized graph by {err:.3g} (allowed {allowed:.3g}{why})",
                                  "run with --debug; raise emit.atol only if this difference is expected")
            if err > worst:
                worst, allowed_worst = err, allowed
        elif e.dtype in (torch.int8, torch.uint8):
            # quantized codes (an int8 KV cache): float noise upstream moves a value across a
            # rounding boundary (one code), so compare them like floats, relative to the code range
            codes = int((g.to(torch.int32) - e.to(torch.int32)).abs().max()) if e.numel() else 0
            allowed = max(1.0, atol * torch.iinfo(e.dtype).max, math.ceil(relative * torch.iinfo(e.dtype).max))
            if codes > allowed:
                raise ExportError(f"{what} {str(e.dtype).removeprefix('torch.')} output differs from the graph's by "
                                  f"{codes} codes (allowed {allowed:.3g})", "raise emit.atol if this is expected, or run with --debug")
            if code_check is None or codes > code_check["code_diff"]:
                code_check = {"code_diff": codes, "allowed_code_diff": allowed}
        elif not torch.equal(g.to(e.dtype), e):
            raise ExportError(f"{what} integer output differs from the graph's", "run with --debug")
    check = fidelity(expected[primary], got[primary])
    check["max_abs_err"] = worst
    check["allowed_abs_err"] = allowed_worst
    check["criterion"] = "quantization-noise" if noise else "atol"
    check.update(code_check or {})
    check.update(aligned)
    return check


def emit_all(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], formats: tuple[str, ...], opset: int,
             out: Path, primary: int, atol: float, dynamic: bool, threads: int | None = None,
             shapes: dict | None = None, output_names: list[str] | None = None,
             rounding_reference: list[torch.Tensor] | None = None, aligners: Sequence[Callable] = (),
             isa: str = "auto") -> list[Artifact]:
    """Export, re-load and check each format. `rounding_reference` (the original model's outputs
    on `inputs`), given when a pass rounds values, lets artifacts differ from the graph by up to
    the graph's own quantization error (see verify)."""
    with torch.no_grad():
        expected = flat_outputs(gm(**inputs))
    noise = quantization_noise(expected, rounding_reference) if rounding_reference is not None else None
    ep = export_program(gm, inputs, dynamic, shapes)
    artifacts = []
    for fmt in formats:
        build = None
        if fmt == "torch":
            path, build = compile_package(gm, inputs, dynamic, shapes, out, isa)
            runner = load_package(path)
        elif fmt == "exported":
            path = emit_exported(ep, out)
            runner = load_exported_runner(path)
        else:
            path = emit_onnx(ep, inputs, out, opset, output_names)
            runner = load_onnx(path, threads)
        check = verify(runner, inputs, expected, primary, path.name, atol, output_names, noise, aligners)
        artifacts.append(Artifact(fmt, path, runner, check, build))
    return artifacts
