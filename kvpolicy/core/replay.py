"""A policy's cache built from a recorded prefill (:mod:`kvpolicy.core.recording`) by the engine's own code.

:func:`replay` feeds each policy layer the recorded keys and values through
:meth:`~kvpolicy.core.layer.PolicyLayer.update` (the stage machine: storage, pending prefill stage), the recorded
validity through :meth:`~kvpolicy.core.layer.PolicyLayer.mark_new_tokens`, computes the statistics the policy declared
with :func:`~kvpolicy.core.statistics.step_statistics` (the function the attention function calls) from the recorded
queries, and lets :meth:`~kvpolicy.core.layer.PolicyLayer.finish_step` run the budget, the allocator, the scorer and
the reducer. Nothing here decides what to keep.

What equals what: the statistics a layer's parts see are computed by the same kernel from the same queries and keys as
in the direct path, *given the same layer inputs*. The inputs are the full cache's, so they equal the direct path's
wherever the direct path's earlier layers produced the full cache's outputs: always for a policy without whole-prompt
statistics; for one with them, the direct path computes a layer about to be compressed with a one-pass kernel equal to
SDPA only up to float rounding (``docs/architecture.md``), and the later layers of its replay differ by that rounding.

Sliding-window layers: a recording keeps a sliding layer's window only, plus what the policies it was recorded for read
before it (:mod:`kvpolicy.core.recording`; :func:`beyond_window` says what one policy needs). Each layer is fed every
column (:meth:`~kvpolicy.core.recording.LayerRecording.full`, zeros where nothing was kept), so the kernels run on the
direct path's shapes; what the zeros feed is freed by the window rule before any part sees it. A replay that would
read a column the recording lacks refuses before any layer is fed (:func:`replay`).

Whole-model allocation: because every layer's prefill is at hand before any is compressed, an allocator's optional
``model_keep`` (:class:`~kvpolicy.core.policy.ModelView`) may fix every layer's budget at once; the cache's
``allocation`` then says ``"whole-model"``.

Probes (:class:`~kvpolicy.core.policy.ProbeStat`, KVzip): a policy whose prefill stage waits for a probe waits here
too; the probe then runs through the model on the replayed cache, which holds every column of the recorded prompt (the
recording keeps its ``input_ids``; a sliding layer's values before its window are zeros, which its window's mask never
lets the probe read, and its keys are there: a recording for a probe keeps them), exactly as the direct path runs it
after its prefill forward. Its statistic depends on the prompt, the model and the probe only, so the first replay that
needs it computes it for every policy layer and keeps it with the recording (``LayerRecording.statistics``): later
policies of a grid reuse it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NoReturn

import torch
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from .cache import PolicyCache
from .engine import BACKENDS, make_cache
from .layer import PolicyLayer, take_active_layer
from .partcheck import PartError, part_label
from .policy import AttentionStat, CachePolicy, ModelView, ProbeStat, QueryStat
from .probe import ProbeError, ProbeScores
from .querystats import QueryStats, counted_queries
from .recording import LayerRecording, PrefillRecording
from .statistics import received_per_query_head, step_statistics

__all__ = ["beyond_window", "can_share", "full_cache", "replay"]


def can_share(policy: CachePolicy | None, model: Any) -> str | None:
    """Why ``policy`` cannot be replayed from a recorded prefill of ``model`` (``None``: it can), for a harness that
    then runs the direct path and says why.

    Checked and not a reason today: ``compressed_positions`` (it re-positions tokens *after* the prefill: the shift is
    only applied once a layer is prefilled), a chunked prefill (the engine's prefill is one forward; chunks appended
    after it, :meth:`~kvpolicy.core.cache.PolicyCache.appending`, run through the model on each replayed cache), the
    eager backend (the recording runs the same backend as the direct path: its pristine outputs are the same call),
    decode scorers, merges and per-slot state (they act after the prefill, on the replayed cache, by the same code),
    sliding-window layers (recorded as far back as the policy reads, :func:`beyond_window`; only a whole-model
    allocation gives way to the per-layer rule where a window is shorter than the prompt, see :func:`replay`)."""
    impl = model.config.get_text_config(decoder=True)._attn_implementation
    if impl not in BACKENDS.values():
        return f"the model's attention implementation is {impl!r}, not kvpolicy's (kvpolicy.attach(model) first)"
    return None


def _sliding_windows(model: Any) -> list[int]:
    """The sliding windows of ``model``'s decoder layers (one per sliding layer), as the policy cache reads them."""
    text = model.config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(text)
    n = text.num_hidden_layers
    return [kw["sliding_window"] for kind, kw in zip(types[:n], kwargs[:n])
            if kind == "sliding_attention" and kw.get("sliding_window") is not None]


def beyond_window(policy: CachePolicy | None, model: Any, columns: int) -> frozenset[str]:
    """What a recording of a ``columns``-column forward through ``model`` must keep before a sliding layer's window
    for ``policy`` to be replayed from it (``record(keep=...)``, :mod:`kvpolicy.core.recording`): ``"keys"`` for a
    probe (KVzip's statistic reads the whole chunk it reconstructs), ``"queries"`` for a query statistic over more
    queries than the shortest window the prompt outruns. Empty when no window is shorter than the prompt (nothing
    is left out then), for the full cache (``None``) and for every other policy: a harness files recordings under
    this answer, so that policies needing the same share one."""
    windows = [w for w in _sliding_windows(model) if w < columns]
    if policy is None or not windows:
        return frozenset()
    keep = {"keys"} if policy.probe_needs() else set()
    shortest = min(windows)
    if any(isinstance(n, QueryStat) and (n.window is None or n.window > shortest) for n in policy.prefill_needs()):
        keep.add("queries")
    return frozenset(keep)


def _check(cache: Any, recording: PrefillRecording) -> None:
    """The recording was made on a model with this cache's layers."""
    if len(cache.layers) != len(recording.layers):
        raise ValueError(f"recording: {len(recording.layers)} layers recorded for a cache of {len(cache.layers)}")


def _check_held(policy: CachePolicy, recording: PrefillRecording) -> None:
    """The recording holds every column ``policy`` reads (before a sliding layer's window, see :func:`beyond_window`)."""
    probe = bool(policy.probe_needs())
    queries = [n for n in policy.prefill_needs() if isinstance(n, QueryStat)]
    for i, rec in enumerate(recording.layers):
        if probe and rec.key_start > 0:
            _refuse(policy, i, rec, "keys", rec.key_start, "its probe scores every entry of a chunk it reconstructs")
        if rec.query_start == 0:
            continue
        none_before = torch.zeros(rec.valid.shape[0], dtype=torch.long, device=rec.valid.device)
        for need in queries:
            if bool(counted_queries(rec.valid, need.window, need.skip_first, none_before)[:, : rec.query_start].any()):
                _refuse(policy, i, rec, "queries", rec.query_start, f"its {need} counts earlier queries")


def _refuse(policy: CachePolicy, layer: int, rec: LayerRecording, what: str, start: int, why: str) -> NoReturn:
    raise ValueError(
        f"recording: layer {layer} (a sliding window) holds its {what} from column {start} of {rec.columns} only, and "
        f"policy {policy.name!r} reads earlier ones ({why}): record the batch with keep={{'{what}'}} "
        f"(kvpolicy.core.replay.beyond_window(policy, model, columns) says what a policy needs), or run it directly"
    )


def _feed(layer: PolicyLayer, rec: LayerRecording) -> tuple[dict, dict | None]:
    """One recorded prefill step into ``layer``, up to its statistics (what the attention function does before
    ``finish_step``, with the recorded tensors in place of the forward's). A statistic another replay of the same
    recording already computed is reused (a copy: parts must not write into it, and a copy makes sure of it)."""
    keys, values, query, lse = rec.full()
    layer.update(keys, values)
    take_active_layer(layer.layer_idx)  # the hand-off is meant for an attention call, and none follows
    new_valid = layer.mark_new_tokens(rec.valid)
    needs = layer.pending_needs()
    memo = rec.statistics
    # a ProbeStat always goes in: the step gives the probe its start positions (its statistic comes after, _probe)
    todo = frozenset(need for need in needs if need not in memo or isinstance(need, ProbeStat))
    stats, queries = step_statistics(layer, query, layer.keys, new_valid, todo, rec.scaling, rec.position_ids, lse=lse)
    for need in todo:
        if isinstance(need, QueryStat):
            memo[need] = queries[need]
        elif isinstance(need, AttentionStat):
            memo[need] = stats[need.window]
    attention = {need.window: memo[need].clone() for need in needs if isinstance(need, AttentionStat)}
    asked = {need: _copy(memo[need]) for need in needs if isinstance(need, QueryStat)}
    return attention, asked or None


def _copy(stats: QueryStats) -> QueryStats:
    return dataclasses.replace(
        stats,
        mean=stats.mean.clone(),
        covariance=None if stats.covariance is None else stats.covariance.clone(),
        count=stats.count.clone(),
        next_position=stats.next_position.clone(),
    )


def _model_keep(cache: PolicyCache, policy: CachePolicy, steps: list, model_keep: Any) -> None:
    """Ask the allocator's ``model_keep`` for every policy layer's budget, before any layer is compressed."""
    layers: list[PolicyLayer] = [layer for layer, _, _ in steps]
    recs: list[LayerRecording] = [rec for _, rec, _ in steps]

    def head_attention(i: int) -> torch.Tensor:
        rec = recs[i]
        keys, _, query, _ = rec.full()
        valid = rec.valid[:, None].expand(-1, keys.shape[1], -1)
        return received_per_query_head(query, keys, valid, rec.valid, rec.scaling)

    n_tokens = layers[0].n_tokens
    view = ModelView(
        layers=[layer.view("prefill", *stats) for layer, _, stats in steps],
        keep=policy.budget.prefill_keep(n_tokens),
        n_tokens=n_tokens,
        head_attention=head_attention,
    )
    keep = model_keep(view)
    if keep is None:
        return
    want = f"expected int64 [L, B] = [{len(layers)}, {n_tokens.shape[0]}] entries per policy layer and row"
    if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.shape[0] != len(layers):
        got = f"shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise PartError(part_label(policy, "allocator"), f"model_keep returned {got}; {want}")
    for layer, k in zip(layers, keep):
        layer.plan_prefill_keep(k)
    cache.allocation = "whole-model"


def _probe(model: Any, cache: PolicyCache, recording: PrefillRecording) -> ProbeScores:
    """The probe statistics of ``cache``'s policy (:mod:`kvpolicy.core.probe`) per policy layer, computed once per
    recording: the first replay that needs one runs the probe on its cache (every layer waits, holding the whole
    recorded prompt, so every layer is scored) and keeps the result with the recording; later replays read copies."""
    needs = cache.probe_needs
    if not needs:
        return {}
    pairs = list(zip(cache.policy_layers, recording.policy_layers, strict=True))  # in order (checked by _check)
    if any(need not in rec.statistics for _, rec in pairs for need in needs):
        if recording.input_ids is None:
            raise ProbeError("kvpolicy: the recording holds no input_ids (its forward passed embeddings), which a "
                             "probe needs: run this policy directly")
        cache.prompt_ids = recording.input_ids
        got = cache.run_probe(model)
        for layer, rec in pairs:
            rec.statistics.update(got[layer.layer_idx])
    return {layer.layer_idx: {need: rec.statistics[need].clone() for need in needs} for layer, rec in pairs}


def _window_binds(layers: list[PolicyLayer], recording: PrefillRecording) -> bool:
    """Whether a sliding-window layer's window is shorter than the recorded prompt (some column left it).

    The whole-model view (:class:`~kvpolicy.core.policy.ModelView`) spreads one budget, a fraction of the prompt's
    tokens, over layers that each hold the whole prompt uncompressed. A sliding layer whose window the prompt outruns
    holds only its window, so that view would mis-state it: such a replay keeps the per-layer rule, the direct path's
    (its ``allocation`` says ``per-layer``)."""
    columns = recording.token_types.shape[-1]
    return any(layer.window is not None and layer.window.size < columns for layer in layers)


def replay(
    model: Any, policy: CachePolicy, recording: PrefillRecording, whole_model: bool = True, tokenizer: Any = None
) -> PolicyCache:
    """``policy``'s cache after the recorded prefill, built by the engine's stage machine from ``recording`` (made on
    the same ``model``, attached). The caller continues from it as from a cache its own prefill filled (decode,
    teacher forcing, an appended question chunk); the prefill's logits are ``recording.logits``.

    ``whole_model``: let an allocator with ``model_keep`` fix every layer's budget from the whole prompt (``False``:
    its per-layer rule, as on the direct path). Ignored when a sliding-window layer's window is shorter than the
    recorded prompt (:func:`_window_binds`): the cache's ``allocation`` then says ``per-layer``. ``tokenizer``: for a
    probe that encodes text, as :func:`~kvpolicy.core.engine.make_cache` takes it."""
    cache = make_cache(model, policy, tokenizer)
    _check(cache, recording)
    _check_held(policy, recording)
    model_keep = getattr(policy.allocator, "model_keep", None) if whole_model else None
    if model_keep is not None and _window_binds(cache.policy_layers, recording):
        model_keep = None
    steps: list[tuple[PolicyLayer, LayerRecording, tuple[dict, dict | None]]] = []
    cache.token_types.types = recording.token_types  # what the recorded forward's input ids said
    try:
        for layer, rec in zip(cache.policy_layers, recording.layers):
            stats = _feed(layer, rec)
            if model_keep is None:  # one uncompressed layer at a time, as on the direct path
                layer.finish_step(*stats)
            else:
                steps.append((layer, rec, stats))
        if steps:
            _model_keep(cache, policy, steps, model_keep)
            for layer, _, stats in steps:
                layer.finish_step(*stats)
    finally:
        # later forwards read their token types from their own input ids, as on the direct path
        cache.token_types.types = None
    if cache.deferred:  # the prefill stage waits for a probe or for every layer's scores: as after a direct forward
        cache.compress_deferred(_probe(model, cache, recording) if cache.needs_probe else {})
    return cache


def full_cache(model: Any, recording: PrefillRecording) -> DynamicCache:
    """transformers' ``DynamicCache`` after the recorded prefill (the full-cache reference continues from it): the
    recording's keys and values are the full cache's, padding columns included (a sliding layer's window of them:
    transformers' own sliding layer keeps no more)."""
    cache = DynamicCache(config=model.config)
    _check(cache, recording)
    for layer, rec in zip(cache.layers, recording.layers):
        keys, values, _, _ = rec.full()  # every column: the layer counts them (its length), keeps its window of them
        layer.update(keys, values)
    return cache

