"""The decode-stage budget rule of one policy layer: how many entries go now, which, and freeing them.

A decode step of a compressed layer runs it once per layer (inside the update, or after the step's attention when
the decode scorer needs the step's statistics, :mod:`kvpolicy.core.layer`). It is apart from the layer's stage
machine because a decode step's cost at a small budget is mostly this rule's small tensor operations: where the
layout is known to be full (every used slot valid, the common case of a batch without padding) the count runs on
Python numbers and the victims are freed without a mask, and the constant tensors it needs are made once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .partcheck import check_merge, check_scores
from .policy import CachePolicy, LayerView
from .selection import lowest_slot, ranked_slots
from .storage import PaddedStorage

__all__ = ["DropRule"]

#: ``(uncompressed tokens, appended)`` int64 ``[B]`` each: what the budget rule is a fraction of (the layer's
#: :meth:`~kvpolicy.core.layer.PolicyLayer.uncompressed`)
Counts = Callable[[], tuple[torch.Tensor, torch.Tensor]]


class DropRule:
    """The decode budget rule of one layer of ``policy`` (``windowed``: a sliding-window layer, whose uncompressed
    count is its window's and changes every step)."""

    def __init__(self, policy: CachePolicy, device: torch.device, windowed: bool):
        self.policy = policy
        self.device = device
        self.windowed = windowed
        #: small read-only tensors a decode step would otherwise rebuild in every layer (see :meth:`filled`)
        self._constants: dict[Any, torch.Tensor] = {}
        #: ``(prefill keep, appended)`` as Python lists, for the rule of a full layout (see :meth:`excess`)
        self._row_budget: tuple[list[int], list[int]] | None = None

    def forget_rows(self) -> None:
        """The rows' budgets changed (a prefill, an appended chunk, a row selection): read them again."""
        self._row_budget = None

    def filled(self, shape: tuple[int, ...], value: int | bool) -> torch.Tensor:
        """int64 (bool for a bool ``value``) ``shape`` filled with ``value``, made once: read-only."""
        key = (shape, value, type(value))
        t = self._constants.get(key)
        if t is None:
            dtype = torch.bool if isinstance(value, bool) else torch.long
            t = self._constants[key] = torch.full(shape, value, dtype=dtype, device=self.device)
        return t

    def drop(
        self,
        storage: PaddedStorage,
        view: LayerView,
        incoming: int,
        keep: torch.Tensor | None,
        counts: Counts,
        refill: bool = False,
    ) -> None:
        """Free the lowest-scored slots the rule removes now (``incoming`` tokens are about to be written and count
        toward the budget; ``keep``: the layer's prefill budget; ``refill``: the storage prepares a one-token write
        right after, see :meth:`~kvpolicy.core.storage.PaddedStorage.free`)."""
        decode = self.policy.decode
        if decode is None:
            return
        observe = getattr(decode, "observe", None)
        if observe is not None:
            observe(view)
        excess, k_max, every = self.excess(storage, view, incoming, keep, counts)
        if excess is None:
            return
        view.excess = excess
        victims, ok, merged = self.choose(view, self.scores(view), excess, k_max, every, storage.full)
        if merged is not None:
            storage.write_kv(*merged)
        storage.free(victims, ok, refill)

    def scores(self, view: LayerView) -> torch.Tensor:
        """The decode scorer's drop scores of ``view``, checked (:func:`~kvpolicy.core.partcheck.check_scores`)."""
        return check_scores(self.policy, "decode", self.policy.decode.drop_scores(view), view, what="drop scores")

    def choose(
        self, view: LayerView, scores: torch.Tensor, excess: torch.Tensor, k_max: int, every: bool, full: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """The victims of ``excess`` (int64 ``[B, H]``, ``view.excess``, at most ``k_max``; ``every``: each row and
        head drops exactly ``k_max``; ``full``: every slot is valid) by ``scores`` (:meth:`scores`):
        ``(victims [B, H, k_max], ok, merged)`` with ``ok`` the victims to free (``None``: all) and ``merged`` the
        keys and values a reducer's ``on_drop`` merged them into (or ``None``)."""
        if k_max == 1:
            victims = lowest_slot(view, scores, checked=True, full=full)
        else:
            victims = ranked_slots(view, -scores.to(torch.float32))[..., :k_max]
        # every row and head of a full layout drops k_max: each victim is a valid slot, nothing to mask
        ok = None if every else (torch.arange(k_max, device=self.device) < excess[..., None]) & view.valid.gather(
            2, victims
        )
        on_drop = getattr(self.policy.reducer, "on_drop", None)
        merged = None
        if on_drop is not None:
            merged = on_drop(view, victims, self.filled(tuple(victims.shape), True) if ok is None else ok)
            if merged is not None:
                merged = check_merge(self.policy, merged, view)
        return victims, ok, merged

    def excess(
        self, storage: PaddedStorage, view: LayerView, incoming: int, keep: torch.Tensor | None, counts: Counts
    ) -> tuple[torch.Tensor | None, int, bool]:
        """Entries the budget rule drops now: int64 ``[B, H]`` (``None`` when nothing goes), the largest count, and
        whether every row and head drops exactly that many from a full layout.

        When the layout of a global layer is full (every row and head holds ``length`` entries,
        :attr:`PaddedStorage.full`) the rule runs on Python numbers, one per row
        (:meth:`~kvpolicy.core.budget.Budget.decode_excess_rows`): no tensor is read or made unless something goes.
        Otherwise (and in a sliding layer) it runs on the held counts."""
        rows = self.rows_excess(storage, incoming, keep, counts)
        if rows is not None:
            k_max = max(rows, default=0)
            if k_max == 0:
                return None, 0, True
            b, h = view.valid.shape[:2]
            if min(rows) == k_max and k_max <= storage.length:
                return self.filled((b, h), k_max), k_max, True
            return torch.tensor(rows, device=self.device)[:, None].expand(b, h), k_max, False
        tokens, appended = counts()
        budget = self.policy.budget
        excess = budget.decode_excess(view.held() + incoming, tokens, keep, appended)  # type: ignore[arg-type]
        k_max = int(excess.max()) if excess.numel() else 0
        return (excess if k_max > 0 else None), k_max, False

    def rows_excess(
        self, storage: PaddedStorage, incoming: int, keep: torch.Tensor | None, counts: Counts
    ) -> list[int] | None:
        """Entries the budget rule drops now from each row, the same for every head, computed on Python numbers
        (:meth:`~kvpolicy.core.budget.Budget.decode_excess_rows`) where the layout of a global layer is full (every
        row and head holds ``length`` entries, :attr:`PaddedStorage.full`): no tensor is read or made. ``None``
        elsewhere (and in a sliding layer), where the rule must run on the held counts."""
        if not self.on_numbers(storage, keep):
            return None
        tokens, appended = counts()
        return self.excess_rows(storage.length + incoming, tokens.tolist(), *self.row_budget(keep, appended))

    def on_numbers(self, storage: PaddedStorage, keep: torch.Tensor | None) -> bool:
        """Whether the rule runs on Python numbers now (:meth:`rows_excess`): a full layout of a global layer."""
        return not self.windowed and storage.full and keep is not None and keep.dim() == 1

    def row_budget(self, keep: torch.Tensor, appended: torch.Tensor) -> tuple[list[int], list[int]]:
        """``(prefill keep, appended)`` per row as Python lists, read once until :meth:`forget_rows`."""
        if self._row_budget is None:
            self._row_budget = (keep.tolist(), appended.tolist())
        return self._row_budget

    def excess_rows(self, held: int, tokens: list[int], keep: list[int], appended: list[int]) -> list[int]:
        """:meth:`~kvpolicy.core.budget.Budget.decode_excess_rows` of this rule's budget."""
        return self.policy.budget.decode_excess_rows(held, tokens, keep, appended)
