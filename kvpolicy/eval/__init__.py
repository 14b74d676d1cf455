"""Evaluation: tasks, metrics and the protocol that compares a policy with the full cache.

``evaluate(EvalSpec(...)) -> EvalResult`` is the library entry point; ``run_cli`` and ``compare_cli`` back the
``kvpolicy run`` / ``kvpolicy compare`` commands. See ``docs/evaluation.md``.
"""

from .runner import (
    BatchUpdate,
    EvalError,
    EvalResult,
    EvalSpec,
    HonestyCheckError,
    NonFiniteError,
    SampleResult,
    SideMetrics,
    evaluate,
    kept_by_type,
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
    "compare_cli",
    "evaluate",
    "get_task",
    "kept_by_type",
    "register_task",
    "run_cli",
]


def __getattr__(name: str):
    if name in ("run_cli", "compare_cli"):
        from . import report

        return getattr(report, name)
    raise AttributeError(name)
