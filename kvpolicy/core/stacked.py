"""A group's decode bookkeeping as one call for all of its layers, where the policy's parts allow it.

The engine runs every policy layer's decode drop, and the writes that prepare every layer's slot for the step's new
token, back to back at one layer of the step (``PolicyLayer.begin_early``, ``finish_step``). :class:`StackedDrops`
collects those calls instead of running them one by one, and when the layers agree — a full layout of the same
length in every layer, the same budget decision (one entry per row, or none), a decode scorer and reducer that say
their results do not depend on which layer they score (``stack_layers``, see
:class:`~kvpolicy.core.policy.DecodeScorer`) — it runs them once over the layers stacked along the batch axis: one
:class:`StackedView` (layer ``l``'s row ``b`` is row ``l * B + b``), one ``observe``, one ``drop_scores``, one victim
search and one write per per-slot tensor, on the layers' :class:`~kvpolicy.core.slotpack.SlotPack`. Otherwise (other
shapes, padding, a sliding window, several drops, a part that does not say so) each call runs as collected. Either
way each layer ends with exactly the entries, ranks and slots its own call would have given it
(``tests/test_stacked_decode.py``).

Why: at a small budget a compressed layer's bookkeeping is a few dozen tensor operations that each cost mostly the
fixed price of an operator call (about 0.1 ms per layer on SmolLM2-135M, 5-8% of a step at B = 410); stacked, the
group pays that price once per step instead of once per layer (docs/performance.md, "Decode at budget B").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .droprule import DropRule
from .partcheck import PartError, check_scores
from .policy import CachePolicy, LayerView
from .slotpack import SlotPack
from .storage import PaddedStorage

__all__ = ["StackedDrops", "StackedView", "stacks_layers"]


def stacks_layers(policy: CachePolicy) -> bool:
    """Whether ``policy``'s decode scorer, and its reducer's ``on_drop`` if it has one, may score several layers as
    one view (their ``stack_layers`` attribute is true)."""
    if policy.decode is None or not getattr(policy.decode, "stack_layers", False):
        return False
    return getattr(policy.reducer, "on_drop", None) is None or bool(getattr(policy.reducer, "stack_layers", False))


def _lazy(name: str) -> property:
    """A :class:`StackedView` field made on first read by the view's provider for it (see there)."""

    def get(self: StackedView) -> Any:
        found = self.__dict__
        if name not in found:
            found[name] = found["lazy"][name]()
        return found[name]

    def put(self: StackedView, value: Any) -> None:
        if value is not None or name not in self.__dict__["lazy"]:  # ``None``: leave it to the provider
            self.__dict__[name] = value

    return property(get, put)


class StackedView(LayerView):
    """A :class:`LayerView` of several layers stacked along the batch axis (``L * B`` rows).

    ``lazy`` maps field names (``keys``, ``values``, ``n_tokens``, ``prefill_kept``) to functions that make them:
    such a field passed as ``None`` is made on first read only (the keys, one copy of every layer's, are read by few
    decode scorers; the counts by some). Only for layouts that are full: :meth:`held` is the slot count."""

    keys = _lazy("keys")
    values = _lazy("values")
    n_tokens = _lazy("n_tokens")
    prefill_kept = _lazy("prefill_kept")

    def __init__(self, *args: Any, lazy: dict[str, Callable[[], Any]] | None = None, **fields: Any):
        self.__dict__["lazy"] = lazy or {}
        super().__init__(*args, **fields)

    def held(self) -> torch.Tensor:
        held = self.__dict__.get("_held")
        if held is None:
            held = torch.full(self.valid.shape[:2], self.valid.shape[2], device=self.valid.device)
            self.__dict__["_held"] = held
        return held

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def num_heads(self) -> int:
        return self.valid.shape[1]

    @property
    def num_slots(self) -> int:
        return self.valid.shape[2]


class DropSource(Protocol):
    """What :class:`StackedDrops` reads of a layer whose drop it runs (a :class:`~kvpolicy.core.layer.PolicyLayer`)."""

    layer_idx: int
    num_layers: int
    seen: int
    n_tokens: torch.Tensor
    prefill_keep: torch.Tensor | None
    prefill_kept: torch.Tensor | None

    def view(self, stage: str, attention: dict | None = None, queries: dict | None = None) -> LayerView: ...

    def uncompressed(self) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class _Drop:
    """One layer's :meth:`DropRule.drop` call, collected (its view is made only if it runs on its own)."""

    layer: DropSource
    rule: DropRule
    storage: PaddedStorage
    incoming: int
    attention: dict
    queries: dict | None
    refill: bool

    def view(self) -> LayerView:
        return self.layer.view("decode", self.attention, self.queries)

    def run(self) -> None:
        layer = self.layer
        self.rule.drop(self.storage, self.view(), self.incoming, layer.prefill_keep, layer.uncompressed, self.refill)


class StackedDrops:
    """Collects a group's decode drops and slot preparations (:meth:`collecting`) and runs them stacked where it
    can, one by one where it cannot. One per group of policy layers (the layers of one cache); outside
    :meth:`collecting`, and for a policy whose parts do not stack (:func:`stacks_layers`), it calls through."""

    def __init__(self, policy: CachePolicy):
        self.policy = policy
        self.enabled = stacks_layers(policy)
        self.pack = SlotPack()
        self._drops: list[_Drop] | None = None
        self._prepares: list[tuple[PaddedStorage, int, int, int]] | None = None
        #: the stacked view's ``layer_state`` (a stacking part may cache what it derives from the view there)
        self._layer_state: dict[str, Any] = {}
        self._kept: tuple[list[torch.Tensor], torch.Tensor] | None = None
        #: steps whose drops / preparations ran stacked (the tests check that the path is taken)
        self.stacked_steps = {"drop": 0, "prepare": 0}

    # ------------------------------------------------------------------ collecting
    @contextmanager
    def collecting(self, active: bool = True) -> Iterator[None]:
        """Collect the drops and preparations of the block, then run them (drops first, then preparations, each in
        the order collected: the layers are independent, and within a layer the drop still comes first). Nested or
        inactive: calls run as they come."""
        if not active or not self.enabled or self._drops is not None:
            yield
            return
        self._drops, self._prepares = [], []
        try:
            yield
        finally:
            drops, prepares = self._drops, self._prepares
            self._drops = self._prepares = None
        self._run(drops, prepares or [])

    def drop(
        self, layer: DropSource, rule: DropRule, storage: PaddedStorage, incoming: int, attention: dict | None = None,
        queries: dict | None = None, refill: bool = False,
    ) -> None:
        """``layer``'s decode drop (:meth:`DropRule.drop` on its ``storage``, a view with the step's ``attention`` and
        ``queries``), now or (while collecting) when the block ends."""
        call = _Drop(layer, rule, storage, incoming, attention or {}, queries, refill)
        if self._drops is None:
            call.run()
        else:
            self._drops.append(call)

    def prepare(self, storage: PaddedStorage, col: int, token_type: int, slack: int) -> None:
        """:meth:`PaddedStorage.prepare`, now or (while collecting) after the block's drops."""
        if self._prepares is None:
            storage.prepare(col, token_type, slack)
        else:
            self._prepares.append((storage, col, token_type, slack))

    def _run(self, drops: list[_Drop], prepares: list[tuple[PaddedStorage, int, int, int]]) -> None:
        if not (len(drops) > 1 and self._drop_stacked(drops)):
            for call in drops:
                call.run()
        if not (len(prepares) > 1 and self._prepare_stacked(prepares)):
            for storage, col, token_type, slack in prepares:
                storage.prepare(col, token_type, slack)

    # ------------------------------------------------------------------ stacked
    def _uniform_excess(self, drops: list[_Drop]) -> int | None:
        """The entries every row of every layer drops now, when that is one number, 0 or 1, and the layers are alike
        (full layouts of one length, one step, one budget); ``None`` otherwise. The layers' token counts are read
        with one operator call, and the rule computed once when they agree (they do, unless rows were edited)."""
        first = drops[0]
        length, seen, new = first.storage.length, first.layer.seen, first.storage.new_count
        windows = first.attention.keys()
        counts, budgets = [], []
        for call in drops:
            storage, layer = call.storage, call.layer
            if call.incoming != first.incoming or call.refill != first.refill or storage.length != length:
                return None
            if layer.seen != seen or storage.new_count != new or call.queries or call.attention.keys() != windows:
                return None
            if not call.rule.on_numbers(storage, layer.prefill_keep):
                return None
            tokens, appended = layer.uncompressed()
            counts.append(tokens)
            budgets.append(call.rule.row_budget(layer.prefill_keep, appended))  # type: ignore[arg-type]
        rows = torch.stack(counts).tolist()
        if any(r != rows[0] for r in rows) or any(b != budgets[0] for b in budgets):
            return None
        excess = first.rule.excess_rows(length + first.incoming, rows[0], *budgets[0])
        if not excess or min(excess) != max(excess) or excess[0] > min(1, length):
            return None
        return excess[0]

    def _drop_stacked(self, drops: list[_Drop]) -> bool:
        k = self._uniform_excess(drops)
        storages = [call.storage for call in drops]
        if k is None or not self.pack.covering(storages):
            return False
        length = storages[0].length
        view = self._view(drops, length)
        decode = self.policy.decode
        observe = getattr(decode, "observe", None)
        if observe is not None:
            observe(view)
        self.stacked_steps["drop"] += 1
        if k == 0:
            return True
        rule = drops[0].rule
        view.excess = rule.filled((view.batch_size, view.num_heads), 1)
        scores = self._checked(decode.drop_scores(view), view, drops)  # type: ignore[union-attr]
        victims, _, merged = rule.choose(view, scores, view.excess, 1, True, True)
        if merged is not None:
            b = storages[0].valid.shape[0]
            for i, storage in enumerate(storages):
                storage.write_kv(merged[0][i * b : (i + 1) * b], merged[1][i * b : (i + 1) * b])
        self.pack.free_one(victims, length, drops[0].refill)
        return True

    def _checked(self, scores: Any, view: StackedView, drops: list[_Drop]) -> torch.Tensor:
        """:func:`check_scores` of the stacked scores; a failure names the layer whose rows fail."""
        try:
            return check_scores(self.policy, "decode", scores, view, what="drop scores")
        except PartError:
            b = drops[0].storage.valid.shape[0]
            if isinstance(scores, torch.Tensor) and scores.dim() == 3 and scores.shape[0] == b * len(drops):
                for i, call in enumerate(drops):
                    check_scores(self.policy, "decode", scores[i * b : (i + 1) * b], call.view(), what="drop scores")
            raise

    def _view(self, drops: list[_Drop], length: int) -> StackedView:
        first = drops[0].layer
        used = self.pack.used(length)
        storages = [call.storage for call in drops]
        lazy = {
            "keys": lambda: torch.cat([s.keys for s in storages]),
            "values": lambda: torch.cat([s.values for s in storages]),
            "n_tokens": lambda: torch.cat([call.layer.n_tokens for call in drops]),
            "prefill_kept": lambda: self._prefill_kept([call.layer.prefill_kept for call in drops]),
        }
        return StackedView(
            lazy=lazy, layer_idx=first.layer_idx, num_layers=first.num_layers, stage="decode", keys=None, values=None,
            valid=used["valid"], positions=used["pos"], seen=first.seen, n_tokens=None,
            new_tokens=drops[0].storage.new_count, token_types=used["types"],
            attention={w: torch.cat([call.attention[w] for call in drops]) for w in drops[0].attention},
            slot_state={n[6:]: t for n, t in used.items() if n.startswith("state:")}, layer_state=self._layer_state,
            prefill_kept=None, sinks=self.policy.sinks or 0, rank_source=self._rank_for,
        )

    def _rank_for(self, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The pack's kept rank for a stacked view of its used slots (anything else sorts)."""
        used = self.pack.used(valid.shape[-1])
        return used["rank"] if valid is used["valid"] and positions is used["pos"] else None

    def _prefill_kept(self, kept: list[torch.Tensor | None]) -> torch.Tensor | None:
        """The layers' ``prefill_kept`` stacked, made again only when one of them is a new tensor (a prefill, a row
        selection): a part may key what it derives from it on the tensor itself."""
        if any(t is None for t in kept):
            return None
        cached = self._kept
        if cached is None or len(cached[0]) != len(kept) or any(a is not b for a, b in zip(cached[0], kept)):
            cached = self._kept = (kept, torch.cat(kept))  # type: ignore[arg-type]
        return cached[1]

    def _prepare_stacked(self, prepares: list[tuple[PaddedStorage, int, int, int]]) -> bool:
        storages = [p[0] for p in prepares]
        _, col, token_type, _ = prepares[0]
        if any(p[1] != col or p[2] != token_type for p in prepares) or not isinstance(col, int):
            return False
        if not self.pack.covers(storages):
            return False
        length = storages[0].length
        done = self.pack.prepare_holes(col, token_type) or self.pack.prepare_end(length, col, token_type)
        self.stacked_steps["prepare"] += done
        return done
