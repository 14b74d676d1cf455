"""What a cache policy is made of: the contract between the engine and a plugin.

A :class:`CachePolicy` has two stages and three parts:

* an **encode scorer** ranks the prompt's cache entries once, at the end of prefill;
* a **decode scorer** picks what to drop while generating;
* a **reducer** turns scores and a budget into the new keys/values (evict, or merge into anchors).

Parts never touch the cache or the model. Each call receives a read-only :class:`LayerView` (one layer, one step)
and returns tensors; the engine (:mod:`kvpolicy.core.layer`) owns the memory. A part *declares* the statistics it needs
(:class:`AttentionStat`), so the engine computes only those.

Shapes used throughout: ``B`` batch rows, ``H`` kv heads (never query heads), ``P`` physical cache slots, ``D`` head
dim. Slots are not ordered by position: a slot's logical position is ``view.positions``; ``view.valid`` says which
slots hold a real token (pads, freed slots and per-row padding are invalid). A part's scores may have a head axis of
size 1, meaning "one decision shared by all kv heads of the row".

How much survives (:class:`~kvpolicy.core.budget.Budget`, :class:`~kvpolicy.core.budget.BudgetAllocator`) lives in
:mod:`kvpolicy.core.budget` and is re-exported here, so the contract stays importable from one module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from .budget import Budget, BudgetAllocator

__all__ = [
    "GENERATED",
    "IMAGE",
    "LOGIT_BIAS",
    "TEXT",
    "AttentionStat",
    "Budget",
    "BudgetAllocator",
    "CachePolicy",
    "DecodeScorer",
    "EncodeScorer",
    "LayerView",
    "ModelView",
    "Need",
    "Probe",
    "ProbeChunk",
    "ProbeStat",
    "QueryStat",
    "Reducer",
    "Reduction",
    "Stage",
    "part_sinks",
]

Stage = Literal["prefill", "decode"]

#: Token-type codes used in :attr:`LayerView.token_types` (modality spans).
TEXT, IMAGE, GENERATED = 0, 1, 2

#: the per-slot state (``view.slot_state``) holding a layer's logit bias, set through :attr:`Reduction.logit_bias`
LOGIT_BIAS = "logit_bias"


@dataclass(frozen=True)
class AttentionStat:
    """A statistic a part needs: the attention each cached key *receives*.

    The engine sums the softmax attention of the last ``window`` queries of the current forward pass onto every cache
    slot (``None``: every query of the forward — at prefill, the whole prompt), averages over the query heads of each kv
    head, and exposes it as ``view.attention[window]`` with shape ``[B, H, P]`` in float32. Pad queries contribute
    nothing and pad keys receive nothing. It is computed in query chunks, so the ``[heads, n, n]`` matrix is never
    materialised.
    """

    window: int | None = None


@dataclass(frozen=True)
class QueryStat:
    """A statistic a part needs: the distribution of the *queries* of the current forward, before RoPE.

    The engine un-rotates each query at its own RoPE position and returns, per layer, kv head and query head of its
    group, the mean (and, with ``covariance``, the biased covariance) over the last ``window`` real queries of each
    row (``None``: every query of the forward — at prefill, the whole prompt), skipping the row's first
    ``skip_first`` real tokens (outlier sink queries). Exposed as ``view.queries[need]``, a
    :class:`~kvpolicy.core.querystats.QueryStats` (float32 mean ``[B, H, G, D]``, covariance ``[B, H, G, D, D]``).
    Pad queries never count. Memory is bounded by one chunk of queries plus the ``D x D`` sums
    (:mod:`kvpolicy.core.querystats`); a policy that declares no ``QueryStat`` pays nothing."""

    window: int | None = None
    covariance: bool = False
    skip_first: int = 0


@dataclass(frozen=True)
class ProbeChunk:
    """One forward of a probe for one row: the token ids fed after the context, and the context entries it targets.

    ``start``/``end`` index the row's real context tokens (0 = its first real token, pads never count): the probe's
    queries are scored on entries ``[start, end)`` only, with their softmax over the row's first ``sinks`` real
    entries (:attr:`ProbeStat.sinks`), entries ``[start, end)`` and the probe's own tokens (causally)."""

    ids: tuple[int, ...]
    start: int
    end: int


@runtime_checkable
class Probe(Protocol):
    """Builds a probe from one row's context (a part supplies it through :class:`ProbeStat`). Must be hashable (a
    frozen dataclass): the statistic is keyed by it.

    ``chunks(context, tokenizer)``: ``context`` is the row's real prompt token ids (left padding removed),
    ``tokenizer`` the model's (``make_cache(..., tokenizer=)``, else loaded from the model's ``name_or_path``; it
    may be ``None`` when neither exists: a probe that needs text must then say what to pass)."""

    def chunks(self, context: list[int], tokenizer: Any) -> list[ProbeChunk]: ...


@dataclass(frozen=True)
class ProbeStat:
    """A statistic a part needs: the attention a constructed input (a *probe*) pays to the prompt's entries.

    After the prompt's prefill the engine feeds each row's probe chunks (:meth:`Probe.chunks`) through the model with
    the cache, one forward per chunk: the probe attends to the whole uncompressed prompt and to itself, as ordinary
    tokens would. At every policy layer it records, for each prompt entry a chunk targets, the **largest** softmax
    probability that entry receives from the chunk's queries, over the query heads of its kv group (KVzip's
    reduction), with each query's softmax over the row's first ``sinks`` entries, the targeted entries and the
    chunk's own earlier tokens. The probe's own entries are removed after each layer's attention, so they never
    survive; every layer is compressed only once the last chunk has gone through all layers. Exposed as
    ``view.probe[need]``: float32 ``[B, H, P]`` (0 for an entry no chunk targets, and for pads).

    Memory: one chunk's keys per layer at a time, query rows in blocks (:mod:`kvpolicy.core.probe`). A policy that
    declares no ``ProbeStat`` pays nothing; with a ratio that removes nothing the probe does not run."""

    probe: Probe
    sinks: int = 0

    @property
    def window(self) -> None:
        """The probe reads every prompt entry (for cost models that read an ``AttentionStat``'s window)."""
        return None


#: what a part may list in ``needs``
Need = AttentionStat | QueryStat | ProbeStat


@dataclass
class LayerView:
    """One layer's cache at one step, as a part sees it. Tensors are the engine's: treat them as read-only."""

    layer_idx: int
    num_layers: int
    stage: Stage
    keys: torch.Tensor  #: [B, H, P, D], post-RoPE
    values: torch.Tensor  #: [B, H, P, D]
    valid: torch.Tensor  #: bool [B, H, P]
    positions: torch.Tensor  #: int64 [B, H, P], logical column of each slot in the full (padded) sequence
    seen: int  #: columns seen so far (including left padding) == transformers' ``get_seq_length()``
    n_tokens: torch.Tensor  #: int64 [B], real tokens seen per row (pads excluded)
    new_tokens: int  #: tokens added by the current forward
    token_types: torch.Tensor  #: int8 [B, H, P], TEXT / IMAGE / GENERATED per slot
    attention: dict[int | None, torch.Tensor] = field(default_factory=dict)
    #: the declared query statistics (:class:`QueryStat` -> :class:`~kvpolicy.core.querystats.QueryStats`)
    queries: dict[QueryStat, Any] = field(default_factory=dict)
    #: the declared probe statistics (:class:`ProbeStat` -> float32 ``[B, H, P]``), at the prefill after a probe
    probe: dict[ProbeStat, torch.Tensor] = field(default_factory=dict)
    slot_state: dict[str, torch.Tensor] = field(default_factory=dict)  #: per-slot tensors [B, H, P] kept by the engine
    layer_state: dict[str, Any] = field(default_factory=dict)  #: free-form, per layer, owned by the policy's parts
    prefill_kept: torch.Tensor | None = None  #: int64 [B, H], entries held right after prefill compression
    keep: torch.Tensor | None = None  #: prefill: int64 [B], entries this layer will keep per row and head
    excess: torch.Tensor | None = None  #: decode: int64 [B, H], entries the budget rule drops now
    #: the policy's protected sinks (:attr:`CachePolicy.sinks`): the first ``sinks`` real tokens of each row, which no
    #: part should drop or merge away. Stated once by the policy so that every part reads the same number.
    sinks: int = 0
    #: where :meth:`rank` comes from when the engine keeps it (``f(valid, positions) -> rank or None``): the layer's
    #: storage answers for its own ``valid``/``positions`` with a rank it keeps up to date between steps instead of
    #: sorting the slots again; ``None`` (or an answer of ``None``, e.g. for a view whose ``valid`` was replaced): sort
    rank_source: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = field(
        default=None, repr=False, compare=False
    )
    #: results of :meth:`order`, :meth:`rank` and :meth:`held`, computed once per view: several parts of one step ask
    #: for them (a scorer and its sink rule each rank the slots) and each costs a sort or a sum. Keyed by the identity
    #: of ``valid`` and ``positions``, so assigning either (tests, ``dataclasses.replace``) recomputes them.
    _memo: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _memoised(self, name: str, compute: Any) -> torch.Tensor:
        hit = self._memo.get(name)
        if hit is not None and hit[0] is self.valid and hit[1] is self.positions:
            return hit[2]
        value = compute()
        self._memo[name] = (self.valid, self.positions, value)
        return value

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def num_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def num_slots(self) -> int:
        return self.keys.shape[2]

    def order(self) -> torch.Tensor:
        """Slots sorted by logical position, valid slots first: ``[B, H, P]`` slot indices (read-only: computed once
        per view and shared by every caller).

        ``order()[..., i]`` is the slot of the i-th oldest valid entry of the row (for ``i < held``)."""
        return self._memoised("order", self._order)

    def _order(self) -> torch.Tensor:
        known = self._known_rank()
        if known is not None:  # the inverse permutation of a kept rank: no sort
            order = torch.empty_like(known)
            return order.scatter_(-1, known, torch.arange(known.shape[-1], device=known.device).expand_as(known))
        big = torch.iinfo(self.positions.dtype).max
        return torch.where(self.valid, self.positions, big).argsort(dim=-1, stable=True)

    def _known_rank(self) -> torch.Tensor | None:
        return None if self.rank_source is None else self.rank_source(self.valid, self.positions)

    def rank(self) -> torch.Tensor:
        """Positional rank of each slot among the valid slots of its row (0 = oldest); invalid slots rank last.
        Read-only (computed once per view)."""
        return self._memoised("rank", self._rank)

    def _rank(self) -> torch.Tensor:
        known = self._known_rank()
        if known is not None:
            return known
        order = self.order()
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return rank

    def held(self) -> torch.Tensor:
        """Valid entries per row and head: int64 ``[B, H]`` (read-only: computed once per view)."""
        return self._memoised("held", lambda: self.valid.sum(-1))

    def sink_mask(self) -> torch.Tensor:
        """bool ``[B, H, P]``: the slots holding the policy's protected sinks (the ``sinks`` oldest valid entries of
        each row and head, by positional rank)."""
        if self.sinks <= 0:
            return torch.zeros_like(self.valid)
        return self.valid & (self.rank() < self.sinks)


@dataclass
class ModelView:
    """Every policy layer's prefill, uncompressed, before any layer is compressed: what a whole-model allocator sees
    (the optional allocator hook ``model_keep``, see :class:`~kvpolicy.core.budget.BudgetAllocator`).

    Only a replayed prefill (:mod:`kvpolicy.core.replay`) has it: the direct path compresses each layer right after
    its own attention, before the next layer has run. Tensors are the engine's: treat them as read-only."""

    layers: list[LayerView]  #: one prefill view per policy layer, in layer order, with the policy's statistics
    keep: torch.Tensor  #: int64 [B]: entries per row and kv head the budget keeps in every layer (before allocation)
    n_tokens: torch.Tensor  #: int64 [B]: real prompt tokens per row
    #: ``head_attention(i)``: float32 ``[B, Hq, P]``, the attention each key of ``layers[i]`` receives from every real
    #: prompt query, per *query* head (``AttentionStat`` averages a kv head's group); computed on demand
    head_attention: Callable[[int], torch.Tensor]


@dataclass
class Reduction:
    """A reducer's answer: which slots survive (``index``), and optionally their new (merged) tensors.

    ``index`` is int64 ``[B, H, K]`` slot indices into the input view, ``valid`` bool ``[B, H, K]`` marks the entries
    that are real (rows keeping fewer than ``K`` are padded with ``valid=False``). ``keys``/``values`` of shape
    ``[B, H, K, D]`` replace the gathered tensors when the reducer merges; ``None`` means "gather as is" (eviction).

    ``logit_bias`` (float ``[B, H, K]``, optional): a constant the layer adds to every later query's attention logit
    of each kept entry, before the softmax, in every attention path (outputs and statistics). Why: an entry that
    stands for ``n`` merged tokens gets one softmax share where the ``n`` tokens had ``n``; ``log n`` restores the
    group's mass (proportional attention, as in token merging). It replaces the entries' previous bias (a merging
    reducer reads that one from ``view.slot_state[LOGIT_BIAS]`` to accumulate sizes); ``None`` keeps each kept
    entry's previous bias (0 for an entry never merged). The engine keeps it as the per-slot state
    :data:`LOGIT_BIAS` (new tokens start at 0), so a layer carrying one stays in the padded layout.
    """

    index: torch.Tensor
    valid: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None


@runtime_checkable
class EncodeScorer(Protocol):
    """Ranks the prompt's cache entries at the end of prefill.

    ``score`` returns float ``[B, H or 1, P]``: higher means more important. Scores of invalid slots are ignored."""

    needs: frozenset[AttentionStat]

    def score(self, view: LayerView) -> torch.Tensor: ...


@runtime_checkable
class DecodeScorer(Protocol):
    """Chooses what to drop while generating, whenever the budget rule asks for a drop.

    ``drop_scores`` returns float ``[B, H or 1, P]`` over the cache *before* the new token is added (for a scorer with
    no needs) or after it (a scorer that needs attention): the engine drops the lowest-scored valid slots. Return
    ``+inf`` for a slot that must never be dropped.

    Optional hooks, looked up with ``getattr``:

    * ``init_state(view) -> dict[str, Tensor]``: per-slot state ``[B, H or 1, P]`` created from the *uncompressed*
      prefill view (e.g. H2O's accumulated attention). The engine keeps it aligned with the slots through reductions,
      drops and appends (new slots start at 0) and hands it back as ``view.slot_state``.
    * ``after_prefill(view)``: called once with the compressed cache (e.g. to freeze a drop index in
      ``view.layer_state``).
    * ``observe(view)``: called at every decode step before any drop decision (e.g. accumulate attention).
    * ``stack_layers`` (bool attribute): ``observe`` and ``drop_scores`` compute each batch row from that row's slots
      and the view alone (not from ``layer_idx``, ``num_layers`` or per-layer ``layer_state``): the engine may call
      them once for several layers stacked along the batch axis (:class:`~kvpolicy.core.stacked.StackedView`).
    """

    needs: frozenset[AttentionStat]

    def drop_scores(self, view: LayerView) -> torch.Tensor: ...


@runtime_checkable
class Reducer(Protocol):
    """Turns scores and a budget into the compressed cache.

    ``reduce(view, scores, keep)``: ``scores`` is ``[B, H or 1, P]`` from the encode scorer, ``keep`` int64 ``[B]``
    the entries to keep per row and head. It must return a :class:`Reduction` holding at most ``keep[b]`` valid
    entries per ``(b, h)`` for uniform budgets (a reducer that redistributes budget across heads may differ per head as
    long as each row's total is ``H * keep[b]``) and never keep an invalid slot.

    Optional hook ``on_drop(view, victims, victim_valid) -> (keys, values) | None``: called at decode time before the
    engine frees ``victims`` (int64 ``[B, H, k]``); return updated full ``keys``/``values`` to merge the victims into
    their neighbours, or ``None`` to evict. A reducer whose ``on_drop`` treats each row on its own says so with
    ``stack_layers = True`` (as a decode scorer does, see :class:`DecodeScorer`).
    """

    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction: ...


@dataclass
class CachePolicy:
    """A complete policy: parts plus a budget. ``encode=None`` skips prefill compression, ``decode=None`` decoding."""

    reducer: Reducer
    budget: Budget
    encode: EncodeScorer | None = None
    decode: DecodeScorer | None = None
    allocator: BudgetAllocator | None = None
    #: where each part came from, ``{"encode": ("frequency", "kvpolicy"), ...}`` (part name, plugin package; set by
    #: ``kvpolicy.config``), so that an error about a part's output names the part and its package (empty: hand-built)
    origins: dict[str, tuple[str, str]] = field(default_factory=dict)
    name: str = "custom"
    #: run decode drops after the step's attention even when the decode scorer needs none (the Elastic Cache
    #: authors' order); by default drops happen inside ``update()`` so the step already attends to the reduced cache
    drop_after_attention: bool = False
    #: give new tokens RoPE positions counted from the *compressed* length (an authors'-code quirk); see positions.py
    compressed_positions: bool = False
    #: the validated document this policy was built from (``kvpolicy.config``), kept for result files
    spec: Any = None
    #: protected sinks: the first ``sinks`` real tokens of every row, which no part may drop or merge away. Stated once
    #: here and handed to every part as ``view.sinks``, so a decode scorer knows what the reducer protected. ``None``:
    #: derived from the parts that state their own (a ``protected_sinks`` int attribute, e.g. Elastic's
    #: ``anchor_merge`` from its ``start_size``), the largest of them, 0 if none does. A stated value is checked
    #: against every part that states one: they must agree.
    sinks: int | None = None

    def __post_init__(self) -> None:
        stated = part_sinks(self)
        if self.sinks is None:
            self.sinks = max(stated.values(), default=0)
            return
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0 (protected first tokens per row), got {self.sinks!r}")
        for where, n in stated.items():
            if n != self.sinks:
                raise ValueError(
                    f"the {where} ({type(getattr(self, where)).__name__}) protects {n} sinks but the policy states "
                    f"sinks={self.sinks}; state the number once (CachePolicy(sinks=...)) or give the part the same value"
                )

    def encode_needs(self) -> frozenset[AttentionStat]:
        return frozenset(self.encode.needs) if self.encode is not None else frozenset()

    def decode_needs(self) -> frozenset[AttentionStat]:
        """Statistics of each decode step: the decode scorer's, plus a reducer's ``needs`` (e.g. CaM's attention)."""
        if self.decode is None:
            return frozenset()
        return frozenset(self.decode.needs) | frozenset(getattr(self.reducer, "needs", ()))

    def probe_needs(self) -> frozenset[ProbeStat]:
        """The probes the prefill stage waits for (:class:`ProbeStat` among :meth:`prefill_needs`)."""
        return frozenset(need for need in self.prefill_needs() if isinstance(need, ProbeStat))

    def defers_prefill(self) -> bool:
        """Whether the prefill stage waits for the end of the prefill forward: a probe runs then, or the allocator
        divides one budget across layers (``rebalance``), which needs every layer's scores at once."""
        return bool(self.probe_needs()) or callable(getattr(self.allocator, "rebalance", None))

    def prefill_needs(self) -> frozenset[AttentionStat]:
        """What the prefill must compute: the encode scorer's needs, what a decode scorer seeds its state from
        (``decode.prefill_needs``) and what the reducer itself reads (``reducer.prefill_needs``)."""
        extra = getattr(self.decode, "prefill_needs", frozenset()) if self.decode is not None else frozenset()
        return self.encode_needs() | frozenset(extra) | frozenset(getattr(self.reducer, "prefill_needs", ()))


def part_sinks(policy: CachePolicy) -> dict[str, int]:
    """The sinks each part of ``policy`` states about itself (``protected_sinks``, an int attribute), by part field:
    a part that protects the first tokens on its own states how many, so the policy can derive or check its
    :attr:`CachePolicy.sinks`. Parts without the attribute (every third-party part so far) state nothing."""
    out: dict[str, int] = {}
    for name in ("encode", "decode", "reducer", "allocator"):
        n = getattr(getattr(policy, name), "protected_sinks", None)
        if isinstance(n, int) and not isinstance(n, bool):
            out[name] = n
    return out
