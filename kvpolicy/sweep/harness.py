"""The ``harness`` evaluator: :func:`kvpolicy.eval.evaluate` on the sweep's model and task, against the full cache."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from ..config import ConfigIssue
from .evaluation import BatchReport, Evaluation
from .spec import METRICS, PREFILL_SETTINGS

__all__ = ["HARNESS_FIELDS", "HarnessEvaluator", "evaluation_from_result"]


#: EvalSpec fields a sweep's ``task`` may set besides the task's name and options
HARNESS_FIELDS = ("seed", "dtype", "backend", "device", "threads", "protocol", "kl_topk", "reference_dir",
                  "use_reference_cache", "check_ratio0", *PREFILL_SETTINGS)
#: metrics each built-in task can produce (others: every metric but exact_match)
_TASK_PRODUCES = {
    "continuation": {"ppl", "nll", "kl", "top1"},
    "instruct": {"ppl", "nll", "kl", "top1", "rouge_l"},
    "needle": {"ppl", "nll", "kl", "top1", "rouge_l", "exact_match"},
    "ruler": {"ppl", "nll", "kl", "top1", "rouge_l", "exact_match"},
}
_ALWAYS = {"cache_bytes", "cache_fraction", "seconds_per_sample"}


class HarnessEvaluator:
    """The real evaluation: :func:`kvpolicy.eval.evaluate` on the sweep's model and task, against the full cache.

    The sweep's ``task`` holds the task's ``name`` (``continuation``, ``instruct``, ``needle``, ``jsonl``), the task's
    options (``context_tokens``, ...) and optionally EvalSpec settings (:data:`HARNESS_FIELDS`: ``dtype``, ``seed``,
    ``kl_topk``, ...). The model and the samples load once (:meth:`setup`); every trial reuses them, and the full-cache
    references are computed on the first trial and cached on disk. ``check_ratio0`` (default ``first``) runs the
    harness's ratio-0 honesty check on the first evaluation only (``true``: on every one, ``false``: never).
    Every trial evaluates the same samples, so each batch's prefill is recorded by the first trial and replayed by the
    others: one :class:`~kvpolicy.eval.prefill_store.PrefillStore` per evaluator (per worker process), sized by the
    task's ``prefill_cache_gb`` and spilled as ``prefill_spill`` / ``prefill_spill_dir`` say (``share_prefill:
    false``: every trial prefills itself).

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
        self.prefill_store: Any = None
        self.evaluations = 0

    @staticmethod
    def split_task(task: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
        task = dict(task)
        name = str(task.pop("name", "continuation"))
        settings = {k: task.pop(k) for k in list(task) if k in HARNESS_FIELDS}
        return name, task, settings

    @classmethod
    def eval_spec(cls, model: str, task: Mapping[str, Any], samples: int, batch_size: int, policy: Any = "full",
                   first: bool = True) -> Any:
        from ..eval import EvalSpec

        name, options, settings = cls.split_task(task)
        check = settings.pop("check_ratio0", "first")
        settings["check_ratio0"] = bool(first) if check == "first" else bool(check)
        return EvalSpec(model=model, task=name, task_options=options, policy=policy, samples=samples,
                        batch_size=batch_size, bootstrap=0, quiet=True, keep_generations=True, **settings)

    @classmethod
    def resolved_settings(cls, model: str, task: Mapping[str, Any], samples: int, batch_size: int) -> dict[str, Any]:
        """Settings that decide a trial's numbers but are only known on the machine that runs it: the dtype (``auto``
        resolves per device and CPU, :func:`kvpolicy.hardware.resolve_dtype`). Part of the study's fingerprint, so a
        study is never continued in another dtype."""
        from ..hardware import dtype_name, resolve_dtype

        spec = cls.eval_spec(model, task, samples, batch_size)
        return {"dtype": dtype_name(resolve_dtype(spec.dtype, spec.device))}

    @classmethod
    def check(cls, model: str, task: Mapping[str, Any], samples: int, metrics: Sequence[str]) -> list[ConfigIssue]:
        from pydantic import ValidationError

        try:
            from ..eval import TaskError, get_task
        except ImportError as exc:
            return [ConfigIssue("evaluator", f"the evaluation harness (kvpolicy.eval) cannot be imported ({exc}); "
                                             "use evaluator: synthetic to test the sweep machinery")]
        issues: list[ConfigIssue] = []
        name, options, settings = cls.split_task(task)
        if "check_ratio0" in settings and settings["check_ratio0"] not in ("first", True, False):
            issues.append(ConfigIssue("task.check_ratio0", f"{settings['check_ratio0']!r} is not allowed; allowed "
                                                           "values: first, true, false"))
            settings.pop("check_ratio0")
        try:
            cls.eval_spec(model, {"name": name, **settings}, samples, 1)
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
            opts = t.options(options)
        except ValidationError as exc:
            for e in exc.errors(include_url=False):
                loc = ".".join(str(x) for x in e["loc"])
                msg = e["msg"]
                if e["type"] == "extra_forbidden":
                    msg = (f"unknown option of task {name!r}; options: {', '.join(t.Options.model_fields)}; "
                           f"settings: {', '.join(HARNESS_FIELDS)}")
                issues.append(ConfigIssue(f"task.{loc}", f"{msg} (value {e.get('input')!r})"))
        else:
            issues += cls.data_issues(t, model, samples, settings, opts)
        produces = _TASK_PRODUCES.get(name, set(METRICS) - {"exact_match"}) | _ALWAYS
        for i, m in enumerate(metrics):
            if m not in produces:
                issues.append(ConfigIssue(
                    f"objectives[{i}].metric",
                    f"task {name!r} does not produce {m!r}; it gives: {', '.join(sorted(produces))}"))
        return issues

    @staticmethod
    def data_issues(task: Any, model: str, samples: int, settings: Mapping[str, Any], options: Any
                    ) -> list[ConfigIssue]:
        """The task's check of its data against the options (a prompt length its texts cannot fill), before the
        model loads where the tokenizer is on disk (:func:`kvpolicy.eval.preflight.check_task_data`)."""
        from ..eval import TaskError
        from ..eval.preflight import check_task_data

        try:
            check_task_data(task, model, samples, int(settings.get("seed", 0)), options)
        except TaskError as exc:
            return [ConfigIssue("task", str(exc))]
        return []

    def setup(self) -> None:
        from ..eval import get_task
        from ..eval.prefill_store import store_for
        from ..eval.runner import load_eval_model

        spec = self.eval_spec(self.model_name, self.task, self.samples_n, self.batch_size)
        with contextlib.suppress(Exception):  # the sweep shows its own progress
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        self.model, self.tokenizer = load_eval_model(spec.model, spec.dtype, spec.device)
        task = get_task(spec.task)
        self.samples = task.load(self.tokenizer, spec.samples, spec.seed, task.options(spec.task_options))
        self.prefill_store = store_for(spec)  # one for the study's trials in this process (None: sharing off)

    def evaluate(self, policy: Mapping[str, Any], on_batch: Callable[[BatchReport], None] | None = None
                 ) -> Evaluation:
        from ..eval import evaluate as harness_evaluate

        if self.model is None:
            self.setup()
        spec = self.eval_spec(self.model_name, self.task, self.samples_n, self.batch_size, policy=dict(policy),
                               first=self.evaluations == 0)
        history: list[BatchReport] = []

        def callback(update: Any) -> None:
            rep = BatchReport(step=len(history), done=update.done, total=update.total,
                              metrics={k: float(v) for k, v in update.running.items() if v is not None})
            history.append(rep)
            if on_batch is not None:
                on_batch(rep)

        result = harness_evaluate(spec, callback, model=self.model, tokenizer=self.tokenizer, samples=self.samples,
                                  prefill_store=self.prefill_store)
        self.evaluations += 1
        ev = evaluation_from_result(result)
        ev.history = history
        return ev

    def close(self) -> None:
        if self.prefill_store is not None:
            self.prefill_store.close()
        self.model = self.tokenizer = self.samples = self.prefill_store = None


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
        "prefill": result.prefill.model_dump() if result.prefill is not None else None,
        "complete": result.complete,
        "wall_s": result.wall_s,
        # the dtype the trial computed in (``auto`` resolved on the machine that ran it; best_policy.yaml carries it)
        "dtype": result.dtype,
    }
    ev = Evaluation(metrics=metrics, per_sample=per, details=details)
    ev.document = result.model_dump(mode="json")
    return ev

