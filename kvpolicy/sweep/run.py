"""``kvpolicy sweep``: Optuna studies over policy parameters, from a YAML file; resumable, distributable, logged to W&B.

One sweep = one Optuna study (named by the file's ``name``), kept in an Optuna storage: by default an SQLite file in the
results folder (``results/sweeps/<name>/study.db``), or any storage URL (``--storage postgresql://...``) so workers on
several machines share one study. Running the same command again resumes the study by name.

Flow of one worker (:func:`run_sweep`):

1. the sweep file is validated completely (:func:`kvpolicy.sweep_config.load_sweep`) — nothing is loaded before;
2. the study is created or loaded; a study created from a different model / task / samples / space / objectives is
   refused (its trials would not be comparable);
3. trials left RUNNING by a dead worker are failed and re-queued with the same parameters
   (:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`): a worker on *this* machine is known dead when its
   recorded process is gone; a worker elsewhere when its trial's heartbeat is older than the grace period (Optuna's
   ``heartbeat_interval`` / ``grace_period`` on RDB storages);
4. trials run (ask → evaluate → tell) until the study holds ``n_trials`` finished (complete or pruned) trials, counted
   across every worker, or ``timeout`` passes. A trial's result goes to the storage first, then to the local results
   files (``trials.jsonl`` log, ``trials.csv`` / ``trials.json`` tables, atomic), and only then to W&B, so a W&B
   failure never loses a trial. Parameters identical to a finished trial's reuse its result (evaluation is
   deterministic: same model, same samples);
5. at the end: the best policy as a ready-to-use YAML (single objective: the best trial; several: the Pareto trial
   closest to the ideal point, and every Pareto policy under ``pareto/``), ``summary.json`` (best trials, Pareto front,
   parameter importances), PNG plots and a W&B summary run.

Objectives are computed by an **evaluator** (:class:`Evaluator`): ``harness`` (the default) runs
:mod:`kvpolicy.eval` on the model; ``synthetic`` is a cheap deterministic stand-in with the same interface, for testing
the machinery (storage, resume, workers, W&B, plots) without a model; ``module:attribute`` plugs in your own.

Exit codes of :func:`sweep_cli`: 0 the study holds its trials (or the timeout stopped the loop), 1 trials failed /
nothing could be evaluated, 2 the sweep file or options are invalid (or the study was created by a different sweep),
130 interrupted (Ctrl-C / SIGTERM: the running trial is marked failed and re-queued for the next run; the worker
writes the tables and ``summary.json`` but leaves the plots and the W&B summary run to the run that completes the
study, and exits within ``$KVPOLICY_STOP_TIMEOUT_S`` seconds (default 5) whatever W&B does: :mod:`kvpolicy.stopping`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import importlib
import io
import json
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from .config import (
    ConfigIssue,
    PolicyConfigError,
    policy_to_dict,
    read_policy_document,
    resolve_policy,
)
from .sweep_config import (
    METRICS,
    SweepConfigError,
    SweepSpec,
    expand_params,
    load_sweep,
)
from .stopping import (
    arm_stop_deadline,
    held_interrupts,
    hold_interrupts,
    interrupt_handler,
    release_interrupts,
    stop_timeout_s,
)

__all__ = [
    "BatchReport",
    "Evaluation",
    "Evaluator",
    "EvaluatorLookupError",
    "StudyMismatchError",
    "SweepOutcome",
    "SyntheticEvaluator",
    "atomic_write_text",
    "get_evaluator_class",
    "open_storage",
    "report_cli",
    "report_study",
    "run_sweep",
    "sweep_cli",
    "write_study_outputs",
]

ATTR_PREFIX = "kvpolicy."
FINISHED = ("COMPLETE", "PRUNED")
BUDGET_METRICS = ("cache_bytes", "cache_fraction", "seconds_per_sample")


# ======================================================================================================= evaluators
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

    ``metrics``: aggregates over all samples (names of :data:`kvpolicy.sweep_config.METRICS`).
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


class EvaluatorLookupError(LookupError):
    pass


def get_evaluator_class(name: str) -> type:
    """``harness``, ``synthetic`` or ``package.module:attribute``."""
    if name == "synthetic":
        return SyntheticEvaluator
    if name == "harness":
        return HarnessEvaluator
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise EvaluatorLookupError(f"cannot import evaluator {name!r}: {type(exc).__name__}: {exc}") from None
        for method in ("check", "setup", "evaluate"):
            if not callable(getattr(obj, method, None)):
                raise EvaluatorLookupError(f"evaluator {name!r} has no {method}() method (see kvpolicy.sweep.Evaluator)")
        return obj
    raise EvaluatorLookupError(
        f"unknown evaluator {name!r}; allowed: harness (kvpolicy.eval on the model), synthetic (no model: for testing "
        "the machinery), or module:attribute"
    )


def make_evaluator(name: str, model: str, task: Mapping[str, Any], samples: int, batch_size: int) -> Any:
    cls = get_evaluator_class(name)
    return cls(model=model, task=dict(task), samples=samples, batch_size=batch_size)


class SyntheticEvaluator:
    """A deterministic stand-in for a real evaluation: metrics are smooth functions of the policy's budget and decode
    offset plus fixed per-sample noise (the same for every policy, so paired statistics behave as with a real model).
    Costs ``sleep_s`` seconds per sample. Task fields: ``sleep_s`` (0), ``noise`` (0.05), ``prompt_tokens`` (512),
    ``fail_ratio_above`` (raise for a ratio above it: to test failed trials)."""

    needs_model: ClassVar[bool] = False
    TASK_FIELDS: ClassVar[dict[str, type]] = {"sleep_s": float, "noise": float, "prompt_tokens": int,
                                              "fail_ratio_above": float, "name": str}

    def __init__(self, model: str = "synthetic", task: Mapping[str, Any] | None = None, samples: int = 8,
                 batch_size: int = 1):
        task = dict(task or {})
        self.sleep_s = float(task.get("sleep_s", 0.0))
        self.noise = float(task.get("noise", 0.05))
        self.prompt_tokens = int(task.get("prompt_tokens", 512))
        self.fail_ratio_above = task.get("fail_ratio_above")
        self.samples = samples
        self.batch_size = batch_size

    @classmethod
    def check(cls, model: str, task: Mapping[str, Any], samples: int, metrics: Sequence[str]) -> list[ConfigIssue]:
        issues = []
        for k, v in task.items():
            if k not in cls.TASK_FIELDS:
                issues.append(ConfigIssue(f"task.{k}", f"unknown field of the synthetic task; fields: "
                                                       f"{', '.join(cls.TASK_FIELDS)}"))
            elif not isinstance(v, (int, float, str)) or (cls.TASK_FIELDS[k] is not str and isinstance(v, str)):
                issues.append(ConfigIssue(f"task.{k}", f"expected a number, got {v!r}"))
        return issues

    def setup(self) -> None:
        pass

    def close(self) -> None:
        pass

    def evaluate(self, policy: Mapping[str, Any], on_batch: Callable[[BatchReport], None] | None = None
                 ) -> Evaluation:
        resolved = resolve_policy(policy)
        ratio = resolved.budget.ratio
        if ratio is None:
            ratio = max(0.0, 1.0 - (resolved.budget.tokens or self.prompt_tokens) / self.prompt_tokens)
        if self.fail_ratio_above is not None and ratio > float(self.fail_ratio_above):
            raise RuntimeError(f"synthetic failure: ratio {ratio} above {self.fail_ratio_above}")
        decode = resolved.spec.decode
        offset = float(getattr(decode, "offset", None) or -25) if decode is not None else -25.0
        reducer = resolved.spec.reducer.name if resolved.spec.reducer is not None else "evict"
        encode = resolved.spec.encode.name if resolved.spec.encode is not None else None
        penalty = 1.0 + 1.6 * ratio**3
        penalty *= 1.0 + 0.0015 * abs(offset + 20.0)
        penalty *= 1.0 if reducer == "anchor_merge" else 1.04
        penalty *= {"frequency": 1.0, "h2o": 1.01, "tova": 1.02, "snapkv": 1.0, "local": 1.05}.get(encode or "", 1.1)
        rng = np.random.default_rng(1234)
        base_nll = np.log(12.0) + rng.normal(0.0, 0.35, size=self.samples)
        jitter = rng.normal(0.0, self.noise, size=self.samples)
        tokens = rng.integers(24, 64, size=self.samples).astype(float)
        nll = base_nll + np.log(penalty) * (1.0 + jitter)
        per_sample: dict[str, list[float]] = {"nll_sum": [], "tokens": [], "rouge_l": [], "kl": [], "top1": [],
                                              "exact_match": []}
        history: list[BatchReport] = []
        t0 = time.perf_counter()
        for start in range(0, self.samples, self.batch_size):
            stop = min(self.samples, start + self.batch_size)
            for i in range(start, stop):
                if self.sleep_s:
                    time.sleep(self.sleep_s)
                per_sample["nll_sum"].append(float(nll[i] * tokens[i]))
                per_sample["tokens"].append(float(tokens[i]))
                per_sample["rouge_l"].append(float(np.clip(0.55 - 0.35 * ratio**2 + 0.05 * jitter[i], 0, 1)))
                per_sample["kl"].append(float(max(0.0, np.log(penalty) * (1 + jitter[i]))))
                per_sample["top1"].append(float(np.clip(1.0 - 0.4 * ratio**2 - 0.02 * jitter[i], 0, 1)))
                per_sample["exact_match"].append(float(jitter[i] > (ratio - 0.9)))
            partial = Evaluation({}, per_sample)
            running = {"ppl": float(partial.aggregate("ppl")), "nll": float(partial.aggregate("nll")),
                       **{m: float(partial.aggregate(m)) for m in ("rouge_l", "kl", "top1", "exact_match")}}
            report = BatchReport(step=len(history), done=stop, total=self.samples, metrics=running)
            history.append(report)
            if on_batch is not None:
                on_batch(report)
        seconds = time.perf_counter() - t0
        ev = Evaluation({}, per_sample, history=history)
        per_sample["cache_bytes"] = [0.0] * self.samples  # filled below (one value per sample, like the harness)
        bytes_full = self.prompt_tokens * 30 * 3 * 64 * 2 * 4
        metrics = {
            "ppl": float(ev.aggregate("ppl")),
            "nll": float(ev.aggregate("nll")),
            "rouge_l": float(ev.aggregate("rouge_l")),
            "kl": float(ev.aggregate("kl")),
            "top1": float(ev.aggregate("top1")),
            "exact_match": float(ev.aggregate("exact_match")),
            "cache_bytes": float(bytes_full * (1.0 - ratio)),
            "cache_fraction": float(1.0 - ratio),
            "seconds_per_sample": seconds / max(1, self.samples),
        }
        per_sample["cache_bytes"] = [metrics["cache_bytes"]] * self.samples
        per_sample["cache_fraction"] = [metrics["cache_fraction"]] * self.samples
        ev.metrics = metrics
        ev.details = {"evaluator": "synthetic", "full_cache_bytes": bytes_full, "ratio": ratio}
        return ev


#: EvalSpec fields a sweep's ``task`` may set besides the task's name and options
HARNESS_FIELDS = ("seed", "dtype", "backend", "device", "threads", "protocol", "kl_topk", "reference_dir",
                  "use_reference_cache", "check_ratio0")
#: metrics each built-in task can produce (others: every metric but exact_match)
_TASK_PRODUCES = {
    "continuation": {"ppl", "nll", "kl", "top1"},
    "instruct": {"ppl", "nll", "kl", "top1", "rouge_l"},
    "needle": {"ppl", "nll", "kl", "top1", "rouge_l", "exact_match"},
}
_ALWAYS = {"cache_bytes", "cache_fraction", "seconds_per_sample"}


class HarnessEvaluator:
    """The real evaluation: :func:`kvpolicy.eval.evaluate` on the sweep's model and task, against the full cache.

    The sweep's ``task`` holds the task's ``name`` (``continuation``, ``instruct``, ``needle``, ``jsonl``), the task's
    options (``context_tokens``, ...) and optionally EvalSpec settings (:data:`HARNESS_FIELDS`: ``dtype``, ``seed``,
    ``kl_topk``, ...). The model and the samples load once (:meth:`setup`); every trial reuses them, and the full-cache
    references are computed on the first trial and cached on disk. ``check_ratio0`` (default ``first``) runs the
    harness's ratio-0 honesty check on the first evaluation only (``true``: on every one, ``false``: never).

    Metrics: ``ppl`` (pooled over the scored target tokens), ``nll``, ``kl``, ``top1``, ``rouge_l`` and ``exact_match``
    (tasks that generate), ``cache_bytes`` (key/value bytes held at the end of the sample, mean over samples),
    ``cache_fraction`` (that over the full cache's), ``seconds_per_sample`` (prefill + decode of the policy).
    ``kvpolicy.eval`` is imported lazily, so validating a sweep file imports no model code."""

    needs_model: ClassVar[bool] = True

    def __init__(self, model: str, task: Mapping[str, Any], samples: int, batch_size: int):
        self.model_name = model
        self.task = dict(task)
        self.samples_n = samples
        self.batch_size = batch_size
        self.model: Any = None
        self.tokenizer: Any = None
        self.samples: Any = None
        self.evaluations = 0

    @staticmethod
    def _split(task: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
        task = dict(task)
        name = str(task.pop("name", "continuation"))
        settings = {k: task.pop(k) for k in list(task) if k in HARNESS_FIELDS}
        return name, task, settings

    @classmethod
    def _eval_spec(cls, model: str, task: Mapping[str, Any], samples: int, batch_size: int, policy: Any = "full",
                   first: bool = True) -> Any:
        from .eval import EvalSpec

        name, options, settings = cls._split(task)
        check = settings.pop("check_ratio0", "first")
        settings["check_ratio0"] = bool(first) if check == "first" else bool(check)
        return EvalSpec(model=model, task=name, task_options=options, policy=policy, samples=samples,
                        batch_size=batch_size, bootstrap=0, quiet=True, keep_generations=True, **settings)

    @classmethod
    def check(cls, model: str, task: Mapping[str, Any], samples: int, metrics: Sequence[str]) -> list[ConfigIssue]:
        from pydantic import ValidationError

        try:
            from .eval import TaskError, get_task
        except ImportError as exc:
            return [ConfigIssue("evaluator", f"the evaluation harness (kvpolicy.eval) cannot be imported ({exc}); "
                                             "use evaluator: synthetic to test the sweep machinery")]
        issues: list[ConfigIssue] = []
        name, options, settings = cls._split(task)
        if "check_ratio0" in settings and settings["check_ratio0"] not in ("first", True, False):
            issues.append(ConfigIssue("task.check_ratio0", f"{settings['check_ratio0']!r} is not allowed; allowed "
                                                           "values: first, true, false"))
            settings.pop("check_ratio0")
        try:
            cls._eval_spec(model, {"name": name, **settings}, samples, 1)
        except ValidationError as exc:
            for e in exc.errors(include_url=False):
                loc = ".".join(str(x) for x in e["loc"])
                issues.append(ConfigIssue(f"task.{loc}" if loc in HARNESS_FIELDS else loc,
                                          f"{e['msg']}, got {e.get('input')!r}"))
        try:
            t = get_task(name)
        except TaskError as exc:
            return issues + [ConfigIssue("task.name", str(exc))]
        try:
            t.options(options)
        except ValidationError as exc:
            for e in exc.errors(include_url=False):
                loc = ".".join(str(x) for x in e["loc"])
                msg = e["msg"]
                if e["type"] == "extra_forbidden":
                    msg = (f"unknown option of task {name!r}; options: {', '.join(t.Options.model_fields)}; "
                           f"settings: {', '.join(HARNESS_FIELDS)}")
                issues.append(ConfigIssue(f"task.{loc}", f"{msg} (value {e.get('input')!r})"))
        produces = _TASK_PRODUCES.get(name, set(METRICS) - {"exact_match"}) | _ALWAYS
        for i, m in enumerate(metrics):
            if m not in produces:
                issues.append(ConfigIssue(
                    f"objectives[{i}].metric",
                    f"task {name!r} does not produce {m!r}; it gives: {', '.join(sorted(produces))}"))
        return issues

    def setup(self) -> None:
        from .eval import get_task
        from .eval.runner import load_eval_model

        spec = self._eval_spec(self.model_name, self.task, self.samples_n, self.batch_size)
        with contextlib.suppress(Exception):  # the sweep shows its own progress
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        self.model, self.tokenizer = load_eval_model(spec.model, spec.dtype, spec.device)
        task = get_task(spec.task)
        self.samples = task.load(self.tokenizer, spec.samples, spec.seed, task.options(spec.task_options))

    def evaluate(self, policy: Mapping[str, Any], on_batch: Callable[[BatchReport], None] | None = None
                 ) -> Evaluation:
        from .eval import evaluate as harness_evaluate

        if self.model is None:
            self.setup()
        spec = self._eval_spec(self.model_name, self.task, self.samples_n, self.batch_size, policy=dict(policy),
                               first=self.evaluations == 0)
        history: list[BatchReport] = []

        def callback(update: Any) -> None:
            rep = BatchReport(step=len(history), done=update.done, total=update.total,
                              metrics={k: float(v) for k, v in update.running.items() if v is not None})
            history.append(rep)
            if on_batch is not None:
                on_batch(rep)

        result = harness_evaluate(spec, callback, model=self.model, tokenizer=self.tokenizer, samples=self.samples)
        self.evaluations += 1
        ev = evaluation_from_result(result)
        ev.history = history
        return ev

    def close(self) -> None:
        self.model = self.tokenizer = self.samples = None


def evaluation_from_result(result: Any) -> Evaluation:
    """An :class:`Evaluation` from a :class:`kvpolicy.eval.EvalResult` (metrics, per-sample values, details)."""
    pm, fm = result.policy_metrics, result.full
    samples = result.samples
    per: dict[str, list[float]] = {
        "nll_sum": [s.policy.nll_sum for s in samples],
        "tokens": [float(s.policy.scored_tokens) for s in samples],
        "kl_sum": [s.policy.kl_sum for s in samples],
        "top1_hits": [float(s.policy.top1_hits) for s in samples],
        "steps": [float(s.policy.steps) for s in samples],
        "cache_bytes": [float(s.policy.bytes_end) for s in samples],
        "cache_fraction": [s.policy.bytes_end / s.full.bytes_end if s.full.bytes_end else float("nan")
                           for s in samples],
        "seconds_per_sample": [s.policy.prefill_s + s.policy.decode_s for s in samples],
    }
    for name in ("rouge_l", "exact_match"):
        vals = [getattr(s.policy, name) for s in samples]
        if any(v is not None for v in vals):
            per[name] = [float("nan") if v is None else float(v) for v in vals]
    n = max(1, len(samples))
    metrics: dict[str, float] = {
        "ppl": float(pm.ppl),
        "nll": float(math.log(pm.ppl)) if pm.ppl > 0 else float("nan"),
        "cache_bytes": float(pm.bytes_end),
        "cache_fraction": float(pm.bytes_end / fm.bytes_end) if fm.bytes_end else float("nan"),
        "seconds_per_sample": float((pm.prefill_s + pm.decode_s) / n),
        # the full cache on the same samples (not objectives: reference lines for tables and plots)
        "full_ppl": float(fm.ppl),
        "full_cache_bytes": float(fm.bytes_end),
    }
    for name in ("kl", "top1", "rouge_l", "exact_match"):
        v = getattr(pm, name)
        if v is not None:
            metrics[name] = float(v)
    details = {
        "full": {"ppl": fm.ppl, "bytes_prefill": fm.bytes_prefill, "bytes_end": fm.bytes_end,
                 "prefill_s": fm.prefill_s, "decode_s": fm.decode_s},
        "policy": {"ppl": pm.ppl, "ratio_prefill": pm.ratio_prefill, "ratio_end": pm.ratio_end,
                   "kept_tokens_prefill": pm.kept_tokens_prefill, "kept_tokens_end": pm.kept_tokens_end,
                   "prompt_tokens": pm.prompt_tokens, "bytes_prefill": pm.bytes_prefill, "bytes_end": pm.bytes_end,
                   "allocated_bytes_prefill": pm.allocated_bytes_prefill,
                   "allocated_bytes_end": pm.allocated_bytes_end, "prefill_s": pm.prefill_s,
                   "decode_s": pm.decode_s, "decode_tokens_per_s": pm.decode_tokens_per_s},
        "delta_ppl": result.delta["ppl"].value if "ppl" in result.delta else None,
        "honesty": {k: v for k, v in result.honesty.items() if k in ("checked", "passed", "memoised", "reason")},
        "reference": result.reference,
        "complete": result.complete,
        # the dtype the trial computed in (``auto`` resolved on the machine that ran it)
        "dtype": result.dtype,
        "wall_s": result.wall_s,
        "dtype": str(result.model.get("dtype")),  # what the model really ran in (best_policy.yaml carries it)
    }
    ev = Evaluation(metrics=metrics, per_sample=per, details=details)
    ev.document = result.model_dump(mode="json")
    return ev


# ========================================================================================================== storage
class StudyMismatchError(RuntimeError):
    """The study named by the sweep already exists but was created by a sweep with different trial semantics."""


def _retry_callback(max_retries: int) -> Any:
    """Optuna's callback that re-queues a dead worker's trial (renamed in Optuna 4.9; both names work)."""
    import optuna.storages as st

    cls = getattr(st, "RetryHeartbeatStaleTrialCallback", None) or st.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(max_retry=max_retries)


def _stale_kwarg() -> str:
    import inspect

    from optuna.storages import RDBStorage

    params = inspect.signature(RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


def open_storage(url: str, heartbeat_s: int = 15, grace_s: int | None = None, max_retries: int = 3) -> Any:
    """An Optuna storage for ``url``. RDB URLs (sqlite, postgresql, mysql...) get a heartbeat (``heartbeat_s``), a
    grace period (default 4 heartbeats) and a retry callback (``max_retries``) for trials whose worker died."""
    import optuna
    from optuna.storages import RDBStorage

    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        if str(db) not in ("", ":memory:"):
            db.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    import sqlalchemy.exc

    stale_kwarg = _stale_kwarg()
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_s,
                    grace_period=grace_s or 4 * heartbeat_s,
                    **{stale_kwarg: _retry_callback(max_retries)},
                )
                _hold_interrupts_in_transactions(storage)
                return storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
            # workers starting together on an empty database race to create Optuna's tables; the loser retries
            # (and a database that is still starting gets a few seconds)
            if attempt == 5:
                raise
            time.sleep(0.5 + attempt + (os.getpid() % 7) / 10)
    raise AssertionError("unreachable")


def _fingerprint_hash(fp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _make_sampler(spec: SweepSpec, seed_offset: int) -> Any:
    import optuna

    seed = None if spec.sampler.seed is None else spec.sampler.seed + seed_offset
    name = spec.sampler.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "grid":
            return optuna.samplers.GridSampler(spec.grid() or {}, seed=seed)
        if name == "nsgaii":
            pop = spec.sampler.population_size or max(2, min(50, spec.target_trials() // 3))
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
        startup = spec.sampler.n_startup_trials
        if startup is None:
            startup = min(10, max(3, spec.target_trials() // 3))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                          constant_liar=True)


def _make_pruner(spec: SweepSpec) -> Any:
    import optuna

    p = spec.pruning
    if not p.enabled or p.pruner == "none" or spec.multi_objective:
        return optuna.pruners.NopPruner()
    if p.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.pruner == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                               n_warmup_steps=p.n_warmup_steps)
    if p.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.HyperbandPruner()


def open_study(spec: SweepSpec, storage: Any, seed_offset: int | None = None) -> Any:
    """Create the study or load it by name; refuse a study whose trials were computed differently."""
    import optuna

    fp = spec.fingerprint()
    fp_hash = _fingerprint_hash(fp)
    study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions,
                                load_if_exists=True)
    if [d.name.lower() for d in study.directions] != spec.directions:
        raise StudyMismatchError(
            f"study {spec.name!r} in {_safe_url(storage)} optimises {[d.name.lower() for d in study.directions]}, "
            f"this sweep {spec.directions}: give the sweep another name to start a new study")
    attrs = study.user_attrs
    stored = attrs.get(ATTR_PREFIX + "fingerprint_hash")
    if stored is None:
        study.set_user_attr(ATTR_PREFIX + "fingerprint_hash", fp_hash)
        study.set_user_attr(ATTR_PREFIX + "fingerprint", json.loads(json.dumps(fp, default=str)))
        study.set_user_attr(ATTR_PREFIX + "sweep", json.loads(spec.model_dump_json()))
    elif stored != fp_hash:
        old = attrs.get(ATTR_PREFIX + "fingerprint", {})
        differ = sorted(k for k in set(old) | set(fp) if json.dumps(old.get(k), sort_keys=True, default=str)
                        != json.dumps(json.loads(json.dumps(fp.get(k), default=str)), sort_keys=True, default=str))
        raise StudyMismatchError(
            f"study {spec.name!r} already exists in {_safe_url(storage)} with a different {', '.join(differ) or 'setup'}"
            f"; its trials would not be comparable. Give this sweep another name (name: ...), or another --output / "
            f"--storage")
    if seed_offset is None:
        seed_offset = len(study.get_trials(deepcopy=False))
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=_make_sampler(spec, seed_offset),
                             pruner=_make_pruner(spec))


def _hold_interrupts_in_transactions(storage: Any) -> None:
    """Make every Optuna session of ``storage`` hold SIGINT/SIGTERM from its first statement until it is closed (main
    thread): a ``KeyboardInterrupt`` inside an SQLite call left a read open, on which the stop's own writes then
    waited for the busy timeout (:mod:`kvpolicy.stopping`). The held interrupt is raised when ``close()`` returns."""
    from sqlalchemy import event

    registry = getattr(storage, "scoped_session", None)
    factory = getattr(registry, "session_factory", None)
    if factory is None or getattr(factory.class_, "holds_interrupts", False):
        return

    class HoldingSession(factory.class_):  # type: ignore[misc,name-defined]
        holds_interrupts = True

        def close(self) -> None:
            try:
                super().close()
            finally:
                if self.info.pop("kvpolicy.held", False):
                    release_interrupts()

    def after_begin(session: Any, transaction: Any, connection: Any) -> None:
        if threading.current_thread() is threading.main_thread() and not session.info.get("kvpolicy.held"):
            session.info["kvpolicy.held"] = True
            hold_interrupts()

    event.listen(HoldingSession, "after_begin", after_begin)
    factory.class_ = HoldingSession
    registry.remove()  # this thread's session was made from the old class


def _safe_url(storage: Any) -> str:
    url = getattr(storage, "url", None) or str(storage)
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url


# ============================================================================================= workers and liveness
def _proc_start_time(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    if fields and fields[0] == "Z":  # zombie: dead, not yet reaped
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def worker_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start_time(pid), "boot": _boot_id()}


def _worker_is_dead(worker: Mapping[str, Any]) -> bool | None:
    """True/False for a worker of this machine, ``None`` for another machine (decided by the heartbeat)."""
    if worker.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if boot is not None and worker.get("boot") not in (None, boot):
        return True
    pid = worker.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    start = _proc_start_time(pid)
    if start is None:
        return True
    recorded = worker.get("start")
    return recorded is not None and start != recorded  # the pid now belongs to another process


def reap_dead_trials(study: Any, max_retries: int = 3, stale_unowned_s: float = 600.0) -> list[int]:
    """Fail the RUNNING trials of ``study`` whose worker is dead and re-queue them (same parameters). Workers on this
    machine are checked by process; workers elsewhere by Optuna's heartbeat (:func:`optuna.storages.fail_stale_trials`,
    after the grace period). Returns the numbers of the trials failed here."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        with contextlib.suppress(Exception):
            optuna.storages.fail_stale_trials(study)
    storage = study._storage
    failed = []
    now = datetime.now()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = _retry_callback(max_retries)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(ATTR_PREFIX + "worker")
        if worker is None:
            # asked but killed before it recorded its worker: dead if this old
            dead = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > stale_unowned_s
        else:
            dead = bool(_worker_is_dead(worker))
        if not dead:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, ATTR_PREFIX + "error",
                                        f"worker {worker} died while running this trial; re-queued")
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed.append(t.number)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    retry(study, copy.deepcopy(storage.get_trial(t._trial_id)))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    return failed


class _Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds in a thread (Optuna does it only inside optimize())."""

    def __init__(self, storage: Any, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvpolicy-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)
            self._stop.wait(self.interval)

    def __enter__(self) -> _Heartbeat:
        if hasattr(self.storage, "record_heartbeat") and self.storage.get_heartbeat_interval() is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():  # a heartbeat write under way finishes on its own (daemon thread, harmless)
            self._thread.join(timeout=2)


# ============================================================================================================ files
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and one ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_savefig(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=_json_default) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write of a line: atomic with O_APPEND for workers sharing the folder
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, datetime):
        return o.isoformat()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


# ================================================================================================= trial records
def trial_record(t: Any, spec_metrics: Sequence[str]) -> dict[str, Any]:
    """One row of the trials table: number, state, objective values, every metric, parameters, policy, timing."""
    attrs = t.user_attrs
    rec: dict[str, Any] = {
        "number": t.number,
        "state": t.state.name,
    }
    values = list(t.values) if t.values is not None else [None] * len(spec_metrics)
    for m, v in zip(spec_metrics, values, strict=False):
        rec[m] = v
    for k, v in (attrs.get(ATTR_PREFIX + "metrics") or {}).items():
        rec.setdefault(k, v)
    for k, v in t.params.items():
        rec[f"params.{k}"] = v
    rec["policy_name"] = (attrs.get(ATTR_PREFIX + "policy") or {}).get("name")
    rec["duration_s"] = t.duration.total_seconds() if t.duration is not None else None
    rec["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
    rec["datetime_complete"] = t.datetime_complete.isoformat() if t.datetime_complete else None
    worker = attrs.get(ATTR_PREFIX + "worker") or {}
    rec["worker"] = f"{worker.get('host')}:{worker.get('pid')}" if worker else None
    rec["retry_of"] = t.system_attrs.get("failed_trial")
    rec["reused_from"] = attrs.get(ATTR_PREFIX + "reused_from")
    rec["error"] = attrs.get(ATTR_PREFIX + "error")
    return rec


def _table_rows(study: Any, spec: SweepSpec) -> list[dict[str, Any]]:
    rows = [trial_record(t, spec.metrics) for t in study.get_trials(deepcopy=False)]
    pareto = {t.number for t in _best_trials(study, spec)}
    for r in rows:
        r["pareto"] = r["number"] in pareto
    return rows


def write_tables(study: Any, spec: SweepSpec, out: Path) -> list[dict[str, Any]]:
    """``trials.json`` and ``trials.csv`` from the storage (the source of truth), written atomically."""
    rows = _table_rows(study, spec)
    atomic_write_text(out / "trials.json", json.dumps(rows, indent=1, default=_json_default) + "\n")
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
    atomic_write_text(out / "trials.csv", buf.getvalue())
    return rows


def _complete(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _best_trials(study: Any, spec: SweepSpec) -> list[Any]:
    done = _complete(study)
    if not done:
        return []
    if not spec.multi_objective:
        sign = 1 if spec.directions[0] == "minimize" else -1
        return [min(done, key=lambda t: sign * t.values[0])]
    return list(study.best_trials)


def _knee(trials: Sequence[Any], directions: Sequence[str]) -> Any:
    """The Pareto trial closest to the ideal point, each objective scaled to [0, 1] over the front (0 = best)."""
    vals = np.array([t.values for t in trials], dtype=np.float64)
    signs = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    v = vals * signs
    lo, hi = v.min(axis=0), v.max(axis=0)
    scaled = (v - lo) / np.where(hi > lo, hi - lo, 1.0)
    return trials[int(np.argmin(np.linalg.norm(scaled, axis=1)))]


def _importances(study: Any, spec: SweepSpec) -> dict[str, dict[str, float]]:
    import optuna

    out: dict[str, dict[str, float]] = {}
    done = _complete(study)
    if len(done) < 5 or not any(t.params for t in done):
        return out
    for i, m in enumerate(spec.metrics):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, target=lambda t, i=i: t.values[i])
            out[m] = {k: float(v) for k, v in imp.items()}
        except Exception:  # noqa: BLE001 - too few distinct values, a single parameter...
            continue
    return out


def trial_evaluation(t: Any, spec: SweepSpec) -> dict[str, Any] | None:
    """How a harness trial was measured, as a policy file's ``evaluation:`` section (every setting that decides its
    numbers: model, task and options, samples, seed, batch size, the dtype it ran in, ...), so that
    ``kvpolicy run --policy best_policy.yaml`` repeats the trial. ``None`` for other evaluators."""
    if spec.evaluator != "harness":
        return None
    from .eval.preflight import EVALUATION_FIELDS

    settings = HarnessEvaluator._eval_spec(spec.model, spec.task, spec.samples, spec.batch_size).model_dump()
    out = {k: settings[k] for k in EVALUATION_FIELDS if settings.get(k) is not None}
    ran_in = ((t.user_attrs.get(ATTR_PREFIX + "details") or {}).get("dtype") or "").removeprefix("torch.")
    if ran_in in ("bfloat16", "float16", "float32"):  # the dtype the model really had (an 'auto' setting resolved)
        out["dtype"] = ran_in
    return out


def _policy_yaml(t: Any, spec: SweepSpec, label: str) -> str:
    import yaml

    doc = dict(t.user_attrs.get(ATTR_PREFIX + "policy") or {})
    doc["name"] = f"{spec.name}-trial-{t.number}"  # not its preset's name: tables must not call it 'elastic'
    evaluation = trial_evaluation(t, spec)
    if evaluation is not None:
        doc["evaluation"] = evaluation
    vals = ", ".join(f"{m} {v:.6g}" for m, v in zip(spec.metrics, t.values, strict=False))
    head = (f"# {label}: study {spec.name!r}, trial {t.number} ({vals})\n"
            f"# parameters: {json.dumps(t.params)}\n"
            f"# load with kvpolicy.config.load_policy('<this file>')"
            + ("; re-measure with `kvpolicy run --policy <this file>` (evaluation: below)\n" if evaluation else "\n"))
    return head + yaml.safe_dump(doc, sort_keys=False)


def write_study_outputs(study: Any, spec: SweepSpec, out: Path, plots: bool = True,
                        extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Tables, best policy YAML(s), ``summary.json`` and plots for ``study``. Returns the summary."""
    from optuna.trial import TrialState

    out.mkdir(parents=True, exist_ok=True)
    rows = write_tables(study, spec, out)
    best = _best_trials(study, spec)
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    summary: dict[str, Any] = {
        "schema": "kvpolicy.sweep/1",
        "study": spec.name,
        "storage": _safe_url(spec.storage_url()),
        "objectives": [o.model_dump() for o in spec.objectives],
        "trials": counts,
        "target_trials": spec.target_trials(),
        "best_trials": [trial_record(t, spec.metrics) for t in best],
        "pareto_front": spec.multi_objective,
        "importances": _importances(study, spec),
        "sweep": json.loads(spec.model_dump_json()),
        "written": datetime.now(timezone.utc).isoformat(),
        "versions": _versions(),
        **dict(extra or {}),
    }
    chosen = None
    if best:
        chosen = best[0] if not spec.multi_objective else _knee(best, spec.directions)
        summary["chosen_trial"] = chosen.number
        summary["chosen_rule"] = "best value" if not spec.multi_objective else \
            "Pareto trial closest to the ideal point (objectives scaled to [0, 1] over the front)"
        atomic_write_text(out / "best_policy.yaml", _policy_yaml(chosen, spec, "best policy" if not
                                                                 spec.multi_objective else "chosen Pareto policy"))
        if spec.multi_objective:
            pdir = out / "pareto"
            keep = set()
            for t in best:
                name = f"trial-{t.number:04d}.yaml"
                keep.add(name)
                atomic_write_text(pdir / name, _policy_yaml(t, spec, "Pareto policy"))
            for old in pdir.glob("trial-*.yaml"):
                if old.name not in keep:
                    old.unlink(missing_ok=True)
    if plots:
        summary["plots"] = [str(p.relative_to(out)) for p in write_plots(study, spec, out, rows)]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=_json_default) + "\n")
    return summary


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("kvpolicy", "optuna", "torch", "transformers", "wandb"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


# ============================================================================================================ plots
def _quality_and_budget(metrics: Sequence[str]) -> tuple[str | None, str | None]:
    quality = next((m for m in metrics if m not in BUDGET_METRICS), None)
    budget = next((m for m in metrics if m in BUDGET_METRICS), None)
    return quality, budget


def write_plots(study: Any, spec: SweepSpec, out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """PNG plots in ``out/plots``: quality vs budget, Pareto front, optimisation history and parameter importance
    (one per objective). Plots that need more trials than the study has are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    written: list[Path] = []
    pdir = out / "plots"
    done = _complete(study)
    if not done:
        return written
    names = spec.metrics

    def save(fig_or_ax: Any, name: str) -> None:
        fig = fig_or_ax.figure if hasattr(fig_or_ax, "figure") and not hasattr(fig_or_ax, "savefig") else fig_or_ax
        if isinstance(fig_or_ax, np.ndarray):
            fig = fig_or_ax.flat[0].figure
        _atomic_savefig(fig, pdir / name)
        plt.close(fig)
        written.append(pdir / name)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # quality vs budget (ours: every completed trial, coloured by policy, Pareto trials outlined)
        fig = plot_quality_vs_budget({spec.name: rows}, names)
        if fig is not None:
            save(fig, "quality_vs_budget.png")
        if spec.multi_objective:
            try:
                ax = ovm.plot_pareto_front(study, target_names=names) if len(names) <= 3 else None
                if ax is not None:
                    save(ax, "pareto_front.png")
            except Exception:  # noqa: BLE001 - optuna's plot raises for odd studies; the others still get written
                pass
        for i, m in enumerate(names):
            suffix = "" if len(names) == 1 else f"_{m}"
            try:
                ax = ovm.plot_optimization_history(study, target=(lambda t, i=i: t.values[i]) if len(names) > 1
                                                   else None, target_name=m)
                save(ax, f"history{suffix}.png")
            except Exception:  # noqa: BLE001
                pass
            if len(done) >= 3 and any(t.params for t in done):
                try:
                    ax = ovm.plot_param_importances(study, target=(lambda t, i=i: t.values[i]) if len(names) > 1
                                                    else None, target_name=m)
                    save(ax, f"importance{suffix}.png")
                except Exception:  # noqa: BLE001
                    pass
        if spec.pruning.enabled and not spec.multi_objective:
            with contextlib.suppress(Exception):
                save(ovm.plot_intermediate_values(study), "intermediate_values.png")
    del optuna
    return written


def plot_quality_vs_budget(series: Mapping[str, list[dict[str, Any]]], metrics: Sequence[str]) -> Any:
    """Quality metric against the budget (cache fraction, else cache bytes, else the ratio), one colour per policy
    (its name) in each series; Pareto trials outlined. Returns the figure or ``None`` (no data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):  # optuna's plots switch the global style
        return _plot_quality_vs_budget(plt, series, metrics)


def _plot_quality_vs_budget(plt: Any, series: Mapping[str, list[dict[str, Any]]], metrics: Sequence[str]) -> Any:
    quality, _ = _quality_and_budget(metrics)
    if quality is None:
        quality = metrics[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = False
    x_name = None
    for label, rows in series.items():
        done = [r for r in rows if r.get("state") == "COMPLETE" and r.get(quality) is not None]
        if not done:
            continue
        x_name = next((k for k in ("cache_fraction", "cache_bytes", "params.ratio") if all(r.get(k) is not None
                                                                                         for r in done)), None)
        if x_name is None:
            continue
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in done:
            key = label if len(series) > 1 else (r.get("policy_name") or label)
            if len(series) > 1 and r.get("policy_name") and r.get("policy_name") != label:
                key = f"{label}: {r['policy_name']}"
            groups.setdefault(key, []).append(r)
        for key, rs in groups.items():
            xs = [float(r[x_name]) for r in rs]
            ys = [float(r[quality]) for r in rs]
            sc = ax.scatter(xs, ys, label=key, alpha=0.75)
            front = sorted((float(r[x_name]), float(r[quality])) for r in rs if r.get("pareto"))
            if front:
                ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=sc.get_facecolor()[0], alpha=0.6)
                ax.scatter([p[0] for p in front], [p[1] for p in front], facecolors="none",
                           edgecolors="black", s=80, linewidths=1)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    # the full cache's value on the same samples, when the evaluator reported it
    full_key = f"full_{quality}"
    fulls = [float(r[full_key]) for rows in series.values() for r in rows if r.get(full_key) is not None]
    if fulls:
        ax.axhline(float(np.median(fulls)), color="gray", ls="--", lw=1, label=f"full cache ({np.median(fulls):.4g})")
    ys_all = [float(r[quality]) for rows in series.values() for r in rows
              if r.get("state") == "COMPLETE" and r.get(quality) is not None]
    if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 5:
        ax.set_yscale("log")
    ax.set_xlabel({"cache_fraction": "cache held / full cache", "cache_bytes": "cache bytes held",
                   "params.ratio": "ratio (fraction removed)"}.get(x_name or "", x_name or ""))
    ax.set_ylabel(f"{quality} ({METRICS[quality].direction} is better)" if quality in METRICS else quality)
    ax.set_title("quality vs cache budget (Pareto trials outlined)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ========================================================================================================== running
@dataclass
class SweepOutcome:
    study: str
    output: Path
    storage: str
    target: int
    finished: int
    ran_here: int
    failed_here: int
    reused_here: int
    reaped: list[int]
    stopped: str  # "complete" | "timeout" | "failures" | "interrupted"
    summary: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        return {"complete": 0, "timeout": 0, "failures": 1, "interrupted": 130}.get(self.stopped, 1)


def _state_counts(study: Any) -> tuple[int, int, bool, dict[int, str]]:
    """finished (complete + pruned), running, whether any is waiting, and number -> state."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state.name in FINISHED for t in trials)
    running = sum(t.state.name == "RUNNING" for t in trials)
    waiting = any(t.state.name == "WAITING" for t in trials)
    return finished, running, waiting, {t.number: t.state.name for t in trials}


def _suggest(trial: Any, spec: SweepSpec) -> dict[str, Any]:
    params = {}
    for path, p in spec.space.items():
        if p.type == "float":
            params[path] = trial.suggest_float(path, float(p.low), float(p.high), step=p.step, log=p.log)
        elif p.type == "int":
            params[path] = trial.suggest_int(path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[path] = trial.suggest_categorical(path, list(p.choices or []))
    return params


class _Interrupted(Exception):
    pass


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the worker) is handled like Ctrl-C: the running trial is failed and re-queued,
    and the process exits within :func:`kvpolicy.stopping.stop_timeout_s` seconds (see :mod:`kvpolicy.stopping`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # SIGINT too: its KeyboardInterrupt is held while a storage transaction is open, like SIGTERM's
    old = {sig: signal.signal(sig, interrupt_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_sweep(spec: SweepSpec, **kwargs: Any) -> SweepOutcome:
    """Run (or resume, or join) the study of ``spec`` until it holds its trials; see the module docstring.

    Keyword arguments: ``quiet``, ``console`` (a rich Console for progress and messages), ``evaluator`` (an
    :class:`Evaluator` instance instead of the file's), ``tracker``, ``plots``, ``max_consecutive_failures``,
    ``poll_s`` (seconds between checks while other workers finish the last trials)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return _run_sweep(spec, **kwargs)


def _run_sweep(
    spec: SweepSpec,
    *,
    quiet: bool = False,
    console: Any = None,
    evaluator: Any = None,
    tracker: Any = None,
    plots: bool = True,
    max_consecutive_failures: int = 3,
    poll_s: float = 2.0,
) -> SweepOutcome:
    import optuna
    from optuna.trial import TrialState
    from rich.console import Console

    from .tracking import make_tracker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console = console or Console(stderr=True, quiet=quiet)
    try:
        stop_limit = stop_timeout_s()
    except ValueError as exc:  # before anything is written
        raise SweepConfigError(str(exc)) from None
    out = spec.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    url = spec.storage_url()
    storage = open_storage(url, spec.heartbeat_s, spec.grace_s, spec.max_retries)
    study = open_study(spec, storage)
    atomic_write_text(out / "sweep.json", spec.model_dump_json(indent=1) + "\n")
    reaped = reap_dead_trials(study, spec.max_retries)
    target = spec.target_trials()
    finished0, running0, _, _ = _state_counts(study)
    if not quiet:
        console.print(f"study [bold]{spec.name}[/] in {_safe_url(url)}: {finished0}/{target} trials finished"
                      + (f", {running0} running elsewhere" if running0 else "")
                      + (f"; re-queued {len(reaped)} trial(s) of a dead worker: {reaped}" if reaped else ""))
    tracker = tracker if tracker is not None else make_tracker(spec.wandb, out, group=spec.name, quiet=quiet,
                                                               console=console)
    me = worker_identity()
    evaluator_ready = False
    ran = failed_here = reused = 0
    consecutive_failures = 0
    stopped = "complete"
    t_start = time.monotonic()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tracker.catch_up(study, spec)

    progress = _make_progress(console, quiet)
    with progress, _sigterm_as_interrupt():
        trials_task = progress.add_task("trials", total=target, completed=min(finished0, target), info="")
        samples_task = progress.add_task("samples", total=spec.samples, visible=False, info="")
        try:
            while True:
                reap_dead_trials(study, spec.max_retries)
                finished, running, waiting, _ = _state_counts(study)
                progress.update(trials_task, completed=min(finished, target))
                if finished >= target:
                    stopped = "complete"
                    break
                if spec.timeout is not None and time.monotonic() - t_start >= spec.timeout:
                    stopped = "timeout"
                    break
                if consecutive_failures >= max_consecutive_failures:
                    stopped = "failures"
                    break
                if not waiting and finished + running >= target:
                    progress.update(trials_task, description=f"trials (waiting for {running} running elsewhere)")
                    time.sleep(poll_s)
                    continue
                progress.update(trials_task, description="trials")
                if not evaluator_ready:
                    if evaluator is None:
                        evaluator = make_evaluator(spec.evaluator, spec.model, spec.task, spec.samples,
                                                   spec.batch_size)
                    progress.update(samples_task, description="loading model and data", visible=True)
                    evaluator.setup()
                    evaluator_ready = True
                trial = None
                try:
                    with _signals_deferred():  # the trial and its owner are recorded together
                        trial = study.ask()
                        storage.set_trial_user_attr(trial._trial_id, ATTR_PREFIX + "worker", me)
                        if trial.user_attrs.get(ATTR_PREFIX + "error"):  # a retry inherits the failed trial's attrs
                            storage.set_trial_user_attr(trial._trial_id, ATTR_PREFIX + "error", None)
                    with _Heartbeat(storage, trial._trial_id, spec.heartbeat_s):
                        # workers asking at once can overshoot the target: the later trial gives way
                        if storage.get_trial(trial._trial_id).system_attrs.get("failed_trial") is None:
                            fin, _, _, states = _state_counts(study)
                            before = sum(1 for n, s in states.items() if s == "RUNNING" and n < trial.number)
                            if fin + before >= target:
                                storage.set_trial_user_attr(
                                    trial._trial_id, ATTR_PREFIX + "error",
                                    "surplus: the study already had its trials; not evaluated")
                                _tell(study, trial, state=TrialState.FAIL)
                                continue
                        outcome = _run_trial(study, trial, spec, evaluator, progress, samples_task, out, tracker,
                                             console, quiet)
                except KeyboardInterrupt:
                    if trial is not None:
                        _fail_and_requeue(study, trial, spec, out, "interrupted; re-queued")
                        if not quiet:
                            console.print(f"trial {trial.number}: interrupted; it will run again when the sweep is "
                                          "resumed")
                    raise
                if outcome == "complete":
                    ran += 1
                    consecutive_failures = 0
                elif outcome == "reused":
                    reused += 1
                    consecutive_failures = 0
                elif outcome == "pruned":
                    ran += 1
                    consecutive_failures = 0
                else:
                    failed_here += 1
                    consecutive_failures += 1
        except KeyboardInterrupt:
            stopped = "interrupted"
        finally:
            progress.update(samples_task, visible=False)

    summary = None
    stopping = stopped == "interrupted"
    try:
        # a stopping worker writes only the fast outputs: the plots and the W&B summary run (seconds, unbounded under
        # load) come with the run that completes the study, or from `kvpolicy report`
        summary = write_study_outputs(study, spec, out, plots=plots and not stopping)
        if not stopping:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tracker.log_summary(study, spec, summary, out)
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        _close_tracker(tracker, stop_limit if stopped == "interrupted" else None)
        if evaluator is not None and evaluator_ready:
            with contextlib.suppress(Exception):
                evaluator.close()
    finished, _, _, _ = _state_counts(study)
    return SweepOutcome(study=spec.name, output=out, storage=_safe_url(url), target=target, finished=finished,
                        ran_here=ran, failed_here=failed_here, reused_here=reused, reaped=reaped, stopped=stopped,
                        summary=summary)


def _close_tracker(tracker: Any, limit_s: float | None) -> None:
    """``tracker.close()``; when stopping, in a daemon thread given ``limit_s`` seconds: W&B's ``finish`` can wait on
    its service process without a timeout, and a stop must not (what it did not log is caught up on resume)."""
    if limit_s is None:
        tracker.close()
        return

    def close() -> None:
        with contextlib.suppress(Exception):
            tracker.close()

    thread = threading.Thread(target=close, name="kvpolicy-tracker-close", daemon=True)
    thread.start()
    thread.join(limit_s)


def _make_progress(console: Any, quiet: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=quiet,
        transient=False,
    ) if not quiet else _NullProgress()


class _NullProgress:
    def __enter__(self) -> _NullProgress:
        return self

    def __exit__(self, *a: object) -> None:
        pass

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        pass


def _fail_and_requeue(study: Any, trial: Any, spec: SweepSpec, out: Path, reason: str) -> None:
    """Fail a trial this worker is abandoning (Ctrl-C, SIGTERM) and queue a copy with the same parameters."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    with _signals_deferred(), contextlib.suppress(Exception):
        if storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
            return
        storage.set_trial_user_attr(trial._trial_id, ATTR_PREFIX + "error", reason)
        if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                _retry_callback(spec.max_retries)(
                    study, copy.deepcopy(storage.get_trial(trial._trial_id)))
        write_tables(study, spec, out)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the duration of a few storage calls that must happen together (main thread only; the
    stop deadline waits for them too: :mod:`kvpolicy.stopping`)."""
    with held_interrupts():
        yield


def _tell(study: Any, trial: Any, values: Sequence[float] | None = None, state: Any = None) -> None:
    """``study.tell`` outside ``optimize``: the grid sampler calls ``study.stop()`` once the grid is exhausted, which
    raises outside ``optimize`` *after* the trial was recorded — that is not a failure."""
    try:
        study.tell(trial, values, state=state)
    except RuntimeError:
        if not study._storage.get_trial(trial._trial_id).state.is_finished():
            raise


def _find_same_params(study: Any, params: Mapping[str, Any], number: int) -> Any:
    for t in _complete(study):
        if t.number != number and t.params == dict(params) and t.user_attrs.get(ATTR_PREFIX + "metrics"):
            return t
    return None


def _run_trial(study: Any, trial: Any, spec: SweepSpec, evaluator: Any, progress: Any, samples_task: int,
               out: Path, tracker: Any, console: Any, quiet: bool) -> str:
    """Evaluate one trial and record it: storage first, then the local files, then W&B. Returns complete | reused |
    pruned | failed. KeyboardInterrupt fails the trial, re-queues it and propagates."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    t0 = time.perf_counter()
    params = _suggest(trial, spec)
    label = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    progress.update(samples_task, description=f"trial {trial.number}", completed=0, total=spec.samples,
                    visible=True, info=label)
    history: list[dict[str, Any]] = []
    try:
        doc, _ = read_policy_document(spec.policy)
        policy = policy_to_dict(resolve_policy(doc, overrides=expand_params(params)))
        trial.set_user_attr(ATTR_PREFIX + "policy", policy)
        same = _find_same_params(study, params, trial.number)
        if same is not None:
            metrics = dict(same.user_attrs[ATTR_PREFIX + "metrics"])
            trial.set_user_attr(ATTR_PREFIX + "metrics", metrics)
            trial.set_user_attr(ATTR_PREFIX + "reused_from", same.number)
            _tell(study, trial, list(same.values))
            _after_trial(study, trial.number, spec, out, tracker, history, {}, console)
            progress.update(samples_task, completed=spec.samples)
            return "reused"

        def on_batch(rep: BatchReport) -> None:
            history.append({"step": rep.step, "done": rep.done, **rep.metrics})
            progress.update(samples_task, completed=rep.done, total=rep.total)
            if not spec.multi_objective and spec.pruning.enabled:
                value = rep.metrics.get(spec.metrics[0])
                if value is not None and math.isfinite(value):
                    trial.report(float(value), rep.step)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at batch {rep.step} ({spec.metrics[0]} {value:.4g})")

        ev = evaluator.evaluate(policy, on_batch)
        missing = [m for m in spec.metrics if m not in ev.metrics]
        if missing:
            raise RuntimeError(f"the evaluator did not report {', '.join(missing)} (it gave {', '.join(ev.metrics)})")
        values = [float(ev.metrics[m]) for m in spec.metrics]
        if not all(math.isfinite(v) for v in values):
            raise RuntimeError(f"non-finite objective values {dict(zip(spec.metrics, values, strict=False))}")
        metrics = {k: _finite(float(v)) for k, v in ev.metrics.items()}
        trial.set_user_attr(ATTR_PREFIX + "metrics", metrics)
        details = json.loads(json.dumps(ev.details, default=_json_default))
        trial.set_user_attr(ATTR_PREFIX + "details", _small(details))
        _tell(study, trial, values)
        _after_trial(study, trial.number, spec, out, tracker, history, details, console, ev.document)
        if not quiet:
            console.print(f"trial {trial.number} ({time.perf_counter() - t0:.1f} s): {label} -> "
                          + ", ".join(f"{m} {v:.5g}" for m, v in zip(spec.metrics, values, strict=False)),
                          soft_wrap=True)
        return "complete"
    except optuna.TrialPruned as exc:
        _tell(study, trial, state=TrialState.PRUNED)
        _after_trial(study, trial.number, spec, out, tracker, history, {}, console)
        if not quiet:
            console.print(f"trial {trial.number}: {label} -> pruned ({exc})")
        return "pruned"
    except Exception as exc:  # noqa: BLE001 - a failing trial is recorded, the sweep goes on
        msg = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            storage.set_trial_user_attr(trial._trial_id, ATTR_PREFIX + "error", msg[:2000])
        _tell(study, trial, state=TrialState.FAIL)
        _after_trial(study, trial.number, spec, out, tracker, history, {}, console)
        console.print(f"[yellow]trial {trial.number}: {label} failed: {msg}[/]")
        return "failed"


def _small(obj: Any, limit: int = 20000) -> Any:
    text = json.dumps(obj, default=_json_default)
    if len(text) <= limit:
        return obj
    return {"truncated": True, "keys": list(obj) if isinstance(obj, dict) else None}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _after_trial(study: Any, number: int, spec: SweepSpec, out: Path, tracker: Any, history: list[dict[str, Any]],
                 details: Mapping[str, Any], console: Any, document: Mapping[str, Any] | None = None) -> None:
    """The local results files (log line, tables, per-trial JSON), then W&B — whose failure is only a warning."""
    t = study.get_trials(deepcopy=False)[number] if number < len(study.get_trials(deepcopy=False)) else None
    if t is None or t.number != number:
        t = next(x for x in study.get_trials(deepcopy=False) if x.number == number)
    rec = trial_record(t, spec.metrics)
    _append_jsonl(out / "trials.jsonl", rec)
    full = {**rec, "policy": t.user_attrs.get(ATTR_PREFIX + "policy"), "history": history, "details": details}
    atomic_write_text(out / "trials" / f"trial-{number:04d}.json", json.dumps(full, indent=1, default=_json_default))
    if document is not None:  # the evaluator's own complete result (kvpolicy.eval's EvalResult)
        atomic_write_text(out / "trials" / f"trial-{number:04d}.eval.json",
                          json.dumps(document, indent=1, default=_json_default))
    write_tables(study, spec, out)
    try:
        tracker.log_trial(t, spec, history, details)
    except Exception as exc:  # noqa: BLE001 - the trial is safe in the storage and the local files
        console.print(f"[yellow]warning: W&B logging of trial {number} failed ({type(exc).__name__}: {exc}); the "
                      "trial is kept in the study and the results files[/]")


# ============================================================================================================ report
def _load_spec_for(target: str, storage: str | None) -> tuple[SweepSpec, str, Path]:
    """A study's sweep spec, storage URL and results folder, from a results folder or a study name."""
    import optuna

    p = Path(target)
    if p.is_dir() and (p / "sweep.json").exists():
        data = json.loads((p / "sweep.json").read_text())
        data["output"] = str(p)
        if storage:
            data["storage"] = storage
        spec = SweepSpec.model_validate(data)
        return spec, spec.storage_url(), p
    if p.suffix in (".yaml", ".yml") and p.is_file():
        spec = load_sweep(p, {"storage": storage} if storage else None, deep=False)
        return spec, spec.storage_url(), spec.output_dir()
    if storage is None:
        default = Path("results") / "sweeps" / target
        if (default / "sweep.json").exists():
            return _load_spec_for(str(default), None)
        raise SweepConfigError(ConfigIssue("study", f"{target!r} is not a results folder (with sweep.json) or a sweep "
                                                    "file; for a study name give --storage URL"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summaries = optuna.study.get_all_study_summaries(storage=storage)
    names = [s.study_name for s in summaries]
    if target not in names:
        raise SweepConfigError(ConfigIssue("study", f"no study {target!r} in {_safe_url(storage)}; studies there: "
                                                    f"{', '.join(names) or '(none)'}"))
    study = optuna.load_study(study_name=target, storage=storage)
    data = study.user_attrs.get(ATTR_PREFIX + "sweep")
    if not data:
        raise SweepConfigError(ConfigIssue("study", f"study {target!r} was not created by kvpolicy sweep"))
    data = dict(data)
    data["storage"] = storage
    spec = SweepSpec.model_validate(data)
    return spec, storage, spec.output_dir()


def report_study(targets: Sequence[str], storage: str | None = None, output: str | Path | None = None,
                 console: Any = None, plots: bool = True) -> list[dict[str, Any]]:
    """Print and (re)write the results of finished studies. With several, also a quality-vs-budget plot comparing
    them (``output``, default ``results/sweeps/compare``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console = console or stdout_console()
    summaries = []
    series: dict[str, list[dict[str, Any]]] = {}
    metrics: list[str] = []
    for target in targets:
        spec, url, out = _load_spec_for(target, storage)
        if output is not None and len(targets) == 1:
            out = Path(output)
        st = open_storage(url, spec.heartbeat_s, spec.grace_s, spec.max_retries)
        study = optuna.load_study(study_name=spec.name, storage=st)
        summary = write_study_outputs(study, spec, out, plots=plots)
        summaries.append(summary)
        series[spec.name] = json.loads((out / "trials.json").read_text())
        metrics = metrics or spec.metrics
        print_summary(console, spec, summary, out)
    if len(targets) > 1 and plots:
        fig = plot_quality_vs_budget(series, metrics)
        if fig is not None:
            dest = Path(output) if output else Path("results") / "sweeps" / "compare"
            _atomic_savefig(fig, dest / "quality_vs_budget.png")
            console.print(f"comparison plot: {dest / 'quality_vs_budget.png'}")
    return summaries


def print_summary(console: Any, spec: SweepSpec, summary: Mapping[str, Any], out: Path) -> None:
    from rich.table import Table

    counts = summary["trials"]
    console.print(f"[bold]study {spec.name}[/]: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)
                  + f" (target {summary['target_trials']})")
    best = summary.get("best_trials") or []
    if best:
        title = "Pareto front" if spec.multi_objective else "best trial"
        table = Table(title=f"{title} — {', '.join(f'{o.metric} ({o.direction})' for o in spec.objectives)}")
        table.add_column("trial", justify="right")
        for m in spec.metrics:
            table.add_column(m, justify="right")
        pcols = [k for k in best[0] if k.startswith("params.")]
        for c in pcols:
            table.add_column(c[len("params."):], justify="right")
        key = spec.metrics[-1] if spec.multi_objective else spec.metrics[0]
        for r in sorted(best, key=lambda r: (r.get(key) is None, r.get(key))):
            mark = " *" if r["number"] == summary.get("chosen_trial") else ""
            table.add_row(f"{r['number']}{mark}", *[_fmt(r.get(m)) for m in spec.metrics],
                          *[_fmt(r.get(c)) for c in pcols])
        console.print(table)
        if spec.multi_objective:
            console.print(f"* chosen: {summary.get('chosen_rule')}")
    imp = summary.get("importances") or {}
    for m, vals in imp.items():
        console.print(f"parameter importance for {m}: " + ", ".join(f"{k} {v:.2f}" for k, v in vals.items()))
    files = ["trials.csv", "trials.json", "best_policy.yaml", "summary.json"]
    console.print(f"results in {out}: " + ", ".join(f for f in files if (out / f).exists())
                  + (f", plots/ ({len(summary.get('plots', []))} PNG)" if summary.get("plots") else ""))


# =============================================================================================================== CLI
def stdout_console() -> Any:
    """A rich Console on stdout; piped output gets 160 columns so tables are not squeezed into 80 (as kvpolicy.cli)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=160)
    return console


def _exit(code: int) -> None:
    try:
        import typer

        raise typer.Exit(code)
    except ImportError:  # pragma: no cover
        raise SystemExit(code) from None


def sweep_cli(
    file: str | Path,
    n_trials: int | None = None,
    samples: int | None = None,
    output: str | Path | None = None,
    storage: str | None = None,
    timeout: float | None = None,
    wandb_project: str | None = None,
    no_wandb: bool = False,
    quiet: bool = False,
) -> SweepOutcome | None:
    """``kvpolicy sweep FILE``: validate the file (with the command-line overrides), then run or resume its study."""
    from rich.console import Console
    from rich.text import Text

    err = Console(stderr=True)
    overrides = {"n_trials": n_trials, "samples": samples, "output": str(output) if output else None,
                 "storage": storage, "timeout": timeout, "wandb_project": wandb_project, "no_wandb": no_wandb}
    try:
        spec = load_sweep(file, overrides)
    except SweepConfigError as exc:
        err.print(Text(f"error: {exc}", style="red"), soft_wrap=True)
        _exit(2)
        return None
    try:
        outcome = run_sweep(spec, quiet=quiet)
    except (StudyMismatchError, SweepConfigError, PolicyConfigError) as exc:
        err.print(Text(f"error: {exc}", style="red"), soft_wrap=True)
        _exit(2)
        return None
    except Exception as exc:  # noqa: BLE001 - storage unreachable, model not installed...: one line, exit 1
        if os.environ.get("KVPOLICY_DEBUG"):
            raise
        err.print(Text(f"error: {type(exc).__name__}: {exc}", style="red"), soft_wrap=True)
        err.print("(finished trials are kept in the study; set KVPOLICY_DEBUG=1 for the traceback)")
        _exit(1)
        return None
    out = stdout_console()
    if outcome.summary is not None and not quiet:
        print_summary(out, spec, outcome.summary, outcome.output)
    msg = {
        "complete": f"study {spec.name}: {outcome.finished}/{outcome.target} trials finished",
        "timeout": f"study {spec.name}: stopped by the timeout at {outcome.finished}/{outcome.target} trials; run "
                   "the same command again to continue",
        "failures": f"study {spec.name}: stopped after repeated trial failures ({outcome.finished}/{outcome.target} "
                    "finished); see the errors above and trials.csv",
        "interrupted": f"study {spec.name}: interrupted at {outcome.finished}/{outcome.target} trials; run the same "
                       "command again to resume",
    }[outcome.stopped]
    if not quiet or outcome.exit_code:
        err.print(Text(msg, style="red" if outcome.exit_code else ""))
    if outcome.stopped == "interrupted":
        arm_stop_deadline()  # the process is ending: W&B's exit hook must not hold it (kvpolicy.stopping)
    if outcome.exit_code:
        _exit(outcome.exit_code)
    return outcome


def report_cli(studies: Sequence[str], storage: str | None = None, output: str | Path | None = None,
               no_plots: bool = False) -> None:
    """``kvpolicy report STUDY...``: a results folder, a sweep file or a study name (with ``--storage``)."""
    from rich.console import Console
    from rich.text import Text

    try:
        report_study(list(studies), storage=storage, output=output, plots=not no_plots)
    except (SweepConfigError, StudyMismatchError) as exc:
        Console(stderr=True).print(Text(f"error: {exc}", style="red"), soft_wrap=True)
        _exit(2)


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - ``python -m kvpolicy.sweep FILE``
    """Minimal standalone entry point (the ``kvpolicy sweep`` command is the usual one)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kvpolicy.sweep")
    ap.add_argument("file")
    ap.add_argument("--n-trials", type=int)
    ap.add_argument("--samples", type=int)
    ap.add_argument("--output")
    ap.add_argument("--storage")
    ap.add_argument("--timeout", type=float)
    ap.add_argument("--wandb-project")
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        sweep_cli(a.file, a.n_trials, a.samples, a.output, a.storage, a.timeout, a.wandb_project, a.no_wandb, a.quiet)
    except Exception as exc:
        code = getattr(exc, "exit_code", None)
        if code is not None:
            sys.exit(code)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
