"""A prefill recorded once, so that any policy can be replayed from it (:mod:`kvpolicy.core.replay`).

Why it works: kvpolicy compresses each layer right after that layer's own prefill attention, so what a layer's
attention receives — its queries, keys and values, the hidden states — does not depend on the policy, except through
the kernel that produces the outputs of a layer about to be compressed with whole-prompt statistics (see
``docs/architecture.md``, "Recording and replay"). A grid of policies can therefore pay the prefill once per batch.

:func:`record` runs the caller's prefill forward once through kvpolicy's attention function on a *recording cache*:
a :class:`~kvpolicy.core.cache.PolicyCache` whose policy compresses nothing (so every output is transformers' own, the
full cache's bit for bit) and whose layers hand their queries to a recorder. What it keeps
(:class:`PrefillRecording`):

* per layer (:class:`LayerRecording`; every layer is a policy layer, sliding-window ones included): the keys and
  values as the layer's padded storage holds them when its attention runs (post-RoPE, per kv head, every column of the
  left-padded batch), which columns are real, the queries as the attention function received them, the RoPE
  ``position_ids`` the model passed, the scaling, and the log-sum-exp of each query's softmax where the output kernel
  returns one (SDPA's CPU flash call, :mod:`kvpolicy.core.sdpa`; for a sliding layer the window's, as its mask made it);
* the token types of the prompt (text / image), the last position's logits and, for M-RoPE models, the
  ``rope_deltas`` the prefill set (the caller's: the model holds them, not the cache);
* the prompt's ``input_ids`` (when the forward passed them): a probe (:mod:`kvpolicy.core.probe`, KVzip's context
  reconstruction) builds its input from them after the prefill, and a replay runs it once per recording.

**A sliding-window layer keeps its window only** (:func:`window_starts`). Once the prompt outruns a layer's window
``W``, the layer's prefill stage frees every column before the last ``W`` whatever the policy (the window rule comes
first) and no later query can see them, so a recording of the whole prompt would hold ``S / W`` times what the layer
can ever use again (16x at 8k tokens for Gemma 3's 512). What a policy still reads there is the statistics of the
``W`` entries it keeps, and those need only the last ``W`` columns: the attention an entry of the window receives
comes from queries at or after it (causal), whose probabilities ``exp(q.k - lse)`` need their own lse and no other
key. So the values, queries and lse of such a layer are kept from column ``S - W``, and so are its keys when the
recording has an lse; without one (eager attention, no flash call) the statistics recompute each query's softmax over
its own window, so the keys are kept from ``S - 2W + 1``. Two kinds of policy read further back and ask for more
when they are recorded for (``keep``, see :func:`~kvpolicy.core.replay.beyond_window`):

* ``"keys"``: a probe (KVzip): its statistic runs each reconstruction query's softmax over the sinks and the whole
  chunk it reconstructs, which in a sliding layer reaches before the window, so the layer keeps every key;
* ``"queries"``: a :class:`~kvpolicy.core.policy.QueryStat` over more queries than the window (Expected Attention
  takes every prompt query by default): the layer keeps every query (and lse).

The replay rebuilds every column (:meth:`LayerRecording.full`: zeros where nothing was kept), so every kernel runs on
the very shapes of the direct path and the numbers it keeps are bit for bit the direct path's; the columns it did not
keep feed only statistics of entries the window rule then frees. A replay that would read a column the recording
does not hold refuses to run, naming what to record (:func:`~kvpolicy.core.replay.replay`).

A recording is never modified by a replay (every replay copies what it stores). :meth:`PrefillRecording.to_dict`
gives plain tensors and numbers that ``torch.load(weights_only=True)`` reads back; the object itself pickles too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .cache import PolicyCache
from .engine import make_cache
from .layer import PolicyLayer
from .policy import Budget, CachePolicy, LayerView, Reduction

__all__ = ["BEYOND_WINDOW", "FORMAT", "LayerRecording", "PrefillRecording", "record", "window_starts"]

#: version of what a recording holds; part of every key a store files recordings under (2: sliding-window layers are
#: recorded as policy layers, no longer as transformers' own layers; 3: the prompt's input_ids; 4: a sliding layer
#: keeps its window, the ``*_start`` columns)
FORMAT = 4

#: what a sliding layer's recording can be asked to keep before its window (``record(keep=...)``)
BEYOND_WINDOW = frozenset({"keys", "queries"})


@dataclass
class LayerRecording:
    """One policy layer's prefill. ``S`` columns (left padding included), ``H`` kv heads, ``Hq`` query heads."""

    #: [B, H, S, D] post-RoPE, as the layer's storage holds them when its attention runs (padding columns included)
    keys: torch.Tensor
    values: torch.Tensor  #: [B, H, S, Dv]
    valid: torch.Tensor  #: bool [B, S]: the column is a real token (the same for every kv head at prefill)
    query: torch.Tensor  #: [B, Hq, S, D]: the queries the attention function received (post-RoPE, model dtype)
    position_ids: torch.Tensor | None  #: the RoPE positions the model passed (None: the columns)
    scaling: float
    lse: torch.Tensor | None = None  #: float32 [B, Hq, S], when the output kernel returned it
    #: first column held by ``keys`` / ``values`` / ``query`` and ``lse`` (0: every column; more on a sliding layer
    #: whose window the prompt outran, :func:`window_starts`); ``valid`` and ``position_ids`` hold every column
    key_start: int = 0
    value_start: int = 0
    query_start: int = 0
    #: the prefill statistics replays have computed from this layer so far, by need (they depend on the recorded
    #: tensors only, not on the policy: a grid computes each once); derived data, not part of :meth:`to_dict`
    statistics: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def nbytes(self) -> int:
        memo = [t for v in self.statistics.values() for t in ([v] if isinstance(v, torch.Tensor) else _tensors(v))]
        return sum(t.nbytes for t in _tensors(self) + memo)

    @property
    def columns(self) -> int:
        """Columns of the recorded forward ``S`` (left padding included)."""
        return self.valid.shape[-1]

    def full(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(keys, values, query, lse)`` over all ``S`` columns, zeros before each one's start: the layout the layer
        had when its attention ran, so a replay computes on the direct path's shapes. New tensors where a start is
        not 0 (the recording's own otherwise: the replay copies what it stores)."""
        lse = None if self.lse is None else _from_column(self.lse, self.query_start, self.columns)
        return (
            _from_column(self.keys, self.key_start, self.columns),
            _from_column(self.values, self.value_start, self.columns),
            _from_column(self.query, self.query_start, self.columns),
            lse,
        )


@dataclass
class PrefillRecording:
    """One batch's prefill, recorded once (:func:`record`) and replayed per policy (:func:`~kvpolicy.core.replay.replay`)."""

    layers: list[LayerRecording]  #: one per decoder layer, in order
    token_types: torch.Tensor  #: int8 [B, S]: TEXT / IMAGE per prompt column
    logits: torch.Tensor  #: float32 [B, V]: the prefill's last position
    rope_deltas: torch.Tensor | None = None  #: M-RoPE models: what the prefill left in the model's ``rope_deltas``
    format: int = field(default=FORMAT)
    input_ids: torch.Tensor | None = None  #: int64 [B, S]: the prompt's ids (None: the forward passed embeddings)

    @property
    def policy_layers(self) -> list[LayerRecording]:
        """Every layer (all are policy layers; the name matches :attr:`PolicyCache.policy_layers`)."""
        return list(self.layers)

    def nbytes(self) -> int:
        """Bytes of every tensor held (what a store bounded in memory counts)."""
        mine = (self.token_types, self.logits, self.rope_deltas, self.input_ids)
        own = sum(t.nbytes for t in mine if t is not None)
        return own + sum(layer.nbytes() for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain containers of tensors and numbers (``torch.save``-able, readable with ``weights_only=True``)."""
        layers = [
            {"kind": "policy", **{f.name: getattr(layer, f.name) for f in fields(layer) if f.name != "statistics"}}
            for layer in self.layers
        ]
        return {
            "format": self.format,
            "layers": layers,
            "token_types": self.token_types,
            "logits": self.logits,
            "rope_deltas": self.rope_deltas,
            "input_ids": self.input_ids,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrefillRecording:
        if d.get("format") != FORMAT:
            raise ValueError(f"recording format {d.get('format')!r}; this kvpolicy reads format {FORMAT}")
        layers = []
        for item in d["layers"]:
            item = dict(item)
            item.pop("kind")
            layers.append(LayerRecording(**item))
        return cls(layers, d["token_types"], d["logits"], d["rope_deltas"], d["format"], d["input_ids"])


def _from_column(t: torch.Tensor, start: int, columns: int) -> torch.Tensor:
    """``t [B, X, columns - start, ...]`` (columns on dim 2) placed at columns ``start ...`` of zeros."""
    if start == 0:
        return t
    out = t.new_zeros(*t.shape[:2], columns, *t.shape[3:])
    out[:, :, start:] = t
    return out


def window_starts(
    columns: int, window: int | None, has_lse: bool, keep: frozenset[str] = frozenset()
) -> tuple[int, int, int]:
    """``(key_start, value_start, query_start)``: the first column a layer's recording keeps of each, for a forward of
    ``columns`` columns through a layer with sliding ``window`` (``None``: a global layer, which keeps every column).
    The window's own columns ``[S - W, S)`` always; before them only what ``keep`` asks for (module docstring), and
    without an lse the keys that the window's queries see (``[S - 2W + 1, S)``)."""
    if window is None or columns <= window:
        return 0, 0, 0
    start = columns - window
    if "keys" in keep:
        key_start = 0
    else:
        key_start = start if has_lse else max(0, start - window + 1)
    return key_start, start, 0 if "queries" in keep else start


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensor fields of a dataclass (a layer's recording, query statistics)."""
    return [t for t in (getattr(obj, f.name) for f in fields(obj)) if isinstance(t, torch.Tensor)]


class _NoReduction:
    """The recording policy's reducer: never called (the policy has no encode scorer, so nothing is compressed)."""

    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
        raise RuntimeError("kvpolicy: a recording cache compresses nothing")


def recording_policy() -> CachePolicy:
    """The policy of a recording cache: no stage at all, so every layer stays pristine and its outputs are
    transformers' own attention (the full cache's, bit for bit, as the ratio-0 check requires of any policy)."""
    return CachePolicy(reducer=_NoReduction(), budget=Budget(ratio=0.0), name="recording")


class _Recorder:
    """Receives one policy layer's prefill step from the attention function, and takes the layer's keys, values and
    validity at that moment, before a sliding layer's window rule frees what the last query cannot see (the replay
    runs that rule itself): of a sliding layer, the columns :func:`window_starts` says."""

    def __init__(self, layer: PolicyLayer, keep: frozenset[str]):
        self.layer = layer
        self.keep = keep
        self.step: dict[str, Any] | None = None
        self.token_types: torch.Tensor | None = None  #: int8 [B, S]: the prompt columns' types, as the layer stored them

    def __call__(self, query: torch.Tensor, position_ids: Any, scaling: float, lse: torch.Tensor | None) -> None:
        layer = self.layer
        if self.step is not None:
            raise RuntimeError(f"kvpolicy: a recording holds one prefill forward (layer {layer.layer_idx} ran twice)")
        positions = position_ids if isinstance(position_ids, torch.Tensor) else None
        k0, v0, q0 = window_starts(layer.seen, layer.window_size, lse is not None, self.keep)
        self.step = {
            "keys": _tail(layer.keys, k0), "values": _tail(layer.values, v0), "valid": layer.valid[:, 0].clone(),
            "query": _tail(query, q0), "position_ids": positions, "scaling": float(scaling),
            "lse": None if lse is None else _tail(lse, q0), "key_start": k0, "value_start": v0, "query_start": q0,
        }
        self.token_types = layer.token_types[:, 0].clone()

    def recording(self) -> LayerRecording:
        if self.step is None:
            idx = self.layer.layer_idx
            raise RuntimeError(f"kvpolicy: layer {idx} was not reached by kvpolicy's attention function")
        return LayerRecording(**self.step)


def _tail(t: torch.Tensor, start: int) -> torch.Tensor:
    """Columns ``start ...`` (dim 2) of ``t``, in a tensor of their own (a view would keep, and save, all of ``t``)."""
    return t if start == 0 else t[:, :, start:].clone()


def record(
    model: Any, forward: Callable[[PolicyCache], torch.Tensor], keep: frozenset[str] = frozenset()
) -> PrefillRecording:
    """Record the prefill that ``forward(cache)`` runs through ``model`` (attached to kvpolicy) on a fresh recording
    cache; ``forward`` returns the last position's logits ``[B, V]``. One forward only: a prompt in two chunks records
    its first (the context); the caller runs the rest on each replayed cache. Set ``rope_deltas`` on the result for an
    M-RoPE model.

    ``keep``: what a sliding layer also keeps before its window (a subset of :data:`BEYOND_WINDOW`; the module
    docstring says which policies read it, :func:`~kvpolicy.core.replay.beyond_window` answers for one)."""
    if not keep <= BEYOND_WINDOW:
        raise ValueError(f"record: keep={sorted(keep)}; allowed values: {sorted(BEYOND_WINDOW)}")
    cache = make_cache(model, recording_policy())
    cache.keeps_prompt = True
    recorders = []
    for layer in cache.policy_layers:
        layer.recorder = _Recorder(layer, frozenset(keep))
        recorders.append(layer.recorder)
    logits = forward(cache)
    layers = [recorder.recording() for recorder in recorders]
    types = recorders[0].token_types
    assert types is not None  # recording() raised otherwise
    ids = None if cache.prompt_ids is None else cache.prompt_ids.clone()
    return PrefillRecording(layers, types, logits.detach().to(torch.float32).clone(), input_ids=ids)
