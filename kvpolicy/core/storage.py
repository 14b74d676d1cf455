"""Where one layer's keys and values live: the storage interface and the padded layout.

A :class:`~kvpolicy.core.layer.PolicyLayer` keeps its entries in one storage object, the way transformers'
``cache_utils`` gives each storage strategy its own small layer class. :class:`SlotStorage` is what every step needs
whatever the layout (append this step's tokens, mark its padding, attend, follow beam/batch row selection, report
bytes); a layout is chosen once and the layer never branches on it:

* :class:`PaddedStorage` (here): ``[B, H, C, D]`` buffers with capacity ``C >= P`` for ``P`` used slots, plus per slot
  ``valid``, ``positions`` (logical column), ``token_types`` and any per-slot state a decode scorer asked for. Every
  layer starts here, and the policy's stages (views, reductions, decode drops) act on this layout only.
* :class:`~kvpolicy.core.buckets.BucketedStorage`: kv heads in buckets of similar length, for per-head budgets that
  must really save memory. A layer switches to it at most once, after its prefill reduction, when its policy has no
  decode stage left to run (see :mod:`kvpolicy.core.buckets`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from .kernels import grouped_attention
from .masks import slot_mask
from .policy import LOGIT_BIAS, Reduction
from .slotops import rank_after_drop, write_end_slot, write_new_slot

__all__ = ["PaddedStorage", "SlotStorage", "growth"]


def growth(length: int) -> int:
    """Slack added when a decode step finds no free slot: 1/32 of the length amortises reallocation to a few slots'
    copy per step while keeping unused capacity near 3% (small caches grow a slot at a time: their copy is cheap)."""
    return max(1, length // 32)


class SlotStorage(ABC):
    """The storage interface of one layer: what every step needs, whatever the layout."""

    #: slots hold columns ``[S - P, S)`` in order (nothing dropped yet): transformers' own mask is right
    pristine: bool = False

    @property
    @abstractmethod
    def length(self) -> int:
        """Physical slots in use ``P`` (the longest bucket in a bucketed layout)."""

    @property
    @abstractmethod
    def keys(self) -> torch.Tensor:
        """Keys handed back to transformers from ``update()`` (the used part; attention reads the storage itself)."""

    @property
    @abstractmethod
    def values(self) -> torch.Tensor:
        """Values handed back to transformers from ``update()``."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Allocated slots (the largest bucket's in a bucketed layout)."""

    @abstractmethod
    def append(self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, types: torch.Tensor, slack: int) -> None:
        """Store this step's tokens ``k``/``v [B, H, q, D]`` at logical columns ``cols [q]`` with token ``types``
        (int8, broadcastable to ``[B, H, q]``); ``slack`` extra slots when the buffer must grow."""

    @abstractmethod
    def invalidate_new(self, new_valid: torch.Tensor) -> None:
        """Mark the tokens of this step that are padding (``new_valid`` bool ``[B, q]`` is False) invalid."""

    @abstractmethod
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search reorder, batch selection, repeat-interleave)."""

    @abstractmethod
    def held(self) -> torch.Tensor:
        """Valid entries per row and kv head, int64 ``[B, H]``."""

    @abstractmethod
    def slots(self, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(valid, positions, token_types)`` of one kv head's slots, ``[B, P_head]`` each."""

    @abstractmethod
    def head_kv(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` of one kv head's slots, ``[B, P_head, D]`` each, aligned with :meth:`slots`."""

    @abstractmethod
    def attend(self, query: torch.Tensor, seen: int, scaling: float, eager: bool) -> torch.Tensor:
        """Outputs ``[B, q, Hq, D]`` of ``query [B, Hq, q, D]`` (the last ``q`` of ``seen`` columns) over the stored
        entries under the engine's per-slot mask (:func:`~kvpolicy.core.masks.slot_mask`)."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of key/value storage (the allocated buffers, not just the used part)."""

    @abstractmethod
    def slot_nbytes(self) -> int:
        """Key + value bytes of one physical slot across rows and kv heads."""

    @abstractmethod
    def meta_nbytes(self) -> int:
        """Bytes of per-slot bookkeeping (validity, positions, token types, slot state)."""


class PaddedStorage(SlotStorage):
    """All kv heads in one ``[B, H, C, D]`` buffer; rows and heads holding fewer entries have invalid slots.

    Slots are unordered: a decode step writes a new token into its row's first free slot (O(budget) work, no
    ``torch.cat``, tensors that stay exactly at a fixed budget) and grows by :func:`growth` only when a row has none.
    """

    def __init__(self, key_states: torch.Tensor, value_states: torch.Tensor, window: int | None = None):
        b, h, _, d = key_states.shape
        #: a sliding-window layer's window in columns (:mod:`kvpolicy.core.window`), for the mask of multi-token steps
        self.window = window
        device = key_states.device
        self._k = key_states.new_empty(b, h, 0, d)
        self._v = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self._valid = torch.zeros(b, h, 0, dtype=torch.bool, device=device)
        self._pos = torch.zeros(b, h, 0, dtype=torch.long, device=device)
        self._types = torch.zeros(b, h, 0, dtype=torch.int8, device=device)
        self._state: dict[str, torch.Tensor] = {}
        self._length = 0
        self.pristine = True
        #: the slots written by the current step: int64 ``[B, H, q]``, or ``(start, q)`` for ``q`` slots at the end of
        #: every row, made a tensor only when read (:attr:`new_slots`); ``None`` right after a reduction
        self._new: torch.Tensor | tuple[int, int] | None = None
        #: what the engine knows of the free slots without reading ``valid`` (a decode step would otherwise pay a
        #: search and a check per layer): ``_full`` — every used slot of every row holds a valid entry; ``_hole`` —
        #: int64 ``[B, H, 1]``, the one free slot of every row (all others valid). Both false/None when not known.
        self._full = True
        self._hole: torch.Tensor | None = None
        #: whether ``valid`` already reads False at ``_hole`` (see :meth:`free`'s ``refill``)
        self._hole_marked = True
        #: int64 ``[B, H, C]``: the positional rank of every used slot (what ``LayerView.rank`` computes with a sort),
        #: made on the first request and then kept up to date by the decode fast paths (a drop from a full layout, a
        #: token written into the one hole or at the end); ``None`` when not known. See :meth:`rank_for`.
        self._rank: torch.Tensor | None = None
        #: views of the used slots, made once per layout change rather than at every read (see :meth:`_used`)
        self._views: dict[str, torch.Tensor] | None = None
        #: the slot :meth:`prepare` chose for the next one-token :meth:`append` (``(start, 1)`` at the end), and that
        #: slot expanded over the key and value dims when the caller made it (:meth:`note_prepared`)
        self._prepared: torch.Tensor | tuple[int, int] | None = None
        self._kv_index: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ read-only views of the used slots
    def _used(self) -> dict[str, torch.Tensor]:
        """The used part of every buffer, cached until the buffers or the length change (:meth:`_relayout`): a decode
        step reads them a dozen times per layer, and each slicing is an operator call."""
        views = self._views
        if views is None:
            n = self._length
            views = {"k": self._k[:, :, :n], "v": self._v[:, :, :n], "valid": self._valid[:, :, :n],
                     "pos": self._pos[:, :, :n], "types": self._types[:, :, :n]}
            views.update({"state:" + name: t[:, :, :n] for name, t in self._state.items()})
            self._views = views
        return views

    def _relayout(self) -> None:
        """Forget the cached views: a buffer was replaced or the used length changed."""
        self._views = None

    @property
    def length(self) -> int:
        return self._length

    @property
    def keys(self) -> torch.Tensor:
        return self._used()["k"]

    @property
    def values(self) -> torch.Tensor:
        return self._used()["v"]

    @property
    def valid(self) -> torch.Tensor:
        """bool ``[B, H, P]``: the slot holds a real token."""
        return self._used()["valid"]

    @property
    def positions(self) -> torch.Tensor:
        """int64 ``[B, H, P]``: logical column of each slot."""
        return self._used()["pos"]

    @property
    def token_types(self) -> torch.Tensor:
        """int8 ``[B, H, P]``: TEXT / IMAGE / GENERATED per slot."""
        return self._used()["types"]

    @property
    def slot_state(self) -> dict[str, torch.Tensor]:
        """Per-slot state ``[B, H, P]`` a decode scorer keeps, by name (a new dict of views)."""
        used = self._used()
        return {name: used["state:" + name] for name in self._state}

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """float32 ``[B, H, P]``: what attention adds to each used slot's logit (:data:`LOGIT_BIAS`), or ``None``."""
        return self._used().get("state:" + LOGIT_BIAS)

    @property
    def has_slot_state(self) -> bool:
        return bool(self._state)

    @property
    def full(self) -> bool:
        """Every used slot of every row is known to hold a valid entry (no padding, no freed slot)."""
        return self._full

    @property
    def new_slots(self) -> torch.Tensor | None:
        """int64 ``[B, H, q]``: the slots written by the current step (``None`` right after a reduction)."""
        new = self._new
        if isinstance(new, tuple):
            start, q = new
            b, h = self._k.shape[:2]
            new = torch.arange(start, start + q, device=self._k.device).expand(b, h, q)
            self._new = new
        return new

    @property
    def new_count(self) -> int:
        """Tokens written by the current step (0 right after a reduction)."""
        new = self._new
        if new is None:
            return 0
        return new[1] if isinstance(new, tuple) else new.shape[-1]

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def set_slot_state(self, name: str, value: torch.Tensor) -> None:
        """Start a per-slot state ``[B, H, P]`` (kept aligned with the slots from now on; new slots start at 0)."""
        self._state[name] = value
        self._relayout()

    # ------------------------------------------------------------------ writes
    def _reserve(self, n: int, slack: int = 0) -> None:
        """Make room for ``n`` slots; reallocates (one copy) only when the buffer is full."""
        if n <= self.capacity:
            return
        cap = n + slack

        def grow(t: torch.Tensor, fill: Any) -> torch.Tensor:
            new = t.new_full((*t.shape[:2], cap, *t.shape[3:]), fill)
            new[:, :, : self._length] = t[:, :, : self._length]
            return new

        self._k, self._v = grow(self._k, 0), grow(self._v, 0)
        self._valid, self._pos, self._types = grow(self._valid, False), grow(self._pos, 0), grow(self._types, 0)
        self._state = {k: grow(v, 0) for k, v in self._state.items()}
        self._rank = None
        self._relayout()

    def append(
        self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor | int, types: torch.Tensor | int, slack: int
    ) -> None:
        """One token into each row's first free slot once slots are unordered, else at the end. ``cols``/``types``
        may be ints (one token, the same column and type in every row: a decode step). After :meth:`prepare` the
        token goes where it chose (``cols``/``types`` were written then)."""
        if self._prepared is not None:
            self._write_prepared(k, v)
        elif k.shape[2] == 1 and not self.pristine:
            self._append_into_free(k, v, cols, types)
        else:
            self._append_at_end(k, v, cols, types, slack)

    def prepare(self, col: torch.Tensor | int, token_type: torch.Tensor | int, slack: int) -> bool:
        """Choose the slot of a one-token step's token and write its validity, column, type and fresh state now;
        the next :meth:`append` writes its key and value there. Only where the layout is known (:attr:`full`: a new
        slot at the end of every row; or one free slot per row): that is the slot the first-free-slot search would
        pick. Returns whether it did (otherwise ``append`` searches as usual).

        Why apart: the engine prepares every layer of a step back to back, where these writes cost a third of what
        they cost one layer at a time between the model's matmuls (see ``PolicyLayer.begin_early``)."""
        if self.pristine:
            return False
        if self._full:
            start = self._length
            self._reserve(start + 1, slack)
            states = self._state.values()
            write_end_slot(self._valid, self._pos, self._types, self._rank, states, start, col, token_type)
            self.note_prepared((start, 1))
            return True
        hole = self._hole
        if hole is None:
            return False
        # the hole ranks last: the new entry takes its rank
        mark = self._hole_marked
        write_new_slot(self._valid, self._pos, self._types, self._state.values(), hole, col, token_type, mark)
        self.note_prepared(hole)
        return True

    def note_prepared(
        self, slot: torch.Tensor | tuple[int, int], kv_index: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """The next token's validity, column, type and state were written (:meth:`prepare`, or a
        :class:`~kvpolicy.core.slotpack.SlotPack` for all of its members at once) at ``slot``: the one free slot of
        every row (int64 ``[B, H, 1]``, the layout is full again), or ``(start, 1)``, a new slot at the end.
        ``kv_index``: ``slot`` expanded over the key and the value dims, for the write of the keys and values."""
        if isinstance(slot, tuple):
            self._length = slot[0] + 1
            self._relayout()
            self._used()  # the views of the new length, made here rather than in the layer's own update
        else:
            self._full, self._hole = True, None
        self._new = self._prepared = slot
        self._kv_index = kv_index

    def _write_prepared(self, k: torch.Tensor, v: torch.Tensor) -> None:
        slot, self._prepared = self._prepared, None
        if k.shape[2] != 1:
            raise RuntimeError(f"kvpolicy: a slot was prepared for one token and the step brought {k.shape[2]}")
        index, self._kv_index = self._kv_index, None
        if isinstance(slot, tuple):
            start = slot[0]
            self._k[:, :, start : start + 1] = k
            self._v[:, :, start : start + 1] = v
        elif index is not None:
            self._k.scatter_(2, index[0], k)
            self._v.scatter_(2, index[1], v)
        else:
            self._write_kv_at(slot, k, v)

    def _write_kv_at(self, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        d_idx = slot[..., None]
        self._k.scatter_(2, d_idx.expand(*slot.shape, self._k.shape[-1]), k)
        self._v.scatter_(2, d_idx.expand(*slot.shape, self._v.shape[-1]), v)

    def _append_at_end(
        self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor | int, types: torch.Tensor | int, slack: int
    ) -> None:
        q = k.shape[2]
        start = self._length
        self._reserve(start + q, slack)
        end = start + q
        if self._rank is not None:  # the new tokens are the newest entries: ranks start..end-1 if nothing is free
            if self._full:
                self._rank[:, :, start:end] = torch.arange(start, end, device=self._rank.device)
            else:
                self._rank = None
        self._k[:, :, start:end] = k
        self._v[:, :, start:end] = v
        self._valid[:, :, start:end] = True
        self._pos[:, :, start:end] = cols
        self._types[:, :, start:end] = types
        for t in self._state.values():
            t[:, :, start:end] = 0
        self._length = end
        self._relayout()
        self._new = (start, q)

    def _append_into_free(
        self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor | int, types: torch.Tensor | int
    ) -> None:
        """One new token per row, written into the row's first free slot (grows by one only if a row has none).
        Where the layout is known (:meth:`prepare`) without searching."""
        if self.prepare(cols, types, growth(self._length)):
            self._write_prepared(k, v)
            return
        self._rank = None
        free = ~self._valid[:, :, : self._length]
        has_free = free.any(-1)
        slot = torch.where(has_free, free.to(torch.int8).argmax(-1), self._length)[..., None]  # [B, H, 1]
        if not bool(has_free.all()):
            self._reserve(self._length + 1, growth(self._length))
            self._valid[:, :, self._length] = False
            self._length += 1
            self._relayout()
        self._write_kv_at(slot, k, v)
        write_new_slot(self._valid, self._pos, self._types, self._state.values(), slot, cols, types)
        self._new = slot

    def invalidate_new(self, new_valid: torch.Tensor) -> None:
        slots = self.new_slots
        assert slots is not None, "invalidate_new() right after a reduction"
        cur = self._valid.gather(2, slots)
        self._valid.scatter_(2, slots, cur & new_valid[:, None, :])
        self._full, self._hole, self._rank = False, None, None

    def compact(self, red: Reduction) -> None:
        """Replace the slots by a reducer's :class:`~kvpolicy.core.policy.Reduction` (gathered or merged)."""
        idx = red.index
        d = self._k.shape[-1]
        n = self._length
        gather = lambda t: t[:, :, :n].gather(2, idx)  # noqa: E731
        keys = red.keys if red.keys is not None else self._k[:, :, :n].gather(2, idx[..., None].expand(*idx.shape, d))
        values = (
            red.values
            if red.values is not None
            else self._v[:, :, :n].gather(2, idx[..., None].expand(*idx.shape, self._v.shape[-1]))
        )
        self._k, self._v = keys.contiguous(), values.contiguous()
        self._valid = red.valid.clone()
        self._pos, self._types = gather(self._pos), gather(self._types)
        self._state = {k: gather(v) for k, v in self._state.items()}
        if red.logit_bias is not None:
            self._state[LOGIT_BIAS] = red.logit_bias.to(torch.float32).contiguous()
        self._length = idx.shape[-1]
        self.pristine = False
        self._new = None
        self._relayout()
        self._full, self._hole, self._rank = bool(self._valid.all()), None, None

    def write_kv(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the used slots' keys and values (a reducer merged dropped entries into their neighbours)."""
        n = self._length
        self._k[:, :, :n], self._v[:, :, :n] = keys, values

    def free(self, victims: torch.Tensor, ok: torch.Tensor | None = None, refill: bool = False) -> None:
        """Free slots ``victims`` (int64 ``[B, H, k]``) where ``ok`` (``None``: every victim, each a distinct valid
        slot): a later token may overwrite them. ``refill``: the caller's next call is :meth:`prepare` for one token
        (a decode drop inside the update), so a single victim per row of a full layout is not marked invalid only
        to be marked valid again: the hole keeps its flag until then."""
        if ok is None:
            one = self._full and victims.shape[-1] == 1
            self._hole_marked = not (one and refill)
            if self._hole_marked:
                self._valid.scatter_(2, victims, False)
            self._hole = victims if one else None
            if one and self._rank is not None:
                # the newer entries move down one rank; the hole (the only free slot) ranks last
                rank_after_drop(self._rank[:, :, : self._length], victims, self._length)
            else:
                self._rank = None
        else:
            cur = self._valid.gather(2, victims)
            self._valid.scatter_(2, victims, cur & ~ok)
            self._hole, self._rank = None, None
        self._full = False
        self.pristine = False

    def expire(self, before: int, seen: int) -> int:
        """Free the slots at logical columns ``< before`` (they left a sliding window, :mod:`kvpolicy.core.window`).

        A pristine layout (slot ``j`` holds column ``seen - P + j`` in every row) drops them from its front and stays
        pristine, in order, as transformers' own sliding layer does, so that its mask still applies (bit-identical
        outputs while nothing else is dropped); returns how many front slots went (0 for an unordered layout, whose
        slots are only marked free for later tokens to overwrite)."""
        n = self._length
        if not self.pristine:
            if n:
                self._valid[:, :, :n] &= self._pos[:, :, :n] >= before
                # what the decode fast paths knew of the free slots may no longer hold (not read back: a sync)
                self._full, self._hole, self._rank = False, None, None
            return 0
        k = min(n, max(0, before - (seen - n)))
        if k == 0:
            return 0
        # views past the dropped slots, no copy: the buffers' next growth (:func:`growth`) reallocates them and
        # releases the dropped front; until then :meth:`nbytes` counts it
        self._k, self._v = self._k[:, :, k:], self._v[:, :, k:]
        self._valid, self._pos, self._types = self._valid[:, :, k:], self._pos[:, :, k:], self._types[:, :, k:]
        self._state = {name: t[:, :, k:] for name, t in self._state.items()}
        self._length = n - k
        self._rank = None
        self._relayout()
        if self._new is not None:  # a pristine layout's new tokens are its last slots: those that remain
            left = min(self.new_count, n - k)
            self._new = (n - k - left, left)
        return k

    def select_rows(self, index: torch.Tensor) -> None:
        self._k, self._v = self._k[index], self._v[index]
        self._valid, self._pos, self._types = self._valid[index], self._pos[index], self._types[index]
        self._state = {k: v[index] for k, v in self._state.items()}
        if self._hole is not None:
            self._hole = self._hole[index]
        if self._rank is not None:
            self._rank = self._rank[index]
        self._relayout()

    # ------------------------------------------------------------------ stacked with other layers (slotpack.py)
    def slot_buffers(self) -> dict[str, torch.Tensor]:
        """The per-slot tensors over the whole capacity by name (``valid``, ``pos``, ``types``, ``rank`` and
        ``state:<name>``, ``[B, H, C]`` each), the rank made first if it is not kept: what a
        :class:`~kvpolicy.core.slotpack.SlotPack` stacks."""
        self.rank_for(self.valid, self.positions)
        named = {"valid": self._valid, "pos": self._pos, "types": self._types, "rank": self._rank}
        return {**named, **{"state:" + name: t for name, t in self._state.items()}}

    def adopt(self, buffers: dict[str, torch.Tensor]) -> None:
        """Keep the per-slot tensors in ``buffers`` from now on (the names and contents of :meth:`slot_buffers`:
        views of a pack's slice). Any later growth, compaction or row selection replaces them again."""
        self._valid, self._pos, self._types, self._rank = (buffers[k] for k in ("valid", "pos", "types", "rank"))
        self._state = {name: buffers["state:" + name] for name in self._state}
        self._relayout()

    def uses(self, buffers: dict[str, torch.Tensor]) -> bool:
        """Whether the per-slot tensors are still those of ``buffers`` (:meth:`adopt`): none replaced since."""
        state = self._state
        if len(state) + 4 != len(buffers) or self._valid is not buffers["valid"] or self._rank is not buffers["rank"]:
            return False
        if self._pos is not buffers["pos"] or self._types is not buffers["types"]:
            return False
        return all(t is buffers.get("state:" + name) for name, t in state.items())

    @property
    def hole(self) -> torch.Tensor | None:
        """int64 ``[B, H, 1]``: the one free slot of every row when the engine knows it (read-only), else ``None``."""
        return self._hole

    def note_freed(self, hole: torch.Tensor, marked: bool) -> None:
        """One slot per row of a full layout, ``hole`` (int64 ``[B, H, 1]``), was freed and the rank updated elsewhere
        (a :class:`~kvpolicy.core.slotpack.SlotPack`, for all of its members at once); ``marked``: its validity was
        cleared (see :meth:`free`'s ``refill``)."""
        self._hole, self._hole_marked = hole, marked
        self._full = False
        self.pristine = False

    # ------------------------------------------------------------------ reads
    def rank_for(self, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The positional rank of the used slots, int64 ``[B, H, P]`` (read-only), when ``valid`` and ``positions``
        are this storage's own current views (a view built from them asks; anything else gets ``None`` and sorts).

        Made with the same sort as :meth:`~kvpolicy.core.policy.LayerView.rank` on the first request, then kept up to
        date by the decode fast paths instead of re-sorting at every step (a sort of the budget per layer and step)."""
        used = self._used()
        if valid is not used["valid"] or positions is not used["pos"]:
            return None
        n = self._length
        if self._rank is None:
            order = torch.where(valid, positions, torch.iinfo(positions.dtype).max).argsort(dim=-1, stable=True)
            rank = torch.empty(*valid.shape[:2], self.capacity, dtype=torch.long, device=valid.device)
            rank[:, :, :n].scatter_(-1, order, torch.arange(n, device=valid.device).expand_as(order))
            self._rank = rank
        return self._rank[:, :, :n]

    def held(self) -> torch.Tensor:
        return self.valid.sum(-1)

    def slots(self, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self._length
        return self._valid[:, head, :n], self._pos[:, head, :n], self._types[:, head, :n]

    def head_kv(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._length
        return self._k[:, head, :n], self._v[:, head, :n]

    def mask(self, q: int, seen: int) -> torch.Tensor | None:
        """The engine's per-slot mask of the last ``q`` of ``seen`` columns over this layout's slots (``None`` without
        reading ``valid`` when one query meets a layout known to be :attr:`full`)."""
        if q == 1 and self._full:
            return None
        mask = slot_mask(self.valid, self.positions, q, seen, self.window)
        if mask is None:  # slot_mask found every slot valid: remember it until the next drop or padding
            self._full = True
        return mask

    def attend(self, query: torch.Tensor, seen: int, scaling: float, eager: bool) -> torch.Tensor:
        mask = self.mask(query.shape[2], seen)
        return grouped_attention(query, self.keys, self.values, mask, scaling, eager, self.logit_bias)

    def nbytes(self) -> int:
        # the buffers' storage, which outgrows the tensors while a sliding window's dropped front is still held
        return self._k.untyped_storage().nbytes() + self._v.untyped_storage().nbytes()

    def slot_nbytes(self) -> int:
        b, h = self._k.shape[:2]
        return b * h * (self._k.shape[-1] * self._k.element_size() + self._v.shape[-1] * self._v.element_size())

    def meta_nbytes(self) -> int:
        extra = sum(t.nbytes for t in self._state.values())
        return self._valid.nbytes + self._pos.nbytes + self._types.nbytes + extra
