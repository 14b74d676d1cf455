"""Where the memory lives: a transformers ``Cache`` whose layers apply a :class:`~kvpolicy.policy.CachePolicy`.

Storage model of one :class:`PolicyLayer` (see ``docs/architecture.md``):

* ``keys``/``values`` ``[B, H, P, D]`` (kv heads, post-RoPE) in a buffer with capacity ``C >= P``;
* per slot: ``valid`` (a real token is there), ``positions`` (its logical column in the full, padded sequence),
  ``token_types`` (text / image / generated) and any per-slot state a decode scorer asked for.

Slots are unordered: a compressed layer attends through a mask built from ``valid`` and ``positions`` by the engine's
attention function (:mod:`kvpolicy.attention`), never through transformers' mask, whose padding columns are only
right for an uncompressed ("pristine") layer. This is what lets rows of a left-padded batch keep different positions
and different numbers of entries, and lets a decode step overwrite the dropped slot in place (O(budget) work per
step, no ``torch.cat`` of the cache, and tensors that stay exactly at the budget).

Logical vs physical length: ``get_seq_length()`` returns the columns seen ``S`` (transformers derives RoPE positions
from it), ``get_mask_sizes(q)`` returns ``(P + q, S - P)`` for the physical length ``P``.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from .policy import GENERATED, IMAGE, TEXT, AttentionStat, CachePolicy, LayerView, Reduction
from .buckets import SLACK, Bucket, growth, split
from .partcheck import check_keep, check_merge, check_reduction, check_scores, check_state
from .positions import RopeShift
from .reuse import check_batch, check_inputs
from .selection import lowest_slot, ranked_slots


_active = threading.local()


class UnsupportedModelError(ValueError):
    """The engine cannot run this model (names the model class and the reason)."""


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
        token_types: _TokenTypes,
        shift: RopeShift | None = None,
        first_policy_layer: bool = False,
    ):
        super().__init__()
        self.shift = shift
        self._first = first_policy_layer
        self.policy = policy
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self._token_types_source = token_types
        self.seen = 0
        self.is_initialized = False

    # ------------------------------------------------------------------ storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty(b, h, 0, d)
        self._v = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self._valid = torch.zeros(b, h, 0, dtype=torch.bool, device=self.device)
        self._pos = torch.zeros(b, h, 0, dtype=torch.long, device=self.device)
        self._types = torch.zeros(b, h, 0, dtype=torch.int8, device=self.device)
        self.slot_state: dict[str, torch.Tensor] = {}
        self.layer_state: dict[str, Any] = {}
        self.n_tokens = torch.zeros(b, dtype=torch.long, device=self.device)
        self.prefill_kept: torch.Tensor | None = None
        self.prefill_keep: torch.Tensor | None = None
        self.length = 0
        self.seen = 0
        self.pristine = True  # slots == columns [S-P, S): transformers' own mask is right
        self.prefilled = False
        self._pending: str | None = None
        self._planned_keep: torch.Tensor | None = None  # see _prefill_budget
        self._new_slots: torch.Tensor | None = None  # [B, H, q] slots written by the current step
        self.buckets: list[Bucket] | None = None  # per-head budgets: heads stored in buckets (see buckets.py)
        self.is_initialized = True
        self._sync()

    def _sync(self) -> None:
        if self.buckets is not None:  # transformers only needs tensors here; attention reads the buckets
            first = self.buckets[0]
            self.length = max(b.length for b in self.buckets)
            self.keys, self.values = first.k[:, :, : first.length], first.v[:, :, : first.length]
            return
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def _reserve(self, n: int, slack: int = 0) -> None:
        """Make room for ``n`` slots; reallocates (one copy) only when the buffer is full."""
        if n <= self.capacity:
            return
        cap = n + slack
        b, h, _, d = self._k.shape

        def grow(t: torch.Tensor, fill: Any) -> torch.Tensor:
            new = t.new_full((*t.shape[:2], cap, *t.shape[3:]), fill)
            new[:, :, : self.length] = t[:, :, : self.length]
            return new

        self._k, self._v = grow(self._k, 0), grow(self._v, 0)
        self._valid, self._pos, self._types = grow(self._valid, False), grow(self._pos, 0), grow(self._types, 0)
        self.slot_state = {k: grow(v, 0) for k, v in self.slot_state.items()}

    def _append_at_end(self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, slack: int) -> None:
        q = k.shape[2]
        start = self.length
        self._reserve(start + q, slack)
        self._k[:, :, start : start + q] = k
        self._v[:, :, start : start + q] = v
        self._valid[:, :, start : start + q] = True
        self._pos[:, :, start : start + q] = cols
        self._types[:, :, start : start + q] = self._new_types(cols)
        for t in self.slot_state.values():
            t[:, :, start : start + q] = 0
        self.length = start + q
        b, h = k.shape[:2]
        self._new_slots = torch.arange(start, start + q, device=k.device).expand(b, h, q)

    def _append_into_free(self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor) -> None:
        """One new token per row, written into the row's first free slot (grows by one only if a row has none)."""
        free = ~self._valid[:, :, : self.length]
        has_free = free.any(-1)
        slot = torch.where(has_free, free.to(torch.int8).argmax(-1), self.length)  # [B, H]
        if not bool(has_free.all()):
            self._reserve(self.length + 1, growth(self.length))
            self._valid[:, :, self.length] = False
            self.length += 1
        idx = slot[..., None]
        d_idx = idx[..., None]
        self._k.scatter_(2, d_idx.expand(*idx.shape, self._k.shape[-1]), k)
        self._v.scatter_(2, d_idx.expand(*idx.shape, self._v.shape[-1]), v)
        self._valid.scatter_(2, idx, True)
        self._pos.scatter_(2, idx, cols.view(1, 1, 1).expand_as(idx))
        self._types.scatter_(2, idx, self._new_types(cols).view(1, 1, 1).expand_as(idx).to(torch.int8))
        for t in self.slot_state.values():
            t.scatter_(2, idx, 0)
        self._new_slots = idx

    def _new_types(self, cols: torch.Tensor) -> torch.Tensor:
        if self.prefilled:
            return torch.full_like(cols, GENERATED, dtype=torch.int8)
        return self._token_types_source.for_columns(cols, self.device)

    # ------------------------------------------------------------------ transformers' interface
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        check_batch(self.n_tokens.shape[0], self.seen, key_states.shape[0], self.layer_idx)
        if self._pending is not None:
            raise RuntimeError(
                "kvpolicy: the model did not call kvpolicy's attention function after the cache update. Attach the "
                "model first: kvpolicy.attach(model) (it sets attn_implementation to 'kvpolicy')."
            )
        q = key_states.shape[2]
        cols = torch.arange(self.seen, self.seen + q, device=self.device)
        self.seen += q
        if self.buckets is not None:
            for bucket in self.buckets:
                bucket.append(key_states, value_states, cols)
            self.n_tokens += q
            self._pending = "done"
        elif not self.prefilled:
            self._append_at_end(key_states, value_states, cols, slack=0)
            self._pending = "prefill"
        else:
            if self.shift is not None:
                if self._first:  # one shift per step for every layer: layer 0's logical minus physical position
                    self.shift.delta = self.n_tokens - self.held()[:, 0]
                key_states = self.shift.rotate(key_states)
            self.n_tokens += q  # corrected in resolve_new_tokens if some new token is padding
            in_update = (
                self.policy.decode is not None
                and not self.policy.decode_needs()
                and not self.policy.drop_after_attention
            )
            if in_update:
                self._decode_drop(incoming=q)
            if q == 1 and not self.pristine:
                self._append_into_free(key_states, value_states, cols)
            else:
                self._append_at_end(key_states, value_states, cols, slack=growth(self.length))
            self._pending = "decode" if (self.policy.decode is not None and not in_update) else "done"
        self._sync()
        _active.layer = self
        return self.keys, self.values

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
        for bucket in self.buckets or ():
            bucket.select_rows(index)
        if self.buckets is None:
            self._k, self._v = self._k[index], self._v[index]
        self._valid, self._pos, self._types = self._valid[index], self._pos[index], self._types[index]
        self.slot_state = {k: v[index] for k, v in self.slot_state.items()}
        batch = self.n_tokens.shape[0]
        self.n_tokens = self.n_tokens[index]
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
            self._select_rows(torch.arange(self._k.shape[0], device=self.device).repeat_interleave(repeats))

    # ------------------------------------------------------------------ used by the attention function
    def resolve_new_tokens(self, mask: torch.Tensor | None, q: int) -> torch.Tensor:
        """Learn which of this step's tokens are padding from transformers' mask (its last query row sees every real
        column), mark them invalid, and return the validity of the new tokens, bool ``[B, q]``."""
        b = self.n_tokens.shape[0]
        if mask is None:  # transformers only drops the mask when there is no padding at all
            new_valid = torch.ones(b, q, dtype=torch.bool, device=self.device)
        else:
            last = mask[:, 0, -1, -q:]
            new_valid = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
            new_valid = new_valid.to(self.device).expand(b, q)
        if self.buckets is not None:
            if not bool(new_valid.all()):
                for bucket in self.buckets:
                    bucket.valid[:, :, bucket.length - q : bucket.length] &= new_valid[:, None, :]
                self.n_tokens -= (~new_valid).sum(-1)
            return new_valid
        if not bool(new_valid.all()):
            slots = self._new_slots
            cur = self._valid.gather(2, slots)
            self._valid.scatter_(2, slots, cur & new_valid[:, None, :])
            if self.prefilled:
                self.n_tokens -= (~new_valid).sum(-1)
        if not self.prefilled:
            self.n_tokens += new_valid.sum(-1)
        return new_valid

    def own_mask(self, q: int, valid: torch.Tensor | None = None, pos: torch.Tensor | None = None):
        """bool ``[B, H, q, P]`` from validity and positions; ``None`` when every slot is visible to every query."""
        valid = self._valid[:, :, : self.length] if valid is None else valid
        pos = self._pos[:, :, : self.length] if pos is None else pos
        if q == 1:
            return None if bool(valid.all()) else valid[:, :, None, :]
        cols = torch.arange(self.seen - q, self.seen, device=self.device)
        return valid[:, :, None, :] & (pos[:, :, None, :] <= cols[:, None])

    def pending_needs(self) -> frozenset[AttentionStat]:
        if self._pending == "prefill":
            return self.policy.prefill_needs()
        if self._pending == "decode":
            return self.policy.decode_needs()
        return frozenset()

    def finish_step(self, attention: dict[int | None, torch.Tensor]) -> None:
        """Called by the attention function once the outputs are computed: compress now if the policy says so."""
        pending, self._pending = self._pending, None
        if pending == "prefill":
            self._finish_prefill(attention)
        elif pending == "decode":
            self._decode_drop(incoming=0, attention=attention)
        self._sync()

    # ------------------------------------------------------------------ the policy's stages
    def view(self, stage: str, attention: dict | None = None) -> LayerView:
        n = self.length
        return LayerView(
            layer_idx=self.layer_idx,
            num_layers=self.num_layers,
            stage=stage,  # type: ignore[arg-type]
            keys=self._k[:, :, :n],
            values=self._v[:, :, :n],
            valid=self._valid[:, :, :n],
            positions=self._pos[:, :, :n],
            seen=self.seen,
            n_tokens=self.n_tokens,
            new_tokens=0 if self._new_slots is None else self._new_slots.shape[-1],
            token_types=self._types[:, :, :n],
            attention=attention or {},
            slot_state={k: v[:, :, :n] for k, v in self.slot_state.items()},
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

    def prefill_drops(self) -> bool:
        """Whether the pending prefill compression removes entries. When it does, the layer's outputs need not be
        bit-identical to transformers' own attention (the cache changes anyway), so the attention function may
        compute outputs and statistics in one pass; when it does not (ratio 0), the plain path keeps the run
        identical to the full cache."""
        if self._pending != "prefill" or self.policy.encode is None or self.buckets is not None:
            return False
        held = self._valid[:, :, : self.length].sum(-1).amin(-1)
        return bool((self._prefill_budget() < held).any())

    def _finish_prefill(self, attention: dict) -> None:
        policy = self.policy
        self.prefilled = True
        keep = self._prefill_budget()
        self._planned_keep = None
        self.prefill_keep = keep
        view = self.view("prefill", attention)
        view.keep = keep
        init_state = getattr(policy.decode, "init_state", None)
        if init_state is not None:
            for name, t in check_state(policy, init_state(view), view).items():
                self.slot_state[name] = t.to(torch.float32).expand_as(view.valid).clone()
        if policy.encode is not None and bool((keep < view.held().amin(-1)).any()):
            scores = check_scores(policy, "encode", policy.encode.score(view), view)
            self._apply(check_reduction(policy, policy.reducer.reduce(view, scores, keep), view))
        self.prefill_kept = self._valid[:, :, : self.length].sum(-1)
        after = getattr(policy.decode, "after_prefill", None)
        if after is not None:
            after(self.view("decode"))

    def _apply(self, red: Reduction) -> None:
        idx = red.index
        d = self._k.shape[-1]
        n = self.length
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
        self.slot_state = {k: gather(v) for k, v in self.slot_state.items()}
        self.length = idx.shape[-1]
        self.pristine = False
        self._new_slots = None
        if self.policy.decode is None and not self.slot_state:
            self._maybe_bucket()

    def _maybe_bucket(self) -> None:
        """Store heads in buckets when their kept counts differ enough that padding would waste memory."""
        held = self._valid[:, :, : self.length].sum(-1).amax(0)  # longest row per head
        padded = held.numel() * int(held.max()) if held.numel() else 0
        if padded <= (1 + SLACK) * int(held.sum()):
            return
        self.buckets = split(self._k, self._v, self._valid, self._pos, self._types)
        b, h = self._valid.shape[:2]
        self._k = self._v = self._k.new_empty(0)
        self._valid = self._valid.new_zeros(b, h, 0)
        self._pos, self._types = self._pos.new_zeros(b, h, 0), self._types.new_zeros(b, h, 0)

    def _decode_drop(self, incoming: int, attention: dict | None = None) -> None:
        """Apply the decode-stage budget rule: free the lowest-scored slots (``incoming`` tokens are about to be
        written and count toward the budget)."""
        decode = self.policy.decode
        if decode is None:
            return
        view = self.view("decode", attention)
        observe = getattr(decode, "observe", None)
        if observe is not None:
            observe(view)
        held = view.held() + incoming
        excess = self.policy.budget.decode_excess(held, self.n_tokens, self.prefill_keep)
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
                n = self.length
                self._k[:, :, :n], self._v[:, :, :n] = check_merge(self.policy, merged, view)
        cur = self._valid.gather(2, victims)
        self._valid.scatter_(2, victims, cur & ~ok)
        self.pristine = False

    # ------------------------------------------------------------------ reporting
    def nbytes(self) -> int:
        """Bytes of key/value storage this layer owns (the allocated buffers, not just the used part)."""
        if not self.is_initialized:
            return 0
        if self.buckets is not None:
            return sum(b.nbytes() for b in self.buckets)
        return self._k.nbytes + self._v.nbytes

    def slot_nbytes(self) -> int:
        """Key + value bytes of one physical slot across rows and kv heads (``nbytes() == capacity * slot_nbytes()``
        when the heads are not in buckets), so a report can price the slots in use without reading the buffers."""
        if not self.is_initialized:
            return 0
        b, h = self._k.shape[:2]
        return b * h * (self._k.shape[-1] * self._k.element_size() + self._v.shape[-1] * self._v.element_size())

    def meta_nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        if self.buckets is not None:
            return sum(b.meta_nbytes() for b in self.buckets)
        extra = sum(t.nbytes for t in self.slot_state.values())
        return self._valid.nbytes + self._pos.nbytes + self._types.nbytes + extra

    def held(self) -> torch.Tensor:
        """Valid entries per row and kv head, int64 ``[B, H]``."""
        if self.buckets is not None:
            out = torch.zeros(self.n_tokens.shape[0], self._valid.shape[1], dtype=torch.long, device=self.device)
            for b in self.buckets:
                out[:, b.heads] = b.valid[:, :, : b.length].sum(-1)
            return out
        return self._valid[:, :, : self.length].sum(-1)

    def slots(self, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(valid, positions, token_types)`` of one kv head's slots, ``[B, P_head]`` each (bucketed or not)."""
        if self.buckets is not None:
            for b in self.buckets:
                hits = (b.heads == head).nonzero()
                if hits.numel():
                    i = int(hits[0, 0])
                    return b.valid[:, i, : b.length], b.pos[:, i, : b.length], b.types[:, i, : b.length]
            raise IndexError(head)
        n = self.length
        return self._valid[:, head, :n], self._pos[:, head, :n], self._types[:, head, :n]

    def kept_positions(self, row: int, head: int = 0) -> list[int]:
        """Logical positions held by one row and head, sorted: for tests and reports."""
        valid, pos, _ = self.slots(head)
        return sorted(pos[row][valid[row]].tolist())


#: input_ids of the forward pass in progress on this thread (set by the hook that ``kvpolicy.attach`` installs)
_forward_inputs = threading.local()


def set_forward_inputs(input_ids: torch.Tensor | None, image_ids: frozenset[int]) -> None:
    _forward_inputs.input_ids = input_ids
    _forward_inputs.image_ids = image_ids


class _TokenTypes:
    """Token types (text / image) of the prompt's columns.

    Set explicitly with :meth:`PolicyCache.set_token_types`, or read from the ``input_ids`` of the forward in progress
    (an image placeholder id from the model's config marks an image position — LLaVA and Qwen2-VL expand the
    placeholder to one id per image token before the forward)."""

    def __init__(self) -> None:
        self.types: torch.Tensor | None = None  # int8 [B, S_prompt]

    def for_columns(self, cols: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.types is not None:
            t = self.types.to(device)
            inside = cols < t.shape[1]
            out = torch.full((t.shape[0], cols.numel()), GENERATED, dtype=torch.int8, device=device)
            out[:, inside] = t[:, cols[inside]]
            return out[:, None, :]
        ids = getattr(_forward_inputs, "input_ids", None)
        image_ids = getattr(_forward_inputs, "image_ids", frozenset())
        if ids is not None and image_ids and ids.shape[-1] == cols.numel():
            is_image = torch.zeros_like(ids, dtype=torch.bool)
            for i in image_ids:
                is_image |= ids == i
            return torch.where(is_image, IMAGE, TEXT).to(torch.int8).to(device)[:, None, :]
        return torch.full((1, 1, cols.numel()), TEXT, dtype=torch.int8, device=device)


class PolicyCache(Cache):
    """A transformers ``Cache`` that compresses under ``policy``; pass it as ``generate(past_key_values=...)``.

    Full-attention layers get a :class:`PolicyLayer`; sliding-window layers (Gemma 3, Mistral with a window) keep
    transformers' own sliding layer: their window already bounds them, and the policy leaves them alone.
    """

    def __init__(self, policy: CachePolicy, config: Any):
        text = config.get_text_config(decoder=True)
        n = text.num_hidden_layers
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        self.token_types = _TokenTypes()
        self.policy = policy
        shift = RopeShift(config) if policy.compressed_positions else None
        layers: list[Any] = []
        for i, (kind, kwargs) in enumerate(zip(layer_types[:n], layer_kwargs[:n])):
            if kind == "full_attention":
                first = not any(isinstance(x, PolicyLayer) for x in layers)
                layers.append(PolicyLayer(policy, i, n, self.token_types, shift, first))
            elif kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(**kwargs))
            else:
                raise UnsupportedModelError(
                    f"kvpolicy: layer {i} of {type(config).__name__} has type {kind!r}; "
                    "only 'full_attention' and 'sliding_attention' layers are supported"
                )
        super().__init__(layers=layers)

    def check_inputs(self, batch: int, new_tokens: int) -> None:
        """Raise :class:`~kvpolicy.reuse.CacheReuseError` when this cache already holds a generation and a forward
        brings another batch size or no new token (see :mod:`kvpolicy.reuse`)."""
        check_inputs(self.policy_layers, batch, new_tokens)

    def set_token_types(self, types: torch.Tensor) -> None:
        """Tell the cache which prompt columns hold image tokens (int ``[B, S]``, see ``kvpolicy.policy``)."""
        self.token_types.types = types.to(torch.int8)

    @property
    def policy_layers(self) -> list[PolicyLayer]:
        return [layer for layer in self.layers if isinstance(layer, PolicyLayer)]

    def nbytes(self) -> int:
        """Key/value bytes held by every layer (allocated buffers)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, PolicyLayer):
                total += layer.nbytes()
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def lengths(self) -> list[int]:
        """Physical slots per layer."""
        return [layer.length if isinstance(layer, PolicyLayer) else layer.get_seq_length() for layer in self.layers]
