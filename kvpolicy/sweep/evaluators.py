"""Which evaluator a sweep or ablation file names: ``harness`` (:mod:`kvpolicy.eval` on the model), ``synthetic`` (no
model, for testing the machinery) or ``package.module:attribute`` (your own :class:`~kvpolicy.sweep.Evaluator`)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .harness import HarnessEvaluator
from .synthetic import SyntheticEvaluator

__all__ = ["EvaluatorLookupError", "get_evaluator_class", "make_evaluator"]


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
                raise EvaluatorLookupError(f"evaluator {name!r} has no {method}() method "
                                           "(see kvpolicy.sweep.Evaluator)")
        return obj
    raise EvaluatorLookupError(
        f"unknown evaluator {name!r}; allowed: harness (kvpolicy.eval on the model), synthetic (no model: for testing "
        "the machinery), or module:attribute"
    )


def make_evaluator(name: str, model: str, task: Mapping[str, Any], samples: int, batch_size: int) -> Any:
    cls = get_evaluator_class(name)
    return cls(model=model, task=dict(task), samples=samples, batch_size=batch_size)

