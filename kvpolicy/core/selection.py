"""Choosing slots by score: the one ranking rule every reducer and the decode stage share.

Ties are broken by logical position (older first), so results are deterministic and a naive reference that loops over
positions in order reproduces them exactly.
"""

from __future__ import annotations

import math

import torch

from .policy import LayerView, Reduction


def _expand(scores: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, H or 1, P], got shape {tuple(scores.shape)}")
    scores = scores if scores.dtype == torch.float32 else scores.to(torch.float32)
    return scores.expand_as(like)


def ranked_slots(view: LayerView, scores: torch.Tensor) -> torch.Tensor:
    """All slots of each row ordered best first: valid slots by descending score, ties to the older position; invalid
    slots last. Returns int64 ``[B, H, P]``."""
    scores = _expand(scores, view.valid)
    if torch.isnan(scores).any():
        raise FloatingPointError(f"layer {view.layer_idx}: a scorer returned NaN")
    by_pos = view.order()  # valid first, oldest first
    s = scores.gather(-1, by_pos)
    v = view.valid.gather(-1, by_pos)
    s = torch.where(v, s, torch.finfo(torch.float32).min)
    # two stable sorts make a lexicographic one: by descending score, then valid before invalid (so a valid slot
    # scored -inf still ranks ahead of every invalid slot)
    order = (-s).argsort(dim=-1, stable=True)
    order = order.gather(-1, (~v).gather(-1, order).to(torch.int8).argsort(dim=-1, stable=True))
    return by_pos.gather(-1, order)


def select_top(view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
    """Evict: keep the ``keep[b]`` (or ``keep[b, h]``) best-scored valid slots of every row, in positional order."""
    held = view.held()
    keep = keep[:, None].expand_as(held) if keep.dim() == 1 else keep
    keep = torch.minimum(keep, held)
    k_max = int(keep.max()) if keep.numel() else 0
    best = ranked_slots(view, scores)[..., :k_max]
    ok = torch.arange(k_max, device=best.device) < keep[..., None]
    return sort_by_position(view, best, ok)


def shared_head_budgets(view: LayerView, scores: torch.Tensor, keep: torch.Tensor, floor_share: float) -> torch.Tensor:
    """AdaKV's allocation: how many entries each kv head keeps when a row's heads share one budget.

    The row keeps ``H * keep[b]`` entries in all (each head's uniform budget capped by what it holds); every head first
    keeps its ``floor(floor_share * keep[b])`` best entries, and the rest of the budget goes to the best-scored
    remaining entries of any head (ties: the head's own ranking, then the lower head). What is kept in each head is a
    prefix of :func:`ranked_slots`, so the counts alone describe the selection: ``select_top(view, scores, counts)``
    keeps it, and a merging reducer can spend the same per-head counts. Scores must be per kv head and comparable
    across heads. Returns int64 ``[B, H]``."""
    if scores.dim() != 3 or scores.shape[1] != view.num_heads:
        raise ValueError(f"shared head budgets need scores per kv head [B, H, P] (H={view.num_heads}); "
                         f"got {tuple(scores.shape)}")
    b, h, p = view.valid.shape
    held = view.held()  # [B, H]
    keep = keep[:, 0] if keep.dim() == 2 else keep
    keep = torch.minimum(keep[:, None].expand(b, h), held)
    ranked = ranked_slots(view, scores)  # [B, H, P] best first per head
    s = scores.to(torch.float32).expand(b, h, p).gather(-1, ranked)  # scores in ranked order
    ok = view.valid.gather(-1, ranked)
    floor = torch.tensor(
        [math.floor(floor_share * int(k)) for k in keep[:, 0].tolist()], device=keep.device, dtype=torch.long
    )[:, None].expand(b, h)
    rank = torch.arange(p, device=keep.device).expand(b, h, p)
    guaranteed = ok & (rank < floor[..., None])
    # remaining budget of each row, from the best non-guaranteed entries of any head
    extra = (keep.sum(-1) - guaranteed.sum((-2, -1))).clamp(min=0)  # [B]
    candidates = ok & ~guaranteed
    flat = torch.where(candidates, s, float("-inf")).reshape(b, h * p)
    # order: score desc, then rank (older within a head comes first in ranked order), then head
    order = flat.argsort(dim=-1, descending=True, stable=True)
    # candidates before non-candidates even when a candidate scored -inf (a second stable sort)
    not_candidate = (~candidates).reshape(b, h * p).gather(-1, order).to(torch.int8)
    order = order.gather(-1, not_candidate.argsort(dim=-1, stable=True))
    chosen_flat = torch.zeros(b, h * p, dtype=torch.bool, device=keep.device)
    pick = torch.arange(h * p, device=keep.device)[None, :] < extra[:, None]
    chosen_flat.scatter_(-1, order, pick)
    chosen = (chosen_flat.view(b, h, p) & candidates) | guaranteed
    return chosen.sum(-1)


def sort_by_position(view: LayerView, index: torch.Tensor, ok: torch.Tensor) -> Reduction:
    """Order kept slots by logical position with padding entries last, for a tidy, reproducible layout."""
    big = torch.iinfo(torch.long).max
    pos = torch.where(ok, view.positions.gather(-1, index), big)
    order = pos.argsort(dim=-1, stable=True)
    return Reduction(index=index.gather(-1, order), valid=ok.gather(-1, order))


def lowest_slot(view: LayerView, scores: torch.Tensor, checked: bool = False, full: bool = False) -> torch.Tensor:
    """The single lowest-scored valid slot of each row (ties to the older position): ``ranked_slots(view, -scores)
    [..., :1]`` in O(P) instead of two sorts — the common decode case of one drop per step. int64 ``[B, H, 1]``.
    ``checked``: the caller already refused NaN scores (the engine's part check), so the test is not repeated;
    ``full``: the caller knows every slot is valid, so validity is not applied (a decode step's common case)."""
    s = _expand(scores, view.valid)
    if not checked and torch.isnan(s).any():
        raise FloatingPointError(f"layer {view.layer_idx}: a scorer returned NaN")
    if full:
        tied = s == s.amin(-1, keepdim=True)
    else:
        s = torch.where(view.valid, s, float("inf"))
        tied = view.valid & (s == s.amin(-1, keepdim=True))
    big = torch.iinfo(view.positions.dtype).max
    return torch.where(tied, view.positions, big).argmin(-1, keepdim=True)
