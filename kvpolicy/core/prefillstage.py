"""The prefill stage of a policy layer: its budget, and the compression right after the layer's attention — or at the
end of the prefill forward, when the policy needs every layer first.

:class:`PrefillStage` is the part of :class:`~kvpolicy.core.layer.PolicyLayer` that runs the policy's prefill stage
(kept in its own module; the layer's storage, transformers' interface and the decode stage are in
:mod:`kvpolicy.core.layer`). After the layer's prefill attention (``finish_step``) the budget and the allocator fix how
many entries each row keeps (:meth:`PrefillStage.prefill_drops` tells the attention function beforehand whether any
entry goes), a sliding layer's window rule frees what the prompt's last query could not see, and the encode scorer and
the reducer compress what is left.

**Waiting.** A policy that declares a probe (:class:`~kvpolicy.core.policy.ProbeStat`, KVzip) or whose allocator
divides one budget across layers (``rebalance``) cannot compress a layer right after its attention: the probe runs
after the whole forward, and one budget needs every layer's scores. Every layer then *waits* (``waiting``), holding its
prompt and the statistics its attention produced; the cache runs the probe through it if some layer will drop entries
(:meth:`PrefillStage.finish_probe` after each chunk's attention) and finishes the stage
(:meth:`PrefillStage.prepare_waiting`, :meth:`PrefillStage.waiting_scores` for the allocator, then
:meth:`PrefillStage.compress_waiting`), see :meth:`~kvpolicy.core.cache.PolicyCache.compress_deferred`.
"""

from __future__ import annotations

from typing import Any

import torch

from .buckets import bucketed_if_uneven
from .partcheck import check_keep, check_reduction, check_scores, check_state
from .policy import ProbeStat
from .probe import LayerProbe

__all__ = ["PrefillStage"]


class PrefillStage:
    """Mixin of :class:`~kvpolicy.core.layer.PolicyLayer`: the prefill stage (its state is set by the layer's
    ``lazy_initialization``; the window rule and the views are the layer's)."""

    probe: LayerProbe
    waiting: bool
    window: Any
    seen: int
    policy: Any
    _pending: str | None
    _planned_keep: torch.Tensor | None
    _waiting_stats: tuple[dict, dict, dict]

    def _prefill_budget(self) -> torch.Tensor:
        """Entries this layer keeps after prefill (budget, then the allocator), computed once per prefill: the
        attention function asks for it before the outputs (:meth:`prefill_drops`) and the prefill stage after."""
        if self._planned_keep is None:
            policy = self.policy
            n = self.uncompressed()[0]
            keep = policy.budget.prefill_keep(n)
            if policy.allocator is not None:
                given = keep
                keep = policy.allocator.layer_keep(self.layer_idx, self.num_layers, keep, n)
                keep = check_keep(policy, keep, given, self.layer_idx)
            self._planned_keep = keep
        return self._planned_keep

    def plan_prefill_keep(self, keep: torch.Tensor) -> None:
        """Fix the entries this layer keeps after the pending prefill (int64 ``[B]``), in place of the budget and the
        allocator's per-layer rule: a whole-model allocation (``BudgetAllocator.model_keep``), which only a replay
        can make, since it needs every layer's prefill before any layer is compressed."""
        if self._pending != "prefill":
            raise RuntimeError(f"layer {self.layer_idx}: a prefill keep is planned while no prefill is pending")
        given = self.policy.budget.prefill_keep(self.n_tokens)
        self._planned_keep = check_keep(self.policy, keep, given, self.layer_idx)

    def prefill_drops(self) -> bool:
        """Whether the pending prefill compression removes entries. When it does and the attention function has no
        exact route (SDPA's own outputs and log-sum-exp, :mod:`kvpolicy.core.sdpa`; e.g. eager attention), the
        layer's outputs need not be bit-identical to transformers' own attention (the cache changes anyway), so it
        may compute outputs and statistics in one pass; when it does not (ratio 0), the plain path keeps the run
        identical to the full cache."""
        return self._pending == "prefill" and self._drops()

    def _drops(self) -> bool:
        if self.policy.encode is None:
            return False
        held = self.held().amin(-1) if self.window is None else self.uncompressed()[0]  # a window's expiry is no drop
        return bool((self._prefill_budget() < held).any())

    def _finish_prefill(self, attention: dict, queries: dict | None = None) -> None:
        if self.policy.defers_prefill():
            self.waiting = True  # the stage runs once the forward (and the probe) has gone through every layer
            self._waiting_stats = (attention, queries or {}, {})
            return
        self._compress_prefill(attention, queries)

    def _window_first(self, attention: dict, probe: dict) -> tuple[dict, dict]:
        """A sliding layer's window rule before its prefill stage (the policy compresses what the prompt's last query
        could see); the statistics ``[..., P]`` lose the slots it removed from the front."""
        if self.window is None:
            return attention, probe
        gone = self._expire(self.seen - self.window.size)
        if not gone:
            return attention, probe
        return {w: a[..., gone:] for w, a in attention.items()}, {n: t[..., gone:] for n, t in probe.items()}

    def _compress_prefill(
        self,
        attention: dict,
        queries: dict | None = None,
        probe: dict | None = None,
        keep: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> None:
        policy = self.policy
        storage = self._padded()
        self.prefilled = True
        attention, probe = self._window_first(attention, probe or {})
        keep = self._prefill_budget() if keep is None else keep
        self._planned_keep = None
        self.prefill_keep = keep
        self._rule.forget_rows()
        view = self.view("prefill", attention, queries, probe)
        view.keep = keep
        init_state = getattr(policy.decode, "init_state", None)
        if init_state is not None:
            for name, t in check_state(policy, init_state(view), view).items():
                storage.set_slot_state(name, t.to(torch.float32).expand_as(view.valid).clone())
        if policy.encode is not None and bool((keep < view.held().amin(-1)).any()):
            if scores is None:
                scores = check_scores(policy, "encode", policy.encode.score(view), view)
            storage.compact(check_reduction(policy, policy.reducer.reduce(view, scores, keep), view))
            if policy.decode is None and not storage.has_slot_state and self.window is None:
                # no stage left: the layout is chosen once (a sliding layer keeps freeing slots: it stays padded)
                self.storage = bucketed_if_uneven(storage)
        self.prefill_kept = self.held()
        after = getattr(policy.decode, "after_prefill", None)
        if after is not None:
            after(self.view("decode"))

    # ------------------------------------------------------------------ waiting for the end of the forward
    def prepare_waiting(self, probe: dict[ProbeStat, torch.Tensor]) -> None:
        """Take the probe's statistics for the waiting prefill stage, after a sliding layer's window rule, which
        comes first (every statistic loses the slots it removed)."""
        attention, queries, _ = self._waiting_stats
        attention, probe = self._window_first(attention, probe)
        self._waiting_stats = (attention, queries, probe)

    def waiting_drops(self) -> bool:
        """Whether the waiting prefill stage removes entries (the probe runs only when some layer's does)."""
        return self.waiting and self._drops()

    def waiting_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep [B], encode scores [B, H or 1, P])`` of the waiting prefill stage (after :meth:`prepare_waiting`),
        for an allocator that divides one budget across layers (``rebalance``) before any layer compresses."""
        attention, queries, probe = self._waiting_stats
        keep = self._prefill_budget()
        view = self.view("prefill", attention, queries, probe)
        view.keep = keep
        return keep, check_scores(self.policy, "encode", self.policy.encode.score(view), view)  # type: ignore[union-attr]

    def compress_waiting(self, keep: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> None:
        """Run the prefill stage that waited (after :meth:`prepare_waiting`); ``keep`` and ``scores``: this layer's
        budget and encode scores when an allocator re-divided the budget."""
        if not self.waiting:
            return
        self.waiting = False
        attention, queries, probe = self._waiting_stats
        self._waiting_stats = ({}, {}, {})
        self._compress_prefill(attention, queries, probe, keep, scores)
        self._sync()

    def finish_probe(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """After a probe chunk's attention (``key``: the prompt's slots, then the chunk's): record its statistic."""
        self._pending = None
        self.probe.fold(query, key, self.valid, scaling)

    def stop_probe(self) -> dict[ProbeStat, torch.Tensor]:
        """End the probe pass; returns this layer's statistics (empty when it was not scoring)."""
        self._pending = None
        return self.probe.stop()
