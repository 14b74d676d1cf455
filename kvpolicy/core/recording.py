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
  left-padded batch — a sliding layer's too, before its window rule frees what the last query cannot see), which
  columns are real, the queries as the attention function received them, the RoPE ``position_ids`` the model passed,
  the scaling, and the log-sum-exp of each query's softmax where the output kernel returns one (SDPA's CPU flash call,
  :mod:`kvpolicy.core.sdpa`; for a sliding layer the window's, as its mask made it);
* the token types of the prompt (text / image), the last position's logits and, for M-RoPE models, the
  ``rope_deltas`` the prefill set (the caller's: the model holds them, not the cache);
* the prompt's ``input_ids`` (when the forward passed them): a probe (:mod:`kvpolicy.core.probe`, KVzip's context
  reconstruction) builds its input from them after the prefill, and a replay runs it once per recording.

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

__all__ = ["FORMAT", "LayerRecording", "PrefillRecording", "record"]

#: version of what a recording holds; part of every key a store files recordings under (2: sliding-window layers are
#: recorded as policy layers, no longer as transformers' own layers; 3: the prompt's input_ids)
FORMAT = 3


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
    #: the prefill statistics replays have computed from this layer so far, by need (they depend on the recorded
    #: tensors only, not on the policy: a grid computes each once); derived data, not part of :meth:`to_dict`
    statistics: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def nbytes(self) -> int:
        memo = [t for v in self.statistics.values() for t in ([v] if isinstance(v, torch.Tensor) else _tensors(v))]
        return sum(t.nbytes for t in _tensors(self) + memo)


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
    validity at that moment: after the step, a sliding layer's window rule has freed what its last query cannot see,
    which a replay must see again (it runs the same rule)."""

    def __init__(self, layer: PolicyLayer):
        self.layer = layer
        self.step: dict[str, Any] | None = None
        self.token_types: torch.Tensor | None = None  #: int8 [B, S]: the prompt columns' types, as the layer stored them

    def __call__(self, query: torch.Tensor, position_ids: Any, scaling: float, lse: torch.Tensor | None) -> None:
        layer = self.layer
        if self.step is not None:
            raise RuntimeError(f"kvpolicy: a recording holds one prefill forward (layer {layer.layer_idx} ran twice)")
        positions = position_ids if isinstance(position_ids, torch.Tensor) else None
        self.step = {
            "keys": layer.keys, "values": layer.values, "valid": layer.valid[:, 0].clone(),
            "query": query, "position_ids": positions, "scaling": float(scaling), "lse": lse,
        }
        self.token_types = layer.token_types[:, 0].clone()

    def recording(self) -> LayerRecording:
        if self.step is None:
            idx = self.layer.layer_idx
            raise RuntimeError(f"kvpolicy: layer {idx} was not reached by kvpolicy's attention function")
        return LayerRecording(**self.step)


def record(model: Any, forward: Callable[[PolicyCache], torch.Tensor]) -> PrefillRecording:
    """Record the prefill that ``forward(cache)`` runs through ``model`` (attached to kvpolicy) on a fresh recording
    cache; ``forward`` returns the last position's logits ``[B, V]``. One forward only: a prompt in two chunks records
    its first (the context); the caller runs the rest on each replayed cache. Set ``rope_deltas`` on the result for an
    M-RoPE model."""
    cache = make_cache(model, recording_policy())
    cache.keeps_prompt = True
    recorders = []
    for layer in cache.policy_layers:
        layer.recorder = _Recorder(layer)
        recorders.append(layer.recorder)
    logits = forward(cache)
    layers = [recorder.recording() for recorder in recorders]
    types = recorders[0].token_types
    assert types is not None  # recording() raised otherwise
    ids = None if cache.prompt_ids is None else cache.prompt_ids.clone()
    return PrefillRecording(layers, types, logits.detach().to(torch.float32).clone(), input_ids=ids)
