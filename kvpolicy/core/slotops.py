"""The writes of a decode step's slot bookkeeping, on per-slot tensors of any leading shape.

A padded storage (:class:`~kvpolicy.core.storage.PaddedStorage`) keeps, per slot, its validity, logical column, token
type, positional rank and any per-slot state, ``[B, H, C]`` each; a :class:`~kvpolicy.core.slotpack.SlotPack` keeps
the same tensors of several layers stacked, ``[L, B, H, C]``. A decode step writes them the same way in both: these
functions index the last axis only, so one call updates one layer or every layer of a pack.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["set_value", "write_end_slot", "write_new_slot", "rank_after_drop"]


def set_value(t: torch.Tensor, value: torch.Tensor | int) -> None:
    """``t[...] = value`` (a number without making a tensor of it first)."""
    if isinstance(value, torch.Tensor):
        t.copy_(value.view(()) if value.numel() == 1 else value)
    else:
        t.fill_(value)


def write_end_slot(
    valid: torch.Tensor,
    pos: torch.Tensor,
    types: torch.Tensor,
    rank: torch.Tensor | None,
    states: Iterable[torch.Tensor],
    start: int,
    col: torch.Tensor | int,
    token_type: torch.Tensor | int,
) -> None:
    """A new token in slot ``start`` of every row, after ``start`` valid slots: valid, at column ``col`` of type
    ``token_type``, the newest entry (rank ``start``, when the rank is kept), fresh state (0)."""
    if rank is not None:
        rank[..., start].fill_(start)
    valid[..., start].fill_(True)
    set_value(pos[..., start], col)
    set_value(types[..., start], token_type)
    for t in states:
        t[..., start].fill_(0)


def write_new_slot(
    valid: torch.Tensor,
    pos: torch.Tensor,
    types: torch.Tensor,
    states: Iterable[torch.Tensor],
    slot: torch.Tensor,
    col: torch.Tensor | int,
    token_type: torch.Tensor | int,
    mark: bool = True,
) -> None:
    """A new token per row at ``slot`` (int64, the tensors' shape with a last axis of 1): validity (unless ``mark``
    is false: already set), column, type and fresh state. Its rank is not written: a token written into the one free
    slot of a row takes the rank that slot already has (the last, see :func:`rank_after_drop`)."""
    if mark:
        valid.scatter_(-1, slot, True)
    if isinstance(col, int):
        pos.scatter_(-1, slot, col)
    else:
        pos.scatter_(-1, slot, col.view((1,) * slot.dim()).expand_as(slot))
    if isinstance(token_type, int):
        types.scatter_(-1, slot, token_type)
    else:
        types.scatter_(-1, slot, token_type.view((1,) * slot.dim()).expand_as(slot).to(torch.int8))
    for t in states:
        t.scatter_(-1, slot, 0)


def rank_after_drop(rank: torch.Tensor, victims: torch.Tensor, length: int) -> None:
    """Update the positional rank of ``length`` used slots (``rank``, every slot valid) in place after one victim per
    row was freed (``victims``, the rank's shape with a last axis of 1): the newer entries move down one rank and the
    freed slot, now the only free one, ranks last."""
    rank.add_(rank > rank.gather(-1, victims), alpha=-1)
    rank.scatter_(-1, victims, length - 1)
