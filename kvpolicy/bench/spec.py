"""What ``kvpolicy bench`` measures and what it writes down: the spec, the result schema and the few definitions
every part shares (the budget B, MiB). Pydantic and the standard library only, so reading or validating a
``bench.json`` never imports torch."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .shapes import BUILTIN_CONFIGS, DEFAULT_CONFIG, QUICK_CONFIG

SCHEMA = "kvpolicy.bench/1"

#: the registered presets the default run compares, in this order (the comparison set of docs/performance.md);
#: every name is resolved through the plugin registry, and those not registered are left out
DEFAULT_POLICIES: tuple[str, ...] = ("local", "snapkv", "h2o", "tova", "knorm", "elastic")

MiB = float(1 << 20)


def budget_tokens(n: int, ratio: float) -> int:
    """B: entries a policy at ``ratio`` (fraction removed) keeps of an ``n``-token prompt, per layer and kv head."""
    return max(1, math.ceil(n * (1.0 - ratio)))


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (anything else as its ``str``), for provenance fields of the result."""
    return json.loads(json.dumps(obj, default=str))


class BenchSpec(BaseModel):
    """What to measure. Ratios are the fraction of the cache *removed* (as ``Budget.ratio`` and kvpress's
    ``compression_ratio``): ratio 0.75 keeps a quarter of the prompt's entries."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None, description="model alias, local path or hub id (real weights)"
    )
    config: str | None = Field(
        default=None,
        description=f"a transformers config JSON path or a built-in shape ({', '.join(BUILTIN_CONFIGS)}); random "
        f"weights. Default (no model): {DEFAULT_CONFIG} ({QUICK_CONFIG} with quick)",
    )
    policies: list[str] | None = Field(
        default=None,
        description="registered preset names or policy files (YAML/JSON); default: the registered presets among "
        f"{', '.join(DEFAULT_POLICIES)}",
    )
    ratios: list[float] = Field(
        default=[0.75], description="fractions removed, for the timed runs"
    )
    contexts: list[int] | None = Field(
        default=None, description="prompt lengths (default 1024, 4096, 16384)"
    )
    steps: int | None = Field(
        default=None,
        ge=2,
        description="decode steps timed after each prefill (default 32)",
    )
    repeats: int = Field(default=3, ge=1, description="prefill repeats (median)")
    time_budget_s: float | None = Field(
        default=None,
        ge=0,
        description="fit the run into this many seconds: after a calibration prefill the planner estimates every "
        "item and keeps, in priority order, what fits (dropped items are listed in the result's plan). Default: "
        "540 s when the contexts are the defaults (the no-argument run must end within 10 minutes), else none",
    )
    long_steps: int | None = Field(
        default=None,
        ge=0,
        description="generated tokens in the long fixed-budget decode run (default 2000; 0: none)",
    )
    long_context: int | None = Field(
        default=None, ge=1, description="prompt of the long run (default: smallest)"
    )
    long_policies: list[str] | None = Field(
        default=None,
        description="policies of the long run (default: the first attention-free policy)",
    )
    bytes_ratios: list[float] | None = Field(
        default=None,
        description="ratio sweep for the cache-bytes plot (default 0, 0.25, 0.5, 0.75, 0.9)",
    )
    bytes_context: int | None = Field(
        default=None,
        ge=2,
        description="prompt of the ratio sweep (default: 256, at most the smallest context)",
    )
    bytes_steps: int = Field(
        default=4,
        ge=0,
        description="decode steps before the sweep's second bytes reading",
    )
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="auto: bfloat16 where the device multiplies it natively (CUDA >= 8.0, AMX/AVX-512 BF16 CPUs), "
        "float32 elsewhere; the result records what it resolved to",
    )
    batch: int = Field(default=1, ge=1)
    seed: int = 0
    quick: bool = Field(
        default=False,
        description="tiny config, tiny contexts, a couple of policies: < 1 minute",
    )
    measure_memory: bool = True
    plots: bool = True
    output: str | None = Field(
        default=None, description="directory for bench.json and the PNG plots"
    )
    compare: list[str] = Field(
        default_factory=list, description="JSON files in this schema to merge (kvpress)"
    )
    threads: int | None = Field(
        default=None, ge=1, description="torch.set_num_threads (default: torch's)"
    )

    @model_validator(mode="after")
    def _defaults(self) -> BenchSpec:
        q = self.quick
        if self.model is None and self.config is None:
            self.config = QUICK_CONFIG if q else DEFAULT_CONFIG
        if self.contexts is None:
            self.contexts = [64, 128] if q else [1024, 4096, 16384]
            if self.time_budget_s is None and not q:
                self.time_budget_s = 540.0
        if self.steps is None:
            self.steps = 8 if q else 32
        if self.long_steps is None:
            self.long_steps = 60 if q else 2000
        if self.bytes_ratios is None:
            self.bytes_ratios = [0.0, 0.5, 0.75] if q else [0.0, 0.25, 0.5, 0.75, 0.9]
        if q:
            self.repeats = min(self.repeats, 2)
        for r in [*self.ratios, *self.bytes_ratios]:
            if not 0.0 <= r < 1.0:
                raise ValueError(
                    f"ratio {r} is outside [0, 1) (the fraction of the cache removed)"
                )
        if not self.contexts or min(self.contexts) < 2:
            raise ValueError("contexts must be prompt lengths >= 2")
        self.contexts = sorted(set(self.contexts))
        return self


# ========================================================================================================= results
class LayerBytes(BaseModel):
    """One layer's key/value storage at one moment."""

    layer: int
    alloc_bytes: (
        int  #: bytes of the key + value buffers (capacity slots, unused slack included)
    )
    used_bytes: int  #: bytes of the physical slots in use (``length``)
    slots: int  #: physical slots in use
    capacity: int  #: allocated slots
    meta_bytes: int = (
        0  #: engine bookkeeping (validity, positions, types, per-slot state)
    )
    held: list[list[int]] | None = None  #: valid entries per row and kv head
    promised: list[list[int]] | None = (
        None  #: entries the budget rule allows per row and kv head
    )
    budget_bytes: int | None = (
        None  #: bytes of the promised entries (rectangular: batch x heads x max promised)
    )


class CacheBytes(BaseModel):
    total_alloc: int
    total_used: int
    total_meta: int
    budget: int | None = None
    layers: list[LayerBytes]


class RunResult(BaseModel):
    """One configuration (framework x policy x ratio x context), measured after a prefill of ``context`` tokens."""

    framework: str = "kvpolicy"
    policy: str  #: "full" for the plain cache
    kind: Literal[
        "prefill+decode", "baseline-at-budget", "long-decode", "bytes-sweep"
    ] = "prefill+decode"
    ratio: float | None = None
    context: int
    budget_tokens: int | None = (
        None  #: B: entries the policy keeps after prefill (per layer and kv head)
    )
    attention_stats: bool = False  #: the policy's prefill computes attention statistics
    policy_doc: dict[str, Any] | None = None
    prefill_s: list[float] = Field(default_factory=list)
    prefill_median_s: float | None = None
    decode_step_s: list[float] = Field(default_factory=list)
    decode_median_s: float | None = None
    decode_tokens_per_s: float | None = None
    bytes_prefill: CacheBytes | None = None
    bytes_decode: CacheBytes | None = None
    decode_steps: int = 0
    peak_bytes: int | None = (
        None  #: absolute peak (RSS high-water or cuda max allocated) during the configuration
    )
    peak_delta_bytes: int | None = (
        None  #: peak minus the memory in use just before the configuration
    )
    notes: list[str] = Field(default_factory=list)


class Target(BaseModel):
    name: str
    policy: str
    ratio: float | None = None
    context: int | None = None
    value: float | None = None
    threshold: float
    met: bool | None = None  #: None: could not be evaluated (reason in detail)
    detail: str = ""


class BenchResult(BaseModel):
    schema_: str = Field(default=SCHEMA, alias="schema")
    created: str
    spec: dict[str, Any]
    environment: dict[str, Any]
    model: dict[str, Any]
    runs: list[RunResult]
    targets: list[Target] = Field(default_factory=list)
    external: list[dict[str, Any]] = Field(
        default_factory=list
    )  #: merged files: environment + runs of each
    plan: list[dict[str, Any]] = Field(
        default_factory=list
    )  #: what the planner included / dropped, with estimates
    partial: bool = False  #: written while the run was still going (a checkpoint)
    wall_s: float = 0.0
    files: dict[str, str] = Field(default_factory=dict)

    model_config = ConfigDict(populate_by_name=True)

    def find(
        self,
        policy: str,
        context: int,
        kind: str = "prefill+decode",
        ratio: float | None = None,
        framework: str = "kvpolicy",
    ) -> RunResult | None:
        for r in self.runs:
            if (
                r.framework == framework
                and r.policy == policy
                and r.context == context
                and r.kind == kind
                and (ratio is None or r.ratio is None or abs(r.ratio - ratio) < 1e-9)
            ):
                return r
        return None

