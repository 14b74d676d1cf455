"""One decoder layer's cache under a policy: transformers' ``DynamicLayer`` interface and the stage machine.

A :class:`PolicyLayer` owns its entries through one storage object (:mod:`kvpolicy.core.storage`: padded, or
bucketed after a prefill with per-head budgets) and runs the policy's two stages on it:

* **prefill**: the prompt is appended; right after this layer's own attention (:meth:`PolicyLayer.finish_step`) the
  budget and allocator fix how many entries each row keeps, the encode scorer ranks them and the reducer compresses;
* **decode**: each new token is written into a free slot; the budget rule frees the lowest-scored slots, inside
  ``update()`` (the step then attends to the reduced cache) or after the step's attention when the decode scorer
  needs it;
* **probe** (a policy declaring :class:`~kvpolicy.core.policy.ProbeStat`, :mod:`kvpolicy.core.probe`): the prefill
  stage waits instead of compressing; each probe forward's keys are returned with the prompt's but never stored, its
  statistic is recorded after the attention, and :meth:`PolicyLayer.compress_deferred` then runs the prefill
  stage with it (an allocator that divides one budget across layers also defers the stage to the end of the
  forward, when every layer's scores exist);
* **append** (a forward inside :meth:`~kvpolicy.core.cache.PolicyCache.appending`, after the prefill): a chunk of
  prompt tokens (a question after a compressed context) is stored as it comes, attending causally within itself and
  to the kept entries; neither stage removes anything, and the decode budget counts the chunk's entries as held
  (:meth:`~kvpolicy.core.budget.Budget.decode_excess`, ``appended``). A decode scorer that observes steps
  (``observe``) sees the chunk's attention, as it would see a decode step's.

Slots are unordered: a compressed layer attends through a mask built from per-slot validity and logical positions
(:mod:`kvpolicy.core.masks`), never through transformers' mask, whose padding columns are only right for an
uncompressed ("pristine") layer. This is what lets rows of a left-padded batch keep different positions and different
numbers of entries, and lets a decode step overwrite the dropped slot in place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from .buckets import bucketed_if_uneven
from .masks import new_token_validity
from .partcheck import check_keep, check_merge, check_reduction, check_scores, check_state
from .policy import GENERATED, AttentionStat, CachePolicy, LayerView, ProbeStat
from .positions import RopeShift
from .probe import ProbeScope, probe_statistic
from .querystats import RopeFrequencies
from .reuse import check_batch
from .selection import lowest_slot, ranked_slots
from .storage import PaddedStorage, SlotStorage, growth
from .token_types import TokenTypes

__all__ = ["PolicyLayer", "take_active_layer"]

_active = threading.local()


def take_active_layer(layer_idx: int | None) -> PolicyLayer | None:
    """The policy layer whose ``update()`` just ran for ``layer_idx`` on this thread, consumed once.

    transformers calls ``cache.update()`` and then the attention function of the same module; generate() forwards no
    extra kwargs, so this thread-local hand-off is the side channel from one to the other."""
    layer = getattr(_active, "layer", None)
    _active.layer = None
    if layer is None or layer.layer_idx != layer_idx:
        return None
    return layer


class PolicyLayer(DynamicLayer):
    """One decoder layer's cache under a policy. Never set ``_layer_type`` here: it would register globally."""

    is_croppable = False

    def __init__(
        self,
        policy: CachePolicy,
        layer_idx: int,
        num_layers: int,
        token_types: TokenTypes,
        shift: RopeShift | None = None,
        first_policy_layer: bool = False,
        rope: RopeFrequencies | None = None,
    ):
        super().__init__()
        self.shift = shift
        #: the model's RoPE frequencies, set only when the policy declares a query statistic
        self.rope = rope
        self._first = first_policy_layer
        self.policy = policy
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self._token_types_source = token_types
        self.seen = 0
        self.is_initialized = False
        #: set by :meth:`~kvpolicy.core.cache.PolicyCache.appending`: forwards store their tokens uncompressed
        self.append_chunk = False
        #: probe pass (:mod:`kvpolicy.core.probe`): forwards are probe chunks, scored under ``probe_scope``
        self.probing = False
        self.probe_scope: ProbeScope | None = None
        self._probe_scoring = False
        #: set on a recording cache (:mod:`kvpolicy.core.recording`): the attention function hands it the step's
        #: queries, RoPE positions and scaling, the inputs of the statistics that the cache itself does not keep
        self.recorder: Callable[..., None] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        #: where the entries live; a :class:`PaddedStorage` until a prefill with per-head budgets may bucket it
        self.storage: SlotStorage = PaddedStorage(key_states, value_states)
        self.layer_state: dict[str, Any] = {}
        self.n_tokens = torch.zeros(key_states.shape[0], dtype=torch.long, device=self.device)
        self.prefill_kept: torch.Tensor | None = None
        self.prefill_keep: torch.Tensor | None = None
        #: int64 ``[B]``: real tokens stored by appended chunks (they raise the decode budget by their count)
        self.appended = torch.zeros_like(self.n_tokens)
        self._before_append = self.n_tokens
        self.seen = 0
        self.prefilled = False
        self._pending: str | None = None
        self._planned_keep: torch.Tensor | None = None  # see _prefill_budget
        #: the prefill stage waits for the end of the forward (it would drop entries and the policy declares a
        #: ProbeStat or divides one budget across layers: :meth:`CachePolicy.defers_prefill`)
        self.deferred = False
        self._waiting_stats: tuple[dict, dict] = ({}, {})  # the prefill's statistics, kept for the deferred stage
        self._probe_scores: dict[ProbeStat, torch.Tensor] = {}
        #: int64 [B]: RoPE position after each row's last prompt token (recorded at prefill when a probe is declared)
        self.next_position: torch.Tensor | None = None
        self.is_initialized = True
        self._sync()

    def _sync(self) -> None:
        """Point transformers' ``keys``/``values`` at the storage's used slots."""
        self.keys, self.values = self.storage.keys, self.storage.values

    # ------------------------------------------------------------------ public read-only state
    @property
    def length(self) -> int:
        """Physical slots in use ``P``."""
        return self.storage.length

    @property
    def capacity(self) -> int:
        return self.storage.capacity

    @property
    def pristine(self) -> bool:
        """Slots hold columns ``[S - P, S)`` in order (nothing dropped yet): transformers' own mask is right."""
        return self.storage.pristine

    def _padded(self) -> PaddedStorage:
        """The layout the policy's stages act on. A bucketed layer runs no stage (its policy has no decode scorer
        and no per-slot state): reaching here with one is an engine bug, not a user error."""
        storage = self.storage
        if not isinstance(storage, PaddedStorage):
            raise TypeError(f"layer {self.layer_idx}: per-slot tensors of a {type(storage).__name__} are per bucket")
        return storage

    @property
    def valid(self) -> torch.Tensor:
        """bool ``[B, H, P]`` (padded layout): the slot holds a real token. Read-only."""
        return self._padded().valid

    @property
    def positions(self) -> torch.Tensor:
        """int64 ``[B, H, P]`` (padded layout): logical column of each slot. Read-only."""
        return self._padded().positions

    @property
    def token_types(self) -> torch.Tensor:
        """int8 ``[B, H, P]`` (padded layout): TEXT / IMAGE / GENERATED per slot. Read-only."""
        return self._padded().token_types

    @property
    def slot_state(self) -> dict[str, torch.Tensor]:
        """Per-slot state ``[B, H, P]`` a decode scorer keeps (padded layout). Read-only."""
        return self._padded().slot_state

    # ------------------------------------------------------------------ transformers' interface
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        check_batch(self.n_tokens.shape[0], self.seen, key_states.shape[0], self.layer_idx)
        if self.probing:
            return self._probe_update(key_states, value_states)
        if self.deferred:
            raise RuntimeError(
                "kvpolicy: the policy's deferred prefill stage (its probe, or one budget across layers) did not run "
                "after the prefill: run the prefill through the model returned by kvpolicy.attach (its forward hook "
                "runs that stage), not its inner decoder"
            )
        if self._pending is not None:
            raise RuntimeError(
                "kvpolicy: the model did not call kvpolicy's attention function after the cache update. Attach the "
                "model first: kvpolicy.attach(model) (it sets attn_implementation to 'kvpolicy')."
            )
        q = key_states.shape[2]
        cols = torch.arange(self.seen, self.seen + q, device=self.device)
        self.seen += q
        if not self.prefilled:
            if self.append_chunk:
                raise RuntimeError("kvpolicy: a chunk is appended to a prefilled cache; run the prefill forward first")
            self.storage.append(key_states, value_states, cols, self._new_types(cols), slack=0)
            self._pending = "prefill"
        elif self.append_chunk:
            self._pending = self._append_update(key_states, value_states, cols)
        else:
            self._pending = self._decode_update(key_states, value_states, cols)
        self._sync()
        _active.layer = self
        return self.keys, self.values

    def _probe_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """A probe chunk: the prompt's keys/values followed by the chunk's, which are never stored."""
        self._pending = "probe"
        _active.layer = self
        return torch.cat((self.keys, key_states), dim=2), torch.cat((self.values, value_states), dim=2)

    def _rotate_new(self, key_states: torch.Tensor) -> torch.Tensor:
        """New keys at the compressed positions when the policy re-numbers them (``compressed_positions``)."""
        if self.shift is None:
            return key_states
        if self._first:  # one shift per step for every layer: layer 0's logical minus physical position
            self.shift.delta = self.n_tokens - self.held()[:, 0]
        return self.shift.rotate(key_states)

    def _append_update(self, key_states: torch.Tensor, value_states: torch.Tensor, cols: torch.Tensor) -> str:
        """Store an appended chunk's tokens as prompt tokens (their own token types), dropping nothing."""
        key_states = self._rotate_new(key_states)
        self._before_append = self.n_tokens.clone()
        self.n_tokens += key_states.shape[2]  # corrected in resolve_new_tokens if some new token is padding
        types = self._token_types_source.for_columns(cols, self.device)
        self.storage.append(key_states, value_states, cols, types, slack=growth(self.length))
        return "append"

    def _decode_update(self, key_states: torch.Tensor, value_states: torch.Tensor, cols: torch.Tensor) -> str:
        """Store a decode step's tokens (dropping first when the decode rule needs no attention); returns the stage
        left pending for :meth:`finish_step`."""
        q = key_states.shape[2]
        key_states = self._rotate_new(key_states)
        self.n_tokens += q  # corrected in resolve_new_tokens if some new token is padding
        policy = self.policy
        in_update = policy.decode is not None and not policy.decode_needs() and not policy.drop_after_attention
        if in_update:
            self._decode_drop(incoming=q)
        self.storage.append(key_states, value_states, cols, self._new_types(cols), slack=growth(self.length))
        return "decode" if (policy.decode is not None and not in_update) else "done"

    def _new_types(self, cols: torch.Tensor) -> torch.Tensor:
        if self.prefilled:
            return torch.full_like(cols, GENERATED, dtype=torch.int8)
        return self._token_types_source.for_columns(cols, self.device)

    def get_seq_length(self) -> int:
        return self.seen if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_initialized:
            return query_length, 0
        return self.length + query_length, self.seen - self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = None
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("kvpolicy: a compressed cache cannot be cropped (assisted decoding is unsupported)")

    def _select_rows(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.storage.select_rows(index)
        batch = self.n_tokens.shape[0]
        self.n_tokens = self.n_tokens[index]
        self.appended = self.appended[index]
        # per-row tensors a part keeps in layer_state follow their rows too
        for key, value in list(self.layer_state.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                self.layer_state[key] = value[index]
        for name in ("prefill_kept", "prefill_keep"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[index])
        self._sync()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(self.n_tokens.shape[0], device=self.device).repeat_interleave(repeats))

    # ------------------------------------------------------------------ used by the attention function
    def resolve_new_tokens(self, mask: torch.Tensor | None, q: int) -> torch.Tensor:
        """Learn which of this step's tokens are padding from transformers' mask (its last query row sees every real
        column), mark them invalid, and return the validity of the new tokens, bool ``[B, q]``."""
        return self.mark_new_tokens(new_token_validity(mask, q, self.n_tokens.shape[0], self.device))

    def mark_new_tokens(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Mark this step's padding (``new_valid`` bool ``[B, q]`` is False) invalid and count its real tokens; what
        :meth:`resolve_new_tokens` does once it has read the mask, and what a replay does with the recorded validity
        (:mod:`kvpolicy.core.replay`). Returns ``new_valid``."""
        if not bool(new_valid.all()):
            self.storage.invalidate_new(new_valid)
            if self.prefilled:
                self.n_tokens -= (~new_valid).sum(-1)
        if not self.prefilled:
            self.n_tokens += new_valid.sum(-1)
        return new_valid

    def mask(self, q: int) -> torch.Tensor | None:
        """The engine's per-slot mask (:func:`~kvpolicy.core.masks.slot_mask`) of this step's ``q`` queries."""
        return self._padded().mask(q, self.seen)

    def attend(self, query: torch.Tensor, scaling: float, eager: bool) -> torch.Tensor:
        """Outputs of this step's ``query`` over the stored entries under the engine's mask (any layout)."""
        return self.storage.attend(query, self.seen, scaling, eager)

    def pending_needs(self) -> frozenset[AttentionStat]:
        if self._pending == "prefill":
            return self.policy.prefill_needs()
        if self._pending == "decode" or (self._pending == "append" and self._observes()):
            return self.policy.decode_needs()
        return frozenset()

    def _observes(self) -> bool:
        return getattr(self.policy.decode, "observe", None) is not None

    # ------------------------------------------------------------------ the probe pass (kvpolicy.core.probe)
    def start_probe(self, every_layer: bool = False) -> None:
        """Forwards are probe chunks from now on. The layer scores them when its prefill stage waits for the probe,
        or always with ``every_layer`` (a replay computes the statistic once per recording, for any policy)."""
        self.probing, self._probe_scores, self._probe_scoring = True, {}, every_layer or self.deferred

    def stop_probe(self) -> dict[ProbeStat, torch.Tensor]:
        """End the probe pass; returns this layer's statistics (empty when the layer was not waiting for them)."""
        self.probing, self.probe_scope, self._pending = False, None, None
        scores, self._probe_scores = self._probe_scores, {}
        return scores

    def finish_probe(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """After a probe chunk's attention: fold its statistic into the running maximum of each scored entry."""
        self._pending = None
        scope = self.probe_scope
        if scope is None or not self._probe_scoring:
            return
        stat = probe_statistic(scope, query, key, self.length, scaling)  # [B, H, K]
        b, h, p = self.valid.shape
        best = self._probe_scores.get(scope.need)
        if best is None:
            best = self._probe_scores[scope.need] = torch.zeros(b, h, p, dtype=torch.float32, device=self.device)
        best.scatter_reduce_(2, scope.index[:, None, :].expand_as(stat), stat, reduce="amax")

    def deferred_scores(self, probe: dict[ProbeStat, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep [B], encode scores [B, H or 1, P])`` of the waiting prefill stage, for an allocator that divides
        one budget across layers (``rebalance``) before any layer compresses."""
        attention, queries = self._waiting_stats
        keep = self._prefill_budget()
        view = self.view("prefill", attention, queries, probe)
        view.keep = keep
        return keep, check_scores(self.policy, "encode", self.policy.encode.score(view), view)  # type: ignore[union-attr]

    def compress_deferred(
        self, probe: dict[ProbeStat, torch.Tensor], keep: torch.Tensor | None = None, scores: torch.Tensor | None = None
    ) -> None:
        """Run the prefill stage that waited (for the probe, or for every layer's scores), with the probe's statistics
        (``view.probe``) and, when an allocator re-divided the budget, this layer's ``keep`` and its ``scores``."""
        if not self.deferred:
            return
        self.deferred = False
        attention, queries = self._waiting_stats
        self._waiting_stats = ({}, {})
        self._compress_prefill(attention, queries, probe, keep, scores)
        self._sync()

    def finish_step(self, attention: dict[int | None, torch.Tensor], queries: dict | None = None) -> None:
        """Called by the attention function once the outputs are computed: compress now if the policy says so.
        ``queries``: the declared query statistics (:class:`~kvpolicy.core.policy.QueryStat` -> stats)."""
        pending, self._pending = self._pending, None
        if pending == "prefill":
            self._finish_prefill(attention, queries)
        elif pending == "decode":
            self._decode_drop(incoming=0, attention=attention, queries=queries)
        elif pending == "append":
            self.appended += self.n_tokens - self._before_append
            if self._observes():
                self.policy.decode.observe(self.view("decode", attention))  # type: ignore[union-attr]
        self._sync()

    # ------------------------------------------------------------------ the policy's stages
    def view(
        self, stage: str, attention: dict | None = None, queries: dict | None = None, probe: dict | None = None
    ) -> LayerView:
        storage = self._padded()
        return LayerView(
            layer_idx=self.layer_idx,
            num_layers=self.num_layers,
            stage=stage,  # type: ignore[arg-type]
            keys=storage.keys,
            values=storage.values,
            valid=storage.valid,
            positions=storage.positions,
            seen=self.seen,
            n_tokens=self.n_tokens,
            new_tokens=0 if storage.new_slots is None else storage.new_slots.shape[-1],
            token_types=storage.token_types,
            attention=attention or {},
            queries=queries or {},
            probe=probe or {},
            slot_state=storage.slot_state,
            layer_state=self.layer_state,
            prefill_kept=self.prefill_kept,
            sinks=self.policy.sinks or 0,
        )

    def _prefill_budget(self) -> torch.Tensor:
        """Entries this layer keeps after prefill (budget, then the allocator), computed once per prefill: the
        attention function asks for it before the outputs (:meth:`prefill_drops`) and the prefill stage after."""
        if self._planned_keep is None:
            policy = self.policy
            keep = policy.budget.prefill_keep(self.n_tokens)
            if policy.allocator is not None:
                given = keep
                keep = policy.allocator.layer_keep(self.layer_idx, self.num_layers, keep, self.n_tokens)
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
        return bool((self._prefill_budget() < self.held().amin(-1)).any())

    def _finish_prefill(self, attention: dict, queries: dict | None = None) -> None:
        if self.policy.defers_prefill() and self._drops():
            self.deferred = True  # compress once the forward (and the probe) has gone through every layer
            self._waiting_stats = (attention, queries or {})
            return
        self._compress_prefill(attention, queries)

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
        keep = self._prefill_budget() if keep is None else keep
        self._planned_keep = None
        self.prefill_keep = keep
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
            if policy.decode is None and not storage.has_slot_state:  # no stage left: the layout is chosen once
                self.storage = bucketed_if_uneven(storage)
        self.prefill_kept = self.held()
        after = getattr(policy.decode, "after_prefill", None)
        if after is not None:
            after(self.view("decode"))

    def _decode_drop(self, incoming: int, attention: dict | None = None, queries: dict | None = None) -> None:
        """Apply the decode-stage budget rule: free the lowest-scored slots (``incoming`` tokens are about to be
        written and count toward the budget)."""
        decode = self.policy.decode
        if decode is None:
            return
        storage = self._padded()
        view = self.view("decode", attention, queries)
        observe = getattr(decode, "observe", None)
        if observe is not None:
            observe(view)
        held = view.held() + incoming
        excess = self.policy.budget.decode_excess(held, self.n_tokens, self.prefill_keep, self.appended)
        if not bool((excess > 0).any()):
            return
        view.excess = excess
        scores = check_scores(self.policy, "decode", decode.drop_scores(view), view, what="drop scores")
        k_max = int(excess.max())
        if k_max == 1:
            victims = lowest_slot(view, scores)
        else:
            victims = ranked_slots(view, -scores.to(torch.float32))[..., :k_max]
        ok = (torch.arange(k_max, device=self.device) < excess[..., None]) & view.valid.gather(2, victims)
        on_drop = getattr(self.policy.reducer, "on_drop", None)
        if on_drop is not None:
            merged = on_drop(view, victims, ok)
            if merged is not None:
                storage.write_kv(*check_merge(self.policy, merged, view))
        storage.free(victims, ok)

    # ------------------------------------------------------------------ reporting
    def nbytes(self) -> int:
        """Bytes of key/value storage this layer owns (the allocated buffers, not just the used part)."""
        return self.storage.nbytes() if self.is_initialized else 0

    def slot_nbytes(self) -> int:
        """Key + value bytes of one physical slot across rows and kv heads (``nbytes() == capacity * slot_nbytes()``
        when the heads are not in buckets), so a report can price the slots in use without reading the buffers."""
        return self.storage.slot_nbytes() if self.is_initialized else 0

    def meta_nbytes(self) -> int:
        return self.storage.meta_nbytes() if self.is_initialized else 0

    def held(self) -> torch.Tensor:
        """Valid entries per row and kv head, int64 ``[B, H]``."""
        return self.storage.held()

    def slots(self, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(valid, positions, token_types)`` of one kv head's slots, ``[B, P_head]`` each (bucketed or not)."""
        return self.storage.slots(head)

    def head_kv(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` of one kv head's slots, ``[B, P_head, D]`` each, aligned with :meth:`slots`."""
        return self.storage.head_kv(head)

    def kept_positions(self, row: int, head: int = 0) -> list[int]:
        """Logical positions held by one row and head, sorted: for tests and reports."""
        valid, pos, _ = self.slots(head)
        return sorted(pos[row][valid[row]].tolist())
