"""int4 group-wise weight-only matmul: torch reference and a Triton kernel.

Weight layout — the one passes/quantize.py writes for optcc::linear_w4, which is
onnxruntime's MatMulNBits layout (see optcc/algorithms/quantizers.py):

- qweight: uint8 [N, K/2] or [N, groups, group_size/2]. Codes are unsigned 4-bit
  values in [0, 15], packed along K two per byte with the EVEN k in the LOW
  nibble (quant.pack_int4): byte j of a row holds k = 2j (bits 0-3) and 2j+1 (bits 4-7).
- scales: float [N, groups] or flat [N·groups], groups = K / group_size, row-major.
- zeros: packed uint8 [N·ceil(groups/2)] (quant.pack_zero_points: per row, zero
  points packed along groups, even group in the low nibble, odd group counts
  padded), or None for the MatMulNBits default zero point 8.
- group_size: even, divides K (quant.check_group_size).

w[n, k] = (code[n, k] - zero[n, k // group_size]) * scale[n, k // group_size]
and y = x @ wᵀ (+ bias), x: [..., K] → y: [..., N], accumulated in fp32.

The Triton kernel never materialises w: each program owns a [BLOCK_M, BLOCK_N]
output tile and walks K in steps of 2·BLOCK_P codes; it loads BLOCK_P packed
bytes per output column once, splits each byte into its low (even k) and high
(odd k) nibble, dequantizes both with their group's scale and zero point in
registers, and multiplies them with the even and odd columns of x.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from optcc.algorithms.quantizers import unpack_int4, unpack_zero_points

DEFAULT_ZERO = 8  # MatMulNBits' zero point when none is given (2^(bits-1))


def _canonical(qweight: Tensor, scales: Tensor, group_size: int) -> tuple[Tensor, Tensor, int, int, int]:
    """Flatten the accepted layouts to qweight [N, K/2], scales [N, groups]; returns (qw, sc, N, K, groups)."""
    n = qweight.shape[0]
    qw = qweight.reshape(n, -1)
    k = qw.shape[1] * 2
    if group_size < 2 or group_size % 2 or k % group_size:
        raise ValueError(f"group_size {group_size} must be even and divide K={k}")
    groups = k // group_size
    if scales.numel() != n * groups:
        raise ValueError(f"scales has {scales.numel()} values, expected N·groups = {n}·{groups}")
    return qw, scales.reshape(n, groups), n, k, groups


def dequantize(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int) -> Tensor:
    """The layout above → w: float32 [N, K]."""
    qw, sc, n, k, groups = _canonical(qweight, scales, group_size)
    codes = unpack_int4(qw).reshape(n, groups, group_size).float()
    if zeros is None:
        zero = torch.full((n, groups), float(DEFAULT_ZERO), device=qw.device)
    else:
        zero = unpack_zero_points(zeros, n, groups).float()
    return ((codes - zero[..., None]) * sc.float()[..., None]).reshape(n, k)


def int4_matmul_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                          group_size: int, bias: Optional[Tensor] = None) -> Tensor:
    """Plain torch: unpack → dequantize → fp32 matmul. x: [..., K] → [..., N] in x's dtype.
    Same arithmetic as optcc.ops.quantized.linear_w4 (which F.linear's the dequantized weight)."""
    w = dequantize(qweight, scales, zeros, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------- Triton ---

@functools.cache
def _kernel():
    """Build the jit function on first use: triton.jit reads TRITON_INTERPRET when it
    decorates, so defining the kernel at import time would freeze the mode at
    `import optcc` (and would make importing optcc import triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def int4_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G,
                           stride_xm, stride_xk, stride_ym, stride_yn,
                           GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                           IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        half_k = K // 2
        z_row = (G + 1) // 2  # packed zero-point bytes per output row
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p0 in range(0, half_k, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)  # byte index along K/2: codes k = 2p (low) and 2p + 1 (high)
            p_ok = p < half_k
            w_mask = p_ok[:, None] & n_ok[None, :]
            packed = tl.load(w_ptr + rn[None, :] * half_k + p[:, None], mask=w_mask, other=0)  # [P, N] uint8
            g = (2 * p) // GROUP  # both nibbles of a byte share a group: GROUP is even
            scale = tl.load(s_ptr + rn[None, :] * G + g[:, None], mask=w_mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zb = tl.load(z_ptr + rn[None, :] * z_row + (g // 2)[:, None], mask=w_mask, other=0).to(tl.int32)
                zero = ((zb >> ((g % 2) * 4)[:, None]) & 0xF).to(tl.float32)
            else:
                zero = 8.0
            codes = packed.to(tl.int32)
            w_lo = ((codes & 0xF).to(tl.float32) - zero) * scale
            w_hi = ((codes >> 4).to(tl.float32) - zero) * scale
            x_mask = m_ok[:, None] & p_ok[None, :]
            x_base = x_ptr + rm[:, None] * stride_xm
            x_even = tl.load(x_base + (2 * p)[None, :] * stride_xk, mask=x_mask, other=0.0)
            x_odd = tl.load(x_base + (2 * p + 1)[None, :] * stride_xk, mask=x_mask, other=0.0)
            if IEEE:  # fp32 inputs: full-precision dot, matching torch's fp32 matmul
                acc = tl.dot(x_even, w_lo, acc, input_precision="ieee")
                acc = tl.dot(x_odd, w_hi, acc, input_precision="ieee")
            else:  # half inputs: the weight is rounded to the input dtype, fp32 accumulate
                acc = tl.dot(x_even, w_lo.to(x_even.dtype), acc)
                acc = tl.dot(x_odd, w_hi.to(x_odd.dtype), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return int4_matmul_kernel


def int4_matmul_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                       group_size: int, bias: Optional[Tensor] = None) -> Tensor:
    """The Triton kernel. Needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set
    before triton was first imported. x: [..., K] → [..., N] in x's dtype."""
    import triton

    qw, sc, n, k, groups = _canonical(qweight, scales, group_size)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    qw, sc = qw.contiguous(), sc.contiguous()
    z = zeros.contiguous() if zeros is not None else qw  # any pointer; HAS_ZERO=False never reads it
    b = bias.contiguous() if bias is not None else sc
    # tl.dot needs every tile side >= 16; small M (decoding) gets the smallest M tile
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, block_p = 64, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _kernel()[grid](x2, qw, sc, z, b, y, m, n, k, groups,
                    x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
                    GROUP=group_size, HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None,
                    IEEE=x.dtype == torch.float32,
                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=block_p)
    return y.reshape(*x.shape[:-1], n)


def int4_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                bias: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Dispatcher. backend: "auto" (Triton on CUDA tensors, else the torch reference),
    "triton" (force the kernel, e.g. under TRITON_INTERPRET=1 in tests) or "torch"."""
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "triton":
        return int4_matmul_triton(x, qweight, scales, zeros, group_size, bias)
    if backend == "torch":
        return int4_matmul_reference(x, qweight, scales, zeros, group_size, bias)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
