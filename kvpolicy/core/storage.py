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
from .policy import Reduction

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
        #: int64 ``[B, H, q]``: the slots written by the current step (``None`` right after a reduction)
        self.new_slots: torch.Tensor | None = None

    # ------------------------------------------------------------------ read-only views of the used slots
    @property
    def length(self) -> int:
        return self._length

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, : self._length]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, : self._length]

    @property
    def valid(self) -> torch.Tensor:
        """bool ``[B, H, P]``: the slot holds a real token."""
        return self._valid[:, :, : self._length]

    @property
    def positions(self) -> torch.Tensor:
        """int64 ``[B, H, P]``: logical column of each slot."""
        return self._pos[:, :, : self._length]

    @property
    def token_types(self) -> torch.Tensor:
        """int8 ``[B, H, P]``: TEXT / IMAGE / GENERATED per slot."""
        return self._types[:, :, : self._length]

    @property
    def slot_state(self) -> dict[str, torch.Tensor]:
        """Per-slot state ``[B, H, P]`` a decode scorer keeps, by name (a new dict of views)."""
        return {k: v[:, :, : self._length] for k, v in self._state.items()}

    @property
    def has_slot_state(self) -> bool:
        return bool(self._state)

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def set_slot_state(self, name: str, value: torch.Tensor) -> None:
        """Start a per-slot state ``[B, H, P]`` (kept aligned with the slots from now on; new slots start at 0)."""
        self._state[name] = value

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

    def append(self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, types: torch.Tensor, slack: int) -> None:
        """One token into each row's first free slot once slots are unordered, else at the end."""
        if k.shape[2] == 1 and not self.pristine:
            self._append_into_free(k, v, cols, types)
        else:
            self._append_at_end(k, v, cols, types, slack)

    def _append_at_end(self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, types: torch.Tensor, slack: int):
        q = k.shape[2]
        start = self._length
        self._reserve(start + q, slack)
        self._k[:, :, start : start + q] = k
        self._v[:, :, start : start + q] = v
        self._valid[:, :, start : start + q] = True
        self._pos[:, :, start : start + q] = cols
        self._types[:, :, start : start + q] = types
        for t in self._state.values():
            t[:, :, start : start + q] = 0
        self._length = start + q
        b, h = k.shape[:2]
        self.new_slots = torch.arange(start, start + q, device=k.device).expand(b, h, q)

    def _append_into_free(self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, types: torch.Tensor) -> None:
        """One new token per row, written into the row's first free slot (grows by one only if a row has none)."""
        free = ~self._valid[:, :, : self._length]
        has_free = free.any(-1)
        slot = torch.where(has_free, free.to(torch.int8).argmax(-1), self._length)  # [B, H]
        if not bool(has_free.all()):
            self._reserve(self._length + 1, growth(self._length))
            self._valid[:, :, self._length] = False
            self._length += 1
        idx = slot[..., None]
        d_idx = idx[..., None]
        self._k.scatter_(2, d_idx.expand(*idx.shape, self._k.shape[-1]), k)
        self._v.scatter_(2, d_idx.expand(*idx.shape, self._v.shape[-1]), v)
        self._valid.scatter_(2, idx, True)
        self._pos.scatter_(2, idx, cols.view(1, 1, 1).expand_as(idx))
        self._types.scatter_(2, idx, types.view(1, 1, 1).expand_as(idx).to(torch.int8))
        for t in self._state.values():
            t.scatter_(2, idx, 0)
        self.new_slots = idx

    def invalidate_new(self, new_valid: torch.Tensor) -> None:
        slots = self.new_slots
        cur = self._valid.gather(2, slots)
        self._valid.scatter_(2, slots, cur & new_valid[:, None, :])

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
        self._length = idx.shape[-1]
        self.pristine = False
        self.new_slots = None

    def write_kv(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the used slots' keys and values (a reducer merged dropped entries into their neighbours)."""
        n = self._length
        self._k[:, :, :n], self._v[:, :, :n] = keys, values

    def free(self, victims: torch.Tensor, ok: torch.Tensor) -> None:
        """Free slots ``victims`` (int64 ``[B, H, k]``) where ``ok``: a later token may overwrite them."""
        cur = self._valid.gather(2, victims)
        self._valid.scatter_(2, victims, cur & ~ok)
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
        if self.new_slots is not None:  # a pristine layout's new tokens are its last slots: those that remain
            b, h, q = self.new_slots.shape
            left = min(q, n - k)
            self.new_slots = torch.arange(n - k - left, n - k, device=self._k.device).expand(b, h, left)
        return k

    def select_rows(self, index: torch.Tensor) -> None:
        self._k, self._v = self._k[index], self._v[index]
        self._valid, self._pos, self._types = self._valid[index], self._pos[index], self._types[index]
        self._state = {k: v[index] for k, v in self._state.items()}

    # ------------------------------------------------------------------ reads
    def held(self) -> torch.Tensor:
        return self.valid.sum(-1)

    def slots(self, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self._length
        return self._valid[:, head, :n], self._pos[:, head, :n], self._types[:, head, :n]

    def head_kv(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._length
        return self._k[:, head, :n], self._v[:, head, :n]

    def mask(self, q: int, seen: int) -> torch.Tensor | None:
        """The engine's per-slot mask of the last ``q`` of ``seen`` columns over this layout's slots."""
        return slot_mask(self.valid, self.positions, q, seen, self.window)

    def attend(self, query: torch.Tensor, seen: int, scaling: float, eager: bool) -> torch.Tensor:
        return grouped_attention(query, self.keys, self.values, self.mask(query.shape[2], seen), scaling, eager)

    def nbytes(self) -> int:
        # the buffers' storage, which outgrows the tensors while a sliding window's dropped front is still held
        return self._k.untyped_storage().nbytes() + self._v.untyped_storage().nbytes()

    def slot_nbytes(self) -> int:
        b, h = self._k.shape[:2]
        return b * h * (self._k.shape[-1] * self._k.element_size() + self._v.shape[-1] * self._v.element_size())

    def meta_nbytes(self) -> int:
        extra = sum(t.nbytes for t in self._state.values())
        return self._valid.nbytes + self._pos.nbytes + self._types.nbytes + extra
