"""The ``synthetic`` evaluator: deterministic metrics of a policy without a model, to test the sweep machinery."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from ..config import ConfigIssue, resolve_policy
from .evaluation import BatchReport, Evaluation

__all__ = ["SyntheticEvaluator"]


class SyntheticEvaluator:
    """A deterministic stand-in for a real evaluation: metrics are smooth functions of the policy's budget and parts
    plus fixed per-sample noise (the same for every policy, so paired statistics behave as with a real model).
    Costs ``sleep_s`` seconds per sample. Task fields: ``sleep_s`` (0), ``noise`` (0.05), ``prompt_tokens`` (512),
    ``fail_ratio_above`` (raise for a ratio above it: to test failed trials), ``part_costs`` (perplexity factor of a
    part, by ``kind.name`` or ``name``: ``{reducer.evict: 1.04}``).

    The evaluator knows no policy by name: a part not in ``part_costs`` costs a factor in [1, 1.1) derived from a hash
    of its kind and name, and each parameter set away from the part's default costs a little more (0.15% per unit for
    a number, a hash-derived 0-2% for any other value), so a sweep over any plugin's parts has something to find."""

    needs_model: ClassVar[bool] = False
    TASK_FIELDS: ClassVar[dict[str, type]] = {"sleep_s": float, "noise": float, "prompt_tokens": int,
                                              "fail_ratio_above": float, "name": str, "part_costs": dict}

    def __init__(self, model: str = "synthetic", task: Mapping[str, Any] | None = None, samples: int = 8,
                 batch_size: int = 1):
        task = dict(task or {})
        self.sleep_s = float(task.get("sleep_s", 0.0))
        self.noise = float(task.get("noise", 0.05))
        self.prompt_tokens = int(task.get("prompt_tokens", 512))
        self.fail_ratio_above = task.get("fail_ratio_above")
        self.part_costs = {str(k): float(v) for k, v in dict(task.get("part_costs") or {}).items()}
        self.samples = samples
        self.batch_size = batch_size

    @classmethod
    def check(cls, model: str, task: Mapping[str, Any], samples: int, metrics: Sequence[str]) -> list[ConfigIssue]:
        issues = []
        for k, v in task.items():
            if k not in cls.TASK_FIELDS:
                issues.append(ConfigIssue(f"task.{k}", f"unknown field of the synthetic task; fields: "
                                                       f"{', '.join(cls.TASK_FIELDS)}"))
            elif cls.TASK_FIELDS[k] is dict:
                if not isinstance(v, Mapping) or not all(_number(x) and x > 0 for x in v.values()):
                    issues.append(ConfigIssue(f"task.{k}", f"expected a mapping of part (kind.name or name) to a "
                                                           f"factor > 0, got {v!r}"))
            elif not isinstance(v, (int, float, str)) or (cls.TASK_FIELDS[k] is not str and isinstance(v, str)):
                issues.append(ConfigIssue(f"task.{k}", f"expected a number, got {v!r}"))
        return issues

    def part_penalty(self, kind: str, name: str, params: Mapping[str, Any], defaults: Mapping[str, Any]) -> float:
        """The perplexity factor of one part: its cost (``part_costs``, else hash-derived) times what each parameter
        set away from its default costs."""
        cost = self.part_costs.get(f"{kind}.{name}", self.part_costs.get(name))
        factor = cost if cost is not None else 1.0 + 0.1 * _unit_hash(f"{kind}.{name}")
        for key, value in params.items():
            default = defaults.get(key)
            if value == default:
                continue
            if _number(value) and _number(default):
                factor *= 1.0 + 0.0015 * abs(float(value) - float(default))
            else:
                factor *= 1.0 + 0.02 * _unit_hash(f"{kind}.{name}.{key}={json.dumps(value, default=str)}")
        return factor

    def policy_penalty(self, resolved: Any) -> float:
        """The product of :meth:`part_penalty` over the policy's parts."""
        factor = 1.0
        for kind, part in resolved.parts.items():
            fields = type(part.params).model_fields
            factor *= self.part_penalty(kind, part.spec.name, part.params.model_dump(),
                                        {k: f.default for k, f in fields.items()})
        return factor

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
        penalty = (1.0 + 1.6 * ratio**3) * self.policy_penalty(resolved)
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



def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by ``text`` (the same on every machine and run)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32
