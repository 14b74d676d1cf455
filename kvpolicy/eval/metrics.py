"""Metrics: per-step NLL/KL/top-1 from logits, ROUGE-L, string match, pooled PPL and bootstrap intervals.

KL is ``KL(full || policy)`` of the next-token distributions, step by step along the teacher-forced target. The full
cache's distribution is stored on disk as its top-``k`` log-probabilities (:mod:`kvpolicy.eval.references`); the KL
is then taken over those ``k`` tokens plus one bucket holding the rest of the vocabulary. Merging outcomes can only
lose information, so this is a lower bound of the exact KL (equal when the bucket's mass is 0 or ``k`` is the whole
vocabulary, ``kl_topk=0``), and it is exactly 0 when the two distributions are identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.float32), dim=-1)


def topk_logp(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids int32 [B, k], logp float32 [B, k])`` of the ``k`` most likely tokens (``k=0``: the whole vocabulary,
    ids in vocabulary order)."""
    if k <= 0 or k >= logp.shape[-1]:
        ids = torch.arange(logp.shape[-1], device=logp.device).expand_as(logp)
        return ids.to(torch.int32), logp.clone()
    vals, ids = logp.topk(k, dim=-1)
    return ids.to(torch.int32), vals


def kl_from_topk(ref_ids: torch.Tensor, ref_logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row over P's stored top-k tokens plus a tail bucket. ``ref_ids``/``ref_logp`` ``[B, k]``,
    ``logq`` the policy's log-probabilities ``[B, V]``. Returns float64 ``[B]`` (clamped at 0 against rounding)."""
    lp = ref_logp.to(torch.float64)
    lq = logq.gather(-1, ref_ids.long()).to(torch.float64)
    p = lp.exp()
    kl = (p * (lp - lq)).sum(-1)
    if ref_ids.shape[-1] < logq.shape[-1]:
        p_tail = -torch.expm1(torch.logsumexp(lp, dim=-1)).clamp(min=0.0)
        q_tail = -torch.expm1(torch.logsumexp(lq, dim=-1)).clamp(min=0.0)
        tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=1e-300).log() - q_tail.clamp(min=1e-300).log()), 0.0)
        kl = kl + tail
    return kl.clamp(min=0.0)


def kl_exact(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row over the whole vocabulary (float64)."""
    lp, lq = logp.to(torch.float64), logq.to(torch.float64)
    return (lp.exp() * (lp - lq)).sum(-1).clamp(min=0.0)


# --------------------------------------------------------------------------------------------- text metrics
_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (``rouge-score``, default tokenizer: lower-cased alphanumeric words, no stemming)."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_scorer.score(reference, prediction)["rougeL"].fmeasure)


def rouge_l_ids(pred_ids: Sequence[int], ref_ids: Sequence[int], decode: Callable[[list[int]], str]) -> float:
    """ROUGE-L of two generations given as token ids: 1.0 when the ids are identical (also when the text has no
    word rouge-score counts), else ROUGE-L of the decoded texts."""
    if list(pred_ids) == list(ref_ids):
        return 1.0
    return rouge_l(decode(list(pred_ids)), decode(list(ref_ids)))


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_all``: the fraction of the gold answers found (case-insensitive) in the prediction."""
    if not answers:
        return float("nan")
    low = prediction.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_part`` (its QA tasks): 1 when any gold answer is found (case-insensitive), else 0."""
    if not answers:
        return float("nan")
    low = prediction.lower()
    return float(any(a.lower() in low for a in answers))


#: the string-match rule of a sample (:attr:`~kvpolicy.eval.tasks.Sample.match`)
STRING_MATCH: dict[str, Callable[[str, Sequence[str]], float]] = {
    "all": string_match_all,
    "part": string_match_part,
}


# --------------------------------------------------------------------------------------------- aggregation
def pooled_ppl(nll_sum: np.ndarray, n: np.ndarray) -> float:
    total = float(np.sum(n))
    return math.exp(float(np.sum(nll_sum)) / total) if total > 0 else float("nan")


def bootstrap(
    stat: Callable[[np.ndarray], float], n_samples: int, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(indices)`` over samples drawn with replacement."""
    if n_samples == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_samples, size=(n_boot, n_samples))
    vals = np.array([stat(d) for d in draws], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return (float("nan"), float("nan"))
    return (float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2)))


# --------------------------------------------------------------------------------------------- per task
#: the metrics each task reports, first = the headline metric; (key, label, higher_is_better). The one list: the
#: run/compare tables and plots show these, and :func:`produced_metrics` derives what a task can be optimised for
TASK_METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "continuation": [("ppl", "PPL", False), ("kl", "KL", False), ("top1", "top-1", True)],
    "instruct": [("rouge_l", "ROUGE-L", True), ("ppl", "PPL", False), ("kl", "KL", False), ("top1", "top-1", True)],
    "ruler": [
        ("exact_match_macro", "RULER score (mean of the per-task matches)", True),
        ("exact_match", "match (mean over samples)", True),
        ("ppl", "PPL", False),
        ("rouge_l", "ROUGE-L", True),
        ("kl", "KL", False),
    ],
    "needle": [
        ("exact_match", "match", True),
        ("ppl", "PPL", False),
        ("rouge_l", "ROUGE-L", True),
        ("kl", "KL", False),
    ],
}
DEFAULT_METRICS = [("ppl", "PPL", False), ("rouge_l", "ROUGE-L", True), ("kl", "KL", False), ("top1", "top-1", True)]


def metrics_for(task: str) -> list[tuple[str, str, bool]]:
    return TASK_METRICS.get(task, DEFAULT_METRICS)


#: what every task produces whatever it shows: the target is always teacher-forced (PPL/NLL, KL, top-1)
TEACHER_FORCED = ("ppl", "nll", "kl", "top1")


def produced_metrics(task: str) -> set[str]:
    """The metric names a task's evaluation produces (what a sweep objective on it may use): the teacher-forced
    ones of every task plus what :data:`TASK_METRICS` shows for it (``rouge_l``, ``exact_match``)."""
    return set(TEACHER_FORCED) | {key for key, _, _ in metrics_for(task)}


__all__ = [
    "DEFAULT_METRICS",
    "STRING_MATCH",
    "TASK_METRICS",
    "TEACHER_FORCED",
    "bootstrap",
    "kl_exact",
    "kl_from_topk",
    "log_softmax",
    "metrics_for",
    "pooled_ppl",
    "produced_metrics",
    "rouge_l",
    "rouge_l_ids",
    "string_match_all",
    "string_match_part",
    "topk_logp",
]
