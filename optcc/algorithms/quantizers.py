"""Quantizer math: pure tensor functions, no graphs.

Conventions: a linear weight is `w: [out, in]` (torch's nn.Linear layout);
activations are `x: [..., in]`. int8 is symmetric (zero point 0, codes in
[-127, 127], so -x quantizes to -q); int4 is asymmetric per group (codes in
[0, 15] with a uint8 zero point), the layout onnxruntime's MatMulNBits reads.
"""
from __future__ import annotations

import math

import torch

QMAX8 = 127
EPS = 1e-8


# --------------------------------------------------------------------- int8 ---

def quantize_per_channel(w: torch.Tensor, qmax: int = QMAX8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel. w: [out, in] → (q int8 [out, in] in [-qmax, qmax], scale f32 [out]).
    qmax 63 keeps 7 bits, for GEMMs whose int16 pair sums would saturate on full-range codes."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / qmax).clamp_min(EPS)
    q = torch.round(w / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q: [out, in] int8, scale: [out] → [out, in] f32."""
    return q.float() * scale[:, None]


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (token). x: [..., in] → (q int8 [..., in], scale f32 [..., 1]).

    The order of operations (amax/127, then the floor at EPS, then x/scale and
    round-half-even) is the one the ONNX translation in optcc.ops.quantized uses, so the
    torch and ONNX artifacts produce the same integer codes.
    """
    scale = (x.abs().amax(dim=-1, keepdim=True) / QMAX8).clamp_min(EPS)
    return (x / scale).round_().to(torch.int8), scale


def quantize_per_tensor_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uint8 over the whole tensor, as ONNX DynamicQuantizeLinear (and onnxruntime's
    DynamicQuantizeMatMul) computes it. x: [...] → (codes [...] f32 holding 0..255, scale f32 [],
    zero point f32 [] holding 0..255).

    range [min(x, 0), max(x, 0)], scale = range / 255 (1 for an all-zero x), zero point =
    round(clamp(-min / scale, 0, 255)), codes = clamp(round(x / scale) + zero point, 0, 255), every
    round half-to-even, so both artifacts build the same codes.
    """
    lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    zp = (-lo / scale).clamp(0.0, 255.0).round()
    return ((x / scale).round() + zp).clamp_(0.0, 255.0), scale, zp


# --------------------------------------------------------------------- int4 ---

def check_group_size(in_features: int, group_size: int, name: str = "") -> None:
    """Group-wise int4 needs whole groups along the input dimension (and an even group for packing)."""
    where = f"{name}: " if name else ""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"{where}group_size must be an even number >= 2, got {group_size}")
    if in_features % group_size:
        divisors = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(f"{where}group_size {group_size} does not divide in_features {in_features}"
                         + (f"; use one of {divisors}" if divisors else ""))


def quantize_groupwise(w: torch.Tensor, group_size: int, bits: int = 4,
                       clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric RTN per group of `group_size` input channels.

    w: [out, in]; clip: optional [out, in/group_size] in (0, 1] shrinking each group's range.
    Returns (codes uint8 [out, in] in [0, 2^bits - 1], scale f32 [out, groups], zero uint8 [out, groups]);
    w ≈ (codes - zero) * scale.
    """
    out_f, in_f = w.shape
    check_group_size(in_f, group_size)
    qmax = 2 ** bits - 1
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo = g.amin(dim=-1).clamp(max=0.0)  # keep 0 exactly representable
    hi = g.amax(dim=-1).clamp(min=0.0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = ((hi - lo) / qmax).clamp_min(EPS)
    zero = torch.round(-lo / scale).clamp_(0, qmax)
    codes = torch.round(g / scale[..., None] + zero[..., None]).clamp_(0, qmax)
    return codes.reshape(out_f, in_f).to(torch.uint8), scale, zero.to(torch.uint8)


def dequantize_groupwise(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """codes: [out, in] uint8, scale/zero: [out, groups] → [out, in] f32."""
    out_f, in_f = codes.shape
    groups = scale.shape[1]
    g = codes.reshape(out_f, groups, in_f // groups).float() - zero.float()[..., None]
    return (g * scale[..., None]).reshape(out_f, in_f)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the even index in the low nibble. codes: [..., k] (k even) → uint8 [..., k/2]."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4. packed: uint8 [..., k/2] → uint8 [..., k]."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_zero_points(zero: torch.Tensor) -> torch.Tensor:
    """MatMulNBits zero points: per row, 4-bit packed along groups (odd counts padded).
    zero: uint8 [out, groups] → uint8 [out * ceil(groups/2)]."""
    if zero.shape[1] % 2:
        zero = torch.cat([zero, torch.zeros_like(zero[:, :1])], dim=1)
    return pack_int4(zero).reshape(-1)


def unpack_zero_points(packed: torch.Tensor, out_features: int, groups: int) -> torch.Tensor:
    """Inverse of pack_zero_points → uint8 [out, groups]."""
    return unpack_int4(packed.reshape(out_features, -1))[:, :groups]


# ------------------------------------------------------------------ metrics ---

def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(Σref² / Σ(ref−approx)²) in dB (inf when exact)."""
    ref, approx = ref.double(), approx.double()
    noise = float((ref - approx).pow(2).sum())
    signal = float(ref.pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# ------------------------------------------------------ activation-aware scales ---

def smooth_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1−α), per input channel j.

    act_absmax, w_absmax: [in] (w_absmax is the max over every output row of every
    linear that reads X). Activations get divided by s, weights multiplied by s.
    Channels with no signal on either side keep s = 1.
    """
    a = act_absmax.float().clamp_min(1e-5)
    w = w_absmax.float().clamp_min(1e-5)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    dead = (act_absmax <= 0) | (w_absmax <= 0)
    return torch.where(dead, torch.ones_like(s), s).clamp(1e-4, 1e4)


def awq_search(x: torch.Tensor, w: torch.Tensor, group_size: int, grid: int = 20
               ) -> tuple[torch.Tensor, float, list[float]]:
    """AWQ-style per-input-channel scale search for weights that read the same input.

    x: [tokens, in] calibration activations; w: [out, in] (the group's weights stacked).
    For α on a grid over [0, 1): s = mean|X|^α (normalised so max·min = 1); the
    weights are quantized as Q(w·s)/s and the α with the smallest output MSE
    ‖x·wᵀ − x·(Q(w·s)/s)ᵀ‖² wins (α = 0 is plain RTN, so the search never loses to it).
    Returns (s [in], best α, mse per grid point).
    """
    x, w = x.float(), w.float()
    ref = x @ w.t()
    mean_abs = x.abs().mean(dim=0).clamp_min(1e-4)
    best = (math.inf, 0.0, torch.ones_like(mean_abs))
    errors = []
    for i in range(grid):
        alpha = i / grid
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        codes, scale, zero = quantize_groupwise(w * s, group_size)
        w_hat = dequantize_groupwise(codes, scale, zero) / s
        err = float((x @ w_hat.t() - ref).pow(2).mean())
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errors


def awq_clip(x: torch.Tensor, w: torch.Tensor, group_size: int, grid: int = 20, max_shrink: float = 0.5
             ) -> torch.Tensor:
    """Per (output channel, group) range shrink minimising that group's share of the output error.

    x: [tokens, in]; w: [out, in] → clip ratios [out, in/group_size] in [1 − max_shrink, 1],
    to pass as quantize_groupwise(..., clip=...).
    """
    out_f, in_f = w.shape
    groups = in_f // group_size
    xg = x.float().reshape(-1, groups, group_size)  # [t, G, g]
    wg = w.float().reshape(out_f, groups, group_size)  # [o, G, g]
    ref = torch.einsum("tgk,ogk->otg", xg, wg)
    best_err = torch.full((out_f, groups), math.inf)
    best_ratio = torch.ones(out_f, groups)
    for i in range(int(max_shrink * grid) + 1):
        ratio = 1.0 - i / grid
        clip = torch.full((out_f, groups), ratio)
        codes, scale, zero = quantize_groupwise(w, group_size, clip=clip)
        w_hat = dequantize_groupwise(codes, scale, zero).reshape(out_f, groups, group_size)
        err = (torch.einsum("tgk,ogk->otg", xg, w_hat) - ref).pow(2).mean(dim=1)  # [o, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio
