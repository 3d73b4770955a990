"""Triton kernels behind pure-function interfaces, and the custom ops that carry them.

Importing this package registers (and never imports triton; kernels are built
on first launch):

- optcc::int4_matmul(x, qweight, scales, zeros?, bias?, group_size) — group-wise
  int4 weight-only matmul in the MatMulNBits layout (see int4_matmul.py).
  CPU / any device: the torch reference. CUDA: the Triton kernel.
- optcc::tome_match(metric, protected, valid?) -> (node_max, node_idx) — ToMe's
  fused A·Bᵀ row max/argmax (see tome.py). CPU: torch reference. CUDA: Triton.
- a CUDA kernel for the quantize pass's optcc::linear_w4 (optcc/ops/quantized.py): same
  layout, so a model.pt2 quantized on CPU runs the Triton kernel when loaded on a
  GPU; its CPU implementation is untouched.

A .pt2 that calls these ops loads wherever this package was imported.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from optcc.ops.kernels.int4_matmul import int4_matmul, int4_matmul_reference, int4_matmul_triton
from optcc.ops.kernels.tome_triton import (bipartite_match, match_scores_reference, match_scores_triton, merge,
                                merge_triton)

__all__ = ["int4_matmul", "int4_matmul_reference", "int4_matmul_triton", "bipartite_match", "merge",
           "match_scores_reference", "match_scores_triton", "merge_triton"]


# ------------------------------------------------------------- int4 matmul ---

@torch.library.custom_op("optcc::int4_matmul", mutates_args=())
def int4_matmul_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                   bias: Optional[Tensor], group_size: int) -> Tensor:
    """x: [..., K]; qweight uint8 [N, K/2] or [N, groups, group/2]; scales [N·groups];
    zeros packed uint8 [N·ceil(groups/2)] or None (zero point 8) → [..., N]."""
    return int4_matmul_reference(x, qweight, scales, zeros, group_size, bias)


@int4_matmul_op.register_kernel("cuda")
def _(x, qweight, scales, zeros, bias, group_size):
    return int4_matmul_triton(x, qweight, scales, zeros, group_size, bias)


@int4_matmul_op.register_fake
def _(x, qweight, scales, zeros, bias, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# ------------------------------------------------------------- ToMe match ---

@torch.library.custom_op("optcc::tome_match", mutates_args=())
def tome_match_op(metric: Tensor, protected: Sequence[int], valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """metric [B, T, D] (L2-normalised) → (node_max [B, ceil(T/2)], node_idx int64 [B, ceil(T/2)])."""
    node_max, node_idx = match_scores_reference(metric, protected, valid)
    return node_max.contiguous(), node_idx.contiguous()


@tome_match_op.register_kernel("cuda")
def _(metric, protected, valid):
    return match_scores_triton(metric, protected, valid)


@tome_match_op.register_fake
def _(metric, protected, valid):
    shape = (metric.shape[0], (metric.shape[1] + 1) // 2)
    return metric.new_empty(shape), metric.new_empty(shape, dtype=torch.int64)


# ------------------------------------------- CUDA kernel for linear_w4 ---

def _linear_w4_cuda(x: Tensor, w_packed: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                    in_features: int, group_size: int, accuracy_level: int) -> Tensor:
    # The dispatcher passes every schema argument, so the signature must be linear_w4's in full.
    # quantized.linear_w4 stores exactly this kernel's layout (w_packed [out, groups, group/2]);
    # accuracy_level only means something to onnxruntime's MatMulNBits.
    return int4_matmul_triton(x, w_packed, scales, zeros, group_size, bias)


def _register_linear_w4_cuda() -> bool:
    """Attach the Triton kernel to optcc::linear_w4 on CUDA, if the op exists (optcc.ops.quantized is
    imported by `import optcc`). Returns whether it was attached."""
    from optcc.ops import quantized  # noqa: F401  registers optcc::linear_w4

    if not hasattr(torch.ops.optcc, "linear_w4"):
        return False
    torch.library.register_kernel("optcc::linear_w4", "cuda", _linear_w4_cuda)
    return True


LINEAR_W4_CUDA = _register_linear_w4_cuda()
