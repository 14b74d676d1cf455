"""The per-slot tensors of several layers in one buffer each, so that a decode step's bookkeeping is one call for all.

A decode step at a small budget costs, besides attention, the policy's bookkeeping in every layer: the drop's scores,
the victim, freeing its slot, writing the new token's validity, column, type and state — a few dozen small tensor
operations per layer, each mostly the fixed cost of an operator call (on SmolLM2-135M at B = 410 they were ~5% of the
step). When the layers of a group hold the same layout shape (every layer's budget the same, the common case), their
per-slot tensors can live in one ``[L, B, H, C]`` buffer each, every layer's own ``[B, H, C]`` tensor a view of its
slice: then one operator call does the work for all ``L`` layers (:mod:`kvpolicy.core.stacked`), and each layer's own
path still reads and writes the same memory.

Keys and values are not packed (each layer writes its own token's and attends over its own). A member leaves the
pack whenever its storage replaces a buffer (growth, compaction, row selection, a rank it stopped keeping): the pack
notices (:meth:`SlotPack.covers`) and is rebuilt from the members' current tensors when next needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .slotops import rank_after_drop, write_end_slot, write_new_slot
from .storage import PaddedStorage

__all__ = ["SlotPack"]


class SlotPack:
    """The per-slot tensors (validity, columns, types, rank, slot state) of several :class:`PaddedStorage` of one
    shape, stacked along a new first axis (layer ``l`` of the pack, row ``b`` is row ``l * B + b`` of :meth:`used`)."""

    def __init__(self) -> None:
        self.members: list[PaddedStorage] = []
        #: name -> ``[L, B, H, C]`` (the names of :meth:`PaddedStorage.slot_buffers`)
        self.buffers: dict[str, torch.Tensor] = {}
        self._slices: list[dict[str, torch.Tensor]] = []
        self._used: tuple[int, dict[str, torch.Tensor]] | None = None
        #: the holes the last :meth:`free_one` handed its members (``[L, B, H, 1]`` and one view per member)
        self._holes: tuple[torch.Tensor, tuple[torch.Tensor, ...], bool] | None = None
        #: the members' key and value head dims, when they agree (see :meth:`_kv_indices`)
        self._kv_dims: tuple[int, int] | None = None

    # ------------------------------------------------------------------ membership
    def covers(self, storages: Sequence[PaddedStorage]) -> bool:
        """Whether ``storages`` are this pack's members, in order, none of them having left it."""
        members = self.members
        if len(storages) != len(members):
            return False
        for s, m, buffers in zip(storages, members, self._slices):
            if s is not m or not s.uses(buffers):
                return False
        return True

    def pack(self, storages: Sequence[PaddedStorage]) -> bool:
        """Make ``storages`` the members: stack their per-slot tensors (one copy) and hand each its slice. Returns
        ``False``, changing nothing, when their shapes, dtypes or slot states differ."""
        capacity = storages[0].capacity
        if any(s.capacity != capacity for s in storages):  # (checked first: it costs no tensor)
            return False
        buffers = [s.slot_buffers() for s in storages]
        first = buffers[0]
        for other in buffers[1:]:
            if other.keys() != first.keys():
                return False
            for name, t in first.items():
                if other[name].shape != t.shape or other[name].dtype != t.dtype:
                    return False
        self.buffers = {name: torch.stack([b[name] for b in buffers]) for name in first}
        slices = {name: t.unbind(0) for name, t in self.buffers.items()}
        self._slices = [{name: slices[name][i] for name in first} for i in range(len(storages))]
        for s, mine in zip(storages, self._slices):
            s.adopt(mine)
        self.members = list(storages)
        self._used, self._holes = None, None
        dims = {(s.keys.shape[-1], s.values.shape[-1]) for s in storages}
        self._kv_dims = dims.pop() if len(dims) == 1 else None
        return True

    def covering(self, storages: Sequence[PaddedStorage]) -> bool:
        """:meth:`covers`, packing ``storages`` first when it does not (``False`` when they cannot be packed)."""
        return self.covers(storages) or self.pack(storages)

    # ------------------------------------------------------------------ reads
    def used(self, length: int) -> dict[str, torch.Tensor]:
        """The used ``length`` slots of every buffer as ``[L * B, H, length]`` views (the layers stacked along the
        batch axis), made once per length."""
        cached = self._used
        if cached is None or cached[0] != length:
            cached = (length, {name: t[..., :length].flatten(0, 1) for name, t in self.buffers.items()})
            self._used = cached
        return cached[1]

    def states(self) -> list[torch.Tensor]:
        return [t for name, t in self.buffers.items() if name.startswith("state:")]

    # ------------------------------------------------------------------ writes for every member
    def free_one(self, victims: torch.Tensor, length: int, refill: bool) -> None:
        """Free one slot per row of every member (``victims`` int64 ``[L * B, H, 1]``, each valid, every member's
        layout full over ``length`` slots): :meth:`PaddedStorage.free`'s unmasked path for all of them, ``refill`` as
        there."""
        valid = self.buffers["valid"]
        holes = victims.view(*valid.shape[:3], 1)
        if not refill:
            valid.scatter_(-1, holes, False)
        rank_after_drop(self.buffers["rank"][..., :length], holes, length)
        views = holes.unbind(0)
        for s, hole in zip(self.members, views):
            s.note_freed(hole, not refill)
        self._holes = (holes, views, not refill)

    def prepare_holes(self, col: int, token_type: int) -> bool:
        """:meth:`PaddedStorage.prepare` for every member whose one free slot is the hole :meth:`free_one` left it
        (all of them, or nothing is done and ``False`` returned)."""
        if self._holes is None:
            return False
        holes, views, marked = self._holes
        for s, hole in zip(self.members, views):
            if s.hole is not hole:
                return False
        b = self.buffers
        write_new_slot(b["valid"], b["pos"], b["types"], self.states(), holes, col, token_type, marked)
        for s, hole, index in zip(self.members, views, self._kv_indices(holes)):
            s.note_prepared(hole, index)
        self._holes = None
        return True

    def _kv_indices(self, holes: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each member's hole expanded over its key and value dims (what its write of the new token's keys and
        values scatters along), made for all members at once when their dims agree."""
        if self._kv_dims is None:
            return [None] * len(self.members)
        dk, dv = self._kv_dims
        keys = holes[..., None].expand(*holes.shape, dk).unbind(0)
        values = keys if dv == dk else holes[..., None].expand(*holes.shape, dv).unbind(0)
        return list(zip(keys, values))

    def prepare_end(self, length: int, col: int, token_type: int) -> bool:
        """:meth:`PaddedStorage.prepare` for members whose layouts are full over ``length`` slots with room for one
        more (no growth): the new token in slot ``length`` of every row. ``False`` (nothing done) otherwise."""
        for s in self.members:
            if not s.full or s.length != length or s.capacity <= length or s.pristine:
                return False
        b = self.buffers
        write_end_slot(b["valid"], b["pos"], b["types"], b["rank"], self.states(), length, col, token_type)
        for s in self.members:
            s.note_prepared((length, 1))
        self._holes = None
        return True
