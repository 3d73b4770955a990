"""How the quantized linear ops (quantized.py) become plain ops for the compiled torch artifact.

AOTInductor cannot compile a Python op; it would call back into Python for each one. Before
compiling, export/compiled.py replaces each optcc op node with the function its lowering returns,
called on new constants (weights in the layout the function wants); re-capturing traces that
function into ATen and quantize/dequantize ops. A lowering is called with the node's arguments,
the graph's constants as tensors and activations as they are, and returns (function, arguments,
kernel name for the report).

- linear_dq_int8_tensor → "onednn-int8": uint8 activations with the graph's dynamic scale and
  zero point (so the codes are the graph's), quantize/dequantize_per_tensor; the int8 weights as a
  contiguous [out, in] constant under dequantize_per_channel; linear. Inductor (freezing) matches
  this as a dynamic int8 linear and calls oneDNN qlinear with prepacked weights (VNNI/AMX where the
  CPU has them). Without VNNI, oneDNN's AVX2 kernel sums pairs of u8·s8 products in int16 and
  saturates on codes above 63 (see quantized.suggest_layout), so such weights take "fp32-codes":
  the same activation codes times the dequantized weights in one fp32 GEMM.
- linear_dq_int8 → "fp32-codes": per-token scales have no oneDNN int8 kernel. The same per-token
  codes times the weights dequantized once (an fp32 constant), then the per-token scale.
- linear_w8, linear_w4 → "fp32": weights dequantized once to an fp32 constant; a plain linear.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from optcc.algorithms.quantizers import QMAX8, EPS, quantize_per_tensor_u8, unpack_int4, unpack_zero_points
from optcc.compat import quantized_decomposed
from optcc.ops import register_compile_lowering

SAFE_WITHOUT_VNNI = 63  # largest |weight code| oneDNN's AVX2 u8·s8 kernel multiplies exactly


def onednn_int8_linear(x: Tensor, w: Tensor, w_scale: Tensor, w_zp: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x: [..., in] f32; w: [out, in] int8 codes; w_scale: [out]; w_zp: [out] int64 zeros → [..., out].
    Written as the pattern Inductor lowers to oneDNN qlinear (the graph's per-tensor uint8 rule,
    algorithms.quantizers.quantize_per_tensor_u8, for the activation's scale and zero point)."""
    qd = quantized_decomposed()
    x2 = x.reshape(-1, x.shape[-1])
    lo, hi = x2.min().clamp(max=0.0), x2.max().clamp(min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi)).to(torch.float64)
    zp = (-lo / scale).clamp(0.0, 255.0).round().to(torch.int64)
    xd = qd.dequantize_per_tensor.tensor(qd.quantize_per_tensor.tensor(x2, scale, zp, 0, 255, torch.uint8),
                                         scale, zp, 0, 255, torch.uint8)
    wd = qd.dequantize_per_channel(w, w_scale, w_zp, 0, -128, 127, torch.int8)
    return F.linear(xd, wd, bias).reshape(*x.shape[:-1], w.shape[0])


def per_tensor_codes_linear(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x: [..., in]; w: [out, in] f32 (codes × scales) → [..., out]: the graph's per-tensor uint8
    codes of x (quantize_per_tensor_u8), dequantized, through one fp32 linear."""
    q, scale, zp = quantize_per_tensor_u8(x)
    return F.linear((q - zp) * scale, w, bias)


def per_token_codes_linear(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x: [..., in]; w: [in, out] f32 (codes × scales) → [..., out]: quantize_per_token's codes and
    scale around one fp32 GEMM."""
    x2 = x.reshape(-1, x.shape[-1])
    scale = (x2.abs().amax(dim=-1, keepdim=True) / QMAX8).clamp_min(EPS)
    y = torch.mm(torch.round(x2 / scale), w) * scale
    y = y + bias if bias is not None else y
    return y.reshape(*x.shape[:-1], w.shape[1])


def lower_linear_dq_int8_tensor(x, w_q: Tensor, w_scale: Tensor, bias, gemm, onnx_weights, vnni: bool):
    if vnni or int(w_q.to(torch.int16).abs().max()) <= SAFE_WITHOUT_VNNI:
        zeros = torch.zeros(w_q.shape[1], dtype=torch.int64)
        return onednn_int8_linear, (x, w_q.t().contiguous(), w_scale, zeros, bias), "onednn-int8"
    return per_tensor_codes_linear, (x, (w_q.to(torch.float32) * w_scale).t().contiguous(), bias), "fp32-codes"


def lower_linear_dq_int8(x, w_q: Tensor, w_scale: Tensor, bias, gemm, onnx_weights, vnni: bool):
    return per_token_codes_linear, (x, w_q.to(torch.float32) * w_scale, bias), "fp32-codes"


def lower_linear_w8(x, w_q: Tensor, w_scale: Tensor, bias, vnni: bool):
    return F.linear, (x, (w_q.to(torch.float32) * w_scale).t().contiguous(), bias), "fp32"


def lower_linear_w4(x, w_packed: Tensor, scales: Tensor, zeros: Tensor, bias, in_features: int, group_size: int,
                    accuracy_level: int, vnni: bool):
    out_f, groups = w_packed.shape[0], w_packed.shape[1]
    codes = unpack_int4(w_packed).reshape(out_f, groups, group_size).to(torch.float32)
    zero = unpack_zero_points(zeros, out_f, groups).to(torch.float32)
    w = ((codes - zero[..., None]) * scales.reshape(out_f, groups, 1)).reshape(out_f, in_features)
    return F.linear, (x, w, bias), "fp32"


for _op, _fn in ((torch.ops.optcc.linear_dq_int8.default, lower_linear_dq_int8),
                 (torch.ops.optcc.linear_dq_int8_tensor.default, lower_linear_dq_int8_tensor),
                 (torch.ops.optcc.linear_w8.default, lower_linear_w8),
                 (torch.ops.optcc.linear_w4.default, lower_linear_w4)):
    register_compile_lowering(_op, _fn)
