"""What an evaluator gives the sweep and the ablation: the :class:`Evaluation` of one policy (aggregates, per-sample
values for paired statistics, batch-by-batch progress) and the :class:`Evaluator` protocol every evaluator follows."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from ..config import ConfigIssue

__all__ = ["POOLED", "BatchReport", "Evaluation", "Evaluator"]


@dataclass
class BatchReport:
    """Progress of one evaluation, after a batch of samples: ``step`` counts batches from 0; ``metrics`` are the
    running aggregates over the samples done so far (what pruning looks at)."""

    step: int
    done: int
    total: int
    metrics: dict[str, float]


#: per-sample numerators and denominators of metrics pooled over tokens or steps (ratio of sums, not mean of ratios)
POOLED = {"nll": ("nll_sum", "tokens"), "kl": ("kl_sum", "steps"), "top1": ("top1_hits", "steps")}


@dataclass
class Evaluation:
    """What an evaluator returns for one policy.

    ``metrics``: aggregates over all samples (names of :data:`kvpolicy.sweep.METRICS`).
    ``per_sample``: per-sample values for paired statistics (ablations): for ``ppl``/``nll`` the NLL summed over the
    sample's scored tokens (``nll_sum``) and their count (``tokens``) — the perplexity of a subset is
    ``exp(sum(nll_sum) / sum(tokens))``; likewise ``kl`` from ``kl_sum``/``steps`` and ``top1`` from
    ``top1_hits``/``steps`` (:data:`POOLED`); any other metric is the mean of its per-sample values (NaN skipped).
    ``details``: anything else worth keeping (cache and speed figures). ``history``: the batch reports, in order.
    ``document``: the evaluator's own complete result (written beside the trial), if any."""

    metrics: dict[str, float]
    per_sample: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    history: list[BatchReport] = field(default_factory=list)
    document: dict[str, Any] | None = None

    def n_samples(self) -> int:
        return max((len(v) for v in self.per_sample.values()), default=0)

    def aggregate(self, metric: str, idx: np.ndarray | None = None) -> np.ndarray | float:
        """The metric over the samples ``idx`` (an index array; 2-D ``[resamples, n]`` gives one value per row)."""
        base = "nll" if metric == "ppl" else metric
        if base in POOLED and all(k in self.per_sample for k in POOLED[base]):
            num = np.asarray(self.per_sample[POOLED[base][0]], dtype=np.float64)
            den = np.asarray(self.per_sample[POOLED[base][1]], dtype=np.float64)
            if idx is None:
                idx = np.arange(len(num))
            with np.errstate(invalid="ignore", divide="ignore"):
                value = num[idx].sum(axis=-1) / den[idx].sum(axis=-1)
            return np.exp(value) if metric == "ppl" else value
        if metric in self.per_sample:
            values = np.asarray(self.per_sample[metric], dtype=np.float64)
            if idx is None:
                idx = np.arange(len(values))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmean(values[idx], axis=-1)
        if idx is None:
            return float(self.metrics[metric])
        raise KeyError(f"no per-sample values of {metric!r}: paired statistics need them")


class Evaluator(Protocol):
    """Computes the metrics of a policy on fixed samples. Built once per worker; :meth:`setup` loads what is heavy
    (model, data) and runs only when there is a trial to evaluate."""

    #: whether :func:`kvpolicy.models.resolve_model` must accept the sweep's ``model``
    needs_model: ClassVar[bool]

    @classmethod
    def check(cls, model: str, task: Mapping[str, Any], samples: int, metrics: Sequence[str]) -> list[ConfigIssue]:
        """Problems with the task (and which metrics it cannot produce), without loading anything."""
        ...

    def setup(self) -> None: ...

    def evaluate(self, policy: Mapping[str, Any], on_batch: Callable[[BatchReport], None] | None = None
                 ) -> Evaluation: ...

    def close(self) -> None: ...

