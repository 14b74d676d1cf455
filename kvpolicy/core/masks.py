"""The engine's masks: which slots a query sees, and which of a step's tokens are padding.

A compressed layer's slots are unordered and rows of a left-padded batch hold different positions, so transformers'
mask (columns ``[S - P, S)`` in order) is only right for an uncompressed layer. A compressed layer attends under
:func:`slot_mask`, built from per-slot validity and logical positions. transformers' mask is still read once per step,
by :func:`new_token_validity`, for the one thing it knows that the cache does not: which new tokens are padding.
"""

from __future__ import annotations

import torch

__all__ = ["new_token_validity", "slot_mask"]


def slot_mask(valid: torch.Tensor, positions: torch.Tensor, q: int, seen: int) -> torch.Tensor | None:
    """bool ``[B, H, q, P]``: query ``i`` (logical column ``seen - q + i``) sees slot ``j`` when the slot is valid and
    not after the query (``positions[b, h, j] <= column``). ``valid``/``positions`` are ``[B, H, P]``. ``None`` when
    every slot is visible to every query (one query and no invalid slot), so attention can skip the mask."""
    if q == 1:
        return None if bool(valid.all()) else valid[:, :, None, :]
    cols = torch.arange(seen - q, seen, device=valid.device)
    return valid[:, :, None, :] & (positions[:, :, None, :] <= cols[:, None])


def new_token_validity(mask: torch.Tensor | None, q: int, batch: int, device: torch.device) -> torch.Tensor:
    """bool ``[B, q]``: which of this step's ``q`` tokens are real, read from transformers' attention ``mask``
    (``[B, 1, q, kv]``, bool or additive float): its last query row sees every real column. ``None`` means no padding
    at all (transformers drops the mask only then)."""
    if mask is None:
        return torch.ones(batch, q, dtype=torch.bool, device=device)
    last = mask[:, 0, -1, -q:]
    new_valid = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return new_valid.to(device).expand(batch, q)
