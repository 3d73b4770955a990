"""KV-cache ops that kv_share and kv_quant insert into decoder graphs, registered as
torch.library ops so graphs hold only ATen and optcc:: ops (the pass contract).

Each is CompositeImplicitAutograd: its kernel is the pure math in optcc/algorithms/kvmath.py
written with ATen ops, so it runs eagerly as that function, traces through fake tensors with
symbolic cache lengths, is decomposed into plain ONNX ops by torch.onnx.export, and stays one
named op in model.pt2 (which then loads after `import optcc`, like the quantized linears).

- optcc::kv_merge(x_i, x_j, t, retain) -> (direction, norm_i, norm_j, kept_at, kept)
- optcc::kv_restore(direction, norm_i, norm_j, kept_at, kept) -> (x_i, x_j)
- optcc::kv_quantize_int8(x) -> (codes, scale)
- optcc::kv_dequantize_int8(codes, scale) -> x
Shapes are kvmath's: x [B, H, L, D], norms and scales [B, H, L, 1], kept_at [B, H, R, 1].
"""
from __future__ import annotations

import torch

from optcc.algorithms import kvmath

_LIB = torch.library.Library("optcc", "FRAGMENT")
for _schema, _fn in (
    ("kv_merge(Tensor x_i, Tensor x_j, float t, float retain) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", kvmath.merge),
    ("kv_restore(Tensor direction, Tensor norm_i, Tensor norm_j, Tensor kept_at, Tensor kept) -> (Tensor, Tensor)",
     kvmath.restore),
    ("kv_quantize_int8(Tensor x) -> (Tensor, Tensor)", kvmath.quantize_int8),
    ("kv_dequantize_int8(Tensor codes, Tensor scale) -> Tensor", kvmath.dequantize_int8),
):
    _LIB.define(_schema)
    _LIB.impl(_schema.split("(", 1)[0], _fn, "CompositeImplicitAutograd")

kv_merge = torch.ops.optcc.kv_merge.default
kv_restore = torch.ops.optcc.kv_restore.default
kv_quantize_int8 = torch.ops.optcc.kv_quantize_int8.default
kv_dequantize_int8 = torch.ops.optcc.kv_dequantize_int8.default
