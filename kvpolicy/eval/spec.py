"""What defines an evaluation and what it returns: :class:`EvalSpec`, the result models and the errors.

Kept apart from the code that computes them so that a reader of result files (``compare``'s resume, a study report,
a notebook) imports pydantic models, not torch, and so the JSON form of a result has one definition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..io import write_json_atomic


# ================================================================================================== errors
class EvalError(RuntimeError):
    """The evaluation cannot produce an honest result."""


class HonestyCheckError(EvalError):
    """The policy at ratio 0 does not reproduce the full cache exactly."""


class NonFiniteError(EvalError):
    """NaN or inf in the logits (names the sample, the step and the run)."""


# ================================================================================================== spec / result
class EvalSpec(BaseModel):
    """Everything that defines one evaluation (it is written, complete, into every result)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="smollm2-135m", description="alias, local path or Hub id (kvpolicy.models)")
    task: str = Field(
        default="continuation", description="continuation | instruct | needle | jsonl | a registered task"
    )
    task_options: dict[str, Any] = Field(default_factory=dict, description="the task's options (context_tokens, ...)")
    policy: str | dict[str, Any] = Field(default="elastic", description="preset name, YAML file or policy document")
    ratio: float | None = Field(default=None, ge=0.0, lt=1.0, description="fraction removed (overrides the policy's)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted policy overrides")
    samples: int = Field(default=50, ge=1)
    seed: int = 0
    batch_size: int = Field(default=16, ge=1)
    protocol: Literal["kvpolicy", "authors"] = Field(
        default="kvpolicy", description="'authors': the last target token is not scored in PPL (their quirk)"
    )
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        default="auto",
        description="auto: bfloat16 where the device computes it natively (CUDA >= 8.0, CPUs with AMX or AVX-512 "
        "BF16), float32 elsewhere (kvpolicy.hardware); the result's ``dtype`` records what it resolved to",
    )
    backend: Literal["sdpa", "eager"] = "sdpa"
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1, description="torch threads (None: leave torch's setting)")
    kl_topk: int = Field(default=256, ge=0, description="full-cache log-probs kept per step for KL (0: all)")
    reference_dir: str | None = Field(default=None, description="reference cache (default <cache root>/eval_refs)")
    use_reference_cache: bool = True
    check_ratio0: bool = Field(default=True, description="refuse to report unless ratio 0 reproduces the full cache")
    bootstrap: int = Field(default=1000, ge=0, description="bootstrap resamples for the confidence intervals")
    keep_generations: bool = Field(default=True, description="store the generated texts in the result")
    quiet: bool = False
    share_prefill: bool = Field(
        default=True,
        description="record each batch's prefill once and replay it for every policy of a grid, study or ablation "
        "(false: every policy prefills itself, the direct path, for checking); the numbers agree either way",
    )
    prefill_cache_gb: float | None = Field(
        default=None, ge=0.0, description="memory for recorded prefills, in GiB (None: a quarter of the memory "
        "available when the store is made; 0: keep none in memory)",
    )
    prefill_spill: bool = Field(
        default=False, description="write recordings evicted from memory to a temporary directory (removed at exit) "
        "instead of discarding them",
    )
    prefill_spill_dir: str | None = Field(
        default=None, description="a directory to write every recording to and keep (later runs reuse it; implies "
        "prefill_spill)",
    )

    @field_validator("prefill_spill_dir")
    @classmethod
    def _spill_dir_is_a_directory(cls, v: str | None) -> str | None:
        if v is not None and Path(v).expanduser().exists() and not Path(v).expanduser().is_dir():
            raise ValueError(f"{v!r} is a file; allowed: a directory (made when first needed)")
        return v


class SampleSide(BaseModel):
    """One sample under one cache (the full cache or the policy's)."""

    nll_sum: float
    scored_tokens: int
    ppl: float
    kl_sum: float = 0.0
    top1_hits: int = 0
    steps: int = 0
    rouge_l: float | None = None
    exact_match: float | None = None
    generation: str | None = None
    kept_prefill: float
    kept_end: float
    ratio_prefill: float
    ratio_end: float
    bytes_prefill: int
    bytes_end: int
    allocated_bytes_prefill: float
    allocated_bytes_end: float
    kept_per_layer_prefill: list[float]
    kept_by_type_prefill: dict[str, float] | None = None
    prefill_s: float
    decode_s: float
    decode_steps: int


class SampleResult(BaseModel):
    id: str
    kind: str
    prompt_tokens: int
    #: the prompt's positions by type, ``{"text": n, "image": n}`` (vision-language models only): what the full cache
    #: holds, against which ``kept_by_type_prefill`` tells how much of the image a policy kept
    prompt_tokens_by_type: dict[str, int] | None = None
    target_tokens: int
    target_kind: str
    full: SampleSide
    policy: SampleSide
    #: whether the policy's cache was replayed from a shared prefill recording (None: not recorded, older files)
    prefill_shared: bool | None = None


class SideMetrics(BaseModel):
    ppl: float
    ppl_ci: tuple[float, float] | None = None
    ppl_per_sample_mean: float
    ppl_per_sample_median: float
    scored_tokens: int
    kl: float | None = None
    kl_ci: tuple[float, float] | None = None
    top1: float | None = None
    top1_ci: tuple[float, float] | None = None
    rouge_l: float | None = None
    rouge_l_ci: tuple[float, float] | None = None
    exact_match: float | None = None
    exact_match_ci: tuple[float, float] | None = None
    #: string match per sample kind (a RULER task, a needle variant), and their unweighted mean: RULER's average
    exact_match_by_kind: dict[str, float] | None = None
    exact_match_by_kind_ci: dict[str, tuple[float, float] | None] | None = None
    exact_match_macro: float | None = None
    exact_match_macro_ci: tuple[float, float] | None = None
    kept_tokens_prefill: float
    kept_tokens_end: float
    prompt_tokens: float
    ratio_prefill: float
    ratio_end: float
    bytes_prefill: float
    bytes_end: float
    allocated_bytes_prefill: float
    allocated_bytes_end: float
    kept_by_type_prefill: dict[str, float] | None = None
    #: mean prompt positions by type (text / image), vision-language models only
    prompt_tokens_by_type: dict[str, float] | None = None
    #: image entries kept after prefill (mean over layers) summed over samples / image tokens of the prompts
    image_kept_fraction: float | None = None
    prefill_s: float
    decode_s: float
    decode_tokens: int
    decode_tokens_per_s: float | None


class PrefillSharing(BaseModel):
    """How an evaluation's policy prefills were obtained: replayed from a recording (shared with the other policies
    of a grid, study or ablation) or computed directly, and what the prefill store did meanwhile."""

    enabled: bool  #: the spec's ``share_prefill``
    replayed: int = 0  #: batch rows whose policy cache was replayed from a recording
    direct: int = 0  #: batch rows that ran the policy's own prefill
    #: why rows ran directly (sharing disabled, or the policy's prefill depends on the policy), with their counts
    reasons: dict[str, int] = Field(default_factory=dict)
    #: rows per way the prefill budgets were allocated across layers: ``per-layer`` (each layer as it is compressed)
    #: or ``whole-model`` (an allocator that sees every layer first: only on a replayed prefill)
    allocation: dict[str, int] = Field(default_factory=dict)
    #: the store's counters during this evaluation (hits, disk_hits, misses = recordings made, evictions, spills, ...)
    store: dict[str, int] | None = None


class Delta(BaseModel):
    value: float
    ci: tuple[float, float] | None = None


class EvalResult(BaseModel):
    spec: EvalSpec
    policy_name: str
    policy: dict[str, Any]
    task: dict[str, Any]
    model: dict[str, Any]
    environment: dict[str, Any]
    full: SideMetrics
    policy_metrics: SideMetrics
    delta: dict[str, Delta]
    samples: list[SampleResult]
    honesty: dict[str, Any]
    reference: dict[str, Any]
    complete: bool = True
    #: shared-prefill accounting (None in result files written before it was recorded)
    prefill: PrefillSharing | None = None
    #: the dtype the evaluation computed in (``spec.dtype`` with ``auto`` resolved on this machine); None in result
    #: files written before it was recorded (their ``model["dtype"]`` says the same as ``torch.<name>``)
    dtype: str | None = None
    wall_s: float
    created: str


@dataclass
class BatchUpdate:
    """What the per-batch callback receives. Return ``True`` from the callback to stop early (the result is then
    marked ``complete=False``); raise (e.g. ``optuna.TrialPruned``) to abort."""

    done: int
    total: int
    samples: list[SampleResult]
    running: dict[str, float]  #: point estimates so far: ppl, full_ppl, kl, top1, rouge_l, exact_match


# ================================================================================================== the result file
def result_json(result: EvalResult) -> dict[str, Any]:
    """The result as the JSON document written to disk (``kvpolicy run --output``, a ``compare`` cell)."""
    return result.model_dump(mode="json")


def load_result(path: str | Path) -> EvalResult:
    return EvalResult.model_validate(json.loads(Path(path).read_text()))


def write_result(path: str | Path, result: EvalResult, **extra: Any) -> Path:
    """Write ``result`` (with ``extra`` top-level keys first, e.g. a cell's ``label``) atomically."""
    return write_json_atomic(path, {**extra, **result_json(result)})


__all__ = [
    "BatchUpdate",
    "Delta",
    "EvalError",
    "EvalResult",
    "EvalSpec",
    "HonestyCheckError",
    "NonFiniteError",
    "PrefillSharing",
    "SampleResult",
    "SampleSide",
    "SideMetrics",
    "load_result",
    "result_json",
    "write_result",
]
