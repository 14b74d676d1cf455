"""The prefill of one batch: its left-padded inputs, and the prompt through a cache — directly, or replayed from a
prefill recorded once for every policy of a grid (``docs/architecture.md``, "Recording and replay").

**Direct** (:func:`prefill`): the prompts run through the model into the policy's cache (``logits_to_keep=1``).
Samples with a question chunk (``Sample.question_tokens``, the query-agnostic protocol) take two forwards: the
contexts (compressed by the policy), then the questions appended uncompressed
(:meth:`~kvpolicy.core.cache.PolicyCache.appending`).

**Shared** (:func:`run_prefill`, when the :class:`~.context.Context` carries a :class:`PrefillStore` and the policy can
share, :func:`~kvpolicy.core.replay.can_share`): the store hands back the batch's
:class:`~kvpolicy.core.recording.PrefillRecording` (recording it on a miss: the same context forward on a recording
cache, which compresses nothing), and the policy's cache is replayed from it
(:func:`~kvpolicy.core.replay.replay`; the full cache: :func:`~kvpolicy.core.replay.full_cache`). A question chunk is
never recorded: it runs through the model on each replayed cache, as in the direct path. A sliding-window layer's
recording keeps its window only, except what a probe's or a query statistic's policy reads before it
(:func:`~kvpolicy.core.replay.beyond_window`): those policies get a recording of their own, under a key of their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..core.cache import PolicyCache
from ..core.policy import CachePolicy
from ..core.recording import FORMAT, PrefillRecording, record
from ..core.replay import beyond_window, can_share, full_cache, replay
from .context import Context
from .references import key_versions, model_fingerprint
from .spec import EvalError
from .tasks import Sample

__all__ = [
    "BatchInputs",
    "PrefillRun",
    "PrefillStore",
    "append_question",
    "batch_inputs",
    "left_pad",
    "mrope_model",
    "prefill",
    "prefill_context",
    "recording_key",
    "run_prefill",
]


# ================================================================================================== inputs
@dataclass
class BatchInputs:
    """Left-padded prompts of one batch and how decode steps are positioned. With question chunks, ``ids``/``mask``
    hold the left-padded contexts and ``q_ids``/``q_mask`` the left-padded questions (padding between a short
    question and its context is masked, positions come from the mask); ``mask`` is then the whole prompt's mask."""

    ids: torch.Tensor
    mask: torch.Tensor
    lens: list[int]
    width: int
    n_real: torch.Tensor  #: real (unpadded) prompt tokens per row
    pass_positions: bool  #: explicit position ids (padded text batches)
    extra: dict[str, Any]  #: prefill-only inputs (pixel values)
    q_ids: torch.Tensor | None = None  #: left-padded question chunks (query-agnostic protocol), else None
    context_mask: torch.Tensor | None = None  #: the context chunk's mask when there are question chunks

    @property
    def positions(self) -> torch.Tensor:
        """Position ids of every column of the whole prompt (left padding and inner padding skipped)."""
        return (self.mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of ``rows`` left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[r, width - len(row) :] = 1
    return ids, mask


def batch_inputs(ctx: Context, samples: Sequence[Sample]) -> BatchInputs:
    b = len(samples)
    lens = [len(s.prompt_ids) for s in samples]
    split = all(s.question_tokens > 0 for s in samples)
    if any(s.question_tokens > 0 for s in samples) and not split:
        raise EvalError("one batch mixes samples with and without a question chunk (see protocol.batches)")
    q_ids = context_mask = None
    if split:
        cut = [len(s.prompt_ids) - s.question_tokens for s in samples]
        ids, context_mask = left_pad([s.prompt_ids[: cut[r]] for r, s in enumerate(samples)], ctx.pad)
        q_ids, q_mask = left_pad([s.prompt_ids[cut[r] :] for r, s in enumerate(samples)], ctx.pad)
        mask = torch.cat([context_mask, q_mask], 1)
        q_ids, context_mask = q_ids.to(ctx.device), context_mask.to(ctx.device)
    else:
        ids, mask = left_pad([s.prompt_ids for s in samples], ctx.pad)
    width = mask.shape[1]
    extra: dict[str, Any] = {}
    if any(s.extra for s in samples):
        if b != 1:
            raise EvalError("samples with extra inputs (images) are evaluated one per batch")
        extra = {k: (v.to(ctx.device) if hasattr(v, "to") else v) for k, v in samples[0].extra.items()}
    return BatchInputs(
        ids=ids.to(ctx.device),
        mask=mask.to(ctx.device),
        lens=lens,
        width=width,
        n_real=torch.tensor(lens, dtype=torch.long),
        pass_positions=bool((mask == 0).any()) and not ctx.vlm,
        extra=extra,
        q_ids=q_ids,
        context_mask=context_mask,
    )


def mrope_model(model: Any) -> Any:
    """The inner model holding ``rope_deltas`` for M-RoPE models (Qwen2-VL, Qwen2.5-VL), else ``None``."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "rope_deltas") else None


# ================================================================================================== direct
def prefill_context(ctx: Context, inputs: BatchInputs, cache: Any) -> Any:
    """The first forward of the prefill: the whole prompts, or the contexts when there are question chunks."""
    positions = inputs.positions if inputs.pass_positions else None
    first_mask = inputs.mask if inputs.q_ids is None else inputs.context_mask
    with torch.inference_mode():
        return ctx.model(
            input_ids=inputs.ids,
            attention_mask=first_mask,
            position_ids=None if positions is None else positions[:, : inputs.ids.shape[1]],
            logits_to_keep=1,
            **inputs.extra,
            **{"past_key_values": cache, "use_cache": True},
        )


def append_question(ctx: Context, inputs: BatchInputs, cache: Any) -> Any:
    """The questions appended to the prefilled contexts, uncompressed (query-agnostic protocol)."""
    assert inputs.q_ids is not None
    positions = inputs.positions if inputs.pass_positions else None
    appending = cache.appending() if isinstance(cache, PolicyCache) else contextlib.nullcontext()
    with torch.inference_mode(), appending:
        return ctx.model(
            input_ids=inputs.q_ids,
            attention_mask=inputs.mask,
            position_ids=None if positions is None else positions[:, -inputs.q_ids.shape[1] :],
            logits_to_keep=1,
            **{"past_key_values": cache, "use_cache": True},
        )


def prefill(ctx: Context, inputs: BatchInputs, cache: Any) -> tuple[torch.Tensor, float]:
    """The prompts through ``cache``: the last position's logits (float32) and the seconds it took. With question
    chunks: the contexts first (the policy compresses them), then the questions appended uncompressed."""
    t0 = time.perf_counter()
    out = prefill_context(ctx, inputs, cache)
    if inputs.q_ids is not None:
        out = append_question(ctx, inputs, cache)
    return out.logits[:, -1].to(torch.float32), time.perf_counter() - t0


# ================================================================================================== shared
class PrefillStore(Protocol):
    """Where recordings live between the policies of a grid (bounded, evicting, maybe spilling to disk: the harness's
    choice). ``get_or_record`` returns the recording filed under ``key``, calling ``record()`` (and keeping its
    result) when there is none."""

    def get_or_record(self, key: str, record: Callable[[], PrefillRecording]) -> PrefillRecording: ...


def recording_key(
    ctx: Context, samples: Sequence[Sample], inputs: BatchInputs, keep: frozenset[str] = frozenset()
) -> str:
    """SHA-256 of what a batch's recorded prefill depends on: the model's fingerprint, dtype, device and attention
    backend, the batch's samples (content hashes, in batch order: the batch composition sets the padding), the padding
    id, the protocol mode (one prompt, or context + question), the thread count (it may change float rounding), the
    package versions, the recording format and what its sliding layers keep before their window (``keep``,
    :func:`~kvpolicy.core.replay.beyond_window`: a probe's or a query statistic's policy gets its own recording)."""
    text = ctx.model.config.get_text_config(decoder=True)
    doc = {
        "model": model_fingerprint(ctx.model),
        "dtype": str(ctx.model.dtype),
        "device": str(ctx.device),
        "backend": text._attn_implementation,
        "samples": [s.content_hash() for s in samples],
        "pad": ctx.pad,
        "mode": "prompt" if inputs.q_ids is None else "context+question",
        "threads": torch.get_num_threads(),
        "versions": key_versions(),
        "format": FORMAT,
        "beyond_window": sorted(keep),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class PrefillRun:
    """A batch's prefill as the protocol continues from it."""

    cache: Any  #: the policy's cache (or the full cache) after the prefill
    logits: torch.Tensor  #: float32 [B, V]: the last prompt position's logits
    #: seconds of the prefill: the forward(s) on the direct path; on a shared prefill the replay (and the question
    #: chunk's forward), not the recording, which the first policy of a batch pays once for all
    seconds: float
    shared: bool  #: replayed from a recorded prefill
    reason: str | None  #: why it was not shared (None when it was)
    record_seconds: float = 0.0  #: seconds this run spent recording the batch's prefill (a store miss), else 0


def _record(ctx: Context, inputs: BatchInputs, keep: frozenset[str]) -> PrefillRecording:
    """The batch's first forward, recorded (M-RoPE models: with the ``rope_deltas`` it left in the model)."""
    recording = record(ctx.model, lambda cache: prefill_context(ctx, inputs, cache).logits[:, -1], keep)
    mrope = mrope_model(ctx.model)
    if mrope is not None and isinstance(mrope.rope_deltas, torch.Tensor):
        recording.rope_deltas = mrope.rope_deltas.clone()
    return recording


def _unshared(ctx: Context, policy: CachePolicy | None, share: bool) -> str | None:
    if not share:
        return "this run compares the direct paths (the ratio-0 check)"
    if getattr(ctx, "prefill_store", None) is None:
        return "no prefill store (sharing is off)"
    return can_share(policy, ctx.model)


def run_prefill(
    ctx: Context, samples: Sequence[Sample], inputs: BatchInputs, policy: CachePolicy | None, share: bool = True
) -> PrefillRun:
    """The batch's prefill into ``policy``'s cache (``None``: transformers' ``DynamicCache``, the full cache): replayed
    from the context's prefill store when it has one and the policy can share (``share=False``: always direct)."""
    from transformers import DynamicCache

    from ..core.engine import make_cache

    reason = _unshared(ctx, policy, share)
    if reason is not None:
        cache = (make_cache(ctx.model, policy, ctx.tokenizer) if policy is not None
                 else DynamicCache(config=ctx.model.config))
        logits, seconds = prefill(ctx, inputs, cache)
        return PrefillRun(cache, logits, seconds, False, reason)
    recorded = []
    keep = beyond_window(policy, ctx.model, inputs.ids.shape[1])

    def timed_record() -> PrefillRecording:
        t = time.perf_counter()
        out = _record(ctx, inputs, keep)
        recorded.append(time.perf_counter() - t)
        return out

    recording = ctx.prefill_store.get_or_record(recording_key(ctx, samples, inputs, keep), timed_record)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if policy is not None:
            cache = replay(ctx.model, policy, recording, tokenizer=ctx.tokenizer)
        else:
            cache = full_cache(ctx.model, recording)
    mrope = mrope_model(ctx.model)
    if mrope is not None:
        mrope.rope_deltas = None if recording.rope_deltas is None else recording.rope_deltas.clone()
    logits = recording.logits.clone()
    if inputs.q_ids is not None:
        logits = append_question(ctx, inputs, cache).logits[:, -1].to(torch.float32)
    return PrefillRun(cache, logits, time.perf_counter() - t0, True, None, sum(recorded))
