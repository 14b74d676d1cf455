"""The transformers ``Cache`` that applies a :class:`~kvpolicy.core.policy.CachePolicy`: one
:class:`~kvpolicy.core.layer.PolicyLayer` per decoder layer, global or sliding-window.

Logical vs physical length: ``get_seq_length()`` returns the columns seen ``S`` (transformers derives RoPE positions
from it), ``get_mask_sizes(q)`` returns ``(P + q, S - P)`` for the physical length ``P`` (see ``docs/architecture.md``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from .features import UnsupportedModelError, check_attention_config
from .layer import PolicyLayer
from .partcheck import check_rebalanced
from .policy import CachePolicy, QueryStat
from .positions import RopeShift
from .probe import ProbeError, ProbeScores, load_tokenizer, run_probe
from .querystats import QueryStatsUnsupportedError, rope_frequencies
from .reuse import check_inputs
from .stacked import StackedDrops
from .token_types import TokenTypes

__all__ = ["PolicyCache", "UnsupportedModelError"]


class PolicyCache(Cache):
    """A transformers ``Cache`` that compresses under ``policy``; pass it as ``generate(past_key_values=...)``.

    Every layer is a :class:`PolicyLayer`. A sliding-window layer (Gemma 2/3, Mistral or Qwen2 with a window) is one
    with its window: it frees what left the window and the policy compresses what is inside it, so that every layer
    holds ``(1 - ratio)`` of what it would hold uncompressed (:mod:`kvpolicy.core.window`). A model whose attention
    soft-caps logits is refused here, before any forward (:mod:`kvpolicy.core.features`).
    """

    def __init__(self, policy: CachePolicy, config: Any, tokenizer: Any = None):
        check_attention_config(config)
        text = config.get_text_config(decoder=True)
        n = text.num_hidden_layers
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        self.token_types = TokenTypes()
        self.policy = policy
        shift = RopeShift(config) if policy.compressed_positions else None
        # a query statistic needs the model's RoPE frequencies (read here, once; refused here for a model whose
        # rotation cannot be inverted, before any forward)
        declared = policy.prefill_needs() | policy.decode_needs()
        rope: dict[str, Any] = {}
        if any(isinstance(n, QueryStat) for n in declared):
            try:
                rope = {kind: rope_frequencies(config, kind) for kind in set(layer_types[:n])}
            except QueryStatsUnsupportedError as exc:
                raise UnsupportedModelError(str(exc)) from None
        layers: list[Any] = []
        for i, (kind, kwargs) in enumerate(zip(layer_types[:n], layer_kwargs[:n])):
            if kind in ("full_attention", "sliding_attention"):
                window = kwargs.get("sliding_window") if kind == "sliding_attention" else None
                layers.append(
                    PolicyLayer(policy, i, n, self.token_types, shift, i == 0, rope.get(kind), window, kind)
                )
            else:
                raise UnsupportedModelError(
                    f"kvpolicy: layer {i} of {type(config).__name__} has type {kind!r}; "
                    "only 'full_attention' and 'sliding_attention' layers are supported"
                )
        if shift is not None and layers:
            # positions count from the compressed length of the first global layer (a sliding layer's length is
            # bounded by its window, not by the policy): read by layer 0, which runs first in every step
            layers[0].shift_source = next((x for x in layers if x.window is None), layers[0])
        super().__init__(layers=layers)
        group = self.policy_layers
        stacked = StackedDrops(policy)
        for layer in group:  # decode bookkeeping of all policy layers runs back to back (PolicyLayer.begin_early),
            layer.group = group  # and stacked where the layers are alike (kvpolicy.core.stacked)
            layer.stacked = stacked
        #: the probes the prefill waits for (:mod:`kvpolicy.core.probe`), the tokenizer they build their ids with and
        #: the prompt's input_ids (recorded by the hook ``kvpolicy.attach`` installs when a probe is declared, or
        #: when ``keeps_prompt`` is set: a recording keeps them for the probes of the policies replayed from it)
        self.probe_needs = sorted(policy.probe_needs(), key=repr)
        self.tokenizer = tokenizer
        self.prompt_ids: torch.Tensor | None = None
        self.keeps_prompt = bool(self.probe_needs)
        if self.probe_needs:
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(config)
            wants = [type(n.probe).__name__ for n in self.probe_needs if getattr(n.probe, "needs_tokenizer", False)]
            if wants and self.tokenizer is None:
                raise ProbeError(
                    f"kvpolicy: the probe {wants[0]} encodes text with the model's tokenizer and none was found next "
                    f"to the checkpoint (config.name_or_path={getattr(config, 'name_or_path', '')!r}): pass "
                    "kvpolicy.make_cache(model, policy, tokenizer=tokenizer)"
                )
        #: which rule fixed the prefill budgets of the layers: ``"per-layer"`` (the budget and the allocator's
        #: ``layer_keep``, layer by layer) or ``"whole-model"`` (a replay whose allocator saw every layer first,
        #: :func:`~kvpolicy.core.replay.replay`)
        self.allocation = "per-layer"

    def check_inputs(self, batch: int, new_tokens: int) -> None:
        """Raise :class:`~kvpolicy.core.reuse.CacheReuseError` when this cache already holds a generation and a forward
        brings another batch size or no new token (see :mod:`kvpolicy.core.reuse`)."""
        check_inputs(self.policy_layers, batch, new_tokens)

    @contextmanager
    def appending(self) -> Iterator[PolicyCache]:
        """Forwards inside append their tokens to the prefilled cache uncompressed (any policy).

        What a question after a compressed context needs (the query-agnostic protocol, ``docs/evaluation.md``): the
        chunk attends causally within itself and to the entries the prefill kept, its entries are stored as prompt
        tokens, the prefill compression does not run again and the decode rule drops nothing during it; afterwards
        the decode budget counts the chunk's entries as held (:meth:`~kvpolicy.core.budget.Budget.decode_excess`).
        A forward inside on a cache not yet prefilled raises ``RuntimeError``. In a sliding-window layer the chunk's
        entries count as held in full while they are inside the window."""
        layers = self.policy_layers
        for layer in layers:
            layer.append_chunk = True
        try:
            yield self
        finally:
            for layer in layers:
                layer.append_chunk = False

    def record_prompt(self, input_ids: Any) -> None:
        """Keep the prefill's ``input_ids`` for the probe (called by the forward hook; ignored once prefilled)."""
        if self.keeps_prompt and self.policy_layers and not self.policy_layers[0].is_initialized:
            self.prompt_ids = input_ids if isinstance(input_ids, torch.Tensor) else None

    @property
    def deferred(self) -> bool:
        """Some layer's prefill stage waits (the prefill forward has run; the probe or the division of one budget
        across layers has not: :mod:`kvpolicy.core.prefillstage`)."""
        return any(layer.waiting for layer in self.policy_layers)

    @property
    def needs_probe(self) -> bool:
        """The waiting stage needs the probe's statistics: a probe is declared and some layer will drop entries (with
        a ratio that removes nothing the probe does not run)."""
        return bool(self.probe_needs) and any(layer.waiting_drops() for layer in self.policy_layers)

    def run_probe(self, model: Any) -> ProbeScores:
        """The probes' statistics on this cache's uncompressed prompt (:func:`~kvpolicy.core.probe.run_probe`)."""
        return run_probe(model, self)

    def finish_prefill(self, model: Any) -> None:
        """What the hook ``kvpolicy.attach`` installs runs after the prefill forward when layers wait: the probe (when
        :attr:`needs_probe`), then :meth:`compress_deferred`."""
        self.compress_deferred(self.run_probe(model) if self.needs_probe else {})

    def compress_deferred(self, scores: ProbeScores) -> None:
        """Compress every waiting layer, with the probe's ``scores`` (from :meth:`run_probe`, now or earlier on the
        same prompt) and, when the allocator divides one budget across layers (``rebalance``) and some layer drops
        entries, the budgets it gives each layer from all of their encode scores. Afterwards the prompt ids and the
        tokenizer are dropped: nothing else reads them (and a copy of the cache, e.g. ``copy.deepcopy``, should not
        carry them)."""
        layers = [layer for layer in self.policy_layers if layer.waiting]
        drops = any(layer.waiting_drops() for layer in layers)
        missing = [x.layer_idx for x in layers if drops and self.probe_needs and not scores.get(x.layer_idx)]
        if missing:
            raise ProbeError(f"kvpolicy: no probe statistic for layers {missing}")
        for layer in layers:
            layer.prepare_waiting(scores.get(layer.layer_idx, {}))
        rebalance = getattr(self.policy.allocator, "rebalance", None)
        if rebalance is None or not drops:
            for layer in layers:
                layer.compress_waiting()
        else:
            planned = [layer.waiting_scores() for layer in layers]
            given = [keep for keep, _ in planned]
            keeps = check_rebalanced(self.policy, rebalance([s for _, s in planned], [x.valid for x in layers], given),
                                     given, [x.layer_idx for x in layers])
            for layer, keep, (_, s) in zip(layers, keeps, planned, strict=True):
                layer.compress_waiting(keep, s)
        self.prompt_ids = self.tokenizer = None

    def set_token_types(self, types: torch.Tensor) -> None:
        """Tell the cache which prompt columns hold image tokens (int ``[B, S]``, see ``kvpolicy.core.policy``)."""
        self.token_types.types = types.to(torch.int8)

    @property
    def policy_layers(self) -> list[PolicyLayer]:
        return [layer for layer in self.layers if isinstance(layer, PolicyLayer)]

    def nbytes(self) -> int:
        """Key/value bytes held by every layer (allocated buffers)."""
        return sum(layer.nbytes() for layer in self.policy_layers)

    def lengths(self) -> list[int]:
        """Physical slots per layer."""
        return [layer.length for layer in self.policy_layers]
