"""Checks of an evaluation that need no model: the model name, the task and its options, the policy.

They run before any weights load (and before :func:`~kvpolicy.eval.compare.compare` writes a file), so a typo costs a
second, not the minutes of loading a model, and never leaves a half-written results folder behind.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.policy import CachePolicy
from .context import build_policy
from .spec import EvalError, EvalSpec
from .tasks import get_task


@dataclass
class Prepared:
    """What :func:`prepare` checked and built from a spec before any model loads."""

    policy: CachePolicy
    policy_ratio0: CachePolicy | None
    task: Any = None  #: the :class:`~kvpolicy.eval.tasks.Task` (None when samples were given)
    options: Any = None  #: its validated options


def check_model_name(name: str) -> None:
    """Raise :class:`~kvpolicy.config.ConfigError` (field ``model``) unless ``name`` is a known alias (installed), an
    existing model directory / GGUF file or a Hub id; nothing is loaded. A missing path must not surface as a
    traceback after the imports, and a directory without ``config.json`` not after the plugins load."""
    from ..config import ConfigError, ConfigIssue
    from ..models import model_problem, resolve_model

    problem = model_problem(name)
    if problem is None:
        source = resolve_model(name)
        if source.kind == "local" and source.path is not None and not (source.path / "config.json").exists():
            problem = f"{source.path} has no config.json, so it is not a transformers model directory"
    if problem is not None:
        raise ConfigError(ConfigIssue("model", problem))


def prepare(
    spec: EvalSpec,
    *,
    check_model: bool = True,
    need_task: bool = True,
    policy: CachePolicy | None = None,
    policy_ratio0: CachePolicy | None = None,
) -> Prepared:
    """Every check that needs no model, in the order a user reads them: the model name, the task and its options,
    the policy (and its ratio-0 twin for the honesty check). Raises :class:`~kvpolicy.config.ConfigError` naming the
    field, so a typo is reported before minutes of weight loading (and before a caller writes anything)."""
    from pydantic import ValidationError

    from ..config import ConfigError, ConfigIssue
    from .tasks import TaskError

    if check_model:
        check_model_name(spec.model)
    task = opts = None
    if need_task:
        try:
            task = get_task(spec.task)
        except TaskError as exc:
            raise ConfigError(ConfigIssue("task", str(exc))) from None
        try:
            opts = task.options(spec.task_options)
        except ValidationError as exc:
            issues = [
                ConfigIssue(
                    "task_options." + ".".join(str(x) for x in e["loc"]), f"{e['msg']} (value {e.get('input')!r})"
                )
                for e in exc.errors(include_url=False)
            ]
            raise ConfigError(issues) from None
    if policy is None:
        policy = build_policy(spec.policy, spec.ratio, spec.overrides)
    if policy_ratio0 is None and spec.check_ratio0:
        if isinstance(spec.policy, (str, dict)) and policy.spec is not None:
            policy_ratio0 = build_policy(spec.policy, 0.0, spec.overrides)
        else:
            raise EvalError("a policy passed as an object needs policy_ratio0 for the ratio-0 check")
    if task is not None:
        check_task_data(task, spec.model, spec.samples, spec.seed, opts)
    return Prepared(policy=policy, policy_ratio0=policy_ratio0, task=task, options=opts)


def local_tokenizer(name: str) -> Any | None:
    """The tokenizer (a vision-language model's processor) of ``name`` without its weights, when it is on this
    machine already: a converted alias or a local checkpoint directory. ``None`` otherwise (a Hub id, a GGUF file, an
    alias not converted yet, anything that does not load): the task then refuses the same case when it loads.

    Why: a task can tell whether its data fits the options (a prompt length the committed texts cannot fill) only in
    the model's own tokens, and that should be said in a second, before the weights load."""
    from ..models import UnknownModelError, resolve_model

    try:
        source = resolve_model(name)
    except (FileNotFoundError, UnknownModelError):
        return None
    on_disk = source.kind == "local" or (source.kind == "alias" and source.is_cached)
    if source.path is None or not on_disk:
        return None
    return _tokenizer_only(str(source.path))


@functools.lru_cache(maxsize=4)
def _tokenizer_only(path: str) -> Any | None:
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    from ..models import is_vision_language_config

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        loader = AutoProcessor if is_vision_language_config(config) else AutoTokenizer
        return loader.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not loadable here: the task checks again after the model loads
        return None


def check_task_data(task: Any, model: str, samples: int, seed: int, options: Any) -> None:
    """The task's own check of its data against the options (:meth:`~kvpolicy.eval.tasks.Task.check`: a prompt
    length the committed texts cannot fill), in the model's tokens, when the tokenizer is on disk
    (:func:`local_tokenizer`; no weights load). Last of the checks, so a typo elsewhere is reported
    without reading a tokenizer; where the tokenizer is not on disk, the task refuses the same case when it loads."""
    from .tasks import Task

    if type(task).check is Task.check:
        return
    tokenizer = local_tokenizer(model)
    if tokenizer is not None:
        task.check(tokenizer, samples, seed, options)


#: EvalSpec fields a policy file's ``evaluation:`` section may set (what decides the numbers a run reports)
EVALUATION_FIELDS: tuple[str, ...] = (
    "model", "task", "task_options", "samples", "seed", "batch_size", "protocol", "dtype", "backend", "device",
    "threads", "kl_topk", "reference_dir", "use_reference_cache",
)  # fmt: skip


def policy_evaluation(policy: str | dict[str, Any]) -> dict[str, Any]:
    """The validated ``evaluation:`` section of a policy file or document (``{}`` if it has none, or for a preset):
    the settings a sweep's ``best_policy.yaml`` was measured with, so ``kvpolicy run --policy`` can repeat it.
    Raises :class:`~kvpolicy.config.ConfigError` naming ``evaluation.<field>``."""
    from pydantic import ValidationError

    from ..config import ConfigError, ConfigIssue, issues_from_validation, read_policy_document

    doc, source = read_policy_document(policy)
    section = doc.get("evaluation")
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(ConfigIssue("evaluation", f"expected a mapping of {', '.join(EVALUATION_FIELDS)}, "
                                                    f"got {section!r}"), source)
    unknown = [k for k in section if k not in EVALUATION_FIELDS]
    if unknown:
        raise ConfigError(ConfigIssue(f"evaluation.{unknown[0]}", f"unknown setting (value {section[unknown[0]]!r}); "
                                                                  f"allowed: {', '.join(EVALUATION_FIELDS)}"), source)
    try:
        EvalSpec(**section)
    except ValidationError as exc:
        raise ConfigError(issues_from_validation(exc, EvalSpec, prefix="evaluation"), source) from None
    return dict(section)


def plan_cells(
    policies: Sequence[str | tuple[str, dict[str, Any]]],
    ratios: Sequence[float] | None,
    tasks: Sequence[str],
    base: dict[str, Any],
    task_options: dict[str, dict[str, Any]] | None = None,
) -> list[tuple[str, str, float, EvalSpec]]:
    """``(label, task, ratio, spec)`` for every cell of a grid, each checked by :func:`~.preflight.prepare`: a typo
    in the last policy must not cost the first cell's run, nor leave its file behind."""
    from ..config import ConfigError, ConfigIssue

    check_model_name(str(base.get("model", EvalSpec().model)))
    cells: list[tuple[str, str, float, EvalSpec]] = []
    sources: dict[str, Any] = {}
    for ratio in ratios if ratios is not None else [None]:
        for task in tasks:
            for item in (p for p in policies if p != "full"):
                label, pol = item if isinstance(item, tuple) else (None, item)
                options = (task_options or {}).get(task, base.get("task_options", {}))
                spec = EvalSpec(**{**base, "task": task, "policy": pol, "ratio": ratio, "task_options": options})
                built = prepare(spec, check_model=False).policy
                label = label or built.name
                if label == "full" or sources.setdefault(label, pol) != pol:  # "full" is the full-cache row
                    raise ConfigError(ConfigIssue("policies", f"{sources.get(label, 'the full cache')!r} and "
                                                              f"{pol!r} are both named {label!r}; give one a name: "
                                                              "field"))
                own = built.budget.ratio if ratio is None else ratio
                if own is None:
                    raise ConfigError(ConfigIssue("ratios", f"policy {label!r} has a token budget, not a ratio; "
                                                            "give the grid's ratios (--ratios)"))
                cells.append((label, task, own, spec))
    return cells


__all__ = [
    "EVALUATION_FIELDS",
    "Prepared",
    "check_model_name",
    "check_task_data",
    "local_tokenizer",
    "plan_cells",
    "policy_evaluation",
    "prepare",
]
