"""The targets the report checks (the issue's numbers; never tuned to pass): each one, for each configuration it
applies to, met, missed, or not evaluable (and why)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from .spec import MiB, BenchResult, RunResult, Target

TARGET_BYTES = 1.05  # cache bytes / promised budget bytes, per layer and per kv head
TARGET_DECODE_AT_BUDGET = 1.10  # policy decode step at budget B / full-cache decode step at context B
TARGET_PREFILL = 1.15  # policy prefill (attention-statistics scorer) / full prefill
TARGET_FLAT = 1.10  # late / early decode step time in the long fixed-budget run
TARGET_PEAK = 1.00  # policy peak memory / full-cache peak memory


def late_early(times: Sequence[float]) -> tuple[float, float, str] | None:
    """Median step time of an early window (5%..10% of the run, steps 100..200 of 2000) and of the last 5%."""
    n = len(times)
    if n < 20:
        return None
    a, b = max(1, n // 20), max(2, n // 10)
    early = statistics.median(times[a:b])
    late = statistics.median(times[n - max(1, n // 20) :])
    return early, late, f"steps {a}..{b} vs {n - max(1, n // 20)}..{n}"


def baseline_at_budget(result: BenchResult, b: int | None, framework: str = "kvpolicy") -> RunResult | None:
    """The full cache holding ``b`` entries, measured by the same framework (same process, same time)."""
    return next(
        (r for r in result.runs if r.kind == "baseline-at-budget" and r.framework == framework and r.context == b),
        None,
    )


def _target(r: RunResult, name: str, threshold: float, value: float | None, met: bool | None, detail: str) -> Target:
    return Target(
        name=name,
        policy=r.policy,
        ratio=r.ratio,
        context=r.context,
        value=value,
        threshold=threshold,
        met=met,
        detail=detail,
    )


def _bytes_target(r: RunResult) -> Target:
    """1. Cache bytes == budget bytes: the worst allocated/budget of a layer, or held/promised of a kv head."""
    worst, where = 0.0, ""
    for stage, cb in (("prefill", r.bytes_prefill), ("decode", r.bytes_decode)):
        if cb is None:
            continue
        for lb in cb.layers:
            if lb.budget_bytes and lb.alloc_bytes / lb.budget_bytes > worst:
                worst, where = lb.alloc_bytes / lb.budget_bytes, f"layer {lb.layer} after {stage}: allocated/budget"
            for hrow, prow in zip(lb.held or [], lb.promised or []):
                for hh, pp in zip(hrow, prow):
                    if pp and hh / pp > worst:
                        worst, where = hh / pp, f"layer {lb.layer} after {stage}: held/promised per head"
    return _target(r, "KV bytes <= 1.05x budget", TARGET_BYTES, worst, worst <= TARGET_BYTES, f"worst: {where}")


def _decode_target(r: RunResult, base: RunResult | None) -> Target | None:
    """2. The decode step at budget B vs the full cache at context B."""
    if not (base and base.decode_median_s and r.decode_median_s):
        return None
    q = r.decode_median_s / base.decode_median_s
    detail = f"{1e3 * r.decode_median_s:.2f} ms vs {1e3 * base.decode_median_s:.2f} ms (B={base.context})"
    return _target(r, "decode at B <= 1.1x full at B", TARGET_DECODE_AT_BUDGET, q, q <= TARGET_DECODE_AT_BUDGET, detail)


def _prefill_target(r: RunResult, full: RunResult | None) -> Target | None:
    """3. Prefill vs the full cache (the target applies to attention-statistics scorers; the others: info)."""
    if not (full and full.prefill_median_s and r.prefill_median_s):
        return None
    q = r.prefill_median_s / full.prefill_median_s
    name = "prefill (attn stats) <= 1.15x full" if r.attention_stats else "prefill <= 1.15x full (info)"
    detail = f"median of {len(r.prefill_s)}: {r.prefill_median_s:.3f} s vs {full.prefill_median_s:.3f} s"
    return _target(r, name, TARGET_PREFILL, q, q <= TARGET_PREFILL, detail)


def _peak_target(r: RunResult, full: RunResult | None) -> Target | None:
    """5. Peak memory above the configuration's start vs the full cache's."""
    if not (full and full.peak_delta_bytes is not None and r.peak_delta_bytes is not None):
        return None
    detail = (
        f"{r.peak_delta_bytes / MiB:.1f} MiB vs {full.peak_delta_bytes / MiB:.1f} MiB above the "
        f"configuration's starting memory"
    )
    q = r.peak_delta_bytes / max(1, full.peak_delta_bytes)
    return _target(r, "peak memory <= full", TARGET_PEAK, q, r.peak_delta_bytes <= full.peak_delta_bytes, detail)


def _flat_target(r: RunResult) -> Target:
    """4. The long fixed-budget run decodes at a flat step time (late/early)."""
    name = "decode flat (late/early <= 1.1)"
    le = late_early(r.decode_step_s)
    if le is None:
        return _target(r, name, TARGET_FLAT, None, None, "run too short")
    early, late, where = le
    detail = f"{where}: {1e3 * early:.2f} -> {1e3 * late:.2f} ms"
    return _target(r, name, TARGET_FLAT, late / early, late / early <= TARGET_FLAT, detail)


def evaluate_targets(result: BenchResult) -> list[Target]:
    """Each target, for each policy configuration it applies to: met, missed, or not evaluable (and why)."""
    out: list[Target] = []
    for r in result.runs:
        if r.framework != "kvpolicy" or r.kind != "prefill+decode" or r.policy == "full":
            continue
        full = result.find("full", r.context)
        out.append(_bytes_target(r))
        checks = (
            _decode_target(r, baseline_at_budget(result, r.budget_tokens)),
            _prefill_target(r, full),
            _peak_target(r, full),
        )
        out.extend(t for t in checks if t is not None)
    out.extend(_flat_target(r) for r in result.runs if r.kind == "long-decode" and r.framework == "kvpolicy")
    return out
