"""Sweep and ablation files as users write them: the pydantic models and the metrics an objective may name.

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

The readers (:func:`kvpolicy.sweep.load_sweep` / :func:`kvpolicy.sweep.load_ablation`, in :mod:`kvpolicy.sweep.load`)
apply command-line overrides and check **everything** that can be checked without a model: the YAML syntax, every
field, every dotted path of the search space (the base policy is resolved with sample values from each range, so a
path the policy's parts do not have fails here), the objective metrics, sampler/pruning compatibility, the model name
and the task (through the evaluator's own check). All problems are raised together as one :class:`SweepConfigError`
whose lines read ``field.path: what is wrong; what is allowed``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import ConfigError
from .space import SpaceParam

__all__ = [
    "METRICS",
    "PREFILL_SETTINGS",
    "PRUNERS",
    "RUN_SETTINGS",
    "SAMPLERS",
    "AblationSpec",
    "AblationVariant",
    "BootstrapSpec",
    "MetricInfo",
    "Objective",
    "PruningSpec",
    "SamplerSpec",
    "SweepConfigError",
    "SweepSpec",
    "WandbSpec",
    "canonical_metric",
    "did_you_mean",
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


def did_you_mean(name: Any, options: list[str]) -> str:
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
                f"unknown metric {v!r}; allowed metrics: {', '.join(METRICS)}" + did_you_mean(v, list(METRICS))
            )
        return canon

    @model_validator(mode="after")
    def _default_direction(self) -> Objective:
        if self.direction is None:
            self.direction = METRICS[self.metric].direction
        return self




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
        return {"name": data} if isinstance(data, str) else data  # `sampler: random`

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        key = v.strip().lower().replace("-", "").replace("_", "")
        if key not in SAMPLERS:
            raise ValueError(
                f"unknown sampler {v!r}; allowed samplers: {', '.join(SAMPLERS)}" + did_you_mean(key, list(SAMPLERS))
            )
        return key


PRUNERS: tuple[str, ...] = ("median", "percentile", "successive_halving", "hyperband", "none")


def shorthand(data: Any, short: str, full: str, expand: Any) -> Any:
    """A file's short spelling of a field (``objective: ppl`` for ``objectives: [ppl]``, ``ratios: [...]`` for
    ``budgets: [{ratio: ...}, ...]``) as the full field; giving both is an error naming them."""
    if not (isinstance(data, Mapping) and short in data):
        return data
    data = dict(data)
    value = data.pop(short)
    if full in data:
        raise ValueError(f"give either {short!r} or {full!r}, not both")
    data[full] = expand(value)
    return data


def switch_or_settings(data: Any, text_field: str) -> Any:
    """The short forms a sweep file may use for a settings block: ``true``/``false``/nothing switch it on or off, a
    string sets its main field (``wandb: myproject``, ``pruning: hyperband``); a mapping is taken as it is."""
    if isinstance(data, bool):
        return {"enabled": data}
    if data is None:
        return {"enabled": False}
    if isinstance(data, str):
        return {text_field: data}
    return data


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
        return switch_or_settings(data, "pruner")


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
        return switch_or_settings(data, "project")


_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
#: task settings that change how fast a trial runs or where files go, not its values: a study may be resumed with
#: other values of these
#: the task settings of how prefills are shared between trials (EvalSpec's fields; a trial's numbers are the same
#: with or without a shared prefill, see kvpolicy.eval.compare) - also command-line overrides of ``sweep``/``ablate``
PREFILL_SETTINGS = ("share_prefill", "prefill_cache_gb", "prefill_spill", "prefill_spill_dir")
RUN_SETTINGS = ("threads", "device", "reference_dir", "use_reference_cache", "check_ratio0", "sleep_s",
                *PREFILL_SETTINGS)


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
        data = shorthand(data, "objective", "objectives", lambda one: [one])
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

    @property
    def conditional(self) -> bool:
        """Some parameter is searched only for some choices (``when:``, :mod:`kvpolicy.sweep.conditions`)."""
        return any(p.when for p in self.space.values())

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
            # `split: all` is the default: writing it must not make a study created without it unresumable
            "task": {k: v for k, v in self.task.items() if k not in RUN_SETTINGS and not (k == "split" and v == "all")},
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
        return shorthand(data, "ratios", "budgets", lambda r: [{"ratio": x} for x in (r if isinstance(r, list) else
                                                                                     [r])])

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        out = []
        for m in v:
            canon = canonical_metric(m)
            if canon is None:
                raise ValueError(
                    f"unknown metric {m!r}; allowed metrics: {', '.join(METRICS)}" + did_you_mean(m, list(METRICS))
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




