"""Token merging math (ToMe bipartite soft matching and PiToMe energy matching).

Pure tensor functions, no graph code: passes/token_merge.py traces them into
the captured graph. Every function works on a whole batch with static token
counts and never reads the batch size into a Python int, so the traced ops
keep the batch dimension dynamic. Only standard ops with ONNX equivalents are
used (topk, gather, index_select, scatter, matmul).

A match is described by original token indices: `src` tokens [B, r] are folded
into `dst` tokens [B, r]; `keep` [B, T - r] lists the surviving tokens in their
original order, so a protected CLS token at index 0 stays at index 0. `ok`
[B, r] is 0 for a forced pair that must not mix (padding next to a real
token): that source is dropped instead of averaged in.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

# Scores of pairs that must not merge. Real similarities are cosines in [-1, 1];
# mixed pairs (real next to padding) never merge; padded sources are dropped, and
# rank_key spends the fixed r on them before any real pair.
PAD_SCORE = -1.0e4
MIXED_SCORE = -2.0e4
_OK_ABOVE = -1.0e3


class Match(NamedTuple):
    src: torch.Tensor  # [B, r] int64, tokens merged away
    dst: torch.Tensor  # [B, r] int64, the token each one is merged into
    keep: torch.Tensor  # [B, T - r] int64, surviving tokens in ascending order
    ok: torch.Tensor  # [B, r] float, 1 = averaged in, 0 = dropped (forced mixed pair)


def key_metric(k: torch.Tensor) -> torch.Tensor:
    """Attention keys [B, H, T, D] -> L2-normalised mean over heads [B, T, D]."""
    return F.normalize(k.mean(dim=1), dim=-1)


def _keep_from_src(src: torch.Tensor, tokens: int) -> torch.Tensor:
    """Complement of `src` [B, r] in 0..tokens-1, ascending: [B, tokens - r].

    Sort key = removed * tokens + index is unique per token, so topk (smallest
    first) lists kept tokens in their original order without a stable sort."""
    r = src.shape[1]
    idx = torch.arange(tokens, device=src.device, dtype=src.dtype)
    removed = torch.zeros_like(idx).unsqueeze(0).expand(src.shape[0], -1)
    removed = removed.scatter(1, src, torch.ones_like(src))
    key = removed * tokens + idx
    return torch.topk(key, tokens - r, dim=1, largest=False, sorted=True).indices


def _index_mask(n: int, indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """[n] bool, True at the given (static) indices; built from arange so no constant tensor is baked in."""
    idx = torch.arange(n, device=device)
    mask = idx < 0
    for i in indices:
        mask = mask | (idx == i)
    return mask


def _pair_scores(scores: torch.Tensor, valid_a: Optional[torch.Tensor], valid_b: Optional[torch.Tensor]) -> torch.Tensor:
    """Mask similarities [B, A, Bn] so that padding never merges with anything:
    padded rows get PAD_SCORE everywhere (so their rank ignores their content),
    real rows next to padded columns get MIXED_SCORE."""
    if valid_a is None or valid_b is None:
        return scores
    va, vb = valid_a.unsqueeze(-1), valid_b.unsqueeze(-2)
    mixed = torch.full_like(scores, MIXED_SCORE)
    pad = torch.full_like(scores, PAD_SCORE)
    return torch.where(va & vb, scores, torch.where(va, mixed, pad))


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: Sequence[int] = (),
                            valid: Optional[torch.Tensor] = None) -> Match:
    """ToMe matching. metric: [B, T, D] (L2-normalised); r: tokens to remove;
    protected: token indices that never merge; valid: [B, T] bool, False = padding.

    Tokens alternate into A (even) and B (odd); each A token picks its most
    similar B token; the r A tokens with the best partners merge into them."""
    tokens = metric.shape[1]
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # [B, ceil(T/2), floor(T/2)]
    va = valid[:, ::2] if valid is not None else None
    vb = valid[:, 1::2] if valid is not None else None
    scores = _pair_scores(scores, va, vb)
    if protected:
        rows = _index_mask(scores.shape[1], [p // 2 for p in protected if p % 2 == 0], scores.device)
        cols = _index_mask(scores.shape[2], [p // 2 for p in protected if p % 2 == 1], scores.device)
        scores = scores.masked_fill(rows.unsqueeze(-1) | cols.unsqueeze(0), -math.inf)
    best, partner = scores.max(dim=-1)  # [B, nA]
    src_a = torch.topk(rank_key(best), r, dim=-1).indices  # the r best-matched A tokens, padding first
    score = best.gather(1, src_a)
    dst_b = partner.gather(1, src_a)
    src, dst = src_a * 2, dst_b * 2 + 1
    ok = (score > _OK_ABOVE).to(metric.dtype)
    return Match(src, dst, _keep_from_src(src, tokens), ok)


def rank_key(best: torch.Tensor) -> torch.Tensor:
    """Order of A tokens for the r merges. best: [B, nA] each A token's best score.
    Padded A tokens (best == PAD_SCORE) come first, later positions before earlier
    ones, above every real cosine (<= 1): their slots are spent on dropping padding
    (masked out anyway), so a padded batch merges as few real tokens as it can.
    Distinct keys, so torch and onnxruntime TopK pick the same tokens."""
    n = best.shape[-1]
    order = torch.arange(n, device=best.device, dtype=best.dtype) / max(n, 1)
    return torch.where(best == PAD_SCORE, 2.0 + order, best)


def pitome_margins(num_blocks: int) -> list[float]:
    """PiToMe's per-block energy margin: 0.9 at the first block falling linearly towards 0.1."""
    return [0.9 - 0.8 * i / num_blocks for i in range(num_blocks)]


def energy_score(metric: torch.Tensor, margin: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PiToMe energy [B, T]: mean over tokens j of ELU(cos(i, j) - margin).
    High energy = the token sits in a large cluster of similar tokens."""
    sim = metric @ metric.transpose(-1, -2)  # [B, T, T]
    e = F.elu(sim - margin)
    if valid is None:
        return e.mean(dim=-1)
    w = valid.to(metric.dtype).unsqueeze(-2)  # padding never counts as a neighbour
    return (e * w).sum(dim=-1) / w.sum(dim=-1).clamp_min(1.0)


def pitome_matching(metric: torch.Tensor, r: int, margin: float, protected: Sequence[int] = (),
                    valid: Optional[torch.Tensor] = None) -> Match:
    """PiToMe matching. metric: [B, T, D] (L2-normalised). The 2r tokens with the
    highest energy are mergeable (alternately into A and B, in energy order);
    every A token merges into its most similar B token. Isolated tokens (low
    energy) and protected tokens are kept as they are."""
    tokens = metric.shape[1]
    energy = energy_score(metric, margin, valid)
    if valid is not None:
        # padding above every real energy (<= 1), later positions first: the 2r mergeable
        # slots go to padding before real tokens, and padded sources are dropped (as in ToMe)
        order = torch.arange(tokens, device=energy.device, dtype=energy.dtype) / tokens
        energy = torch.where(valid, energy, 2.0 + order)
    if protected:
        energy = energy.masked_fill(_index_mask(tokens, protected, energy.device), -math.inf)
    mergeable = torch.topk(energy, 2 * r, dim=-1).indices  # [B, 2r], highest energy first
    a_idx, b_idx = mergeable[:, ::2], mergeable[:, 1::2]  # [B, r] each
    d = metric.shape[-1]
    a = metric.gather(1, a_idx.unsqueeze(-1).expand(-1, -1, d))
    b = metric.gather(1, b_idx.unsqueeze(-1).expand(-1, -1, d))
    scores = a @ b.transpose(-1, -2)  # [B, r, r]
    if valid is not None:
        scores = _pair_scores(scores, valid.gather(1, a_idx), valid.gather(1, b_idx))
    best, partner = scores.max(dim=-1)
    src, dst = a_idx, b_idx.gather(1, partner)
    ok = (best > _OK_ABOVE).to(metric.dtype)
    return Match(src, dst, _keep_from_src(src, tokens), ok)


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of each batch item. x: [B, T, C], idx: [B, K] int64 -> [B, K, C] with
    out[b, k] = x[b, idx[b, k]].

    Same result as x.gather(1, idx[..., None].expand(-1, -1, C)), but as one
    index_select of whole rows of the flattened [B*T, C] tensor: a row copy instead of
    an index lookup per element (ONNX: Gather, not GatherElements), which is what
    makes a merge cheap next to the block it shortens."""
    t, c = x.shape[1], x.shape[2]
    offsets = torch.arange(x.shape[0], device=x.device, dtype=idx.dtype).unsqueeze(1) * t
    return x.reshape(-1, c).index_select(0, (idx + offsets).reshape(-1)).view(idx.shape[0], idx.shape[1], c)


def merge_wavg(x: torch.Tensor, size: torch.Tensor, m: Match) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average. x: [B, T, C], size: [B, T, 1] (tokens each row stands for).
    Returns x [B, T - r, C] and size [B, T - r, 1]; sum(size * x) over the
    tokens is unchanged (up to dropped forced pairs)."""
    # Only the r destination rows change, so the full-size work is one row copy of the
    # survivors and one scatter of the new destination rows (memory traffic, not FLOPs,
    # is what a merge costs). Sources sharing a destination are summed with an r x r
    # "same destination" matrix instead of a full-size scatter_add.
    c = x.shape[-1]
    src1, dst1 = m.src.unsqueeze(-1), m.dst.unsqueeze(-1)
    w = size.gather(1, src1) * m.ok.unsqueeze(-1)  # [B, r, 1] weight of each source
    same = (dst1 == m.dst.unsqueeze(-2)).to(x.dtype)  # [B, r, r]
    s_dst = size.gather(1, dst1)
    total = s_dst + same @ w  # [B, r, 1] size of each destination after the merge
    mass = take_rows(x, m.dst) * s_dst + same @ (take_rows(x, m.src) * w)
    # destinations survive; their new position = index - number of removed tokens before them
    pos = (m.dst - (m.src.unsqueeze(-2) < dst1).sum(-1)).unsqueeze(-1)  # [B, r, 1]
    x = take_rows(x, m.keep).scatter(1, pos.expand(-1, -1, c), mass / total)
    return x, size.gather(1, m.keep.unsqueeze(-1)).scatter(1, pos, total)


def keep_tokens(t: torch.Tensor, m: Match) -> torch.Tensor:
    """Per-token values that survive as they are (e.g. the padding flag). t: [B, T] -> [B, T - r].
    Merges never mix padding with real tokens, so a destination keeps its own value."""
    return t.gather(1, m.keep)


def source_positions(m: Match, tokens: int) -> torch.Tensor:
    """Where each of the T tokens went: [B, T] int64 index into the merged sequence."""
    n_keep = m.keep.shape[1]
    pos = torch.zeros_like(m.keep[:, :1]).expand(-1, tokens)
    new = torch.arange(n_keep, device=m.keep.device, dtype=m.keep.dtype).unsqueeze(0).expand_as(m.keep)
    pos = pos.scatter(1, m.keep, new)
    return pos.scatter(1, m.src, pos.gather(1, m.dst))


def update_source_map(source: torch.Tensor, m: Match, tokens: int) -> torch.Tensor:
    """source: [B, T0] position of each original token in the current sequence of
    T tokens -> its position after this merge."""
    return source_positions(m, tokens).gather(1, source)


def unmerge(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Copy merged rows back to every original position. x: [B, T', C], source: [B, T0] -> [B, T0, C]."""
    return take_rows(x, source)


def attention_bias(size: Optional[torch.Tensor], valid: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [B, 1, 1, T] for later blocks: log(size) (proportional
    attention) plus the padding mask. At least one of size [B, T, 1] / valid [B, T]."""
    if size is not None:
        bias = size.squeeze(-1).log()
        if valid is not None:
            bias = bias.masked_fill(~valid, torch.finfo(dtype).min)
    else:
        if valid is None:
            raise ValueError("attention_bias needs size or valid")
        bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, torch.finfo(dtype).min)
    return bias.unsqueeze(1).unsqueeze(1)


# ---- schedules: flexible recipe forms -> one r per block -----------------------------------

RSpec = Union[int, Sequence[float]]


def parse_r(r: RSpec, num_blocks: int) -> list[int]:
    """Normalise r into one value per block (ToMe's forms):
    int -> constant; [r, inflection] with inflection in [-1, 1] -> linear schedule
    (-1: 2r falling to 0, 0: constant, +1: 0 rising to 2r); a list of num_blocks
    non-negative ints -> as given."""
    if isinstance(r, (int, float)) and not isinstance(r, bool):
        if r < 0 or int(r) != r:
            raise ValueError(f"r must be a non-negative integer, got {r}")
        return [int(r)] * num_blocks
    r = list(r)
    if is_pair(r):
        base, inflect = r
        lo = base * (1.0 - inflect)
        hi = 2 * base - lo
        if num_blocks == 1:
            return [int(base)]
        step = (hi - lo) / (num_blocks - 1)
        return [max(0, int(round(lo + step * i))) for i in range(num_blocks)]
    if len(r) != num_blocks:
        raise ValueError(f"a per-block r list needs one entry per block: got {len(r)} entries for {num_blocks} blocks")
    return [int(v) for v in r]


def is_pair(r: Sequence[float]) -> bool:
    """[r, inflection]: exactly two entries, the second in [-1, 1] (a two-entry list is always read this way)."""
    return len(r) == 2 and -1.0 <= r[1] <= 1.0 and r[0] >= 0


def ratio_schedule(ratio: float, tokens: int, num_blocks: int) -> list[int]:
    """Per-block r that removes round((1 - ratio) * tokens) tokens in total, spread
    as evenly as possible with the remainder on the earliest blocks."""
    total = tokens - int(round(ratio * tokens))
    base, extra = divmod(total, num_blocks)
    return [base + (1 if i < extra else 0) for i in range(num_blocks)]


def cap_r(requested: Sequence[int], tokens: int, protected: int) -> tuple[list[int], list[int], list[int]]:
    """Apply r <= (tokens - protected) // 2 block by block. Returns (r, tokens in, tokens out) per block."""
    rs, t_in, t_out = [], [], []
    t = tokens
    for want in requested:
        r = max(0, min(int(want), (t - protected) // 2))
        rs.append(r)
        t_in.append(t)
        t -= r
        t_out.append(t)
    return rs, t_in, t_out
