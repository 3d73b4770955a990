"""Quantized linear ops as torch.library custom ops, each with an ONNX translation.

Registered on `import optcc` so a saved model.pt2 that contains them re-loads in
any process that imported optcc. Weight layouts are chosen so the torch kernel
and the ONNX op read the same tensors:

- optcc::linear_dq_int8 — per-token dynamic int8 activations × per-channel int8
  weights [in, out]. Its `gemm` argument picks the torch kernel: torch._int_mm (int8 GEMM,
  int32 accumulate) or the same codes multiplied in fp32; dequant in fp32. ONNX: the same
  per-token codes, offset by 128 to uint8 by one per-row QuantizeLinear, into com.microsoft
  MatMulIntegerToFloat with a_zero_point 128, the weights stored as its `onnx_weights`
  argument says (u8s8 / u8s7: int8; u8u8: offset by 128 to uint8; see suggest_layout;
  onnxruntime's DynamicQuantizeLinear is per-tensor only), then the same fp32 scale
  multiplies. Both build identical int32 accumulators, so the artifacts agree to float
  rounding (see docs/quantize.md for when not).
- optcc::linear_dq_int8_tensor — the same with one dynamic uint8 scale and zero point for the
  whole activation tensor (DynamicQuantizeLinear's rule). torch: `gemm` fbgemm (torch's fbgemm
  int8 GEMM where it is exact for the weights), int_mm or fp32. ONNX: one com.microsoft
  DynamicQuantizeMatMul, which quantizes, multiplies, scales and adds the bias in one kernel.
- optcc::linear_w8 — int8 per-channel weight-only: dequantize, fp32 matmul.
  ONNX: DequantizeLinear(axis=1) + MatMul.
- optcc::linear_w4 — int4 group-wise weight-only in MatMulNBits layout
  (codes [out, groups, group/2] packed low nibble first, scales [out·groups],
  packed zero points). torch: unpack + dequantize + fp32 matmul (no fast int4
  CPU kernel is used). ONNX: com.microsoft MatMulNBits.
"""
from __future__ import annotations

import functools
import math
import platform
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from optcc.ops import register_onnx_translation
from optcc.algorithms.quantizers import QMAX8, EPS, quantize_per_tensor_u8, quantize_per_token, unpack_int4, unpack_zero_points


# ----------------------------------------------------- onnxruntime contrib ---

_CONTRIB = {  # name: (inputs as (name, type, optional), attributes); outputs are one Y of type T1/T3
    "MatMulIntegerToFloat": ([("A", "T1", 0), ("B", "T2", 0), ("a_scale", "T3", 0), ("b_scale", "T3", 0),
                              ("a_zero_point", "T1", 1), ("b_zero_point", "T2", 1), ("bias", "T3", 1)], (), "T3"),
    "MatMulNBits": ([("A", "T3", 0), ("B", "T1", 0), ("scales", "T3", 0), ("zero_points", "T1", 1)],
                    ("K", "N", "bits", "block_size", "accuracy_level"), "T3"),
    "DynamicQuantizeMatMul": ([("A", "T3", 0), ("B", "T2", 0), ("b_scale", "T3", 0), ("b_zero_point", "T2", 1),
                               ("bias", "T3", 1)], (), "T3"),
}


def _contrib(name: str):
    """An onnxruntime com.microsoft op as an onnxscript op. onnx ships no schemas for
    contrib ops and the exporter's tracer needs one, so the subset used here is declared."""
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    inputs, attrs, out_type = _CONTRIB[name]
    P, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption
    schema = OpSchema(
        name, "com.microsoft", 1,
        inputs=[P(n, t, param_option=opt.Optional if o else opt.Single) for n, t, o in inputs],
        outputs=[P("Y", out_type)],
        type_constraints=[("T1", ["tensor(uint8)", "tensor(int8)"], ""), ("T2", ["tensor(int8)", "tensor(uint8)"], ""),
                          ("T3", ["tensor(float)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in attrs],
    )
    return Op(Opset("com.microsoft", 1), name, schema)


# ------------------------------------------------------------ int8 dynamic ---
#
# Which integer GEMM runs and how ONNX stores the weights are quantize options (torch_gemm,
# onnx_weights) that reach these ops as arguments, so an artifact computes the same way on any
# machine. This module only suggests them for `auto` (suggest_*), on request, never at import.

GEMMS = ("int_mm", "fp32", "fbgemm")
LAYOUTS = ("u8s8", "u8s7", "u8u8")
_X86 = ("x86_64", "AMD64", "i386", "i686")
_INT8_DOT = {"avx512_vnni", "avx_vnni", "amx_int8", "i8mm", "asimddp"}  # int8 dot-product instructions


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def suggest_gemm(per_tensor: bool, weight_qmax: int) -> tuple[str, str]:
    """(torch_gemm, why) for `auto` on this machine.

    torch._int_mm on CPU is fast only with int8 dot-product instructions (x86 VNNI / AMX, Arm
    i8mm / dotprod); without them (e.g. AVX2-only x86) it was measured at ~20x slower than the
    fp32 matmul it replaces. There the same int8 codes are multiplied in fp32: the products and
    sums are integers, so the result matches the int32 GEMM to float rounding. Per-tensor
    activations can take torch's fbgemm int8 GEMM where it is exact for the weights' codes."""
    if per_tensor and weight_qmax <= fbgemm_exact_qmax():
        return "fbgemm", f"torch's fbgemm int8 GEMM is exact here for codes up to {fbgemm_exact_qmax()}"
    if cpu_flags() & _INT8_DOT or platform.machine() not in (*_X86, "aarch64", "arm64"):
        return "int_mm", "this CPU has int8 dot-product instructions"
    return "fp32", "this CPU has no int8 dot-product instructions (torch._int_mm would be slow)"


def suggest_layout() -> tuple[str, str]:
    """(onnx_weights, why) for `auto` on this machine: how the ONNX int8-dynamic translation stores
    weights, and so which onnxruntime GEMM runs.

    - "u8s8": int8 weights (what onnxruntime's own quantizer emits). On x86 with VNNI / AMX the
      u8·s8 GEMM accumulates in int32 (exact) and is about 2x faster than u8·u8 (6.6 vs 12.4 ms
      for a 1024×384→1536 layer, 2 threads, Zen 4).
    - "u8s7": int8 weights kept to 7 bits ([-63, 63]). On x86 without VNNI (AVX2's vpmaddubsw)
      the u8·s8 GEMM sums pairs of u8·s8 products in int16 and saturates on full-range codes
      (255·127·2 > 32767: 13% error); with |w| <= 63 a pair sum stays under 32767 (255·63·2 =
      32130), so the same fast kernel is exact: 5.54 vs 6.86 ms for u8·u8 on the layer above on a
      2-core AVX2 EPYC (benchmarks/int8_gemm.py). The cost is one bit of weight precision.
    - "u8u8": weights offset by 128 to uint8 (zero point 128): exact on every onnxruntime kernel,
      8-bit weights, slower on x86. Suggested on CPUs other than x86.

    emit's artifact check fails a u8s8 artifact that saturates on the machine that checks it."""
    if platform.machine() not in _X86:
        return "u8u8", "not an x86 CPU: the uint8 layout is exact on every onnxruntime kernel"
    if cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "u8s8", "x86 with VNNI/AMX: the u8·s8 GEMM accumulates in int32"
    return "u8s7", "x86 without VNNI: 7-bit weights keep onnxruntime's u8·s8 GEMM from saturating"


def weight_qmax(layout: str) -> int:
    """Largest int8-dynamic weight code for an ONNX weight layout: 63 for u8s7, else 127."""
    return 63 if layout == "u8s7" else QMAX8


@functools.cache
def fbgemm_exact_qmax() -> int:
    """Largest |int8 weight code| for which torch's fbgemm int8 GEMM gives exact integer products
    on this machine, found by running it once (on first call) on the worst case (uint8 codes 255
    against weight codes ±qmax): 127 where it accumulates in int32 (VNNI), 63 where it adds pairs
    of u8·s8 products in int16 (AVX2: 255·63·2 < 32767, as onnxruntime's kernel), 0 where this
    torch has no usable fbgemm (builds without it, or the deprecated op removed).

    The op is torch.fbgemm_linear_int8_weight_fp32_activation: dynamic per-tensor uint8
    activations × int8 weights packed once, the kernel torch.ao's dynamic quantized linear runs;
    deprecated in torch, so probed rather than assumed."""
    if not hasattr(torch, "fbgemm_linear_int8_weight_fp32_activation") or \
            "fbgemm" not in torch.backends.quantized.supported_engines:
        return 0
    x = torch.tensor([[255.0, 0.0] * 16, [255.0] * 32, [0.0, 255.0] * 16])  # range [0, 255]: scale 1, zero point 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the API is deprecated; torch warns once per process, here
            for qmax in (127, 63):
                w = torch.full((4, 32), qmax, dtype=torch.int8)
                w[1::2] = -qmax
                if torch.equal(_fbgemm_mm(x, _fbgemm_pack(w)), x @ w.t().to(torch.float32)):
                    return qmax
    except RuntimeError:
        pass
    return 0


def _fbgemm_pack(w_t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """int8 codes [out, in] as fbgemm's GEMM reads them: (codes, packed, column sums, zero bias)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated, as above; once per weight, off the hot path
        return w_t, torch.fbgemm_pack_quantized_matrix(w_t), w_t.sum(1, dtype=torch.int32), torch.zeros(w_t.shape[0])


def _fbgemm_mm(x2: Tensor, packed: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """x2 [rows, in] f32 quantized per tensor to uint8 by fbgemm × the packed codes → [rows, out]
    f32 in units of the weight codes (weight scale 1, zero point 0, no bias)."""
    w_t, mat, col_sums, zeros = packed
    return torch.fbgemm_linear_int8_weight_fp32_activation(x2, w_t, mat, col_sums, 1.0, 0, zeros)


def _check_choice(gemm: str, onnx_weights: str) -> None:
    if gemm not in GEMMS or onnx_weights not in LAYOUTS:
        raise ValueError(f"gemm must be one of {GEMMS} and onnx_weights one of {LAYOUTS}, got {gemm!r}, {onnx_weights!r}")


@torch.library.custom_op("optcc::linear_dq_int8", mutates_args=())
def linear_dq_int8(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], gemm: str,
                   onnx_weights: str) -> Tensor:
    """x: [..., in] f32; w_q: [in, out] int8; w_scale: [out] f32; bias: [out] → [..., out].
    gemm: int_mm | fp32 (the integer codes multiplied in fp32); onnx_weights only reaches ONNX."""
    _check_choice(gemm, onnx_weights)
    q, s = quantize_per_token(x.reshape(-1, x.shape[-1]))
    acc = torch._int_mm(q, w_q).to(torch.float32) if gemm == "int_mm" else torch.mm(q.to(torch.float32), w_q.to(torch.float32))
    # (acc · w_scale) · s + bias: the order onnxruntime's MatMulIntegerToFloat + Mul + Add use
    y = acc.mul_(w_scale).mul_(s)
    if bias is not None:
        y.add_(bias)
    return y.reshape(*x.shape[:-1], w_q.shape[1])


def _linear_fake(x, w_q, w_scale, bias, *choices):
    """Output shape of the ops whose weights are [in, out]: [..., out]."""
    return x.new_empty((*x.shape[:-1], w_q.shape[1]))


linear_dq_int8.register_fake(_linear_fake)


def _weights_u8(w_q):
    """int8 weights as uint8 + 128 (zero point 128), for the u8u8 layout (see suggest_layout). It reads
    only the initializer, so onnxruntime folds it once when the session is created."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    i32 = ir.DataType.INT32
    return op.Cast(op.Add(op.Cast(w_q, to=i32), op.Constant(value=ir.tensor(128, dtype=i32))), to=ir.DataType.UINT8)


def _onnx_linear_dq_int8(x, w_q, w_scale, bias=None, gemm: str = "fp32", onnx_weights: str = "u8u8"):
    import onnx_ir as ir
    from onnxscript import opset18 as op

    u8 = ir.DataType.UINT8
    last = op.Constant(value_ints=[-1])
    # max|x| as max(max x, -min x): two read-only reductions, no |x| tensor written
    amax = op.Max(op.ReduceMax(x, last, keepdims=1), op.Neg(op.ReduceMin(x, last, keepdims=1)))
    s = op.Max(op.Div(amax, op.Constant(value_float=float(QMAX8))), op.Constant(value_float=EPS))  # [..., 1]
    # One fused QuantizeLinear per row (per-axis over the flattened tokens): round(x / s) + 128 as uint8.
    rows = op.Reshape(s, op.Constant(value_ints=[-1]))
    zp = op.Expand(op.Constant(value=ir.tensor(128, dtype=u8)), op.Shape(rows))
    q = op.QuantizeLinear(op.Reshape(x, op.Constant(value_ints=[-1, int(w_q.shape[0])])), rows, zp, axis=0)
    q = op.Reshape(q, op.Shape(x))
    # int32 accumulate, then acc · w_scale in the GEMM epilogue (a_scale 1: the per-token scale
    # cannot go there, onnxruntime takes a scalar a_scale), then · s and + bias.
    a_zp = op.Constant(value=ir.tensor(128, dtype=u8))
    if onnx_weights in ("u8s8", "u8s7"):  # u8s7: the pass kept the codes to 7 bits
        y = _contrib("MatMulIntegerToFloat")(q, w_q, op.Constant(value_float=1.0), w_scale, a_zp)
    else:
        y = _contrib("MatMulIntegerToFloat")(q, _weights_u8(w_q), op.Constant(value_float=1.0), w_scale, a_zp,
                                             op.Constant(value=ir.tensor(128, dtype=u8)))
    y = op.Mul(y, s)
    return op.Add(y, bias) if bias is not None else y


@torch.library.custom_op("optcc::linear_dq_int8_tensor", mutates_args=())
def linear_dq_int8_tensor(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], gemm: str,
                          onnx_weights: str) -> Tensor:
    """Per-tensor dynamic uint8 activations (one scale and zero point for the whole x, as ONNX
    DynamicQuantizeLinear) × per-channel int8 weights. x: [..., in]; w_q: [in, out] int8;
    w_scale: [out]; bias: [out] → [..., out]. gemm: fbgemm (torch's fbgemm int8 GEMM where it is
    exact for these weights here, else the codes in fp32) | int_mm | fp32."""
    _check_choice(gemm, onnx_weights)
    x2 = x.reshape(-1, x.shape[-1])
    packed = _fbgemm_weights(w_q) if gemm == "fbgemm" else None
    if packed is not None:  # fbgemm quantizes x2 itself and applies its scale
        y = _fbgemm_mm(x2.to(torch.float32).contiguous(), packed).mul_(w_scale)
    else:
        q, s, zp = quantize_per_tensor_u8(x2)
        if gemm == "int_mm":  # uint8 codes as int8 (q - 128), the offset added back through the weights' column sums
            acc = torch._int_mm((q - 128.0).to(torch.int8), w_q) + ((128.0 - zp).to(torch.int32) * w_q.sum(0, dtype=torch.int32))
            acc = acc.to(torch.float32)
        else:
            acc = torch.mm(q - zp, w_q.to(torch.float32))
        y = acc.mul_(s * w_scale)  # acc · (a_scale · b_scale) + bias: onnxruntime's DynamicQuantizeMatMul order
    if bias is not None:
        y.add_(bias)
    return y.reshape(*x.shape[:-1], w_q.shape[1])


linear_dq_int8_tensor.register_fake(_linear_fake)


# id(w_q) -> (w_q._version, fbgemm's tensors or None), dropped when w_q is collected. Not an
# attribute of w_q: the packed matrix is an opaque handle that must not be deep-copied or saved.
_FBGEMM_PACKED: dict[int, tuple[int, Optional[tuple[Tensor, Tensor, Tensor, Tensor]]]] = {}


def _fbgemm_weights(w_q: Tensor) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """w_q [in, out] int8 as fbgemm reads it: (codes [out, in], packed, column sums, zero bias),
    packed on the first call and kept while w_q lives (again if it changes in place); None when
    a code exceeds what fbgemm keeps exact here (fbgemm_exact_qmax): the op takes another kernel."""
    key = id(w_q)
    cached = _FBGEMM_PACKED.get(key)
    if cached is None or cached[0] != w_q._version:
        w_t = w_q.t().contiguous()
        fits = w_t.numel() and int(w_t.to(torch.int16).abs().max()) <= fbgemm_exact_qmax()
        packed = _fbgemm_pack(w_t) if fits else None
        if cached is None:
            weakref.finalize(w_q, _FBGEMM_PACKED.pop, key, None)
        cached = _FBGEMM_PACKED[key] = (w_q._version, packed)
    return cached[1]


def _onnx_linear_dq_int8_tensor(x, w_q, w_scale, bias=None, gemm: str = "fp32", onnx_weights: str = "u8u8"):
    """One com.microsoft DynamicQuantizeMatMul: onnxruntime quantizes x per tensor, runs the integer
    GEMM and applies both scales and the bias in one kernel (what its own quantizer fuses to)."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    if onnx_weights in ("u8s8", "u8s7"):
        return _contrib("DynamicQuantizeMatMul")(x, w_q, w_scale, None, bias)
    zp = op.Constant(value=ir.tensor(128, dtype=ir.DataType.UINT8))
    return _contrib("DynamicQuantizeMatMul")(x, _weights_u8(w_q), w_scale, zp, bias)


# -------------------------------------------------------- int8 weight-only ---

@torch.library.custom_op("optcc::linear_w8", mutates_args=())
def linear_w8(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x: [..., in]; w_q: [in, out] int8; w_scale: [out] → [..., out]."""
    w = w_q.to(torch.float32) * w_scale
    y = torch.matmul(x, w)
    return y + bias if bias is not None else y


linear_w8.register_fake(_linear_fake)


def _onnx_linear_w8(x, w_q, w_scale, bias=None):
    from onnxscript import opset18 as op

    w = op.DequantizeLinear(w_q, w_scale, axis=1)  # no zero point: symmetric int8
    y = op.MatMul(x, w)
    return op.Add(y, bias) if bias is not None else y


# ------------------------------------------------------- int4 weight-only ---

@torch.library.custom_op("optcc::linear_w4", mutates_args=())
def linear_w4(x: Tensor, w_packed: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
              in_features: int, group_size: int, accuracy_level: int) -> Tensor:
    """x: [..., in]; w_packed: uint8 [out, groups, group/2]; scales: [out·groups];
    zeros: uint8 [out·ceil(groups/2)] (MatMulNBits layout) → [..., out].
    accuracy_level only reaches the ONNX op (4: onnxruntime quantizes x per block to int8)."""
    out_f, groups = w_packed.shape[0], w_packed.shape[1]
    codes = unpack_int4(w_packed).reshape(out_f, groups, group_size).to(torch.float32)
    zero = unpack_zero_points(zeros, out_f, groups).to(torch.float32)
    w = ((codes - zero[..., None]) * scales.reshape(out_f, groups, 1)).reshape(out_f, in_features)
    return F.linear(x, w, bias)


@linear_w4.register_fake
def _(x, w_packed, scales, zeros, bias, in_features, group_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


def _onnx_linear_w4(x, w_packed, scales, zeros, bias=None, in_features: int = 0, group_size: int = 0,
                    accuracy_level: int = 0):
    out_f = w_packed.shape[0]
    y = _contrib("MatMulNBits")(x, w_packed, scales, zeros, K=in_features, N=int(out_f), bits=4, block_size=group_size,
                                accuracy_level=accuracy_level)
    if bias is None:
        return y
    from onnxscript import opset18 as op

    return op.Add(y, bias)


for _op, _fn in ((torch.ops.optcc.linear_dq_int8.default, _onnx_linear_dq_int8),
                 (torch.ops.optcc.linear_dq_int8_tensor.default, _onnx_linear_dq_int8_tensor),
                 (torch.ops.optcc.linear_w8.default, _onnx_linear_w8),
                 (torch.ops.optcc.linear_w4.default, _onnx_linear_w4)):
    register_onnx_translation(_op, _fn)



# Count the same multiply-adds as the fp32 linear they replace (integer or not), so the
# report's FLOPs column does not read a quantized layer as removed work.
@register_flop_formula([torch.ops.optcc.linear_dq_int8, torch.ops.optcc.linear_dq_int8_tensor, torch.ops.optcc.linear_w8,
                        torch.ops.optcc.linear_w4])
def _linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(out_shape) * x_shape[-1]


QUANT_OPS = {torch.ops.optcc.linear_dq_int8.default, torch.ops.optcc.linear_dq_int8_tensor.default,
             torch.ops.optcc.linear_w8.default, torch.ops.optcc.linear_w4.default}
