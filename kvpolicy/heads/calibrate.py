"""Head calibration: per decoder layer and kv head, how much the model's answers change when that head is streamed.

What is measured. DuoAttention (Xiao et al., 2024) calls a head a *retrieval* head when restricting it to the
attention sinks and a recent window changes the model's outputs, and a *streaming* head when it does not; the
authors learn a gate per kv head by gradient descent on a distillation loss over synthetic passkey prompts. kvpolicy
measures the same property directly, one head at a time, in the setting its caches run in: for each calibration
sample the context is prefilled with the full cache; then the question and the gold answer are teacher-forced once
with the full cache (the reference) and once per kv head with that head streamed (the first ``sinks`` and last
``recent`` context tokens kept, :mod:`kvpolicy.heads.ablation`). A head's score is the KL divergence
``KL(p_full || p_streamed)`` of the next-token distributions at the answer positions, averaged over positions and
samples (nats; higher = the head needs the whole context more; only the order matters to a policy).

Why this and not an attention-on-needle score: the latter is one pass cheaper but a proxy (a head may look at the
needle without its output mattering, or matter without peaking on it); with the prefill shared, the output
measurement costs ``1 + heads / batch`` short forwards per sample over question and answer only, and it is the
quantity a streamed head actually changes. Why KL rather than the gold answer's NLL: it also moves when the gold
token stays likely, and it is never negative.

Samples: RULER's needle tasks from :mod:`kvpolicy.eval.tasks.ruler` in its query-agnostic form (the question comes
after the context, as kvpolicy's ``ruler`` task runs by default), so every answer token's prediction depends on the
streamed cache. Deterministic for a seed; cached per model and settings (:mod:`kvpolicy.heads.store`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .ablation import Restriction, head_ablation, restricted
from .settings import HeadCalibration
from .store import cached_scores, model_identity, policy_layers, save_scores, scores_path
from .table import HeadScores

__all__ = ["CalibrationItem", "calibrate_heads", "calibration_items", "measure_heads", "streamed_columns"]


@dataclass(frozen=True)
class CalibrationItem:
    """One sample as the calibration runs it: ``context`` ids prefilled with the full cache, ``tail`` ids run after
    it (question, then the gold answer without its last token), ``first``: the tail position whose logits predict the
    first answer token measured (earlier tail positions read the question)."""

    context: list[int]
    tail: list[int]
    first: int


def item_from_sample(prompt_ids: Sequence[int], target_ids: Sequence[int], question_tokens: int) -> CalibrationItem:
    """Split a sample: the last ``question_tokens`` prompt ids and the answer follow the context.

    With no question split (``question_tokens == 0``) the first answer token is predicted by the context's own last
    position, which the full cache computes; it is not measured (the tail starts at the answer)."""
    prompt, target = list(prompt_ids), list(target_ids)
    q = int(question_tokens)
    context = prompt[: len(prompt) - q] if q else prompt
    tail = prompt[len(prompt) - q :] + target[:-1] if q else target[:-1]
    first = q - 1 if q else 0
    if not context or len(tail) <= first:
        raise ValueError("head calibration: a sample needs a context and at least one answer token after it")
    return CalibrationItem(context, tail, first)


def calibration_items(tokenizer: Any, settings: HeadCalibration) -> list[CalibrationItem]:
    """The calibration set: RULER samples (query-agnostic split) for ``settings``."""
    from ..eval.tasks.ruler import Ruler, RulerOptions

    options = RulerOptions(context_tokens=settings.context_tokens, tasks=settings.tasks, chat=settings.chat)
    samples = Ruler().load(tokenizer, settings.samples, settings.seed, options)
    return [item_from_sample(s.prompt_ids, s.target_ids or [], s.question_tokens) for s in samples]


def streamed_columns(n: int, sinks: int, recent: int) -> torch.Tensor:
    """bool ``[n]``: the context columns a streamed head keeps (the first ``sinks``, the last ``recent``)."""
    col = torch.arange(n)
    return (col < sinks) | (col >= n - recent)


def _log_probs(model: Any, ids: torch.Tensor, cache: Any, first: int) -> torch.Tensor:
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=ids.shape[1] - first)
    return torch.log_softmax(out.logits.to(torch.float32), dim=-1)


def _one_item(model: Any, item: CalibrationItem, units: list[tuple[int, int]], settings: HeadCalibration,
              device: Any) -> list[float]:
    """Mean KL at the answer positions of ``item`` for each unit streamed alone."""
    ctx = torch.tensor([item.context], device=device)
    tail = torch.tensor([item.tail], device=device)
    prefilled = DynamicCache(config=model.config)
    model(input_ids=ctx, past_key_values=prefilled, use_cache=True, logits_to_keep=1)
    ref = _log_probs(model, tail, copy.deepcopy(prefilled), item.first)  # [1, T, V]
    kept = streamed_columns(len(item.context), settings.sinks, settings.recent)
    out: list[float] = []
    template = None
    for start in range(0, len(units), settings.batch):
        group = units[start : start + settings.batch]
        if template is None or template.layers[0].keys.shape[0] != len(group):
            template = copy.deepcopy(prefilled)
            template.batch_repeat_interleave(len(group))
        layer = torch.tensor([u[0] for u in group], device=device)
        head = torch.tensor([u[1] for u in group], device=device)
        with restricted(Restriction(layer, head, kept)):
            lp = _log_probs(model, tail.expand(len(group), -1), copy.deepcopy(template), item.first)
        kl = (ref.exp() * (ref - lp)).sum(-1).mean(-1)  # [group]
        out.extend(kl.tolist())
    return out


def measure_heads(
    model: Any,
    items: Sequence[CalibrationItem],
    settings: HeadCalibration,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """float64 ``[L, H]``: the mean KL per kv head of the full-attention layers
    (:func:`~kvpolicy.heads.store.policy_layers`), NaN for the other layers."""
    text = model.config.get_text_config(decoder=True)
    n_layers, n_heads = text.num_hidden_layers, text.num_key_value_heads
    units = [(layer, h) for layer in policy_layers(model.config) for h in range(n_heads)]
    total = torch.full((n_layers, n_heads), float("nan"), dtype=torch.float64)
    sums = torch.zeros(len(units), dtype=torch.float64)
    device = next(model.parameters()).device
    with torch.no_grad(), head_ablation(model):
        for i, item in enumerate(items):
            sums += torch.tensor(_one_item(model, item, units, settings, device), dtype=torch.float64)
            if progress is not None:
                progress(i + 1, len(items))
    for (layer, h), s in zip(units, (sums / max(1, len(items))).tolist()):
        total[layer, h] = s
    return total


def items_digest(items: Sequence[CalibrationItem]) -> str:
    """A hash of caller-supplied calibration items (part of the cache key in place of the generated set)."""
    doc = [[it.context, it.tail, it.first] for it in items]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def calibrate_heads(
    model: Any,
    tokenizer: Any = None,
    settings: HeadCalibration | None = None,
    *,
    items: Sequence[CalibrationItem] | None = None,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> HeadScores:
    """Head scores of ``model`` for ``settings``: read from the cache when this model was calibrated with the same
    settings (``use_cache``), else measured (:func:`measure_heads`) and cached.

    ``items`` replaces the generated RULER set (tests, custom data; then no ``tokenizer`` is needed and the cache key
    includes their hash, so a part that looks scores up by model and settings never finds them)."""
    settings = settings or HeadCalibration()
    identity = model_identity(model)
    path = scores_path(identity, settings, items_digest(items) if items is not None else "")
    if use_cache:
        found = cached_scores(path)
        if found is not None:
            return found
    if items is None:
        if tokenizer is None:
            raise ValueError("calibrate_heads: a tokenizer is needed to generate the calibration set (or pass items)")
        items = calibration_items(tokenizer, settings)
    t0 = time.perf_counter()
    scores = measure_heads(model, items, settings, progress)
    meta = {
        "schema": "kvpolicy.head_scores/1",
        "measure": "mean KL(full || one kv head streamed) at the answer positions, nats",
        "model_identity": identity,
        "settings": settings.key_document(),
        "items": len(items),
        "seconds": round(time.perf_counter() - t0, 3),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    result = HeadScores(scores, source=str(path), meta=meta)
    save_scores(path, result)
    return result
