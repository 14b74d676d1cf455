"""One decoder layer's cache under a policy: transformers' ``DynamicLayer`` interface and the stage machine.

A :class:`PolicyLayer` owns its entries through one storage object (:mod:`kvpolicy.core.storage`: padded, or
bucketed after a prefill with per-head budgets) and runs the policy's two stages on it:

* **prefill**: the prompt is appended; right after this layer's own attention (:meth:`PolicyLayer.finish_step`) the
  budget and allocator fix how many entries each row keeps, the encode scorer ranks them and the reducer compresses;
* **decode**: each new token is written into a free slot; the budget rule frees the lowest-scored slots, inside
  ``update()`` (the step then attends to the reduced cache) or after the step's attention when the decode scorer
  needs it;
* **probe** (a policy declaring :class:`~kvpolicy.core.policy.ProbeStat`, :mod:`kvpolicy.core.probe`, or an allocator
  dividing one budget across layers): the prefill stage waits for the end of the prefill forward
  (:mod:`kvpolicy.core.prefillstage`); each probe forward's keys are returned with the prompt's but never stored;
* **append** (a forward inside :meth:`~kvpolicy.core.cache.PolicyCache.appending`, after the prefill): a chunk of
  prompt tokens (a question after a compressed context) is stored as it comes, attending causally within itself and
  to the kept entries; neither stage removes anything, and the decode budget counts the chunk's entries as held
  (:meth:`~kvpolicy.core.budget.Budget.decode_excess`, ``appended``). A decode scorer that observes steps
  (``observe``) sees the chunk's attention, as it would see a decode step's.

Slots are unordered: a compressed layer attends through a mask built from per-slot validity and logical positions
(:mod:`kvpolicy.core.masks`), never through transformers' mask, whose padding columns are only right for an
uncompressed ("pristine") layer. This is what lets rows of a left-padded batch keep different positions and different
numbers of entries, and lets a decode step overwrite the dropped slot in place.

A sliding-window layer (``window``) is the same layer with the window rule first: entries that left the window are
freed at every step, and the budget applies to the entries inside it (:mod:`kvpolicy.core.window`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from .droprule import DropRule
from .masks import new_token_validity
from .policy import GENERATED, AttentionStat, CachePolicy, LayerView
from .positions import RopeShift
from .probe import LayerProbe
from .querystats import RopeFrequencies
from .reuse import check_batch
from .stacked import StackedDrops
from .storage import PaddedStorage, SlotStorage, growth
from .token_types import TokenTypes
from .prefillstage import PrefillStage
from .window import SlidingWindow

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


class PolicyLayer(PrefillStage, DynamicLayer):
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
        window: int | None = None,
        layer_type: str = "full_attention",
    ):
        super().__init__()
        #: transformers' layer type (``full_attention`` / ``sliding_attention``): which RoPE the model gives the layer
        self.layer_type = layer_type
        #: a sliding-window layer's window (``None``: the layer attends to every column)
        self.window = SlidingWindow(window) if window is not None else None
        #: read by transformers (``Cache.is_sliding``) to size the sliding layers' mask from this layer
        self.is_sliding = window is not None
        self.shift = shift
        #: the model's RoPE frequencies, set only when the policy declares a query statistic
        self.rope = rope
        #: the layer whose logical minus physical length sets the step's RoPE shift (``compressed_positions``): set
        #: on the first layer only, which runs first in every step (see :class:`~kvpolicy.core.cache.PolicyCache`)
        self.shift_source: PolicyLayer | None = self if first_policy_layer else None
        self.policy = policy
        #: the policy's decode statistics, and whether its decode drop runs inside ``update()`` (it needs none), read
        #: once: a decode step asks in every layer
        self._decode_needs = policy.decode_needs()
        self._in_update = policy.decode is not None and not self._decode_needs and not policy.drop_after_attention
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self._token_types_source = token_types
        self.seen = 0
        self.is_initialized = False
        #: set by :meth:`~kvpolicy.core.cache.PolicyCache.appending`: forwards store their tokens uncompressed
        self.append_chunk = False
        #: set by :meth:`resolve_new_tokens`: this decode step has no padding token (every new token is real)
        self.no_padding = False
        #: the policy layers of one cache in model order (set by :class:`~kvpolicy.core.cache.PolicyCache`; alone by
        #: default): their decode bookkeeping runs back to back, see :meth:`begin_early` and :meth:`finish_step`
        self.group: list[PolicyLayer] = [self]
        #: tokens of the current step already counted, and dropped for, by the group's first layer (0: none)
        self._begun = 0
        #: ``(attention, queries)`` of a drop after attention left for the group's last layer to run
        self._deferred: tuple[dict, dict | None] | None = None
        #: runs the group's drops and slot writes stacked where it can (shared by the group: see PolicyCache)
        self.stacked = StackedDrops(policy)
        #: the probe pass (:mod:`kvpolicy.core.probe`): while ``probe.active``, forwards are probe chunks
        self.probe = LayerProbe()
        #: set on a recording cache (:mod:`kvpolicy.core.recording`): the attention function hands it the step's
        #: queries, RoPE positions and scaling, the inputs of the statistics that the cache itself does not keep
        self.recorder: Callable[..., None] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        #: where the entries live; a :class:`PaddedStorage` until a prefill with per-head budgets may bucket it
        self.storage: SlotStorage = PaddedStorage(key_states, value_states, self.window_size)
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
        self._rule = DropRule(self.policy, self.device, self.window is not None)
        self._step_tokens = 0
        #: the prefill stage waits for the end of the prefill forward (:meth:`CachePolicy.defers_prefill`), holding
        #: the prompt's statistics ``(attention, queries, probe)``
        self.waiting = False
        self._waiting_stats: tuple[dict, dict, dict] = ({}, {}, {})
        #: int64 [B]: RoPE position after each row's last prompt token (recorded at prefill when a probe is declared)
        self.next_position: torch.Tensor | None = None
        if self.window is not None:
            self.window.clear()
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
    def window_size(self) -> int | None:
        """Columns a query of this layer attends over (``None``: all of them, a global layer)."""
        return self.window.size if self.window is not None else None

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

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """float32 ``[B, H, P]``: what attention adds to each slot's logit (a merging reducer's
        :attr:`~kvpolicy.core.policy.Reduction.logit_bias`), ``None`` when the layer carries none (a bucketed layout
        never does: a layer with per-slot state stays padded)."""
        storage = self.storage
        return storage.logit_bias if isinstance(storage, PaddedStorage) else None

    # ------------------------------------------------------------------ transformers' interface
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        check_batch(self.n_tokens.shape[0], self.seen, key_states.shape[0], self.layer_idx)
        if self.probe.active:  # a probe chunk: the prompt's keys/values followed by the chunk's, never stored
            self._pending = "probe"
            _active.layer = self
            return torch.cat((self.keys, key_states), dim=2), torch.cat((self.values, value_states), dim=2)
        if self.waiting:
            raise RuntimeError(
                "kvpolicy: the policy's waiting prefill stage (its probe, or one budget across layers) did not run "
                "after the prefill: run the prefill through the model returned by kvpolicy.attach (its forward hook "
                "runs that stage), not its inner decoder"
            )
        if self._pending is not None:
            raise RuntimeError(
                "kvpolicy: the model did not call kvpolicy's attention function after the cache update. Attach the "
                "model first: kvpolicy.attach(model) (it sets attn_implementation to 'kvpolicy')."
            )
        self.run_deferred()  # a forward that ended before the group's last layer: its drop is still due
        q = key_states.shape[2]
        begun, self._begun = self._begun, 0
        if begun and (begun != q or not self.prefilled or self.append_chunk):
            raise RuntimeError(f"kvpolicy: layer {self.layer_idx} was prepared for a {begun}-token decode step")
        if self.shift_source is not None and self.prefilled and self.shift is not None:
            # one shift per step for every layer, set before anything moves (layer 0 begins the others' steps only
            # after this): the entries the policy removed from the source layer so far (its logical minus physical
            # length; a window's own drops are not the policy's)
            source = self.shift_source
            self.shift.delta = source.uncompressed()[0] - source.held()[:, 0]
        start = self.seen - begun if begun else self._advance(q)
        if not self.prefilled:
            if self.append_chunk:
                raise RuntimeError("kvpolicy: a chunk is appended to a prefilled cache; run the prefill forward first")
            cols = torch.arange(start, start + q, device=self.device)
            self.storage.append(key_states, value_states, cols, self._new_types(cols), slack=0)
            self._pending = "prefill"
        elif self.append_chunk:
            cols = torch.arange(start, start + q, device=self.device)
            self._pending = self._append_update(key_states, value_states, cols)
        else:
            self._pending = self._decode_update(key_states, value_states, start, begun > 0)
        self._sync()
        _active.layer = self
        return self.keys, self.values

    def _rotate_new(self, key_states: torch.Tensor) -> torch.Tensor:
        """New keys at the compressed positions when the policy re-numbers them (``compressed_positions``)."""
        if self.shift is None:
            return key_states
        return self.shift.rotate(key_states, self.layer_type)

    def _append_update(self, key_states: torch.Tensor, value_states: torch.Tensor, cols: torch.Tensor) -> str:
        """Store an appended chunk's tokens as prompt tokens (their own token types), dropping nothing."""
        key_states = self._rotate_new(key_states)
        self._before_append = self.n_tokens.clone()
        self.n_tokens += key_states.shape[2]  # corrected in resolve_new_tokens if some new token is padding
        types = self._token_types_source.for_columns(cols, self.device)
        self.storage.append(key_states, value_states, cols, types, slack=growth(self.length))
        return "append"

    def _decode_update(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int, begun: bool) -> str:
        """Store a decode step's tokens, the first at column ``start``; returns the stage left pending for
        :meth:`finish_step`. ``begun``: the group's first layer already began the step here (:meth:`begin_early`),
        so only the keys and values remain to be written."""
        q = key_states.shape[2]
        key_states = self._rotate_new(key_states)
        if not begun:
            first = self.group[0] is self
            with self.stacked.collecting(first):
                self._begin_step(q, start)
                for layer in self.group[1:] if first else ():
                    layer.begin_early(q)
        if q == 1:  # one column, one type: the storage writes them as numbers
            cols: torch.Tensor | int = start
            types: torch.Tensor | int = GENERATED
        else:
            cols = torch.arange(start, start + q, device=self.device)
            types = self._new_types(cols)
        self.storage.append(key_states, value_states, cols, types, slack=growth(self.length))
        return "decode" if (self.policy.decode is not None and not self._in_update) else "done"

    def _begin_step(self, q: int, start: int) -> None:
        """What a decode step does before it has this layer's keys: count the ``q`` tokens (first at column
        ``start``), drop when the decode rule needs no attention (the new tokens count toward the budget), and for a
        one-token step let the storage choose the new token's slot and write its column and type
        (:meth:`~kvpolicy.core.storage.PaddedStorage.prepare`)."""
        self.n_tokens += q  # corrected in resolve_new_tokens if some new token is padding
        storage = self.storage
        if self._in_update:
            self._decode_drop(incoming=q, refill=q == 1)
        if q == 1 and isinstance(storage, PaddedStorage):
            self.stacked.prepare(storage, start, GENERATED, growth(storage.length))

    def _advance(self, q: int) -> int:
        """Enter a step of ``q`` columns and return the first: the window rule first (what the step's first query
        cannot see is gone), then the columns are counted."""
        if self.window is not None:
            self._expire(self.seen - self.window.size + 1)
        start = self.seen
        self.seen = start + q
        self._step_tokens = q
        return start

    def begin_early(self, q: int) -> None:
        """:meth:`_begin_step` run by the group's first layer for this one, before any layer of the step (engine use:
        a no-op unless this layer is prefilled and between steps).

        Why: a decode step's bookkeeping is many small tensor operations per layer, and between two layers the
        model's matmuls evict everything they touch from the CPU caches — the same operations cost about three times
        as much run one layer at a time as back to back (measured on the 12-layer bench model, docs/performance.md).
        Nothing reads or writes this layer between the first layer's update and its own, so the drop chooses and
        frees exactly what it would have there, and the slot is the one its own update would take; that update then
        only writes the keys and values."""
        if not self.is_initialized or not self.prefilled or self.append_chunk or self._pending is not None:
            return
        self.run_deferred()
        self._begin_step(q, self._advance(q))
        self._begun = q

    def _new_types(self, cols: torch.Tensor) -> torch.Tensor:
        if self.prefilled:
            return torch.full_like(cols, GENERATED, dtype=torch.int8)
        return self._token_types_source.for_columns(cols, self.device)

    def get_seq_length(self) -> int:
        return self.seen if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_initialized:
            return query_length, 0
        length = self.length
        # update() will first drop the front slots out of the window (a probe chunk drops nothing: its mask does it)
        if self.window is not None and self.pristine and not self.probe.active:
            length = min(length, self.window.size - 1)
        return length + query_length, self.seen - length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.window is not None:
            self.window.clear()
        self.is_initialized = False
        self.keys = self.values = None
        self.seen = 0
        self._begun, self._deferred = 0, None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("kvpolicy: a compressed cache cannot be cropped (assisted decoding is unsupported)")

    def _select_rows(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.run_deferred()
        self.storage.select_rows(index)
        batch = self.n_tokens.shape[0]
        self.n_tokens = self.n_tokens[index]
        self.appended = self.appended[index]
        self._rule.forget_rows()
        if self.window is not None:
            self.window.select_rows(index)
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
        """Learn which of this step's tokens are padding from transformers' mask (each real query sees its own
        column, :func:`~kvpolicy.core.masks.new_token_validity`), mark them invalid, and return the validity of the new
        tokens, bool ``[B, q]``."""
        # a decode step without padding anywhere (transformers drops the mask only then) has nothing to mark; an
        # appended chunk still goes through mark_new_tokens (a sliding layer's window records it)
        self.no_padding = mask is None and self.prefilled and not self.append_chunk
        if self.no_padding:
            return self._rule.filled((self.n_tokens.shape[0], q), True)
        return self.mark_new_tokens(new_token_validity(mask, q, self.n_tokens.shape[0], self.device))

    def mark_new_tokens(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Mark this step's padding (``new_valid`` bool ``[B, q]`` is False) invalid and count its real tokens; what
        :meth:`resolve_new_tokens` does once it has read the mask, and what a replay does with the recorded validity
        (:mod:`kvpolicy.core.replay`). Returns ``new_valid``."""
        self.no_padding = False  # the attention function then checks ``new_valid`` (a caller here may pass padding)
        q = new_valid.shape[1]
        padded = not bool(new_valid.all())
        if padded:
            self.storage.invalidate_new(new_valid)
            if self.prefilled:
                self.n_tokens -= (~new_valid).sum(-1)
        if not self.prefilled:
            self.n_tokens += new_valid.sum(-1)
        if self.window is not None and (padded or self._pending == "append"):
            self.window.record(self.seen - q, new_valid, appended=self._pending == "append")
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
            return self._decode_needs
        return frozenset()

    def _observes(self) -> bool:
        return getattr(self.policy.decode, "observe", None) is not None

    def finish_step(self, attention: dict[int | None, torch.Tensor], queries: dict | None = None) -> None:
        """Called by the attention function once the outputs are computed: compress now if the policy says so.
        ``queries``: the declared query statistics (:class:`~kvpolicy.core.policy.QueryStat` -> stats)."""
        pending, self._pending = self._pending, None
        if pending == "prefill":
            self._finish_prefill(attention, queries)
        elif pending == "decode":
            # the group's drops after attention run back to back at its last layer (see begin_early for why): the
            # statistics are this step's either way, and nothing reads a layer between its attention and the end
            self._deferred = (attention, queries)
            if self.window is not None and self._step_tokens > 1:
                self.run_deferred()  # the window rule below comes after the drop, as in a step of one layer alone
            if self.group[-1] is self:
                with self.stacked.collecting():
                    for layer in self.group:
                        layer.run_deferred()
        elif pending == "append":
            self.appended += self.n_tokens - self._before_append
            self._rule.forget_rows()
            if self._observes():
                self.policy.decode.observe(self.view("decode", attention))  # type: ignore[union-attr]
        if self.window is not None and pending != "prefill" and self._step_tokens > 1:
            # what the step's last query could not see (after one query, update() already left exactly its window)
            self._expire(self.seen - self.window.size)
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
            new_tokens=storage.new_count,
            token_types=storage.token_types,
            attention=attention or {},
            queries=queries or {},
            probe=probe or {},
            slot_state=storage.slot_state,
            layer_state=self.layer_state,
            prefill_kept=self.prefill_kept,
            sinks=self.policy.sinks or 0,
            rank_source=storage.rank_for,
        )

    def _expire(self, before: int) -> int:
        """The window rule of a sliding layer: free the entries at columns ``< before`` (see
        :meth:`PaddedStorage.expire`; returns the slots removed from the front of a pristine layout)."""
        return self._padded().expire(before, self.seen)

    def uncompressed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, appended)``, int64 ``[B]``: the real tokens an uncompressed layer would hold now and how many of
        them were appended uncompressed — what the budget rule is a fraction of. A global layer: every real token
        seen. A sliding layer: the real tokens among the last ``window`` columns (:mod:`kvpolicy.core.window`)."""
        if self.window is None:
            return self.n_tokens, self.appended
        return self.window.counts(self.seen, self.n_tokens.shape[0], self.device)

    def run_deferred(self) -> None:
        """Run the drop after attention left for the group's last layer, if any (engine use: the group's last layer
        calls it for every layer; ``update()`` and row selection call it first in case a forward stopped early)."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            self._decode_drop(0, *deferred)
            self._sync()

    def _decode_drop(
        self, incoming: int, attention: dict | None = None, queries: dict | None = None, refill: bool = False
    ) -> None:
        """Apply the decode-stage budget rule (:class:`~kvpolicy.core.droprule.DropRule`)."""
        if self.policy.decode is not None:
            self.stacked.drop(self, self._rule, self._padded(), incoming, attention, queries, refill)

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
