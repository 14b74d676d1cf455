"""The engine's masks: which slots a query sees, and which of a step's tokens are padding.

A compressed layer's slots are unordered and rows of a left-padded batch hold different positions, so transformers'
mask (columns ``[S - P, S)`` in order) is only right for an uncompressed layer. A compressed layer attends under
:func:`slot_mask`, built from per-slot validity and logical positions. transformers' mask is still read once per step,
by :func:`new_token_validity`, for the one thing it knows that the cache does not: which new tokens are padding. A
sliding-window layer's slots are also limited to the window (``window``, :mod:`kvpolicy.core.window`).
"""

from __future__ import annotations

import torch

__all__ = ["new_token_validity", "slot_mask"]


def slot_mask(
    valid: torch.Tensor, positions: torch.Tensor, q: int, seen: int, window: int | None = None
) -> torch.Tensor | None:
    """bool ``[B, H, q, P]``: query ``i`` (logical column ``seen - q + i``) sees slot ``j`` when the slot is valid and
    not after the query (``positions[b, h, j] <= column``) and, in a sliding-window layer, not ``window`` columns or
    more before it (``positions[b, h, j] > column - window``, transformers' rule). ``valid``/``positions`` are
    ``[B, H, P]``. ``None`` when every slot is visible to every query (one query and no invalid slot), so attention can
    skip the mask. A single query needs no window term: a sliding layer frees what left its window before the step
    attends (:mod:`kvpolicy.core.window`)."""
    if q == 1:
        return None if bool(valid.all()) else valid[:, :, None, :]
    cols = torch.arange(seen - q, seen, device=valid.device)
    mask = valid[:, :, None, :] & (positions[:, :, None, :] <= cols[:, None])
    if window is not None:
        mask &= positions[:, :, None, :] > (cols - window)[:, None]
    return mask


def new_token_validity(mask: torch.Tensor | None, q: int, batch: int, device: torch.device) -> torch.Tensor:
    """bool ``[B, q]``: which of this step's ``q`` tokens are real, read from transformers' attention ``mask``
    (``[B, 1, q, kv]``, bool or additive float): its diagonal, where each real query sees its own column and a padding
    column is masked for every query. (The last row would do for a global layer, but in a sliding-window layer it
    does not see the first tokens of a prompt longer than the window.) ``None`` means no padding at all
    (transformers drops the mask only then)."""
    if mask is None:
        return torch.ones(batch, q, dtype=torch.bool, device=device)
    kv = mask.shape[-1]
    if q == 1:
        own = mask[:, 0, -1, -1:]
    else:
        rows = torch.arange(q, device=mask.device)
        own = mask[:, 0, rows, kv - q + rows]
    new_valid = own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2
    return new_valid.to(device).expand(batch, q)
