"""From per-sample results to what a report states: per-side metrics with bootstrap intervals, policy-minus-full
deltas, running estimates during a run, and the one paired bootstrap every comparison of two policies uses.

Perplexity is pooled (``exp`` of the NLL summed over all scored tokens over their count), never a mean of per-sample
perplexities; KL and top-1 are pooled over teacher-forced steps; ROUGE-L and string match are per-sample means. String
match is also given per sample kind and as the unweighted mean of the kinds' means (``exact_match_macro``): RULER's
average over its tasks, which does not depend on how many samples each task got.
Intervals resample *samples* (with the same indices on both sides of a paired difference).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from . import metrics as M
from .budget import TYPE_NAMES
from .spec import Delta, SampleResult, SideMetrics


# ================================================================================================== one run
def column(samples: Sequence[SampleResult], side: str, attr: str) -> np.ndarray:
    return np.array([getattr(getattr(s, side), attr) for s in samples], dtype=np.float64)


def macro_mean(values: np.ndarray, kinds: np.ndarray, idx: np.ndarray) -> float:
    """The unweighted mean, over the kinds present among the samples ``idx``, of each kind's mean value (NaN
    skipped): RULER's average of per-task scores."""
    v, k = values[idx], kinds[idx]
    means = [float(np.nanmean(v[k == kind])) for kind in np.unique(k) if np.isfinite(v[k == kind]).any()]
    return float(np.mean(means)) if means else float("nan")


def match_by_kind(samples: Sequence[SampleResult], side: str, n_boot: int, seed: int) -> dict[str, Any]:
    """String match per sample kind (with a bootstrap interval over that kind's samples) and their macro mean (with
    one over all samples); empty when no sample has gold answers."""
    vals = [getattr(s, side).exact_match for s in samples]
    if all(v is None for v in vals):
        return {}
    arr = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
    kinds = np.array([s.kind for s in samples])
    by: dict[str, float] = {}
    by_ci: dict[str, tuple[float, float] | None] = {}
    for kind in dict.fromkeys(kinds.tolist()):
        sub = arr[kinds == kind]
        if not np.isfinite(sub).any():
            continue
        by[kind] = float(np.nanmean(sub))
        if n_boot:
            by_ci[kind] = M.bootstrap(lambda i, sub=sub: float(np.nanmean(sub[i])), len(sub), n_boot, seed)
    everything = np.arange(len(samples))
    macro_ci = M.bootstrap(lambda i: macro_mean(arr, kinds, i), len(samples), n_boot, seed) if n_boot else None
    return {
        "exact_match_by_kind": by,
        "exact_match_by_kind_ci": by_ci if n_boot else None,
        "exact_match_macro": macro_mean(arr, kinds, everything),
        "exact_match_macro_ci": macro_ci,
    }


def side_metrics(samples: Sequence[SampleResult], side: str, n_boot: int, seed: int) -> SideMetrics:
    nll, n = column(samples, side, "nll_sum"), column(samples, side, "scored_tokens")
    kl, steps, hits = column(samples, side, "kl_sum"), column(samples, side, "steps"), column(samples, side, "top1_hits")
    per_ppl = column(samples, side, "ppl")
    m = len(samples)

    def ci(fn: Callable[[np.ndarray], float]) -> tuple[float, float] | None:
        return M.bootstrap(fn, m, n_boot, seed) if n_boot > 0 else None

    def ratio_of_sums(a: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], float]:
        return lambda i: float(a[i].sum() / b[i].sum()) if b[i].sum() > 0 else float("nan")

    out: dict[str, Any] = {
        "ppl": M.pooled_ppl(nll, n),
        "ppl_ci": ci(lambda i: M.pooled_ppl(nll[i], n[i])),
        "ppl_per_sample_mean": float(np.nanmean(per_ppl)) if m else float("nan"),
        "ppl_per_sample_median": float(np.nanmedian(per_ppl)) if m else float("nan"),
        "scored_tokens": int(n.sum()),
    }
    if steps.sum() > 0:
        out["kl"] = float(kl.sum() / steps.sum())
        out["kl_ci"] = ci(ratio_of_sums(kl, steps))
        out["top1"] = float(hits.sum() / steps.sum())
        out["top1_ci"] = ci(ratio_of_sums(hits, steps))
    for name in ("rouge_l", "exact_match"):
        vals = [getattr(getattr(s, side), name) for s in samples]
        if any(v is not None for v in vals):
            arr = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
            out[name] = float(np.nanmean(arr))
            # a resample may draw only samples without the metric (NaN, no warning): the bootstrap drops those draws
            out[f"{name}_ci"] = ci(lambda i, arr=arr: float(np.nanmean(arr[i])) if np.isfinite(arr[i]).any()
                                   else float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample may hold only unanswered samples of a kind
        out.update(match_by_kind(samples, side, n_boot, seed))
    types = [getattr(s, side).kept_by_type_prefill for s in samples]
    if types and all(t is not None for t in types):
        out["kept_by_type_prefill"] = {k: float(np.mean([t[k] for t in types])) for k in TYPE_NAMES}
    prompt = [s.prompt_tokens_by_type for s in samples]
    if prompt and all(p is not None for p in prompt):
        out["prompt_tokens_by_type"] = {k: float(np.mean([p[k] for p in prompt])) for k in ("text", "image")}
        n_image = sum(p["image"] for p in prompt)
        if n_image > 0 and side == "full":
            out["image_kept_fraction"] = 1.0  # the full cache holds every prompt position
        elif n_image > 0 and "kept_by_type_prefill" in out:
            out["image_kept_fraction"] = float(sum(t["image"] for t in types) / n_image)
    prefill = float(column(samples, side, "prefill_s").sum())
    decode = float(column(samples, side, "decode_s").sum())
    # decode tokens: every row of a batch advances one token per step
    tokens = int(column(samples, side, "decode_steps").sum())
    out.update(
        kept_tokens_prefill=float(column(samples, side, "kept_prefill").mean()),
        kept_tokens_end=float(column(samples, side, "kept_end").mean()),
        prompt_tokens=float(np.mean([s.prompt_tokens for s in samples])),
        ratio_prefill=float(column(samples, side, "ratio_prefill").mean()),
        ratio_end=float(column(samples, side, "ratio_end").mean()),
        bytes_prefill=float(column(samples, side, "bytes_prefill").mean()),
        bytes_end=float(column(samples, side, "bytes_end").mean()),
        allocated_bytes_prefill=float(column(samples, side, "allocated_bytes_prefill").mean()),
        allocated_bytes_end=float(column(samples, side, "allocated_bytes_end").mean()),
        prefill_s=prefill,
        decode_s=decode,
        decode_tokens=tokens,
        decode_tokens_per_s=tokens / decode if decode > 0 else None,
    )
    return SideMetrics(**out)


def deltas(samples: Sequence[SampleResult], n_boot: int, seed: int) -> dict[str, Delta]:
    """Policy minus full, with paired bootstrap intervals (both sides resampled with the same indices)."""
    m = len(samples)
    out: dict[str, Delta] = {}
    fn, fc = column(samples, "full", "nll_sum"), column(samples, "full", "scored_tokens")
    pn, pc = column(samples, "policy", "nll_sum"), column(samples, "policy", "scored_tokens")

    def ci(fn_: Callable[[np.ndarray], float]) -> tuple[float, float] | None:
        return M.bootstrap(fn_, m, n_boot, seed) if n_boot > 0 and m else None

    d_ppl = lambda i: M.pooled_ppl(pn[i], pc[i]) - M.pooled_ppl(fn[i], fc[i])  # noqa: E731
    out["ppl"] = Delta(value=d_ppl(np.arange(m)), ci=ci(d_ppl))
    for name in ("rouge_l", "exact_match"):
        a = [getattr(s.policy, name) for s in samples]
        c = [getattr(s.full, name) for s in samples]
        if all(x is not None for x in a + c) and m:
            diff = np.array(a, dtype=np.float64) - np.array(c, dtype=np.float64)
            out[name] = Delta(value=float(diff.mean()), ci=ci(lambda i, d=diff: float(d[i].mean())))
            if name == "exact_match":  # RULER's average: per-kind means of the paired differences, averaged
                kinds = np.array([s.kind for s in samples])
                out["exact_match_macro"] = Delta(
                    value=macro_mean(diff, kinds, np.arange(m)), ci=ci(lambda i, d=diff: macro_mean(d, kinds, i))
                )
    return out


def running_estimates(samples: Sequence[SampleResult]) -> dict[str, float]:
    if not samples:
        return {}
    out = {
        "ppl": M.pooled_ppl(column(samples, "policy", "nll_sum"), column(samples, "policy", "scored_tokens")),
        "full_ppl": M.pooled_ppl(column(samples, "full", "nll_sum"), column(samples, "full", "scored_tokens")),
    }
    steps = column(samples, "policy", "steps").sum()
    if steps:
        out["kl"] = float(column(samples, "policy", "kl_sum").sum() / steps)
        out["top1"] = float(column(samples, "policy", "top1_hits").sum() / steps)
    for name in ("rouge_l", "exact_match"):
        vals = [getattr(s.policy, name) for s in samples if getattr(s.policy, name) is not None]
        if vals:
            out[name] = float(np.mean(vals))
    return out



# ================================================================================================== paired comparisons
class PairedSamples(Protocol):
    """One side of a paired comparison: per-sample values of the same samples, in the same order, as the other side
    (:class:`PerSample` here; ``kvpolicy.sweep.Evaluation`` for ablations)."""

    def n_samples(self) -> int: ...

    def aggregate(self, metric: str, idx: np.ndarray | None = None) -> np.ndarray | float:
        """The metric over the samples ``idx`` (all when ``None``); a 2-D ``[resamples, n]`` index array gives one
        value per row."""
        ...


def paired_bootstrap(base: PairedSamples, variant: PairedSamples, metric: str, resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(delta, low, high)``: the variant's metric minus the base's over all samples, and the percentile interval of
    that difference over ``resamples`` paired resamples of the samples (same indices for both). Pooled metrics are
    recomputed from the resampled sums, not averaged per sample."""
    n_base = base.n_samples()
    n_var = variant.n_samples()
    if n_base != n_var:
        raise ValueError(f"paired bootstrap needs the same samples: base has {n_base}, variant {n_var}")
    delta = float(variant.aggregate(metric)) - float(base.aggregate(metric))
    if n_base < 2:
        return delta, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_base, size=(resamples, n_base))
    diffs = np.asarray(variant.aggregate(metric, idx)) - np.asarray(base.aggregate(metric, idx))
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return delta, float("nan"), float("nan")
    alpha = 1.0 - confidence
    return delta, float(np.quantile(diffs, alpha / 2)), float(np.quantile(diffs, 1 - alpha / 2))


#: per-sample numerator and denominator of the metrics pooled over tokens or steps, in a result's samples
POOLED_SIDE: dict[str, tuple[str, str]] = {
    "ppl": ("nll_sum", "scored_tokens"),
    "kl": ("kl_sum", "steps"),
    "top1": ("top1_hits", "steps"),
}


class PerSample:
    """Per-sample values of one side of a result (a ``samples[*].policy`` or ``.full`` of its JSON), for
    :func:`paired_bootstrap`: pooled metrics (:data:`POOLED_SIDE`) from their sums, others as NaN-skipping means."""

    def __init__(self, sides: Sequence[Mapping[str, Any]]) -> None:
        self.sides = list(sides)

    def values(self, name: str) -> np.ndarray:
        return np.array([np.nan if s.get(name) is None else s[name] for s in self.sides], dtype=np.float64)

    def n_samples(self) -> int:
        return len(self.sides)

    def aggregate(self, metric: str, idx: np.ndarray | None = None) -> np.ndarray | float:
        if idx is None:
            idx = np.arange(len(self.sides))
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if metric in POOLED_SIDE:
                num, den = (self.values(k) for k in POOLED_SIDE[metric])
                value = num[idx].sum(axis=-1) / den[idx].sum(axis=-1)
                return np.exp(value) if metric == "ppl" else value
            return np.nanmean(self.values(metric)[idx], axis=-1)


def paired_difference(
    doc_a: dict[str, Any], doc_b: dict[str, Any], key: str, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any] | None:
    """Policy A minus policy B on the samples both result documents share (their ``policy`` sides), with the paired
    bootstrap interval of :func:`paired_bootstrap` (95%). ``None`` when they share no sample or the metric is
    missing."""
    a = {s["id"]: s["policy"] for s in doc_a["samples"]}
    b = {s["id"]: s["policy"] for s in doc_b["samples"]}
    ids = [i for i in a if i in b]
    if not ids:
        return None
    side_a, side_b = PerSample([a[i] for i in ids]), PerSample([b[i] for i in ids])
    if key not in POOLED_SIDE and np.all(np.isnan(side_a.values(key) - side_b.values(key))):
        return None
    value, lo, hi = paired_bootstrap(side_b, side_a, key, n_boot, 0.95, seed)
    return {"value": value, "ci": (lo, hi), "n": len(ids)}


__all__ = [
    "POOLED_SIDE",
    "PairedSamples",
    "PerSample",
    "column",
    "deltas",
    "macro_mean",
    "match_by_kind",
    "paired_bootstrap",
    "paired_difference",
    "running_estimates",
    "side_metrics",
]
