"""ToMe bipartite soft matching and size-weighted merge: Triton kernels behind
the interface and semantics of optcc/algorithms/tome.py (which stays the torch reference).

Semantics (optcc.algorithms.tome.bipartite_soft_matching): metric [B, T, D] is already
L2-normalised (merge.key_metric; nothing here normalises); A = even tokens,
B = odd tokens; every A token's best B partner by cosine; padding pairs get
PAD_SCORE / MIXED_SCORE (merge._pair_scores); protected tokens' rows and
columns get -inf; the r best-matched A tokens merge into their partners.

The expensive part is the [B, ceil(T/2), floor(T/2)] score matrix reduced to
a row max and argmax. `match_scores_triton` fuses the two: each program holds
a tile of A rows and walks B in tiles, keeping a running (max, argmax), so the
score matrix never exists in memory. Ties resolve to the lowest B index (as
torch.max does on CPU). The r-of-ceil(T/2) topk and index bookkeeping that
follow are tiny and stay in torch, written exactly as optcc/algorithms/tome.py does.

`merge_triton` computes merge.merge_wavg's result one output row per program:
a kept token's new value is (x·size + Σ over sources merged into it of
x_src·size_src·ok) / (size + Σ size_src·ok); rows without sources are copied.

Differences from optcc/algorithms/tome.py (documented, tested to tight tolerance):
scores come from tl.dot (fp32, "ieee" precision) instead of torch.matmul, so
node_max can differ in the last bits; an argmax or topk between two partners
closer than that can then pick the other one. Sums over sources run in a
different order than merge_wavg's "same destination" matmul (ulp-level).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from optcc.algorithms import tome as ref
from optcc.algorithms.tome import MIXED_SCORE, PAD_SCORE, Match


# ------------------------------------------------------------ torch reference ---

def _side_masks(na: int, nb: int, protected: Sequence[int], device) -> tuple[Tensor, Tensor]:
    """Protected token indices → bool masks over A rows [na] and B columns [nb]. Indices outside
    0..T-1 protect nothing, as in merge._index_mask (Python's -1 would otherwise mark the last column)."""
    rows = torch.zeros(na, dtype=torch.bool, device=device)
    cols = torch.zeros(nb, dtype=torch.bool, device=device)
    for p in protected:
        if p < 0:
            continue
        if p % 2 == 0 and p // 2 < na:
            rows[p // 2] = True
        elif p % 2 == 1 and p // 2 < nb:
            cols[p // 2] = True
    return rows, cols


def match_scores_reference(metric: Tensor, protected: Sequence[int] = (),
                           valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """metric [B, T, D] → (node_max [B, ceil(T/2)], node_idx int64 [B, ceil(T/2)]):
    the best score of each A token and its B partner, as merge.bipartite_soft_matching computes them."""
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if valid is not None:
        va, vb = valid[:, ::2].unsqueeze(-1), valid[:, 1::2].unsqueeze(-2)
        scores = torch.where(va & vb, scores, torch.where(va, torch.full_like(scores, MIXED_SCORE),
                                                          torch.full_like(scores, PAD_SCORE)))
    rows, cols = _side_masks(scores.shape[1], scores.shape[2], protected, metric.device)
    scores = scores.masked_fill(rows.unsqueeze(-1) | cols.unsqueeze(0), -math.inf)
    return scores.max(dim=-1)


def match_from_scores(node_max: Tensor, node_idx: Tensor, r: int, tokens: int) -> Match:
    """The tail of merge.bipartite_soft_matching: the r best A tokens and their partners."""
    src_a = torch.topk(ref.rank_key(node_max), r, dim=-1).indices
    score = node_max.gather(1, src_a)
    dst_b = node_idx.gather(1, src_a)
    src, dst = src_a * 2, dst_b * 2 + 1
    ok = (score > ref._OK_ABOVE).to(node_max.dtype)
    return Match(src, dst, ref._keep_from_src(src, tokens), ok)


# -------------------------------------------------------------------- Triton ---

@functools.cache
def _kernels():
    """Built on first use: triton.jit reads TRITON_INTERPRET when it decorates."""
    import triton
    import triton.language as tl

    @triton.jit
    def match_kernel(m_ptr, v_ptr, pa_ptr, pb_ptr, max_ptr, idx_ptr, NA, NB, D,
                     stride_b, stride_t, stride_d, stride_vb, stride_vt,
                     HAS_VALID: tl.constexpr, PAD: tl.constexpr, MIXED: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_b = tl.program_id(0)
        ra = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
        a_ok = ra < NA
        rd = tl.arange(0, BLOCK_D)
        d_ok = rd < D
        base = m_ptr + pid_b * stride_b
        a = tl.load(base + (2 * ra)[:, None] * stride_t + rd[None, :] * stride_d,
                    mask=a_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        row_prot = tl.load(pa_ptr + ra, mask=a_ok, other=0) != 0
        if HAS_VALID:
            va = tl.load(v_ptr + pid_b * stride_vb + (2 * ra) * stride_vt, mask=a_ok, other=0) != 0
        best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
        best_i = tl.zeros((BLOCK_A,), dtype=tl.int32)
        for b0 in range(0, NB, BLOCK_B):
            rb = b0 + tl.arange(0, BLOCK_B)
            b_ok = rb < NB
            bt = tl.load(base + (2 * rb + 1)[:, None] * stride_t + rd[None, :] * stride_d,
                         mask=b_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            s = tl.dot(a, tl.trans(bt), input_precision="ieee")  # [A, B] tile, never stored
            if HAS_VALID:
                vb = tl.load(v_ptr + pid_b * stride_vb + (2 * rb + 1) * stride_vt, mask=b_ok, other=0) != 0
                s = tl.where(va[:, None] & vb[None, :], s, tl.where(va[:, None], MIXED, PAD))
            col_prot = tl.load(pb_ptr + rb, mask=b_ok, other=0) != 0
            # out-of-range columns are -inf too: they sit after every real column, so with
            # first-index tie-breaking they can never be picked over a real -inf column
            s = tl.where(row_prot[:, None] | col_prot[None, :] | ~b_ok[None, :], float("-inf"), s)
            tile_max = tl.max(s, axis=1)
            tile_arg = tl.argmax(s, axis=1, tie_break_left=True)
            better = tile_max > best  # strict: an equal score in a later tile keeps the earlier index
            best = tl.where(better, tile_max, best)
            best_i = tl.where(better, b0 + tile_arg, best_i)
        tl.store(max_ptr + pid_b * NA + ra, best, mask=a_ok)
        tl.store(idx_ptr + pid_b * NA + ra, best_i.to(tl.int64), mask=a_ok)

    @triton.jit
    def merge_kernel(x_ptr, size_ptr, keep_ptr, src_ptr, dst_ptr, ok_ptr, out_ptr, out_size_ptr,
                     T, NK, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_b = tl.program_id(0)
        i = tl.program_id(1)  # output row
        rc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = rc < C
        t = tl.load(keep_ptr + pid_b * NK + i)
        s_t = tl.load(size_ptr + pid_b * T + t).to(tl.float32)
        x_t = tl.load(x_ptr + (pid_b * T + t) * C + rc, mask=c_ok, other=0.0).to(tl.float32)
        mass = x_t * s_t
        added = tl.zeros((BLOCK_C,), dtype=tl.float32)
        add_w = 0.0
        hits = 0
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            d = tl.load(dst_ptr + pid_b * R + rr, mask=r_ok, other=-1)
            hit = r_ok & (d == t)
            src = tl.load(src_ptr + pid_b * R + rr, mask=hit, other=0)
            w = tl.load(size_ptr + pid_b * T + src, mask=hit, other=0.0).to(tl.float32)
            w = w * tl.load(ok_ptr + pid_b * R + rr, mask=hit, other=0.0).to(tl.float32)
            xs = tl.load(x_ptr + (pid_b * T + src)[:, None] * C + rc[None, :],
                         mask=hit[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            added += tl.sum(xs * w[:, None], axis=0)
            add_w += tl.sum(w, axis=0)
            hits += tl.sum(hit.to(tl.int32), axis=0)
        total = s_t + add_w
        # a token nothing merged into is copied, not divided back (x·s/s is not always x)
        y = tl.where(hits > 0, (mass + added) / total, x_t)
        tl.store(out_ptr + (pid_b * NK + i) * C + rc, y.to(out_ptr.dtype.element_ty), mask=c_ok)
        if tl.program_id(2) == 0:
            tl.store(out_size_ptr + pid_b * NK + i, total.to(out_size_ptr.dtype.element_ty))

    return match_kernel, merge_kernel


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def match_scores_triton(metric: Tensor, protected: Sequence[int] = (),
                        valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Fused scores + row max/argmax. Same contract as match_scores_reference.
    The whole feature dimension D sits in one tile (D ≤ 1024; ToMe's metric is a head dim)."""
    import triton

    bsz, tokens, d = metric.shape
    if d > 1024:
        raise ValueError(f"match_scores_triton keeps D in one tile; D={d} > 1024")
    na, nb = (tokens + 1) // 2, tokens // 2
    node_max = torch.empty((bsz, na), dtype=torch.float32, device=metric.device)
    node_idx = torch.empty((bsz, na), dtype=torch.int64, device=metric.device)
    if bsz == 0 or na == 0:
        return node_max.to(metric.dtype), node_idx
    if nb == 0:  # a single token: no partners; torch.max over an empty dim would raise
        raise ValueError("bipartite matching needs at least 2 tokens")
    rows, cols = _side_masks(na, nb, protected, metric.device)
    v = valid.to(torch.int8) if valid is not None else rows.to(torch.int8).view(1, -1)
    match_kernel, _ = _kernels()
    block_a, block_b = 32, 32
    match_kernel[(bsz, triton.cdiv(na, block_a))](
        metric, v, rows.to(torch.int8), cols.to(torch.int8), node_max, node_idx, na, nb, d,
        metric.stride(0), metric.stride(1), metric.stride(2), v.stride(0), v.stride(1),
        HAS_VALID=valid is not None, PAD=PAD_SCORE, MIXED=MIXED_SCORE,
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=_pow2(d))
    return node_max.to(metric.dtype), node_idx


def merge_triton(x: Tensor, size: Tensor, m: Match) -> tuple[Tensor, Tensor]:
    """merge.merge_wavg as a kernel. x: [B, T, C], size: [B, T, 1] → ([B, T - r, C], [B, T - r, 1])."""
    import triton

    bsz, tokens, c = x.shape
    r, nk = m.src.shape[1], m.keep.shape[1]
    x, size = x.contiguous(), size.contiguous()
    out = torch.empty((bsz, nk, c), dtype=x.dtype, device=x.device)
    out_size = torch.empty((bsz, nk, 1), dtype=size.dtype, device=x.device)
    if bsz == 0 or nk == 0 or c == 0:
        return out, out_size
    ok = m.ok.to(torch.float32).contiguous()
    _, merge_kernel = _kernels()
    block_c = min(_pow2(c), 256)
    merge_kernel[(bsz, nk, triton.cdiv(c, block_c))](
        x, size, m.keep.contiguous(), m.src.contiguous(), m.dst.contiguous(), ok, out, out_size,
        tokens, nk, r, c, BLOCK_R=_pow2(max(r, 1)) if r <= 64 else 64, BLOCK_C=block_c)
    return out, out_size


# ---------------------------------------------------------------- dispatchers ---

def _use_triton(t: Tensor, backend: str) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend == "triton" or (backend == "auto" and t.is_cuda)


def bipartite_match(metric: Tensor, r: int, protected: Sequence[int] = (),
                    valid: Optional[Tensor] = None, backend: str = "auto") -> Match:
    """merge.bipartite_soft_matching with the score reduction on the Triton kernel
    (CUDA tensors, or backend="triton"); the torch backend *is* merge.bipartite_soft_matching."""
    if not _use_triton(metric, backend):
        return ref.bipartite_soft_matching(metric, r, protected, valid)
    node_max, node_idx = match_scores_triton(metric, protected, valid)
    return match_from_scores(node_max, node_idx, r, metric.shape[1])


def merge(x: Tensor, size: Tensor, m: Match, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Size-weighted merge (merge.merge_wavg semantics; sizes add)."""
    if not _use_triton(x, backend):
        return ref.merge_wavg(x, size, m)
    return merge_triton(x, size, m)
