"""Evaluation: tasks, metrics and the protocol that compares a policy with the full cache.

``evaluate(EvalSpec(...)) -> EvalResult`` is the library entry point; ``kvpolicy.eval.compare.compare`` runs a grid of
them. The ``kvpolicy run`` / ``kvpolicy compare`` commands (:mod:`kvpolicy.cli.evaluate`) call these and print
:mod:`.report`'s tables. See ``docs/evaluation.md``.

The package, in the order an evaluation goes through it: :mod:`.spec` (what defines a run and its result),
:mod:`.preflight` (checks before a model loads), :mod:`.context` (model, tokenizer, eos/pad ids), :mod:`.tasks`
(samples), :mod:`.references` (the full-cache side, cached on disk), :mod:`.prefill` (a batch's inputs and its
prefill, direct or replayed from a prefill recorded once per batch), :mod:`.protocol` (one batch: prefill, teacher
forcing, generation), :mod:`.honesty` (the ratio-0 check), :mod:`.scoring` (per-sample results), :mod:`.aggregate`
(metrics, intervals, the paired bootstrap), :mod:`.runner` (:func:`evaluate`), :mod:`.compare` and :mod:`.report`.
"""

from .budget import kept_by_type
from .runner import evaluate, evaluate_many
from .spec import (
    BatchUpdate,
    EvalError,
    EvalResult,
    EvalSpec,
    HonestyCheckError,
    NonFiniteError,
    SampleResult,
    SideMetrics,
    load_result,
    write_result,
)
from .tasks import TASKS, Sample, Task, TaskError, get_task, register_task

__all__ = [
    "TASKS",
    "BatchUpdate",
    "EvalError",
    "EvalResult",
    "EvalSpec",
    "HonestyCheckError",
    "NonFiniteError",
    "Sample",
    "SampleResult",
    "SideMetrics",
    "Task",
    "TaskError",
    "evaluate",
    "evaluate_many",
    "get_task",
    "kept_by_type",
    "load_result",
    "register_task",
    "write_result",
]
