"""Choosing slots by score: the one ranking rule every reducer and the decode stage share.

Ties are broken by logical position (older first), so results are deterministic and a naive reference that loops over
positions in order reproduces them exactly.
"""

from __future__ import annotations

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
